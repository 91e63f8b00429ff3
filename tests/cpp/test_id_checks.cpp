// The bucket-id checks (csrc/id_checks.h): what a host read finds, and the cache that lets the CUDA
// binding read a tensor once per version instead of once per call. The cache is device-agnostic, so it is
// tested here on CPU tensors; on CUDA, tests/python/test_cuda.py checks the behaviour through the op.
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "../../csrc/attention.h"
#include "../../csrc/id_checks.h"

namespace {

using relattn::ops::IdCheck;
using relattn::ops::IdSummary;
using relattn::ops::IdSummaryCache;
using relattn::ops::summarize_ids;
using torch::Tensor;

Tensor ids(std::vector<int64_t> v, torch::Dtype dtype = torch::kLong) {
  return torch::tensor(v, torch::kLong).to(dtype);
}

TEST(SummarizeIds, RangeAndLayout) {
  // Shaw clipping: distinct ids.
  IdSummary s = summarize_ids(ids({0, 1, 2, 3, 4}), true);
  EXPECT_EQ(s.lo, 0);
  EXPECT_EQ(s.hi, 4);
  EXPECT_TRUE(s.distinct);
  EXPECT_TRUE(s.runs);
  // T5-like: each id's entries consecutive, some ids repeated.
  s = summarize_ids(ids({5, 5, 4, 3, 3, 3, 0, 1, 1, 2}, torch::kInt), true);
  EXPECT_EQ(s.lo, 0);
  EXPECT_EQ(s.hi, 5);
  EXPECT_FALSE(s.distinct);
  EXPECT_TRUE(s.runs);
  // An id coming back after another one: neither.
  s = summarize_ids(ids({1, 0, 1}), true);
  EXPECT_FALSE(s.distinct);
  EXPECT_FALSE(s.runs);
  // Out-of-range ids are summarised as they are (the range check is the caller's, against its R).
  s = summarize_ids(ids({-3, 7, 1000000000000}), true);
  EXPECT_EQ(s.lo, -3);
  EXPECT_EQ(s.hi, 1000000000000);
  EXPECT_TRUE(s.distinct);
  // Without layout: the range only, of a non-contiguous tensor.
  const Tensor strided = torch::arange(24, torch::kInt).view({4, 6}).t();
  ASSERT_FALSE(strided.is_contiguous());
  s = summarize_ids(strided.narrow(0, 1, 3), false);
  EXPECT_EQ(s.lo, 1);
  EXPECT_EQ(s.hi, 21);
  EXPECT_FALSE(s.distinct);
  EXPECT_FALSE(s.runs);
  // Empty.
  s = summarize_ids(torch::empty({0}, torch::kLong), false);
  EXPECT_LT(s.hi, s.lo);
}

TEST(IdSummaryCache, HitsOnlyTheSameTensorAtTheSameVersion) {
  IdSummaryCache cache(8);
  Tensor t = ids({0, 1, 2, 1, 0});
  EXPECT_FALSE(cache.find(t, false).has_value());
  cache.insert(t, false, summarize_ids(t, false));
  ASSERT_TRUE(cache.find(t, false).has_value());
  EXPECT_EQ(cache.find(t, false)->hi, 2);
  // A summary without layout does not answer a request for one.
  EXPECT_FALSE(cache.find(t, true).has_value());
  // Another tensor over the same storage, sharing t's version counter: found (same view of the data).
  EXPECT_TRUE(cache.find(t.detach(), false).has_value());
  // A view at another offset or with other sizes, and a copy: not found.
  EXPECT_FALSE(cache.find(t.narrow(0, 1, 4), false).has_value());
  EXPECT_FALSE(cache.find(t.narrow(0, 0, 4), false).has_value());
  EXPECT_FALSE(cache.find(t.clone(), false).has_value());
  EXPECT_FALSE(cache.find(t.to(torch::kInt), false).has_value());
  // Any in-place change, through t or a view of it, bumps the version: not found any more.
  t.narrow(0, 4, 1).fill_(99);
  EXPECT_FALSE(cache.find(t, false).has_value());
  cache.insert(t, false, summarize_ids(t, false));
  EXPECT_EQ(cache.find(t, false)->hi, 99);
  EXPECT_EQ(cache.size(), 1u);  // the stale summary of t was replaced, not kept beside the new one
  {
    torch::NoGradGuard no_grad;
    t.copy_(ids({0, 0, 0, 0, 0}));
  }
  EXPECT_FALSE(cache.find(t, false).has_value());
}

TEST(IdSummaryCache, FreedStoragesAndInferenceTensorsNeverMatch) {
  IdSummaryCache cache(8);
  {
    Tensor t = ids({0, 1, 2});
    cache.insert(t, true, summarize_ids(t, true));
    EXPECT_EQ(cache.size(), 1u);
  }
  // A new tensor of the same shape, very likely at the same address (CPU allocator reuse), is new data.
  Tensor u = ids({0, 1, 5});
  EXPECT_FALSE(cache.find(u, true).has_value());
  cache.insert(u, true, summarize_ids(u, true));
  EXPECT_EQ(cache.size(), 1u);  // the freed storage's entry was dropped

  Tensor inf;
  {
    c10::InferenceMode guard;
    inf = ids({0, 1, 2});
  }
  EXPECT_FALSE(IdSummaryCache::cacheable(inf));
  cache.insert(inf, true, summarize_ids(inf, true));
  EXPECT_FALSE(cache.find(inf, true).has_value());
  EXPECT_EQ(cache.size(), 1u);
}

TEST(IdSummaryCache, EvictsTheLeastRecentlyUsed) {
  IdSummaryCache cache(2);
  Tensor a = ids({0}), b = ids({1}), c = ids({2});
  cache.insert(a, false, summarize_ids(a, false));
  cache.insert(b, false, summarize_ids(b, false));
  ASSERT_TRUE(cache.find(a, false).has_value());  // a is now the most recent
  cache.insert(c, false, summarize_ids(c, false));
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_TRUE(cache.find(a, false).has_value());
  EXPECT_FALSE(cache.find(b, false).has_value());
  EXPECT_TRUE(cache.find(c, false).has_value());
}

// Through prepare(), as the CUDA binding calls it: a table that was valid and then changed in place is
// checked again, and a bad id still gets the error naming the argument.
TEST(IdChecks, CachedModeSeesInPlaceChanges) {
  const Tensor q = torch::randn({1, 2, 5, 8}), k = torch::randn({1, 2, 6, 8}), v = torch::randn({1, 2, 6, 8});
  const Tensor rel_bias = torch::randn({2, 5});
  Tensor buckets = ids({0, 1, 2, 3, 4});
  Tensor rel_index = torch::zeros({5, 6}, torch::kLong);
  auto call = [&](std::optional<Tensor> b, std::optional<Tensor> ri, IdCheck mode) {
    return relattn::ops::prepare(q, k, v, std::nullopt, std::nullopt, rel_bias, b, ri, std::nullopt,
                                 std::nullopt, false, std::nullopt, 0, 0.0, std::nullopt, std::nullopt, std::nullopt,
                                 std::nullopt, mode);
  };
  for (IdCheck mode : {IdCheck::kHost, IdCheck::kHostCached}) {
    buckets.copy_(ids({0, 1, 2, 3, 4}));
    rel_index.zero_();
    auto a = call(buckets, std::nullopt, mode);
    EXPECT_TRUE(a.buckets_distinct);
    a = call(buckets, std::nullopt, mode);  // a cache hit in kHostCached: the same answer
    EXPECT_TRUE(a.buckets_distinct);
    EXPECT_TRUE(a.buckets_runs);
    buckets.narrow(0, 2, 1).fill_(0);  // [0, 1, 0, 3, 4]: still in range, no longer distinct nor runs
    a = call(buckets, std::nullopt, mode);
    EXPECT_FALSE(a.buckets_distinct);
    EXPECT_FALSE(a.buckets_runs);
    buckets.narrow(0, 0, 1).fill_(5);  // R = 5: out of range
    try {
      call(buckets, std::nullopt, mode);
      ADD_FAILURE() << "an out-of-range id in buckets was accepted";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("buckets holds bucket ids in [0, 5]"), std::string::npos) << e.what();
    }
    call(std::nullopt, rel_index, mode);
    call(std::nullopt, rel_index, mode);
    rel_index.index_put_({3, 4}, -1);
    try {
      call(std::nullopt, rel_index, mode);
      ADD_FAILURE() << "an out-of-range id in rel_index was accepted";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("rel_index holds bucket ids in [-1, 0]"), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace

namespace {

// kDevice (what the CUDA binding uses while a CUDA graph is captured) reads nothing on the host: the range
// check is torch's _assert_async, and the table's layout is the one read before capture (asserted too) or
// else the general one. On CPU tensors _assert_async raises at once, which lets the branch be checked here.
TEST(IdChecks, DeviceModeAssertsAndTakesTheGeneralLayout) {
  const Tensor q = torch::randn({1, 2, 5, 8}), k = torch::randn({1, 2, 6, 8}), v = torch::randn({1, 2, 6, 8});
  const Tensor rel_bias = torch::randn({2, 5});
  auto call = [&](std::optional<Tensor> b, std::optional<Tensor> ri) {
    return relattn::ops::prepare(q, k, v, std::nullopt, std::nullopt, rel_bias, b, ri, std::nullopt,
                                 std::nullopt, false, std::nullopt, 0, 0.0, std::nullopt, std::nullopt, std::nullopt,
                                 std::nullopt, IdCheck::kDevice);
  };
  const auto a = call(ids({0, 1, 2, 3, 4}), std::nullopt);
  EXPECT_FALSE(a.buckets_distinct);
  EXPECT_FALSE(a.buckets_runs);
  EXPECT_EQ(a.M, 2);
  call(std::nullopt, torch::full({5, 6}, 4, torch::kInt));
  for (const Tensor& bad : {ids({0, 1, 5, 3, 4}), ids({-1, 1, 2, 3, 4})}) {
    try {
      call(bad, std::nullopt);
      ADD_FAILURE() << "an out-of-range id was accepted: " << bad;
    } catch (const c10::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("buckets holds a bucket id outside [0, R) with R = 5"), std::string::npos) << msg;
    }
  }
  try {
    call(std::nullopt, torch::full({5, 6}, 5, torch::kInt));
    ADD_FAILURE() << "an out-of-range rel_index was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("rel_index holds a bucket id outside"), std::string::npos) << e.what();
  }
}

// check_backward_args (every backend's): grad_out, out, lse and grad_lse on q's device. The tensor-core backward
// reads out's data pointer; an out elsewhere (a direct call of relattn::attention_backward) must be an error, not
// a read of another device's memory.
TEST(IdChecks, BackwardArgumentsOnQsDevice) {
  const Tensor q = torch::randn({1, 2, 5, 8}), k = torch::randn({1, 2, 6, 8}), v = torch::randn({1, 2, 6, 8});
  const auto a = relattn::ops::prepare(q, k, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                       std::nullopt, std::nullopt, false, std::nullopt, 0, 0.0, std::nullopt,
                                       std::nullopt, std::nullopt, std::nullopt, IdCheck::kHost);
  const Tensor out = torch::randn({1, 2, 5, 8}), lse = torch::randn({1, 2, 5});
  EXPECT_FALSE(relattn::ops::check_backward_args(a, out, out, lse, std::nullopt));
  const auto meta = [](const Tensor& t) { return torch::empty_like(t, t.options().device(torch::kMeta)); };
  for (int which = 0; which < 4; ++which) {
    try {
      relattn::ops::check_backward_args(a, which == 0 ? meta(out) : out, which == 1 ? meta(out) : out,
                                        which == 2 ? meta(lse) : lse, which == 3 ? std::optional(meta(lse)) : lse);
      ADD_FAILURE() << "argument " << which << " on the meta device was accepted";
    } catch (const c10::Error& e) {
      const char* names[] = {"grad_out is on meta", "out is on meta", "lse is on meta", "grad_lse is on meta"};
      EXPECT_NE(std::string(e.what()).find(names[which]), std::string::npos) << e.what();
    }
  }
}

TEST(IdChecks, DeviceModeReusesTheLayoutReadBeforeCaptureAndAssertsIt) {
  const Tensor q = torch::randn({1, 2, 5, 8}), k = torch::randn({1, 2, 6, 8}), v = torch::randn({1, 2, 6, 8});
  const Tensor rel_bias = torch::randn({2, 6});
  auto call = [&](const Tensor& b, IdCheck mode) {
    return relattn::ops::prepare(q, k, v, std::nullopt, std::nullopt, rel_bias, b, std::nullopt, std::nullopt,
                                 std::nullopt, false, std::nullopt, 0, 0.0, std::nullopt, std::nullopt, std::nullopt,
                                 std::nullopt, mode);
  };
  auto expect_layout_error = [&](const Tensor& b, const char* what) {
    try {
      call(b, IdCheck::kDevice);
      ADD_FAILURE() << "a table no longer " << what << " was accepted: " << b;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("buckets was changed after it was checked (its ids are no "
                                                       "longer ") + what + ")"),
                std::string::npos)
          << e.what();
    }
  };
  // Distinct (clip-like): the warm-up call reads it, the call under capture reuses that.
  Tensor clip = ids({0, 1, 2, 3, 4});
  call(clip, IdCheck::kHostCached);
  auto a = call(clip, IdCheck::kDevice);
  EXPECT_TRUE(a.buckets_distinct);
  EXPECT_TRUE(a.buckets_runs);
  // Writes the version counter does not see (what a replay may find in the captured buffer): another
  // distinct table passes, a repeated id fails the device-side assertion.
  Tensor alias = clip.variable_data();
  alias.copy_(ids({4, 3, 2, 1, 0}));
  EXPECT_TRUE(call(clip, IdCheck::kDevice).buckets_distinct);
  alias.copy_(ids({0, 1, 2, 1, 4}));
  expect_layout_error(clip, "distinct");

  // Runs (T5-like).
  Tensor t5 = ids({5, 5, 4, 3, 3, 0, 1, 1, 2});
  call(t5, IdCheck::kHostCached);
  a = call(t5, IdCheck::kDevice);
  EXPECT_FALSE(a.buckets_distinct);
  EXPECT_TRUE(a.buckets_runs);
  Tensor t5_alias = t5.variable_data();
  t5_alias.copy_(ids({0, 0, 0, 1, 2, 3, 3, 4, 5}));  // other runs: fine
  EXPECT_TRUE(call(t5, IdCheck::kDevice).buckets_runs);
  t5_alias.copy_(ids({0, 0, 1, 0, 2, 3, 3, 4, 5}));  // id 0 in two runs
  expect_layout_error(t5, "in runs");

  // A table first seen under capture: the general layout, and nothing about its layout is asserted.
  Tensor fresh = ids({1, 0, 1, 2, 3});
  a = call(fresh, IdCheck::kDevice);
  EXPECT_FALSE(a.buckets_distinct);
  EXPECT_FALSE(a.buckets_runs);
}

}  // namespace

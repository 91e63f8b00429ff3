// relattn::attention from C++: the dispatcher op against a naive float64 reference (SPEC §1), its
// autograd gradients (SPEC §2), the helpers (SPEC §3), errors on bad input (SPEC §5), and training with
// C++ autograd alone.
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "../../kernels/dropout.h"
#include "relattn/relattn.h"

namespace {

using torch::Tensor;
using torch::indexing::Slice;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------------
// The naive reference: full score matrix, the bucket of every pair, relative embeddings gathered per
// pair. Computed in `dtype` (float64 by default) with plain ATen ops, so autograd gives its gradients.

// [B, Lq, Lk] int64 bucket of every (query, key) pair, or undefined when no bucket source is given.
Tensor pair_buckets(int64_t B, int64_t Lq, int64_t Lk, const relattn::AttentionOptions& o) {
  if (o.rel_index().has_value()) {
    const Tensor idx = o.rel_index()->to(torch::kLong);
    return idx.dim() == 2 ? idx.expand({B, Lq, Lk}) : idx;
  }
  if (!o.buckets().has_value()) return {};
  const Tensor& buckets = *o.buckets();
  const int64_t M = (buckets.numel() - 1) / 2;
  const Tensor i = torch::arange(Lq, torch::kLong).view({-1, 1}) + o.q_offset();
  const Tensor j = torch::arange(Lk, torch::kLong).view({1, -1});
  const Tensor d = (j - i).clamp(-M, M) + M;
  return buckets.to(torch::kLong).index({d}).expand({B, Lq, Lk});
}

// A table [R, X] shared by all heads or [H, R, X], gathered at every pair: [H, B, Lq, Lk, X].
Tensor gather_table(const Tensor& table, int64_t H, const Tensor& beta) {
  const Tensor per_head = table.dim() == 2 ? table.unsqueeze(0).expand({H, table.size(0), table.size(1)}) : table;
  return per_head.index({Slice(), beta});
}

std::tuple<Tensor, Tensor> reference_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                               const relattn::AttentionOptions& o,
                                               torch::ScalarType dtype = torch::kDouble,
                                               const Tensor& dropout_keep = {}) {
  const Tensor q = q_in.to(dtype);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k_in.size(1), Lk = k_in.size(2);
  const double scale = o.scale().value_or(1.0 / std::sqrt(static_cast<double>(D)));
  const Tensor k = k_in.to(dtype).repeat_interleave(H / Hk, 1);
  const Tensor v = v_in.to(dtype).repeat_interleave(H / Hk, 1);
  const Tensor beta = pair_buckets(B, Lq, Lk, o);

  Tensor s = torch::einsum("bhid,bhjd->bhij", {q, k});
  if (o.rel_k().has_value()) {
    s = s + torch::einsum("bhid,hbijd->bhij", {q, gather_table(o.rel_k()->to(dtype), H, beta)});
  }
  s = s * scale;
  if (o.rel_bias().has_value()) s = s + o.rel_bias()->to(dtype).index({Slice(), beta}).permute({1, 0, 2, 3});
  const Tensor i = torch::arange(Lq, torch::kLong).view({-1, 1}) + o.q_offset();
  const Tensor j = torch::arange(Lk, torch::kLong).view({1, -1});
  const Tensor dist = (j - i).to(dtype);
  if (o.alibi_slopes().has_value()) s = s - o.alibi_slopes()->to(dtype).view({1, H, 1, 1}) * dist.abs();
  Tensor mask = torch::zeros({B, 1, Lq, Lk}, torch::kBool);
  if (o.key_padding_mask().has_value()) mask = mask | o.key_padding_mask()->view({B, 1, 1, Lk});
  if (o.causal()) mask = mask | (dist > 0).view({1, 1, Lq, Lk});
  if (o.segment_ids().has_value() || o.q_segment_ids().has_value()) {
    // query i has the id of key position i + q_offset (segment_ids), or its own (q_segment_ids)
    const Tensor k_ids = (o.segment_ids().has_value() ? *o.segment_ids() : *o.k_segment_ids()).to(torch::kLong);
    const Tensor q_ids = o.segment_ids().has_value()
                             ? k_ids.index({Slice(), torch::arange(Lq, torch::kLong) + o.q_offset()})
                             : o.q_segment_ids()->to(torch::kLong);
    mask = mask | (q_ids.view({B, 1, Lq, 1}) != k_ids.view({B, 1, 1, Lk}));
  }
  s = s.masked_fill(mask, -std::numeric_limits<double>::infinity());

  const Tensor lse = torch::logsumexp(s, -1);
  // Rows with every key masked: p = 0 (softmax would give NaN).
  Tensor p = torch::exp(s - lse.unsqueeze(-1).masked_fill(torch::isinf(lse).unsqueeze(-1), 0.0))
                 .masked_fill(mask, 0.0);
  if (dropout_keep.defined()) p = p * dropout_keep.to(dtype);  // dropout: weights of v and aV, not lse
  Tensor out = torch::einsum("bhij,bhjd->bhid", {p, v});
  if (o.rel_v().has_value()) {
    out = out + torch::einsum("bhij,hbijd->bhid", {p, gather_table(o.rel_v()->to(dtype), H, beta)});
  }
  return {out, lse};
}

double max_abs(const Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }
double max_err(const Tensor& a, const Tensor& b) { return max_abs(a.to(torch::kDouble) - b.to(torch::kDouble)); }

// lse holds -inf for fully masked rows: compare finite entries, and that the -inf entries agree.
void expect_lse_close(const Tensor& lse, const Tensor& ref, double tol) {
  const Tensor l = lse.to(torch::kDouble);
  ASSERT_TRUE(torch::equal(torch::isinf(l), torch::isinf(ref)));
  const Tensor finite = torch::isfinite(ref);
  EXPECT_LE(max_err(l.masked_select(finite), ref.masked_select(finite)), tol);
}

// ---------------------------------------------------------------------------------------------------
// One attention problem: sizes and which features are on.

struct Case {
  std::string name;
  int64_t B = 2, H = 4, Hk = 4, Lq = 20, Lk = 20, D = 16, Dv = 8;
  bool shaw_k = false, shaw_v = false, per_head = false;
  int64_t clip = 3;   // Shaw / clip_bias: max_distance of clip_buckets
  bool t5 = false;    // rel_bias over t5_buckets(t5_num_buckets, 16, t5_bidirectional)
  int64_t t5_num_buckets = 8;
  bool t5_bidirectional = true;
  bool alibi = false;
  bool causal = false;
  bool padding = false;  // pad the tail of batch row 1
  bool rel_index = false;  // explicit per-pair buckets instead of a distance table
  int64_t q_offset = 0;
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

// The problem's tensors (float64 leaves) and options referring to them.
struct Problem {
  Tensor q, k, v;
  Tensor rel_k, rel_v, rel_bias;  // undefined when off
  relattn::AttentionOptions options;

  std::vector<Tensor> differentiable() const {
    std::vector<Tensor> xs{q, k, v};
    for (const Tensor& t : {rel_k, rel_v, rel_bias}) {
      if (t.defined()) xs.push_back(t);
    }
    return xs;
  }

  // The same problem in another dtype (tables follow q), as new leaves.
  Problem to(torch::ScalarType dtype) const {
    Problem p = *this;
    auto cast = [dtype](const Tensor& t) { return t.defined() ? t.detach().to(dtype).requires_grad_() : t; };
    p.q = cast(q);
    p.k = cast(k);
    p.v = cast(v);
    p.rel_k = cast(rel_k);
    p.rel_v = cast(rel_v);
    p.rel_bias = cast(rel_bias);
    if (rel_k.defined()) p.options.rel_k(p.rel_k);
    if (rel_v.defined()) p.options.rel_v(p.rel_v);
    if (rel_bias.defined()) p.options.rel_bias(p.rel_bias);
    if (options.alibi_slopes().has_value()) p.options.alibi_slopes(options.alibi_slopes()->to(dtype));
    return p;
  }
};

Problem make_problem(const Case& c, uint64_t seed = 0) {
  torch::manual_seed(seed);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  Problem p;
  p.q = torch::randn({c.B, c.H, c.Lq, c.D}, f64).requires_grad_();
  p.k = torch::randn({c.B, c.Hk, c.Lk, c.D}, f64).requires_grad_();
  p.v = torch::randn({c.B, c.Hk, c.Lk, c.Dv}, f64).requires_grad_();
  int64_t R = 2 * c.clip + 1;
  Tensor buckets = relattn::clip_buckets(c.clip);
  if (c.t5) {
    R = c.t5_num_buckets;
    buckets = relattn::t5_buckets(c.t5_num_buckets, 16, c.t5_bidirectional);
    p.rel_bias = torch::randn({c.H, R}, f64).requires_grad_();
    p.options.rel_bias(p.rel_bias);
  }
  auto table = [&](int64_t X) {
    return (c.per_head ? torch::randn({c.H, R, X}, f64) : torch::randn({R, X}, f64)).requires_grad_();
  };
  if (c.shaw_k) p.options.rel_k(p.rel_k = table(c.D));
  if (c.shaw_v) p.options.rel_v(p.rel_v = table(c.Dv));
  if (c.rel_index) {
    p.options.rel_index(torch::randint(0, R, {c.B, c.Lq, c.Lk}, torch::kLong));
  } else {
    p.options.buckets(buckets);
  }
  if (c.alibi) p.options.alibi_slopes(relattn::alibi_slopes(c.H).to(torch::kDouble));
  if (c.padding) {
    Tensor mask = torch::zeros({c.B, c.Lk}, torch::kBool);
    mask.index_put_({1, Slice(c.Lk - 5, torch::indexing::None)}, true);
    p.options.key_padding_mask(mask);
  }
  p.options.causal(c.causal).q_offset(c.q_offset);
  return p;
}

std::vector<Case> cases() {
  std::vector<Case> cs;
  auto add = [&](Case c) { cs.push_back(std::move(c)); };
  {
    Case c;
    c.name = "plain";
    add(c);
  }
  {
    Case c;
    c.name = "shaw_kv_clip";
    c.shaw_k = c.shaw_v = true;
    c.Lk = 24;
    add(c);
  }
  {
    Case c;
    c.name = "shaw_kv_per_head_causal";
    c.shaw_k = c.shaw_v = c.per_head = true;
    c.causal = true;
    add(c);
  }
  {
    Case c;
    c.name = "shaw_k_only";
    c.shaw_k = true;
    c.clip = 0;
    add(c);
  }
  {
    Case c;
    c.name = "t5_bidirectional";
    c.t5 = true;
    c.Lq = c.Lk = 40;
    add(c);
  }
  {
    Case c;
    c.name = "t5_unidirectional_causal";
    c.t5 = true;
    c.t5_bidirectional = false;
    c.causal = true;
    c.Lq = c.Lk = 40;
    add(c);
  }
  {
    Case c;
    c.name = "alibi_causal";
    c.alibi = true;
    c.causal = true;
    c.H = c.Hk = 6;
    add(c);
  }
  {
    Case c;
    c.name = "shaw_padding";
    c.shaw_k = c.shaw_v = true;
    c.padding = true;
    add(c);
  }
  {
    Case c;
    c.name = "gqa_shaw_t5_padding";
    c.H = 6;
    c.Hk = 2;
    c.shaw_k = c.shaw_v = true;
    c.t5 = true;
    c.padding = true;
    add(c);
  }
  {
    Case c;
    c.name = "mqa_shaw_per_head_alibi";
    c.H = 4;
    c.Hk = 1;
    c.shaw_k = c.shaw_v = c.per_head = true;
    c.alibi = true;
    add(c);
  }
  {
    Case c;
    c.name = "q_offset_causal_shaw";
    c.shaw_k = c.shaw_v = true;
    c.Lq = 8;
    c.Lk = 24;
    c.q_offset = 16;
    c.causal = true;
    add(c);
  }
  {
    Case c;
    c.name = "rel_index_shaw_bias";
    c.shaw_k = c.shaw_v = true;
    c.t5 = true;  // rel_bias [H, R] with R = t5_num_buckets
    c.rel_index = true;
    add(c);
  }
  return cs;
}

class AttentionCase : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionCase, Float64MatchesReference) {
  const Problem p = make_problem(GetParam());
  auto [out, lse] = relattn::attention_with_lse(p.q, p.k, p.v, p.options);
  auto [ref_out, ref_lse] = reference_attention(p.q, p.k, p.v, p.options);
  EXPECT_EQ(out.scalar_type(), torch::kDouble);
  EXPECT_EQ(lse.scalar_type(), torch::kDouble);
  EXPECT_EQ(out.sizes(), ref_out.sizes());
  EXPECT_EQ(lse.sizes(), ref_lse.sizes());
  EXPECT_LE(max_err(out, ref_out), 1e-10 * (1 + max_abs(ref_out)));
  expect_lse_close(lse, ref_lse, 1e-10 * (1 + max_abs(ref_lse.masked_select(torch::isfinite(ref_lse)))));
}

TEST_P(AttentionCase, Float32MatchesReference) {
  const Problem p64 = make_problem(GetParam());
  const Problem p = p64.to(torch::kFloat);
  auto [out, lse] = relattn::attention_with_lse(p.q, p.k, p.v, p.options);
  // The reference sees the same float32-rounded inputs, in float64.
  auto [ref_out, ref_lse] = reference_attention(p.q, p.k, p.v, p.to(torch::kDouble).options);
  EXPECT_EQ(out.scalar_type(), torch::kFloat);
  EXPECT_EQ(lse.scalar_type(), torch::kFloat);
  EXPECT_LE(max_err(out, ref_out), 1e-5 * (1 + max_abs(ref_out)));
  expect_lse_close(lse, ref_lse, 1e-5 * (1 + max_abs(ref_lse.masked_select(torch::isfinite(ref_lse)))));
}

TEST_P(AttentionCase, BFloat16WithinTwiceNaiveError) {
  const Problem p64 = make_problem(GetParam());
  const Problem p = p64.to(torch::kBFloat16);
  const Problem exact = p.to(torch::kDouble);
  const Tensor out = relattn::attention(p.q, p.k, p.v, p.options);
  const Tensor ref = std::get<0>(reference_attention(exact.q, exact.k, exact.v, exact.options));
  const Tensor naive = std::get<0>(reference_attention(p.q, p.k, p.v, p.options, torch::kBFloat16));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  EXPECT_LE(max_err(out, ref), 2 * max_err(naive, ref) + 1e-3 * max_abs(ref));
}

TEST_P(AttentionCase, GradientsMatchReference) {
  const Problem p = make_problem(GetParam());
  const std::vector<Tensor> inputs = p.differentiable();
  torch::manual_seed(1);
  const Tensor grad_out = torch::randn({p.q.size(0), p.q.size(1), p.q.size(2), p.v.size(3)}, torch::kDouble);

  const Tensor out = relattn::attention(p.q, p.k, p.v, p.options);
  ASSERT_TRUE(out.requires_grad());
  const std::vector<Tensor> grads = torch::autograd::grad({out}, inputs, {grad_out});
  const Tensor ref = std::get<0>(reference_attention(p.q, p.k, p.v, p.options));
  const std::vector<Tensor> ref_grads = torch::autograd::grad({ref}, inputs, {grad_out});

  const char* names[] = {"q", "k", "v", "table 1", "table 2", "table 3"};
  ASSERT_EQ(grads.size(), ref_grads.size());
  for (size_t n = 0; n < grads.size(); ++n) {
    SCOPED_TRACE(names[n]);
    ASSERT_TRUE(grads[n].defined());
    EXPECT_EQ(grads[n].sizes(), inputs[n].sizes());
    EXPECT_LE(max_err(grads[n], ref_grads[n]), 1e-9 * (1 + max_abs(ref_grads[n])));
  }
}

// Dropout: the float64 reference with each pair's factor from kernels/dropout.h (the mask's own model is
// checked independently in tests/python/test_dropout.py), forward and every gradient.
TEST_P(AttentionCase, DropoutMatchesReference) {
  Problem p = make_problem(GetParam());
  const int64_t seed = 0x5eed5eed1234LL;
  const double drop = 0.3;
  p.options.dropout_p(drop).dropout_seed(torch::tensor({seed}, torch::kLong));
  const int64_t B = p.q.size(0), H = p.q.size(1), Lq = p.q.size(2), Lk = p.k.size(2);
  const uint32_t threshold = relattn::kernels::dropout_threshold(drop);
  const double scale = relattn::kernels::dropout_scale(threshold);
  Tensor keep = torch::empty({B, H, Lq, Lk}, torch::kDouble);
  auto acc = keep.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t j = 0; j < Lk; ++j)
          acc[b][h][i][j] = relattn::kernels::dropout_keep(seed, threshold, b, h, i, j) ? scale : 0.0;

  const std::vector<Tensor> inputs = p.differentiable();
  torch::manual_seed(1);
  const Tensor grad_out = torch::randn({B, H, Lq, p.v.size(3)}, torch::kDouble);
  const Tensor out = relattn::attention(p.q, p.k, p.v, p.options);
  const Tensor ref = std::get<0>(reference_attention(p.q, p.k, p.v, p.options, torch::kDouble, keep));
  EXPECT_LE(max_err(out, ref), 1e-10 * (1 + max_abs(ref)));
  const std::vector<Tensor> grads = torch::autograd::grad({out}, inputs, {grad_out});
  const std::vector<Tensor> ref_grads = torch::autograd::grad({ref}, inputs, {grad_out});
  for (size_t n = 0; n < grads.size(); ++n) {
    SCOPED_TRACE(n);
    EXPECT_LE(max_err(grads[n], ref_grads[n]), 1e-9 * (1 + max_abs(ref_grads[n])));
  }
  // The same seed gives the same bits; p = 0 is no dropout at all.
  EXPECT_TRUE(torch::equal(relattn::attention(p.q, p.k, p.v, p.options), out));
  const Tensor plain = relattn::attention(p.q, p.k, p.v, relattn::AttentionOptions(p.options).dropout_p(0.0));
  EXPECT_TRUE(torch::equal(plain, std::get<0>(relattn::attention_with_lse(
                                      p.q, p.k, p.v, relattn::AttentionOptions(p.options).dropout_p(0.0).dropout_seed(std::nullopt)))));
  EXPECT_FALSE(torch::allclose(plain, out));
}

TEST_P(AttentionCase, LseGradientMatchesReference) {
  const Problem p = make_problem(GetParam());
  const std::vector<Tensor> inputs = p.differentiable();
  auto [out, lse] = relattn::attention_with_lse(p.q, p.k, p.v, p.options);
  auto [ref_out, ref_lse] = reference_attention(p.q, p.k, p.v, p.options);
  // A loss through both outputs; masked (-inf) lse rows are left out of it.
  auto loss = [](const Tensor& o, const Tensor& l) {
    return o.pow(2).sum() + torch::where(torch::isfinite(l), l, torch::zeros_like(l)).sum();
  };
  const std::vector<Tensor> grads = torch::autograd::grad({loss(out, lse)}, inputs);
  const std::vector<Tensor> ref_grads = torch::autograd::grad({loss(ref_out, ref_lse)}, inputs);
  for (size_t n = 0; n < grads.size(); ++n) {
    EXPECT_LE(max_err(grads[n], ref_grads[n]), 1e-9 * (1 + max_abs(ref_grads[n]))) << "input " << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionCase, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------------------
// The op through the dispatcher.

TEST(Dispatcher, SchemaCallMatchesPublicApi) {
  using ForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, bool,
                                               std::optional<double>, int64_t, double, const OptTensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&);
  const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("relattn::attention_forward", "").typed<ForwardFn>();
  Case c;
  c.shaw_k = c.shaw_v = true;
  c.t5 = true;
  c.padding = true;
  c.causal = true;
  const Problem p = make_problem(c).to(torch::kFloat);
  const auto& o = p.options;
  auto [out, lse] = op.call(p.q, p.k, p.v, o.rel_k(), o.rel_v(), o.rel_bias(), o.buckets(), o.rel_index(),
                            o.alibi_slopes(), o.key_padding_mask(), o.causal(), o.scale(), o.q_offset(), 0.0,
                            std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  auto [api_out, api_lse] = relattn::attention_with_lse(p.q, p.k, p.v, o);
  EXPECT_TRUE(torch::equal(out, api_out));
  EXPECT_TRUE(torch::equal(lse, api_lse));
  EXPECT_TRUE(out.requires_grad());  // the Autograd kernel is registered

  auto [ref, ref_lse] = reference_attention(p.q, p.k, p.v, p.to(torch::kDouble).options);
  EXPECT_LE(max_err(out, ref), 1e-5 * (1 + max_abs(ref)));
}

TEST(Dispatcher, BackwardIsAnOp) {
  EXPECT_NO_THROW(c10::Dispatcher::singleton().findSchemaOrThrow("relattn::attention_backward", ""));
  for (const char* helper : {"relattn::clip_buckets", "relattn::t5_buckets", "relattn::alibi_slopes",
                             "relattn::cuda_kernels_built"}) {
    EXPECT_NO_THROW(c10::Dispatcher::singleton().findSchemaOrThrow(helper, "")) << helper;
  }
}

TEST(Attention, ExplicitScale) {
  Case c;
  c.shaw_k = c.shaw_v = true;
  Problem p = make_problem(c);
  p.options.scale(0.3);
  const Tensor out = relattn::attention(p.q, p.k, p.v, p.options);
  const Tensor ref = std::get<0>(reference_attention(p.q, p.k, p.v, p.options));
  EXPECT_LE(max_err(out, ref), 1e-10 * (1 + max_abs(ref)));
}

TEST(Attention, FullyMaskedRowsAreZeroWithZeroGradients) {
  Case c;
  c.shaw_k = c.shaw_v = true;
  Problem p = make_problem(c);
  Tensor mask = torch::zeros({c.B, c.Lk}, torch::kBool);
  mask.index_put_({1}, true);  // batch row 1: every key is padding
  p.options.key_padding_mask(mask);
  auto [out, lse] = relattn::attention_with_lse(p.q, p.k, p.v, p.options);
  EXPECT_FALSE(torch::isnan(out).any().item<bool>());
  EXPECT_EQ(max_abs(out.index({1})), 0.0);
  EXPECT_TRUE(torch::all(torch::isneginf(lse.index({1}))).item<bool>());
  out.sum().backward();
  EXPECT_EQ(max_abs(p.q.grad().index({1})), 0.0);
  EXPECT_EQ(max_abs(p.k.grad().index({1})), 0.0);
  EXPECT_EQ(max_abs(p.v.grad().index({1})), 0.0);
  EXPECT_FALSE(torch::isnan(p.rel_k.grad()).any().item<bool>());
}

TEST(Attention, EmptyInputs) {
  const auto opts = relattn::AttentionOptions().rel_k(torch::randn({7, 8})).buckets(relattn::clip_buckets(3));
  {
    auto [out, lse] = relattn::attention_with_lse(torch::randn({0, 2, 5, 8}), torch::randn({0, 2, 5, 8}),
                                                  torch::randn({0, 2, 5, 4}), opts);
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 2, 5, 4}));
    EXPECT_EQ(lse.sizes(), (std::vector<int64_t>{0, 2, 5}));
  }
  {
    // No keys at all: every row is fully masked.
    auto [out, lse] = relattn::attention_with_lse(torch::randn({1, 2, 5, 8}), torch::randn({1, 2, 0, 8}),
                                                  torch::randn({1, 2, 0, 4}), opts);
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 2, 5, 4}));
    EXPECT_EQ(max_abs(out), 0.0);
    EXPECT_TRUE(torch::all(torch::isneginf(lse)).item<bool>());
  }
}

TEST(Attention, NonContiguousInputs) {
  Case c;
  c.shaw_k = c.shaw_v = true;
  const Problem p = make_problem(c);
  // [B, L, H, D] storage seen as [B, H, L, D], as a model's head split produces.
  const Tensor q = p.q.detach().transpose(1, 2).contiguous().transpose(1, 2);
  const Tensor k = p.k.detach().transpose(1, 2).contiguous().transpose(1, 2);
  const Tensor v = p.v.detach().transpose(1, 2).contiguous().transpose(1, 2);
  ASSERT_FALSE(q.is_contiguous());
  const Tensor out = relattn::attention(q, k, v, p.options);
  const Tensor ref = std::get<0>(reference_attention(q, k, v, p.options));
  EXPECT_LE(max_err(out, ref), 1e-10 * (1 + max_abs(ref)));
}

// ---------------------------------------------------------------------------------------------------
// Bad input: a c10::Error naming the argument.

template <typename F>
void expect_error(F&& f, const std::string& substring) {
  try {
    f();
    ADD_FAILURE() << "expected a c10::Error containing \"" << substring << "\"";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(substring), std::string::npos)
        << "message: " << e.what_without_backtrace();
  }
}

// Segment ids (packed sequences) against the reference's pair mask: forward and every gradient, float64;
// sorted ids (tiles between the segments skipped), unsorted ids, and the pair form with a query offset.
TEST(Segments, MatchReference) {
  torch::manual_seed(0);
  const int64_t B = 2, H = 2, L = 150, D = 8;
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble).requires_grad(true);
  Tensor packed = torch::zeros({B, L}, torch::kLong);
  packed.index_put_({0, Slice(40, 110)}, 1);
  packed.index_put_({0, Slice(110, torch::indexing::None)}, 2);
  packed.index_put_({1, Slice(129, torch::indexing::None)}, 5);
  const Tensor unsorted = torch::randint(0, 3, {B, L}, torch::kInt);
  for (int form = 0; form < 3; ++form) {
    SCOPED_TRACE(form);
    const int64_t Lq = form == 2 ? 60 : L, q_offset = form == 2 ? 90 : 0;
    const Tensor q = torch::randn({B, H, Lq, D}, f64), k = torch::randn({B, 1, L, D}, f64),
                 v = torch::randn({B, 1, L, D}, f64);
    const Tensor rel_k = torch::randn({H, 9, D}, f64), rel_v = torch::randn({9, D}, f64),
                 rel_bias = torch::randn({H, 9}, f64);
    relattn::AttentionOptions o;
    o.rel_k(rel_k).rel_v(rel_v).rel_bias(rel_bias).buckets(relattn::clip_buckets(4)).causal(form != 1);
    o.q_offset(q_offset);
    if (form == 0) o.segment_ids(packed);
    if (form == 1) o.segment_ids(unsorted);
    if (form == 2) o.q_segment_ids(packed.index({Slice(), Slice(q_offset, q_offset + Lq)})).k_segment_ids(packed);
    auto [out, lse] = relattn::attention_with_lse(q, k, v, o);
    auto [ref, ref_lse] = reference_attention(q, k, v, o);
    EXPECT_LE(max_err(out, ref), 1e-12);
    expect_lse_close(lse, ref_lse, 1e-12);
    const Tensor go = torch::randn_like(ref);
    const std::vector<Tensor> leaves{q, k, v, rel_k, rel_v, rel_bias};
    const auto got = torch::autograd::grad({out}, leaves, {go});
    const auto want = torch::autograd::grad({ref}, leaves, {go});
    for (size_t i = 0; i < leaves.size(); ++i) EXPECT_LE(max_err(got[i], want[i]), 1e-10) << "gradient " << i;
  }
}

// Per-batch query offsets (q_offsets [B], added to q_offset): row b equals the call on row b alone with the int
// offset q_offset + q_offsets[b], forward and gradients; the table gradients are the sums over the rows.
TEST(BatchOffsets, EachRowEqualsItsIntOffset) {
  torch::manual_seed(0);
  const int64_t B = 3, H = 2, Lq = 40, Lk = 90, D = 8;
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble).requires_grad(true);
  const Tensor q = torch::randn({B, H, Lq, D}, f64), k = torch::randn({B, 1, Lk, D}, f64),
               v = torch::randn({B, 1, Lk, D}, f64);
  const Tensor rel_k = torch::randn({H, 9, D}, f64), rel_v = torch::randn({9, D}, f64),
               rel_bias = torch::randn({H, 9}, f64);
  const std::vector<int64_t> offsets{-12, 30, 75};
  relattn::AttentionOptions o;
  o.rel_k(rel_k).rel_v(rel_v).rel_bias(rel_bias).buckets(relattn::clip_buckets(4)).causal(true);
  o.alibi_slopes(relattn::alibi_slopes(H).to(torch::kDouble)).q_offset(5);
  o.q_offsets(torch::tensor(offsets, torch::kLong) - 5);
  auto [out, lse] = relattn::attention_with_lse(q, k, v, o);
  const Tensor go = torch::randn_like(out);
  const std::vector<Tensor> leaves{q, k, v, rel_k, rel_v, rel_bias};
  const auto got = torch::autograd::grad({out}, leaves, {go});
  std::vector<Tensor> table_sums{torch::zeros_like(rel_k), torch::zeros_like(rel_v), torch::zeros_like(rel_bias)};
  for (int64_t b = 0; b < B; ++b) {
    SCOPED_TRACE(b);
    relattn::AttentionOptions ob = o;
    ob.q_offsets(std::nullopt).q_offset(offsets[b]);
    const Tensor qb = q.narrow(0, b, 1), kb = k.narrow(0, b, 1), vb = v.narrow(0, b, 1);
    auto [out_b, lse_b] = relattn::attention_with_lse(qb, kb, vb, ob);
    EXPECT_TRUE(torch::equal(out.narrow(0, b, 1), out_b));
    EXPECT_TRUE(torch::equal(lse.narrow(0, b, 1), lse_b));
    auto [ref, ref_lse] = reference_attention(qb, kb, vb, ob);
    EXPECT_LE(max_err(out_b, ref), 1e-12);
    const auto want = torch::autograd::grad({out_b}, {qb, kb, vb, rel_k, rel_v, rel_bias}, {go.narrow(0, b, 1)});
    for (int i = 0; i < 3; ++i) EXPECT_LE(max_err(got[i].narrow(0, b, 1), want[i]), 1e-12) << "gradient " << i;
    for (int i = 0; i < 3; ++i) table_sums[i] += want[3 + i];
  }
  for (int i = 0; i < 3; ++i) EXPECT_LE(max_err(got[3 + i], table_sums[i]), 1e-10) << "table gradient " << i;

  const Tensor x = torch::randn({2, 2, 6, 8});
  expect_error([&] { relattn::attention(x, x, x, relattn::AttentionOptions().q_offset(INT64_MAX)); },
               "q_offset must lie in [-2^62, 2^62] (query positions i + q_offset must not overflow), got "
               "9223372036854775807");
  expect_error([&] {
    relattn::attention(x, x, x, relattn::AttentionOptions().q_offsets(torch::zeros({3}, torch::kInt)));
  }, "q_offsets (per-batch query offsets; in Python a tensor q_offset) must be [B] = [2], got shape [3]");
  expect_error([&] { relattn::attention(x, x, x, relattn::AttentionOptions().q_offsets(torch::zeros({2}))); },
               "q_offsets (per-batch query offsets; in Python a tensor q_offset) must have an integer dtype");
  expect_error([&] {
    relattn::attention(x, x, x, relattn::AttentionOptions().q_offsets(torch::full({2}, int64_t(1) << 40)));
  }, "q_offsets (per-batch query offsets; in Python a tensor q_offset) holds an offset that does not fit in int32");
  expect_error([&] {
    relattn::attention(x, x, x,
                       relattn::AttentionOptions().q_offsets(torch::zeros({2}, torch::kInt)).segment_ids(
                           torch::zeros({2, 6}, torch::kInt)));
  }, "with q_offsets pass q_segment_ids and k_segment_ids");
}

// A decode step on the CPU packs the query heads of a kv group into one tile, and splits a long cache into key
// chunks whose partial results are combined (fewer than 64 tasks, more than 2048 keys): one query of 8 heads
// over 2 kv heads and 4100 keys, and a 3-query chunk, with every term, against the float64 reference.
TEST(Decode, PackedHeadsAndSplitKeysMatchReference) {
  torch::manual_seed(3);
  const int64_t H = 8, Hk = 2, Lk = 4100, D = 16;
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor k = torch::randn({1, Hk, Lk, D}, f64), v = torch::randn({1, Hk, Lk, D}, f64);
  relattn::AttentionOptions o;
  o.rel_k(0.5 * torch::randn({H, 65, D}, f64)).rel_v(0.5 * torch::randn({65, D}, f64));
  o.rel_bias(torch::randn({H, 65}, f64)).buckets(relattn::clip_buckets(32)).causal(true);
  o.alibi_slopes(relattn::alibi_slopes(H).to(torch::kDouble));
  for (const int64_t Lq : {1, 3}) {
    SCOPED_TRACE(Lq);
    const Tensor q = torch::randn({1, H, Lq, D}, f64);
    o.q_offset(Lk - Lq);
    auto [out, lse] = relattn::attention_with_lse(q, k, v, o);
    auto [ref, ref_lse] = reference_attention(q, k, v, o);
    EXPECT_LE(max_err(out, ref), 1e-12);
    EXPECT_LE(max_err(lse, ref_lse), 1e-12);
  }
}

// Gradients of gradients are not implemented: a backward through relattn's gradients raises (torch's
// fallback would hand back zeros), while create_graph = true leaves the first-order gradients as they are.
TEST(Errors, DoubleBackwardRaises) {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble).requires_grad(true);
  const Tensor q = torch::randn({1, 2, 5, 8}, opts), k = torch::randn({1, 2, 6, 8}, opts),
               v = torch::randn({1, 2, 6, 8}, opts);
  const Tensor loss = relattn::attention(q, k, v).square().sum();
  const auto with_graph = torch::autograd::grad({loss}, {q, k, v}, {}, /*retain_graph=*/true, /*create_graph=*/true);
  const auto plain = torch::autograd::grad({loss}, {q, k, v}, {}, /*retain_graph=*/true);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(with_graph[i], plain[i])) << i;
  expect_error([&] { with_graph[0].sum().backward(); }, "double backward is not supported");
}

TEST(Errors, BadInputsRaiseClearMessages) {
  const Tensor q = torch::randn({2, 4, 6, 8});
  const Tensor k = torch::randn({2, 4, 6, 8});
  const Tensor v = torch::randn({2, 4, 6, 8});
  const Tensor b3 = relattn::clip_buckets(3);  // R = 7

  EXPECT_THROW(relattn::attention(q.view({8, 6, 8}), k, v), c10::Error);
  expect_error([&] { relattn::attention(q.view({8, 6, 8}), k, v); }, "q must be 4-D");
  expect_error([&] { relattn::attention(torch::randn({2, 3, 6, 8}), torch::randn({2, 2, 6, 8}),
                                        torch::randn({2, 2, 6, 8})); },
               "must be a multiple of the number of kv heads");
  expect_error([&] { relattn::attention(q, torch::randn({2, 4, 6, 5}), v); }, "k's head dim");
  expect_error([&] { relattn::attention(q, k.to(torch::kDouble), v); }, "share one dtype");
  expect_error([&] { relattn::attention(q.to(torch::kInt), k.to(torch::kInt), v.to(torch::kInt)); },
               "q must be float64, float32, float16 or bfloat16");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().rel_k(torch::randn({7, 8}))); },
               "need buckets or rel_index");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().dropout_p(1.5)); },
               "dropout_p must be in [0, 1], got 1.5");
  const Tensor ids = torch::zeros({2, 6}, torch::kInt);
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().segment_ids(ids).q_segment_ids(ids)); },
               "segment_ids excludes q_segment_ids and k_segment_ids");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().q_segment_ids(ids)); },
               "q_segment_ids and k_segment_ids go together");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().segment_ids(ids.to(torch::kFloat))); },
               "segment_ids must have an integer dtype");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().segment_ids(ids).q_offset(1)); },
               "Lq + q_offset <= Lk");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().segment_ids(torch::zeros({3, 6}, torch::kInt))); },
               "q_segment_ids must be [B, Lq] = [2, 6]");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().dropout_p(0.5).dropout_seed(torch::tensor({1.0})));
  }, "dropout_seed must be an int64 tensor of one element");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().rel_k(torch::randn({5, 8})).buckets(b3));
  }, "every id must lie in [0, R)");
  expect_error([&] {
    relattn::attention(q, k, v,
                       relattn::AttentionOptions().rel_k(torch::randn({7, 8})).rel_v(torch::randn({5, 8})).buckets(b3));
  }, "bucket dimension R differs");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().rel_k(torch::randn({7, 3})).buckets(b3));
  }, "rel_k's last dim");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().rel_k(torch::randn({7, 8})).buckets(b3.to(torch::kFloat)));
  }, "buckets must have an integer dtype");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().rel_k(torch::randn({7, 8})).buckets(torch::arange(6)));
  }, "buckets must be 1-D of odd length");
  expect_error([&] {
    relattn::attention(q, k, v,
                       relattn::AttentionOptions().rel_k(torch::randn({7, 8})).buckets(b3).rel_index(
                           torch::zeros({6, 6}, torch::kLong)));
  }, "buckets and rel_index exclude each other");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().rel_bias(torch::randn({3, 7})).buckets(b3));
  }, "rel_bias must be [H, R]");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().key_padding_mask(torch::zeros({2, 6}))); },
               "key_padding_mask must be bool");
  expect_error([&] {
    relattn::attention(q, k, v, relattn::AttentionOptions().key_padding_mask(torch::zeros({2, 5}, torch::kBool)));
  }, "key_padding_mask must be [B, Lk]");
  expect_error([&] { relattn::attention(q, k, v, relattn::AttentionOptions().alibi_slopes(torch::ones({3}))); },
               "alibi_slopes must be [H]");
  expect_error([&] { relattn::clip_buckets(-1); }, "max_distance must be >= 0");
  expect_error([&] { relattn::alibi_slopes(0); }, "num_heads must be >= 1");
  expect_error([&] { relattn::t5_buckets(2, 128, true); }, "num_buckets must be >= 4");
}

// ---------------------------------------------------------------------------------------------------
// Helpers (SPEC §3).

// T5's _relative_position_bucket for one distance d = j - i, written out with scalar float32 math.
int64_t t5_bucket(int64_t d, int64_t num_buckets, int64_t max_distance, bool bidirectional) {
  int64_t bucket = 0;
  int64_t n;
  if (bidirectional) {
    num_buckets /= 2;
    bucket += d > 0 ? num_buckets : 0;
    n = std::abs(d);
  } else {
    n = std::max<int64_t>(-d, 0);
  }
  const int64_t max_exact = num_buckets / 2;
  if (n < max_exact) return bucket + n;
  const float ratio = std::log(static_cast<float>(n) / static_cast<float>(max_exact)) /
                      static_cast<float>(std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)));
  const int64_t large = max_exact + static_cast<int64_t>(ratio * static_cast<float>(num_buckets - max_exact));
  return bucket + std::min(large, num_buckets - 1);
}

TEST(Helpers, ClipBuckets) {
  EXPECT_TRUE(torch::equal(relattn::clip_buckets(3), torch::arange(7, torch::kLong)));
  EXPECT_TRUE(torch::equal(relattn::clip_buckets(0), torch::zeros({1}, torch::kLong)));
  EXPECT_EQ(relattn::clip_buckets(64).size(0), 129);
}

TEST(Helpers, T5BucketsKnownValues) {
  const Tensor b = relattn::t5_buckets(32, 128, true);
  ASSERT_EQ(b.size(0), 257);
  EXPECT_EQ(b.scalar_type(), torch::kLong);
  auto at = [&](int64_t d) { return b[d + 128].item<int64_t>(); };
  EXPECT_EQ(at(0), 0);
  EXPECT_EQ(at(-1), 1);
  EXPECT_EQ(at(1), 17);
  EXPECT_EQ(at(-7), 7);
  EXPECT_EQ(at(-8), 8);
  EXPECT_EQ(at(-20), 10);
  EXPECT_EQ(at(20), 26);
  EXPECT_EQ(at(-128), 15);
  EXPECT_EQ(at(128), 31);

  const Tensor u = relattn::t5_buckets(32, 128, false);
  auto uat = [&](int64_t d) { return u[d + 128].item<int64_t>(); };
  EXPECT_EQ(uat(5), 0);
  EXPECT_EQ(uat(0), 0);
  EXPECT_EQ(uat(-15), 15);
  EXPECT_EQ(uat(-20), 17);
  EXPECT_EQ(uat(-128), 31);
}

TEST(Helpers, T5BucketsMatchFormulaEverywhere) {
  for (auto [nb, md, bidir] : std::vector<std::tuple<int64_t, int64_t, bool>>{
           {32, 128, true}, {32, 128, false}, {8, 16, true}, {16, 40, false}, {64, 512, true}}) {
    const Tensor b = relattn::t5_buckets(nb, md, bidir);
    ASSERT_EQ(b.size(0), 2 * md + 1);
    const auto acc = b.accessor<int64_t, 1>();
    for (int64_t d = -md; d <= md; ++d) {
      ASSERT_EQ(acc[d + md], t5_bucket(d, nb, md, bidir)) << "num_buckets " << nb << " max_distance " << md
                                                          << " bidirectional " << bidir << " d " << d;
    }
  }
}

TEST(Helpers, AlibiSlopes) {
  const Tensor s8 = relattn::alibi_slopes(8);
  EXPECT_EQ(s8.scalar_type(), torch::kFloat);
  std::vector<double> expected8;
  for (int i = 1; i <= 8; ++i) expected8.push_back(std::pow(2.0, -i));
  EXPECT_TRUE(torch::allclose(s8, torch::tensor(expected8, torch::kDouble).to(torch::kFloat)));

  // Not a power of two: the 4-head slopes, then every other slope of the 8-head ones.
  const Tensor s6 = relattn::alibi_slopes(6);
  EXPECT_TRUE(torch::allclose(s6, torch::tensor({0.25f, 0.0625f, 0.015625f, 0.00390625f, 0.5f, 0.125f})));
  EXPECT_TRUE(torch::allclose(relattn::alibi_slopes(1), torch::tensor({0.00390625f})));
  const Tensor s16 = relattn::alibi_slopes(16);
  EXPECT_NEAR(s16[0].item<double>(), std::pow(2.0, -0.5), 1e-7);
  EXPECT_NEAR(s16[15].item<double>(), std::pow(2.0, -8.0), 1e-9);
}

// Positions inside packed sequences: a token's index among the earlier tokens of its row with its id.
TEST(Helpers, SegmentPositionsAndLengths) {
  const Tensor ids = torch::tensor({0, 0, 0, 1, 1, 2, 7, 3, 7, 3, 3, 7}, torch::kInt).view({2, 6});
  EXPECT_TRUE(torch::equal(relattn::segment_positions(ids),
                           torch::tensor({0, 1, 2, 0, 1, 0, 0, 0, 1, 1, 2, 2}, torch::kLong).view({2, 6})));
  EXPECT_TRUE(torch::equal(relattn::segment_lengths(ids),
                           torch::tensor({3, 3, 3, 2, 2, 1, 3, 3, 3, 3, 3, 3}, torch::kLong).view({2, 6})));
  // Random ids, strided, against counting.
  torch::manual_seed(0);
  const Tensor many = torch::randint(-2, 4, {41, 3}, torch::kLong).t();
  const Tensor pos = relattn::segment_positions(many), len = relattn::segment_lengths(many);
  for (int64_t b = 0; b < 3; ++b) {
    std::map<int64_t, int64_t> seen, total;
    for (int64_t i = 0; i < 41; ++i) total[many[b][i].item<int64_t>()]++;
    for (int64_t i = 0; i < 41; ++i) {
      const int64_t id = many[b][i].item<int64_t>();
      EXPECT_EQ(pos[b][i].item<int64_t>(), seen[id]++);
      EXPECT_EQ(len[b][i].item<int64_t>(), total[id]);
    }
  }
  EXPECT_EQ(relattn::segment_positions(torch::zeros({0, 5}, torch::kInt)).sizes(), (std::vector<int64_t>{0, 5}));
  expect_error([] { relattn::segment_positions(torch::zeros({2, 3})); },
               "relattn.segment_positions: segment_ids must have an integer dtype, got Float");
  expect_error([] { relattn::segment_lengths(torch::tensor(1)); },
               "relattn.segment_lengths: segment_ids must have at least one dimension");
}

TEST(Helpers, LibraryInfo) {
  EXPECT_GT(relattn::library_version(), 0);
  using BoolFn = bool();
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("relattn::cuda_kernels_built", "").typed<BoolFn>();
  EXPECT_EQ(op.call(), relattn::cuda_kernels_built());
}

// ---------------------------------------------------------------------------------------------------
// Training from C++: learnable projections and relative tables, torch::optim::Adam, the loss falls.

struct TinyRelativeModel : torch::nn::Module {
  static constexpr int64_t kEmbed = 16, kHeads = 2, kHeadDim = 8, kClip = 4;
  torch::nn::Linear q_proj{kEmbed, kEmbed}, k_proj{kEmbed, kEmbed}, v_proj{kEmbed, kEmbed},
      out_proj{kEmbed, kEmbed};
  Tensor rel_k, rel_v, buckets;

  TinyRelativeModel() {
    register_module("q_proj", q_proj);
    register_module("k_proj", k_proj);
    register_module("v_proj", v_proj);
    register_module("out_proj", out_proj);
    rel_k = register_parameter("rel_k", 0.02 * torch::randn({2 * kClip + 1, kHeadDim}));
    rel_v = register_parameter("rel_v", 0.02 * torch::randn({2 * kClip + 1, kHeadDim}));
    buckets = register_buffer("buckets", relattn::clip_buckets(kClip));
  }

  Tensor forward(const Tensor& x) {
    const int64_t B = x.size(0), L = x.size(1);
    auto heads = [&](const Tensor& t) { return t.view({B, L, kHeads, kHeadDim}).transpose(1, 2); };
    const Tensor out = relattn::attention(heads(q_proj(x)), heads(k_proj(x)), heads(v_proj(x)),
                                          relattn::AttentionOptions().rel_k(rel_k).rel_v(rel_v).buckets(buckets));
    return out_proj(out.transpose(1, 2).reshape({B, L, kEmbed}));
  }
};

TEST(Training, AdamLowersLossOnRelativeCopyTask) {
  torch::manual_seed(0);
  TinyRelativeModel model;
  torch::optim::Adam opt(model.parameters(), torch::optim::AdamOptions(1e-2));
  // Predict the input two positions back: only relative positions can tell where that is.
  const int64_t B = 16, L = 16;
  auto loss_of = [&](const Tensor& x) {
    const Tensor y = model.forward(x);
    return torch::mse_loss(y.index({Slice(), Slice(2, torch::indexing::None)}),
                           x.index({Slice(), Slice(0, L - 2)}));
  };
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 80; ++step) {
    const Tensor x = torch::randn({B, L, TinyRelativeModel::kEmbed});
    opt.zero_grad();
    const Tensor loss = loss_of(x);
    loss.backward();
    ASSERT_TRUE(model.rel_k.grad().defined());
    ASSERT_GT(max_abs(model.rel_v.grad()), 0.0);
    opt.step();
    const double value = loss.item<double>();
    ASSERT_TRUE(std::isfinite(value));
    if (step == 0) first = value;
    last = value;
  }
  EXPECT_LT(last, 0.5 * first) << "first loss " << first << ", last loss " << last;
}

}  // namespace

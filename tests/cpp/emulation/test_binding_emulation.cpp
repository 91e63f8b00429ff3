// The CUDA binding itself (csrc/cuda/attention_kernel.cpp and the preparation in csrc/checks.cpp), executed on
// the CPU: this file #includes the binding's source into one translation unit with the emulated kernels
// (kernels/cuda/emulation), and the shims in tests/cpp/emulation/shim stand in for c10's CUDA guard, stream and
// error checks. The device queries answer as an H100 (132 SMs, 227 KB of opt-in shared memory) or, in one
// case, an A100. Every case calls attention_forward_cuda / attention_backward_cuda on CPU tensors and compares
// out, lse and all six gradients with the CPU op, under AddressSanitizer and UBSan: a wrong stride, pointer,
// scratch size or grid in the binding fails here instead of on the first GPU run. test_cuda_emulation.cpp
// tests the kernels with parameters set up the way the binding sets them up; this tests the binding's own code.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../../../kernels/cuda/backward_mma.cuh"
#include "../../../kernels/cuda/backward_simt.cuh"
#include "../../../kernels/cuda/forward_mma.cuh"
#include "../../../kernels/cuda/forward_simt.cuh"

namespace {
int g_sms = 132, g_smem_optin = 232448;  // an H100
}  // namespace

// The two device queries of the binding (the emulation has no device).
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    *value = g_sms;
  } else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = g_smem_optin;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
extern "C" cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

// The library this test links registers the real binding already: this copy registers nothing.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void relattn_unregistered_binding(torch::Library& m)
#include "../../../csrc/cuda/attention_kernel.cpp"

namespace {

using at::Tensor;
using relattn::ops::OptTensor;

struct Inputs {
  Tensor q, k, v;
  OptTensor rel_k, rel_v, rel_bias, buckets, rel_index, alibi, key_padding_mask;
  bool causal = false;
  int64_t q_offset = 0;
  double dropout_p = 0;
  OptTensor dropout_seed, q_segment_ids, k_segment_ids, q_offsets;
};

// Sets an environment variable (the binding's debug switches) for the scope.
struct ScopedEnv {
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() { old_ ? setenv(name_, old_->c_str(), 1) : unsetenv(name_); }
  const char* name_;
  std::optional<std::string> old_;
};

// Same NaN/inf pattern, finite entries within the dtype's tolerance of the CPU op's.
void expect_close(const std::string& what, const Tensor& got, const Tensor& want, at::ScalarType dtype) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  if (want.numel() == 0) return;
  const Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  ASSERT_TRUE(at::equal(g.isnan(), w.isnan())) << what << ": NaN pattern";
  const Tensor finite = w.isfinite();
  ASSERT_TRUE(at::equal(g.isfinite(), finite)) << what << ": inf pattern";
  const Tensor wf = w.masked_fill(finite.logical_not(), 0), gf = g.masked_fill(finite.logical_not(), 0);
  const double big = wf.abs().max().item<double>();
  const double tol = (dtype == at::kDouble ? 1e-10 : dtype == at::kFloat ? 1e-4 : 3e-2) * (1 + big);
  EXPECT_LE((gf - wf).abs().max().item<double>(), tol) << what;
}

// The binding's forward (and backward, with a random grad_out and grad_lse unless given) against the CPU op.
void check(const std::string& name, const Inputs& a, bool backward = true, bool with_grad_lse = true,
           const Tensor* grad_out = nullptr) {
  SCOPED_TRACE(name);
  const auto dtype = a.q.scalar_type();
  auto [want_out, want_lse] = relattn::ops::attention_forward(
      a.q, a.k, a.v, a.rel_k, a.rel_v, a.rel_bias, a.buckets, a.rel_index, a.alibi, a.key_padding_mask, a.causal,
      std::nullopt, a.q_offset, a.dropout_p, a.dropout_seed, a.q_segment_ids, a.k_segment_ids, a.q_offsets);
  auto [out, lse] = relattn::ops::attention_forward_cuda(
      a.q, a.k, a.v, a.rel_k, a.rel_v, a.rel_bias, a.buckets, a.rel_index, a.alibi, a.key_padding_mask, a.causal,
      std::nullopt, a.q_offset, a.dropout_p, a.dropout_seed, a.q_segment_ids, a.k_segment_ids, a.q_offsets);
  expect_close("out", out, want_out, dtype);
  expect_close("lse", lse, want_lse, dtype);
  if (!backward) return;
  at::manual_seed(3);
  const Tensor go = grad_out != nullptr ? *grad_out : at::randn(want_out.sizes(), want_out.options());
  OptTensor glse;
  if (with_grad_lse) glse = at::randn(want_lse.sizes(), want_lse.options());
  const auto want = relattn::ops::attention_backward(
      go, glse, a.q, a.k, a.v, want_out, want_lse, a.rel_k, a.rel_v, a.rel_bias, a.buckets, a.rel_index, a.alibi,
      a.key_padding_mask, a.causal, std::nullopt, a.q_offset, a.dropout_p, a.dropout_seed, a.q_segment_ids,
      a.k_segment_ids, a.q_offsets);
  const auto got = relattn::ops::attention_backward_cuda(
      go, glse, a.q, a.k, a.v, want_out, want_lse, a.rel_k, a.rel_v, a.rel_bias, a.buckets, a.rel_index, a.alibi,
      a.key_padding_mask, a.causal, std::nullopt, a.q_offset, a.dropout_p, a.dropout_seed, a.q_segment_ids,
      a.k_segment_ids, a.q_offsets);
  expect_close("dq", std::get<0>(got), std::get<0>(want), dtype);
  expect_close("dk", std::get<1>(got), std::get<1>(want), dtype);
  expect_close("dv", std::get<2>(got), std::get<2>(want), dtype);
  expect_close("d rel_k", std::get<3>(got), std::get<3>(want), dtype);
  expect_close("d rel_v", std::get<4>(got), std::get<4>(want), dtype);
  expect_close("d rel_bias", std::get<5>(got), std::get<5>(want), dtype);
}

// Seeded inputs: per-head rel_k, shared rel_v, rel_bias over clip_buckets(M) (with `tables`).
Inputs make(at::ScalarType dtype, int64_t B, int64_t H, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
            int64_t M, bool tables = true) {
  at::manual_seed(0);
  Inputs a;
  const auto o = at::TensorOptions().dtype(dtype);
  const auto table = at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  a.q = at::randn({B, H, Lq, D}, o);
  a.k = at::randn({B, Hk, Lk, D}, o);
  a.v = at::randn({B, Hk, Lk, Dv}, o);
  if (tables) {
    const int64_t R = 2 * M + 1;
    a.buckets = at::arange(R, at::kLong);
    a.rel_k = at::randn({H, R, D}, table) * 0.5;
    a.rel_v = at::randn({R, Dv}, table) * 0.5;
    a.rel_bias = at::randn({H, R}, table);
  }
  return a;
}

TEST(BindingEmulation, TensorCoresWithTables) {
  check("bf16 hd64 GQA, all three tables", make(at::kBFloat16, 2, 2, 1, 40, 70, 64, 64, 6));
}

// q and k views of a packed qkv buffer, v one element off 16-byte alignment (element-wise loads), causal, and
// a non-contiguous padding mask.
TEST(BindingEmulation, StridedAndMisalignedInputs) {
  Inputs a = make(at::kBFloat16, 2, 2, 2, 40, 40, 64, 64, 6);
  const Tensor qkv = at::randn({2, 40, 3, 2, 64}, at::kBFloat16);
  a.q = qkv.select(2, 0).permute({0, 2, 1, 3});
  a.k = qkv.select(2, 1).permute({0, 2, 1, 3});
  a.v = at::randn({2, 2, 40, 65}, at::kBFloat16).narrow(3, 1, 64);
  a.causal = true;
  a.key_padding_mask = (at::rand({40, 2}) < 0.2).t();
  check("strided bf16", a);
  // Rows 144 bytes apart (a multiple of 16) but starting 2 bytes off: only the base address says no 16-byte copies.
  a.v = at::randn({2, 2, 40, 72}, at::kBFloat16).narrow(3, 1, 64);
  check("v misaligned by its base only", a);
}

TEST(BindingEmulation, EmptyInputs) {
  check("Lk=0 bf16", make(at::kBFloat16, 2, 2, 1, 5, 0, 64, 64, 6));
  check("Lk=0 f32", make(at::kFloat, 2, 2, 1, 5, 0, 24, 40, 6));
  check("Lq=0 bf16", make(at::kBFloat16, 2, 2, 1, 0, 7, 64, 64, 6));
}

// Decode steps the binding splits over the keys by itself (few CTAs on 132 SMs), with a per-batch offset.
TEST(BindingEmulation, AutomaticKeySplits) {
  Inputs a = make(at::kBFloat16, 1, 2, 1, 1, 1024, 64, 64, 6);
  a.causal = true;
  a.q_offset = 1023;
  check("bf16 decode step", a, false);
  Inputs b = make(at::kFloat, 1, 2, 1, 3, 700, 24, 40, 6);
  b.q_offsets = at::tensor({int64_t(600)}, at::kLong);
  b.causal = true;
  check("f32 decode step, q_offsets", b, false);
}

// R = 601: the SIMT kernels' row tables exceed the shared-memory budget and go to global scratch.
TEST(BindingEmulation, SimtTablesInGlobalMemory) {
  check("f32", make(at::kFloat, 1, 2, 1, 20, 30, 16, 16, 300));
  check("f64", make(at::kDouble, 1, 2, 1, 9, 20, 8, 8, 300));
}

// The binding's debug switches (kernels/cuda/NOTES.md, "First GPU session"): each path they select.
TEST(BindingEmulation, DebugSwitches) {
  {
    Inputs a = make(at::kBFloat16, 2, 2, 1, 30, 50, 32, 32, 6);
    const Tensor ids = at::cat({at::zeros({2, 25}, at::kLong), at::ones({2, 25}, at::kLong)}, 1);
    a.q_segment_ids = ids.narrow(1, 20, 30);
    a.k_segment_ids = ids;
    ScopedEnv env("RELATTN_CUDA_SEGMENTS", "dropout");
    check("segments through the dropout instances", a);
  }
  {
    ScopedEnv env("RELATTN_CUDA_KERNEL", "simt");
    check("bf16 on the SIMT kernels", make(at::kBFloat16, 1, 2, 1, 20, 30, 32, 32, 4));
  }
  {
    ScopedEnv tables("RELATTN_CUDA_TABLES", "global"), splits("RELATTN_CUDA_SPLITS", "3");
    check("tables in global memory, 3 key splits, 2 query tiles", make(at::kHalf, 1, 2, 2, 70, 200, 96, 80, 8), false);
  }
  {
    ScopedEnv env("RELATTN_CUDA_PLAIN", "0");
    check("no tables on the table instance", make(at::kBFloat16, 1, 2, 1, 20, 40, 128, 128, 4, false));
  }
}

TEST(BindingEmulation, GradientInputs) {
  const Inputs a = make(at::kBFloat16, 2, 2, 1, 20, 40, 32, 32, 4);
  at::manual_seed(5);
  const Tensor expanded = at::randn({1, 1, 20, 32}, at::kBFloat16).expand({2, 2, 20, 32});
  check("grad_out expanded over batch and heads", a, true, true, &expanded);
  const Tensor stride0 = at::ones({}, at::kBFloat16).expand({2, 2, 20, 32});
  check("grad_out with every stride 0, no grad_lse", a, true, false, &stride0);
  Inputs b = make(at::kBFloat16, 2, 2, 2, 20, 40, 64, 64, 4);
  b.dropout_p = 0.3;
  b.dropout_seed = at::tensor({int64_t(12345)}, at::kLong);
  b.rel_index = at::randint(0, 9, {20, 40}, at::kLong);
  b.buckets = std::nullopt;
  check("dropout with a 2-D int64 rel_index", b);
}

TEST(BindingEmulation, SharedMemoryLimitsAndPackedSegments) {
  {
    // An A100's limits: R = 1201 rows of hd 256 cannot be in shared memory even when asked for.
    g_sms = 108;
    g_smem_optin = 166912;
    ScopedEnv env("RELATTN_CUDA_TABLES", "smem");
    check("A100 hd256, tables forced to shared memory past its limit", make(at::kBFloat16, 1, 1, 1, 17, 20, 256,
                                                                           200, 600));
    g_sms = 132;
    g_smem_optin = 232448;
  }
  Inputs b = make(at::kHalf, 2, 4, 2, 33, 33, 32, 32, 5);
  b.rel_k = b.rel_k->transpose(1, 2).contiguous().transpose(1, 2);  // non-contiguous per-head tables
  b.rel_bias = b.rel_bias->t().contiguous().t();
  const Tensor ids = at::cat({at::zeros({2, 10}, at::kInt), at::ones({2, 23}, at::kInt)}, 1);
  b.q_segment_ids = ids;
  b.k_segment_ids = ids;
  b.causal = true;
  b.q_offsets = at::tensor({int32_t(0)}, at::kInt).expand({2});
  b.key_padding_mask = at::zeros({2, 33}, at::kBool);
  b.key_padding_mask->select(1, 5).fill_(true);
  check("fp16 packed segments, GQA, expanded q_offsets, strided tables", b);
}

// The backward's arguments on q's device (the tensor-core backward reads out's pointer).
TEST(BindingEmulation, BackwardRejectsOutElsewhere) {
  const Inputs a = make(at::kBFloat16, 1, 2, 2, 8, 8, 64, 64, 2);
  auto [out, lse] = relattn::ops::attention_forward(a.q, a.k, a.v, a.rel_k, a.rel_v, a.rel_bias, a.buckets,
                                                    std::nullopt, std::nullopt, std::nullopt, false, std::nullopt, 0,
                                                    0.0, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const Tensor meta_out = at::empty_like(out, out.options().device(at::kMeta));
  try {
    relattn::ops::attention_backward_cuda(out, std::nullopt, a.q, a.k, a.v, meta_out, lse, a.rel_k, a.rel_v,
                                          a.rel_bias, a.buckets, std::nullopt, std::nullopt, std::nullopt, false,
                                          std::nullopt, 0, 0.0, std::nullopt, std::nullopt, std::nullopt,
                                          std::nullopt);
    ADD_FAILURE() << "an out on another device was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("out is on meta"), std::string::npos) << e.what();
  }
}

}  // namespace

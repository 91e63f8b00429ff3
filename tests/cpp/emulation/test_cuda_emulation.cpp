// relattn's CUDA kernels, run on the CPU (kernels/cuda/emulation/cuda_emulation.h: a std::thread per CUDA
// thread, warp intrinsics, ldmatrix and mma.sync emulated with the PTX ISA's fragment layouts), against
// the CPU op. This is how CI executes the lane-level code of the tensor-core and SIMT kernels, forward and
// backward, without a GPU: a wrong fragment index, a missed barrier, a read of shared memory nobody wrote
// (the emulator fills it with NaN bytes) or an unwritten output shows up as a large error or a NaN.
//
// The parameter set-up mirrors csrc/cuda/attention_kernel.cpp (which needs a CUDA device to run).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <limits>
#include <random>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "../../../csrc/attention.h"
#include "../../../kernels/cuda/backward_mma.cuh"
#include "../../../kernels/cuda/backward_simt.cuh"
#include "../../../kernels/cuda/forward_mma.cuh"
#include "../../../kernels/cuda/forward_simt.cuh"

namespace {

using at::Tensor;
using relattn::ops::OptTensor;
using relattn::ops::Prepared;

// Every at::empty here (outputs, split partials, table scratch, the backward's scratch) comes filled with NaN
// (integers with their largest value), as uninitialised device memory may hold anything: an element the
// kernels leave unwritten, or scratch they read before writing it, shows up in the results.
[[maybe_unused]] const bool g_nan_fill = [] {
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/false);
  at::globalContext().setDeterministicFillUninitializedMemory(true);
  return true;
}();
namespace kc = relattn::kernels::cuda;

struct Config {
  std::string name;
  at::ScalarType dtype = at::kBFloat16;
  int64_t B = 1, H = 2, Hk = 1, Lq = 40, Lk = 50, D = 32, Dv = 32;
  std::string positions = "clip";  // clip | t5 | periodic | index | none
  int64_t M = 6;
  bool rel_k = true, rel_v = true, rel_bias = true, per_head = false, alibi = false, padding = false;
  bool causal = false;
  int64_t q_offset = 0;
  std::vector<int32_t> q_offsets;  // per-batch query offsets [B] (added to q_offset); none when empty
  bool tables_in_global = false;  // forward only
  int64_t splits = 0;  // forward only: key chunks of a split decode step (plan_key_split's `forced`; 0: none)
  bool with_grad_lse = true;
  // The kernels read ids the binding never checked (see raw_ids below): out of range, negative, extreme.
  bool raw_ids = false;
  double dropout = 0.0;  // dropout_p (seeded; the CPU op draws the same mask)
  // Segment ids: "" (none), "packed" (sorted, the same ids for queries and keys: needs Lq == Lk; segment
  // boundaries on and beside the tiles), "unsorted" (3 ids in random order, Lq == Lk) or "pair" (sorted ids
  // of their own per side; some query ids appear among no keys, so those rows are fully masked).
  std::string segments;
};

struct Call {
  Tensor q, k, v;
  OptTensor rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask;
  bool causal = false;
  int64_t q_offset = 0;
  OptTensor q_offsets;
  double dropout_p = 0.0;
  OptTensor dropout_seed;
  OptTensor q_segment_ids, k_segment_ids;
  // If defined: the ids the kernels read instead of buckets / rel_index (same shape and layout), as when
  // a tensor's ids change behind torch's back after the binding's one check of its version.
  Tensor raw_ids;
};

Call make_call(const Config& c) {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(c.dtype);
  const auto topts = at::TensorOptions().dtype(c.dtype == at::kDouble ? at::kDouble : at::kFloat);
  Call call;
  call.q = at::randn({c.B, c.H, c.Lq, c.D}, opts);
  call.k = at::randn({c.B, c.Hk, c.Lk, c.D}, opts);
  call.v = at::randn({c.B, c.Hk, c.Lk, c.Dv}, opts);
  int64_t R = 0;
  if (c.positions == "clip") {
    R = 2 * c.M + 1;
    call.buckets = at::arange(R, at::kInt);
  } else if (c.positions == "t5") {
    // a bidirectional log-bucket table of 16 buckets over |d| <= 40 (any table of ids in [0, R) will do)
    const int64_t M = 40;
    std::vector<int32_t> ids;
    for (int64_t d = -M; d <= M; ++d) {
      const int64_t a = d < 0 ? -d : d;
      const int64_t b = a < 4 ? a : std::min<int64_t>(7, 4 + static_cast<int64_t>(std::log2(double(a) / 4) * 1.3));
      ids.push_back(static_cast<int32_t>((d > 0 ? 8 : 0) + b));
    }
    R = 16;
    call.buckets = at::tensor(ids, at::kInt);
  } else if (c.positions == "periodic") {
    // ids that repeat along the distances (d mod 5): shared and not in one run each (the kernels' turns)
    R = 5;
    call.buckets = at::remainder(at::arange(-c.M, c.M + 1, at::kInt), R).to(at::kInt);
  } else if (c.positions == "index") {
    R = 9;
    call.rel_index = at::randint(0, R, {c.B, c.Lq, c.Lk}, at::kInt);
  }
  if (R > 0) {
    if (c.rel_k) call.rel_k = c.per_head ? at::randn({c.H, R, c.D}, topts) * 0.5 : at::randn({R, c.D}, topts) * 0.5;
    if (c.rel_v) call.rel_v = at::randn({c.H, R, c.Dv}, topts) * 0.5;
    if (c.rel_bias) call.rel_bias = at::randn({c.H, R}, topts);
  }
  if (c.alibi) call.alibi_slopes = at::linspace(0.5, 0.05, c.H, topts);
  if (c.padding) {
    Tensor m = at::rand({c.B, c.Lk}) < 0.25;
    m.select(0, c.B - 1).fill_(true);  // the last batch sees no key at all
    call.key_padding_mask = m;
  }
  call.causal = c.causal;
  call.q_offset = c.q_offset;
  if (!c.q_offsets.empty()) call.q_offsets = at::tensor(c.q_offsets, at::kInt);
  if (c.segments == "packed") {
    const int64_t lengths[][6] = {{3, 61, 66, 1, 40, 300}, {64, 64, 17, 100, 300, 0}};
    Tensor ids = at::empty({c.B, c.Lk}, at::kInt);
    for (int64_t b = 0; b < c.B; ++b) {
      int64_t o = 0;
      for (int s = 0; s < 6 && o < c.Lk; ++s) {
        const int64_t n = std::min(lengths[b % 2][s], c.Lk - o);
        ids.select(0, b).slice(0, o, o + n).fill_(s);
        o += n;
      }
    }
    call.q_segment_ids = ids.slice(1, c.q_offset, c.q_offset + c.Lq);
    call.k_segment_ids = ids;
  } else if (c.segments == "unsorted") {
    Tensor ids = at::randint(0, 3, {c.B, c.Lk}, at::kInt);
    call.q_segment_ids = ids.slice(1, c.q_offset, c.q_offset + c.Lq);
    call.k_segment_ids = ids;
  } else if (c.segments == "pair") {
    call.q_segment_ids = std::get<0>(at::randint(0, 4, {c.B, c.Lq}, at::kInt).sort(1));
    call.k_segment_ids = std::get<0>(at::randint(0, 3, {c.B, c.Lk}, at::kInt).sort(1));
  }
  if (c.dropout > 0) {
    call.dropout_p = c.dropout;
    call.dropout_seed = at::tensor({int64_t(0x0123456789abcdefLL)}, at::kLong);
  }
  return call;
}

Prepared prepare(const Call& c) {
  return relattn::ops::prepare(c.q, c.k, c.v, c.rel_k, c.rel_v, c.rel_bias, c.buckets, c.rel_index,
                               c.alibi_slopes, c.key_padding_mask, c.causal, std::nullopt, c.q_offset, c.dropout_p,
                               c.dropout_seed, c.q_segment_ids, c.k_segment_ids, c.q_offsets);
}

bool aligned16(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d)
    if (t.size(d) > 1 && (t.stride(d) * int64_t(t.element_size())) % 16 != 0) return false;
  return true;
}

// The kernels read c.raw_ids where the binding would pass the checked buckets / rel_index.
template <typename P>
void use_raw_ids(const Call& c, P& p) {
  if (!c.raw_ids.defined()) return;
  if (p.rel_index) {
    for (int d = 0; d < 3; ++d) ASSERT_EQ(p.rel_index_stride[d], c.raw_ids.stride(d));
    p.rel_index = c.raw_ids.data_ptr<int32_t>();
  } else {
    ASSERT_NE(p.buckets, nullptr);
    p.buckets = c.raw_ids.data_ptr<int32_t>();
  }
}

template <typename T>
void set_vec_flags(T& p, const Prepared& a) {
  p.q_vec_ok = aligned16(a.q);
  p.k_vec_ok = aligned16(a.k);
  p.v_vec_ok = aligned16(a.v);
}

// ---- the emulated forward (as the binding sets it up) ----------------------------------------------------

// A split decode step as the binding sets it up: partial buffers, num_splits copies of the grid, the merge.
struct SplitBuffers {
  Tensor out, lse;
};
SplitBuffers set_split(kc::ForwardParams& p, const Prepared& a, int64_t splits) {
  const kc::KeySplit split = kc::plan_key_split(1, 1, a.Lk, 1, splits);
  SplitBuffers s;
  if (split.num_splits <= 1) return s;
  const auto acc_opts = a.q.options().dtype(a.acc_dtype);
  s.out = at::full({split.num_splits, a.B, a.H, a.Lq, a.Dv}, NAN, acc_opts);  // every element must be written
  s.lse = at::full({split.num_splits, a.B, a.H, a.Lq}, NAN, acc_opts);
  p.num_splits = split.num_splits;
  p.split_keys = split.split_keys;
  p.out_partial = s.out.data_ptr();
  p.lse_partial = s.lse.data_ptr();
  return s;
}

template <typename T, int HD>
std::tuple<Tensor, Tensor> forward_mma(const Call& c, bool tables_in_global, int64_t splits = 0) {
  Prepared a = prepare(c);
  Tensor out = at::empty({a.B, a.H, a.Lq, a.Dv}, a.q.options());
  Tensor lse = at::empty({a.B, a.H, a.Lq}, a.q.options().dtype(at::kFloat));
  kc::ForwardParams p;
  relattn::ops::fill_params(a, p);
  use_raw_ids(c, p);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  set_vec_flags(p, a);
  p.table_ld = kc::table_ld_for(a.R);
  const int n_tables = (p.has_tab() ? 1 : 0) + (p.has_bsum() ? 1 : 0);
  p.plain = n_tables == 0;
  const kc::MmaForwardShape shape = kc::mma_forward_shape<HD>(p.use_plain());
  const SplitBuffers split = set_split(p, a, splits);
  Tensor tab, bsum;
  const int64_t blocks = (a.Lq + shape.block_m - 1) / shape.block_m * a.B * a.H * p.num_splits;
  if (tables_in_global && n_tables > 0) {
    if (p.has_tab()) tab = at::empty({blocks * shape.block_m, p.table_ld}, at::kFloat);
    if (p.has_bsum()) bsum = at::empty({blocks * shape.block_m, p.table_ld}, at::kFloat);
    p.tab_scratch = tab.defined() ? tab.data_ptr() : nullptr;
    p.bsum_scratch = bsum.defined() ? bsum.data_ptr() : nullptr;
    p.tables_in_global = true;
  }
  const int64_t smem = shape.base_bytes + (p.tables_in_global ? 0 : n_tables * shape.table_bytes(p.table_ld));
  EXPECT_EQ((kc::launch_forward_mma<T, HD>(p, smem, nullptr)), cudaSuccess);
  if (p.num_splits > 1) EXPECT_EQ(kc::launch_combine_splits<T>(p, nullptr), cudaSuccess);
  return {out, lse};
}

template <typename T>
std::tuple<Tensor, Tensor> forward_simt(const Call& c, int64_t splits = 0) {
  Prepared a = prepare(c);
  Tensor out = at::empty({a.B, a.H, a.Lq, a.Dv}, a.q.options());
  Tensor lse = at::empty({a.B, a.H, a.Lq}, a.q.options().dtype(a.acc_dtype));
  kc::ForwardParams p;
  relattn::ops::fill_params(a, p);
  use_raw_ids(c, p);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  set_vec_flags(p, a);
  using Cfg = kc::SimtConfig<kc::simt_acc_t<T>>;
  p.table_ld = kc::table_ld_for(a.R);
  const int n_tables = (p.has_tab() ? 1 : 0) + (p.has_bsum() ? 1 : 0);
  const int64_t smem = Cfg::base_bytes(a.D, a.Dv) + n_tables * Cfg::table_bytes(p.table_ld);
  const SplitBuffers split = set_split(p, a, splits);
  EXPECT_EQ(kc::launch_forward_simt<T>(p, smem, nullptr), cudaSuccess);
  if (p.num_splits > 1) EXPECT_EQ(kc::launch_combine_splits<T>(p, nullptr), cudaSuccess);
  return {out, lse};
}

// ---- the emulated backward -------------------------------------------------------------------------------

using Grads = std::vector<Tensor>;  // dq, dk, dv, d rel_k, d rel_v, d rel_bias

template <typename Launch>
Grads backward(const Call& c, const Tensor& out, const Tensor& lse, const Tensor& grad_out, const OptTensor& grad_lse,
               bool single_sweep, Launch launch) {
  Prepared a = prepare(c);
  relattn::ops::BackwardBuffers s = relattn::ops::backward_buffers(a, grad_out, out, lse, grad_lse);
  Tensor dq = at::full({a.B, a.H, a.Lq, a.D}, NAN, a.q.options());  // every element must be written
  Tensor dk = at::full({a.B, a.Hk, a.Lk, a.D}, NAN, a.q.options());
  Tensor dv = at::full({a.B, a.Hk, a.Lk, a.Dv}, NAN, a.q.options());
  kc::BackwardParams p;
  relattn::ops::fill_backward_params(a, s, dq, dk, dv, p);
  use_raw_ids(c, p);
  set_vec_flags(p, a);
  p.do_vec_ok = aligned16(s.grad_out);
  std::vector<Tensor> keep;
  if (single_sweep) {  // the tensor-core backward, as the binding sets it up
    keep = relattn::ops::single_sweep_backward_inputs(a, out, p);
  }
  EXPECT_EQ(launch(p), cudaSuccess);
  auto [gk, gv, gb] = relattn::ops::table_grads(a, s.ds_sum, s.p_sum, grad_out, c.rel_k, c.rel_v, c.rel_bias);
  return {dq, dk, dv, gk, gv, gb};
}

// ---- comparison with the CPU op ------------------------------------------------------------------------

double tolerance(at::ScalarType dtype, const Tensor& ref) {
  const double big = ref.numel() ? ref.abs().max().item<double>() : 0.0;
  if (dtype == at::kDouble) return 1e-10 * (1 + big);
  if (dtype == at::kFloat) return 1e-4 * (1 + big);
  return 3e-2 * (1 + big);  // both sides round to half precision at different points
}

void expect_close(const std::string& what, const Tensor& got, const Tensor& ref, at::ScalarType dtype) {
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  if (ref.numel() == 0) return;
  Tensor g = got.to(at::kDouble), r = ref.to(at::kDouble);
  ASSERT_FALSE(g.isnan().any().item<bool>()) << what << ": NaN (unwritten element or garbage read)";
  const Tensor fin = r.isfinite();
  ASSERT_TRUE(at::equal(g.isfinite(), fin)) << what << ": the -inf pattern differs";
  const double err = (g - r).masked_fill(fin.logical_not(), 0).abs().max().item<double>();
  EXPECT_LE(err, tolerance(dtype, r.masked_fill(fin.logical_not(), 0))) << what;
  // The bound above scales with the largest element: where a few elements dominate (keys that few rows see,
  // the far buckets' table gradients) it would pass a wrong result in the small ones. The relative
  // Frobenius error does not (bf16: at most 1.4e-2 over these cases, d rel_bias with cancellations; fp16
  // 5e-4; float32 1e-6).
  const Tensor rf = r.masked_fill(fin.logical_not(), 0), gf = g.masked_fill(fin.logical_not(), 0);
  const double rn = rf.norm().item<double>();
  const double rel_l2 = rn > 0 ? (gf - rf).norm().item<double>() / rn : 0.0;
  const double bound = dtype == at::kDouble ? 1e-12 : (dtype == at::kFloat ? 1e-5 : 4e-2);
  EXPECT_LE(rel_l2, bound) << what << ": relative Frobenius error";
}

// raw_out_differs: with raw ids, `out` is only checked to be finite (the tensor-core forward leaves pairs
// of bad rel_index ids out of the value term, params.h; lse and the gradients, from the reference out,
// still match the reference on the clamped ids).
template <typename Fwd, typename Bwd>
void check(const Config& cfg, Fwd fwd, Bwd bwd, bool raw_out_differs = false) {
  SCOPED_TRACE(cfg.name);
  Call c = make_call(cfg);
  Call r = c;  // what the reference computes
  if (cfg.raw_ids) {
    // Ids the binding never saw: the kernels must clamp each into [0, R - 1] (negative ones to R - 1),
    // reading and writing nothing outside the tables (AddressSanitizer aborts on a global access past a
    // tensor), and then agree with the reference on the clamped ids.
    Tensor& ids = c.rel_index.has_value() ? *c.rel_index : *c.buckets;
    const int64_t R = c.rel_bias.has_value() ? c.rel_bias->size(1) : c.rel_v->size(1);
    Tensor raw = ids.clone();
    auto flat = raw.view({-1});
    const int64_t n = flat.numel();
    const int32_t bad[] = {static_cast<int32_t>(R), -1, std::numeric_limits<int32_t>::max(),
                           std::numeric_limits<int32_t>::min(), static_cast<int32_t>(R + 7)};
    for (int e = 0; e < 5; ++e) flat[(n - 1) * e / 4].fill_(bad[e]);  // first, last and between
    for (int e = 0; e < 5 && n > 40; ++e) flat[7 + 9 * e].fill_(bad[4 - e]);
    c.raw_ids = raw;
    const Tensor clamped = at::where((raw < 0).logical_or(raw >= R), R - 1, raw).to(at::kInt);
    (c.rel_index.has_value() ? r.rel_index : r.buckets) = clamped;
  }
  auto [ref_out, ref_lse] = relattn::ops::attention_forward(r.q, r.k, r.v, r.rel_k, r.rel_v, r.rel_bias, r.buckets,
                                                            r.rel_index, r.alibi_slopes, r.key_padding_mask,
                                                            r.causal, std::nullopt, r.q_offset, r.dropout_p,
                                                            r.dropout_seed, r.q_segment_ids, r.k_segment_ids,
                                                            r.q_offsets);
  ASSERT_GT(ref_out.abs().max().item<double>(), 0.0) << "a vacuous case: every row is masked";
  auto [out, lse] = fwd(c);
  if (cfg.raw_ids && raw_out_differs)
    EXPECT_TRUE(out.isfinite().all().template item<bool>()) << "out";
  else
    expect_close("out", out, ref_out, cfg.dtype);
  expect_close("lse", lse, ref_lse, cfg.dtype);

  at::manual_seed(1);
  Tensor grad_out = at::randn(ref_out.sizes(), ref_out.options());
  OptTensor grad_lse;
  if (cfg.with_grad_lse) grad_lse = at::randn(ref_lse.sizes(), ref_lse.options());
  auto ref = relattn::ops::attention_backward(grad_out, grad_lse, r.q, r.k, r.v, ref_out, ref_lse, r.rel_k, r.rel_v,
                                              r.rel_bias, r.buckets, r.rel_index, r.alibi_slopes,
                                              r.key_padding_mask, r.causal, std::nullopt, r.q_offset, r.dropout_p,
                                              r.dropout_seed, r.q_segment_ids, r.k_segment_ids, r.q_offsets);
  const Grads want{std::get<0>(ref), std::get<1>(ref), std::get<2>(ref),
                   std::get<3>(ref), std::get<4>(ref), std::get<5>(ref)};
  const Grads got = bwd(c, ref_out, ref_lse, grad_out, grad_lse);
  const char* names[] = {"dq", "dk", "dv", "d rel_k", "d rel_v", "d rel_bias"};
  for (int i = 0; i < 6; ++i) expect_close(names[i], got[i], want[i], cfg.dtype);
  // Deterministic: a second run (other thread interleavings in the emulator) gives the same bits.
  const Grads again = bwd(c, ref_out, ref_lse, grad_out, grad_lse);
  for (int i = 0; i < 6; ++i) EXPECT_TRUE(at::equal(got[i], again[i])) << names[i] << " differs between runs";
}

template <typename T, int HD>
void check_mma(const Config& cfg) {
  check(
      cfg, [&](const Call& c) { return forward_mma<T, HD>(c, cfg.tables_in_global, cfg.splits); },
      [&](const Call& c, const Tensor& o, const Tensor& l, const Tensor& go, const OptTensor& gl) {
        return backward(c, o, l, go, gl, true,
                        [](const kc::BackwardParams& p) { return kc::launch_backward_mma<T, HD>(p, nullptr); });
      },
      /*raw_out_differs=*/cfg.positions == "index");
}

template <typename T>
void check_simt(const Config& cfg) {
  check(
      cfg, [&](const Call& c) { return forward_simt<T>(c, cfg.splits); },
      [&](const Call& c, const Tensor& o, const Tensor& l, const Tensor& go, const OptTensor& gl) {
        return backward(c, o, l, go, gl, false, [](const kc::BackwardParams& p) { return kc::launch_backward_simt<T>(p, nullptr); });
      });
}

}  // namespace

// Tensor-core kernels: one case per padded head dim the backward has, features crossed between them.
TEST(CudaEmulation, TensorCoresHd32ClipCausalPaddingGqa) {
  Config c{.name = "hd32", .B = 2, .H = 4, .Hk = 2, .Lq = 70, .Lk = 45, .D = 32, .Dv = 32, .M = 6,
           .alibi = true, .padding = true, .causal = true, .q_offset = 5};
  check_mma<__nv_bfloat16, 32>(c);
}

TEST(CudaEmulation, TensorCoresHd64T5PerHeadTablesInGlobal) {
  Config c{.name = "hd64", .dtype = at::kHalf, .H = 2, .Hk = 2, .Lq = 33, .Lk = 80, .D = 64, .Dv = 64,
           .positions = "t5", .per_head = true, .tables_in_global = true};
  check_mma<__half, 64>(c);
}

// quad_run_sums on its own: rows of 8 * kNT columns whose ids come in runs (lengths from 1 to the whole
// row, boundaries on and off the lane and n8-tile edges), two channels (one call each); each warp holds 8
// rows (a quad each). Every id present must be flushed exactly once, with its run's sums.
struct RunSumsParams {
  const int32_t* ids;  // [rows, 8 kNT]
  const float* vals;   // [rows, 2, 8 kNT]
  float* sums;         // [rows, 2, R]
  float* flushes;      // [rows, R] (channel 0's calls)
  int R;
};

template <int kNT>
__global__ void run_sums_kernel(const RunSumsParams p) {
  constexpr int kCols = 8 * kNT;
  const int lane = threadIdx.x & 31, tq = lane & 3;
  const int row = (threadIdx.x >> 5) * 8 + (lane >> 2);
  const int32_t* ids = p.ids + row * kCols;
  for (int ch = 0; ch < 2; ++ch) {
    const float* v = p.vals + (row * 2 + ch) * kCols;
    kc::quad_run_sums<kNT>(
        tq, [&](int nt, int e1) { return v[nt * 8 + 2 * tq + e1]; }, [&](int c) { return ids[c]; },
        [&](int id, float s) {
          kc::red_add_global(p.sums + (row * 2 + ch) * p.R + id, s);
          if (ch == 0) kc::red_add_global(p.flushes + row * p.R + id, 1.f);
        });
  }
}

template <int kNT>
void check_run_sums(uint64_t seed) {
  constexpr int kCols = 8 * kNT, kRows = 64, R = kCols;
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(kRows * kCols);
  for (int r = 0; r < kRows; ++r) {
    std::vector<int32_t> perm(R);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    // rows 0-3: one run, all distinct, runs of 2 and of 8 (on the lane and n8 edges); then random lengths
    const int fixed = r == 0 ? kCols : (r == 1 ? 1 : (r == 2 ? 2 : (r == 3 ? 8 : 0)));
    int run = 0;
    for (int c = 0; c < kCols;) {
      int len = fixed ? fixed : 1 + static_cast<int>(rng() % (rng() % 4 == 0 ? kCols : 6));
      for (int k = 0; k < len && c < kCols; ++k, ++c) ids[r * kCols + c] = perm[run];
      ++run;
    }
  }
  at::manual_seed(static_cast<int64_t>(seed));
  Tensor vals = at::randn({kRows, 2, kCols});
  vals.masked_fill_(at::rand({kRows, 2, kCols}) < 0.2, 0.);  // masked keys
  Tensor sums = at::zeros({kRows, 2, R}), flushes = at::zeros({kRows, R});
  RunSumsParams p{ids.data(), vals.data_ptr<float>(), sums.data_ptr<float>(), flushes.data_ptr<float>(), R};
  ASSERT_EQ(kc::launch_kernel(run_sums_kernel<kNT>, 1, kRows * 4, 0, nullptr, p), cudaSuccess);

  Tensor want = at::zeros({kRows, 2, R}, at::kDouble), present = at::zeros({kRows, R});
  Tensor ids_t = at::from_blob(ids.data(), {kRows, 1, kCols}, at::kInt).to(at::kLong);
  want.scatter_add_(2, ids_t.expand({kRows, 2, kCols}), vals.to(at::kDouble));
  present.scatter_(1, ids_t.squeeze(1), 1.f);
  EXPECT_TRUE(at::equal(flushes, present)) << "each id present flushed once, no other";
  EXPECT_TRUE(at::allclose(sums.to(at::kDouble), want, 0, 1e-5)) << (sums.to(at::kDouble) - want).abs().max();
}

TEST(CudaEmulation, QuadRunSums) {
  for (uint64_t seed = 0; seed < 3; ++seed) {
    check_run_sums<8>(seed);
    check_run_sums<4>(seed);
  }
}

// How the binding classifies bucket tables for the kernels' bucket sums: clip distinct, T5 in runs, the
// periodic table neither.
TEST(CudaEmulation, BucketTableLayouts) {
  for (const char* pos : {"clip", "t5", "periodic"}) {
    const Prepared a = prepare(make_call(Config{.positions = pos, .M = 12}));
    const std::string name = pos;
    EXPECT_EQ(a.buckets_distinct, name == "clip") << pos;
    EXPECT_EQ(a.buckets_runs, name != "periodic") << pos;
  }
}

// T5 ids (each in one run of distances) with the forward's tables in shared memory: the runs path of the
// forward's value-term sums (plain read-modify-writes) and of kernel A's (red.add), across query offsets
// that put runs over n8-tile and key-tile boundaries.
TEST(CudaEmulation, TensorCoresHd32T5TablesInSharedPadding) {
  Config c{.name = "hd32 t5 smem", .B = 2, .H = 2, .Hk = 2, .Lq = 66, .Lk = 131, .D = 32, .Dv = 32,
           .positions = "t5", .padding = true, .q_offset = 37};
  check_mma<__nv_bfloat16, 32>(c);
}

// Shared ids that do not form runs: the bucket sums take the quad's lanes in turn (forward and kernel A).
TEST(CudaEmulation, TensorCoresHd64PeriodicBucketsCausal) {
  Config c{.name = "hd64 periodic buckets", .H = 2, .Lq = 75, .Lk = 90, .D = 64, .Dv = 64, .M = 20,
           .per_head = true, .causal = true, .q_offset = 10};
  c.positions = "periodic";
  check_mma<__nv_bfloat16, 64>(c);
}

TEST(CudaEmulation, TensorCoresHd128RelIndexOddDims) {
  Config c{.name = "hd128 (D 100, Dv 72)", .Lq = 20, .Lk = 37, .D = 100, .Dv = 72, .positions = "index"};
  check_mma<__nv_bfloat16, 128>(c);
}

TEST(CudaEmulation, TensorCoresHd96BeyondM) {
  Config c{.name = "hd96 single-bucket rows", .H = 1, .Lq = 80, .Lk = 140, .D = 96, .Dv = 96, .M = 3,
           .q_offset = -20};
  check_mma<__nv_bfloat16, 96>(c);
}

// Clip buckets (distinct ids) with the forward's tables in global memory, as Shaw clip 64 runs at hd 128:
// window keys add to their buckets with red.add, the clamped ones to the far sums.
TEST(CudaEmulation, TensorCoresHd128ClipTablesInGlobal) {
  Config c{.name = "hd128 clip, tables in global", .H = 2, .Lq = 70, .Lk = 150, .D = 128, .Dv = 128, .M = 9,
           .per_head = true, .q_offset = 30, .tables_in_global = true};
  check_mma<__nv_bfloat16, 128>(c);
}

TEST(CudaEmulation, TensorCoresHd32OddDimsElementwiseLoads) {
  Config c{.name = "D 17, Dv 9", .dtype = at::kHalf, .Lq = 19, .Lk = 23, .D = 17, .Dv = 9, .M = 4,
           .causal = true};
  check_mma<__half, 32>(c);
}

// No relative tables: the plain forward instance (128-row tiles up to head dim 128), with ALiBi, padding,
// causal masking, a query offset and grouped-query heads.
TEST(CudaEmulation, TensorCoresHd128PlainAlibiCausalPaddingGqa) {
  Config c{.name = "hd128 plain", .B = 2, .H = 2, .Hk = 1, .Lq = 136, .Lk = 100, .D = 128, .Dv = 128,
           .positions = "none", .alibi = true, .padding = true, .causal = true, .q_offset = -7};
  check_mma<__nv_bfloat16, 128>(c);
}

TEST(CudaEmulation, TensorCoresHd96PlainOddDims) {
  Config c{.name = "hd96 plain (D 80, Dv 96)", .dtype = at::kHalf, .Lq = 130, .Lk = 33, .D = 80, .Dv = 96,
           .positions = "none"};
  check_mma<__half, 96>(c);
}

// The plain instance's interior tiles: whole key tiles loaded without per-chunk tests, no masks (no padding;
// causal only on the diagonal tiles), and O rescaled only when a row of the warp finds a new maximum (long
// rows: 32 key tiles, most of them without one).
TEST(CudaEmulation, TensorCoresHd64PlainInteriorTiles) {
  Config full{.name = "hd64 plain, long rows", .H = 1, .Lq = 130, .Lk = 1030, .D = 64, .Dv = 64,
              .positions = "none"};
  check_mma<__nv_bfloat16, 64>(full);
  Config causal{.name = "hd64 plain, causal", .H = 2, .Lq = 140, .Lk = 200, .D = 64, .Dv = 64,
                .positions = "none", .causal = true, .q_offset = 60};
  check_mma<__nv_bfloat16, 64>(causal);
}

// Token-by-token decoding (relattn.nn.KVCache): one or a few query rows at the end of a long key range
// (q_offset = Lk - Lq), a query tile holding 1-3 valid rows; most key tiles are far for those rows.
TEST(CudaEmulation, TensorCoresDecodeSteps) {
  Config step{.name = "decode step, tables", .B = 2, .H = 4, .Hk = 1, .Lq = 1, .Lk = 300, .D = 64, .Dv = 64, .M = 8,
              .per_head = true, .alibi = true, .causal = true, .q_offset = 299};
  check_mma<__nv_bfloat16, 64>(step);
  Config plain{.name = "decode steps, plain", .H = 2, .Hk = 2, .Lq = 3, .Lk = 200, .D = 128, .Dv = 128,
               .positions = "none", .causal = true, .q_offset = 197};
  check_mma<__nv_bfloat16, 128>(plain);
}

// Per-batch query offsets (a [B] tensor the kernels read on the device): each batch row's tile positions,
// causal limits, far tiles and segment query spans follow its own offset. Decode steps of a ragged batch
// (rows with 41, 258 and 131 cached keys in one 260-key cache; causal masks the unfilled slots), a prefill
// chunk with offsets of both signs, the plain instance, dropout and segments (kernel B's query span).
TEST(CudaEmulation, BatchOffsets) {
  Config ragged{.name = "ragged decode", .B = 3, .H = 4, .Hk = 2, .Lq = 2, .Lk = 260, .D = 64, .Dv = 64, .M = 8,
                .per_head = true, .alibi = true, .causal = true, .q_offsets = {39, 256, 129}};
  check_mma<__nv_bfloat16, 64>(ragged);
  Config chunk{.name = "chunk, T5", .B = 2, .H = 2, .Lq = 70, .Lk = 150, .D = 128, .Dv = 128, .positions = "t5",
               .padding = true, .causal = true, .q_offset = 5, .q_offsets = {-10, 80}, .tables_in_global = true};
  check_mma<__nv_bfloat16, 128>(chunk);
  Config plain{.name = "plain", .B = 2, .H = 2, .Hk = 2, .Lq = 33, .Lk = 140, .D = 32, .Dv = 32,
               .positions = "none", .alibi = true, .causal = true, .q_offsets = {0, 100}};
  check_mma<__nv_bfloat16, 32>(plain);
  Config drop{.name = "dropout, segments", .B = 2, .H = 2, .Lq = 40, .Lk = 120, .D = 64, .Dv = 64, .causal = true,
              .q_offsets = {70, 20}, .dropout = 0.2, .segments = "pair"};
  check_mma<__nv_bfloat16, 64>(drop);
  Config simt{.name = "simt f32", .dtype = at::kFloat, .B = 3, .H = 2, .Hk = 1, .Lq = 20, .Lk = 70, .D = 24,
              .Dv = 40, .positions = "t5", .alibi = true, .causal = true, .q_offsets = {3, -20, 55},
              .segments = "pair"};
  check_simt<float>(simt);
}

// The binding's key split (forward.h: plan_key_split): whole aligned chunks that cover the keys exactly once,
// none below kMinSplitKeys unless forced, only for single-tile calls that fill less than a wave.
TEST(CudaEmulation, KeySplitPlan) {
  for (const int64_t Lk : {1, 64, 65, 511, 512, 4100, 8192, 1000000}) {
    for (const int64_t ctas : {1, 4, 100, 131, 132, 1000}) {
      for (const int64_t forced : {0, 1, 3, 64}) {
        SCOPED_TRACE(std::to_string(Lk) + " keys, " + std::to_string(ctas) + " CTAs, forced " + std::to_string(forced));
        const kc::KeySplit s = kc::plan_key_split(ctas, 1, Lk, 132, forced);
        if (s.num_splits <= 1) {
          EXPECT_EQ(s.num_splits, 1);
          EXPECT_TRUE(forced == 1 || Lk <= kc::kSplitKeyAlign || (forced == 0 && (ctas >= 132 || Lk < 2 * kc::kMinSplitKeys)));
          continue;
        }
        EXPECT_EQ(s.split_keys % kc::kSplitKeyAlign, 0);
        EXPECT_LT((s.num_splits - 1) * s.split_keys, Lk);  // no empty chunk at the end
        EXPECT_GE(s.num_splits * s.split_keys, Lk);
        EXPECT_LE(s.num_splits, forced > 0 ? forced : kc::kMaxSplits);
        if (forced == 0) {
          EXPECT_LT(ctas, 132);
          EXPECT_GE(s.split_keys, kc::kMinSplitKeys);
          EXPECT_LE(ctas * s.num_splits, 2 * 132 + ctas);  // about two waves at most
        }
      }
    }
  }
  EXPECT_EQ(kc::plan_key_split(4, 2, 100000, 132).num_splits, 1);  // more than one query tile: not split
  EXPECT_EQ(kc::plan_key_split(4, 2, 100000, 132, 5).num_splits, 5);  // unless forced
}

// Split decode steps (flash-decoding): num_splits copies of the grid, each on one key chunk, writing partial
// rows and lse that launch_combine_splits merges. Chunks that causal masking leaves empty (a ragged batch's
// short rows), a batch row whose keys are all padding (-inf in every chunk), tables in global scratch (one
// row block per CTA, chunks included), the plain instance, dropout with segments, and the SIMT kernel.
TEST(CudaEmulation, SplitDecodeSteps) {
  Config tables{.name = "split, tables", .B = 2, .H = 4, .Hk = 1, .Lq = 1, .Lk = 300, .D = 64, .Dv = 64, .M = 8,
                .per_head = true, .alibi = true, .causal = true, .q_offset = 299, .splits = 4};
  check_mma<__nv_bfloat16, 64>(tables);
  Config global{.name = "split, T5, tables in global, padding", .dtype = at::kHalf, .B = 2, .H = 2, .Lq = 3,
                .Lk = 400, .D = 128, .Dv = 128, .positions = "t5", .padding = true, .q_offset = 100,
                .tables_in_global = true, .splits = 6};
  check_mma<__half, 128>(global);
  Config ragged{.name = "split, plain, ragged", .B = 3, .H = 2, .Hk = 2, .Lq = 1, .Lk = 260, .D = 32, .Dv = 32,
                .positions = "none", .alibi = true, .causal = true, .q_offsets = {39, 256, 129}, .splits = 4};
  check_mma<__nv_bfloat16, 32>(ragged);
  Config drop{.name = "split, dropout, segments", .B = 2, .H = 2, .Lq = 2, .Lk = 300, .D = 64, .Dv = 64,
              .causal = true, .q_offsets = {250, 120}, .splits = 3, .dropout = 0.2, .segments = "pair"};
  check_mma<__nv_bfloat16, 64>(drop);
  Config simt{.name = "split, simt f32", .dtype = at::kFloat, .B = 2, .H = 2, .Hk = 1, .Lq = 5, .Lk = 300, .D = 24,
              .Dv = 40, .positions = "t5", .alibi = true, .causal = true, .q_offset = 290, .splits = 5};
  check_simt<float>(simt);
}

// NaN in, NaN out: a NaN in one query row (every score of the row NaN: a max that passes over NaN must not
// take the row for a fully masked one) and in one key (NaN weights among finite ones) make out and lse NaN
// exactly where the CPU op's are, split steps included; every other row keeps its value.
template <typename Fwd>
void check_nan_rows(const Config& cfg, Fwd fwd) {
  SCOPED_TRACE(cfg.name);
  Call c = make_call(cfg);
  c.q.select(0, 0).select(0, cfg.H - 1).select(0, cfg.Lq / 2).fill_(NAN);
  c.k.select(0, cfg.B - 1).select(0, 0).select(0, cfg.Lk / 3).select(0, 1).fill_(NAN);
  auto [ref_out, ref_lse] = relattn::ops::attention_forward(c.q, c.k, c.v, c.rel_k, c.rel_v, c.rel_bias, c.buckets,
                                                            c.rel_index, c.alibi_slopes, c.key_padding_mask, c.causal,
                                                            std::nullopt, c.q_offset, 0.0, std::nullopt,
                                                            std::nullopt, std::nullopt, c.q_offsets);
  const Tensor ref_nan = ref_lse.isnan();
  ASSERT_TRUE(ref_nan.any().item<bool>() && ref_nan.logical_not().any().item<bool>());
  ASSERT_TRUE(at::equal(ref_out.isnan().any(-1), ref_nan));
  auto [out, lse] = fwd(c);
  EXPECT_TRUE(at::equal(lse.isnan(), ref_nan)) << "lse's NaN rows";
  EXPECT_TRUE(at::equal(out.isnan().all(-1), ref_nan)) << "out's NaN rows";
  expect_close("out of the other rows", out.masked_fill(ref_nan.unsqueeze(-1), 0),
               ref_out.masked_fill(ref_nan.unsqueeze(-1), 0), cfg.dtype);
  expect_close("lse of the other rows", lse.masked_fill(ref_nan, 0), ref_lse.masked_fill(ref_nan, 0), cfg.dtype);
}

TEST(CudaEmulation, NanScoresMakeNanRows) {
  Config mma{.name = "nan, tensor cores", .B = 2, .H = 2, .Hk = 1, .Lq = 40, .Lk = 70, .D = 64, .Dv = 64,
             .causal = true, .q_offset = 20};
  check_nan_rows(mma, [](const Call& c) { return forward_mma<__nv_bfloat16, 64>(c, false); });
  Config plain{.name = "nan, plain", .dtype = at::kHalf, .B = 2, .H = 2, .Hk = 2, .Lq = 30, .Lk = 50, .D = 32,
               .Dv = 32, .positions = "none"};
  check_nan_rows(plain, [](const Call& c) { return forward_mma<__half, 32>(c, false); });
  Config split{.name = "nan, split", .B = 2, .H = 2, .Hk = 1, .Lq = 1, .Lk = 300, .D = 64, .Dv = 64,
               .q_offset = 299, .splits = 4};
  check_nan_rows(split, [](const Call& c) { return forward_mma<__nv_bfloat16, 64>(c, false, 4); });
  Config simt{.name = "nan, simt f32", .dtype = at::kFloat, .B = 2, .H = 2, .Hk = 1, .Lq = 9, .Lk = 300, .D = 24,
              .Dv = 40, .positions = "t5", .q_offset = 291};
  check_nan_rows(simt, [](const Call& c) { return forward_simt<float>(c, 5); });
}

// Bias table alone: kernel A needs the P bucket sums (to correct the dS sums) that no rel_v asks for.
TEST(CudaEmulation, TensorCoresHd64BiasOnlyCausal) {
  Config c{.name = "T5 bias only", .H = 2, .Lq = 70, .Lk = 70, .D = 64, .Dv = 64, .positions = "t5",
           .rel_k = false, .rel_v = false, .causal = true};
  check_mma<__nv_bfloat16, 64>(c);
}

// A row that sees one key has dS = P(dP - Δ) = 0 exactly (no lse gradient): kernel A must give exact zeros
// there, not the rounding noise of its centred single-sweep formula. Lk = 1 (every row) and causal row 0.
TEST(CudaEmulation, TensorCoresOneKeyRowsExactZero) {
  for (const int64_t Lk : {1, 40}) {
    Config cfg{.name = "one key", .H = 2, .Lq = 40, .Lk = Lk, .D = 64, .Dv = 64, .M = 4, .causal = Lk > 1,
               .with_grad_lse = false};
    SCOPED_TRACE(Lk);
    Call c = make_call(cfg);
    auto [out, lse] = forward_mma<__nv_bfloat16, 64>(c, false);
    at::manual_seed(1);
    Tensor go = at::randn(out.sizes(), out.options());
    Grads g = backward(c, out, lse, go, std::nullopt, true, [](const kc::BackwardParams& p) {
      return kc::launch_backward_mma<__nv_bfloat16, 64>(p, nullptr);
    });
    const Tensor dq_row0 = g[0].select(2, 0);
    EXPECT_TRUE(at::equal(dq_row0, at::zeros_like(dq_row0))) << "dq of a row with one key";
    if (Lk == 1) {
      EXPECT_TRUE(at::equal(g[0], at::zeros_like(g[0]))) << "dq";
      EXPECT_TRUE(at::equal(g[3], at::zeros_like(g[3]))) << "d rel_k";
      EXPECT_TRUE(at::equal(g[5], at::zeros_like(g[5]))) << "d rel_bias";
    }
  }
}

// Head dim 256: two warps share each 16 rows (A) or keys (B) in the backward, each accumulating half of
// the columns; only the first writes the bucket sums and Δ (a second writer would double them). Several
// query and key tiles, rows far beyond ±M (their sums in registers) and rows near the diagonal, GQA.
TEST(CudaEmulation, TensorCoresHd256ClipCausalGqaFarRows) {
  Config c{.name = "hd256", .B = 2, .H = 2, .Hk = 1, .Lq = 70, .Lk = 75, .D = 256, .Dv = 256, .M = 4, .padding = true,
           .causal = true, .q_offset = 5};
  check_mma<__nv_bfloat16, 256>(c);
}

// D != Dv padded to 256 (zero-filled columns in both halves), T5 runs, per-head tables, the lse gradient.
TEST(CudaEmulation, TensorCoresHd256T5OddDims) {
  Config c{.name = "hd256 t5", .dtype = at::kHalf, .H = 1, .Lq = 37, .Lk = 66, .D = 200, .Dv = 136,
           .positions = "t5", .per_head = true};
  check_mma<__half, 256>(c);
}

TEST(CudaEmulation, TensorCoresHd256RelIndexAlibi) {
  Config c{.name = "hd256 index", .H = 1, .Lq = 19, .Lk = 40, .D = 256, .Dv = 256, .positions = "index",
           .alibi = true};
  check_mma<__nv_bfloat16, 256>(c);
}

// Ids that escaped the binding's checks (on CUDA it reads each tensor version once; a write through .data
// or a raw pointer is not seen): every kernel clamps them, never reading or writing outside the tables.
TEST(CudaEmulation, UncheckedIdsAreClampedTensorCores) {
  Config index{.name = "raw rel_index", .B = 2, .H = 2, .Lq = 40, .Lk = 70, .D = 64, .Dv = 64,
               .positions = "index", .causal = true, .q_offset = 20, .raw_ids = true};
  check_mma<__nv_bfloat16, 64>(index);
  // a table whose ids recur apart (the general bucket sums), first and last entries (the far buckets) bad
  Config table{.name = "raw buckets", .H = 2, .Lq = 70, .Lk = 90, .D = 32, .Dv = 32, .positions = "periodic",
               .M = 9, .raw_ids = true};
  check_mma<__nv_bfloat16, 32>(table);
}

TEST(CudaEmulation, UncheckedIdsAreClampedSimt) {
  Config index{.name = "raw rel_index simt", .dtype = at::kFloat, .Lq = 20, .Lk = 45, .D = 16, .Dv = 24,
               .positions = "index", .raw_ids = true};
  check_simt<float>(index);
  Config table{.name = "raw buckets simt", .dtype = at::kFloat, .Lq = 30, .Lk = 33, .D = 16, .Dv = 16,
               .positions = "periodic", .M = 4, .raw_ids = true};
  check_simt<float>(table);
}

// SIMT kernels in float32 and float64 (and bf16, as RELATTN_CUDA_KERNEL=simt runs them).
TEST(CudaEmulation, SimtFloat) {
  Config c{.name = "simt f32", .dtype = at::kFloat, .B = 2, .H = 2, .Hk = 1, .Lq = 37, .Lk = 41, .D = 24, .Dv = 40,
           .positions = "t5", .alibi = true, .padding = true, .causal = true, .q_offset = 3};
  check_simt<float>(c);
}

TEST(CudaEmulation, SimtDouble) {
  Config c{.name = "simt f64", .dtype = at::kDouble, .Lq = 21, .Lk = 35, .D = 16, .Dv = 16, .positions = "index",
           .per_head = true};
  check_simt<double>(c);
}

TEST(CudaEmulation, SimtBf16) {
  Config c{.name = "simt bf16", .Lq = 25, .Lk = 30, .D = 32, .Dv = 32, .M = 5, .causal = true};
  check_simt<__nv_bfloat16>(c);
}

// Dropout in the SIMT kernels (which run every dropout call on CUDA so far): the same mask as the CPU op,
// forward and every gradient, with all tables, masks, GQA, an offset and several tiles each way.
TEST(CudaEmulation, SimtDropoutFloat) {
  Config c{.name = "simt dropout f32", .dtype = at::kFloat, .B = 2, .H = 2, .Hk = 1, .Lq = 37, .Lk = 70, .D = 24,
           .Dv = 40, .per_head = true, .alibi = true, .padding = true, .causal = true, .q_offset = 20,
           .dropout = 0.3};
  check_simt<float>(c);
}

TEST(CudaEmulation, SimtDropoutBf16T5) {
  Config c{.name = "simt dropout bf16", .Lq = 33, .Lk = 45, .D = 32, .Dv = 16, .positions = "t5",
           .dropout = 0.5};
  check_simt<__nv_bfloat16>(c);
}

TEST(CudaEmulation, SimtDropoutDoubleRelIndex) {
  Config c{.name = "simt dropout f64", .dtype = at::kDouble, .Lq = 21, .Lk = 35, .D = 16, .Dv = 8,
           .positions = "index", .dropout = 0.2};
  check_simt<double>(c);
}

// Dropout in the tensor-core kernels: the forward's table instance and both backward kernels draw the mask
// on their accumulator fragments (kernel B's transposed), kernel A in two sweeps.
TEST(CudaEmulation, TensorCoresDropoutHd64ClipCausalPaddingGqa) {
  Config c{.name = "mma dropout hd64", .B = 2, .H = 2, .Hk = 1, .Lq = 70, .Lk = 150, .D = 64, .Dv = 64, .M = 8,
           .per_head = true, .alibi = true, .padding = true, .causal = true, .q_offset = 30, .dropout = 0.3};
  check_mma<__nv_bfloat16, 64>(c);
}

TEST(CudaEmulation, TensorCoresDropoutHd128T5TablesInGlobal) {
  Config c{.name = "mma dropout hd128 t5", .dtype = at::kHalf, .Lq = 40, .Lk = 140, .D = 128, .Dv = 128,
           .positions = "t5", .tables_in_global = true, .dropout = 0.5};
  check_mma<__half, 128>(c);
}

TEST(CudaEmulation, TensorCoresDropoutHd32PlainAndRelIndex) {
  Config plain{.name = "mma dropout hd32 plain", .Lq = 50, .Lk = 90, .D = 32, .Dv = 32, .positions = "none",
               .rel_k = false, .rel_v = false, .rel_bias = false, .causal = true, .dropout = 0.2};
  check_mma<__nv_bfloat16, 32>(plain);
  Config index{.name = "mma dropout hd32 rel_index", .Lq = 33, .Lk = 70, .D = 24, .Dv = 32, .positions = "index",
               .dropout = 0.4};
  check_mma<__nv_bfloat16, 32>(index);
}

TEST(CudaEmulation, TensorCoresDropoutHd256BeyondM) {
  Config c{.name = "mma dropout hd256", .Lq = 40, .Lk = 200, .D = 256, .Dv = 256, .M = 4, .q_offset = -60,
           .dropout = 0.25};
  check_mma<__nv_bfloat16, 256>(c);
}

TEST(CudaEmulation, TensorCoresDropoutHd96PeriodicBuckets) {
  Config c{.name = "mma dropout hd96 periodic", .dtype = at::kHalf, .B = 2, .H = 2, .Hk = 2, .Lq = 45, .Lk = 100, .D = 80, .Dv = 96,
           .positions = "periodic", .M = 12, .padding = true, .dropout = 0.35};
  check_mma<__half, 96>(c);
}

// Segments (packed sequences): tile ranges from the per-row spans, the per-pair test on the tiles that need it.
TEST(CudaEmulation, SegmentsTensorCoresHd64PackedClipCausal) {
  Config c{.name = "seg_hd64_packed", .B = 2, .H = 2, .Hk = 1, .Lq = 200, .Lk = 200, .D = 64, .Dv = 64, .M = 6,
           .causal = true, .segments = "packed"};
  check_mma<__nv_bfloat16, 64>(c);
}
TEST(CudaEmulation, SegmentsTensorCoresHd32UnsortedT5Padding) {
  Config c{.name = "seg_hd32_unsorted", .dtype = at::kHalf, .B = 2, .H = 2, .Hk = 2, .Lq = 90, .Lk = 90, .D = 32, .Dv = 32,
           .positions = "t5", .padding = true, .segments = "unsorted"};
  check_mma<__half, 32>(c);
}
TEST(CudaEmulation, SegmentsTensorCoresHd128PairPlainDropout) {
  Config c{.name = "seg_hd128_pair_plain", .B = 2, .H = 2, .Hk = 1, .Lq = 70, .Lk = 150, .D = 128, .Dv = 128,
           .positions = "none", .q_offset = 3, .dropout = 0.2, .segments = "pair"};
  check_mma<__nv_bfloat16, 128>(c);
}
TEST(CudaEmulation, SegmentsTensorCoresHd256PackedRelIndex) {
  Config c{.name = "seg_hd256_packed_index", .B = 2, .H = 2, .Hk = 1, .Lq = 140, .Lk = 140, .D = 256, .Dv = 256,
           .positions = "index", .segments = "packed"};
  check_mma<__nv_bfloat16, 256>(c);
}
// Segments alone without relative tables: the table instance with kSegments, not the plain one.
TEST(CudaEmulation, SegmentsTensorCoresHd96PairNoTables) {
  Config c{.name = "seg_hd96_pair_none", .dtype = at::kHalf, .B = 2, .H = 2, .Hk = 2, .Lq = 60, .Lk = 130,
           .D = 80, .Dv = 96, .positions = "none", .rel_k = false, .rel_v = false, .rel_bias = false, .q_offset = 5,
           .segments = "pair"};
  check_mma<__half, 96>(c);
}
TEST(CudaEmulation, SegmentsSimtFloatPackedAndPair) {
  Config c{.name = "seg_simt_packed", .dtype = at::kFloat, .B = 2, .H = 2, .Hk = 1, .Lq = 150, .Lk = 150, .D = 16,
           .Dv = 16, .alibi = true, .causal = true, .segments = "packed"};
  check_simt<float>(c);
  c.name = "seg_simt_pair";
  c.segments = "pair";
  c.Lq = 40;
  c.q_offset = 20;
  check_simt<float>(c);
}

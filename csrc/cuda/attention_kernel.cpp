// CUDA binding of relattn (CUDA dispatch key): argument checks (`prepare`, shared with every backend),
// device guard, current stream, output and scratch allocation, the dtype / head-dim dispatch, and the
// launch of the torch-free kernels in kernels/cuda/ (forward.h describes them).
//
// Which kernel runs:
//   fp16 / bf16        tensor-core kernel for the padded head dim mma_head_dim_for(max(D, Dv)) in
//                      {32, 64, 96, 128, 256}; columns beyond D / Dv are zero-filled inside the kernel.
//   float32 / float64  SIMT kernel in the input precision (no TF32).
//   dropout_p > 0      the same kernels, with the mask drawn in registers (kernels/dropout.h); the tensor-core
//                      forward takes its table instance (the plain one draws no mask) and the backward's
//                      kernel A sweeps the keys twice (exact Δ first).
//   segment ids        tensor cores: the forward's table instance and both backward kernels in their
//                      segment instances (tile ranges, per-pair test); with dropout, the dropout instances,
//                      which carry the segment code too.
//   D or Dv > 256      a clear error (the CPU kernel has no such limit).
// The per-row relative tables (tab, bsum) live in shared memory when they fit in kTableSmemBudget, else
// in a global scratch of O(B·H·Lq·R) floats that this binding allocates.
//
// Environment switches, read on every call (debugging and tuning; the defaults are what users get):
//   RELATTN_CUDA_KERNEL=simt          run fp16/bf16 through the SIMT kernel too (cross-check of the
//                                     tensor-core kernel; same inputs, float accumulation)
//   RELATTN_CUDA_TABLES=smem|global   force where the per-row tables live (smem falls back to global
//                                     when the device has too little shared memory)
//   RELATTN_CUDA_SEGMENTS=dropout     run segment calls without dropout in the dropout instances (z = 1),
//                                     to time them against the segment-only instances
//   RELATTN_CHECK_IDS=always          read buckets / rel_index on the host on every call (default: once
//                                     per tensor and version; see csrc/id_checks.h)
//
// The backward (kernels/cuda/backward.h) runs two kernels (per query tile, then per key tile) that never
// write the same element from two blocks, and leaves the table gradients to GEMMs of per-row bucket sums:
// deterministic by construction, so there is no non-deterministic fast path to alert about.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../../kernels/cuda/backward.h"
#include "../../kernels/cuda/forward.h"
#include "../../kernels/dropout.h"
#include "../attention.h"

namespace relattn {
namespace ops {
namespace {

namespace kc = kernels::cuda;

// Shared memory the per-row tables may take before they move to global scratch (bytes).
constexpr int64_t kTableSmemBudget = 64 * 1024;

std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

// RELATTN_CUDA_SPLITS=N: split every forward's keys into N chunks (1: never split); unset or 0: the split
// plan_key_split picks for decode steps that fill few SMs. For tests and timings.
int64_t forced_splits() {
  const std::string v = env_str("RELATTN_CUDA_SPLITS");
  if (v.empty()) return 0;
  char* end = nullptr;
  const long long n = std::strtoll(v.c_str(), &end, 10);
  TORCH_CHECK(end != v.c_str() && *end == '\0' && n >= 0 && n <= kc::kMaxSplits,
              "relattn: RELATTN_CUDA_SPLITS must be an integer in [0, ", kc::kMaxSplits, "], got '", v, "'");
  return n;
}

// RELATTN_CUDA_SEGMENTS=dropout runs tensor-core calls with segment ids and no dropout in the dropout
// instances, with a zero seed and threshold 0 (every pair kept with the factor 1.0 exactly), as before the
// segment-only instances existed: a switch to time the two against each other. Returns the seed tensor,
// which must live until the kernels are queued (undefined when nothing was changed).
Tensor segments_via_dropout_instance(const Prepared& a, kernels::AttentionParams& p) {
  if (!a.q_segment_ids.defined() || p.dropout_seed != nullptr || env_str("RELATTN_CUDA_SEGMENTS") != "dropout")
    return {};
  Tensor seed = at::zeros({1}, a.q.options().dtype(at::kLong));
  p.dropout_seed = seed.data_ptr<int64_t>();
  p.dropout_threshold = 0;  // every 16-bit number is >= 0: all kept
  p.dropout_scale = kernels::dropout_scale(0);  // 1
  return seed;
}

// Rows of `t` may be read with 16-byte copies: aligned base, and every dimension that is ever indexed
// (size > 1) has a stride that is a multiple of 16 bytes.
bool rows_16b_aligned(const Tensor& t) {
  const int64_t elem = static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * elem) % 16 != 0) return false;
  }
  return true;
}

// How this call checks its bucket ids (csrc/id_checks.h): asserted on the device while the current stream
// is captured into a CUDA graph (a host read would break the capture), else read once per tensor and
// version; RELATTN_CHECK_IDS=always reads them on every call.
IdCheck id_check_mode(const Tensor& q) {
  if (!q.is_cuda()) return IdCheck::kHost;  // a device mix: prepare() reports it
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(q.device().index()).stream(), &status));
  if (status != cudaStreamCaptureStatusNone) return IdCheck::kDevice;
  return env_str("RELATTN_CHECK_IDS") == "always" ? IdCheck::kHost : IdCheck::kHostCached;
}

// Calls f(std::integral_constant<int, HD>{}) for the padded head dim HD of the tensor-core kernels.
template <typename F>
void with_mma_head_dim(int hd, F&& f) {
  switch (hd) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: TORCH_CHECK(false, "relattn.attention: internal error: no CUDA kernel for head dim ", hd);
  }
}

// Launch geometry and shared memory of the chosen kernel.
struct Plan {
  bool simt = false;
  int head_dim = 0;      // padded head dim of the tensor-core kernel
  int64_t block_m = 0;   // query rows per CTA
  int64_t base_smem = 0; // shared memory without the tables
  int64_t table_bytes = 0;  // one per-row table in shared memory
  bool plain = false;       // the plain tensor-core instance (no relative tables)
};

Plan make_plan(const Prepared& a, at::ScalarType dtype, int64_t table_ld) {
  Plan plan;
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  plan.simt = !half || env_str("RELATTN_CUDA_KERNEL") == "simt";
  if (plan.simt) {
    if (a.acc_dtype == at::kDouble) {
      using Cfg = kc::SimtConfig<double>;
      plan.block_m = Cfg::kBlockM;
      plan.base_smem = Cfg::base_bytes(a.D, a.Dv);
      plan.table_bytes = Cfg::table_bytes(table_ld);
    } else {
      using Cfg = kc::SimtConfig<float>;
      plan.block_m = Cfg::kBlockM;
      plan.base_smem = Cfg::base_bytes(a.D, a.Dv);
      plan.table_bytes = Cfg::table_bytes(table_ld);
    }
  } else {
    plan.head_dim = kc::mma_head_dim_for(std::max(a.D, a.Dv));
    // dropout and segments: the table instance (the plain one has neither)
    plan.plain = !a.rel_k.defined() && !a.rel_v.defined() && !a.rel_bias.defined() && !a.dropout_seed.defined() &&
                 !a.q_segment_ids.defined() && env_str("RELATTN_CUDA_PLAIN") != "0";
    const bool plain = plan.plain;
    with_mma_head_dim(plan.head_dim, [&](auto hd) {
      const kc::MmaForwardShape shape = kc::mma_forward_shape<decltype(hd)::value>(plain);
      plan.block_m = shape.block_m;
      plan.base_smem = shape.base_bytes;
      plan.table_bytes = shape.table_bytes(table_ld);
    });
  }
  return plan;
}

ForwardResult attention_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& rel_k,
                                     const OptTensor& rel_v, const OptTensor& rel_bias, const OptTensor& buckets,
                                     const OptTensor& rel_index, const OptTensor& alibi_slopes,
                                     const OptTensor& key_padding_mask, bool causal, std::optional<double> scale,
                                     int64_t q_offset, double dropout_p, const OptTensor& dropout_seed,
                                     const OptTensor& q_segment_ids, const OptTensor& k_segment_ids,
                                     const OptTensor& q_offsets) {
  Prepared a = prepare(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask,
                       causal, scale, q_offset, dropout_p, dropout_seed, q_segment_ids, k_segment_ids,
                       q_offsets, id_check_mode(q));
  TORCH_CHECK(a.D <= kc::kMaxHeadDim && a.Dv <= kc::kMaxHeadDim,
              "relattn.attention: the CUDA kernels support head dims up to ", kc::kMaxHeadDim, ", got D = ", a.D,
              " and Dv = ", a.Dv, "; run this call on the CPU");
  c10::cuda::CUDAGuard device_guard(q.device());
  Tensor out = at::empty({a.B, a.H, a.Lq, a.Dv}, q.options());
  Tensor lse = at::empty({a.B, a.H, a.Lq}, q.options().dtype(a.acc_dtype));
  if (a.B * a.H * a.Lq == 0) return {out, lse};

  kc::ForwardParams p;
  fill_params(a, p);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();

  const at::ScalarType dtype = q.scalar_type();
  const int64_t table_ld = kc::table_ld_for(a.R);
  const Plan plan = make_plan(a, dtype, table_ld);
  const int64_t n_query_tiles = (a.Lq + plan.block_m - 1) / plan.block_m;
  const int64_t blocks = n_query_tiles * a.B * a.H;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "relattn.attention: B*H*ceil(Lq/", plan.block_m,
              ") = ", blocks, " CUDA blocks is more than one launch can take; split the batch");

  // A decode step that fills few SMs splits its keys into chunks, one CTA each, merged by a second kernel
  // (flash-decoding; forward.h: plan_key_split).
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.device().index()));
  kc::KeySplit split = kc::plan_key_split(blocks, n_query_tiles, a.Lk, sm_count, forced_splits());
  if (blocks * split.num_splits > std::numeric_limits<int32_t>::max()) split = {};
  Tensor out_partial, lse_partial;
  if (split.num_splits > 1) {
    const auto acc_opts = q.options().dtype(a.acc_dtype);
    out_partial = at::empty({split.num_splits, a.B, a.H, a.Lq, a.Dv}, acc_opts);
    lse_partial = at::empty({split.num_splits, a.B, a.H, a.Lq}, acc_opts);
    p.num_splits = split.num_splits;
    p.split_keys = split.split_keys;
    p.out_partial = out_partial.data_ptr();
    p.lse_partial = lse_partial.data_ptr();
  }

  // Where the per-row tables live.
  const int n_tables = (p.has_tab() ? 1 : 0) + (p.has_bsum() ? 1 : 0);
  const int64_t tables_smem = n_tables * plan.table_bytes;
  int smem_optin_attr = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin_attr, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.device().index()));
  const int64_t smem_optin = smem_optin_attr;
  TORCH_CHECK(plan.base_smem <= smem_optin, "relattn.attention: this call needs ", plan.base_smem,
              " bytes of shared memory per block (D = ", a.D, ", Dv = ", a.Dv, ", ", dtype,
              ") but the device allows ", smem_optin, "; run it on the CPU");
  const std::string tables_mode = env_str("RELATTN_CUDA_TABLES");
  bool in_global = false;
  if (n_tables > 0) {
    in_global = tables_mode == "global" || (tables_mode != "smem" && tables_smem > kTableSmemBudget) ||
                plan.base_smem + tables_smem > smem_optin;
  }
  Tensor tab_scratch, bsum_scratch;
  if (in_global) {
    const auto acc_opts = q.options().dtype(a.acc_dtype);
    const int64_t rows = blocks * p.num_splits * plan.block_m;  // a row block per CTA
    if (p.has_tab()) tab_scratch = at::empty({rows, table_ld}, acc_opts);
    if (p.has_bsum()) bsum_scratch = at::empty({rows, table_ld}, acc_opts);
    p.tab_scratch = tab_scratch.defined() ? tab_scratch.data_ptr() : nullptr;
    p.bsum_scratch = bsum_scratch.defined() ? bsum_scratch.data_ptr() : nullptr;
  }
  p.tables_in_global = in_global;
  p.plain = plan.plain;
  p.table_ld = table_ld;
  p.q_vec_ok = rows_16b_aligned(a.q);
  p.k_vec_ok = rows_16b_aligned(a.k);
  p.v_vec_ok = rows_16b_aligned(a.v);
  const int64_t smem = plan.base_smem + (in_global ? 0 : tables_smem);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  cudaError_t err = cudaSuccess;
  if (plan.simt) {
    switch (dtype) {
      case at::kDouble: err = kc::launch_forward_simt<double>(p, smem, stream); break;
      case at::kFloat: err = kc::launch_forward_simt<float>(p, smem, stream); break;
      case at::kHalf: err = kc::launch_forward_simt<__half>(p, smem, stream); break;
      case at::kBFloat16: err = kc::launch_forward_simt<__nv_bfloat16>(p, smem, stream); break;
      default: TORCH_CHECK(false, "relattn.attention: no CUDA kernel for dtype ", dtype);
    }
  } else {
    const Tensor segment_seed = segments_via_dropout_instance(a, p);
    with_mma_head_dim(plan.head_dim, [&](auto hd) {
      constexpr int HD = decltype(hd)::value;
      if (dtype == at::kHalf) {
        err = kc::launch_forward_mma<__half, HD>(p, smem, stream);
      } else {
        err = kc::launch_forward_mma<__nv_bfloat16, HD>(p, smem, stream);
      }
    });
  }
  C10_CUDA_CHECK(err);
  if (p.num_splits > 1) {
    switch (dtype) {
      case at::kDouble: err = kc::launch_combine_splits<double>(p, stream); break;
      case at::kFloat: err = kc::launch_combine_splits<float>(p, stream); break;
      case at::kHalf: err = kc::launch_combine_splits<__half>(p, stream); break;
      default: err = kc::launch_combine_splits<__nv_bfloat16>(p, stream); break;
    }
    C10_CUDA_CHECK(err);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// The backward kernel family for a call: tensor cores for fp16/bf16 (any D, Dv <= 256), else SIMT.
bool backward_uses_mma(const Prepared& a, at::ScalarType dtype) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  return half && std::max(a.D, a.Dv) <= kc::kBwdMmaMaxHeadDim && env_str("RELATTN_CUDA_KERNEL") != "simt";
}

BackwardResult attention_backward_cuda(const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q,
                                       const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                                       const OptTensor& rel_k, const OptTensor& rel_v, const OptTensor& rel_bias,
                                       const OptTensor& buckets, const OptTensor& rel_index,
                                       const OptTensor& alibi_slopes, const OptTensor& key_padding_mask,
                                       bool causal, std::optional<double> scale, int64_t q_offset,
                                       double dropout_p, const OptTensor& dropout_seed,
                                       const OptTensor& q_segment_ids, const OptTensor& k_segment_ids,
                                       const OptTensor& q_offsets) {
  Prepared a = prepare(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask,
                       causal, scale, q_offset, dropout_p, dropout_seed, q_segment_ids, k_segment_ids,
                       q_offsets, id_check_mode(q));
  BackwardBuffers s = backward_buffers(a, grad_out, out, lse, grad_lse);
  TORCH_CHECK(a.D <= kc::kMaxHeadDim && a.Dv <= kc::kMaxHeadDim,
              "relattn.attention: the CUDA kernels support head dims up to ", kc::kMaxHeadDim, ", got D = ", a.D,
              " and Dv = ", a.Dv, "; run this call on the CPU");
  c10::cuda::CUDAGuard device_guard(q.device());
  const at::ScalarType dtype = q.scalar_type();
  const bool empty = a.B * a.H * a.Lq == 0 || a.B * a.Hk * a.Lk == 0;

  // Every element of dq, dk, dv is written by the kernels (rows and keys nobody sees get zeros).
  auto grad = [&](int64_t heads, int64_t len, int64_t d) {
    return empty ? at::zeros({a.B, heads, len, d}, q.options()) : at::empty({a.B, heads, len, d}, q.options());
  };
  Tensor dq = grad(a.H, a.Lq, a.D), dk = grad(a.Hk, a.Lk, a.D), dv = grad(a.Hk, a.Lk, a.Dv);

  if (!empty) {
    kc::BackwardParams p;
    fill_backward_params(a, s, dq, dk, dv, p);
    p.q_vec_ok = rows_16b_aligned(a.q);
    p.k_vec_ok = rows_16b_aligned(a.k);
    p.v_vec_ok = rows_16b_aligned(a.v);
    p.do_vec_ok = rows_16b_aligned(s.grad_out);

    // Launch sizes: one CTA per query tile of 16 (SIMT) or 64 (tensor cores) rows, and per key tile.
    const int64_t grid_rows = std::max((a.Lq + 15) / 16 * a.B * a.H, (a.Lk + 15) / 16 * a.B * a.Hk);
    TORCH_CHECK(grid_rows <= std::numeric_limits<int32_t>::max(), "relattn.attention: the CUDA backward of B = ",
                a.B, ", H = ", a.H, ", Lq = ", a.Lq, ", Lk = ", a.Lk,
                " needs more CUDA blocks than one launch can take; split the batch");
    int smem_optin_attr = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&smem_optin_attr, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.device().index()));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
    cudaError_t err = cudaSuccess;
    std::vector<Tensor> single_sweep_inputs;  // alive until the kernels are done (stream-ordered frees)
    if (backward_uses_mma(a, dtype)) {
      single_sweep_inputs = single_sweep_backward_inputs(a, out, p);
      single_sweep_inputs.push_back(segments_via_dropout_instance(a, p));
      with_mma_head_dim(kc::mma_head_dim_for(std::max(a.D, a.Dv)), [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        if constexpr (HD <= kc::kBwdMmaMaxHeadDim) {
          using Cfg = kc::BwdMmaConfig<HD>;
          TORCH_CHECK(std::max(Cfg::kABytes, Cfg::kBBytes) <= smem_optin_attr, "relattn.attention: the CUDA backward needs ",
                      std::max(Cfg::kABytes, Cfg::kBBytes), " bytes of shared memory per block but the device allows ",
                      smem_optin_attr, "; run it on the CPU");
          if (dtype == at::kHalf) {
            err = kc::launch_backward_mma<__half, HD>(p, stream);
          } else {
            err = kc::launch_backward_mma<__nv_bfloat16, HD>(p, stream);
          }
        }
      });
    } else {
      const int64_t need = a.acc_dtype == at::kDouble ? kc::BwdSimtConfig<double>::smem_bytes(a.D, a.Dv)
                                                      : kc::BwdSimtConfig<float>::smem_bytes(a.D, a.Dv);
      TORCH_CHECK(need <= smem_optin_attr, "relattn.attention: the CUDA backward needs ", need,
                  " bytes of shared memory per block (D = ", a.D, ", Dv = ", a.Dv, ", ", dtype,
                  ") but the device allows ", smem_optin_attr, "; run it on the CPU");
      switch (dtype) {
        case at::kDouble: err = kc::launch_backward_simt<double>(p, stream); break;
        case at::kFloat: err = kc::launch_backward_simt<float>(p, stream); break;
        case at::kHalf: err = kc::launch_backward_simt<__half>(p, stream); break;
        case at::kBFloat16: err = kc::launch_backward_simt<__nv_bfloat16>(p, stream); break;
        default: TORCH_CHECK(false, "relattn.attention: no CUDA kernel for dtype ", dtype);
      }
    }
    C10_CUDA_CHECK(err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  auto [d_rel_k, d_rel_v, d_rel_bias] = table_grads(a, s.ds_sum, s.p_sum, grad_out, rel_k, rel_v, rel_bias);
  return {dq, dk, dv, d_rel_k, d_rel_v, d_rel_bias};
}

}  // namespace
}  // namespace ops

TORCH_LIBRARY_IMPL(relattn, CUDA, m) {
  m.impl("attention_forward", &ops::attention_forward_cuda);
  m.impl("attention_backward", &ops::attention_backward_cuda);
}

}  // namespace relattn

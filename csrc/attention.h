// Internal: the op implementations each dispatch key registers, and the argument checks they share.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../kernels/params.h"
#include "id_checks.h"

namespace relattn {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Arguments after validation: q/k/v with stride-1 last dims, tables in the accumulation dtype and
// contiguous, bucket ids as int32. Built once per call by `prepare`; the kernels read it through
// `fill_params`.
struct Prepared {
  Tensor q, k, v;
  Tensor rel_k, rel_v, rel_bias, alibi_slopes;  // undefined when absent
  Tensor buckets, rel_index, key_padding_mask;  // undefined when absent
  int64_t B = 0, H = 0, Hk = 0, Lq = 0, Lk = 0, D = 0, Dv = 0, R = 0, M = 0;
  bool buckets_distinct = false;  // no two entries of `buckets` are equal
  bool buckets_runs = false;      // the entries of each id of `buckets` are consecutive
  double scale = 1.0;
  bool causal = false;
  int64_t q_offset = 0;
  Tensor q_offsets;  // per-batch query offsets, int32 [B], added to q_offset; undefined when not given
  at::ScalarType acc_dtype = at::kFloat;  // float64 for float64 inputs, else float32
  // Dropout of the attention weights (kernels/dropout.h); the seed is undefined when dropout is off.
  Tensor dropout_seed;
  uint32_t dropout_threshold = 0;
  double dropout_scale = 1.0;
  // Segments (kernels/params.h): int32 ids [B, Lq] / [B, Lk], the per-row ranges [B, L, 2] and the
  // per-batch-row flag of sorted ids [B]; all undefined when no segment ids are given.
  Tensor q_segment_ids, k_segment_ids, segment_key_range, segment_query_range, segment_sorted;

  bool has_bucket_terms() const { return rel_k.defined() || rel_v.defined() || rel_bias.defined(); }
};

// Checks every argument of SPEC §1/§5 (TORCH_CHECK with the argument's name) and normalises it; also
// dropout_p (in [0, 1]) and dropout_seed (an int64 tensor of one element on q's device, required when
// dropout_p > 0; dropout is off when p rounds to 0, kernels/dropout.h), and the segment ids (both or
// neither; integer [B, Lq] and [B, Lk], read as int32: other dtypes are converted, their values checked to
// fit, on the host for CPU tensors and by a device-side assertion on CUDA), and the per-batch query offsets
// q_offsets (integer [B], read as int32 the same way).
Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& rel_k,
                 const OptTensor& rel_v, const OptTensor& rel_bias, const OptTensor& buckets,
                 const OptTensor& rel_index, const OptTensor& alibi_slopes,
                 const OptTensor& key_padding_mask, bool causal, std::optional<double> scale,
                 int64_t q_offset, double dropout_p, const OptTensor& dropout_seed,
                 const OptTensor& q_segment_ids = std::nullopt, const OptTensor& k_segment_ids = std::nullopt,
                 const OptTensor& q_offsets = std::nullopt, IdCheck id_check = IdCheck::kHost);

// Pointers and strides of a prepared call (out/lse/gradients are filled by the backend).
void fill_params(const Prepared& a, kernels::AttentionParams& p);

// The gradient of a relative table, in the table's own dtype, from the per-row bucket sums the
// kernels leave behind: sum over (b, i) of row_sums[b,h,i,r] * rows[b,h,i,:] (per head, or over
// heads for a shared table). Deterministic: plain batched matmuls and reductions.
Tensor table_grad_from_row_sums(const Tensor& row_sums, const Tensor& rows, int64_t H,
                                bool per_head, double alpha, at::ScalarType out_dtype);

using ForwardResult = std::tuple<Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Backend implementations (same signature as the schema).
ForwardResult attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptTensor& rel_k, const OptTensor& rel_v,
                                    const OptTensor& rel_bias, const OptTensor& buckets,
                                    const OptTensor& rel_index, const OptTensor& alibi_slopes,
                                    const OptTensor& key_padding_mask, bool causal,
                                    std::optional<double> scale, int64_t q_offset, double dropout_p,
                                    const OptTensor& dropout_seed, const OptTensor& q_segment_ids,
                                    const OptTensor& k_segment_ids, const OptTensor& q_offsets);

BackwardResult attention_backward_cpu(const Tensor& grad_out, const OptTensor& grad_lse,
                                      const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& out, const Tensor& lse, const OptTensor& rel_k,
                                      const OptTensor& rel_v, const OptTensor& rel_bias,
                                      const OptTensor& buckets, const OptTensor& rel_index,
                                      const OptTensor& alibi_slopes,
                                      const OptTensor& key_padding_mask, bool causal,
                                      std::optional<double> scale, int64_t q_offset, double dropout_p,
                                      const OptTensor& dropout_seed, const OptTensor& q_segment_ids,
                                      const OptTensor& k_segment_ids, const OptTensor& q_offsets);

// Typed handles of the dispatcher ops (what the public API, autograd and autocast call).
ForwardResult attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const OptTensor& rel_k, const OptTensor& rel_v,
                                const OptTensor& rel_bias, const OptTensor& buckets,
                                const OptTensor& rel_index, const OptTensor& alibi_slopes,
                                const OptTensor& key_padding_mask, bool causal,
                                std::optional<double> scale, int64_t q_offset, double dropout_p = 0.0,
                                const OptTensor& dropout_seed = std::nullopt,
                                const OptTensor& q_segment_ids = std::nullopt,
                                const OptTensor& k_segment_ids = std::nullopt,
                                const OptTensor& q_offsets = std::nullopt);

BackwardResult attention_backward(const Tensor& grad_out, const OptTensor& grad_lse,
                                  const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, const OptTensor& rel_k,
                                  const OptTensor& rel_v, const OptTensor& rel_bias,
                                  const OptTensor& buckets, const OptTensor& rel_index,
                                  const OptTensor& alibi_slopes, const OptTensor& key_padding_mask,
                                  bool causal, std::optional<double> scale, int64_t q_offset,
                                  double dropout_p = 0.0, const OptTensor& dropout_seed = std::nullopt,
                                  const OptTensor& q_segment_ids = std::nullopt,
                                  const OptTensor& k_segment_ids = std::nullopt,
                                  const OptTensor& q_offsets = std::nullopt);

// Shape of a gradient for an absent table: an empty tensor (the schema returns Tensor, not Tensor?).
Tensor absent_grad(const Tensor& like);

// Checks grad_out / out / lse / grad_lse of a backward call against the prepared forward arguments
// (shapes, dtype, device); returns whether grad_lse is given.
bool check_backward_args(const Prepared& a, const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                         const OptTensor& grad_lse);

// What a backward kernel reads besides the prepared arguments: grad_out with a stride-1 last dim, lse and
// grad_lse contiguous in the accumulation dtype, and the per-row scratch of kernels/params.h
// (AttentionBwdParams): delta, and row_tab/ds_sum (rel_k or rel_bias), row_doa/p_sum (rel_v), the sums
// zero-filled unless `zero_sums` is false (kernels that write every element of them). Checks
// grad_out/out/lse/grad_lse first (check_backward_args).
struct BackwardBuffers {
  Tensor grad_out, lse, grad_lse;  // grad_lse undefined when absent
  Tensor delta, row_tab, ds_sum, row_doa, p_sum;
};
// zero_sums: ds_sum / p_sum start at zero (kernels that add into them); row_tables_kept: allocate row_tab /
// row_doa (kernels that keep the row tables between passes).
BackwardBuffers backward_buffers(const Prepared& a, const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                                 const OptTensor& grad_lse, bool zero_sums = true, bool row_tables_kept = true);

// fill_params plus the backward's pointers and strides (buffers and the gradients dq, dk, dv).
void fill_backward_params(const Prepared& a, const BackwardBuffers& s, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv, kernels::AttentionBwdParams& p);

// What a backward kernel that sweeps the keys once needs beyond fill_backward_params (the CUDA tensor-core
// backward): `out` itself (the centre Δ0 = do·out of dS, see kernels/cuda/backward.h) and the P bucket sums
// also when only rel_k / rel_bias are given. Returns the tensors behind the new pointers, which must live
// until the kernels are done.
std::vector<Tensor> single_sweep_backward_inputs(const Prepared& a, const Tensor& out, kernels::AttentionBwdParams& p);

// d rel_k, d rel_v, d rel_bias (empty tensors for absent tables) from the per-row bucket sums that every
// backend's kernels leave behind: ds_sum [B,H,Lq,R] (Σ_β dS) and p_sum [B,H,Lq,R] (Σ_β P).
std::tuple<Tensor, Tensor, Tensor> table_grads(const Prepared& a, const Tensor& ds_sum, const Tensor& p_sum,
                                               const Tensor& grad_out, const OptTensor& rel_k,
                                               const OptTensor& rel_v, const OptTensor& rel_bias);

}  // namespace ops
}  // namespace relattn

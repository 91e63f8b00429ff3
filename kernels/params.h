// relattn kernel parameters: plain data, no ATen, shared by the CPU and CUDA kernels.
//
// The math (SPEC §1-2), with β(i,j) the bucket of pair (i,j) and d(i,j) = j - (i + q_offset):
//
//   s_ij  = scale * (q_i·k_j + q_i·aK[β]) + bias[h,β] - m_h*|d|      (-inf where masked)
//   p_ij  = softmax_j(s_ij)
//   out_i = Σ_j p_ij (v_j + aV[β])        lse_i = log Σ_j exp(s_ij)
//
// The relative terms never need an Lq×Lk×D tensor: per query row, `tab[i,r] = scale*q_i·aK[r] +
// bias[h,r]` is R numbers, and the value term is `Σ_r (Σ_{j:β=r} p_ij) aV[r]`. In a tile whose
// distances all lie beyond ±M every pair of a row falls into one bucket, so those sums are row sums.
//
// Every stride is in elements and 64-bit; the last dimension of every tensor has stride 1.
#pragma once

#include <cstdint>

#ifndef RELATTN_HD
#if defined(__CUDACC__)
#define RELATTN_HD __host__ __device__ __forceinline__
#else
#define RELATTN_HD inline
#endif
#endif

namespace relattn {
namespace kernels {

struct AttentionParams {
  // Sizes. H % Hk == 0; head h reads kv head h / (H / Hk).
  int64_t B = 0, H = 0, Hk = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  int64_t R = 0;  // bucket count of the relative tables (0 when none is given)

  // q [B,H,Lq,D], k [B,Hk,Lk,D], v [B,Hk,Lk,Dv] in the input dtype; strides for (b, h, l).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};

  // out [B,H,Lq,Dv] (input dtype), lse [B,H,Lq] (accumulation dtype), both contiguous.
  void* out = nullptr;
  void* lse = nullptr;

  // Relative tables in the accumulation dtype, contiguous. rel_k [H?,R,D], rel_v [H?,R,Dv],
  // rel_bias [H,R]; a head stride of 0 means the table is shared by all heads.
  const void* rel_k = nullptr;
  const void* rel_v = nullptr;
  const void* rel_bias = nullptr;
  int64_t rel_k_head_stride = 0;
  int64_t rel_v_head_stride = 0;

  // Buckets: either the distance table buckets[2M+1] (clamp(d,-M,M)+M) or rel_index [B?,Lq,Lk].
  const int32_t* buckets = nullptr;
  int64_t max_distance = 0;  // M
  // No two distances of [-M, M] share a bucket (e.g. clip_buckets): in a tile, the keys of a row whose
  // distance lies inside (-M, M) then all have distinct buckets, which the CUDA kernels' bucket sums use.
  bool buckets_distinct = false;
  // Every id of `buckets` fills one run of consecutive entries (T5's log buckets; implied by distinct): in
  // a row of a tile, each bucket's keys are then consecutive, which the CUDA kernels' bucket sums use.
  bool buckets_runs = false;
  const int32_t* rel_index = nullptr;
  // R - 1 (0 without tables). The binding checks every id, but on CUDA once per tensor version: an id
  // written where torch cannot see it (.data, raw pointers) is not checked again. The CUDA kernels clamp
  // each id they read into [0, id_max] (negative ids to id_max too), so such an id gives a wrong answer,
  // never a read or write outside the tables. (One exception, for the registers: the tensor-core
  // forward's value-term sums of rel_index leave such a pair out instead of clamping it.) A field rather
  // than R - 1 computed in the kernels: ptxas reads it as a constant operand, where the computed bound
  // took a register (kernel A of the backward then spilled 12 bytes at hd 128 and 52 at hd 256, sm_90).
  uint32_t id_max = 0;
  int64_t rel_index_stride[3] = {0, 0, 0};  // (b, i, j); b stride 0 for a 2-D rel_index

  // ALiBi slopes [H] in the accumulation dtype.
  const void* alibi_slopes = nullptr;

  // key_padding_mask [B,Lk] as bytes (True = padding), strides (b, j).
  const uint8_t* key_padding_mask = nullptr;
  int64_t key_padding_mask_stride[2] = {0, 0};

  // Segments (packed sequences): key j is masked for query i when q_segment_ids[b,i] != k_segment_ids[b,j].
  // int32 [B, Lq] / [B, Lk] with unit last stride; null when not given. The binding also gives, per row, the
  // range of the other side that can match: segment_key_range [B, Lq, 2] holds keys [lo, hi) of query i's
  // segment and segment_query_range [B, Lk, 2] the queries [lo, hi) of key j's; both non-decreasing along the
  // row, so a tile's range is [lo of its first row, hi of its last). Where a batch row's ids are not sorted
  // (segment_sorted[b] == 0) they are the whole [0, L) and only the per-pair test masks. Where they are
  // sorted, the pairs inside both rows' ranges are exactly the matching ones: a tile inside them needs no
  // per-pair test, and tiles outside are skipped.
  const int32_t* q_segment_ids = nullptr;
  const int32_t* k_segment_ids = nullptr;
  int64_t q_segment_stride = 0;  // batch stride
  int64_t k_segment_stride = 0;
  const int32_t* segment_key_range = nullptr;
  const int32_t* segment_query_range = nullptr;
  const uint8_t* segment_sorted = nullptr;

  bool causal = false;
  double scale = 1.0;
  // Position of query row i in batch row b: i + q_offset + q_offsets[b]. q_offsets is int32 [B] (a device
  // tensor on CUDA, so that decode steps with per-row cache lengths need no host value and stay capturable
  // in a CUDA graph); null when not given. Read it through batch_q_offset.
  int64_t q_offset = 0;
  const int32_t* q_offsets = nullptr;

  // Dropout of the attention weights (kernels/dropout.h): null when off. The seed is one int64 in the
  // inputs' memory (a device tensor on CUDA, read by the kernels). Pair (i, j) is kept when its 16-bit
  // number is >= dropout_threshold, and a kept weight is multiplied by dropout_scale.
  const int64_t* dropout_seed = nullptr;
  uint32_t dropout_threshold = 0;
  double dropout_scale = 1.0;

  bool has_bucket_terms() const { return rel_k != nullptr || rel_v != nullptr || rel_bias != nullptr; }
  bool has_dropout() const { return dropout_seed != nullptr; }
  bool has_segments() const { return q_segment_ids != nullptr; }
  RELATTN_HD int64_t batch_q_offset(int64_t b) const {
    return q_offsets == nullptr ? q_offset : q_offset + q_offsets[b];
  }
};

// The backward adds the incoming gradients, the outputs and the per-row scratch it shares between
// its two passes (all O(L·R) or O(L·D); nothing of size Lq×Lk).
struct AttentionBwdParams : AttentionParams {
  // grad_out [B,H,Lq,Dv] (input dtype, strides b,h,l); grad_lse [B,H,Lq] (acc dtype, contiguous) or null.
  const void* grad_out = nullptr;
  int64_t grad_out_stride[3] = {0, 0, 0};
  const void* grad_lse = nullptr;

  // Gradients in the input dtype, contiguous: dq [B,H,Lq,D], dk [B,Hk,Lk,D], dv [B,Hk,Lk,Dv].
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  // Scratch in the accumulation dtype, contiguous [B,H,Lq] / [B,H,Lq,R]:
  //   delta   Δ_i = Σ_j p_ij dp_ij - grad_lse_i  (= do_i·out_i - grad_lse_i, kept in acc dtype)
  //   row_tab tab[i,r] = scale*q_i·aK[r] + bias[h,r]       (if rel_k or rel_bias; null where the kernel
  //   row_doa do_i·aV[r]                                  (if rel_v)             keeps them per block)
  //   ds_sum  Σ_{j:β=r} ds_ij                             (if rel_k or rel_bias)  -> d aK, d bias
  //   p_sum   Σ_{j:β=r} p_ij                              (if rel_v)              -> d aV
  void* delta = nullptr;
  void* row_tab = nullptr;
  void* row_doa = nullptr;
  void* ds_sum = nullptr;
  void* p_sum = nullptr;
};

}  // namespace kernels
}  // namespace relattn

// relattn CUDA forward: the host-side contract of the kernels (torch-free; the binding in
// csrc/cuda/attention_kernel.cu fills ForwardParams and calls one launcher).
//
// Two kernels compute the same tiled algorithm (csrc/cpu/attention_kernel.cpp and kernels/params.h
// hold its math):
//   forward_mma   fp16/bf16 on tensor cores (mma.sync m16n8k16, fp32 accumulation), templated on a
//                 padded head dim in {32, 64, 96, 128, 256}; D and Dv below it are zero-filled.
//   forward_simt  float32/float64 (and, for debugging, fp16/bf16) with plain FMAs, any D, Dv <= 256.
// Both keep, per query tile, the row table tab[i,r] = scale*q_i·aK[r] + bias[h,r] and the bucket sums
// bsum[i,r] either in shared memory or, when R is too large for it, in a global scratch buffer that
// the binding allocates (one row block per CTA, so no two CTAs ever touch the same row).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../params.h"

#if defined(__CUDACC__)
#define RELATTN_HOST_DEVICE __host__ __device__
#else
#define RELATTN_HOST_DEVICE
#endif

namespace relattn {
namespace kernels {
namespace cuda {

struct ForwardParams : AttentionParams {
  // Per-row relative tables (accumulation dtype). In shared memory unless `tables_in_global`; then
  // [num_query_tiles * block_m, table_ld] each, indexed by the CTA's tile slot.
  bool tables_in_global = false;
  void* tab_scratch = nullptr;   // tab[i,r] (only when rel_k or rel_bias)
  void* bsum_scratch = nullptr;  // bsum[i,r] (only when rel_v)
  int64_t table_ld = 0;          // row stride of both tables, in elements (>= R)

  // q/k/v rows may be read with 16-byte cp.async: base pointer and the strides of every dimension of
  // size > 1 are multiples of 16 bytes. Otherwise the loads go element by element.
  bool q_vec_ok = false;
  bool k_vec_ok = false;
  bool v_vec_ok = false;

  // Take the plain tensor-core instance (only honoured without relative tables; the binding sets it then,
  // unless RELATTN_CUDA_PLAIN=0 asks for the table instance, e.g. to time one against the other).
  bool plain = false;

  // A split decode step (flash-decoding; plan_key_split): the grid holds num_splits copies of the query
  // tiles, copy s (blockIdx.x / tiles) taking the keys [s * split_keys, (s + 1) * split_keys) and writing
  // its rows normalised by its own softmax sum, in the accumulation dtype, to out_partial
  // [num_splits, B, H, Lq, Dv] and its lse to lse_partial [num_splits, B, H, Lq]. launch_combine_splits
  // then writes out and lse. split_keys is a multiple of kSplitKeyAlign, so no key tile straddles two chunks.
  int64_t num_splits = 1;
  int64_t split_keys = 0;
  void* out_partial = nullptr;
  void* lse_partial = nullptr;

  RELATTN_HOST_DEVICE bool has_tab() const { return rel_k != nullptr || rel_bias != nullptr; }
  RELATTN_HOST_DEVICE bool has_bsum() const { return rel_v != nullptr; }
  // (Dropout and segments take the table instance: the plain one has neither.)
  RELATTN_HOST_DEVICE bool use_plain() const {
    return plain && !has_tab() && !has_bsum() && dropout_seed == nullptr && q_segment_ids == nullptr;
  }
};

// ---- tensor-core kernel: tile shapes and the shared-memory layout (host and device agree on them) ----

constexpr int kMmaThreads = 128;  // 4 warps; each owns block_m / 4 query rows of the tile

// The padded head dims that have a tensor-core kernel.
constexpr int kMmaHeadDims[] = {32, 64, 96, 128, 256};
constexpr int kMaxHeadDim = 256;

// Smallest supported padded head dim >= d (d <= kMaxHeadDim).
RELATTN_HOST_DEVICE constexpr int mma_head_dim_for(int64_t d) {
  return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 256;
}

// kPlain: the kernel instance for calls without relative tables (rel_k, rel_v, rel_bias; ALiBi, masks
// and padding stay), whose lighter register needs allow 128-row tiles up to head dim 128.
template <int kHeadDim, bool kPlain = false>
struct MmaConfig {
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= kMaxHeadDim, "unsupported head dim");
  // Tile shapes chosen so that ptxas keeps everything in registers (checked with -Xptxas -v; NOTES.md has
  // the table): the O accumulator is kBlockM/4 x kHeadDim fp32 per warp and the score tile kBlockM/4 x
  // kBlockN. 32 rows per warp (two m16 tiles) halve the shared-memory reads of K and V per flop where the
  // registers allow it: head dims up to 64 with the relative features compiled in, up to 128 without
  // (with 32-key tiles from head dim 96 on, FlashAttention-2's rows per warp at hd 128).
  static constexpr int kBlockM = kHeadDim <= 64 || (kPlain && kHeadDim <= 128) ? 128 : 64;
  static constexpr int kBlockN = kHeadDim == 64 || kHeadDim == 256 || (kPlain && kHeadDim >= 96) ? 32 : 64;
  // Shared-memory row stride (elements): 16 extra bytes put the 8 rows of an ldmatrix on distinct banks.
  static constexpr int kLd = kHeadDim + 8;
  static constexpr int kWin = kBlockM + kBlockN;  // bucket ids of one tile's distances (per stage)

  static constexpr int64_t kQBytes = int64_t(kBlockM) * kLd * 2;
  static constexpr int64_t kStageBytes = int64_t(kBlockN) * kLd * 2;
  static constexpr int64_t kOffK = kQBytes;                   // K: 2 stages
  static constexpr int64_t kOffV = kOffK + 2 * kStageBytes;   // V: 2 stages
  static constexpr int64_t kOffWin = kOffV + 2 * kStageBytes;  // int32 [2][kWin]
  static constexpr int64_t kOffKpm = kOffWin + 2 * kWin * 4;   // uint8 [2][kBlockN]
  static constexpr int64_t kOffTables = (kOffKpm + 2 * kBlockN + 15) / 16 * 16;
  static constexpr int64_t kBaseBytes = kOffTables;

  // Bytes of one per-row table of row stride `ld` (float).
  RELATTN_HOST_DEVICE static constexpr int64_t table_bytes(int64_t ld) { return int64_t(kBlockM) * ld * 4; }
};

// What the host needs of the tensor-core instance a call takes (the plain one when the call has no
// relative tables): query rows per CTA and shared memory without the per-row tables.
struct MmaForwardShape {
  int64_t block_m = 0;
  int64_t base_bytes = 0;
  int64_t table_bytes(int64_t ld) const { return block_m * ld * 4; }
};

template <int kHeadDim>
inline MmaForwardShape mma_forward_shape(bool plain) {
  if (plain) return {MmaConfig<kHeadDim, true>::kBlockM, MmaConfig<kHeadDim, true>::kBaseBytes};
  return {MmaConfig<kHeadDim>::kBlockM, MmaConfig<kHeadDim>::kBaseBytes};
}

// ---- SIMT kernel ----------------------------------------------------------------------------------------

constexpr int kSimtThreads = 128;
constexpr int kSimtBlockN = 32;  // one key per lane

template <typename acc_t>
struct SimtConfig {
  static constexpr int kRowsPerWarp = sizeof(acc_t) == 8 ? 2 : 4;
  static constexpr int kBlockM = 4 * kRowsPerWarp;
  static constexpr int kBlockN = kSimtBlockN;
  static constexpr int kMaxPerLane = kMaxHeadDim / 32;  // output columns per lane

  // sQ [BM][D], sK [BN][D+1] (the +1 keeps a warp's 32 key rows on distinct banks), sV [BN][Dv],
  // sP [4 warps][BN], then the tables; all acc_t.
  RELATTN_HOST_DEVICE static int64_t base_elems(int64_t D, int64_t Dv) {
    return int64_t(kBlockM) * D + int64_t(kBlockN) * (D + 1) + int64_t(kBlockN) * Dv + 4 * kBlockN;
  }
  RELATTN_HOST_DEVICE static int64_t base_bytes(int64_t D, int64_t Dv) { return (base_elems(D, Dv) * int64_t(sizeof(acc_t)) + 15) / 16 * 16; }
  RELATTN_HOST_DEVICE static int64_t table_bytes(int64_t ld) { return int64_t(kBlockM) * ld * int64_t(sizeof(acc_t)); }
};

// Row stride of the per-row tables: odd, so that rows fall on different banks.
inline int64_t table_ld_for(int64_t R) { return R % 2 == 1 ? R : R + 1; }

// ---- split decode steps (flash-decoding) ------------------------------------------------------------------

constexpr int64_t kSplitKeyAlign = 64;   // a multiple of every kernel's key tile (32 or 64 keys)
constexpr int64_t kMinSplitKeys = 256;   // no chunk below this many keys: each CTA's fixed cost stays small
constexpr int64_t kMaxSplits = 64;

struct KeySplit {
  int64_t num_splits = 1, split_keys = 0;
};

// The key split of a launch of `ctas` CTAs with `query_tiles` query tiles per (batch, head) over Lk keys on
// `sm_count` SMs: a call whose queries fit one tile (a decode step, a short chunk) and whose CTAs fill less
// than one wave gets up to two waves of CTAs by splitting its keys, none below kMinSplitKeys each. `forced`
// > 0 asks for that many splits instead (RELATTN_CUDA_SPLITS; 1 = never split), still in whole aligned
// chunks. The chunks depend on the shapes and the SM count only, so a call gives the same bits every time.
inline KeySplit plan_key_split(int64_t ctas, int64_t query_tiles, int64_t Lk, int64_t sm_count, int64_t forced = 0) {
  int64_t want = 1;
  if (forced > 0) {
    want = forced;
  } else if (query_tiles == 1 && ctas > 0 && ctas < sm_count) {
    want = (2 * sm_count + ctas - 1) / ctas;
    const int64_t by_keys = Lk / kMinSplitKeys;
    if (want > by_keys) want = by_keys;
  }
  if (want > kMaxSplits) want = kMaxSplits;
  if (want <= 1 || Lk <= kSplitKeyAlign) return {};
  const int64_t per = (Lk + want - 1) / want;
  const int64_t keys = (per + kSplitKeyAlign - 1) / kSplitKeyAlign * kSplitKeyAlign;
  const int64_t n = (Lk + keys - 1) / keys;
  if (n <= 1) return {};
  return {n, keys};
}

// ---- launchers (one explicit instantiation per dtype and head dim, in kernels/cuda/instantiations) ----
// `smem_bytes` is the dynamic shared memory of the launch (base + tables when they live there). They
// return the first error of the launch, if any.

template <typename T, int kHeadDim>
cudaError_t launch_forward_mma(const ForwardParams& p, int64_t smem_bytes, cudaStream_t stream);

template <typename T>
cudaError_t launch_forward_simt(const ForwardParams& p, int64_t smem_bytes, cudaStream_t stream);

// Merges the chunks of a split decode step (p.num_splits > 1) into out (T) and lse: lse = log Σ_s exp(lse_s),
// out = Σ_s exp(lse_s - lse) out_s, chunks in order; a row no chunk saw gets out = 0, lse = -inf. The partial
// results and lse are in simt_acc_t<T> (float for fp16/bf16, as the tensor-core kernel writes them).
template <typename T>
cudaError_t launch_combine_splits(const ForwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

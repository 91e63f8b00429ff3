// relattn CUDA backward: the host-side contract of the kernels (torch-free; csrc/cuda/attention_kernel.cpp
// fills BackwardParams, allocates the scratch and calls the two launchers of one kernel family in order).
//
// The math (kernels/params.h, SPEC §2), with P = exp(S - lse) recomputed from the forward's lse:
//   dP_ij = do_i·v_j + doa[i,β]            doa[i,r] = do_i·aV[r]
//   Δ_i   = Σ_j P_ij dP_ij - glse_i         (accumulated in fp32/fp64; the rounded `out` only centres dS)
//   dS_ij = P_ij (dP_ij - Δ_i)
//   dq_i  = scale (Σ_j dS_ij k_j + Σ_r dsb[i,r] aK[r])     dk_j = scale Σ_i dS_ij q_i     dv_j = Σ_i P_ij do_i
//   dsb[i,r] = Σ_{j:β=r} dS_ij   psb[i,r] = Σ_{j:β=r} P_ij   (left in ds_sum / p_sum for the tables)
//
// Two kernels, so that no two blocks ever write the same element (deterministic; no contended atomics: the
// only atomic instruction, red.global.add, adds to addresses no other thread touches before a barrier):
//   A  one CTA per (query tile, b, h): the row tables tab and doa (written to global scratch for B), then
//      the key tiles: tensor cores in one sweep (dS centred on Δ0 = do·out - glse, corrected by
//      (Δ - Δ0)·Σ P K at the end; backward_mma.cuh), SIMT in two (Δ and psb, then dS, dsb and dq).
//      Writes dq, delta, row_tab, row_doa, ds_sum, p_sum.
//   B  one CTA per (key tile, b, kv head): over the heads of the group and the query tiles that can see
//      the keys, Sᵀ = K Qᵀ and dPᵀ = V dOᵀ with the tables of A, then dv += Pᵀ dO and dk += dSᵀ Q in
//      registers. Writes dk, dv.
// The table gradients are GEMMs of ds_sum / p_sum done by the binding (table_grad_from_row_sums).
//
// Kernel families: tensor cores (fp16/bf16, padded head dims 32/64/96/128/256) and SIMT (float32/float64,
// fp16/bf16 when forced, any D, Dv <= 256).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "forward.h"

namespace relattn {
namespace kernels {
namespace cuda {

struct BackwardParams : AttentionBwdParams {
  // Rows of q/k/v/grad_out may be read with 16-byte cp.async (see ForwardParams).
  bool q_vec_ok = false;
  bool k_vec_ok = false;
  bool v_vec_ok = false;
  bool do_vec_ok = false;

  RELATTN_HOST_DEVICE bool has_tab() const { return rel_k != nullptr || rel_bias != nullptr; }
  RELATTN_HOST_DEVICE bool has_doa() const { return rel_v != nullptr; }
};

// ---- tensor-core backward ------------------------------------------------------------------------------

constexpr int kBwdMmaThreads = 128;  // 4 warps, 16 rows (A: query rows, B: keys) per warp (x kSplit below)
constexpr int kBwdMmaHeadDims[] = {32, 64, 96, 128, 256};
constexpr int kBwdMmaMaxHeadDim = 256;

template <int kHeadDim>
struct BwdMmaConfig {
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= kBwdMmaMaxHeadDim, "unsupported head dim");
  static constexpr int kLd = kHeadDim + 8;  // shared-memory row stride (elements), as the forward
  // Warps per 16 rows (A) or keys (B). At head dim 256 the accumulators of one warp's 16 rows (A: Σ dS0 K
  // and Σ P K, B: dk and dv; 2 x 16 x 256 fp32) do not fit its registers: two warps share the rows, each
  // accumulating half of the head dim's columns (kCols). Both compute the whole score tiles S and dP (over
  // all of the head dim, as the forward does, so the recomputed scores stay bit-identical to it); only the
  // first of the two writes the row results (bucket sums, Δ).
  static constexpr int kSplit = kHeadDim > 128 ? 2 : 1;
  static constexpr int kThreads = kBwdMmaThreads * kSplit;
  static constexpr int kCols = kHeadDim / kSplit;
  static_assert(kCols % 16 == 0, "accumulator columns come in pairs of n8 tiles");

  // Kernel A: a tile of kBlockM query rows, key tiles of kBlockN.
  static constexpr int kBlockM = 64;
  // 32 keys from head dim 64 on: the single sweep keeps dq and Σ P K (2 x 16 x kHeadDim fp32 per warp).
  static constexpr int kBlockN = kHeadDim <= 32 ? 64 : 32;
  static constexpr int kWinA = kBlockM + kBlockN;
  static constexpr int64_t kATileQ = int64_t(kBlockM) * kLd * 2;
  static constexpr int64_t kAStage = int64_t(kBlockN) * kLd * 2;
  static constexpr int64_t kAOffDo = kATileQ;
  static constexpr int64_t kAOffK = kAOffDo + kATileQ;        // K: 2 stages
  static constexpr int64_t kAOffV = kAOffK + 2 * kAStage;     // V: 2 stages
  static constexpr int64_t kAOffWin = kAOffV + 2 * kAStage;   // int32 [2][kWinA]
  static constexpr int64_t kAOffKpm = kAOffWin + 2 * kWinA * 4;  // uint8 [2][kBlockN]
  static constexpr int64_t kABytes = (kAOffKpm + 2 * kBlockN + 15) / 16 * 16;

  // Kernel B: a tile of kBlockKeys keys, query tiles of kBlockQ.
  static constexpr int kBlockKeys = 64;
  static constexpr int kBlockQ = kHeadDim <= 32 ? 64 : 32;
  static constexpr int kWinB = kBlockKeys + kBlockQ;
  static constexpr int64_t kBTileK = int64_t(kBlockKeys) * kLd * 2;
  static constexpr int64_t kBStage = int64_t(kBlockQ) * kLd * 2;
  static constexpr int64_t kBOffV = kBTileK;
  static constexpr int64_t kBOffQ = kBOffV + kBTileK;         // Q: 2 stages
  static constexpr int64_t kBOffDo = kBOffQ + 2 * kBStage;    // dO: 2 stages
  static constexpr int64_t kBOffLse = kBOffDo + 2 * kBStage;  // float [2][kBlockQ]: lse in log2 units
  static constexpr int64_t kBOffDelta = kBOffLse + 2 * kBlockQ * 4;  // float [2][kBlockQ]
  static constexpr int64_t kBOffFar = kBOffDelta + 2 * kBlockQ * 4;  // float [2][2][kBlockQ]: far tiles' table
                                                                     // column (log2 units) and doa column
  static constexpr int64_t kBOffWin = kBOffFar + 4 * kBlockQ * 4;    // int32 [2][kWinB]
  static constexpr int64_t kBOffKpm = kBOffWin + 2 * kWinB * 4;      // uint8 [kBlockKeys]
  static constexpr int64_t kBBytes = (kBOffKpm + kBlockKeys + 15) / 16 * 16;
};

// ---- SIMT backward ------------------------------------------------------------------------------------

constexpr int kBwdSimtThreads = 128;

// Pair-parallel kernels (backward_simt.cuh): A takes 16 query rows per CTA against key tiles of kTileN,
// B takes 16 keys per CTA against query tiles of kTileN; a thread owns (row or key t/8, columns t%8 + 8e).
template <typename acc_t>
struct BwdSimtConfig {
  static constexpr int kRowsA = kBwdSimtThreads / 8;
  static constexpr int kKeysB = kBwdSimtThreads / 8;
  static constexpr int kTileN = sizeof(acc_t) == 8 ? 16 : 32;
  static constexpr int kPerThread = kMaxHeadDim / 8;

  // acc_t elements; row strides D+1 / Dv+1 / n+1 keep a warp's rows on distinct banks.
  // A: sQ [16][D+1], sDo [16][Dv+1], sK [n][D+1], sV [n][Dv+1], sP, sX [16][n+1], lse, Δ [16].
  RELATTN_HOST_DEVICE static int64_t a_bytes(int64_t D, int64_t Dv) {
    const int64_t e = int64_t(kRowsA) * (D + 1 + Dv + 1) + int64_t(kTileN) * (D + 1 + Dv + 1) +
                      2 * kRowsA * (kTileN + 1) + 2 * kRowsA;
    return e * int64_t(sizeof(acc_t));
  }
  // B: sK [16][D+1], sV [16][Dv+1], sQ [n][D+1], sDo [n][Dv+1], sP, sS [n][17], lse, Δ [n].
  RELATTN_HOST_DEVICE static int64_t b_bytes(int64_t D, int64_t Dv) {
    const int64_t e = int64_t(kKeysB) * (D + 1 + Dv + 1) + int64_t(kTileN) * (D + 1 + Dv + 1) +
                      2 * kTileN * (kKeysB + 1) + 2 * kTileN;
    return e * int64_t(sizeof(acc_t));
  }
  RELATTN_HOST_DEVICE static int64_t smem_bytes(int64_t D, int64_t Dv) {
    return a_bytes(D, Dv) > b_bytes(D, Dv) ? a_bytes(D, Dv) : b_bytes(D, Dv);
  }
};

// ---- launchers (explicit instantiations in kernels/cuda/instantiations) ---------------------------------
// Each launches kernel A then kernel B on `stream` and returns the first error, if any.

template <typename T, int kHeadDim>
cudaError_t launch_backward_mma(const BackwardParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_backward_simt(const BackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

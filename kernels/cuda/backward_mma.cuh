// relattn backward on tensor cores (fp16 / bf16 inputs, fp32 accumulation). backward.h holds the math and
// the split into two kernels; this file reuses the forward's tile loaders and mma routines
// (forward_mma.cuh, mma_detail), so that the scores the backward recomputes are bit-identical to the
// forward's (same table GEMM, same order of the additions in log2 units).
//
// Kernel A (backward_mma_query_kernel): one CTA of 4 warps per (query tile of 64 rows, b, h); each warp
// owns 16 rows (head dim 256: see the end of this comment). Q and dO stay in shared memory; K/V tiles
// stream through two cp.async stages, once:
//   S = Q Kᵀ, dP = dO Vᵀ (+doa), P = 2^(S2 - lse2), dS0 = P∘(dP - Δ0)
//   -> Σ P∘dP, dsb0 += dS0 and psb += P by bucket, [dq0; pk] += [dS0; P] K (one GEMM of two m16 tiles)
// with the centre Δ0 = do·out - glse from the rounded `out`. At the end Δ = Σ P∘dP - glse exactly (fp32,
// kept for kernel B), c = Δ - Δ0, dq = dq0 - c·pk and dsb = dsb0 - c·psb: the result of dS = P∘(dP - Δ)
// without a second sweep (FlashAttention takes Δ = do·out and lives with the rounding of `out`; here it
// only centres dS0, so what rounds to fp16/bf16 on the way into the GEMM is ~dS, not P∘dP). A row with
// at most one key of P > 0 has dS = glse there exactly and takes that (0, not rounding noise, without an
// lse gradient). Then dq += dsb·aK and dq *= scale. Bucket sums go into this CTA's rows of the global
// scratch (ds_sum / p_sum; p_sum also without rel_v, for the correction): a row whose tile distances all
// lie beyond ±M adds its row sums to registers (one pair per far side, flushed after the sweep, so a warp
// whose rows are all far skips the memory); otherwise, by the table's layout: distinct ids (clip) with
// red.add at once, ids in runs (T5) with one red.add per run after a segmented scan over the quad
// (quad_run_sums), any other ids (and rel_index) by the 4 lanes holding a row in turn. Each way the
// order of the additions to an address is fixed: the sums are the same from run to run.
//
// Kernel B (backward_mma_key_kernel): one CTA per (key tile of 64, b, kv head); each warp owns 16 keys,
// with dk and dv accumulators in registers for the whole kernel. Over the heads of the group and the
// query tiles that can see the tile (causal skipping), Q/dO tiles stream through two cp.async stages
// (with their lse, Δ and, for a pair beyond ±M, the rows' table values of its one bucket):
//   Sᵀ = K Qᵀ, dPᵀ = V dOᵀ (+doa), Pᵀ, dSᵀ = Pᵀ∘(dPᵀ - Δ); dv += Pᵀ dO, dk += dSᵀ Q (P and dS go from the
// accumulators straight into A fragments, as P does in the forward).
//
// Head dim 256 (BwdMmaConfig::kSplit = 2): 8 warps, warps w and w + 4 own the same 16 rows (A) or keys (B)
// and each accumulates half of the columns (dq / Σ P K in A, dk / dv in B); both compute the whole S and dP
// tiles (1.5x the tensor-core work of a split without that duplication, which would have to exchange
// partial scores through shared memory), and only warp w writes the row tables, bucket sums and Δ.
#pragma once

#include <cmath>
#include <cstdint>

#include "backward.h"
#include "device_utils.cuh"
#include "forward_mma.cuh"

namespace relattn {
namespace kernels {
namespace cuda {
namespace bwd_detail {

// A 16 x kCols fp32 accumulator (one m16 tile per warp), times `mul`, into the warp's 16 rows (and its
// columns) of a shared tile of row stride kLd.
template <typename T, int kCols, int kLd>
RELATTN_DEVICE void stage_acc(T* s_warp, const float (&acc)[1][kCols / 8][4], float mul, int lane) {
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf)
#pragma unroll
    for (int dt = 0; dt < kCols / 8; ++dt)
      *reinterpret_cast<uint32_t*>(s_warp + (g + hf * 8) * kLd + dt * 8 + 2 * tq) =
          TypeInfo<T>::pack(acc[0][dt][hf * 2] * mul, acc[0][dt][hf * 2 + 1] * mul);
}

// Score-tile values (kNT n8 tiles of one m16 tile) as A fragments of the next GEMM, in T.
template <typename T, int kNT>
RELATTN_DEVICE void pack_a(uint32_t (&pa)[kNT / 2][4], const float (&acc)[kNT][4]) {
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {
    pa[kk][0] = TypeInfo<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
    pa[kk][1] = TypeInfo<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
    pa[kk][2] = TypeInfo<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    pa[kk][3] = TypeInfo<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

}  // namespace bwd_detail

// kDropout: two sweeps over the key tiles. The first only sums Σ P∘(z dP) for the exact Δ; the second
// then centres dS0 on that Δ, so no correction is left to make (c = 0) and the P bucket sums can be those of
// the dropped weights z·P, which d aV needs (the correction would need the undropped ones: a third channel).
// kSegments (the dropout instance has it too): segment ids, tile ranges and the per-pair test; without
// dropout, one sweep as in the plain instance.
template <typename T, int kHeadDim, bool kDropout = false, bool kSegments = kDropout>
__global__ void __launch_bounds__(BwdMmaConfig<kHeadDim>::kThreads)
    backward_mma_query_kernel(const __grid_constant__ BackwardParams p) {
  static_assert(!kDropout || kSegments, "the dropout instance runs segments too");
  using namespace mma_detail;
  using namespace bwd_detail;
  using Cfg = BwdMmaConfig<kHeadDim>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int LD = Cfg::kLd;
  constexpr int kWin = Cfg::kWinA;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kNT = BN / 8;
  constexpr int kCols = Cfg::kCols;  // accumulator columns of this warp
  constexpr int kDT = kCols / 8;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDo = reinterpret_cast<T*>(smem + Cfg::kAOffDo);
  T* sK = reinterpret_cast<T*>(smem + Cfg::kAOffK);
  T* sV = reinterpret_cast<T*>(smem + Cfg::kAOffV);
  int32_t* sWin = reinterpret_cast<int32_t*>(smem + Cfg::kAOffWin);
  uint8_t* sKpm = smem + Cfg::kAOffKpm;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int warp_row0 = (warp & 3) * 16;
  // Head dim 256: warps w and w + 4 share rows; wc picks the accumulator columns, the first writes the rows.
  const int wc = Cfg::kSplit == 1 ? 0 : warp >> 2;
  const bool primary = wc == 0;

  const int64_t slot = blockIdx.x;
  QueryTile tile = query_tile<BM>(p, slot);
  if constexpr (kSegments) clip_to_segments(p, tile);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, kv_head = tile.kv_head, i0 = tile.i0, q_off = tile.q_off;
  const int rows = tile.rows;
  const int D = static_cast<int>(p.D);
  const int Dv = static_cast<int>(p.Dv);
  const int64_t R = p.R;
  const int64_t M = p.max_distance;
  const bool use_window = p.buckets != nullptr;
  const bool use_index = p.rel_index != nullptr;
  const bool distinct = use_window && p.buckets_distinct;
  const bool runs = use_window && p.buckets_runs;
  const bool has_tab = p.has_tab();
  const bool has_doa = p.has_doa();
  const int64_t row0 = bh * p.Lq + i0;  // first row of the tile in [B, H, Lq]

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  const T* dog = static_cast<const T*>(p.grad_out) + b * p.grad_out_stride[0] + h * p.grad_out_stride[1] +
                 i0 * p.grad_out_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1];
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] : nullptr;
  float* tab_g = has_tab ? static_cast<float*>(p.row_tab) + row0 * R : nullptr;
  float* doa_g = has_doa ? static_cast<float*>(p.row_doa) + row0 * R : nullptr;
  float* dsb_g = has_tab ? static_cast<float*>(p.ds_sum) + row0 * R : nullptr;
  float* psb_g = has_tab || has_doa ? static_cast<float*>(p.p_sum) + row0 * R : nullptr;  // see the header

  const int64_t j_end = tile.key_end;
  const int64_t n_tiles = (j_end + BN - 1) / BN;
  const int64_t t_first = kSegments ? tile.key_begin / BN : 0;  // the first key tile (segments)

  auto issue_tile = [&](int64_t t, int stage) {
    stage_key_tile<T, BM, BN, kHeadDim, kThreads>(p, sK + stage * BN * LD, sV + stage * BN * LD, sKpm + stage * BN,
                                                  sWin + stage * kWin, kg, vg, kpm, i0, q_off, t * BN, tid);
  };

  load_tile<T, BM, kHeadDim, kThreads>(sQ, qg, p.q_stride[2], rows, D, p.q_vec_ok, tid);
  load_tile<T, BM, kHeadDim, kThreads>(sDo, dog, p.grad_out_stride[2], rows, Dv, p.do_vec_ok, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const float scale = static_cast<float>(p.scale);
  float acc_s[1][kNT][4];
  float acc_dp[1][kNT][4];

  // Row tables (natural units, as the CPU kernel keeps them): tab = scale*Q aKᵀ + bias, doa = dO aVᵀ.
  // Computed exactly as the forward computes its tab (same GEMM on T-rounded aK, same additions).
  if (has_tab) {
    const float* rk = p.rel_k ? static_cast<const float*>(p.rel_k) + h * p.rel_k_head_stride : nullptr;
    const float* bias = p.rel_bias ? static_cast<const float*>(p.rel_bias) + h * R : nullptr;
    for (int64_t r0 = 0; r0 < R; r0 += BN) {
      if (rk) {
        load_table_tile<T, BN, kHeadDim, kThreads>(sK, rk, r0, R, D, tid);
        __syncthreads();
        if (primary) gemm_qk<T, kHeadDim, 1, kNT>(acc_s, sQ + warp_row0 * LD, sK, lane);
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = warp_row0 + g + (e >> 1) * 8;
          const int64_t r = r0 + nt * 8 + 2 * tq + (e & 1);
          if (primary && r < R && row < rows) {
            float v = rk ? acc_s[0][nt][e] * scale : 0.f;
            if (bias) v += bias[r];
            tab_g[row * R + r] = v;
          }
        }
      __syncthreads();
    }
  }
  if (has_doa) {
    const float* rv = static_cast<const float*>(p.rel_v) + h * p.rel_v_head_stride;
    for (int64_t r0 = 0; r0 < R; r0 += BN) {
      load_table_tile<T, BN, kHeadDim, kThreads>(sV, rv, r0, R, Dv, tid);
      __syncthreads();
      if (primary) gemm_qk<T, kHeadDim, 1, kNT>(acc_dp, sDo + warp_row0 * LD, sV, lane);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = warp_row0 + g + (e >> 1) * 8;
          const int64_t r = r0 + nt * 8 + 2 * tq + (e & 1);
          if (primary && r < R && row < rows) doa_g[row * R + r] = acc_dp[0][nt][e];
        }
      __syncthreads();
    }
  }

  const float scale_log2 = scale * kLog2e;
  const float slope_log2 = p.alibi_slopes ? static_cast<const float*>(p.alibi_slopes)[h] * kLog2e : 0.f;
  const int32_t bucket_first = use_window ? clamp_id(p.buckets[0], p.id_max) : 0;
  const int32_t bucket_last = use_window ? clamp_id(p.buckets[2 * M], p.id_max) : 0;
  const float* lse_g = static_cast<const float*>(p.lse) + row0;
  const float* glse_g = p.grad_lse ? static_cast<const float*>(p.grad_lse) + row0 : nullptr;
  const T* out_g = p.out ? static_cast<const T*>(p.out) + row0 * int64_t(Dv) : nullptr;

  // Per row (this thread's rows g and g+8): lse in log2 units, +inf for rows that saw no key (and padding
  // rows) so that P = 2^(s - lse2) = 0; the centre Δ0 = do·out - glse from the rounded `out`; Σ P∘dP and
  // a count of the keys with P > 0 (saturating at 2).
  float lse2[2], glse[2], delta0[2], rowacc[2] = {0.f, 0.f}, seen[2] = {0.f, 0.f};
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = warp_row0 + g + hf * 8;
    const bool row_ok = row < rows;
    const float L = row_ok ? lse_g[row] : kNegInf;
    lse2[hf] = L == kNegInf ? INFINITY : L * kLog2e;
    glse[hf] = glse_g && row_ok ? glse_g[row] : 0.f;
    float d0 = 0.f;
    if (!kDropout && out_g && row_ok)  // (dropout: the first sweep finds Δ exactly)
      for (int c = tq; c < Dv; c += 4)
        d0 += TypeInfo<T>::to_float(sDo[row * LD + c]) * TypeInfo<T>::to_float(out_g[row * int64_t(Dv) + c]);
    delta0[hf] = quad_sum(d0) - glse[hf];  // every lane shuffles
  }

  // acc_x[0] = Σ dS0 K (then dq), acc_x[1] = Σ P K: one GEMM of two m16 tiles shares the K fragments.
  float acc_x[2][kDT][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_x[m][dt][e] = 0.f;
  auto& acc_dq = *reinterpret_cast<float(*)[1][kDT][4]>(&acc_x[0]);
  // Bucket sums of the far tiles (a row's distances all <= -M: [0], all >= M: [1]), this lane's part, in
  // registers until the end: such a tile adds nothing to memory.
  float dsb_far[2][2] = {{0.f, 0.f}, {0.f, 0.f}}, psb_far[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  // One sweep over the key tiles (with dropout, pass 0 first: only Σ P∘(z dP)).
  auto sweep = [&](const int pass) {
  if (t_first < n_tiles) issue_tile(t_first, 0);
  cp_async_commit();
  for (int64_t t = t_first; t < n_tiles; ++t) {
    const int stage = static_cast<int>((t - t_first) & 1);
    if (t + 1 < n_tiles) issue_tile(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int64_t j0 = t * BN;
    gemm_qk<T, kHeadDim, 1, kNT>(acc_s, sQ + warp_row0 * LD, sK + stage * BN * LD, lane);
    gemm_qk<T, kHeadDim, 1, kNT>(acc_dp, sDo + warp_row0 * LD, sV + stage * BN * LD, lane);

    // acc_s <- dS0 = P∘(dP - Δ0), acc_dp <- P.
    int row_far[2];  // 1: the row's distances in this tile are all <= -M, 2: all >= M, 0: neither
    // Segments: a per-pair test unless the tile lies inside the segment of each of the warp's rows (warp-uniform).
    const int warp_rows = rows - warp_row0 < 16 ? rows - warp_row0 : 16;
    const bool seg_test = kSegments && warp_rows > 0 &&
                          segment_test_needed(p, b, i0 + warp_row0, warp_rows, j0, p.Lk - j0 < BN ? int(p.Lk - j0) : BN);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + g + hf * 8;
      const bool row_ok = row < rows;
      const int32_t row_seg = seg_test && row_ok ? q_segment(p, b, i0 + row) : 0;
      const int64_t pos = i0 + row + q_off;
      const int64_t dj = j0 - pos;
      // (far_side(dj, dj + BN - 1, M) spelled out: that form keeps this kernel out of spills at hd 96/128)
      int rb = -1;
      row_far[hf] = 0;
      if (use_window) {
        if (dj + BN - 1 <= -M) rb = bucket_first, row_far[hf] = 1;
        else if (dj >= M) rb = bucket_last, row_far[hf] = 2;
      }
      int64_t lim = p.Lk - j0;
      if (p.causal && 1 - dj < lim) lim = 1 - dj;
      const int col_lim = static_cast<int>(lim < 0 ? 0 : (lim > BN ? BN : lim));
      const float tab_row = (has_tab && rb >= 0 && row_ok) ? tab_g[row * R + rb] * kLog2e : 0.f;
      const float doa_row = (has_doa && rb >= 0 && row_ok) ? doa_g[row * R + rb] : 0.f;
      const int32_t* ri_row = rel_index_row(p, use_index && row_ok, b, i0 + row, j0);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int c = nt * 8 + 2 * tq + e1;
          const int e = hf * 2 + e1;
          int beta = 0;
          if (rb < 0) {
            if (use_window) beta = sWin[stage * kWin + c - row + BM - 1];
            else if (ri_row && c < col_lim) beta = clamp_id(ri_row[c * p.rel_index_stride[2]], p.id_max);
          }
          float s = acc_s[0][nt][e] * scale_log2;
          if (has_tab && row_ok) s += rb >= 0 ? tab_row : tab_g[row * R + beta] * kLog2e;
          if (slope_log2 != 0.f) s -= slope_log2 * fabsf(static_cast<float>(dj + c));
          const bool masked = c >= col_lim || (kpm && sKpm[stage * BN + c]) ||
                              (seg_test && k_segment(p, b, j0 + c) != row_seg);
          const float pv = masked ? 0.f : exp2_ftz(s - lse2[hf]);
          float dp = acc_dp[0][nt][e];
          if (has_doa && row_ok) dp += rb >= 0 ? doa_row : doa_g[row * R + beta];
          if constexpr (kDropout) {
            acc_s[0][nt][e] = pv * dp;  // z, Σ and Δ below
          } else {
            rowacc[hf] += pv * dp;
            seen[hf] = fminf(seen[hf] + (pv != 0.f ? 1.f : 0.f), 2.f);
            acc_s[0][nt][e] = pv * (dp - delta0[hf]);
          }
          acc_dp[0][nt][e] = pv;
        }
    }
    if constexpr (kDropout) {
      // P∘(z dP) into Σ; dS0 = P∘(z dP) - P Δ0 (Δ0 exact in the second sweep); the P sums take z·P.
      uint32_t k0, k1;
      dropout_key(*p.dropout_seed, k0, k1);
      for_dropout_factors<1, kNT>(p, k0, k1, b, h, i0 + warp_row0, j0, g, tq, [&](int, int nt, int e, float z) {
        const float tz = acc_s[0][nt][e] * z;
        rowacc[e >> 1] += tz;
        acc_s[0][nt][e] = tz - acc_dp[0][nt][e] * delta0[e >> 1];
        acc_dp[0][nt][e] *= z;
      });
      if (pass == 0) {
        __syncthreads();  // this stage is refilled two iterations on
        continue;
      }
    }

    // Bucket sums of dS0 (for dq's key term, d rel_k, d rel_bias) and of P (for d rel_v, and for the
    // correction of the dS0 sums at the end): far rows into registers; rows with several buckets in this
    // tile straight into this CTA's rows of the global scratch. (The first warp of a pair sharing rows.)
    if (psb_g != nullptr && primary) {
      bool any_window = false;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float part_ds = 0.f, part_p = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          part_ds += acc_s[0][nt][hf * 2] + acc_s[0][nt][hf * 2 + 1];
          part_p += acc_dp[0][nt][hf * 2] + acc_dp[0][nt][hf * 2 + 1];
        }
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          dsb_far[hf][x] += row_far[hf] == x + 1 ? part_ds : 0.f;
          psb_far[hf][x] += row_far[hf] == x + 1 ? part_p : 0.f;
        }
        any_window |= row_far[hf] == 0 && warp_row0 + g + hf * 8 < rows;
      }
      if (__any_sync(0xffffffffu, any_window)) {
        if (distinct) {
          // Every key of a window row has its own distance: those beyond ±M go to the far registers, the
          // others have buckets of their own, added without waiting (red.add: one addition per address in
          // this tile, so the result is deterministic) by the quad's lanes at once.
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int row = warp_row0 + g + hf * 8;
            if (row_far[hf] != 0 || row >= rows) continue;
            const int64_t dj = j0 - (i0 + row + q_off);
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
              for (int e1 = 0; e1 < 2; ++e1) {
                const int c = nt * 8 + 2 * tq + e1;
                const float pv = acc_dp[0][nt][hf * 2 + e1];
                const float ds = acc_s[0][nt][hf * 2 + e1];
                const int side = far_side(dj + c, dj + c, M);
                dsb_far[hf][0] += side == 1 ? ds : 0.f;
                psb_far[hf][0] += side == 1 ? pv : 0.f;
                dsb_far[hf][1] += side == 2 ? ds : 0.f;
                psb_far[hf][1] += side == 2 ? pv : 0.f;
                // (dropout: pv is z·P; a dropped pair still has dS = -P Δ)
                if ((kDropout ? pv != 0.f || ds != 0.f : pv != 0.f) && side == 0) {
                  const int64_t at = row * R + sWin[stage * kWin + c - row + BM - 1];
                  if (dsb_g) red_add_global(dsb_g + at, ds);
                  red_add_global(psb_g + at, pv);
                }
              }
          }
        } else if (runs) {
          // Each bucket's keys are consecutive in a row (T5): the quad sums every run with a segmented scan
          // and the lane holding its last key adds it with red.add, one addition per address in this tile.
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int row = warp_row0 + g + hf * 8;
            const bool active = row_far[hf] == 0 && row < rows;
            const int win = stage * kWin - row + BM - 1;
            // One channel at a time (fewer live registers); a zero sum adds nothing.
            if (dsb_g)
              quad_run_sums<kNT>(
                  tq, [&](int nt, int e1) { return acc_s[0][nt][hf * 2 + e1]; },
                  [&](int c) { return sWin[win + c]; },
                  [&](int beta, float sum) {
                    if (active && sum != 0.f) red_add_global(dsb_g + row * R + beta, sum);
                  });
            quad_run_sums<kNT>(
                tq, [&](int nt, int e1) { return acc_dp[0][nt][hf * 2 + e1]; },
                [&](int c) { return sWin[win + c]; },
                [&](int beta, float sum) {
                  if (active && sum != 0.f) red_add_global(psb_g + row * R + beta, sum);
                });
          }
        } else {
          // Keys of a row may share a bucket: the quad's lanes take turns, each adding its keys with red.add
          // without waiting. Additions to one address stay in a fixed order — a lane's in program order, the
          // turns separated by __syncwarp (which orders memory among the warp's lanes) — so the sums are
          // the same from run to run, without a chain of dependent read-modify-writes.
          for (int turn = 0; turn < 4; ++turn) {
            if (tq == turn) {
#pragma unroll
              for (int hf = 0; hf < 2; ++hf) {
                const int row = warp_row0 + g + hf * 8;
                if (row_far[hf] != 0 || row >= rows) continue;
                const int32_t* ri_row = rel_index_row(p, use_index, b, i0 + row, j0);
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                  for (int e1 = 0; e1 < 2; ++e1) {
                    const float pv = acc_dp[0][nt][hf * 2 + e1];
                    // masked keys (p = 0, dS0 = 0) may have no valid id (dropout: pv is z·P, and a dropped
                    // pair still has dS = -P Δ)
                    if (kDropout ? pv == 0.f && acc_s[0][nt][hf * 2 + e1] == 0.f : pv == 0.f) continue;
                    const int c = nt * 8 + 2 * tq + e1;
                    const int beta = use_window ? sWin[stage * kWin + c - row + BM - 1]
                                                : clamp_id(ri_row[c * p.rel_index_stride[2]], p.id_max);
                    if (dsb_g) red_add_global(dsb_g + row * R + beta, acc_s[0][nt][hf * 2 + e1]);
                    red_add_global(psb_g + row * R + beta, pv);
                  }
              }
            }
            __syncwarp();
          }
        }
      }
    }

    if constexpr (kDropout) {
      // acc_dq += dS K: Σ P K only serves the correction, which the exact Δ makes 0
      uint32_t pa[1][BN / 16][4];
      pack_a<T, kNT>(pa[0], acc_s[0]);
      gemm_pv<T, kCols, 1, BN / 16, LD>(acc_dq, pa, sK + stage * BN * LD + wc * kCols, lane);
    } else {
      // acc_x += [dS0; P] K (this warp's columns of K)
      uint32_t pa[2][BN / 16][4];
      pack_a<T, kNT>(pa[0], acc_s[0]);
      pack_a<T, kNT>(pa[1], acc_dp[0]);
      gemm_pv<T, kCols, 2, BN / 16, LD>(acc_x, pa, sK + stage * BN * LD + wc * kCols, lane);
    }
    __syncthreads();  // this stage is refilled two iterations on
  }
  cp_async_wait<0>();
  __syncthreads();
  };
  if constexpr (kDropout) {
    sweep(0);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {  // the exact Δ = Σ P∘(z dP) - glse centres the second sweep
      delta0[hf] = quad_sum(rowacc[hf]) - glse[hf];  // every lane shuffles
      rowacc[hf] = 0.f;
    }
  }
  sweep(1);

  // The far tiles' bucket sums join the rest.
  if (psb_g != nullptr && use_window && primary) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + g + hf * 8;
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const float ds = quad_sum(dsb_far[hf][x]);  // every lane shuffles
        const float pp = quad_sum(psb_far[hf][x]);
        if (tq == 0 && row < rows) {
          const int64_t at = row * R + (x ? bucket_last : bucket_first);
          if (dsb_g) dsb_g[at] += ds;
          psb_g[at] += pp;
        }
      }
    }
    __syncwarp();
  }

  // Δ = Σ P∘dP - glse (kept for kernel B) and the correction c = Δ - Δ0:
  //   dq = Σ dS0 K - c Σ P K,   dsb = Σ_β dS0 - c Σ_β P.
  // A row with at most one key of P > 0 has dS = glse on that key exactly (0 without an lse gradient);
  // it takes that value rather than the general formula's rounding noise.
  float keep[2], corr[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = warp_row0 + g + hf * 8;
    const float d = quad_sum(rowacc[hf]) - glse[hf];
    const bool several = quad_sum(seen[hf]) > 1.5f;
    keep[hf] = several || kDropout ? 1.f : 0.f;
    corr[hf] = kDropout ? 0.f : (several ? d - delta0[hf] : -glse[hf]);  // dropout: dS0 was centred on Δ
    if (primary && tq == 0 && row < rows) static_cast<float*>(p.delta)[row0 + row] = d;
  }
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_x[0][dt][e] = keep[e >> 1] * acc_x[0][dt][e] - corr[e >> 1] * acc_x[1][dt][e];
  if (dsb_g && primary) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + g + hf * 8;
      if (row >= rows) continue;
      for (int64_t r = tq; r < R; r += 4)
        dsb_g[row * R + r] = keep[hf] * dsb_g[row * R + r] - corr[hf] * psb_g[row * R + r];
    }
  }
  __syncwarp();  // bucket sums written by the other lanes of this warp (the pair's other warp reads them
                 // after the __syncthreads below)

  // dq += dsb · aK (the row sums of dS as A fragments, aK rows through K stage 0), then dq *= scale.
  if (p.rel_k) {
    const float* rk = static_cast<const float*>(p.rel_k) + h * p.rel_k_head_stride;
    for (int64_t r0 = 0; r0 < R; r0 += BN) {
      load_table_tile<T, BN, kHeadDim, kThreads>(sK, rk, r0, R, D, tid);
      __syncthreads();
      uint32_t pa[1][BN / 16][4];
      const int ra = warp_row0 + g, rb8 = ra + 8;
      auto at = [&](int row, int64_t kx) { return (kx < R && row < rows) ? dsb_g[row * R + kx] : 0.f; };
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const int64_t k = r0 + kk * 16 + 2 * tq;
        pa[0][kk][0] = TypeInfo<T>::pack(at(ra, k), at(ra, k + 1));
        pa[0][kk][1] = TypeInfo<T>::pack(at(rb8, k), at(rb8, k + 1));
        pa[0][kk][2] = TypeInfo<T>::pack(at(ra, k + 8), at(ra, k + 9));
        pa[0][kk][3] = TypeInfo<T>::pack(at(rb8, k + 8), at(rb8, k + 9));
      }
      gemm_pv<T, kCols, 1, BN / 16, LD>(acc_dq, pa, sK + wc * kCols, lane);
      __syncthreads();
    }
  }

  // dq through shared memory (Q's space) to whole-row stores.
  stage_acc<T, kCols, LD>(sQ + warp_row0 * LD + wc * kCols, acc_dq, scale, lane);
  __syncthreads();
  store_tile<T, BM, kHeadDim, kThreads>(static_cast<T*>(p.dq) + row0 * int64_t(D), D, sQ, rows, D, tid);
}

// kDropout: dPᵀ is the dropped weights' gradient z·dPᵀ, dSᵀ = Pᵀ(z dPᵀ - Δ) and dv takes z·Pᵀ (z drawn on the
// fragments after the elements: dSᵀ = z (Pᵀ∘dPᵀ) - Pᵀ Δ). kSegments (the dropout instance has it too): the
// query-tile range of the keys' segments and the per-pair test.
template <typename T, int kHeadDim, bool kDropout = false, bool kSegments = kDropout>
__global__ void __launch_bounds__(BwdMmaConfig<kHeadDim>::kThreads)
    backward_mma_key_kernel(const __grid_constant__ BackwardParams p) {
  static_assert(!kDropout || kSegments, "the dropout instance runs segments too");
  using namespace mma_detail;
  using namespace bwd_detail;
  using Cfg = BwdMmaConfig<kHeadDim>;
  constexpr int BK = Cfg::kBlockKeys;
  constexpr int BQ = Cfg::kBlockQ;
  constexpr int LD = Cfg::kLd;
  constexpr int kWin = Cfg::kWinB;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kNT = BQ / 8;
  constexpr int kCols = Cfg::kCols;  // accumulator columns of this warp
  constexpr int kDT = kCols / 8;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + Cfg::kBOffV);
  T* sQ = reinterpret_cast<T*>(smem + Cfg::kBOffQ);
  T* sDo = reinterpret_cast<T*>(smem + Cfg::kBOffDo);
  float* sLse = reinterpret_cast<float*>(smem + Cfg::kBOffLse);
  float* sDelta = reinterpret_cast<float*>(smem + Cfg::kBOffDelta);
  float* sFar = reinterpret_cast<float*>(smem + Cfg::kBOffFar);
  int32_t* sWin = reinterpret_cast<int32_t*>(smem + Cfg::kBOffWin);
  uint8_t* sKpm = smem + Cfg::kBOffKpm;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int warp_key0 = (warp & 3) * 16;
  const int wc = Cfg::kSplit == 1 ? 0 : warp >> 2;  // head dim 256: warps w and w + 4 share keys (backward.h)

  const int64_t nkb = (p.Lk + BK - 1) / BK;
  const int64_t slot = blockIdx.x;
  const int64_t kb = slot % nkb;  // causal: the first key tiles have the most query tiles, and go first
  const int64_t bg = slot / nkb;
  const int64_t b = bg / p.Hk;
  const int64_t q_off = p.batch_q_offset(b);
  const int64_t kv_head = bg % p.Hk;
  const int64_t group = p.H / p.Hk;
  const int64_t j0 = kb * BK;
  const int keys = static_cast<int>(p.Lk - j0 < BK ? p.Lk - j0 : BK);
  const int D = static_cast<int>(p.D);
  const int Dv = static_cast<int>(p.Dv);
  const int64_t R = p.R;
  const int64_t M = p.max_distance;
  const bool use_window = p.buckets != nullptr;
  const bool use_index = p.rel_index != nullptr;
  const bool has_tab = p.has_tab();
  const bool has_doa = p.has_doa();

  int64_t i_first, i_end;  // the query rows that can see a key of this tile
  key_tile_queries<kSegments>(p, b, j0, keys, i_first, i_end);
  const int64_t nq = (i_end + BQ - 1) / BQ;  // one past the last query tile that can see the keys
  const int64_t qt_first = i_first >= i_end ? nq : i_first / BQ;
  const int64_t n_vis = nq - qt_first;
  const int64_t n_iter = group * n_vis;

  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1] + j0 * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1] + j0 * p.v_stride[2];
  load_tile<T, BK, kHeadDim, kThreads>(sK, kg, p.k_stride[2], keys, D, p.k_vec_ok, tid);
  load_tile<T, BK, kHeadDim, kThreads>(sV, vg, p.v_stride[2], keys, Dv, p.v_vec_ok, tid);
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] : nullptr;
  for (int c = tid; c < BK; c += kThreads)
    sKpm[c] = c < keys ? (kpm ? kpm[(j0 + c) * p.key_padding_mask_stride[1]] != 0 : 0) : 1;
  cp_async_commit();

  const int32_t bucket_first = use_window ? clamp_id(p.buckets[0], p.id_max) : 0;
  const int32_t bucket_last = use_window ? clamp_id(p.buckets[2 * M], p.id_max) : 0;
  // A (key tile, query tile) pair whose distances all lie beyond ±M on one side has one bucket; -1 if not.
  auto far_bucket = [&](int64_t i0) -> int {
    if (!use_window) return -1;
    const int side = far_side(j0 - (i0 + BQ - 1 + q_off), (j0 + BK - 1) - (i0 + q_off), M);
    return side == 1 ? bucket_first : (side == 2 ? bucket_last : -1);
  };

  auto issue_iter = [&](int64_t it, int stage) {
    const int64_t h = kv_head * group + it / n_vis;
    const int64_t i0 = (qt_first + it % n_vis) * BQ;
    const int rows = static_cast<int>(p.Lq - i0 < BQ ? p.Lq - i0 : BQ);
    const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
    const T* dog = static_cast<const T*>(p.grad_out) + b * p.grad_out_stride[0] + h * p.grad_out_stride[1] +
                   i0 * p.grad_out_stride[2];
    load_tile<T, BQ, kHeadDim, kThreads>(sQ + stage * BQ * LD, qg, p.q_stride[2], rows, D, p.q_vec_ok, tid);
    load_tile<T, BQ, kHeadDim, kThreads>(sDo + stage * BQ * LD, dog, p.grad_out_stride[2], rows, Dv, p.do_vec_ok,
                                         tid);
    const int64_t r0 = (b * p.H + h) * p.Lq + i0;
    // Per query row: lse (log2 units), Δ, and for a far pair the row's table values of its one bucket, so
    // that the compute reads them from shared memory rather than every lane gathering them.
    const int tb = far_bucket(i0);
    for (int c = tid; c < BQ; c += kThreads) {
      const float L = c < rows ? static_cast<const float*>(p.lse)[r0 + c] : kNegInf;
      sLse[stage * BQ + c] = L == kNegInf ? INFINITY : L * kLog2e;
      sDelta[stage * BQ + c] = c < rows ? static_cast<const float*>(p.delta)[r0 + c] : 0.f;
      if (tb >= 0) {
        sFar[(stage * 2) * BQ + c] =
            has_tab && c < rows ? static_cast<const float*>(p.row_tab)[(r0 + c) * R + tb] * kLog2e : 0.f;
        sFar[(stage * 2 + 1) * BQ + c] =
            has_doa && c < rows ? static_cast<const float*>(p.row_doa)[(r0 + c) * R + tb] : 0.f;
      }
    }
    if (use_window) {
      // entry w holds the bucket of key row kr and query column c with w = kr - c + BQ - 1
      const int64_t d0 = j0 - i0 - q_off - (BQ - 1);
      for (int w = tid; w < BK + BQ - 1; w += kThreads) {
        int64_t d = d0 + w;
        d = d < -M ? -M : (d > M ? M : d);
        sWin[stage * kWin + w] = clamp_id(p.buckets[d + M], p.id_max);
      }
    }
  };

  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = scale * kLog2e;

  float acc_dk[1][kDT][4], acc_dv[1][kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[0][dt][e] = 0.f;
      acc_dv[0][dt][e] = 0.f;
    }
  float acc_s[1][kNT][4];
  float acc_dp[1][kNT][4];

  if (n_iter > 0) issue_iter(0, 0);
  cp_async_commit();
  for (int64_t it = 0; it < n_iter; ++it) {
    const int stage = static_cast<int>(it & 1);
    if (it + 1 < n_iter) issue_iter(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int64_t h = kv_head * group + it / n_vis;
    const int64_t i0 = (qt_first + it % n_vis) * BQ;
    const int rows = static_cast<int>(p.Lq - i0 < BQ ? p.Lq - i0 : BQ);
    const int64_t r0 = (b * p.H + h) * p.Lq + i0;
    const float* tab_g = has_tab ? static_cast<const float*>(p.row_tab) + r0 * R : nullptr;
    const float* doa_g = has_doa ? static_cast<const float*>(p.row_doa) + r0 * R : nullptr;
    const float slope_log2 = p.alibi_slopes ? static_cast<const float*>(p.alibi_slopes)[h] * kLog2e : 0.f;

    gemm_qk<T, kHeadDim, 1, kNT>(acc_s, sK + warp_key0 * LD, sQ + stage * BQ * LD, lane);
    gemm_qk<T, kHeadDim, 1, kNT>(acc_dp, sV + warp_key0 * LD, sDo + stage * BQ * LD, lane);

    // A far pair (one bucket): its table values are the column staged with the query tile.
    const int tb = far_bucket(i0);
    const float* tcol = sFar + (stage * 2) * BQ;
    const float* dcol = sFar + (stage * 2 + 1) * BQ;

    // Segments: a per-pair test unless the query tile lies inside the segment of every key of the tile.
    const bool seg_test = kSegments && segment_test_needed(p, b, i0, rows, j0, keys);
    const int32_t* q_seg = seg_test ? p.q_segment_ids + b * p.q_segment_stride + i0 : nullptr;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int kr = warp_key0 + g + hf * 8;
      const bool key_ok = sKpm[kr] == 0;  // inside Lk and not padding
      const int32_t key_seg = q_seg != nullptr && key_ok ? k_segment(p, b, j0 + kr) : 0;
      const int64_t dk0 = j0 + kr - (i0 + q_off);  // distance to query column 0
      // causal: the key is after query column c's position (d = dk0 - c > 0) for the columns c < c_vis
      const int c_vis = p.causal ? static_cast<int>(dk0 < 0 ? 0 : (dk0 > BQ ? BQ : dk0)) : 0;
      // P and dS of one element, given its table values in log2 units (tv) and natural units (dv).
      auto element = [&](int nt, int e1, float tv, float dv) {
        const int c = nt * 8 + 2 * tq + e1;
        const int e = hf * 2 + e1;
        const bool col_ok = c < rows;
        float s = acc_s[0][nt][e] * scale_log2;
        if (has_tab && col_ok) s += tv;
        if (slope_log2 != 0.f) s -= slope_log2 * fabsf(static_cast<float>(dk0 - c));
        const bool masked = !key_ok || !col_ok || c < c_vis || (q_seg != nullptr && q_seg[c] != key_seg);
        const float pv = masked ? 0.f : exp2_ftz(s - sLse[stage * BQ + c]);
        float dp = acc_dp[0][nt][e];
        if (has_doa && col_ok) dp += dv;
        acc_s[0][nt][e] = pv;
        if constexpr (kDropout)
          acc_dp[0][nt][e] = pv * dp;  // Δ and z below
        else
          acc_dp[0][nt][e] = pv * (dp - sDelta[stage * BQ + c]);
      };
      if (tb >= 0 || !(has_tab || has_doa)) {  // a far pair: one bucket, its column staged (or no tables)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1) {
            const int c = nt * 8 + 2 * tq + e1;
            element(nt, e1, tb >= 0 ? tcol[c] : 0.f, tb >= 0 ? dcol[c] : 0.f);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1) {
            const int c = nt * 8 + 2 * tq + e1;
            int beta = 0;
            if (use_window) beta = sWin[stage * kWin + kr - c + BQ - 1];
            else if (use_index && c < rows && kr < keys)
              beta = clamp_id(p.rel_index[b * p.rel_index_stride[0] + (i0 + c) * p.rel_index_stride[1] +
                                          (j0 + kr) * p.rel_index_stride[2]],
                              p.id_max);
            element(nt, e1, has_tab && c < rows ? tab_g[c * R + beta] * kLog2e : 0.f,
                    has_doa && c < rows ? doa_g[c * R + beta] : 0.f);
          }
      }
    }

    if constexpr (kDropout) {
      uint32_t k0, k1;
      dropout_key(*p.dropout_seed, k0, k1);
      for_dropout_factors_t<kNT>(p, k0, k1, b, h, i0, j0 + warp_key0, g, tq, [&](int nt, int e, float z) {
        const float delta = sDelta[stage * BQ + nt * 8 + 2 * tq + (e & 1)];
        acc_dp[0][nt][e] = z * acc_dp[0][nt][e] - acc_s[0][nt][e] * delta;
        acc_s[0][nt][e] *= z;
      });
    }

    uint32_t pa[1][BQ / 16][4];
    pack_a<T, kNT>(pa[0], acc_s[0]);
    gemm_pv<T, kCols, 1, BQ / 16, LD>(acc_dv, pa, sDo + stage * BQ * LD + wc * kCols, lane);
    pack_a<T, kNT>(pa[0], acc_dp[0]);
    gemm_pv<T, kCols, 1, BQ / 16, LD>(acc_dk, pa, sQ + stage * BQ * LD + wc * kCols, lane);
    __syncthreads();  // this stage is refilled two iterations on
  }
  cp_async_wait<0>();
  __syncthreads();

  const int64_t kv0 = (b * p.Hk + kv_head) * p.Lk + j0;
  stage_acc<T, kCols, LD>(sK + warp_key0 * LD + wc * kCols, acc_dk, scale, lane);
  stage_acc<T, kCols, LD>(sV + warp_key0 * LD + wc * kCols, acc_dv, 1.f, lane);
  __syncthreads();
  store_tile<T, BK, kHeadDim, kThreads>(static_cast<T*>(p.dk) + kv0 * D, D, sK, keys, D, tid);
  store_tile<T, BK, kHeadDim, kThreads>(static_cast<T*>(p.dv) + kv0 * Dv, Dv, sV, keys, Dv, tid);
}

template <typename T, int kHeadDim>
cudaError_t launch_backward_mma(const BackwardParams& p, cudaStream_t stream) {
  using Cfg = BwdMmaConfig<kHeadDim>;
  const int64_t blocks_a = (p.Lq + Cfg::kBlockM - 1) / Cfg::kBlockM * p.B * p.H;
  const int64_t blocks_b = (p.Lk + Cfg::kBlockKeys - 1) / Cfg::kBlockKeys * p.B * p.Hk;
  if (p.dropout_seed != nullptr) {  // dropout (and segments, if given)
    cudaError_t err = launch_kernel(backward_mma_query_kernel<T, kHeadDim, true>, blocks_a, Cfg::kThreads,
                                    Cfg::kABytes, stream, p);
    if (err != cudaSuccess) return err;
    return launch_kernel(backward_mma_key_kernel<T, kHeadDim, true>, blocks_b, Cfg::kThreads, Cfg::kBBytes, stream,
                         p);
  }
  if (p.has_segments()) {
    cudaError_t err = launch_kernel(backward_mma_query_kernel<T, kHeadDim, false, true>, blocks_a, Cfg::kThreads,
                                    Cfg::kABytes, stream, p);
    if (err != cudaSuccess) return err;
    return launch_kernel(backward_mma_key_kernel<T, kHeadDim, false, true>, blocks_b, Cfg::kThreads, Cfg::kBBytes,
                         stream, p);
  }
  cudaError_t err =
      launch_kernel(backward_mma_query_kernel<T, kHeadDim>, blocks_a, Cfg::kThreads, Cfg::kABytes, stream, p);
  if (err != cudaSuccess) return err;
  return launch_kernel(backward_mma_key_kernel<T, kHeadDim>, blocks_b, Cfg::kThreads, Cfg::kBBytes, stream, p);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

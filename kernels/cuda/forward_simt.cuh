// relattn forward without tensor cores: float32 / float64 (and, to cross-check the tensor-core kernel,
// fp16 / bf16 with float accumulation). Same tiled algorithm as forward_mma.cuh and the CPU kernel, in
// the accumulation dtype throughout (natural-log units, exp/log of that dtype; no TF32 anywhere):
//
//   tab[i,r] = scale*q_i·aK[r] + bias[h,r]
//   s_ij     = scale*q_i·k_j + tab[i,β(i,j)] - m_h*|d(i,j)|      (-inf where masked)
//   online softmax over key tiles: m_i, l_i, acc_i = Σ p̃_ij v_j, bsum[i,r] = Σ_{j:β=r} p̃_ij
//   out_i    = (acc_i + bsum_i·aV) / l_i,   lse_i = m_i + log l_i
//
// Work: one CTA of 4 warps per (query tile of kBlockM rows, b, h); each warp owns kRowsPerWarp rows. Key
// tiles of 32 keys are staged in shared memory (one key per lane): lane l computes the score of key
// j0+l for each of its warp's rows, the warp reduces max and sum with shuffles, and P·V runs with lanes
// over output columns. Simple and exact rather than fast.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "device_utils.cuh"
#include "forward.h"

namespace relattn {
namespace kernels {
namespace cuda {

template <typename T>
using simt_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) forward_simt_kernel(const __grid_constant__ ForwardParams p) {
  using acc_t = simt_acc_t<T>;
  using Cfg = SimtConfig<acc_t>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int RW = Cfg::kRowsPerWarp;
  constexpr int kPerLane = Cfg::kMaxPerLane;
  constexpr int kThreads = kSimtThreads;
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const int D = static_cast<int>(p.D);
  const int Dv = static_cast<int>(p.Dv);
  const int ldk = D + 1;
  const int64_t R = p.R;
  const int64_t M = p.max_distance;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);  // [BM][D]
  acc_t* sK = sQ + BM * D;                         // [BN][D+1]
  acc_t* sV = sK + BN * ldk;                       // [BN][Dv]
  acc_t* sP = sV + BN * Dv;                        // [4][BN]
  acc_t* smem_tables = reinterpret_cast<acc_t*>(smem_raw + Cfg::base_bytes(D, Dv));

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;

  const int64_t slot = blockIdx.x;
  const int64_t chunk = key_chunk<BM>(p, slot);  // key chunk of a split decode step (else 0)
  QueryTile tile = query_tile<BM>(p, slot - chunk * tiles_per_key_chunk<BM>(p));
  clip_to_segments(p, tile);
  clip_to_key_chunk(p, tile, chunk);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, kv_head = tile.kv_head, i0 = tile.i0, q_off = tile.q_off;
  const int rows = tile.rows;
  const bool has_tab = p.has_tab();
  const bool has_bsum = p.has_bsum();

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1];
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] : nullptr;

  for (int x = tid; x < BM * D; x += kThreads) {
    const int r = x / D, c = x % D;
    sQ[x] = r < rows ? to_acc<acc_t>(qg[r * p.q_stride[2] + c]) : acc_t(0);
  }

  acc_t* tab = nullptr;
  acc_t* bsum = nullptr;
  const int64_t ld = p.table_ld;
  {
    const int64_t n = int64_t(BM) * ld;
    if (has_tab) tab = p.tables_in_global ? static_cast<acc_t*>(p.tab_scratch) + slot * n : smem_tables;
    if (has_bsum)
      bsum = p.tables_in_global ? static_cast<acc_t*>(p.bsum_scratch) + slot * n : smem_tables + (has_tab ? n : 0);
  }
  __syncthreads();

  const acc_t scale = static_cast<acc_t>(p.scale);
  // Row tables of this warp's rows (lanes over buckets).
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    const int row = warp * RW + rr;
    if (has_tab) {
      const acc_t* rk = p.rel_k ? static_cast<const acc_t*>(p.rel_k) + h * p.rel_k_head_stride : nullptr;
      const acc_t* bias = p.rel_bias ? static_cast<const acc_t*>(p.rel_bias) + h * R : nullptr;
      for (int64_t r = lane; r < R; r += 32) {
        acc_t v = 0;
        if (rk) {
          acc_t s = 0;
          for (int c = 0; c < D; ++c) s += sQ[row * D + c] * rk[r * D + c];
          v = scale * s;
        }
        if (bias) v += bias[r];
        tab[row * ld + r] = v;
      }
    }
    if (has_bsum) {
      for (int64_t r = lane; r < R; r += 32) bsum[row * ld + r] = 0;
    }
  }
  __syncwarp();

  const int64_t j_end = tile.key_end;
  const acc_t slope = p.alibi_slopes ? static_cast<const acc_t*>(p.alibi_slopes)[h] : acc_t(0);

  acc_t m[RW], l[RW], acc[RW][kPerLane];
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    m[rr] = kNegInf;
    l[rr] = 0;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[rr][e] = 0;
  }

  for (int64_t j0 = tile.key_begin / BN * BN; j0 < j_end; j0 += BN) {
    __syncthreads();  // the previous tile is consumed
    const int cols = static_cast<int>(p.Lk - j0 < BN ? p.Lk - j0 : BN);
    for (int x = tid; x < BN * D; x += kThreads) {
      const int r = x / D, c = x % D;
      sK[r * ldk + c] = r < cols ? to_acc<acc_t>(kg[(j0 + r) * p.k_stride[2] + c]) : acc_t(0);
    }
    for (int x = tid; x < BN * Dv; x += kThreads) {
      const int r = x / Dv, c = x % Dv;
      sV[x] = r < cols ? to_acc<acc_t>(vg[(j0 + r) * p.v_stride[2] + c]) : acc_t(0);
    }
    __syncthreads();

    const int64_t j = j0 + lane;
    const bool key_ok = lane < cols && !(kpm && kpm[j * p.key_padding_mask_stride[1]]);
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
      const int row = warp * RW + rr;
      if (row >= rows) continue;  // warp-uniform
      const int64_t i = i0 + row;
      const int64_t d = j - (i + q_off);
      acc_t s = 0;
      for (int c = 0; c < D; ++c) s += sQ[row * D + c] * sK[lane * ldk + c];
      s *= scale;
      int32_t beta = 0;
      if (lane < cols) {
        if (p.buckets) beta = clamp_id(p.buckets[(d < -M ? -M : (d > M ? M : d)) + M], p.id_max);
        else if (p.rel_index)
          beta = clamp_id(
              p.rel_index[b * p.rel_index_stride[0] + i * p.rel_index_stride[1] + j * p.rel_index_stride[2]],
              p.id_max);
      }
      if (has_tab) s += tab[row * ld + beta];
      if (p.alibi_slopes) s -= slope * static_cast<acc_t>(d < 0 ? -d : d);
      const bool masked = !key_ok || (p.causal && d > 0) ||
                          (p.q_segment_ids != nullptr && q_segment(p, b, i) != k_segment(p, b, j));
      s = masked ? kNegInf : s;

      const acc_t mx_tile = warp_max(s);
      const acc_t mx = m[rr] > mx_tile ? m[rr] : mx_tile;
      const acc_t m_use = mx == kNegInf ? acc_t(0) : mx;
      const acc_t corr = exp_acc(m[rr] - m_use);
      acc_t pv = exp_acc(s - m_use);
      m[rr] = mx;
      l[rr] = l[rr] * corr + warp_sum(pv);
      // Dropout (after l, which keeps every weight): the weights of v and aV become p̃·z.
      if (p.dropout_seed != nullptr && pv != acc_t(0)) pv *= dropout_factor<acc_t>(p, b, h, i, j);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[rr][e] *= corr;
      sP[warp * BN + lane] = pv;
      if (has_bsum) {
        if (corr != acc_t(1))
          for (int64_t r = lane; r < R; r += 32) bsum[row * ld + r] *= corr;
        __syncwarp();
        // Lanes of one bucket: the lowest adds the group's p in lane order (fixed order, no atomics).
        const unsigned grp = __match_any_sync(0xffffffffu, pv != acc_t(0) ? beta : -1);
        if (pv != acc_t(0) && (grp & ((1u << lane) - 1u)) == 0u) {
          acc_t sum = 0;
          for (unsigned m = grp; m != 0u; m &= m - 1u) sum += sP[warp * BN + __ffs(static_cast<int>(m)) - 1];
          bsum[row * ld + beta] += sum;
        }
      }
      __syncwarp();
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int col = lane + 32 * e;
        if (col < Dv) {
          acc_t a = 0;
#pragma unroll 8
          for (int jj = 0; jj < BN; ++jj) a += sP[warp * BN + jj] * sV[jj * Dv + col];
          acc[rr][e] += a;
        }
      }
      __syncwarp();  // sP is rewritten by the next row
    }
  }
  __syncwarp();  // bucket sums written by other lanes of this warp

#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
    const int row = warp * RW + rr;
    if (row >= rows) continue;
    // l = 0: every key masked (out = 0, lse = -inf); a NaN l (a NaN score) makes out and lse NaN.
    const acc_t inv = l[rr] != acc_t(0) ? acc_t(1) / l[rr] : acc_t(0);
    const acc_t* rv = has_bsum ? static_cast<const acc_t*>(p.rel_v) + h * p.rel_v_head_stride : nullptr;
    // The row of out and lse, or of this key chunk's partial results (a split decode step).
    const int64_t out_row = (chunk * p.B * p.H + bh) * p.Lq + i0 + row;
    T* o = p.num_splits > 1 ? nullptr : static_cast<T*>(p.out) + out_row * int64_t(Dv);
    acc_t* o_part = p.num_splits > 1 ? static_cast<acc_t*>(p.out_partial) + out_row * int64_t(Dv) : nullptr;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int col = lane + 32 * e;
      if (col < Dv) {
        acc_t v = acc[rr][e];
        if (rv) {
          for (int64_t r = 0; r < R; ++r) v += bsum[row * ld + r] * rv[r * Dv + col];
        }
        if (o_part)
          o_part[col] = v * inv;
        else
          o[col] = from_acc<T, acc_t>(v * inv);
      }
    }
    if (lane == 0) {
      acc_t* lse = static_cast<acc_t*>(p.num_splits > 1 ? p.lse_partial : p.lse);
      lse[out_row] = l[rr] != acc_t(0) ? m[rr] + log_acc(l[rr]) : kNegInf;
    }
  }
}

template <typename T>
cudaError_t launch_forward_simt(const ForwardParams& p, int64_t smem_bytes, cudaStream_t stream) {
  using Cfg = SimtConfig<simt_acc_t<T>>;
  const int64_t blocks = (p.Lq + Cfg::kBlockM - 1) / Cfg::kBlockM * p.B * p.H * p.num_splits;
  return launch_kernel(forward_simt_kernel<T>, blocks, kSimtThreads, smem_bytes, stream, p);
}

// ---- the merge of a split decode step's key chunks (forward.h: launch_combine_splits) --------------------

constexpr int kCombineThreads = 128;  // 4 warps, one output row each

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_splits_kernel(const __grid_constant__ ForwardParams p) {
  using acc_t = simt_acc_t<T>;
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t rows = p.B * p.H * p.Lq;
  const int64_t row = int64_t(blockIdx.x) * (kCombineThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t S = p.num_splits, Dv = p.Dv;
  const acc_t* lse_s = static_cast<const acc_t*>(p.lse_partial) + row;  // chunk s at lse_s[s * rows]
  const acc_t* out_s = static_cast<const acc_t*>(p.out_partial) + row * Dv;
  acc_t m = kNegInf;
  for (int64_t s = 0; s < S; ++s) {  // (a NaN lse, once seen, stays: the row becomes NaN, as unsplit)
    const acc_t x = lse_s[s * rows];
    m = x > m || x != x ? x : m;
  }
  T* out = static_cast<T*>(p.out) + row * Dv;
  if (m == kNegInf) {  // no chunk saw a key
    for (int64_t d = lane; d < Dv; d += 32) out[d] = from_acc<T, acc_t>(acc_t(0));
    if (lane == 0) static_cast<acc_t*>(p.lse)[row] = kNegInf;
    return;
  }
  acc_t sum = 0;
  for (int64_t s = 0; s < S; ++s) sum += exp_acc(lse_s[s * rows] - m);
  const acc_t inv = acc_t(1) / sum;
  // Each lane holds its columns d = lane + 32 e (Dv <= kMaxHeadDim) and weighs each chunk once.
  constexpr int kPerLane = SimtConfig<acc_t>::kMaxPerLane;
  acc_t o[kPerLane] = {};
  for (int64_t s = 0; s < S; ++s) {
    const acc_t w = exp_acc(lse_s[s * rows] - m) * inv;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < Dv) o[e] += w * out_s[s * rows * Dv + d];
    }
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < Dv) out[d] = from_acc<T, acc_t>(o[e]);
  }
  if (lane == 0) static_cast<acc_t*>(p.lse)[row] = m + log_acc(sum);
}

template <typename T>
cudaError_t launch_combine_splits(const ForwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.Lq;
  const int64_t per_block = kCombineThreads / 32;
  return launch_kernel(combine_splits_kernel<T>, (rows + per_block - 1) / per_block, kCombineThreads, 0, stream, p);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

// relattn backward without tensor cores: float32 / float64, and fp16 / bf16 at head dim 256 or when
// RELATTN_CUDA_KERNEL=simt. Same two kernels as backward_mma.cuh (backward.h holds the math), in the
// accumulation dtype throughout, pair-parallel rather than lane-per-key:
//
//   A  one CTA per (16 query rows, b, h). Per key tile the 128 threads compute the tile's P and dP
//      (then dS) pair by pair into shared memory; one thread per row adds the row's bucket sums and Δ in
//      key order (deterministic); dq accumulates with thread (row t/8, columns t%8 + 8e).
//   B  one CTA per (16 keys, b, kv head). Per query tile (of the group's heads, causal-skipped) P and dS
//      pair by pair into shared memory, then dk and dv with thread (key t/8, columns t%8 + 8e).
//
// The scores repeat the SIMT forward's arithmetic operation by operation (table dot products, the order
// of the additions), so that P = exp(s - lse) matches the forward's lse for float32 / float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "backward.h"
#include "device_utils.cuh"

namespace relattn {
namespace kernels {
namespace cuda {

template <typename T>
using bwd_simt_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace simt_bwd_detail {

template <typename T, typename acc_t>
RELATTN_DEVICE void load_rows(acc_t* s, int ld, const T* g, int64_t row_stride, int rows_valid, int n_rows, int cols,
                              int tid) {
  for (int x = tid; x < n_rows * cols; x += kBwdSimtThreads) {
    const int r = x / cols, c = x % cols;
    s[r * ld + c] = r < rows_valid ? to_acc<acc_t>(g[r * row_stride + c]) : acc_t(0);
  }
}

// Bucket of pair (i, j) (global indices; q_off is batch row b's query offset), or 0 when the relative terms
// have none.
RELATTN_DEVICE int32_t bucket_of(const BackwardParams& p, int64_t b, int64_t q_off, int64_t i, int64_t j) {
  if (p.buckets) {
    const int64_t M = p.max_distance;
    int64_t d = j - (i + q_off);
    d = d < -M ? -M : (d > M ? M : d);
    return clamp_id(p.buckets[d + M], p.id_max);
  }
  if (p.rel_index)
    return clamp_id(
        p.rel_index[b * p.rel_index_stride[0] + i * p.rel_index_stride[1] + j * p.rel_index_stride[2]], p.id_max);
  return 0;
}

// P and dP (or dS when `delta` is given) of pair (i, j) into *pv / *dv. `qrow`/`dorow` are the query row
// and its grad_out row in shared memory, `krow`/`vrow` the key and value rows; tab/doa the row's tables.
// With dropout (factor z of the pair), dP is the gradient of the dropped weight, z·do·(v + aV), and *pz
// is the dropped weight P·z (the weight of v and aV); without, *pz = *pv.
template <typename acc_t>
RELATTN_DEVICE void pair(const BackwardParams& p, int64_t b, int64_t q_off, int64_t h, int64_t i, int64_t j,
                         bool valid, const acc_t* qrow, const acc_t* dorow, const acc_t* krow, const acc_t* vrow,
                         const acc_t* tab, const acc_t* doa, acc_t lse, acc_t delta, bool with_delta, acc_t* pv,
                         acc_t* pz, acc_t* dv, int32_t* beta_out) {
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int64_t d = j - (i + q_off);
  const bool masked = !valid || (p.causal && d > 0) || lse == static_cast<acc_t>(-INFINITY) ||
                      (p.q_segment_ids != nullptr && q_segment(p, b, i) != k_segment(p, b, j));
  if (masked) {
    *pv = acc_t(0);
    *pz = acc_t(0);
    *dv = acc_t(0);
    *beta_out = 0;
    return;
  }
  const int32_t beta = (tab || doa) ? bucket_of(p, b, q_off, i, j) : 0;
  acc_t s = 0;
  for (int c = 0; c < D; ++c) s += qrow[c] * krow[c];
  s *= static_cast<acc_t>(p.scale);
  if (tab) s += tab[beta];
  if (p.alibi_slopes) s -= static_cast<const acc_t*>(p.alibi_slopes)[h] * static_cast<acc_t>(d < 0 ? -d : d);
  const acc_t pr = exp_acc(s - lse);
  acc_t dp = 0;
  for (int c = 0; c < Dv; ++c) dp += dorow[c] * vrow[c];
  if (doa) dp += doa[beta];
  const acc_t z = p.dropout_seed != nullptr ? dropout_factor<acc_t>(p, b, h, i, j) : acc_t(1);
  dp *= z;
  *pv = pr;
  *pz = pr * z;
  *dv = with_delta ? pr * (dp - delta) : pr * dp;
  *beta_out = beta;
}

}  // namespace simt_bwd_detail

template <typename T>
__global__ void __launch_bounds__(kBwdSimtThreads) backward_simt_query_kernel(const __grid_constant__ BackwardParams p) {
  using namespace simt_bwd_detail;
  using acc_t = bwd_simt_acc_t<T>;
  using Cfg = BwdSimtConfig<acc_t>;
  constexpr int BM = Cfg::kRowsA;
  constexpr int BN = Cfg::kTileN;
  constexpr int kPerThread = Cfg::kPerThread;
  const acc_t kNegInf = static_cast<acc_t>(-INFINITY);
  const int D = static_cast<int>(p.D);
  const int Dv = static_cast<int>(p.Dv);
  const int64_t R = p.R;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);  // [BM][D+1]
  acc_t* sDo = sQ + BM * (D + 1);                  // [BM][Dv+1]
  acc_t* sK = sDo + BM * (Dv + 1);                 // [BN][D+1]
  acc_t* sV = sK + BN * (D + 1);                   // [BN][Dv+1]
  acc_t* sP = sV + BN * (Dv + 1);                  // [BM][BN+1]  P
  acc_t* sX = sP + BM * (BN + 1);                  // [BM][BN+1]  P∘dP (sweep 0) or dS (sweep 1)
  acc_t* sL = sX + BM * (BN + 1);                  // [BM] lse
  acc_t* sDl = sL + BM;                            // [BM] Δ

  const int tid = threadIdx.x;
  const int64_t slot = blockIdx.x;
  QueryTile tile = query_tile<BM>(p, slot);
  clip_to_segments(p, tile);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, kv_head = tile.kv_head, i0 = tile.i0, q_off = tile.q_off;
  const int rows = tile.rows;
  const int64_t row0 = bh * p.Lq + i0;
  const bool has_tab = p.has_tab();
  const bool has_doa = p.has_doa();
  acc_t* tab_g = has_tab ? static_cast<acc_t*>(p.row_tab) + row0 * R : nullptr;
  acc_t* doa_g = has_doa ? static_cast<acc_t*>(p.row_doa) + row0 * R : nullptr;
  acc_t* dsb_g = has_tab ? static_cast<acc_t*>(p.ds_sum) + row0 * R : nullptr;
  acc_t* psb_g = has_doa ? static_cast<acc_t*>(p.p_sum) + row0 * R : nullptr;
  const acc_t scale = static_cast<acc_t>(p.scale);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  const T* dog = static_cast<const T*>(p.grad_out) + b * p.grad_out_stride[0] + h * p.grad_out_stride[1] +
                 i0 * p.grad_out_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1];
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] : nullptr;

  load_rows<T, acc_t>(sQ, D + 1, qg, p.q_stride[2], rows, BM, D, tid);
  load_rows<T, acc_t>(sDo, Dv + 1, dog, p.grad_out_stride[2], rows, BM, Dv, tid);
  for (int r = tid; r < BM; r += kBwdSimtThreads)
    sL[r] = r < rows ? static_cast<const acc_t*>(p.lse)[row0 + r] : kNegInf;
  __syncthreads();

  // Row tables: pair (row, bucket) per thread, with the SIMT forward's arithmetic.
  if (has_tab || has_doa) {
    const acc_t* rk = p.rel_k ? static_cast<const acc_t*>(p.rel_k) + h * p.rel_k_head_stride : nullptr;
    const acc_t* rv = p.rel_v ? static_cast<const acc_t*>(p.rel_v) + h * p.rel_v_head_stride : nullptr;
    const acc_t* bias = p.rel_bias ? static_cast<const acc_t*>(p.rel_bias) + h * R : nullptr;
    for (int64_t x = tid; x < int64_t(rows) * R; x += kBwdSimtThreads) {
      const int row = static_cast<int>(x / R);
      const int64_t r = x % R;
      if (has_tab) {
        acc_t v = 0;
        if (rk) {
          acc_t s = 0;
          for (int c = 0; c < D; ++c) s += sQ[row * (D + 1) + c] * rk[r * D + c];
          v = scale * s;
        }
        if (bias) v += bias[r];
        tab_g[row * R + r] = v;
      }
      if (has_doa) {
        acc_t s = 0;
        for (int c = 0; c < Dv; ++c) s += sDo[row * (Dv + 1) + c] * rv[r * Dv + c];
        doa_g[row * R + r] = s;
      }
    }
  }
  __syncthreads();

  const int64_t j_end = tile.key_end;

  const int my_row = tid / 8;  // dq: row and columns of this thread
  const int my_col = tid % 8;
  acc_t acc_dq[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) acc_dq[e] = 0;
  acc_t rowacc = 0;  // Σ P∘dP of row `tid` (threads < BM)

  for (int sweep = 0; sweep < 2; ++sweep) {
    for (int64_t j0 = tile.key_begin / BN * BN; j0 < j_end; j0 += BN) {
      __syncthreads();  // the previous tile is consumed
      const int cols = static_cast<int>(p.Lk - j0 < BN ? p.Lk - j0 : BN);
      load_rows<T, acc_t>(sK, D + 1, kg + j0 * p.k_stride[2], p.k_stride[2], cols, BN, D, tid);
      load_rows<T, acc_t>(sV, Dv + 1, vg + j0 * p.v_stride[2], p.v_stride[2], cols, BN, Dv, tid);
      __syncthreads();
      for (int x = tid; x < BM * BN; x += kBwdSimtThreads) {
        const int r = x / BN, c = x % BN;
        const int64_t j = j0 + c;
        const bool valid = r < rows && c < cols && !(kpm && kpm[j * p.key_padding_mask_stride[1]]);
        acc_t pv, pz, xv;
        int32_t beta;
        pair<acc_t>(p, b, q_off, h, i0 + r, j, valid, sQ + r * (D + 1), sDo + r * (Dv + 1), sK + c * (D + 1),
                    sV + c * (Dv + 1), valid && has_tab ? tab_g + r * R : nullptr,
                    valid && has_doa ? doa_g + r * R : nullptr, sL[r], sweep == 1 ? sDl[r] : acc_t(0), sweep == 1,
                    &pv, &pz, &xv, &beta);
        // Sweep 0 sums the dropped weights P·z into p_sum (a dropped pair has P·z·dP = 0 as well); sweep 1
        // needs every pair with P != 0, dropped ones included (their dS = -P·Δ).
        sP[r * (BN + 1) + c] = sweep == 0 ? pz : pv;
        sX[r * (BN + 1) + c] = xv;
      }
      __syncthreads();
      // One thread per row: Δ and the bucket sums, in key order.
      if (tid < rows) {
        const int r = tid;
        const bool need_beta = (sweep == 0 && has_doa) || (sweep == 1 && has_tab);
        for (int c = 0; c < cols; ++c) {
          const acc_t pv = sP[r * (BN + 1) + c];
          if (pv == acc_t(0)) continue;
          const acc_t xv = sX[r * (BN + 1) + c];
          if (sweep == 0) rowacc += xv;
          if (need_beta) {
            const int32_t beta = bucket_of(p, b, q_off, i0 + r, j0 + c);
            if (sweep == 0) psb_g[r * R + beta] += pv;
            else dsb_g[r * R + beta] += xv;
          }
        }
      }
      if (sweep == 1) {
#pragma unroll
        for (int e = 0; e < kPerThread; ++e) {
          const int col = my_col + 8 * e;
          if (col < D) {
            acc_t a = 0;
            for (int c = 0; c < cols; ++c) a += sX[my_row * (BN + 1) + c] * sK[c * (D + 1) + col];
            acc_dq[e] += a;
          }
        }
      }
    }
    __syncthreads();
    if (sweep == 0 && tid < BM) {
      acc_t d = rowacc;
      if (tid < rows && p.grad_lse) d -= static_cast<const acc_t*>(p.grad_lse)[row0 + tid];
      sDl[tid] = d;
      if (tid < rows) static_cast<acc_t*>(p.delta)[row0 + tid] = d;
    }
    __syncthreads();
  }

  // dq = scale * (Σ dS k + dsb · aK)
  if (my_row < rows) {
    const acc_t* rk = p.rel_k ? static_cast<const acc_t*>(p.rel_k) + h * p.rel_k_head_stride : nullptr;
    T* dq = static_cast<T*>(p.dq) + (row0 + my_row) * int64_t(D);
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int col = my_col + 8 * e;
      if (col < D) {
        acc_t v = acc_dq[e];
        if (rk) {
          for (int64_t r = 0; r < R; ++r) v += dsb_g[my_row * R + r] * rk[r * D + col];
        }
        dq[col] = from_acc<T, acc_t>(scale * v);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBwdSimtThreads) backward_simt_key_kernel(const __grid_constant__ BackwardParams p) {
  using namespace simt_bwd_detail;
  using acc_t = bwd_simt_acc_t<T>;
  using Cfg = BwdSimtConfig<acc_t>;
  constexpr int BK = Cfg::kKeysB;
  constexpr int BQ = Cfg::kTileN;
  constexpr int kPerThread = Cfg::kPerThread;
  const int D = static_cast<int>(p.D);
  const int Dv = static_cast<int>(p.Dv);
  const int64_t R = p.R;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sK = reinterpret_cast<acc_t*>(smem_raw);  // [BK][D+1]
  acc_t* sV = sK + BK * (D + 1);                   // [BK][Dv+1]
  acc_t* sQ = sV + BK * (Dv + 1);                  // [BQ][D+1]
  acc_t* sDo = sQ + BQ * (D + 1);                  // [BQ][Dv+1]
  acc_t* sP = sDo + BQ * (Dv + 1);                 // [BQ][BK+1]
  acc_t* sS = sP + BQ * (BK + 1);                  // [BQ][BK+1]  dS
  acc_t* sL = sS + BQ * (BK + 1);                  // [BQ]
  acc_t* sDl = sL + BQ;                            // [BQ]

  const int tid = threadIdx.x;
  const int64_t nkb = (p.Lk + BK - 1) / BK;
  const int64_t slot = blockIdx.x;
  const int64_t kb = slot % nkb;
  const int64_t bg = slot / nkb;
  const int64_t b = bg / p.Hk;
  const int64_t q_off = p.batch_q_offset(b);
  const int64_t kv_head = bg % p.Hk;
  const int64_t group = p.H / p.Hk;
  const int64_t j0 = kb * BK;
  const int keys = static_cast<int>(p.Lk - j0 < BK ? p.Lk - j0 : BK);
  const bool has_tab = p.has_tab();
  const bool has_doa = p.has_doa();
  const acc_t kNegInf = static_cast<acc_t>(-INFINITY);

  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1] + j0 * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1] + j0 * p.v_stride[2];
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] : nullptr;
  load_rows<T, acc_t>(sK, D + 1, kg, p.k_stride[2], keys, BK, D, tid);
  load_rows<T, acc_t>(sV, Dv + 1, vg, p.v_stride[2], keys, BK, Dv, tid);

  int64_t i_first, i_end;  // the query rows that can see a key of this tile
  key_tile_queries(p, b, j0, keys, i_first, i_end);

  const int my_key = tid / 8;
  const int my_col = tid % 8;
  acc_t acc_dk[kPerThread], acc_dv[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    acc_dk[e] = 0;
    acc_dv[e] = 0;
  }

  for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
    for (int64_t i0 = i_first / BQ * BQ; i0 < i_end; i0 += BQ) {
      const int rows = static_cast<int>(p.Lq - i0 < BQ ? p.Lq - i0 : BQ);
      const int64_t r0 = (b * p.H + h) * p.Lq + i0;
      const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
      const T* dog = static_cast<const T*>(p.grad_out) + b * p.grad_out_stride[0] + h * p.grad_out_stride[1] +
                     i0 * p.grad_out_stride[2];
      __syncthreads();  // the previous tile is consumed
      load_rows<T, acc_t>(sQ, D + 1, qg, p.q_stride[2], rows, BQ, D, tid);
      load_rows<T, acc_t>(sDo, Dv + 1, dog, p.grad_out_stride[2], rows, BQ, Dv, tid);
      for (int r = tid; r < BQ; r += kBwdSimtThreads) {
        sL[r] = r < rows ? static_cast<const acc_t*>(p.lse)[r0 + r] : kNegInf;
        sDl[r] = r < rows ? static_cast<const acc_t*>(p.delta)[r0 + r] : acc_t(0);
      }
      __syncthreads();
      const acc_t* tab_g = has_tab ? static_cast<const acc_t*>(p.row_tab) + r0 * R : nullptr;
      const acc_t* doa_g = has_doa ? static_cast<const acc_t*>(p.row_doa) + r0 * R : nullptr;
      for (int x = tid; x < BQ * BK; x += kBwdSimtThreads) {
        const int r = x / BK, c = x % BK;
        const int64_t j = j0 + c;
        const bool valid = r < rows && c < keys && !(kpm && kpm[j * p.key_padding_mask_stride[1]]);
        acc_t pv, pz, ds;
        int32_t beta;
        pair<acc_t>(p, b, q_off, h, i0 + r, j, valid, sQ + r * (D + 1), sDo + r * (Dv + 1), sK + c * (D + 1),
                    sV + c * (Dv + 1), valid && has_tab ? tab_g + r * R : nullptr,
                    valid && has_doa ? doa_g + r * R : nullptr, sL[r], sDl[r], true, &pv, &pz, &ds, &beta);
        sP[r * (BK + 1) + c] = pz;  // dv = Σ (P·z) do
        sS[r * (BK + 1) + c] = ds;
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int col = my_col + 8 * e;
        acc_t a = 0, bsum = 0;
        if (col < Dv)
          for (int r = 0; r < rows; ++r) a += sP[r * (BK + 1) + my_key] * sDo[r * (Dv + 1) + col];
        if (col < D)
          for (int r = 0; r < rows; ++r) bsum += sS[r * (BK + 1) + my_key] * sQ[r * (D + 1) + col];
        acc_dv[e] += a;
        acc_dk[e] += bsum;
      }
    }
  }

  if (my_key < keys) {
    const int64_t kv = (b * p.Hk + kv_head) * p.Lk + j0 + my_key;
    T* dk = static_cast<T*>(p.dk) + kv * D;
    T* dv = static_cast<T*>(p.dv) + kv * Dv;
    const acc_t scale = static_cast<acc_t>(p.scale);
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int col = my_col + 8 * e;
      if (col < D) dk[col] = from_acc<T, acc_t>(scale * acc_dk[e]);
      if (col < Dv) dv[col] = from_acc<T, acc_t>(acc_dv[e]);
    }
  }
}

template <typename T>
cudaError_t launch_backward_simt(const BackwardParams& p, cudaStream_t stream) {
  using Cfg = BwdSimtConfig<bwd_simt_acc_t<T>>;
  const int64_t blocks_a = (p.Lq + Cfg::kRowsA - 1) / Cfg::kRowsA * p.B * p.H;
  const int64_t blocks_b = (p.Lk + Cfg::kKeysB - 1) / Cfg::kKeysB * p.B * p.Hk;
  cudaError_t err = launch_kernel(backward_simt_query_kernel<T>, blocks_a, kBwdSimtThreads,
                                  Cfg::a_bytes(p.D, p.Dv), stream, p);
  if (err != cudaSuccess) return err;
  return launch_kernel(backward_simt_key_kernel<T>, blocks_b, kBwdSimtThreads, Cfg::b_bytes(p.D, p.Dv), stream, p);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

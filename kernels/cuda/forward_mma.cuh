// relattn forward on tensor cores (fp16 / bf16 inputs, fp32 accumulation), FlashAttention-2 style.
//
// Math (SPEC §1, kernels/params.h), everything kept in log2 units so that exp2 does the softmax:
//   tab2[i,r] = log2e * (scale*q_i·aK[r] + bias[h,r])        per query tile, before the key loop
//   s2_ij     = log2e*scale*q_i·k_j + tab2[i,β(i,j)] - log2e*m_h*|d(i,j)|     (-inf where masked)
//   online:   m_i = max_j s2_ij,  p̃_ij = 2^(s2_ij - m_i),  l_i = Σ p̃,  O_i = Σ p̃_ij v_j,
//             bsum[i,r] = Σ_{j:β=r} p̃_ij   (O, l and bsum all rescaled by 2^(m_old - m_new))
//   out_i     = O_i / l_i + (bsum_i / l_i) · aV,     lse_i = ln2 * (m_i + log2 l_i)
//
// Work: one CTA of 4 warps per (query tile of kBlockM rows, b, h); each warp owns kBlockM/4 rows (one or
// two m16 tiles) for the whole kernel, so row state (max, sum, O, its rows of tab and bsum) never crosses
// warps. K/V tiles of kBlockN keys stream through two shared-memory stages with cp.async: tile t+1 is in
// flight while tile t is computed. S = Q Kᵀ and O += P V run on mma.sync m16n8k16; P goes from the S
// accumulators straight into A fragments (no shared-memory round trip). The relative tables use the
// same two GEMM routines: tab = Q aKᵀ (aK rows streamed through a K stage, converted to the input
// dtype) and O += (bsum/l) aV at the end (aV rows through a V stage).
//
// Buckets per tile: with the distance table, the bucket ids of the kBlockM+kBlockN-1 distances the tile
// spans are staged in shared memory (the "window"), and a row whose distances in the tile all lie beyond
// ±M takes one bucket for the whole row: its table value and its bucket sum (the row sum) live in
// registers, so such a tile touches no table memory. With rel_index the ids are read from memory per
// element. The other rows add to their bucket sums by the table's layout: distinct ids (clip) at once,
// ids in runs (T5) one addition per run after a segmented scan over the quad (quad_run_sums), any other
// ids and rel_index by the quad's 4 lanes in turn.
//
// Features are runtime flags (uniform branches); the template parameters are the element type, the padded
// head dim and kPlain: calls without relative tables take an instance compiled without the table code,
// whose lighter register needs allow 128-row tiles (32 rows per warp) up to head dim 128. Rows and columns
// beyond Lq/Lk/D/Dv are zero-filled in shared memory, so every tile is full.
// All offsets that can exceed 2^31 (b, h, row, key indices times strides) are int64.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "forward.h"

namespace relattn {
namespace kernels {
namespace cuda {
namespace mma_detail {

// A whole kRows x kHeadDim tile (every row and column valid, 16-byte chunks allowed: the common case of a
// key tile) into shared memory as load_tile below lays it out. No tests per chunk: each thread issues its
// chunks' cp.async.
template <typename T, int kRows, int kHeadDim, int kThreads>
RELATTN_DEVICE void load_tile_full(T* s, const T* src, int64_t row_stride, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  constexpr int kTotal = kRows * kChunks;
  if constexpr (kThreads % kChunks == 0 && kTotal % kThreads == 0) {
    // A thread's chunks share their column and lie kStep rows apart: one 64-bit add per chunk.
    constexpr int kStep = kThreads / kChunks;
    const int r0 = tid / kChunks;
    const int col = (tid % kChunks) * 8;
    const T* g = src + r0 * row_stride + col;
    const int64_t step = kStep * row_stride;
    T* d = s + r0 * kLd + col;
#pragma unroll
    for (int n = 0; n < kTotal / kThreads; ++n) cp_async_16(d + n * kStep * kLd, g + n * step);
  } else {
#pragma unroll
    for (int n = 0; n < (kTotal + kThreads - 1) / kThreads; ++n) {
      const int c = tid + n * kThreads;
      if (c < kTotal) {
        const int r = c / kChunks;
        const int col = (c % kChunks) * 8;
        cp_async_16(s + r * kLd + col, src + r * row_stride + col);
      }
    }
  }
}

// kRows x kHeadDim tile of rows `src + r*row_stride` (cols < cols_valid, rows < rows_valid) into shared
// memory with row stride kHeadDim + 8; everything outside is zero. 16-byte chunks go through cp.async
// when `vec_ok`, else element by element (still correct, just slower). A whole tile takes load_tile_full
// (a uniform branch).
template <typename T, int kRows, int kHeadDim, int kThreads>
RELATTN_DEVICE void load_tile(T* s, const T* src, int64_t row_stride, int rows_valid, int cols_valid, bool vec_ok,
                              int tid) {
  if (vec_ok && rows_valid == kRows && cols_valid == kHeadDim) {
    load_tile_full<T, kRows, kHeadDim, kThreads>(s, src, row_stride, tid);
    return;
  }
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
#pragma unroll 2
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    T* dst = s + r * kLd + col;
    if (r < rows_valid && col < cols_valid) {
      const T* g = src + r * row_stride + col;
      if (vec_ok && col + 8 <= cols_valid) {
        cp_async_16(dst, g);
      } else {
        alignas(16) T tmp[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) tmp[e] = col + e < cols_valid ? g[e] : TypeInfo<T>::from_float(0.f);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
      }
    } else {
      st_shared_zero_16(dst);
    }
  }
}

// Rows [r0, r0+kRows) of a float table [R, X] (contiguous), converted to T, into a shared tile as above.
template <typename T, int kRows, int kHeadDim, int kThreads>
RELATTN_DEVICE void load_table_tile(T* s, const float* table, int64_t r0, int64_t R, int X, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    T* dst = s + r * kLd + col;
    if (r0 + r < R && col < X) {
      const float* g = table + (r0 + r) * int64_t(X) + col;
      alignas(16) T tmp[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) tmp[e] = TypeInfo<T>::from_float(col + e < X ? g[e] : 0.f);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
    } else {
      st_shared_zero_16(dst);
    }
  }
}

// Rows [0, rows) x cols [0, cols) of a tile staged in shared memory (row stride kHeadDim + 8) to global
// memory rows of `ld` elements: whole 16-byte chunks where the destination allows, else element-wise.
template <typename T, int kRows, int kHeadDim, int kThreads>
RELATTN_DEVICE void store_tile(T* dst, int64_t ld, const T* s, int rows, int cols, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kLd = kHeadDim + 8;
  const bool vec_ok = ld % 8 == 0 && (reinterpret_cast<uintptr_t>(dst) % 16) == 0;
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    if (r >= rows || col >= cols) continue;
    const T* src = s + r * kLd + col;
    T* out = dst + int64_t(r) * ld + col;
    if (vec_ok) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && col + e < cols; ++e) out[e] = src[e];
    }
  }
}

// Stages the key tile [j0, j0 + kBlockN) of a query tile starting at row i0 (kBlockM rows) into one
// shared-memory stage: K and V rows (cp.async where allowed), the padding bytes (1 beyond Lk) and the window
// of bucket ids, entry w holding the bucket of distance j0 - (i0 + kBlockM-1 + q_off) + w. `kg`/`vg`
// point at key 0 of this (b, kv head); `kpm` at this batch's mask row or null. The metadata is written
// with plain stores; like the cp.async data, it is read only after the next __syncthreads.
template <typename T, int kBlockM, int kBlockN, int kHeadDim, int kThreads, typename Params>
RELATTN_DEVICE void stage_key_tile(const Params& p, T* sK, T* sV, uint8_t* sKpm, int32_t* sWin, const T* kg,
                                   const T* vg, const uint8_t* kpm, int64_t i0, int64_t q_off, int64_t j0,
                                   int tid) {
  const int cols = static_cast<int>(p.Lk - j0 < kBlockN ? p.Lk - j0 : kBlockN);
  load_tile<T, kBlockN, kHeadDim, kThreads>(sK, kg + j0 * p.k_stride[2], p.k_stride[2], cols,
                                            static_cast<int>(p.D), p.k_vec_ok, tid);
  load_tile<T, kBlockN, kHeadDim, kThreads>(sV, vg + j0 * p.v_stride[2], p.v_stride[2], cols,
                                            static_cast<int>(p.Dv), p.v_vec_ok, tid);
  if (kpm) {
    for (int c = tid; c < kBlockN; c += kThreads)
      sKpm[c] = c < cols ? (kpm[(j0 + c) * p.key_padding_mask_stride[1]] != 0) : 1;
  }
  if (p.buckets) {
    const int64_t M = p.max_distance;
    const int64_t d0 = j0 - (i0 + kBlockM - 1 + q_off);
    for (int w = tid; w < kBlockM + kBlockN - 1; w += kThreads) {
      int64_t d = d0 + w;
      d = d < -M ? -M : (d > M ? M : d);
      sWin[w] = clamp_id(p.buckets[d + M], p.id_max);
    }
  }
}

// Distances [d_lo, d_hi] all beyond ±M on one side share one bucket: 1 when all are <= -M (buckets[0]),
// 2 when all are >= M (buckets[2M]), 0 otherwise.
RELATTN_DEVICE int far_side(int64_t d_lo, int64_t d_hi, int64_t M) {
  return d_hi <= -M ? 1 : (d_lo >= M ? 2 : 0);
}

// The rel_index ids of query row i from key j0 on (element c at [c * p.rel_index_stride[2]]); null when
// `ok` is false (no rel_index, or a padding row).
template <typename Params>
RELATTN_DEVICE const int32_t* rel_index_row(const Params& p, bool ok, int64_t b, int64_t i, int64_t j0) {
  return ok ? p.rel_index + b * p.rel_index_stride[0] + i * p.rel_index_stride[1] + j0 * p.rel_index_stride[2]
            : nullptr;
}

// acc[kMT][kNT] = Q_warp (kMT*16 x kHeadDim, from shared) · B (kNT*8 x kHeadDim rows, from shared)ᵀ.
template <typename T, int kHeadDim, int kMT, int kNT>
RELATTN_DEVICE void gemm_qk(float (&acc)[kMT][kNT][4], const T* sQ_warp, const T* sB, int lane) {
  static_assert(kNT % 2 == 0, "n tiles come in pairs (one ldmatrix.x4 each)");
  constexpr int kLd = kHeadDim + 8;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      // matrices: (rows 0-7, k 0-7) (rows 8-15, k 0-7) (rows 0-7, k 8-15) (rows 8-15, k 8-15) = a0..a3
      ldmatrix_x4(a[mt], sQ_warp + (mt * 16 + (lane & 15)) * kLd + kk * 16 + (lane >> 4) * 8);
    }
#pragma unroll
    for (int nt2 = 0; nt2 < kNT / 2; ++nt2) {
      // matrices: (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15) = b0 b1 of two n tiles
      uint32_t b[4];
      ldmatrix_x4(b, sB + (nt2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLd + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(acc[mt][2 * nt2], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * nt2 + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc_o[kMT][kHeadDim/8] += A (kMT*16 x kKT*16, as packed A fragments) · V (kKT*16 rows x kHeadDim, shared,
// row stride kLd: the backward at head dim 256 passes kHeadDim = 128 columns of a 256-wide tile).
template <typename T, int kHeadDim, int kMT, int kKT, int kLd = kHeadDim + 8>
RELATTN_DEVICE void gemm_pv(float (&acc_o)[kMT][kHeadDim / 8][4], const uint32_t (&pa)[kMT][kKT][4], const T* sV,
                            int lane) {
#pragma unroll
  for (int kk = 0; kk < kKT; ++kk) {
#pragma unroll
    for (int dt2 = 0; dt2 < kHeadDim / 16; ++dt2) {
      // transposed matrices: (k 0-7, n 0-7) (k 8-15, n 0-7) (k 0-7, n 8-15) (k 8-15, n 8-15) = b0 b1 of two n tiles
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + dt2 * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(acc_o[mt][2 * dt2], pa[mt][kk], b[0], b[1]);
        mma_16816<T>(acc_o[mt][2 * dt2 + 1], pa[mt][kk], b[2], b[3]);
      }
    }
  }
}

}  // namespace mma_detail

// kDropout (table instance only): the weights of V and of the bucket sums are p̃·z, z the pair's dropout
// factor (kernels/dropout.h), drawn in registers after l has taken every p̃. kSegments (table instance only;
// the dropout instance has it too): segment ids, tile ranges and the per-pair test. Each is compiled only
// into the instances that need it, so the others keep their registers.
template <typename T, int kHeadDim, bool kPlain, bool kDropout = false, bool kSegments = kDropout>
__global__ void __launch_bounds__(kMmaThreads) forward_mma_kernel(const __grid_constant__ ForwardParams p) {
  static_assert(!(kPlain && (kDropout || kSegments)), "dropout and segments run in the table instance");
  static_assert(!kDropout || kSegments, "the dropout instance runs segments too");
  using namespace mma_detail;
  using Cfg = MmaConfig<kHeadDim, kPlain>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int LD = Cfg::kLd;
  constexpr int kWin = Cfg::kWin;
  constexpr int kThreads = kMmaThreads;
  constexpr int kRowsPerWarp = BM / 4;
  constexpr int kMT = kRowsPerWarp / 16;  // m16 tiles per warp
  constexpr int kNT = BN / 8;             // n8 tiles of a score tile
  constexpr int kDT = kHeadDim / 8;       // n8 tiles of the output
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + Cfg::kOffK);
  T* sV = reinterpret_cast<T*>(smem + Cfg::kOffV);
  int32_t* sWin = reinterpret_cast<int32_t*>(smem + Cfg::kOffWin);
  uint8_t* sKpm = smem + Cfg::kOffKpm;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;   // row within an m16 tile (and +8)
  const int tq = lane & 3;   // column pair within an n8 tile
  const int warp_row0 = warp * kRowsPerWarp;

  const int64_t slot = blockIdx.x;  // (the table scratch's row block: one per CTA, key chunks included)
  QueryTile tile;
  {
    const int64_t chunk = key_chunk<BM>(p, slot);
    tile = query_tile<BM>(p, slot - chunk * tiles_per_key_chunk<BM>(p));
    if constexpr (kSegments) clip_to_segments(p, tile);
    clip_to_key_chunk(p, tile, chunk);
  }
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, kv_head = tile.kv_head, i0 = tile.i0, q_off = tile.q_off;
  const int rows = tile.rows;
  const int D = static_cast<int>(p.D);
  const int Dv = static_cast<int>(p.Dv);
  const int64_t R = p.R;
  const int64_t M = p.max_distance;
  const bool has_tab = !kPlain && p.has_tab();
  const bool has_bsum = !kPlain && p.has_bsum();
  const bool use_window = !kPlain && p.buckets != nullptr;
  const bool use_index = !kPlain && p.rel_index != nullptr;
  const bool distinct = use_window && p.buckets_distinct;
  const bool runs = use_window && p.buckets_runs;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1];
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] : nullptr;

  const int64_t j_end = tile.key_end;
  const int64_t n_tiles = (j_end + BN - 1) / BN;
  const int64_t t_first = tile.key_begin / BN;  // the first key tile (segments, key chunks; else 0)

  auto issue_tile = [&](int64_t t, int stage) {
    stage_key_tile<T, BM, BN, kHeadDim, kThreads>(p, sK + stage * BN * LD, sV + stage * BN * LD, sKpm + stage * BN,
                                                  sWin + stage * kWin, kg, vg, kpm, i0, q_off, t * BN, tid);
  };

  load_tile<T, BM, kHeadDim, kThreads>(sQ, qg, p.q_stride[2], rows, D, p.q_vec_ok, tid);
  cp_async_commit();
  if (t_first < n_tiles) issue_tile(t_first, 0);
  cp_async_commit();

  // Per-row tables of this tile: shared memory, or this CTA's own rows of the global scratch.
  float* tab = nullptr;
  float* bsum = nullptr;
  const int64_t ld = p.table_ld;
  {
    float* smem_tables = reinterpret_cast<float*>(smem + Cfg::kOffTables);
    const int64_t n = int64_t(BM) * ld;
    if (has_tab) tab = p.tables_in_global ? static_cast<float*>(p.tab_scratch) + slot * n : smem_tables;
    if (has_bsum)
      bsum = p.tables_in_global ? static_cast<float*>(p.bsum_scratch) + slot * n
                                : smem_tables + (has_tab ? n : 0);
  }

  const float scale = static_cast<float>(p.scale);
  float acc_s[kMT][kNT][4];
  // bsum row of this thread's row (mt, hf) times s; the quad's 4 lanes split the row.
  auto scale_bsum_row = [&](int mt, int hf, float s) {
    float* br = bsum + (warp_row0 + mt * 16 + g + hf * 8) * ld;
    for (int64_t r = tq; r < R; r += 4) br[r] *= s;
  };

  if (has_tab) {
    // tab2[i, r] = log2e * (scale * q_i·aK[r] + bias[h, r]); aK rows pass through K stage 1 (stage 0 holds
    // the first key tile, already in flight).
    cp_async_wait<1>();  // Q has landed
    __syncthreads();
    const float* rk = p.rel_k ? static_cast<const float*>(p.rel_k) + h * p.rel_k_head_stride : nullptr;
    const float* bias = p.rel_bias ? static_cast<const float*>(p.rel_bias) + h * R : nullptr;
    for (int64_t r0 = 0; r0 < R; r0 += BN) {
      if (rk) {
        load_table_tile<T, BN, kHeadDim, kThreads>(sK + BN * LD, rk, r0, R, D, tid);
        __syncthreads();
        gemm_qk<T, kHeadDim, kMT, kNT>(acc_s, sQ + warp_row0 * LD, sK + BN * LD, lane);
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = warp_row0 + mt * 16 + g + (e >> 1) * 8;
            const int64_t r = r0 + nt * 8 + 2 * tq + (e & 1);
            if (r < R) {
              float v = rk ? acc_s[mt][nt][e] * scale : 0.f;
              if (bias) v += bias[r];
              tab[row * ld + r] = v * kLog2e;
            }
          }
      __syncthreads();  // K stage 1 is refilled by the next chunk, or by the key loop
    }
  }
  if (has_bsum) {
    // Zero this warp's rows (only this warp touches them until the end).
    for (int64_t x = lane; x < int64_t(kRowsPerWarp) * ld; x += 32) bsum[int64_t(warp_row0) * ld + x] = 0.f;
    __syncwarp();
  }

  const float scale_log2 = scale * kLog2e;
  const float slope_log2 = p.alibi_slopes ? static_cast<const float*>(p.alibi_slopes)[h] * kLog2e : 0.f;
  // Scores that are the scaled dot product alone (the plain instance without ALiBi, scale > 0) keep it
  // unscaled: the softmax takes the row max of the raw scores times scale·log2e and p = 2^(s·scale·log2e -
  // m) in one FFMA, as FlashAttention does; otherwise the scores are scaled first (relative terms are
  // added in log2 units) and exp_mul = 1 (fmaf(s, 1, -m) = s - m exactly).
  const bool fold_scale = kPlain && slope_log2 == 0.f && scale_log2 > 0.f;
  const float exp_mul = fold_scale ? scale_log2 : 1.f;
  const int32_t bucket_first = use_window ? clamp_id(p.buckets[0], p.id_max) : 0;      // every distance <= -M
  const int32_t bucket_last = use_window ? clamp_id(p.buckets[2 * M], p.id_max) : 0;  // every distance >= M

  float row_max[kMT][2];  // running max of s2 (log2 units), -inf until a key is seen
  float row_sum[kMT][2];  // this thread's part of l (the quad's 4 lanes add up at the end)
  // Tiles where a row's distances all lie beyond ±M (most tiles of a long sequence) touch no table memory:
  // the row's two far table values sit in registers, and so do its bucket sums of those tiles (this lane's
  // part, rescaled with l). The bsum row in memory is rescaled lazily: bscale is the product of the
  // corrections since the row last added to it, applied before its next window tile and at the end.
  float tab_far[kMT][2][2];  // [.][.][0]: tab2 of bucket_first, [1]: of bucket_last
  float bsum_far[kMT][2][2];
  float bscale[kMT][2];
  float acc_o[kMT][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_max[mt][hf] = kNegInf;
      row_sum[mt][hf] = 0.f;
      bscale[mt][hf] = 1.f;
      const int row = warp_row0 + mt * 16 + g + hf * 8;
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        tab_far[mt][hf][x] = has_tab && use_window ? tab[row * ld + (x ? bucket_last : bucket_first)] : 0.f;
        bsum_far[mt][hf][x] = 0.f;
      }
    }
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
  }

  for (int64_t t = t_first; t < n_tiles; ++t) {
    const int stage = static_cast<int>((t - t_first) & 1);
    if (t + 1 < n_tiles) issue_tile(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just issued has landed
    __syncthreads();

    const int64_t j0 = t * BN;
    gemm_qk<T, kHeadDim, kMT, kNT>(acc_s, sQ + warp_row0 * LD, sK + stage * BN * LD, lane);

    // Scores in log2 units with the relative terms; then, only where this warp's rows need them (a last
    // partial tile, the causal diagonal, key padding: a warp-uniform test), the masks. Interior tiles, most
    // of a long sequence, spend nothing on masking.
    const int lk_lim = static_cast<int>(p.Lk - j0 < BN ? p.Lk - j0 : BN);  // columns inside Lk
    int row_far[kMT][2];  // 1: the row's distances in this tile are all <= -M, 2: all >= M, 0: neither
    // The same for every row of the warp at once (from its first and last row), 0 unless all rows agree;
    // not at head dim 32, where the path below made ptxas spill 20 bytes on sm_90.
    const int64_t wpos = i0 + warp_row0 + q_off;  // the warp's first row's position
    const int warp_far =
        !kPlain && kHeadDim >= 64 && use_window ? far_side(j0 - (wpos + kRowsPerWarp - 1), j0 + BN - 1 - wpos, M) : 0;
    if constexpr (kPlain) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) row_far[mt][0] = row_far[mt][1] = 0;
      if (!fold_scale) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] *= scale_log2;
      }
    } else if (warp_far != 0) {
      // Every row of the warp has all its distances in this tile beyond ±M on the same side (most tiles of
      // a long sequence): one table value per row, no per-element branches. (The same values as below.)
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          row_far[mt][hf] = warp_far;
          const float tab_row = warp_far == 1 ? tab_far[mt][hf][0] : tab_far[mt][hf][1];
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e1 = 0; e1 < 2; ++e1) {
              float s = acc_s[mt][nt][hf * 2 + e1] * scale_log2;
              if (has_tab) s += tab_row;
              acc_s[mt][nt][hf * 2 + e1] = s;
            }
        }
    } else {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = warp_row0 + mt * 16 + g + hf * 8;
          const int64_t dj = j0 - (i0 + row + q_off);  // distance of the tile's first column
          const int far = use_window ? far_side(dj, dj + BN - 1, M) : 0;
          row_far[mt][hf] = far;
          const float tab_row = far == 1 ? tab_far[mt][hf][0] : tab_far[mt][hf][1];
          const int32_t* ri_row = rel_index_row(p, use_index && row < rows, b, i0 + row, j0);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e1 = 0; e1 < 2; ++e1) {
              const int c = nt * 8 + 2 * tq + e1;
              float s = acc_s[mt][nt][hf * 2 + e1] * scale_log2;
              if (has_tab) {
                if (far) {
                  s += tab_row;
                } else {
                  int beta = 0;
                  if (use_window) beta = sWin[stage * kWin + c - row + BM - 1];
                  else if (ri_row && c < lk_lim) beta = clamp_id(ri_row[c * p.rel_index_stride[2]], p.id_max);
                  s += tab[row * ld + beta];
                }
              }
              acc_s[mt][nt][hf * 2 + e1] = s;
            }
          }
        }
      }
    }
    if (slope_log2 != 0.f) {  // ALiBi (a uniform branch, once per tile)
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int64_t dj = j0 - (i0 + warp_row0 + mt * 16 + g + hf * 8 + q_off);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e1 = 0; e1 < 2; ++e1)
              acc_s[mt][nt][hf * 2 + e1] -= slope_log2 * fabsf(static_cast<float>(dj + nt * 8 + 2 * tq + e1));
        }
    }
    // Segments: a per-pair test unless the tile lies inside the segment of every row of the warp (sorted
    // ids); warp-uniform. Padding rows of the last query tile test as its last row.
    const int warp_rows = rows - warp_row0 < kRowsPerWarp ? rows - warp_row0 : kRowsPerWarp;
    const bool seg_test =
        kSegments && warp_rows > 0 && segment_test_needed(p, b, i0 + warp_row0, warp_rows, j0, lk_lim);
    if (kpm || seg_test || lk_lim < BN || (p.causal && j0 + BN - 1 > i0 + warp_row0 + q_off)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          // columns c < col_lim are inside Lk and, with causal masking, not after the row's position
          // (j - pos <= 0  <=>  c < 1 - dj)
          const int row = warp_row0 + mt * 16 + g + hf * 8;
          const int64_t dj = j0 - (i0 + row + q_off);
          int64_t lim = lk_lim;
          if (p.causal && 1 - dj < lim) lim = 1 - dj;
          const int col_lim = static_cast<int>(lim < 0 ? 0 : lim);
          const int32_t row_seg = seg_test ? q_segment(p, b, i0 + (row < rows ? row : rows - 1)) : 0;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e1 = 0; e1 < 2; ++e1) {
              const int c = nt * 8 + 2 * tq + e1;
              if (c >= col_lim || (kpm && sKpm[stage * BN + c]) || (seg_test && k_segment(p, b, j0 + c) != row_seg))
                acc_s[mt][nt][hf * 2 + e1] = kNegInf;
            }
          }
        }
      }
    }

    // Online softmax; P overwrites S.
    float corr[kMT][2];
    float psum[kMT][2];
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float tile_max = kNegInf;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
          tile_max = fmaxf(tile_max, fmaxf(acc_s[mt][nt][hf * 2], acc_s[mt][nt][hf * 2 + 1]));
        // (folded: max(a_j) * c = max(a_j * c) for c > 0, rounding included: rounding is monotone)
        const float mx = fmaxf(row_max[mt][hf], quad_max(tile_max) * exp_mul);
        const float m_use = mx == kNegInf ? 0.f : mx;  // a row with nothing visible yet: p = 0, no NaN
        corr[mt][hf] = exp2_ftz(row_max[mt][hf] - m_use);
        row_max[mt][hf] = mx;
        rescale |= corr[mt][hf] != 1.f;
        float ps = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1) {
            const float pv = exp2_ftz(fmaf(acc_s[mt][nt][hf * 2 + e1], exp_mul, -m_use));
            acc_s[mt][nt][hf * 2 + e1] = pv;
            ps += pv;
          }
        psum[mt][hf] = ps;
        row_sum[mt][hf] = row_sum[mt][hf] * corr[mt][hf] + ps;
      }
    }
    if constexpr (kDropout) {
      uint32_t k0, k1;
      dropout_key(*p.dropout_seed, k0, k1);
      for_dropout_factors<kMT, kNT>(p, k0, k1, b, h, i0 + warp_row0, j0, g, tq,
                                    [&](int mt, int nt, int e, float z) { acc_s[mt][nt][e] *= z; });
      // far rows add their row sum to the bucket sums: the dropped weights' (l keeps the undropped ones)
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float ps = 0.f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) ps += acc_s[mt][nt][hf * 2] + acc_s[mt][nt][hf * 2 + 1];
          psum[mt][hf] = ps;
        }
    }
    // O *= corr, skipped when no row of the warp has a new maximum (corr = 1 exactly: the same bits), as in
    // most tiles of a long row once its largest scores have been seen.
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= corr[mt][e >> 1];
    }

    if (has_bsum) {
      // Far rows add their row sum to a register; rows with several buckets in this tile first apply their
      // pending rescale to the bsum row (the quad's lanes split it), then add their elements. The order of
      // the additions is fixed (bit-identical results run to run). A warp whose rows are all far in this
      // tile skips the memory part.
      bool any_window = false;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const float c = corr[mt][hf];
          const int far = row_far[mt][hf];
          bscale[mt][hf] *= c;
          bsum_far[mt][hf][0] = bsum_far[mt][hf][0] * c + (far == 1 ? psum[mt][hf] : 0.f);
          bsum_far[mt][hf][1] = bsum_far[mt][hf][1] * c + (far == 2 ? psum[mt][hf] : 0.f);
          any_window |= far == 0;
        }
      if (__any_sync(0xffffffffu, any_window)) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            if (row_far[mt][hf] == 0 && bscale[mt][hf] != 1.f) {
              scale_bsum_row(mt, hf, bscale[mt][hf]);
              bscale[mt][hf] = 1.f;
            }
          }
        __syncwarp();
        if (distinct) {
          // Every key of a window row has its own distance: those beyond ±M go to the far registers, the
          // others have buckets of their own, so the quad's lanes add at once: in global memory without
          // waiting (red.add: one addition per address in this tile, so the result is deterministic), in
          // shared memory four loads before four stores.
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              if (row_far[mt][hf] != 0) continue;
              const int row = warp_row0 + mt * 16 + g + hf * 8;
              const int64_t dj = j0 - (i0 + row + q_off);
              float* br = bsum + row * ld;
#pragma unroll
              for (int nt2 = 0; nt2 < kNT / 2; ++nt2) {
                int idx[4];
                float val[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  const int nt = 2 * nt2 + (u >> 1), e1 = u & 1;
                  const int c = nt * 8 + 2 * tq + e1;
                  const float pv = acc_s[mt][nt][hf * 2 + e1];
                  const int side = far_side(dj + c, dj + c, M);
                  bsum_far[mt][hf][0] += side == 1 ? pv : 0.f;
                  bsum_far[mt][hf][1] += side == 2 ? pv : 0.f;
                  idx[u] = pv != 0.f && side == 0 ? sWin[stage * kWin + c - row + BM - 1] : -1;
                  val[u] = pv;
                }
                if (p.tables_in_global) {
#pragma unroll
                  for (int u = 0; u < 4; ++u)
                    if (idx[u] >= 0) red_add_global(br + idx[u], val[u]);
                } else {
                  float old[4];
#pragma unroll
                  for (int u = 0; u < 4; ++u) old[u] = idx[u] >= 0 ? br[idx[u]] : 0.f;
#pragma unroll
                  for (int u = 0; u < 4; ++u)
                    if (idx[u] >= 0) br[idx[u]] = old[u] + val[u];
                }
              }
            }
          __syncwarp();
        } else if (runs) {
          // Each bucket's keys are consecutive in a row (T5): the quad sums every run with a segmented scan
          // and the lane holding its last key adds it, one addition per address in this tile.
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const int row = warp_row0 + mt * 16 + g + hf * 8;
              const bool active = row_far[mt][hf] == 0;
              const int win = stage * kWin - row + BM - 1;
              float* br = bsum + row * ld;
              quad_run_sums<kNT>(
                  tq, [&](int nt, int e1) { return acc_s[mt][nt][hf * 2 + e1]; },
                  [&](int c) { return sWin[win + c]; },
                  [&](int beta, float sum) {
                    if (!active || sum == 0.f) return;
                    if (p.tables_in_global) red_add_global(br + beta, sum);
                    else br[beta] += sum;
                  });
            }
          __syncwarp();
        } else {
          // Keys of a row may share a bucket: the quad's 4 lanes add their elements in turn (read-modify-
          // writes: red.add here made ptxas spill 200 bytes in the hd 96 table instance).
          for (int turn = 0; turn < 4; ++turn) {
            if (tq == turn) {
#pragma unroll
              for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                  if (row_far[mt][hf] != 0) continue;
                  const int row = warp_row0 + mt * 16 + g + hf * 8;
                  float* br = bsum + row * ld;
                  const int32_t* ri_row = rel_index_row(p, use_index && row < rows, b, i0 + row, j0);
#pragma unroll
                  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e1 = 0; e1 < 2; ++e1) {
                      const float pv = acc_s[mt][nt][hf * 2 + e1];
                      if (pv != 0.f) {  // masked keys (p = 0) may have no valid id
                        const int c = nt * 8 + 2 * tq + e1;
                        int beta = 0;
                        if (use_window) beta = sWin[stage * kWin + c - row + BM - 1];
                        else if (ri_row) beta = ri_row[c * p.rel_index_stride[2]];
                        // An unchecked id outside [0, R) is left out here rather than clamped (params.h):
                        // a clamp made ptxas spill 200 bytes in the hd 96 table instance.
                        if (static_cast<uint32_t>(beta) <= p.id_max) br[beta] += pv;
                      }
                    }
                }
            }
            __syncwarp();
          }
        }
      }
    }

    // O += P V, P in the input dtype straight from the S accumulators.
    uint32_t pa[kMT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[mt][kk][0] = TypeInfo<T>::pack(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
        pa[mt][kk][1] = TypeInfo<T>::pack(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
        pa[mt][kk][2] = TypeInfo<T>::pack(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
        pa[mt][kk][3] = TypeInfo<T>::pack(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
      }
    gemm_pv<T, kHeadDim, kMT, BN / 16>(acc_o, pa, sV + stage * BN * LD, lane);
    __syncthreads();  // this stage is refilled two iterations on
  }
  if (has_bsum) {
    // The pending rescales, then the far tiles' sums.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        if (bscale[mt][hf] != 1.f) scale_bsum_row(mt, hf, bscale[mt][hf]);
      }
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float lo = quad_sum(bsum_far[mt][hf][0]);  // every lane shuffles
        const float hi = quad_sum(bsum_far[mt][hf][1]);
        if (use_window && tq == 0) {
          float* br = bsum + (warp_row0 + mt * 16 + g + hf * 8) * ld;
          br[bucket_first] += lo;
          br[bucket_last] += hi;
        }
      }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Normalise: O / l; a row that saw no key keeps O = 0 and gets lse = -inf.
  float inv_l[kMT][2];
  float lse_row[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(row_sum[mt][hf]);
      // (l = 0: no key; a NaN l, from a NaN score, makes the row's out and lse NaN as the formula's)
      inv_l[mt][hf] = l != 0.f ? 1.f / l : 0.f;
      lse_row[mt][hf] = l != 0.f ? (row_max[mt][hf] + log2f(l)) * kLn2 : kNegInf;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc_o[mt][dt][hf * 2] *= inv_l[mt][hf];
        acc_o[mt][dt][hf * 2 + 1] *= inv_l[mt][hf];
      }
    }

  if (has_bsum) {
    // O += (bsum / l) · aV, the normalised sums (in [0, 1]) as A fragments, aV rows through V stage 0.
    const float* rv = static_cast<const float*>(p.rel_v) + h * p.rel_v_head_stride;
    for (int64_t r0 = 0; r0 < R; r0 += BN) {
      load_table_tile<T, BN, kHeadDim, kThreads>(sV, rv, r0, R, Dv, tid);
      __syncthreads();
      uint32_t pa[kMT][BN / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const float* ra = bsum + (warp_row0 + mt * 16 + g) * ld;
        const float* rb = ra + 8 * ld;
        const float ia = inv_l[mt][0], ib = inv_l[mt][1];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          const int64_t k = r0 + kk * 16 + 2 * tq;
          auto at = [&](const float* rowp, int64_t kx, float inv) { return kx < R ? rowp[kx] * inv : 0.f; };
          pa[mt][kk][0] = TypeInfo<T>::pack(at(ra, k, ia), at(ra, k + 1, ia));
          pa[mt][kk][1] = TypeInfo<T>::pack(at(rb, k, ib), at(rb, k + 1, ib));
          pa[mt][kk][2] = TypeInfo<T>::pack(at(ra, k + 8, ia), at(ra, k + 9, ia));
          pa[mt][kk][3] = TypeInfo<T>::pack(at(rb, k + 8, ib), at(rb, k + 9, ib));
        }
      }
      gemm_pv<T, kHeadDim, kMT, BN / 16>(acc_o, pa, sV, lane);
      __syncthreads();
    }
  }

  if (p.num_splits > 1) {
    // A key chunk of a split decode step: its normalised rows in fp32 and its lse, for launch_combine_splits.
    const int64_t row0 = (key_chunk<BM>(p, slot) * p.B * p.H + bh) * p.Lq + i0;
    float* op = static_cast<float*>(p.out_partial) + row0 * Dv;
    float* lp = static_cast<float*>(p.lse_partial) + row0;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = warp_row0 + mt * 16 + g + hf * 8;
        if (row >= rows) continue;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          const int c = dt * 8 + 2 * tq;
          if (c < Dv) op[row * Dv + c] = acc_o[mt][dt][hf * 2];
          if (c + 1 < Dv) op[row * Dv + c + 1] = acc_o[mt][dt][hf * 2 + 1];
        }
        if (tq == 0) lp[row] = lse_row[mt][hf];
      }
    return;
  }

  // Output through shared memory (Q's space) so that global stores are whole 16-byte rows.
  T* sO = sQ;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + mt * 16 + g + hf * 8;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        *reinterpret_cast<uint32_t*>(sO + row * LD + dt * 8 + 2 * tq) =
            TypeInfo<T>::pack(acc_o[mt][dt][hf * 2], acc_o[mt][dt][hf * 2 + 1]);
      }
      if (tq == 0 && row < rows) static_cast<float*>(p.lse)[bh * p.Lq + i0 + row] = lse_row[mt][hf];
    }
  __syncthreads();
  store_tile<T, BM, kHeadDim, kThreads>(static_cast<T*>(p.out) + (bh * p.Lq + i0) * int64_t(Dv), Dv, sO, rows, Dv,
                                        tid);
}

template <typename T, int kHeadDim>
cudaError_t launch_forward_mma(const ForwardParams& p, int64_t smem_bytes, cudaStream_t stream) {
  auto ctas = [&](int block_m) { return (p.Lq + block_m - 1) / block_m * p.B * p.H * p.num_splits; };
  if (p.use_plain()) {  // no relative tables: the plain instance (MmaConfig<hd, true>)
    return launch_kernel(forward_mma_kernel<T, kHeadDim, true>, ctas(MmaConfig<kHeadDim, true>::kBlockM),
                         kMmaThreads, smem_bytes, stream, p);
  }
  const int64_t blocks = ctas(MmaConfig<kHeadDim>::kBlockM);
  if (p.dropout_seed != nullptr)  // dropout (and segments, if given)
    return launch_kernel(forward_mma_kernel<T, kHeadDim, false, true>, blocks, kMmaThreads, smem_bytes, stream, p);
  if (p.has_segments())
    return launch_kernel(forward_mma_kernel<T, kHeadDim, false, false, true>, blocks, kMmaThreads, smem_bytes,
                         stream, p);
  return launch_kernel(forward_mma_kernel<T, kHeadDim, false>, blocks, kMmaThreads, smem_bytes, stream, p);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

// Fused CPU kernels of relattn: forward and backward, tiled exactly as the CUDA kernels are.
//
// Forward, per (b, h, block of Bq query rows), streaming key blocks of Bk (SPEC §1-2, kernels/params.h):
//   tab[i,r] = scale*q_i·aK[r] + bias[h,r]                      one [Bq,R] GEMM per query block
//   S        = scale*Q Kᵀ + tab[i,β(i,j)] - m_h|d| (+ -inf masks)
//   online softmax:  m_i, l_i, acc_i = Σ p̃_ij v_j,  bsum[i,r] = Σ_{j:β=r} p̃_ij  (all rescaled by
//                    exp(m_old - m_new) like the output accumulator)
//   out_i    = (acc_i + bsum_i · aV) / l_i,  lse_i = m_i + log l_i
// In a row of a tile, the keys at distance <= -M and those at >= M see one bucket each, so their gathers
// are one value and their bucket sums are row sums; only the window between is gathered key by key
// (RowBuckets). A row whose tile lies beyond ±M is the single-bucket fast path.
//
// Backward, fused (backward_group_strip): one task per (b, kv head) owns every row and key of its heads and
//   takes its query blocks in turn, 5 GEMMs per tile (S, dP; dv += Pᵀ dO, dk += dSᵀ Q, dq += dS K). A block
//   first runs pass A's sweep below, keeping each tile's P and P∘dP (the block's "strip") and finding Δ
//   exactly (Σ_j P∘dP in acc_t, never from a float16/bfloat16 `out`, whose rounding would enter dS), then
//   sweeps its strip to form dS and add the three gradient GEMMs.
//   With too few (b, kv head) pairs for the threads, each pair's query blocks are split into chunks, one
//   task each, adding dk and dv into per-chunk partial sums that reduce_chunks adds up in order.
// Otherwise (very long keys; partial sums too large), two passes, so that nothing is written by two tasks
// (deterministic, no atomics):
//   pass A per (b, h, query block): row tables tab and doa[i,r] = do_i·aV[r], P = exp(S - lse),
//     dP = dO Vᵀ + doa[i,β]; Δ_i = Σ_j P_ij dP_ij - glse_i (= do_i·out_i - glse_i, in acc_t);
//     dq = scale*(dS K + dsb·aK) with dS = P∘(dP - Δ), and the bucket sums dsb[i,r] = Σ_{β=r} dS_ij and
//     psum[i,r] = Σ_{β=r} P_ij left behind for the tables.
//   pass B per (b, kv head, key block), over the heads of its group and all query blocks:
//     dv = Σ Pᵀ dO,  dk = scale * Σ dSᵀ Q.
//   The table gradients are then plain GEMMs of those row sums (table_grad_from_row_sums).
// Packed sequences (segment ids): a query block of a sorted row runs as 16-row runs that see the same
// sequences (for_each_key_run), each over its keys only; a key block sweeps only its sequences' queries.
// Threads take tasks from a shared counter (parallel_tasks): tasks of unequal cost keep every thread busy.
// Memory beyond inputs and outputs: per-thread tiles and strips plus O(B·H·Lq·R) row sums; never Lq×Lk.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../kernels/dropout.h"
#include "../../kernels/segments.h"
#include "../attention.h"
#include "blas.h"
#include "vec.h"

// at::parallel_for is inline: without -fopenmp (CMake links OpenMP::OpenMP_CXX) every call below would
// run on one thread, silently. CMake defines RELATTN_NO_OPENMP, with a warning, where no OpenMP exists.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && !defined(RELATTN_NO_OPENMP)
#error "relattn: the CPU kernels must be compiled with OpenMP (-fopenmp), as torch's parallel_for is"
#endif

namespace relattn {
namespace cpu {
namespace {

using kernels::AttentionBwdParams;
using kernels::AttentionParams;
using ops::OptTensor;
using ops::Tensor;

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
// The fused backward keeps a query block's probabilities for all its keys (backward_group_strip): its block
// shrinks to keep each such buffer near this size, and the auto choice takes the two passes where even 16
// rows would need more than kStripMaxBytes.
constexpr int64_t kStripBytes = int64_t(4) << 20;
constexpr int64_t kStripMaxBytes = int64_t(8) << 20;
// The partial dk, dv sums of a backward whose kv groups are split into chunks (reduce_chunks), all together.
constexpr int64_t kChunkBytes = int64_t(256) << 20;
// Grouped-query decoding: with at most kPackMaxLq queries and G = H / Hk > 1, a forward task takes all G
// query heads of a kv group at once (G·Lq tile rows, at most kPackMaxRows), so every key and value tile
// is read once per group instead of once per head (forward_block).
constexpr int64_t kPackMaxLq = 16;
constexpr int64_t kPackMaxRows = 256;
// Decode steps (at most kPackMaxLq queries) with fewer than kDecodeTasks (batch row, head tile) tasks split
// the keys into chunks of at least kSplitKeys, one task each, and combine the chunks' partial results
// (flash-decoding): a step of one batch row and few kv heads then still keeps every thread busy. The chunks
// are fixed by the shapes, never by the thread count, so results do not depend on it.
constexpr int64_t kSplitKeys = 2048;
constexpr int64_t kDecodeTasks = 64;

// Row loops of the hot path: float goes through the vectorised VecOps (vec.h), double through plain loops.
inline float row_max(const float* s, int64_t n) { return vec_ops().row_max(s, n); }
inline double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}
inline float exp_sub_sum(float* s, int64_t n, float m) { return vec_ops().exp_sub_sum(s, n, m); }
inline double exp_sub_sum(double* s, int64_t n, double m) {
  double t = 0;
  for (int64_t j = 0; j < n; ++j) t += (s[j] = std::exp(s[j] - m));
  return t;
}
inline void probs_dscores_row(float* s, float* dp, int64_t n, float lse, float delta) {
  vec_ops().probs_dscores(s, dp, n, lse, delta);
}
inline void probs_dscores_row(double* s, double* dp, int64_t n, double lse, double delta) {
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - lse);
    dp[j] = s[j] * (dp[j] - delta);
  }
}
inline float row_sum(const float* s, int64_t n) { return vec_ops().sum(s, n); }
inline double row_sum(const double* s, int64_t n) {
  double t = 0;
  for (int64_t j = 0; j < n; ++j) t += s[j];
  return t;
}
inline void sub_alibi(float* s, int64_t n, float slope, int64_t d0) { vec_ops().sub_alibi(s, n, slope, d0); }
inline void sub_alibi(double* s, int64_t n, double slope, int64_t d0) {
  for (int64_t j = 0; j < n; ++j) s[j] -= slope * static_cast<double>(std::abs(d0 + j));
}
inline void scale_row(float* s, int64_t n, float c) { vec_ops().scale(s, n, c); }
inline void scale_row(double* s, int64_t n, double c) {
  for (int64_t j = 0; j < n; ++j) s[j] *= c;
}

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

inline int64_t ld1(int64_t x) { return x > 0 ? x : 1; }  // BLAS leading dims must be >= 1

// Query blocks are handed out zig-zag (0, n-1, 1, n-2, ...) so that with causal masking the static
// chunks of parallel_for get similar work.
inline int64_t zigzag(int64_t slot, int64_t n) { return (slot % 2 == 0) ? slot / 2 : n - 1 - slot / 2; }

// n elements into acc_t / from acc_t (rounded to nearest even): float16/bfloat16 through the vectorised
// conversions where the CPU has them (vec.h; the same bits as c10's), anything else element by element.
template <typename scalar_t, typename acc_t>
inline void to_acc(const scalar_t* s, acc_t* d, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    if (const auto f = vec_ops().half_to_float) return f(reinterpret_cast<const uint16_t*>(s), d, n);
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    if (const auto f = vec_ops().bf16_to_float) return f(reinterpret_cast<const uint16_t*>(s), d, n);
  }
  for (int64_t j = 0; j < n; ++j) d[j] = static_cast<acc_t>(s[j]);
}
template <typename scalar_t, typename acc_t>
inline void from_acc(const acc_t* s, scalar_t* d, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    if (const auto f = vec_ops().float_to_half) return f(s, reinterpret_cast<uint16_t*>(d), n);
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    if (const auto f = vec_ops().float_to_bf16) return f(s, reinterpret_cast<uint16_t*>(d), n);
  }
  for (int64_t j = 0; j < n; ++j) d[j] = static_cast<scalar_t>(s[j]);
}
// rows x cols acc_t (leading dim ld), times c, into rows of `dst_ld` scalar_t. Scales src in place.
template <typename scalar_t, typename acc_t>
inline void store_rows(acc_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t c, scalar_t* dst, int64_t dst_ld) {
  for (int64_t i = 0; i < rows; ++i) {
    if (c != acc_t(1)) scale_row(src + i * ld, cols, c);
    from_acc(src + i * ld, dst + i * dst_ld, cols);
  }
}

// rows×cols block of a [.., L, X] tensor (row stride `stride`, unit last stride) into acc_t [rows, ld].
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t cols, acc_t* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) to_acc(src + i * stride, dst + i * ld, cols);
}

// A rows×cols tile of a [.., L, X] tensor as acc_t rows: the tensor itself when it already is acc_t with
// a row stride BLAS accepts, else converted into `buf`. Returns the rows and their leading dim.
template <typename scalar_t, typename acc_t>
inline std::pair<const acc_t*, int64_t> tile_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t cols,
                                                  acc_t* buf, int64_t buf_ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride >= std::max<int64_t>(cols, 1) && stride < (int64_t(1) << 31)) return {src, stride};
  }
  load_rows(src, stride, rows, cols, buf, buf_ld);
  return {buf, buf_ld};
}

// The buckets of one row of a tile: columns [0, a) all lie at distance <= -M (bucket `left`), columns
// [b, cols) at distance >= M (bucket `right`), and the window [a, b) has an id per column (ids[j]). A row
// whose tile lies beyond ±M has an empty window and sees one bucket (the single-bucket fast path); a row
// that straddles the window pays per-column gathers for at most 2M - 1 columns, however wide the tile.
// rel_index has no "beyond": its window is the whole row.
struct RowBuckets {
  int32_t a, b, left, right;
};

// Per-thread tiles, for query tiles of up to `rows` rows.
template <typename acc_t>
struct Tiles {
  int64_t D1, Dv1, R1;
  std::vector<acc_t> q, k, v, s, dp, dout, tab, doa, bsum, acc, m, l, dq, pk, rowacc, dsb, psum, dk, dv;
  std::vector<acc_t> keep, pdsum;  // dropout: the tile's factors (0 or 1/(1-p)); pass A's sums of dropped P
  // The fused sweep (backward_group_strip), sized by it: a query block's P, T = P∘dP and (dropout) Z∘P for
  // all its key tiles, and (float16/bfloat16) the task's dk, dv sums over its kv head's keys.
  std::vector<acc_t> strip_p, strip_t, strip_zp, gk, gv;
  std::vector<int32_t> ids;
  std::vector<RowBuckets> row_buckets;
  Tiles(const AttentionParams& p, bool backward, int64_t rows = kBlockQ)
      : D1(ld1(p.D)), Dv1(ld1(p.Dv)), R1(ld1(p.R)) {
    q.resize(rows * D1);
    k.resize(kBlockK * D1);
    v.resize(kBlockK * Dv1);
    s.resize(rows * kBlockK);
    tab.resize(rows * R1);
    bsum.resize(rows * R1);
    ids.resize(rows * kBlockK);
    row_buckets.resize(rows);
    if (p.has_dropout()) {
      keep.resize(rows * kBlockK);
      if (backward) pdsum.resize(rows * R1);
    }
    if (!backward) {
      acc.resize(rows * Dv1);
      m.resize(rows);
      l.resize(rows);
    } else {
      dp.resize(kBlockQ * kBlockK);
      dout.resize(kBlockQ * Dv1);
      doa.resize(kBlockQ * R1);
      dq.resize(kBlockQ * D1);
      pk.resize(kBlockQ * D1);
      rowacc.resize(kBlockQ);
      dsb.resize(kBlockQ * R1);
      psum.resize(kBlockQ * R1);
      dk.resize(kBlockK * D1);
      dv.resize(kBlockK * Dv1);
    }
  }
};

inline void bucket_ids(const AttentionParams& p, int64_t b, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                       int32_t* ids, RowBuckets* rb) {
  const int64_t pos0 = i0 + p.batch_q_offset(b);  // position of row i0 (read once: `ids` may alias it)
  for (int64_t i = 0; i < rows; ++i) {
    int32_t* id = ids + i * kBlockK;
    if (p.rel_index != nullptr) {
      const int32_t* src = p.rel_index + b * p.rel_index_stride[0] + (i0 + i) * p.rel_index_stride[1] + j0;
      for (int64_t j = 0; j < cols; ++j) id[j] = src[j];  // last dim contiguous (prepare)
      rb[i] = {0, static_cast<int32_t>(cols), 0, 0};
      continue;
    }
    const int64_t M = p.max_distance;
    const int64_t c = pos0 + i - j0;  // column of distance 0 (may lie outside the tile)
    // distance of column j is j - c: <= -M for j <= c - M, >= M for j >= c + M
    const int64_t a = std::clamp<int64_t>(c - M + 1, 0, cols);
    const int64_t e = std::max(a, std::clamp<int64_t>(c + M, 0, cols));
    rb[i] = {static_cast<int32_t>(a), static_cast<int32_t>(e), p.buckets[0], p.buckets[2 * M]};
    for (int64_t j = a; j < e; ++j) id[j] = p.buckets[j - c + M];  // 0 < j - c + M < 2M
  }
}

template <typename acc_t>
inline void add_const(acc_t* s, int64_t n, acc_t c) {
  for (int64_t j = 0; j < n; ++j) s[j] += c;
}

// s[j] += t[id[j]] for j < n (s and t never overlap).
template <typename acc_t>
inline void gather_add(acc_t* __restrict__ s, const acc_t* __restrict__ t, const int32_t* __restrict__ id,
                       int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] += t[id[j]];
}

// S[i, j] += row_table[i, β(i,j)] for a [rows, R] table with leading dim ldt.
template <typename acc_t>
inline void add_row_table(int64_t rows, int64_t cols, acc_t* S, const acc_t* table, int64_t ldt,
                          const int32_t* ids, const RowBuckets* rb) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* s = S + i * kBlockK;
    const acc_t* t = table + i * ldt;
    const RowBuckets r = rb[i];
    const int32_t* id = ids + i * kBlockK;
    if (r.a > 0) add_const(s, r.a, t[r.left]);
    gather_add(s + r.a, t, id + r.a, r.b - r.a);
    if (r.b < cols) add_const(s + r.b, cols - r.b, t[r.right]);
  }
}

// sums[i, β(i,j)] += X[i, j]
template <typename acc_t>
inline void add_bucket_sums(int64_t rows, int64_t cols, const acc_t* X, acc_t* sums, int64_t lds,
                            const int32_t* ids, const RowBuckets* rb) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* x = X + i * kBlockK;
    acc_t* out = sums + i * lds;
    const RowBuckets r = rb[i];
    const int32_t* id = ids + i * kBlockK;
    if (r.a > 0) out[r.left] += row_sum(x, r.a);
    if (r.a < r.b) {
      // Neighbours often share a bucket (clipped or T5-like ids): a run is summed in a register and
      // added once, instead of a chain of read-modify-writes of one address.
      int32_t cur = id[r.a];
      acc_t run = x[r.a];
      for (int64_t j = r.a + 1; j < r.b; ++j) {
        if (id[j] != cur) {
          out[cur] += run;
          cur = id[j];
          run = x[j];
        } else {
          run += x[j];
        }
      }
      out[cur] += run;
    }
    if (r.b < cols) out[r.right] += row_sum(x + r.b, cols - r.b);
  }
}

// Dropout factors of a tile (kernels/dropout.h): keep[i * kBlockK + j] = dropout_scale for a kept pair,
// 0 for a dropped one. One Philox call covers the 8 pairs of its counter (rows i, i + 8 of a 16-row block,
// four columns of a 16-column block), which needs i0 and j0 to be multiples of 16.
static_assert(kBlockQ % 16 == 0 && kBlockK % 16 == 0, "dropout counters group 16 x 16 blocks");
template <typename acc_t>
void dropout_tile(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                  int64_t cols, acc_t* keep) {
  uint32_t k0, k1;
  kernels::dropout_key(*p.dropout_seed, k0, k1);
  const uint32_t threshold = p.dropout_threshold;
  const acc_t scale = static_cast<acc_t>(p.dropout_scale);
  for (int64_t ib = 0; ib < rows; ib += 16) {
    for (int64_t r = 0; r < 8 && ib + r < rows; ++r) {
      const int64_t i = ib + r;  // rows i and i + 8
      acc_t* keep1 = i + 8 < rows ? keep + (i + 8) * kBlockK : nullptr;
      uint32_t ctr[4];
      kernels::dropout_counter(b, h, i0 + i, j0, ctr);
      if constexpr (std::is_same_v<acc_t, float>) {  // vectorised: 8 Philox calls at once (vec.h)
        vec_ops().dropout_rows(keep + i * kBlockK, keep1, cols, ctr[0], ctr[1], ctr[2], ctr[3], k0, k1, threshold,
                               scale);
      } else {
        kernels::dropout_rows(keep + i * kBlockK, keep1, cols, ctr[0], ctr[1], ctr[2], ctr[3], k0, k1, threshold,
                              scale);
      }
    }
  }
}

// x[i, j] *= keep[i, j] on a [rows, cols] tile (leading dims kBlockK), or into `dst` when given.
template <typename acc_t>
void apply_dropout(int64_t rows, int64_t cols, acc_t* x, const acc_t* keep, acc_t* dst = nullptr) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* kp = keep + i * kBlockK;
    const acc_t* xi = x + i * kBlockK;
    acc_t* d = (dst ? dst : x) + i * kBlockK;
    for (int64_t j = 0; j < cols; ++j) d[j] = xi[j] * kp[j];
  }
}

// ALiBi and the masks on a score tile.
template <typename acc_t>
inline void add_alibi_and_masks(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                                int64_t j0, int64_t cols, acc_t* S) {
  const acc_t slope = p.alibi_slopes ? static_cast<const acc_t*>(p.alibi_slopes)[h] : acc_t(0);
  const uint8_t* kpm = p.key_padding_mask ? p.key_padding_mask + b * p.key_padding_mask_stride[0] +
                                                j0 * p.key_padding_mask_stride[1]
                                          : nullptr;
  const int64_t pos0 = i0 + p.batch_q_offset(b);  // position of row i0
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* s = S + i * kBlockK;
    const int64_t pos = pos0 + i;
    if (p.alibi_slopes) {
      sub_alibi(s, cols, slope, j0 - pos);
    }
    if (kpm) {
      for (int64_t j = 0; j < cols; ++j)
        if (kpm[j * p.key_padding_mask_stride[1]]) s[j] = neg_inf<acc_t>();
    }
    if (p.causal) {
      for (int64_t j = std::max<int64_t>(0, pos - j0 + 1); j < cols; ++j) s[j] = neg_inf<acc_t>();
    }
  }
  if (kernels::segment_test_needed(p, b, i0, rows, j0, cols)) {  // kernels/segments.h
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* s = S + i * kBlockK;
      const int32_t q_id = kernels::q_segment(p, b, i0 + i);
      for (int64_t j = 0; j < cols; ++j)
        if (kernels::k_segment(p, b, j0 + j) != q_id) s[j] = neg_inf<acc_t>();
    }
  }
}

// Keys [begin, end) a query block can see: with causal masking none after its last query's position; with
// segments, only its rows' segments (the whole row of keys where a batch row's ids are not sorted). begin is
// a multiple of 16, as the dropout counters need (kernels/dropout.h); tiles then start there.
struct Range {
  int64_t begin, end;
};
inline Range key_range(const AttentionParams& p, int64_t b, int64_t i0, int64_t rows) {
  int64_t begin = 0, end = p.Lk;
  if (p.causal) end = std::min(end, std::max<int64_t>(0, i0 + rows - 1 + p.batch_q_offset(b) + 1));
  if (p.has_segments()) {
    int64_t lo, hi;
    kernels::segment_key_span(p, b, i0, rows, lo, hi);
    begin = lo / 16 * 16;
    end = std::min(end, hi);
  }
  return {begin, std::max(begin, end)};
}

// Query rows [begin, end) that can see a key of the block [j0, j0 + cols), begin a multiple of 16.
inline Range query_range(const AttentionParams& p, int64_t b, int64_t j0, int64_t cols) {
  int64_t begin, end;
  kernels::key_tile_queries(p, b, j0, cols, begin, end);  // kernels/segments.h
  begin = std::min(begin, p.Lq) / 16 * 16;
  return {begin, std::max(begin, end)};
}

// Calls fn(first row, rows) for the runs of query rows [i0, i0 + rows) that see the same keys of packed
// sequences: consecutive 16-row chunks (the dropout counters' grid) with one segment key span form a run.
// A block that straddles sequences then computes each side's keys for that side's rows only; the chunk that
// holds a boundary sees both. Without segments, or where a batch row's ids are not sorted (every span is
// the whole row), the block is one run.
template <typename Fn>
inline void for_each_key_run(const AttentionParams& p, int64_t b, int64_t i0, int64_t rows, const Fn& fn) {
  if (!p.has_segments() || p.segment_sorted[b] == 0 || rows <= 16) {
    fn(i0, rows);
    return;
  }
  auto span = [&](int64_t c) {
    int64_t lo, hi;
    kernels::segment_key_span(p, b, c, std::min<int64_t>(16, i0 + rows - c), lo, hi);
    return std::pair<int64_t, int64_t>{lo / 16, hi};
  };
  int64_t start = i0;
  std::pair<int64_t, int64_t> run = span(i0);
  for (int64_t c = i0 + 16; c < i0 + rows; c += 16) {
    const std::pair<int64_t, int64_t> next = span(c);
    if (next == run) continue;
    fn(start, c - start);
    start = c;
    run = next;
  }
  fn(start, i0 + rows - start);
}

// tab[i, r] = scale * q_i·aK[r] + bias[h, r]  ([rows, R1])
template <typename acc_t>
void row_key_table(const AttentionParams& p, int64_t h, int64_t rows, const acc_t* q, int64_t ldq, acc_t* tab,
                   int64_t ldt) {
  const int64_t R = p.R;
  if (p.rel_k) {
    const acc_t* rk = static_cast<const acc_t*>(p.rel_k) + h * p.rel_k_head_stride;
    mm_nt<acc_t>(rows, R, p.D, static_cast<acc_t>(p.scale), q, ldq, rk, ld1(p.D), acc_t(0), tab, ldt);
  } else {
    for (int64_t i = 0; i < rows; ++i) std::fill(tab + i * ldt, tab + i * ldt + R, acc_t(0));
  }
  if (p.rel_bias) {
    const acc_t* bias = static_cast<const acc_t*>(p.rel_bias) + h * R;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t r = 0; r < R; ++r) tab[i * ldt + r] += bias[r];
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// The ids of rows [0, n) copied to the rows of heads 1 … heads - 1 of a packed tile (forward_block): the
// buckets depend on the query and key positions only, which every head's rows share.
inline void repeat_bucket_ids(int64_t n, int64_t heads, int32_t* ids, RowBuckets* rb) {
  for (int64_t r = n; r < heads * n; ++r) {
    const RowBuckets src = rb[r % n];
    rb[r] = src;
    std::copy(ids + (r % n) * kBlockK + src.a, ids + (r % n) * kBlockK + src.b, ids + r * kBlockK + src.a);
  }
}

// A task's share of the keys, and where its results go. The default is all keys, results into out and lse;
// a key chunk of a split decode step (kSplitKeys) writes its normalised partial output and log-sum-exp,
// laid out as out ([B, H, Lq, Dv] and [B, H, Lq]), to its own slices of the partial buffers.
template <typename acc_t>
struct KeyChunk {
  int64_t begin = 0, end = std::numeric_limits<int64_t>::max();
  acc_t* out = nullptr;
  acc_t* lse = nullptr;
};

// One forward task: the query rows [i0, i0 + n) of the `heads` consecutive query heads h0, h0 + 1, … of one
// kv group, stacked into one tile (row r is query i0 + r % n of head h0 + r / n). heads = 1 is the plain
// query block; heads = G packs a grouped-query decode step, so that each key and value tile is read and
// multiplied once for the whole group. The per-head terms (row tables, ALiBi, dropout, aV, the outputs) are
// applied to each head's rows; masks and bucket ids depend on positions only.
template <typename scalar_t, typename acc_t>
void forward_block(const AttentionParams& p, int64_t b, int64_t h0, int64_t heads, int64_t i0, int64_t n,
                   Tiles<acc_t>& t, const KeyChunk<acc_t>& chunk = {}) {
  const int64_t g = h0 / (p.H / p.Hk);
  const int64_t rows = heads * n;
  const int64_t D1 = t.D1, Dv1 = t.Dv1, R1 = t.R1, R = p.R;
  const bool has_tab = p.rel_k || p.rel_bias;
  const bool buckets = p.has_bucket_terms();
  const acc_t scale = static_cast<acc_t>(p.scale);

  auto q_rows = [&](int64_t h) {
    return static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  };
  const acc_t* qt = t.q.data();
  int64_t ldq = D1;
  if (heads == 1) {
    std::tie(qt, ldq) = tile_rows(q_rows(h0), p.q_stride[2], n, p.D, t.q.data(), D1);
  } else {
    for (int64_t hh = 0; hh < heads; ++hh)
      load_rows(q_rows(h0 + hh), p.q_stride[2], n, p.D, t.q.data() + hh * n * D1, D1);
  }
  if (has_tab) {
    for (int64_t hh = 0; hh < heads; ++hh)
      row_key_table(p, h0 + hh, n, qt + hh * n * ldq, ldq, t.tab.data() + hh * n * R1, R1);
  }
  // (Only the block's rows: blocks of packed sequences can be a 16-row run.)
  std::fill_n(t.m.begin(), rows, neg_inf<acc_t>());
  std::fill_n(t.l.begin(), rows, acc_t(0));
  std::fill_n(t.acc.begin(), rows * Dv1, acc_t(0));
  if (p.rel_v) std::fill_n(t.bsum.begin(), rows * R1, acc_t(0));

  const auto* kbase = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + g * p.k_stride[1];
  const auto* vbase = static_cast<const scalar_t*>(p.v) + b * p.v_stride[0] + g * p.v_stride[1];
  Range keys = key_range(p, b, i0, n);
  keys.begin = std::max(keys.begin, chunk.begin);  // both multiples of 16 (dropout)
  keys.end = std::min(keys.end, chunk.end);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, keys.end - j0);
    const auto [kt, ldk] = tile_rows(kbase + j0 * p.k_stride[2], p.k_stride[2], cols, p.D, t.k.data(), D1);
    const auto [vt, ldv] = tile_rows(vbase + j0 * p.v_stride[2], p.v_stride[2], cols, p.Dv, t.v.data(), Dv1);
    acc_t* S = t.s.data();
    mm_nt<acc_t>(rows, cols, p.D, scale, qt, ldq, kt, ldk, acc_t(0), S, kBlockK);
    if (buckets) {
      bucket_ids(p, b, i0, n, j0, cols, t.ids.data(), t.row_buckets.data());
      repeat_bucket_ids(n, heads, t.ids.data(), t.row_buckets.data());
    }
    if (has_tab) add_row_table(rows, cols, S, t.tab.data(), R1, t.ids.data(), t.row_buckets.data());
    for (int64_t hh = 0; hh < heads; ++hh) add_alibi_and_masks(p, b, h0 + hh, i0, n, j0, cols, S + hh * n * kBlockK);

    // Online softmax: S becomes p̃ = exp(S - m_new); the accumulators are rescaled to the new max.
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* s = S + i * kBlockK;
      acc_t m_new = std::max(t.m[i], row_max(s, cols));  // (a NaN m, once there, stays)
      if (m_new == neg_inf<acc_t>()) {
        // Everything masked so far, unless the scores are NaN (a NaN in q, k or a table; the max passes
        // over NaN): then the row's out and lse become NaN, as the formula's do, not out = 0, lse = -inf.
        if (!std::any_of(s, s + cols, [](acc_t x) { return x != x; })) {
          std::fill(s, s + cols, acc_t(0));
          continue;
        }
        m_new = std::numeric_limits<acc_t>::quiet_NaN();
      }
      const acc_t corr = t.m[i] == neg_inf<acc_t>() ? acc_t(0) : std::exp(t.m[i] - m_new);
      const acc_t sum = exp_sub_sum(s, cols, m_new);
      t.l[i] = t.l[i] * corr + sum;
      t.m[i] = m_new;
      if (corr != acc_t(1)) {
        scale_row(t.acc.data() + i * Dv1, p.Dv, corr);
        if (p.rel_v) scale_row(t.bsum.data() + i * R1, R, corr);
      }
    }
    // Dropout acts on the weights of v and aV only: l (and so lse) keeps every p̃.
    if (p.has_dropout()) {
      for (int64_t hh = 0; hh < heads; ++hh)
        dropout_tile(p, b, h0 + hh, i0, n, j0, cols, t.keep.data() + hh * n * kBlockK);
      apply_dropout(rows, cols, S, t.keep.data());
    }
    if (p.rel_v) add_bucket_sums(rows, cols, S, t.bsum.data(), R1, t.ids.data(), t.row_buckets.data());
    mm_nn<acc_t>(rows, p.Dv, cols, acc_t(1), S, kBlockK, vt, ldv, acc_t(1), t.acc.data(), Dv1);
  }

  for (int64_t hh = 0; hh < heads; ++hh) {
    const int64_t h = h0 + hh, r0 = hh * n;
    if (p.rel_v) {
      const acc_t* rv = static_cast<const acc_t*>(p.rel_v) + h * p.rel_v_head_stride;
      mm_nn<acc_t>(n, p.Dv, R, acc_t(1), t.bsum.data() + r0 * R1, R1, rv, Dv1, acc_t(1), t.acc.data() + r0 * Dv1,
                   Dv1);
    }
    auto write = [&](auto* out, acc_t* lse) {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t l = t.l[r0 + i];
        const bool seen = l != acc_t(0);  // l = 0: every key masked; NaN (a NaN score) stays NaN
        const acc_t inv = seen ? acc_t(1) / l : acc_t(0);
        acc_t* a = t.acc.data() + (r0 + i) * Dv1;
        scale_row(a, p.Dv, inv);
        from_acc(a, out + i * p.Dv, p.Dv);
        lse[i] = seen ? t.m[r0 + i] + std::log(l) : neg_inf<acc_t>();
      }
    };
    const int64_t row0 = (b * p.H + h) * p.Lq + i0;
    if (chunk.out)
      write(chunk.out + row0 * p.Dv, chunk.lse + row0);
    else
      write(static_cast<scalar_t*>(p.out) + row0 * p.Dv, static_cast<acc_t*>(p.lse) + row0);
  }
}

// out and lse of a split decode step from its chunks' partial results (KeyChunk; chunk c's rows at
// part_out[c * rows * Dv], part_lse[c * rows]), chunks in order: lse = log Σ_c exp(lse_c) and
// out = Σ_c exp(lse_c - lse) out_c. A row that no chunk saw (every key masked) gets out = 0 and lse = -inf,
// as unsplit.
template <typename scalar_t, typename acc_t>
void combine_chunks(const AttentionParams& p, int64_t chunks, const acc_t* part_out, const acc_t* part_lse) {
  const int64_t rows = p.B * p.H * p.Lq;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(chunks);
    for (int64_t r = begin; r < end; ++r) {
      acc_t m = neg_inf<acc_t>();
      for (int64_t c = 0; c < chunks; ++c) {  // (a NaN lse, once seen, stays: the row becomes NaN)
        const acc_t x = part_lse[c * rows + r];
        m = x > m || x != x ? x : m;
      }
      auto* out = static_cast<scalar_t*>(p.out) + r * p.Dv;
      auto* lse = static_cast<acc_t*>(p.lse) + r;
      if (m == neg_inf<acc_t>()) {
        std::fill(out, out + p.Dv, static_cast<scalar_t>(0));
        *lse = m;
        continue;
      }
      acc_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += (w[c] = std::exp(part_lse[c * rows + r] - m));
      for (int64_t c = 0; c < chunks; ++c) w[c] /= sum;
      for (int64_t d = 0; d < p.Dv; ++d) {
        acc_t o = 0;
        for (int64_t c = 0; c < chunks; ++c) o += w[c] * part_out[(c * rows + r) * p.Dv + d];
        out[d] = static_cast<scalar_t>(o);
      }
      *lse = m + std::log(sum);
    }
  });
}

// Runs fn(task, tiles) for tasks [0, n) on torch's intra-op threads, each with its own tiles and BLAS kept on
// that thread. Threads take the next task from a shared counter as they finish one, so tasks of unequal cost
// (causal blocks, batch rows of packed sequences with different lengths) keep every thread busy; a static
// split of the range would leave one thread with the costly half. Every task writes only its own outputs, so
// results do not depend on which thread runs it. Each thread's tiles hold query tiles of up to `rows` rows.
template <typename acc_t, typename Fn>
void parallel_tasks(const AttentionParams& p, bool backward, int64_t n, const Fn& fn, int64_t rows = kBlockQ) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, std::max(1, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_on_this_thread;
    Tiles<acc_t> t(p, backward, rows);
    for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < n;
         task = next.fetch_add(1, std::memory_order_relaxed))
      fn(task, t);
  });
}

// Runs fn(outer index, block start, tiles) for every (outer, block of `block` along `length`) task in
// parallel (parallel_tasks), blocks in zigzag order so that costly and cheap causal blocks alternate.
template <typename acc_t, typename Fn>
void parallel_over_blocks(const AttentionParams& p, bool backward, int64_t outer, int64_t length, int64_t block,
                          const Fn& fn) {
  const int64_t nb = (length + block - 1) / block;
  parallel_tasks<acc_t>(p, backward, outer * nb,
                        [&](int64_t task, Tiles<acc_t>& t) { fn(task % outer, zigzag(task / outer, nb) * block, t); });
}

template <typename scalar_t, typename acc_t>
void forward(const AttentionParams& p) {
  if (p.Lq <= kPackMaxLq) {  // a decode step: grouped-query heads packed, long caches split
    const int64_t G = p.H / p.Hk;
    const int64_t heads = G > 1 && G * p.Lq <= kPackMaxRows ? G : 1;
    const int64_t units = p.H / heads;  // tasks per batch row and key chunk
    const int64_t tasks = p.B * units;
    const int64_t want = std::min((kDecodeTasks + tasks - 1) / tasks, (p.Lk + kSplitKeys - 1) / kSplitKeys);
    const int64_t chunk_keys = want > 1 ? ((p.Lk + want - 1) / want + 15) / 16 * 16 : p.Lk;
    const int64_t chunks = want > 1 ? (p.Lk + chunk_keys - 1) / chunk_keys : 1;
    const int64_t rows = p.B * p.H * p.Lq;
    std::vector<acc_t> part_out, part_lse;  // [chunks, B, H, Lq, Dv] and [chunks, B, H, Lq]
    if (chunks > 1) {
      part_out.resize(chunks * rows * p.Dv);
      part_lse.resize(chunks * rows);
    }
    parallel_tasks<acc_t>(
        p, /*backward=*/false, tasks * chunks,
        [&](int64_t task, Tiles<acc_t>& t) {
          const int64_t c = task % chunks, b = task / chunks / units, h0 = task / chunks % units * heads;
          KeyChunk<acc_t> chunk;
          if (chunks > 1)
            chunk = {c * chunk_keys, (c + 1) * chunk_keys, part_out.data() + c * rows * p.Dv,
                     part_lse.data() + c * rows};
          for_each_key_run(p, b, 0, p.Lq, [&](int64_t i, int64_t n) {
            forward_block<scalar_t, acc_t>(p, b, h0, heads, i, n, t, chunk);
          });
        },
        heads * p.Lq);
    if (chunks > 1) combine_chunks<scalar_t>(p, chunks, part_out.data(), part_lse.data());
    return;
  }
  parallel_over_blocks<acc_t>(p, /*backward=*/false, p.B * p.H, p.Lq, kBlockQ,
                              [&](int64_t bh, int64_t i0, Tiles<acc_t>& t) {
                                const int64_t b = bh / p.H, h = bh % p.H;
                                for_each_key_run(p, b, i0, std::min(kBlockQ, p.Lq - i0), [&](int64_t i, int64_t n) {
                                  forward_block<scalar_t, acc_t>(p, b, h, 1, i, n, t);
                                });
                              });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// P and dS of one tile: on return S (t.s unless given) holds P = exp(S - lse) and dP (t.dp unless given)
// holds dS = P∘(dP - Δ) (P∘dP when `delta` is null); both leading dim kBlockK. tab/doa/lse/delta point at this block's rows. With dropout, dP is the
// gradient of the dropped weights, Z∘(dO Vᵀ + doa) with Z the tile's factors (left in t.keep), while t.s
// keeps the undropped P: the weights of v and aV are then Z∘P, which the callers form where they need it.
template <typename acc_t>
void probs_and_dscores(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                       int64_t cols, const acc_t* q, int64_t ldq, const acc_t* dout, int64_t lddo,
                       const acc_t* k, int64_t ldk, const acc_t* v, int64_t ldv, const acc_t* tab, int64_t ldt, const acc_t* doa, int64_t ldd, const acc_t* lse,
                       const acc_t* delta, Tiles<acc_t>& t, acc_t* S = nullptr, acc_t* dP = nullptr) {
  if (!S) S = t.s.data();
  if (!dP) dP = t.dp.data();
  mm_nt<acc_t>(rows, cols, p.D, static_cast<acc_t>(p.scale), q, ldq, k, ldk, acc_t(0), S, kBlockK);
  if (p.has_bucket_terms()) bucket_ids(p, b, i0, rows, j0, cols, t.ids.data(), t.row_buckets.data());
  if (tab) add_row_table(rows, cols, S, tab, ldt, t.ids.data(), t.row_buckets.data());
  add_alibi_and_masks(p, b, h, i0, rows, j0, cols, S);
  mm_nt<acc_t>(rows, cols, p.Dv, acc_t(1), dout, lddo, v, ldv, acc_t(0), dP, kBlockK);
  if (doa) add_row_table(rows, cols, dP, doa, ldd, t.ids.data(), t.row_buckets.data());
  if (p.has_dropout()) {
    dropout_tile(p, b, h, i0, rows, j0, cols, t.keep.data());
    apply_dropout(rows, cols, dP, t.keep.data());
  }
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* s = S + i * kBlockK;
    acc_t* dp = dP + i * kBlockK;
    const acc_t L = lse[i], dl = delta ? delta[i] : acc_t(0);
    if (L == neg_inf<acc_t>()) {  // fully masked row: p = 0, ds = 0
      std::fill(s, s + cols, acc_t(0));
      std::fill(dp, dp + cols, acc_t(0));
      continue;
    }
    probs_dscores_row(s, dp, cols, L, dl);
  }
}

// Rows [i0, i0 + rows) of head h of q and of grad_out as acc_t tiles (the tensors themselves where they can).
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> q_tile(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                                        Tiles<acc_t>& t) {
  const auto* qp = static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  return tile_rows(qp, p.q_stride[2], rows, p.D, t.q.data(), t.D1);
}
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> do_tile(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                                         Tiles<acc_t>& t) {
  const auto* dop = static_cast<const scalar_t*>(p.grad_out) + b * p.grad_out_stride[0] +
                    h * p.grad_out_stride[1] + i0 * p.grad_out_stride[2];
  return tile_rows(dop, p.grad_out_stride[2], rows, p.Dv, t.dout.data(), t.Dv1);
}

// A query block's rows (from row0 in [B,H,Lq]) of the row tables kept for the key sweeps: tab (with rel_k or
// rel_bias) and doa[i,r] = do_i·aV[r] (with rel_v); null where absent.
template <typename acc_t>
std::pair<acc_t*, acc_t*> row_tables(const AttentionBwdParams& p, int64_t row0) {
  return {(p.rel_k || p.rel_bias) ? static_cast<acc_t*>(p.row_tab) + row0 * p.R : nullptr,
          p.rel_v ? static_cast<acc_t*>(p.row_doa) + row0 * p.R : nullptr};
}
template <typename acc_t>
void fill_row_tables(const AttentionBwdParams& p, int64_t h, int64_t rows, const acc_t* q, int64_t ldq,
                     const acc_t* dout, int64_t lddo, int64_t Dv1, acc_t* tab, acc_t* doa, int64_t ld) {
  if (tab) row_key_table(p, h, rows, q, ldq, tab, ld);
  if (doa) {
    const acc_t* rv = static_cast<const acc_t*>(p.rel_v) + h * p.rel_v_head_stride;
    mm_nt<acc_t>(rows, p.R, p.Dv, acc_t(1), dout, lddo, rv, Dv1, acc_t(0), doa, ld);
  }
}

// The fused sweep's state (backward_group_strip): where a query block keeps its tiles, and where the task
// adds its dk, dv (acc_t, unscaled).
template <typename acc_t>
struct Strip {
  acc_t *p, *t, *zp;   // key tile n of the block at n * tile_elems (leading dim kBlockK); zp with dropout
  int64_t tile_elems;  // rows * kBlockK
  acc_t *dk, *dv;      // [Lk, ldk] / [Lk, ldv]
  int64_t ldk, ldv;
};

// Pass A (strip == null): Δ, dq and the bucket sums of one query block. With a strip, the same first sweep
// also keeps each tile's P and T = P∘dP, and a second sweep over the kept tiles adds dS = T - Δ P into dq,
// dk and dv: the 5 GEMMs of a fused backward (S, dP; dS K, dSᵀ Q, Pᵀ dO) with Δ exact in acc_t.
template <typename scalar_t, typename acc_t>
void backward_query_block(const AttentionBwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                          Tiles<acc_t>& t, const Strip<acc_t>* strip = nullptr) {
  const int64_t g = h / (p.H / p.Hk);
  const int64_t D1 = t.D1, Dv1 = t.Dv1, R1 = t.R1, R = p.R;
  const int64_t row0 = (b * p.H + h) * p.Lq + i0;  // index of this block's first row in [B,H,Lq]

  const auto [qt, ldq] = q_tile<scalar_t>(p, b, h, i0, rows, t);
  const auto [dot, lddo] = do_tile<scalar_t>(p, b, h, i0, rows, t);

  // Row tables: kept for pass B in the row-table buffers; the strip sweep needs them for this block only.
  acc_t *tab, *doa;
  int64_t ldt = R;
  if (strip) {
    tab = (p.rel_k || p.rel_bias) ? t.tab.data() : nullptr;
    doa = p.rel_v ? t.doa.data() : nullptr;
    ldt = R1;
  } else {
    std::tie(tab, doa) = row_tables<acc_t>(p, row0);
  }
  fill_row_tables(p, h, rows, qt, ldq, dot, lddo, Dv1, tab, doa, ldt);
  const acc_t* lse = static_cast<const acc_t*>(p.lse) + row0;

  // Δ_i = Σ_j p_ij dp_ij is accumulated here in acc_t rather than taken as do_i·out_i from the rounded
  // half-precision out (whose rounding error would otherwise become ds, e.g. for a row with one key).
  // So the sweep collects T = P∘dP and P: dq = scale*(T K - Δ P K + (Σ_β T - Δ Σ_β P)·aK).
  std::fill_n(t.dq.begin(), rows * D1, acc_t(0));
  if (!strip) std::fill_n(t.pk.begin(), rows * D1, acc_t(0));
  std::fill_n(t.rowacc.begin(), rows, acc_t(0));
  std::fill_n(t.dsb.begin(), rows * R1, acc_t(0));
  std::fill_n(t.psum.begin(), rows * R1, acc_t(0));
  const bool drop = p.has_dropout();
  if (drop) std::fill_n(t.pdsum.begin(), rows * R1, acc_t(0));
  const auto* kbase = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + g * p.k_stride[1];
  const auto* vbase = static_cast<const scalar_t*>(p.v) + b * p.v_stride[0] + g * p.v_stride[1];
  const Range keys = key_range(p, b, i0, rows);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, keys.end - j0);
    const auto [kt, ldk] = tile_rows(kbase + j0 * p.k_stride[2], p.k_stride[2], cols, p.D, t.k.data(), D1);
    const auto [vt, ldv] = tile_rows(vbase + j0 * p.v_stride[2], p.v_stride[2], cols, p.Dv, t.v.data(), Dv1);
    // P and T = P∘dP: into the strip's slot for this tile, or the thread's tiles.
    const int64_t at = strip ? (j0 - keys.begin) / kBlockK * strip->tile_elems : 0;
    acc_t* S = strip ? strip->p + at : t.s.data();
    acc_t* T = strip ? strip->t + at : t.dp.data();
    probs_and_dscores(p, b, h, i0, rows, j0, cols, qt, ldq, dot, lddo, kt, ldk, vt, ldv, tab, ldt, doa, ldt, lse,
                      static_cast<const acc_t*>(nullptr), t, S, T);
    // With dropout the weights of v and aV are Z∘P: kept in the strip, or formed over Z for pdsum.
    acc_t* zp = nullptr;
    if (drop && (strip || doa)) {
      zp = strip ? strip->zp + at : t.keep.data();
      apply_dropout(rows, cols, t.keep.data(), S, zp);
    }
    for (int64_t i = 0; i < rows; ++i) t.rowacc[i] += row_sum(T + i * kBlockK, cols);
    if (tab) add_bucket_sums(rows, cols, T, t.dsb.data(), R1, t.ids.data(), t.row_buckets.data());
    // psum (undropped P) corrects dsb below; with dropout, d aV needs the sums of the dropped Z∘P (pdsum).
    if (tab || (doa && !drop)) add_bucket_sums(rows, cols, S, t.psum.data(), R1, t.ids.data(), t.row_buckets.data());
    if (doa && drop) add_bucket_sums(rows, cols, zp, t.pdsum.data(), R1, t.ids.data(), t.row_buckets.data());
    if (strip) continue;
    mm_nn<acc_t>(rows, p.D, cols, acc_t(1), T, kBlockK, kt, ldk, acc_t(1), t.dq.data(), D1);
    mm_nn<acc_t>(rows, p.D, cols, acc_t(1), S, kBlockK, kt, ldk, acc_t(1), t.pk.data(), D1);
  }
  // Δ (with the lse gradient: ds = p(dp - Δ + glse)), kept for pass B; then dS's sums from T's.
  acc_t* delta = static_cast<acc_t*>(p.delta) + row0;
  const acc_t* glse = p.grad_lse ? static_cast<const acc_t*>(p.grad_lse) + row0 : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t d = glse ? t.rowacc[i] - glse[i] : t.rowacc[i];
    delta[i] = d;
    if (!strip) {
      acc_t* dqi = t.dq.data() + i * D1;
      const acc_t* pki = t.pk.data() + i * D1;
      for (int64_t c = 0; c < p.D; ++c) dqi[c] -= d * pki[c];
    }
    if (tab) {
      acc_t* ds = t.dsb.data() + i * R1;
      const acc_t* ps = t.psum.data() + i * R1;
      for (int64_t r = 0; r < R; ++r) ds[r] -= d * ps[r];
    }
  }
  if (strip) {  // the second sweep, over the kept tiles: dS = T - Δ P; dq += dS K, dk += dSᵀ Q, dv += (Z∘P)ᵀ dO
    for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, keys.end - j0);
      const int64_t at = (j0 - keys.begin) / kBlockK * strip->tile_elems;
      acc_t* ds = strip->t + at;
      const acc_t* pt = strip->p + at;
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t d = delta[i];
        acc_t* dsi = ds + i * kBlockK;
        const acc_t* pi = pt + i * kBlockK;
        for (int64_t j = 0; j < cols; ++j) dsi[j] -= d * pi[j];
      }
      const auto [kt, ldk] = tile_rows(kbase + j0 * p.k_stride[2], p.k_stride[2], cols, p.D, t.k.data(), D1);
      mm_nn<acc_t>(rows, p.D, cols, acc_t(1), ds, kBlockK, kt, ldk, acc_t(1), t.dq.data(), D1);
      mm_tn<acc_t>(cols, p.D, rows, acc_t(1), ds, kBlockK, qt, ldq, acc_t(1), strip->dk + j0 * strip->ldk,
                   strip->ldk);
      mm_tn<acc_t>(cols, p.Dv, rows, acc_t(1), drop ? strip->zp + at : pt, kBlockK, dot, lddo, acc_t(1),
                   strip->dv + j0 * strip->ldv, strip->ldv);
    }
  }
  // dq = scale * (dS K + dsb · aK)
  if (p.rel_k) {
    const acc_t* rk = static_cast<const acc_t*>(p.rel_k) + h * p.rel_k_head_stride;
    mm_nn<acc_t>(rows, p.D, R, acc_t(1), t.dsb.data(), R1, rk, D1, acc_t(1), t.dq.data(), D1);
  }
  auto* dq = static_cast<scalar_t*>(p.dq) + row0 * p.D;
  store_rows(t.dq.data(), D1, rows, p.D, static_cast<acc_t>(p.scale), dq, p.D);
  if (tab) {
    acc_t* dst = static_cast<acc_t*>(p.ds_sum) + row0 * R;
    for (int64_t i = 0; i < rows; ++i) std::copy(t.dsb.data() + i * R1, t.dsb.data() + i * R1 + R, dst + i * R);
  }
  if (doa) {
    acc_t* dst = static_cast<acc_t*>(p.p_sum) + row0 * R;
    const acc_t* src = drop ? t.pdsum.data() : t.psum.data();
    for (int64_t i = 0; i < rows; ++i) std::copy(src + i * R1, src + i * R1 + R, dst + i * R);
  }
}

// Pass B: one key block of kv head g over the heads of its group and all query blocks, dv = Σ Pᵀ dO and
// dk = scale * Σ dSᵀ Q.
template <typename scalar_t, typename acc_t>
void backward_key_block(const AttentionBwdParams& p, int64_t b, int64_t g, int64_t j0, Tiles<acc_t>& t) {
  const int64_t cols = std::min(kBlockK, p.Lk - j0);
  const int64_t D1 = t.D1, Dv1 = t.Dv1, R = p.R;
  const int64_t group = p.H / p.Hk;
  const auto* kp = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + g * p.k_stride[1] + j0 * p.k_stride[2];
  const auto* vp = static_cast<const scalar_t*>(p.v) + b * p.v_stride[0] + g * p.v_stride[1] + j0 * p.v_stride[2];
  const auto [kt, ldk] = tile_rows(kp, p.k_stride[2], cols, p.D, t.k.data(), D1);
  const auto [vt, ldv] = tile_rows(vp, p.v_stride[2], cols, p.Dv, t.v.data(), Dv1);
  std::fill(t.dk.begin(), t.dk.end(), acc_t(0));
  std::fill(t.dv.begin(), t.dv.end(), acc_t(0));

  // Rows [i0, i0 + rows) of head h against the block's columns they can see (from a multiple of 16, for the
  // dropout counters): a key block that straddles two segments, or the causal diagonal, computes only its
  // visible part.
  auto query_rows = [&](int64_t h, int64_t i0, int64_t rows) {
    const Range keys = key_range(p, b, i0, rows);
    const int64_t c0 = std::max<int64_t>(0, keys.begin - j0), c1 = std::min(cols, keys.end - j0);
    if (c1 <= c0) return;
    const int64_t n = c1 - c0;
    const acc_t* kc = kt + c0 * ldk;
    const int64_t row0 = (b * p.H + h) * p.Lq + i0;
    const auto [qt, ldq] = q_tile<scalar_t>(p, b, h, i0, rows, t);
    const auto [dot, lddo] = do_tile<scalar_t>(p, b, h, i0, rows, t);
    const auto [tab, doa] = row_tables<acc_t>(p, row0);
    probs_and_dscores(p, b, h, i0, rows, j0 + c0, n, qt, ldq, dot, lddo, kc, ldk, vt + c0 * ldv, ldv, tab, R, doa, R,
                      static_cast<const acc_t*>(p.lse) + row0, static_cast<const acc_t*>(p.delta) + row0, t);
    if (p.has_dropout()) apply_dropout(rows, n, t.s.data(), t.keep.data());  // dv and p_sum take Z∘P
    mm_tn<acc_t>(n, p.Dv, rows, acc_t(1), t.s.data(), kBlockK, dot, lddo, acc_t(1), t.dv.data() + c0 * Dv1, Dv1);
    mm_tn<acc_t>(n, p.D, rows, acc_t(1), t.dp.data(), kBlockK, qt, ldq, acc_t(1), t.dk.data() + c0 * D1, D1);
  };
  const Range queries = query_range(p, b, j0, cols);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t i0 = queries.begin; i0 < queries.end; i0 += kBlockQ) {
      for_each_key_run(p, b, i0, std::min(kBlockQ, p.Lq - i0),
                       [&](int64_t i, int64_t rows) { query_rows(h, i, rows); });
    }
  }
  const int64_t kv0 = (b * p.Hk + g) * p.Lk + j0;
  auto* dk = static_cast<scalar_t*>(p.dk) + kv0 * p.D;
  auto* dv = static_cast<scalar_t*>(p.dv) + kv0 * p.Dv;
  store_rows(t.dk.data(), D1, cols, p.D, static_cast<acc_t>(p.scale), dk, p.D);
  store_rows(t.dv.data(), Dv1, cols, p.Dv, acc_t(1), dv, p.Dv);
}

// The fused backward, the strip sweep: chunk c of `chunks` of kv group (b, g) runs every
// chunks-th of the group's (head, query block) pairs (blocks of `strip_rows` rows; interleaved, so that the
// costly and the cheap blocks of a causal call spread over the chunks) through backward_query_block with a
// strip. A block's first sweep finds Δ exactly (Σ_j P∘dP in acc_t, never from float16/bfloat16 `out`, whose
// rounding would enter dS) while it keeps its tiles' P and P∘dP and computes its row tables (tab, doa) in
// per-thread tiles; the second turns them into dS and adds dq, dk and dv: 5 GEMMs per tile where the two
// passes take 8, at the cost of the strip (strip_rows x Lk per buffer and thread; strip_rows shrinks as Lk
// grows). One chunk writes dk and dv itself; several add into their own partial sums (part_dk
// [B·Hk·chunks, Lk, D1], part_dv likewise), which reduce_chunks then adds up in chunk order: deterministic,
// no atomics.
template <typename scalar_t, typename acc_t>
void backward_group_strip(const AttentionBwdParams& p, int64_t b, int64_t g, int64_t c, int64_t chunks,
                          int64_t strip_rows, acc_t* part_dk, acc_t* part_dv, Tiles<acc_t>& t) {
  const int64_t group = p.H / p.Hk, D1 = t.D1, Dv1 = t.Dv1;
  const int64_t tiles = (p.Lk + kBlockK - 1) / kBlockK, tile_elems = strip_rows * kBlockK;
  t.strip_p.resize(tiles * tile_elems);
  t.strip_t.resize(tiles * tile_elems);
  if (p.has_dropout()) t.strip_zp.resize(tiles * tile_elems);
  // Where dk and dv add up: float32/float64 dk and dv themselves (one chunk), or this thread's acc_t rows
  // (one chunk of half types), or this chunk's partial sums.
  const int64_t kv0 = (b * p.Hk + g) * p.Lk;
  bool in_place = false;
  if constexpr (std::is_same_v<scalar_t, acc_t>) in_place = chunks == 1 && p.D > 0 && p.Dv > 0;
  acc_t *dk_sum, *dv_sum;
  if (in_place) {
    dk_sum = static_cast<acc_t*>(p.dk) + kv0 * p.D;
    dv_sum = static_cast<acc_t*>(p.dv) + kv0 * p.Dv;
  } else if (chunks == 1) {
    t.gk.resize(p.Lk * D1);
    t.gv.resize(p.Lk * Dv1);
    dk_sum = t.gk.data();
    dv_sum = t.gv.data();
  } else {
    const int64_t part = (b * p.Hk + g) * chunks + c;
    dk_sum = part_dk + part * p.Lk * D1;
    dv_sum = part_dv + part * p.Lk * Dv1;
  }
  const int64_t ldk = in_place ? p.D : D1, ldv = in_place ? p.Dv : Dv1;
  std::fill_n(dk_sum, p.Lk * ldk, acc_t(0));
  std::fill_n(dv_sum, p.Lk * ldv, acc_t(0));
  const Strip<acc_t> strip{t.strip_p.data(), t.strip_t.data(), t.strip_zp.data(), tile_elems, dk_sum, dv_sum,
                           ldk, ldv};
  const int64_t blocks = (p.Lq + strip_rows - 1) / strip_rows;
  for (int64_t u = c; u < group * blocks; u += chunks) {
    const int64_t h = g * group + u / blocks, i0 = u % blocks * strip_rows;
    for_each_key_run(p, b, i0, std::min(strip_rows, p.Lq - i0), [&](int64_t i, int64_t n) {
      backward_query_block<scalar_t, acc_t>(p, b, h, i, n, t, &strip);
    });
  }
  if (chunks > 1) return;
  if (in_place) {
    scale_row(dk_sum, p.Lk * p.D, static_cast<acc_t>(p.scale));
    return;
  }
  store_rows(dk_sum, D1, p.Lk, p.D, static_cast<acc_t>(p.scale), static_cast<scalar_t*>(p.dk) + kv0 * p.D, p.D);
  store_rows(dv_sum, Dv1, p.Lk, p.Dv, acc_t(1), static_cast<scalar_t*>(p.dv) + kv0 * p.Dv, p.Dv);
}

// dk = scale * Σ_c part_dk[c] and dv = Σ_c part_dv[c], chunks in order, for every (b, kv head, key).
template <typename scalar_t, typename acc_t>
void reduce_chunks(const AttentionBwdParams& p, int64_t chunks, const acc_t* part_dk, const acc_t* part_dv) {
  const int64_t D1 = ld1(p.D), Dv1 = ld1(p.Dv);
  at::parallel_for(0, p.B * p.Hk * p.Lk, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(std::max(D1, Dv1));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bg = r / p.Lk, j = r % p.Lk;
      auto sum = [&](const acc_t* part, int64_t ld, int64_t n, acc_t scale, scalar_t* dst) {
        std::fill_n(row.begin(), n, acc_t(0));
        for (int64_t c = 0; c < chunks; ++c) {
          const acc_t* x = part + ((bg * chunks + c) * p.Lk + j) * ld;
          for (int64_t e = 0; e < n; ++e) row[e] += x[e];
        }
        store_rows(row.data(), ld, 1, n, scale, dst, n);
      };
      sum(part_dk, D1, p.D, static_cast<acc_t>(p.scale), static_cast<scalar_t*>(p.dk) + r * p.D);
      sum(part_dv, Dv1, p.Dv, acc_t(1), static_cast<scalar_t*>(p.dv) + r * p.Dv);
    }
  });
}

// Bytes of one row of a strip buffer over Lk keys (whole key tiles, elements of `elem_bytes`).
inline int64_t strip_row_bytes(int64_t Lk, int64_t elem_bytes) {
  return std::max<int64_t>(1, (Lk + kBlockK - 1) / kBlockK) * kBlockK * elem_bytes;
}

// backward_group_strip's rows per query block: as many multiples of 16 (the dropout counters' grid) up to
// kBlockQ as keep one strip buffer within kStripBytes, and at least 16.
inline int64_t strip_rows_for(int64_t Lk, int64_t elem_bytes) {
  return std::clamp<int64_t>(kStripBytes / strip_row_bytes(Lk, elem_bytes) / 16 * 16, 16, kBlockQ);
}

// `chunks`: 0 takes the two passes; 1 one strip-sweep task per (b, kv head); more split each kv group's
// query blocks into that many (cpu_backward_plan).
template <typename scalar_t, typename acc_t>
void backward(const AttentionBwdParams& p, int64_t chunks) {
  if (chunks >= 1) {
    const int64_t rows = strip_rows_for(p.Lk, sizeof(acc_t));
    std::unique_ptr<acc_t[]> part_dk, part_dv;  // written whole by their tasks: no zeroing here
    if (chunks > 1) {
      part_dk.reset(new acc_t[p.B * p.Hk * chunks * p.Lk * ld1(p.D)]);
      part_dv.reset(new acc_t[p.B * p.Hk * chunks * p.Lk * ld1(p.Dv)]);
    }
    parallel_tasks<acc_t>(p, /*backward=*/true, p.B * p.Hk * chunks, [&](int64_t task, Tiles<acc_t>& t) {
      const int64_t bg = task / chunks;
      backward_group_strip<scalar_t, acc_t>(p, bg / p.Hk, bg % p.Hk, task % chunks, chunks, rows, part_dk.get(),
                                            part_dv.get(), t);
    });
    if (chunks > 1) reduce_chunks<scalar_t>(p, chunks, part_dk.get(), part_dv.get());
    return;
  }
  parallel_over_blocks<acc_t>(p, /*backward=*/true, p.B * p.H, p.Lq, kBlockQ,
                              [&](int64_t bh, int64_t i0, Tiles<acc_t>& t) {
                                const int64_t b = bh / p.H, h = bh % p.H;
                                for_each_key_run(p, b, i0, std::min(kBlockQ, p.Lq - i0), [&](int64_t i, int64_t n) {
                                  backward_query_block<scalar_t, acc_t>(p, b, h, i, n, t);
                                });
                              });
  parallel_over_blocks<acc_t>(p, /*backward=*/true, p.B * p.Hk, p.Lk, kBlockK,
                              [&](int64_t bg, int64_t j0, Tiles<acc_t>& t) {
                                backward_key_block<scalar_t, acc_t>(p, bg / p.Hk, bg % p.Hk, j0, t);
                              });
}

}  // namespace
}  // namespace cpu

namespace ops {

ForwardResult attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& rel_k,
                                    const OptTensor& rel_v, const OptTensor& rel_bias, const OptTensor& buckets,
                                    const OptTensor& rel_index, const OptTensor& alibi_slopes,
                                    const OptTensor& key_padding_mask, bool causal, std::optional<double> scale,
                                    int64_t q_offset, double dropout_p, const OptTensor& dropout_seed,
                                    const OptTensor& q_segment_ids, const OptTensor& k_segment_ids,
                                    const OptTensor& q_offsets) {
  Prepared a = prepare(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask,
                       causal, scale, q_offset, dropout_p, dropout_seed, q_segment_ids, k_segment_ids,
                       q_offsets);
  Tensor out = at::empty({a.B, a.H, a.Lq, a.Dv}, q.options());
  Tensor lse = at::empty({a.B, a.H, a.Lq}, q.options().dtype(a.acc_dtype));
  if (a.B * a.H * a.Lq == 0) return {out, lse};
  kernels::AttentionParams p;
  fill_params(a, p);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "relattn_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::forward<scalar_t, acc_t>(p);
  });
  return {out, lse};
}

namespace {
// Which CPU backward runs (cpu::backward's `chunks`): the fused strip sweep (5 tile GEMMs where the two
// passes take 8). One task per (b, kv head) when its B·Hk equal tasks keep the threads busy (leaving at most
// a third of their time idle); otherwise each kv group's query blocks are split into enough chunks for about
// two tasks per thread, whose partial dk, dv (kChunkBytes at most in all) are added up in chunk order after.
// The two passes, split by query and key blocks, run where neither fits: a strip of 16 rows over
// kStripMaxBytes (over 128k keys in float32 or the half types, 64k in float64), or too many keys for the
// partial sums.
// RELATTN_CPU_BACKWARD=fused|two-pass|auto overrides the choice (the tests use it to cover both; "fused"
// takes one task per (b, kv head) unless RELATTN_CPU_BACKWARD_CHUNKS=N asks for N chunks).
int64_t cpu_backward_plan(const Prepared& a) {
  const char* env = std::getenv("RELATTN_CPU_BACKWARD");
  const std::string mode = env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "fused" || mode == "two-pass",
              "relattn: RELATTN_CPU_BACKWARD must be auto, fused or two-pass, got '", mode, "'");
  if (mode == "two-pass") return 0;
  const char* chunks_env = std::getenv("RELATTN_CPU_BACKWARD_CHUNKS");
  if (chunks_env) {
    char* end = nullptr;
    const long long n = std::strtoll(chunks_env, &end, 10);
    TORCH_CHECK(*chunks_env != '\0' && *end == '\0' && n >= 1 && n <= 4096,
                "relattn: RELATTN_CPU_BACKWARD_CHUNKS must be an integer in [1, 4096], got '", chunks_env, "'");
    if (mode == "fused") return n;
  }
  if (mode == "fused") return 1;
  const int64_t acc_bytes = a.q.scalar_type() == at::kDouble ? 8 : 4;
  if (16 * cpu::strip_row_bytes(a.Lk, acc_bytes) > cpu::kStripMaxBytes) return 0;
  const int64_t tasks = a.B * a.Hk, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rounds = (tasks + threads - 1) / threads;
  // One task per pair. (float16/bfloat16 tasks add dk, dv up in float rows of their thread: at most
  // min(tasks, threads) kv heads' worth, so never more than twice what k and v take.)
  if (3 * tasks >= 2 * rounds * threads) return 1;
  // Chunks: about two tasks per thread, at most one per (head, query block) of a group, and partial sums
  // within kChunkBytes.
  const int64_t strip_rows = cpu::strip_rows_for(a.Lk, acc_bytes);
  const int64_t blocks = (a.H / a.Hk) * ((a.Lq + strip_rows - 1) / strip_rows);
  const int64_t per_chunk = tasks * a.Lk * (std::max<int64_t>(a.D, 1) + std::max<int64_t>(a.Dv, 1)) * acc_bytes;
  const int64_t chunks = std::min({(2 * threads + tasks - 1) / tasks, blocks, cpu::kChunkBytes / std::max<int64_t>(per_chunk, 1)});
  return chunks >= 2 ? chunks : 0;
}
}  // namespace

BackwardResult attention_backward_cpu(const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q,
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
                       q_offsets);
  const bool run = a.B * a.H * a.Lq > 0;
  const int64_t chunks = run ? cpu_backward_plan(a) : 0;
  // Every algorithm writes every element of dq, dk, dv and the bucket sums: nothing to zero (fresh large
  // buffers cost page faults). Only the two passes keep the row tables between their passes.
  BackwardBuffers s = backward_buffers(a, grad_out, out, lse, grad_lse, /*zero_sums=*/false,
                                       /*row_tables=*/chunks == 0);
  auto grad = [&](int64_t heads, int64_t len, int64_t d) {
    return run ? at::empty({a.B, heads, len, d}, q.options()) : at::zeros({a.B, heads, len, d}, q.options());
  };
  Tensor dq = grad(a.H, a.Lq, a.D);
  Tensor dk = grad(a.Hk, a.Lk, a.D);
  Tensor dv = grad(a.Hk, a.Lk, a.Dv);

  if (run) {
    kernels::AttentionBwdParams p;
    fill_backward_params(a, s, dq, dk, dv, p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "relattn_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      cpu::backward<scalar_t, acc_t>(p, chunks);
    });
  }

  auto [d_rel_k, d_rel_v, d_rel_bias] = table_grads(a, s.ds_sum, s.p_sum, grad_out, rel_k, rel_v, rel_bias);
  return {dq, dk, dv, d_rel_k, d_rel_v, d_rel_bias};
}

}  // namespace ops

TORCH_LIBRARY_IMPL(relattn, CPU, m) {
  m.impl("attention_forward", &ops::attention_forward_cpu);
  m.impl("attention_backward", &ops::attention_backward_cpu);
}

}  // namespace relattn

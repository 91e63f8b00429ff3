// Dropout of the attention weights: which (query, key) pairs are kept, the same bits on every backend.
//
// With dropout probability p, the weights become p_ij * z_ij / (1 - p) with z_ij ∈ {0, 1} (SPEC §1 extended:
// out_i = Σ_j p_ij z_ij / (1 - p) * (v_j + aV[β]); lse is unchanged). z_ij comes from a counter-based
// generator, Philox4x32-10 (Salmon et al., SC'11), keyed by a 64-bit seed drawn once per call: the backward
// regenerates the forward's mask from the seed instead of storing it, and the CPU and CUDA kernels draw
// identical masks, so either can check the other.
//
// Each Philox call yields 8 numbers of 16 bits, for the 8 pairs that one thread holds in two m16n8
// accumulator fragments of a tensor-core kernel: rows i and i + 8 of a 16-row block, columns 2c, 2c + 1,
// 8 + 2c, 9 + 2c of a 16-column block (c = lane % 4). For pair (i, j) of head h in batch b:
//
//   counter = { (j >> 4) << 2 | (j >> 1) & 3,  (i >> 4) << 3 | (i & 7),  h,  b }     key = seed (lo, hi)
//   slot    = ((i >> 3) & 1) << 2 | ((j >> 3) & 1) << 1 | (j & 1)
//   r_ij    = 16-bit half (slot & 1) of word (slot >> 1) of Philox(counter, key)     (half 0 = low bits)
//   z_ij    = r_ij >= threshold,  threshold = round(p * 65536)
//
// So p is used as a multiple of 1/65536 (p' = threshold / 65536, within 2^-17 of p) and the kept weights
// are scaled by 1 / (1 - p'), which keeps E[z / (1 - p')] = 1 exactly. p = 1 drops every pair (scale 0).
// i and j are the row and column indices of the Lq x Lk attention matrix (not positions: q_offset does not
// enter), b < 2^32, h < 2^32, Lq, Lk < 2^32.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RELATTN_HD __host__ __device__ __forceinline__
#else
#define RELATTN_HD inline
#endif

namespace relattn {
namespace kernels {

// Philox4x32-10: out = the 10-round bijection of ctr under key (k0, k1), as Random123 defines it.
RELATTN_HD void philox4x32_10(const uint32_t ctr[4], uint32_t k0, uint32_t k1, uint32_t out[4]) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t x0 = ctr[0], x1 = ctr[1], x2 = ctr[2], x3 = ctr[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * x0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * x2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    x0 = hi1 ^ x1 ^ k0;
    x1 = lo1;
    x2 = hi0 ^ x3 ^ k1;
    x3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  out[0] = x0;
  out[1] = x1;
  out[2] = x2;
  out[3] = x3;
}

// The Philox counter of pair (i, j) of head h, batch b (see the top of this file).
RELATTN_HD void dropout_counter(uint64_t b, uint64_t h, uint64_t i, uint64_t j, uint32_t ctr[4]) {
  ctr[0] = static_cast<uint32_t>(((j >> 4) << 2) | ((j >> 1) & 3));
  ctr[1] = static_cast<uint32_t>(((i >> 4) << 3) | (i & 7));
  ctr[2] = static_cast<uint32_t>(h);
  ctr[3] = static_cast<uint32_t>(b);
}

// Which of the 8 16-bit numbers of that counter belongs to pair (i, j).
RELATTN_HD uint32_t dropout_slot(uint64_t i, uint64_t j) {
  return static_cast<uint32_t>((((i >> 3) & 1) << 2) | (((j >> 3) & 1) << 1) | (j & 1));
}

// 16-bit number `slot` of a Philox output.
RELATTN_HD uint32_t dropout_half(const uint32_t w[4], uint32_t slot) {
  return (w[slot >> 1] >> ((slot & 1) * 16)) & 0xFFFFu;
}

// Keep threshold of probability p in [0, 1]: pairs whose number is >= it are kept (65536: none).
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::llround(p * 65536.0));
}

// Factor of a kept weight: 1 / (1 - p') for p' = threshold / 65536, and 0 when every pair is dropped.
inline double dropout_scale(uint32_t threshold) {
  return threshold >= 65536u ? 0.0 : 65536.0 / static_cast<double>(65536u - threshold);
}

// The key of a seed.
RELATTN_HD void dropout_key(int64_t seed, uint32_t& k0, uint32_t& k1) {
  k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
}

// Is pair (i, j) of (b, h) kept? One Philox call per pair: for references and tests; the kernels share
// each call among the 8 pairs of its counter.
RELATTN_HD bool dropout_keep(int64_t seed, uint32_t threshold, uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
  uint32_t k0, k1, ctr[4], w[4];
  dropout_key(seed, k0, k1);
  dropout_counter(b, h, i, j, ctr);
  philox4x32_10(ctr, k0, k1, w);
  return dropout_half(w, dropout_slot(i, j)) >= threshold;
}

// The factors of rows i and i + 8 of a tile, columns [0, cols), one Philox call per 8 pairs (the CPU kernels'
// scalar path): keep0[j] (row i) and keep1[j] (row i + 8; null when past the tile) become `scale` for a kept
// pair and 0 for a dropped one. ctr0 is counter word 0 of the tile's column 0 (a multiple of 16), ctr1 row
// i's word 1, ctr2 = h, ctr3 = b. Counter ctr0 + c holds columns 16 (c / 4) + 2 (c % 4) + {0, 1, 8, 9};
// c starts at c_begin (a multiple of 4: a vectorised caller's first column not yet done is 4 c_begin).
template <typename T>
inline void dropout_rows(T* keep0, T* keep1, int64_t cols, uint32_t ctr0, uint32_t ctr1, uint32_t ctr2,
                         uint32_t ctr3, uint32_t k0, uint32_t k1, uint32_t threshold, T scale, int64_t c_begin = 0) {
  for (int64_t c = c_begin; 16 * (c / 4) < cols; ++c) {
    const uint32_t ctr[4] = {ctr0 + static_cast<uint32_t>(c), ctr1, ctr2, ctr3};
    uint32_t w[4];
    philox4x32_10(ctr, k0, k1, w);
    for (uint32_t slot = 0; slot < 8; ++slot) {
      const int64_t j = 16 * (c / 4) + 8 * ((slot >> 1) & 1) + 2 * (c % 4) + (slot & 1);
      T* row = (slot >> 2) ? keep1 : keep0;
      if (row != nullptr && j < cols) row[j] = dropout_half(w, slot) >= threshold ? scale : T(0);
    }
  }
}

}  // namespace kernels
}  // namespace relattn

// Vectorised float loops of the CPU kernels' hot path (softmax rows, P and dS), compiled once for
// baseline x86-64/other CPUs and once with AVX2+FMA, chosen at run time. These files include no torch
// header, so nothing compiled with AVX2 can leak into code that runs on a CPU without it.
#pragma once

#include <bit>
#include <cstdint>
#include <vector>

namespace relattn {
namespace cpu {

struct VecOps {
  // max_j s[j] (-inf for n = 0)
  float (*row_max)(const float* s, int64_t n);
  // s[j] = exp(s[j] - m); returns Σ_j s[j]. exp(-inf) = 0.
  float (*exp_sub_sum)(float* s, int64_t n, float m);
  // p[j] = exp(s[j] - lse); ds[j] = p[j] * (ds[j] - delta)   (s becomes p, dp becomes ds)
  void (*probs_dscores)(float* s, float* dp, int64_t n, float lse, float delta);
  // Σ_j s[j]
  float (*sum)(const float* s, int64_t n);
  // s[j] -= slope * |d0 + j|
  void (*sub_alibi)(float* s, int64_t n, float slope, int64_t d0);
  // s[j] *= c
  void (*scale)(float* s, int64_t n, float c);
  // Dropout factors (kernels/dropout.h) of rows i and i + 8 of a tile, columns [0, cols): keep0[j] (row i)
  // and keep1[j] (row i + 8; null when that row is past the tile) become `scale` for a kept pair and 0 for
  // a dropped one. ctr0 is Philox counter word 0 of column 0 (columns start on a 16-column block), ctr1 is
  // row i's word 1, ctr2 = h, ctr3 = b; (k0, k1) the key.
  void (*dropout_rows)(float* keep0, float* keep1, int64_t cols, uint32_t ctr0, uint32_t ctr1, uint32_t ctr2,
                       uint32_t ctr3, uint32_t k0, uint32_t k1, uint32_t threshold, float scale);
  // Half-precision rows to and from float, bit for bit as c10::Half / c10::BFloat16 convert (round to
  // nearest even; bfloat16 NaN becomes 0x7FC0). Null where this variant has none: callers then convert
  // element by element.
  void (*half_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*bf16_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*float_to_half)(const float* src, uint16_t* dst, int64_t n);
  void (*float_to_bf16)(const float* src, uint16_t* dst, int64_t n);
  const char* name;
};

// The best variant for this CPU.
const VecOps& vec_ops();

// Every variant this CPU can run, the portable one first (tests compare them: on x86-64 the kernels never
// take the portable loops, which ARM and other CPUs run).
std::vector<const VecOps*> vec_ops_variants();

// exp that vectorises (Cephes' expf polynomial, max relative error ~1e-7); 0 for x < -87 (so -inf -> 0), NaN for
// NaN.
inline float fast_expf(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.3762626647949f ? 88.3762626647949f : xc;
  xc = xc == xc ? xc : 0.0f;  // NaN: no float-to-int conversion of it (undefined); NaN is returned below
  const float t = xc * 1.44269504088896341f + 0.5f;
  float fx = static_cast<float>(static_cast<int32_t>(t));
  fx -= static_cast<float>(fx > t);  // floor, without branches
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const float pow2 = std::bit_cast<float>((static_cast<int32_t>(fx) + 127) << 23);
  const float e = y * pow2;
  return x < -87.0f ? 0.0f : (x == x ? e : x);
}

}  // namespace cpu
}  // namespace relattn

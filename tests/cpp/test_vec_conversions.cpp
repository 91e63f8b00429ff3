// The CPU kernels' vectorised half-precision conversions (csrc/cpu/vec.h) against c10's own, bit for bit:
// every float16 and bfloat16 bit pattern into float, and floats chosen to hit every rounding case back
// (ties to even, subnormals, overflow to infinity, NaN, signed zeros). Rows of odd lengths exercise the
// vector bodies and the scalar tails.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include "../../csrc/cpu/vec.h"

namespace {

using relattn::cpu::vec_ops;

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Floats around every rounding boundary of both formats, plus random bit patterns.
std::vector<float> probe_floats() {
  std::vector<float> v = {0.f, -0.f, 1.f, -1.f, 65504.f, 65519.f, 65520.f, -65520.f, 1e-8f, -1e-8f, 5.96e-8f,
                          2.98e-8f, 6.1e-5f, std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                          -std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(), 3.3895314e38f};
  // Every exponent, with mantissas at and beside the halfway points of both formats (bfloat16 keeps 7
  // mantissa bits, float16 10).
  for (uint32_t e = 0; e < 256; ++e)
    for (uint32_t m : {0x0u, 0x1u, 0x7FFFu, 0x8000u, 0x8001u, 0x18000u, 0xFFFFu, 0x1000u, 0xFFFu, 0x2000u, 0x3000u,
                       0x7FFFFFu, 0x400000u})
      for (uint32_t sign : {0u, 1u}) v.push_back(from_bits(sign << 31 | e << 23 | m));
  std::mt19937 gen(7);
  for (int i = 0; i < 100000; ++i) v.push_back(from_bits(gen()));
  return v;
}

// NaN compares by class only: c10 and F16C may keep different payloads.
void expect_same_half_bits(uint16_t got, uint16_t want, float x) {
  const bool got_nan = (got & 0x7C00) == 0x7C00 && (got & 0x3FF) != 0;
  const bool want_nan = (want & 0x7C00) == 0x7C00 && (want & 0x3FF) != 0;
  if (want_nan) {
    EXPECT_TRUE(got_nan) << "x bits " << std::hex << bits(x);
  } else {
    EXPECT_EQ(got, want) << "x = " << x << " bits " << std::hex << bits(x);
  }
}

TEST(VecConversions, EveryHalfAndBFloat16IntoFloat) {
  const auto& ops = vec_ops();
  if (!ops.half_to_float) GTEST_SKIP() << "no vectorised conversions on this CPU (" << ops.name << ")";
  std::vector<uint16_t> all(65536 + 5);  // a length that leaves a tail
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> out(all.size());
  ops.half_to_float(all.data(), out.data(), static_cast<int64_t>(all.size()));
  for (size_t i = 0; i < all.size(); ++i) {
    const float want = static_cast<float>(c10::Half(all[i], c10::Half::from_bits()));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(out[i])) << i;
    } else {
      EXPECT_EQ(bits(out[i]), bits(want)) << "half bits " << i;
    }
  }
  ops.bf16_to_float(all.data(), out.data(), static_cast<int64_t>(all.size()));
  for (size_t i = 0; i < all.size(); ++i) {
    const float want = static_cast<float>(c10::BFloat16(all[i], c10::BFloat16::from_bits()));
    EXPECT_EQ(bits(out[i]), bits(want)) << "bfloat16 bits " << i;  // exact, NaN payloads included
  }
}

TEST(VecConversions, FloatIntoHalfAndBFloat16RoundsAsC10) {
  const auto& ops = vec_ops();
  if (!ops.float_to_half) GTEST_SKIP() << "no vectorised conversions on this CPU (" << ops.name << ")";
  const std::vector<float> x = probe_floats();
  for (int64_t n : {int64_t(x.size()), int64_t(7), int64_t(17), int64_t(1)}) {
    std::vector<uint16_t> h(n), b(n);
    ops.float_to_half(x.data(), h.data(), n);
    ops.float_to_bf16(x.data(), b.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      expect_same_half_bits(h[i], c10::Half(x[i]).x, x[i]);
      EXPECT_EQ(b[i], c10::BFloat16(x[i]).x) << "x = " << x[i] << " bits " << std::hex << bits(x[i]);
    }
  }
}

}  // namespace

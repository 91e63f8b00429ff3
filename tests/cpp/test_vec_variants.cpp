// The CPU kernels' row loops (csrc/cpu/vec.h) in every variant this CPU can run. On x86-64 the kernels only
// ever take the AVX2 variant, so the portable loops that ARM and other CPUs run are held here to the same
// results: against plain formulas in double, and the dropout factors bit for bit against the scalar Philox
// model (kernels/dropout.h), whatever the variant.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "../../csrc/cpu/vec.h"
#include "../../kernels/dropout.h"

namespace {

using relattn::cpu::VecOps;
using relattn::cpu::vec_ops_variants;

constexpr float kInf = std::numeric_limits<float>::infinity();
const int64_t kLengths[] = {0, 1, 7, 8, 9, 31, 33, 130};

std::vector<float> random_row(int64_t n, uint32_t seed, float lo = -8.f, float hi = 8.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(gen);
  if (n > 3) v[2] = -kInf;  // a masked score
  return v;
}

TEST(VecVariants, PortableVariantIsListedFirst) {
  const auto variants = vec_ops_variants();
  ASSERT_FALSE(variants.empty());
  EXPECT_EQ(std::string(variants[0]->name), "baseline");
  EXPECT_EQ(variants.back(), &relattn::cpu::vec_ops());  // the kernels' choice is the best one listed
}

TEST(VecVariants, RowLoopsMatchPlainFormulas) {
  for (const VecOps* ops : vec_ops_variants()) {
    SCOPED_TRACE(ops->name);
    for (int64_t n : kLengths) {
      SCOPED_TRACE("n = " + std::to_string(n));
      const std::vector<float> s = random_row(n, 1 + uint32_t(n));
      double m = -kInf, total = 0;
      for (float x : s) {
        m = std::max<double>(m, x);
        total += x;
      }
      EXPECT_EQ(ops->row_max(s.data(), n), static_cast<float>(m));

      std::vector<float> finite = random_row(n, 2 + uint32_t(n));
      for (auto& x : finite) x = std::isinf(x) ? 0.f : x;
      double fsum = 0;
      for (float x : finite) fsum += x;
      EXPECT_NEAR(ops->sum(finite.data(), n), fsum, 1e-5 * (1 + n * 8));

      // exp(s - m) and its sum (exp(-inf) = 0): fast_expf's relative error is ~1e-7.
      std::vector<float> e = s;
      const float mm = n ? static_cast<float>(m) : 0.f;
      const float got_sum = ops->exp_sub_sum(e.data(), n, mm);
      double want_sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double want = std::exp(double(s[j] - mm));  // the argument as the loops round it
        want_sum += want;
        EXPECT_NEAR(e[j], want, 2e-7 * want + 1e-30) << j;
      }
      EXPECT_NEAR(got_sum, want_sum, 1e-6 * want_sum + 1e-30);

      // p = exp(s - lse), ds = p (dp - delta)
      std::vector<float> p = s, dp = random_row(n, 3 + uint32_t(n));
      for (auto& x : dp) x = std::isinf(x) ? 1.f : x;
      const std::vector<float> dp0 = dp;
      ops->probs_dscores(p.data(), dp.data(), n, 3.5f, 0.25f);
      for (int64_t j = 0; j < n; ++j) {
        const double pw = std::exp(double(s[j] - 3.5f));
        EXPECT_NEAR(p[j], pw, 2e-7 * pw + 1e-30) << j;
        EXPECT_NEAR(dp[j], pw * (double(dp0[j]) - 0.25), 4e-7 * pw * (std::abs(dp0[j]) + 0.25) + 1e-30) << j;
      }

      std::vector<float> a = finite;
      ops->sub_alibi(a.data(), n, 0.125f, -5);
      for (int64_t j = 0; j < n; ++j)
        EXPECT_FLOAT_EQ(a[j], finite[j] - 0.125f * static_cast<float>(std::abs(-5 + j))) << j;
      std::vector<float> c = finite;
      ops->scale(c.data(), n, -0.75f);
      for (int64_t j = 0; j < n; ++j) EXPECT_EQ(c[j], finite[j] * -0.75f) << j;
    }
  }
}

// A NaN score gives a NaN weight (and sum), in every lane of the vector loops and in their scalar tails:
// clamping the argument must not turn it into a weight of about 0 (a NaN in q or k silently dropped).
TEST(VecVariants, NanScoresStayNan) {
  for (const VecOps* ops : vec_ops_variants()) {
    SCOPED_TRACE(ops->name);
    for (int64_t n : {1, 8, 9, 17}) {
      for (int64_t at = 0; at < n; ++at) {
        SCOPED_TRACE("n = " + std::to_string(n) + ", NaN at " + std::to_string(at));
        std::vector<float> s = random_row(n, 5 + uint32_t(n));
        s[at] = std::numeric_limits<float>::quiet_NaN();
        std::vector<float> e = s;
        EXPECT_TRUE(std::isnan(ops->exp_sub_sum(e.data(), n, 1.f)));
        EXPECT_TRUE(std::isnan(e[at]));
        std::vector<float> p = s, dp(n, 1.f);
        ops->probs_dscores(p.data(), dp.data(), n, 1.f, 0.5f);
        EXPECT_TRUE(std::isnan(p[at]));
        EXPECT_TRUE(std::isnan(dp[at]));
      }
    }
    EXPECT_EQ(relattn::cpu::fast_expf(-kInf), 0.f);
    EXPECT_TRUE(std::isnan(relattn::cpu::fast_expf(std::numeric_limits<float>::quiet_NaN())));
  }
}

// The dropout factors must not depend on the variant: a mask drawn on one CPU is the mask on any other.
TEST(VecVariants, DropoutFactorsMatchTheScalarModelBitForBit) {
  const uint32_t k0 = 0x1234567u, k1 = 0x89ABCDEu;
  // The random number of column 0 (row i) as a threshold, and one above it: the pair is kept, then dropped.
  uint32_t w[4];
  const uint32_t ctr[4] = {16 * 3, 7, 2, 1};
  relattn::kernels::philox4x32_10(ctr, k0, k1, w);
  const uint32_t r0 = relattn::kernels::dropout_half(w, 0);
  for (const VecOps* ops : vec_ops_variants()) {
    SCOPED_TRACE(ops->name);
    for (int64_t cols : {int64_t(1), int64_t(5), int64_t(16), int64_t(31), int64_t(32), int64_t(33), int64_t(100)}) {
      for (bool second_row : {true, false}) {
        // round(p * 65536) for p in [0, 1]
        for (uint32_t threshold : {0u, 1u, 6554u, 32768u, 65535u, 65536u, r0, r0 + 1}) {
          std::vector<float> got0(cols, -1.f), got1(cols, -1.f), want0(cols, -2.f), want1(cols, -2.f);
          ops->dropout_rows(got0.data(), second_row ? got1.data() : nullptr, cols, 16 * 3, 7, 2, 1, k0, k1, threshold,
                            1.25f);
          relattn::kernels::dropout_rows(want0.data(), second_row ? want1.data() : nullptr, cols, 16 * 3, 7, 2, 1, k0,
                                         k1, threshold, 1.25f);
          if (threshold == r0 || threshold == r0 + 1) EXPECT_EQ(want0[0], threshold == r0 ? 1.25f : 0.f);
          for (int64_t j = 0; j < cols; ++j) {
            EXPECT_EQ(got0[j], want0[j]) << "cols " << cols << " col " << j;
            if (second_row) EXPECT_EQ(got1[j], want1[j]) << "cols " << cols << " col " << j;
          }
        }
      }
    }
  }
}

}  // namespace

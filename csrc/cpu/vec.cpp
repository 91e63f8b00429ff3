#include "vec.h"

namespace relattn {
namespace cpu {
namespace vec_default {
extern const VecOps ops;
}
#ifdef RELATTN_VEC_AVX2
namespace vec_avx2 {
extern const VecOps ops;
}
#endif

namespace {
bool has_avx2() {
#ifdef RELATTN_VEC_AVX2
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return avx2;
#else
  return false;
#endif
}
}  // namespace

const VecOps& vec_ops() {
#ifdef RELATTN_VEC_AVX2
  if (has_avx2()) return vec_avx2::ops;
#endif
  return vec_default::ops;
}

std::vector<const VecOps*> vec_ops_variants() {
  std::vector<const VecOps*> v = {&vec_default::ops};
#ifdef RELATTN_VEC_AVX2
  if (has_avx2()) v.push_back(&vec_avx2::ops);
#endif
  return v;
}

}  // namespace cpu
}  // namespace relattn

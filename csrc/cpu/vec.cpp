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

const VecOps& vec_ops() {
#ifdef RELATTN_VEC_AVX2
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2) return vec_avx2::ops;
#endif
  return vec_default::ops;
}

}  // namespace cpu
}  // namespace relattn

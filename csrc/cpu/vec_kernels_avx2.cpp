// Compiled with -mavx2 -mfma (x86-64 only); used when the CPU has both.
#define RELATTN_VEC_NS vec_avx2
#define RELATTN_VEC_NAME "avx2+fma"
#define RELATTN_VEC_USE_AVX2
#include "vec_kernels.inc"

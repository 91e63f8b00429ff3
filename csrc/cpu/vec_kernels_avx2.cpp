// Compiled with -mavx2 -mfma -mf16c (x86-64 only); used when the CPU has all three.
#define RELATTN_VEC_NS vec_avx2
#define RELATTN_VEC_NAME "avx2+fma"
#define RELATTN_VEC_USE_AVX2
#include "vec_kernels.inc"

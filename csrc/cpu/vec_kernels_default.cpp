#define RELATTN_VEC_NS vec_default
#define RELATTN_VEC_NAME "baseline"
#include "vec_kernels.inc"

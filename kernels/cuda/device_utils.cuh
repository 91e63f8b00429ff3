// Device helpers of relattn's CUDA kernels: element types, cp.async, ldmatrix, mma.sync, warp reductions.
// Torch-free; every PTX instruction used here exists on sm_80 and sm_90 alike.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

namespace relattn {
namespace kernels {
namespace cuda {

#define RELATTN_DEVICE __device__ __forceinline__

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types ----------------------------------------------------------------------------------

template <typename T>
struct TypeInfo;  // T -> float conversions and the packed pair type fed to the tensor cores

template <>
struct TypeInfo<__half> {
  RELATTN_DEVICE static float to_float(__half x) { return __half2float(x); }
  RELATTN_DEVICE static __half from_float(float x) { return __float2half_rn(x); }
  // Two floats as one 32-bit register: `lo` in the low 16 bits (the lower column / k index).
  RELATTN_DEVICE static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct TypeInfo<__nv_bfloat16> {
  RELATTN_DEVICE static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  RELATTN_DEVICE static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  RELATTN_DEVICE static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct TypeInfo<float> {
  RELATTN_DEVICE static float to_float(float x) { return x; }
  RELATTN_DEVICE static float from_float(float x) { return x; }
};

template <>
struct TypeInfo<double> {
  RELATTN_DEVICE static float to_float(double x) { return static_cast<float>(x); }
  RELATTN_DEVICE static double from_float(float x) { return x; }
};

// Conversion between any element type and the accumulation type acc_t (float or double).
template <typename acc_t, typename T>
RELATTN_DEVICE acc_t to_acc(T x) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return x;
  } else if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<acc_t>(x);
  } else {
    return static_cast<acc_t>(TypeInfo<T>::to_float(x));
  }
}

template <typename T, typename acc_t>
RELATTN_DEVICE T from_acc(acc_t x) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return x;
  } else if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<T>(x);
  } else {
    return TypeInfo<T>::from_float(static_cast<float>(x));
  }
}

// 16 zero bytes into shared memory (16-byte aligned).
RELATTN_DEVICE void st_shared_zero_16(void* smem_dst) {
  *reinterpret_cast<uint4*>(smem_dst) = make_uint4(0, 0, 0, 0);
}

#if defined(RELATTN_CUDA_EMULATION)
}  // namespace cuda
}  // namespace kernels
}  // namespace relattn
#include "emulation/cuda_emulation.h"  // CPU versions of everything in the #else branch
namespace relattn {
namespace kernels {
namespace cuda {
#else
// ---- shared-memory addresses and asynchronous copies -------------------------------------------------

RELATTN_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers (both addresses 16-byte aligned).
RELATTN_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}

RELATTN_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
RELATTN_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// *addr += v in global memory without waiting for the result (red.global.add.f32; subnormals flush to
// zero). Deterministic only where no other thread adds to the same address before the next barrier:
// the bucket sums use it for keys whose buckets are known to be distinct.
RELATTN_DEVICE void red_add_global(float* addr, float v) { atomicAdd(addr, v); }


// ---- tensor cores: ldmatrix and mma.sync m16n8k16 (fp32 accumulation) ----------------------------------

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m receives it
// (lane l: row l/4, columns 2(l%4), 2(l%4)+1).
RELATTN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// Same, transposed: lane l receives (row 2(l%4), column l/4) and (row 2(l%4)+1, column l/4).
RELATTN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// C[16x8] += A[16x16] * B[16x8], A row-major, B column-major ([n][k]). Fragments (g = lane/4, t = lane%4):
//   a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
template <typename T>
RELATTN_DEVICE void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
RELATTN_DEVICE void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
RELATTN_DEVICE void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- launches ----------------------------------------------------------------------------------------

// Raises `kernel`'s dynamic shared-memory limit to `smem` bytes and launches it on `blocks` CTAs of
// `threads` on `stream` (nothing for an empty grid). Returns the first error, if any.
template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, int64_t blocks, int threads, int64_t smem, cudaStream_t stream,
                          const Params& p) {
  if (blocks <= 0) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
}

#endif  // RELATTN_CUDA_EMULATION

// ---- warp reductions ----------------------------------------------------------------------------------

// Over the 4 lanes of a quad (the lanes holding one row of an mma C fragment).
RELATTN_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
RELATTN_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename acc_t>
RELATTN_DEVICE acc_t warp_max(acc_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t y = __shfl_xor_sync(0xffffffffu, x, o);
    x = x > y ? x : y;
  }
  return x;
}
template <typename acc_t>
RELATTN_DEVICE acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

RELATTN_DEVICE float exp_acc(float x) { return expf(x); }
RELATTN_DEVICE double exp_acc(double x) { return exp(x); }
RELATTN_DEVICE float log_acc(float x) { return logf(x); }
RELATTN_DEVICE double log_acc(double x) { return log(x); }

// The query tile of a CTA in the kernels that give each CTA one (query tile, b, h) (both forwards, the
// backwards' kernel A). CTAs take the query tiles fastest, the last one (the heaviest under causal
// masking) first. Keys [0, key_end) can be seen by some row of the tile: with causal masking none after
// the position of its last row.
struct QueryTile {
  int64_t bh, b, h, kv_head, i0, key_end;
  int rows;
};

template <int kBlockM, typename Params>
RELATTN_DEVICE QueryTile query_tile(const Params& p, int64_t slot) {
  QueryTile t;
  const int64_t nqb = (p.Lq + kBlockM - 1) / kBlockM;
  t.bh = slot / nqb;
  t.b = t.bh / p.H;
  t.h = t.bh % p.H;
  t.kv_head = t.h / (p.H / p.Hk);
  t.i0 = (nqb - 1 - slot % nqb) * kBlockM;
  t.rows = static_cast<int>(p.Lq - t.i0 < kBlockM ? p.Lq - t.i0 : kBlockM);
  t.key_end = p.Lk;
  if (p.causal) {
    const int64_t last = t.i0 + t.rows + p.q_offset;  // one past the last row's position
    t.key_end = last < 0 ? 0 : (last < p.Lk ? last : p.Lk);
  }
  return t;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

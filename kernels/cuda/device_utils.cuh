// Device helpers of relattn's CUDA kernels: element types, cp.async, ldmatrix, mma.sync, warp reductions.
// Torch-free; every PTX instruction used here exists on sm_80 and sm_90 alike.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include "../dropout.h"
#include "../params.h"
#include "../segments.h"

namespace relattn {
namespace kernels {
namespace cuda {

#define RELATTN_DEVICE __device__ __forceinline__

// The dropout factor of pair (i, j) of head h, batch b (kernels/dropout.h): p.dropout_scale when kept, 0
// when dropped. One Philox call per pair: the SIMT kernels' way; the tensor-core kernels share a call among
// the 8 pairs of its counter, which a thread holds in its accumulator fragments.
template <typename acc_t>
RELATTN_DEVICE acc_t dropout_factor(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return dropout_keep(*p.dropout_seed, p.dropout_threshold, static_cast<uint64_t>(b), static_cast<uint64_t>(h),
                      static_cast<uint64_t>(i), static_cast<uint64_t>(j))
             ? static_cast<acc_t>(p.dropout_scale)
             : acc_t(0);
}

// The Philox output of the counter that holds pair (i, j) of (b, h) (kernels/dropout.h), and the factor of
// its number `slot`: p.dropout_scale when kept, 0 when dropped.
RELATTN_DEVICE void dropout_words(uint32_t k0, uint32_t k1, int64_t b, int64_t h, int64_t i, int64_t j, uint32_t w[4]) {
  uint32_t ctr[4];
  dropout_counter(static_cast<uint64_t>(b), static_cast<uint64_t>(h), static_cast<uint64_t>(i), static_cast<uint64_t>(j),
                  ctr);
  philox4x32_10(ctr, k0, k1, w);
}
RELATTN_DEVICE float dropout_z(const AttentionParams& p, const uint32_t w[4], uint32_t slot) {
  return dropout_half(w, slot) >= p.dropout_threshold ? static_cast<float>(p.dropout_scale) : 0.f;
}

// Dropout factors for m16n8 accumulator fragments (the tensor-core kernels): calls f(mt, nt, e, z) for every
// element acc[mt][nt][e] of a thread, which holds the pair (row0 + 16 mt + g + 8 (e >> 1), col0 + 8 nt + 2 tq
// + (e & 1)) with row0 and col0 multiples of 16 and kNT even. The 8 pairs of (mt, 16-column block) are one
// Philox counter's: one call.
template <int kMT, int kNT, typename F>
RELATTN_DEVICE void for_dropout_factors(const AttentionParams& p, uint32_t k0, uint32_t k1, int64_t b, int64_t h,
                                        int64_t row0, int64_t col0, int g, int tq, F&& f) {
  static_assert(kNT % 2 == 0, "whole 16-column blocks");
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      uint32_t w[4];
      dropout_words(k0, k1, b, h, row0 + 16 * mt + g, col0 + 16 * kk + 2 * tq, w);
#pragma unroll
      for (int n2 = 0; n2 < 2; ++n2)
#pragma unroll
        for (int e = 0; e < 4; ++e)  // e = hf * 2 + e1
          f(mt, 2 * kk + n2, e, dropout_z(p, w, static_cast<uint32_t>(((e >> 1) << 2) | (n2 << 1) | (e & 1))));
    }
}

// The same for the transposed tiles of the backward's kernel B: element acc[nt][e] holds the pair of key
// key0 + g + 8 (e >> 1) and query i0 + 8 nt + 2 tq + (e & 1) (key0, i0 multiples of 16, kNT even); calls
// f(nt, e, z). Queries 2 tq + e1 and 2 tq + e1 + 8 share a counter, and so do the thread's two keys: one
// Philox call per (16-query block, e1), 4 of its 8 numbers used.
template <int kNT, typename F>
RELATTN_DEVICE void for_dropout_factors_t(const AttentionParams& p, uint32_t k0, uint32_t k1, int64_t b, int64_t h,
                                          int64_t i0, int64_t key0, int g, int tq, F&& f) {
  static_assert(kNT % 2 == 0, "whole 16-query blocks");
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk)
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
      uint32_t w[4];
      dropout_words(k0, k1, b, h, i0 + 16 * kk + 2 * tq + e1, key0 + g, w);
#pragma unroll
      for (int n2 = 0; n2 < 2; ++n2)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          f(2 * kk + n2, hf * 2 + e1, dropout_z(p, w, static_cast<uint32_t>((n2 << 2) | (hf << 1) | (g & 1))));
    }
}

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

// 2^x with subnormal results flushed to zero (ex2.approx.ftz.f32: one MUFU.EX2). exp2f compiles to the same
// instruction wrapped in a range test and two predicated multiplies that keep subnormal results; the
// softmax does not need those (a probability below 2^-126 next to a row sum >= 1), and they cost three
// issue slots per score element.
RELATTN_DEVICE float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// *addr += v in global memory without waiting for the result (red.global.add.f32; subnormals flush to
// zero). Deterministic where the additions to one address are ordered: by one thread in program order,
// by different threads separated by a barrier (__syncthreads, or __syncwarp within a warp), which orders
// memory among the threads it joins; the bucket sums use it only so.
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

// Makes sure `kernel`'s dynamic shared-memory limit on the current device is at least `smem` bytes. The limit
// belongs to the kernel (per device), not to a launch: it is only ever raised, under a lock, so that a launch
// with a smaller size in another host thread cannot lower it between this thread's raise and its launch.
template <typename Kernel>
cudaError_t raise_smem_limit(Kernel kernel, int64_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;  // the default limit
  // (kernel, device) -> the limit set. Kernels of one signature share this function instance: key by address.
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int64_t> limits;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> guard(lock);
  int64_t& limit = limits[{reinterpret_cast<const void*>(kernel), device}];
  if (limit >= smem) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) limit = smem;
  return err;
}

// Raises `kernel`'s dynamic shared-memory limit to `smem` bytes (raise_smem_limit) and launches it on `blocks`
// CTAs of `threads` on `stream` (nothing for an empty grid). Returns the first error, if any.
template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, int64_t blocks, int threads, int64_t smem, cudaStream_t stream,
                          const Params& p) {
  if (blocks <= 0) return cudaSuccess;
  cudaError_t err = raise_smem_limit(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
}

#endif  // RELATTN_CUDA_EMULATION

// ---- bucket ids -----------------------------------------------------------------------------------------

// An id as the kernels use it: clamped into [0, id_max] (params.h; one unsigned min, negative ids included).
RELATTN_DEVICE int32_t clamp_id(int32_t id, uint32_t id_max) {
  const uint32_t u = static_cast<uint32_t>(id);
  return static_cast<int32_t>(u > id_max ? id_max : u);
}

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

// Bucket sums of one row of a score tile, the row held by a quad in the mma C layout (this lane holds
// columns 8n + 2tq and 8n + 2tq + 1 of n8 tile n < kNT), for bucket ids of which each fills one run of
// consecutive columns (the distance window of a table such as T5's log buckets: every id's distances form
// one interval). value(n, e) is column 8n + 2tq + e's value (0 for masked columns), bucket(c) the id of
// column c. A segmented scan over the quad adds up every run, carried from one n8 tile to the next, and
// the lane holding a run's last column calls flush(id, sum) for it, once: no two flushes of a call share
// an id, so the lanes flush at once, with no turns and no atomics among them, and the sums are the same
// from run to run. Every lane of the warp must call it (shuffles).
template <int kNT, typename ValueFn, typename BucketFn, typename FlushFn>
RELATTN_DEVICE void quad_run_sums(int tq, ValueFn value, BucketFn bucket, FlushFn flush) {
  constexpr unsigned kAll = 0xffffffffu;
  int carry_id = -1;   // the run open at the end of the previous n8 tile
  float carry = 0.f;   // and its sum so far
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int c0 = nt * 8 + 2 * tq;
    const int b0 = bucket(c0), b1 = bucket(c0 + 1);
    int left_id = __shfl_up_sync(kAll, b1, 1, 4);  // the id of column c0 - 1
    if (tq == 0) left_id = carry_id;
    int right_id = __shfl_down_sync(kAll, b0, 1, 4);  // the id of column c0 + 2
    if (tq == 3) right_id = nt + 1 < kNT ? bucket(c0 + 2) : -1;
    const bool whole = b0 == b1;  // both columns in one run
    float head = value(nt, 0);    // the run ending at c0 (if not whole)
    float tail = value(nt, 1) + (whole ? head : 0.f);  // the run ending at c0 + 1
    // Inclusive segmented scan of the tails: a lane whose tail run began left of it adds the left tails.
    int open = whole && left_id == b0;
#pragma unroll
    for (int d = 1; d < 4; d *= 2) {
      const float x = __shfl_up_sync(kAll, tail, d, 4);
      const int left_open = __shfl_up_sync(kAll, open, d, 4);
      if (tq >= d && open) {
        tail += x;
        open = left_open;
      }
    }
    if (open) tail += carry;  // the run reaches back into the previous n8 tile
    float left = __shfl_up_sync(kAll, tail, 1, 4);  // the inclusive sum of the run ending at c0 - 1
    if (tq == 0) left = carry;
    if (left_id == b0 && !whole) head += left;
    if (!whole) flush(b0, head);
    if (right_id != b1) flush(b1, tail);
    carry_id = __shfl_sync(kAll, b1, 3, 4);
    carry = __shfl_sync(kAll, tail, 3, 4);
  }
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
// masking) first. Keys [key_begin, key_end) can be seen by some row of the tile: with causal masking none
// after the position of its last row; with segments (clip_to_segments) only those of its rows' segments
// (key_begin is exact: the kernels round it down to their key-tile grid). q_off is the batch row's query
// offset (params.h: query i sits at position i + q_off).
struct QueryTile {
  int64_t bh, b, h, kv_head, i0, q_off, key_begin, key_end;
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
  t.q_off = p.batch_q_offset(t.b);
  t.key_begin = 0;
  t.key_end = p.Lk;
  if (p.causal) {
    const int64_t last = t.i0 + t.rows + t.q_off;  // one past the last row's position
    t.key_end = last < 0 ? 0 : (last < p.Lk ? last : p.Lk);
  }
  return t;
}

// With segments, narrows the tile's keys to those of its rows' segments (a separate step: the tensor-core
// instances without segment support never see it, see forward.h).
template <typename Params>
RELATTN_DEVICE void clip_to_segments(const Params& p, QueryTile& t) {
  if (p.q_segment_ids == nullptr) return;
  int64_t lo, hi;
  segment_key_span(p, t.b, t.i0, t.rows, lo, hi);
  t.key_begin = lo;
  if (hi < t.key_end) t.key_end = hi;
  if (t.key_end < t.key_begin) t.key_end = t.key_begin;
}

// Forward kernels of a split decode step (ForwardParams::num_splits > 1): the grid is num_splits copies of the
// query tiles, and CTA `slot` takes key chunk slot / tiles (key_chunk) of query tile slot % tiles.
template <int kBlockM, typename Params>
RELATTN_DEVICE int64_t tiles_per_key_chunk(const Params& p) {
  return (p.Lq + kBlockM - 1) / kBlockM * p.B * p.H;
}
template <int kBlockM, typename Params>
RELATTN_DEVICE int64_t key_chunk(const Params& p, int64_t slot) {
  return p.num_splits > 1 ? slot / tiles_per_key_chunk<kBlockM>(p) : 0;
}

// Narrows the tile's keys to its key chunk (after clip_to_segments). A tile left with no key of the chunk
// gets the empty range [lo, lo) at the chunk's start, a key-tile boundary, so that no tile is visited.
template <typename Params>
RELATTN_DEVICE void clip_to_key_chunk(const Params& p, QueryTile& t, int64_t chunk) {
  if (p.num_splits <= 1) return;
  const int64_t lo = chunk * p.split_keys, hi = lo + p.split_keys;
  if (t.key_begin < lo) t.key_begin = lo;
  if (hi < t.key_end) t.key_end = hi;
  if (t.key_end <= t.key_begin) t.key_begin = t.key_end = lo;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

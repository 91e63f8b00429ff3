// Runs relattn's CUDA kernels on the CPU, for tests on machines without a GPU (CI among them).
//
// Compiled with a host compiler and -DRELATTN_CUDA_EMULATION, kernels/cuda/*.cuh build as plain C++ against
// this header: a launch runs the grid one CTA at a time, one std::thread per CUDA thread, and
//   __syncthreads / __syncwarp        std::barrier of the CTA / of the warp
//   __shfl_xor_sync, __shfl_sync, __shfl_up_sync, __shfl_down_sync, __match_any_sync,
//   __any_sync                          an exchange through a per-warp buffer between two warp barriers
//   cp.async                            deferred: the destination's 16 bytes turn to 0xFF (NaN) at the
//                                       issue and get the data only when the issuing thread's
//                                       cp.async.wait_group retires that group, so a read before the wait
//                                       and barrier (RAW), or a refill of a stage other threads still
//                                       read (WAR), shows up as NaN in the results
//   red.global.add (red_add_global)     std::atomic_ref<float>::fetch_add
//   ex2.approx.ftz (exp2_ftz)           std::exp2, subnormal results flushed to zero
//   ldmatrix (.x4, .x4.trans)           each lane publishes its row address; each lane then reads the
//                                       elements the PTX ISA assigns to it from the other lanes' rows
//   mma.sync m16n8k16 (f16/bf16 -> f32) each lane publishes its A/B fragments; each lane computes its four
//                                       C elements from the whole warp's fragments (fp32 sums)
// with the fragment layouts of the PTX ISA (the same ones device_utils.cuh documents). cp.async and ldmatrix
// addresses are checked where the hardware faults (16-byte alignment, inside the launch's dynamic shared
// memory): the launch then returns cudaErrorMisalignedAddress / cudaErrorIllegalAddress and prints the first
// offender. Dynamic shared
// memory is one buffer, filled with 0xFF bytes (NaN in every float type) before each CTA so that a read of
// a location no thread wrote shows up in the results. What emulation cannot show: timing, the hardware's
// own interleavings (the host threads' interleavings are only a sample of them), and any behaviour that
// differs from the documented layouts.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

// Kernel qualifiers the host compiler does not know.
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace relattn {
namespace kernels {
namespace cuda {

// Dynamic shared memory of the CTA in flight (the kernels declare `extern __shared__ ... smem[]` or
// `smem_raw[]` at block scope, which names these).
constexpr int64_t kEmulatedSmemBytes = 232448;  // an H100's opt-in limit per block
alignas(16) inline unsigned char smem[kEmulatedSmemBytes];
alignas(16) inline unsigned char smem_raw[kEmulatedSmemBytes];

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// This thread's cp.async copies that have not landed: `copies` in issue order, `group_end[g]` = the
// number of copies issued before the g-th commit still pending.
struct AsyncCopies {
  struct Copy {
    void* dst;
    const void* src;
  };
  std::vector<Copy> copies;
  std::vector<size_t> group_end;

  // Lands the oldest `groups` committed groups.
  void land(size_t groups) {
    if (groups == 0) return;
    const size_t n = group_end[groups - 1];
    for (size_t i = 0; i < n; ++i) std::memcpy(copies[i].dst, copies[i].src, 16);
    copies.erase(copies.begin(), copies.begin() + static_cast<std::ptrdiff_t>(n));
    group_end.erase(group_end.begin(), group_end.begin() + static_cast<std::ptrdiff_t>(groups));
    for (size_t& e : group_end) e -= n;
  }
};

struct ThreadState {
  Dim3 thread, block;
  int warp = 0, lane = 0;
  AsyncCopies async;
};
inline thread_local ThreadState tls;

struct Cta {
  Cta(int threads, int64_t smem_bytes) : block(threads), n_warps(threads / 32), smem_bytes(smem_bytes) {
    for (int w = 0; w < n_warps; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    exchange.resize(static_cast<size_t>(n_warps) * 32 * 8);
  }
  std::barrier<> block;
  int n_warps;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;  // [warp][lane][8]
  int64_t smem_bytes;              // the launch's dynamic shared memory
  // The first bad address a cp.async or ldmatrix of this CTA was given (what a GPU reports as a
  // misaligned or illegal address); the access itself is skipped.
  std::mutex fault_mutex;
  cudaError_t fault = cudaSuccess;
  std::string fault_message;

  void report(cudaError_t err, const std::string& what) {
    std::lock_guard<std::mutex> lock(fault_mutex);
    if (fault != cudaSuccess) return;
    fault = err;
    fault_message = what;
  }

  uint64_t* slot(int warp, int lane) { return exchange.data() + (static_cast<size_t>(warp) * 32 + lane) * 8; }
};
inline Cta* cta = nullptr;

inline uint64_t* my_slot() { return cta->slot(tls.warp, tls.lane); }

// A 16-byte access of shared memory at `addr` by `op`: aligned, and inside the launch's dynamic shared
// memory (either name of it). False, with the fault recorded, when not.
inline bool smem_access_ok(const void* addr, const char* op) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  const char* what = nullptr;
  cudaError_t err = cudaErrorIllegalAddress;
  if (a % 16 != 0) {
    what = "is not 16-byte aligned";
    err = cudaErrorMisalignedAddress;
  } else {
    auto inside = [&](const unsigned char* base) {
      const auto b = reinterpret_cast<uintptr_t>(base);
      return a >= b && a + 16 <= b + static_cast<uintptr_t>(cta->smem_bytes);
    };
    if (!inside(smem) && !inside(smem_raw)) what = "lies outside the launch's dynamic shared memory";
  }
  if (what == nullptr) return true;
  cta->report(err, std::string(op) + ": shared-memory address " + what + " (thread " + std::to_string(tls.thread.x) +
                       " of block " + std::to_string(tls.block.x) + ")");
  return false;
}

inline bool global_access_ok(const void* addr, const char* op) {
  if (reinterpret_cast<uintptr_t>(addr) % 16 == 0 && addr != nullptr) return true;
  cta->report(cudaErrorMisalignedAddress, std::string(op) + ": global address is null or not 16-byte aligned (thread " +
                                              std::to_string(tls.thread.x) + " of block " +
                                              std::to_string(tls.block.x) + ")");
  return false;
}
inline uint64_t* lane_slot(int lane) { return cta->slot(tls.warp, lane); }

}  // namespace emu
}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

#define threadIdx (::relattn::kernels::cuda::emu::tls.thread)
#define blockIdx (::relattn::kernels::cuda::emu::tls.block)

inline void __syncthreads() { ::relattn::kernels::cuda::emu::cta->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  namespace e = ::relattn::kernels::cuda::emu;
  e::cta->warps[e::tls.warp]->arrive_and_wait();
}

// __shfl_sync / __shfl_up_sync / __shfl_down_sync with CUDA's `width` (a power of two <= 32): lanes in
// segments of `width`; a source outside the lane's segment returns the lane's own value (up/down).
template <typename T>
inline T shfl_from(T x, int src_lane) {
  namespace e = ::relattn::kernels::cuda::emu;
  static_assert(sizeof(T) <= 8, "exchange slot");
  std::memcpy(e::my_slot(), &x, sizeof(T));
  __syncwarp();
  T y;
  std::memcpy(&y, e::lane_slot(src_lane), sizeof(T));
  __syncwarp();
  return y;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T x, int mask) {
  return shfl_from(x, ::relattn::kernels::cuda::emu::tls.lane ^ mask);
}
template <typename T>
inline T __shfl_sync(unsigned, T x, int src, int width = 32) {
  const int lane = ::relattn::kernels::cuda::emu::tls.lane;
  return shfl_from(x, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_up_sync(unsigned, T x, unsigned delta, int width = 32) {
  const int lane = ::relattn::kernels::cuda::emu::tls.lane;
  const int in_seg = lane & (width - 1);
  return shfl_from(x, in_seg >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T x, unsigned delta, int width = 32) {
  const int lane = ::relattn::kernels::cuda::emu::tls.lane;
  const int in_seg = lane & (width - 1);
  return shfl_from(x, in_seg + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane);
}

inline unsigned __match_any_sync(unsigned, int value) {
  namespace e = ::relattn::kernels::cuda::emu;
  e::my_slot()[0] = static_cast<uint64_t>(static_cast<int64_t>(value));
  __syncwarp();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l)
    if (e::lane_slot(l)[0] == static_cast<uint64_t>(static_cast<int64_t>(value))) m |= 1u << l;
  __syncwarp();
  return m;
}

inline int __any_sync(unsigned, int predicate) {
  namespace e = ::relattn::kernels::cuda::emu;
  e::my_slot()[0] = predicate != 0;
  __syncwarp();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= e::lane_slot(l)[0] != 0;
  __syncwarp();
  return any;
}

inline int __ffs(int x) { return __builtin_ffs(x); }

namespace relattn {
namespace kernels {
namespace cuda {
namespace emu {

// The 16-bit element `bits` of a fragment register as float.
template <typename T>
inline float half_bits_to_float(uint16_t bits) {
  T h;
  std::memcpy(&h, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(h);
  else return __bfloat162float(h);
}

// Runs `body` as `threads` CUDA threads of CTA `block` (joins before returning).
// Returns the CTA's first fault (cudaSuccess if none).
template <typename F>
cudaError_t run_cta(int64_t block, int threads, int64_t smem_bytes, F&& body) {
  // All of it, so that a read past the launch's size gives NaN and a write past it is seen below.
  std::memset(smem, 0xFF, sizeof(smem));
  std::memset(smem_raw, 0xFF, sizeof(smem_raw));
  Cta c(threads, smem_bytes);
  cta = &c;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tls.thread = Dim3{static_cast<unsigned>(t), 0, 0};
      tls.block = Dim3{static_cast<unsigned>(block), 0, 0};
      tls.warp = t / 32;
      tls.lane = t % 32;
      tls.async = {};
      body();
      tls.async.group_end.push_back(tls.async.copies.size());  // what a real GPU lands after the exit
      tls.async.land(tls.async.group_end.size());
    });
  }
  for (auto& th : pool) th.join();
  cta = nullptr;
  for (const unsigned char* buf : {smem, smem_raw})
    for (int64_t i = smem_bytes; i < kEmulatedSmemBytes; ++i)
      if (buf[i] != 0xFF) {
        c.report(cudaErrorIllegalAddress, "a thread wrote shared memory at byte " + std::to_string(i) +
                                              ", past the launch's " + std::to_string(smem_bytes) + " bytes");
        break;
      }
  if (c.fault != cudaSuccess) std::fprintf(stderr, "relattn CUDA emulation: %s\n", c.fault_message.c_str());
  return c.fault;
}

}  // namespace emu

// ---- the PTX wrappers of device_utils.cuh ----------------------------------------------------------

inline void cp_async_16(void* smem_dst, const void* gmem_src) {
  if (!emu::smem_access_ok(smem_dst, "cp.async") || !emu::global_access_ok(gmem_src, "cp.async")) return;
  std::memset(smem_dst, 0xFF, 16);  // undefined until the copy's group is waited for
  emu::tls.async.copies.push_back({smem_dst, gmem_src});
}
inline void cp_async_commit() { emu::tls.async.group_end.push_back(emu::tls.async.copies.size()); }
inline void red_add_global(float* addr, float v) { std::atomic_ref<float>(*addr).fetch_add(v); }

// ex2.approx.ftz.f32: subnormal results flush to zero (the hardware's approximation error, about 2 ulp,
// is not modelled).
inline float exp2_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}
// cp.async.wait_group N: every committed group but the newest N has landed (copies issued after the last
// commit belong to no group and stay in flight).
template <int N>
inline void cp_async_wait() {
  const size_t groups = emu::tls.async.group_end.size();
  if (groups > static_cast<size_t>(N)) emu::tls.async.land(groups - N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  if (!emu::smem_access_ok(smem_row, "ldmatrix")) smem_row = smem;  // keeps the warp's barriers in step
  emu::my_slot()[0] = reinterpret_cast<uint64_t>(smem_row);
  __syncwarp();
  const int l = emu::tls.lane;
  for (int m = 0; m < 4; ++m) {
    // matrix m, row l/4 (its address came from lane 8m + l/4), columns 2(l%4), 2(l%4)+1
    const auto* row = reinterpret_cast<const unsigned char*>(emu::lane_slot(8 * m + l / 4)[0]);
    std::memcpy(&r[m], row + (l % 4) * 4, 4);
  }
  __syncwarp();
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  if (!emu::smem_access_ok(smem_row, "ldmatrix")) smem_row = smem;  // keeps the warp's barriers in step
  emu::my_slot()[0] = reinterpret_cast<uint64_t>(smem_row);
  __syncwarp();
  const int l = emu::tls.lane;
  for (int m = 0; m < 4; ++m) {
    // (row 2(l%4), column l/4) and (row 2(l%4)+1, column l/4) of matrix m
    const auto* r0 = reinterpret_cast<const unsigned char*>(emu::lane_slot(8 * m + 2 * (l % 4))[0]);
    const auto* r1 = reinterpret_cast<const unsigned char*>(emu::lane_slot(8 * m + 2 * (l % 4) + 1)[0]);
    uint16_t lo, hi;
    std::memcpy(&lo, r0 + (l / 4) * 2, 2);
    std::memcpy(&hi, r1 + (l / 4) * 2, 2);
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  __syncwarp();
}

// C[16x8] += A[16x16] B[16x8] with the m16n8k16 fragments (g = lane/4, t = lane%4):
//   a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..);  b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint64_t* mine = emu::my_slot();
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  __syncwarp();
  auto a_at = [](int row, int k) {
    const uint64_t* src = emu::lane_slot((row % 8) * 4 + (k % 8) / 2);
    const uint32_t reg = static_cast<uint32_t>(src[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)]);
    return emu::half_bits_to_float<T>(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFFu));
  };
  auto b_at = [](int k, int n) {
    const uint64_t* src = emu::lane_slot(n * 4 + (k % 8) / 2);
    const uint32_t reg = static_cast<uint32_t>(src[k >= 8 ? 5 : 4]);
    return emu::half_bits_to_float<T>(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFFu));
  };
  const int g = emu::tls.lane / 4, t = emu::tls.lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += a_at(row, k) * b_at(k, col);
    out[e] = s;
  }
  __syncwarp();
  for (int e = 0; e < 4; ++e) c[e] += out[e];
}

// ---- launches ----------------------------------------------------------------------------------------

template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, int64_t blocks, int threads, int64_t smem, cudaStream_t, const Params& p) {
  if (blocks <= 0) return cudaSuccess;
  if (smem > kEmulatedSmemBytes || threads % 32 != 0) return cudaErrorInvalidValue;
  for (int64_t b = 0; b < blocks; ++b) {
    const cudaError_t err = emu::run_cta(b, threads, smem, [&] { kernel(p); });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace relattn

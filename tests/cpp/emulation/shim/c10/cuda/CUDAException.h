#pragma once
// Test shim (relattn_binding_emulation_tests): the CUDA binding compiled against the emulated kernels on a
// machine without a GPU. An emulated runtime error becomes a c10::Error; launches are checked by the emulation.
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#define C10_CUDA_CHECK(expr)                                                       \
  do {                                                                             \
    const cudaError_t relattn_shim_err = (expr);                                   \
    TORCH_CHECK(relattn_shim_err == cudaSuccess, "emulated CUDA error ", int(relattn_shim_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

# Imports torch's C++ libraries (target `torch`, TORCH_LIBRARIES) without running torch's own CMake
# config, which insists on a CUDA toolkit whenever torch itself was built with CUDA. relattn uses this
# for CPU-only builds: no nvcc on the machine, or RELATTN_CUDA=OFF.
if(TARGET torch)
  return()
endif()
find_file(RELATTN_TORCH_CONFIG TorchConfig.cmake PATH_SUFFIXES Torch share/cmake/Torch)
if(NOT RELATTN_TORCH_CONFIG)
  message(FATAL_ERROR "relattn: torch not found; pass "
          "-DCMAKE_PREFIX_PATH=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')")
endif()
get_filename_component(TORCH_INSTALL_PREFIX "${RELATTN_TORCH_CONFIG}/../../../.." ABSOLUTE)
set(_torch_lib "${TORCH_INSTALL_PREFIX}/lib")
add_library(torch SHARED IMPORTED)
set_target_properties(torch PROPERTIES
  IMPORTED_LOCATION "${_torch_lib}/libtorch.so"
  INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INSTALL_PREFIX}/include;${TORCH_INSTALL_PREFIX}/include/torch/csrc/api/include"
  INTERFACE_LINK_LIBRARIES "${_torch_lib}/libtorch_cpu.so;${_torch_lib}/libc10.so")
set(TORCH_LIBRARIES torch)
set(Torch_FOUND TRUE)

// Why cudaGetDeviceCount found no device, in words that fit the machine: with
// no driver at all the CUDA runtime says the driver is too old, which misleads
// (a first run on a machine without a GPU, issue 15). For stmuxd and the
// standalone CUDA programs alike.
#pragma once

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <string>

namespace stmux {

inline std::string noDeviceReason(cudaError_t error) {
  if (error == cudaSuccess) return "no CUDA device found";
  if (void* driver = ::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL); driver != nullptr) {
    ::dlclose(driver);
    return cudaGetErrorString(error);
  }
  return "no NVIDIA driver is installed (libcuda.so.1 not found)";
}

}  // namespace stmux

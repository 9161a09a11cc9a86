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

// Whether cudaGetDeviceCount's answer means there is no CUDA device here to
// use (none, none visible, or no driver at all), as opposed to a device or
// driver that fails: a GPU test skips on the first and fails on the second.
inline bool noDevice(cudaError_t error, int devices) {
  if (error == cudaSuccess) return devices == 0;
  if (error == cudaErrorNoDevice) return true;
  void* driver = ::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (driver == nullptr) return true;
  ::dlclose(driver);
  return false;
}

}  // namespace stmux

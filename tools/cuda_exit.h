// For the standalone CUDA programs (stmux-cublas-client, stmux-launch-bench,
// the daemon's test client): a CUDA or cuBLAS call that fails is reported with
// its expression, and the program ends with exit status 3; so does a driver
// function that cannot be found.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>
#include <errno.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "stmux/no_device.h"

#define EXIT_ON_CUDA_ERROR(call)                                                        \
  do {                                                                                  \
    const cudaError_t exit_error_ = (call);                                             \
    if (exit_error_ != cudaSuccess) {                                                   \
      std::fprintf(stderr, "%s: %s failed: %s\n", program_invocation_short_name, #call, \
                   cudaGetErrorString(exit_error_));                                    \
      std::exit(3);                                                                     \
    }                                                                                   \
  } while (0)

#define EXIT_ON_CUBLAS_ERROR(call)                                                      \
  do {                                                                                  \
    const cublasStatus_t exit_status_ = (call);                                         \
    if (exit_status_ != CUBLAS_STATUS_SUCCESS) {                                        \
      std::fprintf(stderr, "%s: %s failed: %s\n", program_invocation_short_name, #call, \
                   cublasGetStatusString(exit_status_));                                \
      std::exit(3);                                                                     \
    }                                                                                   \
  } while (0)

// The driver's `name` at `version` through the runtime (the programs link no
// libcuda), as F; the program ends with exit status 3 where the driver has
// none.
template <class F>
F driverFunction(const char* name, int version) {
  void* function = nullptr;
  cudaDriverEntryPointQueryResult found{};
  EXIT_ON_CUDA_ERROR(
      cudaGetDriverEntryPointByVersion(name, &function, version, cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || function == nullptr) {
    std::fprintf(stderr, "%s: the CUDA driver has no %s\n", program_invocation_short_name, name);
    std::exit(3);
  }
  return reinterpret_cast<F>(function);
}

// Whether this machine has no CUDA device the program can use; if so, it says
// so on stderr ("<program>: no CUDA device (<why>)"), the line by which the
// tests and stmux-bench tell a skip from a failure. The programs then end with
// exit status 3.
inline bool reportedNoDevice() {
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error == cudaSuccess && devices > 0) return false;
  std::fprintf(stderr, "%s: no CUDA device (%s)\n", program_invocation_short_name,
               stmux::noDeviceReason(error).c_str());
  return true;
}

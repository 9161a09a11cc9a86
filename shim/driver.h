// The CUDA driver functions the shim needs, found through the libcuda the
// program already uses. The shim links no CUDA library, so preloading it into
// a process that never touches a GPU (a shell script, say) costs nothing.
//
// Each function is looked up at the API version its type was declared for
// (cudaTypedefs.h's PFN_name_vVERSION): cuGetProcAddress returns the newest
// variant up to the version asked for, and a newer variant may take other
// arguments (CUDA 13's cuCtxSynchronize_v2 takes a context).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <optional>

namespace stmux::shim {

#define STMUX_DRIVER_FUNCTIONS(X)                      \
  X(cuPointerGetAttributes, 7000)                      \
  X(cuMemGetAddressRange, 3020)                        \
  X(cuIpcGetMemHandle, 4010)                           \
  X(cuStreamIsCapturing, 10000)                        \
  X(cuCtxSynchronize, 2000)                            \
  X(cuCtxGetDevice, 2000)                              \
  X(cuCtxGetCurrent, 4000)                             \
  X(cuCtxGetId, 12000)                                 \
  X(cuCtxGetFlags, 7000)                               \
  X(cuCtxSetFlags, 12010)                              \
  X(cuStreamSynchronize, 2000)                         \
  X(cuDeviceGet, 2000)                                 \
  X(cuDeviceGetUuid, 11040)                            \
  X(cuDeviceGetAttribute, 2000)                        \
  X(cuThreadExchangeStreamCaptureMode, 10010)          \
  X(cuCtxSetCurrent, 4000)                             \
  X(cuStreamCreate, 2000)                              \
  X(cuStreamGetFlags, 5050)                            \
  X(cuStreamQuery, 2000)                               \
  X(cuStreamWaitEvent, 3020)                           \
  X(cuEventCreate, 2000)                               \
  X(cuEventRecord, 2000)                               \
  X(cuStreamWriteValue32, 11070)                       \
  X(cuStreamWaitValue32, 11070)                        \
  X(cuMemHostRegister, 6050)                           \
  X(cuMemHostGetDevicePointer, 3020)                   \
  X(cuModuleLoadData, 2000)                            \
  X(cuModuleGetFunction, 2000)                         \
  X(cuOccupancyMaxActiveBlocksPerMultiprocessor, 6050) \
  X(cuLaunchKernel, 4000)

struct Driver {
#define STMUX_DRIVER_MEMBER(name, version) PFN_##name##_v##version name = nullptr;
  STMUX_DRIVER_FUNCTIONS(STMUX_DRIVER_MEMBER)
#undef STMUX_DRIVER_MEMBER
};

// Null when libcuda or one of these functions cannot be found.
const Driver* cudaDriver();

// The id of the calling thread's current context (cuCtxGetId), none without
// one. What the shim keeps for a context is known by this id, never by the
// context's handle: a context destroyed (cudaDeviceReset) and made again may
// come back under the same handle, without what was made in the old one.
using ContextId = unsigned long long;
std::optional<ContextId> currentContext(const Driver& driver);

}  // namespace stmux::shim

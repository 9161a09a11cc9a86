// The CUDA driver functions the shim needs, found through the libcuda the
// program already uses. The shim links no CUDA library, so preloading it into
// a process that never touches a GPU (a shell script, say) costs nothing.
#pragma once

#include <cuda.h>

namespace stmux::shim {

struct Driver {
  CUresult (*cuPointerGetAttributes)(unsigned int, CUpointer_attribute*, void**,
                                     CUdeviceptr) = nullptr;
  CUresult (*cuPointerGetAttribute)(void*, CUpointer_attribute, CUdeviceptr) = nullptr;
  CUresult (*cuMemGetAddressRange)(CUdeviceptr*, size_t*, CUdeviceptr) = nullptr;
  CUresult (*cuIpcGetMemHandle)(CUipcMemHandle*, CUdeviceptr) = nullptr;
  CUresult (*cuStreamSynchronize)(CUstream) = nullptr;
  CUresult (*cuStreamIsCapturing)(CUstream, CUstreamCaptureStatus*) = nullptr;
  CUresult (*cuCtxSynchronize)() = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetUuid)(CUuuid*, CUdevice) = nullptr;
};

// Null when libcuda or one of these functions cannot be found.
const Driver* cudaDriver();

}  // namespace stmux::shim

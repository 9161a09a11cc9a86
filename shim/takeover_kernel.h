// The shim's own SGEMM kernel (shim/takeover_sgemm.cu), embedded in
// libstmux.so as a fat binary (PTX for any GPU CUDA 13 supports, SASS for the
// common ones) and driven through the driver API: the shim links no CUDA
// library. Stream-ordered mode loads it into each context before the
// context's first stream-ordered call and queues it behind each call
// (docs/ARCHITECTURE.md, "Stream-ordered mode").
#pragma once

#include <cuda.h>

#include "shim/driver.h"
#include "shim/takeover_params.h"

namespace stmux::shim {

// Loads the kernel into the current context, the function loaded too (not
// left to first use). The module stays for the context's life.
CUresult loadTakeoverKernel(const Driver& driver, CUfunction* function);

// Queues `params` on `stream` (of the function's context).
CUresult launchTakeoverKernel(const Driver& driver, CUfunction function, CUstream stream,
                              const TakeoverParams& params);

}  // namespace stmux::shim

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

// The kernel as loaded into one context, with the module's wait kernel.
struct TakeoverKernel {
  CUfunction function = nullptr;
  // stmux_wait_released: STMUX_STREAM_WAIT=kernel's wait.
  CUfunction wait = nullptr;
  // The blocks that run at once on the context's GPU: the grid of a standby
  // launch (TakeoverParams::takeover set).
  unsigned wave = 0;
};

// Loads the kernel into the current context, its functions loaded too (not
// left to first use). The module stays for the context's life.
CUresult loadTakeoverKernel(const Driver& driver, TakeoverKernel* kernel);

// Queues `params` on `stream` (of the kernel's context).
CUresult launchTakeoverKernel(const Driver& driver, const TakeoverKernel& kernel, CUstream stream,
                              const TakeoverParams& params);

// Queues on `stream` a wait until the word at `released` (mapped host memory)
// reaches `seq`, compared cyclically: one thread polling it.
CUresult launchWaitKernel(const Driver& driver, const TakeoverKernel& kernel, CUstream stream,
                          CUdeviceptr released, uint32_t seq);

}  // namespace stmux::shim

#include "shim/takeover_kernel.h"

#include <algorithm>
#include <cstdint>

#include "shim/takeover_fatbin.h"  // generated: stmux_takeover_fatbin

namespace stmux::shim {
namespace {

constexpr std::int64_t kMaxGrid = 0x7fffffff;
// Where the GPU's size cannot be learned: a wave on any GPU stmux serves.
constexpr unsigned kFallbackWave = 64;

// The blocks of the kernel that the current context's GPU runs at once.
unsigned waveOf(const Driver& driver, CUfunction function) {
  CUdevice device = 0;
  int processors = 0, per_processor = 0;
  if (driver.cuCtxGetDevice(&device) != CUDA_SUCCESS ||
      driver.cuDeviceGetAttribute(&processors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device) !=
          CUDA_SUCCESS ||
      driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_processor, function, kTakeoverThreads,
                                                         0) != CUDA_SUCCESS ||
      processors <= 0 || per_processor <= 0) {
    return kFallbackWave;
  }
  return static_cast<unsigned>(processors) * static_cast<unsigned>(per_processor);
}

}  // namespace

CUresult loadTakeoverKernel(const Driver& driver, TakeoverKernel* kernel) {
  CUmodule module = nullptr;
  if (const CUresult result = driver.cuModuleLoadData(&module, stmux_takeover_fatbin);
      result != CUDA_SUCCESS) {
    return result;
  }
  // Under lazy loading this is what loads the function (CUDA Programming
  // Guide, "Lazy Loading").
  CUfunction function = nullptr, wait = nullptr;
  if (const CUresult result = driver.cuModuleGetFunction(&function, module, "stmux_takeover_sgemm");
      result != CUDA_SUCCESS) {
    return result;
  }
  if (const CUresult result = driver.cuModuleGetFunction(&wait, module, "stmux_wait_released");
      result != CUDA_SUCCESS) {
    return result;
  }
  *kernel = TakeoverKernel{function, wait, waveOf(driver, function)};
  return CUDA_SUCCESS;
}

CUresult launchTakeoverKernel(const Driver& driver, const TakeoverKernel& kernel, CUstream stream,
                              const TakeoverParams& params) {
  // The blocks loop over the tiles the grid does not cover. Queued behind
  // every stream-ordered call, where it almost always returns at once, the
  // kernel gets a single wave: what fills the GPU should it compute, and
  // no more blocks to start for nothing.
  const std::int64_t tiles = (params.m + kTakeoverTile - 1) / kTakeoverTile *
                             ((params.n + kTakeoverTile - 1) / kTakeoverTile) * params.count;
  const std::int64_t most = params.takeover != nullptr ? std::max(kernel.wave, 1u) : kMaxGrid;
  const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>(tiles, 1, most));
  TakeoverParams copy = params;
  void* arguments[] = {&copy};
  return driver.cuLaunchKernel(kernel.function, blocks, 1, 1, kTakeoverThreads, 1, 1, 0, stream,
                               arguments, nullptr);
}

CUresult launchWaitKernel(const Driver& driver, const TakeoverKernel& kernel, CUstream stream,
                          CUdeviceptr released, uint32_t seq) {
  void* arguments[] = {&released, &seq};
  return driver.cuLaunchKernel(kernel.wait, 1, 1, 1, 1, 1, 1, 0, stream, arguments, nullptr);
}

}  // namespace stmux::shim

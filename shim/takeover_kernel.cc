#include "shim/takeover_kernel.h"

#include <algorithm>
#include <cstdint>

#include "shim/takeover_fatbin.h"  // generated: stmux_takeover_fatbin

namespace stmux::shim {
namespace {

constexpr unsigned kTile = 16;  // as in takeover_sgemm.cu
constexpr std::int64_t kMaxGridX = 0x7fffffff;
constexpr std::int64_t kMaxGridYZ = 65535;

unsigned gridSize(std::int64_t tiles, std::int64_t limit) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(tiles, 1, limit));
}

}  // namespace

CUresult loadTakeoverKernel(const Driver& driver, CUfunction* function) {
  CUmodule module = nullptr;
  if (const CUresult result = driver.cuModuleLoadData(&module, stmux_takeover_fatbin);
      result != CUDA_SUCCESS) {
    return result;
  }
  // Under lazy loading this is what loads the function (CUDA Programming
  // Guide, "Lazy Loading").
  return driver.cuModuleGetFunction(function, module, "stmux_takeover_sgemm");
}

CUresult launchTakeoverKernel(const Driver& driver, CUfunction function, CUstream stream,
                              const TakeoverParams& params) {
  // The kernel loops over whatever the grid does not cover. Queued behind
  // every stream-ordered call, where it almost always returns at once, it
  // gets at most 64 blocks, a single wave on the GPUs stmux serves, and is
  // still fast enough for the rare call it computes.
  const bool standby = params.takeover != nullptr;
  const unsigned x = gridSize((params.m + kTile - 1) / kTile, standby ? 8 : kMaxGridX);
  const unsigned y = gridSize((params.n + kTile - 1) / kTile, standby ? 8 : kMaxGridYZ);
  const unsigned z = gridSize(params.count, standby ? 1 : kMaxGridYZ);
  TakeoverParams copy = params;
  void* arguments[] = {&copy};
  return driver.cuLaunchKernel(function, x, y, z, kTile, kTile, 1, 0, stream, arguments, nullptr);
}

}  // namespace stmux::shim

// One GPU's executor: the only code in stmuxd that talks to the GPU.
//
// Its thread takes batches from the scheduler (ExecutorChannel), maps each
// operand's allocation through CUDA IPC (MappingCache), checks every
// operand's whole extent against the allocation's real size, claims each
// request (pending -> running), groups requests by BatchKey, launches, and
// when the batch's event completes writes each request's status to its slot
// and has the callers that sleep woken (daemon/waker.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "daemon/channel.h"
#include "daemon/scheduler.h"
#include "stmux/status.h"

namespace stmux::daemon {

// How a batch of several BatchKeys is launched (STMUX_LAUNCH).
enum class LaunchMode { kAuto, kBatched, kGrouped };

struct ExecutorOptions {
  int device = 0;  // CUDA ordinal in the daemon
  std::uint32_t max_batch = 256;
  std::uint32_t max_in_flight = 2;
  std::size_t max_mappings = 4096;
  std::uint64_t spin_ns = 1'000'000;
  // Threads that wake the callers sleeping on their completions
  // (daemon/waker.h); 0: the executor's own thread wakes them.
  unsigned wakers = 2;
  LaunchMode launch = LaunchMode::kAuto;
  // auto: one cublasSgemmGroupedBatched when a batch has at least this many
  // keys, else one cublasSgemmBatched per key. Measured on an H200
  // (docs/BENCHMARKS.md, stmux-launch-bench): per-key launches were 1.9-2.6x
  // faster for 2 and 3 keys, the grouped launch 1.2x faster at 4 keys and
  // 2.2-4.5x at 8 to 32.
  std::uint32_t grouped_min_keys = 4;
  // STMUX_LAUNCH_GRAPHS: replay recurring batches' launches as CUDA graphs
  // (daemon/launch_graphs.h).
  bool launch_graphs = false;
};

// The GPUs of this host, as the daemon's CUDA runtime sees them.
Result<std::vector<GpuInfo>> listGpus();

class Executor {
 public:
  Executor(ExecutorOptions options, ExecutorChannel& channel);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Starts the thread and waits until it has set up the GPU (or failed to).
  Status start();
  // Finishes what is in flight, then ends the thread.
  void stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace stmux::daemon

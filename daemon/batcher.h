// When to launch, and what: the batching policy for one GPU.
//
// No CUDA and no clock of its own: every call is given the time, so the policy
// is tested with a fake clock on any machine. A batch is launched as soon as
// one of these holds (DESIGN.md, "Scheduling"):
//   full        STMUX_MAX_BATCH requests are waiting;
//   window      the oldest waiting request has waited STMUX_WINDOW_US;
//   all_waiting every recently active tenant (submitted within
//               STMUX_ACTIVE_US) has a request waiting: waiting longer gains
//               nothing;
//   idle        the GPU has nothing in flight and no recently active tenant is
//               expected back before the window would close (work-conserving).
// "Expected back" uses each tenant's think time: the gap between its last
// completion and its next submission, smoothed. Without it, "launch when the
// GPU is idle" fragments closed-loop load: after each batch the first tenant
// back would launch alone while the rest were a few microseconds away.
//
// Requests are taken round-robin across tenants, one from each in turn,
// starting one tenant further on each batch (after the last one taken, where
// the batch was full), so a busy tenant cannot starve a quiet one; a tenant's
// own requests stay in order, and two of them share a batch only if neither
// writes what the other touches (the requests of one launch run at once).
#pragma once

#include <cstdint>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "daemon/server.h"
#include "stmux/gemm.h"
#include "stmux/wire.h"

namespace stmux::daemon {

enum class LaunchReason : std::uint8_t { kFull, kWindow, kAllWaiting, kIdle, kCount };
inline constexpr std::size_t kLaunchReasonCount = static_cast<std::size_t>(LaunchReason::kCount);
inline constexpr std::string_view kLaunchReasonNames[] = {"full", "window", "all_waiting", "idle"};

struct Queued {
  ClientPtr client;
  Request request;
  BatchKey key;
  std::uint64_t arrival_ns = 0;  // in the batcher: popped, or, stream-ordered, found ready
  // Opens the scheduler asked of the mapper for its memory while it waited
  // (Scheduler::memoryMapped bounds them).
  std::uint32_t opens = 0;
  // The executor answered it (markAnswered) in a batch not yet settled.
  bool answered = false;
};

// The executor's side, before it publishes a request's status: from then on
// the client may reuse the slot, so the request no longer counts against the
// client's new ones (Client::answered) until the scheduler settles it.
inline void markAnswered(Queued& item) {
  item.answered = true;
  item.client->answered.fetch_add(1, std::memory_order_relaxed);
}

struct Batch {
  std::uint64_t id = 0;  // per GPU, increasing; batches complete in id order
  LaunchReason reason = LaunchReason::kIdle;
  std::uint64_t launched_ns = 0;   // taken from the batcher
  std::uint64_t taken_ns = 0;      // the executor took it from its queue
  std::uint64_t submitted_ns = 0;  // ... and had queued its launches
  std::uint64_t seen_ns = 0;       // the executor saw its event complete
  std::uint64_t done_ns = 0;       // ... and had published its statuses (daemon/waker.h)
  std::vector<Queued> items;
};

struct BatcherOptions {
  std::uint64_t window_ns = 20'000;
  std::uint32_t max_batch = 256;
  std::uint64_t active_ns = 2'000'000;
  // Batches handed to the executor and not yet complete: one running and one
  // prepared behind it keep the GPU busy; more would only wait on the stream
  // while requests that could have joined them arrive.
  std::uint32_t max_in_flight = 2;
};

// Histogram buckets (upper bounds) of the batch sizes and of each request's
// wait between arrival and launch; one more bucket holds what is above.
inline constexpr double kBatchSizeBounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256};
inline constexpr double kWaitBoundsS[] = {5e-6,   10e-6,  20e-6, 50e-6, 100e-6,
                                          200e-6, 500e-6, 1e-3,  5e-3};
inline constexpr std::size_t kBatchSizeBuckets = std::size(kBatchSizeBounds) + 1;
inline constexpr std::size_t kWaitBuckets = std::size(kWaitBoundsS) + 1;

struct BatcherStats {
  std::uint64_t requests = 0;
  std::uint64_t batches = 0;
  std::uint64_t launched = 0;  // requests in launched batches
  std::uint64_t wait_ns = 0;   // their summed time between arrival and launch
  std::uint64_t launches[kLaunchReasonCount] = {};
  std::uint64_t batch_sizes[kBatchSizeBuckets] = {};  // batches, by size
  std::uint64_t waits[kWaitBuckets] = {};             // launched requests, by wait
  // Times a tenant's next request was left for a later batch because it
  // writes what one of its requests in the batch touches, or the reverse.
  std::uint64_t held_for_hazard = 0;
};

class Batcher {
 public:
  explicit Batcher(BatcherOptions options) : options_(options) {}

  void add(Queued item, std::uint64_t now_ns);

  // A batch to launch now, or nothing; then `wake_at_ns` is when the decision
  // may change with time alone (0: only when something else happens).
  std::optional<Batch> take(std::uint64_t now_ns, std::uint64_t& wake_at_ns);

  // The executor is done with a batch (every item completed or dropped).
  void completed(const Batch& batch, std::uint64_t now_ns);

  // The tenant is gone: drops and returns what it had waiting.
  std::vector<Queued> removeTenant(std::uint32_t tenant);

  std::size_t queued() const { return queued_; }
  std::uint32_t inFlight() const { return in_flight_; }
  const BatcherStats& stats() const { return stats_; }

 private:
  // Disjoint byte ranges of a client's allocations: (allocation id, first
  // byte) to the end.
  using ByteRanges = std::map<std::pair<std::uint64_t, std::uint64_t>, std::uint64_t>;
  struct Tenant {
    std::deque<Queued> queue;
    bool has_completed = false;  // last_completion_ns is meaningful
    std::uint64_t last_submit_ns = 0;
    std::uint64_t last_completion_ns = 0;
    std::uint64_t think_ns = 0;  // 0: not known yet
    std::uint32_t in_flight = 0;
    // In the batch being taken (`batch`'s id): how many of its requests are
    // there (the first at `first_item`), what they write and read once
    // there are two (ByteRanges), and whether the rest wait for the next (a
    // hazard).
    std::uint64_t batch = 0;
    std::size_t taken = 0;
    std::size_t first_item = 0;
    ByteRanges writes, reads;
    bool held = false;
  };

  BatcherOptions options_;
  std::unordered_map<std::uint32_t, Tenant> tenants_;
  std::vector<std::uint32_t> order_;  // tenant ids, in the order round-robin visits them
  std::size_t next_first_ = 0;        // where the next batch's round-robin starts
  std::size_t queued_ = 0;
  std::uint32_t in_flight_ = 0;
  std::uint64_t next_id_ = 1;
  BatcherStats stats_;
};

}  // namespace stmux::daemon

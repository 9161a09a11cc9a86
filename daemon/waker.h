// Publishing a finished batch's statuses, and waking the callers that sleep
// on them.
//
// A caller that sleeps on its slot's futex (STMUX_SYNC=auto makes tenants
// that outnumber the cores do so) needs a FUTEX_WAKE, a system call of a few
// microseconds. Made on the executor's thread, a dozen of them per batch held
// up the next launch and bounded the whole GPU's rate by one thread's rate of
// wakes. So the executor (real or fake) publishes every status itself, which
// is what callers that still spin look at, and hands the sleepers to waker
// threads of their own, which poll while wakes keep coming
// (STMUX_DAEMON_SPIN_US) and otherwise sleep. No CUDA here.
#pragma once

#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "daemon/batcher.h"
#include "daemon/channel.h"

namespace stmux::daemon {

// A status not to write: the request's caller cancelled, died, or was already
// answered.
inline constexpr std::int32_t kNoWrite = INT32_MIN;

struct WakerOptions {
  // 0: the publishing thread wakes the sleepers itself.
  unsigned threads = 0;
  std::uint64_t spin_ns = 1'000'000;
  // Sleepers each thread's queue holds (32 bytes each, allocated up front);
  // beyond it the publishing thread wakes them itself rather than wait. Four
  // batches of the default STMUX_MAX_BATCH.
  std::size_t capacity = 1024;
  // The threads' names: this, a dot and the thread's index (stmux-wake0.1).
  std::string name = "stmux-wake";
};

class Wakers {
 public:
  // `gauges`' wakes and wake_ns count what is done here.
  Wakers(WakerOptions options, ExecutorGauges& gauges);
  ~Wakers();  // wakes what is still queued, then ends the threads
  Wakers(const Wakers&) = delete;
  Wakers& operator=(const Wakers&) = delete;

  // Writes `statuses[i]` to the slot of `batch.items[i]` (kNoWrite: leaves it
  // alone) and has the callers that sleep on them woken. `batch.seen_ns` is
  // when the batch was seen done: each wake is timed from then. One thread
  // publishes.
  void publish(Batch& batch, std::span<const std::int32_t> statuses);

 private:
  struct Sleeper {
    ClientPtr client;  // keeps its segment mapped until it is woken
    std::uint32_t slot = 0;
    std::uint64_t seen_ns = 0;
  };
  struct Thread {
    explicit Thread(std::size_t capacity) : queue(capacity) {}
    boost::lockfree::spsc_queue<Sleeper> queue;
    Bell bell;
    std::thread thread;
  };

  void wake(const Sleeper& sleeper);
  void run(Thread& thread);

  WakerOptions options_;
  ExecutorGauges& gauges_;
  std::vector<std::unique_ptr<Thread>> threads_;
  std::size_t next_ = 0;  // the thread the next sleeper goes to
  // publish()'s own, kept so that a batch allocates nothing: the items whose
  // callers sleep, and the threads handed one.
  std::vector<std::size_t> sleeping_;
  std::vector<bool> rung_;
  std::atomic<bool> stop_{false};
};

}  // namespace stmux::daemon

// The queues between the scheduler thread and one GPU's executor thread.
//
// Both ends are threads of stmuxd, trusted, one producer and one consumer per
// direction: Boost.Lockfree's spsc_queue is the right tool here (unlike the
// client rings, see ring.h). Commands go down (run this batch, close these
// mappings, forget this client); finished batches come back, and the executor
// rings the scheduler's eventfd so a sleeping scheduler notices.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "daemon/batcher.h"
#include "stmux/sys.h"

namespace stmux::daemon {

struct ExecCommand {
  enum class Kind { kRun, kRelease, kForget };
  Kind kind = Kind::kRun;
  std::unique_ptr<Batch> batch;          // kRun
  ClientPtr client;                      // kRelease, kForget
  std::vector<std::uint64_t> alloc_ids;  // kRelease
};

// What the executor publishes for stmuxctl; written by the executor only.
struct ExecutorGauges {
  std::atomic<std::uint64_t> mapped{0};             // client allocations mapped now
  std::atomic<std::uint64_t> launches{0};           // cuBLAS launches issued
  std::atomic<std::uint64_t> epilogue_launches{0};  // epilogue kernels launched (one per batch)
  std::atomic<bool> broken{false};                  // the GPU context failed; nothing runs here now
};

class ExecutorChannel {
 public:
  // `scheduler_wake_fd`: an eventfd the scheduler sleeps on, or -1.
  explicit ExecutorChannel(int scheduler_wake_fd) : scheduler_wake_fd_(scheduler_wake_fd) {}

  // ---- scheduler side ----

  // Never blocks: what does not fit waits in an overflow list until flush().
  void post(std::unique_ptr<ExecCommand> command) {
    overflow_.push_back(std::move(command));
    flush();
  }
  // Moves overflow into the queue; true while some is still left over.
  bool flush() {
    bool moved = false;
    while (!overflow_.empty() && commands_.push(overflow_.front().get())) {
      overflow_.front().release();
      overflow_.pop_front();
      moved = true;
    }
    if (moved) wakeExecutor();
    return !overflow_.empty();
  }
  std::unique_ptr<Batch> takeDone() {
    Batch* batch = nullptr;
    return done_.pop(batch) ? std::unique_ptr<Batch>(batch) : nullptr;
  }

  // ---- executor side ----

  std::unique_ptr<ExecCommand> takeCommand() {
    ExecCommand* command = nullptr;
    return commands_.pop(command) ? std::unique_ptr<ExecCommand>(command) : nullptr;
  }
  void finish(std::unique_ptr<Batch> batch) {
    // The done queue holds more than the batcher ever lets be in flight, so
    // this push cannot fail; spin rather than lose a batch if it ever did.
    Batch* raw = batch.release();
    while (!done_.push(raw))
      cpuRelax();
    if (scheduler_wake_fd_ >= 0) {
      const std::uint64_t one = 1;
      [[maybe_unused]] ssize_t n = ::write(scheduler_wake_fd_, &one, sizeof(one));
    }
  }
  // Sleeps until a command may be waiting or `timeout_ns` passes.
  void sleep(std::uint64_t timeout_ns) {
    const std::uint32_t seen = bell_.load(std::memory_order_acquire);
    sleeping_.store(1, std::memory_order_seq_cst);
    if (commands_.read_available() == 0) futexWaitPrivate(seen, timeout_ns);
    sleeping_.store(0, std::memory_order_relaxed);
  }

  ExecutorGauges& gauges() { return gauges_; }
  const ExecutorGauges& gauges() const { return gauges_; }
  std::size_t backlog() const { return overflow_.size(); }

  ~ExecutorChannel() {
    while (takeCommand()) {
    }
    while (takeDone()) {
    }
  }

 private:
  void wakeExecutor() {
    bell_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) != 0) {
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&bell_), FUTEX_WAKE_PRIVATE, 1, nullptr,
                nullptr, 0);
    }
  }
  void futexWaitPrivate(std::uint32_t seen, std::uint64_t timeout_ns) {
    timespec ts{static_cast<time_t>(timeout_ns / 1'000'000'000ull),
                static_cast<long>(timeout_ns % 1'000'000'000ull)};
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&bell_), FUTEX_WAIT_PRIVATE, seen, &ts,
              nullptr, 0);
  }

  boost::lockfree::spsc_queue<ExecCommand*, boost::lockfree::capacity<1024>> commands_;
  boost::lockfree::spsc_queue<Batch*, boost::lockfree::capacity<1024>> done_;
  std::deque<std::unique_ptr<ExecCommand>> overflow_;  // scheduler thread only
  std::atomic<std::uint32_t> bell_{0};
  std::atomic<std::uint32_t> sleeping_{0};
  int scheduler_wake_fd_;
  ExecutorGauges gauges_;
};

}  // namespace stmux::daemon

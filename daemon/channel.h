// The queues between the scheduler thread and one GPU's executor and mapper
// threads.
//
// All ends are threads of stmuxd, trusted, one producer and one consumer per
// queue: Boost.Lockfree's spsc_queue is the right tool here (unlike the
// client rings, see ring.h). Commands go down to the executor (run this
// batch, adopt this mapping, close these mappings, forget this client);
// finished batches come back. Allocations to map go down to the mapper, which
// opens them off the executor's thread, and come back opened or not. Both
// threads ring the scheduler's eventfd so a sleeping scheduler notices.
// Opens reach the mapper a few at a time, taken in turn from each client's
// own queue: one client's many (or slow) opens cannot hold up another's.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "daemon/batcher.h"
#include "daemon/mapping_cache.h"
#include "stmux/sys.h"

namespace stmux::daemon {

struct ExecCommand {
  enum class Kind { kRun, kAdopt, kClose, kRelease, kForget };
  Kind kind = Kind::kRun;
  std::unique_ptr<Batch> batch;  // kRun
  // kAdopt, kRelease, kForget: the client's id alone. Its Client (and so
  // its segment's mapping) is not kept alive by commands that wait for an
  // executor busy with a long batch: clients attaching and leaving meanwhile
  // grew the daemon by a segment each (found by review).
  std::uint32_t client_id = 0;
  OperandDesc operand;                   // kAdopt: the allocation, as the client described it
  Mapped mapped;                         // kAdopt, kClose: the mapper's mapping of it
  std::vector<std::uint64_t> alloc_ids;  // kRelease
};

// One client allocation for the mapper to open (cudaIpcOpenMemHandle), and
// what came of it.
struct OpenJob {
  ClientPtr client;
  OperandDesc operand;
  bool ok = false;
  bool already_mapped = false;  // memory at its address is mapped already (by the executor)
  bool dropped = false;         // not ok: never given to the mapper (postOpen, dropOpens)
  bool crowded_out = false;     // dropped: its client had more opens waiting than it can use
  Mapped mapped;                // ok
  std::string error;            // not ok
};

// A futex a thread sleeps on until another rings it.
class Bell {
 public:
  void ring() {
    bell_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) != 0) {
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&bell_), FUTEX_WAKE_PRIVATE, 1, nullptr,
                nullptr, 0);
    }
  }
  // Sleeps until rung or `timeout_ns` passes, unless `has_work()` says there
  // is something to do already.
  template <class HasWork>
  void sleep(std::uint64_t timeout_ns, HasWork has_work) {
    const std::uint32_t seen = bell_.load(std::memory_order_acquire);
    sleeping_.store(1, std::memory_order_seq_cst);
    if (!has_work()) {
      timespec ts{static_cast<time_t>(timeout_ns / 1'000'000'000ull),
                  static_cast<long>(timeout_ns % 1'000'000'000ull)};
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&bell_), FUTEX_WAIT_PRIVATE, seen, &ts,
                nullptr, 0);
    }
    sleeping_.store(0, std::memory_order_relaxed);
  }

 private:
  std::atomic<std::uint32_t> bell_{0};
  std::atomic<std::uint32_t> sleeping_{0};
};

// What the executor publishes for stmuxctl; written by the executor only,
// except where said.
struct ExecutorGauges {
  std::atomic<std::uint64_t> mapped{0};             // client allocations mapped now
  std::atomic<std::uint64_t> launches{0};           // cuBLAS launches issued
  std::atomic<std::uint64_t> epilogue_launches{0};  // epilogue kernels launched (one per batch)
  // Of those, the launches whose items were copied to device memory first
  // (more than kEpilogueInlineItems epilogues in the batch); the others
  // carried theirs in the launch's parameters.
  std::atomic<std::uint64_t> epilogue_copies{0};
  // Batches whose pointer arrays were copied to device memory: those with a
  // batched or grouped launch, the only launches that read them.
  std::atomic<std::uint64_t> pointer_copies{0};
  // STMUX_LAUNCH_GRAPHS: batches launched by replaying a graph, and graphs
  // captured (daemon/launch_graphs.h).
  std::atomic<std::uint64_t> graph_launches{0};
  std::atomic<std::uint64_t> graph_captures{0};
  // Allocations the executor had to open itself, on its own thread (the
  // mapper could not: memory at the address was still mapped there).
  std::atomic<std::uint64_t> inline_opens{0};
  // Callers woken from a futex sleep on their completions, and the time from
  // their batches' being seen done to each wake, summed (daemon/waker.h).
  // Written by the executor's and the wakers' threads.
  std::atomic<std::uint64_t> wakes{0};
  std::atomic<std::uint64_t> wake_ns{0};
  std::atomic<bool> broken{false};  // the GPU context failed; nothing runs here now
};

class ExecutorChannel {
 public:
  // `scheduler_wake_fd`: an eventfd the scheduler sleeps on, or -1.
  explicit ExecutorChannel(int scheduler_wake_fd) : scheduler_wake_fd_(scheduler_wake_fd) {}

  // ---- scheduler side ----

  // Never block: what does not fit waits in an overflow list until flush().
  void post(std::unique_ptr<ExecCommand> command) {
    overflow_.push_back(std::move(command));
    flush();
  }
  // At most `most` of a client's opens wait: beyond, its oldest is dropped,
  // handed back (takeOpened) as an open that failed. A client whose requests
  // are cancelled while their memory waits to be opened (a hostile one
  // re-arming its slots, issue 14) left their opens queued here without
  // bound; the oldest is the likeliest no longer wanted, and a request that
  // still wanted it is declined, to run in its caller.
  void postOpen(std::unique_ptr<OpenJob> job, std::size_t most) {
    auto& waiting = waiting_opens_[job->client->id];
    waiting.push_back(std::move(job));
    ++waiting_open_count_;
    if (waiting.size() > most) {
      std::unique_ptr<OpenJob> oldest = std::move(waiting.front());
      waiting.pop_front();
      --waiting_open_count_;
      oldest->crowded_out = true;
      dropUnopened(std::move(oldest),
                   "dropped unopened: its client had more allocations waiting to be opened "
                   "than its requests can use");
      wakeScheduler();
    }
    flush();
  }
  // The opens of a client that left, not yet given to the mapper.
  void dropOpens(std::uint32_t client) {
    if (auto it = waiting_opens_.find(client); it != waiting_opens_.end()) {
      waiting_open_count_ -= it->second.size();
      waiting_opens_.erase(it);
    }
  }
  // The same for a client still here: they are handed back (takeOpened) as
  // opens that failed, for `why`.
  void dropOpens(std::uint32_t client, std::string_view why) {
    const auto it = waiting_opens_.find(client);
    if (it == waiting_opens_.end()) return;
    for (std::unique_ptr<OpenJob>& job : it->second)
      dropUnopened(std::move(job), why);
    waiting_open_count_ -= it->second.size();
    waiting_opens_.erase(it);
  }
  // Moves overflow into the queues; true while some is still left over.
  bool flush() {
    bool moved = move(overflow_, commands_);
    // What is left waits for room, which the executor's next take makes: it
    // then wakes the scheduler to move it (otherwise a batch could wait for
    // an unrelated wake-up, up to the server's longest sleep). Room made
    // before the executor could see the flag is taken here (the fences pair
    // with takeCommand's).
    if (!overflow_.empty()) {
      overflowing_.store(true, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      moved |= move(overflow_, commands_);
    }
    if (overflow_.empty()) overflowing_.store(false, std::memory_order_relaxed);
    if (moved) executor_bell_.ring();
    if (moveOpens()) mapper_bell_.ring();
    return !overflow_.empty() || waiting_open_count_ != 0;
  }
  std::unique_ptr<Batch> takeDone() { return take(done_); }
  // The allocations the executor gave up on its own since the last call
  // (MappingCache::GaveUpFn): (client, allocation id).
  std::vector<std::pair<std::uint32_t, std::uint64_t>> takeGivenUp() {
    std::lock_guard lock(given_up_mutex_);
    return std::exchange(given_up_, {});
  }
  // The mapper's answers, and the opens dropped unopened (postOpen).
  std::unique_ptr<OpenJob> takeOpened() {
    if (!dropped_opens_.empty()) {
      std::unique_ptr<OpenJob> job = std::move(dropped_opens_.front());
      dropped_opens_.pop_front();
      return job;
    }
    std::unique_ptr<OpenJob> job = take(opened_);
    if (job) --opens_given_;
    return job;
  }

  // ---- executor side ----

  std::unique_ptr<ExecCommand> takeCommand() {
    std::unique_ptr<ExecCommand> command = take(commands_);
    if (command) {
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (overflowing_.load(std::memory_order_relaxed) &&
          overflowing_.exchange(false, std::memory_order_relaxed)) {
        wakeScheduler();
      }
    }
    return command;
  }
  // The done queue holds more than the batcher ever lets be in flight, so
  // this push cannot fail; it spins rather than lose a batch if it ever did.
  void finish(std::unique_ptr<Batch> batch) { handBack(done_, std::move(batch)); }
  // Sleeps until a command may be waiting or `timeout_ns` passes.
  void sleep(std::uint64_t timeout_ns) {
    executor_bell_.sleep(timeout_ns, [this] { return commands_.read_available() != 0; });
  }

  void gaveUp(std::uint32_t client, std::uint64_t alloc_id) {
    {
      std::lock_guard lock(given_up_mutex_);
      given_up_.emplace_back(client, alloc_id);
    }
    wakeScheduler();
  }

  // ---- mapper side ----

  std::unique_ptr<OpenJob> takeOpen() { return take(opens_); }
  // The scheduler takes these at every turn; spins rather than lose a
  // mapping if the queue is ever full.
  void finishOpen(std::unique_ptr<OpenJob> job) { handBack(opened_, std::move(job)); }
  void sleepMapper(std::uint64_t timeout_ns) {
    mapper_bell_.sleep(timeout_ns, [this] { return opens_.read_available() != 0; });
  }
  // Wakes a sleeping mapper (to notice a stop).
  void wakeMapper() { mapper_bell_.ring(); }

  ExecutorGauges& gauges() { return gauges_; }
  const ExecutorGauges& gauges() const { return gauges_; }
  // The executor's: its GPU context failed. Wakes the scheduler, whose
  // server may have to end the daemon for it (Scheduler::mustEnd). Whether
  // it was not broken before.
  bool markBroken() {
    const bool first = !gauges_.broken.exchange(true);
    wakeScheduler();
    return first;
  }
  // What waits for the executor or the mapper (the daemon is busy while any
  // does), and what waits for the executor alone.
  std::size_t backlog() const {
    return overflow_.size() + waiting_open_count_ + dropped_opens_.size();
  }
  std::size_t commandBacklog() const { return overflow_.size(); }

  ~ExecutorChannel() {
    while (takeCommand()) {
    }
    while (takeDone()) {
    }
    while (takeOpen()) {
    }
    while (takeOpened()) {
    }
  }

 private:
  static constexpr std::size_t kCapacity = 1024;
  // Opens given to the mapper and not yet taken back: enough that it never
  // waits for the scheduler, few enough that a client's next turn comes soon.
  static constexpr std::size_t kOpensGiven = 2;

  // Hands `job` back (takeOpened) as an open that failed, for `why`,
  // without the mapper having tried it.
  void dropUnopened(std::unique_ptr<OpenJob> job, std::string_view why) {
    job->ok = false;
    job->dropped = true;
    job->error = why;
    dropped_opens_.push_back(std::move(job));
  }
  // The clients' waiting opens into the mapper's queue, one client after
  // another from where the last move stopped.
  bool moveOpens() {
    bool moved = false;
    while (opens_given_ < kOpensGiven && waiting_open_count_ != 0) {
      auto it = waiting_opens_.upper_bound(last_open_client_);
      if (it == waiting_opens_.end()) it = waiting_opens_.begin();
      if (!opens_.push(it->second.front().get())) break;
      it->second.front().release();
      it->second.pop_front();
      --waiting_open_count_;
      ++opens_given_;
      last_open_client_ = it->first;
      if (it->second.empty()) waiting_opens_.erase(it);
      moved = true;
    }
    return moved;
  }

  template <class T, class Queue>
  static bool move(std::deque<std::unique_ptr<T>>& from, Queue& to) {
    bool moved = false;
    while (!from.empty() && to.push(from.front().get())) {
      from.front().release();
      from.pop_front();
      moved = true;
    }
    return moved;
  }
  template <class Queue>
  using Item = std::remove_pointer_t<typename Queue::value_type>;
  template <class Queue>
  static std::unique_ptr<Item<Queue>> take(Queue& queue) {
    Item<Queue>* item = nullptr;
    return queue.pop(item) ? std::unique_ptr<Item<Queue>>(item) : nullptr;
  }
  // Pushes onto a queue the scheduler drains, and wakes it.
  template <class T, class Queue>
  void handBack(Queue& queue, std::unique_ptr<T> item) {
    T* raw = item.release();
    while (!queue.push(raw))
      cpuRelax();
    wakeScheduler();
  }
  void wakeScheduler() {
    if (scheduler_wake_fd_ >= 0) {
      const std::uint64_t one = 1;
      [[maybe_unused]] ssize_t n = ::write(scheduler_wake_fd_, &one, sizeof(one));
    }
  }

  // Rare (a client beyond STMUX_MAX_MAPPINGS): a lock will do.
  std::mutex given_up_mutex_;
  std::vector<std::pair<std::uint32_t, std::uint64_t>> given_up_;
  // Set by the scheduler while commands wait in overflow_ (the executor's
  // queue was full), cleared by the executor's take that wakes it.
  std::atomic<bool> overflowing_{false};
  boost::lockfree::spsc_queue<ExecCommand*, boost::lockfree::capacity<kCapacity>> commands_;
  boost::lockfree::spsc_queue<Batch*, boost::lockfree::capacity<kCapacity>> done_;
  boost::lockfree::spsc_queue<OpenJob*, boost::lockfree::capacity<kCapacity>> opens_;
  boost::lockfree::spsc_queue<OpenJob*, boost::lockfree::capacity<kCapacity>> opened_;
  // Scheduler thread only:
  std::deque<std::unique_ptr<ExecCommand>> overflow_;
  std::map<std::uint32_t, std::deque<std::unique_ptr<OpenJob>>> waiting_opens_;  // by client id
  std::size_t waiting_open_count_ = 0;
  std::deque<std::unique_ptr<OpenJob>> dropped_opens_;
  std::uint32_t last_open_client_ = 0;
  std::size_t opens_given_ = 0;
  Bell executor_bell_, mapper_bell_;
  int scheduler_wake_fd_;
  ExecutorGauges gauges_;
};

}  // namespace stmux::daemon

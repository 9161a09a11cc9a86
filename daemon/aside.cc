#include "daemon/aside.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>

#include "stmux/log.h"

namespace stmux::daemon {
namespace {

struct Closer {
  // Where closes are inline: without its thread (none could be made), and
  // in a child forked since (which has no copy of the thread).
  bool running = false;
  pid_t pid = ::getpid();
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<UniqueFd> waiting;
  std::atomic<std::uint64_t> closed{0};

  void loop() {
    nameThisThread("stmuxd-closer");
    std::unique_lock lock(mutex);
    while (true) {
      wake.wait(lock, [this] { return !waiting.empty(); });
      UniqueFd fd = std::move(waiting.front());
      waiting.pop_front();
      lock.unlock();
      fd.reset();  // where it may block
      closed.fetch_add(1, std::memory_order_relaxed);
      lock.lock();
    }
  }
};

// Made at the first use and never destroyed: the thread may be inside a
// close when the process exits (which does not wait for a linger).
Closer& closer() {
  static Closer* const made = [] {
    auto* c = new Closer;
    try {
      std::thread([c] { c->loop(); }).detach();
      c->running = true;
    } catch (const std::system_error& e) {
      // Out of threads (TasksMax): closing inline is what the daemon did
      // before; that thread's close may wait, but nothing is lost.
      STMUX_WARN(kTransport,
                 "cannot start the thread that closes clients' descriptors ({}); they close "
                 "on the server's thread",
                 e.what());
    }
    return c;
  }();
  return *made;
}

std::atomic<bool> g_closes_may_wait{true};

}  // namespace

void closesMayWait(bool may_wait) {
  g_closes_may_wait.store(may_wait, std::memory_order_relaxed);
}

void closeAside(UniqueFd fd) {
  if (!fd.valid()) return;
  if (!g_closes_may_wait.load(std::memory_order_relaxed)) {
    fd.reset();
    return;
  }
  Closer& c = closer();
  if (!c.running || ::getpid() != c.pid) {
    fd.reset();
    c.closed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  {
    std::lock_guard lock(c.mutex);
    c.waiting.push_back(std::move(fd));
  }
  c.wake.notify_one();
}

std::uint64_t closedAside() {
  return closer().closed.load(std::memory_order_relaxed);
}

}  // namespace stmux::daemon

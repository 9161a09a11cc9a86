#include "daemon/aside.h"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace stmux::daemon {
namespace {

struct Closer {
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
    std::thread([c] { c->loop(); }).detach();
    return c;
  }();
  return *made;
}

}  // namespace

void closeAside(UniqueFd fd) {
  if (!fd.valid()) return;
  Closer& c = closer();
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

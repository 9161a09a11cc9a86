#include "daemon/waker.h"

#include "stmux/segment.h"
#include "stmux/sys.h"

namespace stmux::daemon {

Wakers::Wakers(WakerOptions options, ExecutorGauges& gauges) : options_(options), gauges_(gauges) {
  for (unsigned i = 0; i < options_.threads; ++i) {
    threads_.push_back(std::make_unique<Thread>(options_.capacity));
  }
  for (std::size_t i = 0; i < threads_.size(); ++i) {
    threads_[i]->thread = std::thread([this, i, t = threads_[i].get()] {
      nameThisThread(fmt::format("{}.{}", options_.name, i));
      run(*t);
    });
  }
}

Wakers::~Wakers() {
  stop_.store(true, std::memory_order_release);
  for (auto& thread : threads_) {
    thread->bell.ring();
    thread->thread.join();
  }
}

void Wakers::publish(Batch& batch, std::span<const std::int32_t> statuses) {
  std::vector<Queued>& items = batch.items;
  // Every status first: a caller still polling sees its own without waiting
  // behind the system calls that wake the others.
  sleeping_.clear();
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (statuses[i] == kNoWrite) continue;
    markAnswered(items[i]);
    if (requestPublish(items[i].client->view, items[i].request, statuses[i])) {
      sleeping_.push_back(i);
    }
  }
  rung_.assign(threads_.size(), false);
  for (std::size_t i : sleeping_) {
    Sleeper sleeper{items[i].client, items[i].request.slot, batch.seen_ns};
    if (threads_.empty()) {
      wake(sleeper);
      continue;
    }
    const std::size_t t = next_;
    next_ = (next_ + 1) % threads_.size();
    if (threads_[t]->queue.push(sleeper)) {
      rung_[t] = true;
    } else {
      wake(sleeper);  // its queue is full: never leave a caller asleep
    }
  }
  for (std::size_t t = 0; t < threads_.size(); ++t) {
    if (rung_[t]) threads_[t]->bell.ring();
  }
}

void Wakers::wake(const Sleeper& sleeper) {
  slotWake(sleeper.client->view.slot(sleeper.slot));
  const std::uint64_t now = nowNs();
  // The time first, the count after it (release): a reader that loads the
  // count, then the time, has every counted wake's time in the sum.
  gauges_.wake_ns.fetch_add(now >= sleeper.seen_ns ? now - sleeper.seen_ns : 0,
                            std::memory_order_relaxed);
  gauges_.wakes.fetch_add(1, std::memory_order_release);
}

void Wakers::run(Thread& thread) {
  std::uint64_t last_work = nowNs();
  while (true) {
    // The stop is read before the queue: every push comes before it, so once
    // it is seen an empty queue stays empty. Read after a pop that found
    // nothing, a push and the stop could both fall between the two, and that
    // sleeper would never be woken.
    const bool stopping = stop_.load(std::memory_order_acquire);
    Sleeper sleeper;
    if (thread.queue.pop(sleeper)) {
      wake(sleeper);
      last_work = nowNs();
      continue;
    }
    if (stopping) break;
    if (nowNs() - last_work < options_.spin_ns) {
      cpuRelax();
    } else {
      // Bounded, so that a stop is noticed.
      thread.bell.sleep(10'000'000, [&thread] { return thread.queue.read_available() != 0; });
    }
  }
}

}  // namespace stmux::daemon

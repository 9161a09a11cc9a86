// The request ring: a bounded multi-producer, single-consumer queue that lives
// in a client's shared-memory segment.
//
// Producers are the threads of one client process; the consumer is stmuxd.
// Each cell carries a sequence number (Vyukov's bounded queue): a producer
// claims a position with a CAS on enqueue_pos, writes the cell, then publishes
// it by storing seq = pos + 1; the consumer frees it by storing
// seq = pos + capacity.
//
// Why not boost::lockfree::spsc_queue here: it keeps the consumer's read index
// inside the shared object and indexes the buffer with it, so a client that
// scribbles on its own segment could make the daemon read out of bounds or loop
// (its next_index() subtracts until the index is in range). This ring's
// consumer position lives in daemon memory, every index is masked, and the only
// client-written value the consumer acts on is a cell's sequence, compared for
// equality: a corrupted ring stalls that client alone. Boost.Lockfree carries
// the daemon's internal queues, where both sides are trusted.
//
// Wake-ups: after publishing, a producer issues a seq_cst fence and reads the
// segment's consumer_sleeping flag; the consumer sets that flag, issues a
// seq_cst fence, and looks at the ring once more before it sleeps. One of the
// two always sees the other, so no request sleeps in a ring unnoticed.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "stmux/wire.h"

namespace stmux {

template <class T>
struct alignas(kCacheLine) RingCell {
  std::atomic<std::uint64_t> seq;
  T value;
};

// The producers' shared position, on its own cache line (rigtorp's
// SPSCQueue.h: "Align to cache line size in order to avoid false sharing").
struct alignas(kCacheLine) RingHeader {
  std::atomic<std::uint64_t> enqueue_pos;
};

template <class T>
inline void ringInit(RingHeader* header, RingCell<T>* cells, std::uint32_t capacity) {
  static_assert(std::is_trivially_copyable_v<T>);
  new (header) RingHeader{};
  header->enqueue_pos.store(0, std::memory_order_relaxed);
  for (std::uint32_t i = 0; i < capacity; ++i) {
    auto* cell = new (&cells[i]) RingCell<T>;
    cell->seq.store(i, std::memory_order_relaxed);
    std::memset(static_cast<void*>(&cell->value), 0, sizeof(T));
  }
  std::atomic_thread_fence(std::memory_order_release);
}

// Client side; any number of threads may push at once.
template <class T>
class RingProducer {
 public:
  static constexpr std::uint32_t kMostUnmovedLooks = 1024;

  RingProducer() = default;
  RingProducer(RingHeader* header, RingCell<T>* cells, std::uint32_t capacity)
      : header_(header), cells_(cells), mask_(capacity - 1) {}

  // False when the ring is full, or its cells say what no producer did.
  bool tryPush(const T& value) {
    std::uint64_t pos = header_->enqueue_pos.load(std::memory_order_relaxed);
    RingCell<T>* cell;
    std::uint32_t unmoved = 0;
    while (true) {
      cell = &cells_[pos & mask_];
      const std::uint64_t seq = cell->seq.load(std::memory_order_acquire);
      const auto diff = static_cast<std::int64_t>(seq - pos);
      if (diff == 0) {
        if (header_->enqueue_pos.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          break;
        }
      } else if (diff < 0) {
        return false;
      } else {
        // Another producer took the cell, and moved the position past it.
        // A cell ahead of a position that stays put is no producer's doing
        // (a peer scribbled on the ring): full, rather than a spin for ever.
        const std::uint64_t now = header_->enqueue_pos.load(std::memory_order_relaxed);
        if (now == pos && ++unmoved > kMostUnmovedLooks) return false;
        pos = now;
      }
    }
    std::memcpy(static_cast<void*>(&cell->value), &value, sizeof(T));
    cell->seq.store(pos + 1, std::memory_order_release);
    return true;
  }

 private:
  RingHeader* header_ = nullptr;
  RingCell<T>* cells_ = nullptr;
  std::uint64_t mask_ = 0;
};

// Daemon side; one thread. The position is private; the capacity is the
// daemon's own record, never read back from the segment.
template <class T>
class RingConsumer {
 public:
  RingConsumer() = default;
  RingConsumer(RingCell<T>* cells, std::uint32_t capacity) : cells_(cells), mask_(capacity - 1) {}

  // Copies the next value out (the daemon validates its copy, never the
  // shared original). False when nothing is published at the head.
  bool tryPop(T& out) {
    RingCell<T>& cell = cells_[pos_ & mask_];
    if (cell.seq.load(std::memory_order_acquire) != pos_ + 1) return false;
    std::memcpy(static_cast<void*>(&out), &cell.value, sizeof(T));
    cell.seq.store(pos_ + mask_ + 1, std::memory_order_release);
    ++pos_;
    return true;
  }

  bool readable() const {
    return cells_[pos_ & mask_].seq.load(std::memory_order_acquire) == pos_ + 1;
  }
  std::uint64_t position() const { return pos_; }

 private:
  RingCell<T>* cells_ = nullptr;
  std::uint64_t mask_ = 0;
  std::uint64_t pos_ = 0;
};

}  // namespace stmux

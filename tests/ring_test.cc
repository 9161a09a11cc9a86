// The request ring: order, capacity, and the real thing across fork(): a
// producer process with several threads and a consumer process, ten million
// requests, checked for loss, duplication and per-producer reordering.
#include "stmux/ring.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "stmux/sys.h"

namespace stmux {
namespace {

// A ring in anonymous shared memory, inherited across fork().
class SharedRing {
 public:
  explicit SharedRing(std::uint32_t capacity) : capacity_(capacity) {
    bytes_ = sizeof(RingHeader) + sizeof(RingCell<Request>) * capacity;
    base_ = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(base_, MAP_FAILED);
    ringInit(header(), cells(), capacity);
  }
  ~SharedRing() { ::munmap(base_, bytes_); }
  RingHeader* header() const { return static_cast<RingHeader*>(base_); }
  RingCell<Request>* cells() const {
    return reinterpret_cast<RingCell<Request>*>(static_cast<char*>(base_) + sizeof(RingHeader));
  }
  RingProducer<Request> producer() const { return {header(), cells(), capacity_}; }
  RingConsumer<Request> consumer() const { return {cells(), capacity_}; }
  void* base() const { return base_; }
  std::size_t bytes() const { return bytes_; }

 private:
  std::uint32_t capacity_;
  std::size_t bytes_;
  void* base_;
};

Request numbered(std::uint32_t producer, std::uint64_t sequence) {
  Request request{};
  request.slot = producer;
  request.request_id = sequence;
  // Payload spread over the descriptor, so a torn copy would show.
  request.m = static_cast<std::int64_t>(sequence * 2654435761u);
  request.c.offset = sequence ^ 0x9e3779b97f4a7c15ull;
  request.c.handle.bytes[63] = static_cast<std::uint8_t>(sequence);
  return request;
}

std::uint64_t checksum(const Request& r) {
  return r.request_id * 31 + static_cast<std::uint64_t>(r.m) * 17 + r.c.offset * 7 +
         r.c.handle.bytes[63] + r.slot;
}

TEST(Ring, FifoUntilFullThenRefuses) {
  SharedRing ring(8);
  auto producer = ring.producer();
  auto consumer = ring.consumer();
  Request out;
  EXPECT_FALSE(consumer.tryPop(out));
  for (std::uint64_t i = 0; i < 8; ++i)
    ASSERT_TRUE(producer.tryPush(numbered(0, i)));
  EXPECT_FALSE(producer.tryPush(numbered(0, 8))) << "a full ring accepted a ninth request";
  for (std::uint64_t i = 0; i < 8; ++i) {
    ASSERT_TRUE(consumer.tryPop(out));
    EXPECT_EQ(out.request_id, i);
  }
  EXPECT_FALSE(consumer.tryPop(out));
}

TEST(Ring, WrapsAroundManyTimes) {
  SharedRing ring(4);
  auto producer = ring.producer();
  auto consumer = ring.consumer();
  Request out;
  std::uint64_t pushed = 0;
  for (int round = 0; round < 1000; ++round) {
    // One or two at a time, so the positions drift across the cell boundary.
    for (int i = 0; i < 1 + round % 2; ++i)
      ASSERT_TRUE(producer.tryPush(numbered(1, pushed++)));
    while (consumer.readable()) {
      const std::uint64_t expected = consumer.position();
      ASSERT_TRUE(consumer.tryPop(out));
      EXPECT_EQ(out.request_id, expected);
      EXPECT_EQ(checksum(out), checksum(numbered(1, expected)));
    }
  }
  EXPECT_EQ(consumer.position(), pushed);
}

TEST(Ring, TenMillionAcrossForkWithSeveralProducerThreads) {
  constexpr std::uint32_t kThreads = 4;
  constexpr std::uint64_t kPerThread = 2'500'000;
  SharedRing ring(512);

  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The producer process: kThreads threads pushing at once.
    std::vector<std::thread> threads;
    for (std::uint32_t t = 0; t < kThreads; ++t) {
      threads.emplace_back([&ring, t] {
        auto producer = ring.producer();
        for (std::uint64_t i = 0; i < kPerThread; ++i) {
          const Request request = numbered(t, i);
          // Yield, not spin: with more threads than cores (CI runs tests in
          // parallel on two), a spinning thread can hold the core that the
          // thread it waits for needs.
          while (!producer.tryPush(request))
            sched_yield();
        }
      });
    }
    for (auto& thread : threads)
      thread.join();
    ::_exit(0);
  }

  auto consumer = ring.consumer();
  std::vector<std::uint64_t> next(kThreads, 0);
  std::uint64_t sum = 0, expected_sum = 0, received = 0;
  bool in_order = true;
  const std::uint64_t deadline = nowNs() + 120'000'000'000ull;
  Request out;
  while (received < kThreads * kPerThread && nowNs() < deadline) {
    if (!consumer.tryPop(out)) {
      sched_yield();
      continue;
    }
    ++received;
    ASSERT_LT(out.slot, kThreads);
    in_order &= out.request_id == next[out.slot];
    next[out.slot] = out.request_id + 1;
    sum += checksum(out);
  }
  for (std::uint32_t t = 0; t < kThreads; ++t) {
    for (std::uint64_t i = 0; i < kPerThread; ++i)
      expected_sum += checksum(numbered(t, i));
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(received, kThreads * kPerThread) << "requests lost";
  EXPECT_TRUE(in_order) << "a producer's requests arrived out of order";
  EXPECT_EQ(sum, expected_sum) << "a request arrived corrupted or twice";
  EXPECT_FALSE(consumer.tryPop(out)) << "more requests than were pushed";
}

// A hostile client owns its segment and may write anything into it. The
// consumer must keep to its own cells, never loop, and at most see garbage
// requests (which the daemon validates) or none.
// A cell marked ahead of the ring's position, which no producer writes (a
// scribbling peer does): the push gives up, as on a full ring, where it
// looped for ever (found by review).
TEST(Ring, AProducerGivesUpOnACellAheadOfThePosition) {
  SharedRing ring(8);
  auto producer = ring.producer();
  ASSERT_TRUE(producer.tryPush(numbered(0, 0)));
  ring.cells()[1].seq.store(5);  // position 1's cell claims a later round
  EXPECT_FALSE(producer.tryPush(numbered(0, 1)));
  ring.cells()[1].seq.store(1);  // as it was
  EXPECT_TRUE(producer.tryPush(numbered(0, 1)));
}

TEST(Ring, ConsumerSurvivesAScribblingProducer) {
  SharedRing ring(64);
  auto consumer = ring.consumer();
  std::mt19937_64 random(42);
  auto* words = static_cast<std::uint64_t*>(ring.base());
  const std::size_t count = ring.bytes() / sizeof(std::uint64_t);
  Request out;
  std::uint64_t popped = 0;
  for (int round = 0; round < 20000; ++round) {
    for (int i = 0; i < 16; ++i)
      words[random() % count] = random();
    // Sometimes forge a "published" head cell, as a clever attacker would.
    if (round % 7 == 0) {
      ring.cells()[consumer.position() & 63].seq.store(consumer.position() + 1);
    }
    const std::uint64_t before = consumer.position();
    if (consumer.tryPop(out)) {
      ++popped;
      EXPECT_EQ(consumer.position(), before + 1);
    } else {
      EXPECT_EQ(consumer.position(), before);
    }
  }
  EXPECT_GT(popped, 0u);
}

}  // namespace
}  // namespace stmux

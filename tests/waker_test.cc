// Publishing a batch and waking its sleeping callers (daemon/waker.h): every
// status written, every caller that sleeps on its slot woken, none that
// still polls, whether the publishing thread wakes them, waker threads do,
// or their queues are full; and nothing queued is left when the wakers end.
#include "daemon/waker.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/ranges.h>
#include "stmux/segment.h"
#include "test_support.h"

namespace stmux::daemon {
namespace {

constexpr std::uint64_t kSecond = 1'000'000'000;

// A client whose segment is anonymous shared memory.
ClientPtr makeClient(std::uint32_t slots) {
  auto client = std::make_shared<Client>();
  const SegmentLayout layout = SegmentLayout::compute(slots);
  void* base = ::mmap(nullptr, layout.total_bytes, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  client->mapping = Mapping(base, layout.total_bytes);
  initSegment(base, layout, 1);
  client->view = SegmentView(base, layout);
  return client;
}

struct Shape {
  unsigned threads;
  std::size_t capacity;
};

class WakersTest : public ::testing::TestWithParam<Shape> {};

TEST_P(WakersTest, EverySleeperIsWokenAndEveryStatusWritten) {
  constexpr std::uint32_t kSleepers = 10;
  // Slots 0..9 sleep, 10 polls, 11 is not to be written.
  constexpr std::uint32_t kPoller = kSleepers, kLeftAlone = kSleepers + 1;
  ClientPtr client = makeClient(16);
  ASSERT_TRUE(client);
  Batch batch;
  batch.id = 1;
  std::vector<std::int32_t> statuses;
  std::vector<std::uint32_t> generations;
  for (std::uint32_t i = 0; i <= kLeftAlone; ++i) {
    Slot& slot = client->view.slot(i);
    const std::uint32_t generation = slotArm(slot);
    ASSERT_TRUE(slotClaim(slot, generation));
    Request request{};
    request.slot = i;
    request.generation = generation;
    batch.items.push_back(Queued{client, request, {}, 0});
    statuses.push_back(i == kLeftAlone ? kNoWrite : static_cast<std::int32_t>(100 + i));
    generations.push_back(generation);
  }

  // Sleepers: no spinning, and a futex slice far longer than the test, so
  // that only a wake ends their wait in time.
  constexpr std::uint64_t kSlice = 60 * kSecond;
  std::vector<std::thread> callers;
  std::vector<WaitOutcome> outcomes(kPoller + 1, WaitOutcome::kTimedOut);
  std::vector<std::uint64_t> waited(kPoller + 1, 0);
  for (std::uint32_t i = 0; i <= kPoller; ++i) {
    callers.emplace_back([&, i] {
      const std::uint64_t start = nowNs();
      std::uint32_t word = 0;
      const std::uint64_t spin = i == kPoller ? 2 * kSlice : 0;
      outcomes[i] = slotWait(
          client->view.slot(i), generations[i], start + 2 * kSlice, spin, kSlice,
          [] { return true; }, word);
      waited[i] = nowNs() - start;
    });
  }
  // Every sleeper has said it sleeps (its futex wait follows at once; a
  // publish in between is seen by it before it sleeps).
  ASSERT_TRUE(testing::waitFor([&] {
    for (std::uint32_t i = 0; i < kSleepers; ++i) {
      if (client->view.slot(i).sleepers.load() == 0) return false;
    }
    return true;
  }));

  ExecutorGauges gauges;
  {
    Wakers wakers(WakerOptions{GetParam().threads, 1'000'000, GetParam().capacity}, gauges);
    batch.seen_ns = nowNs();
    wakers.publish(batch, statuses);
  }  // ended at once: what its threads still had queued is woken first
  for (std::thread& caller : callers)
    caller.join();

  for (std::uint32_t i = 0; i <= kPoller; ++i) {
    EXPECT_EQ(outcomes[i], WaitOutcome::kDone) << "caller " << i;
    EXPECT_LT(waited[i], kSlice) << "caller " << i << " was never woken";
    EXPECT_EQ(client->view.slot(i).status.load(), static_cast<std::int32_t>(100 + i));
  }
  EXPECT_EQ(client->view.slot(kLeftAlone).word.load(),
            slotWord(generations[kLeftAlone], SlotState::kRunning))
      << "a kNoWrite status must leave its slot alone";
  EXPECT_EQ(gauges.wakes.load(), kSleepers) << "one wake per sleeper, none for the poller";
  EXPECT_GT(gauges.wake_ns.load(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Threads, WakersTest,
                         ::testing::Values(Shape{0, 1024}, Shape{1, 1024}, Shape{3, 1024},
                                           Shape{2, 1}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return std::to_string(info.param.threads) + "Threads" +
                                  (info.param.capacity < 4 ? "QueuesFull" : "");
                         });

// A sleeping caller is woken by a thread while the publisher goes on: many
// batches in a row, each of one sleeper, all woken.
TEST(Wakers, ManyBatchesInARowAreAllWoken) {
  constexpr std::uint32_t kBatches = 200;
  ClientPtr client = makeClient(8);
  ASSERT_TRUE(client);
  ExecutorGauges gauges;
  auto wakers = std::make_unique<Wakers>(WakerOptions{2, 1'000'000, 1024}, gauges);
  for (std::uint32_t b = 0; b < kBatches; ++b) {
    Slot& slot = client->view.slot(b % 8);
    const std::uint32_t generation = slotArm(slot);
    ASSERT_TRUE(slotClaim(slot, generation));
    WaitOutcome outcome = WaitOutcome::kTimedOut;
    std::thread caller([&] {
      std::uint32_t word = 0;
      outcome = slotWait(
          slot, generation, nowNs() + 60 * kSecond, 0, 60 * kSecond, [] { return true; }, word);
    });
    ASSERT_TRUE(testing::waitFor([&] { return slot.sleepers.load() != 0; }));
    Batch batch;
    batch.id = b + 1;
    Request request{};
    request.slot = b % 8;
    request.generation = generation;
    batch.items.push_back(Queued{client, request, {}, 0});
    batch.seen_ns = nowNs();
    const std::int32_t status = kStatusSuccess;
    wakers->publish(batch, std::span<const std::int32_t>(&status, 1));
    caller.join();
    ASSERT_EQ(outcome, WaitOutcome::kDone) << "batch " << b;
  }
  wakers.reset();  // a wake is counted once it returned, which may be after its caller ran on
  EXPECT_EQ(gauges.wakes.load(), kBatches);
}

// Ending the wakers right after a publish still wakes everything it queued:
// a thread that found its queue empty just before the last push, and was
// preempted before it looked at the stop, must not end with the push unseen.
// Sleepers are counted by the wakes gauge (a slot whose sleepers word is set
// needs a wake, whether or not a thread waits on it), many rounds over more
// spinning threads than this machine has cores, where such preemptions come.
TEST(Wakers, WhatIsQueuedJustBeforeTheEndIsWoken) {
  constexpr std::uint32_t kRounds = 400, kSleepers = 8;
  const unsigned threads = std::max(4u, 2 * std::thread::hardware_concurrency());
  ClientPtr client = makeClient(kSleepers);
  ASSERT_TRUE(client);
  const std::vector<std::int32_t> statuses(kSleepers, kStatusSuccess);
  for (std::uint32_t round = 0; round < kRounds; ++round) {
    Batch batch;
    batch.id = round + 1;
    for (std::uint32_t i = 0; i < kSleepers; ++i) {
      Slot& slot = client->view.slot(i);
      Request request{};
      request.slot = i;
      request.generation = slotArm(slot);
      ASSERT_TRUE(slotClaim(slot, request.generation));
      slot.sleepers.store(1);
      batch.items.push_back(Queued{client, request, {}, 0});
    }
    ExecutorGauges gauges;
    {
      Wakers wakers(WakerOptions{threads, 10'000'000, 1024}, gauges);
      // Every thread spinning on its queue before the publish.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      batch.seen_ns = nowNs();
      wakers.publish(batch, statuses);
    }
    ASSERT_EQ(gauges.wakes.load(), kSleepers) << "round " << round << " of " << kRounds;
  }
}

// The threads are named, as `top -H`, perf and gdb show them.
TEST(Wakers, ThreadsAreNamed) {
  const auto names = [] {
    std::vector<std::string> found;
    for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
      std::ifstream comm(task.path() / "comm");
      std::string name;
      if (std::getline(comm, name)) found.push_back(name);
    }
    return found;
  };
  ExecutorGauges gauges;
  Wakers wakers(WakerOptions{.threads = 2, .name = "stmux-wake7"}, gauges);
  ASSERT_TRUE(testing::waitFor([&] {
    const auto found = names();
    return std::count(found.begin(), found.end(), "stmux-wake7.0") == 1 &&
           std::count(found.begin(), found.end(), "stmux-wake7.1") == 1;
  })) << "threads now: "
      << fmt::format("{}", fmt::join(names(), ", "));
}

}  // namespace
}  // namespace stmux::daemon

// The batching policy (daemon/batcher.cc) under a fake clock: each launch
// rule, the think-time prediction, the in-flight limit, round-robin fairness
// and per-tenant order.
#include "daemon/batcher.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

namespace stmux::daemon {
namespace {

constexpr std::uint64_t kUs = 1000;

class BatcherTest : public ::testing::Test {
 protected:
  BatcherOptions options() {
    BatcherOptions o;
    o.window_ns = 100 * kUs;
    o.max_batch = 64;
    o.active_ns = 2000 * kUs;
    o.max_in_flight = 2;
    return o;
  }
  ClientPtr tenant(std::uint32_t id) {
    auto& client = clients_[id];
    if (!client) {
      client = std::make_shared<Client>();
      client->id = id;
    }
    return client;
  }
  Queued request(std::uint32_t id, std::uint64_t sequence = 0, std::int64_t m = 16) {
    Queued q{};  // every field of the request zero (no operand described)
    q.client = tenant(id);
    q.request.m = q.request.n = q.request.k = m;
    q.request.request_id = sequence;
    q.key = BatchKey::of(q.request);
    return q;
  }
  // Runs a tenant through one full call so the batcher learns its think time:
  // submit at `at`, launched and completed at `at + 10 us`.
  void warm(Batcher& b, std::uint32_t id, std::uint64_t at) {
    b.add(request(id), at);
    std::uint64_t wake;
    auto batch = b.take(at, wake);
    ASSERT_TRUE(batch.has_value());
    b.completed(*batch, at + 10 * kUs);
  }

  std::map<std::uint32_t, ClientPtr> clients_;
};

TEST_F(BatcherTest, ALoneTenantLaunchesAtOnce) {
  Batcher b(options());
  b.add(request(1), 1000 * kUs);
  std::uint64_t wake = 0;
  auto batch = b.take(1000 * kUs, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->items.size(), 1u);
  EXPECT_EQ(batch->reason, LaunchReason::kAllWaiting);
  EXPECT_EQ(b.inFlight(), 1u);
  EXPECT_EQ(b.queued(), 0u);
}

TEST_F(BatcherTest, WaitsForAnExpectedTenantThenLaunchesWhenAllAreWaiting) {
  Batcher b(options());
  // Both tenants call in a closed loop with ~5 us between completion and the
  // next call.
  b.add(request(1), 0);
  b.add(request(2), 0);
  std::uint64_t wake;
  auto first = b.take(0, wake);
  ASSERT_TRUE(first.has_value());
  b.completed(*first, 20 * kUs);
  b.add(request(1), 25 * kUs);
  b.add(request(2), 25 * kUs);
  auto second = b.take(25 * kUs, wake);
  ASSERT_TRUE(second.has_value());
  b.completed(*second, 50 * kUs);

  // Tenant 1 is back; tenant 2 is expected within its think time: wait.
  b.add(request(1), 55 * kUs);
  auto none = b.take(55 * kUs, wake);
  EXPECT_FALSE(none.has_value()) << "launched without waiting for an expected tenant";
  EXPECT_GT(wake, 55 * kUs);
  EXPECT_LE(wake, 155 * kUs);
  b.add(request(2), 57 * kUs);
  auto both = b.take(57 * kUs, wake);
  ASSERT_TRUE(both.has_value());
  EXPECT_EQ(both->items.size(), 2u);
  EXPECT_EQ(both->reason, LaunchReason::kAllWaiting);
}

TEST_F(BatcherTest, ALateTenantIsNotWaitedForPastItsUsualThinkTime) {
  Batcher b(options());
  b.add(request(1), 0);
  b.add(request(2), 0);
  std::uint64_t wake;
  auto first = b.take(0, wake);
  b.completed(*first, 10 * kUs);
  b.add(request(1), 15 * kUs);
  b.add(request(2), 15 * kUs);
  auto second = b.take(15 * kUs, wake);
  b.completed(*second, 30 * kUs);  // both think ~5 us
  b.add(request(1), 35 * kUs);
  EXPECT_FALSE(b.take(35 * kUs, wake).has_value());
  // Tenant 2 is late: past twice its think time plus slack, well inside the
  // window. The GPU is idle, so waiting longer gains nothing.
  auto batch = b.take(wake, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->reason, LaunchReason::kIdle);
  EXPECT_LT(batch->launched_ns, 35 * kUs + options().window_ns);
}

TEST_F(BatcherTest, IdleGpuLaunchesWhenNoTenantIsExpectedSoon) {
  Batcher b(options());
  // Tenant 2 calls once a millisecond: its next call is due after this
  // window would close, so tenant 1 must not wait for it.
  warm(b, 2, 0);
  warm(b, 2, 1000 * kUs);
  b.add(request(1), 1200 * kUs);
  std::uint64_t wake;
  auto batch = b.take(1200 * kUs, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->reason, LaunchReason::kIdle);
}

TEST_F(BatcherTest, TheWindowBoundsEveryWait) {
  Batcher b(options());
  b.add(request(1), 0);
  b.add(request(2), 0);
  std::uint64_t wake;
  auto running = b.take(0, wake);  // in flight: tenants 1 and 2
  ASSERT_TRUE(running.has_value());
  b.add(request(3), 10 * kUs);
  EXPECT_FALSE(b.take(10 * kUs, wake).has_value()) << "GPU busy, tenants 1 and 2 out";
  EXPECT_EQ(wake, 110 * kUs);
  EXPECT_FALSE(b.take(109 * kUs, wake).has_value());
  auto batch = b.take(110 * kUs, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->reason, LaunchReason::kWindow);
}

TEST_F(BatcherTest, AFullBatchLaunchesWithoutWaiting) {
  BatcherOptions o = options();
  o.max_batch = 4;
  Batcher b(o);
  b.add(request(9), 0);
  std::uint64_t wake;
  auto running = b.take(0, wake);  // GPU busy from here on
  ASSERT_TRUE(running.has_value());
  for (int i = 0; i < 3; ++i)
    b.add(request(1, i), 5 * kUs);
  EXPECT_FALSE(b.take(5 * kUs, wake).has_value());
  b.add(request(2), 6 * kUs);
  auto batch = b.take(6 * kUs, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->reason, LaunchReason::kFull);
  EXPECT_EQ(batch->items.size(), 4u);
}

TEST_F(BatcherTest, NoMoreThanMaxInFlightBatches) {
  BatcherOptions o = options();
  o.max_batch = 1;
  Batcher b(o);
  for (int i = 0; i < 5; ++i)
    b.add(request(1, i), 0);
  std::uint64_t wake;
  auto first = b.take(0, wake);
  auto second = b.take(0, wake);
  ASSERT_TRUE(first && second);
  EXPECT_FALSE(b.take(1'000'000 * kUs, wake).has_value()) << "a third batch in flight";
  b.completed(*first, 1 * kUs);
  EXPECT_TRUE(b.take(1 * kUs, wake).has_value());
}

TEST_F(BatcherTest, RoundRobinTakesOneFromEachTenantInTurn) {
  BatcherOptions o = options();
  o.max_batch = 3;
  o.max_in_flight = 100;
  Batcher b(o);
  for (int i = 0; i < 10; ++i)
    b.add(request(1, i), 0);  // a busy tenant
  b.add(request(2, 100), 0);
  b.add(request(3, 200), 0);
  std::uint64_t wake;
  auto batch = b.take(0, wake);
  ASSERT_TRUE(batch.has_value());
  std::map<std::uint32_t, int> per_tenant;
  for (const Queued& q : batch->items)
    ++per_tenant[q.client->id];
  EXPECT_EQ(per_tenant, (std::map<std::uint32_t, int>{{1, 1}, {2, 1}, {3, 1}}))
      << "the quiet tenants were crowded out";
  // The busy tenant's requests come out in its own order.
  std::uint64_t expected = 1;
  for (int round = 0; round < 3; ++round) {
    auto next = b.take(0, wake);
    ASSERT_TRUE(next.has_value());
    for (const Queued& q : next->items)
      EXPECT_EQ(q.request.request_id, expected++);
  }
}

TEST_F(BatcherTest, TheFirstTenantServedRotates) {
  BatcherOptions o = options();
  o.max_batch = 1;
  o.max_in_flight = 100;
  Batcher b(o);
  for (int i = 0; i < 3; ++i) {
    b.add(request(1, i), 0);
    b.add(request(2, i), 0);
  }
  std::uint64_t wake;
  std::vector<std::uint32_t> first_served;
  for (int i = 0; i < 4; ++i)
    first_served.push_back(b.take(0, wake)->items[0].client->id);
  EXPECT_EQ(first_served, (std::vector<std::uint32_t>{1, 2, 1, 2}));
}

// More tenants with work than a batch holds: the next batch starts where the
// last was cut, so no tenant misses two batches in a row (starting one
// further each time left the tenants past the cut out of up to T - max_batch
// batches in a row: a tail of several batches).
TEST_F(BatcherTest, ABatchCutShortStartsTheNextWhereItStopped) {
  BatcherOptions o = options();
  o.max_batch = 4;
  o.max_in_flight = 100;
  Batcher b(o);
  constexpr std::uint32_t kTenants = 8;
  for (int i = 0; i < 8; ++i) {
    for (std::uint32_t t = 1; t <= kTenants; ++t)
      b.add(request(t, i), 0);
  }
  std::map<std::uint32_t, int> served, missed_in_a_row, most_missed;
  std::uint64_t wake;
  for (int batch = 0; batch < 16; ++batch) {
    auto taken = b.take(0, wake);
    ASSERT_TRUE(taken.has_value());
    ASSERT_EQ(taken->items.size(), 4u);
    std::map<std::uint32_t, bool> in;
    for (const Queued& q : taken->items)
      in[q.client->id] = true;
    for (std::uint32_t t = 1; t <= kTenants; ++t) {
      if (in[t]) {
        ++served[t];
        missed_in_a_row[t] = 0;
      } else {
        most_missed[t] = std::max(most_missed[t], ++missed_in_a_row[t]);
      }
    }
  }
  for (std::uint32_t t = 1; t <= kTenants; ++t) {
    EXPECT_EQ(served[t], 8) << "tenant " << t;
    EXPECT_LE(most_missed[t], 1) << "tenant " << t << " missed batches in a row";
  }
}

TEST_F(BatcherTest, MixedShapesShareABatch) {
  Batcher b(options());
  b.add(request(1, 0, 16), 0);
  b.add(request(2, 0, 32), 0);
  std::uint64_t wake;
  auto batch = b.take(0, wake);
  ASSERT_TRUE(batch.has_value());
  ASSERT_EQ(batch->items.size(), 2u);
  EXPECT_FALSE(batch->items[0].key == batch->items[1].key);
}

// Operands of m x m column-major matrices (lda = m) in allocations of the
// tenant's: `a`, `b` and `c` name allocation ids, at byte offsets.
Queued withOperands(Queued q, std::uint64_t a, std::uint64_t b, std::uint64_t c,
                    std::uint64_t c_offset = 0, std::uint64_t a_offset = 0) {
  Request& r = q.request;
  r.lda = r.ldb = r.ldc = r.m;
  r.batch_count = 1;
  r.a.alloc_id = a, r.b.alloc_id = b, r.c.alloc_id = c;
  r.a.offset = a_offset, r.c.offset = c_offset;
  for (OperandDesc* o : {&r.a, &r.b, &r.c})
    o->alloc_bytes = 1 << 20;
  q.key = BatchKey::of(r);
  return q;
}

// Two threads of a process calling on one stream, C += A_i B_i into one C:
// in one launch both would read the old C and one update would be lost.
TEST_F(BatcherTest, RequestsOfATenantThatWriteWhatAnotherReadsOrWritesGoInLaterBatches) {
  BatcherOptions o = options();
  o.max_in_flight = 100;
  Batcher b(o);
  const std::uint64_t bytes = 16 * 16 * sizeof(float);
  b.add(withOperands(request(1, 0), 10, 11, 12), 0);
  b.add(withOperands(request(1, 1), 13, 14, 12), 0);                // the same C
  b.add(withOperands(request(1, 2), 12, 15, 16), 0);                // reads that C as A
  b.add(withOperands(request(1, 3), 17, 18, 12, bytes), 0);         // C just past it
  b.add(withOperands(request(2, 0), 10, 11, 12), 0);                // another tenant's ids
  b.add(withOperands(request(1, 4), 19, 20, 21, 0, bytes - 4), 0);  // untouched by 0 or 1
  std::uint64_t wake;
  std::vector<std::vector<std::pair<std::uint32_t, std::uint64_t>>> batches;
  while (auto batch = b.take(1000 * kUs, wake)) {  // each past the window
    auto& ids = batches.emplace_back();
    for (const Queued& q : batch->items)
      ids.emplace_back(q.client->id, q.request.request_id);
  }
  using Ids = std::vector<std::pair<std::uint32_t, std::uint64_t>>;
  // Tenant 1 stops at its first request that races one already taken; the
  // ones behind it wait too, in order.
  ASSERT_EQ(batches.size(), 3u);
  EXPECT_EQ(batches[0], (Ids{{1, 0}, {2, 0}}));
  EXPECT_EQ(batches[1], (Ids{{1, 1}}));  // 2 reads what 1 writes
  EXPECT_EQ(batches[2], (Ids{{1, 2}, {1, 3}, {1, 4}}));
  EXPECT_EQ(b.stats().held_for_hazard, 2u);
}

TEST_F(BatcherTest, ARequestThatReadsWhatAnEarlierOneReadsSharesItsBatch) {
  Batcher b(options());
  b.add(withOperands(request(1, 0), 10, 11, 12), 0);
  b.add(withOperands(request(1, 1), 10, 11, 13), 0);  // the same A and B, its own C
  std::uint64_t wake;
  auto batch = b.take(0, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->items.size(), 2u);
  EXPECT_EQ(b.stats().held_for_hazard, 0u);
}

// Many requests of few tenants over a few allocations, at random offsets:
// a batch never holds two requests of one tenant that race, and a tenant's
// next request is left out of a batch (not full) only for racing one of its
// requests there: the check holds back no more than it must.
TEST_F(BatcherTest, ATenantsRequestsAreHeldBackExactlyWhenTheyRaceOnesTaken) {
  BatcherOptions o = options();
  o.max_batch = 4096;
  o.max_in_flight = 1000;
  Batcher b(o);
  constexpr std::uint64_t kBytes = 16 * 16 * sizeof(float);  // each operand, m = n = k = 16
  std::mt19937 random(7);
  struct Range {
    std::uint64_t alloc, first;
  };
  struct Call {
    Range a, b, c;
  };
  std::map<std::pair<std::uint32_t, std::uint64_t>, Call> calls;
  const auto pick = [&] { return Range{1 + random() % 3, (random() % 32) * 256}; };
  constexpr std::uint32_t kTenants = 3;
  constexpr std::uint64_t kCalls = 400;
  for (std::uint64_t i = 0; i < kCalls; ++i) {
    for (std::uint32_t t = 1; t <= kTenants; ++t) {
      const Call call{pick(), pick(), pick()};
      Queued q = request(t, i);
      Request& r = q.request;
      r.lda = r.ldb = r.ldc = 16;
      r.batch_count = 1;
      for (auto [operand, range] : {std::pair{&r.a, call.a}, {&r.b, call.b}, {&r.c, call.c}}) {
        operand->alloc_id = range.alloc;
        operand->offset = range.first;
        operand->alloc_bytes = 1 << 20;
      }
      q.key = BatchKey::of(r);
      calls[{t, i}] = call;
      b.add(std::move(q), 0);
    }
  }
  const auto overlap = [](Range x, Range y) {
    return x.alloc == y.alloc && x.first < y.first + kBytes && y.first < x.first + kBytes;
  };
  const auto race = [&](const Call& x, const Call& y) {
    return overlap(x.c, y.c) || overlap(x.c, y.a) || overlap(x.c, y.b) || overlap(x.a, y.c) ||
           overlap(x.b, y.c);
  };
  std::map<std::uint32_t, std::uint64_t> next{{1, 0}, {2, 0}, {3, 0}};
  std::uint64_t held = 0, wake = 0;
  while (auto batch = b.take(1000 * kUs, wake)) {
    std::map<std::uint32_t, std::vector<std::uint64_t>> taken;
    for (const Queued& q : batch->items) {
      const std::uint32_t t = q.client->id;
      ASSERT_EQ(q.request.request_id, next[t]) << "tenant " << t << " out of order";
      ++next[t];
      for (std::uint64_t earlier : taken[t]) {
        EXPECT_FALSE(race(calls[{t, earlier}], calls[{t, q.request.request_id}]))
            << "tenant " << t << ": calls " << earlier << " and " << q.request.request_id
            << " race in one batch";
      }
      taken[t].push_back(q.request.request_id);
    }
    for (auto& [t, ids] : taken) {
      if (next[t] == kCalls) continue;
      const Call& left = calls[{t, next[t]}];
      EXPECT_TRUE(std::any_of(ids.begin(), ids.end(),
                              [&](std::uint64_t id) {
                                return race(calls[{t, id}], left);
                              }))
          << "tenant " << t << ": call " << next[t] << " was held back but races none taken";
      ++held;
    }
    b.completed(*batch, 1000 * kUs);
  }
  for (auto& [t, n] : next)
    EXPECT_EQ(n, kCalls) << "tenant " << t;
  EXPECT_GT(held, 10u) << "too few races to test the check";
  EXPECT_EQ(b.stats().held_for_hazard, held);
}

TEST_F(BatcherTest, ARemovedTenantsRequestsAreDropped) {
  Batcher b(options());
  b.add(request(1), 0);
  b.add(request(1), 0);
  b.add(request(2), 0);
  EXPECT_EQ(b.removeTenant(1).size(), 2u);
  EXPECT_EQ(b.queued(), 1u);
  std::uint64_t wake;
  auto batch = b.take(0, wake);
  ASSERT_TRUE(batch.has_value());
  ASSERT_EQ(batch->items.size(), 1u);
  EXPECT_EQ(batch->items[0].client->id, 2u);
  // A batch that still holds a removed tenant completes harmlessly.
  b.completed(*batch, 1 * kUs);
  EXPECT_EQ(b.removeTenant(42).size(), 0u);
}

TEST_F(BatcherTest, StatsCountWhatHappened) {
  Batcher b(options());
  b.add(request(1), 0);
  b.add(request(2), 0);
  std::uint64_t wake;
  auto batch = b.take(30 * kUs, wake);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(b.stats().requests, 2u);
  EXPECT_EQ(b.stats().batches, 1u);
  EXPECT_EQ(b.stats().launched, 2u);
  EXPECT_EQ(b.stats().wait_ns, 60 * kUs);
  EXPECT_EQ(b.stats().launches[static_cast<int>(LaunchReason::kAllWaiting)], 1u);
  // The histograms: one batch of 2 (bucket "<= 2"), two waits of 30 us
  // (bucket "<= 50 us").
  const std::uint64_t* sizes = b.stats().batch_sizes;
  EXPECT_EQ(std::vector<std::uint64_t>(sizes, sizes + kBatchSizeBuckets),
            (std::vector<std::uint64_t>{0, 1, 0, 0, 0, 0, 0, 0, 0, 0}));
  const std::uint64_t* waits = b.stats().waits;
  EXPECT_EQ(std::vector<std::uint64_t>(waits, waits + kWaitBuckets),
            (std::vector<std::uint64_t>{0, 0, 0, 2, 0, 0, 0, 0, 0, 0}));
}

}  // namespace
}  // namespace stmux::daemon

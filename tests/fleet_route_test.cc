// The route of the tenants on MPS (daemon/fleet_route.h), driven by a
// simulated fleet whose calls come at rates that depend on the route all of
// them take, as the server drives it: a step at every tick.
#include "daemon/fleet_route.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "stmux/wire.h"

namespace stmux::daemon {
namespace {

constexpr std::uint64_t kMs = 1'000'000;
constexpr std::uint64_t kS = 1'000'000'000;

// Tenants in closed loops: tenant i makes `rate(i, direct, now)` calls per
// second on the route the word says.
struct Fleet {
  using Rate = std::function<double(std::size_t, bool, std::uint64_t)>;
  Fleet(std::size_t n, Rate r) : rate(std::move(r)), calls(n, 0.0), ids(n) {
    for (std::size_t i = 0; i < n; ++i)
      ids[i] = static_cast<std::uint32_t>(100 + i);
  }

  FleetRoute route;
  Rate rate;
  std::vector<double> calls;
  std::vector<std::uint32_t> ids;
  std::uint64_t now = 5 * kS;
  std::uint32_t word = 0;
  std::uint64_t direct_ns = 0, served_ns = 0, look_ns = 0;
  std::vector<FleetLook> looks;

  std::vector<TenantCalls> counts() const {
    std::vector<TenantCalls> out;
    for (std::size_t i = 0; i < calls.size(); ++i)
      out.push_back({ids[i], static_cast<std::uint64_t>(calls[i])});
    return out;
  }

  void runFor(std::uint64_t ns, std::uint64_t tick = kMs) {
    const std::uint64_t end = now + ns;
    while (now < end) {
      FleetLook look;
      word = route.step(now, counts(), &look);
      if (look.tenants != 0 || look.direct_before != look.direct_after) looks.push_back(look);
      const bool direct = (word & kFleetDirect) != 0;
      (direct ? direct_ns : served_ns) += tick;
      if ((word & kFleetLook) != 0) look_ns += tick;
      for (std::size_t i = 0; i < calls.size(); ++i)
        calls[i] += rate(i, direct, now) * static_cast<double>(tick) / 1e9;
      now += tick;
    }
  }
};

TEST(FleetRoute, TenantsFasterDirectGoDirectAfterTwoLooksAndStay) {
  // PyTorch MLP tenants at R = 32: 3.6x faster direct than served.
  Fleet f(32, [](std::size_t, bool direct, std::uint64_t) { return direct ? 13'000.0 : 3'600.0; });
  f.runFor(3 * kS);
  EXPECT_TRUE(f.route.direct());
  EXPECT_EQ(f.word & kFleetDirect, kFleetDirect);
  ASSERT_GE(f.looks.size(), 3u);
  EXPECT_TRUE(f.looks[0].warm_up);        // the first decides nothing
  EXPECT_FALSE(f.looks[1].direct_after);  // one win is not enough
  EXPECT_TRUE(f.looks[2].direct_after);
  EXPECT_EQ(f.looks[2].tenants, 32u);
  EXPECT_NEAR(f.looks[2].gain, 13'000.0 / 3'600.0, 0.1);

  // Later looks at serving confirm direct, further and further apart.
  const std::uint64_t served_before = f.served_ns, looks_before = f.looks.size();
  f.runFor(120 * kS);
  EXPECT_TRUE(f.route.direct());
  EXPECT_LT(static_cast<double>(f.served_ns - served_before) / (120.0 * kS), 0.01);
  for (std::size_t i = looks_before; i < f.looks.size(); ++i) {
    EXPECT_TRUE(f.looks[i].direct_before);
    EXPECT_TRUE(f.looks[i].direct_after);
    EXPECT_NEAR(f.looks[i].gain, 3'600.0 / 13'000.0, 0.05);
  }
  EXPECT_LE(f.looks.size() - looks_before, 8u);  // 1, 2, 4, ... 64 s apart
}

TEST(FleetRoute, OneOffCostsOfTheFirstDirectCallsDoNotDecide) {
  // Each tenant's first 30 ms direct are 30x slower (CUDA loads cuBLAS's
  // kernels lazily); after that it is 2x faster direct.
  std::uint64_t first_direct = 0;
  Fleet f(4, [&](std::size_t, bool direct, std::uint64_t now) {
    if (!direct) return 10'000.0;
    if (first_direct == 0) first_direct = now;
    return now - first_direct < 30 * kMs ? 333.0 : 20'000.0;
  });
  FleetRouteOptions o;
  f.runFor(o.first_look_ns + 500 * kMs);
  EXPECT_TRUE(f.route.direct());
  ASSERT_GE(f.looks.size(), 3u);
  EXPECT_TRUE(f.looks[0].warm_up);
  EXPECT_LT(f.looks[0].gain, 1.0);
}

TEST(FleetRoute, TenantsFasterServedStayServed) {
  // Pure-GEMM tenants that batch well: 1.5x faster served.
  Fleet f(16, [](std::size_t, bool direct, std::uint64_t) { return direct ? 7'000.0 : 10'500.0; });
  f.runFor(60 * kS);
  EXPECT_FALSE(f.route.direct());
  ASSERT_FALSE(f.looks.empty());
  for (const FleetLook& look : f.looks) {
    EXPECT_FALSE(look.direct_after);
    EXPECT_NEAR(look.gain, 7'000.0 / 10'500.0, 0.05);
  }
  EXPECT_LE(f.looks.size(), 7u);
  // What the looks cost: the direct windows are a small share.
  EXPECT_LT(static_cast<double>(f.direct_ns) / (60.0 * kS), 0.01);
}

TEST(FleetRoute, WithinTheMarginTheRouteTakenStays) {
  // 10% faster direct is not enough to move everyone.
  Fleet f(8, [](std::size_t, bool direct, std::uint64_t) { return direct ? 11'000.0 : 10'000.0; });
  f.runFor(30 * kS);
  EXPECT_FALSE(f.route.direct());
  ASSERT_FALSE(f.looks.empty());
  for (const FleetLook& look : f.looks)
    EXPECT_FALSE(look.direct_after);
}

TEST(FleetRoute, FromDirectServedNeedOnlyBeAsFastToBeTakenBack) {
  // The fleet went direct while serving lost (3.6x); then serving is 5%
  // slower than direct: that is not enough to go back. Then it is 5%
  // faster: back to served, where it stays, since going direct again would
  // take a 15% win.
  double direct_rate = 13'000.0, served_rate = 3'600.0;
  Fleet f(16, [&](std::size_t, bool direct, std::uint64_t) {
    return direct ? direct_rate : served_rate;
  });
  f.runFor(3 * kS);
  ASSERT_TRUE(f.route.direct());

  direct_rate = 10'500.0;
  served_rate = 10'000.0;
  std::size_t looks_before = f.looks.size();
  f.runFor(20 * kS);
  EXPECT_TRUE(f.route.direct());
  ASSERT_GT(f.looks.size(), looks_before);
  for (std::size_t i = looks_before; i < f.looks.size(); ++i) {
    EXPECT_TRUE(f.looks[i].direct_after);
    EXPECT_NEAR(f.looks[i].gain, 10'000.0 / 10'500.0, 0.02);
  }

  direct_rate = 10'000.0;
  served_rate = 10'500.0;
  f.runFor(40 * kS);  // the next look within 32 s, then a second at once
  EXPECT_FALSE(f.route.direct());
  looks_before = f.looks.size();
  const std::uint64_t direct_before = f.direct_ns;
  f.runFor(60 * kS);
  EXPECT_FALSE(f.route.direct());
  ASSERT_GT(f.looks.size(), looks_before);
  for (std::size_t i = looks_before; i < f.looks.size(); ++i)
    EXPECT_FALSE(f.looks[i].direct_after);
  EXPECT_LT(static_cast<double>(f.direct_ns - direct_before) / (60.0 * kS), 0.01);
}

TEST(FleetRoute, ASteadyDriftIsNotTakenForTheOtherRoute) {
  // Both routes equal, every tenant speeding up fast from the first look on
  // (by a quarter every 22 ms, the time from one window's start to the
  // next's): compared with the window before it alone, the other route would
  // win every look. The windows before and after it straddle it, so the
  // drift cancels out.
  FleetRouteOptions o;
  const std::uint64_t first_look = 5 * kS + o.first_look_ns;
  Fleet f(8, [&](std::size_t, bool, std::uint64_t now) {
    const double since = now > first_look ? static_cast<double>(now - first_look) / kS : 0.0;
    return 10'000.0 * std::exp(since / 0.1);
  });
  f.runFor(o.first_look_ns + o.first_interval_ns - 100 * kMs);
  EXPECT_FALSE(f.route.direct());
  ASSERT_GE(f.looks.size(), 1u);
  EXPECT_NEAR(f.looks.front().gain, 1.0, 0.05);
}

TEST(FleetRoute, TheWordSaysWhichWindowIsALook) {
  Fleet f(4, [](std::size_t, bool direct, std::uint64_t) { return direct ? 9'000.0 : 10'000.0; });
  FleetRouteOptions o;
  f.runFor(o.first_look_ns - 2 * kMs);
  EXPECT_EQ(f.word, 0u);  // served, no look before the first is due
  EXPECT_EQ(f.look_ns, 0u);
  EXPECT_EQ(f.route.nextStepNs(), 5 * kS + o.first_look_ns);
  f.runFor(5 * kMs);
  EXPECT_EQ(f.word, kFleetLook);  // the first window: served, a look
  EXPECT_EQ(f.route.nextStepNs(), f.now - kMs + o.tick_ns);
  // Until the looks end (a warm-up, then one that counts, back to back) the
  // word has the look bit; direct only in the middle window of each.
  std::uint64_t direct_seen = 0, direct_spells = 0;
  bool was_direct = false;
  while ((f.word & kFleetLook) != 0) {
    f.runFor(kMs);
    const bool is_direct = (f.word & kFleetDirect) != 0;
    if (is_direct) direct_seen += kMs;
    direct_spells += is_direct && !was_direct;
    was_direct = is_direct;
  }
  EXPECT_EQ(direct_spells, 2u);
  EXPECT_GE(direct_seen, 2 * o.window_min_ns);
  EXPECT_LT(direct_seen, 2 * (o.window_max_ns + o.settle_ns + 2 * kMs));
  EXPECT_EQ(f.word, 0u);
  EXPECT_EQ(f.route.looks(), 2u);
  EXPECT_FALSE(f.route.lastLook().warm_up);
}

TEST(FleetRoute, ANewTenantVoidsTheLookAndStartsOver) {
  Fleet f(4, [](std::size_t, bool direct, std::uint64_t) { return direct ? 40'000.0 : 10'000.0; });
  FleetRouteOptions o;
  f.runFor(o.first_look_ns + 10 * kMs);  // inside the first look
  ASSERT_TRUE(f.route.looking());
  f.calls.push_back(0);
  f.ids.push_back(7);
  f.runFor(kMs);
  EXPECT_FALSE(f.route.looking());
  EXPECT_EQ(f.word, 0u);
  EXPECT_EQ(f.route.looks(), 0u);
  // Looked at afresh at once (the look was due), and then decided.
  f.runFor(500 * kMs);
  EXPECT_TRUE(f.route.direct());
}

TEST(FleetRoute, TenantsArrivingOneByOneDoNotPutTheLookOff) {
  // 16 tenants start 200 ms apart, as a fleet's processes come up: the look
  // is due a first_look_ns after the first, and taken between arrivals.
  Fleet f(1, [](std::size_t, bool direct, std::uint64_t) { return direct ? 30'000.0 : 10'000.0; });
  for (int i = 1; i < 16; ++i) {
    f.runFor(200 * kMs);
    f.calls.push_back(0);
    f.ids.push_back(static_cast<std::uint32_t>(500 + i));
  }
  f.runFor(500 * kMs);  // half a first_look_ns after the last came
  EXPECT_TRUE(f.route.direct());
}

TEST(FleetRoute, WhenAllTenantsLeaveTheNextFleetStartsServed) {
  Fleet f(4, [](std::size_t, bool direct, std::uint64_t) { return direct ? 40'000.0 : 10'000.0; });
  f.runFor(4 * kS);
  ASSERT_TRUE(f.route.direct());
  EXPECT_EQ(f.route.step(f.now, {}), 0u);
  EXPECT_FALSE(f.route.direct());
  EXPECT_EQ(f.route.nextStepNs(), 0u);  // nothing to do until tenants come
}

TEST(FleetRoute, TenantsWithTooFewCallsDoNotDecide) {
  // One call every 50 ms: no window holds min_calls of them. The looks end
  // at window_max_ns, void, and the route stays.
  Fleet f(2, [](std::size_t, bool direct, std::uint64_t) { return direct ? 20.0 : 5.0; });
  f.runFor(20 * kS);
  EXPECT_FALSE(f.route.direct());
  EXPECT_GE(f.route.looks(), 1u);
  EXPECT_EQ(f.route.lastLook().tenants, 0u);
}

TEST(FleetRoute, EachTenantCountsOnceWhateverItsSpeed) {
  // One fast tenant gains 1.5x direct; seven slow ones lose 2x. The sum of
  // calls would favour direct; the geometric mean of the tenants' gains does
  // not.
  Fleet f(8, [](std::size_t i, bool direct, std::uint64_t) {
    if (i == 0) return direct ? 150'000.0 : 100'000.0;
    return direct ? 1'000.0 : 2'000.0;
  });
  f.runFor(20 * kS);
  EXPECT_FALSE(f.route.direct());
  ASSERT_FALSE(f.looks.empty());
  EXPECT_LT(f.looks.front().gain, 1.0);
}

// A tenant writes its own call counts: one claiming a million times its rate
// on one route sways the fleet's mean by a bounded share, not at will.
TEST(FleetRoute, NoOneTenantsCountsDecideForTheFleet) {
  // Seven tenants 2x faster served; one claims to be 10^6 x faster direct.
  Fleet f(8, [](std::size_t i, bool direct, std::uint64_t) {
    if (i == 0) return direct ? 1e9 : 1'000.0;
    return direct ? 1'000.0 : 2'000.0;
  });
  f.runFor(20 * kS);
  EXPECT_FALSE(f.route.direct());
  ASSERT_FALSE(f.looks.empty());
  EXPECT_LT(f.looks.back().gain, 1.0);
}

// A small fleet too: the median tenant decides. With the mean of the
// bounded gains, one liar among 4 kept the fleet direct while the other 3
// were 1.3x faster served.
TEST(FleetRoute, NoOneTenantsCountsDecideForASmallFleet) {
  Fleet f(4, [](std::size_t i, bool direct, std::uint64_t) {
    if (i == 0) return direct ? 1e9 : 1'000.0;
    return direct ? 1'000.0 : 1'300.0;
  });
  f.runFor(20 * kS);
  EXPECT_FALSE(f.route.direct());
  ASSERT_FALSE(f.looks.empty());
  EXPECT_LT(f.looks.back().gain, 1.0);
}

}  // namespace
}  // namespace stmux::daemon

// STMUX_ROUTE=auto's chooser (shim/route.h), driven by a simulated process
// whose calls come at a pace that depends on the route they take.
#include "shim/route.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace stmux::shim {
namespace {

constexpr std::uint64_t kUs = 1'000;
constexpr std::uint64_t kMs = 1'000'000;
constexpr std::uint64_t kS = 1'000'000'000;

// A closed loop: the next call comes `gap(route, now)` after one that took
// `route`. Records every route and decision.
struct Process {
  using Gap = std::function<std::uint64_t(Route, std::uint64_t)>;
  explicit Process(Gap g) : gap(std::move(g)) {}

  RouteChooser chooser;
  Gap gap;
  bool company = false;  // other tenants are making calls
  std::uint64_t now = 1 * kS;
  std::uint64_t direct_calls = 0, served_calls = 0;
  std::vector<RouteDecision> decisions;

  void runFor(std::uint64_t ns) {
    const std::uint64_t end = now + ns;
    while (now < end) {
      RouteDecision decision;
      const Route route = chooser.onCall(now, company, &decision);
      if (decision.decided) decisions.push_back(decision);
      (route == Route::kDirect ? direct_calls : served_calls)++;
      now += gap(route, now);
    }
  }

  // The share of the calls so far that took `route`.
  double share(Route route) const {
    const auto on = route == Route::kDirect ? direct_calls : served_calls;
    return static_cast<double>(on) / static_cast<double>(direct_calls + served_calls);
  }
};

TEST(RouteChooser, AProcessFasterDirectGoesDirectSoonAndStays) {
  // A tenant with kernels of its own and no MPS: 6x slower served.
  Process p{[](Route r, std::uint64_t) { return r == Route::kServe ? 360 * kUs : 60 * kUs; }};
  p.runFor(1 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kDirect);
  ASSERT_FALSE(p.decisions.empty());
  const RouteDecision& first = p.decisions.front();
  EXPECT_EQ(first.from, Route::kServe);
  EXPECT_EQ(first.to, Route::kDirect);
  EXPECT_NEAR(first.from_rate, 1e9 / (360 * kUs), 1.0);
  EXPECT_NEAR(first.to_rate, 1e9 / (60 * kUs), 1.0);

  // From then on, looks back at serving confirm direct and grow apart: over
  // a minute, what went served is a small share.
  const std::uint64_t served_before = p.served_calls, direct_before = p.direct_calls;
  p.runFor(60 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kDirect);
  const double served = static_cast<double>(p.served_calls - served_before);
  const double direct = static_cast<double>(p.direct_calls - direct_before);
  EXPECT_LT(served / (served + direct), 0.002);
  for (std::size_t i = 1; i < p.decisions.size(); ++i) {
    EXPECT_EQ(p.decisions[i].from, Route::kDirect);
    EXPECT_EQ(p.decisions[i].to, Route::kDirect);
  }
  EXPECT_LE(p.decisions.size(), 8u);  // 1 s, 2 s, 4 s, ... apart
}

TEST(RouteChooser, AProcessFasterServedStaysServedAndItsLooksAreCutShort) {
  // Pure GEMMs among many tenants without MPS: a direct call waits for a
  // time slice of milliseconds.
  Process p{[](Route r, std::uint64_t) { return r == Route::kServe ? 80 * kUs : 5 * kMs; }};
  p.runFor(30 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kServe);
  ASSERT_FALSE(p.decisions.empty());
  for (const RouteDecision& d : p.decisions) {
    EXPECT_EQ(d.to, Route::kServe);
    EXPECT_LT(d.to_rate, d.from_rate);
  }
  // The first look runs a whole window (32 calls); each later one ends after
  // 2x the baseline window (63 served calls to pass the 5 ms minimum: so
  // 10.08 ms), i.e. after three direct calls.
  EXPECT_LE(p.direct_calls, 32 + 3 * (p.decisions.size() - 1));
}

TEST(RouteChooser, TheFirstCallsARouteEverMakesDoNotDecideAgainstIt) {
  // A process's first direct calls load its kernels (CUDA loads them lazily):
  // milliseconds each, once. The first look must still find direct faster.
  std::uint64_t first_direct = 0;
  Process p{[&first_direct](Route r, std::uint64_t) {
    if (r == Route::kServe) return 360 * kUs;
    return ++first_direct <= 2 ? 15 * kMs : 60 * kUs;
  }};
  p.runFor(1 * kS);
  ASSERT_FALSE(p.decisions.empty());
  EXPECT_EQ(p.decisions.front().to, Route::kDirect);
  EXPECT_EQ(p.chooser.route(), Route::kDirect);
}

TEST(RouteChooser, ItTurnsBackWhenTheOtherRouteBecomesFaster) {
  // Direct wins for the first 5 s (alone), then serving does (others came).
  Process p{[](Route r, std::uint64_t now) {
    const bool crowded = now > 6 * kS;
    if (r == Route::kDirect) return crowded ? 4 * kMs : 20 * kUs;
    return 40 * kUs;
  }};
  p.runFor(5 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kDirect);
  p.runFor(120 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kServe);
  EXPECT_EQ(p.decisions.back().to, Route::kServe);
}

// A program's own hiccups (a collector, a page fault, another thread) land
// in some windows: one such window must not move the process to the slower
// route for a whole interval.
std::uint64_t withHiccups(std::uint64_t gap, std::uint64_t& n) {
  // About one call in 150 takes 8 ms longer (a fixed pseudo-random sequence).
  n = n * 6364136223846793005ull + 1442695040888963407ull;
  return gap + ((n >> 33) % 150 == 0 ? 8 * kMs : 0);
}

TEST(RouteChooser, HiccupsInOneWindowDoNotMoveAProcessToTheSlowerRoute) {
  for (const Route faster : {Route::kServe, Route::kDirect}) {
    const Route slower = faster == Route::kServe ? Route::kDirect : Route::kServe;
    std::uint64_t n = faster == Route::kServe ? 1 : 7;
    Process p{[&n, faster](Route r, std::uint64_t) {
      return withHiccups(r == faster ? 30 * kUs : 42 * kUs, n);
    }};
    p.runFor(60 * kS);
    EXPECT_LT(p.share(slower), 0.02) << p.decisions.size() << " decisions";
    EXPECT_EQ(p.chooser.route(), faster);
  }
}

TEST(RouteChooser, RatesWithinTheMarginKeepTheRouteItHas) {
  // Direct 10% faster: not enough to leave serving.
  Process p{[](Route r, std::uint64_t) { return r == Route::kServe ? 110 * kUs : 100 * kUs; }};
  p.runFor(30 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kServe);
  EXPECT_FALSE(p.decisions.empty());
}

TEST(RouteChooser, TheFirstLookWaitsForCallsAndTime) {
  Process p{[](Route r, std::uint64_t) { return r == Route::kServe ? 100 * kUs : 10 * kUs; }};
  p.runFor(250 * kMs);  // 2,500 calls, but under the first 300 ms
  EXPECT_EQ(p.direct_calls, 0u);
  // A slow caller: 300 ms pass, but not 64 calls.
  Process slow{[](Route, std::uint64_t) { return 10 * kMs; }};
  slow.runFor(600 * kMs);
  EXPECT_EQ(slow.direct_calls, 0u);
}

TEST(RouteChooser, OtherTenantsMakingCallsBringAProcessBackToServingWithoutALook) {
  Process p{[](Route r, std::uint64_t) { return r == Route::kServe ? 360 * kUs : 60 * kUs; }};
  p.runFor(1 * kS);
  ASSERT_EQ(p.chooser.route(), Route::kDirect);
  const std::size_t alone_decisions = p.decisions.size();
  // Others come: the next call is served, and while they stay no call goes
  // direct, however much faster direct measured.
  p.company = true;
  const std::uint64_t direct_before = p.direct_calls;
  p.runFor(30 * kS);
  EXPECT_EQ(p.direct_calls, direct_before);
  ASSERT_EQ(p.decisions.size(), alone_decisions + 1);
  EXPECT_TRUE(p.decisions.back().company);
  EXPECT_EQ(p.decisions.back().to, Route::kServe);
  // Alone again: measured, and direct again within a second.
  p.company = false;
  p.runFor(1 * kS);
  EXPECT_EQ(p.chooser.route(), Route::kDirect);
  EXPECT_FALSE(p.decisions.back().company);
}

TEST(RouteChooser, APauseInsideAWindowMeasuresNothing) {
  // Bursts of 10 calls 1 ms apart, then 200 ms of the program's own work.
  std::uint64_t n = 0;
  Process p{[&n](Route r, std::uint64_t) {
    ++n;
    if (n % 10 == 0) return 200 * kMs;
    return r == Route::kServe ? 2 * kMs : 100 * kUs;
  }};
  p.runFor(20 * kS);
  // Windows of 16 calls never fit in a burst of 10: no decision is made.
  EXPECT_TRUE(p.decisions.empty());
  EXPECT_EQ(p.chooser.route(), Route::kServe);
}

}  // namespace
}  // namespace stmux::shim

// The rules that decide whether a stmux-bench row counts (tools/row_validity.h)
// and the result files they read (tools/barrier.h).
#include "tools/row_validity.h"

#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <utility>
#include <vector>

#include "test_support.h"
#include "tools/latency.h"
#include "tools/round_span.h"

namespace stmux::tools {
namespace {

constexpr Span kSpan{1'000'000'000, 3'000'000'000};

TenantOutcome finished(std::uint64_t calls, std::uint64_t last_end_ns) {
  TenantOutcome outcome;
  outcome.exit_status = 0;
  TenantResult result;
  result.calls = calls;
  result.latencies_ns.assign(calls, 1000);
  result.last_end_ns = last_end_ns;
  outcome.result = result;
  return outcome;
}

TEST(RowValidity, ARowWhoseTenantsAllRanThroughTheSpanIsValid) {
  const RowVerdict verdict =
      judgeRow({finished(10, kSpan.stop_ns), finished(1, kSpan.stop_ns + 5)}, kSpan);
  EXPECT_TRUE(verdict.valid) << verdict.why;
  EXPECT_EQ(verdict.why, "");
}

TEST(RowValidity, EachWayATenantFailsMakesTheRowInvalidAndSaysWhich) {
  struct Case {
    TenantOutcome outcome;
    std::string why;
  };
  TenantOutcome still_running;  // exit_status -1
  TenantOutcome crashed;
  crashed.exit_status = 3;
  crashed.error = "cannot create a CUDA context";
  TenantOutcome silent;
  silent.exit_status = 0;
  const Case cases[] = {
      {still_running, "tenant 1 did not finish"},
      {crashed, "tenant 1 exited 3: cannot create a CUDA context"},
      {silent, "tenant 1 wrote no result"},
      {finished(5, kSpan.stop_ns - 1), "tenant 1 stopped before the timed span ended"},
      {finished(0, kSpan.stop_ns + 100), "tenant 1 completed no step inside the timed span"},
  };
  for (const Case& c : cases) {
    const RowVerdict verdict = judgeRow({finished(10, kSpan.stop_ns), c.outcome}, kSpan);
    EXPECT_FALSE(verdict.valid) << c.why;
    EXPECT_EQ(verdict.why, c.why);
  }
}

TEST(RowValidity, SeveralFaultyTenantsAreCountedAndTheFirstNamed) {
  TenantOutcome crashed;
  crashed.exit_status = 1;
  const RowVerdict verdict =
      judgeRow({finished(10, kSpan.stop_ns), crashed, finished(0, kSpan.stop_ns), crashed}, kSpan);
  EXPECT_FALSE(verdict.valid);
  EXPECT_EQ(verdict.why, "3 of 4 tenants failed the row; tenant 1 exited 1");
}

TEST(RowValidity, ATenantsErrorIsItsOwnLineOrItsPythonExceptionWithTheMpsLimitNamed) {
  EXPECT_EQ(tenantError("vm:1:1 WARN  shim: no daemon\nclient: bad shape\nmore\n"),
            "client: bad shape")
      << "stmux's own log lines are skipped";
  EXPECT_EQ(tenantError("Traceback (most recent call last):\n  File \"t.py\", line 3\n"
                        "ValueError: bad shape\n\n"),
            "ValueError: bad shape");
  const std::string refused = tenantError(
      "Traceback (most recent call last):\n  File \"t.py\"\nRuntimeError: CUDA "
      "error: CUDA-capable device(s) is/are busy or unavailable\n");
  EXPECT_EQ(refused.rfind("RuntimeError: CUDA error", 0), 0u) << refused;
  EXPECT_NE(refused.find("client limit"), std::string::npos) << refused;
  EXPECT_EQ(tenantError(""), "");
}

TEST(BarrierFiles, ResultsAndGoFilesRoundTripAndTruncatedOnesAreRefused) {
  testing::TempDir dir;
  TenantResult result;
  result.calls = 3;
  result.gemms_per_step = 32;
  result.last_end_ns = 123456789012345;
  result.latencies_ns = {10, 20, 4000000000u};
  const std::string path = dir.path() + "/lat0";
  ASSERT_TRUE(writeResult(path, result));
  const auto read = readResult(path);
  ASSERT_TRUE(read.has_value());
  EXPECT_EQ(read->calls, 3u);
  EXPECT_EQ(read->gemms_per_step, 32);
  EXPECT_EQ(read->last_end_ns, result.last_end_ns);
  EXPECT_EQ(read->latencies_ns, result.latencies_ns);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  ASSERT_TRUE(writeAtomically(path, "3 1 5\n10\n20\n"));  // one latency short
  EXPECT_FALSE(readResult(path).has_value());
  // The step that crossed the span's end comes last, timed but not counted.
  ASSERT_TRUE(writeAtomically(path, "2 1 5\n10\n20\n900\n"));
  const auto crossed = readResult(path);
  ASSERT_TRUE(crossed.has_value());
  EXPECT_EQ(crossed->calls, 2u);
  EXPECT_EQ(crossed->latencies_ns, (std::vector<std::uint32_t>{10, 20, 900}));
  EXPECT_FALSE(readResult(dir.path() + "/absent").has_value());

  const std::string go = dir.path() + "/go";
  ASSERT_TRUE(writeGo(go, kSpan));
  const auto span = readGo(go);
  ASSERT_TRUE(span.has_value());
  EXPECT_EQ(span->start_ns, kSpan.start_ns);
  EXPECT_EQ(span->stop_ns, kSpan.stop_ns);
  EXPECT_DOUBLE_EQ(span->seconds(), 2.0);
  ASSERT_TRUE(writeAtomically(go, "5 5\n"));  // an empty span
  EXPECT_FALSE(readGo(go).has_value());
}

// A tenant that ran `count` timed steps of `latency_ns` each, then the next group.
TenantOutcome steps(std::initializer_list<std::pair<std::uint32_t, std::uint32_t>> groups) {
  TenantResult result;
  for (const auto& [count, latency_ns] : groups)
    result.latencies_ns.insert(result.latencies_ns.end(), count, latency_ns);
  result.calls = result.latencies_ns.size();
  TenantOutcome outcome;
  outcome.exit_status = 0;
  outcome.result = result;
  return outcome;
}

::testing::AssertionResult sharesNear(const std::vector<double>& shares,
                                      const std::vector<double>& expected) {
  bool near = shares.size() == expected.size();
  for (std::size_t i = 0; near && i < shares.size(); ++i)
    near = std::abs(shares[i] - expected[i]) <= 2e-3;  // a step either side of a boundary
  if (near) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "shares " << ::testing::PrintToString(shares)
                                       << ", expected " << ::testing::PrintToString(expected);
}

TEST(RowWindows, ASteadyRowFallsEvenlyOverItsWindows) {
  // 1,000 steps of 2 ms fill kSpan's 2 s.
  const std::vector<TenantOutcome> steady = {steps({{1000, 2'000'000}})};
  EXPECT_TRUE(sharesNear(windowShares(steady, kSpan, 2), std::vector<double>{0.5, 0.5}));
  EXPECT_TRUE(
      sharesNear(windowShares(steady, kSpan, 4), std::vector<double>{0.25, 0.25, 0.25, 0.25}));
  // The loop between steps leaves out time (here 10% of the span): spread evenly.
  EXPECT_TRUE(sharesNear(windowShares({steps({{1000, 1'800'000}})}, kSpan, 2),
                         std::vector<double>{0.5, 0.5}));
}

TEST(RowWindows, ARowWhoseRateRoseShowsIt) {
  // 1 s of 2 ms steps, then 1 s of 1 ms steps: a third of them, then two.
  const TenantOutcome rising = steps({{500, 2'000'000}, {1000, 1'000'000}});
  EXPECT_TRUE(sharesNear(windowShares({rising}, kSpan, 2), std::vector<double>{1.0 / 3, 2.0 / 3}));
  // Beside a steady tenant of as many steps: (1/2 + 1/3) / 2 and (1/2 + 2/3) / 2.
  EXPECT_TRUE(sharesNear(windowShares({rising, steps({{1500, 1'333'333}})}, kSpan, 2),
                         std::vector<double>{5.0 / 12, 7.0 / 12}));
}

TEST(RowWindows, NoStepsLeaveEveryWindowEmpty) {
  EXPECT_TRUE(sharesNear(windowShares({steps({})}, kSpan, 3), std::vector<double>{0, 0, 0}));
  EXPECT_TRUE(sharesNear(windowShares({}, kSpan, 1), std::vector<double>{0}));
}

// One tenant's stall or everyone's: the tenants with a long step (a quarter
// of the longest at least) at the same time as the longest.
TEST(RowLongestStep, SaysWhoseItWasWhenAndWhoStalledWithIt) {
  // 0.9 s of 2 ms steps, one of 100 ms, 0.9 s more: it ends at 1.0 s of the
  // 1.9 s stepped, stretched to kSpan's 2 s.
  const TenantOutcome stalled = steps({{450, 2'000'000}, {1, 100'000'000}, {450, 2'000'000}});
  const TenantOutcome steady = steps({{1000, 2'000'000}});
  LongestStep longest = longestStep({steady, stalled}, kSpan);
  EXPECT_DOUBLE_EQ(longest.us, 100'000);
  EXPECT_EQ(longest.tenant, 1);
  EXPECT_NEAR(longest.at_s, 1.0 * 2 / 1.9, 1e-6);
  EXPECT_EQ(longest.together, 1) << "the steady tenant went on";
  // A 60 ms step over the same time counts; a 20 ms one (under a quarter)
  // and one elsewhere do not.
  const TenantOutcome with = steps({{470, 2'000'000}, {1, 60'000'000}, {440, 2'000'000}});
  const TenantOutcome short_one = steps({{470, 2'000'000}, {1, 20'000'000}, {460, 2'000'000}});
  const TenantOutcome elsewhere = steps({{10, 2'000'000}, {1, 90'000'000}, {900, 2'000'000}});
  longest = longestStep({steady, stalled, with, short_one, elsewhere}, kSpan);
  EXPECT_EQ(longest.tenant, 1);
  EXPECT_EQ(longest.together, 2);
  EXPECT_EQ(longestStep({}, kSpan).tenant, -1);
  EXPECT_EQ(longestStep({steps({})}, kSpan).us, 0);
}

}  // namespace
}  // namespace stmux::tools

namespace stmux::tools {
namespace {

// Nearest rank: with few samples a high percentile is their largest, never
// a value below the tail (p99 of {500 ms, 50 us} was 50 us by rounding down).
TEST(Percentiles, AreByNearestRankSoAFewSamplesTailIsTheirLargest) {
  EXPECT_DOUBLE_EQ(percentileUs({500'000'000, 50'000}, 0.99), 500'000);
  std::vector<std::uint32_t> fifty(49, 10'000);
  fifty.push_back(400'000'000);
  EXPECT_DOUBLE_EQ(percentileUs(fifty, 0.99), 400'000);
  EXPECT_DOUBLE_EQ(percentileUs(fifty, 0.50), 10);
  std::vector<std::uint32_t> hundred(100);
  for (std::uint32_t i = 0; i < 100; ++i)
    hundred[i] = (i + 1) * 1000;  // 1 to 100 us
  EXPECT_DOUBLE_EQ(percentileUs(hundred, 0.99), 99);
  EXPECT_DOUBLE_EQ(percentileUs(hundred, 0.50), 50);
  EXPECT_DOUBLE_EQ(percentileUs(hundred, 1.0), 100);
  EXPECT_DOUBLE_EQ(percentileUs({}, 0.99), 0);
}

}  // namespace
}  // namespace stmux::tools

namespace stmux::tools {
namespace {

Json statusWithSums(double launched, double batches, double wait_ns, double completed,
                    double launch_ns) {
  Json status;
  Json& gpu = status["gpus"].emplace_back();
  Json& sums = gpu["round_sums"] = Json::object();
  sums["launched"] = launched, sums["batches"] = batches, sums["wait_ns"] = wait_ns;
  sums["completed"] = completed, sums["launch_ns"] = launch_ns;
  sums["popped"] = 0, sums["ring_ns"] = 0;
  return status;
}

// The means between two status answers are the span's: the warm-up's small
// batches before it do not count.
TEST(RoundOverSpan, IsTheDifferenceOfTheDaemonsSumsAndCounts) {
  const Json before = statusWithSums(100, 100, 100 * 5'000, 100, 100 * 40'000);  // batches of 1
  const Json after = statusWithSums(100 + 3200, 100 + 200, 100 * 5'000 + 3200 * 20'000, 100 + 3200,
                                    100 * 40'000 + 3200 * 10'000);
  const auto r = roundOverSpan(before, after);
  ASSERT_TRUE(r.has_value());
  EXPECT_DOUBLE_EQ(r->mean_batch, 16);
  EXPECT_DOUBLE_EQ(r->batch_wait, 20);
  EXPECT_DOUBLE_EQ(r->launch, 10);
  EXPECT_DOUBLE_EQ(r->ring, -1) << "nothing popped in the span: not measured";
  // A daemon that restarted between them, or one that gives no sums.
  EXPECT_FALSE(roundOverSpan(after, before).has_value());
  EXPECT_FALSE(roundOverSpan(Json::object(), after).has_value());
}

// Where only one answer was read: the daemon's own means since it started.
TEST(RoundOverSpan, FallsBackToTheDaemonsWholeRunFromOneAnswer) {
  Json status;
  Json& gpu = status["gpus"].emplace_back();
  gpu["mean_batch"] = 9.5;
  gpu["round_us"] = {{"launch", 17.0}, {"gpu", 33.0}};
  const DaemonRound r = roundOverWholeRun(status);
  EXPECT_DOUBLE_EQ(r.mean_batch, 9.5);
  EXPECT_DOUBLE_EQ(r.launch, 17);
  EXPECT_DOUBLE_EQ(r.gpu, 33);
  EXPECT_DOUBLE_EQ(r.wake, -1) << "not in the answer: not measured";
}

}  // namespace
}  // namespace stmux::tools

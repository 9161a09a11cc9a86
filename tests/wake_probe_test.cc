// stmux-wake-probe (tools/wake_probe.cc): its rows and its flags. Its
// figures are timings, checked only where a step's own length bounds them.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>

#include "stmux/json.h"
#include "test_support.h"
#include "tools/process.h"

namespace stmux {
namespace {

using testing::TempDir;

// Each wait and slice asked for is a row, in order, and no process makes
// more steps than its work and wait leave room for.
TEST(WakeProbe, EveryWaitAndSliceIsARowAndNoStepIsShorterThanItsWorkAndWait) {
  TempDir dir;
  const std::string json = dir.path() + "/wake.json";
  const Ran ran =
      run({STMUX_WAKE_PROBE_PATH, "--procs", "3", "--work-us", "200", "--gpu-us", "300",
           "--seconds", "0.3", "--waits", "spin,yield,blocking", "--slice-us", "0", "--json", json},
          {}, dir.path() + "/probe");
  ASSERT_EQ(ran.status, 0) << ran.err;
  std::stringstream text;
  text << std::ifstream(json).rdbuf();
  const auto doc = parseJson(text.str(), "wake.json");
  ASSERT_TRUE(doc.ok()) << doc.message();
  const Json* rows = jsonFind(doc.value(), "rows");
  ASSERT_NE(rows, nullptr);
  ASSERT_EQ(rows->size(), 3u) << text.str();
  const char* waits[] = {"spin", "yield", "blocking"};
  for (std::size_t i = 0; i < 3; ++i) {
    const Json* row = jsonAt(rows, i);
    EXPECT_EQ(jsonString(jsonFind(row, "wait")), waits[i]);
    const double rate = jsonNumber(jsonFind(row, "steps_per_s"));
    EXPECT_GT(rate, 0) << waits[i];
    // 3 processes, each step at least 500 us: at most 6,000 steps a second.
    EXPECT_LE(rate, 6000) << waits[i];
    const Json* late = jsonFind(row, "late_us");
    EXPECT_LE(jsonNumber(jsonFind(late, "median_p50")), jsonNumber(jsonFind(late, "worst_p99")));
    EXPECT_LE(jsonNumber(jsonFind(late, "worst_p99")), jsonNumber(jsonFind(late, "worst_max")));
    EXPECT_NE(ran.out.find(waits[i]), std::string::npos) << ran.out;
  }
}

TEST(WakeProbe, ABadFlagIsNamedWithWhatIsAccepted) {
  TempDir dir;
  const struct {
    std::vector<std::string> args;
    std::string said;
  } cases[] = {
      {{"--waits", "spin,nap"}, "'nap' is not a wait; accepted: spin, yield, blocking"},
      {{"--slice-us", "0,50"}, "--slice-us '50': accepted: 0 (the kernel's) or 100 to 100000"},
      {{"--procs", "0"}, "--procs '0': accepted: an integer from 1 to 4096"},
      {{"--seconds", "x"}, "--seconds 'x': accepted: a number from 0.1 to 600"},
      {{"--gpu-us", "-1"}, "--gpu-us '-1': accepted: an integer from 1 to 1000000"},
      {{"extra"}, "unexpected argument 'extra'"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {STMUX_WAKE_PROBE_PATH};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    const Ran ran = run(argv, {}, dir.path() + "/bad");
    EXPECT_EQ(ran.status, 2) << c.said;
    EXPECT_NE(ran.err.find(c.said), std::string::npos) << ran.err;
  }
  const Ran help = run({STMUX_WAKE_PROBE_PATH, "--help"}, {}, dir.path() + "/help");
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("--slice-us"), std::string::npos) << help.out;
}

}  // namespace
}  // namespace stmux

// stmux-fault, the fault suite (tools/fault.cc): its flags on any machine
// (fault_test); its scenarios, shortened, on a GPU (fault_gpu_test, which
// skips saying so where there is none). docs/RELIABILITY.md has the full
// run's figures.
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

#ifndef STMUX_FAULT_ON_GPU

TEST(Fault, ABadFlagOrScenarioIsNamedWithWhatIsAccepted) {
  TempDir dir;
  const struct {
    std::vector<std::string> args;
    std::string said;
  } cases[] = {
      {{"--kills", "0"}, "--kills '0': accepted: a whole number from 1 to 100000"},
      {{"--restarts", "2.5"}, "--restarts '2.5': accepted: a whole number from 1 to 1000"},
      {{"--soak-seconds", "5"}, "--soak-seconds '5': accepted: seconds from 10 to 86400"},
      {{"--tenants", "x"}, "--tenants 'x': accepted: a whole number from 1 to 64"},
      {{"reboot"}, "scenario 'reboot': accepted: tenant-kills, daemon-kills, soak, dos"},
      {{"--client", dir.path() + "/none"}, "cannot find stmux-cublas-client (--client)"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {STMUX_FAULT_PATH};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    const Ran ran = run(argv, {}, dir.path() + "/bad");
    EXPECT_EQ(ran.status, 2) << c.said;
    EXPECT_NE(ran.err.find(c.said), std::string::npos) << ran.err;
  }
  const Ran help = run({STMUX_FAULT_PATH, "--help"}, {}, dir.path() + "/help");
  EXPECT_EQ(help.status, 0);
  for (const char* scenario : {"tenant-kills", "daemon-kills", "soak", "dos"})
    EXPECT_NE(help.out.find(scenario), std::string::npos) << help.out;
}

#else

// Every scenario, shortened: what the suite finds wrong fails it.
TEST(FaultOnGpu, EveryScenarioShortenedPasses) {
  TempDir dir;
  const Ran ran = run({STMUX_FAULT_PATH, "--kills", "12", "--restarts", "2", "--soak-seconds", "20",
                       "--dos-seconds", "3", "--out", dir.path() + "/out"},
                      {}, dir.path() + "/fault", std::chrono::seconds(600));
  if (ran.status == 3) GTEST_SKIP() << "GPU test skipped: " << ran.err;
  EXPECT_EQ(ran.status, 0) << ran.out << ran.err;
  std::cout << ran.out;
  std::ifstream in(dir.path() + "/out/fault.json");
  std::stringstream text;
  text << in.rdbuf();
  auto json = parseJson(text.str(), "fault.json");
  ASSERT_TRUE(json.ok()) << json.message();
  const Json& scenarios = json.value()["scenarios"];
  ASSERT_EQ(scenarios.size(), 4u);
  for (const Json& s : scenarios)
    EXPECT_TRUE(s["passed"].get<bool>()) << s.dump();
  EXPECT_EQ(scenarios[0]["figures"]["killed"].get<int>(), 12);
}

#endif

}  // namespace
}  // namespace stmux

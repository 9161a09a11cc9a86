// stmux-fault, the fault suite (tools/fault.cc): its flags on any machine
// (fault_test); its scenarios, shortened, on a GPU (fault_gpu_test, which
// skips saying so where there is none). docs/RELIABILITY.md has the full
// run's figures.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
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
      {{"--client", dir.path() + "/none"},
       "stmux-cublas-client (--client): " + dir.path() + "/none does not exist"},
      {{"--raw-client", dir.path() + "/none"},
       "stmux-ipc-client (--raw-client): " + dir.path() + "/none does not exist"},
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

// --out names a folder of the user's: only an earlier run's files there are
// replaced (it was emptied whole: `--out ~` would have emptied a home).
TEST(Fault, OnlyAnEarlierRunsFilesAreReplacedInTheOutFolder) {
  TempDir dir;
  const std::string out = dir.path() + "/out";
  std::filesystem::create_directories(out + "/soak");
  std::ofstream(out + "/notes.txt") << "mine\n";
  std::ofstream(out + "/fault.json") << "{}\n";
  std::ofstream(out + "/soak/old.log") << "old\n";
  // A client that finds no GPU (here or on one) stops it at the device
  // probe, which comes after the clearing.
  const Ran ran = run({STMUX_FAULT_PATH, "--client", "/bin/false", "--out", out, "soak"}, {},
                      dir.path() + "/run");
  EXPECT_EQ(ran.status, 3) << ran.err;
  EXPECT_TRUE(std::filesystem::exists(out + "/notes.txt")) << "a file of the user's was removed";
  EXPECT_FALSE(std::filesystem::exists(out + "/soak/old.log")) << "an earlier run's log stayed";
  const std::string file = dir.path() + "/a-file";
  std::ofstream(file) << "x\n";
  const Ran onto_file = run({STMUX_FAULT_PATH, "--out", file}, {}, dir.path() + "/file");
  EXPECT_EQ(onto_file.status, 2);
  EXPECT_NE(onto_file.err.find("cannot make " + file + " a folder for the logs (--out)"),
            std::string::npos)
      << onto_file.err;
}

#else

// Every scenario, shortened: what the suite finds wrong fails it.
TEST(FaultOnGpu, EveryScenarioShortenedPasses) {
  TempDir dir;
  // Searchable by others, as a folder of logs usually is: dos's last phase
  // runs its flooders as uid 65534 (when root), who must reach the socket.
  std::filesystem::permissions(dir.path(), std::filesystem::perms::others_exec,
                               std::filesystem::perm_options::add);
  const Ran ran = run({STMUX_FAULT_PATH, "--kills", "12", "--restarts", "2", "--soak-seconds", "20",
                       "--dos-seconds", "3", "--out", dir.path() + "/out"},
                      {}, dir.path() + "/fault", std::chrono::seconds(600));
  // 3 is any failure of its device probe too: only the want of a device skips.
  if (ran.status == 3 && ran.err.find("no CUDA device") != std::string::npos) {
    GTEST_SKIP() << "GPU test skipped: " << ran.err;
  }
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
  // dos's flooders of another user run wherever root can make them and that
  // user can reach the GPU: the folders on the way are open (above).
  for (const Json& s : scenarios) {
    if (s["scenario"].get<std::string>() != "dos" || ::geteuid() != 0) continue;
    const Json* phases = jsonFind(jsonFind(&s, "figures"), "phases");
    ASSERT_TRUE(phases != nullptr && phases->is_array() && !phases->empty()) << s.dump();
    const Json& last = phases->back();
    EXPECT_EQ(last["phase"].get<std::string>(), "garbage-handles-16-other-user");
    if (last.contains("not_run")) {
      EXPECT_NE(last["not_run"].get<std::string>().find("cannot run the client on the GPU"),
                std::string::npos)
          << last.dump();
    }
  }
}

#endif

}  // namespace
}  // namespace stmux

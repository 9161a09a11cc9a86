// stmuxd as a program: what it says and how it exits when it cannot run, and
// its configuration surface. No GPU needed: CUDA_VISIBLE_DEVICES="" hides any
// GPU the machine has.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>

#include "stmux/config.h"
#include "test_support.h"
#include "tools/process.h"

namespace stmux {
namespace {

using testing::TempDir;

Ran stmuxd(const TempDir& dir, std::vector<std::string> args,
           std::map<std::string, std::string> env = {}) {
  args.insert(args.begin(), STMUXD_PATH);
  return run(args, env, dir.path() + "/stmuxd", std::chrono::seconds(60));
}

TEST(Stmuxd, WithoutAGpuItExitsNonZeroSayingSo) {
  TempDir dir;
  auto ran = stmuxd(dir, {"--socket", dir.socket()}, {{"CUDA_VISIBLE_DEVICES", ""}});
  EXPECT_EQ(ran.status, 1) << ran.err;
  EXPECT_NE(ran.err.find("stmuxd: no usable CUDA device or driver"), std::string::npos) << ran.err;
  // Where there is no driver at all, it says so, not that the driver is old.
  if (void* driver = ::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL); driver != nullptr) {
    ::dlclose(driver);
  } else {
    EXPECT_NE(ran.err.find("no NVIDIA driver is installed (libcuda.so.1 not found)"),
              std::string::npos)
        << ran.err;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.socket())) << "it listened without a GPU";
}

TEST(Stmuxd, AnInvalidValueIsAnErrorThatNamesIt) {
  TempDir dir;
  auto ran = stmuxd(dir, {}, {{"STMUX_WINDOW_US", "-1"}});
  EXPECT_EQ(ran.status, 2);
  // On one line, for whoever keeps only the first (stmux-bench's notes).
  EXPECT_NE(ran.err.find("stmuxd: invalid configuration: STMUX_WINDOW_US='-1' is out of range; "
                         "accepted: an integer from 0 to 1000000 (us)"),
            std::string::npos)
      << ran.err;
  // A value from a flag: the error names the flag as it was typed.
  ran = stmuxd(dir, {"--max-batch=lots", "--log", "loud"}, {{"STMUX_WINDOW_US", "x"}});
  EXPECT_EQ(ran.status, 2);
  EXPECT_NE(ran.err.find("--max-batch='lots' is not an integer"), std::string::npos) << ran.err;
  EXPECT_NE(ran.err.find("--log='loud' is invalid"), std::string::npos) << ran.err;
  EXPECT_NE(ran.err.find("STMUX_WINDOW_US='x' is not an integer"), std::string::npos) << ran.err;
  // Every level is among those it says it accepts.
  EXPECT_NE(ran.err.find("LEVEL one of off|error|warn|info|debug|trace"), std::string::npos)
      << ran.err;
}

// A tenant's setting in the daemon's environment changes nothing: said so.
TEST(Stmuxd, ATenantsSettingInItsEnvironmentIsNamedAsIgnored) {
  TempDir dir;
  const auto ran = stmuxd(dir, {"--print-config"}, {{"STMUX_ROUTE", "serve"}});
  EXPECT_EQ(ran.status, 0) << ran.err;
  EXPECT_NE(ran.err.find("STMUX_ROUTE is read by libstmux.so in each tenant, not by stmuxd"),
            std::string::npos)
      << ran.err;
}

// A tenant's precision variable in the daemon's environment would set the
// precision of every tenant's calls, had cuBLAS read it as it loaded:
// stmuxd clears it and starts again, so that none of its libraries sees it.
TEST(Stmuxd, APrecisionVariableIsClearedBeforeAnyLibrarySeesIt) {
  TempDir dir;
  const std::string probed = dir.path() + "/probed";
  const auto ran = stmuxd(dir, {"--print-config"},
                          {{"NVIDIA_TF32_OVERRIDE", "0"},
                           {"LD_PRELOAD", ENV_PROBE_PATH},
                           {"ENV_PROBE_NAME", "NVIDIA_TF32_OVERRIDE"},
                           {"ENV_PROBE_FILE", probed}});
  EXPECT_EQ(ran.status, 0) << ran.err;
  const std::string warning =
      "NVIDIA_TF32_OVERRIDE=0 is ignored: each tenant's own environment sets its precision";
  EXPECT_EQ(countOf(ran.err, warning), 1) << ran.err;
  std::ifstream in(probed);
  const std::string seen((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(seen, "0\nunset\n") << "as each image of stmuxd started";
  EXPECT_NE(ran.out.find("\nSTMUX_SLOTS=256\n"), std::string::npos) << "the same run went on";
}

TEST(Stmuxd, UnknownOptionsAreRefused) {
  TempDir dir;
  auto ran = stmuxd(dir, {"--frobnicate"});
  EXPECT_EQ(ran.status, 2);
  EXPECT_NE(ran.err.find("unknown option '--frobnicate'"), std::string::npos) << ran.err;
  // A shim-only variable has no daemon flag.
  ran = stmuxd(dir, {"--spin-us=5"});
  EXPECT_EQ(ran.status, 2);
  ran = stmuxd(dir, {"--window-us"});
  EXPECT_EQ(ran.status, 2);
  EXPECT_NE(ran.err.find("--window-us needs a value"), std::string::npos) << ran.err;
}

TEST(Stmuxd, PrintConfigShowsEveryDaemonSettingAndWhereItCameFrom) {
  TempDir dir;
  auto ran = stmuxd(dir, {"--print-config", "--window-us", "250"}, {{"STMUX_MAX_BATCH", "64"}});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_NE(ran.out.find("# STMUX_WINDOW_US (flag): "), std::string::npos) << ran.out;
  EXPECT_NE(ran.out.find("\nSTMUX_WINDOW_US=250\n"), std::string::npos) << ran.out;
  EXPECT_NE(ran.out.find("# STMUX_MAX_BATCH (environment): "), std::string::npos) << ran.out;
  EXPECT_NE(ran.out.find("\nSTMUX_MAX_BATCH=64\n"), std::string::npos) << ran.out;
  EXPECT_NE(ran.out.find("# STMUX_SLOTS (default): "), std::string::npos) << ran.out;
  EXPECT_NE(ran.out.find("\nSTMUX_SLOTS=256\n"), std::string::npos) << ran.out;
  for (const VarInfo& var : kVars) {
    // A line of its own (another's help may name it).
    const bool listed =
        ("\n" + ran.out).find("\n" + std::string(var.name) + "=") != std::string::npos;
    EXPECT_EQ(listed, var.scope != Scope::kShim) << var.name;
  }
}

// The output is an environment file: read back as one (each line
// VAR=VALUE or a comment, as systemd's EnvironmentFile= reads it), it gives
// the daemon the same settings, now from its environment. A comment after the
// value made every setting invalid (or part of the socket's path).
TEST(Stmuxd, PrintConfigIsAnEnvironmentFileTheDaemonTakes) {
  TempDir dir;
  const auto first = stmuxd(dir, {"--print-config", "--window-us", "250"});
  ASSERT_EQ(first.status, 0) << first.err;
  std::map<std::string, std::string> env;
  std::istringstream lines(first.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    const std::size_t equals = line.find('=');
    ASSERT_NE(equals, std::string::npos) << "not VAR=VALUE: " << line;
    env[line.substr(0, equals)] = line.substr(equals + 1);
  }
  EXPECT_EQ(env["STMUX_WINDOW_US"], "250");
  const auto again = stmuxd(dir, {"--print-config"}, env);
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_NE(again.out.find("# STMUX_WINDOW_US (environment): "), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("\nSTMUX_WINDOW_US=250\n"), std::string::npos) << again.out;
}

// A metrics file that cannot be written (its folder missing, its name too
// long for the temporary beside it) failed a warning a minute for ever; at
// the socket's path its rename would take the socket's name away.
TEST(Stmuxd, AMetricsFileItCannotWriteIsAnErrorAtStart) {
  TempDir dir;
  auto ran = stmuxd(dir, {"--socket", dir.socket()},
                    {{"STMUX_METRICS_FILE", dir.path() + "/missing/stmuxd.prom"}});
  EXPECT_EQ(ran.status, 1) << ran.err;
  EXPECT_NE(ran.err.find("stmuxd: STMUX_METRICS_FILE: cannot create " + dir.path() +
                         "/missing/stmuxd.prom.tmp"),
            std::string::npos)
      << ran.err;
  ran = stmuxd(dir, {"--socket", dir.socket()},
               {{"STMUX_METRICS_FILE", dir.path() + "/" + std::string(253, 'm')}});
  EXPECT_EQ(ran.status, 1) << ran.err;
  EXPECT_NE(ran.err.find("File name too long"), std::string::npos) << ran.err;
  ran = stmuxd(dir, {"--socket", dir.socket()}, {{"STMUX_METRICS_FILE", dir.socket()}});
  EXPECT_EQ(ran.status, 2) << ran.err;
  EXPECT_NE(ran.err.find("STMUX_METRICS_FILE and STMUX_SOCKET are both"), std::string::npos)
      << ran.err;
}

// More clients than the descriptor limit allows (2 each) is said at start:
// past it, tenants' attaches time out and they run directly.
TEST(Stmuxd, ClientsBeyondTheDescriptorLimitAreForetold) {
  TempDir dir;
  rlimit before{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &before), 0);
  rlimit lowered = before;
  lowered.rlim_cur = 512;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &lowered), 0);
  const auto ran = stmuxd(dir, {"--socket", dir.socket()}, {{"STMUX_MAX_CLIENTS", "1024"}});
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &before), 0);
  EXPECT_NE(ran.err.find("STMUX_MAX_CLIENTS=1024 needs about 2112 file descriptors (2 a client), "
                         "but the limit is 512 (LimitNOFILE=): tenants past about 224 clients"),
            std::string::npos)
      << ran.err;
}

TEST(Stmuxd, HelpListsTheFlags) {
  TempDir dir;
  auto ran = stmuxd(dir, {"--help"});
  EXPECT_EQ(ran.status, 0);
  for (const VarInfo& var : kVars) {
    if (var.scope == Scope::kShim) continue;
    EXPECT_NE(ran.out.find("--" + flagName(var.name)), std::string::npos) << var.name;
  }
}

// The report a test prints for a process that should have ended: each of
// its threads, by name and state (the stacks too, where a debugger is).
TEST(Process, AStuckProcessIsDescribedThreadByThread) {
  TempDir dir;
  Process sleeper({"/bin/sleep", "30"}, {}, dir.path() + "/sleeper");
  ASSERT_TRUE(sleeper.started());
  EXPECT_EQ(sleeper.wait(std::chrono::milliseconds(100)), -1);
  const std::string report = sleeper.stuckReport();
  EXPECT_NE(report.find("threads of pid " + std::to_string(sleeper.pid())), std::string::npos)
      << report;
  EXPECT_NE(report.find(" sleep S "), std::string::npos) << "the sleeping thread: " << report;
  sleeper.signal(SIGKILL);
  EXPECT_EQ(sleeper.wait(), 128 + SIGKILL);
  EXPECT_EQ(sleeper.stuckReport(), "(not running)\n");
}

}  // namespace
}  // namespace stmux

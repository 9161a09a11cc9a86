// libstmux.so in front of an ordinary cuBLAS program (stmux-cublas-client),
// with the real daemon on a GPU: the same results as without it, served by
// the daemon, at 64 processes, and through the daemon's death and return;
// the calls it must leave to cuBLAS; many threads of one process; fork; and
// memory an idle tenant frees leaving the daemon. Skipped, saying so, where
// there is no CUDA device.
#include <cstdlib>
#include <filesystem>
#include <regex>

#include "gpu_fixture.h"
#include "shim_stats.h"
#include "tools/barrier.h"

namespace stmux {
namespace {

using testing::daemonStatus;
using testing::gpuField;
using testing::outValue;
using testing::shimStats;
using testing::ShimStats;
using testing::shimStatsOf;

class ShimOnGpu : public testing::DaemonFixture {
 protected:
  // STMUX_ROUTE=serve: these tests count what the daemon serves, and a lone
  // tenant off MPS may measure itself faster direct under auto.
  std::map<std::string, std::string> shimmed() const {
    return {{"LD_PRELOAD", SHIM_PATH},
            {"STMUX_SOCKET", dir_.socket()},
            {"STMUX_LOG", "stats=info"},
            {"STMUX_ROUTE", "serve"}};
  }
  Process client(const std::vector<std::string>& args, std::map<std::string, std::string> env,
                 const std::string& log) {
    std::vector<std::string> argv = {CUBLAS_CLIENT_PATH};
    argv.insert(argv.end(), args.begin(), args.end());
    return Process(argv, env, dir_.path() + "/" + log);
  }

  // The daemon ended by `signal` while a call it started runs on its GPU (a
  // 32768^3 GEMM, about a second), in each mode, the daemon restarted after
  // each: the call comes back right, and C, zeroed by the program once it
  // came back, stays zero for 3 s. SIGKILL: the call is run again once the
  // daemon's process has ended, and nothing of the dead daemon's launch
  // writes C later (a late write within the call's run again would be
  // overwritten by it: this catches one that comes later). SIGTERM: the
  // daemon drains, so the call is served.
  void endTheDaemonDuringACall(const std::map<std::string, std::string>& extra_env, int signal) {
    for (const std::string mode : {"host", "stream"}) {
      SCOPED_TRACE("STMUX_MODE=" + mode + ", signal " + std::to_string(signal));
      std::map<std::string, std::string> env = extra_env;
      env.merge(shimmed());
      env["STMUX_MODE"] = mode;
      env["STMUX_TIMEOUT_MS"] = "30000";
      Process c =
          client({"outlive", "--m", "32768", "--n", "32768", "--k", "32768", "--seconds", "3"}, env,
                 "outlive-" + mode);
      // Ended once its batch is launched (its memory opened, the launch
      // handed to the GPU), and a little after: in the GPU's hands.
      const auto launched = [&] {
        const auto status = daemonStatus(dir_.socket());
        if (!status) return false;
        const Json* sums = jsonFind(jsonAt(jsonFind(*status, "gpus"), 0), "round_sums");
        return jsonNumber(jsonFind(sums, "launched"), 0) >
               jsonNumber(jsonFind(sums, "completed"), 0);
      };
      ASSERT_TRUE(testing::waitFor(launched, std::chrono::seconds(120))) << c.out() << c.err();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      const auto sent = std::chrono::steady_clock::now();
      daemon_.signal(signal);
      ASSERT_EQ(daemon_.wait(std::chrono::seconds(60)), signal == SIGKILL ? 128 + SIGKILL : 0)
          << daemon_.err();
      std::cout << "STMUX_MODE=" << mode << ": stmuxd ended "
                << std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::steady_clock::now() - sent)
                       .count()
                << " ms after its signal " << signal << std::endl;
      ASSERT_EQ(c.wait(std::chrono::seconds(120)), 0) << c.out() << c.err();
      EXPECT_EQ(outValue(c.out(), "result_ok"), 1) << c.out();
      EXPECT_EQ(outValue(c.out(), "late_written"), 0)
          << "the daemon's launch wrote C after the call came back: " << c.out();
      const ShimStats stats = shimStats(c.err());
      if (signal == SIGKILL) {
        const auto lost = stats.direct.find("daemon_lost");
        EXPECT_EQ(lost != stats.direct.end() ? lost->second : 0, 1)
            << "the call was not counted run again for a lost daemon: " << c.err();
      } else {
        EXPECT_EQ(stats.served, 1) << "the draining daemon did not serve it: " << c.err();
        EXPECT_TRUE(stats.direct.empty()) << c.err();
      }
      std::cout << c.out();
      startDaemon();
    }
  }
};

TEST_F(ShimOnGpu, TheSameResultsWithAndWithoutThePreloadAndTheDaemonServedThem) {
  Process plain = client({"check"}, {}, "plain");
  ASSERT_EQ(plain.wait(), 0) << plain.out() << plain.err();
  // In both modes: host (the default) and stream-ordered.
  for (const std::string mode : {"host", "stream"}) {
    SCOPED_TRACE("STMUX_MODE=" + mode);
    auto env = shimmed();
    env["STMUX_MODE"] = mode;
    Process shim = client({"check"}, env, "shimmed-" + mode);
    ASSERT_EQ(shim.wait(), 0) << shim.out() << shim.err();
    EXPECT_EQ(countOf(shim.out(), "FAIL"), 0) << shim.out();
    EXPECT_NE(shim.out().find("realloc same_address"), std::string::npos);
    EXPECT_GT(outValue(shim.out(), "strided batches"), 0) << shim.out();

    // Every call is accounted for: the daemon served all but the no-ops, the
    // call cuBLAS refuses, legacy calls with beta != 0 (DESIGN: a legacy
    // call has no status to report a lost call with) and calls with alpha 0
    // (only C is scaled: left to cuBLAS, ARCHITECTURE.md).
    const ShimStats stats = shimStats(shim.err());
    const long calls = outValue(shim.out(), "calls");
    const long no_op = outValue(shim.out(), "no_op");
    const long refused = outValue(shim.out(), "refused");
    const long legacy = outValue(shim.out(), "legacy_nonzero_beta");
    const long alpha_zero = outValue(shim.out(), "alpha_zero");
    ASSERT_GE(stats.calls, 0) << "no stats line:\n" << shim.err();
    ASSERT_GT(alpha_zero, 0) << "the case matrix has calls with alpha 0:\n" << shim.out();
    EXPECT_EQ(stats.calls, calls);
    EXPECT_EQ(stats.failed, 0);
    EXPECT_EQ(stats.served, calls - no_op - refused - legacy - alpha_zero) << shim.err();
    EXPECT_EQ(stats.direct, (std::map<std::string, long>{{"no_op", no_op},
                                                         {"invalid_args", refused},
                                                         {"legacy_beta", legacy},
                                                         {"unserved_form", alpha_zero}}))
        << shim.err();
    // Counted by entry point too: the client's strided batches, all served
    // but the no-ops among them.
    ASSERT_EQ(stats.entries.count("strided_batched"), 1u) << shim.err();
    EXPECT_EQ(stats.entries.at("strided_batched").calls, outValue(shim.out(), "strided batches"));
    EXPECT_EQ(stats.entries.at("strided_batched").failed, 0);
    EXPECT_GT(stats.entries.at("strided_batched").served, 0);
    long entry_calls = 0;
    for (const auto& [name, entry] : stats.entries)
      entry_calls += entry.calls;
    EXPECT_EQ(entry_calls, stats.calls) << shim.err();
    auto status = daemonStatus(dir_.socket());
    ASSERT_TRUE(status.has_value());
    EXPECT_GE(gpuField(*status, "requests"), stats.served);
  }
}

// An unmodified PyTorch process: its GEMM operators and a small transformer
// encoder layer, TF32 off and on, give results as right under the preload
// as without it (tests/torch_fidelity.py checks each against float64), and
// reach stmuxd through the entry points PyTorch uses for them: mm and
// F.linear without a bias sgemm, bmm strided_batched, mv gemv, addmm with a
// bias and nn.Linear with one lt_matmul, every such call served. Skipped where
// PyTorch with CUDA is not installed.
TEST_F(ShimOnGpu, PyTorchsGemmOperatorsAreRightAndServedThroughTheirEntryPoints) {
  Process plain({"python3", TORCH_FIDELITY_PATH}, {}, dir_.path() + "/torch-plain");
  if (!plain.started()) GTEST_SKIP() << "GPU test skipped: no python3 in PATH";
  const int plain_status = plain.wait();
  if (plain_status == 77) GTEST_SKIP() << "GPU test skipped: " << plain.out();
  ASSERT_EQ(plain_status, 0) << plain.out() << plain.err();
  Process torch({"python3", TORCH_FIDELITY_PATH}, shimmed(), dir_.path() + "/torch");
  ASSERT_EQ(torch.wait(), 0) << torch.out() << torch.err();
  EXPECT_EQ(countOf(torch.out(), "FAIL"), 0) << torch.out();
  EXPECT_GT(outValue(torch.out(), "ops"), 0) << torch.out();
  const ShimStats stats = shimStats(torch.err());
  ASSERT_GE(stats.calls, 0) << "no stats line:\n" << torch.err();
  EXPECT_EQ(stats.failed, 0);
  for (const char* entry : {"sgemm", "strided_batched", "gemv", "lt_matmul"}) {
    ASSERT_EQ(stats.entries.count(entry), 1u) << entry << " never called:\n" << torch.err();
    EXPECT_EQ(stats.entries.at(entry).served, stats.entries.at(entry).calls) << entry << ":\n"
                                                                             << torch.err();
  }
  for (const auto& [name, entry] : stats.entries)
    EXPECT_EQ(entry.failed, 0) << name << ":\n" << torch.err();
}

TEST_F(ShimOnGpu, SixtyFourProcessesAtOnce) {
  std::vector<Process> clients;
  for (int i = 0; i < 64; ++i) {
    clients.push_back(
        client({"check", "--quick", "--api", "v2"}, shimmed(), "c" + std::to_string(i)));
  }
  for (Process& c : clients) {
    ASSERT_EQ(c.wait(std::chrono::seconds(600)), 0) << c.out() << c.err();
    const ShimStats stats = shimStats(c.err());
    EXPECT_GT(stats.served, 0) << c.err();
    EXPECT_EQ(stats.failed, 0) << c.err();
    EXPECT_EQ(stats.direct.count("no_daemon") + stats.direct.count("busy") +
                  stats.direct.count("timeout"),
              0u)
        << c.err();
  }
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_LT(gpuField(*status, "batches"), gpuField(*status, "requests"))
      << "64 processes and never two calls in one batch";
}

TEST_F(ShimOnGpu, ADaemonKilledMidRunLeavesNoCallerHangingOrWrongAndTheyComeBack) {
  std::vector<Process> clients;
  for (int i = 0; i < 8; ++i) {
    const std::string beta = i % 2 == 0 ? "0" : "0.5";
    clients.push_back(client({"stress", "--seconds", "12", "--beta", beta}, shimmed(),
                             "stress" + std::to_string(i)));
  }
  std::this_thread::sleep_for(std::chrono::seconds(3));
  daemon_.signal(SIGKILL);
  ASSERT_EQ(daemon_.wait(std::chrono::seconds(30)), 128 + SIGKILL);
  std::this_thread::sleep_for(std::chrono::seconds(2));
  startDaemon();  // the stale socket file is replaced
  // The clients attach again on their own and are served.
  ASSERT_TRUE(testing::waitFor(
      [&] {
        auto status = daemonStatus(dir_.socket());
        return status && status->at("clients").size() > 0 && gpuField(*status, "requests") > 0;
      },
      std::chrono::seconds(5)))
      << "no client came back to the restarted daemon";
  for (int i = 0; i < 8; ++i) {
    Process& c = clients[i];
    ASSERT_EQ(c.wait(std::chrono::seconds(120)), 0) << "stress " << i << ": " << c.out() << c.err();
    EXPECT_EQ(outValue(c.out(), "wrong"), 0) << c.out();
    if (i % 2 == 0) {
      EXPECT_EQ(outValue(c.out(), "execution_failed"), 0) << "beta == 0: " << c.out();
    }
    EXPECT_GE(countOf(c.err(), "detached from stmuxd") + countOf(c.err(), "lost the daemon"), 1)
        << "stress " << i << " never noticed the daemon go: " << c.err();
  }
}

// STMUX_LAUNCH_GRAPHS=on: processes calling one shape make batches whose
// launches recur, which the daemon captures as graphs and replays; every
// result right (beta != 0: C is read as well), and the replays happened.
class ShimOnGpuWithGraphs : public ShimOnGpu {
 protected:
  std::map<std::string, std::string> daemonEnv() const override {
    return {{"STMUX_LAUNCH_GRAPHS", "on"}};
  }
};

TEST_F(ShimOnGpuWithGraphs, ReplayedBatchesComeOutRight) {
  std::vector<Process> clients;
  for (int i = 0; i < 16; ++i) {
    clients.push_back(client({"stress", "--same-shape", "--m", "64", "--n", "48", "--k", "80",
                              "--seconds", "4", "--beta", "0.5"},
                             shimmed(), "graphs" + std::to_string(i)));
  }
  for (Process& c : clients) {
    ASSERT_EQ(c.wait(std::chrono::seconds(120)), 0) << c.out() << c.err();
    EXPECT_EQ(outValue(c.out(), "wrong"), 0) << c.out();
    EXPECT_EQ(outValue(c.out(), "other"), 0) << c.out();
    EXPECT_GT(outValue(c.out(), "ok"), 0) << c.out();
    EXPECT_GT(shimStats(c.err()).served, 0) << c.err();
  }
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_GT(gpuField(*status, "graph_captures"), 0) << dumpJson(*status);
  EXPECT_GT(gpuField(*status, "graph_launches"), gpuField(*status, "graph_captures"))
      << "captured graphs were never replayed: " << dumpJson(*status);
  const Json* broken = jsonFind(jsonAt(jsonFind(*status, "gpus"), 0), "broken");
  ASSERT_NE(broken, nullptr);
  EXPECT_FALSE(jsonBool(broken, true)) << "the daemon lost its GPU";
}

// Graph capture (in cudaStreamCaptureModeGlobal, one capture held open while
// the shim's sweeper runs: a capture it disturbed would fail to end, exit 3),
// calls while another thread captures a blocking stream (a served call waits
// for the legacy stream, which would invalidate that capture: exit 3), device
// pointer mode, pool and managed memory: each result right, each call counted
// under its reason, and the plain calls beside them served.
TEST_F(ShimOnGpu, CallsItMustNotForwardGoToCublasAndComeOutRight) {
  Process c = client({"paths"}, shimmed(), "paths");
  ASSERT_EQ(c.wait(), 0) << c.out() << c.err();
  EXPECT_EQ(countOf(c.out(), "FAIL"), 0) << c.out();
  const long per_path = outValue(c.out(), "per_path");
  ASSERT_GT(per_path, 0) << c.out();
  const ShimStats stats = shimStats(c.err());
  EXPECT_EQ(stats.served, outValue(c.out(), "plain_calls"))
      << "the plain calls beside them: " << c.err();
  EXPECT_EQ(stats.failed, 0);
  // Pool and managed memory cannot be exported with an IPC handle.
  EXPECT_EQ(stats.direct, (std::map<std::string, long>{{"device_pointer_mode", per_path},
                                                       {"graph_capture", 3 * per_path},
                                                       {"not_exportable", 2 * per_path}}))
      << c.err();
}

TEST_F(ShimOnGpu, ManyThreadsOfOneProcessCallAtOnce) {
  Process c =
      client({"stress", "--threads", "8", "--seconds", "4", "--beta", "0.5"}, shimmed(), "threads");
  ASSERT_EQ(c.wait(), 0) << c.out() << c.err();
  EXPECT_EQ(outValue(c.out(), "wrong"), 0) << c.out();
  const long ok = outValue(c.out(), "ok");
  EXPECT_GT(ok, 8) << c.out();
  const ShimStats stats = shimStats(c.err());
  EXPECT_EQ(stats.calls, ok) << c.err();
  EXPECT_EQ(stats.failed, 0) << c.err();
  // The threads' first calls come at once: those that arrive while one
  // thread attaches wait for it, so a running daemon serves every call.
  EXPECT_EQ(stats.served, ok) << c.err();
  EXPECT_TRUE(stats.direct.empty()) << c.err();
}

// Threads of one process adding into one C on one stream: cuBLAS runs
// their calls one after the other, and so must stmux, though it receives
// them at once. In one batched launch both would read the old C
// (BatcherTest covers the batcher's rule; this, the whole path).
TEST_F(ShimOnGpu, ThreadsAddingIntoOneCOnOneStreamLoseNoUpdate) {
  const std::vector<std::string> args = {"accumulate", "--threads", "4", "--count", "300"};
  Process plain = client(args, {}, "accumulate-plain");
  ASSERT_EQ(plain.wait(), 0) << plain.out() << plain.err();
  Process c = client(args, shimmed(), "accumulate");
  ASSERT_EQ(c.wait(), 0) << c.out() << c.err();
  EXPECT_EQ(outValue(c.out(), "wrong"), 0) << c.out();
  const ShimStats stats = shimStats(c.err());
  EXPECT_EQ(stats.served, 1200) << c.err();
  // The daemon did get calls of two threads at once, and kept them apart.
  const auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_GT(gpuField(*status, "held_for_hazard"), 0);
}

TEST_F(ShimOnGpu, ForkedChildrenAttachOnTheirOwnAndLeaveTheParentsConnectionAlone) {
  Process c = client({"fork"}, shimmed(), "fork");
  ASSERT_EQ(c.wait(), 0) << c.out() << c.err();
  EXPECT_EQ(countOf(c.out(), "FAIL"), 0) << c.out();
  // Children forked before the parent used CUDA: served on connections of
  // their own (the shim was loaded in the parent already).
  const std::regex early("early_child ([0-9]+) failures 0");
  int children = 0;
  const std::string out = c.out();
  for (auto it = std::sregex_iterator(out.begin(), out.end(), early); it != std::sregex_iterator();
       ++it, ++children) {
    const ShimStats stats = shimStatsOf(c.err(), std::stol((*it)[1]));
    EXPECT_EQ(stats.served, 6) << (*it)[0] << "\n" << c.err();
    EXPECT_TRUE(stats.direct.empty()) << (*it)[0] << "\n" << c.err();
  }
  EXPECT_EQ(children, 2) << out;
  // A child forked after the parent attached makes no call and says nothing;
  // its exit does not detach the parent, whose calls go on being served.
  const long parent = outValue(out, "parent");
  const long late = outValue(out, "late_child");
  ASSERT_GT(parent, 0) << out;
  ASSERT_GT(late, 0) << out;
  EXPECT_EQ(shimStatsOf(c.err(), late).calls, -1) << c.err();
  const ShimStats stats = shimStatsOf(c.err(), parent);
  EXPECT_EQ(stats.served, 12) << c.err();
  EXPECT_EQ(stats.failed, 0) << c.err();
  EXPECT_EQ(stats.direct, (std::map<std::string, long>{{"bad_handle", 1}})) << c.err();
  EXPECT_EQ(countOf(c.err(), "detached from stmuxd") + countOf(c.err(), "lost the daemon"), 0)
      << c.err();
}

// cudaDeviceReset, then a new handle, three times: the context made next may
// come back under the old one's handle, and stream-ordered mode made in
// each context what it needs (its segment's registration, its kernel) again.
TEST_F(ShimOnGpu, AProgramThatResetsItsGpuIsServedAfterEachReset) {
  for (const std::string mode : {"host", "stream"}) {
    SCOPED_TRACE("STMUX_MODE=" + mode);
    auto env = shimmed();
    env["STMUX_MODE"] = mode;
    Process c = client({"reset"}, env, "reset-" + mode);
    ASSERT_EQ(c.wait(), 0) << c.out() << c.err();
    EXPECT_EQ(countOf(c.out(), "FAIL"), 0) << c.out();
    ASSERT_EQ(outValue(c.out(), "rounds"), 3) << c.out();
    const ShimStats stats = shimStats(c.err());
    EXPECT_EQ(stats.served, 18) << c.err();  // six calls with beta 0 a round
    EXPECT_EQ(stats.stream_ordered, mode == "stream" ? 18 : 0) << c.err();
    EXPECT_EQ(stats.failed, 0) << c.err();
    EXPECT_TRUE(stats.direct.empty()) << c.err();
  }
}

TEST_F(ShimOnGpu,
       ACallOfADaemonKilledWithItsLaunchOnTheGpuComesBackRightAndCStaysTheProgramsLater) {
  endTheDaemonDuringACall({}, SIGKILL);
}

// Frees are invisible to the shim: its sweeper finds them, so memory freed by
// a tenant that then makes no call is unmapped in the daemon within seconds,
// while memory still in use stays mapped.
TEST_F(ShimOnGpu, FreedMemoryIsUnmappedWhileTheTenantStaysIdle) {
  Process c = client({"idle-free", "--seconds", "5"}, shimmed(), "idle");
  auto mapped = [&] {
    auto status = daemonStatus(dir_.socket());
    return status ? gpuField(*status, "mapped") : -1;
  };
  ASSERT_TRUE(testing::waitFor([&] { return c.out().find("called") != std::string::npos; },
                               std::chrono::seconds(60)))
      << c.out() << c.err();
  EXPECT_EQ(mapped(), 3) << "A, B and C mapped after the call";
  {
    // By the mapper thread, not the executor's.
    auto status = daemonStatus(dir_.socket());
    ASSERT_TRUE(status);
    EXPECT_EQ(gpuField(*status, "inline_opens"), 0);
  }
  // Several sweeps later the live allocations are still mapped.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  ASSERT_EQ(c.out().find("freed"), std::string::npos) << "the client went on too soon";
  EXPECT_EQ(mapped(), 3) << "a sweep released memory still in use";
  ASSERT_TRUE(testing::waitFor([&] { return c.out().find("freed") != std::string::npos; },
                               std::chrono::seconds(10)));
  EXPECT_TRUE(testing::waitFor([&] { return mapped() == 2; }, std::chrono::seconds(3)))
      << "C is still mapped: " << mapped();
  EXPECT_EQ(c.wait(std::chrono::milliseconds(0)), -1)
      << "the check must happen while the client is idle";
  ASSERT_EQ(c.wait(), 0) << c.out() << c.err();
  EXPECT_TRUE(testing::waitFor([&] { return mapped() == 0; }, std::chrono::seconds(5)))
      << "nothing stays mapped once the client is gone";
}

// Tenants under STMUX_ROUTE=auto: rnn mat-vec calls, microseconds on the
// GPU, so that the hand-off dominates, behind the bench's barrier.
class RouteOnGpu : public ShimOnGpu {
 protected:
  // The tenants' environment beyond the preload's.
  virtual std::map<std::string, std::string> tenantEnv() const { return {}; }
  std::string ready(const std::string& name) const { return dir_.path() + "/ready-" + name; }
  std::string go() const { return dir_.path() + "/go"; }
  // A tenant under auto, logging every look (for a failure's message); it is
  // ready once ready(name) exists, and times the span go() names.
  Process rnnTenant(const std::string& name) {
    std::map<std::string, std::string> env = shimmed();
    env.merge(tenantEnv());
    env["STMUX_ROUTE"] = "auto";
    env["STMUX_LOG"] = "stats=info,shim=debug";
    return client({"loop", "--m", "512", "--n", "1", "--k", "512", "--ready", ready(name), "--go",
                   go(), "--out", dir_.path() + "/lat-" + name},
                  env, name);
  }
  // The timed span: from `after` now, for a second.
  bool startSpan(std::uint64_t after_ns) const {
    tools::Span span;
    span.start_ns = tools::realtimeNs() + after_ns;
    span.stop_ns = span.start_ns + 1'000'000'000ull;
    return tools::writeGo(go(), span);
  }
};

// Off MPS: each tenant's shim chooses (shim/route.h).
class AutoRouteOnGpu : public RouteOnGpu {
 protected:
  void SetUp() override {
    RouteOnGpu::SetUp();
    if (HasFatalFailure() || IsSkipped()) return;
    auto status = daemonStatus(dir_.socket());
    ASSERT_TRUE(status);
    const Json* gpus = jsonFind(*status, "gpus");
    ASSERT_TRUE(gpus != nullptr && gpus->size() > 0);
    if (jsonBool(jsonFind(jsonAt(gpus, 0), "mps"))) {
      GTEST_SKIP() << "GPU test skipped: an MPS control daemon is running, and on MPS the "
                      "daemon chooses the route (MpsRouteOnGpu tests that)";
    }
  }
};

// On MPS: the daemon chooses for its tenants on MPS (daemon/fleet_route.h).
// An MPS control daemon of the test's own, with its pipes in the test's
// directory, under stmuxd and the tenants.
class MpsRouteOnGpu : public RouteOnGpu {
 protected:
  bool startDaemonAtSetUp() const override { return false; }
  std::map<std::string, std::string> mpsEnv() const {
    return {{"CUDA_MPS_PIPE_DIRECTORY", dir_.path() + "/mps-pipe"},
            {"CUDA_MPS_LOG_DIRECTORY", dir_.path() + "/mps-log"}};
  }
  std::map<std::string, std::string> daemonEnv() const override { return mpsEnv(); }
  std::map<std::string, std::string> tenantEnv() const override { return mpsEnv(); }
  void SetUp() override {
    RouteOnGpu::SetUp();
    if (HasFatalFailure() || IsSkipped()) return;
    std::filesystem::create_directories(dir_.path() + "/mps-pipe");
    std::filesystem::create_directories(dir_.path() + "/mps-log");
    auto started = run({"/usr/bin/env", "nvidia-cuda-mps-control", "-d"}, mpsEnv(),
                       dir_.path() + "/mps-start");
    if (started.status == 127) {
      GTEST_SKIP() << "GPU test skipped: nvidia-cuda-mps-control is not installed";
    }
    ASSERT_EQ(started.status, 0) << started.out << started.err;
    mps_started_ = true;
    startDaemon();
    auto status = daemonStatus(dir_.socket());
    ASSERT_TRUE(status);
    ASSERT_TRUE(jsonBool(jsonFind(jsonAt(jsonFind(*status, "gpus"), 0), "mps")))
        << "stmuxd is not on the test's MPS: " << daemon_.err();
  }
  void TearDown() override {
    RouteOnGpu::TearDown();
    if (mps_started_) {
      (void)run({"/bin/sh", "-c", "echo quit | nvidia-cuda-mps-control"}, mpsEnv(),
                dir_.path() + "/mps-stop");
    }
  }
  bool mps_started_ = false;
};

// On MPS the daemon is stopped with SIGTERM, as systemd stops it: it drains,
// and every tenant goes on. Not SIGKILL: on MPS a client killed while its
// kernels run makes the MPS server report a fatal fault to every client on
// the GPU, stmux or not (tools/mps_kill_probe.py; docs/ARCHITECTURE.md,
// "Known limits").
TEST_F(MpsRouteOnGpu, ACallOfADaemonStoppedWithItsLaunchOnTheGpuIsServedAndCStaysTheProgramsLater) {
  endTheDaemonDuringACall(tenantEnv(), SIGTERM);
}

// A client of the MPS server killed with its kernels running faults every
// client of the GPU (docs/ARCHITECTURE.md, "Known limits"), stmuxd's
// context with them: stmuxd, finding its GPU broken, ends with status 1,
// and once every faulted client has exited, a daemon started again (as
// systemd's Restart=on-failure would, its starts failing until then)
// serves.
TEST_F(MpsRouteOnGpu, AFaultOnMpsEndsTheDaemonAndADaemonStartedAgainServes) {
  std::map<std::string, std::string> env = tenantEnv();
  env.merge(shimmed());
  Process tenant = client({"stress", "--seconds", "20"}, env, "tenant");
  ASSERT_TRUE(testing::waitFor(
      [&] {
        const auto status = daemonStatus(dir_.socket());
        return status && gpuField(*status, "requests") > 0;
      },
      std::chrono::seconds(60)))
      << tenant.err();
  // A process of its own on the same MPS server, no stmux: one long GEMM,
  // killed while it runs.
  Process victim =
      client({"outlive", "--m", "32768", "--n", "32768", "--k", "32768"}, tenantEnv(), "victim");
  ASSERT_TRUE(testing::waitFor([&] { return victim.out().find("calling") != std::string::npos; },
                               std::chrono::seconds(120)))
      << victim.err();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  victim.signal(SIGKILL);
  ASSERT_EQ(victim.wait(std::chrono::seconds(60)), 128 + SIGKILL);
  EXPECT_EQ(daemon_.wait(std::chrono::seconds(60)), 1) << daemon_.err();
  EXPECT_NE(daemon_.err().find("failed on MPS"), std::string::npos) << daemon_.err();
  EXPECT_NE(tenant.wait(std::chrono::seconds(120)), -1) << "the faulted tenant hung";
  const std::string said = daemon_.err();
  std::cout << "tenant: " << tenant.out()
            << "stmuxd's last words: " << said.substr(said.size() > 600 ? said.size() - 600 : 0)
            << std::endl;
  // Started again every second until one stays up.
  const auto began = std::chrono::steady_clock::now();
  int starts = 0;
  bool up = false;
  while (!up && std::chrono::steady_clock::now() - began < std::chrono::seconds(60)) {
    spawnDaemon();
    ++starts;
    const auto ended = [&] { return daemon_.wait(std::chrono::milliseconds(0)) != -1; };
    up = testing::waitFor([&] { return ended() || daemonStatus(dir_.socket()).has_value(); },
                          std::chrono::seconds(30)) &&
         !ended();
    if (!up) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  std::cout << "stmuxd served again after " << starts << " start(s), "
            << std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - began)
                   .count()
            << " ms" << std::endl;
  ASSERT_TRUE(up) << daemon_.err();
  Process fresh = client({"stress", "--seconds", "2"}, env, "fresh");
  ASSERT_EQ(fresh.wait(std::chrono::seconds(120)), 0) << fresh.out() << fresh.err();
  EXPECT_GT(shimStats(fresh.err()).served, 0) << fresh.err();
}

// A lone rnn tenant on MPS makes more calls direct (no batch to join, each
// call a round trip through stmuxd): the daemon measures that, sends its calls
// direct, the shim says so once, and stmuxctl's status shows it.
TEST_F(MpsRouteOnGpu, TheDaemonSendsTenantsOnMpsDirectWhenThatIsFasterAndSaysSo) {
  Process c = rnnTenant("alone");
  ASSERT_TRUE(testing::waitFor([&] { return std::filesystem::exists(ready("alone")); },
                               std::chrono::seconds(60)))
      << c.err();
  ASSERT_TRUE(startSpan(3'000'000'000ull));
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));
  const auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status);
  const Json* route = jsonFind(*status, "mps_route");
  EXPECT_EQ(jsonString(jsonFind(route, "route")), "direct") << daemon_.err();
  EXPECT_GE(jsonNumber(jsonFind(route, "looks")), 3) << daemon_.err();  // warm-up, two wins
  const Json* clients = jsonFind(*status, "clients");
  ASSERT_TRUE(clients != nullptr && clients->size() == 1) << c.err();
  EXPECT_EQ(jsonString(jsonFind(jsonAt(clients, 0), "route")), "direct") << c.err();
  EXPECT_EQ(jsonString(jsonFind(jsonAt(clients, 0), "mps")), "yes");
  ASSERT_EQ(c.wait(std::chrono::seconds(60)), 0) << c.out() << c.err();
  const ShimStats stats = shimStats(c.err());
  EXPECT_GT(stats.directCalls("measured_direct"), stats.served) << c.err();
  EXPECT_GT(stats.served, 0) << "the first calls are served: " << c.err();
  EXPECT_EQ(countOf(c.err(), "stmuxd measured the tenants on MPS faster"), 1) << c.err();
}

// MPS admits a fixed number of client processes (48 on CUDA 13.0), and the
// next cannot make a CUDA context at all. stmuxd keeps places for its
// tenants (STMUX_MPS_CLIENTS, here 3: stmuxd and two tenants); a third
// tenant, which MPS would refuse, runs off MPS, right and served, and says
// so once, and stmuxd's status shows which one.
class MpsPlacesOnGpu : public MpsRouteOnGpu {
 protected:
  std::map<std::string, std::string> daemonEnv() const override {
    std::map<std::string, std::string> env = MpsRouteOnGpu::daemonEnv();
    env["STMUX_MPS_CLIENTS"] = "3";
    return env;
  }
};

TEST_F(MpsPlacesOnGpu, ATenantBeyondMpssPlacesRunsOffItRightAndServed) {
  std::map<std::string, std::string> env = tenantEnv();
  env.merge(shimmed());
  env["STMUX_ROUTE"] = "serve";
  std::vector<Process> tenants;
  for (const char* name : {"first", "second", "third"})
    tenants.push_back(client({"stress", "--seconds", "8"}, env, name));
  std::map<std::string, int> mps;  // "yes", "no: MPS full", ...: how many
  double kept = -1, taken = -1;    // the places, as the status counts them
  const bool listed = testing::waitFor(
      [&] {
        const auto status = daemonStatus(dir_.socket());
        if (!status) return false;
        const Json* clients = jsonFind(*status, "clients");
        if (clients == nullptr || clients->size() != 3) return false;
        mps.clear();
        for (std::size_t i = 0; i < 3; ++i)
          ++mps[std::string(jsonString(jsonFind(jsonAt(clients, i), "mps")))];
        kept = jsonNumber(jsonFind(jsonFind(*status, "mps_places"), "kept"));
        taken = jsonNumber(jsonFind(jsonFind(*status, "mps_places"), "taken"));
        return mps.count("unknown") == 0;
      },
      std::chrono::seconds(60));
  ASSERT_TRUE(listed) << tenants[0].err() << tenants[1].err() << tenants[2].err();
  EXPECT_EQ(mps["yes"], 2);
  EXPECT_EQ(mps["no: MPS full"], 1);
  EXPECT_EQ(kept, 2) << "STMUX_MPS_CLIENTS less stmuxd's own";
  EXPECT_EQ(taken, 2);
  int kept_off = 0;
  for (Process& tenant : tenants) {
    ASSERT_EQ(tenant.wait(std::chrono::seconds(120)), 0) << tenant.out() << tenant.err();
    EXPECT_GT(shimStats(tenant.err()).served, 0) << tenant.err();
    kept_off += countOf(tenant.err(), "MPS has no place left for this process");
  }
  EXPECT_EQ(kept_off, 1);
}

// A lone tenant whose calls run faster direct (no other tenant to batch
// with, every call a hand-off between two contexts) is measured so, its
// calls go direct, it says so once, and stmuxctl shows it.
TEST_F(AutoRouteOnGpu, ALoneTenantGoesDirectWhenThatIsFasterAndSaysSo) {
  Process c = rnnTenant("alone");
  ASSERT_TRUE(testing::waitFor([&] { return std::filesystem::exists(ready("alone")); },
                               std::chrono::seconds(60)))
      << c.err();
  ASSERT_TRUE(startSpan(2'000'000'000ull));
  // Within the span the client is direct, and the daemon's status says so.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  const auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status);
  const Json* clients = jsonFind(*status, "clients");
  ASSERT_TRUE(clients != nullptr && clients->size() == 1) << c.err();
  EXPECT_EQ(jsonString(jsonFind(jsonAt(clients, 0), "route")), "direct") << c.err();
  EXPECT_EQ(jsonString(jsonFind(jsonAt(clients, 0), "mps")), "no");
  ASSERT_EQ(c.wait(std::chrono::seconds(60)), 0) << c.out() << c.err();
  const ShimStats stats = shimStats(c.err());
  const long direct = stats.directCalls("measured_direct");
  EXPECT_GT(direct, stats.served) << c.err();
  EXPECT_GT(stats.served, 0) << "the first calls are served, and later looks: " << c.err();
  EXPECT_EQ(countOf(c.err(), "Running its calls directly"), 1) << c.err();
}

// Two tenants: while the other makes calls each is served (their batches
// are the point), even the one that was alone first.
TEST_F(AutoRouteOnGpu, ATenantIsServedWhileAnotherMakesCalls) {
  std::vector<Process> clients;
  for (const char* name : {"first", "second"}) {
    clients.push_back(rnnTenant(name));
    // The first runs alone for a while: long enough for its first look.
    ASSERT_TRUE(testing::waitFor([&] { return std::filesystem::exists(ready(name)); },
                                 std::chrono::seconds(60)))
        << clients.back().err();
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  }
  ASSERT_TRUE(startSpan(1'000'000'000ull));
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status);
  const Json* attached = jsonFind(*status, "clients");
  ASSERT_TRUE(attached != nullptr && attached->size() == 2);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(jsonString(jsonFind(jsonAt(attached, i), "route")), "served")
        << clients[0].err() << clients[1].err();
  }
  for (Process& c : clients)
    ASSERT_EQ(c.wait(std::chrono::seconds(60)), 0) << c.out() << c.err();
  // The second had company from its first call: nothing of it went direct.
  const ShimStats second = shimStats(clients[1].err());
  EXPECT_EQ(second.directCalls("measured_direct"), 0) << clients[1].err();
  EXPECT_GT(second.served, 0);
}

// STMUX_SYNC sets the tenant's context scheduling flag at its first calls,
// unless the program chose one itself; 'keep' leaves CUDA's default, and
// 'auto' does too while the tenants do not outnumber the cores.
TEST_F(ShimOnGpu, SyncSetsTheContextsSchedulingUnlessTheProgramChoseItsOwn) {
  struct Case {
    const char* sync;
    const char* own;  // the program's --sync, or ""
    const char* expected;
  } const cases[] = {{"keep", "", "sched 0x0"},          {"blocking", "", "sched 0x4"},
                     {"yield", "", "sched 0x2"},         {"spin", "", "sched 0x1"},
                     {"blocking", "yield", "sched 0x2"}, {"auto", "", "sched 0x0"}};
  for (const Case& c : cases) {
    std::map<std::string, std::string> env = shimmed();
    env["STMUX_SYNC"] = c.sync;
    std::vector<std::string> args = {"sync-flags"};
    if (*c.own != '\0') args.insert(args.end(), {"--sync", c.own});
    Process p = client(args, env, std::string("sync-") + c.sync + c.own);
    ASSERT_EQ(p.wait(std::chrono::seconds(60)), 0) << p.out() << p.err();
    EXPECT_NE(p.out().find(c.expected), std::string::npos)
        << "STMUX_SYNC=" << c.sync << " own '" << c.own << "': " << p.out() << p.err();
    EXPECT_GT(shimStats(p.err()).served, 0) << p.err();
  }
}

// STMUX_SPINNING_TENANTS: among more tenants making calls than cores (here a
// tenant confined to one CPU, beside another making calls), STMUX_SYNC=auto
// blocks a tenant while it has no turn to spin and leaves it CUDA's default
// while it has one (with as many turns as tenants: always).
class ShimOnGpuWithSpinners : public ShimOnGpu {
 protected:
  bool startDaemonAtSetUp() const override { return false; }
  std::map<std::string, std::string> daemonEnv() const override {
    return {{"STMUX_SPINNING_TENANTS", spinners_}};
  }
  std::string spinners_;
};

TEST_F(ShimOnGpuWithSpinners, ATenantBlocksAmongMoreTenantsThanCoresUnlessItIsItsTurnToSpin) {
  if (std::system("taskset -c 0 true >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "GPU test skipped: taskset cannot confine a process to CPU 0 here";
  }
  for (const auto& [spinners, expected] : {std::pair{"0", "sched 0x4"}, {"2", "sched 0x0"}}) {
    SCOPED_TRACE(std::string("STMUX_SPINNING_TENANTS=") + spinners);
    stopDaemon();
    spinners_ = spinners;
    startDaemon();
    std::map<std::string, std::string> env = shimmed();
    env["STMUX_SYNC"] = "auto";
    Process company =
        client({"stress", "--seconds", "12"}, env, std::string("company-") + spinners);
    // Once the daemon has counted the company, the confined tenant's calls
    // (2 s of them: the turns are given every 100 ms) find two tenants on its
    // one core.
    ASSERT_TRUE(testing::waitFor(
        [&] {
          const auto status = daemonStatus(dir_.socket());
          const Json* clients = status ? jsonFind(*status, "clients") : nullptr;
          return clients != nullptr && clients->size() == 1 &&
                 jsonNumber(jsonFind(jsonAt(clients, 0), "forwarded"), 0) > 0;
        },
        std::chrono::seconds(60)))
        << company.err();
    Process confined({"taskset", "-c", "0", CUBLAS_CLIENT_PATH, "sync-flags", "--seconds", "2"},
                     env, dir_.path() + "/confined-" + spinners);
    ASSERT_EQ(confined.wait(std::chrono::seconds(60)), 0) << confined.out() << confined.err();
    EXPECT_NE(confined.out().find(expected), std::string::npos) << confined.out() << confined.err();
    EXPECT_GT(shimStats(confined.err()).served, 0) << confined.err();
    ASSERT_EQ(company.wait(std::chrono::seconds(60)), 0) << company.out() << company.err();
  }
}

class ShimBeforeTheDaemon : public ShimOnGpu {
 protected:
  bool startDaemonAtSetUp() const override { return false; }
};

TEST_F(ShimBeforeTheDaemon, CallsRunDirectlyThenTheDaemonIsFoundWithoutARestart) {
  Process c = client({"stress", "--seconds", "8"}, shimmed(), "early");
  std::this_thread::sleep_for(std::chrono::seconds(2));
  startDaemon();
  ASSERT_TRUE(testing::waitFor(
      [&] {
        auto status = daemonStatus(dir_.socket());
        return status && status->at("clients").size() == 1 && gpuField(*status, "requests") > 0;
      },
      std::chrono::seconds(5)))
      << "the client did not attach to the daemon once it appeared";
  ASSERT_EQ(c.wait(std::chrono::seconds(60)), 0) << c.out() << c.err();
  const ShimStats stats = shimStats(c.err());
  EXPECT_GT(stats.directCalls("no_daemon"), 0) << c.err();
  EXPECT_GT(stats.served, 0) << c.err();
  EXPECT_EQ(countOf(c.err(), "not attached to stmuxd"), 1)
      << "the missing daemon should be reported once:\n"
      << c.err();
}

}  // namespace
}  // namespace stmux

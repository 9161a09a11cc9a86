// libstmux.so's whole path in ordinary processes, on any machine: a tenant
// (tests/shim_tenant.cc) with the shim preloaded, the fake libcuda and
// libcublas of tests/fakes on its library path, and this test's daemon (the
// real server and scheduler, a fake GPU: tests/fake_daemon.h). What a
// program does to the shim around its calls (fork, pthread_cancel, dlclose)
// and what the shim sends where, seen from outside. The GPU tests
// (shim_gpu_test, differential) run the same path with real CUDA.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "fake_daemon.h"
#include "stmux/json.h"
#include "stmux/mps_seats.h"
#include "tools/process.h"
#include "tools/shim_stats.h"
#include "tools/stmux_programs.h"

namespace stmux {
namespace {

using daemon::Daemon;
using testing::keyValues;
using testing::TempDir;

constexpr std::uint64_t kSecond = 1'000'000'000;

std::vector<std::string> tenantArgv(const std::vector<std::string>& args) {
  std::vector<std::string> argv{SHIM_TENANT_PATH};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

// `env` over the tenant's defaults (host mode, stats at exit).
std::map<std::string, std::string> tenantEnv(const TempDir& dir, bool preload,
                                             std::map<std::string, std::string> env) {
  env.merge(std::map<std::string, std::string>{{"LD_PRELOAD", preload ? SHIM_PATH : ""},
                                               {"LD_LIBRARY_PATH", FAKES_DIR},
                                               {"STMUX_SOCKET", dir.socket()},
                                               {"STMUX_MODE", "host"},
                                               {"STMUX_LOG", "stats=info"}});
  return env;
}

Ran tenant(const TempDir& dir, const std::vector<std::string>& args, bool preload = true,
           std::map<std::string, std::string> env = {}) {
  return run(tenantArgv(args), tenantEnv(dir, preload, std::move(env)),
             dir.path() + "/tenant-" + args[0], std::chrono::seconds(60));
}

// For a tenant that forks while it has threads: under TSan the child, which
// has none of the parent's threads, would be told it leaked them.
std::map<std::string, std::string> forkedChildEnv() {
  const char* tsan = std::getenv("TSAN_OPTIONS");
  return {{"TSAN_OPTIONS", std::string(tsan != nullptr ? tsan : "") + ":report_thread_leaks=0"}};
}

TEST(ShimProcess, ATenantsCallsAreServed) {
  TempDir dir;
  Daemon daemon(dir);
  const Ran ran = tenant(dir, {"served", "20"});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["failed"], "0");
  EXPECT_NE(ran.err.find("20 served by stmuxd"), std::string::npos) << ran.err;
}

// While another thread captures a blocking stream, CUDA forbids any use of
// the legacy stream (a wait there invalidates the capture) and says so when
// asked (the fake driver models it: FAKE_CUDA_BLOCKING_CAPTURE). A served
// call waits for the legacy stream's earlier work, so in each mode the shim
// runs such calls directly, counted as graph_capture, on their own stream
// (other) as on the legacy stream; nothing of the shim's touches the legacy
// stream meanwhile.
TEST(ShimProcess, CallsBesideAnotherThreadsCaptureOfABlockingStreamRunDirectlyAndLeaveItBe) {
  TempDir dir;
  Daemon daemon(dir);
  for (const char* mode : {"host", "stream"}) {
    for (const char* stream : {"other", "legacy"}) {
      const std::string what = std::string(mode) + " mode, " + stream + " stream";
      const Ran ran = tenant(dir, {"beside-capture", "6", stream}, /*preload=*/true,
                             {{"FAKE_CUDA_BLOCKING_CAPTURE", "1"}, {"STMUX_MODE", mode}});
      ASSERT_EQ(ran.status, 0) << what << "\n" << ran.err;
      auto said = keyValues(ran.out);
      EXPECT_EQ(said["failed"], "0") << what;
      EXPECT_EQ(said["invalidations"], "0")
          << what << ": the shim used the legacy stream during the capture\n"
          << ran.err;
      const tools::ShimStats stats = tools::shimStats(ran.err);
      EXPECT_EQ(stats.served, 0) << what << "\n" << ran.err;
      EXPECT_EQ(stats.directCalls("graph_capture"), 6) << what << "\n" << ran.err;
    }
  }
  // Without the capture the same calls are served.
  const Ran plain = tenant(dir, {"beside-capture", "6", "other"});
  ASSERT_EQ(plain.status, 0) << plain.err;
  EXPECT_EQ(keyValues(plain.out)["invalidations"], "0");
  EXPECT_EQ(tools::shimStats(plain.err).served, 6) << plain.err;
}

// What the tenant's environment says to the shim about stmux's variables: a
// typo, and a daemon's setting (which changes nothing in a tenant: said so,
// as stmuxd says of a tenant's in its own environment), each named once; a
// test program's setting is neither.
TEST(ShimProcess, VariablesThatChangeNothingInATenantAreNamed) {
  TempDir dir;
  Daemon daemon(dir);
  const Ran ran = tenant(dir, {"served", "1"}, /*preload=*/true,
                         {{"STMUX_WINDOWS_US", "5"},
                          {"STMUX_WINDOW_US", "5"},
                          {"STMUX_DIFF_SEED", "7"},
                          {"STMUX_LOG", "warn"}});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(countOf(ran.err, "STMUX_WINDOWS_US is not a stmux variable"), 1) << ran.err;
  EXPECT_EQ(countOf(ran.err, "STMUX_WINDOW_US is read by stmuxd, not by libstmux.so"), 1)
      << ran.err;
  EXPECT_EQ(ran.err.find("STMUX_DIFF_SEED"), std::string::npos) << ran.err;
}

// Only C is scaled: cuBLAS computes it (the fake, here: C = 2 C), and the
// daemon never sees it.
TEST(ShimProcess, AlphaZeroRunsDirectly) {
  TempDir dir;
  Daemon daemon(dir);
  const Ran ran = tenant(dir, {"alpha0"});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["status"], "0");
  EXPECT_EQ(keyValues(ran.out)["c0"], "2");
  EXPECT_NE(ran.err.find("unserved_form=1"), std::string::npos) << ran.err;
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
}

// The legacy cublasSgemm returns no status: whatever the daemon answers but
// success, cuBLAS computes the call (A and B all 1: each element of C is 8).
TEST(ShimProcess, ALegacyCallTheDaemonRefusesIsComputedDirectly) {
  TempDir dir;
  Daemon daemon(dir);
  daemon.executor().setAnswer(kStatusInvalidValue);
  const Ran ran = tenant(dir, {"legacy"});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["c0"], "8") << "the refused call was not run";
  EXPECT_NE(ran.err.find("daemon_failed=1"), std::string::npos) << ran.err;
  EXPECT_EQ(daemon.executor().batchSizes().size(), 1u) << "the daemon did not get the call";
}

// A fork while another thread is attaching: the child must not inherit the
// attempt's socket (the parent stayed attached for as long as the child
// lived, its client, segment and mappings with it). Here the "daemon"
// accepts and never answers, so the attempt lasts the welcome timeout.
TEST(ShimProcess, AForkWhileAttachingLeavesTheChildNoSocket) {
  TempDir dir;
  const UniqueFd listener = testing::listenAt(dir.socket());
  ASSERT_TRUE(listener.valid());
  const Ran ran = tenant(dir, {"fork-attaching"}, /*preload=*/true, forkedChildEnv());
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["child_sockets"], "0") << ran.out << ran.err;
}

// cublasGemmEx's algorithm: the plain ones (default, 0 to 23) are served;
// the tensor-op ones (which may compute FP32 in FP16), one this cuBLAS does
// not list, and autotuning get cuBLAS's own answer.
TEST(ShimProcess, GemmExIsServedForThePlainAlgorithmsOnly) {
  TempDir dir;
  Daemon daemon(dir);
  const Ran ran = tenant(dir, {"gemm-ex", "-1", "0", "23", "24", "99", "115", "999", "-2"});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_NE(ran.err.find("8 calls: 3 served by stmuxd"), std::string::npos) << ran.err;
  EXPECT_NE(ran.err.find("unserved_form=5"), std::string::npos) << ran.err;
}

// A daemon killed during a call it started: its socket closes before its
// process has ended, and until then the launch it queued on its GPU may
// still write C. The call (beta 0) runs again only once that process has
// ended; where the end does not come within the call's timeout (10 s at
// least), the call fails rather than run twice.
TEST(ShimProcess, ACallTheDaemonStartedRunsAgainOnlyOnceTheDaemonsProcessHasEnded) {
  TempDir dir;
  {
    daemon::HangingUpDaemon dying(dir);
    ASSERT_TRUE(dying.listening());
    Process waiting(tenantArgv({"served", "1"}),
                    tenantEnv(dir, true, {{"STMUX_TIMEOUT_MS", "60000"}}),
                    dir.path() + "/tenant-waiting");
    ASSERT_TRUE(dying.hungUp());
    EXPECT_EQ(waiting.wait(std::chrono::milliseconds(300)), -1)
        << "the call ran again while the daemon's process lived";
    dying.end();
    ASSERT_EQ(waiting.wait(std::chrono::seconds(60)), 0) << waiting.err();
    EXPECT_EQ(keyValues(waiting.out())["failed"], "0");
    EXPECT_NE(waiting.err().find("direct: daemon_lost=1"), std::string::npos) << waiting.err();
  }
  daemon::HangingUpDaemon dying(dir);
  ASSERT_TRUE(dying.listening());
  const Ran ran = tenant(dir, {"served", "1"}, true,
                         {{"STMUX_TIMEOUT_MS", "1000"}, {"STMUX_LOG", "stats=info,shim=error"}});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["failed"], "1");
  EXPECT_NE(ran.err.find("has not ended in 10000 ms"), std::string::npos) << ran.err;
}

// A daemon that takes connections and never answers (stopped, stuck): each
// attempt to attach held the calling thread for the welcome timeout (1 s),
// every other thread waited for it, and the next came STMUX_RECONNECT_MS
// later, so the tenant spent half its time (all of it at 10 ms) inside
// calls that then ran directly. Now one thread tries, for 100 ms, at most a
// tenth of the time, and the rest run directly meanwhile.
TEST(ShimProcess, ADaemonThatNeverAnswersCostsATenantLittleOfItsTime) {
  TempDir dir;
  const UniqueFd listener = testing::listenAt(dir.socket());
  ASSERT_TRUE(listener.valid());
  const Ran ran = tenant(dir, {"steady", "4", "4"}, /*preload=*/true,
                         {{"STMUX_RECONNECT_MS", "10"}, {"STMUX_LOG", "shim=warn"}});
  ASSERT_EQ(ran.status, 0) << ran.err;
  auto seen = keyValues(ran.out);
  ASSERT_TRUE(seen.count("inside_share")) << ran.out << ran.err;
  // Generous bounds (they are 0.03 and ~100 ms here): a test of the
  // wait's shape, not of speed.
  EXPECT_LT(std::stod(seen["inside_share"]), 0.25) << ran.out;
  EXPECT_LT(std::stod(seen["longest_ms"]), 600.0) << ran.out;
}

// A daemon that takes calls and starts none (stopped, its executor stuck,
// its socket open all the while): each call waited STMUX_TIMEOUT_MS and then
// ran directly, and the next the same, for ever (found by review). Now the
// shim detaches after such a wait and attaches again after as long, twice as
// long after each stall in a row.
TEST(ShimProcess, ADaemonThatStartsNoCallCostsATenantFewTimeouts) {
  TempDir dir;
  Daemon daemon(dir);
  daemon.executor().pause(true);
  const Ran ran = tenant(dir, {"steady", "3", "2"}, /*preload=*/true,
                         {{"STMUX_TIMEOUT_MS", "100"}, {"STMUX_LOG", "shim=error"}});
  daemon.executor().pause(false);
  ASSERT_EQ(ran.status, 0) << ran.err;
  auto seen = keyValues(ran.out);
  ASSERT_TRUE(seen.count("inside_share")) << ran.out << ran.err;
  // 0.10 here (two timed-out waits in the two seconds measured); 1.0 before,
  // every call waiting.
  EXPECT_LT(std::stod(seen["inside_share"]), 0.35) << ran.out;
}

// A fork while another thread makes the shim (its first call; loading the
// driver takes 500 ms here): the child's copy of the shim's construction
// guard stayed taken, and its first call waited for ever.
TEST(ShimProcess, AForkWhileTheShimIsBeingMadeLeavesTheChildAbleToCall) {
  TempDir dir;  // no daemon: the calls run directly
  std::map<std::string, std::string> env = forkedChildEnv();
  env.emplace("FAKE_CUDA_LOAD_MS", "500");
  const Ran ran = tenant(dir, {"fork-constructing"}, /*preload=*/true, env);
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["child_returned"], "1") << "the child's first call never returned";
}

// pthread_cancel of a thread waiting in a served call: the unwinding used
// to meet the shim's catch-all and abort the process ("exception not
// rethrown"). Now it takes effect at the program's next cancellation point.
TEST(ShimProcess, CancellingAThreadInAServedCallDoesNotAbort) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/kSecond);  // a slow GPU: the call waits
  const Ran ran = tenant(dir, {"cancel"});
  EXPECT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["joined"], "1") << ran.out << ran.err;
  // The cancelled thread's call was in the daemon (not run directly, where
  // nothing waits to be cancelled in).
  EXPECT_TRUE(testing::waitFor([&] { return daemon.executor().batchSizes().size() >= 2; },
                               std::chrono::seconds(5)))
      << "the cancelled call never reached the daemon: " << ran.err;
}

// A program that loads the shim itself and unloads it: its threads (the
// sweeper) must not find their code unmapped (SIGSEGV before: it is
// linked nodelete now).
TEST(ShimProcess, UnloadingTheShimAfterServedCallsIsHarmless) {
  TempDir dir;
  Daemon daemon(dir);
  const Ran ran = tenant(dir, {"dlclose", SHIM_PATH}, /*preload=*/false);
  EXPECT_EQ(ran.status, 0) << ran.err;
  EXPECT_EQ(keyValues(ran.out)["survived"], "1") << ran.out << ran.err;
  EXPECT_FALSE(daemon.executor().batchSizes().empty()) << "nothing was served: " << ran.err;
}

// STMUX_SYNC: how a tenant's threads wait, as its shim left its context's
// scheduling flag, shows in stmuxd's status: the flag set, "keep" where the
// shim sets none, and "program's" where the program chose one itself (the
// fake driver keeps a context's flags; FAKE_CUDA_CTX_FLAGS is the program's).
TEST(ShimProcess, HowATenantWaitsShowsInTheStatus) {
  TempDir dir;
  Daemon daemon(dir);
  const struct {
    std::map<std::string, std::string> env;
    const char* shown;
  } cases[] = {
      {{{"STMUX_SYNC", "blocking"}}, "block"},
      {{{"STMUX_SYNC", "yield"}}, "yield"},
      {{{"STMUX_SYNC", "keep"}}, "keep"},
      {{{"STMUX_SYNC", "auto"}}, "default"},  // one tenant: it does not outnumber the cores
      {{{"STMUX_SYNC", "blocking"}, {"FAKE_CUDA_CTX_FLAGS", "1"}}, "program's"},
  };
  for (const auto& c : cases) {
    Process p(tenantArgv({"mps-pipes", "2"}), tenantEnv(dir, true, c.env), dir.path() + "/sync");
    ASSERT_TRUE(testing::waitFor([&] { return p.out().find("status") != std::string::npos; },
                                 std::chrono::seconds(30)))
        << p.err();
    const auto status = tools::daemonStatus(dir.socket());
    ASSERT_TRUE(status);
    const Json* clients = jsonFind(*status, "clients");
    std::string shown = "(not listed)";
    for (std::size_t i = 0; clients != nullptr && i < clients->size(); ++i) {
      if (jsonNumber(jsonFind(jsonAt(clients, i), "pid")) == p.pid()) {
        shown = jsonString(jsonFind(jsonAt(clients, i), "sync"));
      }
    }
    EXPECT_EQ(shown, c.shown) << "STMUX_SYNC=" << c.env.at("STMUX_SYNC") << "\n" << p.err();
    ASSERT_EQ(p.wait(std::chrono::seconds(30)), 0) << p.err();
  }
}

// STMUX_SLICE_US: the calling thread asks the kernel for that slice at its
// first GEMM, keeping its policy; without it the kernel's slice stays, and a
// thread the program put under SCHED_BATCH is left alone.
TEST(ShimProcess, SliceUsAsksTheKernelForTheCallingThreadsSlice) {
  TempDir dir;
  Daemon daemon(dir);
  const Ran plain = tenant(dir, {"slice"});
  ASSERT_EQ(plain.status, 0) << plain.err;
  auto said = keyValues(plain.out);
  EXPECT_EQ(said["status"], "0");
  const std::string kernels = said["before"];
  if (kernels.rfind("0 ", 0) != 0 || kernels == "0 0") {
    GTEST_SKIP() << "this kernel reports no slice for SCHED_OTHER (before Linux 6.12): " << kernels;
  }
  EXPECT_EQ(said["after"], kernels) << "without STMUX_SLICE_US the kernel's slice stays";

  const Ran asked = tenant(dir, {"slice"}, true, {{"STMUX_SLICE_US", "300"}});
  ASSERT_EQ(asked.status, 0) << asked.err;
  said = keyValues(asked.out);
  EXPECT_EQ(said["before"], kernels);
  EXPECT_EQ(said["after"], "0 300000") << asked.err;

  const Ran batch = tenant(dir, {"slice", "batch"}, true,
                           {{"STMUX_SLICE_US", "300"}, {"STMUX_LOG", "stats=info,shim=info"}});
  ASSERT_EQ(batch.status, 0) << batch.err;
  said = keyValues(batch.out);
  EXPECT_EQ(said["before"].rfind("3 ", 0), 0u) << "SCHED_BATCH: " << said["before"];
  EXPECT_EQ(said["after"], said["before"]) << batch.err;
  EXPECT_NE(batch.err.find("left alone"), std::string::npos) << batch.err;
}

// The CUDA driver asks where MPS's pipes are as it starts. A tenant that
// finds every place stmuxd keeps on MPS taken is told a directory without
// MPS in it (so that its context can still be made, off MPS), says so once,
// and stmuxd's status shows why it is not on MPS; its calls are still
// served. With a place free, and for anybody but the driver, the
// environment's answer stands.
TEST(ShimProcess, ATenantFindingEveryPlaceOnMpsTakenIsKeptOffItAndServed) {
  TempDir dir;
  Daemon daemon(dir);
  const std::string pipes = dir.path() + "/mps-pipe";
  std::filesystem::create_directories(pipes);
  std::ofstream(pipes + "/control") << "";  // as a running MPS control daemon leaves it
  const std::string seats = mpsSeatsDirectory(dir.socket());
  ASSERT_TRUE(prepareMpsSeats(seats, 1, pipes).ok());
  const std::map<std::string, std::string> env{{"CUDA_MPS_PIPE_DIRECTORY", pipes}};

  std::map<std::string, std::string> logged = env;
  logged["STMUX_LOG"] = "stats=info,shim=debug";
  const Ran seated = tenant(dir, {"mps-pipes", "0"}, true, logged);
  ASSERT_EQ(seated.status, 0) << seated.err;
  EXPECT_EQ(keyValues(seated.out)["driver_pipes"], pipes) << seated.err;
  EXPECT_EQ(countOf(seated.err, "took one of stmuxd's 1 places on MPS"), 1) << seated.err;
  EXPECT_EQ(countOf(seated.err, "MPS has no place left"), 0) << seated.err;

  const MpsSeat held = takeMpsSeat(seats, pipes, ::geteuid());  // the one place
  ASSERT_EQ(held.outcome, MpsSeat::Outcome::kSeated) << held.why << "; the first tenant kept it";
  Process kept(tenantArgv({"mps-pipes", "3"}), tenantEnv(dir, true, env), dir.path() + "/kept");
  ASSERT_TRUE(testing::waitFor([&] { return kept.out().find("status") != std::string::npos; },
                               std::chrono::seconds(30)))
      << kept.err();
  const auto said = keyValues(kept.out());
  EXPECT_EQ(said.at("driver_pipes"), seats);
  EXPECT_EQ(said.at("own_pipes"), pipes) << "only the driver's question is answered otherwise";
  EXPECT_EQ(said.at("status"), "0");
  const auto status = tools::daemonStatus(dir.socket());
  ASSERT_TRUE(status);
  const Json* clients = jsonFind(*status, "clients");
  ASSERT_TRUE(clients != nullptr && clients->size() == 1) << kept.err();
  EXPECT_EQ(jsonString(jsonFind(jsonAt(clients, 0), "mps")), "no: MPS full");
  ASSERT_EQ(kept.wait(std::chrono::seconds(30)), 0) << kept.err();
  EXPECT_EQ(countOf(kept.err(), "MPS has no place left for this process"), 1) << kept.err();
  EXPECT_NE(kept.err().find("1 served by stmuxd"), std::string::npos) << kept.err();

  const Ran disabled = tenant(dir, {"mps-pipes", "0"}, true,
                              {{"CUDA_MPS_PIPE_DIRECTORY", pipes}, {"STMUX_DISABLE", "1"}});
  ASSERT_EQ(disabled.status, 0) << disabled.err;
  EXPECT_EQ(keyValues(disabled.out)["driver_pipes"], pipes) << "STMUX_DISABLE leaves MPS alone";
  ::close(held.fd);
}

}  // namespace
}  // namespace stmux

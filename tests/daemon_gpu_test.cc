// stmuxd on a GPU: test clients in separate processes, through the real
// transport and real CUDA IPC, against a float64 reference (tests/ipc_client.cc
// does the checking). Skipped, saying so, where there is no CUDA device.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gpu_fixture.h"
#include "prometheus_format.h"

namespace stmux {
namespace {

using testing::TempDir;

using testing::daemonStatus;
using testing::gpuField;

class StmuxdOnGpu : public testing::DaemonFixture {
 protected:
  Process client(const std::vector<std::string>& args, const std::string& log) {
    std::vector<std::string> argv = {IPC_CLIENT_PATH};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--socket");
    argv.push_back(dir_.socket());
    return Process(argv, {}, dir_.path() + "/" + log);
  }
  void expectPasses(Process& process, const char* what) {
    const int status = process.wait(std::chrono::seconds(600));
    EXPECT_EQ(status, 0) << what << "\n" << process.out() << process.err();
  }
};

TEST_F(StmuxdOnGpu, TheCaseMatrixFromOneProcessIsRight) {
  Process c = client({"cases"}, "cases");
  expectPasses(c, "case matrix");
  EXPECT_EQ(countOf(c.out(), "FAIL"), 0) << c.out();
  EXPECT_GE(countOf(c.out(), "ok "), 20) << c.out();
  // One call at a time: each batch is one request, launched with its
  // operands themselves, so no pointer array goes to the GPU.
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_GE(gpuField(*status, "batches"), 20);
  EXPECT_EQ(gpuField(*status, "pointer_copies"), 0);
}

TEST_F(StmuxdOnGpu, MixedShapesShareBatchesAndStayRight) {
  Process c = client({"cases", "--together"}, "together");
  expectPasses(c, "all cases submitted at once");
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  const double requests = gpuField(*status, "requests");
  const double batches = gpuField(*status, "batches");
  EXPECT_GT(requests, 0);
  EXPECT_LT(batches, requests) << "no batch held more than one request";
}

// Operands off 16-byte alignment in one batch with aligned ones: the batched
// kernels must not see them (a misaligned load is a sticky CUDA error that
// cost the daemon its GPU), and every result is right.
TEST_F(StmuxdOnGpu, UnalignedOperandsInABatchAreRightAndTheGpuStaysWhole) {
  Process c = client({"cases", "--together", "--unaligned"}, "unaligned");
  expectPasses(c, "aligned and unaligned requests submitted at once");
  EXPECT_EQ(countOf(c.out(), "ok "), 48) << c.out();
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_LT(gpuField(*status, "batches"), gpuField(*status, "requests"))
      << "the aligned requests should have shared batches";
  const Json* broken = jsonFind(jsonAt(jsonFind(*status, "gpus"), 0), "broken");
  ASSERT_NE(broken, nullptr);
  EXPECT_FALSE(jsonBool(broken, true)) << "the daemon lost its GPU";
}

// Epilogues (bias, ReLU, GELU, each activation with a bias), on single
// requests and strided batches of 3, in one batch with plain requests of the
// same shapes: the epilogue must not split their GEMM launch, and is applied
// after it to the requests that asked for it alone, within each C's m x n
// block (tests/ipc_client.cc checks each C against a float64 reference).
TEST_F(StmuxdOnGpu, EpiloguesAreAppliedAfterTheLaunchesTheyShareWithPlainRequests) {
  Process c = client({"epilogues"}, "epilogues");
  expectPasses(c, "requests with and without epilogues submitted at once");
  EXPECT_EQ(countOf(c.out(), "FAIL"), 0) << c.out();
  EXPECT_EQ(countOf(c.out(), "ok "), 13) << c.out();
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  const double requests = gpuField(*status, "requests");
  EXPECT_EQ(requests, 15) << "13 cases and the 2 GEMMs ahead of them";
  EXPECT_LE(gpuField(*status, "batches"), 5) << "the cases should have met in batches";
  // One epilogue kernel for each batch that had an epilogue in it.
  EXPECT_GE(gpuField(*status, "epilogue_launches"), 1);
  EXPECT_LE(gpuField(*status, "epilogue_launches"), gpuField(*status, "batches"));
  EXPECT_EQ(gpuField(*status, "epilogue_copies"), 0) << "10 epilogues fit a launch's parameters";
  EXPECT_GE(gpuField(*status, "pointer_copies"), 1) << "the cases' batched launches read arrays";
  const Json* broken = jsonFind(jsonAt(jsonFind(*status, "gpus"), 0), "broken");
  ASSERT_NE(broken, nullptr);
  EXPECT_FALSE(jsonBool(broken, true)) << "the daemon lost its GPU";
}

// Four rounds of the cases: 40 epilogues, more than a launch carries in its
// parameters (kEpilogueInlineItems), so that a batch copies its items to
// device memory first; the smaller batches take the other path.
TEST_F(StmuxdOnGpu, ABatchWithMoreEpiloguesThanALaunchCarriesIsRight) {
  Process c = client({"epilogues", "--rounds", "4"}, "epilogues");
  expectPasses(c, "four rounds of requests with and without epilogues submitted at once");
  EXPECT_EQ(countOf(c.out(), "FAIL"), 0) << c.out();
  EXPECT_EQ(countOf(c.out(), "ok "), 4 * 13) << c.out();
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(gpuField(*status, "requests"), 4 * 13 + 2);
  EXPECT_GE(gpuField(*status, "epilogue_copies"), 1)
      << "no batch had more epilogues than a launch carries: the cases did not meet";
  EXPECT_LE(gpuField(*status, "epilogue_copies"), gpuField(*status, "epilogue_launches"));
  const Json* broken = jsonFind(jsonAt(jsonFind(*status, "gpus"), 0), "broken");
  ASSERT_NE(broken, nullptr);
  EXPECT_FALSE(jsonBool(broken, true)) << "the daemon lost its GPU";
}

TEST_F(StmuxdOnGpu, ThirtyTwoProcessesAtOnce) {
  std::vector<Process> clients;
  for (int i = 0; i < 32; ++i)
    clients.push_back(client({"cases", "--quick"}, "c" + std::to_string(i)));
  for (Process& c : clients)
    expectPasses(c, "one of 32 clients");
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  EXPECT_LT(gpuField(*status, "batches"), gpuField(*status, "requests"));
}

// An operand past its allocation is not the daemon's to touch: declined,
// unclaimed, for its caller to run as it would without stmux.
TEST_F(StmuxdOnGpu, AnOverrunIsDeclinedWhileOtherTenantsStayRight) {
  std::vector<Process> good;
  for (int i = 0; i < 8; ++i)
    good.push_back(client({"cases", "--quick"}, "g" + std::to_string(i)));
  Process bad = client({"overrun"}, "overrun");
  expectPasses(bad, "every bad operand declined, memory untouched");
  for (Process& c : good)
    expectPasses(c, "a tenant next to the bad one");
  EXPECT_TRUE(daemon_.running());
}

TEST_F(StmuxdOnGpu, AClientKilledMidRunHarmsNobody) {
  Process doomed = client({"cases"}, "doomed");
  // Killed once it is attached and its requests reach the daemon, not while
  // it is still setting CUDA up.
  ASSERT_TRUE(testing::waitFor(
      [&] {
        auto status = daemonStatus(dir_.socket());
        return status && status->at("clients").size() == 1 && gpuField(*status, "requests") > 0;
      },
      std::chrono::seconds(60)))
      << "the client never made a served call: " << doomed.err();
  doomed.signal(SIGKILL);
  EXPECT_EQ(doomed.wait(std::chrono::seconds(30)), 128 + SIGKILL) << "it ended before the kill";
  Process after = client({"cases", "--quick"}, "after");
  expectPasses(after, "a client after another was killed");
  ASSERT_TRUE(testing::waitFor([&] {
    auto status = daemonStatus(dir_.socket());
    return status && status->at("clients").empty();
  })) << "the killed client is still listed";
}

// STMUX_METRICS_FILE: the real daemon writes well-formed metrics that count
// what it served.
class StmuxdMetricsOnGpu : public StmuxdOnGpu {
 protected:
  std::map<std::string, std::string> daemonEnv() const override {
    return {{"STMUX_METRICS_FILE", dir_.path() + "/stmuxd.prom"}};
  }
};

TEST_F(StmuxdMetricsOnGpu, TheMetricsFileIsWrittenWellFormedAndCounts) {
  Process c = client({"cases", "--quick"}, "cases");
  expectPasses(c, "case matrix");
  auto status = daemonStatus(dir_.socket());
  ASSERT_TRUE(status.has_value());
  const double requests = gpuField(*status, "requests");
  ASSERT_GT(requests, 0);
  const std::string path = dir_.path() + "/stmuxd.prom";
  std::string text;
  ASSERT_TRUE(testing::waitFor(
      [&] {
        std::ifstream in(path);
        std::stringstream all;
        all << in.rdbuf();
        text = all.str();
        return testing::prometheusValue(text, "stmux_gpu_requests_total") == requests;
      },
      std::chrono::seconds(5)))
      << text;
  EXPECT_EQ(testing::prometheusFault(text), "") << text;
  EXPECT_GT(testing::prometheusValue(text, "stmux_gpu_cublas_launches_total").value_or(0), 0);
  // Nothing left to report a daemon that is gone.
  stopDaemon();
  EXPECT_FALSE(std::filesystem::exists(path)) << "the metrics file outlived the daemon";
}

// Under systemd (Type=notify) stmuxd says READY=1 once it listens and
// STOPPING=1 as it begins to drain, through libsystemd's sd_notify: the test
// stands in for systemd at NOTIFY_SOCKET.
class StmuxdNotifyOnGpu : public StmuxdOnGpu {
 protected:
  void SetUp() override {
    notify_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(notify_.valid());
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    ASSERT_LT(notifyPath().size(), sizeof(address.sun_path));
    std::memcpy(address.sun_path, notifyPath().c_str(), notifyPath().size());
    ASSERT_EQ(::bind(notify_.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)),
              0)
        << std::strerror(errno);
    StmuxdOnGpu::SetUp();
  }
  std::map<std::string, std::string> daemonEnv() const override {
    return {{"NOTIFY_SOCKET", notifyPath()}};
  }
  std::string notifyPath() const { return dir_.path() + "/notify"; }
  // The next datagram within `limit`, or "" when none came.
  std::string nextNotice(std::chrono::milliseconds limit) {
    pollfd fd{notify_.get(), POLLIN, 0};
    if (::poll(&fd, 1, static_cast<int>(limit.count())) != 1) return "";
    char buffer[256];
    const ssize_t n = ::recv(notify_.get(), buffer, sizeof(buffer), 0);
    return n > 0 ? std::string(buffer, static_cast<std::size_t>(n)) : "";
  }
  UniqueFd notify_;
};

TEST_F(StmuxdNotifyOnGpu, SystemdHearsReadyOnceItListensAndStoppingAsItDrains) {
  // SetUp waited for the daemon to answer status: it listens.
  EXPECT_EQ(nextNotice(std::chrono::seconds(5)), "READY=1") << daemon_.err();
  stopDaemon();
  EXPECT_EQ(nextNotice(std::chrono::seconds(5)), "STOPPING=1") << daemon_.err();
}

}  // namespace
}  // namespace stmux

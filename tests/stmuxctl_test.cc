// stmuxctl (tools/stmuxctl.cc), the real binary run as a child process: it
// asks a real daemon's transport (daemon/server.cc) about an attached tenant,
// prints JSON and tables, survives replies with missing or odd fields, and
// says why when it cannot ask (no daemon, refusal, silence, bad usage).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "shim/transport.h"
#include "stmux/control.h"
#include "stmux/json.h"
#include "stmux/mps_seats.h"
#include "test_support.h"

#ifndef STMUXCTL_PATH
#error "STMUXCTL_PATH must name the stmuxctl binary under test"
#endif

extern char** environ;

namespace stmux {
namespace {

using testing::TempDir;

constexpr std::uint64_t kSecond = 1'000'000'000;

struct CtlRun {
  int exit_code = -1;  // -1: killed or did not finish
  pid_t pid = 0;
  std::string out;
  std::string err;
  double seconds = 0;
};

// Runs stmuxctl with `args` and an environment of this process's minus every
// STMUX_* variable plus `env`; collects stdout and stderr separately.
CtlRun runCtl(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
  std::vector<std::string> environment;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, "STMUX_", 6) != 0) environment.emplace_back(*entry);
  }
  environment.insert(environment.end(), env.begin(), env.end());
  std::vector<std::string> argv_strings = {STMUXCTL_PATH};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv, envp;
  for (auto& s : argv_strings)
    argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : environment)
    envp.push_back(s.data());
  envp.push_back(nullptr);

  CtlRun run;
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    return run;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  const int spawned = ::posix_spawn(&run.pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  UniqueFd out_fd(out_pipe[0]), err_fd(err_pipe[0]);
  if (spawned != 0) {
    ADD_FAILURE() << "cannot run " << STMUXCTL_PATH << ": " << std::strerror(spawned);
    return run;
  }
  const auto deadline = start + std::chrono::seconds(20);
  pollfd fds[2] = {{out_fd.get(), POLLIN, 0}, {err_fd.get(), POLLIN, 0}};
  std::string* sinks[2] = {&run.out, &run.err};
  int open_count = 2;
  while (open_count > 0 && std::chrono::steady_clock::now() < deadline) {
    if (::poll(fds, 2, 100) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buffer[4096];
      const ssize_t n = ::read(fds[i].fd, buffer, sizeof(buffer));
      if (n > 0) {
        sinks[i]->append(buffer, static_cast<std::size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        fds[i].fd = -1;
        --open_count;
      }
    }
  }
  if (open_count > 0) {
    ADD_FAILURE() << "stmuxctl did not finish within 20 s; killing it";
    ::kill(run.pid, SIGKILL);
  }
  int wstatus = 0;
  ::waitpid(run.pid, &wstatus, 0);
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (open_count == 0 && WIFEXITED(wstatus)) run.exit_code = WEXITSTATUS(wstatus);
  return run;
}

std::string describe(const CtlRun& run) {
  return "exit " + std::to_string(run.exit_code) + "\n--- stdout:\n" + run.out + "--- stderr:\n" +
         run.err;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = text.find('\n', start);
    out.push_back(text.substr(start, end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

// The line that starts with `prefix` (after leading spaces); empty if none.
std::string lineStarting(const std::string& text, const std::string& prefix) {
  for (const std::string& line : lines(text)) {
    const std::size_t first = line.find_first_not_of(' ');
    if (first != std::string::npos && line.compare(first, prefix.size(), prefix) == 0) return line;
  }
  return "";
}

// Stands in for the daemon: answers each control hello with what `answer`
// sends, and records the hellos it got.
class ScriptedDaemon {
 public:
  ScriptedDaemon(const std::string& path, std::function<void(int fd)> answer)
      : answer_(std::move(answer)) {
    auto address = socketAddress(path);
    listen_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    EXPECT_EQ(::bind(listen_.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                     sizeof(sockaddr_un)),
              0);
    EXPECT_EQ(::listen(listen_.get(), 8), 0);
    thread_ = std::thread([this] { serve(); });
  }
  ~ScriptedDaemon() {
    stop_ = true;
    thread_.join();
  }
  std::vector<HelloMsg> hellos() {
    std::lock_guard lock(mutex_);
    return hellos_;
  }

  static std::function<void(int)> reply(std::string json, MsgType type = MsgType::kStatusReply) {
    return [json, type](int fd) {
      std::string message(sizeof(MsgHeader), '\0');
      const MsgHeader header{kControlMagic, kProtocolVersion, static_cast<std::uint32_t>(type),
                             static_cast<std::uint32_t>(sizeof(MsgHeader) + json.size())};
      std::memcpy(message.data(), &header, sizeof(header));
      message += json;
      EXPECT_TRUE(sendMessage(fd, message.data(), message.size()).ok());
    };
  }

 private:
  void serve() {
    while (!stop_) {
      pollfd pfd{listen_.get(), POLLIN, 0};
      if (::poll(&pfd, 1, 20) <= 0) continue;
      UniqueFd fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!fd.valid()) continue;
      auto received = recvMessage(fd.get(), /*block=*/true);
      HelloMsg hello;
      if (received.ok() && decodeMessage(received.value(), MsgType::kHello, hello).ok()) {
        std::lock_guard lock(mutex_);
        hellos_.push_back(hello);
      }
      answer_(fd.get());
    }
  }

  std::function<void(int)> answer_;
  UniqueFd listen_;
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::vector<HelloMsg> hellos_;
  std::thread thread_;
};

// A reply as the daemon with its scheduler writes it: two GPUs, one broken,
// two clients.
constexpr char kFullReply[] = R"({
  "daemon": {"pid": 4242, "protocol": 1, "uptime_s": 3725.5, "draining": false},
  "mps_route": {"route": "direct", "looking": true, "looks": 6, "last_gain": 0.2512,
                "last_tenants": 32},
  "clients": [
    {"id": 1, "pid": 1001, "uid": 1000, "name": "infer-a", "attached_s": 65.2,
     "requests": 5000, "forwarded": 4990, "failed": 2,
     "fallbacks": {"no_daemon": 1, "busy": 2, "timeout": 0}, "route": "served", "mps": "yes",
     "mode": "stream", "sync": "block"},
    {"id": 7, "pid": 1002, "uid": 1000, "name": "infer-b", "attached_s": 3.25,
     "requests": 7345, "forwarded": 7345, "failed": 0, "refused": 0, "failed_opens": 40,
     "declined_unopened": 912,
     "fallbacks": {"no_daemon": 0, "busy": 0, "timeout": 0}, "route": "direct", "mps": "no",
     "mode": "host"}
  ],
  "gpus": [
    {"index": 0, "uuid": "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
     "name": "NVIDIA H100 80GB HBM3", "broken": false, "mps": true, "queued": 3, "in_flight": 1,
     "requests": 12345, "batches": 400, "mean_batch": 30.8625,
     "launches": {"full": 0, "window": 10, "all_waiting": 380, "idle": 10}, "mapped": 57,
     "inline_opens": 12},
    {"index": 1, "uuid": "GPU-11111111-2222-3333-4444-555555555555",
     "name": "NVIDIA H100 80GB HBM3", "broken": true, "mps": false, "queued": 0, "in_flight": 0,
     "requests": 0, "batches": 0, "mean_batch": 0,
     "launches": {"full": 0, "window": 0, "all_waiting": 0, "idle": 0}, "mapped": 0}
  ]
})";

TEST(Stmuxctl, ShowsARealDaemonAndItsTenant) {
  TempDir dir;
  testing::TestSink sink;
  testing::ServerThread server(testing::serverOptions(dir), sink);
  shim::ConnectOptions connect;
  connect.socket_path = dir.socket();
  connect.name = "ctl-tenant";
  auto tenant = shim::Connection::open(connect);
  ASSERT_TRUE(tenant.ok()) << tenant.message();
  Request request{};
  auto ticket = tenant.value()->submit(request, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok()) << ticket.message();
  ASSERT_EQ(tenant.value()->wait(ticket.value(), nowNs() + kSecond, 1'000).outcome,
            WaitOutcome::kDone);
  tenant.value()->release(ticket.value());
  // What the shim would have counted.
  ClientCounters& counters = tenant.value()->counters();
  counters.entry[static_cast<std::size_t>(EntryPoint::kSgemm)].forwarded.store(1);
  counters.entry[static_cast<std::size_t>(EntryPoint::kSgemm)]
      .fallback[static_cast<std::size_t>(Fallback::kBusy)]
      .store(3);
  counters.entry[static_cast<std::size_t>(EntryPoint::kStridedBatched)].forwarded.store(2);
  tenant.value()->syncWord().store(static_cast<std::uint32_t>(ClientSync::kYield));
  const std::string pid = std::to_string(::getpid());

  const CtlRun json = runCtl({"status", "--json"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(json.exit_code, 0) << describe(json);
  EXPECT_EQ(json.err, "");
  ASSERT_FALSE(json.out.empty());
  EXPECT_EQ(json.out.back(), '\n');
  auto parsed = parseJson(json.out);
  ASSERT_TRUE(parsed.ok()) << parsed.message() << "\n" << json.out;
  const Json* clients = jsonFind(parsed.value(), "clients");
  ASSERT_NE(clients, nullptr);
  ASSERT_EQ(clients->size(), 1u) << json.out;
  const Json* client = jsonAt(clients, 0);
  EXPECT_EQ(jsonString(jsonFind(client, "name")), "ctl-tenant");
  EXPECT_EQ(jsonNumber(jsonFind(client, "pid")), ::getpid());
  EXPECT_EQ(jsonNumber(jsonFind(client, "requests")), 1);
  EXPECT_EQ(jsonNumber(jsonFind(client, "forwarded")), 3) << "summed over entry points";
  EXPECT_EQ(jsonString(jsonFind(client, "sync")), "yield");
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(client, "fallbacks"), "busy")), 3);
  const Json* entry_points = jsonFind(client, "entry_points");
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(entry_points, "sgemm"), "calls")), 4) << json.out;
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(entry_points, "sgemm"), "forwarded")), 1);
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(jsonFind(entry_points, "sgemm"), "fallbacks"), "busy")),
            3);
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(entry_points, "strided_batched"), "calls")), 2);
  EXPECT_EQ(jsonFind(entry_points, "gemv"), nullptr) << "entry points with no calls are left out";
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(parsed.value(), "daemon"), "pid")), ::getpid());

  // --socket wins over STMUX_SOCKET.
  const CtlRun human =
      runCtl({"status", "--socket", dir.socket()}, {"STMUX_SOCKET=" + dir.path() + "/nothing"});
  ASSERT_EQ(human.exit_code, 0) << describe(human);
  EXPECT_EQ(human.err, "");
  EXPECT_EQ(
      human.out.rfind(
          "stmuxd: pid " + pid + ", protocol " + std::to_string(kProtocolVersion) + ", up ", 0),
      0u)
      << human.out;
  EXPECT_TRUE(contains(human.out, ", serving\n")) << human.out;
  EXPECT_TRUE(contains(human.out, "\ntenants on MPS: calls go served (0 looks; no look yet)\n"))
      << human.out;
  EXPECT_TRUE(contains(human.out, "GPUs: not reported by this daemon")) << human.out;
  const std::string row = lineStarting(human.out, std::to_string(tenant.value()->clientId()) + " ");
  ASSERT_FALSE(row.empty()) << human.out;
  EXPECT_TRUE(contains(row, " " + pid + " ")) << row;
  EXPECT_TRUE(contains(row, " ctl-tenant ")) << row;
  EXPECT_TRUE(contains(row, " busy=3")) << row;
  EXPECT_FALSE(contains(row, "=0")) << "zero fallbacks are left out: " << row;
  EXPECT_TRUE(contains(lineStarting(human.out, "total"), "1 client")) << human.out;
  EXPECT_TRUE(contains(human.out, "ENTRY POINT")) << human.out;
  const std::string sgemm = lineStarting(human.out, "sgemm ");
  EXPECT_TRUE(contains(sgemm, " 4 ") && contains(sgemm, " busy=3")) << human.out;
  EXPECT_FALSE(lineStarting(human.out, "strided_batched ").empty()) << human.out;
  EXPECT_TRUE(lineStarting(human.out, "gemv ").empty()) << human.out;
}

// The places on MPS the daemon keeps (stmux/mps_seats.h), and how many are
// taken; no line where it keeps none.
TEST(Stmuxctl, ShowsHowManyPlacesOnMpsAreTaken) {
  TempDir dir;
  testing::TestSink sink;
  testing::ServerThread server(testing::serverOptions(dir), sink);
  const CtlRun none = runCtl({"status"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(none.exit_code, 0) << describe(none);
  EXPECT_FALSE(contains(none.out, "places on MPS")) << none.out;

  ASSERT_TRUE(prepareMpsSeats(mpsSeatsDirectory(dir.socket()), 3, dir.path()).ok());
  std::ofstream(dir.path() + "/control") << "";
  const MpsSeat place = takeMpsSeat(mpsSeatsDirectory(dir.socket()), dir.path(), ::geteuid());
  ASSERT_EQ(place.outcome, MpsSeat::Outcome::kSeated) << place.why;
  // The daemon reuses a status it built within the last 100 ms.
  ::usleep(150'000);
  const CtlRun human = runCtl({"status"}, {"STMUX_SOCKET=" + dir.socket()});
  ::close(place.fd);
  ASSERT_EQ(human.exit_code, 0) << describe(human);
  EXPECT_TRUE(contains(human.out, "\nplaces on MPS: 1 of 3 taken (")) << human.out;
  ::usleep(150'000);
  const CtlRun json = runCtl({"status", "--json"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(json.exit_code, 0) << describe(json);
  auto parsed = parseJson(json.out);
  ASSERT_TRUE(parsed.ok()) << parsed.message() << "\n" << json.out;
  const Json* places = jsonFind(parsed.value(), "mps_places");
  EXPECT_EQ(jsonNumber(jsonFind(places, "kept")), 3) << json.out;
  EXPECT_EQ(jsonNumber(jsonFind(places, "taken")), 0) << "the place was given back: " << json.out;
}

TEST(Stmuxctl, ATenantsNameCannotDriveTheTerminal) {
  TempDir dir;
  testing::TestSink sink;
  testing::ServerThread server(testing::serverOptions(dir), sink);
  shim::ConnectOptions connect;
  connect.socket_path = dir.socket();
  connect.name = "evil\x1b]0;owned\x07\xc2\x9b";
  auto tenant = shim::Connection::open(connect);
  ASSERT_TRUE(tenant.ok()) << tenant.message();
  const CtlRun human = runCtl({"status"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(human.exit_code, 0) << describe(human);
  EXPECT_EQ(human.out.find('\x1b'), std::string::npos) << human.out;
  EXPECT_EQ(human.out.find('\x07'), std::string::npos) << human.out;
  EXPECT_EQ(human.out.find("\xc2\x9b"), std::string::npos) << human.out;
  EXPECT_TRUE(contains(human.out, R"(evil\x1b]0;owned\x07\u009b)")) << human.out;
}

// The status of more clients than one message of the socket holds (issue 14:
// it failed beyond about 490) comes in parts, and stmuxctl reads them all.
TEST(Stmuxctl, ShowsEveryClientOfADaemonWithOverAThousand) {
  constexpr int kClients = 1100;
  const testing::FileLimit files(8 * kClients);  // both ends of each connection live here
  if (!files.ok()) GTEST_SKIP() << "needs " << 8 * kClients << " open files, past the hard limit";
  TempDir dir;
  testing::TestSink sink;
  auto options = testing::serverOptions(dir);
  options.slots = 8;
  options.max_clients = 2 * kClients;
  options.max_clients_per_uid = 2 * kClients;  // all of them are this test's
  testing::ServerThread server(options, sink);
  std::vector<std::unique_ptr<shim::Connection>> tenants;
  shim::ConnectOptions connect;
  connect.socket_path = dir.socket();
  for (int i = 0; i < kClients; ++i) {
    connect.name = "tenant-" + std::to_string(i);
    auto tenant = shim::Connection::open(connect);
    ASSERT_TRUE(tenant.ok()) << "tenant " << i << ": " << tenant.message();
    tenants.push_back(std::move(tenant).value());
  }
  const CtlRun json = runCtl({"status", "--json"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(json.exit_code, 0) << describe(json);
  auto parsed = parseJson(json.out, "stmuxctl's output", kMaxStatusBytes);
  ASSERT_TRUE(parsed.ok()) << parsed.message();
  const Json* clients = jsonFind(parsed.value(), "clients");
  ASSERT_NE(clients, nullptr);
  EXPECT_EQ(clients->size(), std::size_t{kClients});
  const CtlRun human = runCtl({"status"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(human.exit_code, 0) << describe(human);
  EXPECT_TRUE(contains(human.out, " tenant-1099 ")) << "the last client is missing";
  EXPECT_TRUE(contains(lineStarting(human.out, "total"), "1100 clients")) << human.out;
}

TEST(Stmuxctl, PrintsGpusClientsAndTotals) {
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply(kFullReply));
  const CtlRun run = runCtl({"status", "--socket=" + dir.socket()});
  // GPU 1 is broken: exit 3, said on stderr, so that a liveness probe
  // restarts the daemon (it kept passing while every call ran direct).
  ASSERT_EQ(run.exit_code, 3) << describe(run);
  EXPECT_EQ(run.err,
            "stmuxctl: 1 GPU of the daemon's is broken: its context failed, and the tenants' "
            "calls there run in their own cuBLAS until stmuxd restarts\n");
  const std::string& out = run.out;
  EXPECT_EQ(lines(out)[0], "stmuxd: pid 4242, protocol 1, up 1h 02m 05s, serving");
  EXPECT_EQ(lines(out)[1],
            "tenants on MPS: calls go direct, looking at the other route (6 looks; last look: "
            "0.25x as many calls the other way, 32 tenants)");

  const std::string header = lineStarting(out, "GPU ");
  const std::string gpu0 = lineStarting(out, "0 ");
  const std::string gpu1 = lineStarting(out, "1 ");
  ASSERT_FALSE(header.empty() || gpu0.empty() || gpu1.empty()) << out;
  for (const char* part :
       {"NVIDIA H100 80GB HBM3", "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", " ok ", " 12345 ",
        " 400 ", " 30.9 ", " 57 ", "full=0 window=10 all_waiting=380 idle=10"}) {
    EXPECT_TRUE(contains(gpu0, part)) << "'" << part << "' missing from\n" << out;
  }
  EXPECT_TRUE(contains(gpu1, " BROKEN ")) << out;
  // Whether the daemon's context is on MPS, in its own column.
  EXPECT_TRUE(std::regex_search(gpu0, std::regex(" ok +yes +3 "))) << out;
  EXPECT_TRUE(std::regex_search(gpu1, std::regex(" BROKEN +no +0 "))) << out;
  // Numbers are right-aligned under their headers.
  EXPECT_EQ(header.find("MEAN BATCH") + 10, gpu0.find(" 30.9 ") + 5) << out;
  EXPECT_EQ(header.find("REQUESTS") + 8, gpu0.find(" 12345 ") + 6) << out;
  const std::string gpu_total = lineStarting(out, "total  2 GPUs");
  ASSERT_FALSE(gpu_total.empty()) << out;
  EXPECT_TRUE(contains(gpu_total, "1 BROKEN")) << gpu_total;
  EXPECT_TRUE(contains(gpu_total, " 12345 ")) << gpu_total;
  // Opens the mapper could not do, where there were any.
  EXPECT_EQ(lineStarting(out, "GPU 0: "),
            "GPU 0: 12 allocations were opened on the executor's thread, not the mapper's "
            "(memory still mapped at their address, or closed since)");
  EXPECT_EQ(lineStarting(out, "GPU 1: "), "") << out;
  // What an honest shim never makes the daemon do, for the client that did.
  EXPECT_EQ(lineStarting(out, "client 7 "),
            "client 7 (pid 1002): 40 opens of its memory failed or crowded out, 912 requests "
            "declined unopened");
  EXPECT_EQ(lineStarting(out, "client 1 "), "") << out;

  const std::string a = lineStarting(out, "1      1001 ");
  const std::string b = lineStarting(out, "7      1002 ");
  ASSERT_FALSE(a.empty() || b.empty()) << out;
  EXPECT_TRUE(contains(a, " infer-a ")) << a;
  // The tenant's MPS state, the route STMUX_ROUTE=auto chose for it, how its
  // served calls keep order (STMUX_MODE) and how its threads wait
  // (STMUX_SYNC; "-" from a daemon that does not say).
  EXPECT_TRUE(std::regex_search(a, std::regex(" 1m 05s +yes +served +stream +block +5000 "))) << a;
  EXPECT_TRUE(std::regex_search(b, std::regex(" 3.2s +no +direct +host +- +7345 "))) << b;
  EXPECT_TRUE(a.ends_with(" no_daemon=1 busy=2")) << "only non-zero fallbacks: " << a;
  EXPECT_TRUE(contains(b, " 3.2s ")) << b;
  EXPECT_TRUE(b.ends_with(" -")) << "no fallbacks at all: " << b;
  // The clients' table comes after the GPUs': its total is the last.
  std::string client_total;
  for (const std::string& line : lines(out)) {
    if (line.starts_with("total ")) client_total = line;
  }
  ASSERT_FALSE(client_total.empty()) << out;
  for (const char* part :
       {"total ", " 2 clients ", " 12345 ", " 12335 ", " 2 ", " no_daemon=1 busy=2"}) {
    EXPECT_TRUE(contains(client_total, part)) << "'" << part << "' missing from " << client_total;
  }

  // What stmuxctl said to the daemon.
  const std::vector<HelloMsg> hellos = daemon.hellos();
  ASSERT_EQ(hellos.size(), 1u);
  EXPECT_EQ(hellos[0].header.version, kProtocolVersion);
  EXPECT_EQ(hellos[0].role, static_cast<std::uint32_t>(Role::kControl));
  EXPECT_EQ(hellos[0].pid, run.pid);
  EXPECT_EQ(fieldString(hellos[0].name), "stmuxctl");
}

TEST(Stmuxctl, ABrokenGpuExits3WithTheJsonToo) {
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(),
                        ScriptedDaemon::reply(R"({"gpus":[{"broken":false},{"broken":true}]})"));
  CtlRun run = runCtl({"status", "--json", "--socket=" + dir.socket()});
  EXPECT_EQ(run.exit_code, 3) << describe(run);
  EXPECT_NE(run.out.find("\"broken\":true"), std::string::npos) << run.out;
  ScriptedDaemon healthy(dir.socket() + "2",
                         ScriptedDaemon::reply(R"({"gpus":[{"broken":false}]})"));
  run = runCtl({"status", "--json", "--socket=" + dir.socket() + "2"});
  EXPECT_EQ(run.exit_code, 0) << describe(run);
}

// The total's mean batch is the GPUs' means weighted by their batches, as
// each row's is launched over batches; the requests count those still queued
// or dropped too (requests over batches showed 10.0 beside a row's 9.0).
TEST(Stmuxctl, TheTotalMeanBatchAgreesWithTheRows) {
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply(R"({"gpus":[
      {"index":0,"broken":false,"requests":1000,"batches":100,"mean_batch":9.0},
      {"index":1,"broken":false,"requests":50,"batches":10,"mean_batch":2.0}]})"));
  const CtlRun run = runCtl({"status", "--socket=" + dir.socket()});
  ASSERT_EQ(run.exit_code, 0) << describe(run);
  const std::string total = lineStarting(run.out, "total  2 GPUs");
  ASSERT_FALSE(total.empty()) << run.out;
  EXPECT_TRUE(contains(total, " 8.4 ")) << total;  // (9 x 100 + 2 x 10) / 110
}

TEST(Stmuxctl, JsonIsPrintedAsReceived) {
  TempDir dir;
  const std::string reply = R"({"daemon": {"pid": 1} ,  "later": [1, 2.50, "x"]})";
  ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply(reply));
  const CtlRun run = runCtl({"--json", "status"}, {"STMUX_SOCKET=" + dir.socket()});
  ASSERT_EQ(run.exit_code, 0) << describe(run);
  EXPECT_EQ(run.out, reply + "\n");
  EXPECT_EQ(run.err, "");
}

TEST(Stmuxctl, MissingAndOddFieldsPrintDashes) {
  const std::string replies[] = {
      "{}",
      "[]",
      "null",
      R"("text")",
      R"({"daemon":7,"clients":{},"gpus":"none"})",
      R"({"daemon":{"pid":"x","uptime_s":-5,"draining":1},"clients":[{},7,[],null],)"
      R"("gpus":[{},"x",{"index":"0","launches":[1],"broken":"yes","mean_batch":null}]})",
      R"({"daemon":{"pid":1e300,"protocol":-0.5,"uptime_s":1e300,"draining":true,"new":[[1]]},)"
      R"("clients":[{"name":"","fallbacks":{"busy":"3","odd":true,"new_reason":4}}],"gpus":[]})",
  };
  for (const std::string& reply : replies) {
    TempDir dir;
    ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply(reply));
    const CtlRun run = runCtl({"status", "--socket", dir.socket()});
    EXPECT_EQ(run.exit_code, 0) << reply << "\n" << describe(run);
    EXPECT_EQ(run.err, "") << reply;
    EXPECT_TRUE(contains(run.out, " -")) << reply << "\n" << run.out;
    if (contains(reply, "1e300")) {
      EXPECT_TRUE(contains(run.out, "stmuxd: pid 1e+300, protocol -0.5, up 1e+300s, draining"))
          << run.out;
      EXPECT_TRUE(contains(run.out, "  new_reason=4\n")) << "only numeric counts: " << run.out;
    }
  }
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply("{}"));
  const CtlRun run = runCtl({"status", "--socket", dir.socket()});
  EXPECT_EQ(run.out,
            "stmuxd: pid -, protocol -, up -, -\n\nGPUs: not reported by this daemon\n\n"
            "clients: -\n");
}

TEST(Stmuxctl, AReplyThatIsNotJsonIsAnError) {
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply(R"({"daemon":{"pid":1,}})"));
  const CtlRun run = runCtl({"status", "--socket", dir.socket()});
  EXPECT_EQ(run.exit_code, 1) << describe(run);
  EXPECT_EQ(run.out, "");
  EXPECT_TRUE(contains(run.err, "not valid JSON: invalid JSON at byte 19")) << run.err;
  EXPECT_TRUE(contains(run.err, "--json")) << run.err;
}

TEST(Stmuxctl, ARefusalIsReportedWithItsReason) {
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(), [](int fd) {
    auto refuse = makeMessage<RefuseMsg>(MsgType::kRefuse);
    refuse.daemon_version = kProtocolVersion;
    setField(refuse.reason, "the daemon is shutting down");
    EXPECT_TRUE(sendMessage(fd, &refuse, sizeof(refuse)).ok());
  });
  const CtlRun run = runCtl({"status", "--socket", dir.socket()});
  EXPECT_EQ(run.exit_code, 1) << describe(run);
  EXPECT_EQ(run.out, "");
  EXPECT_EQ(run.err,
            "stmuxctl: the daemon at " + dir.socket() + " refused: the daemon is shutting down\n");
}

TEST(Stmuxctl, ADaemonThatHangsUpOrSaysNothingIsReported) {
  {
    TempDir dir;
    ScriptedDaemon daemon(dir.socket(), [](int) {});
    const CtlRun run = runCtl({"status", "--socket", dir.socket()});
    EXPECT_EQ(run.exit_code, 1) << describe(run);
    EXPECT_TRUE(contains(run.err, "closed the connection without answering")) << run.err;
  }
  {
    TempDir dir;
    ScriptedDaemon daemon(dir.socket(), [](int) { ::sleep(3); });
    const CtlRun run = runCtl({"status", "--socket", dir.socket()});
    EXPECT_EQ(run.exit_code, 1) << describe(run);
    EXPECT_EQ(run.err, "stmuxctl: the daemon at " + dir.socket() + " did not answer within 2 s\n");
    EXPECT_GE(run.seconds, 1.9);
    EXPECT_LT(run.seconds, 2.9) << "it waited for the daemon, not for its timeout";
  }
  {
    // A part of the status, then nothing: said as such ("did not answer" before).
    TempDir dir;
    ScriptedDaemon daemon(dir.socket(), [](int fd) {
      ScriptedDaemon::reply(R"({"daemon":)", MsgType::kStatusPart)(fd);
      ::sleep(3);
    });
    const CtlRun run = runCtl({"status", "--socket", dir.socket()});
    EXPECT_EQ(run.exit_code, 1) << describe(run);
    EXPECT_EQ(run.err, "stmuxctl: the daemon at " + dir.socket() +
                           " sent 10 bytes of its status, then nothing more within 2 s\n");
  }
  {
    TempDir dir;
    ScriptedDaemon daemon(dir.socket(), [](int fd) {
      const char garbage[] = "HTTP/1.1 400 Bad Request\r\n";
      EXPECT_TRUE(sendMessage(fd, garbage, sizeof(garbage)).ok());
    });
    const CtlRun run = runCtl({"status", "--socket", dir.socket()});
    EXPECT_EQ(run.exit_code, 1) << describe(run);
    EXPECT_TRUE(contains(run.err, "unexpected answer from " + dir.socket())) << run.err;
  }
}

TEST(Stmuxctl, NoDaemonNamesTheSocket) {
  TempDir dir;
  const CtlRun missing = runCtl({"status"}, {"STMUX_SOCKET=" + dir.socket()});
  EXPECT_EQ(missing.exit_code, 1) << describe(missing);
  EXPECT_EQ(missing.out, "");
  EXPECT_EQ(missing.err,
            "stmuxctl: no daemon at " + dir.socket() + ": No such file or directory\n");

  // A socket file left behind by a daemon that died.
  {
    auto address = socketAddress(dir.socket());
    UniqueFd stale(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::bind(stale.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                     sizeof(sockaddr_un)),
              0);
  }
  const CtlRun stale = runCtl({"status", "--json", "--socket", dir.socket()});
  EXPECT_EQ(stale.exit_code, 1) << describe(stale);
  EXPECT_EQ(stale.err, "stmuxctl: no daemon at " + dir.socket() + ": Connection refused\n");

  // An STMUX_LOG the daemon and the shim would refuse gets a word, not silence,
  // and stops nothing.
  const CtlRun noted = runCtl({"status", "--socket", dir.socket()}, {"STMUX_LOG=loud"});
  EXPECT_EQ(noted.exit_code, 1) << describe(noted);
  EXPECT_TRUE(contains(noted.err, "stmuxctl: note: STMUX_LOG='loud' is invalid")) << noted.err;

  // With neither --socket nor STMUX_SOCKET: the configuration table's default.
  if (!std::filesystem::exists("/run/stmux/stmuxd.sock")) {
    const CtlRun fallback = runCtl({"status"});
    EXPECT_EQ(fallback.exit_code, 1) << describe(fallback);
    EXPECT_TRUE(contains(fallback.err, "no daemon at /run/stmux/stmuxd.sock: ")) << fallback.err;
  }
}

TEST(Stmuxctl, BadUsageExits2NamingTheFault) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{}, "no command given"},
      {{"--jsn"}, "unknown option '--jsn'"},
      {{"status", "-j"}, "unknown option '-j'"},
      {{"stats"}, "unknown command 'stats'; accepted: status, help"},
      {{"status", "clients"}, "unexpected argument 'clients'"},
      {{"status", "--socket"}, "--socket needs a path"},
      {{"status", "--socket="}, "--socket: socket path '' must be 1 to 107 bytes"},
      {{"status", "--socket", std::string(200, 's')}, "must be 1 to 107 bytes"},
  };
  for (const auto& [args, says] : cases) {
    const CtlRun run = runCtl(args);
    EXPECT_EQ(run.exit_code, 2) << says << "\n" << describe(run);
    EXPECT_EQ(run.out, "") << says;
    EXPECT_EQ(run.err.rfind("stmuxctl: ", 0), 0u) << run.err;
    EXPECT_TRUE(contains(lines(run.err)[0], says)) << "wanted '" << says << "' in\n" << run.err;
    EXPECT_TRUE(contains(run.err, "usage: stmuxctl status")) << run.err;
  }
}

TEST(Stmuxctl, HelpGoesToStdout) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--help"}, {"help"}, {"-h"}, {"status", "--help"}}) {
    const CtlRun run = runCtl(args);
    EXPECT_EQ(run.exit_code, 0) << describe(run);
    EXPECT_EQ(run.err, "");
    EXPECT_EQ(run.out.rfind("usage: stmuxctl status [--json] [--socket PATH]\n", 0), 0u) << run.out;
    EXPECT_TRUE(contains(run.out, "/run/stmux/stmuxd.sock")) << "names the default socket";
  }
}

TEST(Stmuxctl, ABadStmuxSocketIsAConfigurationError) {
  const CtlRun run = runCtl({"status"}, {"STMUX_SOCKET=" + std::string(120, 'x')});
  EXPECT_EQ(run.exit_code, 2) << describe(run);
  EXPECT_TRUE(contains(run.err, "stmuxctl: STMUX_SOCKET='xxx")) << run.err;
  EXPECT_TRUE(contains(run.err, "accepted: an absolute path of at most 107 bytes")) << run.err;

  // Only the socket is stmuxctl's business: --socket makes STMUX_SOCKET
  // irrelevant, and a tenant setting left in the shell is ignored.
  TempDir dir;
  ScriptedDaemon daemon(dir.socket(), ScriptedDaemon::reply("{}"));
  const CtlRun overridden =
      runCtl({"status", "--socket", dir.socket()}, {"STMUX_SOCKET=" + std::string(120, 'x')});
  EXPECT_EQ(overridden.exit_code, 0) << describe(overridden);
  const CtlRun unrelated =
      runCtl({"status"}, {"STMUX_SOCKET=" + dir.socket(), "STMUX_TIMEOUT_MS=soon"});
  EXPECT_EQ(unrelated.exit_code, 0) << describe(unrelated);
}

}  // namespace
}  // namespace stmux

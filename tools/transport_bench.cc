// stmux-transport-bench: the shim-to-daemon transport alone, end to end.
//
// A server process runs the daemon's real transport (daemon/server.cc) with a
// sink that only acknowledges; client processes use the shim's real client
// (shim/transport.cc). Each client keeps `depth` requests in flight in a closed
// loop and records every round trip; the table gives p50/p99/p99.9 and the
// total rate per scenario. No GPU is involved: this is the floor under every
// intercepted call.
#include <getopt.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "daemon/server.h"
#include "shim/transport.h"
#include "stmux/json.h"
#include "stmux/log.h"
#include "stmux/segment.h"
#include "tools/args.h"
#include "tools/latency.h"

namespace stmux::tools {
namespace {

class AckSink : public daemon::RequestSink {
 public:
  void onRequest(const daemon::ClientPtr& client, const Request& request, std::uint64_t) override {
    Slot& slot = client->view.slot(request.slot);
    if (slotClaim(slot, request.generation)) {
      slotComplete(slot, request.generation, kStatusSuccess);
    }
  }
};

struct Scenario {
  int clients;
  int depth;
};

struct Options {
  std::vector<Scenario> scenarios = {{1, 1}, {4, 1}, {4, 32}};
  std::uint64_t requests = 200'000;  // per client, after warm-up
  std::uint64_t warmup = 20'000;
  std::uint64_t spin_us = 1'000'000;  // clients spin: the latency target is "with spinning"
  std::uint64_t server_spin_us = 1'000'000;
  std::string json_path;
};

// Per-client results, in memory shared with the coordinating parent.
struct ClientResult {
  std::uint64_t start_ns;
  std::uint64_t end_ns;
  std::uint64_t completed;
  std::uint64_t errors;
};

struct Row {
  Scenario scenario;
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
  double seconds = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0;
};

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: stmux-transport-bench [options]\n"
      "Measures the shim-daemon transport alone (no GPU): round-trip latency and\n"
      "requests per second, with a server that only acknowledges.\n\n"
      "  --scenario C:D      C client processes, D requests in flight each; repeat\n"
      "                      the flag for several; C and D 1..256 (default 1:1, 4:1, 4:32)\n"
      "  --requests N        timed requests per client, 1..10^9 (default 200000)\n"
      "  --warmup N          untimed requests per client first, 0..10^9 (default 20000)\n"
      "  --spin-us N         client spin before sleeping, 0..10^8 (default 1000000)\n"
      "  --server-spin-us N  server spin before sleeping, 0..10^8 (default 1000000)\n"
      "  --json FILE         also write the results as JSON\n"
      "  --help              this text\n"
      "Exit status: 0 done, 1 a request failed or the JSON could not be written, 2\n"
      "bad arguments.\n");
}

bool parseArgs(int argc, char** argv, Options& options) {
  static const option kLong[] = {{"scenario", required_argument, nullptr, 's'},
                                 {"requests", required_argument, nullptr, 'r'},
                                 {"warmup", required_argument, nullptr, 'w'},
                                 {"spin-us", required_argument, nullptr, 'p'},
                                 {"server-spin-us", required_argument, nullptr, 'q'},
                                 {"json", required_argument, nullptr, 'j'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  bool custom = false;
  auto number = [](const char* text, const char* flag, std::uint64_t lo,
                   std::uint64_t hi) -> std::optional<std::uint64_t> {
    const auto value = wholeIn<std::uint64_t>(text, lo, hi);
    if (!value) {
      std::fprintf(stderr,
                   "stmux-transport-bench: %s '%s': accepted: an integer from %llu to %llu\n", flag,
                   text, static_cast<unsigned long long>(lo), static_cast<unsigned long long>(hi));
    }
    return value;
  };
  int c;
  while ((c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1) {
    switch (c) {
      case 's': {
        int clients = 0, depth = 0;
        char tail = 0;
        if (std::sscanf(optarg, "%d:%d%c", &clients, &depth, &tail) != 2 || clients < 1 ||
            clients > 256 || depth < 1 || depth > 256) {
          std::fprintf(stderr,
                       "stmux-transport-bench: --scenario '%s': accepted: C:D with C in 1..256 "
                       "and D in 1..256\n",
                       optarg);
          return false;
        }
        if (!custom) options.scenarios.clear();
        custom = true;
        options.scenarios.push_back({clients, depth});
        break;
      }
      case 'r': {
        auto v = number(optarg, "--requests", 1, 1'000'000'000);
        if (!v) return false;
        options.requests = *v;
        break;
      }
      case 'w': {
        auto v = number(optarg, "--warmup", 0, 1'000'000'000);
        if (!v) return false;
        options.warmup = *v;
        break;
      }
      case 'p': {
        auto v = number(optarg, "--spin-us", 0, 100'000'000);
        if (!v) return false;
        options.spin_us = *v;
        break;
      }
      case 'q': {
        auto v = number(optarg, "--server-spin-us", 0, 100'000'000);
        if (!v) return false;
        options.server_spin_us = *v;
        break;
      }
      case 'j':
        options.json_path = optarg;
        break;
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        usage(stderr);
        return false;
    }
  }
  if (optind != argc) {
    std::fprintf(stderr, "stmux-transport-bench: unexpected argument '%s'\n", argv[optind]);
    return false;
  }
  return true;
}

// One client process: connect, wait for the start signal, run the loop.
int runClient(const Options& options, const std::string& socket, int depth, std::atomic<int>* ready,
              std::atomic<int>* go, ClientResult* result, std::uint32_t* latencies) {
  shim::ConnectOptions connect;
  connect.socket_path = socket;
  connect.name = "transport-bench";
  auto connection = shim::Connection::open(connect);
  if (!connection) {
    std::fprintf(stderr, "client %d: %s\n", ::getpid(), connection.message().c_str());
    return 1;
  }
  shim::Connection& conn = *connection.value();
  const std::uint64_t spin_ns = options.spin_us * 1000;
  const std::uint64_t total = options.warmup + options.requests;
  std::vector<shim::Ticket> tickets(depth);
  std::vector<std::uint64_t> sent(depth);
  std::uint64_t submitted = 0, completed = 0, errors = 0;
  Request request{};
  request.op = static_cast<std::uint32_t>(Op::kSgemm);

  auto submit = [&](int lane) {
    sent[lane] = nowNs();
    auto ticket = conn.submit(request, sent[lane] + 10'000'000'000ull);
    if (!ticket) return false;
    tickets[lane] = ticket.value();
    ++submitted;
    return true;
  };
  ready->fetch_add(1);
  while (go->load() == 0)
    cpuRelax();
  for (int lane = 0; lane < depth && submitted < total; ++lane) {
    if (!submit(lane)) return 2;
  }
  int lane = 0;
  while (completed < total) {
    auto outcome = conn.wait(tickets[lane], nowNs() + 10'000'000'000ull, spin_ns);
    const std::uint64_t now = nowNs();
    if (outcome.outcome != WaitOutcome::kDone || outcome.status != kStatusSuccess) ++errors;
    conn.release(tickets[lane]);
    if (completed == options.warmup) result->start_ns = now;
    if (completed >= options.warmup) {
      const std::uint64_t rtt = now - sent[lane];
      latencies[completed - options.warmup] =
          static_cast<std::uint32_t>(std::min<std::uint64_t>(rtt, UINT32_MAX));
    }
    ++completed;
    if (submitted < total && !submit(lane)) return 2;
    lane = (lane + 1) % depth;
  }
  result->end_ns = nowNs();
  result->completed = options.requests;
  result->errors = errors;
  return 0;
}

std::optional<Row> runScenario(const Options& options, const std::string& socket,
                               const Scenario& scenario) {
  const std::size_t per_client = options.requests;
  const std::size_t bytes =
      128 + scenario.clients * (sizeof(ClientResult) + per_client * sizeof(std::uint32_t));
  void* shared = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) return std::nullopt;
  auto* ready = new (shared) std::atomic<int>(0);
  auto* go = new (static_cast<char*>(shared) + 64) std::atomic<int>(0);
  auto* results = reinterpret_cast<ClientResult*>(static_cast<char*>(shared) + 128);
  auto* latencies = reinterpret_cast<std::uint32_t*>(results + scenario.clients);

  std::vector<pid_t> children;
  for (int c = 0; c < scenario.clients; ++c) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::_exit(runClient(options, socket, scenario.depth, ready, go, &results[c],
                        latencies + c * per_client));
    }
    children.push_back(pid);
  }
  while (ready->load() < scenario.clients) {
    int status;
    if (::waitpid(-1, &status, WNOHANG) > 0) {  // a client failed to attach
      for (pid_t pid : children)
        ::kill(pid, SIGKILL);
      while (::wait(nullptr) > 0) {
      }
      ::munmap(shared, bytes);
      return std::nullopt;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  go->store(1);
  bool failed = false;
  for (pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
  }
  Row row{scenario};
  std::uint64_t first = UINT64_MAX, last = 0;
  for (int c = 0; c < scenario.clients; ++c) {
    first = std::min(first, results[c].start_ns);
    last = std::max(last, results[c].end_ns);
    row.requests += results[c].completed;
    row.errors += results[c].errors;
  }
  std::vector<std::uint32_t> all(latencies, latencies + scenario.clients * per_client);
  ::munmap(shared, bytes);
  if (failed) return std::nullopt;
  row.seconds = static_cast<double>(last - first) / 1e9;
  row.p50_us = percentileUs(all, 0.50);
  row.p99_us = percentileUs(all, 0.99);
  row.p999_us = percentileUs(all, 0.999);
  return row;
}

int run(int argc, char** argv) {
  Options options;
  if (!parseArgs(argc, argv, options)) return 2;
  // Opened before the run, so that a path it cannot write costs no run.
  FILE* json_file = nullptr;
  if (!options.json_path.empty()) {
    json_file = std::fopen(options.json_path.c_str(), "w");
    if (json_file == nullptr) {
      std::fprintf(stderr, "stmux-transport-bench: cannot write %s (--json): %s\n",
                   options.json_path.c_str(), std::strerror(errno));
      return 2;
    }
  }
  char dir_template[] = "/tmp/stmux-bench-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  const std::string socket = dir + "/stmuxd.sock";

  // The server is a process of its own, like stmuxd.
  const pid_t server_pid = ::fork();
  if (server_pid == 0) {
    AckSink sink;
    daemon::ServerOptions server_options;
    server_options.socket_path = socket;
    server_options.spin_ns = options.server_spin_us * 1000;
    daemon::Server server(server_options, sink);
    if (Status status = server.listen(); !status.ok()) {
      std::fprintf(stderr, "server: %s\n", status.message().c_str());
      ::_exit(1);
    }
    server.run();
    ::_exit(0);
  }
  while (!std::filesystem::exists(socket)) {
    if (::waitpid(server_pid, nullptr, WNOHANG) == server_pid) return 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  std::vector<Row> rows;
  for (const Scenario& scenario : options.scenarios) {
    std::fprintf(stderr, "running %d client(s), %d in flight each, %llu requests each...\n",
                 scenario.clients, scenario.depth,
                 static_cast<unsigned long long>(options.warmup + options.requests));
    auto row = runScenario(options, socket, scenario);
    if (!row) {
      std::fprintf(stderr, "stmux-transport-bench: scenario %d:%d failed\n", scenario.clients,
                   scenario.depth);
      ::kill(server_pid, SIGKILL);
      ::waitpid(server_pid, nullptr, 0);
      std::filesystem::remove_all(dir);
      return 1;
    }
    rows.push_back(*row);
  }
  ::kill(server_pid, SIGKILL);
  ::waitpid(server_pid, nullptr, 0);
  std::filesystem::remove_all(dir);

  std::printf("%8s %8s %12s %10s %10s %10s %14s %8s\n", "clients", "depth", "requests", "p50 us",
              "p99 us", "p99.9 us", "requests/s", "errors");
  Json json;
  Json& scenarios = json["scenarios"] = Json::array();
  for (const Row& row : rows) {
    const double rate = row.seconds > 0 ? static_cast<double>(row.requests) / row.seconds : 0;
    std::printf("%8d %8d %12llu %10.2f %10.2f %10.2f %14.0f %8llu\n", row.scenario.clients,
                row.scenario.depth, static_cast<unsigned long long>(row.requests), row.p50_us,
                row.p99_us, row.p999_us, rate, static_cast<unsigned long long>(row.errors));
    Json& scenario = scenarios.emplace_back();
    scenario["clients"] = row.scenario.clients;
    scenario["depth"] = row.scenario.depth;
    scenario["requests"] = row.requests;
    scenario["errors"] = row.errors;
    scenario["p50_us"] = row.p50_us;
    scenario["p99_us"] = row.p99_us;
    scenario["p999_us"] = row.p999_us;
    scenario["requests_per_s"] = rate;
  }
  json["cpus"] = std::thread::hardware_concurrency();
  if (json_file != nullptr) {
    const bool written =
        std::fprintf(json_file, "%s\n", dumpJson(json).c_str()) > 0 && std::fclose(json_file) == 0;
    if (!written) {
      std::fprintf(stderr, "stmux-transport-bench: cannot write %s (--json): %s\n",
                   options.json_path.c_str(), std::strerror(errno));
      return 1;
    }
  }
  bool errors = false;
  for (const Row& row : rows)
    errors |= row.errors != 0;
  return errors ? 1 : 0;
}

}  // namespace
}  // namespace stmux::tools

int main(int argc, char** argv) {
  return stmux::tools::run(argc, argv);
}

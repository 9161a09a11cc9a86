// The differential correctness suite: stmux-differential (tools/differential.cc)
// preloaded with libstmux.so in several processes against a real daemon on a
// GPU. Every call is made through the shim and through libcublas's own
// function and both are checked against a float64 reference; the shim's
// counters must account for every call, and the daemon must have served all
// that it should (a suite that silently falls back proves nothing). Then the
// same through two daemon restarts. Seeded: the master seed is printed with
// the command that reruns it, and a mismatch prints the call's replay
// command. Skipped, saying so, where there is no CUDA device.
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_fixture.h"
#include "shim_stats.h"

namespace stmux {
namespace {

using testing::daemonStatus;
using testing::gpuField;
using testing::shimStats;
using testing::ShimStats;

// The totals line, "calls N mismatches M lost L expected_direct_no_op A
// expected_direct_invalid_args B expected_direct_not_exportable C", as a map.
std::map<std::string, long> totalsOf(const std::string& out) {
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("calls ", 0) != 0) continue;
    std::map<std::string, long> totals;
    std::istringstream words(line);
    std::string key;
    long value;
    while (words >> key >> value)
      totals[key] = value;
    return totals;
  }
  return {};
}

// What a failed run said: its mismatch lines (each with its replay command),
// and the end of its stderr.
std::string failureText(const Process& p) {
  std::istringstream lines(p.out());
  std::string text;
  int shown = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("MISMATCH", 0) == 0 && shown++ < 20) text += line + "\n";
  }
  if (shown > 20) text += "(" + std::to_string(shown - 20) + " more mismatch lines)\n";
  if (shown > 0) {
    text += "Replay a call under the shim: LD_PRELOAD=" SHIM_PATH
            " STMUX_SOCKET=<a running stmuxd's socket> " DIFFERENTIAL_PATH " <its options>\n";
  }
  const std::string err = p.err();
  return text + "stderr (end):\n" + err.substr(err.size() > 3000 ? err.size() - 3000 : 0);
}

// Per-class counts summed over processes, in the order the program prints.
class ClassTable {
 public:
  void add(const std::string& out) {
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) {
      std::istringstream words(line);
      std::string tag, name, calls_word, mismatches_word;
      long calls = 0, mismatches = 0;
      if (!(words >> tag >> name >> calls_word >> calls >> mismatches_word >> mismatches) ||
          tag != "class") {
        continue;
      }
      if (!rows_.count(name)) order_.push_back(name);
      rows_[name].first += calls;
      rows_[name].second += mismatches;
    }
  }
  void print() const {
    for (const std::string& name : order_) {
      std::cout << "class " << name << " calls " << rows_.at(name).first << " mismatches "
                << rows_.at(name).second << "\n";
    }
  }
  const std::vector<std::string>& names() const { return order_; }
  long calls(const std::string& name) const { return rows_.at(name).first; }

 private:
  std::vector<std::string> order_;
  std::map<std::string, std::pair<long, long>> rows_;
};

std::uint64_t masterSeed() {
  if (const char* text = getenv("STMUX_DIFF_SEED"); text != nullptr && *text != '\0') {
    return std::strtoull(text, nullptr, 10);
  }
  return static_cast<std::uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
}

// The run's "elapsed S s, R calls/s" line.
std::string elapsedOf(const std::string& out) {
  const std::size_t at = out.find("\nelapsed ");
  return at == std::string::npos ? "?" : out.substr(at + 9, out.find('\n', at + 1) - at - 9);
}

std::string directText(const ShimStats& stats) {
  std::string text;
  for (const auto& [reason, n] : stats.direct)
    text += " " + reason + "=" + std::to_string(n);
  return text.empty() ? " none" : text;
}

// Each test runs in both ways of keeping stream order (STMUX_MODE): host,
// and stream, where the call returns once queued and the GPU keeps the order.
class Preloaded : public testing::DaemonFixture, public ::testing::WithParamInterface<std::string> {
 protected:
  struct Run {
    std::uint64_t seed;
    int threads;
    long calls;
    Process process;
  };

  Run start(int index, std::uint64_t seed, int threads, long calls,
            const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv = {
        DIFFERENTIAL_PATH,       "--seed",  std::to_string(seed), "--threads",
        std::to_string(threads), "--calls", std::to_string(calls)};
    argv.insert(argv.end(), extra.begin(), extra.end());
    // STMUX_ROUTE=serve: the suite requires the daemon to serve every call it
    // can, and a lone process off MPS may measure itself faster direct.
    const std::map<std::string, std::string> env = {{"LD_PRELOAD", SHIM_PATH},
                                                    {"STMUX_SOCKET", dir_.socket()},
                                                    {"STMUX_LOG", "stats=info"},
                                                    {"STMUX_ROUTE", "serve"},
                                                    {"STMUX_MODE", GetParam()}};
    return Run{seed, threads, calls,
               Process(argv, env, dir_.path() + "/differential" + std::to_string(index))};
  }

  double requests() const {
    auto status = daemonStatus(dir_.socket());
    return status ? gpuField(*status, "requests") : -1;
  }
};

// 8 processes of 1 to 16 threads, at least 100,000 calls: no mismatch, and
// the shim's counters account for every call exactly: served, except the
// no-ops, the calls cuBLAS refuses and those on memory CUDA IPC cannot
// export, which go straight to cuBLAS by design under those reasons alone.
TEST_P(Preloaded, EveryCallMatchesRealCublasAndTheDaemonServesAllItShould) {
  const std::uint64_t master = masterSeed();
  std::cout << "master seed " << master << " (rerun: STMUX_DIFF_SEED=" << master
            << " ctest -R differential)" << std::endl;
  std::mt19937_64 random(master);
  constexpr int kProcesses = 8;
  constexpr long kCalls = 100'000;
  std::vector<int> threads(kProcesses);
  int all_threads = 0;
  for (int i = 0; i < kProcesses; ++i) {
    threads[i] = i == 0 ? 1 : i == 1 ? 16 : std::uniform_int_distribution<int>(1, 16)(random);
    all_threads += threads[i];
  }
  // Calls in proportion to threads, so that the processes end together.
  std::vector<Run> runs;
  for (int i = 0; i < kProcesses; ++i) {
    const long calls = (kCalls * threads[i] + all_threads - 1) / all_threads;
    runs.push_back(start(i, random(), threads[i], calls));
  }

  long total_calls = 0, total_served = 0, total_should = 0;
  std::map<std::string, long> total_direct;
  ClassTable classes;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    Run& run = runs[i];
    // About a minute's work; a process still calling after five is stuck.
    const int status = run.process.wait(std::chrono::seconds(300));
    if (status < 0) ADD_FAILURE() << "stuck:\n" << run.process.stuckReport();
    const std::string out = run.process.out();
    const std::string name = "process " + std::to_string(i) + " (--seed " +
                             std::to_string(run.seed) + " --threads " +
                             std::to_string(run.threads) + ")";
    EXPECT_EQ(status, 0) << name << ":\n" << failureText(run.process);
    const auto totals = totalsOf(out);
    ASSERT_FALSE(totals.empty()) << name << " printed no totals:\n" << failureText(run.process);
    EXPECT_EQ(totals.at("mismatches"), 0) << name;
    EXPECT_EQ(totals.at("calls"), run.calls) << name;
    classes.add(out);

    const ShimStats stats = shimStats(run.process.err());
    ASSERT_GE(stats.calls, 0) << name << ": no shim stats line:\n" << failureText(run.process);
    const long calls = totals.at("calls");
    const long no_op = totals.at("expected_direct_no_op");
    const long invalid = totals.at("expected_direct_invalid_args");
    const long not_exportable = totals.at("expected_direct_not_exportable");
    const long should = calls - no_op - invalid - not_exportable;
    std::map<std::string, long> expected_direct;
    if (no_op > 0) expected_direct["no_op"] = no_op;
    if (invalid > 0) expected_direct["invalid_args"] = invalid;
    if (not_exportable > 0) expected_direct["not_exportable"] = not_exportable;
    EXPECT_EQ(stats.calls, calls) << name;
    EXPECT_EQ(stats.failed, 0) << name;
    EXPECT_EQ(stats.served, should) << name << ": " << run.process.err();
    EXPECT_EQ(stats.direct, expected_direct) << name << ": direct" << directText(stats);
    const double share = should > 0 ? static_cast<double>(stats.served) / should : 1.0;
    EXPECT_GE(share, 0.999) << name;
    // Stream order takes the calls with beta == 0 (the others go the host way).
    if (GetParam() == "stream") {
      EXPECT_GT(stats.stream_ordered, 0) << name << ": " << run.process.err();
    } else {
      EXPECT_EQ(stats.stream_ordered, 0) << name;
    }
    std::cout << name << ": calls " << calls << ", served " << stats.served << " of " << should
              << " (" << 100.0 * share << "%, " << stats.stream_ordered
              << " stream-ordered), failed " << stats.failed << ", direct" << directText(stats)
              << "; " << elapsedOf(run.process.out()) << std::endl;
    total_calls += calls;
    total_served += stats.served;
    total_should += should;
    for (const auto& [reason, n] : stats.direct)
      total_direct[reason] += n;
  }
  classes.print();
  std::string direct;
  for (const auto& [reason, n] : total_direct)
    direct += " " + reason + "=" + std::to_string(n);
  std::cout << "total: calls " << total_calls << ", served by stmuxd " << total_served << " of "
            << total_should << " ("
            << (total_should > 0 ? 100.0 * total_served / total_should : 100.0) << "%), direct"
            << direct << std::endl;
  EXPECT_GE(total_calls, 100'000);
  EXPECT_GE(requests(), total_served) << "the daemon counted fewer requests than the shims";
  // Every value of every class was drawn often enough to mean something.
  for (const std::string& name : classes.names()) {
    EXPECT_GE(classes.calls(name), 50) << "class " << name << " was hardly drawn";
  }
}

// The daemon stopped with SIGTERM (it drains: calls in flight finish, new
// ones go straight to cuBLAS) and started again, then killed with SIGKILL
// (calls in flight are lost or re-run) and started again, while 4 processes
// call: no mismatch; a call reported lost only with beta != 0 (the program
// counts one with beta == 0 as a mismatch); every call accounted for; the
// processes attach again and are served.
TEST_P(Preloaded, TwoDaemonRestartsMidRunLoseNoCallAndTheProcessesComeBack) {
  const std::uint64_t master = masterSeed();
  std::cout << "master seed " << master << " (rerun: STMUX_DIFF_SEED=" << master
            << " ctest -R differential)" << std::endl;
  std::mt19937_64 random(master ^ 0x5265737461727473ull);
  constexpr int kProcesses = 4;
  constexpr long kCallsPerProcess = 5'000;
  std::vector<Run> runs;
  for (int i = 0; i < kProcesses; ++i) {
    const int threads = std::uniform_int_distribution<int>(2, 4)(random);
    runs.push_back(start(i, random(), threads, kCallsPerProcess, {"--allow-lost-calls"}));
  }
  auto running = [&] {
    int n = 0;
    for (const Run& run : runs)
      n += run.process.running() ? 1 : 0;
    return n;
  };
  // Restarts while every process is attached and calling.
  auto served_again = [&] {
    return testing::waitFor([&] { return requests() > 0; }, std::chrono::seconds(30));
  };
  const auto begin = std::chrono::steady_clock::now();
  auto say = [&](const std::string& what) {
    const std::chrono::duration<double> t = std::chrono::steady_clock::now() - begin;
    std::cout << t.count() << " s: " << what << ", " << running() << " of " << kProcesses
              << " processes calling" << std::endl;
  };
  ASSERT_TRUE(served_again()) << "the processes were never served";
  ASSERT_EQ(running(), kProcesses) << "the processes ended before the first restart";
  say("served; SIGTERM");
  stopDaemon();  // drains, exits 0
  say("stopped; starting");
  startDaemon();
  ASSERT_TRUE(served_again()) << "no process came back after the SIGTERM restart";
  ASSERT_GT(running(), 0) << "the processes ended before the second restart";
  say("served again; SIGKILL");
  daemon_.signal(SIGKILL);
  ASSERT_EQ(daemon_.wait(std::chrono::seconds(30)), 128 + SIGKILL);
  startDaemon();  // the stale socket file is replaced
  ASSERT_TRUE(served_again()) << "no process came back after the SIGKILL restart";
  say("served again after both restarts");

  const std::set<std::string> allowed = {"no_op",     "invalid_args", "not_exportable",
                                         "no_daemon", "draining",     "daemon_lost",
                                         "declined",  "daemon_failed"};
  long total_calls = 0, total_served = 0, total_should = 0, total_lost = 0;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    Run& run = runs[i];
    // About ten seconds' work; a process still calling after two minutes
    // is stuck.
    const int status = run.process.wait(std::chrono::seconds(120));
    if (status < 0) ADD_FAILURE() << "process " << i << " stuck:\n" << run.process.stuckReport();
    const std::string name = "process " + std::to_string(i) + " (--seed " +
                             std::to_string(run.seed) + " --threads " +
                             std::to_string(run.threads) + ")";
    EXPECT_EQ(status, 0) << name << ":\n" << failureText(run.process);
    const auto totals = totalsOf(run.process.out());
    ASSERT_FALSE(totals.empty()) << name << " printed no totals:\n" << failureText(run.process);
    const long calls = totals.at("calls");
    EXPECT_EQ(totals.at("mismatches"), 0) << name;
    EXPECT_EQ(calls, run.calls) << name;

    const ShimStats stats = shimStats(run.process.err());
    ASSERT_GE(stats.calls, 0) << name << ": no shim stats line:\n" << failureText(run.process);
    EXPECT_EQ(stats.calls, calls) << name;
    // A failed call is one the program counted lost (beta != 0), no other.
    EXPECT_EQ(stats.failed, totals.at("lost")) << name;
    long direct = 0;
    for (const auto& [reason, n] : stats.direct) {
      EXPECT_TRUE(allowed.count(reason)) << name << ": direct for " << reason;
      direct += n;
    }
    EXPECT_EQ(stats.served + direct + stats.failed, calls)
        << name << ": direct" << directText(stats);
    // Decided before the shim looks for the daemon, so exact whatever it did.
    auto reason = [&](const char* key) { return stats.directCalls(key); };
    EXPECT_EQ(reason("no_op"), totals.at("expected_direct_no_op")) << name;
    EXPECT_EQ(reason("invalid_args"), totals.at("expected_direct_invalid_args")) << name;
    EXPECT_LE(reason("not_exportable"), totals.at("expected_direct_not_exportable")) << name;
    const long should = calls - totals.at("expected_direct_no_op") -
                        totals.at("expected_direct_invalid_args") -
                        totals.at("expected_direct_not_exportable");
    std::cout << name << ": calls " << calls << ", served " << stats.served << " of " << should
              << ", lost " << totals.at("lost") << ", failed " << stats.failed << ", direct"
              << directText(stats) << "; " << elapsedOf(run.process.out()) << std::endl;
    total_calls += calls;
    total_served += stats.served;
    total_should += should;
    total_lost += totals.at("lost");
  }
  std::cout << "total: calls " << total_calls << ", served by stmuxd " << total_served << " of "
            << total_should << " ("
            << (total_should > 0 ? 100.0 * total_served / total_should : 100.0) << "%), lost "
            << total_lost << std::endl;
  EXPECT_GT(requests(), 0) << "nothing served after the last restart";
}

INSTANTIATE_TEST_SUITE_P(Mode, Preloaded, ::testing::Values("host", "stream"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace stmux

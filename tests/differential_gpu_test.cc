// The differential correctness suite: stmux-differential (tools/differential.cc)
// preloaded with libstmux.so in several processes against a real daemon on a
// GPU. Every call (cuBLAS's entry points and cublasLtMatmul) is made through
// the shim and through the real library's own function and both are checked
// against a float64 reference; the shim's counters must account for every
// call, by reason and by entry point, and the daemon must have served all
// that it should (a suite that silently falls back proves nothing). Then the
// same through two daemon restarts. Seeded: the master seed is printed with
// the command that reruns it, and a mismatch prints the call's replay
// command. Skipped, saying so, where there is no CUDA device.
#include <stdlib.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "gpu_fixture.h"
#include "shim_stats.h"

namespace stmux {
namespace {

using testing::daemonStatus;
using testing::gpuField;
using testing::shimStats;
using testing::ShimStats;
using testing::TempDir;

// The totals line, "calls N mismatches M lost L expected_direct_REASON N ..."
// (one for each reason the program predicts), as a map.
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

// The direct calls the program predicts, by the shim's reason, from its
// totals: reasons with none left out, as the shim prints them.
std::map<std::string, long> expectedDirect(const std::map<std::string, long>& totals) {
  const std::string prefix = "expected_direct_";
  std::map<std::string, long> direct;
  for (const auto& [key, n] : totals) {
    if (key.rfind(prefix, 0) == 0 && n > 0) direct[key.substr(prefix.size())] = n;
  }
  return direct;
}

long sum(const std::map<std::string, long>& counts) {
  long total = 0;
  for (const auto& [key, n] : counts)
    total += n;
  return total;
}

// The program's lines "entry NAME calls N expected_served S expected_direct
// D", entry points it called alone (the shim prints no others).
std::map<std::string, ShimStats::Entry> expectedEntries(const std::string& out) {
  std::istringstream lines(out);
  std::map<std::string, ShimStats::Entry> entries;
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string tag, name, calls_word, served_word, direct_word;
    ShimStats::Entry entry;
    if (!(words >> tag >> name >> calls_word >> entry.calls >> served_word >> entry.served >>
          direct_word >> entry.direct) ||
        tag != "entry") {
      continue;
    }
    if (entry.calls > 0) entries[name] = entry;
  }
  return entries;
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
    std::uint64_t seed = 0;
    const std::string_view value(text);
    const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), seed);
    if (error == std::errc() && end == value.data() + value.size()) return seed;
    ADD_FAILURE() << "STMUX_DIFF_SEED='" << value
                  << "' is not a seed; accepted: an unsigned 64-bit integer; using the clock's";
  }
  return static_cast<std::uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
}

// The largest test's calls: STMUX_DIFF_CALLS, 100,000 by default (fewer
// under a sanitizer, which makes the program's checks some 20 times slower).
long largestTestCalls() {
  constexpr long kDefault = 100'000;
  if (const char* text = getenv("STMUX_DIFF_CALLS"); text != nullptr && *text != '\0') {
    long calls = 0;
    const std::string_view value(text);
    const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), calls);
    if (error == std::errc() && end == value.data() + value.size() && calls >= 1'000 &&
        calls <= 10'000'000) {
      return calls;
    }
    ADD_FAILURE() << "STMUX_DIFF_CALLS='" << value
                  << "' is not a call count; accepted: a whole number from 1000 to 10000000; "
                     "making "
                  << kDefault;
  }
  return kDefault;
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

// --only narrows the calls to chosen values of chosen classes (for hunting
// one kind of call under load); a bad class or value is named with what is
// accepted, on any machine. On a GPU, without the preload: every call made
// has the chosen values, and only those calls are counted.
TEST(DifferentialProgram, OnlyMakesTheCallsWithTheChosenValues) {
  TempDir dir;
  const struct {
    std::string arg, said;
  } bad[] = {
      {"stream", "--only 'stream': accepted: CLASS=VALUE, CLASS one of stream, write,"},
      {"colour=red", "--only 'colour=red': accepted: CLASS=VALUE, CLASS one of stream,"},
      {"alloc=managed,disk", "--only 'alloc=managed,disk': accepted: alloc's values: per_call,"},
  };
  for (const auto& b : bad) {
    const Ran ran = run({DIFFERENTIAL_PATH, "--only", b.arg}, {}, dir.path() + "/bad");
    EXPECT_EQ(ran.status, 2) << b.arg;
    EXPECT_NE(ran.err.find(b.said), std::string::npos) << ran.err;
  }
  const Ran ran = run({DIFFERENTIAL_PATH, "--seed", "7", "--threads", "2", "--calls", "3000",
                       "--only", "write=event_other_stream", "--only", "alloc=managed,host"},
                      {}, dir.path() + "/only");
  // 3 is any CUDA failure too: only the want of a device skips.
  if (ran.status == 3 && ran.err.find("no CUDA device") != std::string::npos) {
    GTEST_SKIP() << "GPU test skipped: " << ran.err;
  }
  ASSERT_EQ(ran.status, 0) << ran.out << ran.err;
  EXPECT_NE(ran.out.find("--only write=event_other_stream --only alloc=managed,host)"),
            std::string::npos)
      << "the rerun line must carry --only: " << ran.out;
  ClassTable table;
  table.add(ran.out);
  const auto totals = totalsOf(ran.out);
  const long calls = totals.at("calls");
  EXPECT_GT(calls, 0);
  EXPECT_LT(calls, 3000) << "calls drawn with other values were made";
  EXPECT_EQ(calls + totals.at("skipped"), 3000) << "every call drawn is made or skipped";
  EXPECT_EQ(table.calls("write=event_other_stream"), calls);
  EXPECT_EQ(table.calls("alloc=managed") + table.calls("alloc=host"), calls);
  EXPECT_GT(table.calls("alloc=managed"), 0);
  EXPECT_GT(table.calls("alloc=host"), 0);
}

// --seconds bounds a run by time (for hunts sized to a device call): a bad
// value is named with what is accepted, on any machine. On a GPU, without
// the preload: a run of a billion calls stops soon after its second, says
// so, and accounts for every call it drew.
TEST(DifferentialProgram, StopsDrawingCallsAtItsSecondsLimit) {
  TempDir dir;
  for (const char* bad : {"0", "0.05", "86401", "1s", "nan"}) {
    const Ran ran = run({DIFFERENTIAL_PATH, "--seconds", bad}, {}, dir.path() + "/bad");
    EXPECT_EQ(ran.status, 2) << bad;
    EXPECT_NE(ran.err.find(std::string("--seconds '") + bad +
                           "': accepted: a number of seconds from 0.1 to 86400"),
              std::string::npos)
        << ran.err;
  }
  const auto began = std::chrono::steady_clock::now();
  const Ran ran = run({DIFFERENTIAL_PATH, "--seed", "11", "--threads", "2", "--calls", "1000000000",
                       "--seconds", "1", "--quiet"},
                      {}, dir.path() + "/timed", std::chrono::seconds(120));
  if (ran.status == 3 && ran.err.find("no CUDA device") != std::string::npos) {
    GTEST_SKIP() << "GPU test skipped: " << ran.err;
  }
  ASSERT_EQ(ran.status, 0) << ran.out << ran.err;
  // The context's start, one second of calls and the last call of each thread.
  EXPECT_LT(std::chrono::steady_clock::now() - began, std::chrono::seconds(60));
  EXPECT_NE(ran.out.find("--calls 1000000000 --seconds 1)"), std::string::npos)
      << "the rerun line must carry --seconds: " << ran.out;
  const std::size_t at = ran.out.find("stopped at the --seconds limit: ");
  ASSERT_NE(at, std::string::npos) << ran.out;
  const long drawn = std::strtol(ran.out.c_str() + at + 32, nullptr, 10);
  EXPECT_NE(ran.out.find(" of 1000000000 calls drawn", at), std::string::npos) << ran.out;
  const auto totals = totalsOf(ran.out);
  EXPECT_GT(drawn, 0);
  EXPECT_EQ(totals.at("calls") + totals.at("skipped"), drawn) << ran.out;
}

// Each test runs in both ways of keeping stream order (STMUX_MODE): host,
// and stream, where the call returns once queued and the GPU keeps the order,
// the latter with each wait for the daemon (STMUX_STREAM_WAIT): "stream"
// (memop) and "stream-kernel".
class Preloaded : public testing::DaemonFixture, public ::testing::WithParamInterface<std::string> {
 protected:
  bool streamMode() const { return GetParam().starts_with("stream"); }

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
    const std::map<std::string, std::string> env = {
        {"LD_PRELOAD", SHIM_PATH},
        {"STMUX_SOCKET", dir_.socket()},
        {"STMUX_LOG", "stats=info"},
        {"STMUX_ROUTE", "serve"},
        {"STMUX_MODE", streamMode() ? "stream" : "host"},
        {"STMUX_STREAM_WAIT", GetParam() == "stream-kernel" ? "kernel" : "memop"}};
    return Run{seed, threads, calls,
               Process(argv, env, dir_.path() + "/differential" + std::to_string(index))};
  }

  // Waits for a lone run, which must end well; its totals, empty (and said
  // so) where it printed none.
  std::map<std::string, long> totalsOnceEnded(Run& run) {
    const int status = run.process.wait(std::chrono::seconds(300));
    if (status < 0) ADD_FAILURE() << "stuck:\n" << run.process.stuckReport();
    EXPECT_EQ(status, 0) << failureText(run.process);
    auto totals = totalsOf(run.process.out());
    if (totals.empty()) ADD_FAILURE() << "no totals:\n" << failureText(run.process);
    return totals;
  }

  double requests() const {
    auto status = daemonStatus(dir_.socket());
    return status ? gpuField(*status, "requests") : -1;
  }
};

// 8 processes of 1 to 16 threads, 100,000 calls (STMUX_DIFF_CALLS) at least:
// no mismatch, and
// the shim's counters account for every call exactly: served, except the
// no-ops, the calls cuBLAS refuses, those on memory CUDA IPC cannot export,
// the cublasLtMatmul forms stmux does not serve and those with alpha and
// beta in device memory, which go straight to cuBLAS by design under those
// reasons alone; and so for each entry point (libcublas's own calls into
// cuBLASLt are not counted).
TEST_P(Preloaded, EveryCallMatchesRealCublasAndTheDaemonServesAllItShould) {
  const std::uint64_t master = masterSeed();
  std::cout << "master seed " << master << " (rerun: STMUX_DIFF_SEED=" << master
            << " ctest -R differential)" << std::endl;
  std::mt19937_64 random(master);
  constexpr int kProcesses = 8;
  const long total = largestTestCalls();
  std::vector<int> threads(kProcesses);
  int all_threads = 0;
  for (int i = 0; i < kProcesses; ++i) {
    threads[i] = i == 0 ? 1 : i == 1 ? 16 : std::uniform_int_distribution<int>(1, 16)(random);
    all_threads += threads[i];
  }
  // Calls in proportion to threads, so that the processes end together.
  std::vector<Run> runs;
  for (int i = 0; i < kProcesses; ++i) {
    const long calls = (total * threads[i] + all_threads - 1) / all_threads;
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
    const std::map<std::string, long> expected_direct = expectedDirect(totals);
    const long should = calls - sum(expected_direct);
    EXPECT_EQ(stats.calls, calls) << name;
    EXPECT_EQ(stats.failed, 0) << name;
    EXPECT_EQ(stats.served, should) << name << ": " << run.process.err();
    EXPECT_EQ(stats.direct, expected_direct) << name << ": direct" << directText(stats);
    const auto entries = expectedEntries(out);
    EXPECT_FALSE(entries.empty()) << name << " printed no entry lines";
    for (const auto& [entry, want] : entries) {
      const auto it = stats.entries.find(entry);
      if (it == stats.entries.end()) {
        ADD_FAILURE() << name << ": the shim counted no " << entry << " call, the program made "
                      << want.calls;
        continue;
      }
      const ShimStats::Entry& got = it->second;
      EXPECT_EQ(got.calls, want.calls) << name << ": " << entry << " calls";
      EXPECT_EQ(got.served, want.served) << name << ": " << entry << " served";
      EXPECT_EQ(got.failed, 0) << name << ": " << entry << " failed";
      EXPECT_EQ(got.direct, want.direct) << name << ": " << entry << " direct";
    }
    for (const auto& [entry, got] : stats.entries) {
      EXPECT_TRUE(entries.count(entry)) << name << ": the shim counted " << got.calls << " "
                                        << entry << " calls, the program made none";
    }
    const double share = should > 0 ? static_cast<double>(stats.served) / should : 1.0;
    EXPECT_GE(share, 0.999) << name;
    // Stream order takes the calls with beta == 0 (the others go the host way).
    if (streamMode()) {
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
  EXPECT_GE(total_calls, total);
  EXPECT_GE(requests(), total_served) << "the daemon counted fewer requests than the shims";
  // Every value of every class was drawn often enough to mean something: 50
  // times in the default 100,000 calls, as often in proportion to fewer
  // (the rarest values come some 1 in 900 calls), 10 at the least.
  const long least_draws = std::max(10L, total / 2'000);
  for (const std::string& name : classes.names()) {
    EXPECT_GE(classes.calls(name), least_draws) << "class " << name << " was hardly drawn";
  }
}

// Each write's copies held 2 ms on their stream before they run: a call
// not ordered after them, by CUDA or by stmux's wait, then finds them late
// nearly every time, where unheld it did about once in a million calls (the
// soak's mismatch, docs/RELIABILITY.md). No mismatch, in either mode.
TEST_P(Preloaded, CallsWhoseOperandsAreWrittenLateStillFindThem) {
  Run run = start(0, masterSeed(), 4, 2'000, {"--delay-writes-us", "2000"});
  const auto totals = totalsOnceEnded(run);
  ASSERT_FALSE(totals.empty());
  EXPECT_EQ(totals.at("mismatches"), 0);
  EXPECT_EQ(totals.at("calls"), 2'000);
  EXPECT_GT(shimStats(run.process.err()).served, 0) << run.process.err();
  std::cout << "seed " << run.seed << ": " << elapsedOf(run.process.out()) << std::endl;
}

// The kind of call twice seen wrong, C as the write left it (docs/
// RELIABILITY.md, "The wrong result in the soak"): on the legacy stream,
// which 16 threads share, its operands copied on another stream joined by an
// event, read back by an async copy; writes not held. Each write also marks
// its stream (--mark-joins), so a call's stream that went on before its
// write was done is a mismatch of its own, whatever the GEMM gave.
TEST_P(Preloaded, CallsOnTheLegacyStreamAfterAnEventJoinedWriteSeeTheWriteDone) {
  Run run = start(0, masterSeed(), 16, 160'000,
                  {"--mark-joins", "--only", "stream=legacy", "--only", "write=event_other_stream",
                   "--only", "read=async_on_stream"});
  const auto totals = totalsOnceEnded(run);
  ASSERT_FALSE(totals.empty());
  EXPECT_EQ(totals.at("mismatches"), 0);
  // About 1 draw in 95 is of this kind (the rest are skipped).
  EXPECT_GE(totals.at("calls"), 1'000) << run.process.out();
  EXPECT_GT(shimStats(run.process.err()).served, 0) << run.process.err();
  std::cout << "seed " << run.seed << ": " << elapsedOf(run.process.out()) << std::endl;
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

  const std::set<std::string> allowed = {
      "no_op",     "invalid_args", "not_exportable", "unserved_form", "device_pointer_mode",
      "no_daemon", "draining",     "daemon_lost",    "declined",      "daemon_failed"};
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
    // (Exportability is looked at once the daemon is found, so at most.)
    const std::map<std::string, long> expected_direct = expectedDirect(totals);
    for (const std::string key :
         {"no_op", "invalid_args", "unserved_form", "device_pointer_mode"}) {
      EXPECT_EQ(reason(key.c_str()), totals.at("expected_direct_" + key)) << name << ": " << key;
    }
    EXPECT_LE(reason("not_exportable"), totals.at("expected_direct_not_exportable")) << name;
    const long should = calls - sum(expected_direct);
    // By entry point: every call counted once, each served, failed or direct
    // (at least those predicted direct).
    for (const auto& [entry, want] : expectedEntries(run.process.out())) {
      const auto it = stats.entries.find(entry);
      if (it == stats.entries.end()) {
        ADD_FAILURE() << name << ": the shim counted no " << entry << " call";
        continue;
      }
      const ShimStats::Entry& got = it->second;
      EXPECT_EQ(got.calls, want.calls) << name << ": " << entry << " calls";
      EXPECT_EQ(got.served + got.failed + got.direct, got.calls) << name << ": " << entry;
      EXPECT_GE(got.direct, want.direct) << name << ": " << entry << " direct";
    }
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

INSTANTIATE_TEST_SUITE_P(Mode, Preloaded, ::testing::Values("host", "stream", "stream-kernel"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');  // gtest's names
                           return name;
                         });

}  // namespace
}  // namespace stmux

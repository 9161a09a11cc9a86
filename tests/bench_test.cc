// stmux-bench's start barrier and row validity, end to end with fake tenants
// (tests/fake_tenant.cc) instead of CUDA programs: the clock starts only when
// every tenant is ready, and a row whose tenants did not all run through the
// timed span is printed with the reason and used for no ratio. And its
// PyTorch shapes are stmux-torch-tenant's workloads.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "stmux/json.h"
#include "test_support.h"
#include "tools/barrier.h"
#include "tools/cpu_groups.h"
#include "tools/process.h"

namespace stmux {
namespace {

using testing::TempDir;

struct BenchRun {
  int status = -1;
  std::string out, err;
  std::optional<Json> json;
  std::string dir;
};

// stmux-bench over three fake tenants per row, time-only and ceiling.
BenchRun runBench(const TempDir& dir, const std::string& plan, double ready_timeout = 5,
                  const std::vector<std::string>& extra = {}) {
  BenchRun run;
  run.dir = dir.path() + "/bench";
  std::vector<std::string> args = {STMUX_BENCH_PATH,
                                   "--client",
                                   FAKE_TENANT_PATH,
                                   "--modes",
                                   "time-only,ceiling",
                                   "--shapes",
                                   "cube",
                                   "--tenants",
                                   "3",
                                   "--seconds",
                                   "0.4",
                                   "--warmup",
                                   "0.1",
                                   "--ready-timeout",
                                   std::to_string(ready_timeout),
                                   "--out",
                                   run.dir};
  args.insert(args.end(), extra.begin(), extra.end());
  const Ran ran = stmux::run(args, {{"FAKE_TENANT_PLAN", plan}}, dir.path() + "/bench-log",
                             std::chrono::seconds(120));
  run.status = ran.status;
  run.out = ran.out;
  run.err = ran.err;
  std::ifstream in(run.dir + "/bench.json");
  std::stringstream text;
  text << in.rdbuf();
  if (auto parsed = parseJson(text.str()); parsed.ok()) run.json = std::move(parsed).value();
  return run;
}

const Json* row(const BenchRun& run, const std::string& mode) {
  if (!run.json) return nullptr;
  const Json* points = jsonFind(*run.json, "points");
  for (std::size_t i = 0; jsonAt(points, i) != nullptr; ++i) {
    if (jsonString(jsonFind(jsonAt(points, i), "mode")) == mode) return jsonAt(points, i);
  }
  return nullptr;
}

TEST(BenchBarrier, TheClockStartsOnlyOnceEveryTenantIsReady) {
  TempDir dir;
  // Tenant i gets ready i * 300 ms after the others.
  const BenchRun run = runBench(dir, "1=slow-ready,2=slow-ready");
  ASSERT_EQ(run.status, 0) << run.out << run.err;
  const Json* time_only = row(run, "time-only");
  ASSERT_NE(time_only, nullptr) << run.out;
  EXPECT_TRUE(jsonBool(jsonFind(time_only, "valid"))) << run.out;
  EXPECT_GE(jsonNumber(jsonFind(time_only, "ready_s"), 0), 0.6) << "tenant 2 was 600 ms late";

  const std::string runs = run.dir + "/runs/cube-256-r3-time-only";
  const auto span = tools::readGo(runs + "/go");
  ASSERT_TRUE(span.has_value());
  std::uint64_t last_ready = 0;
  for (int i = 0; i < 3; ++i) {
    std::ifstream err(runs + "/client" + std::to_string(i) + ".out");
    std::string word;
    std::uint64_t ready_ns = 0;
    ASSERT_TRUE(err >> word >> ready_ns) << "tenant " << i << " said nothing";
    ASSERT_EQ(word, "ready_ns");
    last_ready = std::max(last_ready, ready_ns);
  }
  EXPECT_GT(span->start_ns, last_ready) << "the clock started before the last tenant was ready";
  // The row says when it was timed: the span the tenants were given.
  const Json* timed = jsonFind(time_only, "span_unix_s");
  ASSERT_TRUE(timed != nullptr && timed->size() == 2) << run.out;
  EXPECT_DOUBLE_EQ(jsonNumber(jsonAt(timed, 0), 0), static_cast<double>(span->start_ns) / 1e9);
  EXPECT_DOUBLE_EQ(jsonNumber(jsonAt(timed, 1), 0), static_cast<double>(span->stop_ns) / 1e9);
  // 200 us steps: at most 5,000 a second per tenant, and clearly some.
  const double rate = jsonNumber(jsonFind(time_only, "gemms_per_s"), 0);
  EXPECT_GT(rate, 3 * 500.0);
  EXPECT_LT(rate, 3 * 5000.0 * 1.05);
  EXPECT_NE(run.out.find("summary:"), std::string::npos) << run.out;
  // The rate in windows of the span: two for 0.4 s, their mean the row's.
  const Json* windows = jsonFind(time_only, "window_rates");
  ASSERT_TRUE(windows != nullptr && windows->size() == 2) << run.out;
  EXPECT_NEAR((jsonNumber(jsonAt(windows, 0), 0) + jsonNumber(jsonAt(windows, 1), 0)) / 2, rate,
              rate * 1e-9);

  // The CPU over the span, from /proc: each fake step is a 200 us sleep, so
  // every step gives the core up, and little CPU is used (too little to
  // expect a 10 ms tick of it for sure); nothing serves time-only tenants.
  const Json* tenants_cpu = jsonFind(time_only, "tenants_cpu");
  ASSERT_NE(tenants_cpu, nullptr);
  EXPECT_GE(jsonNumber(jsonFind(tenants_cpu, "cores"), -1), 0.0);
  EXPECT_LT(jsonNumber(jsonFind(tenants_cpu, "cores"), 9), 3.0);
  EXPECT_GE(jsonNumber(jsonFind(tenants_cpu, "switches_per_s"), 0), rate * 0.9);
  const Json* busiest = jsonFind(time_only, "busiest_tenant_cpu");
  EXPECT_LE(jsonNumber(jsonFind(busiest, "cores"), 9),
            jsonNumber(jsonFind(tenants_cpu, "cores"), 0));
  EXPECT_GE(jsonNumber(jsonFind(busiest, "cores"), 0),
            jsonNumber(jsonFind(tenants_cpu, "cores"), 0) / 3);
  EXPECT_EQ(jsonNumber(jsonFind(jsonFind(time_only, "serving_cpu"), "cores"), -1), 0.0);
}

// --repeat: every row again, round after round; the run of median rate is
// the row, every valid run's rate beside it.
TEST(BenchBarrier, RepeatedRowsReportTheirMedianRun) {
  TempDir dir;
  const BenchRun run = runBench(dir, "", 5, {"--repeat", "3"});
  ASSERT_EQ(run.status, 0) << run.out << run.err;
  EXPECT_EQ(countOf(run.err, "] cube-256 R=3 time-only ..."), 3) << run.err;
  const Json* time_only = row(run, "time-only");
  ASSERT_NE(time_only, nullptr) << run.out;
  const Json* repeats = jsonFind(time_only, "repeats");
  ASSERT_TRUE(repeats != nullptr && repeats->size() == 3) << run.out;
  std::vector<double> rates;
  for (std::size_t i = 0; i < 3; ++i)
    rates.push_back(jsonNumber(jsonAt(repeats, i), -1));
  EXPECT_TRUE(std::is_sorted(rates.begin(), rates.end()));
  EXPECT_EQ(jsonNumber(jsonFind(time_only, "gemms_per_s"), 0), rates[1]);
  EXPECT_NE(jsonString(jsonFind(time_only, "note")).find("median of 3 runs"), std::string::npos);
}

// A row whose rate changed across its span says so, and which way, with its
// windows' rates: steps of 200 us, then of 600 us (or the other way round),
// are about 2.5x fewer (the sleeps overshoot).
TEST(BenchBarrier, ARowWhoseRateChangedSaysWhichWay) {
  for (const bool slower : {true, false}) {
    TempDir dir;
    const std::string behaviour = slower ? "slow-later" : "fast-later";
    const BenchRun run = runBench(dir, "0=" + behaviour + ",1=" + behaviour + ",2=" + behaviour);
    ASSERT_EQ(run.status, 0) << run.out << run.err;
    const Json* time_only = row(run, "time-only");
    ASSERT_NE(time_only, nullptr) << run.out;
    ASSERT_TRUE(jsonBool(jsonFind(time_only, "valid"))) << run.out;
    const Json* windows = jsonFind(time_only, "window_rates");
    ASSERT_TRUE(windows != nullptr && windows->size() == 2) << run.out;
    const double first = jsonNumber(jsonAt(windows, 0), 0);
    const double last = jsonNumber(jsonAt(windows, 1), 0);
    EXPECT_LT(slower ? last : first, 0.7 * (slower ? first : last)) << behaviour << run.out;
    EXPECT_NE(jsonString(jsonFind(time_only, "note")).find(slower ? "rate fell" : "rate rose"),
              std::string::npos)
        << behaviour << run.out;
  }
}

// --tenant-cpu-quota, where this machine lets the bench make cgroups:
// tenants busy half the time, limited to a twentieth of a core each, are
// held back most of the span (even on a loaded machine: 5 ms a period is
// soon spent), and the row says by how much; the ceiling's one process is
// not limited.
TEST(BenchBarrier, TenantsUnderACpuQuotaAreHeldBackAndTheRowSaysHowMuch) {
  if (std::string why; !tools::CpuQuotaGroups().make(1, 0.2, why)) {
    GTEST_SKIP() << "cannot make cgroups with a CPU quota here: " << why;
  }
  TempDir dir;
  const BenchRun run =
      runBench(dir, "0=busy,1=busy,2=busy", 30, {"--tenant-cpu-quota", "0.05", "--seconds", "1"});
  ASSERT_EQ(run.status, 0) << run.out << run.err;
  EXPECT_DOUBLE_EQ(jsonNumber(jsonFind(*run.json, "tenant_cpu_quota"), 0), 0.05);
  const Json* time_only = row(run, "time-only");
  ASSERT_NE(time_only, nullptr) << run.out;
  // A machine loaded enough (a sanitizer's pass, the other tests) can leave
  // a limited tenant without its core for the whole span.
  if (const std::string note(jsonString(jsonFind(time_only, "note")));
      note.find("completed no step inside the timed span") != std::string::npos) {
    GTEST_SKIP() << "this machine was too busy for a tenant to make a step in the span: " << note;
  }
  ASSERT_TRUE(jsonBool(jsonFind(time_only, "valid"))) << run.out;
  const Json* throttled = jsonFind(time_only, "throttled_share");
  ASSERT_NE(throttled, nullptr) << run.out;
  // Busy half the time on a twentieth of a core: held back about 90% of it
  // (not held back at all without the quota).
  EXPECT_GT(jsonNumber(jsonFind(throttled, "mean"), 0), 0.3) << run.out;
  EXPECT_GE(jsonNumber(jsonFind(throttled, "most"), 0), jsonNumber(jsonFind(throttled, "mean"), 1));
  // Three busy tenants, at most a twentieth of a core each (and /proc's
  // ticks), not the machine's cores.
  EXPECT_LT(jsonNumber(jsonFind(jsonFind(time_only, "tenants_cpu"), "cores"), 9), 0.5) << run.out;
  EXPECT_NE(jsonString(jsonFind(time_only, "note")).find("0.05-core quotas held tenants back"),
            std::string::npos)
      << run.out;
  const Json* ceiling = row(run, "ceiling");
  ASSERT_NE(ceiling, nullptr) << run.out;
  EXPECT_EQ(jsonFind(ceiling, "throttled_share"), nullptr) << run.out;
}

TEST(BenchBarrier, ARowWithAFaultyTenantIsInvalidSaysWhyAndIsUsedForNoRatio) {
  // The ready timeout is short only where a tenant is never ready: the
  // healthy tenants of a loaded machine (a sanitizer's build, other tests)
  // took more than 2 s to start now and then, and their row failed for that.
  struct Case {
    std::string plan;
    std::string why;
    double ready_timeout = 30;
  };
  const Case cases[] = {
      {"1=never-ready", "were not ready within 2 s", 2},
      {"2=exit-before-ready", "tenant 2 exited 3 before it was ready: fake tenant 2: cannot"},
      {"0=exit-in-span", "tenant 0 exited 1: fake tenant 0: failing in the span"},
      {"1=stall", "tenant 1 completed no step inside the timed span"},
      {"2=early-stop", "tenant 2 stopped before the timed span ended"},
  };
  for (const Case& c : cases) {
    TempDir dir;
    const auto began = std::chrono::steady_clock::now();
    const BenchRun run = runBench(dir, c.plan, c.ready_timeout);
    EXPECT_LT(std::chrono::steady_clock::now() - began, std::chrono::seconds(60)) << c.plan;
    // The ceiling row has one tenant (index 0) and runs; time-only does not.
    const Json* time_only = row(run, "time-only");
    ASSERT_NE(time_only, nullptr) << c.plan << "\n" << run.out << run.err;
    EXPECT_FALSE(jsonBool(jsonFind(time_only, "valid"), true)) << c.plan;
    const std::string note(jsonString(jsonFind(time_only, "note")));
    EXPECT_EQ(note.rfind("invalid: ", 0), 0u) << note;
    EXPECT_NE(note.find(c.why), std::string::npos) << c.plan << ": " << note;
    EXPECT_EQ(jsonFind(time_only, "gemms_per_s"), nullptr) << "an invalid row carries no figures";
    EXPECT_NE(run.out.find(c.why), std::string::npos) << "the table shows why:\n" << run.out;
    const Json* ceiling = row(run, "ceiling");
    ASSERT_NE(ceiling, nullptr);
    if (jsonBool(jsonFind(ceiling, "valid"))) {
      // No ratio against the invalid row: the "vs time" column is "-".
      const std::regex line(
          "\ncube-256 +3 ceiling +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ "
          "+[0-9.]+ +- ");
      EXPECT_TRUE(std::regex_search(run.out, line)) << c.plan << "\n" << run.out;
    }
  }
}

// --tenant-args given twice passes both to every tenant, in order: the
// first is not lost. The fake tenant refuses a flag it does not know, and
// exits 2 before it is ready. A row of tenants that took the flags may still
// be invalid on a loaded machine (a stall in the short span, seen once in
// CI): what tells is whether a tenant exited.
TEST(BenchBarrier, TenantArgsGivenTwiceReachTheTenantsBoth) {
  const auto exited = [](const Json* time_only) {
    return std::string(jsonString(jsonFind(time_only, "note")))
               .find(" exited 2 before it was ready") != std::string::npos;
  };
  {
    TempDir dir;
    const BenchRun run =
        runBench(dir, "", 30, {"--tenant-args", "--m=1", "--tenant-args", "--k=1"});
    ASSERT_EQ(run.status, 0) << run.out << run.err;
    ASSERT_TRUE(run.json);
    EXPECT_EQ(jsonString(jsonFind(*run.json, "tenant_args")), "--m=1 --k=1");
    const Json* time_only = row(run, "time-only");
    ASSERT_NE(time_only, nullptr) << run.out << run.err;
    EXPECT_FALSE(exited(time_only)) << "a tenant refused the flags:\n" << run.out;
  }
  TempDir dir;
  const BenchRun run =
      runBench(dir, "", 30, {"--tenant-args", "--no-such-flag", "--tenant-args", "--k=1"});
  const Json* time_only = row(run, "time-only");
  ASSERT_NE(time_only, nullptr) << run.out << run.err;
  EXPECT_FALSE(jsonBool(jsonFind(time_only, "valid"), true)) << run.out;
  EXPECT_TRUE(exited(time_only)) << "the first --tenant-args was dropped:\n" << run.out;
}

// A tenant program that cannot be started fails its row at once, saying so,
// rather than after the ready timeout; one that does not exist is refused
// before any row.
TEST(BenchBarrier, ATenantProgramThatCannotBeRunIsNamedBeforeAnyRow) {
  TempDir dir;
  const BenchRun absent = runBench(dir, "", 60, {"--client", "/nonexistent/stmux-tenant"});
  EXPECT_EQ(absent.status, 2) << absent.err;
  EXPECT_NE(absent.err.find("stmux-cublas-client: /nonexistent/stmux-tenant does not exist"),
            std::string::npos)
      << absent.err;
  const std::string program = dir.path() + "/not-executable";
  std::ofstream(program) << "#!/bin/sh\n";
  const BenchRun run = runBench(dir, "", 60, {"--client", program});
  EXPECT_EQ(run.status, 2) << run.err;
  EXPECT_NE(run.err.find("stmux-cublas-client: " + program + " cannot be run: Permission denied"),
            std::string::npos)
      << run.err;
}

// Without a GPU the bench says so at once (its client finds none), rather
// than from every row's tenants.
TEST(BenchBarrier, WithoutAGpuTheBenchSaysSoAtOnce) {
  TempDir dir;
  const std::string program = dir.path() + "/no-gpu";
  std::ofstream(program) << "#!/bin/sh\necho 'no CUDA device (none here)' >&2\nexit 3\n";
  std::filesystem::permissions(program, std::filesystem::perms::owner_all);
  const auto began = std::chrono::steady_clock::now();
  const BenchRun run = runBench(dir, "", 60, {"--client", program});
  EXPECT_LT(std::chrono::steady_clock::now() - began, std::chrono::seconds(10));
  EXPECT_EQ(run.status, 3) << run.err;
  EXPECT_NE(run.err.find("stmux-bench: needs a CUDA device: no CUDA device (none here)"),
            std::string::npos)
      << run.err;
}

// A tenant that runs half the span and then stalls in one step past its end
// ran through the span and made progress: the row is valid, and the stall,
// which no step ending inside the span shows, is the row's longest step
// (the step that crossed the span's end is timed). One step of some
// thousand is no p99: the p99 stays a p99.
TEST(BenchBarrier, AStallAcrossTheSpansEndIsTheRowsLongestStep) {
  TempDir dir;
  const BenchRun run = runBench(dir, "1=stall-late");
  const Json* time_only = row(run, "time-only");
  ASSERT_NE(time_only, nullptr) << run.out << run.err;
  ASSERT_TRUE(jsonBool(jsonFind(time_only, "valid"))) << run.out;
  // Stalled from the middle of a 0.4 s span to past its end.
  EXPECT_GE(jsonNumber(jsonFind(time_only, "longest_step_us")), 190'000) << run.out;
  EXPECT_LT(jsonNumber(jsonFind(time_only, "worst_tenant_p99_us")), 10'000) << run.out;
}

// The PyTorch shapes stmux-bench offers are the workloads stmux-torch-tenant
// runs, one for one (the two lists live in two languages), and each is taken
// as a shape: without a Python its row is skipped, saying why, not refused.
TEST(BenchShapes, ItsPyTorchShapesAreTheTenantsWorkloads) {
  TempDir dir;
  const Ran help = stmux::run({STMUX_BENCH_PATH, "--help"}, {}, dir.path() + "/help");
  ASSERT_EQ(help.status, 0) << help.err;
  std::set<std::string> shapes;
  const std::regex torch_shape("(?:^|[^-a-z])torch-([a-z]+)");  // not stmux-torch-tenant
  for (auto it = std::sregex_iterator(help.out.begin(), help.out.end(), torch_shape);
       it != std::sregex_iterator(); ++it) {
    shapes.insert((*it)[1]);
  }
  EXPECT_EQ(shapes.count("attn"), 1u) << help.out;

  const std::string tenant =
      (std::filesystem::path(STMUX_BENCH_PATH).parent_path() / "stmux-torch-tenant").string();
  Process tenant_help({"python3", tenant, "--help"}, {}, dir.path() + "/tenant-help");
  if (!tenant_help.started()) GTEST_SKIP() << "skipped: no python3 in PATH";
  ASSERT_EQ(tenant_help.wait(), 0) << tenant_help.out() << tenant_help.err();
  std::smatch choices;
  const std::string usage = tenant_help.out();
  ASSERT_TRUE(
      std::regex_search(usage, choices, std::regex("positional arguments:\\s*\\{([a-z,]+)\\}")))
      << usage;
  std::set<std::string> workloads;
  std::stringstream list(choices[1].str());
  for (std::string workload; std::getline(list, workload, ',');)
    workloads.insert(workload);
  EXPECT_EQ(shapes, workloads) << "stmux-bench --help:\n"
                               << help.out << "\nthe tenant's:\n"
                               << usage;

  std::string names;
  for (const std::string& shape : shapes)
    names += (names.empty() ? "torch-" : ",torch-") + shape;
  const std::string out = dir.path() + "/bench";
  const Ran ran =
      stmux::run({STMUX_BENCH_PATH, "--client", FAKE_TENANT_PATH, "--shapes", names, "--tenants",
                  "1", "--modes", "time-only", "--python", dir.path() + "/no-python", "--out", out},
                 {}, dir.path() + "/bench-log", std::chrono::seconds(60));
  EXPECT_EQ(ran.status, 1) << "no row can run without a Python\n" << ran.out << ran.err;
  std::ifstream in(out + "/bench.json");
  std::stringstream text;
  text << in.rdbuf();
  auto json = parseJson(text.str());
  ASSERT_TRUE(json.ok()) << text.str();
  const Json* points = jsonFind(json.value(), "points");
  std::set<std::string> skipped;
  for (std::size_t i = 0; jsonAt(points, i) != nullptr; ++i) {
    const Json* point = jsonAt(points, i);
    EXPECT_NE(jsonString(jsonFind(point, "note")).find("skipped: no Python at"), std::string::npos)
        << jsonString(jsonFind(point, "note"));
    skipped.insert(std::string(jsonString(jsonFind(point, "shape"))));
  }
  EXPECT_EQ(skipped.size(), shapes.size()) << text.str();
  EXPECT_EQ(skipped.count("torch-attn"), 1u) << text.str();
}

}  // namespace
}  // namespace stmux

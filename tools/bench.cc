// stmux-bench: R tenant processes sharing one GPU, four ways, side by side.
//
// Each tenant is stmux-cublas-client, an ordinary cuBLAS program, running a
// closed loop {sgemm; wait}. Modes:
//   time-only  plain processes: the GPU's default time-slicing
//   mps        under NVIDIA MPS, started and stopped by this tool
//   stmux      stmuxd running, every tenant with LD_PRELOAD=libstmux.so
//   ceiling    one process issuing one batched launch of R GEMMs per round
// The clock starts for all tenants of a row at once, after every one of them
// is set up, warmed up and (for stmux) attached, and a common warm-up has
// passed (tools/barrier.h). A row counts only if every tenant ran through the
// whole timed span and made progress (tools/row_validity.h); otherwise it is
// printed with the reason and used for no ratio and no target.
// For each valid row it reports GEMMs/s, GFLOP/s, the latency of every call
// (p50/p99/p99.9 over all tenants' calls, and the worst tenant's p99), ratios
// to the baselines, the stmux tenants' fallbacks and the daemon's mean batch;
// then a table and JSON (stmux-plot draws them), the targets met or missed,
// and a summary.
#include <getopt.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "stmux/control.h"
#include "stmux/json.h"
#include "tools/args.h"
#include "tools/barrier.h"
#include "tools/cpu_groups.h"
#include "tools/latency.h"
#include "tools/proc_cpu.h"
#include "tools/process.h"
#include "tools/round_span.h"
#include "tools/row_validity.h"
#include "tools/shim_stats.h"
#include "tools/stmux_programs.h"

namespace stmux::tools {
namespace {

namespace fs = std::filesystem;

enum class Mode { kTime, kMps, kStmux, kStmuxMps, kCeiling };
constexpr Mode kModes[] = {Mode::kTime, Mode::kMps, Mode::kStmux, Mode::kStmuxMps, Mode::kCeiling};

// A valid row whose last window's rate differs from its first's by this much
// or more says so in its note: it was not yet steady (a longer --warmup or
// --seconds measures it better).
constexpr double kUnsteady = 0.05;
const char* modeName(Mode mode) {
  switch (mode) {
    case Mode::kTime:
      return "time-only";
    case Mode::kMps:
      return "mps";
    case Mode::kStmux:
      return "stmux";
    case Mode::kStmuxMps:
      return "stmux-mps";
    case Mode::kCeiling:
      return "ceiling";
  }
  return "?";
}
bool usesMps(Mode mode) {
  return mode == Mode::kMps || mode == Mode::kStmuxMps;
}
bool usesStmux(Mode mode) {
  return mode == Mode::kStmux || mode == Mode::kStmuxMps;
}

struct Shape {
  std::string name;
  std::int64_t m = 0, n = 0, k = 0;
  bool mixed = false;  // the three seed shapes, one per tenant in turn
  // A PyTorch tenant (stmux-torch-tenant) running this workload instead of
  // stmux-cublas-client; its rows count model steps, not GEMMs.
  std::string torch;
  // Floating-point operations of one GEMM of tenant `tenant` (mixed: the
  // seed shape it runs, --tenant % 3).
  double flopsOf(int tenant) const {
    if (!torch.empty()) return 0;  // steps of a model, not one GEMM
    if (!mixed) return 2.0 * m * n * k;
    const double seeds[3] = {2.0 * 512 * 1 * 512, 2.0 * 256 * 128 * 1152, 2.0 * 256 * 256 * 256};
    return seeds[tenant % 3];
  }
  // ... averaged over `tenants` (the ceiling's one launch spreads its R
  // GEMMs over the seed shapes so).
  double flops(int tenants) const {
    double total = 0;
    for (int i = 0; i < tenants; ++i)
      total += flopsOf(i);
    return total / std::max(tenants, 1);
  }
};

struct Options {
  std::vector<Shape> shapes;
  std::vector<int> tenants = {1, 8, 32, 128, 256};
  std::vector<Mode> modes = {std::begin(kModes), std::end(kModes)};
  double seconds = 2.0;
  // All tenants running together, untimed, once all are ready.
  double warmup = 1.0;
  // Longest wait for every tenant of a row to be ready (contexts, handles,
  // buffers, first calls); a row whose tenants are not is invalid.
  double ready_timeout = 120.0;
  std::string out = "bench-out";
  std::string client, stmuxd, shim, torch_tenant;
  std::string python = "python3";
  std::string stmuxd_args;
  int repeat = 1;                                 // runs of each row
  int stmuxd_nice = 0;                            // stmuxd runs under `nice -n`
  std::string tenant_args;                        // appended to every tenant's
  std::map<std::string, std::string> tenant_env;  // added to every tenant's
  double tenant_cpu_quota = 0;  // cores each tenant may use (a cgroup of its own); 0: none
};

struct Point {
  std::string shape;
  int tenants = 0;
  Mode mode = Mode::kTime;
  bool ran = false;  // ran and valid: every tenant ran through the timed span
  std::string note;  // why it did not run or is invalid, or what went wrong
  // Adds `text` to the note, after what it says already.
  void addNote(std::string_view text) {
    note += note.empty() ? "" : "; ";
    note += text;
  }
  double ready_s = 0;  // from the first tenant's start until all were ready
  Span span;           // the timed span, on the realtime clock
  double gemms_per_s = 0, gflops = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, worst_p99_us = 0;
  LongestStep longest;       // the longest step of any tenant that overlapped the span
  double median_p50_us = 0;  // the median of the tenants' own p50s
  long calls = 0;
  long fallbacks = -1;       // stmux rows: calls the shims sent straight to cuBLAS
  double routed_direct = 0;  // stmux rows: share of calls STMUX_ROUTE=auto sent direct
  // stmux rows on MPS: the daemon's looks at both routes for its tenants on
  // MPS, and what the last found (the other route's calls/s over the taken
  // one's; daemon/fleet_route.h).
  double route_looks = 0;
  double route_gain = 0;
  // stmux rows: the tenants' calls by cuBLAS entry point, and how many of
  // them stmuxd served (PyTorch reaches cuBLAS through several).
  std::map<std::string, ShimStats::Entry> entries;
  // stmux rows on MPS: tenants stmuxd's places kept off MPS (stmux/mps_seats.h),
  // and where there were any, the MPS state of the tenant with the worst p99.
  int tenants_off_mps = 0;
  std::string worst_tenant_mps;
  double mean_batch = 0;   // stmux rows: the daemon's mean batch
  double graph_share = 0;  // stmux rows: batches replayed as graphs (STMUX_LAUNCH_GRAPHS)
  // stmux rows: where a served call's time went, means in us (-1: not
  // measured): the tenants' wait for their own earlier work (host mode); the
  // ring (push to the daemon's pop); stream-ordered, the pop to the caller's
  // stream being ready; the batcher's wait; the batch's wait for the
  // executor; the executor queueing the launches; the GPU (queued to seen
  // done); publishing the statuses; for each caller that slept, its batch
  // seen done to its wake; the tenants seeing the answer (host mode).
  struct Round {
    double prior_wait = -1, ring = -1, stream_ready = -1, batch_wait = -1, handoff = -1,
           launch = -1, gpu = -1, publish = -1, wake = -1, completion = -1;
  } round;
  // The CPU over the timed span (tools/proc_cpu.h), per second of it: cores
  // busy, context switches and preemptions; of all tenants together, of the
  // busiest tenant, and of the processes that serve them (stmuxd, MPS's).
  struct Cpu {
    double cores = 0, switches = 0, preemptions = 0;
  } tenants_cpu, busiest_cpu, serving_cpu;
  // --tenant-cpu-quota: the share of the timed span each tenant's quota held
  // it back (cgroup cpu.stat), the mean over tenants and the most (-1: none).
  double throttled_mean = -1, throttled_most = -1;
  std::vector<double> repeats;  // --repeat: each valid run's rate
  // The rate in each of equal windows of the timed span (about a second
  // each, 2 to 10 of them; tools/row_validity.h), which shows a row that was
  // still rising or falling.
  std::vector<double> window_rates;
};

void usage(FILE* out) {
  std::fprintf(out,
               "usage: stmux-bench [options]\n"
               "Runs R tenant processes of an ordinary cuBLAS program (stmux-cublas-client), or\n"
               "of PyTorch, in a closed loop, five ways: time-only, mps, stmux, stmux-mps and the\n"
               "in-process ceiling; each row's clock starts once every tenant is ready, and a row\n"
               "whose tenants did not all run through it is invalid. Prints a table, the targets\n"
               "and a summary, and writes bench.json to --out (stmux-plot draws it). Beside\n"
               "throughput and tails, each row says what the CPU did over the timed span (from\n"
               "/proc): cores busy, the tenants' + the serving processes' (stmuxd, MPS), and\n"
               "preemptions per second (a core taken from a busy thread); a row whose rate in\n"
               "the last of its windows (about a second each) differs from the first by %.0f%% or\n"
               "more says so, as one not yet steady.\n\n"
               "  --shapes LIST    rnn (512x1x512), resnet (256x128x1152), cube (256x256x256),\n"
               "                   mixed (the three, one per tenant in turn) or MxNxK;\n"
               "                   or PyTorch tenants (stmux-torch-tenant; their rows count\n"
               "                   model steps): torch-rnn, torch-cube, torch-mlp, torch-multi,\n"
               "                   torch-attn (self-attention: nn.Linear and bmm);\n"
               "                   default rnn,resnet,cube,mixed\n"
               "  --tenants LIST   values of R, each 1..256; default 1,8,32,128,256\n"
               "  --modes LIST     time-only, mps, stmux (no MPS), stmux-mps (stmuxd and\n"
               "                   its tenants on MPS), ceiling; default all\n"
               "  --seconds S      timed seconds per row, 0.1..600 (default 2)\n"
               "  --warmup S       seconds all tenants run untimed once all are ready,\n"
               "                   before the clock starts, 0..600 (default 1)\n"
               "  --ready-timeout S  longest wait for every tenant of a row to be set up\n"
               "                   and warmed up; a row whose tenants are not ready by\n"
               "                   then is invalid, 0.1..600 (default 120)\n"
               "  --out DIR        where results go (default bench-out)\n"
               "  --client PATH, --stmuxd PATH, --shim PATH\n"
               "                   the programs (default: found next to stmux-bench)\n"
               "  --stmuxd-args A  extra flags for stmuxd, e.g. \"--window-us=50\" (repeated:\n"
               "                   all of them)\n"
               "  --repeat N       run every row N times, round after round, and report\n"
               "                   the run of median rate, 1..20 (default 1)\n"
               "  --stmuxd-nice N  run stmuxd at niceness N (-20..19; below 0 needs root)\n"
               "  --tenant-args A  extra arguments for every tenant, e.g. \"--sync blocking\"\n"
               "                   (the program's own choice of how CUDA waits; repeated:\n"
               "                   all of them)\n"
               "  --tenant-env E   variables for every tenant, e.g. \"STMUX_SYNC=auto\"\n"
               "  --tenant-cpu-quota C  each tenant in a cgroup of its own limited to C\n"
               "                   cores, 0.01..1024, as a pod with limits.cpu (needs root\n"
               "                   and a cgroup hierarchy with the cpu controller); rows\n"
               "                   report the share of the span the quota held tenants back\n"
               "  --python PATH    the Python with PyTorch for torch-* shapes (default python3)\n"
               "  --help           this text\n"
               "Needs a CUDA device. Progress goes to stderr.\n"
               "Exit status: 0 if any row ran (invalid rows say why in bench.json), 1 if none\n"
               "did, 2 for bad arguments, 3 without a CUDA device.\n",
               100 * kUnsteady);
}

std::optional<Shape> parseShape(const std::string& text) {
  if (text == "rnn") return Shape{"rnn-512x1x512", 512, 1, 512, false, ""};
  if (text == "resnet") return Shape{"resnet-256x128x1152", 256, 128, 1152, false, ""};
  if (text == "cube") return Shape{"cube-256", 256, 256, 256, false, ""};
  if (text == "mixed") return Shape{"mixed", 0, 0, 0, true, ""};
  for (const char* workload : {"rnn", "cube", "mlp", "multi", "attn"}) {
    if (text == std::string("torch-") + workload) return Shape{text, 0, 0, 0, false, workload};
  }
  long long m, n, k;
  char tail;
  if (std::sscanf(text.c_str(), "%lldx%lldx%lld%c", &m, &n, &k, &tail) == 3 && m > 0 && n > 0 &&
      k > 0 && m <= 65536 && n <= 65536 && k <= 65536) {
    return Shape{text, m, n, k, false, ""};
  }
  return std::nullopt;
}

bool parseArgs(int argc, char** argv, Options& o) {
  static const option kLong[] = {{"shapes", required_argument, nullptr, 's'},
                                 {"tenants", required_argument, nullptr, 'r'},
                                 {"modes", required_argument, nullptr, 'm'},
                                 {"seconds", required_argument, nullptr, 'S'},
                                 {"warmup", required_argument, nullptr, 'w'},
                                 {"out", required_argument, nullptr, 'o'},
                                 {"client", required_argument, nullptr, 'c'},
                                 {"stmuxd", required_argument, nullptr, 'd'},
                                 {"shim", required_argument, nullptr, 'l'},
                                 {"stmuxd-args", required_argument, nullptr, 'a'},
                                 {"ready-timeout", required_argument, nullptr, 'R'},
                                 {"python", required_argument, nullptr, 'P'},
                                 {"stmuxd-nice", required_argument, nullptr, 'N'},
                                 {"repeat", required_argument, nullptr, 'n'},
                                 {"tenant-args", required_argument, nullptr, 'A'},
                                 {"tenant-env", required_argument, nullptr, 'E'},
                                 {"tenant-cpu-quota", required_argument, nullptr, 'Q'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  auto bad = [](const char* flag, const char* value, const char* accepted) {
    std::fprintf(stderr, "stmux-bench: %s '%s': accepted: %s\n", flag, value, accepted);
    return false;
  };
  std::string shapes = "rnn,resnet,cube,mixed";
  for (int c; (c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1;) {
    switch (c) {
      case 's':
        shapes = optarg;
        break;
      case 'r': {
        auto list =
            splitList<int>(optarg, [](std::string_view item) { return wholeIn(item, 1, 256); });
        if (!list) return bad("--tenants", optarg, "a comma-separated list of 1..256");
        o.tenants = *list;
        break;
      }
      case 'm': {
        auto list = splitList<Mode>(optarg, [](std::string_view item) -> std::optional<Mode> {
          for (Mode mode : kModes) {
            if (item == modeName(mode)) return mode;
          }
          return std::nullopt;
        });
        if (!list)
          return bad("--modes", optarg,
                     "a comma-separated list of time-only, mps, stmux, stmux-mps, ceiling");
        o.modes = *list;
        break;
      }
      case 'S':
      case 'w':
      case 'R': {
        const auto value = realIn(optarg, c == 'w' ? 0.0 : 0.1, 600);
        const char* flag = c == 'S' ? "--seconds" : c == 'w' ? "--warmup" : "--ready-timeout";
        if (!value) {
          return bad(flag, optarg,
                     c == 'w' ? "a number of seconds, 0..600" : "a number of seconds, 0.1..600");
        }
        (c == 'S' ? o.seconds : c == 'w' ? o.warmup : o.ready_timeout) = *value;
        break;
      }
      case 'o':
        o.out = optarg;
        break;
      case 'c':
        o.client = optarg;
        break;
      case 'd':
        o.stmuxd = optarg;
        break;
      case 'l':
        o.shim = optarg;
        break;
      case 'a':
        o.stmuxd_args += (o.stmuxd_args.empty() ? "" : " ") + std::string(optarg);
        break;
      case 'P':
        o.python = optarg;
        break;
      case 'N': {
        const auto nice = wholeIn(optarg, -20, 19);
        if (!nice) return bad("--stmuxd-nice", optarg, "a niceness from -20 to 19");
        o.stmuxd_nice = *nice;
        break;
      }
      case 'A':
        o.tenant_args += (o.tenant_args.empty() ? "" : " ") + std::string(optarg);
        break;
      case 'n': {
        const auto repeat = wholeIn(optarg, 1, 20);
        if (!repeat) return bad("--repeat", optarg, "a number of runs per row, 1..20");
        o.repeat = *repeat;
        break;
      }
      case 'E': {
        std::stringstream items(optarg);
        for (std::string item; items >> item;) {
          const std::size_t equals = item.find('=');
          if (equals == 0 || equals == std::string::npos) {
            return bad("--tenant-env", optarg, "space-separated VARIABLE=VALUE items");
          }
          o.tenant_env[item.substr(0, equals)] = item.substr(equals + 1);
        }
        break;
      }
      case 'Q': {
        const auto cores = realIn(optarg, 0.01, 1024);
        if (!cores) return bad("--tenant-cpu-quota", optarg, "a number of cores, 0.01..1024");
        o.tenant_cpu_quota = *cores;
        break;
      }
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        usage(stderr);
        return false;
    }
  }
  if (optind != argc) return bad("argument", argv[optind], "options only (see --help)");
  auto parsed =
      splitList<Shape>(shapes, [](std::string_view item) { return parseShape(std::string(item)); });
  if (!parsed)
    return bad("--shapes", shapes.c_str(),
               "rnn, resnet, cube, mixed, MxNxK, torch-rnn, torch-cube, torch-mlp, "
               "torch-multi or torch-attn, comma-separated");
  o.shapes = *parsed;
  const fs::path self = fs::canonical("/proc/self/exe").parent_path();
  if (o.client.empty()) o.client = findProgram(self, {"stmux-cublas-client"});
  o.torch_tenant = findProgram(self, {"stmux-torch-tenant"});
  if (o.python.find('/') == std::string::npos) {  // spawned by path: look it up now
    const char* path = std::getenv("PATH");
    std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
    for (std::string dir; std::getline(dirs, dir, ':');) {
      if (!dir.empty() && ::access((dir + "/" + o.python).c_str(), X_OK) == 0) {
        o.python = dir + "/" + o.python;
        break;
      }
    }
  }
  if (o.stmuxd.empty()) o.stmuxd = findProgram(self, kStmuxdBesideTools);
  if (o.shim.empty()) o.shim = findProgram(self, kShimBesideTools);
  for (const auto& [what, path] :
       {std::pair{"stmux-cublas-client", o.client}, std::pair{"stmuxd", o.stmuxd},
        std::pair{"libstmux.so", o.shim}}) {
    if (path.empty()) {
      std::fprintf(stderr, "stmux-bench: cannot find %s next to stmux-bench; name it with a flag\n",
                   what);
      return false;
    }
    if (!fs::exists(path)) {
      std::fprintf(stderr, "stmux-bench: %s: %s does not exist\n", what, path.c_str());
      return false;
    }
  }
  for (const auto& [what, path] :
       {std::pair{"stmux-cublas-client", o.client}, std::pair{"stmuxd", o.stmuxd}}) {
    if (::access(path.c_str(), X_OK) != 0) {
      std::fprintf(stderr, "stmux-bench: %s: %s cannot be run: %s\n", what, path.c_str(),
                   std::strerror(errno));
      return false;
    }
  }
  return true;
}

// ---- one measurement ----------------------------------------------------------

// The pids of the tenants attached to the daemon at `socket`.
std::vector<long> attachedPids(const std::string& socket) {
  std::vector<long> pids;
  if (auto status = daemonStatus(socket)) {
    if (const Json* clients = jsonFind(*status, "clients"); clients && clients->is_array()) {
      for (const Json& client : *clients) {
        if (const Json* pid = jsonFind(client, "pid")) {
          pids.push_back(static_cast<long>(jsonNumber(pid, -1)));
        }
      }
    }
  }
  return pids;
}

// The MPS control daemon and servers started with `pipe_dir` as their
// CUDA_MPS_PIPE_DIRECTORY, by pid: ours, not another MPS on the machine.
std::vector<long> mpsProcesses(const std::string& pipe_dir) {
  const std::string wanted = "CUDA_MPS_PIPE_DIRECTORY=" + pipe_dir;
  std::vector<long> pids;
  std::error_code error;
  for (const fs::directory_entry& entry : fs::directory_iterator("/proc", error)) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string dir = entry.path().string();
    if (readText(dir + "/comm").rfind("nvidia-cuda-mps", 0) != 0) continue;
    // NUL-separated, each variable followed by a NUL.
    const std::string nul(1, '\0');
    if ((nul + readText(dir + "/environ")).find(nul + wanted + nul) != std::string::npos) {
      pids.push_back(std::stol(name));
    }
  }
  return pids;
}

class Bench {
 public:
  explicit Bench(Options options) : o_(std::move(options)) {}

  Point run(const Shape& shape, int tenants, Mode mode) {
    Point point;
    point.shape = shape.name;
    point.tenants = tenants;
    point.mode = mode;
    const fs::path dir = fs::path(o_.out) / "runs" /
                         (shape.name + "-r" + std::to_string(tenants) + "-" + modeName(mode));
    fs::remove_all(dir);
    fs::create_directories(dir);

    if (!shape.torch.empty()) {
      if (mode == Mode::kCeiling) {
        point.note = "skipped: no in-process ceiling for PyTorch tenants";
        return point;
      }
      if (std::string why = torchMissing(); !why.empty()) {
        point.note = "skipped: " + why;
        return point;
      }
    }

    // The tenants'. Rows off MPS point at an empty pipe directory of their
    // own: on a host whose MPS control daemon uses the default (/tmp/
    // nvidia-mps, as stmux-mps.service does), they would otherwise run on it.
    std::map<std::string, std::string> env = {
        {"CUDA_MPS_PIPE_DIRECTORY", (dir / "no-mps").string()}};
    Process daemon;
    const std::string socket = (dir / "stmuxd.sock").string();
    if (usesMps(mode)) {
      if (std::string why; !startMps(dir, env, why)) {
        point.note = why;
        return point;
      }
    }
    if (usesStmux(mode)) {
      std::vector<std::string> args = {o_.stmuxd, "--socket", socket};
      if (o_.stmuxd_nice != 0) {
        args.insert(args.begin(), {"/usr/bin/nice", "-n", std::to_string(o_.stmuxd_nice)});
      }
      std::stringstream extra(o_.stmuxd_args);
      for (std::string word; extra >> word;)
        args.push_back(word);
      std::map<std::string, std::string> daemon_env = env;  // on MPS with its tenants
      // The route looks of STMUX_ROUTE=auto on MPS, one line each, in the
      // row's stmuxd.err.
      daemon_env["STMUX_LOG"] = "warn,sched=debug";
      daemon = Process(args, daemon_env, (dir / "stmuxd").string());
      // Reaped as it is polled, so that one that exits at once is seen at once.
      const auto status = [&] { return daemon.wait(std::chrono::milliseconds(0)); };
      if (!waitUntil([&] { return daemonStatus(socket).has_value() || status() >= 0; }, 30) ||
          status() >= 0) {
        const int exit_status = status();
        point.note = "stmuxd did not start: " +
                     (!daemon.started() ? daemon.spawnError()
                      : exit_status >= 0
                          ? fmt::format("exited {}: {}", exit_status, firstLine(daemon.err()))
                          : "no answer on its socket within 30 s: " + firstLine(daemon.err()));
        if (usesMps(mode)) stopMps(env);
        return point;
      }
      env.insert({{"LD_PRELOAD", o_.shim}, {"STMUX_SOCKET", socket}, {"STMUX_LOG", "stats=info"}});
    }

    const int processes = mode == Mode::kCeiling ? 1 : tenants;
    // Before the clients, so that it is removed after they are gone.
    CpuQuotaGroups groups;
    const bool limited = o_.tenant_cpu_quota > 0 && mode != Mode::kCeiling;
    if (std::string why; limited && !groups.make(processes, o_.tenant_cpu_quota, why)) {
      point.note = "--tenant-cpu-quota: " + why;
      if (usesMps(mode)) stopMps(env);
      return point;
    }
    std::vector<Process> clients;
    auto file = [&](const std::string& name, int i) {
      return (dir / (name + std::to_string(i))).string();
    };
    const std::string go = (dir / "go").string();
    // --tenant-env's variables, where the bench's own (the preload, the
    // socket, the log the row is counted from, MPS's pipes) do not stand.
    env.insert(o_.tenant_env.begin(), o_.tenant_env.end());
    const auto began = std::chrono::steady_clock::now();
    for (int i = 0; i < processes; ++i) {
      std::vector<std::string> args = {o_.client, mode == Mode::kCeiling ? "ceiling" : "loop"};
      if (!shape.torch.empty()) args = {o_.python, o_.torch_tenant, shape.torch};
      args.insert(args.end(), {"--ready", file("ready", i), "--go", go, "--out", file("lat", i),
                               "--tenant", std::to_string(i)});
      if (mode == Mode::kCeiling) args.insert(args.end(), {"--count", std::to_string(tenants)});
      if (shape.mixed) {
        args.push_back("--mixed");
      } else if (shape.torch.empty()) {  // a PyTorch workload names its own sizes
        args.insert(args.end(), {"--m", std::to_string(shape.m), "--n", std::to_string(shape.n),
                                 "--k", std::to_string(shape.k)});
      }
      std::stringstream extra(o_.tenant_args);
      for (std::string word; extra >> word;)
        args.push_back(word);
      clients.emplace_back(limited ? groups.startingIn(i, args) : args, env, file("client", i));
      // Spaced out: many CUDA processes starting at once saw cublasCreate
      // fail with "not initialized".
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }

    std::string invalid = awaitReady(clients, file, socket, usesStmux(mode));
    point.ready_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    Span span;
    std::vector<TenantOutcome> outcomes(processes);
    if (invalid.empty()) {
      span.start_ns = realtimeNs() + static_cast<std::uint64_t>((o_.warmup + 0.05) * 1e9);
      span.stop_ns = span.start_ns + static_cast<std::uint64_t>(o_.seconds * 1e9);
      if (!writeGo(go, span)) invalid = "cannot write " + go;
    }
    std::optional<Json> daemon_before, daemon_after;
    std::map<long, std::string> mps_by_pid;  // stmux rows: each tenant's MPS state, by pid
    if (invalid.empty()) {
      std::vector<long> tenant_pids, serving_pids;
      for (const Process& client : clients)
        tenant_pids.push_back(client.pid());
      if (usesStmux(mode)) serving_pids.push_back(daemon.pid());
      if (usesMps(mode)) {
        for (long pid : mpsProcesses(env.at("CUDA_MPS_PIPE_DIRECTORY")))
          serving_pids.push_back(pid);
      }
      // stmuxd's account at the span's two ends, so that the round and the
      // mean batch are the span's (tools/round_span.h).
      // With --tenant-cpu-quota, how long each tenant's quota has held it
      // back, at the same two ends.
      std::vector<std::optional<double>> throttled_before, throttled_after;
      const auto sampleEnds = [&](std::optional<Json>& into,
                                  std::vector<std::optional<double>>& throttled) {
        return [&, socket] {
          if (usesStmux(mode)) into = daemonStatus(socket);
          for (int i = 0; i < groups.size(); ++i)
            throttled.push_back(groups.throttledSeconds(i));
        };
      };
      measureCpu(span, tenant_pids, serving_pids, point,
                 sampleEnds(daemon_before, throttled_before),
                 sampleEnds(daemon_after, throttled_after));
      if (groups.size() > 0) {
        double sum = 0, most = 0;
        for (int i = 0; i < groups.size(); ++i) {
          if (!throttled_before[i] || !throttled_after[i]) continue;
          const double share = (*throttled_after[i] - *throttled_before[i]) / span.seconds();
          sum += share;
          most = std::max(most, share);
        }
        point.throttled_mean = sum / groups.size();
        point.throttled_most = most;
        point.addNote(fmt::format(
            "{:g}-core quotas held tenants back {:.1f}% of the span (most {:.1f}%)",
            o_.tenant_cpu_quota, 100 * point.throttled_mean, 100 * point.throttled_most));
      }
      const auto deadline =
          std::chrono::steady_clock::now() +
          std::chrono::milliseconds(static_cast<long>((o_.warmup + o_.seconds + 60) * 1000));
      for (int i = 0; i < processes; ++i) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        outcomes[i].exit_status = clients[i].wait(std::max(left, std::chrono::milliseconds(0)));
        outcomes[i].error = tenantError(clients[i].err());
        if (outcomes[i].exit_status == 0) outcomes[i].result = readResult(file("lat", i));
      }
      const RowVerdict verdict = judgeRow(outcomes, span);
      if (!verdict.valid) invalid = verdict.why;
    }
    for (Process& client : clients)
      client.signal(SIGKILL);  // those still running after a failed barrier
    for (Process& client : clients)
      client.wait(std::chrono::seconds(10));

    if (usesStmux(mode)) {
      countDirect(clients, point);
      // Tenants beyond stmuxd's places on MPS (stmux/mps_seats.h) run off it.
      if (daemon_after) {
        const Json* attached = jsonFind(*daemon_after, "clients");
        for (std::size_t i = 0; attached != nullptr && i < attached->size(); ++i) {
          const Json* client = jsonAt(attached, i);
          const std::string_view mps = jsonString(jsonFind(client, "mps"));
          mps_by_pid[static_cast<long>(jsonNumber(jsonFind(client, "pid")))] = mps;
          point.tenants_off_mps += mps == clientMpsName(ClientMps::kKeptOff);
        }
        if (point.tenants_off_mps != 0) {
          point.addNote(fmt::format("{} of {} tenants ran off MPS: every place on it was taken",
                                    point.tenants_off_mps, tenants));
        }
      }
      if (auto status = daemonStatus(socket)) {
        const Json* gpu = jsonAt(jsonFind(*status, "gpus"), 0);
        if (const double batches = jsonNumber(jsonFind(gpu, "batches")); batches > 0) {
          point.graph_share = jsonNumber(jsonFind(gpu, "graph_launches")) / batches;
        }
        // Over the span where both ends were read; the daemon's whole life
        // (warm-up and ramp-up in it) otherwise, as before.
        std::optional<DaemonRound> round = daemon_before && daemon_after
                                               ? roundOverSpan(*daemon_before, *daemon_after)
                                               : std::nullopt;
        if (!round) {
          round = roundOverWholeRun(*status);
          point.addNote("round and mean batch over stmuxd's whole run");
        }
        point.mean_batch = round->mean_batch;
        point.round.ring = round->ring;
        point.round.stream_ready = round->stream_ready;
        point.round.batch_wait = round->batch_wait;
        point.round.handoff = round->handoff;
        point.round.launch = round->launch;
        point.round.gpu = round->gpu;
        point.round.publish = round->publish;
        point.round.wake = round->wake;
        const Json* route = jsonFind(*status, "mps_route");
        point.route_looks = jsonNumber(jsonFind(route, "looks"));
        point.route_gain = jsonNumber(jsonFind(route, "last_gain"));
      }
      daemon.signal(SIGTERM);
      if (daemon.wait(std::chrono::seconds(30)) != 0 && invalid.empty()) {
        point.note = "stmuxd did not exit cleanly";
      }
    }
    if (usesMps(mode)) stopMps(env);
    if (!invalid.empty()) {
      point.note = "invalid: " + invalid;
      if (usesMps(mode) && tenants + (usesStmux(mode) ? 1 : 0) > 48) {
        point.note += " (MPS admits at most 48 clients on CUDA 13.0)";
      }
      return point;
    }

    std::vector<std::uint32_t> all;
    std::vector<std::uint32_t> tenant_p50_ns;
    double gemms = 0, steps = 0, flops = 0;
    std::size_t worst = 0;  // the tenant with the worst p99
    for (std::size_t i = 0; i < outcomes.size(); ++i) {
      TenantResult& result = *outcomes[i].result;
      steps += static_cast<double>(result.calls);
      gemms += static_cast<double>(result.calls) * result.gemms_per_step;
      // Weighted by each tenant's own calls: a mixed row's fast tenants make more.
      flops += static_cast<double>(result.calls) * result.gemms_per_step *
               (mode == Mode::kCeiling ? shape.flops(tenants) : shape.flopsOf(static_cast<int>(i)));
      // Every step that overlapped the span, those crossing its edges too.
      all.insert(all.end(), result.latencies_ns.begin(), result.latencies_ns.end());
      if (const double p99 = percentileUs(result.latencies_ns, 0.99); p99 > point.worst_p99_us) {
        point.worst_p99_us = p99;
        worst = i;
      }
      tenant_p50_ns.push_back(
          static_cast<std::uint32_t>(std::lround(1000 * percentileUs(result.latencies_ns, 0.5))));
    }
    point.ran = true;
    point.longest = longestStep(outcomes, span);
    // Whether a tenant kept off MPS, time-sliced, set the row's worst p99.
    if (point.tenants_off_mps != 0) {
      const auto found = mps_by_pid.find(clients[worst].pid());
      point.worst_tenant_mps = found != mps_by_pid.end() ? found->second : "unknown";
      point.addNote(fmt::format("the worst p99's tenant: MPS {}", point.worst_tenant_mps));
    }
    if (point.routed_direct >= 0.005) {
      point.addNote(fmt::format("STMUX_ROUTE=auto ran {:.0f}% of calls direct (measured faster)",
                                100 * point.routed_direct));
    }
    if (point.graph_share > 0) {
      point.addNote(fmt::format("{:.0f}% of batches replayed as graphs", 100 * point.graph_share));
    }
    if (point.route_looks > 0) {
      point.addNote(fmt::format("{:.0f} route looks, the last {:.2f}x the other way",
                                point.route_looks, point.route_gain));
    }
    point.calls = static_cast<long>(steps);
    // PyTorch rows count model steps; cuBLAS rows GEMMs.
    point.span = span;
    point.gemms_per_s = (shape.torch.empty() ? gemms : steps) / span.seconds();
    const int windows = std::clamp(static_cast<int>(std::lround(span.seconds())), 2, 10);
    for (double share : windowShares(outcomes, span, windows))
      point.window_rates.push_back(point.gemms_per_s * share * windows);
    if (const double first = point.window_rates.front(), last = point.window_rates.back();
        first > 0 && std::abs(last / first - 1) >= kUnsteady) {
      point.addNote(fmt::format("rate {} {:.0f}% from the first to the last of {} windows",
                                last > first ? "rose" : "fell", 100 * std::abs(last / first - 1),
                                windows));
    }
    point.gflops = flops / span.seconds() / 1e9;
    point.median_p50_us = percentileUs(tenant_p50_ns, 0.5);
    point.p50_us = percentileUs(all, 0.50);
    point.p99_us = percentileUs(all, 0.99);
    point.p999_us = percentileUs(all, 0.999);
    return point;
  }

 private:
  // Waits until every tenant has written its ready file and, for stmux rows,
  // is attached to the daemon. Empty when they all are; otherwise why not.
  std::string awaitReady(std::vector<Process>& clients,
                         const std::function<std::string(const std::string&, int)>& file,
                         const std::string& socket, bool attached) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<long>(o_.ready_timeout * 1000));
    std::vector<bool> ready(clients.size(), false);
    std::size_t count = 0;
    while (count < clients.size()) {
      for (std::size_t i = 0; i < clients.size(); ++i) {
        if (ready[i]) continue;
        if (!clients[i].started()) {
          return fmt::format("tenant {} could not be started: {}", i, clients[i].spawnError());
        }
        if (fs::exists(file("ready", static_cast<int>(i)))) {
          ready[i] = true;
          ++count;
        } else if (const int status = clients[i].wait(std::chrono::milliseconds(0)); status >= 0) {
          return fmt::format("tenant {} exited {} before it was ready: {}", i, status,
                             tenantError(clients[i].err()));
        }
      }
      if (count == clients.size()) break;
      if (std::chrono::steady_clock::now() >= deadline) {
        for (std::size_t i = 0; i < clients.size(); ++i) {
          if (!ready[i]) {
            return fmt::format(
                "{} of {} tenants were not ready within {:g} s (--ready-timeout); "
                "tenant {} among them",
                clients.size() - count, clients.size(), o_.ready_timeout, i);
          }
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (!attached) return "";
    // Their first calls attached them; the daemon's list says so.
    for (const Process& client : clients) {
      const long pid = client.pid();
      if (!waitUntil(
              [&] {
                const std::vector<long> pids = attachedPids(socket);
                return std::find(pids.begin(), pids.end(), pid) != pids.end();
              },
              5)) {
        return fmt::format("tenant pid {} was ready but is not attached to stmuxd", pid);
      }
    }
    return "";
  }

  // Why PyTorch tenants cannot run here, or empty; asked once.
  std::string torchMissing() {
    if (!torch_checked_) {
      torch_checked_ = true;
      if (o_.torch_tenant.empty()) {
        torch_missing_ = "stmux-torch-tenant is not next to stmux-bench";
      } else if (::access(o_.python.c_str(), X_OK) != 0) {
        torch_missing_ = fmt::format("no Python at {} (--python)", o_.python);
      } else {
        const Ran ran = stmux::run({o_.python, "-c", "import torch"}, {},
                                   o_.out + "/runs/torch-probe", std::chrono::seconds(120));
        if (ran.status != 0) {
          torch_missing_ = fmt::format("PyTorch is not installed for {} (import torch: {})",
                                       o_.python, lastLine(ran.err.empty() ? ran.out : ran.err));
        }
      }
    }
    return torch_missing_;
  }

  // Samples the tenants and the serving processes as the span starts and as
  // it ends (sleeping in between), into the point's CPU figures.
  static void measureCpu(const Span& span, const std::vector<long>& tenants,
                         const std::vector<long>& serving, Point& point,
                         const std::function<void()>& at_start,
                         const std::function<void()>& at_stop) {
    auto sampleAll = [](const std::vector<long>& pids) {
      std::vector<std::optional<CpuSample>> samples;
      for (long pid : pids)
        samples.push_back(sampleCpu(pid));
      return samples;
    };
    auto sleepUntil = [](std::uint64_t realtime_ns) {
      const std::uint64_t now = realtimeNs();
      if (realtime_ns > now)
        std::this_thread::sleep_for(std::chrono::nanoseconds(realtime_ns - now));
    };
    sleepUntil(span.start_ns);
    const auto tenants_before = sampleAll(tenants), serving_before = sampleAll(serving);
    at_start();
    sleepUntil(span.stop_ns);
    const auto tenants_after = sampleAll(tenants), serving_after = sampleAll(serving);
    at_stop();
    const double seconds = span.seconds();
    auto perSecond = [seconds](const CpuSample& used) {
      return Point::Cpu{used.cpu_s / seconds, static_cast<double>(used.voluntary) / seconds,
                        static_cast<double>(used.involuntary) / seconds};
    };
    CpuSample all_tenants, all_serving;
    for (std::size_t i = 0; i < tenants.size(); ++i) {
      if (!tenants_before[i] || !tenants_after[i]) continue;  // gone: the row is invalid
      const CpuSample used = tenants_after[i]->since(*tenants_before[i]);
      all_tenants += used;
      if (used.cpu_s / seconds > point.busiest_cpu.cores) point.busiest_cpu = perSecond(used);
    }
    for (std::size_t i = 0; i < serving.size(); ++i) {
      if (serving_before[i] && serving_after[i]) {
        all_serving += serving_after[i]->since(*serving_before[i]);
      }
    }
    point.tenants_cpu = perSecond(all_tenants);
    point.serving_cpu = perSecond(all_serving);
  }

  // From each stmux tenant's exit line: the calls that fell back to cuBLAS
  // (-1 when a tenant printed none: the row cannot be vouched for), and the
  // share that STMUX_ROUTE=auto sent direct because it measured that faster
  // (a choice, not a fallback).
  static void countDirect(const std::vector<Process>& clients, Point& point) {
    long fallbacks = 0;
    double calls = 0, routed = 0;
    // The tenants' side of a round, weighted by their timed calls.
    double timed = 0, prior = 0, completion = 0;
    for (const Process& client : clients) {
      const ShimStats stats = shimStats(client.err());
      if (stats.calls < 0) {
        point.fallbacks = -1;
        return;
      }
      calls += static_cast<double>(stats.calls);
      for (const auto& [name, entry] : stats.entries) {
        ShimStats::Entry& sum = point.entries[name];
        sum.calls += entry.calls, sum.served += entry.served;
        sum.failed += entry.failed, sum.direct += entry.direct;
      }
      for (const auto& [reason, n] : stats.direct) {
        if (reason == "measured_direct") {
          routed += static_cast<double>(n);
        } else {
          fallbacks += n;
        }
      }
      if (stats.timed > 0) {
        timed += static_cast<double>(stats.timed);
        prior += static_cast<double>(stats.timed) * stats.prior_wait_us;
        completion += static_cast<double>(stats.timed) * stats.completion_us;
      }
    }
    point.fallbacks = fallbacks;
    point.routed_direct = calls > 0 ? routed / calls : 0;
    if (timed > 0) {
      point.round.prior_wait = prior / timed;
      point.round.completion = completion / timed;
    }
  }

  // MPS with its pipes in our own directory, so that it neither meets nor
  // disturbs another MPS on the machine.
  bool startMps(const fs::path& dir, std::map<std::string, std::string>& env, std::string& why) {
    env = {{"CUDA_MPS_PIPE_DIRECTORY", (dir / "mps-pipe").string()},
           {"CUDA_MPS_LOG_DIRECTORY", (dir / "mps-log").string()}};
    fs::create_directories(dir / "mps-pipe");
    fs::create_directories(dir / "mps-log");
    auto started = stmux::run({"/usr/bin/env", "nvidia-cuda-mps-control", "-d"}, env,
                              (dir / "mps-start").string(), std::chrono::seconds(30));
    if (started.status == 127) {
      why = "skipped: nvidia-cuda-mps-control is not installed";
      return false;
    }
    if (started.status != 0) {
      why = "skipped: nvidia-cuda-mps-control -d failed: " + firstLine(started.err + started.out);
      return false;
    }
    if (!waitUntil([&] { return fs::exists(dir / "mps-pipe" / "control"); }, 10)) {
      why = "skipped: the MPS control daemon did not come up";
      return false;
    }
    return true;
  }

  void stopMps(const std::map<std::string, std::string>& env) {
    (void)stmux::run({"/bin/sh", "-c", "echo quit | nvidia-cuda-mps-control"}, env,
                     o_.out + "/runs/mps-stop", std::chrono::seconds(30));
    // Gone when its processes are (its pipe files may outlive them).
    const std::string pipes = env.at("CUDA_MPS_PIPE_DIRECTORY");
    if (!waitUntil([&] { return mpsProcesses(pipes).empty(); }, 10)) {
      std::fprintf(stderr, "(MPS with pipes in %s still running 10 s after quit) ", pipes.c_str());
    }
  }

  Options o_;
  bool torch_checked_ = false;
  std::string torch_missing_;
};

// ---- reporting ------------------------------------------------------------------

const Point* find(const std::vector<Point>& points, const std::string& shape, int tenants,
                  Mode mode) {
  for (const Point& p : points) {
    if (p.shape == shape && p.tenants == tenants && p.mode == mode && p.ran) return &p;
  }
  return nullptr;
}

std::string ratio(const Point& p, const Point* base) {
  if (base == nullptr || base->gemms_per_s <= 0 || &p == base) return "-";
  return fmt::format("{:.2f}x", p.gemms_per_s / base->gemms_per_s);
}

const char* unit(const std::string& shape) {
  return shape.rfind("torch-", 0) == 0 ? "steps/s" : "GEMMs/s";
}

// One row's runs (--repeat) as one point: the valid run of median rate (the
// lower of the two middle ones), with every valid run's rate beside it; the
// first run if none was valid.
Point medianRun(std::vector<Point> runs) {
  std::vector<Point> valid;
  for (const Point& run : runs) {
    if (run.ran) valid.push_back(run);
  }
  if (runs.size() == 1 || valid.empty()) return runs.front();
  std::sort(valid.begin(), valid.end(),
            [](const Point& a, const Point& b) { return a.gemms_per_s < b.gemms_per_s; });
  Point median = valid[(valid.size() - 1) / 2];
  for (const Point& run : valid)
    median.repeats.push_back(run.gemms_per_s);
  std::string said = fmt::format("median of {} runs ({:.0f} to {:.0f})", valid.size(),
                                 valid.front().gemms_per_s, valid.back().gemms_per_s);
  if (valid.size() < runs.size()) {
    const auto invalid =
        std::find_if(runs.begin(), runs.end(), [](const Point& run) { return !run.ran; });
    said += fmt::format("; {} invalid: {}", runs.size() - valid.size(), invalid->note);
  }
  median.note = median.note.empty() ? said : said + "; " + median.note;
  return median;
}

// "rate/s" is GEMMs/s for cuBLAS tenants and model steps/s for PyTorch ones.
void printTable(const std::vector<Point>& points, FILE* out) {
  // cores: CPU cores busy over the span, the tenants' + the serving processes';
  // preempt/s: how often the scheduler took a core from any of them.
  std::fprintf(out, "%-20s %4s %-9s %12s %9s %9s %9s %9s %9s %8s %8s %8s %6s %6s %11s %9s  %s\n",
               "shape", "R", "mode", "rate/s", "GFLOP/s", "p50 us", "p99 us", "p99.9 us", "worst99",
               "vs time", "vs mps", "vs ceil", "fallbk", "batch", "cores", "preempt/s", "note");
  for (const Point& p : points) {
    if (!p.ran) {
      std::fprintf(out,
                   "%-20s %4d %-9s %12s %9s %9s %9s %9s %9s %8s %8s %8s %6s %6s %11s %9s  %s\n",
                   p.shape.c_str(), p.tenants, modeName(p.mode), "-", "-", "-", "-", "-", "-", "-",
                   "-", "-", "-", "-", "-", "-", p.note.c_str());
      continue;
    }
    std::fprintf(
        out,
        "%-20s %4d %-9s %12.0f %9.1f %9.1f %9.1f %9.1f %9.1f %8s %8s %8s %6s %6s %11s %9.0f  %s\n",
        p.shape.c_str(), p.tenants, modeName(p.mode), p.gemms_per_s, p.gflops, p.p50_us, p.p99_us,
        p.p999_us, p.worst_p99_us, ratio(p, find(points, p.shape, p.tenants, Mode::kTime)).c_str(),
        ratio(p, find(points, p.shape, p.tenants, Mode::kMps)).c_str(),
        ratio(p, find(points, p.shape, p.tenants, Mode::kCeiling)).c_str(),
        p.fallbacks < 0 ? "-" : std::to_string(p.fallbacks).c_str(),
        usesStmux(p.mode) ? fmt::format("{:.1f}", p.mean_batch).c_str() : "-",
        fmt::format("{:.1f}+{:.1f}", p.tenants_cpu.cores, p.serving_cpu.cores).c_str(),
        p.tenants_cpu.preemptions + p.serving_cpu.preemptions, p.note.c_str());
  }
}

// Where a served call's time went, for each stmux row that ran.
void printRounds(const std::vector<Point>& points, FILE* out) {
  bool header = false;
  auto us = [](double v) { return v < 0 ? std::string("-") : fmt::format("{:.1f}", v); };
  for (const Point& p : points) {
    if (!p.ran || !usesStmux(p.mode)) continue;
    if (!header) {
      std::fprintf(
          out, "\nround (mean us): %-20s %4s %-9s %10s %7s %12s %10s %7s %7s %7s %7s %7s %10s\n",
          "shape", "R", "mode", "prior-wait", "ring", "stream-ready", "batch-wait", "handoff",
          "launch", "gpu", "publish", "wake", "completion");
      header = true;
    }
    const Point::Round& r = p.round;
    std::fprintf(out,
                 "                  %-20s %4d %-9s %10s %7s %12s %10s %7s %7s %7s %7s %7s %10s\n",
                 p.shape.c_str(), p.tenants, modeName(p.mode), us(r.prior_wait).c_str(),
                 us(r.ring).c_str(), us(r.stream_ready).c_str(), us(r.batch_wait).c_str(),
                 us(r.handoff).c_str(), us(r.launch).c_str(), us(r.gpu).c_str(),
                 us(r.publish).c_str(), us(r.wake).c_str(), us(r.completion).c_str());
  }
}

// Which cuBLAS entry points each stmux row's tenants called, and the share
// stmuxd served.
void printEntryPoints(const std::vector<Point>& points, FILE* out) {
  bool header = false;
  for (const Point& p : points) {
    if (!p.ran || !usesStmux(p.mode) || p.entries.empty()) continue;
    if (!header) {
      std::fprintf(out, "\nserved by entry point: shape, R, mode, then calls (served %%)\n");
      header = true;
    }
    std::string line;
    for (const auto& [name, entry] : p.entries) {
      line += fmt::format("  {} {} ({:.1f}%)", name, entry.calls,
                          entry.calls > 0 ? 100.0 * static_cast<double>(entry.served) /
                                                static_cast<double>(entry.calls)
                                          : 0.0);
    }
    std::fprintf(out, "  %-20s %4d %-9s%s\n", p.shape.c_str(), p.tenants, modeName(p.mode),
                 line.c_str());
  }
}

// The issues' targets, each said met or missed and by how much, for each
// stmux mode that ran. Only valid rows take part.
void printTargets(const Options& o, const std::vector<Point>& points, FILE* out) {
  std::fprintf(out, "\ntargets:\n");
  auto line = [&](bool met, const std::string& what) {
    std::fprintf(out, "  %-6s %s\n", met ? "met" : "MISSED", what.c_str());
  };
  for (const Shape& shape : o.shapes) {
    for (Mode mode : {Mode::kStmux, Mode::kStmuxMps}) {
      const std::string who = fmt::format("{} R=32: {}", shape.name, modeName(mode));
      const Point* s32 = find(points, shape.name, 32, mode);
      if (s32 == nullptr) continue;
      // The throughput targets are pure-GEMM tenants'; PyTorch tenants', whose
      // own kernels stmux does not batch, are issue 11's below.
      const bool torch = !shape.torch.empty();
      if (const Point* mps = find(points, shape.name, 32, Mode::kMps); mps != nullptr && !torch) {
        const double r = s32->gemms_per_s / mps->gemms_per_s;
        line(r >= 1.5, fmt::format("{} {:.2f}x MPS (target 1.5x)", who, r));
      }
      if (const Point* time = find(points, shape.name, 32, Mode::kTime);
          time != nullptr && !torch) {
        const double r = s32->gemms_per_s / time->gemms_per_s;
        line(r >= 50, fmt::format("{} {:.1f}x time-only (target 50x)", who, r));
      }
      if (const Point* ceiling = find(points, shape.name, 32, Mode::kCeiling)) {
        const double r = s32->gemms_per_s / ceiling->gemms_per_s;
        line(r >= 0.7, fmt::format("{} {:.2f}x the ceiling (target 0.7x)", who, r));
      }
      // Per tenant, not pooled (a busy tenant's many steps would weigh more,
      // and a mixed row's would mix shapes): the worst tenant's p99 against
      // the median tenant's p50. A ratio of two stalls means nothing: the
      // absolute tail goes beside it.
      line(s32->worst_p99_us <= 3 * s32->median_p50_us,
           fmt::format("{} worst-tenant p99 {:.1f} us = {:.2f}x the median tenant's p50 of {:.1f} "
                       "us (target <= 3x); longest step {:.1f} us (tenant {}, {:.2f} s in; "
                       "{} of {} tenants stalled with it)",
                       who, s32->worst_p99_us,
                       s32->worst_p99_us / std::max(s32->median_p50_us, 1e-9), s32->median_p50_us,
                       s32->longest.us, s32->longest.tenant, s32->longest.at_s,
                       s32->longest.together, s32->tenants));
      const Point* mps = find(points, shape.name, 32, Mode::kMps);
      line(
          s32->worst_p99_us <= 1000,
          fmt::format("{} worst-tenant p99 {:.1f} us (target <= 1000 us){}", who, s32->worst_p99_us,
                      mps != nullptr ? fmt::format("; MPS's {:.1f} us", mps->worst_p99_us) : ""));
      for (int r : {128, 256}) {
        if (const Point* big = find(points, shape.name, r, mode)) {
          line(
              big->gemms_per_s >= s32->gemms_per_s,
              fmt::format("{} R={}: {} {:.0f} {} vs {:.0f} at R=32 (target: no lower)", shape.name,
                          r, modeName(mode), big->gemms_per_s, unit(shape.name), s32->gemms_per_s));
        }
      }
    }
    const Point* s1 = find(points, shape.name, 1, Mode::kStmux);
    const Point* t1 = find(points, shape.name, 1, Mode::kTime);
    if (s1 != nullptr && t1 != nullptr && !shape.torch.empty()) {
      // Never slower than direct: a tenant with kernels of its own, off MPS.
      const double r = s1->gemms_per_s / t1->gemms_per_s;
      line(r >= 0.9,
           fmt::format("{} R=1: stmux {:.2f}x direct ({:.0f} vs {:.0f} {}; target >= "
                       "0.9x)",
                       shape.name, r, s1->gemms_per_s, t1->gemms_per_s, unit(shape.name)));
    } else if (s1 != nullptr && t1 != nullptr) {
      line(s1->p50_us <= t1->p50_us + 15,
           fmt::format("{} R=1: stmux p50 {:.1f} us vs direct {:.1f} us (target <= +15 us)",
                       shape.name, s1->p50_us, t1->p50_us));
    }
  }
  for (const Point& p : points) {
    if (usesStmux(p.mode) && p.ran && p.fallbacks != 0) {
      line(false, fmt::format("{} R={} {}: {} fallbacks (target 0)", p.shape, p.tenants,
                              modeName(p.mode), p.fallbacks));
    }
  }
}

// What a person reads first: at the largest R with a valid stmux row, stmux
// against MPS, time-slicing and the ceiling, shape by shape.
void printSummary(const Options& o, const std::vector<Point>& points, FILE* out) {
  std::fprintf(out, "\nsummary:\n");
  for (const Shape& shape : o.shapes) {
    auto rate = [&](const Point* p) {
      return fmt::format("{:.0f} {}", p->gemms_per_s, unit(shape.name));
    };
    bool any = false;
    for (Mode mode : {Mode::kStmux, Mode::kStmuxMps}) {
      const Point* s = nullptr;
      for (const Point& p : points) {
        if (p.shape == shape.name && p.mode == mode && p.ran &&
            (s == nullptr || p.tenants > s->tenants)) {
          s = &p;
        }
      }
      if (s == nullptr) continue;
      any = true;
      std::string text = fmt::format("  {} R={}: {} {}, worst-tenant p99 {:.0f} us", shape.name,
                                     s->tenants, modeName(mode), rate(s), s->worst_p99_us);
      for (Mode other : {Mode::kMps, Mode::kTime, Mode::kCeiling}) {
        const Point* base = find(points, shape.name, s->tenants, other);
        if (base != nullptr) {
          text += fmt::format("; {:.2f}x {} ({}{})", s->gemms_per_s / base->gemms_per_s,
                              modeName(other), rate(base),
                              other == Mode::kCeiling ? ""
                                                      : fmt::format(", worst-tenant p99 {:.0f} us",
                                                                    base->worst_p99_us));
        }
      }
      std::fprintf(out, "%s\n", text.c_str());
    }
    if (!any) std::fprintf(out, "  %s: no valid stmux row\n", shape.name.c_str());
  }
  int invalid = 0;
  for (const Point& p : points)
    invalid += p.ran ? 0 : 1;
  if (invalid > 0) {
    std::fprintf(out, "  %d row(s) did not run or were invalid; the table says why\n", invalid);
  }
}

// Variables of the bench's own environment that every tenant (and stmuxd)
// inherits and that change what a row measures: stmux's, the preload, MPS's,
// cuBLAS's precision. Said once, and kept in bench.json.
std::vector<std::string> inheritedSettings() {
  std::vector<std::string> found;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view entry(*e);
    for (std::string_view prefix : {"STMUX_", "LD_PRELOAD=", "CUDA_MPS_",
                                    "CUDA_VISIBLE_DEVICES=", "NVIDIA_TF32_OVERRIDE=", "CUBLAS_"}) {
      if (entry.starts_with(prefix)) {
        found.emplace_back(entry);
        break;
      }
    }
  }
  return found;
}

std::string toJson(const Options& o, const std::vector<Point>& points) {
  Json json;
  Json& inherited = json["inherited_env"] = Json::array();
  for (const std::string& setting : inheritedSettings())
    inherited.push_back(setting);
  json["date_unix_s"] = realtimeNs() / 1'000'000'000;
  json["cpus"] = std::thread::hardware_concurrency();
  json["seconds"] = o.seconds;
  json["warmup"] = o.warmup;
  json["ready_timeout"] = o.ready_timeout;
  json["stmuxd_args"] = o.stmuxd_args;
  json["stmuxd_nice"] = o.stmuxd_nice;
  json["tenant_cpu_quota"] = o.tenant_cpu_quota;
  json["repeat"] = o.repeat;
  json["tenant_args"] = o.tenant_args;
  std::string tenant_env;
  for (const auto& [name, value] : o.tenant_env)
    tenant_env += (tenant_env.empty() ? "" : " ") + name + "=" + value;
  json["tenant_env"] = tenant_env;
  Json& rows = json["points"] = Json::array();
  for (const Point& p : points) {
    Json& row = rows.emplace_back();
    row["shape"] = p.shape;
    row["tenants"] = p.tenants;
    row["mode"] = modeName(p.mode);
    row["valid"] = p.ran;
    row["note"] = p.note;
    row["ready_s"] = p.ready_s;
    if (p.ran) {
      row["gemms_per_s"] = p.gemms_per_s;
      row["gflops"] = p.gflops;
      row["p50_us"] = p.p50_us;
      row["p99_us"] = p.p99_us;
      row["p999_us"] = p.p999_us;
      row["worst_tenant_p99_us"] = p.worst_p99_us;
      row["longest_step_us"] = p.longest.us;
      // Whose, when (s from the span's start), and how many tenants had a
      // step at least a quarter as long at the same time (row_validity.h).
      row["longest_step_tenant"] = p.longest.tenant;
      row["longest_step_at_s"] = p.longest.at_s;
      row["longest_step_together"] = p.longest.together;
      row["median_tenant_p50_us"] = p.median_p50_us;
      if (p.tenants_off_mps != 0) {
        row["tenants_off_mps"] = p.tenants_off_mps;
        row["worst_tenant_mps"] = p.worst_tenant_mps;
      }
      row["calls"] = p.calls;
      row["unit"] = unit(p.shape);
      // CPU over the timed span, per second of it (tools/proc_cpu.h).
      auto cpu = [](const Point::Cpu& c) {
        Json out;
        out["cores"] = c.cores;
        out["switches_per_s"] = c.switches;
        out["preemptions_per_s"] = c.preemptions;
        return out;
      };
      row["tenants_cpu"] = cpu(p.tenants_cpu);
      row["busiest_tenant_cpu"] = cpu(p.busiest_cpu);
      row["serving_cpu"] = cpu(p.serving_cpu);
      if (p.throttled_mean >= 0) {
        Json throttled;
        throttled["mean"] = p.throttled_mean;
        throttled["most"] = p.throttled_most;
        row["throttled_share"] = throttled;
      }
      if (!p.repeats.empty()) row["repeats"] = p.repeats;
      row["window_rates"] = p.window_rates;
      // When it was timed, to set beside what else the machine recorded.
      row["span_unix_s"] = std::vector<double>{static_cast<double>(p.span.start_ns) / 1e9,
                                               static_cast<double>(p.span.stop_ns) / 1e9};
      if (usesStmux(p.mode)) {
        row["fallbacks"] = p.fallbacks;
        row["routed_direct"] = p.routed_direct;
        row["route_looks"] = p.route_looks;
        row["route_gain"] = p.route_gain;
        row["graph_share"] = p.graph_share;
        row["mean_batch"] = p.mean_batch;
        Json& entries = row["entry_points"] = Json::object();
        for (const auto& [name, entry] : p.entries) {
          entries[name] = {{"calls", entry.calls},
                           {"served", entry.served},
                           {"failed", entry.failed},
                           {"direct", entry.direct}};
        }
        const Point::Round& r = p.round;
        row["round_us"] = {{"prior_wait", r.prior_wait},
                           {"ring", r.ring},
                           {"stream_ready", r.stream_ready},
                           {"batch_wait", r.batch_wait},
                           {"handoff", r.handoff},
                           {"launch", r.launch},
                           {"gpu", r.gpu},
                           {"publish", r.publish},
                           {"wake", r.wake},
                           {"completion", r.completion}};
      }
    }
  }
  return dumpJson(json);
}

int run(int argc, char** argv) {
  Options options;
  if (!parseArgs(argc, argv, options)) return 2;
  std::error_code error;
  fs::create_directories(options.out, error);
  if (error) {
    std::fprintf(stderr, "stmux-bench: cannot create %s: %s\n", options.out.c_str(),
                 error.message().c_str());
    return 2;
  }
  // A machine without a GPU hears it at once, not from every row's tenants.
  const Ran devices = stmux::run({options.client, "devices"}, {{"LD_PRELOAD", ""}},
                                 options.out + "/devices", std::chrono::seconds(60));
  if (devices.status != 0) {
    std::fprintf(stderr, "stmux-bench: needs a CUDA device: %s\n",
                 firstLine(devices.err + devices.out).c_str());
    return 3;
  }
  if (const std::vector<std::string> inherited = inheritedSettings(); !inherited.empty()) {
    std::string list;
    for (const std::string& setting : inherited)
      list += " " + setting;
    std::fprintf(stderr,
                 "stmux-bench: every row's processes inherit%s (rows off MPS still get a pipe "
                 "directory of their own; MPS rows their own MPS)\n",
                 list.c_str());
  }
  Bench bench(options);
  struct Row {
    const Shape* shape;
    int tenants;
    Mode mode;
    std::vector<Point> runs;
  };
  std::vector<Row> rows;
  for (const Shape& shape : options.shapes) {
    for (int tenants : options.tenants) {
      for (Mode mode : options.modes)
        rows.push_back({&shape, tenants, mode, {}});
    }
  }
  // With --repeat, round after round of every row, so that drift over the
  // run falls on all modes alike.
  const std::size_t total = rows.size() * static_cast<std::size_t>(options.repeat);
  std::size_t done = 0;
  for (int round = 0; round < options.repeat; ++round) {
    for (Row& row : rows) {
      std::fprintf(stderr, "[%zu/%zu] %s R=%d %s ... ", ++done, total, row.shape->name.c_str(),
                   row.tenants, modeName(row.mode));
      const auto began = std::chrono::steady_clock::now();
      const Point point = bench.run(*row.shape, row.tenants, row.mode);
      const double took =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      if (point.ran) {
        std::fprintf(stderr,
                     "ready in %.1f s; %.0f %s, p50 %.1f us, p99 %.1f us, cpu %.1f+%.1f "
                     "cores%s (%.1f s)\n",
                     point.ready_s, point.gemms_per_s, unit(point.shape), point.p50_us,
                     point.p99_us, point.tenants_cpu.cores, point.serving_cpu.cores,
                     usesStmux(point.mode) ? fmt::format(", {} fallbacks, mean batch {:.1f}",
                                                         point.fallbacks, point.mean_batch)
                                                 .c_str()
                                           : "",
                     took);
      } else {
        std::fprintf(stderr, "%s (%.1f s)\n", point.note.c_str(), took);
      }
      row.runs.push_back(point);
    }
  }
  std::vector<Point> points;
  for (Row& row : rows)
    points.push_back(medianRun(std::move(row.runs)));
  printTable(points, stdout);
  printRounds(points, stdout);
  printEntryPoints(points, stdout);
  printTargets(options, points, stdout);
  const std::string json_path = options.out + "/bench.json";
  if (std::ofstream json(json_path); json) json << toJson(options, points) << "\n";
  printSummary(options, points, stdout);
  std::printf("  numbers: %s (plots: stmux-plot %s)\n", json_path.c_str(), json_path.c_str());
  const bool any = std::any_of(points.begin(), points.end(), [](const Point& p) { return p.ran; });
  return any ? 0 : 1;
}

}  // namespace
}  // namespace stmux::tools

int main(int argc, char** argv) {
  return stmux::tools::run(argc, argv);
}

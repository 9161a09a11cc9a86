// stmux-bench: R tenant processes sharing one GPU, four ways, side by side.
//
// Each tenant is stmux-cublas-client, an ordinary cuBLAS program, running a
// closed loop {sgemm; wait} on its own matrices between two instants that all
// tenants share. Modes:
//   time-only  plain processes: the GPU's default time-slicing
//   mps        under NVIDIA MPS, started and stopped by this tool
//   stmux      stmuxd running, every tenant with LD_PRELOAD=libstmux.so
//   ceiling    one process issuing one batched launch of R GEMMs per round
// For each shape and R it reports GEMMs/s, GFLOP/s, the latency of every
// call (p50/p99/p99.9 over all tenants' calls, and the worst tenant's p99),
// ratios to the baselines, the stmux tenants' fallbacks and the daemon's mean
// batch; then a table, JSON and a PNG plot, and whether the targets were met.
#include <getopt.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "stmux/control.h"
#include "stmux/json.h"
#include "stmux/json_read.h"
#include "tools/latency.h"
#include "tools/plot.h"
#include "tools/process.h"

namespace stmux::tools {
namespace {

namespace fs = std::filesystem;

enum class Mode { kTime, kMps, kStmux, kCeiling };
constexpr Mode kModes[] = {Mode::kTime, Mode::kMps, Mode::kStmux, Mode::kCeiling};
const char* modeName(Mode mode) {
  switch (mode) {
    case Mode::kTime:
      return "time-only";
    case Mode::kMps:
      return "mps";
    case Mode::kStmux:
      return "stmux";
    case Mode::kCeiling:
      return "ceiling";
  }
  return "?";
}
std::uint32_t modeColor(Mode mode) {
  switch (mode) {
    case Mode::kTime:
      return 0x888888;
    case Mode::kMps:
      return 0x1f77b4;
    case Mode::kStmux:
      return 0xd62728;
    case Mode::kCeiling:
      return 0x2ca02c;
  }
  return 0;
}

struct Shape {
  std::string name;
  std::int64_t m = 0, n = 0, k = 0;
  bool mixed = false;  // the three seed shapes, one per tenant in turn
  // Floating-point operations of one GEMM (mixed: averaged over tenants).
  double flops(int tenants) const {
    if (!mixed) return 2.0 * m * n * k;
    const double seeds[3] = {2.0 * 512 * 1 * 512, 2.0 * 256 * 128 * 1152, 2.0 * 256 * 256 * 256};
    double total = 0;
    for (int i = 0; i < tenants; ++i)
      total += seeds[i % 3];
    return total / std::max(tenants, 1);
  }
};

struct Options {
  std::vector<Shape> shapes;
  std::vector<int> tenants = {1, 8, 32, 128, 256};
  std::vector<Mode> modes = {kModes, kModes + 4};
  double seconds = 2.0;
  // Measured: with 32 tenants and 1 s or less, tenants still creating their
  // CUDA contexts overlapped the timed span and cut stmux's rate up to 10x.
  double warmup = 2.0;
  std::string out = "bench-out";
  std::string client, stmuxd, shim;
  std::string stmuxd_args;
};

struct Point {
  std::string shape;
  int tenants = 0;
  Mode mode = Mode::kTime;
  bool ran = false;
  std::string note;  // why it did not run, or what went wrong
  double gemms_per_s = 0, gflops = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, worst_p99_us = 0;
  long calls = 0;
  long fallbacks = -1;    // stmux rows: calls the shims sent straight to cuBLAS
  double mean_batch = 0;  // stmux rows: the daemon's mean batch
};

std::uint64_t realtimeNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ull + ts.tv_nsec;
}

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: stmux-bench [options]\n"
      "Runs R tenant processes of an ordinary cuBLAS program (stmux-cublas-client) in a\n"
      "closed loop, four ways: time-only, mps, stmux and the in-process ceiling; writes a\n"
      "table, bench.json and bench.png to --out, and checks the targets.\n\n"
      "  --shapes LIST    rnn (512x1x512), resnet (256x128x1152), cube (256x256x256),\n"
      "                   mixed (the three, one per tenant in turn) or MxNxK;\n"
      "                   default rnn,resnet,cube,mixed\n"
      "  --tenants LIST   values of R, each 1..256; default 1,8,32,128,256\n"
      "  --modes LIST     time-only,mps,stmux,ceiling (default all)\n"
      "  --seconds S      timed seconds per run (default 2)\n"
      "  --warmup S       untimed seconds before (default 2)\n"
      "  --out DIR        where results go (default bench-out)\n"
      "  --client PATH, --stmuxd PATH, --shim PATH\n"
      "                   the programs (default: found next to stmux-bench)\n"
      "  --stmuxd-args A  extra flags for stmuxd, e.g. \"--window-us=50\"\n"
      "  --help           this text\n"
      "Needs a CUDA device. Progress goes to stderr.\n");
}

template <class T, class Parse>
std::optional<std::vector<T>> splitList(const std::string& text, Parse&& parse) {
  std::vector<T> items;
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, ',');) {
    auto parsed = parse(item);
    if (!parsed) return std::nullopt;
    items.push_back(*parsed);
  }
  if (items.empty()) return std::nullopt;
  return items;
}

std::optional<Shape> parseShape(const std::string& text) {
  if (text == "rnn") return Shape{"rnn-512x1x512", 512, 1, 512};
  if (text == "resnet") return Shape{"resnet-256x128x1152", 256, 128, 1152};
  if (text == "cube") return Shape{"cube-256", 256, 256, 256};
  if (text == "mixed") return Shape{"mixed", 0, 0, 0, true};
  long long m, n, k;
  char tail;
  if (std::sscanf(text.c_str(), "%lldx%lldx%lld%c", &m, &n, &k, &tail) == 3 && m > 0 && n > 0 &&
      k > 0 && m <= 65536 && n <= 65536 && k <= 65536) {
    return Shape{text, m, n, k};
  }
  return std::nullopt;
}

std::string findProgram(const fs::path& self_dir, const std::vector<std::string>& candidates) {
  for (const std::string& candidate : candidates) {
    const fs::path path = (self_dir / candidate).lexically_normal();
    if (fs::exists(path)) return path.string();
  }
  return "";
}

bool parseArgs(int argc, char** argv, Options& o) {
  static const option kLong[] = {
      {"shapes", required_argument, nullptr, 's'}, {"tenants", required_argument, nullptr, 'r'},
      {"modes", required_argument, nullptr, 'm'},  {"seconds", required_argument, nullptr, 'S'},
      {"warmup", required_argument, nullptr, 'w'}, {"out", required_argument, nullptr, 'o'},
      {"client", required_argument, nullptr, 'c'}, {"stmuxd", required_argument, nullptr, 'd'},
      {"shim", required_argument, nullptr, 'l'},   {"stmuxd-args", required_argument, nullptr, 'a'},
      {"help", no_argument, nullptr, 'h'},         {nullptr, 0, nullptr, 0}};
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
        auto list = splitList<int>(optarg, [](const std::string& item) -> std::optional<int> {
          char* end = nullptr;
          const long value = std::strtol(item.c_str(), &end, 10);
          if (*end != '\0' || value < 1 || value > 256) return std::nullopt;
          return static_cast<int>(value);
        });
        if (!list) return bad("--tenants", optarg, "a comma-separated list of 1..256");
        o.tenants = *list;
        break;
      }
      case 'm': {
        auto list = splitList<Mode>(optarg, [](const std::string& item) -> std::optional<Mode> {
          for (Mode mode : kModes) {
            if (item == modeName(mode)) return mode;
          }
          return std::nullopt;
        });
        if (!list)
          return bad("--modes", optarg, "a comma-separated list of time-only, mps, stmux, ceiling");
        o.modes = *list;
        break;
      }
      case 'S':
      case 'w': {
        char* end = nullptr;
        const double value = std::strtod(optarg, &end);
        if (*end != '\0' || !(value >= 0.1 && value <= 600)) {
          return bad(c == 'S' ? "--seconds" : "--warmup", optarg, "a number of seconds, 0.1..600");
        }
        (c == 'S' ? o.seconds : o.warmup) = value;
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
        o.stmuxd_args = optarg;
        break;
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        usage(stderr);
        return false;
    }
  }
  if (optind != argc) return bad("argument", argv[optind], "options only (see --help)");
  auto parsed = splitList<Shape>(shapes, parseShape);
  if (!parsed)
    return bad("--shapes", shapes.c_str(), "rnn, resnet, cube, mixed or MxNxK, comma-separated");
  o.shapes = *parsed;
  const fs::path self = fs::canonical("/proc/self/exe").parent_path();
  if (o.client.empty()) o.client = findProgram(self, {"stmux-cublas-client"});
  if (o.stmuxd.empty())
    o.stmuxd = findProgram(self, {"stmuxd", "../daemon/stmuxd", "../sbin/stmuxd"});
  if (o.shim.empty()) {
    o.shim = findProgram(self, {"../shim/libstmux.so", "../lib/libstmux.so", "../lib64/libstmux.so",
                                "../lib/x86_64-linux-gnu/libstmux.so"});
  }
  for (const auto& [what, path] :
       {std::pair{"stmux-cublas-client", o.client}, std::pair{"stmuxd", o.stmuxd},
        std::pair{"libstmux.so", o.shim}}) {
    if (path.empty() || !fs::exists(path)) {
      std::fprintf(stderr, "stmux-bench: cannot find %s next to stmux-bench; name it with a flag\n",
                   what);
      return false;
    }
  }
  return true;
}

// ---- one measurement ----------------------------------------------------------

struct Latencies {
  std::vector<std::uint32_t> all;
  double worst_p99_us = 0;
  long gemms = 0;
};

// Reads one client's latency file: "calls gemms_per_call", then one latency
// in nanoseconds per line.
bool readLatencies(const std::string& path, Latencies& into) {
  std::ifstream in(path);
  std::size_t count = 0;
  int per_call = 0;
  if (!(in >> count >> per_call)) return false;
  std::vector<std::uint32_t> mine;
  mine.reserve(count);
  for (std::uint32_t value; mine.size() < count && in >> value;)
    mine.push_back(value);
  if (mine.size() != count) return false;
  into.gemms += static_cast<long>(count) * per_call;
  into.all.insert(into.all.end(), mine.begin(), mine.end());
  into.worst_p99_us = std::max(into.worst_p99_us, percentileUs(mine, 0.99));
  return true;
}

std::string firstLine(const std::string& text) {
  const std::size_t end = text.find('\n');
  return text.substr(0, std::min<std::size_t>(end, 200));
}

std::optional<JsonValue> daemonStatus(const std::string& socket) {
  auto reply = queryDaemonStatus(socket, "stmux-status", 2000);
  if (!reply.ok()) return std::nullopt;
  auto json = parseJson(reply.value());
  if (!json.ok()) return std::nullopt;
  return std::move(json).value();
}

bool waitUntil(const std::function<bool()>& condition, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<long>(seconds * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
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

    std::map<std::string, std::string> env;
    Process daemon;
    const std::string socket = (dir / "stmuxd.sock").string();
    if (mode == Mode::kMps) {
      if (std::string why; !startMps(dir, env, why)) {
        point.note = why;
        return point;
      }
    }
    if (mode == Mode::kStmux) {
      std::vector<std::string> args = {o_.stmuxd, "--socket", socket};
      std::stringstream extra(o_.stmuxd_args);
      for (std::string word; extra >> word;)
        args.push_back(word);
      daemon = Process(args, {{"STMUX_LOG", "warn"}}, (dir / "stmuxd").string());
      if (!waitUntil([&] { return daemonStatus(socket).has_value() || !daemon.running(); }, 30) ||
          !daemon.running()) {
        point.note = "stmuxd did not start: " + firstLine(daemon.err());
        return point;
      }
      env = {{"LD_PRELOAD", o_.shim}, {"STMUX_SOCKET", socket}, {"STMUX_LOG", "stats=info"}};
    }

    // Every tenant starts its clock at the same instant, after enough time to
    // start R CUDA processes (spaced out: many CUDA processes starting at
    // once saw cublasCreate fail with "not initialized") and warm up.
    const double prepare = 2.0 + 0.04 * tenants + o_.warmup;
    const std::uint64_t start = realtimeNs() + static_cast<std::uint64_t>(prepare * 1e9);
    const std::uint64_t stop = start + static_cast<std::uint64_t>(o_.seconds * 1e9);
    std::vector<Process> clients;
    auto shapeArgs = [&](std::vector<std::string>& args, int tenant) {
      if (shape.mixed) {
        args.insert(args.end(), {"--mixed", "--tenant", std::to_string(tenant)});
      } else {
        args.insert(args.end(), {"--m", std::to_string(shape.m), "--n", std::to_string(shape.n),
                                 "--k", std::to_string(shape.k)});
      }
    };
    const int processes = mode == Mode::kCeiling ? 1 : tenants;
    for (int i = 0; i < processes; ++i) {
      std::vector<std::string> args = {o_.client,    mode == Mode::kCeiling ? "ceiling" : "loop",
                                       "--start-ns", std::to_string(start),
                                       "--stop-ns",  std::to_string(stop),
                                       "--out",      (dir / ("lat" + std::to_string(i))).string()};
      if (mode == Mode::kCeiling) args.insert(args.end(), {"--count", std::to_string(tenants)});
      shapeArgs(args, i);
      clients.emplace_back(args, env, (dir / ("client" + std::to_string(i))).string());
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const double grace = prepare + o_.seconds + 60;
    Latencies latencies;
    int failed = 0;
    std::string failure;
    long fallbacks = 0;
    const std::regex stats("direct:([^\n]*)");
    for (int i = 0; i < processes; ++i) {
      const int status =
          clients[i].wait(std::chrono::milliseconds(static_cast<long>(grace * 1000)));
      const std::string err = clients[i].err();
      if (status != 0) {
        ++failed;
        if (failure.empty()) {
          failure = status < 0 ? "a tenant did not finish"
                               : "exit " + std::to_string(status) + ": " + firstLine(err);
        }
        continue;
      }
      if (!readLatencies((dir / ("lat" + std::to_string(i))).string(), latencies)) {
        ++failed;
        if (failure.empty()) failure = "a tenant wrote no latencies";
      }
      if (mode == Mode::kStmux) {
        std::smatch match;
        if (!std::regex_search(err, match, stats)) {
          fallbacks = -1000000;  // no stats line: cannot vouch for this row
        } else {
          const std::string direct = match[1];
          const std::regex pair("[a-z_]+=([0-9]+)");
          for (auto it = std::sregex_iterator(direct.begin(), direct.end(), pair);
               it != std::sregex_iterator(); ++it) {
            fallbacks += std::stol((*it)[1]);
          }
        }
      }
    }
    if (mode == Mode::kStmux) {
      if (auto status = daemonStatus(socket)) {
        if (const JsonValue* gpus = status->find("gpus"); gpus != nullptr && gpus->size() > 0) {
          point.mean_batch = gpus->at(0)->find("mean_batch")->asNumber(0);
        }
      }
      daemon.signal(SIGTERM);
      if (daemon.wait(std::chrono::seconds(30)) != 0 && point.note.empty()) {
        point.note = "stmuxd did not exit cleanly";
      }
      point.fallbacks = fallbacks < 0 ? -1 : fallbacks;
    }
    if (mode == Mode::kMps) stopMps(env);
    if (failed > 0) {
      point.note = std::to_string(failed) + " of " + std::to_string(processes) +
                   " tenant(s) failed (" + failure + ")";
      if (mode == Mode::kMps) point.note = "refused: " + point.note;
      return point;
    }
    point.ran = true;
    point.calls = static_cast<long>(latencies.all.size());
    point.gemms_per_s = static_cast<double>(latencies.gemms) / o_.seconds;
    point.gflops = point.gemms_per_s * shape.flops(tenants) / 1e9;
    point.p50_us = percentileUs(latencies.all, 0.50);
    point.p99_us = percentileUs(latencies.all, 0.99);
    point.p999_us = percentileUs(latencies.all, 0.999);
    point.worst_p99_us = latencies.worst_p99_us;
    return point;
  }

 private:
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
    const fs::path control = fs::path(env.at("CUDA_MPS_PIPE_DIRECTORY")) / "control";
    waitUntil([&] { return !fs::exists(control); }, 10);
  }

  Options o_;
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

void printTable(const std::vector<Point>& points, FILE* out) {
  std::fprintf(out, "%-20s %4s %-9s %12s %9s %9s %9s %9s %9s %8s %8s %8s %6s %6s  %s\n", "shape",
               "R", "mode", "GEMMs/s", "GFLOP/s", "p50 us", "p99 us", "p99.9 us", "worst99",
               "vs time", "vs mps", "vs ceil", "fallbk", "batch", "note");
  for (const Point& p : points) {
    if (!p.ran) {
      std::fprintf(out, "%-20s %4d %-9s %12s %9s %9s %9s %9s %9s %8s %8s %8s %6s %6s  %s\n",
                   p.shape.c_str(), p.tenants, modeName(p.mode), "-", "-", "-", "-", "-", "-", "-",
                   "-", "-", "-", "-", p.note.c_str());
      continue;
    }
    std::fprintf(
        out, "%-20s %4d %-9s %12.0f %9.1f %9.1f %9.1f %9.1f %9.1f %8s %8s %8s %6s %6s  %s\n",
        p.shape.c_str(), p.tenants, modeName(p.mode), p.gemms_per_s, p.gflops, p.p50_us, p.p99_us,
        p.p999_us, p.worst_p99_us, ratio(p, find(points, p.shape, p.tenants, Mode::kTime)).c_str(),
        ratio(p, find(points, p.shape, p.tenants, Mode::kMps)).c_str(),
        ratio(p, find(points, p.shape, p.tenants, Mode::kCeiling)).c_str(),
        p.fallbacks < 0 ? "-" : std::to_string(p.fallbacks).c_str(),
        p.mode == Mode::kStmux ? fmt::format("{:.1f}", p.mean_batch).c_str() : "-", p.note.c_str());
  }
}

// The issue's targets, each said met or missed and by how much.
void printTargets(const Options& o, const std::vector<Point>& points, FILE* out) {
  std::fprintf(out, "\ntargets:\n");
  auto line = [&](bool met, const std::string& what) {
    std::fprintf(out, "  %-6s %s\n", met ? "met" : "MISSED", what.c_str());
  };
  for (const Shape& shape : o.shapes) {
    const Point* s32 = find(points, shape.name, 32, Mode::kStmux);
    if (s32 != nullptr) {
      if (const Point* mps = find(points, shape.name, 32, Mode::kMps)) {
        const double r = s32->gemms_per_s / mps->gemms_per_s;
        line(r >= 1.5, fmt::format("{} R=32: stmux {:.2f}x MPS (target 1.5x)", shape.name, r));
      }
      if (const Point* time = find(points, shape.name, 32, Mode::kTime)) {
        const double r = s32->gemms_per_s / time->gemms_per_s;
        line(r >= 50, fmt::format("{} R=32: stmux {:.1f}x time-only (target 50x)", shape.name, r));
      }
      if (const Point* ceiling = find(points, shape.name, 32, Mode::kCeiling)) {
        const double r = s32->gemms_per_s / ceiling->gemms_per_s;
        line(r >= 0.7,
             fmt::format("{} R=32: stmux {:.2f}x the ceiling (target 0.7x)", shape.name, r));
      }
      line(s32->p99_us <= 3 * s32->p50_us,
           fmt::format("{} R=32: stmux p99 {:.1f} us = {:.2f}x p50 (target <= 3x)", shape.name,
                       s32->p99_us, s32->p99_us / std::max(s32->p50_us, 1e-9)));
      for (int r : {128, 256}) {
        if (const Point* big = find(points, shape.name, r, Mode::kStmux)) {
          line(big->gemms_per_s >= s32->gemms_per_s,
               fmt::format("{} R={}: stmux {:.0f} GEMMs/s vs {:.0f} at R=32 (target: no lower)",
                           shape.name, r, big->gemms_per_s, s32->gemms_per_s));
        }
      }
    }
    const Point* s1 = find(points, shape.name, 1, Mode::kStmux);
    const Point* t1 = find(points, shape.name, 1, Mode::kTime);
    if (s1 != nullptr && t1 != nullptr) {
      line(s1->p50_us <= t1->p50_us + 15,
           fmt::format("{} R=1: stmux p50 {:.1f} us vs direct {:.1f} us (target <= +15 us)",
                       shape.name, s1->p50_us, t1->p50_us));
    }
  }
  for (const Point& p : points) {
    if (p.mode == Mode::kStmux && p.ran && p.fallbacks != 0) {
      line(false, fmt::format("{} R={}: {} fallbacks on a stmux row (target 0)", p.shape, p.tenants,
                              p.fallbacks));
    }
  }
}

std::string toJson(const Options& o, const std::vector<Point>& points) {
  JsonWriter json;
  json.beginObject();
  json.field("date_unix_s", static_cast<std::int64_t>(realtimeNs() / 1'000'000'000));
  json.field("cpus", static_cast<std::int64_t>(std::thread::hardware_concurrency()));
  json.field("seconds", o.seconds);
  json.field("warmup", o.warmup);
  json.field("stmuxd_args", o.stmuxd_args);
  json.key("points").beginArray();
  for (const Point& p : points) {
    json.beginObject();
    json.field("shape", p.shape);
    json.field("tenants", static_cast<std::int64_t>(p.tenants));
    json.field("mode", modeName(p.mode));
    json.field("ran", p.ran);
    json.field("note", p.note);
    if (p.ran) {
      json.field("gemms_per_s", p.gemms_per_s);
      json.field("gflops", p.gflops);
      json.field("p50_us", p.p50_us);
      json.field("p99_us", p.p99_us);
      json.field("p999_us", p.p999_us);
      json.field("worst_tenant_p99_us", p.worst_p99_us);
      json.field("calls", static_cast<std::int64_t>(p.calls));
      if (p.mode == Mode::kStmux) {
        json.field("fallbacks", static_cast<std::int64_t>(p.fallbacks));
        json.field("mean_batch", p.mean_batch);
      }
    }
    json.endObject();
  }
  json.endArray();
  json.endObject();
  return json.str();
}

Status writePlot(const Options& o, const std::vector<Point>& points, const std::string& path) {
  std::vector<Chart> charts;
  for (const Shape& shape : o.shapes) {
    Chart rate{shape.name + ": throughput", "tenants R", "GEMMs/s", true, true, {}};
    Chart tail{shape.name + ": p99 latency", "tenants R", "us", true, true, {}};
    for (Mode mode : o.modes) {
      Series r{modeName(mode), {}, modeColor(mode)}, t{modeName(mode), {}, modeColor(mode)};
      for (const Point& p : points) {
        if (p.shape != shape.name || p.mode != mode || !p.ran) continue;
        r.points.emplace_back(p.tenants, p.gemms_per_s);
        t.points.emplace_back(p.tenants, p.p99_us);
      }
      rate.series.push_back(r);
      tail.series.push_back(t);
    }
    charts.push_back(rate);
    charts.push_back(tail);
  }
  const int width = std::min(8192, 700 * static_cast<int>(charts.size()));
  return writePng(path, charts, width, 520);
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
  Bench bench(options);
  std::vector<Point> points;
  const std::size_t total = options.shapes.size() * options.tenants.size() * options.modes.size();
  for (const Shape& shape : options.shapes) {
    for (int tenants : options.tenants) {
      for (Mode mode : options.modes) {
        std::fprintf(stderr, "[%zu/%zu] %s R=%d %s ... ", points.size() + 1, total,
                     shape.name.c_str(), tenants, modeName(mode));
        const Point point = bench.run(shape, tenants, mode);
        if (point.ran) {
          std::fprintf(stderr, "%.0f GEMMs/s, p50 %.1f us, p99 %.1f us%s\n", point.gemms_per_s,
                       point.p50_us, point.p99_us,
                       point.mode == Mode::kStmux ? fmt::format(", {} fallbacks, mean batch {:.1f}",
                                                                point.fallbacks, point.mean_batch)
                                                        .c_str()
                                                  : "");
        } else {
          std::fprintf(stderr, "%s\n", point.note.c_str());
        }
        points.push_back(point);
      }
    }
  }
  printTable(points, stdout);
  printTargets(options, points, stdout);
  const std::string json_path = options.out + "/bench.json";
  if (std::ofstream json(json_path); json) json << toJson(options, points) << "\n";
  const std::string plot_path = options.out + "/bench.png";
  if (Status status = writePlot(options, points, plot_path); !status.ok()) {
    std::fprintf(stderr, "stmux-bench: %s\n", status.message().c_str());
  }
  std::printf("\nwrote %s and %s\n", json_path.c_str(), plot_path.c_str());
  const bool any = std::any_of(points.begin(), points.end(), [](const Point& p) { return p.ran; });
  return any ? 0 : 1;
}

}  // namespace
}  // namespace stmux::tools

int main(int argc, char** argv) {
  return stmux::tools::run(argc, argv);
}

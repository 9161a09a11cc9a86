// stmux-wake-probe: how late a waiting thread gets its core back, with more
// busy processes than cores, the GPU left out (issue 17).
//
// Each of --procs processes loops as a closed-loop tenant does: it works on
// the CPU for --work-us (the tenant's own launches), then waits for an event
// due --gpu-us later (its GPU work's end). It waits as CUDA's scheduling
// flags make a thread wait: spinning on the clock, yielding the core between
// looks, or blocking (a timer's wake-up, as the driver's interrupt wakes a
// blocking-sync thread). Its lateness is how long after the event it runs
// again: the share of a tenant's tail that the CPU makes. Every wait runs
// with the kernel's slice and with each --slice-us request (sched_setattr,
// EEVDF, Linux 6.12 and later).
#include <getopt.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "stmux/json.h"
#include "stmux/sys.h"
#include "tools/args.h"
#include "tools/latency.h"

namespace stmux::tools {
namespace {

enum class Wait { kSpin, kYield, kBlocking };
constexpr std::string_view kWaitNames[] = {"spin", "yield", "blocking"};

struct Options {
  int procs = 0;  // 0: twice the cores this process may run on
  unsigned work_us = 50, gpu_us = 50;
  double seconds = 2;
  std::vector<Wait> waits = {Wait::kSpin, Wait::kYield, Wait::kBlocking};
  std::vector<unsigned> slices = {0, 100};
  std::string json_path;
};

// One process's figures, in memory shared with the parent.
struct ProcResult {
  std::uint64_t steps = 0;
  double late_p50_us = 0, late_p99_us = 0, late_max_us = 0;
  int error = 0;  // errno of a refused slice request, else 0
};

// Waits until `due` as `wait` says; returns when this thread next runs after it.
std::uint64_t waitUntil(Wait wait, std::uint64_t due) {
  std::uint64_t now = nowNs();
  if (wait == Wait::kBlocking && now < due) {
    const timespec at{static_cast<time_t>(due / 1'000'000'000),
                      static_cast<long>(due % 1'000'000'000)};
    while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr) == EINTR) {
    }
    return nowNs();
  }
  while (now < due) {
    if (wait == Wait::kYield) {
      ::sched_yield();
    } else {
      cpuRelax();
    }
    now = nowNs();
  }
  return now;
}

void runTenant(const Options& o, Wait wait, unsigned slice_us, std::uint64_t start,
               std::uint64_t end, ProcResult& result) {
  // A blocking-sync thread is woken by the driver's interrupt, on time; a
  // timer would add the thread's slack (50 us by default).
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  if (slice_us != 0) {
    SchedAttr attr;
    if (schedGetattr(attr) != 0 || schedRequestSlice(attr, slice_us) != 0) {
      result.error = errno;
      return;
    }
  }
  std::vector<std::uint32_t> late;
  late.reserve(static_cast<std::size_t>(o.seconds * 1e6 / (o.work_us + o.gpu_us + 1)) + 16);
  waitUntil(Wait::kBlocking, start);
  std::uint64_t now = nowNs();
  while (now < end) {
    const std::uint64_t worked = waitUntil(Wait::kSpin, now + o.work_us * 1000ull);
    const std::uint64_t due = worked + o.gpu_us * 1000ull;
    now = waitUntil(wait, due);
    late.push_back(static_cast<std::uint32_t>(std::min<std::uint64_t>(now - due, UINT32_MAX)));
  }
  result.steps = late.size();
  if (late.empty()) return;
  std::sort(late.begin(), late.end());
  auto at = [&](double p) { return late[nearestRank(late.size(), p)] / 1000.0; };
  result.late_p50_us = at(0.5);
  result.late_p99_us = at(0.99);
  result.late_max_us = at(1.0);
}

struct Row {
  Wait wait;
  unsigned slice_us;
  double steps_per_s = 0, median_p50 = 0, worst_p99 = 0, worst_max = 0;
  int error = 0;
};

Row runRow(const Options& o, Wait wait, unsigned slice_us) {
  const std::size_t bytes = sizeof(ProcResult) * static_cast<std::size_t>(o.procs);
  void* shared = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) {
    std::perror("stmux-wake-probe: mmap");
    std::exit(1);
  }
  auto* results = new (shared) ProcResult[o.procs];
  // Everyone starts together, once all are forked.
  const std::uint64_t start = nowNs() + 200'000'000;
  const std::uint64_t end = start + static_cast<std::uint64_t>(o.seconds * 1e9);
  std::vector<pid_t> children;
  for (int i = 0; i < o.procs; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      runTenant(o, wait, slice_us, start, end, results[i]);
      ::_exit(0);
    }
    if (pid < 0) {
      std::perror("stmux-wake-probe: fork");
      for (pid_t child : children)
        ::kill(child, SIGKILL);
      std::exit(1);
    }
    children.push_back(pid);
  }
  bool died = false;
  for (pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    died |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
  }
  Row row{wait, slice_us};
  std::vector<double> p50s;
  for (int i = 0; i < o.procs; ++i) {
    const ProcResult& r = results[i];
    if (r.error != 0) row.error = r.error;
    row.steps_per_s += static_cast<double>(r.steps) / o.seconds;
    p50s.push_back(r.late_p50_us);
    row.worst_p99 = std::max(row.worst_p99, r.late_p99_us);
    row.worst_max = std::max(row.worst_max, r.late_max_us);
  }
  std::sort(p50s.begin(), p50s.end());
  row.median_p50 = p50s[p50s.size() / 2];
  ::munmap(shared, bytes);
  if (died) {
    std::fprintf(stderr, "stmux-wake-probe: a tenant process died\n");
    std::exit(1);
  }
  return row;
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: stmux-wake-probe [options]\n"
               "How late a waiting process gets its core back when busy processes outnumber\n"
               "the cores, without a GPU: each process works --work-us on the CPU, then waits\n"
               "for an event --gpu-us later, spinning, yielding or blocking, as CUDA's\n"
               "scheduling flags wait; lateness is how long after the event it runs again.\n\n"
               "  --procs N        processes, 1..4096 (default twice the cores it may run on)\n"
               "  --work-us N      CPU work per step, 0..1000000 (default 50)\n"
               "  --gpu-us N       wait per step, 1..1000000 (default 50)\n"
               "  --seconds S      timed span per row, 0.1..600 (default 2)\n"
               "  --waits LIST     of spin,yield,blocking (default all three)\n"
               "  --slice-us LIST  slice requests, each 0 (the kernel's) or 100..100000\n"
               "                   (default 0,100; Linux 6.12 and later)\n"
               "  --json FILE      also write the rows as JSON\n"
               "  --help           this text\n"
               "Exit status: 0 done, 1 a process failed or the JSON could not be written,\n"
               "2 bad arguments, 3 the kernel refused a slice request.\n");
}

std::optional<unsigned> number(const char* text, const char* flag, unsigned lo, unsigned hi) {
  const auto value = wholeIn<unsigned>(text, lo, hi);
  if (!value) {
    std::fprintf(stderr, "stmux-wake-probe: %s '%s': accepted: an integer from %u to %u\n", flag,
                 text, lo, hi);
  }
  return value;
}

bool parseArgs(int argc, char** argv, Options& o) {
  static const option kLong[] = {{"procs", required_argument, nullptr, 'p'},
                                 {"work-us", required_argument, nullptr, 'w'},
                                 {"gpu-us", required_argument, nullptr, 'g'},
                                 {"seconds", required_argument, nullptr, 's'},
                                 {"waits", required_argument, nullptr, 'W'},
                                 {"slice-us", required_argument, nullptr, 'S'},
                                 {"json", required_argument, nullptr, 'j'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  int c;
  while ((c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1) {
    std::optional<unsigned> value;
    switch (c) {
      case 'p':
        if (!(value = number(optarg, "--procs", 1, 4096))) return false;
        o.procs = static_cast<int>(*value);
        break;
      case 'w':
        if (!(value = number(optarg, "--work-us", 0, 1'000'000))) return false;
        o.work_us = *value;
        break;
      case 'g':
        if (!(value = number(optarg, "--gpu-us", 1, 1'000'000))) return false;
        o.gpu_us = *value;
        break;
      case 's':
        if (const auto seconds = realIn(optarg, 0.1, 600)) {
          o.seconds = *seconds;
        } else {
          std::fprintf(stderr,
                       "stmux-wake-probe: --seconds '%s': accepted: a number from 0.1 to 600\n",
                       optarg);
          return false;
        }
        break;
      case 'W': {
        auto waits = splitList<Wait>(optarg, [](std::string_view name) -> std::optional<Wait> {
          const auto* it = std::find(std::begin(kWaitNames), std::end(kWaitNames), name);
          if (it == std::end(kWaitNames)) {
            std::fprintf(stderr,
                         "stmux-wake-probe: --waits: '%.*s' is not a wait; accepted: "
                         "spin, yield, blocking, comma-separated\n",
                         static_cast<int>(name.size()), name.data());
            return std::nullopt;
          }
          return static_cast<Wait>(it - std::begin(kWaitNames));
        });
        if (!waits) return false;
        o.waits = std::move(*waits);
        break;
      }
      case 'S': {
        auto slices = splitList<unsigned>(optarg, [](std::string_view item) {
          const std::string text(item);
          const auto us = number(text.c_str(), "--slice-us", 0, 100'000);
          if (us && *us != 0 && *us < 100) {
            std::fprintf(stderr,
                         "stmux-wake-probe: --slice-us '%s': accepted: 0 (the kernel's) "
                         "or 100 to 100000\n",
                         text.c_str());
            return std::optional<unsigned>();
          }
          return us;
        });
        if (!slices) return false;
        o.slices = std::move(*slices);
        break;
      }
      case 'j':
        o.json_path = optarg;
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
    std::fprintf(stderr, "stmux-wake-probe: unexpected argument '%s'\n", argv[optind]);
    return false;
  }
  return true;
}

}  // namespace
}  // namespace stmux::tools

int main(int argc, char** argv) {
  using namespace stmux::tools;
  Options o;
  if (!parseArgs(argc, argv, o)) return 2;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  const int cores = ::sched_getaffinity(0, sizeof allowed, &allowed) == 0 ? CPU_COUNT(&allowed) : 1;
  if (o.procs == 0) o.procs = 2 * cores;
  // Opened before the rows, so that a path it cannot write costs no run.
  FILE* json_file = nullptr;
  if (!o.json_path.empty() && (json_file = std::fopen(o.json_path.c_str(), "w")) == nullptr) {
    std::fprintf(stderr, "stmux-wake-probe: cannot write %s (--json): %s\n", o.json_path.c_str(),
                 std::strerror(errno));
    return 2;
  }
  std::printf(
      "%d processes on %d cores; %u us of work, then %u us of waiting, per step; %.1f s "
      "a row\n",
      o.procs, cores, o.work_us, o.gpu_us, o.seconds);
  std::printf("%-9s %9s %12s %16s %16s %12s\n", "wait", "slice_us", "steps/s", "late p50 (med)",
              "late p99 (worst)", "late max");
  stmux::Json rows = stmux::Json::array();
  for (Wait wait : o.waits) {
    for (unsigned slice : o.slices) {
      const Row row = runRow(o, wait, slice);
      const std::string_view name = kWaitNames[static_cast<int>(wait)];
      if (row.error != 0) {
        std::fprintf(stderr, "stmux-wake-probe: the kernel refused a slice of %u us: %s\n", slice,
                     std::strerror(row.error));
        return 3;
      }
      std::printf("%-9.*s %9u %12.0f %16.1f %16.1f %12.1f\n", static_cast<int>(name.size()),
                  name.data(), slice, row.steps_per_s, row.median_p50, row.worst_p99,
                  row.worst_max);
      std::fflush(stdout);
      rows.push_back({{"wait", std::string(name)},
                      {"slice_us", slice},
                      {"steps_per_s", row.steps_per_s},
                      {"late_us",
                       {{"median_p50", row.median_p50},
                        {"worst_p99", row.worst_p99},
                        {"worst_max", row.worst_max}}}});
    }
  }
  if (json_file != nullptr) {
    const stmux::Json doc = {{"procs", o.procs},   {"cores", cores},       {"work_us", o.work_us},
                             {"gpu_us", o.gpu_us}, {"seconds", o.seconds}, {"rows", rows}};
    if (std::fprintf(json_file, "%s\n", stmux::dumpJson(doc).c_str()) < 0 ||
        std::fclose(json_file) != 0) {
      std::fprintf(stderr, "stmux-wake-probe: cannot write %s (--json): %s\n", o.json_path.c_str(),
                   std::strerror(errno));
      return 1;
    }
  }
  return 0;
}

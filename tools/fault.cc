// stmux-fault: the fault suite (issue 14), on a machine with a GPU. Each
// scenario runs its own stmuxd and tenants that check every result:
//   tenant-kills  tenants SIGKILLed while their calls are in flight, beside
//                 checked tenants that go on calling
//   daemon-kills  stmuxd SIGKILLed and started again under load
//   soak          checked tenants of several kinds coming and going
//   dos           checked tenants' calls/s alone, then beside each abuse: a
//                 greedy tenant, a flood of silent connections, garbage
//                 hellos at full speed, a client flooding its ring with
//                 requests it never waits for, the same with garbage memory
//                 handles, and that as 16 clients of one user, of the
//                 checked tenants' and (as root) of another
//                 (stmux-ipc-client flood, a client of the wire alone)
// Checked tenants are stmux-cublas-client stress (sgemm against a float64
// reference) and stmux-differential (every entry point against cuBLAS run
// directly). A scenario passes when no result came back wrong, no tenant hung,
// every call came back (an error only where the program allows one: a call
// with beta != 0 in flight when the daemon died), and the daemon's descriptors
// and mappings and the GPU's memory went back to where they were once the
// tenants were gone. Prints progress and a summary; writes fault.json.
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "stmux/control.h"  // socketAddress, UniqueFd
#include "stmux/json.h"
#include "tools/args.h"
#include "tools/barrier.h"
#include "tools/process.h"
#include "tools/shim_stats.h"
#include "tools/stmux_programs.h"

namespace {

namespace fs = std::filesystem;
using stmux::Json;
using stmux::Process;
using Clock = std::chrono::steady_clock;
using stmux::tools::daemonStatus;
using stmux::tools::findProgram;
using stmux::tools::kShimBesideTools;
using stmux::tools::kStmuxdBesideTools;
using stmux::tools::realIn;
using stmux::tools::waitUntil;
using stmux::tools::wholeIn;

struct Options {
  std::vector<std::string> scenarios;
  int kills = 100;
  int restarts = 10;
  double soak_s = 600;
  double dos_s = 10;
  int tenants = 4;  // checked tenants beside the faults
  std::string out = "/tmp/stmux-fault";
  std::string stmuxd, shim, client, differential, raw_client;
};

const char* const kScenarios[] = {"tenant-kills", "daemon-kills", "soak", "dos"};

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: stmux-fault [options] [SCENARIO...]\n"
      "The fault suite: stmuxd and tenants that check every result, under faults.\n"
      "Scenarios (default: all, in this order):\n"
      "  tenant-kills  --kills tenants SIGKILLed with calls in flight, beside checked ones\n"
      "  daemon-kills  stmuxd SIGKILLed and started again --restarts times under load\n"
      "  soak          --soak-seconds of checked tenants of several kinds coming and going\n"
      "  dos           checked tenants' calls/s alone, then beside a greedy tenant, a\n"
      "                flood of silent connections, garbage hellos, a client flooding its\n"
      "                ring, one flooding it with garbage memory handles, and 16 clients\n"
      "                of one user doing that: of the checked tenants' user, then (when\n"
      "                run as root, through setpriv) of uid 65534 (--dos-seconds each)\n"
      "Options:\n"
      "  --kills N         tenants to kill (1..100000, default 100)\n"
      "  --restarts N      daemon kills (1..1000, default 10)\n"
      "  --soak-seconds S  the soak's length (10..86400, default 600)\n"
      "  --dos-seconds S   each dos phase's length (2..3600, default 10)\n"
      "  --tenants N       checked tenants beside the faults (1..64, default 4)\n"
      "  --out DIR         logs and fault.json (default /tmp/stmux-fault; an earlier run's\n"
      "                    files there are replaced, nothing else)\n"
      "  --stmuxd PATH, --shim PATH, --client PATH, --differential PATH\n"
      "                    the programs (default: next to stmux-fault, as built or installed)\n"
      "  --raw-client PATH the dos scenario's flooding client, stmux-ipc-client (default:\n"
      "                    as built, in tests/ beside tools/)\n"
      "Exit 0: every scenario passed; 1: one failed; 2: bad usage; 3: no GPU.\n");
}

bool parse(int argc, char** argv, Options& o) {
  static const option kLong[] = {{"kills", required_argument, nullptr, 'k'},
                                 {"restarts", required_argument, nullptr, 'r'},
                                 {"soak-seconds", required_argument, nullptr, 's'},
                                 {"dos-seconds", required_argument, nullptr, 'd'},
                                 {"tenants", required_argument, nullptr, 't'},
                                 {"out", required_argument, nullptr, 'o'},
                                 {"stmuxd", required_argument, nullptr, 'D'},
                                 {"shim", required_argument, nullptr, 'S'},
                                 {"client", required_argument, nullptr, 'C'},
                                 {"differential", required_argument, nullptr, 'F'},
                                 {"raw-client", required_argument, nullptr, 'R'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  auto bad = [](const char* flag, const char* value, const char* accepted) {
    std::fprintf(stderr, "stmux-fault: %s '%s': accepted: %s\n", flag, value, accepted);
    return false;
  };
  for (int c; (c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1;) {
    std::optional<int> whole;
    std::optional<double> seconds;
    switch (c) {
      case 'k':
        if (!(whole = wholeIn(optarg, 1, 100000)))
          return bad("--kills", optarg, "a whole number from 1 to 100000");
        o.kills = *whole;
        break;
      case 'r':
        if (!(whole = wholeIn(optarg, 1, 1000)))
          return bad("--restarts", optarg, "a whole number from 1 to 1000");
        o.restarts = *whole;
        break;
      case 's':
        if (!(seconds = realIn(optarg, 10, 86400)))
          return bad("--soak-seconds", optarg, "seconds from 10 to 86400");
        o.soak_s = *seconds;
        break;
      case 'd':
        if (!(seconds = realIn(optarg, 2, 3600)))
          return bad("--dos-seconds", optarg, "seconds from 2 to 3600");
        o.dos_s = *seconds;
        break;
      case 't':
        if (!(whole = wholeIn(optarg, 1, 64)))
          return bad("--tenants", optarg, "a whole number from 1 to 64");
        o.tenants = *whole;
        break;
      case 'o':
        o.out = optarg;
        break;
      case 'D':
        o.stmuxd = optarg;
        break;
      case 'S':
        o.shim = optarg;
        break;
      case 'C':
        o.client = optarg;
        break;
      case 'F':
        o.differential = optarg;
        break;
      case 'R':
        o.raw_client = optarg;
        break;
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        usage(stderr);
        return false;
    }
  }
  for (int i = optind; i < argc; ++i) {
    if (std::find_if(std::begin(kScenarios), std::end(kScenarios), [&](const char* s) {
          return std::string(s) == argv[i];
        }) == std::end(kScenarios)) {
      return bad("scenario", argv[i], "tenant-kills, daemon-kills, soak, dos");
    }
    o.scenarios.emplace_back(argv[i]);
  }
  if (o.scenarios.empty()) o.scenarios.assign(std::begin(kScenarios), std::end(kScenarios));
  const fs::path self = fs::canonical("/proc/self/exe").parent_path();
  if (o.client.empty()) o.client = findProgram(self, {"stmux-cublas-client"});
  if (o.differential.empty()) o.differential = findProgram(self, {"stmux-differential"});
  if (o.stmuxd.empty()) o.stmuxd = findProgram(self, kStmuxdBesideTools);
  if (o.shim.empty()) o.shim = findProgram(self, kShimBesideTools);
  if (o.raw_client.empty()) o.raw_client = findProgram(self, {"../tests/stmux-ipc-client"});
  for (const auto& [what, path] :
       {std::pair{"stmux-cublas-client (--client)", o.client},
        std::pair{"stmux-differential (--differential)", o.differential},
        std::pair{"stmuxd (--stmuxd)", o.stmuxd}, std::pair{"libstmux.so (--shim)", o.shim},
        std::pair{"stmux-ipc-client (--raw-client)", o.raw_client}}) {
    if (path.empty()) {
      std::fprintf(
          stderr, "stmux-fault: cannot find %s next to stmux-fault; name it with its flag\n", what);
      return false;
    }
    if (!fs::exists(path)) {
      std::fprintf(stderr, "stmux-fault: %s: %s does not exist\n", what, path.c_str());
      return false;
    }
  }
  return true;
}

double since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string firstLine(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

// ---- the daemon ----------------------------------------------------------------

class Daemon {
 public:
  Daemon(const Options& o, const fs::path& dir)
      : stmuxd_(o.stmuxd), dir_(dir), socket_((dir / "stmuxd.sock").string()) {}

  const std::string& socket() const { return socket_; }
  bool running() { return process_.running() && process_.wait(std::chrono::milliseconds(0)) < 0; }
  pid_t pid() const { return process_.pid(); }

  // Starts it and waits until it answers; an error says why.
  std::string start() {
    ++starts_;
    // The unit's umask (UMask=0007): its socket 0660, open to its group, as
    // the dos scenario's flooders of another user need.
    const mode_t umask_before = ::umask(0007);
    process_ = Process({stmuxd_, "--socket", socket_}, {{"STMUX_LOG", "warn"}},
                       (dir_ / ("stmuxd-" + std::to_string(starts_))).string());
    ::umask(umask_before);
    if (!waitUntil([&] { return status().has_value() || !running(); }, 30) || !running()) {
      return "stmuxd did not start: " + firstLine(process_.err());
    }
    return "";
  }
  void kill9() {
    process_.signal(SIGKILL);
    process_.wait(std::chrono::seconds(30));
  }
  // SIGTERM: drains and exits 0.
  int stop() {
    process_.signal(SIGTERM);
    return process_.wait(std::chrono::seconds(60));
  }
  std::optional<Json> status() const { return daemonStatus(socket_, "stmux-fault"); }
  // Requests served so far, over every GPU (-1: no answer).
  long served() const {
    const auto s = status();
    if (!s) return -1;
    long n = 0;
    if (const Json* gpus = stmux::jsonFind(*s, "gpus"); gpus && gpus->is_array()) {
      for (const Json& gpu : *gpus)
        n += gpu.value("requests", 0L);
    }
    return n;
  }
  std::string errors() const { return process_.err(); }

 private:
  std::string stmuxd_;
  fs::path dir_;
  std::string socket_;
  Process process_;
  int starts_ = 0;
};

// What the daemon holds and what the GPU has in use, at one moment.
struct Usage {
  long rss_kib = -1, fds = -1, clients = -1, mapped = -1, busy = -1;
  long gpu_used_mib = -1;  // over every GPU, nvidia-smi's memory.used
  Json json() const {
    return Json{{"rss_kib", rss_kib}, {"fds", fds},   {"clients", clients},
                {"mapped", mapped},   {"busy", busy}, {"gpu_used_mib", gpu_used_mib}};
  }
  std::string text() const {
    return fmt::format("rss {:.1f} MiB, {} fds, {} clients, {} mappings, GPU memory used {} MiB",
                       static_cast<double>(rss_kib) / 1024, fds, clients, mapped, gpu_used_mib);
  }
};

long gpuUsedMib() {
  FILE* pipe =
      ::popen("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null", "r");
  if (pipe == nullptr) return -1;
  long total = 0;
  bool any = false;
  for (long mib; std::fscanf(pipe, "%ld", &mib) == 1;) {
    total += mib;
    any = true;
  }
  return ::pclose(pipe) == 0 && any ? total : -1;
}

Usage usageOf(const Daemon& daemon) {
  Usage u;
  if (const auto s = daemon.status()) {
    const Json* clients = stmux::jsonFind(*s, "clients");
    u.clients = clients && clients->is_array() ? static_cast<long>(clients->size()) : -1;
    u.mapped = u.busy = 0;
    if (const Json* gpus = stmux::jsonFind(*s, "gpus"); gpus && gpus->is_array()) {
      for (const Json& gpu : *gpus) {
        u.mapped += gpu.value("mapped", 0L);
        u.busy += gpu.value("queued", 0L) + gpu.value("in_flight", 0L) + gpu.value("awaiting", 0L) +
                  gpu.value("opening", 0L);
      }
    }
  }
  // The status query's own connection is closed by now.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const std::string proc = "/proc/" + std::to_string(daemon.pid());
  std::ifstream status(proc + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) u.rss_kib = std::strtol(line.c_str() + 6, nullptr, 10);
  }
  std::error_code error;
  u.fds = 0;
  for (auto it = fs::directory_iterator(proc + "/fd", error); !error && it != fs::end(it);
       it.increment(error)) {
    ++u.fds;
  }
  if (error) u.fds = -1;
  u.gpu_used_mib = gpuUsedMib();
  return u;
}

// The GPU's memory is counted in MiB by nvidia-smi; a context's own heap may
// move by a page of that.
constexpr long kGpuSlackMib = 2;

// The daemon with no tenants and nothing in flight, and, given a `baseline`,
// back to its descriptors (a dead tenant's are closed as the daemon notices);
// or the last look after 20 s.
Usage idleUsage(const Daemon& daemon, const Usage* baseline = nullptr) {
  Usage u;
  waitUntil(
      [&] {
        u = usageOf(daemon);
        return u.clients == 0 && u.mapped == 0 && u.busy == 0 &&
               (baseline == nullptr || u.fds == baseline->fds);
      },
      20);
  return u;
}

// The GPU's memory in use with no stmux process running, before a scenario;
// after it, the same once the driver has freed what the dead held (up to 20
// s). The daemon's own caches (workspaces that grow with its batches) go with
// it, so this compares like with like.
long gpuUsedAfter(long before) {
  long now = gpuUsedMib();
  waitUntil(
      [&] {
        now = gpuUsedMib();
        return before < 0 || now <= before + kGpuSlackMib;
      },
      20);
  return now;
}

// ---- checked tenants -------------------------------------------------------------

struct Tenant {
  std::string name;  // how to run it again
  Process process;
  bool differential = false;
  bool may_fail = false;  // calls may come back failed (the daemon dies under it)
  Clock::time_point started;
  double limit_s = 0;  // still running after this long: hung
};

// What a checked tenant said when it ended.
struct Outcome {
  int status = -1;
  long ok = 0, failed = 0, wrong = 0, other = 0;
  long served = 0, calls = 0;  // the shim's count
  bool printed = false;        // its totals line was found
};

// Why a checked tenant failed, in a line: the first wrong result it printed
// (with the command that replays it), else the first line of its errors.
std::string whyFailed(const Tenant& t) {
  std::istringstream lines(t.process.out());
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("MISMATCH", 0) == 0 || line.rfind("FAIL", 0) == 0) return line;
  }
  return firstLine(t.process.err());
}

// The sums over a scenario's checked tenants, and what went wrong.
struct Tally {
  int tenants = 0, hung = 0, bad_exit = 0;
  long ok = 0, failed = 0, wrong = 0, other = 0, served = 0, calls = 0;
  std::vector<std::string> problems;
  void add(const Tenant& t, const Outcome& r, const std::string& stuck) {
    ++tenants;
    ok += r.ok;
    failed += r.failed;
    wrong += r.wrong;
    other += r.other;
    served += r.served;
    calls += r.calls;
    if (r.status < 0) {
      ++hung;
      problems.push_back(t.name + " hung: " + firstLine(stuck));
    } else if (r.status != 0 || !r.printed) {
      ++bad_exit;
      problems.push_back(fmt::format("{} exited {}{}: {}", t.name, r.status,
                                     r.printed ? "" : " without its totals", whyFailed(t)));
    }
    if (r.failed > 0 && !t.may_fail)
      problems.push_back(fmt::format("{}: {} calls failed", t.name, r.failed));
  }
  Json json() const {
    return Json{{"tenants", tenants}, {"hung", hung},     {"bad_exit", bad_exit},
                {"ok", ok},           {"failed", failed}, {"wrong", wrong},
                {"other", other},     {"calls", calls},   {"served", served}};
  }
  std::string text() const {
    return fmt::format(
        "{} checked tenants: {} calls right, {} wrong, {} failed (returned as errors), {} other; "
        "{} hung; the shims served {} of {} calls",
        tenants, ok, wrong, failed, other, hung, served, calls);
  }
};

class Tenants {
 public:
  Tenants(const Options& o, const fs::path& dir, const Daemon& daemon, std::uint64_t seed)
      : o_(o), dir_(dir), random_(seed) {
    env_ = {{"LD_PRELOAD", o.shim}, {"STMUX_SOCKET", daemon.socket()}, {"STMUX_LOG", "stats=info"}};
  }

  // sgemm calls against a float64 reference for `seconds`.
  Tenant& stress(double seconds, int threads, double beta, bool may_fail = false) {
    const std::uint64_t seed = (random_() >> 1) | 1;  // the client takes a signed 64-bit seed
    std::vector<std::string> args = {o_.client,   "stress",
                                     "--seconds", fmt::format("{:.3f}", seconds),
                                     "--threads", std::to_string(threads),
                                     "--beta",    fmt::format("{}", beta),
                                     "--seed",    std::to_string(seed)};
    Tenant& t = add(args, fmt::format("stmux-cublas-client stress --seconds {:.3f} --threads {} "
                                      "--beta {} --seed {}",
                                      seconds, threads, beta, seed));
    t.may_fail = may_fail && beta != 0;
    t.limit_s = seconds + 120;
    return t;
  }
  // Every entry point against cuBLAS run directly.
  Tenant& differential(long calls, int threads, bool may_fail = false) {
    const std::uint64_t seed = random_() >> 1;
    std::vector<std::string> args = {
        o_.differential,         "--seed",  std::to_string(seed), "--threads",
        std::to_string(threads), "--calls", std::to_string(calls)};
    if (may_fail) args.emplace_back("--allow-lost-calls");
    Tenant& t = add(args, fmt::format("stmux-differential --seed {} --threads {} --calls {}{}",
                                      seed, threads, calls, may_fail ? " --allow-lost-calls" : ""));
    t.differential = true;
    t.may_fail = may_fail;
    t.limit_s = 600;
    return t;
  }

  std::vector<Tenant>& all() { return tenants_; }

  // Reads and counts the tenants that have ended; with `until_all`, waits
  // for every one. A tenant still running past its limit is hung: its
  // threads are reported, and it is killed.
  void reap(Tally& tally, bool until_all) {
    for (auto it = tenants_.begin(); it != tenants_.end();) {
      int status = it->process.wait({});
      if (status < 0 && until_all) {
        const double left = it->limit_s - since(it->started);
        status = it->process.wait(
            std::chrono::milliseconds(static_cast<long>(std::max(left, 0.0) * 1e3)));
      }
      if (status < 0 && since(it->started) < it->limit_s) {
        ++it;
        continue;
      }
      std::string stuck;
      if (status < 0) {
        stuck = it->process.stuckReport();
        it->process.signal(SIGKILL);
        it->process.wait(std::chrono::seconds(10));
      }
      Outcome r = read(*it);
      r.status = status;
      tally.add(*it, r, stuck);
      it = tenants_.erase(it);
    }
  }

 private:
  Tenant& add(const std::vector<std::string>& args, const std::string& name) {
    Tenant& t = tenants_.emplace_back();
    t.name = name;
    t.started = Clock::now();
    t.process = Process(args, env_, (dir_ / ("tenant-" + std::to_string(++count_))).string());
    return t;
  }

  static Outcome read(const Tenant& t) {
    Outcome r;
    std::istringstream lines(t.process.out());
    for (std::string line; std::getline(lines, line);) {
      if (!t.differential && line.rfind("stress ok ", 0) == 0) {
        r.printed =
            std::sscanf(line.c_str(), "stress ok %ld execution_failed %ld wrong %ld other %ld",
                        &r.ok, &r.failed, &r.wrong, &r.other) == 4;
      } else if (t.differential && line.rfind("calls ", 0) == 0) {
        long calls = 0, mismatches = 0, lost = 0;
        r.printed = std::sscanf(line.c_str(), "calls %ld mismatches %ld lost %ld", &calls,
                                &mismatches, &lost) == 3;
        r.wrong = mismatches;
        r.failed = lost;
        r.ok = calls - mismatches - lost;
      }
    }
    const stmux::tools::ShimStats stats = stmux::tools::shimStats(t.process.err());
    r.served = std::max(stats.served, 0L);
    r.calls = std::max(stats.calls, 0L);
    return r;
  }

  const Options& o_;
  fs::path dir_;
  std::mt19937_64 random_;
  std::map<std::string, std::string> env_;
  std::vector<Tenant> tenants_;
  int count_ = 0;
};

// ---- results -------------------------------------------------------------------

struct Result {
  std::string scenario;
  bool passed = true;
  std::vector<std::string> problems;
  Json figures = Json::object();
  void fail(const std::string& why) {
    passed = false;
    problems.push_back(why);
  }
  void take(const Tally& tally) {
    for (const std::string& p : tally.problems)
      fail(p);
    if (tally.wrong > 0) fail(fmt::format("{} results were wrong", tally.wrong));
    if (tally.other > 0)
      fail(fmt::format("{} calls came back with unexpected statuses", tally.other));
  }
};

void say(const char* scenario, const std::string& text) {
  std::printf("[%s] %s\n", scenario, text.c_str());
  std::fflush(stdout);
}

// One scenario's daemon, started and warmed by one short checked tenant (so
// that what it allocates once, handles and workspaces, is in its baseline),
// the scenario's tenants, and what it found.
struct Scenario {
  Scenario(const Options& o, const fs::path& dir, const char* scenario, std::uint64_t seed)
      : name(scenario), daemon(o, dir), tenants(o, dir, daemon, seed) {
    result.scenario = name;
    if (const std::string why = daemon.start(); !why.empty()) {
      result.fail(why);
      return;
    }
    tenants.stress(1.0, 2, 0.5);
    Tally warm;
    tenants.reap(warm, true);
    result.take(warm);
    if (warm.served == 0) result.fail("the warm-up tenant was not served: " + daemon.errors());
    before = idleUsage(daemon);
    say(name, "daemon up and warm: " + before.text());
    started = true;
  }

  // The daemon's descriptors and mappings with no tenants, after against
  // before (idle_after); then it stops, as SIGTERM must stop it.
  void finish() {
    idle_after = idleUsage(daemon, &before);
    say(name, "idle before: " + before.text());
    say(name, "idle after:  " + idle_after.text());
    result.figures["idle_before"] = before.json();
    result.figures["idle_after"] = idle_after.json();
    if (idle_after.clients != 0) {
      result.fail(fmt::format("{} clients still attached", idle_after.clients));
    }
    if (idle_after.busy != 0) {
      result.fail(fmt::format("{} requests still in the daemon", idle_after.busy));
    }
    if (idle_after.mapped != before.mapped) {
      result.fail(fmt::format("mappings {} after, {} before", idle_after.mapped, before.mapped));
    }
    if (idle_after.fds != before.fds) {
      result.fail(fmt::format("descriptors {} after, {} before", idle_after.fds, before.fds));
    }
    if (daemon.stop() != 0) result.fail("stmuxd did not stop cleanly on SIGTERM");
  }

  const char* name;
  Result result;
  Daemon daemon;
  Tenants tenants;
  bool started = false;  // up and warm: the scenario may run
  Usage before, idle_after;
};

// ---- tenant-kills ----------------------------------------------------------------

Result tenantKills(const Options& o, const fs::path& dir) {
  Scenario s(o, dir, "tenant-kills", 0x7e4a47ull);
  if (!s.started) return s.result;

  // Victims: closed loops of 256^3 sgemm {call; sync}, so that a call is in
  // flight most of the time; each killed once it is attached and calling.
  const std::string go = (dir / "go").string();
  const std::uint64_t now = stmux::tools::realtimeNs();
  stmux::tools::writeGo(go, {now, now + 86'400'000'000'000ull});
  const double checked_s = 15 + 0.25 * o.kills;  // outlasts the kills (some 5 a second)
  for (int i = 0; i < o.tenants; ++i)
    s.tenants.stress(checked_s, 2, i % 2 == 0 ? 0.0 : 0.5);
  const auto start = Clock::now();
  std::mt19937_64 random(0x6b696c6cull);
  constexpr int kAtOnce = 8;
  struct Victim {
    Process process;
    std::string ready;
    Clock::time_point spawned, kill_at;
    bool armed = false;  // attached and calling: killed at kill_at
  };
  std::vector<Victim> victims;
  int started = 0, killed = 0, in_flight = 0, stillborn = 0, while_checked = 0;
  const std::map<std::string, std::string> env = {{"LD_PRELOAD", o.shim},
                                                  {"STMUX_SOCKET", s.daemon.socket()}};
  auto checkedRunning = [&] {
    return std::any_of(s.tenants.all().begin(), s.tenants.all().end(),
                       [](Tenant& t) { return t.process.wait({}) < 0; });
  };
  while (killed + stillborn < o.kills) {
    if (stillborn > 5) {
      s.result.fail(fmt::format("gave up after {} victims never called", stillborn));
      break;
    }
    while (static_cast<int>(victims.size()) < kAtOnce && started < o.kills) {
      const std::string i = std::to_string(started++);
      Victim& v = victims.emplace_back();
      v.ready = (dir / ("ready" + i)).string();
      v.spawned = Clock::now();
      v.process =
          Process({o.client, "loop", "--m", "256", "--n", "256", "--k", "256", "--ready", v.ready,
                   "--go", go, "--out", (dir / ("lat" + i)).string(), "--tenant", i},
                  env, (dir / ("victim-" + i)).string());
    }
    for (auto it = victims.begin(); it != victims.end();) {
      Victim& v = *it;
      if (!v.armed && fs::exists(v.ready)) {
        v.armed = true;
        v.kill_at = Clock::now() + std::chrono::microseconds(
                                       std::uniform_int_distribution<int>(1'000, 100'000)(random));
      }
      std::string why;
      if (v.armed && Clock::now() >= v.kill_at) {
        // Whether the daemon holds any of its requests at this moment.
        if (const auto status = s.daemon.status()) {
          for (const Json& c : status->value("clients", Json::array())) {
            if (c.value("pid", 0L) == v.process.pid() && c.value("outstanding", 0L) > 0)
              ++in_flight;
          }
        }
        v.process.signal(SIGKILL);
        v.process.wait(std::chrono::seconds(10));
        ++killed;
        while_checked += checkedRunning() ? 1 : 0;
        if (killed % 10 == 0) {
          say(s.name, fmt::format("{} of {} killed ({} with requests in the daemon), {:.0f} s",
                                  killed, o.kills, in_flight, since(start)));
        }
      } else if (const int status = v.process.wait({}); status >= 0) {
        why = fmt::format("a victim exited {} before its kill: {}", status,
                          firstLine(v.process.err()));
      } else if (!v.armed && since(v.spawned) > 60) {
        why = "a victim was not calling within 60 s: " + firstLine(v.process.err());
      } else {
        ++it;
        continue;
      }
      if (!why.empty()) {
        ++stillborn;  // a victim that never called
        s.result.fail(why);
      }
      it = victims.erase(it);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const double kill_s = since(start);
  say(s.name, fmt::format("{} tenants killed in {:.1f} s, {} with requests in the daemon at the "
                          "kill, {} while the checked tenants ran",
                          killed, kill_s, in_flight, while_checked));
  Tally tally;
  s.tenants.reap(tally, true);
  say(s.name, tally.text());
  s.result.take(tally);
  if (tally.served == 0) s.result.fail("the checked tenants were not served");
  if (!s.daemon.running()) s.result.fail("stmuxd died: " + firstLine(s.daemon.errors()));
  s.finish();
  s.result.figures["killed"] = killed;
  s.result.figures["killed_with_requests_in_daemon"] = in_flight;
  s.result.figures["killed_while_checked_ran"] = while_checked;
  s.result.figures["kill_seconds"] = kill_s;
  s.result.figures["checked"] = tally.json();
  return s.result;
}

// ---- daemon-kills ------------------------------------------------------------------

Result daemonKills(const Options& o, const fs::path& dir) {
  Scenario s(o, dir, "daemon-kills", 0xd43e0bull);
  if (!s.started) return s.result;

  const double checked_s = 10 + 2.5 * o.restarts;  // a restart takes some 1.5 s
  for (int i = 0; i < o.tenants; ++i)
    s.tenants.stress(checked_s, 2, i % 2 == 0 ? 0.0 : 0.5, /*may_fail=*/true);
  // About as long as the stress tenants (some 500 calls/s on two threads).
  s.tenants.differential(static_cast<long>(checked_s * 400), 2, /*may_fail=*/true);
  std::mt19937_64 random(0x72657374ull);
  std::vector<double> recover_s;
  const auto start = Clock::now();
  for (int r = 1; r <= o.restarts; ++r) {
    // Served again, then killed a moment later, mid-batch.
    const auto up = Clock::now();
    if (!waitUntil([&] { return s.daemon.served() > 0; }, 30)) {
      s.result.fail(fmt::format("restart {}: no call was served within 30 s", r - 1));
      break;
    }
    if (r > 1) recover_s.push_back(since(up));
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::uniform_int_distribution<int>(300, 1500)(random)));
    const long served = s.daemon.served();
    s.daemon.kill9();
    if (const std::string why = s.daemon.start(); !why.empty()) {
      s.result.fail(fmt::format("restart {}: {}", r, why));
      break;
    }
    say(s.name, fmt::format("kill {} of {} at {:.1f} s ({} calls served by that daemon)", r,
                            o.restarts, since(start), served));
  }
  const auto up = Clock::now();
  if (waitUntil([&] { return s.daemon.served() > 0; }, 30)) {
    recover_s.push_back(since(up));
  } else {
    s.result.fail("no call was served after the last restart");
  }
  Tally tally;
  s.tenants.reap(tally, true);
  say(s.name, tally.text());
  s.result.take(tally);
  std::sort(recover_s.begin(), recover_s.end());
  if (!recover_s.empty()) {
    say(s.name, fmt::format("served again after a restart within {:.2f} s (median {:.2f} s)",
                            recover_s.back(), recover_s[recover_s.size() / 2]));
    s.result.figures["recover_s_max"] = recover_s.back();
    s.result.figures["recover_s_median"] = recover_s[recover_s.size() / 2];
  }
  // A fresh daemon against the first, idle both.
  s.finish();
  s.result.figures["restarts"] = o.restarts;
  s.result.figures["checked"] = tally.json();
  return s.result;
}

// ---- soak ---------------------------------------------------------------------------

Result soak(const Options& o, const fs::path& dir) {
  Scenario s(o, dir, "soak", 0x50a6ull);
  if (!s.started) return s.result;

  // Two tenants for the whole soak; beside them, o.tenants short ones at a
  // time, each replaced as it ends: stress of 1 to 4 s and 1 to 3 threads,
  // or the differential program's 2,000 calls, every entry point.
  s.tenants.stress(o.soak_s, 2, 0.0);
  s.tenants.stress(o.soak_s, 1, 0.5);
  std::mt19937_64 random(0x736f616bull);
  const auto start = Clock::now();
  Tally tally;
  Json samples = Json::array();
  std::vector<long> rss;  // the daemon's, at each sample
  double next_sample = 0;
  int started = 0;
  while (since(start) < o.soak_s) {
    const int running = static_cast<int>(s.tenants.all().size()) - 2;
    for (int i = running; i < o.tenants && since(start) + 6 < o.soak_s; ++i, ++started) {
      if (started % 2 == 0) {
        s.tenants.stress(std::uniform_real_distribution<double>(1, 4)(random),
                         std::uniform_int_distribution<int>(1, 3)(random),
                         started % 4 == 0 ? 0.0 : 1.0);
      } else {
        s.tenants.differential(2'000, std::uniform_int_distribution<int>(1, 3)(random));
      }
    }
    // The short ones that ended (the two long ones end with the soak).
    s.tenants.reap(tally, false);
    if (since(start) >= next_sample) {
      next_sample += 10;
      const Usage u = usageOf(s.daemon);
      rss.push_back(u.rss_kib);
      Json sample = u.json();
      sample["t_s"] = since(start);
      samples.push_back(sample);
      say(s.name, fmt::format("{:.0f} of {:.0f} s: {} short tenants ended, {} wrong so far; {}",
                              since(start), o.soak_s, tally.tenants, tally.wrong, u.text()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  s.tenants.reap(tally, true);
  say(s.name, tally.text());
  s.result.take(tally);
  if (!s.daemon.running()) s.result.fail("stmuxd died: " + firstLine(s.daemon.errors()));
  // Growth under load: the daemon's RSS over the second half of the samples.
  if (rss.size() >= 4) {
    const std::size_t half = rss.size() / 2;
    const auto [low, high] = std::minmax_element(rss.begin() + static_cast<long>(half), rss.end());
    const long growth = rss.back() - rss[half];
    say(s.name, fmt::format("daemon RSS under load over the second half: {:.1f} to {:.1f} MiB "
                            "({:+.1f} MiB from its start to its end)",
                            *low / 1024.0, *high / 1024.0, growth / 1024.0));
    s.result.figures["rss_second_half_growth_kib"] = growth;
    // Under load, a leak shows as growth over the second half; 1% of the
    // RSS is a bound above the samples' own jitter.
    if (growth > rss[half] / 100) {
      s.result.fail(fmt::format("the daemon's RSS grew by {} KiB over the second half", growth));
    }
  }
  s.finish();
  // RSS idle after against idle before: what the soak left behind.
  s.result.figures["rss_growth_idle_kib"] = s.idle_after.rss_kib - s.before.rss_kib;
  s.result.figures["seconds"] = o.soak_s;
  s.result.figures["samples"] = samples;
  s.result.figures["checked"] = tally.json();
  return s.result;
}

// ---- dos ------------------------------------------------------------------------------

// Connections to the daemon that never say hello, kept at `count`: each one
// the daemon closes is opened again.
void silentConnections(const std::string& socket, int count, const std::atomic<bool>& stop) {
  auto address = stmux::socketAddress(socket);
  if (!address) return;
  std::vector<int> fds;
  while (!stop.load()) {
    while (static_cast<int>(fds.size()) < count) {
      const int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      if (fd < 0) break;
      if (::connect(fd, reinterpret_cast<const sockaddr*>(&address.value()), sizeof(sockaddr_un)) !=
              0 &&
          errno != EINPROGRESS && errno != EAGAIN) {
        ::close(fd);
        break;
      }
      fds.push_back(fd);
    }
    std::vector<pollfd> polls;
    for (int fd : fds)
      polls.push_back({fd, POLLIN, 0});
    ::poll(polls.data(), polls.size(), 50);
    for (std::size_t i = polls.size(); i-- > 0;) {
      if (polls[i].revents & (POLLHUP | POLLERR | POLLIN)) {
        ::close(fds[i]);
        fds.erase(fds.begin() + static_cast<long>(i));
      }
    }
  }
  for (int fd : fds)
    ::close(fd);
}

// Connections that each send a hello of random bytes and close, as fast as
// one thread can.
void garbageHellos(const std::string& socket, const std::atomic<bool>& stop, long& sent) {
  auto address = stmux::socketAddress(socket);
  if (!address) return;
  std::mt19937_64 random(0x6a756e6bull);
  while (!stop.load()) {
    stmux::UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (!fd.valid()) continue;
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                  sizeof(sockaddr_un)) != 0) {
      continue;
    }
    char bytes[256];
    const std::size_t n = std::uniform_int_distribution<std::size_t>(1, sizeof bytes)(random);
    for (std::size_t i = 0; i < n; ++i)
      bytes[i] = static_cast<char>(random());
    if (::send(fd.get(), bytes, n, MSG_NOSIGNAL) > 0) ++sent;
  }
}

// The first folder on the way to `path` that uid `uid` of group `gid` may
// not search, or "" if there is none.
std::string closedFolderOnTheWay(const fs::path& path, uid_t uid, gid_t gid) {
  for (fs::path folder = fs::absolute(path).parent_path();; folder = folder.parent_path()) {
    struct stat st {};
    if (::stat(folder.c_str(), &st) != 0) return folder.string();
    const bool may = st.st_uid == uid   ? (st.st_mode & S_IXUSR) != 0
                     : st.st_gid == gid ? (st.st_mode & S_IXGRP) != 0
                                        : (st.st_mode & S_IXOTH) != 0;
    if (!may) return folder.string();
    if (folder == folder.root_path()) return "";
  }
}

// The command that runs the flooding client as uid 65534 (nobody), kept in
// the daemon socket's group (root's: the socket is made 0660), from a copy
// in `dir` that the user can reach; none, with why, where that cannot be
// done: stmux-fault not run as root, a folder above --out closed to that
// user, no setpriv, or the GPU out of that user's reach (its device files).
std::vector<std::string> otherUser(const Options& o, const fs::path& dir, const std::string& socket,
                                   std::string& why_not) {
  if (::geteuid() != 0) {
    why_not = "it takes root to run a client as another user";
    return {};
  }
  std::error_code error;
  fs::create_directories(dir, error);
  const fs::path copy = dir / "stmux-ipc-client";
  if (!error) fs::copy_file(o.raw_client, copy, fs::copy_options::overwrite_existing, error);
  // Search rights on the way to the copy and to the daemon's socket.
  const auto search = fs::perms::group_exec | fs::perms::others_exec;
  for (const fs::path& p : {dir, dir.parent_path(), fs::path(o.out)}) {
    if (!error) fs::permissions(p, search, fs::perm_options::add, error);
  }
  if (!error) {
    fs::permissions(copy,
                    fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                        fs::perms::others_read | fs::perms::others_exec,
                    error);
  }
  if (error) {
    why_not = fmt::format("cannot copy {} where another user reaches it: {}", o.raw_client,
                          error.message());
    return {};
  }
  // Above --out the folders are the user's own: said, not opened.
  for (const fs::path& reached : {copy, fs::path(socket)}) {
    if (const std::string closed = closedFolderOnTheWay(reached, 65534, 0); !closed.empty()) {
      why_not = fmt::format(
          "uid 65534 cannot reach {}: {} is closed to it (give others search rights, e.g. "
          "chmod o+x, or choose another --out)",
          reached.string(), closed);
      return {};
    }
  }
  const std::vector<std::string> command = {"setpriv", "--reuid=65534", "--regid=0",
                                            "--clear-groups", copy.string()};
  std::vector<std::string> probe = command;
  probe.emplace_back("probe");
  Process check(probe, {{"LD_PRELOAD", ""}}, (dir / "probe").string());
  const int code = check.wait(std::chrono::seconds(60));
  if (code != 0) {
    why_not = fmt::format("uid 65534 cannot run the client on the GPU (setpriv ... probe: {} {})",
                          code, firstLine(check.spawnError() + check.err() + check.out()));
    return {};
  }
  return command;
}

Result dos(const Options& o, const fs::path& dir) {
  Scenario s(o, dir, "dos", 0xd05ull);
  if (!s.started) return s.result;

  struct Phase {
    const char* name;
    const char* what;
  };
  const Phase phases[] = {
      {"alone", "the checked tenants alone"},
      {"greedy", "beside one tenant of 16 threads calling without pause"},
      {"silent", "beside 2,000 connections that never say hello, reopened as they are closed"},
      {"garbage", "beside 4 threads opening connections that send random bytes as their hello"},
      {"flood", "beside a client pushing requests into its ring without waiting for them"},
      {"garbage-handles",
       "beside a client pushing requests with garbage memory handles into its ring"},
      {"garbage-handles-16",
       "beside 16 clients of one user pushing requests with garbage memory handles into their "
       "rings"},
      {"garbage-handles-16-other-user",
       "beside 16 clients of another user (uid 65534) pushing requests with garbage memory "
       "handles into their rings"},
  };
  double alone_rate = 0;
  Json rows = Json::array();
  for (const Phase& phase : phases) {
    const std::string p = phase.name;
    // The flooders of the last phase run as another user: the checked
    // tenants, of this one, have a share of their own of the server's turns
    // and of the failed-open budgets (where every process is one user, as in
    // the phases before, they share them with the flood).
    std::vector<std::string> as_user;
    if (p.ends_with("other-user")) {
      std::string why_not;
      as_user = otherUser(o, dir / p, s.daemon.socket(), why_not);
      if (as_user.empty()) {
        say(s.name, fmt::format("{}: not run: {}", phase.what, why_not));
        rows.push_back(Json{{"phase", p}, {"what", phase.what}, {"not_run", why_not}});
        continue;
      }
    }
    std::atomic<bool> stop{false};
    std::vector<std::thread> abusers;
    std::vector<long> garbage(4, 0);
    Tenants greedy(o, dir / "greedy", s.daemon, 0x67ull);
    if (p == "greedy") {
      fs::create_directories(dir / "greedy");
      greedy.stress(o.dos_s + 4, 16, 0.0);
      std::this_thread::sleep_for(std::chrono::seconds(2));
    } else if (p == "silent") {
      abusers.emplace_back(silentConnections, s.daemon.socket(), 2000, std::cref(stop));
      std::this_thread::sleep_for(std::chrono::seconds(1));
    } else if (p == "garbage") {
      for (int i = 0; i < 4; ++i)
        abusers.emplace_back(garbageHellos, s.daemon.socket(), std::cref(stop),
                             std::ref(garbage[i]));
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    // Flooding through the phase: the checked tenants' start (CUDA's, some
    // seconds at most) and their dos_s.
    const bool garbage_handles = p.starts_with("garbage-handles");
    const bool floods = p == "flood" || garbage_handles;
    Process flooder;
    if (floods) {
      std::vector<std::string> argv =
          as_user.empty() ? std::vector<std::string>{o.raw_client} : as_user;
      argv.insert(argv.end(), {"flood", "--socket", s.daemon.socket(), "--seconds",
                               fmt::format("{}", o.dos_s + 6)});
      if (garbage_handles) argv.emplace_back("--garbage");
      // One thread filling the rings of 16 clients in turn: the user's budget
      // of failed opens, at one flooder's CPU.
      if (p.starts_with("garbage-handles-16")) argv.insert(argv.end(), {"--clients", "16"});
      flooder = Process(argv, {{"LD_PRELOAD", ""}}, (dir / p).string());
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    // The checked tenants start under the abuse (so their attach is tried
    // under it too) and run for the phase.
    for (int i = 0; i < o.tenants; ++i)
      s.tenants.stress(o.dos_s, 1, 0.5);
    Tally tally;
    s.tenants.reap(tally, true);
    // The flooding clients' place in the daemon while they still flood,
    // summed: what they have outstanding (bounded by their slots), how much
    // was refused, and how many opens of their memory failed (the budgets
    // for them).
    double flood_outstanding = -1, flood_refused = -1, flood_failed_opens = -1, flood_unopened = -1;
    if (flooder.running()) {
      if (auto status = s.daemon.status()) {
        flood_outstanding = flood_refused = flood_failed_opens = flood_unopened = 0;
        for (const Json& client : (*status)["clients"]) {
          if (client.value("name", "") != "ipc_client") continue;
          flood_outstanding += client.value("outstanding", 0.0);
          flood_refused += client.value("refused", 0.0);
          flood_failed_opens += client.value("failed_opens", 0.0);
          flood_unopened += client.value("declined_unopened", 0.0);
        }
      }
    }
    stop = true;
    for (std::thread& t : abusers)
      t.join();
    Tally greedy_tally;
    greedy.reap(greedy_tally, true);
    s.result.take(tally);
    if (p == "greedy") s.result.take(greedy_tally);
    const double rate = static_cast<double>(tally.ok) / o.dos_s;
    if (p == "alone") alone_rate = rate;
    const double share = tally.calls > 0 ? static_cast<double>(tally.served) / tally.calls : 0;
    long sent = 0;
    for (long n : garbage)
      sent += n;
    std::string extra;
    if (p == "greedy")
      extra = fmt::format("; the greedy tenant: {:.0f} calls/s", greedy_tally.ok / (o.dos_s + 4));
    if (p == "garbage") extra = fmt::format("; {} garbage hellos sent", sent);
    std::string flooded;
    if (floods) {
      const int code = flooder.wait(std::chrono::seconds(60));
      // Its one line of figures, after the seed it printed.
      const std::string out = flooder.out();
      const std::size_t at = out.find("flood pushed");
      flooded =
          at == std::string::npos ? "it said nothing of its flood" : firstLine(out.substr(at));
      if (code != 0) {
        s.result.fail(fmt::format("the flooding client ended with {} {}: {}", code, phase.what,
                                  firstLine(flooder.err() + flooder.out())));
      }
      extra = fmt::format("; {}; it had {:.0f} requests outstanding, {:.0f} refused", flooded,
                          flood_outstanding, flood_refused);
      if (garbage_handles) {
        extra += fmt::format(
            "; {:.0f} opens of its memory failed or crowded out, {:.0f} requests declined "
            "unopened",
            flood_failed_opens, flood_unopened);
      }
    }
    say(s.name,
        fmt::format("{}: {:.0f} checked calls/s ({:.2f}x alone), {:.1f}% served{}", phase.what,
                    rate, alone_rate > 0 ? rate / alone_rate : 0.0, 100 * share, extra));
    if (!s.daemon.running()) {
      s.result.fail(std::string("stmuxd died ") + phase.what + ": " + firstLine(s.daemon.errors()));
      return s.result;
    }
    if (share == 0) s.result.fail(std::string("the checked tenants were not served ") + phase.what);
    rows.push_back(Json{{"phase", p},
                        {"what", phase.what},
                        {"calls_per_s", rate},
                        {"vs_alone", alone_rate > 0 ? rate / alone_rate : 0.0},
                        {"served_share", share},
                        {"garbage_hellos", sent},
                        {"flooder", flooded},
                        {"flooder_outstanding", flood_outstanding},
                        {"flooder_refused", flood_refused},
                        {"checked", tally.json()}});
  }
  s.result.figures["phases"] = rows;
  s.finish();
  return s.result;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, o)) return 2;
  // The run's own files only: an earlier run's report and scenario folders
  // go, and whatever else is in the folder stays (it may be the user's).
  std::error_code error;
  fs::create_directories(o.out, error);
  if (error || !fs::is_directory(o.out)) {
    std::fprintf(stderr, "stmux-fault: cannot make %s a folder for the logs (--out): %s\n",
                 o.out.c_str(), error ? error.message().c_str() : "it is not a folder");
    return 2;
  }
  for (const char* scenario : kScenarios)
    fs::remove_all(fs::path(o.out) / scenario, error);
  for (const char* file : {"fault.json", "devices.out", "devices.err"})
    fs::remove(fs::path(o.out) / file, error);
  // The GPU first, so that a machine without one hears it at once.
  const stmux::Ran devices = stmux::run({o.client, "devices"}, {{"LD_PRELOAD", ""}},
                                        o.out + "/devices", std::chrono::seconds(60));
  if (devices.status != 0) {
    std::fprintf(stderr, "stmux-fault: needs a CUDA device: %s\n",
                 firstLine(devices.err + devices.out).c_str());
    return 3;
  }
  ::signal(SIGPIPE, SIG_IGN);
  Json report = Json::object();
  report["device"] = firstLine(devices.out);
  Json& scenarios = report["scenarios"] = Json::array();
  bool all_passed = true;
  for (const std::string& scenario : o.scenarios) {
    const fs::path dir = fs::path(o.out) / scenario;
    fs::create_directories(dir);
    const auto start = Clock::now();
    const long gpu_before = gpuUsedMib();
    say(scenario.c_str(), fmt::format("starting; GPU memory used {} MiB", gpu_before));
    Result r = scenario == "tenant-kills"   ? tenantKills(o, dir)
               : scenario == "daemon-kills" ? daemonKills(o, dir)
               : scenario == "soak"         ? soak(o, dir)
                                            : dos(o, dir);
    // Every process of the scenario is gone: the GPU's memory is back.
    const long gpu_after = gpuUsedAfter(gpu_before);
    say(scenario.c_str(), fmt::format("every process gone; GPU memory used {} MiB", gpu_after));
    r.figures["gpu_used_mib_before"] = gpu_before;
    r.figures["gpu_used_mib_after"] = gpu_after;
    if (gpu_before >= 0 && gpu_after > gpu_before + kGpuSlackMib) {
      r.fail(fmt::format("GPU memory used {} MiB after the scenario, {} MiB before", gpu_after,
                         gpu_before));
    }
    const double seconds = since(start);
    say(scenario.c_str(), fmt::format("{} in {:.0f} s", r.passed ? "PASSED" : "FAILED", seconds));
    for (const std::string& p : r.problems)
      say(scenario.c_str(), "  " + p);
    all_passed = all_passed && r.passed;
    scenarios.push_back(Json{{"scenario", scenario},
                             {"passed", r.passed},
                             {"seconds", seconds},
                             {"problems", r.problems},
                             {"figures", r.figures}});
  }
  const std::string path = (fs::path(o.out) / "fault.json").string();
  std::ofstream(path) << stmux::dumpJson(report) << "\n";
  std::printf("stmux-fault: %s; logs and %s\n",
              all_passed ? "every scenario passed" : "a scenario FAILED", path.c_str());
  return all_passed ? 0 : 1;
}

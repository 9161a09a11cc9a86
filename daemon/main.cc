// stmuxd: the daemon that owns the GPUs. Runs in the foreground (systemd
// starts it); SIGTERM drains and exits 0.
#include <dlfcn.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/channel.h"
#include "daemon/executor.h"
#include "daemon/metrics.h"
#include "daemon/scheduler.h"
#include "daemon/server.h"
#include "stmux/config.h"
#include "stmux/log.h"
#include "stmux/mps_seats.h"
#include "stmux/precision.h"
#include "stmux/segment.h"

extern char** environ;

namespace stmux::daemon {
namespace {

constexpr const char* kVersion = "0.1.0";

Server* gServer = nullptr;

void onSignal(int) {
  // requestStop() is async-signal-safe: an atomic store and an eventfd write.
  if (gServer != nullptr) gServer->requestStop();
}

bool daemonReads(const VarInfo& var) {
  return var.scope != Scope::kShim;
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: stmuxd [options]\n"
               "The stmux daemon: serves the cublasSgemm calls of processes running with\n"
               "LD_PRELOAD=libstmux.so, batching them on this host's GPUs. Runs in the\n"
               "foreground; SIGTERM finishes the work in flight and exits.\n\n"
               "  --help            this text\n"
               "  --version         the version and protocol\n"
               "  --print-config    the configuration in effect, as an environment file\n\n"
               "Every daemon setting is an STMUX_* environment variable and a flag that\n"
               "overrides it (--window-us=100 or --window-us 100):\n");
  for (const VarInfo& var : kVars) {
    if (!daemonReads(var)) continue;
    std::fprintf(out, "  --%-18s %s\n  %-20s %s; default %s\n", flagName(var.name).c_str(),
                 std::string(var.name).c_str(), "", describeAccepted(var).c_str(),
                 std::string(var.default_text).c_str());
    std::fprintf(out, "  %-20s %s\n", "", std::string(var.help).c_str());
  }
}

// Flags override the environment; the result is looked up like the
// environment, so one parser serves both.
struct Flags {
  std::map<std::string, std::string, std::less<>> values;
  bool help = false, version = false, print_config = false;
};

Result<Flags> parseFlags(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      flags.help = true;
      continue;
    }
    if (arg == "--version") {
      flags.version = true;
      continue;
    }
    if (arg == "--print-config") {
      flags.print_config = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0) {
      return Status::error(fmt::format("unexpected argument '{}'; see --help", arg));
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const VarInfo* found = nullptr;
    for (const VarInfo& var : kVars) {
      if (daemonReads(var) && flagName(var.name) == name) found = &var;
    }
    if (found == nullptr)
      return Status::error(fmt::format("unknown option '--{}'; see --help", name));
    if (!has_value) {
      if (i + 1 >= argc) return Status::error(fmt::format("--{} needs a value", name));
      value = argv[++i];
    }
    flags.values[std::string(found->name)] = value;
  }
  return flags;
}

// The configuration's errors name the variable ("STMUX_WINDOW_US='abc' is
// not an integer; ..."); where a flag gave the value, the flag is named
// instead, as the user typed it.
std::string nameTheFlags(const std::string& errors, const Flags& flags) {
  std::string out;
  std::size_t begin = 0;
  while (begin <= errors.size()) {
    std::size_t end = errors.find('\n', begin);
    if (end == std::string::npos) end = errors.size();
    std::string line = errors.substr(begin, end - begin);
    const std::size_t eq = line.find('=');
    if (eq != std::string::npos && flags.values.count(line.substr(0, eq)) != 0) {
      line = "--" + flagName(line.substr(0, eq)) + line.substr(eq);
    }
    out += (out.empty() ? "" : "\n") + line;
    begin = end + 1;
  }
  return out;
}

// systemd's readiness protocol, through libsystemd's sd_notify, loaded only
// when systemd asks for it (NOTIFY_SOCKET): every host that runs systemd has
// libsystemd.so.0, and stmuxd needs neither its headers to build nor the
// library to run anywhere else.
void notifySystemd(const char* state) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (path == nullptr || path[0] == '\0') return;
  using SdNotify = int (*)(int unset_environment, const char* state);
  static const SdNotify sd_notify = []() -> SdNotify {
    void* library = ::dlopen("libsystemd.so.0", RTLD_NOW | RTLD_LOCAL);
    void* function = library != nullptr ? ::dlsym(library, "sd_notify") : nullptr;
    if (function == nullptr) {
      STMUX_WARN(kDaemon,
                 "NOTIFY_SOCKET is set, but sd_notify cannot be loaded from libsystemd.so.0 ({}); "
                 "systemd will not hear that stmuxd is ready",
                 ::dlerror());
    }
    return reinterpret_cast<SdNotify>(function);
  }();
  if (sd_notify == nullptr) return;
  if (const int rc = sd_notify(0, state); rc < 0) {
    STMUX_WARN(kDaemon, "sd_notify(\"{}\") failed: {}", state, std::strerror(-rc));
  }
}

// The memory limit of the daemon's cgroup (v2: systemd's MemoryMax=, a
// container's limit), or 0 where there is none or it cannot be read.
std::uint64_t cgroupMemoryLimit() {
  std::ifstream cgroups("/proc/self/cgroup");
  for (std::string line; std::getline(cgroups, line);) {
    if (line.rfind("0::", 0) != 0) continue;
    std::ifstream limit("/sys/fs/cgroup" + line.substr(3) + "/memory.max");
    std::uint64_t bytes = 0;
    return limit >> bytes ? bytes : 0;  // "max": none
  }
  return 0;
}

// Says where STMUX_MAX_CLIENTS and STMUX_SLOTS ask for more than the
// process may have: each client holds two descriptors and a shared segment
// whose pages count against the daemon's memory. Past the descriptors,
// tenants' attaches time out and their calls run directly; past the memory,
// the kernel kills the daemon under every tenant.
void warnOfLimits(const Config& config) {
  const auto clients = static_cast<std::uint64_t>(config.max_clients);
  if (rlimit files{}; ::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY &&
                      2 * clients + 64 > files.rlim_cur) {
    STMUX_WARN(kConfig,
               "STMUX_MAX_CLIENTS={} needs about {} file descriptors (2 a client), but the limit "
               "is {} (LimitNOFILE=): tenants past about {} clients will run directly",
               clients, 2 * clients + 64, static_cast<std::uint64_t>(files.rlim_cur),
               files.rlim_cur > 64 ? (files.rlim_cur - 64) / 2 : 0);
  }
  const std::uint64_t segment =
      SegmentLayout::compute(static_cast<std::uint32_t>(config.slots)).total_bytes;
  if (const std::uint64_t limit = cgroupMemoryLimit(); limit != 0 && segment * clients > limit) {
    STMUX_WARN(kConfig,
               "STMUX_SLOTS={} makes each client's segment {} KiB: STMUX_MAX_CLIENTS={} of them "
               "need {} MiB, more than the memory limit of {} MiB (MemoryMax=)",
               config.slots, segment >> 10, clients, (segment * clients) >> 20, limit >> 20);
  }
}

// The tenants' places on MPS (stmux/mps_seats.h): STMUX_MPS_CLIENTS less
// stmuxd's own where it is a client. Not fatal: without them a tenant beyond
// MPS's limit cannot start CUDA at all, as without stmux.
void keepMpsSeats(const Config& config, const std::vector<GpuInfo>& gpus) {
  const std::string directory = mpsSeatsDirectory(config.socket);
  if (config.mps_clients == 0) {
    if (Status status = removeMpsSeats(directory); !status.ok()) {
      STMUX_WARN(kDaemon, "STMUX_MPS_CLIENTS=0, but {}", status.message());
    }
    return;
  }
  const bool on_mps =
      std::any_of(gpus.begin(), gpus.end(), [](const GpuInfo& gpu) { return gpu.mps; });
  const long seats = std::max<long>(0, config.mps_clients - (on_mps ? 1 : 0));
  if (Status status = prepareMpsSeats(directory, seats,
                                      mpsPipeDirectory(std::getenv("CUDA_MPS_PIPE_DIRECTORY")));
      !status.ok()) {
    STMUX_WARN(kDaemon,
               "cannot keep the tenants' places on MPS: {}; a tenant beyond MPS's limit of "
               "clients will not start CUDA at all",
               status.message());
    return;
  }
  STMUX_INFO(kDaemon, "keeping {} places on MPS for tenants in {} (STMUX_MPS_CLIENTS={}{})", seats,
             directory, config.mps_clients, on_mps ? ", less stmuxd's own" : "");
}

Result<std::vector<GpuInfo>> selectGpus(const std::vector<std::string>& wanted) {
  auto gpus = listGpus();
  if (!gpus) return gpus;
  return chooseGpus(gpus.value(), wanted);
}

int run(int argc, char** argv) {
  auto flags = parseFlags(argc, argv);
  if (!flags) {
    std::fprintf(stderr, "stmuxd: %s\n", flags.message().c_str());
    return 2;
  }
  if (flags->help) {
    usage(stdout);
    return 0;
  }
  if (flags->version) {
    std::printf("stmuxd %s (protocol %u)\n", kVersion, kProtocolVersion);
    return 0;
  }
  const Lookup environment = environmentLookup();
  const Lookup lookup = [&](std::string_view name) -> std::optional<std::string> {
    auto it = flags->values.find(name);
    if (it != flags->values.end()) return it->second;
    return environment(name);
  };
  auto config = parseConfig(lookup, Scope::kDaemon);
  if (!config) {
    // One line, so that whoever keeps the first line of what it said (a
    // benchmark's note, systemd's status) keeps the reason.
    std::string reasons = nameTheFlags(config.message(), flags.value());
    for (std::size_t at = reasons.find('\n'); at != std::string::npos; at = reasons.find('\n', at))
      reasons.replace(at, 1, "; ");
    std::fprintf(stderr, "stmuxd: invalid configuration: %s\n", reasons.c_str());
    return 2;
  }
  setLogSpec(config->log);
  // Each tenant's own environment sets the precision its cuBLAS computes at
  // (the shim runs such calls directly: stmux/precision.h); the daemon's must
  // not set it for all of them. cuBLAS, loaded with stmuxd, may have read it
  // already: cleared, stmuxd starts again (the same process, arguments and
  // settings), so that no library of it ever sees it.
  bool cleared = false;
  for (const char* name : kCallerPrecisionVariables) {
    if (const char* value = std::getenv(name); value != nullptr) {
      STMUX_WARN(kConfig, "{}={} is ignored: each tenant's own environment sets its precision",
                 name, value);
      ::unsetenv(name);
      cleared = true;
    }
  }
  if (cleared) {
    ::execv("/proc/self/exe", argv);
    STMUX_WARN(kConfig, "cannot start stmuxd again without them ({}); cuBLAS may have read them",
               std::strerror(errno));
  }
  for (const std::string& name : unknownVariables(environ)) {
    STMUX_WARN(kConfig, "{} is not a stmux variable; it is ignored (see stmuxd --help)", name);
  }
  for (const std::string& name : variablesReadElsewhere(environ, Scope::kDaemon)) {
    STMUX_WARN(kConfig,
               "{} is read by libstmux.so in each tenant, not by stmuxd; set it in the tenants' "
               "environment, next to LD_PRELOAD",
               name);
  }

  if (flags->print_config) {
    std::printf(
        "# stmuxd configuration: flags override the environment, which overrides "
        "the defaults\n");
    for (const VarInfo& var : kVars) {
      if (!daemonReads(var)) continue;
      const std::string name(var.name);
      const char* source = flags->values.count(name) != 0 ? "flag"
                           : environment(name)            ? "environment"
                                                          : "default";
      // Comments on lines of their own: an environment file (systemd's
      // EnvironmentFile=, docker --env-file) has no comment after a value.
      std::printf("# %s (%s): %s\n%s=%s\n", name.c_str(), source, std::string(var.help).c_str(),
                  name.c_str(), formatValue(config.value(), var.member).c_str());
    }
    return 0;
  }

  warnOfLimits(config.value());
  if (!config->metrics_file.empty()) {
    // Its writer replaces the file by a rename: at the socket's path it
    // would take the socket's name away from the tenants.
    if (config->metrics_file == config->socket) {
      std::fprintf(stderr,
                   "stmuxd: STMUX_METRICS_FILE and STMUX_SOCKET are both %s; the metrics file "
                   "needs a path of its own\n",
                   config->socket.c_str());
      return 2;
    }
    if (Status status = MetricsFile::check(config->metrics_file); !status.ok()) {
      std::fprintf(stderr, "stmuxd: STMUX_METRICS_FILE: %s\n", status.message().c_str());
      return 1;
    }
  }

  auto gpus = selectGpus(config->devices);
  if (!gpus) {
    std::fprintf(stderr, "stmuxd: %s\n", gpus.message().c_str());
    return 1;
  }

  // One channel and one executor per GPU; the scheduler sleeps on wake_fd,
  // which the executors ring.
  UniqueFd wake_fd = Scheduler::makeWakeFd();
  std::vector<std::unique_ptr<ExecutorChannel>> channels;
  std::vector<std::unique_ptr<Executor>> executors;
  std::vector<ExecutorChannel*> channel_ptrs;
  BatcherOptions batcher;
  batcher.window_ns = static_cast<std::uint64_t>(config->window_us) * 1000;
  batcher.max_batch = static_cast<std::uint32_t>(config->max_batch);
  batcher.active_ns = static_cast<std::uint64_t>(config->active_us) * 1000;
  const LaunchMode launch = config->launch == "batched"   ? LaunchMode::kBatched
                            : config->launch == "grouped" ? LaunchMode::kGrouped
                                                          : LaunchMode::kAuto;
  for (const GpuInfo& gpu : gpus.value()) {
    channels.push_back(std::make_unique<ExecutorChannel>(wake_fd.get()));
    channel_ptrs.push_back(channels.back().get());
    ExecutorOptions options;
    options.device = gpu.index;
    options.max_batch = batcher.max_batch;
    options.max_in_flight = batcher.max_in_flight;
    options.max_mappings = static_cast<std::size_t>(config->max_mappings);
    options.spin_ns = static_cast<std::uint64_t>(config->daemon_spin_us) * 1000;
    options.wakers = static_cast<unsigned>(config->daemon_wakers);
    options.launch = launch;
    options.launch_graphs = config->launch_graphs;
    executors.push_back(std::make_unique<Executor>(options, *channels.back()));
    if (Status status = executors.back()->start(); !status.ok()) {
      std::fprintf(stderr, "stmuxd: GPU %d (%s): %s\n", gpu.index, formatUuid(gpu.uuid).c_str(),
                   status.message().c_str());
      return 1;
    }
    STMUX_INFO(kDaemon, "serving GPU {}: {} {}", gpu.index, gpu.name, formatUuid(gpu.uuid));
  }
  Scheduler scheduler(batcher, gpus.value(), channel_ptrs,
                      static_cast<std::size_t>(config->max_mappings));
  scheduler.adoptWakeFd(std::move(wake_fd));

  ServerOptions server_options;
  server_options.socket_path = config->socket;
  server_options.slots = static_cast<std::uint32_t>(config->slots);
  server_options.max_clients = static_cast<std::uint32_t>(config->max_clients);
  server_options.max_clients_per_uid = static_cast<std::uint32_t>(config->max_clients_per_uid);
  server_options.spin_ns = static_cast<std::uint64_t>(config->daemon_spin_us) * 1000;
  server_options.spinning_tenants = static_cast<std::uint32_t>(config->spinning_tenants);
  for (const GpuInfo& gpu : gpus.value()) {
    server_options.devices.push_back(gpu.uuid);
    server_options.device_mps.push_back(gpu.mps ? 1 : 0);
  }
  std::unique_ptr<MetricsFile> metrics;
  if (!config->metrics_file.empty()) {
    metrics = std::make_unique<MetricsFile>(config->metrics_file);
    server_options.metrics_period_ns = 1'000'000'000;
    server_options.publish_metrics = [&metrics](std::string text) {
      metrics->publish(std::move(text));
    };
    STMUX_INFO(kDaemon, "writing metrics to {} once a second", config->metrics_file);
  }
  // Told as the drain begins, not once it is done: systemd then shows the
  // service stopping while it refuses new tenants.
  server_options.on_drain = [] { notifySystemd("STOPPING=1"); };
  Server server(server_options, scheduler);
  if (Status status = server.listen(); !status.ok()) {
    std::fprintf(stderr, "stmuxd: %s\n", status.message().c_str());
    return 1;
  }
  // Once the socket is this daemon's: the places beside another's are its.
  keepMpsSeats(config.value(), gpus.value());

  gServer = &server;
  struct sigaction action {};
  action.sa_handler = onSignal;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGTERM, &action, nullptr);
  ::sigaction(SIGINT, &action, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  STMUX_WARN(kDaemon, "stmuxd {} ready on {} with {} GPU(s), window {} us, max batch {}", kVersion,
             config->socket, gpus->size(), config->window_us, config->max_batch);
  notifySystemd("READY=1");
  server.run();
  gServer = nullptr;
  for (auto& executor : executors)
    executor->stop();
  if (metrics) {
    // No stale figures of a daemon that is gone: a collector reading the
    // file (node_exporter's textfile) drops them with it.
    metrics.reset();  // the last text written first
    ::unlink(config->metrics_file.c_str());
  }
  if (!server.failure().empty()) {
    // Restart=on-failure starts it again, once the MPS server takes clients.
    STMUX_ERROR(kDaemon, "stmuxd stopped: {}", server.failure());
    return 1;
  }
  STMUX_WARN(kDaemon, "stmuxd stopped");
  return 0;
}

}  // namespace
}  // namespace stmux::daemon

int main(int argc, char** argv) {
  return stmux::daemon::run(argc, argv);
}

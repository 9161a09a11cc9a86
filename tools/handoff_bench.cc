// stmux-handoff-bench: what it costs to hand GPU work from one process's
// stream to another's and back, the step a stream-ordered stmux makes for
// every call (issue 12): the daemon's batch must wait on the GPU for the
// tenant's prior work, and the tenant's stream for the batch.
//
// Two processes, forked before either touches CUDA: a "tenant" and a
// "daemon". A round is three small GPU steps (each a cudaMemsetAsync): the
// tenant's, then the daemon's, then the tenant's again, ordered one way per
// mechanism:
//   alone  the tenant runs all three on its own stream: the floor
//   host   each side synchronizes its stream and tells the other through
//          shared memory (what host mode does)
//   event  interprocess events: the daemon's stream waits for the tenant's
//          event, the tenant's for the daemon's; the host only passes the
//          round number, and the tenant must learn that the daemon recorded
//          before it can wait (an event wait takes the latest record)
//   memop  stream memory operations on host memory both processes map:
//          cuStreamWriteValue32 after a step, cuStreamWaitValue32 before the
//          next; the tenant queues its wait at once and never waits on the
//          host for the daemon
//   hostfn a host function on the tenant's stream (cudaLaunchHostFunc) asks
//          the daemon and waits on the host for its answer, as host does,
//          but on CUDA's thread: the tenant's own thread queues its next
//          step at once, and no stream waits on the GPU for a word
// The tenant times each round from its first step to the end of a
// synchronize after its last (a closed loop, as a program's step is).
// Whether the contexts are on MPS is the environment's doing; it is printed.
//
// --waiters N adds N more processes whose streams wait on the GPU through
// the whole run, as the streams of N stream-ordered tenants waiting for
// their batch do, each with a step queued behind its wait; --wait-on says
// on what: a stream memory operation on a word in host memory (what
// stream-ordered mode does) or in device memory, a one-thread kernel
// polling a word in host memory, or a host function that returns when the
// word is set; or, for comparison, nothing (N more MPS clients with idle
// streams). What they cost the two processes above is the question.
#include <getopt.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "stmux/json.h"
#include "stmux/sys.h"
#include "tools/args.h"
#include "tools/cuda_exit.h"
#include "tools/latency.h"
#include "tools/spin_wait_fatbin.h"  // generated: stmux_spin_wait_fatbin

namespace {

using stmux::nowNs;
using stmux::tools::wholeIn;

enum class Mechanism { kAlone, kHost, kEvent, kMemop, kHostFn };
constexpr const char* kNames[] = {"alone", "host", "event", "memop", "hostfn"};

enum class WaitOn { kNothing, kHostWord, kDeviceWord, kKernel, kHostFn };
constexpr const char* kWaitOnNames[] = {"none", "host", "device", "kernel", "hostfn"};

struct Options {
  std::vector<Mechanism> mechanisms = {Mechanism::kAlone, Mechanism::kHost, Mechanism::kEvent,
                                       Mechanism::kMemop, Mechanism::kHostFn};
  int rounds = 5000;
  int warmup = 500;
  std::size_t bytes = 4096;  // each step's memset
  int waiters = 0;
  WaitOn wait_on = WaitOn::kHostWord;
  std::string json;
};

constexpr int kMostWaiters = 64;

// Shared by the two processes (mapped before the fork). The round numbers
// pass on the host; the handles are written by each side before it says so.
struct Shared {
  std::atomic<std::uint32_t> mechanism;
  std::atomic<std::uint32_t> requested;  // tenant: the round whose step 2 it wants
  std::atomic<std::uint32_t> answered;   // daemon: the round whose step 2 is queued (or done)
  std::atomic<std::uint32_t> daemon_ready;
  std::atomic<std::uint32_t> tenant_ready;
  std::atomic<std::uint32_t> start;  // the tenant found a device: the daemon may begin
  std::atomic<std::uint32_t> stop;
  std::atomic<std::uint32_t> waiters_up;      // waiters whose streams wait
  std::atomic<std::uint32_t> waiters_failed;  // waiters that could not set up
  cudaIpcEventHandle_t tenant_event;
  cudaIpcEventHandle_t daemon_event;
};

// The page both processes register with CUDA for memop: one word each way,
// on separate cache lines.
struct Flags {
  std::uint32_t to_daemon;
  std::uint32_t pad1[15];
  std::uint32_t to_tenant;
  std::uint32_t pad2[15];
  struct {
    std::uint32_t word;  // a waiter's stream waits for it to reach 1
    std::uint32_t pad[15];
  } waiter[kMostWaiters];
};
constexpr std::size_t kFlagsBytes = 8192;  // mapped and registered whole
static_assert(sizeof(Flags) <= kFlagsBytes);

using WaitValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

#define EXIT_ON_DRIVER_ERROR(call)                                              \
  do {                                                                          \
    if (const CUresult driver_error_ = (call); driver_error_ != CUDA_SUCCESS) { \
      std::fprintf(stderr, "stmux-handoff-bench: %s failed: %d\n", #call,       \
                   static_cast<int>(driver_error_));                            \
      std::exit(3);                                                             \
    }                                                                           \
  } while (0)

// Whether the other process is still there: the tenant asks about its child
// (a dead child stays a zombie, which kill() would still find), the daemon
// about its parent.
bool otherAlive(pid_t daemon) {
  if (daemon > 0) return ::waitpid(daemon, nullptr, WNOHANG) == 0;
  return ::getppid() != 1;
}

// Spins until `word` reaches `value`; false if the other process died or
// nothing came within 10 s, so that nothing hangs. `daemon`: the tenant's
// child, or 0 in the daemon.
bool awaitValue(const std::atomic<std::uint32_t>& word, std::uint32_t value, pid_t daemon) {
  const std::uint64_t give_up = nowNs() + 10'000'000'000ull;
  for (std::uint32_t spins = 0; word.load(std::memory_order_acquire) < value; ++spins) {
    if ((spins & 0xfff) == 0 && (nowNs() > give_up || !otherAlive(daemon))) return false;
  }
  return true;
}

struct Side {
  cudaStream_t stream = nullptr;
  void* buffer = nullptr;
  std::size_t bytes = 0;
  cudaEvent_t own_event = nullptr;    // recorded by this side
  cudaEvent_t other_event = nullptr;  // the other side's, opened
  CUdeviceptr to_daemon = 0, to_tenant = 0;
  WaitValue wait_value = nullptr;
  WriteValue write_value = nullptr;
};

void setUp(Side& side, const Options& o, Flags* flags) {
  EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&side.stream, cudaStreamNonBlocking));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&side.buffer, o.bytes));
  side.bytes = o.bytes;
  EXIT_ON_CUDA_ERROR(
      cudaEventCreateWithFlags(&side.own_event, cudaEventDisableTiming | cudaEventInterprocess));
  EXIT_ON_CUDA_ERROR(cudaHostRegister(flags, kFlagsBytes, cudaHostRegisterMapped));
  void* device = nullptr;
  EXIT_ON_CUDA_ERROR(cudaHostGetDevicePointer(&device, flags, 0));
  side.to_daemon = reinterpret_cast<CUdeviceptr>(device) + offsetof(Flags, to_daemon);
  side.to_tenant = reinterpret_cast<CUdeviceptr>(device) + offsetof(Flags, to_tenant);
  side.wait_value = driverFunction<WaitValue>("cuStreamWaitValue32", 12000);
  side.write_value = driverFunction<WriteValue>("cuStreamWriteValue32", 12000);
}

void step(const Side& side, std::uint32_t round) {
  EXIT_ON_CUDA_ERROR(
      cudaMemsetAsync(side.buffer, static_cast<int>(round & 0xff), side.bytes, side.stream));
}

// The daemon: answers rounds until told to stop.
int daemonLoop(Shared* shared, Flags* flags, const Options& o) {
  while (shared->start.load(std::memory_order_acquire) == 0) {
    if (shared->stop.load(std::memory_order_acquire) != 0 || ::getppid() == 1) return 0;
    ::usleep(1000);
  }
  Side side;
  setUp(side, o, flags);
  EXIT_ON_CUDA_ERROR(cudaIpcGetEventHandle(&shared->daemon_event, side.own_event));
  shared->daemon_ready.store(1, std::memory_order_release);
  if (!awaitValue(shared->tenant_ready, 1, 0)) return 1;
  EXIT_ON_CUDA_ERROR(cudaIpcOpenEventHandle(&side.other_event, shared->tenant_event));
  const auto cu_stream = reinterpret_cast<CUstream>(side.stream);
  for (std::uint32_t round = 1;; ++round) {
    while (shared->requested.load(std::memory_order_acquire) < round) {
      if (shared->stop.load(std::memory_order_acquire) != 0) return 0;
      if (::getppid() == 1) return 1;  // the tenant died
    }
    switch (static_cast<Mechanism>(shared->mechanism.load(std::memory_order_acquire))) {
      case Mechanism::kAlone:
        break;
      case Mechanism::kHost:
      case Mechanism::kHostFn:
        step(side, round);
        EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(side.stream));
        break;
      case Mechanism::kEvent:
        EXIT_ON_CUDA_ERROR(cudaStreamWaitEvent(side.stream, side.other_event, 0));
        step(side, round);
        EXIT_ON_CUDA_ERROR(cudaEventRecord(side.own_event, side.stream));
        break;
      case Mechanism::kMemop:
        EXIT_ON_DRIVER_ERROR(
            side.wait_value(cu_stream, side.to_daemon, round, CU_STREAM_WAIT_VALUE_GEQ));
        step(side, round);
        EXIT_ON_DRIVER_ERROR(side.write_value(cu_stream, side.to_tenant, round, 0));
        break;
    }
    shared->answered.store(round, std::memory_order_release);
  }
}

// A waiter's host function: returns once its word (host memory) is set.
// No CUDA call in it, as CUDA requires.
void CUDART_CB awaitWord(void* word) {
  while (std::atomic_ref<std::uint32_t>(*static_cast<std::uint32_t*>(word))
             .load(std::memory_order_acquire) == 0) {
    ::usleep(1000);
  }
}

// A waiter: its stream waits (on what --wait-on says) until the run ends,
// with a step queued behind the wait; then the waiter releases it itself, a
// host word with a store, a device word from a second stream.
int waiterLoop(Shared* shared, Flags* flags, const Options& o, int index) {
  while (shared->start.load(std::memory_order_acquire) == 0) {
    if (shared->stop.load(std::memory_order_acquire) != 0 || ::getppid() == 1) return 0;
    ::usleep(1000);
  }
  const auto failed = [&] {
    shared->waiters_failed.fetch_add(1, std::memory_order_acq_rel);
    return 3;
  };
  Side side;
  setUp(side, o, flags);
  std::uint32_t& host_word = flags->waiter[index].word;
  void* mapped = nullptr;
  if (cudaHostGetDevicePointer(&mapped, &host_word, 0) != cudaSuccess) return failed();
  const auto cu_stream = reinterpret_cast<CUstream>(side.stream);
  std::uint32_t* device_word = nullptr;
  cudaStream_t releaser = nullptr;
  switch (o.wait_on) {
    case WaitOn::kNothing:
      break;
    case WaitOn::kHostWord:
      if (side.wait_value(cu_stream, reinterpret_cast<CUdeviceptr>(mapped), 1,
                          CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS) {
        return failed();
      }
      break;
    case WaitOn::kDeviceWord:
      if (cudaMalloc(&device_word, sizeof(std::uint32_t)) != cudaSuccess ||
          cudaMemset(device_word, 0, sizeof(std::uint32_t)) != cudaSuccess ||
          cudaStreamCreateWithFlags(&releaser, cudaStreamNonBlocking) != cudaSuccess ||
          side.wait_value(cu_stream, reinterpret_cast<CUdeviceptr>(device_word), 1,
                          CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS) {
        return failed();
      }
      break;
    case WaitOn::kKernel: {
      cudaLibrary_t library = nullptr;
      cudaKernel_t kernel = nullptr;
      if (cudaLibraryLoadData(&library, stmux_spin_wait_fatbin, nullptr, nullptr, 0, nullptr,
                              nullptr, 0) != cudaSuccess ||
          cudaLibraryGetKernel(&kernel, library, "stmux_spin_until") != cudaSuccess) {
        return failed();
      }
      const unsigned value = 1;
      void* args[] = {&mapped, const_cast<unsigned*>(&value)};
      if (cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(1), dim3(1), args, 0,
                           side.stream) != cudaSuccess) {
        return failed();
      }
      break;
    }
    case WaitOn::kHostFn:
      if (cudaLaunchHostFunc(side.stream, awaitWord, &host_word) != cudaSuccess) return failed();
      break;
  }
  step(side, 1);
  shared->waiters_up.fetch_add(1, std::memory_order_acq_rel);
  while (shared->stop.load(std::memory_order_acquire) == 0) {
    if (::getppid() == 1) break;
    ::usleep(1000);
  }
  if (device_word != nullptr) {
    EXIT_ON_CUDA_ERROR(cudaMemsetAsync(device_word, 1, sizeof(std::uint32_t), releaser));
  } else {
    std::atomic_ref<std::uint32_t>(host_word).store(1, std::memory_order_release);
  }
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(side.stream));
  return 0;
}

struct Result {
  Mechanism mechanism;
  double rounds_per_s = 0, p50_us = 0, p99_us = 0;
};

// hostfn: what the tenant's host function does on CUDA's thread, once the
// stream reaches it: asks for the daemon's step and waits for it on the
// host (no CUDA call in it, as CUDA requires). A failure (the daemon gone)
// is left in `failed`, for the tenant's thread to see after its sync.
struct HostFnRound {
  Shared* shared;
  std::uint32_t round;
  pid_t daemon;
  std::atomic<bool> failed{false};
};

void CUDART_CB askDaemon(void* data) {
  auto* r = static_cast<HostFnRound*>(data);
  r->shared->requested.store(r->round, std::memory_order_release);
  if (!awaitValue(r->shared->answered, r->round, r->daemon)) r->failed = true;
}

// The tenant: each mechanism's rounds, timed. Round numbers keep rising
// across mechanisms, so the flags and events never go back.
bool tenantRun(Shared* shared, Flags* flags, const Options& o, pid_t daemon,
               std::vector<Result>& results) {
  Side side;
  setUp(side, o, flags);
  EXIT_ON_CUDA_ERROR(cudaIpcGetEventHandle(&shared->tenant_event, side.own_event));
  if (!awaitValue(shared->daemon_ready, 1, daemon)) return false;
  EXIT_ON_CUDA_ERROR(cudaIpcOpenEventHandle(&side.other_event, shared->daemon_event));
  for (const std::uint64_t give_up = nowNs() + 60'000'000'000ull;
       shared->waiters_up.load(std::memory_order_acquire) <
       static_cast<std::uint32_t>(o.waiters);) {
    if (shared->waiters_failed.load(std::memory_order_acquire) != 0 || nowNs() > give_up) {
      std::fprintf(stderr, "stmux-handoff-bench: %u of %d waiters set up (%u failed)\n",
                   shared->waiters_up.load(), o.waiters, shared->waiters_failed.load());
      return false;
    }
    ::usleep(1000);
  }
  shared->tenant_ready.store(1, std::memory_order_release);
  const auto cu_stream = reinterpret_cast<CUstream>(side.stream);
  std::uint32_t round = 0;
  HostFnRound hostfn{shared, 0, daemon};
  for (Mechanism mechanism : o.mechanisms) {
    shared->mechanism.store(static_cast<std::uint32_t>(mechanism), std::memory_order_release);
    std::vector<std::uint32_t> latencies;
    latencies.reserve(static_cast<std::size_t>(o.rounds));
    const std::uint64_t began = nowNs();
    std::uint64_t timed_from = began;
    for (int i = 0; i < o.warmup + o.rounds; ++i) {
      if (i == o.warmup) timed_from = nowNs();
      ++round;
      const std::uint64_t start = nowNs();
      step(side, round);
      switch (mechanism) {
        case Mechanism::kAlone:
          step(side, round);
          break;
        case Mechanism::kHost:
          EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(side.stream));
          shared->requested.store(round, std::memory_order_release);
          if (!awaitValue(shared->answered, round, daemon)) return false;
          break;
        case Mechanism::kEvent:
          EXIT_ON_CUDA_ERROR(cudaEventRecord(side.own_event, side.stream));
          shared->requested.store(round, std::memory_order_release);
          if (!awaitValue(shared->answered, round, daemon)) return false;
          EXIT_ON_CUDA_ERROR(cudaStreamWaitEvent(side.stream, side.other_event, 0));
          break;
        case Mechanism::kMemop:
          EXIT_ON_DRIVER_ERROR(side.write_value(cu_stream, side.to_daemon, round, 0));
          shared->requested.store(round, std::memory_order_release);
          EXIT_ON_DRIVER_ERROR(
              side.wait_value(cu_stream, side.to_tenant, round, CU_STREAM_WAIT_VALUE_GEQ));
          break;
        case Mechanism::kHostFn:
          // The previous round's function has run: its stream was synchronized.
          hostfn.round = round;
          EXIT_ON_CUDA_ERROR(cudaLaunchHostFunc(side.stream, askDaemon, &hostfn));
          break;
      }
      step(side, round);
      EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(side.stream));
      if (hostfn.failed) return false;
      const std::uint64_t took = nowNs() - start;
      if (i >= o.warmup) {
        latencies.push_back(static_cast<std::uint32_t>(std::min<std::uint64_t>(took, UINT32_MAX)));
      }
      // Untimed: the daemon answers every round, even one it had no part in,
      // so that both keep count.
      if (mechanism == Mechanism::kAlone) shared->requested.store(round, std::memory_order_release);
      if (!awaitValue(shared->answered, round, daemon)) return false;
    }
    const double seconds = static_cast<double>(nowNs() - timed_from) / 1e9;
    Result r{mechanism};
    r.rounds_per_s = static_cast<double>(o.rounds) / seconds;
    r.p50_us = stmux::tools::percentileUs(latencies, 0.50);
    r.p99_us = stmux::tools::percentileUs(latencies, 0.99);
    results.push_back(r);
    std::fprintf(stderr, "  %-6s %8.0f rounds/s, p50 %7.1f us, p99 %7.1f us\n",
                 kNames[static_cast<int>(mechanism)], r.rounds_per_s, r.p50_us, r.p99_us);
  }
  return true;
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: stmux-handoff-bench [--mechanisms LIST] [--rounds N] [--warmup N]\n"
               "                           [--waiters N] [--wait-on WHAT] [--json FILE]\n"
               "What it costs to hand GPU work from one process's stream to another's and\n"
               "back (a stream-ordered stmux's every call): a tenant process and a daemon\n"
               "process, rounds of three small GPU steps (tenant, daemon, tenant), ordered\n"
               "  alone  all three on the tenant's stream (the floor)\n"
               "  host   each side synchronizes and tells the other through shared memory\n"
               "  event  interprocess events waited on by the other's stream\n"
               "  memop  cuStreamWriteValue32 / cuStreamWaitValue32 on shared host memory\n"
               "  hostfn a host function on the tenant's stream asks the daemon and waits\n"
               "         on the host (cudaLaunchHostFunc)\n"
               "Prints rounds/s and p50/p99 round latency per mechanism. Run it with an MPS\n"
               "control daemon up and without to compare the two.\n"
               "  --mechanisms LIST  comma-separated, default alone,host,event,memop,hostfn\n"
               "  --rounds N         timed rounds per mechanism, default 5000\n"
               "  --warmup N         untimed rounds first, default 500\n"
               "  --waiters N        N more processes (0 to 64, default 0) whose streams wait\n"
               "                     on the GPU through the whole run, as stream-ordered\n"
               "                     tenants' streams wait for their batch\n"
               "  --wait-on WHAT     what the waiters wait on: host (a stream memory operation\n"
               "                     on a word in host memory, as stream-ordered mode does;\n"
               "                     the default), device (the same on a word in device\n"
               "                     memory), kernel (a one-thread kernel polling a word in\n"
               "                     host memory) or hostfn (a host function returning once\n"
               "                     a word is set), or none (idle streams, for comparison)\n"
               "  --json FILE        the results as JSON too\n"
               "Needs a CUDA device. Exit status: 0 done, 2 bad usage, 3 CUDA error,\n"
               "1 the other process died or stopped answering.\n");
}

bool parse(int argc, char** argv, Options& o) {
  static const option kLong[] = {{"mechanisms", required_argument, nullptr, 'm'},
                                 {"rounds", required_argument, nullptr, 'r'},
                                 {"warmup", required_argument, nullptr, 'w'},
                                 {"json", required_argument, nullptr, 'j'},
                                 {"waiters", required_argument, nullptr, 'n'},
                                 {"wait-on", required_argument, nullptr, 'o'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'm': {
        o.mechanisms.clear();
        std::string list = optarg;
        for (std::size_t at = 0; at <= list.size();) {
          const std::size_t comma = std::min(list.find(',', at), list.size());
          const std::string name = list.substr(at, comma - at);
          const auto found = std::find(std::begin(kNames), std::end(kNames), name);
          if (found == std::end(kNames)) {
            std::fprintf(stderr,
                         "stmux-handoff-bench: --mechanisms '%s': accepted: a comma-separated "
                         "list of alone, host, event, memop, hostfn\n",
                         optarg);
            return false;
          }
          o.mechanisms.push_back(static_cast<Mechanism>(found - std::begin(kNames)));
          at = comma + 1;
        }
        break;
      }
      case 'r':
      case 'w': {
        const int least = c == 'r' ? 1 : 0;
        const auto value = wholeIn(optarg, least, 10'000'000);
        if (!value) {
          std::fprintf(stderr, "stmux-handoff-bench: %s '%s': accepted: %d to 10000000\n",
                       c == 'r' ? "--rounds" : "--warmup", optarg, least);
          return false;
        }
        (c == 'r' ? o.rounds : o.warmup) = *value;
        break;
      }
      case 'j':
        o.json = optarg;
        break;
      case 'n': {
        const auto value = wholeIn(optarg, 0, kMostWaiters);
        if (!value) {
          std::fprintf(stderr, "stmux-handoff-bench: --waiters '%s': accepted: 0 to %d\n", optarg,
                       kMostWaiters);
          return false;
        }
        o.waiters = *value;
        break;
      }
      case 'o': {
        const auto found =
            std::find_if(std::begin(kWaitOnNames), std::end(kWaitOnNames),
                         [](const char* name) { return std::strcmp(name, optarg) == 0; });
        if (found == std::end(kWaitOnNames)) {
          std::fprintf(
              stderr,
              "stmux-handoff-bench: --wait-on '%s': accepted: none, host, device, kernel, hostfn\n",
              optarg);
          return false;
        }
        o.wait_on = static_cast<WaitOn>(found - std::begin(kWaitOnNames));
        break;
      }
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        return false;
    }
  }
  if (optind != argc) {
    std::fprintf(stderr, "stmux-handoff-bench: unexpected argument '%s'\n", argv[optind]);
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, o)) {
    std::fprintf(stderr, "see stmux-handoff-bench --help\n");
    return 2;
  }
  // Opened before the run, so that a path it cannot write costs no run.
  std::ofstream json_file;
  if (!o.json.empty()) {
    json_file.open(o.json);
    if (!json_file) {
      std::fprintf(stderr, "stmux-handoff-bench: cannot write %s (--json): %s\n", o.json.c_str(),
                   std::strerror(errno));
      return 2;
    }
  }
  // Both before CUDA: the shared block and the registered page.
  auto* shared = static_cast<Shared*>(
      ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  auto* flags = static_cast<Flags*>(
      ::mmap(nullptr, kFlagsBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (shared == MAP_FAILED || flags == MAP_FAILED) {
    std::perror("stmux-handoff-bench: mmap");
    return 3;
  }
  new (shared) Shared{};
  new (flags) Flags{};
  const pid_t daemon = ::fork();
  if (daemon < 0) {
    std::perror("stmux-handoff-bench: fork");
    return 3;
  }
  if (daemon == 0) ::_exit(daemonLoop(shared, flags, o));
  std::vector<pid_t> waiters;
  for (int i = 0; i < o.waiters; ++i) {
    const pid_t waiter = ::fork();
    if (waiter < 0) {
      std::perror("stmux-handoff-bench: fork");
      shared->stop.store(1, std::memory_order_release);
      return 3;
    }
    if (waiter == 0) ::_exit(waiterLoop(shared, flags, o, i));
    waiters.push_back(waiter);
  }

  if (reportedNoDevice()) {
    shared->stop.store(1, std::memory_order_release);
    ::waitpid(daemon, nullptr, 0);
    return 3;
  }
  shared->start.store(1, std::memory_order_release);
  int mps = 0;
  EXIT_ON_CUDA_ERROR(cudaDeviceGetAttribute(&mps, cudaDevAttrMpsEnabled, 0));
  cudaDeviceProp prop{};
  EXIT_ON_CUDA_ERROR(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr,
               "stmux-handoff-bench: %s, MPS %s; %d rounds per mechanism; %d waiters on %s\n",
               prop.name, mps ? "yes" : "no", o.rounds, o.waiters,
               kWaitOnNames[static_cast<int>(o.wait_on)]);
  std::vector<Result> results;
  const bool ok = tenantRun(shared, flags, o, daemon, results);
  shared->stop.store(1, std::memory_order_release);
  int status = 0;
  ::waitpid(daemon, &status, 0);
  bool waiters_ok = true;
  for (const pid_t waiter : waiters) {
    int waiter_status = 0;
    ::waitpid(waiter, &waiter_status, 0);
    waiters_ok = waiters_ok && WIFEXITED(waiter_status) && WEXITSTATUS(waiter_status) == 0;
  }
  if (!waiters_ok) std::fprintf(stderr, "stmux-handoff-bench: a waiter failed\n");
  if (!ok) {
    std::fprintf(stderr, "stmux-handoff-bench: the daemon process died or stopped answering\n");
    return 1;
  }
  const double alone = results.front().mechanism == Mechanism::kAlone ? results.front().p50_us : 0;
  std::printf("%-8s %12s %10s %10s %14s\n", "handoff", "rounds/s", "p50 us", "p99 us",
              "p50 - alone");
  for (const Result& r : results) {
    std::printf("%-8s %12.0f %10.1f %10.1f %14s\n", kNames[static_cast<int>(r.mechanism)],
                r.rounds_per_s, r.p50_us, r.p99_us,
                alone > 0 ? std::to_string(static_cast<int>(r.p50_us - alone)).c_str() : "-");
  }
  if (!o.json.empty()) {
    stmux::Json json;
    json["device"] = std::string(prop.name);
    json["mps"] = mps != 0;
    json["rounds"] = o.rounds;
    json["bytes_per_step"] = o.bytes;
    json["waiters"] = o.waiters;
    json["wait_on"] = kWaitOnNames[static_cast<int>(o.wait_on)];
    stmux::Json& rows = json["results"] = stmux::Json::array();
    for (const Result& r : results) {
      stmux::Json& row = rows.emplace_back();
      row["mechanism"] = kNames[static_cast<int>(r.mechanism)];
      row["rounds_per_s"] = r.rounds_per_s;
      row["p50_us"] = r.p50_us;
      row["p99_us"] = r.p99_us;
    }
    json_file << stmux::dumpJson(json) << "\n";
    json_file.close();
    if (!json_file) {
      std::fprintf(stderr, "stmux-handoff-bench: cannot write %s (--json)\n", o.json.c_str());
      return 1;
    }
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 && waiters_ok ? 0 : 1;
}

#include "shim/intercept.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "shim/allocations.h"
#include "shim/background.h"
#include "shim/driver.h"
#include "shim/mps_steer.h"
#include "shim/real.h"
#include "shim/route.h"
#include "shim/stream_order.h"
#include "shim/sync_policy.h"
#include "shim/transport.h"
#include "stmux/config.h"
#include "stmux/cublas_wire.h"
#include "stmux/gemm.h"
#include "stmux/log.h"
#include "stmux/precision.h"
#include "stmux/sys.h"

extern char** environ;

namespace stmux::shim {
static_assert(kTensorOpMathMode == CUBLAS_TENSOR_OP_MATH &&
              kPedanticMathMode == CUBLAS_PEDANTIC_MATH &&
              kTf32MathMode == CUBLAS_TF32_TENSOR_OP_MATH &&
              kMathModeFlags == (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION |
                                 CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH) &&
              kDefaultEmulation == CUBLAS_EMULATION_STRATEGY_DEFAULT &&
              kLastMathMode == CUBLAS_FP32_EMULATED_BF16X9_MATH &&
              kLastEmulation == CUBLAS_EMULATION_STRATEGY_EAGER);
static_assert(kSchedAuto == CU_CTX_SCHED_AUTO && kSchedSpin == CU_CTX_SCHED_SPIN &&
              kSchedYield == CU_CTX_SCHED_YIELD && kSchedBlocking == CU_CTX_SCHED_BLOCKING_SYNC &&
              kSchedMask == CU_CTX_SCHED_MASK);
namespace {

// How often the sweeper thread asks the driver which exported allocations
// were freed (one driver query per cached allocation): the longest a freed
// allocation stays mapped in the daemon while its owner is idle.
constexpr auto kSweepInterval = std::chrono::seconds(1);
// A connection unused for this long is checked for life before a call, so a
// daemon that died between calls costs no waiting.
constexpr std::uint64_t kIdleCheckNs = 50'000'000;
// The first wait between attach attempts; it doubles to STMUX_RECONNECT_MS.
constexpr std::uint64_t kFirstBackoffNs = 10'000'000;
// A stopped daemon's back-off doubles up to 2^(this - 1) times the timeout.
constexpr std::uint32_t kMostStallDoublings = 7;
// How long an attach waits for the daemon's welcome (and for it to take the
// connection), at most STMUX_TIMEOUT_MS: the process's first attempt, which
// other threads' first calls wait for, and the attempts after it, made by one
// calling thread while the others run directly. A daemon that answers a
// retry in none of this time is taken for stopped or stuck; the next try
// comes at least 9 times the attempt (up to a retry's timeout) later, so
// that such a daemon holds the attaching thread for a tenth of its time (it
// held every thread for half of it, all of it at STMUX_RECONNECT_MS=10).
constexpr std::uint64_t kWelcomeTimeoutNs = 1'000'000'000;
constexpr std::uint64_t kRetryWelcomeTimeoutNs = 100'000'000;
constexpr std::uint64_t kRetryPauseFactor = 9;
constexpr int kMaxDevices = 64;
// How long the exit handler waits for stream-ordered calls still in flight,
// so that the counters it prints account for them.
constexpr std::uint64_t kExitSettleNs = 2'000'000'000;
// How long a call the daemon started waits, after the daemon hung up, for
// its process to end (at least; STMUX_TIMEOUT_MS where that is longer): the
// driver's teardown of a context with many GiB mapped takes a while, and a
// low timeout, chosen for quick fallbacks, must not fail such calls.
constexpr std::uint64_t kDaemonEndWaitNs = 10'000'000'000;

class Shim {
 public:
  // Made by the first call, never destroyed: threads may still be inside a
  // call while the process exits. Not a function's static: a fork() while
  // another thread makes it would leave the child's copy of its guard
  // taken for ever (forkPrepare() waits on create_mutex_ instead).
  static Shim& get() {
    if (Shim* shim = instance_.load(std::memory_order_acquire)) return *shim;
    std::lock_guard lock(create_mutex_);
    if (Shim* shim = instance_.load(std::memory_order_relaxed)) return *shim;
    Shim* shim = new Shim();
    instance_.store(shim, std::memory_order_release);
    return *shim;
  }
  // As the library loads, before any thread could be making the Shim.
  static void registerForkHandlers() {
    pthread_atfork(&Shim::forkPrepare, &Shim::forkParent, &Shim::forkChild);
  }

  cublasStatus_t call(const Gemm& gemm, DirectCall direct);

 private:
  Shim();
  // The live connection, attaching if it is time to try; null with `why`.
  std::shared_ptr<Connection> connection(Fallback& why);
  void drop(const std::shared_ptr<Connection>& connection, const char* why);
  cublasStatus_t fallback(Fallback reason, EntryPoint entry, DirectCall direct,
                          Connection* connection);
  void countDirect(Fallback reason, EntryPoint entry, Connection* connection);
  void countServed(EntryPoint entry, Connection& connection);
  void account(Connection& connection, const StreamOutcome& outcome);
  cublasStatus_t finish(std::int32_t status, float beta, EntryPoint entry, DirectCall direct,
                        Connection& connection);
  cublasStatus_t failed(EntryPoint entry, Connection* connection);
  // A device as the shim needs it: its UUID (what the daemon names it by) and
  // whether this process's context on it is on MPS.
  struct DeviceInfo {
    Uuid uuid;
    bool mps = false;
  };
  std::optional<DeviceInfo> deviceInfo(int device);
  // Sets the context's scheduling flag for a call `served` by the daemon or not.
  SyncChoice applySync(const Connection& connection, bool served);
  Route chooseRoute(Connection& connection);
  Route followFleet(Connection& connection);
  bool streamOrdered(Connection& connection);
  CUresult waitForPriorWork(CUstream stream);
  void printCounters();
  void startSweeper();
  void sweepLoop();
  void releaseGone(Connection& connection);
  void atExit();

  static void forkPrepare();
  static void forkParent();
  static void forkChild();

  static inline std::atomic<Shim*> instance_{nullptr};
  static inline std::mutex create_mutex_;  // held while the Shim is made, and across fork()

  bool config_ok_ = false;
  Config config_;
  const RealCublas& real_;
  const Driver* driver_ = nullptr;
  std::string name_;

  std::mutex connection_mutex_;
  std::condition_variable attached_cv_;  // signalled when an attach attempt ends
  bool attaching_ = false;               // under connection_mutex_: one thread attaches
  bool attempted_ = false;               // under connection_mutex_: an attach has ended
  std::shared_ptr<Connection> connection_;
  std::uint64_t next_attempt_ns_ = 0;
  std::uint64_t backoff_ns_ = kFirstBackoffNs;
  // Connections dropped in a row because the daemon started no call in
  // STMUX_TIMEOUT_MS (a stopped daemon); reset by a call it served.
  std::atomic<std::uint32_t> stalls_{0};
  std::uint64_t last_use_ns_ = 0;
  bool warned_absent_ = false;
  std::string last_failure_;

  AllocationCache allocations_;
  bool sweeper_started_ = false;  // under connection_mutex_
  std::mutex sweep_mutex_;        // held while a sweep runs
  bool stopping_ = false;         // under sweep_mutex_: the process is exiting
  std::mutex device_mutex_;
  std::optional<DeviceInfo> devices_[kMaxDevices];
  std::mutex route_mutex_;
  bool route_auto_ = false;  // STMUX_ROUTE=auto
  RouteChooser chooser_;     // under route_mutex_
  std::atomic<bool> said_direct_{false};
  std::unique_ptr<StreamOrder> stream_;  // null when there is no driver
  SyncMode sync_mode_ = SyncMode::kAuto;
  CallerPrecision precision_;  // what the process's environment does to cuBLAS's precision
  unsigned cores_ = 1;         // the CPUs this process may run on, at start
  std::mutex sync_mutex_;
  // The contexts whose scheduling flag the shim set, and to what; under
  // sync_mutex_.
  std::vector<std::pair<ContextId, unsigned>> synced_;

  std::atomic<std::uint64_t> calls_{0};
  std::atomic<std::uint64_t> forwarded_{0};
  std::atomic<std::uint64_t> stream_served_{0};  // of forwarded_
  // Host-mode calls served, and their summed waits for the caller's earlier
  // work and for seeing the daemon's answer once published.
  std::atomic<std::uint64_t> timed_calls_{0};
  std::atomic<std::uint64_t> prior_wait_ns_{0};
  std::atomic<std::uint64_t> completion_ns_{0};
  std::atomic<std::uint64_t> failed_{0};
  std::atomic<std::uint64_t> fallbacks_[kFallbackCount] = {};
  // The same by entry point: calls, served, failed, direct (any reason).
  std::atomic<std::uint64_t> entry_calls_[kEntryPointCount] = {};
  std::atomic<std::uint64_t> entry_served_[kEntryPointCount] = {};
  std::atomic<std::uint64_t> entry_failed_[kEntryPointCount] = {};
  std::atomic<std::uint64_t> entry_direct_[kEntryPointCount] = {};
  std::atomic<std::uint64_t> next_request_id_{1};
};

Shim::Shim() : real_(realCublas()) {
  std::string errors;
  config_ = parseEachVariable(environmentLookup(), Scope::kShim, errors);
  config_ok_ = errors.empty();
  setLogSpec(config_.log);
  if (!config_ok_) {
    STMUX_ERROR(kConfig, "invalid configuration, every call goes straight to cuBLAS:\n{}", errors);
  }
  for (const std::string& name : unknownVariables(environ)) {
    STMUX_WARN(kConfig, "{} is not a stmux variable; it is ignored", name);
  }
  for (const std::string& name : variablesReadElsewhere(environ, Scope::kShim)) {
    STMUX_WARN(kConfig,
               "{} is read by stmuxd, not by libstmux.so; set in a tenant it changes "
               "nothing",
               name);
  }
  if (config_ok_ && !config_.disable) driver_ = cudaDriver();
  if (driver_ != nullptr && config_.mode == "stream") {
    stream_ = std::make_unique<StreamOrder>(
        *driver_, static_cast<std::uint64_t>(config_.timeout_ms) * 1'000'000,
        config_.stream_wait == "kernel" ? StreamWait::kKernel : StreamWait::kMemop,
        [this](Connection& connection, const StreamOutcome& outcome) {
          account(connection, outcome);
        });
  }
  route_auto_ = config_.route == "auto";
  precision_ = CallerPrecision::of(environmentLookup());
  sync_mode_ = parseSyncMode(config_.sync).value_or(SyncMode::kKeep);
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) cores_ = std::max(1, CPU_COUNT(&cpus));
  name_ = program_invocation_short_name;
  std::atexit([] { Shim::get().atExit(); });
}

void Shim::countDirect(Fallback reason, EntryPoint entry, Connection* connection) {
  const auto index = static_cast<std::size_t>(reason);
  fallbacks_[index].fetch_add(1, std::memory_order_relaxed);
  entry_direct_[static_cast<std::size_t>(entry)].fetch_add(1, std::memory_order_relaxed);
  if (connection != nullptr) {
    connection->counters().entry[static_cast<std::size_t>(entry)].fallback[index].fetch_add(
        1, std::memory_order_relaxed);
  }
  STMUX_TRACE(kShim, "direct ({})", kFallbackNames[index]);
}

cublasStatus_t Shim::fallback(Fallback reason, EntryPoint entry, DirectCall direct,
                              Connection* connection) {
  countDirect(reason, entry, connection);
  return direct();
}

void Shim::countServed(EntryPoint entry, Connection& connection) {
  forwarded_.fetch_add(1, std::memory_order_relaxed);
  entry_served_[static_cast<std::size_t>(entry)].fetch_add(1, std::memory_order_relaxed);
  connection.counters().entry[static_cast<std::size_t>(entry)].forwarded.fetch_add(
      1, std::memory_order_relaxed);
}

// A stream-ordered call is counted when it is settled, not when it returns.
void Shim::account(Connection& connection, const StreamOutcome& outcome) {
  if (outcome.direct) {
    countDirect(*outcome.direct, outcome.entry, &connection);
  } else {
    countServed(outcome.entry, connection);
    stream_served_.fetch_add(1, std::memory_order_relaxed);
    if (stalls_.load(std::memory_order_relaxed) != 0) stalls_.store(0, std::memory_order_relaxed);
  }
}

cublasStatus_t Shim::failed(EntryPoint entry, Connection* connection) {
  failed_.fetch_add(1, std::memory_order_relaxed);
  entry_failed_[static_cast<std::size_t>(entry)].fetch_add(1, std::memory_order_relaxed);
  if (connection != nullptr) {
    connection->counters().entry[static_cast<std::size_t>(entry)].failed.fetch_add(
        1, std::memory_order_relaxed);
  }
  return CUBLAS_STATUS_EXECUTION_FAILED;
}

cublasStatus_t Shim::finish(std::int32_t status, float beta, EntryPoint entry, DirectCall direct,
                            Connection& connection) {
  // Declined: the daemon never touched C; run it here.
  if (status == kStatusDeclined) return fallback(Fallback::kDeclined, entry, direct, &connection);
  if (status == kStatusExecutionFailed) {
    // The daemon's GPU failed mid-call. With beta == 0 running it again
    // gives the same C; otherwise C may be half updated, so say so.
    if (beta == 0.0f) return fallback(Fallback::kDaemonFailed, entry, direct, &connection);
    return failed(entry, &connection);
  }
  // The legacy cublasSgemm reports nothing (beta is 0): whatever the daemon
  // refused, cuBLAS computes.
  if (entry == EntryPoint::kSgemmLegacy && status != kStatusSuccess) {
    return fallback(Fallback::kDaemonFailed, entry, direct, &connection);
  }
  countServed(entry, connection);
  return static_cast<cublasStatus_t>(status);
}

cublasStatus_t Shim::call(const Gemm& gemm, DirectCall direct) {
  calls_.fetch_add(1, std::memory_order_relaxed);
  entry_calls_[static_cast<std::size_t>(gemm.entry)].fetch_add(1, std::memory_order_relaxed);
  if (!config_ok_) return fallback(Fallback::kBadConfig, gemm.entry, direct, nullptr);
  if (config_.disable) return fallback(Fallback::kDisabled, gemm.entry, direct, nullptr);
  if (gemm.direct_because) return fallback(*gemm.direct_because, gemm.entry, direct, nullptr);
  if (!gemm.legacy && !gemm.lt && gemm.handle == nullptr) {
    return fallback(Fallback::kBadHandle, gemm.entry, direct, nullptr);
  }
  const GemmShape shape{gemm.transa,   gemm.transb,   gemm.m,       gemm.n,     gemm.k,
                        gemm.lda,      gemm.ldb,      gemm.ldc,     gemm.count, gemm.stride_a,
                        gemm.stride_b, gemm.stride_c, gemm.epilogue};
  if (checkGemmArgs(shape) != kStatusSuccess) {
    return fallback(Fallback::kInvalidArgs, gemm.entry, direct, nullptr);
  }

  Request request{};
  request.op = static_cast<std::uint32_t>(Op::kSgemm);
  request.transa = gemm.transa;
  request.transb = gemm.transb;
  request.m = gemm.m, request.n = gemm.n, request.k = gemm.k;
  request.lda = gemm.lda, request.ldb = gemm.ldb, request.ldc = gemm.ldc;
  request.batch_count = gemm.count;
  request.stride_a = gemm.stride_a, request.stride_b = gemm.stride_b;
  request.stride_c = gemm.stride_c;
  request.epilogue = gemm.epilogue;
  cudaStream_t stream = gemm.stream;
  if (gemm.legacy) {
    request.alpha = gemm.alpha_value;
    request.beta = gemm.beta_value;
    // The legacy API returns no status, so a call the daemon may have started
    // when it vanished could not be reported; with beta == 0 it can be re-run.
    if (request.beta != 0.0f) return fallback(Fallback::kLegacyBeta, gemm.entry, direct, nullptr);
    request.math_mode = CUBLAS_DEFAULT_MATH;
    request.emulation = CUBLAS_EMULATION_STRATEGY_DEFAULT;
  } else if (gemm.lt) {
    // Host scalars and the precision, as the entry point found them.
    if (gemm.alpha == nullptr || gemm.beta == nullptr) {
      return fallback(Fallback::kInvalidArgs, gemm.entry, direct, nullptr);
    }
    request.alpha = *gemm.alpha;
    request.beta = *gemm.beta;
    request.math_mode = static_cast<std::uint32_t>(gemm.math_mode);
    request.emulation = static_cast<std::uint32_t>(gemm.emulation);
  } else {
    // The handle's state now, not as it was when some setter ran.
    cublasPointerMode_t mode;
    cublasMath_t math;
    cublasEmulationStrategy_t emulation;
    if (real_.cublasGetPointerMode_v2(gemm.handle, &mode) != CUBLAS_STATUS_SUCCESS ||
        real_.cublasGetStream_v2(gemm.handle, &stream) != CUBLAS_STATUS_SUCCESS ||
        real_.cublasGetMathMode(gemm.handle, &math) != CUBLAS_STATUS_SUCCESS ||
        real_.cublasGetEmulationStrategy(gemm.handle, &emulation) != CUBLAS_STATUS_SUCCESS) {
      return fallback(Fallback::kBadHandle, gemm.entry, direct, nullptr);
    }
    if (mode == CUBLAS_POINTER_MODE_DEVICE) {
      return fallback(Fallback::kDevicePointerMode, gemm.entry, direct, nullptr);
    }
    if (gemm.alpha == nullptr || gemm.beta == nullptr) {
      return fallback(Fallback::kInvalidArgs, gemm.entry, direct, nullptr);
    }
    request.alpha = *gemm.alpha;
    request.beta = *gemm.beta;
    request.math_mode = static_cast<std::uint32_t>(gemm.math_mode >= 0 ? gemm.math_mode : math);
    request.emulation =
        static_cast<std::uint32_t>(gemm.emulation >= 0 ? gemm.emulation : emulation);
  }
  if (gemmIsNoOp(request)) return fallback(Fallback::kNoOp, gemm.entry, direct, nullptr);
  // Alpha 0 (or, for cublasLtMatmul, an empty k) only scales C: cuBLAS does
  // not read A and B, which may then be too small for lda and ldb, or hold
  // NaNs a batched kernel would multiply by 0. What cuBLASLt writes depends
  // on the kernel it picks besides (H200: most applied the epilogue to beta
  // C, those for the smallest shapes left D alone). Left to them.
  if (request.alpha == 0.0f || (gemm.lt && request.k == 0)) {
    return fallback(Fallback::kUnservedForm, gemm.entry, direct, nullptr);
  }
  if (!precision_.reproducible(static_cast<int>(request.math_mode),
                               static_cast<int>(request.emulation))) {
    return fallback(Fallback::kUnservedForm, gemm.entry, direct, nullptr);
  }
  if (driver_ == nullptr) return fallback(Fallback::kCudaError, gemm.entry, direct, nullptr);

  // Asked of the legacy stream while a blocking stream captures, CUDA says
  // CUDA_ERROR_STREAM_CAPTURE_IMPLICIT and leaves the capture be: the call
  // is queued into that capture's reach, the program's doing, as without
  // stmux.
  CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
  const CUresult captured =
      driver_->cuStreamIsCapturing(reinterpret_cast<CUstream>(stream), &capture);
  if (captured == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT ||
      (captured == CUDA_SUCCESS && capture != CU_STREAM_CAPTURE_STATUS_NONE)) {
    return fallback(Fallback::kGraphCapture, gemm.entry, direct, nullptr);
  }
  if (captured != CUDA_SUCCESS) return fallback(Fallback::kCudaError, gemm.entry, direct, nullptr);

  Fallback absent = Fallback::kNoDaemon;
  std::shared_ptr<Connection> connection = this->connection(absent);
  if (!connection) return fallback(absent, gemm.entry, direct, nullptr);
  Connection* conn = connection.get();
  if (conn->draining()) return fallback(Fallback::kDraining, gemm.entry, direct, conn);
  // STMUX_ROUTE=auto chooses before the operands are described (a driver
  // query each), so that a process measured faster direct pays little for the
  // preload.
  if (route_auto_ && chooseRoute(*conn) == Route::kDirect) {
    (void)applySync(*conn, /*served=*/false);
    return fallback(Fallback::kMeasuredDirect, gemm.entry, direct, conn);
  }
  // Served, the call waits for the legacy stream's earlier work (host mode:
  // waitForPriorWork; stream mode, on a non-blocking stream: the legacy
  // stream joined by an event). While another thread captures a blocking
  // stream CUDA forbids any use of the legacy stream, and a wait there would
  // invalidate that capture; asking is allowed. Such a call runs directly,
  // which touches only the caller's stream, as cuBLAS would.
  if (stream != nullptr && reinterpret_cast<CUstream>(stream) != CU_STREAM_LEGACY &&
      driver_->cuStreamIsCapturing(CU_STREAM_LEGACY, &capture) ==
          CUDA_ERROR_STREAM_CAPTURE_IMPLICIT) {
    return fallback(Fallback::kGraphCapture, gemm.entry, direct, conn);
  }
  const SyncChoice sync = applySync(*conn, /*served=*/true);

  const auto extents = gemmExtents(shape);
  if (!extents) return fallback(Fallback::kInvalidArgs, gemm.entry, direct, conn);
  struct Operand {
    OperandDesc& desc;
    const void* pointer;
    std::uint64_t extent;
  } operands[] = {{request.a, gemm.a, extents->a},
                  {request.b, gemm.b, extents->b},
                  {request.c, gemm.c, extents->c},
                  {request.bias, gemm.bias, extents->bias}};
  int device = -1;
  for (Operand& operand : operands) {
    if (operand.extent == 0) continue;  // never touched: nothing to describe
    const AllocationCache::Described described = allocations_.describe(*driver_, operand.pointer);
    if (described.failure == AllocationCache::Failure::kNotExportable) {
      return fallback(Fallback::kNotExportable, gemm.entry, direct, conn);
    }
    if (described.failure == AllocationCache::Failure::kCudaError) {
      return fallback(Fallback::kCudaError, gemm.entry, direct, conn);
    }
    if (device >= 0 && described.device != device) {
      return fallback(Fallback::kMixedDevices, gemm.entry, direct, conn);
    }
    device = described.device;
    operand.desc = described.desc;
  }
  const std::optional<DeviceInfo> info = deviceInfo(device);
  if (!info) return fallback(Fallback::kCudaError, gemm.entry, direct, conn);
  const std::vector<Uuid>& served = conn->devices();
  const auto found = std::find(served.begin(), served.end(), info->uuid);
  if (found == served.end()) return fallback(Fallback::kDeviceNotServed, gemm.entry, direct, conn);
  request.device = info->uuid;
  conn->counters().mps.store(static_cast<std::uint32_t>(info->mps      ? ClientMps::kYes
                                                        : keptOffMps() ? ClientMps::kKeptOff
                                                                       : ClientMps::kNo),
                             std::memory_order_relaxed);

  releaseGone(*conn);

  request.request_id = next_request_id_.fetch_add(1, std::memory_order_relaxed);
  const std::uint64_t timeout_ns = static_cast<std::uint64_t>(config_.timeout_ms) * 1'000'000;
  // Stream order for the calls that can be run again should the daemon not
  // finish them (beta == 0); the legacy API's stream is not visible.
  if (streamOrdered(*conn) && !gemm.legacy && request.beta == 0.0f) {
    StreamCall ordered{
        request, reinterpret_cast<CUstream>(stream), gemm.a, gemm.b, gemm.c, gemm.bias, gemm.entry};
    switch (stream_->submit(connection, ordered, nowNs() + timeout_ns)) {
      case StreamOrder::Queued::kYes:
        return CUBLAS_STATUS_SUCCESS;
      case StreamOrder::Queued::kBusy:
        return fallback(Fallback::kBusy, gemm.entry, direct, conn);
      case StreamOrder::Queued::kCudaError:
        return fallback(Fallback::kCudaError, gemm.entry, direct, conn);
      case StreamOrder::Queued::kHost:
        break;
    }
  }

  // Host mode: the daemon must not read A, B or C before the work this
  // caller queued earlier is done. The legacy API's stream is not visible, so
  // wait for the whole context there.
  const std::uint64_t prior_from = nowNs();
  const CUresult synced = gemm.legacy ? driver_->cuCtxSynchronize()
                                      : waitForPriorWork(reinterpret_cast<CUstream>(stream));
  if (synced != CUDA_SUCCESS) return fallback(Fallback::kCudaError, gemm.entry, direct, conn);
  const std::uint64_t prior_ns = nowNs() - prior_from;

  const std::uint64_t spin_ns = sync.spin ? static_cast<std::uint64_t>(config_.spin_us) * 1'000 : 0;
  auto ticket = conn->submit(request, nowNs() + timeout_ns);
  if (!ticket) return fallback(Fallback::kBusy, gemm.entry, direct, conn);

  WaitResult result = conn->wait(ticket.value(), nowNs() + timeout_ns, spin_ns);
  if (result.outcome == WaitOutcome::kTimedOut) {
    if (conn->cancel(ticket.value())) {
      conn->release(ticket.value());
      conn->markStalled();
      STMUX_WARN(kShim, "the daemon did not start a call within {} ms; running it directly",
                 config_.timeout_ms);
      return fallback(Fallback::kTimeout, gemm.entry, direct, conn);
    }
    // Started: it is running on the daemon's GPU. Give it the same time again.
    result = conn->wait(ticket.value(), nowNs() + timeout_ns, spin_ns);
    if (result.outcome == WaitOutcome::kTimedOut) {
      STMUX_ERROR(kShim, "a call the daemon started did not finish in {} ms; giving up on it",
                  2 * config_.timeout_ms);
      drop(connection, "it did not finish a call in time");
      return failed(gemm.entry, conn);
    }
  }
  if (result.outcome == WaitOutcome::kDone) {
    const std::uint64_t seen = nowNs();
    conn->release(ticket.value());
    if (stalls_.load(std::memory_order_relaxed) != 0) stalls_.store(0, std::memory_order_relaxed);
    // Where the round's time went on this side (docs/BENCHMARKS.md).
    const std::uint64_t completion_ns = seen >= result.done_ns ? seen - result.done_ns : 0;
    ClientCounters& counters = conn->counters();
    counters.timed_calls.fetch_add(1, std::memory_order_relaxed);
    counters.prior_wait_ns.fetch_add(prior_ns, std::memory_order_relaxed);
    counters.completion_ns.fetch_add(completion_ns, std::memory_order_relaxed);
    timed_calls_.fetch_add(1, std::memory_order_relaxed);
    prior_wait_ns_.fetch_add(prior_ns, std::memory_order_relaxed);
    completion_ns_.fetch_add(completion_ns, std::memory_order_relaxed);
    return finish(result.status, request.beta, gemm.entry, direct, *conn);
  }
  // The daemon is gone.
  drop(connection, "it closed the connection");
  if (conn->cancel(ticket.value()))
    return fallback(Fallback::kDaemonLost, gemm.entry, direct, conn);
  // It claimed the call, and may have finished it just before it went.
  std::optional<std::int32_t> status = conn->published(ticket.value());
  if (!status) {
    // Its launch may still be queued on its GPU, and would write C whenever
    // it ran: nothing more is said to the program before the daemon's
    // process has ended (its end tears that launch down).
    const std::uint64_t wait_ns = std::max(timeout_ns, kDaemonEndWaitNs);
    const DaemonProcess ended = conn->daemonProcess(nowNs() + wait_ns);
    status = conn->published(ticket.value());
    if (!status && ended == DaemonProcess::kLives) {
      STMUX_ERROR(kShim,
                  "the daemon hung up during a call it started and has not ended in {} ms; its "
                  "launch may still write C, returning CUBLAS_STATUS_EXECUTION_FAILED",
                  wait_ns / 1'000'000);
      return failed(gemm.entry, conn);
    }
  }
  if (status) return finish(*status, request.beta, gemm.entry, direct, *conn);
  // It may have run, wholly or partly.
  if (request.beta == 0.0f) return fallback(Fallback::kDaemonLost, gemm.entry, direct, conn);
  STMUX_ERROR(kShim,
              "the daemon vanished during a call with beta != 0; C may be partly "
              "updated, returning CUBLAS_STATUS_EXECUTION_FAILED");
  return failed(gemm.entry, conn);
}

std::shared_ptr<Connection> Shim::connection(Fallback& why) {
  const std::uint64_t now = nowNs();
  std::uint64_t welcome_timeout_ns = 0;
  {
    std::unique_lock lock(connection_mutex_);
    // Another thread is making the process's first attach (its first calls
    // often come from several threads at once): wait for its outcome rather
    // than run directly beside a daemon that is up. The attach is bounded by
    // the welcome timeout. Later attempts are not waited for: the daemon was
    // found absent or lost, and these calls run directly meanwhile.
    if (!attempted_) {
      attached_cv_.wait_for(lock, std::chrono::nanoseconds(2 * kWelcomeTimeoutNs),
                            [this] { return !attaching_; });
    }
    why = refusedToAttach(last_failure_) ? Fallback::kRefused : Fallback::kNoDaemon;
    if (connection_ && connection_->stalled()) {
      // The daemon started no call in STMUX_TIMEOUT_MS: stopped or stuck
      // (its socket still open, so that it seems alive), each call would
      // wait as long again (found by review). Detached, the calls run
      // directly; the next attach comes after that timeout, twice as long
      // after each stall in a row (up to 64 times): a daemon whose server
      // still welcomes tenants while its GPU side is stuck costs a tenant
      // one timed-out call per such wait.
      const std::uint32_t stalls = std::min<std::uint32_t>(stalls_.load() + 1, kMostStallDoublings);
      stalls_.store(stalls);
      const std::uint64_t wait_ns = (static_cast<std::uint64_t>(config_.timeout_ms) * 1'000'000)
                                    << (stalls - 1);
      STMUX_WARN(kShim,
                 "stmuxd started no call within {} ms: taken for stopped; calls run directly, "
                 "attaching again in {} ms",
                 config_.timeout_ms, wait_ns / 1'000'000);
      connection_.reset();
      backoff_ns_ = kFirstBackoffNs;
      next_attempt_ns_ = now + wait_ns;
    }
    if (connection_) {
      // Gone: stream-ordered calls never wait on the host, so their watcher
      // is what notices a dead daemon.
      const bool suspect =
          connection_->gone() || connection_->draining() || now - last_use_ns_ > kIdleCheckNs;
      if (!suspect || connection_->alive()) {
        last_use_ns_ = now;
        return connection_;
      }
      STMUX_WARN(kShim, "lost the daemon; calls run directly until it is back");
      connection_.reset();
      backoff_ns_ = kFirstBackoffNs;
      next_attempt_ns_ = now;
    }
    if (attaching_ || now < next_attempt_ns_) return nullptr;
    next_attempt_ns_ = now + backoff_ns_;
    attaching_ = true;
    welcome_timeout_ns = std::min(attempted_ ? kRetryWelcomeTimeoutNs : kWelcomeTimeoutNs,
                                  static_cast<std::uint64_t>(config_.timeout_ms) * 1'000'000);
  }
  // Whatever happens, attaching_ is cleared: an exception out of the attempt
  // (bad_alloc, which intercept() turns into a direct call) must not leave
  // every later call waiting for an attach nobody is making.
  auto attempt = [&]() -> Result<std::unique_ptr<Connection>> {
    try {
      ConnectOptions options;
      options.socket_path = config_.socket;
      options.daemon_user = config_.daemon_user;
      options.name = name_;
      options.timeout_ns = welcome_timeout_ns;
      return Connection::open(options);
    } catch (...) {
      std::lock_guard lock(connection_mutex_);
      attaching_ = false;
      attached_cv_.notify_all();
      throw;
    }
  };
  const std::uint64_t started = nowNs();
  auto opened = attempt();

  std::lock_guard lock(connection_mutex_);
  attaching_ = false;
  attempted_ = true;
  attached_cv_.notify_all();
  if (!opened) {
    const std::uint64_t limit = static_cast<std::uint64_t>(config_.reconnect_ms) * 1'000'000;
    backoff_ns_ = std::min(backoff_ns_ * 2, limit);
    const std::uint64_t ended = nowNs();
    next_attempt_ns_ =
        ended + std::max(backoff_ns_,
                         kRetryPauseFactor * std::min(ended - started, kRetryWelcomeTimeoutNs));
    // One warning per absence; the retries' failures only at debug level.
    if (!warned_absent_) {
      STMUX_WARN(kShim, "not attached to stmuxd: {}; cuBLAS calls run directly, retrying",
                 opened.message());
      warned_absent_ = true;
    } else {
      STMUX_DEBUG(kShim, "still not attached to stmuxd: {}", opened.message());
    }
    last_failure_ = opened.message();
    if (refusedToAttach(last_failure_)) why = Fallback::kRefused;
    return nullptr;
  }
  connection_ = std::shared_ptr<Connection>(std::move(opened).value());
  if (!sweeper_started_) startSweeper();
  backoff_ns_ = kFirstBackoffNs;
  warned_absent_ = false;
  last_failure_.clear();
  last_use_ns_ = nowNs();
  STMUX_INFO(kShim, "attached to stmuxd at {} as client {}", config_.socket,
             connection_->clientId());
  return connection_;
}

void Shim::drop(const std::shared_ptr<Connection>& connection, const char* why) {
  std::lock_guard lock(connection_mutex_);
  if (connection_ != connection) return;  // another thread dropped it already
  STMUX_WARN(kShim, "detached from stmuxd ({}); calls run directly until it is back", why);
  connection_.reset();
  backoff_ns_ = kFirstBackoffNs;
  next_attempt_ns_ = nowNs() + backoff_ns_;
}

// Waits, without putting any work into the caller's context, for the work
// this call's operands may depend on (docs/ARCHITECTURE.md, "Stream order"):
// - everything queued earlier on the caller's stream, and what it was made to
//   wait for (events of other streams and threads);
// - everything queued earlier on the legacy default stream, whatever the
//   caller's stream: a plain cudaMemcpy from pageable memory, a cudaMemset or
//   a device-to-device cudaMemcpy runs there and may still be running when it
//   returns. A kernel on a non-blocking stream would not wait for it by
//   CUDA's letter, yet in practice it lands first when the kernel runs in the
//   same context; the daemon's kernel runs in another, and read stale
//   operands (seen on the H200: 2 calls of 320);
// - for the legacy stream itself, every blocking stream too, which only a
//   context-wide wait covers.
// Not the per-thread default stream of a caller on another stream: waiting
// for it creates it in every calling thread, and a child forked afterwards
// crashed in its exit handlers (docs/ARCHITECTURE.md).
// Work put into the caller's context would make the GPU time-slice between
// the tenants' contexts and the daemon's, the very thing stmux avoids.
CUresult Shim::waitForPriorWork(CUstream stream) {
  const auto handle = reinterpret_cast<std::uintptr_t>(stream);
  if (handle == 0 || stream == CU_STREAM_LEGACY) return driver_->cuCtxSynchronize();
  CUresult result = driver_->cuStreamSynchronize(stream);
  if (result == CUDA_SUCCESS) result = driver_->cuStreamSynchronize(CU_STREAM_LEGACY);
  return result;
}

// STMUX_MODE: stream order only where chosen; host mode measured faster on
// every row so far (docs/ARCHITECTURE.md, "Stream-ordered mode").
bool Shim::streamOrdered(Connection& connection) {
  const bool stream = stream_ != nullptr;
  connection.counters().mode.store(
      static_cast<std::uint32_t>(stream ? ClientMode::kStream : ClientMode::kHost),
      std::memory_order_relaxed);
  return stream;
}

std::optional<Shim::DeviceInfo> Shim::deviceInfo(int device) {
  if (device < 0 || device >= kMaxDevices) return std::nullopt;
  std::lock_guard lock(device_mutex_);
  if (!devices_[device]) {
    CUdevice handle;
    CUuuid uuid;
    int mps = 0;
    if (driver_->cuDeviceGet(&handle, device) != CUDA_SUCCESS ||
        driver_->cuDeviceGetUuid(&uuid, handle) != CUDA_SUCCESS ||
        driver_->cuDeviceGetAttribute(&mps, CU_DEVICE_ATTRIBUTE_MPS_ENABLED, handle) !=
            CUDA_SUCCESS) {
      return std::nullopt;
    }
    DeviceInfo info;
    std::memcpy(info.uuid.bytes, uuid.bytes, sizeof(info.uuid.bytes));
    info.mps = mps != 0;
    devices_[device] = info;
  }
  return devices_[device];
}

// What stmuxctl shows for a context with scheduling flag `sched`.
ClientSync syncOf(unsigned sched) {
  return sched == kSchedBlocking ? ClientSync::kBlocking
         : sched == kSchedYield  ? ClientSync::kYield
         : sched == kSchedSpin   ? ClientSync::kSpin
                                 : ClientSync::kDefault;
}

// STMUX_SLICE_US: asks the kernel's scheduler, once for the calling thread,
// for a slice of `us` (sched_setattr's sched_runtime under SCHED_OTHER,
// EEVDF's slice request from Linux 6.12; earlier kernels ignore it). The
// thread's nice value and reset-on-fork flag stay; a thread the program put
// under another policy (batch, idle, real-time) is left alone.
void requestSlice(unsigned us) {
  thread_local bool asked = false;
  if (us == 0 || asked) return;
  asked = true;
  SchedAttr attr;
  if (schedGetattr(attr) != 0) {
    STMUX_WARN(kShim, "STMUX_SLICE_US={}: cannot read this thread's scheduling: {}", us,
               std::strerror(errno));
    return;
  }
  if (attr.policy != SCHED_OTHER) {
    STMUX_INFO(kShim,
               "STMUX_SLICE_US={}: this thread's scheduling policy is the program's ({}); "
               "left alone",
               us, attr.policy);
    return;
  }
  if (schedRequestSlice(attr, us) != 0) {
    STMUX_WARN(kShim, "STMUX_SLICE_US={}: the kernel refused the slice: {}", us,
               std::strerror(errno));
    return;
  }
  STMUX_DEBUG(kShim, "STMUX_SLICE_US={}: this thread asked for a {} us slice", us, us);
}

// STMUX_SYNC (shim/sync_policy.h): gives the calling thread's context the
// scheduling flag the mode wants, once per context and change; says how the
// shim's own wait goes. STMUX_SLICE_US's request goes with it.
SyncChoice Shim::applySync(const Connection& connection, bool served) {
  requestSlice(static_cast<unsigned>(config_.slice_us));
  std::atomic<std::uint32_t>& said = connection.syncWord();  // what stmuxctl shows
  auto say = [&](ClientSync sync) {
    said.store(static_cast<std::uint32_t>(sync), std::memory_order_relaxed);
  };
  if (sync_mode_ == SyncMode::kKeep) {
    if (said.load(std::memory_order_relaxed) != static_cast<std::uint32_t>(ClientSync::kKept)) {
      say(ClientSync::kKept);
    }
    return {};
  }
  // Read once: the daemon rewrites both words every 100 ms.
  const unsigned tenants = connection.otherTenants() + 1;
  const bool may_spin = connection.maySpin();
  const SyncChoice choice = chooseSync(sync_mode_, tenants, cores_, served, may_spin);
  const std::optional<ContextId> context = currentContext(*driver_);
  if (!context) return choice;
  // What this thread last saw: most calls stop here (unless a new
  // connection's segment has not been told yet).
  thread_local std::optional<ContextId> seen_context;
  thread_local unsigned seen_sched = ~0u;
  if (context == seen_context && choice.sched == seen_sched &&
      said.load(std::memory_order_relaxed) != static_cast<std::uint32_t>(ClientSync::kUnknown)) {
    return choice;
  }
  seen_context = context;
  seen_sched = choice.sched;

  std::lock_guard lock(sync_mutex_);
  auto entry = std::find_if(synced_.begin(), synced_.end(),
                            [&](const auto& synced) { return synced.first == *context; });
  std::optional<unsigned> ours;
  if (entry != synced_.end()) ours = entry->second;
  unsigned flags = 0;
  if (driver_->cuCtxGetFlags(&flags) != CUDA_SUCCESS) return choice;
  const std::optional<unsigned> wanted = contextFlags(flags, ours, choice.sched);
  if (!wanted) {
    if ((flags & kSchedMask) != choice.sched) {
      STMUX_INFO(kShim,
                 "the program chose its own CUDA scheduling (context flags {:#x}); "
                 "STMUX_SYNC leaves it",
                 flags);
      say(ClientSync::kOwn);
    } else {
      say(syncOf(choice.sched));
    }
    return choice;
  }
  if (driver_->cuCtxSetFlags(*wanted) != CUDA_SUCCESS) {
    STMUX_WARN(kShim, "cannot set the CUDA context's flags to {:#x}; STMUX_SYNC leaves them",
               *wanted);
    say(syncOf(flags & kSchedMask));
    return choice;
  }
  say(syncOf(choice.sched));
  // Said at info the first time; later changes (every turn to spin that
  // STMUX_SPINNING_TENANTS gives, for one) at debug.
  const Level level = entry == synced_.end() ? Level::kInfo : Level::kDebug;
  if (entry != synced_.end()) {
    entry->second = choice.sched;
  } else {
    synced_.emplace_back(*context, choice.sched);
  }
  if (logEnabled(level, Subsys::kShim)) {
    logFormat(level, Subsys::kShim,
              "STMUX_SYNC={}: {} tenants making calls on {} cores, this one's calls {}{}: how "
              "CUDA's synchronizations wait here now: {}",
              config_.sync, tenants, cores_, served ? "served" : "direct",
              may_spin ? ", its turn to spin" : "", clientSyncName(syncOf(choice.sched)));
  }
  return choice;
}

// The route of a call under STMUX_ROUTE=auto. With the calling thread's
// device (where cuBLAS runs the call) and stmuxd's both on MPS, a hand-off
// costs no context switch, and the daemon measures for all the tenants on MPS
// together which route is faster (daemon/fleet_route.h): follow it.
// Otherwise each hand-off is a GPU context switch, and the chooser
// (shim/route.h) serves while other tenants make calls and, while this one is
// alone, measures whether it is better off direct.
Route Shim::chooseRoute(Connection& connection) {
  CUdevice device = -1;
  if (driver_->cuCtxGetDevice(&device) != CUDA_SUCCESS) return Route::kServe;  // it falls back
  const std::optional<DeviceInfo> info = deviceInfo(device);
  if (!info) return Route::kServe;
  const std::vector<Uuid>& served = connection.devices();
  const auto found = std::find(served.begin(), served.end(), info->uuid);
  if (found == served.end()) return Route::kServe;  // falls back: not served
  if (info->mps && connection.deviceOnMps(static_cast<std::size_t>(found - served.begin()))) {
    return followFleet(connection);
  }
  RouteDecision decision;
  Route route;
  {
    // The word stored under the lock: two threads' stores out of the
    // chooser's order could leave it saying the route before the last change.
    std::lock_guard lock(route_mutex_);
    route = chooser_.onCall(nowNs(), connection.otherTenants() > 0, &decision);
    connection.counters().route.store(static_cast<std::uint32_t>(route), std::memory_order_relaxed);
  }
  if (decision.company) {
    STMUX_INFO(kShim, "other tenants are making calls: this process's calls go to stmuxd again");
    return route;
  }
  if (decision.decided) {
    STMUX_DEBUG(kShim, "route look: {:.0f} calls/s {}, {:.0f}/s {}; calls go {}",
                decision.from_rate, routeName(decision.from), decision.to_rate,
                routeName(other(decision.from)), routeName(decision.to));
  }
  if (decision.decided && decision.to != decision.from) {
    const bool to_direct = decision.to == Route::kDirect;
    if (to_direct && !said_direct_.exchange(true)) {
      STMUX_WARN(kShim,
                 "this process made {:.0f} GEMM calls/s served and {:.0f}/s direct: its GPU "
                 "context and stmuxd's are not both on MPS, so each hand-off is a context "
                 "switch. Running its calls directly, and measuring again from time to time "
                 "(STMUX_ROUTE=serve serves them regardless)",
                 decision.from_rate, decision.to_rate);
    } else {
      STMUX_INFO(kShim, "measured {:.0f} calls/s {} and {:.0f}/s {}: calls now go {}",
                 decision.from_rate, routeName(decision.from), decision.to_rate,
                 routeName(decision.to), to_direct ? "direct" : "to stmuxd");
    }
  }
  return route;
}

// A call on MPS under STMUX_ROUTE=auto: the daemon's route for its tenants on
// MPS. The daemon counts this process among them (its calls, direct or
// served, are the measure) once it says it follows the route.
Route Shim::followFleet(Connection& connection) {
  ClientCounters& counters = connection.counters();
  counters.mps.store(static_cast<std::uint32_t>(ClientMps::kYes), std::memory_order_relaxed);
  counters.follows_route.store(1, std::memory_order_relaxed);
  const std::uint32_t word = connection.fleetRoute();
  const Route route = (word & kFleetDirect) != 0 ? Route::kDirect : Route::kServe;
  counters.route.store(static_cast<std::uint32_t>(route), std::memory_order_relaxed);
  // Said once per process, and only of a settled route, not of a look.
  if (route == Route::kDirect && (word & kFleetLook) == 0 && !said_direct_.exchange(true)) {
    STMUX_WARN(kShim,
               "stmuxd measured the tenants on MPS faster with their GEMMs direct than served "
               "(stmuxctl status says by how much): this process runs its calls directly, and "
               "stmuxd measures again from time to time (STMUX_ROUTE=serve serves them "
               "regardless)");
  }
  return route;
}

// Freed allocations must not stay mapped in the daemon while their owner is
// idle (and so makes no call that would notice), so a thread of the shim's
// own sweeps the cache once a second and tells the daemon what is gone.
void Shim::startSweeper() {
  const std::string failure =
      startBackgroundThread(*driver_, "stmux-sweep", /*calls_cuda=*/true, [this] { sweepLoop(); });
  if (failure.empty()) {
    sweeper_started_ = true;
  } else {
    STMUX_WARN(kShim,
               "cannot start the sweeper thread ({}); freed memory stays mapped in the daemon "
               "until a new allocation reuses its address or this process exits",
               failure);
  }
}

void Shim::sweepLoop() {
  while (true) {
    std::this_thread::sleep_for(kSweepInterval);
    std::lock_guard sweeping(sweep_mutex_);
    if (stopping_) return;
    std::shared_ptr<Connection> connection;
    {
      std::lock_guard lock(connection_mutex_);
      connection = connection_;
    }
    // Detached, the daemon holds none of this process's memory; sweep when
    // there is a daemon to tell.
    if (!connection) continue;
    // Memory running out costs this sweep (the cache stays whole), not the
    // process.
    try {
      allocations_.sweep(*driver_);
      releaseGone(*connection);
    } catch (const std::bad_alloc&) {
    }
  }
}

// Tells the daemon which allocations were found freed, so it unmaps them.
void Shim::releaseGone(Connection& connection) {
  if (std::vector<std::uint64_t> gone = allocations_.takeGone(); !gone.empty()) {
    STMUX_DEBUG(kShim, "telling the daemon {} freed allocations are gone", gone.size());
    // Not sent (the socket's buffer full): told at the next call or sweep.
    if (!connection.sendRelease(gone).ok()) allocations_.giveBack(gone);
  }
}

// Exit handlers run before libraries' destructors: stop sweeping while the
// driver is still whole, waiting for a sweep under way.
void Shim::atExit() {
  {
    std::lock_guard lock(sweep_mutex_);
    stopping_ = true;
  }
  if (stream_) stream_->stop(kExitSettleNs);
  printCounters();
}

void Shim::printCounters() {
  if (!logEnabled(Level::kInfo, Subsys::kStats) || calls_.load() == 0) return;
  std::string direct;
  for (std::size_t i = 0; i < kFallbackCount; ++i) {
    if (const std::uint64_t n = fallbacks_[i].load(); n != 0) {
      direct += fmt::format(" {}={}", kFallbackNames[i], n);
    }
  }
  STMUX_INFO(kStats, "{} calls: {} served by stmuxd ({} stream-ordered), {} failed; direct:{}",
             calls_.load(), forwarded_.load(), stream_served_.load(), failed_.load(),
             direct.empty() ? " none" : direct);
  std::string entries;
  for (std::size_t i = 0; i < kEntryPointCount; ++i) {
    if (const std::uint64_t n = entry_calls_[i].load(); n != 0) {
      entries +=
          fmt::format("{} {}={} calls, {} served, {} failed, {} direct", entries.empty() ? "" : ";",
                      kEntryPointNames[i], n, entry_served_[i].load(), entry_failed_[i].load(),
                      entry_direct_[i].load());
    }
  }
  STMUX_INFO(kStats, "by entry point:{}", entries);
  if (const std::uint64_t timed = timed_calls_.load(); timed != 0) {
    STMUX_INFO(
        kStats,
        "round: {} host-mode calls, mean prior-work wait {:.1f} us, mean completion {:.1f} us",
        timed, static_cast<double>(prior_wait_ns_.load()) / 1e3 / static_cast<double>(timed),
        static_cast<double>(completion_ns_.load()) / 1e3 / static_cast<double>(timed));
  }
}

// fork(): no lock may be held by a thread that will not exist in the child,
// and the child must not talk to the daemon on the parent's connection.
void Shim::forkPrepare() {
  // A thread making the Shim (it loads libcuda, among others) finishes first.
  create_mutex_.lock();
  Shim* made = instance_.load(std::memory_order_acquire);
  if (made == nullptr) return;  // no call yet: nothing of the shim's to mind
  Shim& shim = *made;
  shim.sweep_mutex_.lock();
  std::unique_lock connection(shim.connection_mutex_);
  // A thread attaching holds its new connection's descriptors where the
  // child could not close them, keeping the parent attached for the child's
  // whole life: let it finish (within the welcome timeout), then fork.
  shim.attached_cv_.wait_for(connection, std::chrono::nanoseconds(2 * kWelcomeTimeoutNs),
                             [&] { return !shim.attaching_; });
  connection.release();  // unlocked in forkParent() and forkChild()
  shim.device_mutex_.lock();
  shim.route_mutex_.lock();
  shim.allocations_.forkPrepare();
  if (shim.stream_) shim.stream_->forkPrepare();
}

void Shim::forkParent() {
  if (Shim* made = instance_.load(std::memory_order_acquire)) {
    Shim& shim = *made;
    if (shim.stream_) shim.stream_->forkParent();
    shim.allocations_.forkParent();
    shim.route_mutex_.unlock();
    shim.device_mutex_.unlock();
    shim.connection_mutex_.unlock();
    shim.sweep_mutex_.unlock();
  }
  create_mutex_.unlock();
}

void Shim::forkChild() {
  Shim* made = instance_.load(std::memory_order_acquire);
  if (made == nullptr) {
    create_mutex_.unlock();
    return;
  }
  Shim& shim = *made;
  if (shim.stream_) shim.stream_->forkChild();
  shim.allocations_.forkChild();
  shim.chooser_ = RouteChooser{};  // a new process: measured afresh
  shim.said_direct_ = false;
  shim.route_mutex_.unlock();
  shim.device_mutex_.unlock();
  if (shim.connection_) {
    shim.connection_->abandonAfterFork();
    shim.connection_.reset();
  }
  shim.sweeper_started_ = false;  // threads do not survive fork()
  shim.attaching_ = false;
  shim.attempted_ = false;  // a new process: its first calls wait for its first attach
  shim.next_attempt_ns_ = 0;
  shim.backoff_ns_ = kFirstBackoffNs;
  shim.stalls_ = 0;
  shim.calls_ = 0;
  shim.forwarded_ = 0;
  shim.stream_served_ = 0;
  shim.timed_calls_ = 0;
  shim.prior_wait_ns_ = 0;
  shim.completion_ns_ = 0;
  shim.failed_ = 0;
  for (auto& counter : shim.fallbacks_)
    counter = 0;
  for (std::size_t i = 0; i < kEntryPointCount; ++i) {
    shim.entry_calls_[i] = 0, shim.entry_served_[i] = 0;
    shim.entry_failed_[i] = 0, shim.entry_direct_[i] = 0;
  }
  shim.connection_mutex_.unlock();
  shim.sweep_mutex_.unlock();
  create_mutex_.unlock();
}

__attribute__((constructor)) void registerForkHandlers() {
  Shim::registerForkHandlers();
}

}  // namespace

cublasStatus_t intercept(const Gemm& gemm, DirectCall direct) noexcept {
  // No cancellation inside: its unwinding would meet the catch below (which
  // aborts the process) or leave a call half handed over. A pthread_cancel
  // takes effect at the program's next cancellation point instead.
  int cancel_state = PTHREAD_CANCEL_ENABLE;
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel_state);
  cublasStatus_t status;
  try {
    status = Shim::get().call(gemm, direct);
  } catch (...) {
    // Out of memory somewhere in the shim: the application's call still runs.
    status = direct();
  }
  pthread_setcancelstate(cancel_state, nullptr);
  return status;
}

}  // namespace stmux::shim

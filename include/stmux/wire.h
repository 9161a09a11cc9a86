// The wire format between libstmux.so and stmuxd.
//
// Everything here crosses a process boundary, through the shared-memory
// segment or the control socket, so every struct is trivially copyable with a
// fixed size and layout (asserted below). Bump kProtocolVersion on any change:
// a daemon and a shim of different versions refuse each other by name.
//
// Nothing here includes CUDA: the daemon's policy code and the CI tests use it
// on machines with no GPU.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

namespace stmux {

// 2: a status reply may come in parts (kStatusPart).
// 3: the welcome says which GPUs the daemon uses through MPS; a client's
//    counters say which route STMUX_ROUTE=auto chose and whether it is on MPS.
// 4: the daemon tells each client how many other tenants are making calls.
// 5: stream-ordered requests (a request flag, its sequence number, the slot's
//    ready and released words, the header's attention word); a client's
//    counters say which mode its calls go by.
// 6: a fallback reason more (unserved_form): the client's counters grew.
// 7: where a round's time goes: a request's submit time, a slot's done time,
//    the client's timing counters.
// 8: strided-batched requests (a batch count and strides); a slot's takeover
//    word; a client's counters per entry point.
// 9: epilogues (a bias operand and an epilogue word: cublasLtMatmul); an
//    entry point more.
// 10: the daemon chooses the route of its tenants on MPS (the header's
//    fleet_route word).
// 11: the daemon says which tenants may spin while they wait (the header's
//    may_spin word).
// 12: the welcome carries the daemon's own pidfd as a third descriptor,
//    where its kernel has pidfds.
inline constexpr std::uint32_t kProtocolVersion = 12;
inline constexpr std::uint64_t kSegmentMagic = 0x4745534d58554d53ull;  // "SMUXMSEG"
inline constexpr std::uint32_t kControlMagic = 0x584d5453u;            // "STMX"
inline constexpr std::size_t kCacheLine = 64;
inline constexpr std::size_t kMaxDevices = 16;

// cublasStatus_t values, mirrored so that CUDA-free code can speak them;
// daemon/executor.cc asserts they agree with cublas_api.h. kStatusDeclined is
// stmux's own: the daemon could not serve the request (an operand it could not
// map, a GPU it cannot use) and never started it; the shim runs it directly.
enum WireStatus : std::int32_t {
  kStatusDeclined = -1,
  kStatusSuccess = 0,
  kStatusNotInitialized = 1,
  kStatusAllocFailed = 3,
  kStatusInvalidValue = 7,
  kStatusArchMismatch = 8,
  kStatusMappingError = 11,
  kStatusExecutionFailed = 13,
  kStatusInternalError = 14,
  kStatusNotSupported = 15,
};

// cublasOperation_t values.
enum WireTranspose : std::int32_t { kOpN = 0, kOpT = 1, kOpC = 2 };

struct Uuid {
  std::uint8_t bytes[16];
  bool operator==(const Uuid& other) const { return std::memcmp(bytes, other.bytes, 16) == 0; }
};

// A cudaIpcMemHandle_t / CUipcMemHandle, as bytes.
struct IpcHandle {
  std::uint8_t bytes[64];
  bool operator==(const IpcHandle& other) const { return std::memcmp(bytes, other.bytes, 64) == 0; }
};

enum class Op : std::uint32_t { kSgemm = 1 };

// One matrix operand: where it lives, as the client describes it. The daemon
// trusts none of it: it opens the handle, reads the real allocation size, and
// checks the operand's whole extent against that.
struct OperandDesc {
  std::uint64_t alloc_id;     // the client's CU_POINTER_ATTRIBUTE_BUFFER_ID; 0: not referenced
  std::uint64_t base;         // the allocation's address in the client
  std::uint64_t offset;       // bytes from the allocation's base to the first element
  std::uint64_t alloc_bytes;  // the allocation's size as the client sees it
  IpcHandle handle;
};

// A request descriptor: one SGEMM (or a strided batch of them), everything
// the daemon needs to run it.
struct Request {
  std::uint32_t op;          // Op
  std::uint32_t slot;        // completion slot index in the client's segment
  std::uint32_t generation;  // the slot's generation when this request was made
  std::int32_t transa;       // WireTranspose
  std::int32_t transb;
  std::uint32_t math_mode;  // cublasMath_t as the caller's handle had it
  std::uint32_t emulation;  // cublasEmulationStrategy_t as the caller's handle had it
  std::uint32_t flags;      // kRequest* bits
  std::int64_t m, n, k;
  std::int64_t lda, ldb, ldc;
  // Strided-batched calls: the number of problems (0 means one: a call that
  // is not batched) and the floats between one problem's operands and the
  // next's (0: the same operand for every problem).
  std::int64_t batch_count;
  std::int64_t stride_a, stride_b, stride_c;
  float alpha, beta;         // host pointer mode only: the values, read at call time
  Uuid device;               // the GPU the operands live on
  std::uint64_t request_id;  // unique per client, for logs
  OperandDesc a, b, c;
  // The bias vector (m floats) of an epilogue with kEpilogueBias; otherwise
  // not referenced (alloc_id 0).
  OperandDesc bias;
  // Stream-ordered requests: the number the caller's stream writes to the
  // slot's `ready` word once its earlier work is done, and waits for in its
  // `released` word. Rises with each use of the slot; compared cyclically.
  std::uint32_t stream_seq;
  // What is applied to C after the GEMM, to every problem: kEpilogue* bits
  // (stmux/epilogue.h).
  std::uint32_t epilogue;
  std::uint64_t submit_ns;  // CLOCK_MONOTONIC when the client pushed it, for the daemon's timing
};

// Request::flags. Stream-ordered: the caller did not wait for its stream
// before submitting and does not wait for the answer; the daemon starts the
// request only once the slot's ready word reaches stream_seq, and on success
// stores stream_seq in its released word, which the caller's stream waits for
// (docs/ARCHITECTURE.md, "Stream-ordered mode").
inline constexpr std::uint32_t kRequestStreamOrdered = 1u << 0;

// Completion slots. The slot's 32-bit word is both its state and the futex the
// waiter sleeps on: generation << 8 | state. The generation makes a stale ring
// entry (one whose caller gave up) harmless once the slot has been reused.
enum class SlotState : std::uint32_t {
  kIdle = 0,
  kPending = 1,    // written by the client; the daemon may start it
  kRunning = 2,    // claimed by the daemon: it may touch C from now on
  kDone = 3,       // status is valid
  kCancelled = 4,  // the client gave up before the daemon claimed it
};

inline constexpr std::uint32_t slotWord(std::uint32_t generation, SlotState state) {
  return (generation << 8) | static_cast<std::uint32_t>(state);
}
inline constexpr SlotState slotState(std::uint32_t word) {
  return static_cast<SlotState>(word & 0xffu);
}
inline constexpr std::uint32_t slotGeneration(std::uint32_t word) {
  return word >> 8;
}
inline constexpr std::uint32_t kGenerationMask = 0x00ffffffu;

struct alignas(kCacheLine) Slot {
  std::atomic<std::uint32_t> word;
  std::atomic<std::uint32_t> sleepers;  // non-zero while the waiter may sleep on word
  std::atomic<std::int32_t> status;     // WireStatus, valid once kDone
  // Stream-ordered requests only. Written by the caller's GPU stream (a
  // stream memory operation on this host memory) when the caller's earlier
  // work is done; read by the daemon.
  std::atomic<std::uint32_t> ready;
  // Written by whoever finished the request (the daemon, or the shim when it
  // gave up on the daemon); the caller's GPU stream waits for it.
  std::atomic<std::uint32_t> released;
  // Written by the shim alone, before `released`, when it gives up on the
  // daemon: the shim's own kernel, queued behind the caller's wait, computes
  // the call when this word has reached the call's stream_seq.
  std::atomic<std::uint32_t> takeover;
  // CLOCK_MONOTONIC when the daemon published the status: the caller times
  // how long it took to see it.
  std::atomic<std::uint64_t> done_ns;
};

// Whether a sequence word has reached `seq`, cyclically: the comparison
// cuStreamWaitValue32's CU_STREAM_WAIT_VALUE_GEQ makes.
inline constexpr bool seqReached(std::uint32_t word, std::uint32_t seq) {
  return static_cast<std::int32_t>(word - seq) >= 0;
}

// Why a call went straight to cuBLAS instead of to the daemon. The shim counts
// each in its segment, where stmuxctl can read them.
#define STMUX_FALLBACK_REASONS(X)                                                                 \
  X(kDisabled, "disabled", "STMUX_DISABLE is set")                                                \
  X(kBadConfig, "bad_config", "an STMUX_* variable is invalid")                                   \
  X(kNoDaemon, "no_daemon", "no daemon is attached")                                              \
  X(kRefused, "refused", "the daemon refused this process, or this process the daemon")           \
  X(kDraining, "draining", "the daemon is shutting down")                                         \
  X(kBadHandle, "bad_handle", "the cuBLAS handle is null or unusable")                            \
  X(kNoOp, "no_op", "nothing to compute: cuBLAS returns at once")                                 \
  X(kInvalidArgs, "invalid_args", "the arguments are invalid; cuBLAS reports it")                 \
  X(kGraphCapture, "graph_capture", "the stream is being captured into a CUDA graph")             \
  X(kDevicePointerMode, "device_pointer_mode", "alpha and beta are in device memory")             \
  X(kNotExportable, "not_exportable", "an operand is in memory CUDA IPC cannot export")           \
  X(kMixedDevices, "mixed_devices", "the operands live on different GPUs")                        \
  X(kDeviceNotServed, "device_not_served", "the daemon does not serve this GPU")                  \
  X(kLegacyBeta, "legacy_beta", "legacy cublasSgemm with beta != 0 could not report a loss")      \
  X(kCudaError, "cuda_error", "a CUDA driver query failed")                                       \
  X(kBusy, "busy", "no ring space or slot came free before the timeout")                          \
  X(kTimeout, "timeout", "STMUX_TIMEOUT_MS passed before the daemon started the call")            \
  X(kDaemonLost, "daemon_lost", "the daemon went away; the call had not started, or beta == 0")   \
  X(kDeclined, "declined", "the daemon could not serve the call and did not start it")            \
  X(kDaemonFailed, "daemon_failed",                                                               \
    "the daemon's GPU failed the call (or the daemon refused a legacy cublasSgemm, which "        \
    "cannot report it); beta == 0, so re-run")                                                    \
  X(kMeasuredDirect, "measured_direct",                                                           \
    "STMUX_ROUTE=auto measured this process faster with its calls direct")                        \
  X(kUnservedForm, "unserved_form",                                                               \
    "a form stmux does not serve: GemmEx with other than FP32 data and compute, GEMV with a "     \
    "negative increment, strided batches with a negative stride or overlapping outputs, "         \
    "cublasLtMatmul with other than FP32 column-major data, an epilogue other than bias, ReLU "   \
    "and GELU, an output apart from C with beta != 0, or k 0; alpha 0; GemmEx with an algorithm " \
    "other than the default and 0 to 23; a precision the caller's environment sets "              \
    "(NVIDIA_TF32_OVERRIDE=0, "                                                                   \
    "CUBLAS_EMULATION_STRATEGY, CUBLAS_EMULATE_SINGLE_PRECISION)")

enum class Fallback : std::uint32_t {
#define STMUX_X(id, name, help) id,
  STMUX_FALLBACK_REASONS(STMUX_X)
#undef STMUX_X
      kCount
};
inline constexpr std::size_t kFallbackCount = static_cast<std::size_t>(Fallback::kCount);
inline constexpr std::string_view kFallbackNames[] = {
#define STMUX_X(id, name, help) name,
    STMUX_FALLBACK_REASONS(STMUX_X)
#undef STMUX_X
};

// The cuBLAS entry points the shim serves, each counted apart.
#define STMUX_ENTRY_POINTS(X)                                             \
  X(kSgemm, "sgemm", "cublasSgemm_v2, cublasSgemm_v2_64")                 \
  X(kSgemmLegacy, "sgemm_legacy", "the legacy cublasSgemm")               \
  X(kGemv, "gemv", "cublasSgemv_v2, cublasSgemv_v2_64")                   \
  X(kGemmEx, "gemm_ex", "cublasGemmEx, cublasGemmEx_64")                  \
  X(kStridedBatched, "strided_batched", "cublasSgemmStridedBatched(_64)") \
  X(kLtMatmul, "lt_matmul", "cublasLtMatmul")

enum class EntryPoint : std::uint32_t {
#define STMUX_X(id, name, help) id,
  STMUX_ENTRY_POINTS(STMUX_X)
#undef STMUX_X
      kCount
};
inline constexpr std::size_t kEntryPointCount = static_cast<std::size_t>(EntryPoint::kCount);
inline constexpr std::string_view kEntryPointNames[] = {
#define STMUX_X(id, name, help) name,
    STMUX_ENTRY_POINTS(STMUX_X)
#undef STMUX_X
};

// What became of one entry point's calls.
struct EntryCounters {
  std::atomic<std::uint64_t> forwarded;  // calls the daemon completed
  std::atomic<std::uint64_t> failed;     // calls returned CUBLAS_STATUS_EXECUTION_FAILED
  std::atomic<std::uint64_t> fallback[kFallbackCount];
};

// Written by the client, read (and only displayed) by the daemon.
struct ClientCounters {
  EntryCounters entry[kEntryPointCount];
  std::atomic<std::uint32_t> route;  // shim::Route: 0 served, 1 direct (STMUX_ROUTE=auto)
  std::atomic<std::uint32_t> mps;  // ClientMps: whether the client's context is on MPS, and why not
  std::atomic<std::uint32_t> mode;  // ClientMode: how its served calls are ordered (STMUX_MODE)
  // 1 once the client's calls follow the daemon's route for its tenants on
  // MPS (STMUX_ROUTE=auto, its context and the daemon's on MPS): only such
  // clients are measured for it.
  std::atomic<std::uint32_t> follows_route;
  // Where a served call's time goes on the client's side (host mode): calls
  // timed, their summed waits for the caller's earlier work, and their summed
  // time from the daemon's publishing the status to the caller's seeing it.
  std::atomic<std::uint64_t> timed_calls;
  std::atomic<std::uint64_t> prior_wait_ns;
  std::atomic<std::uint64_t> completion_ns;
};

// A client's counts summed over its entry points.
struct CounterTotals {
  std::uint64_t forwarded = 0, failed = 0;
  std::uint64_t fallback[kFallbackCount] = {};
  std::uint64_t calls() const {
    std::uint64_t n = forwarded + failed;
    for (std::uint64_t f : fallback)
      n += f;
    return n;
  }
};
inline CounterTotals totals(const EntryCounters& entry) {
  CounterTotals sum;
  sum.forwarded = entry.forwarded.load(std::memory_order_relaxed);
  sum.failed = entry.failed.load(std::memory_order_relaxed);
  for (std::size_t i = 0; i < kFallbackCount; ++i) {
    sum.fallback[i] = entry.fallback[i].load(std::memory_order_relaxed);
  }
  return sum;
}
inline CounterTotals totals(const ClientCounters& counters) {
  CounterTotals sum;
  for (const EntryCounters& entry : counters.entry) {
    const CounterTotals one = totals(entry);
    sum.forwarded += one.forwarded;
    sum.failed += one.failed;
    for (std::size_t i = 0; i < kFallbackCount; ++i)
      sum.fallback[i] += one.fallback[i];
  }
  return sum;
}

inline constexpr std::uint32_t kFleetDirect = 1;
inline constexpr std::uint32_t kFleetLook = 2;

// kKeptOff: not on MPS because every place on it was taken (stmux/mps_seats.h).
enum class ClientMps : std::uint32_t { kUnknown = 0, kNo = 1, kYes = 2, kKeptOff = 3 };
// How stmuxd's status names each (stmuxctl and stmux-bench read it).
inline std::string_view clientMpsName(ClientMps mps) {
  switch (mps) {
    case ClientMps::kYes:
      return "yes";
    case ClientMps::kNo:
      return "no";
    case ClientMps::kKeptOff:
      return "no: MPS full";
    case ClientMps::kUnknown:
      break;
  }
  return "unknown";
}
enum class ClientMode : std::uint32_t { kUnknown = 0, kHost = 1, kStream = 2 };
// How stmuxd's status names each (stmuxctl reads it).
inline std::string_view clientModeName(ClientMode mode) {
  switch (mode) {
    case ClientMode::kHost:
      return "host";
    case ClientMode::kStream:
      return "stream";
    case ClientMode::kUnknown:
      break;
  }
  return "unknown";
}
// How the client's threads wait for its GPU: the scheduling flag of its CUDA
// context as STMUX_SYNC last left it (shim/sync_policy.h).
enum class ClientSync : std::uint32_t {
  kUnknown = 0,  // not said yet, or by a shim from before it was said
  kKept = 1,     // STMUX_SYNC=keep: the shim sets nothing
  kDefault = 2,  // CUDA's default (spinning while the process has fewer contexts than cores)
  kSpin = 3,
  kYield = 4,
  kBlocking = 5,
  kOwn = 6,  // the program chose a flag itself, and keeps it
};
// How stmuxd's status names each (stmuxctl reads it).
inline std::string_view clientSyncName(ClientSync sync) {
  switch (sync) {
    case ClientSync::kKept:
      return "keep";
    case ClientSync::kDefault:
      return "default";
    case ClientSync::kSpin:
      return "spin";
    case ClientSync::kYield:
      return "yield";
    case ClientSync::kBlocking:
      return "block";
    case ClientSync::kOwn:
      return "program's";
    case ClientSync::kUnknown:
      break;
  }
  return "unknown";
}

// The first bytes of every client segment. The client checks magic, version
// and every size before it uses the segment, and refuses to attach otherwise.
struct SegmentHeader {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t header_bytes;
  std::uint32_t request_bytes;
  std::uint32_t slot_bytes;
  std::uint32_t ring_capacity;
  std::uint32_t slot_count;
  std::uint32_t client_id;
  // Set by the shim (ClientSync): how its threads wait for the GPU. Was an
  // unused word, 0 in every segment: a shim from before says nothing.
  std::atomic<std::uint32_t> sync;
  std::uint64_t ring_offset;
  std::uint64_t slots_offset;
  std::uint64_t total_bytes;
  // Set by the daemon before it sleeps; a producer that sees it rings the
  // eventfd. See ring.h for the ordering argument.
  alignas(kCacheLine) std::atomic<std::uint32_t> consumer_sleeping;
  // Set by the daemon when it shuts down: submit nothing new.
  std::atomic<std::uint32_t> draining;
  // Set by the daemon about every 100 ms: how many other tenants made GEMM
  // calls, served or direct, in the last second. STMUX_ROUTE=auto sends a
  // process direct only while it has no such company (shim/route.h).
  std::atomic<std::uint32_t> other_tenants;
  // Bumped (and woken, as a futex) by the daemon whenever a stream-ordered
  // request ends in anything but success: the shim's watcher then runs it.
  std::atomic<std::uint32_t> attention;
  // Set by the daemon: which way STMUX_ROUTE=auto sends the calls of a
  // client on MPS (daemon/fleet_route.h): kFleetDirect or not, and
  // kFleetLook while that is a look at the route not taken.
  std::atomic<std::uint32_t> fleet_route;
  // Set by the daemon about every 100 ms (STMUX_SPINNING_TENANTS): 1 while
  // this client is one of the tenants that may spin while they wait when
  // tenants outnumber cores (shim/sync_policy.h), 0 otherwise.
  std::atomic<std::uint32_t> may_spin;
  alignas(kCacheLine) ClientCounters counters;
};

// ---- control channel (SOCK_SEQPACKET Unix socket) --------------------------

enum class MsgType : std::uint32_t {
  kHello = 1,        // client -> daemon
  kWelcome = 2,      // daemon -> client, with the segment memfd and the doorbell eventfd
  kRefuse = 3,       // daemon -> client, then close
  kRelease = 4,      // client -> daemon: these allocations are freed or no longer cached
  kStatusQuery = 5,  // stmuxctl -> daemon
  kStatusReply = 6,  // daemon -> stmuxctl: the JSON text's last part follows the header
  kStatusPart = 7,   // daemon -> stmuxctl: a part of the JSON text; more parts follow
};

// Every message starts with this header, in every protocol version, so that a
// mismatch can always be recognised and reported.
struct MsgHeader {
  std::uint32_t magic;
  std::uint32_t version;
  std::uint32_t type;
  std::uint32_t bytes;  // of the whole message
};

enum class Role : std::uint32_t { kTenant = 1, kControl = 2 };

struct HelloMsg {
  MsgHeader header;
  std::int32_t pid;
  std::uint32_t role;  // Role
  char name[32];       // the program's name, for stmuxctl; NUL-terminated
};

struct WelcomeMsg {
  MsgHeader header;
  std::uint32_t client_id;
  std::uint32_t ring_capacity;
  std::uint32_t slot_count;
  std::uint32_t device_count;
  std::uint64_t segment_bytes;
  Uuid devices[kMaxDevices];             // the GPUs this daemon serves
  std::uint8_t device_mps[kMaxDevices];  // 1: the daemon's context on devices[i] is on MPS
};

struct RefuseMsg {
  MsgHeader header;
  std::uint32_t daemon_version;
  std::uint32_t reserved;
  char reason[248];  // NUL-terminated
};

inline constexpr std::size_t kMaxReleaseIds = 62;
struct ReleaseMsg {
  MsgHeader header;
  std::uint32_t count;
  std::uint32_t reserved;
  std::uint64_t alloc_ids[kMaxReleaseIds];
};

inline constexpr std::size_t kMaxMessageBytes = 1 << 20;  // any one message at most
// A status reply is sent in parts of this size, well within a socket buffer,
// so that it works at any client count; the whole is bounded by the reader.
inline constexpr std::size_t kStatusPartBytes = 32 << 10;
inline constexpr std::size_t kMaxStatusBytes = 256 << 20;

template <class T>
T makeMessage(MsgType type) {
  T msg;
  std::memset(&msg, 0, sizeof(msg));
  msg.header = {kControlMagic, kProtocolVersion, static_cast<std::uint32_t>(type),
                static_cast<std::uint32_t>(sizeof(T))};
  return msg;
}

// ---- layout checks ---------------------------------------------------------

#define STMUX_WIRE_STRUCT(T, bytes)                                        \
  static_assert(std::is_trivially_copyable_v<T>, #T " crosses processes"); \
  static_assert(std::is_standard_layout_v<T>, #T " crosses processes");    \
  static_assert(sizeof(T) == (bytes), #T " changed size: bump kProtocolVersion")

STMUX_WIRE_STRUCT(Uuid, 16);
STMUX_WIRE_STRUCT(IpcHandle, 64);
STMUX_WIRE_STRUCT(OperandDesc, 96);
STMUX_WIRE_STRUCT(Request, 544);
STMUX_WIRE_STRUCT(MsgHeader, 16);
STMUX_WIRE_STRUCT(HelloMsg, 56);
STMUX_WIRE_STRUCT(WelcomeMsg, 16 + 24 + 17 * kMaxDevices);
STMUX_WIRE_STRUCT(RefuseMsg, 16 + 8 + 248);
STMUX_WIRE_STRUCT(ReleaseMsg, 16 + 8 + 8 * kMaxReleaseIds);
// Structs in shared memory that hold atomics: placed, never copied.
#define STMUX_SHARED_STRUCT(T, bytes)                                           \
  static_assert(std::is_standard_layout_v<T>, #T " lives in shared memory");    \
  static_assert(std::is_trivially_destructible_v<T>, #T " is never destroyed"); \
  static_assert(sizeof(T) == (bytes), #T " changed size: bump kProtocolVersion")

STMUX_SHARED_STRUCT(Slot, 64);
STMUX_SHARED_STRUCT(SegmentHeader,
                    (128 + 8 * (5 + kEntryPointCount * (2 + kFallbackCount)) + 63) / 64 * 64);
static_assert(offsetof(Request, a) % 8 == 0);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free,
              "futex words and slot states must be lock-free across processes");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
              "ring sequence numbers and counters must be lock-free across processes");
static_assert(offsetof(SegmentHeader, consumer_sleeping) % kCacheLine == 0);
static_assert(offsetof(SegmentHeader, counters) % kCacheLine == 0);

}  // namespace stmux

// Stream-ordered mode's protocol (shim/stream_order.cc) on any machine: the
// real shim code, transport, server and scheduler, with a fake CUDA driver
// whose one stream runs its queued operations in order on a thread of its
// own, and a fake executor. What the GPU tests cannot show on demand: a
// launch that waits for the device to drain (as one behind another thread's
// cudaFree does) never deadlocks, a call of a lost daemon is computed by the
// kernel queued behind its wait, and one whose kernel cannot be queued is
// left to its caller.
#include "shim/stream_order.h"

#include <gtest/gtest.h>
#include <sys/prctl.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <new>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "fake_daemon.h"
#include "shim/takeover_params.h"

namespace {
// While set on a thread, its allocations fail, as with memory gone.
thread_local bool out_of_memory = false;
// While set, the shim's watcher thread's allocations fail.
std::atomic<bool> watcher_out_of_memory{false};
bool onTheWatcher() {
  char name[16] = {};
  return ::prctl(PR_GET_NAME, name) == 0 && std::strcmp(name, "stmux-watch") == 0;
}
// Driver calls made on the watcher thread, which must make none: it alone
// lets streams go, and a driver call may wait on CUDA's locks behind them.
std::atomic<int> watcher_driver_calls{0};
void noteDriverCall() {
  if (onTheWatcher()) ++watcher_driver_calls;
}
bool allocationFails() {
  return out_of_memory || (watcher_out_of_memory.load(std::memory_order_relaxed) && onTheWatcher());
}
}  // namespace

// Paired with malloc and free, so that sanitizers see matching calls (GCC,
// seeing free() of what operator new returned once inlined, would warn).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t size) {
  if (allocationFails()) throw std::bad_alloc();
  if (void* memory = std::malloc(size == 0 ? 1 : size)) return memory;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  if (allocationFails()) return nullptr;
  return std::malloc(size == 0 ? 1 : size);
}
void operator delete(void* memory) noexcept {
  std::free(memory);
}
void operator delete(void* memory, std::size_t) noexcept {
  std::free(memory);
}
void operator delete(void* memory, const std::nothrow_t&) noexcept {
  std::free(memory);
}

namespace stmux::shim {

const char* nameOf(StreamWait wait) {
  return wait == StreamWait::kKernel ? "kernel" : "memop";
}
// How GoogleTest shows the parameter (found by argument-dependent lookup,
// so outside the unnamed namespace).
void PrintTo(StreamWait wait, std::ostream* out) {
  *out << nameOf(wait);
}

namespace {

using daemon::Daemon;
using testing::TempDir;

constexpr std::uint64_t kSecond = 1'000'000'000;
const CUcontext kContext = reinterpret_cast<CUcontext>(0x10);
const CUstream kStream = reinterpret_cast<CUstream>(0x20);

// One GPU stream: operations run in order; a wait blocks those behind it.
class FakeStream {
 public:
  FakeStream() : worker_([this] { run(); }) {}
  ~FakeStream() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    worker_.join();
  }
  // `op` returns false while it cannot complete (a wait), and is retried.
  void enqueue(std::function<bool()> op) {
    {
      std::lock_guard lock(mutex_);
      ops_.push_back(std::move(op));
    }
    changed_.notify_all();
  }
  void pause(bool paused) {
    {
      std::lock_guard lock(mutex_);
      paused_ = paused;
    }
    changed_.notify_all();
  }
  // Whether everything queued has run, waiting up to `ns` for it.
  bool drained(std::uint64_t ns) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, std::chrono::nanoseconds(ns), [&] { return ops_.empty(); });
  }

 private:
  void run() {
    std::unique_lock lock(mutex_);
    while (!stop_) {
      if (paused_ || ops_.empty()) {
        changed_.wait_for(lock, std::chrono::milliseconds(1));
        continue;
      }
      if (ops_.front()()) {
        ops_.pop_front();
        changed_.notify_all();
      } else {
        changed_.wait_for(lock, std::chrono::microseconds(100));
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::function<bool()>> ops_;
  bool paused_ = false;
  bool stop_ = false;
  std::thread worker_;
};

// What the fake driver does and saw.
struct FakeGpu {
  FakeStream stream;
  // A launch waits (up to 2 s) for the stream to drain first, as a launch
  // queued on CUDA's lock behind another thread's cudaFree would.
  std::atomic<bool> launch_waits_for_drain{false};
  std::atomic<bool> launch_fails{false};
  // A launch returns only once its kernel has run (up to 2 s), as with
  // CUDA_LAUNCH_BLOCKING=1.
  std::atomic<bool> launch_returns_once_run{false};
  std::atomic<bool> launch_found_it_stuck{false};
  std::atomic<int> launches{0};  // of the takeover kernel
  // The waits queued for `released`: stream memory operations, wait kernels.
  std::atomic<int> memop_waits{0}, kernel_waits{0};
  std::atomic<unsigned> last_blocks{0};                     // the last launch's grid
  std::atomic<std::uint32_t> last_caller{0}, last_gate{0};  // and its gate (TakeoverParams)
  std::atomic<int> computed{0};
  // Run on the caller's thread when it queues its stream's wait: a stream
  // memory operation's between the shim's deciding to order the call on the
  // stream and its handing the call to the daemon, a wait kernel's once the
  // daemon and the watcher have it.
  std::function<void()> on_wait_queued;
  // The context current on every thread, whether the caller's stream is
  // non-blocking with work left on the legacy stream (joinLegacyStream),
  // and the events made for that.
  std::atomic<CUcontext> context{reinterpret_cast<CUcontext>(0x10)};
  std::atomic<bool> legacy_busy{false};
  std::atomic<int> events_made{0};
  // Bumped when the context is destroyed and made again (cudaDeviceReset):
  // its handle comes back, its id does not, and nothing made in the old one
  // (the segment's registration, the module, events) can be used in it.
  std::atomic<int> incarnation{0};
  std::atomic<int> registered_in{-1};  // the incarnation the segment is registered in
  std::atomic<int> registrations{0};
  std::atomic<int> modules_loaded{0};
};
FakeGpu* gpu = nullptr;

std::atomic_ref<std::uint32_t> word(CUdeviceptr address) {
  return std::atomic_ref<std::uint32_t>(*reinterpret_cast<std::uint32_t*>(address));
}

CUresult fakeCtxGetCurrent(CUcontext* context) {
  noteDriverCall();
  *context = gpu->context.load();
  return CUDA_SUCCESS;
}
CUresult fakeCtxGetId(CUcontext context, unsigned long long* id) {
  noteDriverCall();
  *id = (reinterpret_cast<std::uintptr_t>(context) << 16) + gpu->incarnation;
  return CUDA_SUCCESS;
}
// Handles of what is made in a context carry its incarnation, and are
// refused in another.
std::uintptr_t madeNow(std::uintptr_t base) {
  return base + (static_cast<std::uintptr_t>(gpu->incarnation) << 24);
}
bool ofThisIncarnation(const void* handle) {
  return reinterpret_cast<std::uintptr_t>(handle) >> 24 ==
         static_cast<std::uintptr_t>(gpu->incarnation);
}
CUresult fakeMemHostRegister(void*, size_t, unsigned) {
  noteDriverCall();
  // Portable: one registration serves every context.
  if (gpu->registered_in.exchange(gpu->incarnation) == gpu->incarnation) {
    return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
  }
  ++gpu->registrations;
  return CUDA_SUCCESS;
}
CUresult fakeMemHostGetDevicePointer(CUdeviceptr* device, void* host, unsigned) {
  noteDriverCall();
  if (gpu->registered_in != gpu->incarnation) return CUDA_ERROR_INVALID_VALUE;
  *device = reinterpret_cast<CUdeviceptr>(host);  // one address space, as with UVA
  return CUDA_SUCCESS;
}
CUresult fakeModuleLoadData(CUmodule* module, const void*) {
  noteDriverCall();
  ++gpu->modules_loaded;
  *module = reinterpret_cast<CUmodule>(0x30);
  return CUDA_SUCCESS;
}
// The takeover kernel and the wait kernel (stmux_wait_released).
constexpr std::uintptr_t kTakeoverFunction = 0x40, kWaitFunction = 0x48;
CUresult fakeModuleGetFunction(CUfunction* function, CUmodule, const char* name) {
  noteDriverCall();
  const bool wait = std::strcmp(name, "stmux_wait_released") == 0;
  *function = reinterpret_cast<CUfunction>(madeNow(wait ? kWaitFunction : kTakeoverFunction));
  return CUDA_SUCCESS;
}
// A GPU of 3 multiprocessors, each running 2 of the kernel's blocks at once.
CUresult fakeCtxGetDevice(CUdevice* device) {
  noteDriverCall();
  *device = 0;
  return CUDA_SUCCESS;
}
CUresult fakeDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice) {
  noteDriverCall();
  if (attribute != CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) return CUDA_ERROR_INVALID_VALUE;
  *value = 3;
  return CUDA_SUCCESS;
}
CUresult fakeOccupancy(int* blocks, CUfunction, int, size_t) {
  noteDriverCall();
  *blocks = 2;
  return CUDA_SUCCESS;
}
CUresult fakeStreamGetFlags(CUstream, unsigned* flags) {
  noteDriverCall();
  // A blocking stream needs no legacy-stream join; non-blocking, its call
  // makes one while the legacy stream is busy.
  *flags = gpu->legacy_busy ? CU_STREAM_NON_BLOCKING : CU_STREAM_DEFAULT;
  return CUDA_SUCCESS;
}
CUresult fakeStreamQuery(CUstream) {
  noteDriverCall();
  return gpu->legacy_busy ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}
CUresult fakeEventCreate(CUevent* event, unsigned) {
  noteDriverCall();
  *event = reinterpret_cast<CUevent>(madeNow(0x1000) + ++gpu->events_made);
  return CUDA_SUCCESS;
}
CUresult fakeEventRecord(CUevent event, CUstream) {
  noteDriverCall();
  return ofThisIncarnation(event) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
CUresult fakeStreamWaitEvent(CUstream, CUevent, unsigned) {
  noteDriverCall();
  return CUDA_SUCCESS;
}
CUresult fakeStreamWriteValue32(CUstream, CUdeviceptr address, cuuint32_t value, unsigned) {
  noteDriverCall();
  gpu->stream.enqueue([address, value] {
    word(address).store(value, std::memory_order_release);
    return true;
  });
  return CUDA_SUCCESS;
}
// The stream waits until the word at `address` reaches `value`.
void queueWait(CUdeviceptr address, std::uint32_t value) {
  gpu->stream.enqueue([address, value] {
    return seqReached(word(address).load(std::memory_order_acquire), value);
  });
  if (gpu->on_wait_queued) gpu->on_wait_queued();
}
CUresult fakeStreamWaitValue32(CUstream, CUdeviceptr address, cuuint32_t value, unsigned flags) {
  noteDriverCall();
  if (flags != CU_STREAM_WAIT_VALUE_GEQ) return CUDA_ERROR_INVALID_VALUE;
  ++gpu->memop_waits;
  queueWait(address, value);
  return CUDA_SUCCESS;
}
CUresult fakeLaunchKernel(CUfunction function, unsigned blocks, unsigned, unsigned, unsigned,
                          unsigned, unsigned, unsigned, CUstream, void** arguments, void**) {
  noteDriverCall();
  // The fake's own allocations stand for the driver's, which do not throw.
  const bool was_out_of_memory = std::exchange(out_of_memory, false);
  struct Restore {
    bool value;
    ~Restore() { out_of_memory = value; }
  } restore{was_out_of_memory};
  if (!ofThisIncarnation(function)) return CUDA_ERROR_INVALID_HANDLE;
  if (gpu->launch_waits_for_drain && !gpu->stream.drained(2 * kSecond)) {
    gpu->launch_found_it_stuck = true;
  }
  if (gpu->launch_fails) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
  if ((reinterpret_cast<std::uintptr_t>(function) & 0xff) == kWaitFunction) {
    // One thread, polling the word.
    if (blocks != 1) return CUDA_ERROR_INVALID_VALUE;
    ++gpu->kernel_waits;
    queueWait(*static_cast<const CUdeviceptr*>(arguments[0]),
              *static_cast<const std::uint32_t*>(arguments[1]));
  } else {
    ++gpu->launches;
    gpu->last_blocks = blocks;
    const TakeoverParams params = *static_cast<const TakeoverParams*>(arguments[0]);
    gpu->last_caller = params.caller;
    gpu->last_gate = params.gate;
    gpu->stream.enqueue([params] {
      // The kernel: computes only once the shim gave up on the daemon.
      const std::uint32_t takeover =
          std::atomic_ref<const std::uint32_t>(*params.takeover).load(std::memory_order_acquire);
      if (seqReached(takeover, params.seq)) {
        *params.c = 42.0f;
        ++gpu->computed;
      }
      return true;
    });
  }
  if (gpu->launch_returns_once_run && !gpu->stream.drained(2 * kSecond)) {
    gpu->launch_found_it_stuck = true;
  }
  return CUDA_SUCCESS;
}
CUresult fakeThreadExchangeStreamCaptureMode(CUstreamCaptureMode*) {
  noteDriverCall();
  return CUDA_SUCCESS;
}

Driver fakeDriver() {
  Driver d;
  d.cuCtxGetCurrent = fakeCtxGetCurrent;
  d.cuCtxGetId = fakeCtxGetId;
  d.cuMemHostRegister = fakeMemHostRegister;
  d.cuMemHostGetDevicePointer = fakeMemHostGetDevicePointer;
  d.cuModuleLoadData = fakeModuleLoadData;
  d.cuModuleGetFunction = fakeModuleGetFunction;
  d.cuCtxGetDevice = fakeCtxGetDevice;
  d.cuDeviceGetAttribute = fakeDeviceGetAttribute;
  d.cuOccupancyMaxActiveBlocksPerMultiprocessor = fakeOccupancy;
  d.cuStreamGetFlags = fakeStreamGetFlags;
  d.cuStreamQuery = fakeStreamQuery;
  d.cuEventCreate = fakeEventCreate;
  d.cuEventRecord = fakeEventRecord;
  d.cuStreamWaitEvent = fakeStreamWaitEvent;
  d.cuStreamWriteValue32 = fakeStreamWriteValue32;
  d.cuStreamWaitValue32 = fakeStreamWaitValue32;
  d.cuLaunchKernel = fakeLaunchKernel;
  d.cuThreadExchangeStreamCaptureMode = fakeThreadExchangeStreamCaptureMode;
  return d;  // anything else is null: a call to it fails the test by crashing
}

// Every test runs with each wait for `released` (STMUX_STREAM_WAIT).
class StreamOrderTest : public ::testing::TestWithParam<StreamWait> {
 protected:
  void SetUp() override {
    gpu = &gpu_;
    outcomes_.reserve(64);  // counting an outcome, on the watcher too, allocates nothing
    daemon_ = std::make_unique<Daemon>(dir_);
    connection_ = daemon::connectTo(dir_, "stream_order_test");
    ASSERT_NE(connection_, nullptr);
    // Never destroyed (and kept reachable, for the leak checker): the watcher
    // is a detached thread that may still be returning from its last look
    // when a test ends.
    static auto* kept = new std::vector<std::unique_ptr<StreamOrder>>;  // not even at exit
    static const Driver driver = fakeDriver();
    order_ = kept->emplace_back(std::make_unique<StreamOrder>(
                                    driver, /*timeout_ns=*/kSecond / 2, GetParam(),
                                    [this](Connection&, const StreamOutcome& outcome) {
                                      std::lock_guard lock(mutex_);
                                      outcomes_.push_back(outcome);
                                    }))
                 .get();
  }
  void TearDown() override {
    order_->stop(kSecond);
    gpu_.stream.pause(false);
    EXPECT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the stream was left waiting";
  }

  StreamOrder::Queued submit(float* c, Request r = daemon::validRequest()) {
    StreamCall call{r, kStream, nullptr, nullptr, c, nullptr, EntryPoint::kSgemm};
    return order_->submit(connection_, call, nowNs() + kSecond);
  }
  std::vector<StreamOutcome> outcomes() {
    std::lock_guard lock(mutex_);
    return outcomes_;
  }
  bool settled(std::size_t count) {
    return testing::waitFor([&] { return outcomes().size() >= count; });
  }
  // Three calls, each served, none of their launches stuck on a call the
  // daemon did not have yet (the fake's launch set to wait in some way).
  void expectThreeServedWithNoLaunchStuck() {
    float c = 0.0f;
    for (int i = 0; i < 3; ++i)
      ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
    EXPECT_FALSE(gpu_.launch_found_it_stuck) << "a launch waited on a call the daemon did not have";
    ASSERT_TRUE(settled(3));
    EXPECT_EQ(gpu_.computed, 0);
  }

  TempDir dir_;
  FakeGpu gpu_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<Connection> connection_;
  StreamOrder* order_ = nullptr;
  std::mutex mutex_;
  std::vector<StreamOutcome> outcomes_;
};

// Each slot of a caller has a gate entry of its own, or none (STMUX_SLOTS
// above the table): seqs are counted per slot, so two slots of one caller on
// one entry could have the same seq in flight, and one's launch take the
// other's answer, computing nothing where it had to (found by review).
TEST(TakeoverGate, EachSlotOfACallerHasAnEntryOfItsOwnOrNone) {
  for (const std::uint32_t slot_count : {8u, 256u, kTakeoverGates, 2 * kTakeoverGates, 16384u}) {
    for (const std::uint32_t caller : {1u, 2u, 77u, (1u << 31) - 1}) {
      std::set<std::uint32_t> entries;
      std::uint32_t none = 0;
      for (std::uint32_t slot = 0; slot < slot_count; ++slot) {
        const std::uint32_t gate = takeoverGate(caller, slot, slot_count);
        if (gate == kTakeoverGates) {
          ++none;
        } else {
          EXPECT_LT(gate, kTakeoverGates);
          EXPECT_TRUE(entries.insert(gate).second)
              << "slots " << slot_count << ", caller " << caller << ": entry " << gate << " twice";
        }
      }
      EXPECT_EQ(none, slot_count <= kTakeoverGates ? 0u : slot_count) << slot_count;
    }
  }
}

TEST_P(StreamOrderTest, AServedCallReleasesItsStreamAndItsKernelLeavesCAlone) {
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond));
  ASSERT_TRUE(settled(1));
  EXPECT_FALSE(outcomes()[0].direct.has_value()) << "counted served";
  EXPECT_EQ(gpu_.launches, 1);
  EXPECT_EQ(gpu_.computed, 0);
  EXPECT_EQ(c, 0.0f);
  // The stream waited the way it was told to.
  const bool kernel = GetParam() == StreamWait::kKernel;
  EXPECT_EQ(gpu_.memop_waits, kernel ? 0 : 1);
  EXPECT_EQ(gpu_.kernel_waits, kernel ? 1 : 0);
}

// The kernel behind a call gets a block per tile of C, at most as many as
// the GPU runs at once: a call larger than that is computed in one wave, and
// an empty launch starts no blocks it does not need.
TEST_P(StreamOrderTest, TheKernelBehindACallGetsABlockPerTileUpToOneWaveOfTheGpu) {
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);  // 8 x 8: one tile
  EXPECT_EQ(gpu_.last_blocks, 1u);
  Request r = daemon::validRequest();
  r.m = 65;  // two tiles
  r.lda = r.ldc = 65;
  ASSERT_EQ(submit(&c, r), StreamOrder::Queued::kYes);
  EXPECT_EQ(gpu_.last_blocks, 2u);
  r.m = r.n = 1024;
  r.lda = r.ldb = r.ldc = 1024;
  ASSERT_EQ(submit(&c, r), StreamOrder::Queued::kYes);
  EXPECT_EQ(gpu_.last_blocks, 6u) << "3 multiprocessors, 2 blocks each";
  ASSERT_TRUE(settled(3));
  EXPECT_EQ(gpu_.computed, 0);
  // One block of it reads the takeover word for all, through an entry of
  // the kernel's gate table, under the connection's name.
  EXPECT_NE(gpu_.last_caller, 0u);
  EXPECT_LT(gpu_.last_caller, 1u << 31);
  EXPECT_LT(gpu_.last_gate, kTakeoverGates);
}

// The deadlock seen on the H200: a launch made while the call's stream waits
// for a request the daemon has not been given can never finish.
TEST_P(StreamOrderTest, ALaunchThatWaitsForTheStreamToDrainNeverWaitsOnACallTheDaemonLacks) {
  gpu_.launch_waits_for_drain = true;
  expectThreeServedWithNoLaunchStuck();
}

// With CUDA_LAUNCH_BLOCKING=1 a launch returns once its kernel has run: the
// wait kernel, launched before the daemon had the call, would never return.
TEST_P(StreamOrderTest, ALaunchThatReturnsOnceItsKernelRanNeverWaitsOnACallTheDaemonLacks) {
  gpu_.launch_returns_once_run = true;
  expectThreeServedWithNoLaunchStuck();
}

TEST_P(StreamOrderTest, ACallOfALostDaemonIsComputedByTheKernelBehindItsWait) {
  gpu_.stream.pause(true);  // the caller's earlier work is still running
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  daemon_->vanish();  // the daemon dies before the stream is ready
  // Taken over at once, settled only once the stream wrote `ready`.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(outcomes().empty());
  gpu_.stream.pause(false);
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the stream was not let go";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the call";
  ASSERT_TRUE(settled(1));
  ASSERT_TRUE(outcomes()[0].direct.has_value());
  EXPECT_EQ(*outcomes()[0].direct, Fallback::kDaemonLost);
}

// The watcher takes a lost daemon's call over with memory gone: it allocates
// nothing (a bad_alloc on its thread ended the process).
TEST_P(StreamOrderTest, TheWatcherTakesACallOverWithoutMemory) {
  gpu_.stream.pause(true);
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  watcher_out_of_memory = true;
  daemon_->vanish();
  gpu_.stream.pause(false);
  const bool drained = gpu_.stream.drained(2 * kSecond);
  watcher_out_of_memory = false;
  ASSERT_TRUE(drained) << "the stream was not let go";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the call";
  ASSERT_TRUE(settled(1));
  ASSERT_TRUE(outcomes()[0].direct.has_value());
  EXPECT_EQ(*outcomes()[0].direct, Fallback::kDaemonLost);
}

// A daemon that stops (SIGTERM) declines what still awaits its caller's
// stream as it hangs up.
TEST_P(StreamOrderTest, ACallOfADaemonThatStopsIsDeclinedAndComputedByTheKernel) {
  gpu_.stream.pause(true);  // the caller's earlier work is still running
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  daemon_->stop();
  gpu_.stream.pause(false);
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the stream was not let go";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the call";
  ASSERT_TRUE(settled(1));
  ASSERT_TRUE(outcomes()[0].direct.has_value());
  EXPECT_EQ(*outcomes()[0].direct, Fallback::kDeclined);
}

TEST_P(StreamOrderTest, ACallTheDaemonDeclinesIsComputedByTheKernel) {
  Request r = daemon::validRequest();
  r.device = daemon::uuid(0xcd);  // a GPU this daemon does not serve
  float c = 0.0f;
  ASSERT_EQ(submit(&c, r), StreamOrder::Queued::kYes);
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the stream was not let go";
  EXPECT_EQ(c, 42.0f);
  ASSERT_TRUE(settled(1));
  ASSERT_TRUE(outcomes()[0].direct.has_value());
  EXPECT_EQ(*outcomes()[0].direct, Fallback::kDeclined);
}

// A call the daemon started is its own until it finishes or the daemon
// dies: taken over, the daemon's launch, queued on its GPU, would still
// write C, perhaps after the caller's stream had gone on.
TEST_P(StreamOrderTest, ACallTheDaemonStartedIsWaitedForHoweverLongWhileTheDaemonLives) {
  // A GPU that takes 2 s per batch, four times the shim's 0.5 s timeout.
  connection_.reset();
  daemon_.reset();
  daemon_ = std::make_unique<Daemon>(dir_, 2 * kSecond);
  connection_ = daemon::connectTo(dir_, "stream_order_test");
  ASSERT_NE(connection_, nullptr);
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  EXPECT_FALSE(gpu_.stream.drained(3 * kSecond / 2)) << "the stream went on without the daemon";
  ASSERT_TRUE(gpu_.stream.drained(3 * kSecond)) << "the daemon's finishing did not let it go";
  EXPECT_EQ(gpu_.computed, 0) << "the shim's kernel computed a call the daemon ran";
  ASSERT_TRUE(settled(1));
  EXPECT_FALSE(outcomes()[0].direct.has_value()) << "counted served";
}

// A daemon killed during a call it started closes its socket before its
// process has ended; until then the launch it queued may still write C. The
// stream waits for that end, then the shim's kernel computes the call.
TEST_P(StreamOrderTest, ACallTheDaemonStartedIsTakenOverOnlyOnceTheDaemonsProcessHasEnded) {
  TempDir dir;
  daemon::HangingUpDaemon dying(dir);
  ASSERT_TRUE(dying.listening());
  connection_ = daemon::connectTo(dir, "stream_order_test");
  ASSERT_NE(connection_, nullptr);
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  ASSERT_TRUE(dying.hungUp());
  EXPECT_FALSE(gpu_.stream.drained(kSecond / 2)) << "taken over while the daemon's process lived";
  EXPECT_EQ(gpu_.computed, 0);
  dying.end();
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the daemon's end did not let the stream go";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the call";
  ASSERT_TRUE(settled(1));
  ASSERT_TRUE(outcomes()[0].direct.has_value());
  EXPECT_EQ(*outcomes()[0].direct, Fallback::kDaemonLost);
}

TEST_P(StreamOrderTest, AfterStopCallsAreServedInHostMode) {
  order_->stop(kSecond);
  float c = 0.0f;
  EXPECT_EQ(submit(&c), StreamOrder::Queued::kHost) << "no watcher would let its stream go";
  EXPECT_EQ(gpu_.launches, 0);
}

// The process exits (stop()) while a thread is between deciding to order its
// call on the stream and having it watched: the watcher must stay until that
// call is settled, or nobody lets its stream go when the daemon declines it.
TEST_P(StreamOrderTest, AStopWhileACallIsBeingQueuedWaitsForItToBeSettled) {
  std::thread stopper;
  std::atomic<bool> stopped{false};
  gpu_.on_wait_queued = [&] {
    if (stopper.joinable()) return;
    stopper = std::thread([&] {
      order_->stop(kSecond);
      stopped = true;
    });
    // Long enough for a stop() that does not wait for this call to return.
    EXPECT_FALSE(testing::waitFor([&] { return stopped.load(); }, std::chrono::milliseconds(200)))
        << "stop() returned while a call was being queued";
  };
  Request r = daemon::validRequest();
  r.device = daemon::uuid(0xcd);  // a GPU this daemon does not serve: declined
  float c = 0.0f;
  ASSERT_EQ(submit(&c, r), StreamOrder::Queued::kYes);
  EXPECT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the declined call's stream was left waiting";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the declined call";
  stopper.join();
}

// stop() (the exit handler) waits a bounded time for a thread queuing a
// call, which may wait for a slot up to its deadline: one that got its slot
// after stop() gave up queued its call with no watcher left, and a decline
// then left its stream waiting for ever (found by review).
TEST_P(StreamOrderTest, ACallThatGetsItsSlotAfterStopGaveUpIsNotQueuedOnItsStream) {
  connection_.reset();
  daemon_.reset();  // for one with few slots
  daemon_ = std::make_unique<Daemon>(dir_, 0, [](daemon::ServerOptions& o) { o.slots = 8; });
  connection_ = daemon::connectTo(dir_, "stream_order_test");
  ASSERT_NE(connection_, nullptr);
  gpu_.stream.pause(true);  // earlier work still running: every slot stays in flight
  float c = 0.0f;
  for (int i = 0; i < 8; ++i)
    ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  std::optional<StreamOrder::Queued> late;
  std::thread caller([&] {
    Request r = daemon::validRequest();
    r.device = daemon::uuid(0xcd);  // a GPU this daemon does not serve: declined
    StreamCall call{r, kStream, nullptr, nullptr, &c, nullptr, EntryPoint::kSgemm};
    late = order_->submit(connection_, call, nowNs() + 5 * kSecond);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  order_->stop(kSecond / 5);  // gives up on the caller waiting for a slot
  gpu_.stream.pause(false);
  caller.join();
  ASSERT_TRUE(late.has_value());
  EXPECT_EQ(*late, StreamOrder::Queued::kHost) << "queued with no watcher left";
  EXPECT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the stream was left waiting";
}

// The same with the thread past its slot: stop() gave up while it was
// between its stream's wait and the daemon's having the call (a push waits
// for room in the ring up to the call's deadline), the watcher left, and a
// decline left the stream waiting for ever (found by review).
TEST_P(StreamOrderTest, ACallHandedToTheDaemonAfterStopGaveUpIsStillLetGoWhenDeclined) {
  gpu_.on_wait_queued = [&] { order_->stop(kSecond / 5); };  // gives up on this thread
  Request r = daemon::validRequest();
  r.device = daemon::uuid(0xcd);  // a GPU this daemon does not serve: declined
  float c = 0.0f;
  EXPECT_EQ(submit(&c, r), StreamOrder::Queued::kYes);
  gpu_.on_wait_queued = nullptr;
  EXPECT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the declined call's stream was left waiting";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the declined call";
  ASSERT_TRUE(settled(1));
  ASSERT_TRUE(outcomes()[0].direct.has_value());
  EXPECT_EQ(*outcomes()[0].direct, Fallback::kDeclined);
}

// The watcher makes no driver call, not even when its thread starts: the
// caller's stream already waits for it then, and another thread may hold
// CUDA's locks waiting for that stream (found by review: the thread was put
// in the relaxed capture mode, a driver call, as it started).
TEST_P(StreamOrderTest, TheWatcherMakesNoDriverCall) {
  Request r = daemon::validRequest();
  r.device = daemon::uuid(0xcd);  // declined: the watcher takes it over
  float c = 0.0f;
  ASSERT_EQ(submit(&c, r), StreamOrder::Queued::kYes);
  EXPECT_TRUE(gpu_.stream.drained(2 * kSecond));
  ASSERT_TRUE(settled(1));
  EXPECT_EQ(c, 42.0f);
  EXPECT_EQ(watcher_driver_calls.load(), 0);
}

// A slot's takeover word moved only at takeovers, and the kernel's test of it
// is cyclic: 2^31 calls on a slot later, every call the daemon served there
// was computed a second time by the shim's kernel (found by review).
TEST_P(StreamOrderTest, TwoToThe31CallsOnASlotLaterItsServedCallsAreStillLeftAlone) {
  // The first free slot is the one the next call takes.
  auto ticket = connection_->reserve(nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok());
  const std::uint32_t slot = ticket->slot;
  connection_->abandon(ticket.value());
  for (std::uint64_t i = 0; i < (std::uint64_t{1} << 31); ++i)
    (void)connection_->nextSeq(slot);
  float c = 0.0f;
  ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond));
  ASSERT_TRUE(settled(1));
  EXPECT_FALSE(outcomes()[0].direct.has_value()) << "not served by the daemon";
  EXPECT_EQ(gpu_.computed, 0) << "the shim's kernel computed a call the daemon ran";
  EXPECT_EQ(c, 0.0f);
}

// The event that joins the legacy stream was made per thread and again at
// each change of context, and never destroyed: a thread-per-request server,
// or one thread driving two GPUs, grew them without end (found by review).
TEST_P(StreamOrderTest, TheLegacyStreamIsJoinedWithOneEventPerContext) {
  gpu_.legacy_busy = true;
  float c = 0.0f;
  for (int i = 0; i < 20; ++i) {
    gpu_.context = reinterpret_cast<CUcontext>(i % 2 == 0 ? 0x10 : 0x11);
    ASSERT_EQ(submit(&c), StreamOrder::Queued::kYes);
  }
  for (int t = 0; t < 20; ++t) {
    std::thread([&] { EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes); }).join();
  }
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond));
  EXPECT_EQ(gpu_.events_made, 2) << "events made for two contexts";
}

// cudaDeviceReset destroys the context, and the one made next may come back
// under the same handle, without the old one's segment registration, kernel
// or events: the shim knew them by handle, and its calls failed (or used a
// stale device address) from then on.
TEST_P(StreamOrderTest, AContextMadeAgainUnderTheSameHandleGetsItsOwnSegmentKernelAndEvent) {
  gpu_.legacy_busy = true;  // each call joins the legacy stream with the context's event
  float c = 0.0f;
  // On a thread of its own, as what a thread saw last is kept per thread.
  std::thread([&] {
    EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes);
    EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes);
    EXPECT_TRUE(settled(2));
    ++gpu_.incarnation;  // the context destroyed and made again under its handle
    EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes);
    EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes);
  }).join();
  std::thread([&] { EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes); }).join();
  ASSERT_TRUE(settled(5));
  for (const StreamOutcome& outcome : outcomes()) {
    EXPECT_FALSE(outcome.direct.has_value()) << "not served by the daemon";
  }
  EXPECT_EQ(gpu_.registrations, 2) << "the segment registered in each context";
  EXPECT_EQ(gpu_.modules_loaded, 2) << "the kernel loaded in each context";
  EXPECT_EQ(gpu_.events_made, 2) << "one legacy-join event for each context";
  EXPECT_EQ(gpu_.computed, 0);
}

// Memory runs out once the caller's stream waits for the call: nothing from
// there on may need it, or the exception (a direct call, in intercept())
// would leave the stream waiting for a call the watcher does not know of.
TEST_P(StreamOrderTest, NothingAfterTheStreamWaitsNeedsMemory) {
  gpu_.on_wait_queued = [] { out_of_memory = true; };
  Request r = daemon::validRequest();
  r.device = daemon::uuid(0xcd);  // a GPU this daemon does not serve: declined
  float c = 0.0f;
  std::optional<StreamOrder::Queued> queued;
  try {
    queued = submit(&c, r);
  } catch (const std::bad_alloc&) {
  }
  out_of_memory = false;
  ASSERT_TRUE(queued.has_value()) << "an allocation failed after the stream's wait was queued";
  EXPECT_EQ(*queued, StreamOrder::Queued::kYes);
  EXPECT_TRUE(gpu_.stream.drained(2 * kSecond)) << "the declined call's stream was left waiting";
  EXPECT_EQ(c, 42.0f) << "the kernel did not compute the declined call";
}

TEST_P(StreamOrderTest, WithoutItsKernelACallIsLeftToItsCallerIfTheDaemonDoesNotFinishIt) {
  gpu_.launch_fails = true;
  float c = 0.0f;
  // The daemon finishes it: served, nothing left to the caller.
  EXPECT_EQ(submit(&c), StreamOrder::Queued::kYes);
  ASSERT_TRUE(settled(1));
  EXPECT_FALSE(outcomes()[0].direct.has_value());
  // The daemon is gone: the caller must run it (and counts it itself).
  daemon_.reset();
  EXPECT_EQ(submit(&c), StreamOrder::Queued::kCudaError);
  ASSERT_TRUE(gpu_.stream.drained(2 * kSecond));
  EXPECT_EQ(outcomes().size(), 1u) << "counted twice";
  EXPECT_EQ(gpu_.computed, 0);
}

INSTANTIATE_TEST_SUITE_P(Waits, StreamOrderTest,
                         ::testing::Values(StreamWait::kMemop, StreamWait::kKernel),
                         [](const ::testing::TestParamInfo<StreamWait>& info) {
                           return std::string(nameOf(info.param));
                         });

}  // namespace
}  // namespace stmux::shim

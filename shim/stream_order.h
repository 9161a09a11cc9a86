// Stream-ordered calls (STMUX_MODE=stream): a served call returns as soon as
// it is queued, as cuBLAS's own does, and the GPU keeps its stream's order.
//
// For each call the caller's stream gets two stream memory operations on
// words of the call's completion slot, host memory that this process and
// stmuxd share (the segment, registered with CUDA here), and a kernel:
//   write ready = seq     once the work queued before the call is done
//   wait released >= seq  before anything queued after it (a stream memory
//                         operation, or with StreamWait::kKernel a
//                         one-thread kernel polling the word)
//   the shim's own kernel computes the call if takeover >= seq
// The daemon starts the request only once it sees `ready` (it never touches
// the operands earlier, and a stream still busy holds up no batch), and on
// success stores `released` when its kernels are done; the kernel then
// returns at once. Whatever else happens (declined, the daemon gone or stuck)
// the watcher thread stores `takeover`, then `released`: the caller's stream
// is always let go, with C computed, and the shim makes no CUDA call to do it
// (shim/takeover_sgemm.cu says why that matters). That is why only calls with
// beta == 0 go this way: run again, they give the same C whether or not the
// daemon had started (or half done) them.
// docs/ARCHITECTURE.md, "Stream-ordered mode".
#pragma once

#include <cuda.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "shim/driver.h"
#include "shim/takeover_kernel.h"
#include "shim/transport.h"

namespace stmux::shim {

// What became of a stream-ordered call: served (no reason), or computed by
// the shim's kernel (the reason).
struct StreamOutcome {
  std::optional<Fallback> direct;
  EntryPoint entry = EntryPoint::kSgemm;
};
using StreamAccount = std::function<void(Connection&, const StreamOutcome&)>;

// A served call: described and routed; the rest is filled in here.
struct StreamCall {
  Request request;
  CUstream stream = nullptr;  // the handle's
  const float* a = nullptr;   // the caller's operands, should the shim run it
  const float* b = nullptr;
  float* c = nullptr;
  const float* bias = nullptr;  // with an epilogue's bias
  EntryPoint entry = EntryPoint::kSgemm;
};

// What a caller's stream waits in for `released` (STMUX_STREAM_WAIT).
enum class StreamWait { kMemop, kKernel };

class StreamOrder {
 public:
  StreamOrder(const Driver& driver, std::uint64_t timeout_ns, StreamWait wait,
              StreamAccount account);

  enum class Queued {
    kYes,        // queued: return CUBLAS_STATUS_SUCCESS
    kHost,       // stream order is not available here: serve it in host mode
    kBusy,       // no slot or ring space before the deadline: run it directly
    kCudaError,  // a driver call failed: run it directly (the stream goes on)
  };
  Queued submit(const std::shared_ptr<Connection>& connection, StreamCall& call,
                std::uint64_t deadline_ns);

  // At exit: waits up to `bound_ns` for the calls in flight to be settled
  // (counted), then stops the watcher.
  void stop(std::uint64_t bound_ns);

  void forkPrepare();
  void forkParent();
  void forkChild();

 private:
  struct InFlight {
    std::shared_ptr<Connection> connection;
    Ticket ticket;
    std::uint32_t seq = 0;
    EntryPoint entry = EntryPoint::kSgemm;
    std::uint64_t ready_ns = 0;          // when the watcher first saw the caller's stream reach it
    std::optional<Fallback> taken_over;  // given to the shim's kernel
    bool said_slow = false;              // its caller was told the daemon is slow with it
    // Set while the caller may still find that the shim's kernel could not
    // be queued: an outcome the caller must act on (and count) goes here.
    std::shared_ptr<std::optional<StreamOutcome>> report;
    // Never run by anyone (the call went direct), but the caller's stream
    // will still write `ready`: the slot is reused only once it has, so that
    // a late write never lowers the word under the slot's next request.
    bool retired = false;
  };
  // Keeps a slot whose ready write is still on its way out of use until it
  // lands (InFlight::retired). Under mutex_.
  void retireLocked(InFlight entry);
  // Adds a call to those in flight. Under mutex_.
  void trackLocked(InFlight entry);
  // Whether the watcher runs, starting it on first use; if so, counts the
  // caller among those queuing a call until `queuing` is destroyed, which
  // stop() waits for (a call queued after the watcher stopped would have
  // nobody to let its stream go).
  struct Queuing;
  bool watching(std::optional<Queuing>& queuing);
  struct Registered {
    const void* host;
    ContextId context;
    CUdeviceptr device;    // 0: cannot be used in that context
    std::uint32_t caller;  // names its calls in the kernel's gates (TakeoverParams::caller)
  };

  // The connection's segment as registered in `context`; none if it cannot be.
  std::optional<Registered> segmentOnGpu(Connection& connection, ContextId context);
  CUresult joinLegacyStream(CUstream stream, ContextId context);
  // The event that joins the legacy stream in `context`, made on first use.
  CUresult legacyEventFor(ContextId context, CUevent& event);
  Result<Ticket> reserve(Connection& connection, std::uint64_t deadline_ns);
  // Settles what it can; only the watcher (`watcher`) takes calls over.
  void reapLocked(bool watcher);
  void takeOver(InFlight& call, Fallback why);
  // The takeover kernel in `context`, loaded on first use (before the
  // context's first call, so never while one of its streams waits); its
  // function null if it cannot be.
  TakeoverKernel kernelFor(ContextId context);
  void watch();

  const Driver& driver_;
  std::uint64_t timeout_ns_;
  StreamWait wait_;
  StreamAccount account_;

  std::mutex register_mutex_;
  std::vector<Registered> registered_;  // under register_mutex_
  std::uint32_t next_caller_ = 1;       // the same

  // Apart from mutex_, which the watcher needs to let streams go: loading
  // the kernel may wait on CUDA's locks.
  std::mutex kernel_mutex_;
  std::vector<std::pair<ContextId, TakeoverKernel>> kernels_;  // never removed (but at fork)
  std::vector<std::pair<ContextId, CUevent>> legacy_events_;   // the same

  std::mutex mutex_;  // guards what follows
  std::condition_variable changed_;
  std::vector<InFlight> in_flight_;  // capacity >= size + queuing_: never shrunk
  bool watcher_started_ = false;
  bool watcher_failed_ = false;  // it could not be started: host mode from then on
  bool stopping_ = false;
  bool stopped_ = false;
  int queuing_ = 0;  // callers between watching() and their call's tracking
};

struct StreamOrder::Queuing {
  explicit Queuing(StreamOrder& order) : order(order) {}
  Queuing(const Queuing&) = delete;
  Queuing& operator=(const Queuing&) = delete;
  ~Queuing() {
    std::lock_guard lock(order.mutex_);
    --order.queuing_;
    order.changed_.notify_all();
  }
  StreamOrder& order;
};

}  // namespace stmux::shim

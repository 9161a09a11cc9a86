#include "shim/stream_order.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>

#include "shim/background.h"
#include "shim/takeover_kernel.h"
#include "stmux/gemm.h"
#include "stmux/log.h"
#include "stmux/segment.h"

namespace stmux::shim {
namespace {

// How long the watcher sleeps between looks while calls are in flight: the
// bound on noticing a daemon that died (as a waiting caller's in host mode).
constexpr std::uint64_t kWatchSliceNs = 5'000'000;
// How long a thread that found no free slot waits for one before it settles
// finished calls again.
constexpr std::uint64_t kSlotWaitNs = 50'000;
// How far a slot's takeover word may fall behind its calls (submit()).
constexpr std::uint32_t kTakeoverLagMost = 1u << 30;

}  // namespace

StreamOrder::StreamOrder(const Driver& driver, std::uint64_t timeout_ns, StreamWait wait,
                         StreamAccount account)
    : driver_(driver), timeout_ns_(timeout_ns), wait_(wait), account_(std::move(account)) {}

// The segment's address on the GPU in `context`. Registered with CUDA in
// each context the process calls from: the first registration is portable,
// so the later ones find it made (and a context destroyed with the
// registration made in it gets a new one). From the first on the segment is
// never unmapped, since a stream may still wait on it.
std::optional<StreamOrder::Registered> StreamOrder::segmentOnGpu(Connection& connection,
                                                                 ContextId context) {
  const void* host = connection.view().header();
  thread_local std::optional<Registered> seen;
  if (seen && seen->host == host && seen->context == context) return seen;

  std::lock_guard lock(register_mutex_);
  auto found = std::find_if(registered_.begin(), registered_.end(), [&](const Registered& r) {
    return r.host == host && r.context == context;
  });
  if (found == registered_.end()) {
    // Kept mapped whatever the outcome, so that no later segment can come
    // to this address and be taken for this one.
    connection.keepSegmentMapped();
    CUdeviceptr device = 0;
    CUresult result =
        driver_.cuMemHostRegister(const_cast<void*>(host), connection.view().layout().total_bytes,
                                  CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP);
    if (result == CUDA_SUCCESS || result == CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED) {
      result = driver_.cuMemHostGetDevicePointer(&device, const_cast<void*>(host), 0);
      if (result == CUDA_SUCCESS && device == 0) result = CUDA_ERROR_INVALID_VALUE;
    }
    if (result != CUDA_SUCCESS) {
      STMUX_WARN(kShim,
                 "cannot map the daemon's segment into this CUDA context (CUDA error {}); its "
                 "calls are served in host mode",
                 static_cast<int>(result));
      device = 0;
    }
    // Never 0 (no gate), nor 2^31 or more (TakeoverParams::caller).
    const std::uint32_t caller = next_caller_ < (1u << 31) ? next_caller_++ : 0;
    found = registered_.insert(registered_.end(), Registered{host, context, device, caller});
  }
  if (found->device == 0) return std::nullopt;
  seen = *found;
  return seen;
}

// The ordering guarantee's second item on the GPU (docs/ARCHITECTURE.md,
// "Stream order"): the legacy default stream's earlier work. A blocking
// stream and the per-thread default stream wait for it by CUDA's own rules,
// and the legacy stream is itself; only a non-blocking stream must be made
// to, and only while something is left on the legacy stream.
CUresult StreamOrder::joinLegacyStream(CUstream stream, ContextId context) {
  if (stream == nullptr || stream == CU_STREAM_LEGACY || stream == CU_STREAM_PER_THREAD) {
    return CUDA_SUCCESS;
  }
  unsigned flags = 0;
  if (const CUresult result = driver_.cuStreamGetFlags(stream, &flags); result != CUDA_SUCCESS) {
    return result;
  }
  if ((flags & CU_STREAM_NON_BLOCKING) == 0) return CUDA_SUCCESS;
  const CUresult idle = driver_.cuStreamQuery(CU_STREAM_LEGACY);
  if (idle != CUDA_ERROR_NOT_READY) return idle;
  CUevent event = nullptr;
  if (const CUresult result = legacyEventFor(context, event); result != CUDA_SUCCESS) {
    return result;
  }
  if (const CUresult result = driver_.cuEventRecord(event, CU_STREAM_LEGACY);
      result != CUDA_SUCCESS) {
    return result;
  }
  return driver_.cuStreamWaitEvent(stream, event, 0);
}

// One event per context for the process (made per thread before, and again
// at each change of context, none destroyed: a thread-per-request server
// grew one per thread). Two threads recording it at once is harmless: a
// stream that waits for the later record waits for more of the legacy
// stream's work, never for less.
CUresult StreamOrder::legacyEventFor(ContextId context, CUevent& event) {
  thread_local std::optional<ContextId> seen_context;
  thread_local CUevent seen_event = nullptr;
  if (context != seen_context) {
    std::lock_guard lock(kernel_mutex_);
    auto found = std::find_if(legacy_events_.begin(), legacy_events_.end(),
                              [&](const auto& e) { return e.first == context; });
    if (found == legacy_events_.end()) {
      CUevent made = nullptr;
      if (const CUresult result = driver_.cuEventCreate(&made, CU_EVENT_DISABLE_TIMING);
          result != CUDA_SUCCESS) {
        return result;
      }
      found = legacy_events_.insert(legacy_events_.end(), {context, made});
    }
    seen_context = context;
    seen_event = found->second;
  }
  event = seen_event;
  return CUDA_SUCCESS;
}

Result<Ticket> StreamOrder::reserve(Connection& connection, std::uint64_t deadline_ns) {
  // Slots of finished calls come back when calls are settled, which is done
  // here when none is free, and by the watcher.
  auto ticket = connection.reserve(nowNs());
  while (!ticket) {
    {
      std::lock_guard lock(mutex_);
      reapLocked(/*watcher=*/false);
    }
    const std::uint64_t now = nowNs();
    if (now >= deadline_ns) return ticket;
    ticket = connection.reserve(std::min(deadline_ns, now + kSlotWaitNs));
  }
  return ticket;
}

StreamOrder::Queued StreamOrder::submit(const std::shared_ptr<Connection>& connection,
                                        StreamCall& call, std::uint64_t deadline_ns) {
  Connection& conn = *connection;
  const std::optional<ContextId> current = currentContext(driver_);
  if (!current) return Queued::kHost;
  const ContextId context = *current;
  const std::optional<Registered> segment = segmentOnGpu(conn, context);
  if (!segment) return Queued::kHost;
  const TakeoverKernel kernel = kernelFor(context);
  if (kernel.function == nullptr) return Queued::kHost;
  std::optional<Queuing> queuing;  // destroyed after every lock below
  if (!watching(queuing)) return Queued::kHost;
  if (joinLegacyStream(call.stream, context) != CUDA_SUCCESS) return Queued::kCudaError;

  auto ticket = reserve(conn, deadline_ns);
  if (!ticket) return Queued::kBusy;
  {
    // stop() waits for this thread a bounded time, and reserve() may take
    // up to the call's deadline: once it gave up, no watcher is left to let
    // the stream go should the daemon decline the call.
    std::lock_guard lock(mutex_);
    if (stopping_) {
      conn.abandon(ticket.value());
      return Queued::kHost;
    }
  }
  InFlight entry;
  entry.ticket = ticket.value();
  entry.seq = conn.nextSeq(entry.ticket.slot);
  Slot& words = conn.view().slot(entry.ticket.slot);
  // The kernel's test of the takeover word is cyclic, and the word moves
  // only at takeovers: 2^31 calls on a slot later, every call served would
  // pass it and be computed again by the kernel. Kept within 2^30 behind
  // (no call still in flight on the slot is that far behind).
  if (entry.seq - words.takeover.load(std::memory_order_relaxed) > kTakeoverLagMost) {
    words.takeover.store(entry.seq - kTakeoverLagMost, std::memory_order_release);
  }
  entry.connection = connection;
  entry.entry = call.entry;
  // Made before the stream waits: from then on an exception (which
  // intercept() turns into a direct call) would leave a stream waiting that
  // nobody watches. Tracking it allocates nothing (see watching()).
  auto report = std::make_shared<std::optional<StreamOutcome>>();
  const CUdeviceptr slot = segment->device + conn.view().layout().slots_offset +
                           std::size_t{entry.ticket.slot} * sizeof(Slot);
  // The caller's stream marks `ready` and waits for `released`; once the
  // daemon and the watcher know of the call, the shim's kernel is queued
  // behind, to compute it should the shim give up on the daemon. A stream
  // memory operation waits from here; the wait kernel (STMUX_STREAM_WAIT)
  // is launched with the takeover kernel, once the daemon and the watcher
  // have the call: a launch may return only once its kernel has run
  // (CUDA_LAUNCH_BLOCKING=1), which the wait kernel does only after that.
  const CUdeviceptr released = slot + offsetof(Slot, released);
  if (driver_.cuStreamWriteValue32(call.stream, slot + offsetof(Slot, ready), entry.seq,
                                   CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS) {
    conn.abandon(entry.ticket);
    return Queued::kCudaError;
  }
  if (wait_ == StreamWait::kMemop &&
      driver_.cuStreamWaitValue32(call.stream, released, entry.seq, CU_STREAM_WAIT_VALUE_GEQ) !=
          CUDA_SUCCESS) {
    std::lock_guard lock(mutex_);
    retireLocked(std::move(entry));
    return Queued::kCudaError;
  }
  // From here on the stream may wait for this call, and the caller's other
  // threads may be inside CUDA calls that wait for the stream (cudaFree,
  // a lazy module load) holding locks any CUDA call here would queue on
  // (seen on the H200): the call must reach the daemon, and the watcher,
  // before this thread makes another CUDA call.
  call.request.flags |= kRequestStreamOrdered;
  call.request.stream_seq = entry.seq;
  if (!conn.push(call.request, entry.ticket, deadline_ns)) {
    (void)conn.cancel(entry.ticket);  // never queued: nobody else knows it
    words.released.store(entry.seq, std::memory_order_release);
    std::lock_guard lock(mutex_);
    retireLocked(std::move(entry));
    return Queued::kBusy;
  }
  const Request& r = call.request;
  TakeoverParams params{};
  params.a = call.a, params.b = call.b, params.c = call.c;
  params.bias = call.bias, params.epilogue = r.epilogue;
  params.m = r.m, params.n = r.n, params.k = r.k;
  params.lda = r.lda, params.ldb = r.ldb, params.ldc = r.ldc;
  params.count = problemsOf(r);
  params.stride_a = r.stride_a, params.stride_b = r.stride_b, params.stride_c = r.stride_c;
  params.alpha = r.alpha, params.beta = r.beta;
  params.transa = r.transa, params.transb = r.transb;
  params.takeover = reinterpret_cast<const std::uint32_t*>(slot + offsetof(Slot, takeover));
  params.seq = entry.seq;
  // The slot's own entry while this context has few connections: (caller,
  // seq) names one call of one slot, a name never given again.
  params.caller = segment->caller;
  params.gate = takeoverGate(segment->caller, entry.ticket.slot, conn.view().layout().slot_count);
  const Ticket mine = entry.ticket;
  entry.report = report;
  {
    std::lock_guard lock(mutex_);
    trackLocked(std::move(entry));
  }
  // Without its wait the kernel is not queued either: it would test the
  // takeover word before the daemon's answer.
  const bool queued =
      (wait_ == StreamWait::kMemop ||
       launchWaitKernel(driver_, kernel, call.stream, released, params.seq) == CUDA_SUCCESS) &&
      launchTakeoverKernel(driver_, kernel, call.stream, params) == CUDA_SUCCESS;
  std::unique_lock lock(mutex_);
  auto mineIn = [&] {
    return std::find_if(in_flight_.begin(), in_flight_.end(), [&](const InFlight& f) {
      return f.connection == connection && f.ticket.slot == mine.slot &&
             f.ticket.generation == mine.generation;
    });
  };
  if (queued && !stopped_) {
    if (auto found = mineIn(); found != in_flight_.end()) {
      found->report.reset();
    } else if (report->has_value()) {
      account_(conn, **report);  // taken over already: the kernel computes it
    }
    return Queued::kYes;
  }
  // No kernel behind the wait: should the shim take the call over, nothing
  // would compute it. Or no watcher left: stop() gave up waiting for this
  // thread (a push waits for room in the ring up to the call's deadline), and
  // nobody else would let the stream go should the daemon decline the call.
  // Wait until it is settled, taking it over here once the watcher is gone;
  // if the daemon did not finish it, the kernel computes it, or else the
  // caller runs it directly, behind the wait.
  while (mineIn() != in_flight_.end()) {
    reapLocked(/*watcher=*/stopped_);
    changed_.wait_for(lock, std::chrono::microseconds(20));
  }
  if (!report->has_value() || !(*report)->direct) return Queued::kYes;
  if (!queued) return Queued::kCudaError;
  account_(conn, **report);
  return Queued::kYes;
}

void StreamOrder::retireLocked(InFlight entry) {
  entry.retired = true;
  trackLocked(std::move(entry));
}

void StreamOrder::trackLocked(InFlight entry) {
  in_flight_.push_back(std::move(entry));
  if (in_flight_.size() == 1) changed_.notify_all();
}

// A stream-ordered call is queued only while the watcher runs: it alone
// lets a stream go whose call the daemon will not finish. Started with the
// first call; without it (no thread to be had, or the process exiting)
// calls are served in host mode.
bool StreamOrder::watching(std::optional<Queuing>& queuing) {
  std::lock_guard lock(mutex_);
  if (stopping_) return false;
  // Room for the entry of every caller queuing, this one included, so that
  // tracking one (after its stream waits) never allocates: each queuing
  // caller adds at most one, and in_flight_ never gives capacity back.
  in_flight_.reserve(in_flight_.size() + static_cast<std::size_t>(queuing_) + 1);
  const auto counted = [&] {
    ++queuing_;
    queuing.emplace(*this);
    return true;
  };
  if (watcher_started_) return counted();
  if (watcher_failed_) return false;
  const std::string failure =
      startBackgroundThread(driver_, "stmux-watch", /*calls_cuda=*/false, [this] { watch(); });
  if (!failure.empty()) {
    watcher_failed_ = true;
    STMUX_WARN(kShim, "cannot start the stream-order watcher ({}); calls are served in host mode",
               failure);
    return false;
  }
  watcher_started_ = true;
  return counted();
}

void StreamOrder::reapLocked(bool watcher) {
  if (in_flight_.empty()) return;
  const std::uint64_t now = nowNs();
  // Each connection asked once per look (a system call), for the first few
  // of them, in place: the watcher allocates nothing, as a bad_alloc on its
  // thread would end the process.
  struct Asked {
    const Connection* connection;
    bool alive;
  };
  std::array<Asked, 8> asked;
  std::size_t asked_count = 0;
  auto alive = [&](Connection& connection) {
    const auto end = asked.begin() + static_cast<std::ptrdiff_t>(asked_count);
    const auto found = std::find_if(asked.begin(), end,
                                    [&](const Asked& a) { return a.connection == &connection; });
    if (found != end) return found->alive;
    const bool is = connection.alive();
    if (asked_count < asked.size()) asked[asked_count++] = Asked{&connection, is};
    return is;
  };
  std::size_t kept = 0;
  for (std::size_t i = 0; i < in_flight_.size(); ++i) {
    InFlight& call = in_flight_[i];
    Connection& connection = *call.connection;
    Slot& slot = connection.view().slot(call.ticket.slot);
    bool settled = false;
    if (call.retired) {
      if (seqReached(slot.ready.load(std::memory_order_acquire), call.seq)) {
        connection.release(call.ticket);  // counted when the call went direct
        continue;
      }
    } else if (call.taken_over) {
      // As a retired call's: the slot is reused only once the caller's
      // stream has written `ready`, so that the late write never lowers the
      // word under the slot's next call.
      settled = seqReached(slot.ready.load(std::memory_order_acquire), call.seq);
    } else {
      const std::uint32_t word = slot.word.load(std::memory_order_acquire);
      const std::uint32_t generation = call.ticket.generation;
      if (word == slotWord(generation, SlotState::kDone)) {
        const std::int32_t status = slot.status.load(std::memory_order_acquire);
        if (status == kStatusSuccess) {
          settled = true;  // the daemon stored released before it said done
        } else if (watcher) {
          takeOver(call, status == kStatusExecutionFailed ? Fallback::kDaemonFailed
                                                          : Fallback::kDeclined);
        }
      } else if (watcher) {
        // Only the watcher looks for a daemon that went away or got stuck.
        if (call.ready_ns == 0 &&
            seqReached(slot.ready.load(std::memory_order_acquire), call.seq)) {
          call.ready_ns = now;
        }
        const bool running = word == slotWord(generation, SlotState::kRunning);
        if (!alive(connection)) {
          // Not started: cancelled, it is the shim's. Started: with beta == 0
          // running it again gives the same C, once the daemon's process has
          // ended (its end tears down the launch it queued, which would
          // otherwise write C whenever it ran, perhaps after the stream went
          // on); until then its stream waits.
          if (running) {
            if (connection.daemonProcess(0) != DaemonProcess::kLives) {
              takeOver(call, Fallback::kDaemonLost);
            } else if (!call.said_slow) {
              call.said_slow = true;
              STMUX_WARN(kShim,
                         "the daemon hung up during a call it started; its stream waits until "
                         "the daemon's process has ended");
            }
          } else if (connection.cancel(call.ticket)) {
            takeOver(call, Fallback::kDaemonLost);
          }
        } else if (call.ready_ns != 0 && !running && now - call.ready_ns > timeout_ns_ &&
                   connection.cancel(call.ticket)) {
          // The stream let go first: a write to stderr may block.
          takeOver(call, Fallback::kTimeout);
          connection.markStalled();
          STMUX_WARN(kShim, "the daemon did not start a call within {} ms; running it directly",
                     timeout_ns_ / 1'000'000);
        } else if (call.ready_ns != 0 && running && !call.said_slow &&
                   now - call.ready_ns > 2 * timeout_ns_) {
          // Never taken over while the daemon lives: its launch is queued on
          // its GPU and will write C whenever it runs, which after the
          // caller's stream had gone on could overwrite later work.
          call.said_slow = true;
          STMUX_ERROR(kShim,
                      "a call the daemon started has not finished in {} ms; its stream waits "
                      "for it as long as the daemon lives",
                      2 * timeout_ns_ / 1'000'000);
        }
      }
    }
    if (settled) {
      connection.release(call.ticket);
      StreamOutcome outcome;
      outcome.direct = call.taken_over;
      outcome.entry = call.entry;
      if (call.report && outcome.direct) {
        *call.report = outcome;  // its caller runs it and counts it
      } else {
        account_(connection, outcome);
      }
      continue;
    }
    if (kept != i) in_flight_[kept] = std::move(call);
    ++kept;
  }
  in_flight_.resize(kept);
  changed_.notify_all();
}

// The shim gives up on the daemon: its kernel, queued behind the caller's
// wait, computes the call, and the stream is let go. Host memory writes only:
// nothing here can block on the GPU or on CUDA's locks.
void StreamOrder::takeOver(InFlight& call, Fallback why) {
  call.taken_over = why;
  Slot& slot = call.connection->view().slot(call.ticket.slot);
  slot.takeover.store(call.seq, std::memory_order_release);
  slot.released.store(call.seq, std::memory_order_release);
}

TakeoverKernel StreamOrder::kernelFor(ContextId context) {
  thread_local std::optional<ContextId> seen_context;
  thread_local TakeoverKernel seen_kernel;
  if (seen_context == context) return seen_kernel;
  std::lock_guard lock(kernel_mutex_);
  auto found = std::find_if(kernels_.begin(), kernels_.end(),
                            [&](const auto& k) { return k.first == context; });
  if (found == kernels_.end()) {
    // Tried once per context: a failure is remembered (null), and that
    // context's calls are served in host mode.
    TakeoverKernel kernel;
    if (const CUresult result = loadTakeoverKernel(driver_, &kernel); result != CUDA_SUCCESS) {
      STMUX_WARN(kShim,
                 "cannot load the kernel that runs stream-ordered calls the daemon does not "
                 "finish (CUDA error {}); this context's calls are served in host mode",
                 static_cast<int>(result));
      kernel = TakeoverKernel{};
    }
    found = kernels_.insert(kernels_.end(), {context, kernel});
  }
  seen_context = context;
  seen_kernel = found->second;
  return seen_kernel;
}

void StreamOrder::watch() {
  std::unique_lock lock(mutex_);
  while (true) {
    changed_.wait(lock, [this] { return stopped_ || !in_flight_.empty(); });
    if (stopped_) return;
    // Read before the look, so that news after it cuts the sleep short.
    std::shared_ptr<Connection> connection = in_flight_.front().connection;
    std::atomic<std::uint32_t>& attention = connection->view().header()->attention;
    const std::uint32_t seen = attention.load(std::memory_order_seq_cst);
    reapLocked(/*watcher=*/true);
    if (in_flight_.empty()) continue;
    lock.unlock();
    futexWait(&attention, seen, kWatchSliceNs);
    lock.lock();
  }
}

void StreamOrder::stop(std::uint64_t bound_ns) {
  std::unique_lock lock(mutex_);
  stopping_ = true;
  const std::uint64_t give_up = nowNs() + bound_ns;
  while ((!in_flight_.empty() || queuing_ > 0) && watcher_started_ && nowNs() < give_up) {
    reapLocked(/*watcher=*/false);
    changed_.wait_for(lock, std::chrono::milliseconds(1));
  }
  reapLocked(/*watcher=*/false);
  if (!in_flight_.empty()) {
    STMUX_WARN(kShim, "{} stream-ordered calls still in flight at exit", in_flight_.size());
  }
  stopped_ = true;
  changed_.notify_all();
}

void StreamOrder::forkPrepare() {
  kernel_mutex_.lock();
  register_mutex_.lock();
  mutex_.lock();
}

void StreamOrder::forkParent() {
  mutex_.unlock();
  register_mutex_.unlock();
  kernel_mutex_.unlock();
}

// The child has no CUDA of its own from the parent, nor its calls.
void StreamOrder::forkChild() {
  in_flight_.clear();
  queuing_ = 0;  // the parent's threads, which the child does not have
  kernels_.clear();
  legacy_events_.clear();
  registered_.clear();
  watcher_started_ = false;
  watcher_failed_ = false;
  mutex_.unlock();
  register_mutex_.unlock();
  kernel_mutex_.unlock();
}

}  // namespace stmux::shim

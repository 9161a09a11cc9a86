// The client end of the transport: one attached connection to stmuxd.
//
// A Connection is made once (connect, hello, welcome, segment checked) and is
// then immutable; when the daemon goes away the shim drops it and makes a new
// one later. Any number of threads may submit and wait on it at once.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "stmux/config.h"
#include "stmux/segment.h"
#include "stmux/status.h"
#include "stmux/sys.h"
#include "stmux/wire.h"

namespace stmux::shim {

// STMUX_DAEMON_USER's default, from the one table.
inline constexpr std::string_view kDefaultDaemonUser = findVar("STMUX_DAEMON_USER")->default_text;

struct ConnectOptions {
  std::string socket_path;
  // Besides root and this process's own uid, the one user whose daemon this
  // process attaches to: a user name or a numeric uid (STMUX_DAEMON_USER).
  std::string daemon_user{kDefaultDaemonUser};
  Role role = Role::kTenant;
  std::string name;                          // shown by stmuxctl
  std::uint32_t version = kProtocolVersion;  // tests speak other versions
  std::uint64_t timeout_ns = 2'000'000'000;  // for the welcome
};

// A request in flight: which slot, which generation of it.
struct Ticket {
  std::uint32_t slot = 0;
  std::uint32_t generation = 0;
};

struct WaitResult {
  WaitOutcome outcome = WaitOutcome::kDone;
  std::int32_t status = kStatusInternalError;  // valid when outcome == kDone
  SlotState state = SlotState::kIdle;          // the slot's state when the wait ended
  std::uint64_t done_ns = 0;                   // with kDone: when the daemon published the status
};

// What became of the daemon's process (Connection::daemonProcess).
enum class DaemonProcess {
  kExited,   // it has ended: nothing it queued on a GPU can run any more
  kLives,    // it still runs (or is still ending)
  kUnknown,  // it cannot be watched: no pidfd (an old kernel, another pid
             // namespace and no SO_PEERPIDFD) or it is this very process
};

// True when Connection::open failed because one side refused the other: the
// daemon this process, or this process a daemon it does not trust. False when
// no daemon answered.
bool refusedToAttach(std::string_view open_error);

class Connection {
 public:
  // Connects and attaches. The error says why (no socket, refused and by what
  // reason, a daemon running as a user it does not trust, a segment this
  // library does not understand, ...).
  static Result<std::unique_ptr<Connection>> open(const ConnectOptions& options);

  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  // Takes a free slot, fills in request.slot and request.generation, arms the
  // slot and pushes the request. Gives up (busy) when no slot or ring space
  // comes free before `deadline_ns`.
  Result<Ticket> submit(Request& request, std::uint64_t deadline_ns);
  // submit() in two steps, for a caller with work to do between them: a
  // free slot, armed; then the request pushed for it. After a failed push
  // the slot is still the caller's, to abandon(). push() fails (false) when
  // the ring stays full until `deadline_ns` or the daemon is gone, and
  // allocates nothing: stream-ordered mode pushes after the caller's stream
  // waits, when an exception would leave that stream waiting.
  Result<Ticket> reserve(std::uint64_t deadline_ns);
  [[nodiscard]] bool push(Request& request, const Ticket& ticket, std::uint64_t deadline_ns);
  // The next stream sequence number of a slot the caller holds: one more
  // than the slot's last, so its ready and released words only ever rise.
  std::uint32_t nextSeq(std::uint32_t slot) { return ++seqs_[slot]; }

  // Waits for a submitted request to be done, until `deadline_ns`, or until the
  // daemon is found gone.
  WaitResult wait(const Ticket& ticket, std::uint64_t deadline_ns, std::uint64_t spin_ns);

  // Gives up on a request the daemon has not started. False once it started.
  bool cancel(const Ticket& ticket);
  // The status the daemon published for the request, if it has.
  std::optional<std::int32_t> published(const Ticket& ticket);

  // Returns the slot for reuse; after kDone or a successful cancel only.
  void release(const Ticket& ticket);
  // Hands back a slot reserved but never pushed.
  void abandon(const Ticket& ticket);

  // False once the daemon closed the socket (exited, crashed, was killed).
  bool alive();
  // After the hang-up: whether the daemon's process has ended, waiting for
  // that until `until_ns` at most (0: only looks). Its socket closes while it
  // exits, before the driver (on a plain context) has torn down what it
  // queued on its GPU; a claimed call is run again only once it has ended.
  // Allocates nothing.
  DaemonProcess daemonProcess(std::uint64_t until_ns);
  // Whether a look (alive()) found the daemon gone; no system call.
  bool gone() const { return gone_.load(std::memory_order_relaxed); }
  // A call waited STMUX_TIMEOUT_MS and the daemon had not started it: the
  // daemon is taken for stopped (SIGSTOP, a frozen cgroup, a stuck
  // executor), and the shim detaches at its next call rather than have each
  // call wait as long (Shim::connection).
  void markStalled() { stalled_.store(true, std::memory_order_relaxed); }
  bool stalled() const { return stalled_.load(std::memory_order_relaxed); }
  // True when the daemon asked clients to submit nothing new.
  bool draining() const { return view_.header()->draining.load(std::memory_order_acquire) != 0; }
  // Other tenants of the daemon that made calls in the last second.
  std::uint32_t otherTenants() const {
    return view_.header()->other_tenants.load(std::memory_order_relaxed);
  }
  // Whether the daemon says this tenant may spin while it waits, when
  // tenants outnumber cores (STMUX_SPINNING_TENANTS).
  bool maySpin() const { return view_.header()->may_spin.load(std::memory_order_relaxed) != 0; }
  // The daemon's route for its tenants on MPS (kFleetDirect, kFleetLook).
  std::uint32_t fleetRoute() const {
    return view_.header()->fleet_route.load(std::memory_order_relaxed);
  }

  // In a fork child: closes this process's copies of the socket, doorbell and
  // segment without a word to the daemon (the connection is the parent's).
  void abandonAfterFork();

  // The segment is registered with CUDA and GPU streams may still wait on
  // its words: it is never unmapped, not even when this connection ends
  // (one segment per daemon this process attached to).
  void keepSegmentMapped() { keep_mapped_.store(true, std::memory_order_relaxed); }

  // Tells the daemon these allocations are gone; best effort, never blocks.
  Status sendRelease(const std::vector<std::uint64_t>& alloc_ids);

  ClientCounters& counters() const { return view_.header()->counters; }
  // How this process's threads wait for the GPU (STMUX_SYNC), for stmuxctl.
  std::atomic<std::uint32_t>& syncWord() const { return view_.header()->sync; }
  const std::vector<Uuid>& devices() const { return devices_; }
  // Whether the daemon's context on devices()[i] is on MPS.
  bool deviceOnMps(std::size_t i) const { return i < device_mps_.size() && device_mps_[i] != 0; }
  std::uint32_t clientId() const { return client_id_; }
  std::uint32_t slotCount() const { return view_.layout().slot_count; }
  int socketFd() const { return socket_.get(); }
  SegmentView& view() { return view_; }

 private:
  Connection() = default;
  void ringDoorbell();

  UniqueFd socket_;
  UniqueFd doorbell_;
  UniqueFd daemon_process_;  // a pidfd of the daemon's process, if one could be had
  Mapping mapping_;
  SegmentView view_;
  RingProducer<Request> producer_;
  std::uint32_t client_id_ = 0;
  std::vector<Uuid> devices_;
  std::vector<std::uint8_t> device_mps_;
  std::atomic<bool> gone_{false};
  std::atomic<bool> stalled_{false};
  std::atomic<bool> keep_mapped_{false};
  std::vector<std::uint32_t> seqs_;  // per slot: its last stream sequence number

  std::mutex free_mutex_;
  std::condition_variable free_cv_;
  std::vector<std::uint32_t> free_slots_;
};

}  // namespace stmux::shim

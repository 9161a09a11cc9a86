#include "shim/transport.h"

#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "stmux/control.h"
#include "stmux/log.h"

namespace stmux::shim {
namespace {

// How often a sleeping waiter checks that the daemon is still there: the bound
// on noticing a daemon killed with SIGKILL.
constexpr std::uint64_t kAliveSliceNs = 5'000'000;

// How every refusal of a daemon by this process begins (refusedToAttach).
constexpr std::string_view kRefusing = "refusing the daemon at ";

// What the daemon seals a segment with; see checkSegmentFile.
constexpr int kSegmentSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

// The uid a STMUX_DAEMON_USER value names: all digits is a uid, anything else
// a user name. The error completes "STMUX_DAEMON_USER=x ...".
Result<uid_t> resolveUser(const std::string& user) {
  if (user.empty()) return Status::error("is empty");
  std::uint32_t uid = 0;
  const char* end = user.data() + user.size();
  if (auto [ptr, ec] = std::from_chars(user.data(), end, uid); ec == std::errc() && ptr == end) {
    return static_cast<uid_t>(uid);
  }
  const long hint = ::sysconf(_SC_GETPW_R_SIZE_MAX);
  std::vector<char> buffer(hint > 0 ? static_cast<std::size_t>(hint) : 16384);
  passwd entry{};
  passwd* found = nullptr;
  int rc;
  while ((rc = ::getpwnam_r(user.c_str(), &entry, buffer.data(), buffer.size(), &found)) == EINTR ||
         (rc == ERANGE && buffer.size() < (std::size_t{1} << 20))) {
    if (rc == ERANGE) buffer.resize(buffer.size() * 2);
  }
  // Some NSS modules say "no such user" with an error rather than no entry.
  if (found == nullptr && (rc == 0 || rc == ENOENT || rc == ESRCH)) {
    return Status::error("names no user");
  }
  if (found == nullptr) {
    return Status::error(fmt::format("could not be looked up: {}", std::strerror(rc)));
  }
  return found->pw_uid;
}

// A daemon receives CUDA IPC handles to this process's GPU memory, writes into
// that memory and hands over memory this process maps; whoever can listen at
// STMUX_SOCKET (a path in the environment, a stale /run/stmux) could pose as
// one. Trusted: root, this process's own uid (a daemon it could have started
// itself gains nothing) and the service user. SO_PEERCRED gives the daemon's
// effective uid when it called listen(), so this process's effective uid is
// the one compared.
Result<ucred> daemonCredentials(int sock, const ConnectOptions& options) {
  ucred cred{};
  socklen_t length = sizeof(cred);
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0) {
    return Status::error(fmt::format("{}{}: cannot read its credentials: {}", kRefusing,
                                     options.socket_path, std::strerror(errno)));
  }
  return cred;
}

Status checkDaemonUid(const ucred& cred, const ConnectOptions& options) {
  const uid_t self = ::geteuid();
  if (cred.uid == 0 || cred.uid == self) return Status::okStatus();
  // Looked up only now: a daemon running as root or as this process's uid
  // needs no passwd lookup, which may be slow or remote (NSS).
  auto service = resolveUser(options.daemon_user);
  if (service && service.value() == cred.uid) return Status::okStatus();
  std::string accepted = self == 0 ? std::string("0 (root, this process)")
                                   : fmt::format("0 (root), {} (this process)", self);
  accepted +=
      service ? fmt::format(", {} (STMUX_DAEMON_USER={})", service.value(), options.daemon_user)
              : fmt::format("; STMUX_DAEMON_USER={} {}", options.daemon_user, service.message());
  return Status::error(fmt::format("{}{}: it runs as uid {}, accepted: {}", kRefusing,
                                   options.socket_path, cred.uid, accepted));
}

// A pidfd of the daemon's process, to learn when it has ended
// (Connection::daemonProcess). Both SO_PEERCRED and SO_PEERPIDFD name the
// process that called listen(), which is stmuxd itself: it makes its socket
// (a socket passed by systemd's activation would name pid 1, which is not
// watched). The socket's own pidfd (SO_PEERPIDFD, Linux 6.5) names it in any
// pid namespace; else one is opened by its pid, still the daemon's as the
// socket is still open (pid reuse needs the process gone). None for a daemon
// in this very process: it cannot be outlived.
UniqueFd watchDaemonProcess(int sock, const ucred& cred) {
  if (cred.pid == ::getpid() || cred.pid == 1) return {};
#if defined(SO_PEERPIDFD)
  constexpr int kPeerPidfd = SO_PEERPIDFD;
#elif defined(__x86_64__) || defined(__aarch64__)
  constexpr int kPeerPidfd = 77;  // asm-generic/socket.h; older headers lack it
#else
  constexpr int kPeerPidfd = -1;
#endif
  int pidfd = -1;
  socklen_t length = sizeof(pidfd);
  if (kPeerPidfd >= 0 && ::getsockopt(sock, SOL_SOCKET, kPeerPidfd, &pidfd, &length) == 0 &&
      pidfd >= 0) {
    return UniqueFd(pidfd);
  }
  if (cred.pid <= 0) return {};  // not in this pid namespace
  return UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, cred.pid, 0)));
}

// Whether `fd` is a pidfd: signal 0 through it is refused as a bad
// descriptor for anything else, and allowed, refused for permission or for
// a process gone for a pidfd. Nothing where this process cannot tell (a
// seccomp filter answering ENOSYS for the system call).
std::optional<bool> isPidfd(int fd) {
  if (::syscall(SYS_pidfd_send_signal, fd, 0, nullptr, 0) == 0) return true;
  if (errno == EPERM || errno == ESRCH) return true;
  if (errno == ENOSYS) return std::nullopt;
  return false;
}

std::string sealNames(int seals) {
  std::string names;
  for (auto [seal, name] : {std::pair{F_SEAL_SHRINK, "F_SEAL_SHRINK"},
                            {F_SEAL_GROW, "F_SEAL_GROW"},
                            {F_SEAL_SEAL, "F_SEAL_SEAL"}}) {
    if ((seals & seal) != 0) names += (names.empty() ? "" : ", ") + std::string(name);
  }
  return names;
}

// This process maps the segment and touches it in every call: a file shrunk
// under the mapping kills it with SIGBUS at the next touch. So the segment
// must be a memfd whose size is sealed for good, exactly the size announced.
// The seals come first: they are what makes the size checked next final.
Status checkSegmentFile(int fd, std::uint64_t welcome_bytes) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    return Status::error(
        fmt::format("its segment is not a sealed memfd (F_GET_SEALS: {})", std::strerror(errno)));
  }
  if ((seals & kSegmentSeals) != kSegmentSeals) {
    return Status::error(fmt::format(
        "its segment is not sealed with {} (its seals: {:#x}), so its size could change under "
        "this process",
        sealNames(kSegmentSeals & ~seals), seals));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    return Status::error(fmt::format("fstat of its segment failed: {}", std::strerror(errno)));
  }
  if (static_cast<std::uint64_t>(st.st_size) != welcome_bytes) {
    return Status::error(
        fmt::format("its segment is {} bytes, the welcome says {}", st.st_size, welcome_bytes));
  }
  return Status::okStatus();
}

// Every submitting thread writes the doorbell: anything but an eventfd could
// block it (a pipe nobody drains) or carry the bytes elsewhere. /proc names
// what a descriptor is; without it the doorbell cannot be checked, and the
// daemon is refused.
Status checkDoorbell(int fd) {
  const std::string path = fmt::format("/proc/self/fd/{}", fd);
  char target[256];
  const ssize_t n = ::readlink(path.c_str(), target, sizeof(target));
  if (n < 0) {
    return Status::error(
        fmt::format("cannot tell what its doorbell is ({}: {})", path, std::strerror(errno)));
  }
  const std::string_view what(target, static_cast<std::size_t>(n));
  if (what != "anon_inode:[eventfd]") {
    return Status::error(fmt::format("its doorbell is {}, not an eventfd", what));
  }
  return Status::okStatus();
}

}  // namespace

bool refusedToAttach(std::string_view open_error) {
  return open_error.starts_with("the daemon refused") || open_error.starts_with(kRefusing);
}

Result<std::unique_ptr<Connection>> Connection::open(const ConnectOptions& options) {
  auto address = socketAddress(options.socket_path);
  if (!address) return address.status();
  UniqueFd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!sock.valid()) {
    return Status::error(fmt::format("socket() failed: {}", std::strerror(errno)));
  }
  const int rc = connectWithin(sock.get(), address.value(), options.timeout_ns);
  if (rc < 0 && errno == EAGAIN) {
    return Status::error(fmt::format("the daemon at {} did not take the connection within {} ms",
                                     options.socket_path,
                                     (options.timeout_ns + 999'999) / 1'000'000));
  }
  if (rc < 0) {
    return Status::error(
        fmt::format("cannot connect to {}: {}", options.socket_path, std::strerror(errno)));
  }
  // Before the hello: an untrusted daemon learns nothing, not even the pid.
  auto cred = daemonCredentials(sock.get(), options);
  if (!cred) return cred.status();
  STMUX_TRY(checkDaemonUid(cred.value(), options));
  UniqueFd daemon_process = watchDaemonProcess(sock.get(), cred.value());

  auto hello = makeMessage<HelloMsg>(MsgType::kHello);
  hello.header.version = options.version;
  hello.pid = static_cast<std::int32_t>(::getpid());
  hello.role = static_cast<std::uint32_t>(options.role);
  setField(hello.name, options.name);
  STMUX_TRY(sendMessage(sock.get(), &hello, sizeof(hello)));

  auto received = awaitMessage(sock.get(), options.timeout_ns);
  if (!received) return received.status();
  if (received->would_block) {
    return Status::error(fmt::format("the daemon did not answer within {} ms",
                                     (options.timeout_ns + 999'999) / 1'000'000));
  }
  if (received->eof) return Status::error("the daemon closed the connection without an answer");
  if (received->truncated) return Status::error("the daemon's answer was cut off");
  MsgHeader header;
  STMUX_TRY(checkHeader(received.value(), header));
  if (header.type == static_cast<std::uint32_t>(MsgType::kRefuse)) {
    RefuseMsg refuse;
    if (received->bytes.size() != sizeof(refuse)) {
      return Status::error(fmt::format("the daemon refused (protocol {}) in a message of {} bytes",
                                       header.version, received->bytes.size()));
    }
    std::memcpy(&refuse, received->bytes.data(), sizeof(refuse));
    return Status::error(fmt::format("the daemon refused: {}", fieldString(refuse.reason)));
  }
  if (header.version != options.version) {
    return Status::error(fmt::format("the daemon speaks protocol {}, this library speaks {}",
                                     header.version, options.version));
  }
  WelcomeMsg welcome;
  STMUX_TRY(decodeMessage(received.value(), MsgType::kWelcome, welcome));
  if (received->fds.size() != 2 && received->fds.size() != 3) {
    return Status::error(
        fmt::format("the welcome carried {} descriptors, expected 2 or 3", received->fds.size()));
  }
  if (welcome.device_count > kMaxDevices) {
    return Status::error(fmt::format("the welcome lists {} devices", welcome.device_count));
  }

  std::unique_ptr<Connection> connection(new Connection());
  UniqueFd memfd = std::move(received->fds[0]);
  auto refuse = [&](const Status& why) {
    return Status::error(fmt::format("{}{}: {}", kRefusing, options.socket_path, why.message()));
  };
  if (Status why = checkSegmentFile(memfd.get(), welcome.segment_bytes); !why.ok()) {
    return refuse(why);
  }
  if (Status why = checkDoorbell(received->fds[1].get()); !why.ok()) return refuse(why);
  // The daemon's own pidfd, where its kernel has them: it names the daemon's
  // process in any pid namespace and under systemd's socket activation,
  // where the socket's peer is pid 1, or is not in this pid namespace at all
  // (a tenant pod without hostPID on a kernel before SO_PEERPIDFD: its
  // calls were run again while a killed daemon's launch could still write C;
  // found by review).
  if (received->fds.size() == 3) {
    const std::optional<bool> pidfd = isPidfd(received->fds[2].get());
    if (pidfd == false)
      return refuse(Status::error("the welcome's third descriptor is not a pidfd"));
    // None for a daemon in this very process, as for its socket's pid; and
    // not one this process cannot tell from another descriptor.
    if (pidfd == true && cred->pid != ::getpid()) daemon_process = std::move(received->fds[2]);
  }
  if (welcome.segment_bytes < sizeof(SegmentHeader)) {
    return Status::error(fmt::format("the segment is {} bytes, smaller than its header ({})",
                                     welcome.segment_bytes, sizeof(SegmentHeader)));
  }
  auto mapping = mapShared(memfd.get(), welcome.segment_bytes);
  if (!mapping) return mapping.status();
  auto layout =
      checkSegment(mapping->base(), mapping->bytes(), welcome.slot_count, welcome.client_id);
  if (!layout) return Status::error(fmt::format("refusing the segment: {}", layout.message()));

  connection->socket_ = std::move(sock);
  connection->doorbell_ = std::move(received->fds[1]);
  connection->daemon_process_ = std::move(daemon_process);
  connection->mapping_ = std::move(mapping).value();
  connection->view_ = SegmentView(connection->mapping_.base(), layout.value());
  connection->producer_ = RingProducer<Request>(connection->view_.ringHeader(),
                                                connection->view_.cells(), layout->ring_capacity);
  connection->client_id_ = welcome.client_id;
  connection->devices_.assign(welcome.devices, welcome.devices + welcome.device_count);
  connection->device_mps_.assign(welcome.device_mps, welcome.device_mps + welcome.device_count);
  connection->seqs_.assign(layout->slot_count, 0);
  connection->free_slots_.reserve(layout->slot_count);
  for (std::uint32_t i = layout->slot_count; i > 0; --i)
    connection->free_slots_.push_back(i - 1);
  return connection;
}

Connection::~Connection() {
  if (keep_mapped_.load(std::memory_order_relaxed)) mapping_.leak();
}

Result<Ticket> Connection::submit(Request& request, std::uint64_t deadline_ns) {
  auto ticket = reserve(deadline_ns);
  if (!ticket) return ticket.status();
  if (!push(request, ticket.value(), deadline_ns)) {
    abandon(ticket.value());
    return Status::error("the request ring stayed full");
  }
  return ticket;
}

Result<Ticket> Connection::reserve(std::uint64_t deadline_ns) {
  Ticket ticket;
  {
    std::unique_lock lock(free_mutex_);
    while (free_slots_.empty()) {
      const std::uint64_t now = nowNs();
      if (now >= deadline_ns) return Status::error("no request slot came free in time");
      free_cv_.wait_for(lock, std::chrono::nanoseconds(deadline_ns - now));
    }
    ticket.slot = free_slots_.back();
    free_slots_.pop_back();
  }
  ticket.generation = slotArm(view_.slot(ticket.slot));
  return ticket;
}

bool Connection::push(Request& request, const Ticket& ticket, std::uint64_t deadline_ns) {
  request.slot = ticket.slot;
  request.generation = ticket.generation;
  request.submit_ns = nowNs();
  while (!producer_.tryPush(request)) {
    // Full: the daemon is behind or stale cancelled entries fill the ring.
    if (nowNs() >= deadline_ns || !alive()) return false;
    ringDoorbell();
    ::sched_yield();
  }
  ringDoorbell();
  return true;
}

void Connection::ringDoorbell() {
  // Pairs with the daemon's store to consumer_sleeping and its final look at
  // the ring before it sleeps (ring.h).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (view_.header()->consumer_sleeping.load(std::memory_order_relaxed) != 0) {
    const std::uint64_t one = 1;
    // EAGAIN means the counter is saturated: the daemon will wake anyway.
    [[maybe_unused]] ssize_t n = ::write(doorbell_.get(), &one, sizeof(one));
  }
}

WaitResult Connection::wait(const Ticket& ticket, std::uint64_t deadline_ns,
                            std::uint64_t spin_ns) {
  Slot& slot = view_.slot(ticket.slot);
  std::uint32_t last = 0;
  WaitResult result;
  result.outcome = slotWait(
      slot, ticket.generation, deadline_ns, spin_ns, kAliveSliceNs, [this] { return alive(); },
      last);
  result.state = slotState(last);
  if (result.outcome == WaitOutcome::kDone) {
    result.status = slot.status.load(std::memory_order_acquire);
    result.done_ns = slot.done_ns.load(std::memory_order_relaxed);
  }
  return result;
}

std::optional<std::int32_t> Connection::published(const Ticket& ticket) {
  const Slot& slot = view_.slot(ticket.slot);
  if (slot.word.load(std::memory_order_acquire) != slotWord(ticket.generation, SlotState::kDone)) {
    return std::nullopt;
  }
  return slot.status.load(std::memory_order_acquire);
}

bool Connection::cancel(const Ticket& ticket) {
  return slotCancel(view_.slot(ticket.slot), ticket.generation);
}

void Connection::release(const Ticket& ticket) {
  {
    std::lock_guard lock(free_mutex_);
    free_slots_.push_back(ticket.slot);
  }
  free_cv_.notify_one();
}

// Never published, so nobody else knows this generation: cancel it so the
// slot's word is consistent, then hand the slot back.
void Connection::abandon(const Ticket& ticket) {
  (void)slotCancel(view_.slot(ticket.slot), ticket.generation);
  release(ticket);
}

bool Connection::alive() {
  if (gone_.load(std::memory_order_relaxed)) return false;
  // The hang-up itself, whatever is queued ahead of it: a peek at the next
  // message saw none behind a message the shim never reads (found by review).
  pollfd peer{socket_.get(), POLLRDHUP, 0};
  const int n = ::poll(&peer, 1, 0);
  if ((n < 0 && errno != EINTR) ||
      (n > 0 && (peer.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0)) {
    gone_.store(true, std::memory_order_relaxed);
    return false;
  }
  return true;
}

DaemonProcess Connection::daemonProcess(std::uint64_t until_ns) {
  if (!daemon_process_.valid()) return DaemonProcess::kUnknown;
  // A pidfd is readable once its process has ended.
  switch (awaitReadable(daemon_process_.get(), until_ns)) {
    case 1:
      return DaemonProcess::kExited;
    case 0:
      return DaemonProcess::kLives;
    default:
      return DaemonProcess::kUnknown;
  }
}

void Connection::abandonAfterFork() {
  gone_.store(true, std::memory_order_relaxed);
  socket_.reset();
  doorbell_.reset();
  daemon_process_.reset();
  mapping_.reset();
}

Status Connection::sendRelease(const std::vector<std::uint64_t>& alloc_ids) {
  for (std::size_t first = 0; first < alloc_ids.size(); first += kMaxReleaseIds) {
    auto msg = makeMessage<ReleaseMsg>(MsgType::kRelease);
    const std::size_t count = std::min(kMaxReleaseIds, alloc_ids.size() - first);
    msg.count = static_cast<std::uint32_t>(count);
    std::memcpy(msg.alloc_ids, alloc_ids.data() + first, count * sizeof(std::uint64_t));
    STMUX_TRY(sendMessage(socket_.get(), &msg, sizeof(msg)));
  }
  return Status::okStatus();
}

}  // namespace stmux::shim

#include "shim/transport.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "stmux/control.h"
#include "stmux/log.h"

namespace stmux::shim {
namespace {

// How often a sleeping waiter checks that the daemon is still there: the bound
// on noticing a daemon killed with SIGKILL.
constexpr std::uint64_t kAliveSliceNs = 5'000'000;

}  // namespace

Result<std::unique_ptr<Connection>> Connection::open(const ConnectOptions& options) {
  auto address = socketAddress(options.socket_path);
  if (!address) return address.status();
  UniqueFd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!sock.valid()) {
    return Status::error(fmt::format("socket() failed: {}", std::strerror(errno)));
  }
  int rc;
  do {
    rc = ::connect(sock.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                   sizeof(sockaddr_un));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    return Status::error(
        fmt::format("cannot connect to {}: {}", options.socket_path, std::strerror(errno)));
  }

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
  if (received->fds.size() != 2) {
    return Status::error(
        fmt::format("the welcome carried {} descriptors, expected 2", received->fds.size()));
  }
  if (welcome.device_count > kMaxDevices) {
    return Status::error(fmt::format("the welcome lists {} devices", welcome.device_count));
  }

  std::unique_ptr<Connection> connection(new Connection());
  UniqueFd memfd = std::move(received->fds[0]);
  struct stat st {};
  if (::fstat(memfd.get(), &st) != 0) {
    return Status::error(fmt::format("fstat of the segment failed: {}", std::strerror(errno)));
  }
  if (static_cast<std::uint64_t>(st.st_size) < welcome.segment_bytes ||
      welcome.segment_bytes < sizeof(SegmentHeader)) {
    return Status::error(fmt::format("the segment is {} bytes, the welcome says {}", st.st_size,
                                     welcome.segment_bytes));
  }
  auto mapping = mapShared(memfd.get(), welcome.segment_bytes);
  if (!mapping) return mapping.status();
  auto layout =
      checkSegment(mapping->base(), mapping->bytes(), welcome.slot_count, welcome.client_id);
  if (!layout) return Status::error(fmt::format("refusing the segment: {}", layout.message()));

  connection->socket_ = std::move(sock);
  connection->doorbell_ = std::move(received->fds[1]);
  connection->mapping_ = std::move(mapping).value();
  connection->view_ = SegmentView(connection->mapping_.base(), layout.value());
  connection->producer_ = RingProducer<Request>(connection->view_.ringHeader(),
                                                connection->view_.cells(), layout->ring_capacity);
  connection->client_id_ = welcome.client_id;
  connection->devices_.assign(welcome.devices, welcome.devices + welcome.device_count);
  connection->free_slots_.reserve(layout->slot_count);
  for (std::uint32_t i = layout->slot_count; i > 0; --i)
    connection->free_slots_.push_back(i - 1);
  return connection;
}

Connection::~Connection() = default;

Result<Ticket> Connection::submit(Request& request, std::uint64_t deadline_ns) {
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
  request.slot = ticket.slot;
  request.generation = ticket.generation;
  while (!producer_.tryPush(request)) {
    // Full: the daemon is behind or stale cancelled entries fill the ring.
    if (nowNs() >= deadline_ns || !alive()) {
      // Never published, so nobody else knows this generation: cancel it so
      // the slot's word is consistent, then hand the slot back.
      (void)slotCancel(view_.slot(ticket.slot), ticket.generation);
      release(ticket);
      return Status::error("the request ring stayed full");
    }
    ringDoorbell();
    ::sched_yield();
  }
  ringDoorbell();
  return ticket;
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
  }
  return result;
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

bool Connection::alive() {
  if (gone_.load(std::memory_order_relaxed)) return false;
  char byte;
  const ssize_t n = ::recv(socket_.get(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
    gone_.store(true, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void Connection::abandonAfterFork() {
  gone_.store(true, std::memory_order_relaxed);
  socket_.reset();
  doorbell_.reset();
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

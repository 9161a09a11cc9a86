#include "daemon/server.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>

#include "stmux/control.h"
#include "stmux/json.h"
#include "stmux/log.h"
#include "stmux/mps_seats.h"

namespace stmux::daemon {
namespace {

// While busy, the control socket and doorbells are looked at this often.
constexpr std::uint64_t kControlPeriodNs = 100'000;
// How often each client learns how many other tenants are active, and how
// long after its last call a tenant still counts as active.
constexpr std::uint64_t kCompanyPeriodNs = 100'000'000;
constexpr std::uint64_t kActiveNs = 1'000'000'000;
// Requests taken from one user's clients' rings in a turn of the loop,
// however many clients it has. Per client, 16 clients of one user flooding
// requests that each cost the scheduler an open to try took 16 times
// another tenant's share of the loop, and that tenant to 0.03x of its
// calls/s (H100, stmux-fault dos).
constexpr int kBurst = 64;
// A status reader gets this long to take the whole reply, and this many may
// be served at once; the rest are refused.
constexpr std::uint64_t kReplyTimeoutNs = 5'000'000'000;
constexpr std::size_t kMaxReplies = 16;
// And this many to one uid at once, so that one user's readers that take
// nothing cannot keep every other (an operator, a liveness probe) out.
constexpr std::size_t kMaxRepliesPerUid = 4;
// A status built is given to later queries for up to this many times the
// CPU time its build took (1,000 clients: ~5 ms, so for 100 ms): a flood of
// queries then costs the server thread at most a twentieth of its time,
// where each built anew held the tenants' rings up for the whole flood.
// CPU time, not the clock's: a build whose thread lost its core for a
// while cost the server no more, and timed by the clock it was served for
// 20 times the wait (a loaded CI machine's ASan run read one status,
// built before a flood, for all 20 of a test's reads).
constexpr std::uint64_t kStatusReuseFactor = 20;
// ... and never for longer than this: a build that used half a second of
// CPU (a debug build, tens of thousands of clients) would serve a status
// 10 s old.
constexpr std::uint64_t kMostStatusReuseNs = 100'000'000;
// Connections accepted that have not said hello yet: at most this many, and
// this many per uid, so that one user's flood of silent connections neither
// grows the daemon nor keeps others (stmuxctl, tenants) out.
constexpr std::size_t kMaxPending = 64;
constexpr std::size_t kMaxPendingPerUid = 8;
// Out of descriptors (or memory): look at the listening socket again after
// this long, rather than spin on it while it stays readable.
constexpr std::uint64_t kAcceptBackoffNs = 100'000'000;
// Connections accepted in one turn of the loop at most: a flood of them
// (garbage hellos at full speed, measured by stmux-fault dos) would otherwise
// keep the loop in accept() and away from the tenants' rings. The listening
// socket stays readable, so the rest wait for the next turn.
constexpr int kMaxAcceptsPerTurn = 16;
// How long the check for a daemon already at the socket path waits for it to
// take the connection.
constexpr std::uint64_t kProbeTimeoutNs = 1'000'000'000;
// Control messages (release notices) read from one user's clients per turn,
// however many clients it has (kBurst says why).
constexpr int kMaxMessagesPerTurn = 16;

enum Tag : std::uint64_t {
  kTagListen = 1,
  kTagPending,
  kTagSocket,
  kTagDoorbell,
  kTagSinkWake,
  kTagStop,
  kTagReply
};

std::uint64_t tag(Tag kind, std::uint64_t id) {
  return (std::uint64_t{kind} << 56) | id;
}
Tag tagKind(std::uint64_t value) {
  return static_cast<Tag>(value >> 56);
}
std::uint64_t tagId(std::uint64_t value) {
  return value & ((std::uint64_t{1} << 56) - 1);
}

// EPOLL_CTL_ADD or EPOLL_CTL_MOD.
void epollSet(int epoll, int op, int fd, std::uint32_t events, std::uint64_t data) {
  epoll_event event{};
  event.events = events;
  event.data.u64 = data;
  if (::epoll_ctl(epoll, op, fd, &event) != 0) {
    STMUX_ERROR(kTransport, "epoll_ctl({}, fd {}) failed: {}", op == EPOLL_CTL_ADD ? "ADD" : "MOD",
                fd, std::strerror(errno));
  }
}

void epollAdd(int epoll, int fd, std::uint32_t events, std::uint64_t data) {
  epollSet(epoll, EPOLL_CTL_ADD, fd, events, data);
}

void epollDel(int epoll, int fd) {
  if (fd >= 0) ::epoll_ctl(epoll, EPOLL_CTL_DEL, fd, nullptr);
}

void drainEventfd(int fd) {
  std::uint64_t value;
  while (::read(fd, &value, sizeof(value)) > 0) {
  }
}

// SO_PASSRIGHTS (Linux 6.16), where the C library's headers predate it;
// the value of asm-generic/socket.h, which x86-64 and arm64 use.
#ifdef SO_PASSRIGHTS
constexpr int kSoPassRights = SO_PASSRIGHTS;
#else
constexpr int kSoPassRights = 83;
#endif

// Descriptors a client passed the daemon (none is ever wanted): a socket's
// linger is turned off, so that its close does not wait for its unsent
// data, and each is closed aside (a file whose close waits otherwise, on a
// FUSE mount the tenant serves, keeps the closer's thread waiting, not the
// server's).
void dropPassed(std::vector<UniqueFd>& fds) {
  for (UniqueFd& fd : fds) {
    struct stat st {};
    if (::fstat(fd.get(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      const linger off{0, 0};
      (void)::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &off, sizeof(off));
    }
    closeAside(std::move(fd));
  }
  fds.clear();
}

}  // namespace

struct Server::Pending {
  std::uint64_t id = 0;
  AsideFd socket;
  uid_t uid = 0;
  std::uint64_t deadline_ns = 0;
};

struct Server::Reply {
  std::uint64_t id = 0;
  std::uint32_t uid = 0;
  AsideFd socket;
  std::shared_ptr<const std::string> json;
  std::size_t sent = 0;  // bytes of json sent
  std::uint64_t deadline_ns = 0;
};

Server::Server(ServerOptions options, RequestSink& sink)
    : options_(std::move(options)),
      sink_(sink),
      layout_(SegmentLayout::compute(options_.slots)),
      stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      fleet_(options_.fleet) {}

void Server::requestStop() {
  stop_.store(true, std::memory_order_relaxed);
  const std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(stop_fd_.get(), &one, sizeof(one));
}

Server::~Server() {
  if (listen_.valid()) ::unlink(options_.socket_path.c_str());
}

Status Server::listen() {
  own_pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  auto address = socketAddress(options_.socket_path);
  if (!address) return address.status();
  const auto* addr = reinterpret_cast<const sockaddr*>(&address.value());

  // Is somebody answering on this path already?
  {
    UniqueFd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (connectWithin(probe.get(), address.value(), kProbeTimeoutNs) == 0) {
      return Status::error(
          fmt::format("another stmuxd is already listening on {}", options_.socket_path));
    }
    if (errno == EAGAIN) {
      return Status::error(fmt::format(
          "another process listens on {} but takes no connection (a stopped or stuck stmuxd?)",
          options_.socket_path));
    }
    struct stat st {};
    if (::lstat(options_.socket_path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        return Status::error(fmt::format("{} exists and is not a socket; refusing to replace it",
                                         options_.socket_path));
      }
      STMUX_INFO(kTransport, "removing stale socket {}", options_.socket_path);
      ::unlink(options_.socket_path.c_str());
    }
  }

  listen_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listen_.valid()) {
    return Status::error(fmt::format("socket() failed: {}", std::strerror(errno)));
  }
  // No client passes the daemon a descriptor: from Linux 6.16 its
  // connections refuse them (inherited at connect, before accept), and
  // what a tenant could pass cannot make a close block (daemon/aside.h).
  // Older kernels do not know the option; there the closer thread closes.
  if (const int off = 0;
      ::setsockopt(listen_.get(), SOL_SOCKET, kSoPassRights, &off, sizeof(off)) == 0) {
    closesMayWait(false);
  } else {
    STMUX_DEBUG(kTransport,
                "this kernel cannot refuse passed descriptors at the socket (SO_PASSRIGHTS, "
                "Linux 6.16): {}; connections close on a thread of their own",
                std::strerror(errno));
  }
  // Tenants reach the daemon through group membership (README, systemd unit),
  // so the socket is made at most 0660, and the umask may take more away. bind
  // gives it that mode from the start: a chmod afterwards would leave a window
  // with the umask's mode, follow a symlink put at the path meanwhile, and
  // widen the mode past what the umask allows. The umask is the process's;
  // no other thread of the daemon creates files meanwhile.
  const mode_t umask_before = ::umask(0);
  ::umask(umask_before | 0117);
  const int bound = ::bind(listen_.get(), addr, sizeof(sockaddr_un));
  const int bind_error = errno;
  ::umask(umask_before);
  if (bound != 0) {
    listen_.reset();
    return Status::error(fmt::format("cannot bind {}: {}{}", options_.socket_path,
                                     std::strerror(bind_error),
                                     bind_error == ENOENT ? " (does its directory exist?)" : ""));
  }
  int rc;
  STMUX_SYSCALL(rc, ::listen(listen_.get(), 128));
  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) {
    return Status::error(fmt::format("epoll_create1 failed: {}", std::strerror(errno)));
  }
  epollAdd(epoll_.get(), listen_.get(), EPOLLIN, tag(kTagListen, 0));
  if (sink_.wakeFd() >= 0) epollAdd(epoll_.get(), sink_.wakeFd(), EPOLLIN, tag(kTagSinkWake, 0));
  if (!stop_fd_.valid()) return Status::error(fmt::format("eventfd: {}", std::strerror(errno)));
  epollAdd(epoll_.get(), stop_fd_.get(), EPOLLIN, tag(kTagStop, 0));
  started_ns_ = nowNs();
  STMUX_INFO(kTransport, "listening on {} ({} slots per client, segment {} bytes)",
             options_.socket_path, layout_.slot_count, layout_.total_bytes);
  return Status::okStatus();
}

void Server::run() {
  std::uint64_t last_work = nowNs();
  std::uint64_t last_control = 0;
  while (true) {
    std::uint64_t now = nowNs();
    if (!draining_ && failure_.empty()) {
      failure_ = sink_.mustEnd();
      if (!failure_.empty()) {
        STMUX_ERROR(kTransport, "{}: stmuxd ends", failure_);
        stop_.store(true, std::memory_order_relaxed);
      }
    }
    if (stop_.load(std::memory_order_relaxed) && !draining_) {
      draining_ = true;
      STMUX_INFO(kTransport, "draining: no new clients; finishing {} clients' work",
                 clients_.size());
      epollDel(epoll_.get(), listen_.get());
      closeAside(std::move(listen_));  // its backlog's queues may hold passed descriptors
      accept_paused_until_ = 0;        // nothing to accept: no timer to sleep until
      ::unlink(options_.socket_path.c_str());
      for (const ClientPtr& client : clients_) {
        client->view.header()->draining.store(1, std::memory_order_release);
      }
      if (options_.on_drain) options_.on_drain();
      next_metrics_ns_ = 0;  // draining shows at once, not after the period
      publishMetrics(now);
    }
    bool progressed = drainRings();
    std::uint64_t wake_at = 0;
    // Not the turn's `now`: the requests just taken were timed as each was
    // taken, later than that (drainRings).
    progressed |= sink_.poll(nowNs(), wake_at);
    if (!lingering_.empty()) closeAnswered();
    if (notices_paused_ && sink_.takesNotices()) pauseNotices(false);
    if (draining_ && !progressed && !sink_.busy()) {
      bool readable = false;
      for (const ClientPtr& client : clients_)
        readable |= client->ring.readable() && client->popped_draining < layout_.ring_capacity;
      if (!readable) break;
    }
    if (progressed) {
      last_work = now;
    } else if (now - last_work >= options_.spin_ns) {
      // Spinning resumes only once a wake-up brings work: a wake-up that only
      // found the time come (a stream-ordered request whose caller's stream
      // is still busy, metrics) goes back to sleep at once.
      sleepUntil(wake_at);
      last_control = nowNs();
      continue;
    } else {
      cpuRelax();
    }
    if (now - last_control >= kControlPeriodNs) {
      handleEvents(0);
      expirePending(now);
      last_control = now;
    }
  }
  while (!clients_.empty())
    detach(clients_.back(), "the daemon is shutting down");
  // Nothing of theirs runs any more (or, where the scheduler was kept from
  // hearing of departures, nothing ever will).
  for (const ClientPtr& client : lingering_)
    client->socket.reset();
  lingering_.clear();
  pending_.clear();
  replies_.clear();
  STMUX_INFO(kTransport, "drained");
}

// A request from each client in turn, round after round, until its user
// has had kBurst this turn or its ring is empty: a user's clients share one
// client's part of the turn, and each gets its own part of that (a tenant
// flooding its ring holds up the others of its uid a round at most).
bool Server::drainRings() {
  ++ring_turn_;
  const std::size_t count = clients_.size();
  busy_.clear();  // the clients that gave a request in the last round
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t index = (rotate_ + i) % count;
    if (takeRequest(clients_[index])) busy_.push_back(index);
  }
  const bool any = !busy_.empty();
  while (!busy_.empty()) {
    std::size_t kept = 0;
    for (const std::size_t index : busy_) {
      if (takeRequest(clients_[index])) busy_[kept++] = index;
    }
    busy_.resize(kept);
  }
  ++rotate_;
  return any;
}

bool Server::takeRequest(const ClientPtr& client) {
  UserShare& user = *client->user_share;
  if (user.ring_turn != ring_turn_) {
    user.ring_turn = ring_turn_;
    user.requests = 0;
  }
  if (user.requests == kBurst) return false;
  if (draining_ && client->popped_draining >= layout_.ring_capacity) return false;
  Request request;
  if (!client->ring.tryPop(request)) return false;
  ++user.requests;
  if (draining_) ++client->popped_draining;
  ++client->requests;
  if (request.slot >= layout_.slot_count) {
    if (client->bad_requests++ == 0) {
      STMUX_WARN(kTransport, "client {} (pid {}) sent slot {} of {}; dropping such requests",
                 client->id, client->pid, request.slot, layout_.slot_count);
    }
    return true;
  }
  // Timed as it is taken: a turn goes on as long as clients give requests,
  // and one pushed after the turn began, timed at its start, seemed taken
  // before it was sent (the status then left it out of the ring's count).
  sink_.onRequest(client, request, nowNs());
  return true;
}

void Server::sleepUntil(std::uint64_t wake_at_ns) {
  for (const ClientPtr& client : clients_) {
    client->view.header()->consumer_sleeping.store(1, std::memory_order_relaxed);
  }
  // Pairs with the producer's fence between publishing and reading the flag.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bool readable = false;
  for (const ClientPtr& client : clients_)
    readable |= client->ring.readable();
  if (!readable) {
    std::uint64_t deadline = wake_at_ns;
    for (const auto& pending : pending_) {
      if (deadline == 0 || pending->deadline_ns < deadline) deadline = pending->deadline_ns;
    }
    for (const auto& reply : replies_) {
      if (deadline == 0 || reply->deadline_ns < deadline) deadline = reply->deadline_ns;
    }
    if (accept_paused_until_ != 0 && (deadline == 0 || accept_paused_until_ < deadline)) {
      deadline = accept_paused_until_;
    }
    if (options_.metrics_period_ns != 0 && (deadline == 0 || next_metrics_ns_ < deadline)) {
      deadline = next_metrics_ns_;
    }
    // A tenant whose calls all run directly never wakes the daemon; the others
    // must still learn that it is active.
    if (!clients_.empty() && (deadline == 0 || next_company_ns_ < deadline)) {
      deadline = next_company_ns_;
    }
    if (const std::uint64_t fleet = fleet_.nextStepNs();
        fleet != 0 && (deadline == 0 || fleet < deadline)) {
      deadline = fleet;
    }
    const std::uint64_t now = nowNs();
    handleEvents(deadline == 0 ? std::nullopt
                               : std::optional<std::uint64_t>(deadline > now ? deadline - now : 0));
  }
  for (const ClientPtr& client : clients_) {
    client->view.header()->consumer_sleeping.store(0, std::memory_order_relaxed);
  }
  expirePending(nowNs());
}

void Server::handleEvents(std::optional<std::uint64_t> timeout_ns) {
  epoll_event events[64];
  int ready;
  if (!timeout_ns) {
    ready = ::epoll_wait(epoll_.get(), events, 64, -1);
  } else {
    timespec ts{static_cast<time_t>(*timeout_ns / 1'000'000'000ull),
                static_cast<long>(*timeout_ns % 1'000'000'000ull)};
    ready = ::epoll_pwait2(epoll_.get(), events, 64, &ts, nullptr);
    if (ready < 0 && errno == ENOSYS) {
      ready = ::epoll_wait(epoll_.get(), events, 64,
                           static_cast<int>((*timeout_ns + 999'999) / 1'000'000));
    }
  }
  if (ready < 0) {
    if (errno != EINTR) STMUX_ERROR(kTransport, "epoll_wait failed: {}", std::strerror(errno));
    return;
  }
  ++event_turn_;
  for (int i = 0; i < ready; ++i) {
    const std::uint64_t data = events[i].data.u64;
    const std::uint64_t id = tagId(data);
    switch (tagKind(data)) {
      case kTagListen:
        acceptAll();
        break;
      case kTagSinkWake:
        drainEventfd(sink_.wakeFd());
        break;
      case kTagStop:
        drainEventfd(stop_fd_.get());  // or every wait of the drain returns at once
        break;                         // run() looks at stop_ on its next turn
      case kTagReply: {
        auto it = std::find_if(replies_.begin(), replies_.end(),
                               [id](const auto& r) { return r->id == id; });
        if (it != replies_.end() && !pumpReply(**it)) dropReply(id);
        break;
      }
      case kTagPending: {
        auto it = std::find_if(pending_.begin(), pending_.end(),
                               [id](const auto& p) { return p->id == id; });
        if (it != pending_.end()) {
          std::unique_ptr<Pending> pending = std::move(*it);
          pending_.erase(it);
          epollDel(epoll_.get(), pending->socket.get());
          greet(std::move(pending));
        }
        break;
      }
      case kTagDoorbell:
        break;  // nothing to read: the wake-up was the point (edge-triggered)
      case kTagSocket: {
        auto it = std::find_if(clients_.begin(), clients_.end(),
                               [id](const ClientPtr& c) { return c->id == id; });
        if (it == clients_.end()) break;
        if (notices_paused_ && (events[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
          // Its notices unread no longer matter: what it mapped goes with it.
          detach(*it, "it closed its connection");
        } else {
          readClient(*it);
        }
        break;
      }
    }
  }
}

std::uint32_t Server::freshId() {
  return ids_.take([this](std::uint32_t id) {
    const auto is = [id](const auto& held) { return held->id == id; };
    return std::any_of(clients_.begin(), clients_.end(), is) ||
           std::any_of(pending_.begin(), pending_.end(), is) ||
           std::any_of(replies_.begin(), replies_.end(), is);
  });
}

void Server::acceptAll() {
  for (int accepted = 0;
       accepted < kMaxAcceptsPerTurn && listen_.valid() && accept_paused_until_ == 0; ++accepted) {
    const std::uint64_t now = nowNs();
    if (pending_.size() >= kMaxPending) {
      // Taken up again as the hellos arrive or time out.
      pauseAccepting(now + options_.hello_timeout_ns / 20);
      return;
    }
    AsideFd fd(UniqueFd(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK)));
    if (!fd.valid()) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      if (err == EINTR || err == ECONNABORTED) continue;  // (counted as a turn's accept)
      // The listening socket stays readable while the connection waits in
      // the backlog: without a pause epoll would report it forever.
      pauseAccepting(now + kAcceptBackoffNs);
      if (std::uint64_t held = 0; accept_log_.allow(now, held)) {
        STMUX_WARN(kTransport,
                   "accept failed: {}; not accepting for {} ms ({} such failures not logged)",
                   std::strerror(err), kAcceptBackoffNs / 1'000'000, held);
      }
      return;
    }
    ::ucred cred{};
    socklen_t length = sizeof(cred);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0) continue;
    auto pending = std::make_unique<Pending>();
    pending->id = freshId();
    pending->uid = cred.uid;
    pending->deadline_ns = now + options_.hello_timeout_ns;
    pending->socket = std::move(fd);
    // A client says hello right after it connects, so the hello is usually
    // here already: only a silent connection waits among the pending.
    greet(std::move(pending));
  }
}

void Server::addPending(std::unique_ptr<Pending> pending) {
  // A user's connections that stay silent longest go first, so that one
  // user's flood cannot hold every place while a real client's hello is a
  // moment away.
  std::size_t mine = 0;
  auto oldest = pending_.end();
  for (auto it = pending_.begin(); it != pending_.end(); ++it) {
    if ((*it)->uid != pending->uid) continue;
    ++mine;
    if (oldest == pending_.end()) oldest = it;
  }
  if (mine >= kMaxPendingPerUid) {
    if (std::uint64_t held = 0; accept_log_.allow(nowNs(), held)) {
      STMUX_WARN(kTransport,
                 "uid {} has {} connections that have not said hello; closing its oldest ({} "
                 "such closes not logged)",
                 pending->uid, mine, held);
    }
    epollDel(epoll_.get(), (*oldest)->socket.get());
    pending_.erase(oldest);
  }
  epollAdd(epoll_.get(), pending->socket.get(), EPOLLIN | EPOLLRDHUP,
           tag(kTagPending, pending->id));
  pending_.push_back(std::move(pending));
}

void Server::pauseAccepting(std::uint64_t until_ns) {
  if (accept_paused_until_ == 0) epollDel(epoll_.get(), listen_.get());
  accept_paused_until_ = until_ns;
}

void Server::resumeAccepting(std::uint64_t now) {
  if (accept_paused_until_ == 0 || now < accept_paused_until_ || !listen_.valid()) return;
  accept_paused_until_ = 0;
  epollAdd(epoll_.get(), listen_.get(), EPOLLIN, tag(kTagListen, 0));
  acceptAll();  // what waited meanwhile
}

void Server::expirePending(std::uint64_t now) {
  resumeAccepting(now);
  publishMetrics(now);
  // The route takes a step with each new count of active tenants, and when
  // a look wants one.
  const std::uint64_t fleet = fleet_.nextStepNs();
  if (publishCompany(now) || (fleet != 0 && now >= fleet)) steerFleet(now);
  for (auto it = pending_.begin(); it != pending_.end();) {
    if ((*it)->deadline_ns <= now) {
      if (std::uint64_t held = 0; silent_log_.allow(now, held)) {
        STMUX_WARN(kTransport, "closing a connection that sent no hello within {} ms{}",
                   options_.hello_timeout_ns / 1'000'000,
                   held == 0 ? "" : fmt::format(" ({} more such closes not logged)", held));
      }
      epollDel(epoll_.get(), (*it)->socket.get());
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
  for (std::size_t i = 0; i < replies_.size();) {
    if (replies_[i]->deadline_ns <= now) {
      STMUX_WARN(kTransport, "a status reader took {} of {} bytes in {} s; closing it",
                 replies_[i]->sent, replies_[i]->json->size(), kReplyTimeoutNs / 1'000'000'000);
      dropReply(replies_[i]->id);
    } else {
      ++i;
    }
  }
}

void Server::refuse(int fd, const std::string& reason) {
  if (std::uint64_t held = 0; refuse_log_.allow(nowNs(), held)) {
    STMUX_WARN(kTransport, "refusing a client: {}{}", reason,
               held == 0 ? "" : fmt::format(" ({} more refusals not logged)", held));
  }
  auto msg = makeMessage<RefuseMsg>(MsgType::kRefuse);
  msg.daemon_version = kProtocolVersion;
  setField(msg.reason, reason);
  (void)sendMessage(fd, &msg, sizeof(msg));
}

void Server::greet(std::unique_ptr<Pending> pending) {
  const int fd = pending->socket.get();
  auto received = recvMessage(fd, /*block=*/false);
  if (!received || received->eof) return;                            // gone before it said anything
  if (received->would_block) return addPending(std::move(pending));  // not yet
  if (!received->fds.empty()) {
    // A client hands the daemon nothing (and on Linux 6.16 and later the
    // listening socket refuses them).
    dropPassed(received->fds);
    return refuse(fd, "a hello must not carry file descriptors");
  }
  MsgHeader header;
  if (Status status = checkHeader(received.value(), header); !status.ok()) {
    return refuse(fd, "malformed hello: " + status.message());
  }
  if (header.version != kProtocolVersion) {
    return refuse(
        fd, fmt::format("protocol version mismatch: the client speaks {}, the daemon "
                        "speaks {}; use a libstmux.so (or stmuxctl) and stmuxd of one release",
                        header.version, kProtocolVersion));
  }
  HelloMsg hello;
  if (Status status = decodeMessage(received.value(), MsgType::kHello, hello); !status.ok()) {
    return refuse(fd, "malformed hello: " + status.message());
  }
  ::ucred cred{};
  socklen_t length = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0) {
    return refuse(fd, fmt::format("cannot read peer credentials: {}", std::strerror(errno)));
  }
  switch (static_cast<Role>(hello.role)) {
    case Role::kTenant:
      return admitTenant(std::move(pending->socket), cred, hello);
    case Role::kControl:
      return answerControl(std::move(pending->socket), cred.uid);
  }
  refuse(fd,
         fmt::format("unknown role {} in hello; accepted: 1 (tenant), 2 (control)", hello.role));
}

void Server::admitTenant(AsideFd socket, const ::ucred& cred, const HelloMsg& hello) {
  const int fd = socket.get();
  if (draining_) return refuse(fd, "the daemon is shutting down");
  // A client let go while its calls run still holds its place (its socket
  // and segment) until they are answered: counted, or a client could hold
  // any number by being let go and attaching again.
  if (clients_.size() + lingering_.size() >= options_.max_clients) {
    return refuse(
        fd, fmt::format("the daemon already serves its maximum of {} clients (STMUX_MAX_CLIENTS){}",
                        options_.max_clients,
                        lingering_.empty()
                            ? ""
                            : fmt::format("; {} of them let go, their calls still on the GPU",
                                          lingering_.size())));
  }
  const auto of_user = [&](const std::vector<ClientPtr>& list) {
    return static_cast<std::size_t>(std::count_if(
        list.begin(), list.end(), [&](const ClientPtr& c) { return c->uid == cred.uid; }));
  };
  const std::size_t same_user = of_user(clients_) + of_user(lingering_);
  if (same_user >= options_.max_clients_per_uid) {
    return refuse(fd, fmt::format("uid {} already has {} clients attached, the most one user may "
                                  "have (STMUX_MAX_CLIENTS_PER_UID)",
                                  cred.uid, same_user));
  }
  auto client = std::make_shared<Client>();
  client->id = freshId();
  client->pid = cred.pid;
  client->uid = cred.uid;
  client->gid = cred.gid;
  client->name = fieldString(hello.name);
  client->attached_ns = nowNs();
  std::erase_if(user_shares_, [](const auto& user) { return user.second.expired(); });
  std::weak_ptr<UserShare>& user_share = user_shares_[cred.uid];
  client->user_share = user_share.lock();
  if (!client->user_share) user_share = client->user_share = std::make_shared<UserShare>();

  // The segment: an anonymous memfd, sealed so the client cannot shrink it
  // under the daemon's mapping (which would make the daemon fault).
  UniqueFd memfd(::memfd_create("stmux-client", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!memfd.valid()) return refuse(fd, fmt::format("memfd_create: {}", std::strerror(errno)));
  if (::ftruncate(memfd.get(), static_cast<off_t>(layout_.total_bytes)) != 0 ||
      ::fcntl(memfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return refuse(fd, fmt::format("cannot size and seal a segment: {}", std::strerror(errno)));
  }
  auto mapping = mapShared(memfd.get(), layout_.total_bytes);
  if (!mapping) return refuse(fd, mapping.message());
  initSegment(mapping->base(), layout_, client->id);
  client->doorbell.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!client->doorbell.valid()) {
    return refuse(fd, fmt::format("eventfd: {}", std::strerror(errno)));
  }

  auto welcome = makeMessage<WelcomeMsg>(MsgType::kWelcome);
  welcome.client_id = client->id;
  welcome.ring_capacity = layout_.ring_capacity;
  welcome.slot_count = layout_.slot_count;
  welcome.segment_bytes = layout_.total_bytes;
  welcome.device_count = static_cast<std::uint32_t>(std::min(options_.devices.size(), kMaxDevices));
  std::copy_n(options_.devices.begin(), welcome.device_count, welcome.devices);
  for (std::uint32_t i = 0; i < welcome.device_count && i < options_.device_mps.size(); ++i) {
    welcome.device_mps[i] = options_.device_mps[i];
  }
  const int fds[3] = {memfd.get(), client->doorbell.get(), own_pidfd_.get()};
  if (Status status = sendMessage(fd, &welcome, sizeof(welcome), fds, own_pidfd_.valid() ? 3 : 2);
      !status.ok()) {
    // Most often a client gone after its hello: at most once a second.
    if (std::uint64_t held = 0; refuse_log_.allow(nowNs(), held)) {
      STMUX_WARN(kTransport, "could not welcome pid {}: {}{}", cred.pid, status.message(),
                 held == 0 ? "" : fmt::format(" ({} more refusals or failures not logged)", held));
    }
    return;
  }
  client->mapping = std::move(mapping).value();
  client->view = SegmentView(client->mapping.base(), layout_);
  client->ring = RingConsumer<Request>(client->view.cells(), layout_.ring_capacity);
  client->view.header()->fleet_route.store(fleet_word_, std::memory_order_relaxed);
  client->socket = std::move(socket);
  epollAdd(epoll_.get(), client->socket.get(), socketEvents(), tag(kTagSocket, client->id));
  // Edge-triggered, and never read: the client shares the eventfd's file
  // description, O_NONBLOCK included, and one that cleared it would leave a
  // read here blocked for good, the server thread with it (each write of the
  // client's is an edge; its counter is the client's business).
  epollAdd(epoll_.get(), client->doorbell.get(), EPOLLIN | EPOLLET, tag(kTagDoorbell, client->id));
  clients_.push_back(client);
  STMUX_INFO(kTransport, "client {} attached: pid {} ({}) uid {}", client->id, client->pid,
             client->name, client->uid);
  sink_.onAttach(client);
}

// The status goes out in parts of kStatusPartBytes, as fast as the reader
// takes them: one message of it all failed beyond about 490 clients (larger
// than the socket buffer), and the daemon never waits for a reader.
void Server::answerControl(AsideFd socket, std::uint32_t uid) {
  if (replies_.size() >= kMaxReplies) {
    return refuse(socket.get(), fmt::format("the daemon is answering {} status queries already; "
                                            "try again",
                                            replies_.size()));
  }
  if (std::count_if(replies_.begin(), replies_.end(), [uid](const auto& r) {
        return r->uid == uid;
      }) >= static_cast<std::ptrdiff_t>(kMaxRepliesPerUid)) {
    return refuse(socket.get(), fmt::format("the daemon is answering {} status queries of uid {} "
                                            "already; try again",
                                            kMaxRepliesPerUid, uid));
  }
  // A reader that hung up after its hello is owed nothing.
  pollfd peer{socket.get(), POLLRDHUP, 0};
  if (::poll(&peer, 1, 0) > 0 && (peer.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) return;
  auto reply = std::make_unique<Reply>();
  reply->id = freshId();
  reply->uid = uid;
  reply->socket = std::move(socket);
  const std::uint64_t now = nowNs();
  if (!status_ || now - status_built_ns_ >=
                      std::min(kStatusReuseFactor * status_cost_ns_, kMostStatusReuseNs)) {
    const std::uint64_t cpu = threadCpuNs();
    status_ = std::make_shared<const std::string>(statusJson());
    status_cost_ns_ = threadCpuNs() - cpu;
    status_built_ns_ = nowNs();
    ++status_builds_;
  }
  reply->json = status_;
  reply->deadline_ns = nowNs() + kReplyTimeoutNs;
  if (!pumpReply(*reply)) return;
  epollAdd(epoll_.get(), reply->socket.get(), EPOLLOUT, tag(kTagReply, reply->id));
  replies_.push_back(std::move(reply));
}

bool Server::pumpReply(Reply& reply) {
  std::vector<char> message;
  while (true) {
    const std::string& json = *reply.json;
    const std::size_t part = std::min(json.size() - reply.sent, kStatusPartBytes);
    const bool last = reply.sent + part == json.size();
    const MsgHeader header{
        kControlMagic, kProtocolVersion,
        static_cast<std::uint32_t>(last ? MsgType::kStatusReply : MsgType::kStatusPart),
        static_cast<std::uint32_t>(sizeof(MsgHeader) + part)};
    message.resize(sizeof(header) + part);
    std::memcpy(message.data(), &header, sizeof(header));
    std::memcpy(message.data() + sizeof(header), json.data() + reply.sent, part);
    ssize_t n;
    do {
      n = ::send(reply.socket.get(), message.data(), message.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;  // when it is writable
    if (n != static_cast<ssize_t>(message.size())) {
      // A reader gone (EPIPE, ECONNRESET) is its own business; anything else
      // at most once a second, a flood of them being one user's doing.
      const int error = n < 0 ? errno : 0;
      if (error == EPIPE || error == ECONNRESET) {
        STMUX_DEBUG(kTransport, "a status reader left mid-reply: {}", std::strerror(error));
      } else if (std::uint64_t held = 0; reply_log_.allow(nowNs(), held)) {
        STMUX_WARN(kTransport, "could not send a status reply: {}{}",
                   n < 0 ? std::strerror(error) : "a part was cut short",
                   held == 0 ? "" : fmt::format(" ({} more not logged)", held));
      }
      return false;
    }
    reply.sent += part;
    if (last) return false;
  }
}

void Server::dropReply(std::uint64_t id) {
  auto it =
      std::find_if(replies_.begin(), replies_.end(), [id](const auto& r) { return r->id == id; });
  if (it == replies_.end()) return;
  epollDel(epoll_.get(), (*it)->socket.get());
  replies_.erase(it);
}

void Server::readClient(const ClientPtr& client) {
  // A bounded number per turn (the socket stays readable for the rest): a
  // client sending notices as fast as it can held up every other client's
  // calls for up to a second (server_test, 2026-12-05).
  UserShare& user = *client->user_share;
  if (user.event_turn != event_turn_) {
    user.event_turn = event_turn_;
    user.messages = 0;
  }
  for (; user.messages < kMaxMessagesPerTurn; ++user.messages) {
    if (!sink_.takesNotices()) return pauseNotices(true);
    auto received = recvMessage(client->socket.get(), /*block=*/false);
    if (!received) return detach(client, received.message().c_str());
    if (received->would_block) return;
    if (received->eof) return detach(client, "it closed its connection");
    ReleaseMsg release;
    const bool passed = !received->fds.empty();
    dropPassed(received->fds);
    if (passed || !decodeMessage(received.value(), MsgType::kRelease, release).ok() ||
        release.count > kMaxReleaseIds) {
      return detach(client, "it sent a malformed control message");
    }
    sink_.onRelease(client, release.alloc_ids, release.count);
  }
}

std::uint32_t Server::socketEvents() const {
  return notices_paused_ ? EPOLLRDHUP : EPOLLIN | EPOLLRDHUP;
}

void Server::pauseNotices(bool paused) {
  if (notices_paused_ == paused) return;
  notices_paused_ = paused;
  STMUX_DEBUG(kTransport, "{}",
              paused ? "the executor is behind: release notices wait in the sockets"
                     : "reading release notices again");
  for (const ClientPtr& client : clients_) {
    epollSet(epoll_.get(), EPOLL_CTL_MOD, client->socket.get(), socketEvents(),
             tag(kTagSocket, client->id));
  }
}

void Server::detach(const ClientPtr& client, const char* why) {
  auto it = std::find(clients_.begin(), clients_.end(), client);
  if (it == clients_.end()) return;
  ClientPtr keep = *it;  // `client` may refer into clients_
  clients_.erase(it);
  epollDel(epoll_.get(), keep->socket.get());
  epollDel(epoll_.get(), keep->doorbell.get());
  keep->gone.store(true, std::memory_order_release);
  // Before the hang-up: what the scheduler declines is answered before the
  // client sees the daemon gone.
  sink_.onDetach(keep);
  keep->doorbell.reset();
  // Outstanding, not unanswered: a status is counted answered a moment
  // before it is published, and the client must not see the hang-up first.
  if (keep->outstanding > 0) {
    // Its ring is no longer read: the shim runs new calls directly.
    keep->view.header()->draining.store(1, std::memory_order_release);
    STMUX_INFO(kTransport,
               "client {} (pid {}) detached: {}; its socket closes once its {} calls on the GPU "
               "are answered",
               keep->id, keep->pid, why, keep->outstanding);
    lingering_.push_back(std::move(keep));
    return;
  }
  keep->socket.reset();
  STMUX_INFO(kTransport, "client {} (pid {}) detached: {}", keep->id, keep->pid, why);
}

void Server::closeAnswered() {
  std::erase_if(lingering_, [](const ClientPtr& client) {
    if (client->outstanding > 0) return false;
    client->socket.reset();
    return true;
  });
}

std::string Server::statusJson() const {
  Json status;
  Json& daemon = status["daemon"];
  daemon["pid"] = ::getpid();
  daemon["protocol"] = kProtocolVersion;
  daemon["uptime_s"] = static_cast<double>(nowNs() - started_ns_) / 1e9;
  daemon["draining"] = draining_;
  daemon["status_builds"] = status_builds_ + 1;  // this one among them
  // STMUX_ROUTE=auto's route for the tenants on MPS (daemon/fleet_route.h).
  Json& fleet = status["mps_route"];
  fleet["route"] = fleet_.direct() ? "direct" : "served";
  fleet["looking"] = fleet_.looking();
  fleet["looks"] = fleet_.looks();
  fleet["last_gain"] = fleet_.lastLook().gain;  // the other route's calls/s over the taken one's
  fleet["last_tenants"] = fleet_.lastLook().tenants;
  // The places on MPS kept for tenants (stmux/mps_seats.h), where kept.
  if (const Result<MpsSeatCount> places = countMpsSeats(mpsSeatsDirectory(options_.socket_path))) {
    status["mps_places"]["kept"] = places->kept;
    status["mps_places"]["taken"] = places->taken;
  }
  Json& clients = status["clients"] = Json::array();
  for (const ClientPtr& client : clients_) {
    const ClientCounters& counters = client->view.header()->counters;
    Json& entry = clients.emplace_back();
    entry["id"] = client->id;
    entry["pid"] = client->pid;
    entry["uid"] = client->uid;
    entry["name"] = client->name;
    entry["attached_s"] = static_cast<double>(nowNs() - client->attached_ns) / 1e9;
    entry["requests"] = client->requests;
    entry["outstanding"] = client->unanswered();
    entry["refused"] = client->refused;
    entry["failed_opens"] = client->failed_opens;
    entry["declined_unopened"] = client->declined_unopened;
    const CounterTotals sum = totals(counters);
    entry["forwarded"] = sum.forwarded;
    entry["failed"] = sum.failed;
    Json& fallbacks = entry["fallbacks"] = Json::object();
    for (std::size_t i = 0; i < kFallbackCount; ++i)
      fallbacks[kFallbackNames[i]] = sum.fallback[i];
    // By entry point, those with calls only; direct calls by reason, those
    // with calls only.
    Json& entry_points = entry["entry_points"] = Json::object();
    for (std::size_t e = 0; e < kEntryPointCount; ++e) {
      const CounterTotals one = totals(counters.entry[e]);
      if (one.calls() == 0) continue;
      Json& point = entry_points[kEntryPointNames[e]];
      point["calls"] = one.calls();
      point["forwarded"] = one.forwarded;
      point["failed"] = one.failed;
      Json& direct = point["fallbacks"] = Json::object();
      for (std::size_t i = 0; i < kFallbackCount; ++i) {
        if (one.fallback[i] != 0) direct[kFallbackNames[i]] = one.fallback[i];
      }
    }
    entry["route"] = counters.route.load(std::memory_order_relaxed) == 1 ? "direct" : "served";
    entry["may_spin"] = client->view.header()->may_spin.load(std::memory_order_relaxed) != 0;
    const auto mps = static_cast<ClientMps>(counters.mps.load(std::memory_order_relaxed));
    entry["mps"] = clientMpsName(mps);
    entry["sync"] = clientSyncName(
        static_cast<ClientSync>(client->view.header()->sync.load(std::memory_order_relaxed)));
    entry["mode"] =
        clientModeName(static_cast<ClientMode>(counters.mode.load(std::memory_order_relaxed)));
    // The client's side of a round (host mode), in means.
    const std::uint64_t timed = counters.timed_calls.load(std::memory_order_relaxed);
    auto mean = [&](const std::atomic<std::uint64_t>& ns) {
      return timed == 0 ? 0.0
                        : static_cast<double>(ns.load(std::memory_order_relaxed)) / 1e3 /
                              static_cast<double>(timed);
    };
    Json& round = entry["round_us"] = Json::object();
    round["prior_wait"] = mean(counters.prior_wait_ns);
    round["completion"] = mean(counters.completion_ns);
  }
  sink_.addStatus(status);
  return dumpJson(status);
}

void Server::publishMetrics(std::uint64_t now) {
  if (options_.metrics_period_ns == 0 || now < next_metrics_ns_) return;
  next_metrics_ns_ = now + options_.metrics_period_ns;
  MetricsText out;
  addMetrics(out);
  sink_.addMetrics(out);
  options_.publish_metrics(out.str());
}

// Tells each client how many other tenants made calls in the last second,
// and which of them may spin while they wait; returns whether it was time to.
// Their counts are read from their segments (a client can only make itself
// look busy, which at worst keeps the others served, or takes a turn to
// spin that the others then have less often).
bool Server::publishCompany(std::uint64_t now) {
  if (now < next_company_ns_) return false;
  next_company_ns_ = now + kCompanyPeriodNs;
  std::uint32_t active = 0;
  for (const ClientPtr& client : clients_) {
    const std::uint64_t calls = totals(client->view.header()->counters).calls();
    if (calls != client->calls_seen) {
      client->calls_seen = calls;
      client->active_until_ns = now + kActiveNs;
    }
    if (now < client->active_until_ns) ++active;
  }
  // STMUX_SPINNING_TENANTS: spinning_tenants of the active tenants may spin,
  // from the one whose turn it is; the next period starts after them, so
  // that over a second each tenant spins about as often as any other.
  const std::size_t spinners = std::min<std::size_t>(options_.spinning_tenants, active);
  if (active > 0) spin_turn_ %= active;
  std::size_t rank = 0;  // among the active tenants
  for (const ClientPtr& client : clients_) {
    SegmentHeader& header = *client->view.header();
    const bool is_active = now < client->active_until_ns;
    header.other_tenants.store(active - (is_active ? 1 : 0), std::memory_order_relaxed);
    bool spins = false;
    if (is_active) spins = (rank++ + active - spin_turn_) % active < spinners;
    header.may_spin.store(spins ? 1 : 0, std::memory_order_relaxed);
  }
  if (active > 0) spin_turn_ = (spin_turn_ + spinners) % active;
  return true;
}

// The route of the tenants on MPS (daemon/fleet_route.h): those that follow
// it (STMUX_ROUTE=auto, on MPS) and made calls in the last second take part.
// Only where the daemon is on MPS too: elsewhere each tenant's shim chooses
// its own (shim/route.h).
void Server::steerFleet(std::uint64_t now) {
  const bool on_mps = std::any_of(options_.device_mps.begin(), options_.device_mps.end(),
                                  [](std::uint8_t m) { return m != 0; });
  std::vector<TenantCalls> tenants;
  for (const ClientPtr& client : clients_) {
    const ClientCounters& counters = client->view.header()->counters;
    if (!on_mps || now >= client->active_until_ns ||
        counters.follows_route.load(std::memory_order_relaxed) == 0) {
      continue;
    }
    tenants.push_back({client->id, totals(counters).calls()});
  }
  FleetLook look;
  const std::uint32_t word = fleet_.step(now, tenants, &look);
  if (look.tenants != 0 || (look.direct_before != look.direct_after)) {
    const char* before = look.direct_before ? "direct" : "served";
    const char* other = look.direct_before ? "served" : "direct";
    if (look.direct_after != look.direct_before) {
      STMUX_INFO(kSched,
                 "the {} tenants on MPS made {:.2f}x as many calls {} as {}: their calls now go "
                 "{} (STMUX_ROUTE=auto; a tenant with STMUX_ROUTE=serve stays served)",
                 look.tenants, look.gain, other, before, other);
    } else {
      STMUX_DEBUG(kSched, "route look{}: {} tenants on MPS, {:.2f}x as many calls {} as {}",
                  look.warm_up ? " (warm-up, decides nothing)" : "", look.tenants, look.gain, other,
                  before);
    }
  }
  if (word == fleet_word_) return;
  fleet_word_ = word;
  for (const ClientPtr& client : clients_) {
    client->view.header()->fleet_route.store(word, std::memory_order_relaxed);
  }
}

void Server::addMetrics(MetricsText& out) const {
  out.family("stmux_daemon_uptime_seconds", "gauge", "Seconds since stmuxd started serving.");
  out.sample("stmux_daemon_uptime_seconds", {}, static_cast<double>(nowNs() - started_ns_) / 1e9);
  out.family("stmux_daemon_draining", "gauge", "1 while stmuxd shuts down, else 0.");
  out.sample("stmux_daemon_draining", {}, draining_ ? 1 : 0);
  out.family("stmux_mps_route_direct", "gauge",
             "1 while STMUX_ROUTE=auto sends the calls of the tenants on MPS directly to cuBLAS "
             "(measured faster), else 0.");
  out.sample("stmux_mps_route_direct", {}, fleet_.direct() ? 1 : 0);
  out.family("stmux_mps_route_looks_total", "counter",
             "Looks at both routes of the tenants on MPS, each three windows of their calls.");
  out.sample("stmux_mps_route_looks_total", {}, static_cast<double>(fleet_.looks()));
  if (const Result<MpsSeatCount> places = countMpsSeats(mpsSeatsDirectory(options_.socket_path))) {
    out.family("stmux_mps_places", "gauge",
               "Places on MPS kept for tenants (STMUX_MPS_CLIENTS), and those a tenant holds; a "
               "tenant that finds none free runs off MPS.");
    out.sample("stmux_mps_places", {{"state", "kept"}}, static_cast<double>(places->kept));
    out.sample("stmux_mps_places", {{"state", "taken"}}, static_cast<double>(places->taken));
  }
  out.family("stmux_clients", "gauge", "Tenant processes attached.");
  out.sample("stmux_clients", {}, static_cast<double>(clients_.size()));
  // Per tenant; the served, failed and direct counts are the shim's own,
  // kept in its segment. Each tenant's labels and summed counters are made
  // once (this runs on the server's thread, once a second, over up to
  // STMUX_MAX_CLIENTS tenants).
  struct Tenant {
    Labels labels;
    CounterTotals sum;
  };
  std::vector<Tenant> tenants;
  tenants.reserve(clients_.size());
  for (const ClientPtr& c : clients_) {
    tenants.push_back({Labels{{"client", std::to_string(c->id)},
                              {"pid", std::to_string(c->pid)},
                              {"uid", std::to_string(c->uid)},
                              {"program", c->name}},
                       totals(c->view.header()->counters)});
  }
  auto perClient = [&](std::string_view name, std::string_view type, std::string_view help,
                       auto&& value) {
    out.family(name, type, help);
    for (std::size_t i = 0; i < clients_.size(); ++i) {
      out.sample(name, tenants[i].labels, static_cast<double>(value(*clients_[i], tenants[i].sum)));
    }
  };
  perClient("stmux_client_requests_total", "counter",
            "Requests the daemon took from the tenant's ring.",
            [](const Client& c, const CounterTotals&) { return c.requests; });
  perClient("stmux_client_served_total", "counter", "Calls the daemon completed for the tenant.",
            [](const Client&, const CounterTotals& sum) { return sum.forwarded; });
  perClient("stmux_client_failed_total", "counter",
            "Calls the tenant returned CUBLAS_STATUS_EXECUTION_FAILED for.",
            [](const Client&, const CounterTotals& sum) { return sum.failed; });
  perClient("stmux_client_outstanding_requests", "gauge",
            "Requests of the tenant queued or on a GPU.",
            [](const Client& c, const CounterTotals&) { return c.unanswered(); });
  perClient("stmux_client_refused_total", "counter",
            "Requests declined for being beyond the tenant's slots.",
            [](const Client& c, const CounterTotals&) { return c.refused; });
  perClient("stmux_client_failed_opens_total", "counter",
            "Opens of the tenant's memory that failed, or were dropped for its having more "
            "waiting than its requests can use (a few a second are allowed; beyond, its "
            "requests needing one are declined unopened).",
            [](const Client& c, const CounterTotals&) { return c.failed_opens; });
  perClient("stmux_client_declined_unopened_total", "counter",
            "Requests of the tenant declined unopened: too many of its opens had failed.",
            [](const Client& c, const CounterTotals&) { return c.declined_unopened; });
  // Where the tenant's shim has not looked yet (no call made), no sample.
  out.family("stmux_client_mps", "gauge",
             "1 where the tenant's CUDA context runs under MPS, 0 where it does not.");
  for (std::size_t i = 0; i < clients_.size(); ++i) {
    const auto mps = static_cast<ClientMps>(
        clients_[i]->view.header()->counters.mps.load(std::memory_order_relaxed));
    if (mps == ClientMps::kUnknown) continue;
    out.sample("stmux_client_mps", tenants[i].labels, mps == ClientMps::kYes ? 1.0 : 0.0);
  }
  // Only the reasons a tenant has met: 25 series per tenant, most of them 0,
  // were most of the text (and of the server's time making it).
  out.family("stmux_client_direct_total", "counter",
             "Calls the tenant's shim ran directly, by reason (reasons it never met left out).");
  for (const Tenant& tenant : tenants) {
    for (std::size_t i = 0; i < kFallbackCount; ++i) {
      if (tenant.sum.fallback[i] == 0) continue;
      Labels with_reason = tenant.labels;
      with_reason.emplace_back("reason", std::string(kFallbackNames[i]));
      out.sample("stmux_client_direct_total", with_reason,
                 static_cast<double>(tenant.sum.fallback[i]));
    }
  }
  out.family("stmux_client_entry_point_calls_total", "counter",
             "The tenant's calls by cuBLAS entry point and outcome (served, failed, direct).");
  for (std::size_t i = 0; i < clients_.size(); ++i) {
    for (std::size_t e = 0; e < kEntryPointCount; ++e) {
      const CounterTotals one = totals(clients_[i]->view.header()->counters.entry[e]);
      if (one.calls() == 0) continue;
      const std::uint64_t direct = one.calls() - one.forwarded - one.failed;
      for (auto [outcome, value] : {std::pair{"served", one.forwarded},
                                    std::pair{"failed", one.failed}, std::pair{"direct", direct}}) {
        Labels with = tenants[i].labels;
        with.emplace_back("entry_point", std::string(kEntryPointNames[e]));
        with.emplace_back("outcome", outcome);
        out.sample("stmux_client_entry_point_calls_total", with, static_cast<double>(value));
      }
    }
  }
}

}  // namespace stmux::daemon

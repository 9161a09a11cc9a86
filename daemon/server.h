// The daemon's transport: the control socket, attached clients, their rings.
//
// One thread runs Server::run(): it accepts and greets clients, hands each a
// sealed memfd segment and a doorbell eventfd, drains every ring round-robin
// into a RequestSink (a part of each turn per user, not per client),
// notices EOF, and sleeps on epoll when there is nothing to do. It never
// blocks on a client: sockets are non-blocking, a greeting must arrive
// within a bound, and a message that would block is dropped.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "daemon/aside.h"
#include "daemon/fleet_route.h"
#include "daemon/metrics.h"
#include "stmux/log.h"
#include "stmux/segment.h"
#include "stmux/status.h"
#include "stmux/sys.h"
#include "stmux/wire.h"

namespace stmux::daemon {

// What one user's clients had of the server's turns: each user gets one
// client's part of each turn, however many clients it has. Shared by the
// user's clients. Server thread.
struct UserShare {
  std::uint64_t ring_turn = 0;   // Server::drainRings'
  int requests = 0;              // taken from their rings in that turn
  std::uint64_t event_turn = 0;  // Server::handleEvents'
  int messages = 0;              // control messages read in that turn
};

// An attached tenant process. Shared: batches in flight keep it (and so its
// segment mapping) alive after it detaches, so completions can still be
// written safely.
struct Client {
  std::uint32_t id = 0;
  pid_t pid = 0;  // from SO_PEERCRED, not from the hello
  uid_t uid = 0;
  gid_t gid = 0;
  std::string name;
  std::uint64_t attached_ns = 0;
  AsideFd socket;  // its queue may hold descriptors it passed (daemon/aside.h)
  UniqueFd doorbell;
  Mapping mapping;
  SegmentView view;
  RingConsumer<Request> ring;
  std::atomic<bool> gone{false};
  std::uint64_t requests = 0;             // popped from the ring
  std::uint64_t bad_requests = 0;         // dropped by the transport (bad slot index)
  std::shared_ptr<UserShare> user_share;  // its uid's
  // Popped since the daemon began to drain: at most a ring's worth (what it
  // held then); beyond, the client pushes what it was told not to, and its
  // ring is read no more (a client that kept pushing kept the drain going
  // for ever; found by review).
  std::uint32_t popped_draining = 0;
  // Requests taken from its ring and not yet settled (in a batcher, on a
  // GPU, or answered in a batch the scheduler has not yet taken back).
  std::uint32_t outstanding = 0;
  // Of those, how many the executor has answered (their statuses are out):
  // the client may already be reusing their slots.
  std::atomic<std::uint32_t> answered{0};
  // Requests it still waits for: an honest shim never has more than its slot
  // count; the scheduler refuses the rest, so that a hostile client cannot
  // grow the daemon's queues (the ring cell is free again as soon as a
  // request is popped). Server thread.
  std::uint32_t unanswered() const {
    return outstanding - std::min(outstanding, answered.load(std::memory_order_relaxed));
  }
  std::uint64_t refused = 0;  // requests refused for being beyond that bound
  // Opens of its memory that failed, or were dropped for its having more
  // waiting than its requests can use (the scheduler's budget for them: each
  // is a driver call beside the executor's launches, and garbage handles
  // slowed every tenant), when the budget is next back to full, and the
  // requests declined unopened because it was spent, or its user's (the
  // scheduler keeps that one). Server thread.
  std::uint64_t failed_opens = 0;
  std::uint64_t open_budget_full_ns = 0;
  std::uint64_t declined_unopened = 0;
  // Its calls, served or direct, as its counters said when last looked at,
  // and until when it counts as active for the others' other_tenants.
  std::uint64_t calls_seen = 0;
  std::uint64_t active_until_ns = 0;
};
using ClientPtr = std::shared_ptr<Client>;

// What the server hands requests to: the scheduler in stmuxd, an
// acknowledging stub in the transport benchmark and tests.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void onAttach(const ClientPtr&) {}
  // The client is gone (EOF) or the daemon dropped it.
  virtual void onDetach(const ClientPtr&) {}
  // A request whose slot index is in range; nothing else is checked yet.
  // `now_ns`: when the server took it from its ring, after the client
  // stamped it (submit_ns), and no later than the next poll's `now_ns`.
  virtual void onRequest(const ClientPtr& client, const Request& request, std::uint64_t now_ns) = 0;
  virtual void onRelease(const ClientPtr&, const std::uint64_t* /*alloc_ids*/,
                         std::size_t /*count*/) {}
  // False while the notices given already wait beyond a bound for the
  // executor to take them: the server then leaves the rest in the clients'
  // sockets (a shim keeps what its socket does not take and tells it later),
  // and asks again at its next turn.
  virtual bool takesNotices() const { return true; }
  // Timed work: launch decisions, completions. Returns whether it made
  // progress; sets `wake_at_ns` to when it next needs a turn (0: not before
  // something arrives).
  virtual bool poll(std::uint64_t /*now_ns*/, std::uint64_t& wake_at_ns) {
    wake_at_ns = 0;
    return false;
  }
  // True while work is in flight somewhere the server cannot see.
  virtual bool busy() const { return false; }
  // An eventfd the sink's other threads write to wake the server, or -1.
  virtual int wakeFd() const { return -1; }
  // Why the daemon must end (and be started again), or empty: asked at
  // every turn of the server's loop, so it must be cheap.
  virtual std::string mustEnd() const { return {}; }
  // Adds its members to the status object that `stmuxctl status --json`
  // prints (a stmux::Json, stmux/json.h).
  virtual void addStatus(nlohmann::ordered_json& /*status*/) const {}
  // Its metric families, after the server's (daemon/metrics.h).
  virtual void addMetrics(MetricsText& /*out*/) const {}
};

// The ids of the server's connections, clients and status replies, by which
// epoll's tags and the scheduler's maps tell them apart: never 0, never one
// in use. They wrap after 2^32 (a user flooding connects gets there in
// hours); from then on each is checked against those in use.
class Ids {
 public:
  explicit Ids(std::uint32_t first = 1) : next_(first == 0 ? 1 : first) {}
  template <class InUse>
  std::uint32_t take(const InUse& in_use) {
    while (true) {
      const std::uint32_t id = next_;
      if (next_ == UINT32_MAX) wrapped_ = true;
      next_ = next_ == UINT32_MAX ? 1 : next_ + 1;
      if (!wrapped_ || !in_use(id)) return id;
    }
  }

 private:
  std::uint32_t next_;
  bool wrapped_ = false;
};

struct ServerOptions {
  std::string socket_path;
  std::uint32_t slots = 256;
  std::uint32_t max_clients = 1024;
  std::uint32_t max_clients_per_uid = 512;
  std::uint64_t spin_ns = 1'000'000;
  std::uint64_t hello_timeout_ns = 2'000'000'000;  // a connection must greet within this
  std::vector<Uuid> devices;                       // announced in the welcome
  std::vector<std::uint8_t> device_mps;            // per device: 1 if the daemon is on MPS there
  // How the route of the tenants on MPS is measured (only where the daemon
  // is on MPS itself).
  FleetRouteOptions fleet;
  // STMUX_SPINNING_TENANTS: how many active tenants at a time are told they
  // may spin while they wait (the segment's may_spin word), in turn.
  std::uint32_t spinning_tenants = 0;
  // Every `metrics_period_ns` the metrics' text goes to `publish_metrics`
  // (a MetricsFile in stmuxd); 0: none are made.
  std::uint64_t metrics_period_ns = 0;
  std::function<void(std::string)> publish_metrics;
  // Called on the server thread as the drain begins (stmuxd tells systemd
  // it is stopping); the metrics are published then too.
  std::function<void()> on_drain;
};

class Server {
 public:
  Server(ServerOptions options, RequestSink& sink);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the socket. Refuses if another daemon is listening on it; removes a
  // stale socket file left by one that died.
  Status listen();

  // Serves until requestStop() or the sink's mustEnd(), then drains: no new
  // clients, every segment marked draining, every request already queued or
  // in flight finished, those awaiting memory or a stream declined, then
  // every client's socket closed so that they fall back to cuBLAS.
  void run();
  // Why run() ended other than by requestStop(): the sink's mustEnd().
  const std::string& failure() const { return failure_; }

  // Async-signal-safe: a SIGTERM handler may call it.
  void requestStop();

  std::size_t clientCount() const { return clients_.size(); }
  const std::vector<ClientPtr>& clients() const { return clients_; }

 private:
  struct Pending;  // accepted, greeting not yet received
  struct Reply;    // a status reply not yet wholly sent

  bool drainRings();
  // One request of `client`'s into the sink, timed as it is taken, if its
  // user's share of this turn allows and its ring has one; whether it took
  // one.
  bool takeRequest(const ClientPtr& client);
  // Handles what epoll reports within `timeout_ns` (0: only what is ready
  // now; none: waits for something).
  void handleEvents(std::optional<std::uint64_t> timeout_ns);
  void acceptAll();
  // Stops looking at the listening socket until `until_ns`, or takes it up
  // again once that time has come.
  void pauseAccepting(std::uint64_t until_ns);
  void resumeAccepting(std::uint64_t now);
  // Reads the hello and answers it; a connection whose hello has not come
  // yet waits among the pending.
  void greet(std::unique_ptr<Pending> pending);
  void addPending(std::unique_ptr<Pending> pending);
  void refuse(int fd, const std::string& reason);
  void admitTenant(AsideFd socket, const ::ucred& cred, const HelloMsg& hello);
  // A status query from `uid`: refused where too many are being answered
  // (kMaxReplies, kMaxRepliesPerUid), else answered in parts.
  void answerControl(AsideFd socket, std::uint32_t uid);
  // Sends what the socket takes now; false once the reply is done or failed.
  bool pumpReply(Reply& reply);
  void dropReply(std::uint64_t id);
  void readClient(const ClientPtr& client);
  // Stops reading release notices (RequestSink::takesNotices), the clients'
  // sockets watched for hang-ups only, or takes them up again.
  void pauseNotices(bool paused);
  // The events a client's socket is watched for now.
  std::uint32_t socketEvents() const;
  void detach(const ClientPtr& client, const char* why);
  // Closes the sockets of the clients let go whose calls are all answered.
  void closeAnswered();
  void expirePending(std::uint64_t now);
  void sleepUntil(std::uint64_t wake_at_ns);
  std::string statusJson() const;
  void addMetrics(MetricsText& out) const;
  void publishMetrics(std::uint64_t now);
  bool publishCompany(std::uint64_t now);
  void steerFleet(std::uint64_t now);

  ServerOptions options_;
  RequestSink& sink_;
  SegmentLayout layout_;
  UniqueFd listen_;
  UniqueFd epoll_;
  UniqueFd stop_fd_;  // an eventfd: requestStop() wakes a sleeping run()
  // This process's own pidfd (Linux 5.3), handed to each tenant in its
  // welcome: it tells the tenant when this process has ended, in any pid
  // namespace (Connection::daemonProcess). Invalid where the kernel has none.
  UniqueFd own_pidfd_;
  std::atomic<bool> stop_{false};
  std::vector<ClientPtr> clients_;
  // Clients let go while calls of theirs still ran on a GPU: each socket
  // stays open until those are answered. A client reads the hang-up as the
  // daemon gone and runs a started call (beta 0) again itself, which the
  // daemon's launch, still queued, could then overwrite.
  std::vector<ClientPtr> lingering_;
  std::vector<std::unique_ptr<Pending>> pending_;
  std::vector<std::unique_ptr<Reply>> replies_;
  // The status last built, when, and the CPU time that took (kStatusReuseFactor).
  std::shared_ptr<const std::string> status_;
  std::uint64_t status_built_ns_ = 0;
  std::uint64_t status_cost_ns_ = 0;
  std::uint64_t status_builds_ = 0;
  std::uint64_t accept_paused_until_ = 0;  // 0: the listening socket is watched
  bool notices_paused_ = false;
  std::uint64_t next_metrics_ns_ = 0;
  std::uint64_t next_company_ns_ = 0;
  FleetRoute fleet_;              // the route of the tenants on MPS
  std::uint32_t fleet_word_ = 0;  // as published
  std::size_t spin_turn_ = 0;     // the active tenant whose turn to spin comes first
  // One line a second at most for each condition a flood repeats.
  LogLimiter accept_log_;      // accept() failing; a uid's silent connections
  LogLimiter silent_log_;      // connections closed for saying no hello
  LogLimiter refuse_log_;      // hellos refused, welcomes not sent
  LogLimiter reply_log_;       // status replies not sent
  std::vector<int> controls_;  // stmuxctl connections awaiting a query
  Ids ids_;
  std::uint32_t freshId();
  std::size_t rotate_ = 0;
  std::vector<std::size_t> busy_;  // drainRings': clients_ with requests still coming
  std::uint64_t ring_turn_ = 0;    // drainRings' turns so far
  std::uint64_t event_turn_ = 0;   // handleEvents'
  std::map<uid_t, std::weak_ptr<UserShare>> user_shares_;  // of the users with clients
  bool draining_ = false;
  std::string failure_;
  std::uint64_t started_ns_ = 0;
};

}  // namespace stmux::daemon

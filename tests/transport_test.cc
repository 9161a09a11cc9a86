// The client end of the transport (shim/transport.cc) against a real server:
// attach, round trips from many threads, refusals with their reasons, the slot
// protocol's cancel and stale-generation rules, and a daemon killed mid-call.
// Against fake daemons: what the client checks before it trusts one (its uid,
// the segment's seals and size, the doorbell).
#include "shim/transport.h"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fake_daemon.h"
#include "stmux/control.h"
#include "test_support.h"

namespace stmux {
namespace {

using shim::Connection;
using shim::ConnectOptions;
using shim::Ticket;
using testing::listenAt;
using testing::ServerThread;
using testing::TempDir;
using testing::TestSink;

constexpr std::uint64_t kSecond = 1'000'000'000;

ConnectOptions options(const TempDir& dir) {
  ConnectOptions o;
  o.socket_path = dir.socket();
  o.name = "transport_test";
  return o;
}

Request withStatus(std::int32_t status) {
  Request request{};
  request.op = static_cast<std::uint32_t>(Op::kSgemm);
  request.flags = static_cast<std::uint32_t>(status);
  return request;
}

TEST(Transport, RoundTripReturnsTheDaemonsStatus) {
  TempDir dir;
  TestSink sink;
  ServerThread server(testing::serverOptions(dir), sink);
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  for (std::int32_t status : {kStatusSuccess, kStatusInvalidValue, kStatusExecutionFailed}) {
    Request request = withStatus(status);
    auto ticket = connection.value()->submit(request, nowNs() + kSecond);
    ASSERT_TRUE(ticket.ok()) << ticket.message();
    auto result = connection.value()->wait(ticket.value(), nowNs() + 10 * kSecond, 20'000);
    EXPECT_EQ(result.outcome, WaitOutcome::kDone);
    EXPECT_EQ(result.status, status);
    connection.value()->release(ticket.value());
  }
}

TEST(Transport, ManyThreadsOfOneProcessSubmitAtOnce) {
  TempDir dir;
  TestSink sink;
  ServerThread server(testing::serverOptions(dir), sink);
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  Connection& conn = *connection.value();
  constexpr int kThreads = 16;  // each with one request in flight at a time
  constexpr int kCalls = 2000;
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        const std::int32_t status = (t * kCalls + i) % 1000;
        Request request = withStatus(status);
        auto ticket = conn.submit(request, nowNs() + 10 * kSecond);
        if (!ticket.ok()) {
          ++wrong;
          continue;
        }
        auto result = conn.wait(ticket.value(), nowNs() + 10 * kSecond, 1'000);
        if (result.outcome != WaitOutcome::kDone || result.status != status) ++wrong;
        conn.release(ticket.value());
      }
    });
  }
  for (auto& thread : threads)
    thread.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(sink.requests.load(), std::uint64_t{kThreads} * kCalls);
}

TEST(Transport, MoreThreadsThanSlotsWaitForSlots) {
  TempDir dir;
  TestSink sink;
  auto server_options = testing::serverOptions(dir);
  server_options.slots = 8;
  ServerThread server(server_options, sink);
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  Connection& conn = *connection.value();
  std::atomic<int> done{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 32; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        Request request = withStatus(0);
        auto ticket = conn.submit(request, nowNs() + 10 * kSecond);
        ASSERT_TRUE(ticket.ok()) << ticket.message();
        auto result = conn.wait(ticket.value(), nowNs() + 10 * kSecond, 1'000);
        ASSERT_EQ(result.outcome, WaitOutcome::kDone);
        conn.release(ticket.value());
        ++done;
      }
    });
  }
  for (auto& thread : threads)
    thread.join();
  EXPECT_EQ(done.load(), 32 * 200);
}

TEST(Transport, VersionMismatchIsRefusedNamingBothVersions) {
  TempDir dir;
  TestSink sink;
  ServerThread server(testing::serverOptions(dir), sink);
  ConnectOptions o = options(dir);
  o.version = kProtocolVersion + 1;
  auto connection = Connection::open(o);
  ASSERT_FALSE(connection.ok());
  EXPECT_NE(connection.message().find(
                fmt::format("protocol version mismatch: the client speaks {}, the daemon speaks "
                            "{}; use a libstmux.so (or stmuxctl) and stmuxd of one release",
                            kProtocolVersion + 1, kProtocolVersion)),
            std::string::npos)
      << connection.message();
  EXPECT_EQ(sink.attached.load(), 0);
}

TEST(Transport, NoDaemonSaysWhere) {
  TempDir dir;
  auto connection = Connection::open(options(dir));
  ASSERT_FALSE(connection.ok());
  EXPECT_NE(connection.message().find("cannot connect to " + dir.socket()), std::string::npos)
      << connection.message();
  EXPECT_FALSE(shim::refusedToAttach(connection.message())) << "no daemon is no refusal";
}

// A daemon that is stopped or stuck accepts nothing, and once its backlog
// is full connect() would wait for ever inside the caller's cuBLAS call.
TEST(Transport, ADaemonThatAcceptsNothingCostsAnAttachNoMoreThanTheTimeout) {
  TempDir dir;
  UniqueFd listener(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(listener.valid());
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::snprintf(address.sun_path, sizeof(address.sun_path), "%s", dir.socket().c_str());
  ASSERT_EQ(::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)),
            0);
  ASSERT_EQ(::listen(listener.get(), 0), 0);
  // Fills the backlog of 0 (Linux queues one beyond it).
  std::vector<UniqueFd> queued;
  for (int i = 0; i < 4; ++i) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
      break;
    }
    queued.push_back(std::move(fd));
  }
  ASSERT_FALSE(queued.empty());
  ConnectOptions o = options(dir);
  o.timeout_ns = kSecond / 5;
  const std::uint64_t start = nowNs();
  auto connection = Connection::open(o);
  const std::uint64_t took = nowNs() - start;
  ASSERT_FALSE(connection.ok());
  EXPECT_NE(connection.message().find("did not take the connection within 200 ms"),
            std::string::npos)
      << connection.message();
  EXPECT_LT(took, 2 * kSecond);
}

// stmuxctl's status query and a daemon starting at the same path were left
// waiting for ever the same way.
TEST(Transport, ADaemonThatAcceptsNothingCostsAStatusQueryAndAStartNoMoreThanTheirTimeouts) {
  TempDir dir;
  UniqueFd listener = listenAt(dir.socket());
  ASSERT_TRUE(listener.valid());
  ASSERT_EQ(::listen(listener.get(), 0), 0);
  auto address = socketAddress(dir.socket());
  ASSERT_TRUE(address.ok());
  std::vector<UniqueFd> queued;
  for (int i = 0; i < 4; ++i) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                  sizeof(sockaddr_un)) != 0) {
      break;
    }
    queued.push_back(std::move(fd));
  }
  ASSERT_FALSE(queued.empty());
  std::uint64_t start = nowNs();
  auto reply = queryDaemonStatus(dir.socket(), "transport_test", 200);
  EXPECT_LT(nowNs() - start, 2 * kSecond);
  ASSERT_FALSE(reply.ok());
  EXPECT_NE(reply.message().find("did not take the connection within 200 ms"), std::string::npos)
      << reply.message();

  TestSink sink;
  daemon::Server server(testing::serverOptions(dir), sink);
  start = nowNs();
  const Status listening = server.listen();
  EXPECT_LT(nowNs() - start, 3 * kSecond);
  ASSERT_FALSE(listening.ok());
  EXPECT_NE(listening.message().find("takes no connection"), std::string::npos)
      << listening.message();
}

// A path that is not a socket is named as such, not as a daemon refusing.
TEST(Transport, AStatusQueryAtAPathThatIsNoSocketSaysSo) {
  TempDir dir;
  const std::string file = dir.path() + "/not-a-socket";
  std::ofstream(file) << "x";
  auto reply = queryDaemonStatus(file, "transport_test", 200);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.message(), file + " is not a socket: a daemon's socket is expected there");
}

TEST(Transport, CancelWinsOnlyBeforeTheDaemonClaims) {
  TempDir dir;
  TestSink sink;
  sink.hold = true;
  ServerThread server(testing::serverOptions(dir), sink);
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  Connection& conn = *connection.value();

  Request first = withStatus(3);
  auto ticket = conn.submit(first, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok());
  ASSERT_TRUE(testing::waitFor([&] { return sink.heldCount() == 1; }));
  EXPECT_TRUE(conn.cancel(ticket.value())) << "an unclaimed request could not be cancelled";
  sink.releaseHeld();  // the daemon's claim now fails: nothing runs
  EXPECT_EQ(slotState(conn.view().slot(ticket->slot).word.load()), SlotState::kCancelled);
  conn.release(ticket.value());

  Request second = withStatus(5);
  auto claimed = conn.submit(second, nowNs() + kSecond);
  ASSERT_TRUE(claimed.ok());
  ASSERT_TRUE(testing::waitFor([&] { return sink.heldCount() == 1; }));
  // The daemon claims it (as the executor does before launching) ...
  ASSERT_TRUE(slotClaim(conn.view().slot(claimed->slot), claimed->generation));
  // ... and from then on the client may not walk away from it.
  EXPECT_FALSE(conn.cancel(claimed.value()));
  EXPECT_FALSE(conn.published(claimed.value()).has_value()) << "claimed is not done";
  slotComplete(conn.view().slot(claimed->slot), claimed->generation, 5);
  // What a client that found the daemon gone reads rather than report a
  // loss: the call was finished after all.
  EXPECT_EQ(conn.published(claimed.value()), std::optional<std::int32_t>(5));
  auto result = conn.wait(claimed.value(), nowNs() + kSecond, 1'000);
  EXPECT_EQ(result.outcome, WaitOutcome::kDone);
  EXPECT_EQ(result.status, 5);
  conn.release(claimed.value());
  sink.releaseHeld();
}

TEST(Transport, AStaleCompletionCannotTouchTheSlotsNextRequest) {
  TempDir dir;
  TestSink sink;
  sink.hold = true;
  ServerThread server(testing::serverOptions(dir), sink);
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  Connection& conn = *connection.value();

  Request old_request = withStatus(kStatusExecutionFailed);
  auto old_ticket = conn.submit(old_request, nowNs() + kSecond);
  ASSERT_TRUE(old_ticket.ok());
  ASSERT_TRUE(conn.cancel(old_ticket.value()));
  conn.release(old_ticket.value());
  Request new_request = withStatus(kStatusSuccess);
  auto new_ticket = conn.submit(new_request, nowNs() + kSecond);
  ASSERT_TRUE(new_ticket.ok());
  ASSERT_EQ(new_ticket->slot, old_ticket->slot) << "the test needs the slot reused";
  ASSERT_NE(new_ticket->generation, old_ticket->generation);
  ASSERT_TRUE(testing::waitFor([&] { return sink.heldCount() == 2; }));
  sink.releaseHeld();  // completes the old one first, then the new one
  auto result = conn.wait(new_ticket.value(), nowNs() + kSecond, 1'000);
  EXPECT_EQ(result.outcome, WaitOutcome::kDone);
  EXPECT_EQ(result.status, kStatusSuccess) << "the stale completion landed in the new request";
}

// A rejection published for an unclaimed request (as validation and the
// executor's declines do) races the client, which may cancel that request
// at any moment and arm the slot for its next one: the rejection's status
// must never land in the next request's. Two threads, many rounds: one
// publishes the rejection, the other cancels, re-arms and completes the next
// request as a daemon would, then checks the status it reads.
TEST(Transport, ARejectionRacingACancelNeverWritesTheNextRequestsStatus) {
  Slot slot{};
  std::atomic<std::uint32_t> round{0};  // odd: the publisher may go
  std::atomic<bool> stop{false};
  std::atomic<std::uint32_t> target{0};
  std::thread publisher([&] {
    std::uint32_t seen = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const std::uint32_t r = round.load(std::memory_order_acquire);
      if (r == seen || (r & 1) == 0) continue;
      seen = r;
      slotComplete(slot, target.load(std::memory_order_relaxed), kStatusDeclined);
      round.fetch_add(1, std::memory_order_acq_rel);
    }
  });
  int clobbered = 0, cancelled = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (int i = 0; i < 2'000'000 && std::chrono::steady_clock::now() < until; ++i) {
    const std::uint32_t generation = slotArm(slot);
    target.store(generation, std::memory_order_relaxed);
    const std::uint32_t go = round.fetch_add(1, std::memory_order_acq_rel) + 1;  // odd
    if (slotCancel(slot, generation)) {
      ++cancelled;
      const std::uint32_t next = slotArm(slot);
      ASSERT_TRUE(slotClaim(slot, next));
      slotComplete(slot, next, kStatusSuccess);
      while (round.load(std::memory_order_acquire) == go) {
      }
      ASSERT_EQ(slot.word.load(), slotWord(next, SlotState::kDone));
      if (slot.status.load() != kStatusSuccess) ++clobbered;
    } else {
      while (round.load(std::memory_order_acquire) == go) {
      }
    }
  }
  stop.store(true);
  publisher.join();
  EXPECT_EQ(clobbered, 0) << "of " << cancelled << " requests whose predecessor was cancelled";
  EXPECT_GT(cancelled, 0) << "the race was never run";
}

TEST(Transport, NoticesADaemonKilledWithSigkill) {
  TempDir dir;
  const pid_t daemon = ::fork();
  ASSERT_GE(daemon, 0);
  if (daemon == 0) {
    TestSink sink;
    sink.hold = true;  // never answers
    daemon::Server server(testing::serverOptions(dir), sink);
    if (!server.listen().ok()) ::_exit(1);
    server.run();
    ::_exit(0);
  }
  // The daemon child dies with the test, whatever assertion ends it: a child
  // left running would hold ctest's output open until its timeout.
  struct KillAtExit {
    pid_t pid;
    ~KillAtExit() {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  } reaper{daemon};
  // The socket file appears at bind(), a moment before listen(): until then a
  // connect is refused, so try until one is accepted.
  Result<std::unique_ptr<Connection>> connection = Status::error("not tried");
  ASSERT_TRUE(testing::waitFor([&] { return (connection = Connection::open(options(dir))).ok(); }))
      << connection.message();
  Request request = withStatus(0);
  auto ticket = connection.value()->submit(request, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok());

  std::atomic<std::uint64_t> killed_ns{0};
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    killed_ns = nowNs();
    ::kill(daemon, SIGKILL);
  });
  auto result = connection.value()->wait(ticket.value(), nowNs() + 60 * kSecond, 20'000);
  const std::uint64_t noticed_ns = nowNs();
  killer.join();
  EXPECT_EQ(result.outcome, WaitOutcome::kGone);
  EXPECT_EQ(result.state, SlotState::kPending);
  EXPECT_LT(noticed_ns - killed_ns.load(), kSecond) << "took too long to notice";
  // Never started, so the shim may run it itself.
  EXPECT_TRUE(connection.value()->cancel(ticket.value()));
  EXPECT_FALSE(connection.value()->alive());
  EXPECT_EQ(connection.value()->daemonProcess(nowNs() + 10 * kSecond),
            shim::DaemonProcess::kExited);
}

// A killed daemon's socket closes before its process has ended, and so
// before the driver has torn down what it queued on its GPU: the client
// tells the hang-up from that end.
TEST(Transport, TellsTheDaemonsHangUpFromTheEndOfItsProcess) {
  TempDir dir;
  daemon::HangingUpDaemon dying(dir);
  ASSERT_TRUE(dying.listening());
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  Connection& client = *connection.value();
  EXPECT_EQ(client.daemonProcess(0), shim::DaemonProcess::kLives);
  Request request = withStatus(0);
  auto ticket = client.submit(request, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok());
  ASSERT_TRUE(dying.hungUp());
  const auto result = client.wait(ticket.value(), nowNs() + 10 * kSecond, 20'000);
  EXPECT_EQ(result.outcome, WaitOutcome::kGone);
  EXPECT_EQ(result.state, SlotState::kRunning);
  EXPECT_EQ(client.daemonProcess(nowNs() + kSecond / 5), shim::DaemonProcess::kLives);
  dying.end();
  EXPECT_EQ(client.daemonProcess(nowNs() + 10 * kSecond), shim::DaemonProcess::kExited);
}

// A daemon in this very process (a test's, a benchmark's) cannot be
// outlived: its end is unknown, not awaited.
TEST(Transport, TheEndOfADaemonInThisProcessIsUnknown) {
  TempDir dir;
  TestSink sink;
  ServerThread server(testing::serverOptions(dir), sink);
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
  EXPECT_EQ(connection.value()->daemonProcess(nowNs() + kSecond), shim::DaemonProcess::kUnknown);
}

// ---- fake daemons: what the client checks before it trusts what it is handed ----

constexpr int kAllSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

// What a fake daemon hands over in its welcome; by default what the real
// daemon does (Server::admitTenant).
struct Forgery {
  std::function<void(void* base)> segment = [](void*) {};  // edits the segment's contents
  int seals = kAllSeals;
  off_t extra_bytes = 0;       // the segment's size beyond what the welcome says
  bool regular_file = false;   // the segment is a file in the test's directory
  bool pipe_doorbell = false;  // the doorbell is a pipe nobody drains
  int third = -1;              // a third descriptor to hand over (the daemon's pidfd), copied
};

struct Handover {
  WelcomeMsg welcome;
  UniqueFd segment;
  UniqueFd doorbell;
  UniqueFd drain;  // a pipe doorbell's read end
  UniqueFd third;  // sent where valid
};

// No gtest macros: it also runs in child processes.
Result<Handover> forge(const TempDir& dir, const Forgery& forgery) {
  const SegmentLayout layout = SegmentLayout::compute(64);
  const auto bytes = static_cast<off_t>(layout.total_bytes);
  Handover handover;
  handover.segment.reset(
      forgery.regular_file
          ? ::open((dir.path() + "/segment").c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)
          : ::memfd_create("forged", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  const int fd = handover.segment.get();
  if (fd < 0 || ::ftruncate(fd, bytes) != 0) {
    return Status::error(fmt::format("cannot make a segment: {}", std::strerror(errno)));
  }
  {
    auto mapping = mapShared(fd, layout.total_bytes);
    if (!mapping) return mapping.status();
    initSegment(mapping->base(), layout, /*client_id=*/7);
    forgery.segment(mapping->base());
  }
  if ((forgery.extra_bytes != 0 && ::ftruncate(fd, bytes + forgery.extra_bytes) != 0) ||
      (forgery.seals != 0 && ::fcntl(fd, F_ADD_SEALS, forgery.seals) != 0)) {
    return Status::error(fmt::format("cannot size or seal the segment: {}", std::strerror(errno)));
  }
  if (forgery.pipe_doorbell) {
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) return Status::error("pipe2 failed");
    handover.drain.reset(ends[0]);
    handover.doorbell.reset(ends[1]);
  } else {
    handover.doorbell.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  }
  if (forgery.third >= 0) handover.third.reset(::fcntl(forgery.third, F_DUPFD_CLOEXEC, 0));
  handover.welcome = makeMessage<WelcomeMsg>(MsgType::kWelcome);
  handover.welcome.client_id = 7;
  handover.welcome.slot_count = 64;
  handover.welcome.ring_capacity = layout.ring_capacity;
  handover.welcome.segment_bytes = layout.total_bytes;
  return handover;
}

Status sendWelcome(int peer, const Handover& handover) {
  const int fds[3] = {handover.segment.get(), handover.doorbell.get(), handover.third.get()};
  return sendMessage(peer, &handover.welcome, sizeof(handover.welcome), fds,
                     handover.third.valid() ? 3 : 2);
}

std::string refusal(const TempDir& dir, std::string_view why) {
  return fmt::format("refusing the daemon at {}: {}", dir.socket(), why);
}

// Attaches to a fake daemon (of this process's uid, so trusted as such) that
// hands over what `forgery` says; returns the client's error, empty if it
// attached.
std::string attachForged(const TempDir& dir, const Forgery& forgery) {
  UniqueFd listener = listenAt(dir.socket());
  auto handover = forge(dir, forgery);
  EXPECT_TRUE(listener.valid());
  EXPECT_TRUE(handover.ok()) << handover.message();
  if (!listener.valid() || !handover.ok()) return "the fake daemon could not start";
  std::thread fake([&] {
    UniqueFd peer(::accept(listener.get(), nullptr, nullptr));
    auto hello = recvMessage(peer.get(), true);
    EXPECT_TRUE(sendWelcome(peer.get(), handover.value()).ok());
    char byte;
    (void)::recv(peer.get(), &byte, 1, 0);  // until the client hangs up
  });
  auto connection = Connection::open(options(dir));
  std::string message = connection.ok() ? "" : connection.message();
  connection = Status::error("closed");
  fake.join();
  ::unlink(dir.socket().c_str());
  return message;
}

TEST(Transport, RefusesASegmentThatIsNotItsOwn) {
  TempDir dir;
  // Another client's segment: its header names client 8, the welcome said 7.
  std::string message = attachForged(
      dir, {.segment = [](void* base) { static_cast<SegmentHeader*>(base)->client_id = 8; }});
  EXPECT_NE(message.find("refusing the segment"), std::string::npos) << message;
  EXPECT_NE(message.find("client 8"), std::string::npos) << message;

  message = attachForged(
      dir, {.segment = [](void* base) { static_cast<SegmentHeader*>(base)->magic = 0xbadull; }});
  EXPECT_NE(message.find("segment magic"), std::string::npos) << message;

  message = attachForged(dir, {.segment = [](void* base) {
                           static_cast<SegmentHeader*>(base)->version = kProtocolVersion + 3;
                         }});
  EXPECT_NE(message.find("segment speaks protocol"), std::string::npos) << message;

  message = attachForged(dir, {});
  EXPECT_EQ(message, "") << "a well-formed segment was refused";
}

TEST(Transport, RefusesASegmentWhoseSizeCouldChange) {
  TempDir dir;
  const std::string unsealed = attachForged(dir, {.seals = 0});
  EXPECT_EQ(unsealed,
            refusal(dir,
                    "its segment is not sealed with F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL (its "
                    "seals: 0x0), so its size could change under this process"));
  EXPECT_TRUE(shim::refusedToAttach(unsealed)) << "the shim would count it as no_daemon";
  for (auto [seal, name] : {std::pair{F_SEAL_SHRINK, "F_SEAL_SHRINK"},
                            {F_SEAL_GROW, "F_SEAL_GROW"},
                            {F_SEAL_SEAL, "F_SEAL_SEAL"}}) {
    const std::string message = attachForged(dir, {.seals = kAllSeals & ~seal});
    EXPECT_EQ(message.find(refusal(dir, fmt::format("its segment is not sealed with {} (", name))),
              0u)
        << message;
  }
  // A plain file: no seals at all, or F_SEAL_SEAL alone where it lives on tmpfs.
  const std::string file = attachForged(dir, {.seals = 0, .regular_file = true});
  EXPECT_TRUE(file == refusal(dir,
                              "its segment is not a sealed memfd (F_GET_SEALS: Invalid "
                              "argument)") ||
              file.find(refusal(dir,
                                "its segment is not sealed with F_SEAL_SHRINK, F_SEAL_GROW "
                                "(its seals: 0x1)")) == 0)
      << file;
}

TEST(Transport, RefusesASegmentOfAnotherSizeThanTheWelcomeSays) {
  TempDir dir;
  const std::size_t bytes = SegmentLayout::compute(64).total_bytes;
  for (off_t extra : {off_t{4096}, off_t{-4096}}) {
    EXPECT_EQ(attachForged(dir, {.extra_bytes = extra}),
              refusal(dir, fmt::format("its segment is {} bytes, the welcome says {}",
                                       static_cast<off_t>(bytes) + extra, bytes)));
  }
}

TEST(Transport, RefusesADoorbellThatIsNotAnEventfd) {
  TempDir dir;
  const std::string message = attachForged(dir, {.pipe_doorbell = true});
  EXPECT_EQ(message.find(refusal(dir, "its doorbell is pipe:[")), 0u) << message;
  EXPECT_NE(message.find("], not an eventfd"), std::string::npos) << message;
}

// The attack of the hardening issue: a fake daemon hands over an unsealed
// segment and shrinks it once the client attached. A client that mapped it
// dies of SIGBUS at its next look; this one never maps it.
TEST(Transport, ADaemonThatShrinksTheSegmentCannotKillTheClient) {
  TempDir dir;
  UniqueFd listener = listenAt(dir.socket());
  ASSERT_TRUE(listener.valid());
  int reports[2], go[2];
  ASSERT_EQ(::pipe2(reports, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  UniqueFd report_read(reports[0]), report_write(reports[1]), go_read(go[0]), go_write(go[1]);
  const pid_t client = ::fork();
  ASSERT_GE(client, 0);
  if (client == 0) {
    auto connection = Connection::open(options(dir));
    const std::string report = connection.ok() ? "attached" : connection.message();
    (void)!::write(report_write.get(), report.data(), report.size());
    char byte;
    (void)!::read(go_read.get(), &byte, 1);  // the daemon shrinks the segment meanwhile
    if (connection.ok()) {
      // What every call does first: look at the segment.
      Request request = withStatus(0);
      (void)connection.value()->draining();
      (void)connection.value()->submit(request, nowNs() + kSecond);
    }
    ::_exit(0);
  }
  auto handover = forge(dir, {.seals = 0});
  ASSERT_TRUE(handover.ok()) << handover.message();
  UniqueFd peer(::accept(listener.get(), nullptr, nullptr));
  auto hello = recvMessage(peer.get(), true);
  ASSERT_TRUE(hello.ok() && !hello->eof);
  ASSERT_TRUE(sendWelcome(peer.get(), handover.value()).ok());
  char text[4096];
  const ssize_t n = ::read(report_read.get(), text, sizeof(text));
  const std::string report(text, n > 0 ? static_cast<std::size_t>(n) : 0);
  ASSERT_EQ(::ftruncate(handover->segment.get(), 0), 0);
  ASSERT_EQ(::write(go_write.get(), "g", 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(client, &status, 0), client);
  EXPECT_FALSE(WIFSIGNALED(status))
      << "the client died of " << ::strsignal(WTERMSIG(status)) << " after it " << report;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(report.find(refusal(dir, "its segment is not sealed with F_SEAL_SHRINK")), 0u)
      << report;
}

// A daemon that sent something after its welcome (which the shim never
// reads) and then hung up: the peek at the next message found those bytes,
// not the hang-up, and the client took the daemon for alive for ever (found
// by review).
TEST(Transport, AHangUpBehindAnUnreadMessageIsSeen) {
  TempDir dir;
  UniqueFd listener = listenAt(dir.socket());
  ASSERT_TRUE(listener.valid());
  auto handover = forge(dir, {});
  ASSERT_TRUE(handover.ok()) << handover.message();
  std::thread fake([&] {
    UniqueFd peer(::accept(listener.get(), nullptr, nullptr));
    auto hello = recvMessage(peer.get(), true);
    EXPECT_TRUE(sendWelcome(peer.get(), handover.value()).ok());
    const char extra[] = "a message after the welcome";
    EXPECT_EQ(::send(peer.get(), extra, sizeof(extra), 0), static_cast<ssize_t>(sizeof(extra)));
  });  // and hangs up, as it goes
  auto connection = Connection::open(options(dir));
  fake.join();
  ASSERT_TRUE(connection.ok()) << connection.message();
  EXPECT_FALSE(connection.value()->alive()) << "the hang-up behind the message was not seen";
}

// The welcome's third descriptor, the daemon's own pidfd: what tells a
// tenant the daemon's process has ended, in any pid namespace. A client in
// another process than the daemon watches it (here a pidfd of a process
// that has ended, while the daemon lives: the client says ended).
TEST(Transport, TheDaemonsPidfdInTheWelcomeIsWhatTheClientWatches) {
  TempDir dir;
  UniqueFd listener = listenAt(dir.socket());
  ASSERT_TRUE(listener.valid());
  const pid_t decoy = ::fork();
  ASSERT_GE(decoy, 0);
  if (decoy == 0) ::_exit(0);
  UniqueFd decoy_pidfd(static_cast<int>(::syscall(SYS_pidfd_open, decoy, 0)));
  ASSERT_EQ(::waitpid(decoy, nullptr, 0), decoy);
  if (!decoy_pidfd.valid()) GTEST_SKIP() << "this kernel has no pidfd_open";
  int reports[2];
  ASSERT_EQ(::pipe2(reports, O_CLOEXEC), 0);
  UniqueFd report_read(reports[0]), report_write(reports[1]);
  const pid_t client = ::fork();
  ASSERT_GE(client, 0);
  if (client == 0) {
    auto connection = Connection::open(options(dir));
    const std::string report =
        !connection.ok() ? connection.message()
        : connection.value()->daemonProcess(0) == shim::DaemonProcess::kExited ? "ended"
                                                                               : "not ended";
    (void)!::write(report_write.get(), report.data(), report.size());
    ::_exit(0);
  }
  report_write.reset();
  auto handover = forge(dir, {.third = decoy_pidfd.get()});
  ASSERT_TRUE(handover.ok()) << handover.message();
  UniqueFd peer(::accept(listener.get(), nullptr, nullptr));
  auto hello = recvMessage(peer.get(), true);
  ASSERT_TRUE(hello.ok() && !hello->eof);
  ASSERT_TRUE(sendWelcome(peer.get(), handover.value()).ok());
  char text[4096];
  const ssize_t n = ::read(report_read.get(), text, sizeof(text));
  ASSERT_EQ(::waitpid(client, nullptr, 0), client);
  EXPECT_EQ(std::string(text, n > 0 ? static_cast<std::size_t>(n) : 0), "ended");
}

TEST(Transport, RefusesAWelcomesThirdDescriptorThatIsNoPidfd) {
  TempDir dir;
  UniqueFd other(::eventfd(0, EFD_CLOEXEC));
  EXPECT_EQ(attachForged(dir, {.third = other.get()}),
            refusal(dir, "the welcome's third descriptor is not a pidfd"));
}

// ---- the daemon's uid ----

constexpr uid_t kDaemonUid = 65534;  // nobody
constexpr uid_t kServiceUid = 65533;
constexpr uid_t kTenantUid = 65532;
constexpr const char* kNeedsRoot = "needs root to run a daemon under another uid";

// In a child process: becomes `uid` for good, its group too, with no others.
bool becomeUser(uid_t uid) {
  return ::setgroups(0, nullptr) == 0 && ::setresgid(uid, uid, uid) == 0 &&
         ::setresuid(uid, uid, uid) == 0;
}

// A fake daemon in a child process running as `uid`. It welcomes each tenant
// as the real daemon does, and reports per connection whether a hello came
// ('H') or the tenant hung up without one ('E').
class FakeDaemonAs {
 public:
  FakeDaemonAs(const TempDir& dir, uid_t uid) {
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) {
      failure_ = "pipe2 failed";
      return;
    }
    UniqueFd read_end(ends[0]), write_end(ends[1]);
    // Its own directory, where it can make the socket; anyone may enter.
    if (::chown(dir.path().c_str(), uid, uid) != 0 || ::chmod(dir.path().c_str(), 0755) != 0) {
      failure_ = fmt::format("cannot hand {} over: {}", dir.path(), std::strerror(errno));
      return;
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      read_end.reset();
      serve(dir, uid, write_end.get());
    }
    write_end.reset();
    reports_ = std::move(read_end);
    const char first = next();
    if (first == 'R') return;
    char text[512];
    const ssize_t n = ::read(reports_.get(), text, sizeof(text));
    (first == 'S' ? cannot_switch_ : failure_) =
        std::string(text, n > 0 ? static_cast<std::size_t>(n) : 0);
    if (failure_.empty() && cannot_switch_.empty()) failure_ = "the fake daemon did not start";
  }
  ~FakeDaemonAs() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  // Why it could not become its uid (the test is skipped), or failed otherwise.
  const std::string& cannotSwitch() const { return cannot_switch_; }
  const std::string& failure() const { return failure_; }

  // The next report, or '?' when none comes within 10 s.
  char next() {
    pollfd pfd{reports_.get(), POLLIN, 0};
    char byte = '?';
    if (::poll(&pfd, 1, 10'000) != 1 || ::read(reports_.get(), &byte, 1) != 1) return '?';
    return byte;
  }

 private:
  [[noreturn]] static void serve(const TempDir& dir, uid_t uid, int report) {
    auto fail = [&](char kind, const std::string& why) {
      const std::string text = kind + why;
      (void)!::write(report, text.data(), text.size());
      ::_exit(1);
    };
    if (!becomeUser(uid)) {
      fail('S', fmt::format("cannot become uid {}: {}", uid, std::strerror(errno)));
    }
    UniqueFd listener = listenAt(dir.socket());
    // Any tenant may connect, as to the real daemon's socket for its group.
    if (!listener.valid() || ::chmod(dir.socket().c_str(), 0777) != 0) {
      fail('F', fmt::format("cannot listen at {}: {}", dir.socket(), std::strerror(errno)));
    }
    (void)!::write(report, "R", 1);
    while (true) {
      UniqueFd peer(::accept(listener.get(), nullptr, nullptr));
      auto hello = recvMessage(peer.get(), true);
      const bool greeted = hello.ok() && !hello->eof && !hello->bytes.empty();
      (void)!::write(report, greeted ? "H" : "E", 1);
      if (!greeted) continue;
      auto handover = forge(dir, {});
      if (!handover.ok()) fail('F', handover.message());
      if (Status sent = sendWelcome(peer.get(), handover.value()); !sent.ok()) {
        fail('F', sent.message());
      }
      char byte;
      (void)::recv(peer.get(), &byte, 1, 0);  // until the tenant hangs up
    }
  }

  pid_t pid_ = -1;
  UniqueFd reports_;
  std::string cannot_switch_;
  std::string failure_;
};

// Connection::open in a child process running as `uid`: "attached", or why not.
std::string attachAs(uid_t uid, const ConnectOptions& connect) {
  int ends[2];
  if (::pipe2(ends, O_CLOEXEC) != 0) return "pipe2 failed";
  UniqueFd read_end(ends[0]), write_end(ends[1]);
  const pid_t child = ::fork();
  if (child == 0) {
    std::string report = fmt::format("cannot become uid {}: {}", uid, std::strerror(errno));
    if (becomeUser(uid)) {
      auto connection = Connection::open(connect);
      report = connection.ok() ? "attached" : connection.message();
    }
    (void)!::write(write_end.get(), report.data(), report.size());
    ::_exit(0);
  }
  write_end.reset();
  std::string report;
  char text[512];
  for (ssize_t n; (n = ::read(read_end.get(), text, sizeof(text))) > 0;)
    report.append(text, static_cast<std::size_t>(n));
  ::waitpid(child, nullptr, 0);
  return report;
}

TEST(TransportTrust, ADaemonOfAnotherUserIsRefusedBeforeTheHello) {
  TempDir dir;
  if (::geteuid() != 0) GTEST_SKIP() << kNeedsRoot;
  FakeDaemonAs daemon(dir, kDaemonUid);
  if (!daemon.cannotSwitch().empty()) GTEST_SKIP() << kNeedsRoot << ": " << daemon.cannotSwitch();
  ASSERT_EQ(daemon.failure(), "");
  ConnectOptions connect = options(dir);
  connect.daemon_user = std::to_string(kServiceUid);

  // An ordinary tenant of a third uid: the attack the check is for.
  EXPECT_EQ(attachAs(kTenantUid, connect),
            fmt::format("refusing the daemon at {}: it runs as uid {}, accepted: 0 (root), {} "
                        "(this process), {} (STMUX_DAEMON_USER={})",
                        dir.socket(), kDaemonUid, kTenantUid, kServiceUid, kServiceUid));
  EXPECT_EQ(daemon.next(), 'E') << "the tenant greeted a daemon it does not trust";

  // Root trusts itself, not everyone.
  auto as_root = Connection::open(connect);
  ASSERT_FALSE(as_root.ok()) << "root attached to a daemon of uid " << kDaemonUid;
  EXPECT_EQ(as_root.message(),
            fmt::format("refusing the daemon at {}: it runs as uid {}, accepted: 0 (root, this "
                        "process), {} (STMUX_DAEMON_USER={})",
                        dir.socket(), kDaemonUid, kServiceUid, kServiceUid));
  EXPECT_TRUE(shim::refusedToAttach(as_root.message()));
  EXPECT_EQ(daemon.next(), 'E');

  // A service user that does not exist adds nobody.
  connect.daemon_user = "stmux-no-such-user";
  auto unknown = Connection::open(connect);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(
      unknown.message().find(fmt::format("it runs as uid {}, accepted: 0 (root, this process); "
                                         "STMUX_DAEMON_USER=stmux-no-such-user names no user",
                                         kDaemonUid)),
      std::string::npos)
      << unknown.message();
  EXPECT_EQ(daemon.next(), 'E');
}

TEST(TransportTrust, TheServiceUserAndTheTenantsOwnUidAreTrusted) {
  TempDir dir;
  if (::geteuid() != 0) GTEST_SKIP() << kNeedsRoot;
  FakeDaemonAs daemon(dir, kDaemonUid);
  if (!daemon.cannotSwitch().empty()) GTEST_SKIP() << kNeedsRoot << ": " << daemon.cannotSwitch();
  ASSERT_EQ(daemon.failure(), "");
  ConnectOptions connect = options(dir);
  connect.daemon_user = std::to_string(kDaemonUid);
  EXPECT_EQ(attachAs(kTenantUid, connect), "attached");
  EXPECT_EQ(daemon.next(), 'H');
  {
    auto as_root = Connection::open(connect);
    EXPECT_TRUE(as_root.ok()) << as_root.message();
  }
  EXPECT_EQ(daemon.next(), 'H');
  // A daemon the tenant could have started itself, whatever the service user.
  connect.daemon_user = std::to_string(kServiceUid);
  EXPECT_EQ(attachAs(kDaemonUid, connect), "attached");
  EXPECT_EQ(daemon.next(), 'H');
}

TEST(TransportTrust, TheServiceUserMayBeNamed) {
  const passwd* user = ::getpwuid(kDaemonUid);
  if (user == nullptr) GTEST_SKIP() << "no user has uid " << kDaemonUid << " here to name";
  const std::string name = user->pw_name;
  TempDir dir;
  if (::geteuid() != 0) GTEST_SKIP() << kNeedsRoot;
  FakeDaemonAs daemon(dir, kDaemonUid);
  if (!daemon.cannotSwitch().empty()) GTEST_SKIP() << kNeedsRoot << ": " << daemon.cannotSwitch();
  ASSERT_EQ(daemon.failure(), "");
  ConnectOptions connect = options(dir);
  connect.daemon_user = name;
  EXPECT_EQ(attachAs(kTenantUid, connect), "attached") << "STMUX_DAEMON_USER=" << name;
  EXPECT_EQ(daemon.next(), 'H');
}

}  // namespace
}  // namespace stmux

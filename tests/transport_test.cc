// The client end of the transport (shim/transport.cc) against a real server:
// attach, round trips from many threads, refusals with their reasons, the slot
// protocol's cancel and stale-generation rules, and a daemon killed mid-call.
#include "shim/transport.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <filesystem>
#include <functional>
#include <thread>
#include <vector>

#include "stmux/control.h"
#include "test_support.h"

namespace stmux {
namespace {

using shim::Connection;
using shim::ConnectOptions;
using shim::Ticket;
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
                fmt::format("protocol version mismatch: the client speaks {}, the daemon speaks {}",
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
  slotComplete(conn.view().slot(claimed->slot), claimed->generation, 5);
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
  ASSERT_TRUE(testing::waitFor([&] { return std::filesystem::exists(dir.socket()); }));
  auto connection = Connection::open(options(dir));
  ASSERT_TRUE(connection.ok()) << connection.message();
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
  ::waitpid(daemon, nullptr, 0);
  EXPECT_EQ(result.outcome, WaitOutcome::kGone);
  EXPECT_EQ(result.state, SlotState::kPending);
  EXPECT_LT(noticed_ns - killed_ns.load(), kSecond) << "took too long to notice";
  // Never started, so the shim may run it itself.
  EXPECT_TRUE(connection.value()->cancel(ticket.value()));
  EXPECT_FALSE(connection.value()->alive());
}

// A fake daemon that answers a hello with a welcome and a segment of its
// choosing, to show the client checks what it is handed.
std::string attachWithForgedSegment(const TempDir& dir,
                                    const std::function<void(void* base)>& forge) {
  auto address = socketAddress(dir.socket());
  UniqueFd listener(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                   sizeof(sockaddr_un)),
            0);
  EXPECT_EQ(::listen(listener.get(), 4), 0);
  std::thread fake([&] {
    UniqueFd peer(::accept(listener.get(), nullptr, nullptr));
    auto hello = recvMessage(peer.get(), true);
    const SegmentLayout layout = SegmentLayout::compute(64);
    UniqueFd memfd(::memfd_create("forged", MFD_CLOEXEC));
    ASSERT_EQ(::ftruncate(memfd.get(), static_cast<off_t>(layout.total_bytes)), 0);
    auto mapping = mapShared(memfd.get(), layout.total_bytes);
    initSegment(mapping->base(), layout, /*client_id=*/7);
    forge(mapping->base());
    UniqueFd doorbell(::eventfd(0, EFD_CLOEXEC));
    auto welcome = makeMessage<WelcomeMsg>(MsgType::kWelcome);
    welcome.client_id = 7;
    welcome.slot_count = 64;
    welcome.ring_capacity = layout.ring_capacity;
    welcome.segment_bytes = layout.total_bytes;
    const int fds[2] = {memfd.get(), doorbell.get()};
    ASSERT_TRUE(sendMessage(peer.get(), &welcome, sizeof(welcome), fds, 2).ok());
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
  std::string message = attachWithForgedSegment(
      dir, [](void* base) { static_cast<SegmentHeader*>(base)->client_id = 8; });
  EXPECT_NE(message.find("refusing the segment"), std::string::npos) << message;
  EXPECT_NE(message.find("client 8"), std::string::npos) << message;

  message = attachWithForgedSegment(
      dir, [](void* base) { static_cast<SegmentHeader*>(base)->magic = 0xbadull; });
  EXPECT_NE(message.find("segment magic"), std::string::npos) << message;

  message = attachWithForgedSegment(
      dir, [](void* base) { static_cast<SegmentHeader*>(base)->version = kProtocolVersion + 3; });
  EXPECT_NE(message.find("segment speaks protocol"), std::string::npos) << message;

  message = attachWithForgedSegment(dir, [](void*) {});
  EXPECT_EQ(message, "") << "a well-formed segment was refused";
}

}  // namespace
}  // namespace stmux

// The scheduler (daemon/scheduler.cc) end to end on the real transport, with a
// fake executor standing in for the GPU (the real one runs in the gpu-labelled
// tests): validation answers, routing by UUID, batching across clients, and
// what reaches the executor when clients free memory or leave.
#include "daemon/scheduler.h"

#include <gtest/gtest.h>

#include <sys/resource.h>

#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "fake_daemon.h"
#include "prometheus_format.h"
#include "shim/transport.h"
#include "stmux/control.h"
#include "stmux/epilogue.h"
#include "stmux/json.h"
#include "stmux/mps_seats.h"
#include "test_support.h"

namespace stmux::daemon {
namespace {

using testing::TempDir;

constexpr std::uint64_t kSecond = 1'000'000'000;

std::unique_ptr<shim::Connection> connect(const TempDir& dir) {
  return connectTo(dir, "scheduler_test");
}

std::int32_t call(shim::Connection& connection, Request request) {
  auto ticket = connection.submit(request, nowNs() + kSecond);
  if (!ticket.ok()) return INT32_MIN;
  auto result = connection.wait(ticket.value(), nowNs() + 10 * kSecond, 10'000);
  connection.release(ticket.value());
  return result.outcome == WaitOutcome::kDone ? result.status : INT32_MIN + 1;
}

// Commands that found the executor's queue full wait in the channel; the
// executor's next take makes room, and wakes the scheduler to move them
// (they waited for an unrelated wake-up, ~75 ms, before).
TEST(ExecutorChannel, RoomMadeForWaitingCommandsWakesTheScheduler) {
  UniqueFd wake = Scheduler::makeWakeFd();
  ASSERT_GE(wake.get(), 0);
  ExecutorChannel channel(wake.get());
  const auto release = [] {
    auto command = std::make_unique<ExecCommand>();
    command->kind = ExecCommand::Kind::kRelease;
    command->alloc_ids = {1};
    return command;
  };
  int posted = 0;
  while (channel.backlog() == 0) {
    channel.post(release());
    ASSERT_LT(++posted, 100'000);
  }
  std::uint64_t count = 0;
  const auto woken = [&] { return ::read(wake.get(), &count, sizeof(count)) == sizeof(count); };
  (void)woken();  // whatever earlier moves rang
  EXPECT_FALSE(woken());
  ASSERT_TRUE(channel.takeCommand());
  EXPECT_TRUE(woken()) << "the executor made room and did not wake the scheduler";
  EXPECT_FALSE(channel.flush()) << "the waiting command did not fit in the room made";
  EXPECT_EQ(channel.backlog(), 0u);
  ASSERT_TRUE(channel.takeCommand());
  EXPECT_FALSE(woken()) << "nothing waits: no wake needed";
  while (channel.takeCommand()) {
  }
}

// STMUX_DEVICES's items against the GPUs there are: by index or UUID (any
// case), in the order named; one GPU named twice two ways was served by two
// executors (one idle) and listed twice in status and metrics.
TEST(Scheduler, StmuxDevicesChoosesEachGpuOnceByIndexOrUuid) {
  const std::vector<GpuInfo> gpus{{0, uuid(0xab), "a"}, {1, uuid(0xcd), "b"}};
  const std::string upper_cd = "GPU-CDCDCDCD-CDCD-CDCD-CDCD-CDCDCDCDCDCD";
  const auto indices = [](const Result<std::vector<GpuInfo>>& chosen) {
    std::vector<int> out;
    for (const GpuInfo& gpu : chosen.value())
      out.push_back(gpu.index);
    return out;
  };
  auto chosen = chooseGpus(gpus, {});
  ASSERT_TRUE(chosen.ok()) << chosen.message();
  EXPECT_EQ(indices(chosen), (std::vector<int>{0, 1}));
  chosen = chooseGpus(gpus, {upper_cd, "00"});
  ASSERT_TRUE(chosen.ok()) << chosen.message();
  EXPECT_EQ(indices(chosen), (std::vector<int>{1, 0}));

  chosen = chooseGpus(gpus, {"1", upper_cd});
  ASSERT_FALSE(chosen.ok());
  EXPECT_EQ(chosen.message(), "STMUX_DEVICES names GPU 1 twice ('1' and '" + upper_cd + "')");
  chosen = chooseGpus(gpus, {formatUuid(uuid(0xab)), "0"});
  ASSERT_FALSE(chosen.ok());
  EXPECT_NE(chosen.message().find("names GPU 0 twice"), std::string::npos) << chosen.message();
  chosen = chooseGpus(gpus, {"2"});
  ASSERT_FALSE(chosen.ok());
  EXPECT_EQ(chosen.message(),
            "STMUX_DEVICES names '2', which is not a GPU here; the GPUs are: 0 (" +
                formatUuid(uuid(0xab)) + "), 1 (" + formatUuid(uuid(0xcd)) + ")");
}

TEST(Scheduler, AValidRequestReachesTheExecutorAndCompletes) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  EXPECT_EQ(call(*connection, validRequest()), kStatusSuccess);
  EXPECT_EQ(daemon.executor().batchSizes(), std::vector<std::size_t>{1});
}

// A client the daemon lets go (here for a malformed control message) while
// its call runs on the GPU reads the hang-up as the daemon gone, and would
// run the call (beta 0) again itself, beside the daemon's launch, still
// queued. Its socket stays open until the call is answered; meanwhile its
// segment says draining, so that it runs new calls directly.
// A GPU whose context failed on MPS ends the daemon, which says why (exit
// status 1 in stmuxd, for systemd to start it again): the MPS server takes
// no new client until every client it faulted has exited, the daemon
// included. Its clients are let go, and call cuBLAS directly.
TEST(Scheduler, AGpuThatFailsOnMpsEndsTheDaemonWhichSaysWhy) {
  TempDir dir;
  Daemon daemon(dir, 0, {}, 4096, /*on_mps=*/true);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  ASSERT_EQ(call(*connection, validRequest()), kStatusSuccess);
  EXPECT_TRUE(daemon.channel().markBroken());  // as the executor does on a sticky error
  ASSERT_TRUE(testing::waitFor([&] { return daemon.ended(); })) << "the daemon did not end";
  EXPECT_NE(daemon.failure().find("GPU 0 failed on MPS"), std::string::npos) << daemon.failure();
  EXPECT_TRUE(testing::waitFor([&] { return !connection->alive(); })) << "the client was kept";
}

// Off MPS, a daemon whose only GPU failed ends too (a daemon started again
// gets a new context); it stayed up declining every call until someone
// restarted it.
TEST(Scheduler, ADaemonWhoseOnlyGpuFailsOffMpsEnds) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  ASSERT_EQ(call(*connection, validRequest()), kStatusSuccess);
  EXPECT_TRUE(daemon.channel().markBroken());
  EXPECT_FALSE(daemon.channel().markBroken()) << "broken once";
  ASSERT_TRUE(testing::waitFor([&] { return daemon.ended(); })) << "the daemon did not end";
  EXPECT_NE(daemon.failure().find("GPU 0 failed, the only one this daemon serves"),
            std::string::npos)
      << daemon.failure();
  EXPECT_TRUE(testing::waitFor([&] { return !connection->alive(); })) << "the client was kept";
}

// Off MPS, with a GPU still working, the daemon stays up for it: the failed
// one's calls are declined (their shims run them directly).
TEST(Scheduler, ADaemonWithAGpuStillWorkingOffMpsStaysUpUntilEveryGpuFailed) {
  UniqueFd wake = Scheduler::makeWakeFd();
  ExecutorChannel first(wake.get()), second(wake.get());
  Scheduler scheduler(
      BatcherOptions{},
      {GpuInfo{0, uuid(0xa0), "fake", false}, GpuInfo{1, uuid(0xa1), "fake", false}},
      {&first, &second});
  EXPECT_EQ(scheduler.mustEnd(), "");
  first.markBroken();
  EXPECT_EQ(scheduler.mustEnd(), "") << "GPU 1 still serves";
  second.markBroken();
  EXPECT_EQ(scheduler.mustEnd(),
            "all 2 GPUs this daemon serves failed: a daemon started again has new CUDA contexts "
            "on them");
}

// Submits a call and, once the daemon runs it, sends a malformed control
// message, for which the daemon lets the client go. The call's ticket; none
// (the failure said) where a step failed.
std::optional<shim::Ticket> letGoWhileACallRuns(shim::Connection& connection) {
  Request request = validRequest();
  auto ticket = connection.submit(request, nowNs() + kSecond);
  if (!ticket.ok()) {
    ADD_FAILURE() << ticket.message();
    return std::nullopt;
  }
  const Slot& slot = connection.view().slot(ticket->slot);
  if (!testing::waitFor([&] { return slotState(slot.word.load()) == SlotState::kRunning; })) {
    ADD_FAILURE() << "the daemon never ran the call";
    return std::nullopt;
  }
  const char garbage[] = "not a control message";
  if (::send(connection.socketFd(), garbage, sizeof(garbage), 0) !=
      static_cast<ssize_t>(sizeof(garbage))) {
    ADD_FAILURE() << "send: " << std::strerror(errno);
    return std::nullopt;
  }
  return ticket.value();
}

TEST(Scheduler, AClientLetGoWhileItsCallRunsIsHungUpOnOnlyOnceTheCallIsAnswered) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/2 * kSecond);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  const std::optional<shim::Ticket> ticket = letGoWhileACallRuns(*connection);
  ASSERT_TRUE(ticket);
  EXPECT_TRUE(testing::waitFor([&] { return connection->draining(); }))
      << "new calls would wait on a ring nobody reads";
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_TRUE(connection->alive()) << "hung up on while its call ran";
  const auto result = connection->wait(*ticket, nowNs() + 10 * kSecond, 10'000);
  EXPECT_EQ(result.outcome, WaitOutcome::kDone);
  EXPECT_EQ(result.status, kStatusSuccess);
  EXPECT_TRUE(testing::waitFor([&] { return !connection->alive(); })) << "never hung up on";
}

// Such a client keeps its place (STMUX_MAX_CLIENTS, and its user's share)
// until it is hung up on: otherwise being let go and attaching again, with
// calls on the GPU each time, would hold any number of sockets and segments.
TEST(Scheduler, AClientLetGoWhileItsCallRunsKeepsItsPlaceUntilItIsHungUpOn) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/kSecond,
                [](daemon::ServerOptions& options) { options.max_clients = 1; });
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  const std::optional<shim::Ticket> ticket = letGoWhileACallRuns(*connection);
  ASSERT_TRUE(ticket);
  ASSERT_TRUE(testing::waitFor([&] { return connection->draining(); }));
  shim::ConnectOptions options;
  options.socket_path = dir.socket();
  options.name = "second";
  auto second = shim::Connection::open(options);
  ASSERT_FALSE(second.ok()) << "attached beside a client let go whose call still runs";
  EXPECT_NE(second.message().find("maximum of 1 clients (STMUX_MAX_CLIENTS); 1 of them let go"),
            std::string::npos)
      << second.message();
  EXPECT_TRUE(testing::waitFor([&] { return !connection->alive(); }, std::chrono::seconds(10)));
  connection->release(*ticket);
  EXPECT_TRUE(testing::waitFor([&] { return shim::Connection::open(options).ok(); }))
      << "its place was not given back once it was hung up on";
}

TEST(Scheduler, InvalidArgumentsAreAnsweredWithoutTheGpu) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request bad_lda = validRequest();
  bad_lda.lda = 7;
  EXPECT_EQ(call(*connection, bad_lda), kStatusInvalidValue);
  Request bad_op = validRequest();
  bad_op.transb = 9;
  EXPECT_EQ(call(*connection, bad_op), kStatusInvalidValue);
  Request negative = validRequest();
  negative.k = -1;
  EXPECT_EQ(call(*connection, negative), kStatusInvalidValue);
  Request no_c = validRequest();
  no_c.c.alloc_id = 0;
  EXPECT_EQ(call(*connection, no_c), kStatusInvalidValue) << "an undescribed operand";
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
  daemon.stop();
  EXPECT_EQ(daemon.scheduler().rejected(), 4u);
}

// A math mode or emulation strategy cuBLAS does not name failed the launch
// on the executor, a warning for each such request (found by review): it is
// declined before the GPU, and runs in its caller, whose cuBLAS says what
// it makes of it.
TEST(Scheduler, UnknownPrecisionSettingsAreDeclinedWithoutTheGpu) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request mode = validRequest();
  mode.math_mode = 5;
  EXPECT_EQ(call(*connection, mode), kStatusDeclined);
  Request emulation = validRequest();
  emulation.emulation = 3;
  EXPECT_EQ(call(*connection, emulation), kStatusDeclined);
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
  Request flagged = validRequest();
  flagged.math_mode = 3 | 16;  // TF32, reductions in FP32
  EXPECT_EQ(call(*connection, flagged), kStatusSuccess);
  EXPECT_EQ(daemon.executor().batchSizes(), std::vector<std::size_t>{1});
}

// Operands of one request that name the same allocation but describe it
// differently (another handle or base) are a confused or hostile client's:
// mapping one would unmap the other, and the request would ask for both
// again at every look, keeping the mapper opening and the server busy for
// ever. It is declined (the shim runs it itself) before anything is opened.
TEST(Scheduler, OperandsThatDescribeOneAllocationTwoWaysAreDeclined) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request two_handles = validRequest();
  two_handles.b.alloc_id = two_handles.a.alloc_id;
  two_handles.b.handle.bytes[0] = 7;
  Request two_bases = validRequest();
  two_bases.c.alloc_id = two_bases.a.alloc_id;
  two_bases.c.base = 4096;
  const int opens = daemon.executor().opens();
  EXPECT_EQ(call(*connection, two_handles), kStatusDeclined);
  EXPECT_EQ(call(*connection, two_bases), kStatusDeclined);
  EXPECT_EQ(daemon.executor().opens(), opens) << "nothing opened for them";
  // The same allocation described alike by two operands is ordinary (A and
  // B in one cudaMalloc'd block).
  Request shared = validRequest();
  shared.b = shared.a;
  EXPECT_EQ(call(*connection, shared), kStatusSuccess);
  EXPECT_EQ(daemon.executor().batchSizes(), std::vector<std::size_t>{1});
}

// A strided batch whose problems write one C is never sent by the shim
// (servedStrides): a client writing its ring itself could otherwise make a C
// of one problem's size take the GPU for 2^30 problems.
TEST(Scheduler, StridedBatchesTheShimNeverSendsAreDeclined) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request one_c = validRequest();
  one_c.batch_count = 1 << 30;
  one_c.stride_c = 0;
  Request overlapping = validRequest();
  overlapping.batch_count = 2;
  overlapping.stride_c = overlapping.m;  // the second problem's C starts in the first's
  EXPECT_EQ(call(*connection, one_c), kStatusDeclined);
  EXPECT_EQ(call(*connection, overlapping), kStatusDeclined);
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
  Request apart = validRequest();
  apart.batch_count = 2;
  apart.stride_c = apart.ldc * apart.n;
  EXPECT_EQ(call(*connection, apart), kStatusSuccess);
  EXPECT_EQ(daemon.executor().batchSizes(), std::vector<std::size_t>{1});
}

// An epilogue's bias is an operand like A, B and C: one that will be read
// has to be described, and the epilogue's bits have to be ones stmux knows.
TEST(Scheduler, AnEpilogueIsCheckedBeforeTheGpu) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request no_bias = validRequest();
  no_bias.epilogue = kEpilogueBias | kEpilogueRelu;
  EXPECT_EQ(call(*connection, no_bias), kStatusInvalidValue) << "a bias that is not described";
  Request both = validRequest();
  both.epilogue = kEpilogueRelu | kEpilogueGelu;
  EXPECT_EQ(call(*connection, both), kStatusInvalidValue) << "two activations";
  Request unknown = validRequest();
  unknown.epilogue = 1u << 7;
  EXPECT_EQ(call(*connection, unknown), kStatusInvalidValue) << "an unknown bit";
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
  // Described, or not read at all: queued like any other request.
  Request with_bias = no_bias;
  with_bias.bias.alloc_id = 4;
  EXPECT_EQ(call(*connection, with_bias), kStatusSuccess);
  Request gelu = validRequest();
  gelu.epilogue = kEpilogueGelu;
  EXPECT_EQ(call(*connection, gelu), kStatusSuccess);
  EXPECT_EQ(daemon.executor().batchSizes(), (std::vector<std::size_t>{1, 1}));
  daemon.stop();
  EXPECT_EQ(daemon.scheduler().rejected(), 3u);
}

TEST(Scheduler, NoOpsSucceedWithoutALaunch) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request empty = validRequest();
  empty.m = 0;
  empty.a.alloc_id = empty.c.alloc_id = 0;  // nothing to describe
  EXPECT_EQ(call(*connection, empty), kStatusSuccess);
  Request keep_c = validRequest();
  keep_c.k = 0;
  keep_c.beta = 1.0f;
  EXPECT_EQ(call(*connection, keep_c), kStatusSuccess);
  Request empty_relu = empty;
  empty_relu.epilogue = kEpilogueRelu | kEpilogueBias;  // no element, no bias to describe
  EXPECT_EQ(call(*connection, empty_relu), kStatusSuccess);
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
}

TEST(Scheduler, AGpuTheDaemonDoesNotServeIsDeclined) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  ASSERT_EQ(connection->devices().size(), 1u);
  EXPECT_EQ(connection->devices()[0], uuid(0xab));
  Request elsewhere = validRequest();
  elsewhere.device = uuid(0xcd);
  EXPECT_EQ(call(*connection, elsewhere), kStatusDeclined);
  Request future_op = validRequest();
  future_op.op = 77;
  EXPECT_EQ(call(*connection, future_op), kStatusDeclined);
}

TEST(Scheduler, ConcurrentClientsShareBatches) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/200'000);  // a slow "GPU": requests pile up
  constexpr int kClients = 8, kCalls = 100;
  std::vector<std::unique_ptr<shim::Connection>> connections;
  for (int i = 0; i < kClients; ++i)
    connections.push_back(connect(dir));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      for (int c = 0; c < kCalls; ++c) {
        if (call(*connections[i], validRequest()) != kStatusSuccess) ++failures;
      }
    });
  }
  for (auto& thread : threads)
    thread.join();
  EXPECT_EQ(failures.load(), 0);
  const auto sizes = daemon.executor().batchSizes();
  std::size_t total = 0, largest = 0;
  for (std::size_t size : sizes) {
    total += size;
    largest = std::max(largest, size);
  }
  EXPECT_EQ(total, std::size_t{kClients} * kCalls) << "requests lost or run twice";
  EXPECT_GT(largest, 1u) << "no two clients' requests ever shared a batch";
  EXPECT_LE(largest, std::size_t{kClients});
}

// Clients the daemon lists as attached; -1 where it does not answer.
int clientCount(const TempDir& dir) {
  auto reply = queryDaemonStatus(dir.socket(), "scheduler_test", 2000);
  if (!reply.ok()) return -1;
  auto json = parseJson(reply.value());
  if (!json.ok()) return -1;
  const Json* clients = jsonFind(json.value(), "clients");
  int count = 0;
  while (jsonAt(clients, static_cast<std::size_t>(count)) != nullptr)
    ++count;
  return count;
}

// Mappings of client segments in this process ("memfd:stmux-client").
int segmentMappings() {
  std::ifstream maps("/proc/self/maps");
  int count = 0;
  for (std::string line; std::getline(maps, line);)
    count += line.find("memfd:stmux-client") != std::string::npos ? 1 : 0;
  return count;
}

// The commands a departure leaves for the executor held its Client, and so
// kept its segment mapped, until the executor took them: clients attaching
// and leaving while the executor was busy with a long batch grew the daemon
// by a segment each, without bound (found by review). They carry its id.
TEST(Scheduler, ClientsLeavingWhileTheExecutorIsBusyLeaveNoSegmentMapped) {
  TempDir dir;
  Daemon daemon(dir);
  daemon.executor().pause(true);  // takes no command, as one busy with a long batch
  const int before = segmentMappings();
  for (int i = 0; i < 20; ++i) {
    auto connection = connect(dir);
    ASSERT_TRUE(connection);
    ASSERT_TRUE(testing::waitFor([&] { return clientCount(dir) == 1; }));
  }  // each leaves as the next comes
  EXPECT_TRUE(testing::waitFor([&] { return clientCount(dir) == 0; }));
  EXPECT_TRUE(testing::waitFor([&] { return segmentMappings() == before; }))
      << segmentMappings() - before << " segments of clients gone still mapped";
  daemon.executor().pause(false);
}

TEST(Scheduler, FreesAndDeparturesReachTheExecutor) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  const std::uint32_t id = connection->clientId();
  ASSERT_TRUE(connection->sendRelease({11, 12, 13}).ok());
  ASSERT_TRUE(testing::waitFor([&] { return daemon.executor().released().size() == 3; }));
  EXPECT_EQ(daemon.executor().released(), (std::vector<std::uint64_t>{11, 12, 13}));
  connection.reset();
  ASSERT_TRUE(testing::waitFor([&] { return !daemon.executor().forgotten().empty(); }));
  EXPECT_EQ(daemon.executor().forgotten(), std::vector<std::uint32_t>{id});
}

// A request whose operands are allocations `first`, `first` + 1 and
// `first` + 2, apart from each other in the client's address space.
Request requestOn(std::uint64_t first) {
  Request r = validRequest();
  OperandDesc* operands[] = {&r.a, &r.b, &r.c};
  for (std::uint64_t i = 0; i < 3; ++i) {
    operands[i]->alloc_id = first + i;
    operands[i]->base = 0x7000'0000'0000 + (first + i) * 0x100000;
    operands[i]->alloc_bytes = 0x100000;
  }
  return r;
}

// Hostile clients writing their rings themselves, bypassing the shim's
// slots: one thread pushes `next()`'s requests into each ring in turn, as
// fast as the rings take them, re-arming slot after slot without waiting for
// answers, until the object goes (as many clients of one user, at one
// thread's CPU, as stmux-fault's flood).
class RingFlood {
 public:
  RingFlood(shim::Connection& client, std::function<Request()> next)
      : RingFlood(std::vector<shim::Connection*>{&client}, std::move(next)) {}
  RingFlood(const std::vector<shim::Connection*>& clients, std::function<Request()> next) {
    for (shim::Connection* client : clients) {
      rings_.emplace_back(*client,
                          RingProducer<Request>(client->view().ringHeader(), client->view().cells(),
                                                client->view().layout().ring_capacity));
    }
    thread_ = std::thread([this, next = std::move(next)] {
      for (std::uint32_t i = 0; flooding_; ++i) {
        bool any = false;  // pushed into some ring this round
        for (auto& [client, ring] : rings_) {
          Request request = next();
          request.slot = i % client.slotCount();
          request.generation = slotArm(client.view().slot(request.slot));
          if (ring.tryPush(request)) {
            ++pushed_;
            any = true;
          } else {
            // Full, and the daemon may be asleep: a control message wakes it
            // (this client bypasses the shim's doorbell along with its slots).
            (void)client.sendRelease({0});
          }
        }
        if (!any) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  ~RingFlood() {
    flooding_ = false;
    thread_.join();
  }
  std::uint64_t pushed() const { return pushed_; }

 private:
  std::deque<std::pair<shim::Connection&, RingProducer<Request>>> rings_;  // in place
  std::atomic<bool> flooding_{true};
  std::atomic<std::uint64_t> pushed_{0};
  std::thread thread_;
};

// Has the mapper open allocations from id `first` on only once `let_go`
// is set (a slow open), the others at once.
void holdOpens(FakeExecutor& executor, const std::atomic<bool>& let_go, std::uint64_t first = 0) {
  executor.setOpen([&let_go, first](OpenJob& job) {
    while (job.operand.alloc_id >= first && !let_go)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    FakeExecutor::openAsAsked(job);
  });
}

template <class T>
std::vector<T> sorted(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// The mapper opens a client's memory once, off the executor's thread; the
// executor adopts what it opened.
TEST(Scheduler, MemoryIsOpenedOnceByTheMapperAndAdoptedByTheExecutor) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
  EXPECT_EQ(daemon.executor().opens(), 3);
  EXPECT_EQ(sorted(daemon.executor().adopted()), (std::vector<std::uint64_t>{1, 2, 3}));
}

// An allocation the executor closed on its own (its client beyond
// STMUX_MAX_MAPPINGS) is opened by the mapper again at its next use; taken
// for mapped, the executor opened it on its own thread, every tenant's
// launches waiting, at every request of a tenant cycling through more
// allocations than the limit.
TEST(Scheduler, MemoryTheExecutorGaveUpIsOpenedByTheMapperAgain) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
  EXPECT_EQ(daemon.executor().opens(), 3);
  daemon.channel().gaveUp(connection->clientId(), 2);
  // A call the server read before it took the news still finds 2 mapped.
  EXPECT_TRUE(testing::waitFor([&] {
    EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
    return daemon.executor().opens() == 4;
  })) << "allocation 2 was taken for mapped";
  EXPECT_EQ(sorted(daemon.executor().adopted()), (std::vector<std::uint64_t>{1, 2, 2, 3}));
}

// A request its caller gave up on (its timeout: cancelled, run directly)
// while its memory was being opened, memory the program then freed and the
// shim released: the daemon opened it again when the first opens came back,
// and no release would ever come for it a second time (found by review).
TEST(Scheduler, MemoryReleasedAfterItsRequestWasCancelledIsNotOpenedAgain) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  std::atomic<bool> let_go{false};
  holdOpens(daemon.executor(), let_go);
  Request request = requestOn(100);
  auto ticket = connection->submit(request, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok());
  ASSERT_TRUE(testing::waitFor([&] { return daemon.executor().opens() >= 1; }));
  ASSERT_TRUE(connection->cancel(ticket.value()));
  connection->release(ticket.value());
  ASSERT_TRUE(connection->sendRelease({100, 101, 102}).ok());
  ASSERT_TRUE(testing::waitFor([&] { return daemon.executor().released().size() == 3; }));
  let_go = true;
  // A call on other memory: done once the server has looked at what waits.
  EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(daemon.executor().opens(), 6) << "3 for the cancelled request, 3 for the call";
  EXPECT_EQ(sorted(daemon.executor().adopted()), (std::vector<std::uint64_t>{1, 2, 3}))
      << "memory released before its opens came back was adopted";
}

// An allocation being opened (slowly: a churning or hostile tenant, issue 14)
// holds up only the requests that need it; other tenants' batches go on.
TEST(Scheduler, ATenantWhoseMemoryIsSlowToOpenHoldsUpNoOneElse) {
  TempDir dir;
  Daemon daemon(dir);
  auto slow = connect(dir);
  auto other = connect(dir);
  ASSERT_TRUE(slow && other);
  EXPECT_EQ(call(*other, requestOn(1)), kStatusSuccess);  // its memory mapped
  std::atomic<bool> let_go{false};
  holdOpens(daemon.executor(), let_go, /*first=*/100);
  Request request = requestOn(100);
  auto ticket = slow->submit(request, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok());
  for (int i = 0; i < 5; ++i)
    EXPECT_EQ(call(*other, requestOn(1)), kStatusSuccess);
  EXPECT_EQ(slow->wait(ticket.value(), nowNs() + 1'000'000, 0).outcome, WaitOutcome::kTimedOut)
      << "done before its memory was mapped";
  let_go = true;
  const auto result = slow->wait(ticket.value(), nowNs() + 10 * kSecond, 10'000);
  slow->release(ticket.value());
  EXPECT_EQ(result.outcome, WaitOutcome::kDone);
  EXPECT_EQ(result.status, kStatusSuccess);
}

// A tenant with many allocations to open, each slow (a churning or hostile
// tenant: issue 14), does not make another tenant's new memory wait behind
// them all: the mapper takes the tenants' opens in turn.
TEST(Scheduler, ATenantWithManySlowOpensDoesNotHoldUpAnothersNewMemory) {
  TempDir dir;
  // Before the daemon, whose mapper thread writes them until it is gone.
  std::mutex mutex;
  std::vector<std::uint64_t> order;  // alloc ids, as opened
  Daemon daemon(dir);
  auto slow = connect(dir);
  auto other = connect(dir);
  ASSERT_TRUE(slow && other);
  daemon.executor().setOpen([&](OpenJob& job) {
    if (job.operand.alloc_id >= 1000) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    {
      std::lock_guard lock(mutex);
      order.push_back(job.operand.alloc_id);
    }
    FakeExecutor::openAsAsked(job);
  });
  constexpr int kSlowRequests = 16;  // 48 allocations
  std::vector<shim::Ticket> tickets;
  for (int i = 0; i < kSlowRequests; ++i) {
    Request request = requestOn(1000 + 3 * i);
    auto ticket = slow->submit(request, nowNs() + 10 * kSecond);
    ASSERT_TRUE(ticket.ok()) << ticket.message();
    tickets.push_back(ticket.value());
  }
  ASSERT_TRUE(testing::waitFor([&] { return daemon.executor().opens() >= 1; }));
  EXPECT_EQ(call(*other, requestOn(1)), kStatusSuccess);
  std::size_t slow_before = 0;  // the slow tenant's opens before the other's last
  {
    std::lock_guard lock(mutex);
    const auto last = std::find(order.begin(), order.end(), 3);
    ASSERT_NE(last, order.end());
    slow_before = static_cast<std::size_t>(
        std::count_if(order.begin(), last, [](std::uint64_t id) { return id >= 1000; }));
  }
  // In turn: about one of the slow tenant's opens for each of the other's,
  // and the two already given to the mapper. First come, first served: 48.
  EXPECT_LE(slow_before, 8u) << "the other tenant's memory waited behind the slow tenant's";
  for (const shim::Ticket& ticket : tickets) {
    EXPECT_EQ(slow->wait(ticket, nowNs() + 10 * kSecond, 10'000).outcome, WaitOutcome::kDone);
    slow->release(ticket);
  }
}

// Memory the mapper cannot open (a garbage handle, freed memory): the
// requests that need it are declined, and their callers run them directly.
TEST(Scheduler, MemoryThatCannotBeMappedIsDeclined) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  daemon.executor().setOpen([](OpenJob& job) {
    if (job.operand.alloc_id != 2) return FakeExecutor::openAsAsked(job);
    job.error = "invalid argument";
  });
  EXPECT_EQ(call(*connection, requestOn(1)), kStatusDeclined);
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
  daemon.executor().setOpen({});  // now it can: tried again
  EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
}

// A client with more live allocations than the executor keeps mapped: the
// scheduler forgets what is mapped rather than grow, and opens it again at
// its next use.
TEST(Scheduler, WhatItKnowsOfAClientsMemoryStaysBounded) {
  TempDir dir;
  Daemon daemon(dir, 0, {}, /*mappings_per_client=*/2);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  for (std::uint64_t first : {1, 4, 7})
    EXPECT_EQ(call(*connection, requestOn(first)), kStatusSuccess);
  EXPECT_EQ(daemon.executor().opens(), 9);
  EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
  EXPECT_EQ(daemon.executor().opens(), 12) << "1, 2 and 3 were forgotten and opened again";
}

// A new allocation where a mapped one was (freed, since live ones never
// overlap): the executor is told to close the old before the new is opened,
// as CUDA will not open memory at an address still mapped.
TEST(Scheduler, AFreedAllocationOverlappedByANewOneIsReleasedFirst) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  EXPECT_EQ(call(*connection, requestOn(1)), kStatusSuccess);
  Request again = requestOn(1);
  again.c.alloc_id = 9;  // C's memory freed and allocated anew at the same address
  EXPECT_EQ(call(*connection, again), kStatusSuccess);
  EXPECT_EQ(daemon.executor().released(), std::vector<std::uint64_t>{3});
  EXPECT_EQ(sorted(daemon.executor().adopted()), (std::vector<std::uint64_t>{1, 2, 3, 9}));
}

// A number from the daemon's status: `field` of the client with `id`.
double clientField(const TempDir& dir, std::uint32_t id, const char* field) {
  auto reply = queryDaemonStatus(dir.socket(), "scheduler_test", 2000);
  if (!reply.ok()) return -1;
  auto json = parseJson(reply.value());
  if (!json.ok()) return -1;
  const Json* clients = jsonFind(json.value(), "clients");
  for (std::size_t i = 0; jsonAt(clients, i) != nullptr; ++i) {
    if (jsonNumber(jsonFind(jsonAt(clients, i), "id"), -1) == id) {
      return jsonNumber(jsonFind(jsonAt(clients, i), field), -1);
    }
  }
  return -1;
}

// A number from the daemon's status: `field` of its first GPU, or of the
// object `object` in it.
double gpuField(const TempDir& dir, const char* object, const char* field) {
  auto reply = queryDaemonStatus(dir.socket(), "scheduler_test", 2000);
  if (!reply.ok()) return -1;
  auto json = parseJson(reply.value());
  if (!json.ok()) return -1;
  const Json* gpu = jsonAt(jsonFind(json.value(), "gpus"), 0);
  return jsonNumber(jsonFind(object == nullptr ? gpu : jsonFind(gpu, object), field), -1);
}

// Release notices sent while the executor takes nothing (a long batch, an
// open on its thread) waited in the scheduler without bound: one client
// flooding them grew the daemon as fast as it could send. They now wait in
// the client's socket, whose sender keeps what does not fit (the shim tells
// it later); none is lost, and a client that leaves meanwhile is let go.
TEST(Scheduler, ReleaseNoticesWaitInTheSocketWhileTheExecutorTakesNothing) {
  TempDir dir;
  Daemon daemon(dir);
  auto flooder = connect(dir);
  auto leaver = connect(dir);
  ASSERT_TRUE(flooder && leaver);
  const std::uint32_t leaver_id = leaver->clientId();
  daemon.executor().pause(true);
  std::vector<std::uint64_t> sent;
  std::vector<std::uint64_t> ids(kMaxReleaseIds);
  rusage before{}, after{};
  ::getrusage(RUSAGE_SELF, &before);
  const std::uint64_t until = nowNs() + kSecond;
  std::uint64_t next_id = 1;
  while (nowNs() < until && sent.size() < 10'000'000) {
    if (leaver && nowNs() > until - kSecond / 2) leaver.reset();
    for (std::uint64_t& id : ids)
      id = next_id++;
    if (flooder->sendRelease(ids).ok()) {
      sent.insert(sent.end(), ids.begin(), ids.end());
    } else {
      next_id -= ids.size();  // full: the same ids again, as the shim keeps them
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  ::getrusage(RUSAGE_SELF, &after);
  // The executor's queue and one more of its size, in messages of
  // kMaxReleaseIds ids, and what the socket buffers (a few hundred).
  EXPECT_LT(sent.size(), 4096 * kMaxReleaseIds)
      << "the daemon took every notice while its executor took none";
  const auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; };
  EXPECT_LT(seconds(after.ru_utime) + seconds(after.ru_stime) - seconds(before.ru_utime) -
                seconds(before.ru_stime),
            0.5)
      << "CPU seconds over 1 s of notices left in the socket: the daemon spun";
  EXPECT_TRUE(testing::waitFor([&] { return clientField(dir, leaver_id, "id") == -1; }))
      << "a client that left while notices waited was not let go";
  daemon.executor().pause(false);
  ASSERT_TRUE(testing::waitFor([&] { return daemon.executor().released().size() >= sent.size(); },
                               std::chrono::seconds(10)));
  EXPECT_EQ(daemon.executor().released(), sent) << "notices lost or reordered";
  EXPECT_TRUE(testing::waitFor([&] { return daemon.executor().forgotten().size() == 1; }));
}

// The ring frees a cell as soon as the daemon pops it, so a client that
// writes its ring directly, bypassing the shim's slots, could queue without
// end (issue 14: 4.3 GB in 20 s). The scheduler holds each client to one
// request per slot; the excess is declined, and others are served as before.
TEST(Scheduler, AClientFloodingItsRingIsHeldToItsSlotsAndOthersAreServed) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/50'000'000);  // a slow GPU: everything piles up
  auto hostile = connect(dir);
  auto honest = connect(dir);
  ASSERT_TRUE(hostile && honest);
  const std::uint32_t slots = hostile->slotCount();
  const RingFlood flood(*hostile, validRequest);
  ASSERT_TRUE(
      testing::waitFor([&] { return flood.pushed() > 20 * slots; }, std::chrono::seconds(20)));
  // The daemon reuses a status for up to 100 ms (server.cc), so the one read
  // first may predate the flood: read until one shows it, then 20 more.
  double most = 0;
  const auto outstanding = [&] {
    most = std::max(most, clientField(dir, hostile->clientId(), "outstanding"));
    return most > 0;
  };
  EXPECT_TRUE(testing::waitFor(outstanding, std::chrono::seconds(20)))
      << "no status showed the flood's requests outstanding";
  for (int i = 0; i < 20; ++i)
    outstanding();
  EXPECT_LE(most, slots) << "queued and in flight beyond the client's slots";
  EXPECT_TRUE(testing::waitFor([&] { return clientField(dir, hostile->clientId(), "refused") > 0; },
                               std::chrono::seconds(20)));
  // Another tenant meanwhile: served, and nothing of its is refused (in a
  // status that counts its request: statuses only grow newer).
  EXPECT_EQ(call(*honest, validRequest()), kStatusSuccess);
  ASSERT_TRUE(
      testing::waitFor([&] { return clientField(dir, honest->clientId(), "requests") >= 1; },
                       std::chrono::seconds(20)));
  EXPECT_EQ(clientField(dir, honest->clientId(), "refused"), 0);
}

// Allocation ids from here up stand for garbage handles: the fake mapper's
// opens of them fail, each taking `cost` and counted in `failed` (which must
// outlive the daemon); the rest are opened as asked.
constexpr std::uint64_t kGarbage = std::uint64_t{1} << 40;
void failOpensOfGarbage(Daemon& daemon, std::atomic<std::uint64_t>& failed,
                        std::chrono::microseconds cost) {
  daemon.executor().setOpen([&failed, cost](OpenJob& job) {
    if (job.operand.alloc_id < kGarbage) return FakeExecutor::openAsAsked(job);
    if (cost.count() > 0) std::this_thread::sleep_for(cost);
    ++failed;
    job.ok = false;
    job.error = "invalid argument";
  });
}

// A client flooding its ring with requests whose memory handles are garbage
// (issue 14), each under a fresh allocation id: every one is an open for the
// mapper, which fails, slowly. Another client's release notices are still
// taken meanwhile, and its calls served.
TEST(Scheduler, AFloodOfUnopenableMemoryHoldsUpNoOtherClientsNotices) {
  TempDir dir;
  std::atomic<std::uint64_t> failed{0};  // outlives the daemon's mapper, which counts in it
  Daemon daemon(dir);
  failOpensOfGarbage(daemon, failed, std::chrono::microseconds(200));
  auto hostile = connect(dir);
  auto honest = connect(dir);
  ASSERT_TRUE(hostile && honest);
  ASSERT_EQ(call(*honest, requestOn(1)), kStatusSuccess);  // 1, 2, 3 mapped
  const std::uint32_t slots = hostile->slotCount();
  std::uint64_t next = kGarbage;  // the flood's thread alone uses it
  const RingFlood flood(*hostile, [&next] {
    const Request request = requestOn(next);
    next += 3;
    return request;
  });
  ASSERT_TRUE(
      testing::waitFor([&] { return flood.pushed() > 40 * slots; }, std::chrono::seconds(20)));
  // What waits to be opened stays about what the client's own requests can
  // use (4 operands a slot; those dropped in the scheduler's last look
  // still counted): without the bound it grew by every re-armed slot's.
  double most = 0;
  for (int i = 0; i < 20; ++i)
    most = std::max(most, gpuField(dir, nullptr, "opening"));
  EXPECT_LE(most, 2 * 4 * slots) << "allocations waiting to be opened grew past the flood's slots";
  // The honest client frees its A: the notice is taken and the mapping
  // released, flood or not.
  ASSERT_TRUE(honest->sendRelease({1}).ok());
  EXPECT_TRUE(testing::waitFor(
      [&] {
        const auto released = daemon.executor().released();
        return std::find(released.begin(), released.end(), 1u) != released.end();
      },
      std::chrono::seconds(2)))
      << "the honest client's release notice waited behind the flood's opens";
  EXPECT_EQ(call(*honest, requestOn(4)), kStatusSuccess);
}

// A failed open costs the driver what one that succeeds does, and so every
// tenant: a client flooding garbage handles gets a few failed opens a
// second (then its requests that need one are declined unopened, and run in
// its callers); an honest client beside it still has its memory opened.
TEST(Scheduler, AClientWhoseOpensFailGetsFewOfThemAndOthersStillHaveTheirsOpened) {
  TempDir dir;
  std::atomic<std::uint64_t> failed{0};  // outlives the daemon's mapper, which counts in it
  Daemon daemon(dir);
  failOpensOfGarbage(daemon, failed, std::chrono::microseconds(100));
  auto hostile = connect(dir);
  auto honest = connect(dir);
  ASSERT_TRUE(hostile && honest);
  ASSERT_EQ(call(*honest, requestOn(1)), kStatusSuccess);
  std::uint64_t next = kGarbage;  // the flood's thread alone uses it
  const auto started = std::chrono::steady_clock::now();
  {
    const RingFlood flood(*hostile, [&next] {
      const Request request = requestOn(next);
      next += 3;
      return request;
    });
    ASSERT_TRUE(testing::waitFor([&] { return failed >= 32; }, std::chrono::seconds(20)))
        << "the flood's opens never failed";
    std::this_thread::sleep_for(std::chrono::seconds(1));
    // The honest client's new memory is opened, flood or not.
    EXPECT_EQ(call(*honest, requestOn(100)), kStatusSuccess);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  // 32 at once, then 100 a second, and the mapper's two in hand when the
  // budget ran out; without the budget, some 8,000 a second.
  EXPECT_LE(static_cast<double>(failed), 40 + 100 * seconds + 20)
      << "failed opens in " << seconds << " s";
  EXPECT_GE(clientField(dir, hostile->clientId(), "failed_opens"), 32);
  EXPECT_GT(clientField(dir, hostile->clientId(), "declined_unopened"), 0);
  EXPECT_EQ(clientField(dir, honest->clientId(), "failed_opens"), 0);
  EXPECT_EQ(clientField(dir, honest->clientId(), "declined_unopened"), 0);
}

// Each client of a user has its own budget of failed opens: without one per
// user too, many clients of one user (up to STMUX_MAX_CLIENTS_PER_UID)
// together failed as many times more.
TEST(Scheduler, ManyClientsOfOneUserWhoseOpensFailGetFewOfThemTogether) {
  TempDir dir;
  std::atomic<std::uint64_t> failed{0};  // outlives the daemon's mapper, which counts in it
  Daemon daemon(dir);
  failOpensOfGarbage(daemon, failed, std::chrono::microseconds(0));
  auto honest = connect(dir);
  ASSERT_TRUE(honest);
  ASSERT_EQ(call(*honest, requestOn(1)), kStatusSuccess);
  // Clients of this test's user, each making calls on memory whose opens
  // fail, one after another, as many as its own budget's burst allows twice.
  constexpr int kClients = 8;
  constexpr int kCalls = 64;
  std::vector<std::unique_ptr<shim::Connection>> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(connect(dir));
    ASSERT_TRUE(clients.back());
  }
  std::atomic<int> served{0};
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      for (std::uint64_t c = 0; c < kCalls; ++c) {
        const std::uint64_t first = kGarbage + (std::uint64_t(i) << 32) + 3 * c;
        if (call(*clients[i], requestOn(first)) == kStatusSuccess) ++served;
      }
    });
  }
  for (std::thread& thread : threads)
    thread.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_EQ(served, 0) << "calls on memory that cannot be opened were served";
  // The user's 128 at once and 400 a second, the mapper's in hand when it
  // ran out and one more for each client; with a budget per client alone,
  // each client's 32 at once: 256 and more.
  EXPECT_LE(static_cast<double>(failed), 128 + 400 * seconds + 2 + kClients)
      << "failed opens in " << seconds << " s";
  double declined = 0;
  for (const auto& client : clients)
    declined += clientField(dir, client->clientId(), "declined_unopened");
  EXPECT_GT(declined, 0);
  // Memory of the user's that is mapped already is still served.
  EXPECT_EQ(call(*honest, requestOn(1)), kStatusSuccess);
}

// 16 clients of one user flooding their rings with garbage handles, from
// one thread, while the mapper is slow to fail them (here: not before the
// test lets it). Their opens crowded out of their queues count as failed:
// before, they were dropped there faster than the mapper failed any, no
// budget was ever spent, and each of their requests cost the scheduler an
// open to try (with each client its own part of the server's turns, the
// other tenants' calls went to 0.03x; H100, stmux-fault dos, 2026-12-06).
// A client of the same user none of whose opens failed still has its new
// memory opened.
TEST(Scheduler, ManyClientsOfOneUserWhoseOpensAreCrowdedOutSpendTheirBudgets) {
  TempDir dir;
  std::atomic<bool> let_go{false};  // outlive the daemon's mapper, which reads them
  std::atomic<std::uint64_t> failed{0};
  Daemon daemon(dir);
  daemon.executor().setOpen([&](OpenJob& job) {
    if (job.operand.alloc_id < kGarbage) return FakeExecutor::openAsAsked(job);
    while (!let_go)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ++failed;
    job.ok = false;
    job.error = "invalid argument";
  });
  auto honest = connect(dir);
  ASSERT_TRUE(honest);
  ASSERT_EQ(call(*honest, requestOn(1)), kStatusSuccess);
  std::vector<std::unique_ptr<shim::Connection>> hostile;
  std::vector<shim::Connection*> flooded;
  for (int i = 0; i < 16; ++i) {
    hostile.push_back(connect(dir));
    ASSERT_TRUE(hostile.back());
    flooded.push_back(hostile.back().get());
  }
  std::uint64_t next = kGarbage;  // the flood's thread alone uses it
  const RingFlood flood(flooded, [&next] {
    const Request request = requestOn(next);
    next += 3;
    return request;
  });
  const auto declined = [&] {
    double sum = 0;
    for (const auto& client : hostile)
      sum += std::max(0.0, clientField(dir, client->clientId(), "declined_unopened"));
    return sum;
  };
  EXPECT_TRUE(testing::waitFor([&] { return declined() > 0; }, std::chrono::seconds(30)))
      << "no request of theirs declined unopened: their opens crowded out spent no budget";
  EXPECT_EQ(failed, 0u) << "the mapper failed opens before it was let";
  let_go = true;
  EXPECT_EQ(call(*honest, requestOn(1)), kStatusSuccess);
  EXPECT_EQ(call(*honest, requestOn(100)), kStatusSuccess) << "new memory of a clean client";
  EXPECT_EQ(clientField(dir, honest->clientId(), "declined_unopened"), 0);
}

// An honest client using every slot at once reuses a slot as soon as its
// status is out, which can be before the daemon has settled the batch that
// answered it: that request must not count against the new one.
TEST(Scheduler, AClientUsingEverySlotIsNeverRefused) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/0, [](ServerOptions& o) { o.slots = 8; });
  auto client = connect(dir);
  ASSERT_TRUE(client);
  const std::uint32_t slots = client->slotCount();
  ASSERT_EQ(slots, 8u);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (std::uint32_t t = 0; t < slots; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1500; ++i) {
        if (call(*client, validRequest()) != kStatusSuccess) ++wrong;
      }
    });
  }
  for (std::thread& thread : threads)
    thread.join();
  EXPECT_EQ(wrong, 0) << "calls not served";
  EXPECT_EQ(clientField(dir, client->clientId(), "refused"), 0);
}

// The metrics the daemon publishes (stmuxd writes them to
// STMUX_METRICS_FILE) are well formed and count what happened.
TEST(Scheduler, MetricsCountWhatTheDaemonDid) {
  TempDir dir;
  // Two places on MPS kept (stmuxd's keepMpsSeats), one taken.
  ASSERT_TRUE(prepareMpsSeats(mpsSeatsDirectory(dir.socket()), 2, dir.path()).ok());
  std::ofstream(dir.path() + "/control") << "";
  const MpsSeat place = takeMpsSeat(mpsSeatsDirectory(dir.socket()), dir.path(), ::geteuid());
  ASSERT_EQ(place.outcome, MpsSeat::Outcome::kSeated) << place.why;
  std::mutex mutex;
  std::string latest;
  Daemon daemon(dir, 0, [&](daemon::ServerOptions& options) {
    options.metrics_period_ns = 10'000'000;
    options.publish_metrics = [&](std::string text) {
      std::lock_guard lock(mutex);
      latest = std::move(text);
    };
  });
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  for (int i = 0; i < 5; ++i)
    ASSERT_EQ(call(*connection, validRequest()), kStatusSuccess);
  Request bad = validRequest();
  bad.lda = 1;
  ASSERT_EQ(call(*connection, bad), kStatusInvalidValue);  // answered, never queued
  connection->counters().entry[0].fallback[static_cast<std::size_t>(Fallback::kNoOp)] = 3;
  connection->counters().mps = static_cast<std::uint32_t>(ClientMps::kYes);
  auto text = [&] {
    std::lock_guard lock(mutex);
    return latest;
  };
  const std::string gpu = "uuid=\"GPU-abababab-abab-abab-abab-abababababab\"";
  const std::string me = "program=\"scheduler_test\"";
  // Every counter set above, in one rendering: the server thread may render
  // between the two stores.
  ASSERT_TRUE(testing::waitFor([&] {
    const std::string now = text();
    return testing::prometheusValue(now, "stmux_client_direct_total", {"reason=\"no_op\""}) == 3 &&
           testing::prometheusValue(now, "stmux_client_mps", {me}).has_value() &&
           testing::prometheusValue(now, "stmux_gpu_requests_total", {gpu}) == 5;
  })) << text();
  const std::string metrics = text();
  EXPECT_EQ(testing::prometheusFault(metrics), "") << metrics;
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_clients"), 1);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_mps_places", {"state=\"kept\""}), 2);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_mps_places", {"state=\"taken\""}), 1);
  ::close(place.fd);
  EXPECT_TRUE(testing::waitFor([&] {
    return testing::prometheusValue(text(), "stmux_mps_places", {"state=\"taken\""}) == 0;
  })) << text();
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_client_requests_total", {me}), 6);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_client_outstanding_requests", {me}), 0);
  const auto batches = testing::prometheusValue(metrics, "stmux_gpu_batches_total", {gpu});
  ASSERT_TRUE(batches.has_value());
  EXPECT_GE(*batches, 1);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_batch_size_count", {gpu}), batches);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_batch_size_sum", {gpu}), 5);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_batch_wait_seconds_count", {gpu}), 5);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_gpu_broken", {gpu}), 0);
  // The fake GPU runs without MPS; the shim said its context does.
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_gpu_mps", {gpu}), 0);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_client_mps", {me}), 1);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_gpu_opening_allocations", {gpu}), 0);
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_gpu_inline_opens_total", {gpu}), 0);
  // However many of the calls slept (none need to: the fake GPU is quick).
  EXPECT_TRUE(testing::prometheusValue(metrics, "stmux_gpu_wakes_total", {gpu}).has_value());
  // No request had an epilogue: the family is there, at 0.
  EXPECT_EQ(testing::prometheusValue(metrics, "stmux_gpu_epilogue_launches_total", {gpu}), 0);
}

// A stream-ordered request as the shim sends one: its caller's stream will
// write `seq` into the slot's ready word.
struct StreamRequest {
  shim::Ticket ticket;
  std::uint32_t seq = 0;
};
StreamRequest submitStreamOrdered(shim::Connection& connection, Request request) {
  StreamRequest sent;
  auto ticket = connection.reserve(nowNs() + kSecond);
  EXPECT_TRUE(ticket.ok()) << ticket.message();
  if (!ticket.ok()) return sent;
  sent.ticket = ticket.value();
  sent.seq = connection.nextSeq(sent.ticket.slot);
  request.flags |= kRequestStreamOrdered;
  request.stream_seq = sent.seq;
  EXPECT_TRUE(connection.push(request, sent.ticket, nowNs() + kSecond));
  return sent;
}

SlotState stateOf(shim::Connection& connection, const shim::Ticket& ticket) {
  return slotState(connection.view().slot(ticket.slot).word.load());
}

// The daemon starts a stream-ordered request only once its caller's stream
// says the work before it is done, lets others' requests pass meanwhile, and
// on success releases the caller's stream (the released word).
TEST(Scheduler, AStreamOrderedRequestStartsWhenItsStreamIsReadyAndReleasesIt) {
  TempDir dir;
  Daemon daemon(dir);
  auto late = connect(dir);
  auto other = connect(dir);
  ASSERT_TRUE(late && other);
  const StreamRequest sent = submitStreamOrdered(*late, validRequest());
  Slot& slot = late->view().slot(sent.ticket.slot);
  ASSERT_TRUE(
      testing::waitFor([&] { return clientField(dir, late->clientId(), "outstanding") == 1; }));
  // Not ready: it waits, and holds up nobody.
  EXPECT_EQ(call(*other, validRequest()), kStatusSuccess);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(stateOf(*late, sent.ticket), SlotState::kPending);
  EXPECT_EQ(daemon.executor().batchSizes(), std::vector<std::size_t>{1});
  EXPECT_EQ(slot.released.load(), 0u);
  // A ready word from an older use of the slot is not this request's.
  slot.ready.store(sent.seq - 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(stateOf(*late, sent.ticket), SlotState::kPending);
  slot.ready.store(sent.seq);  // what the caller's stream writes
  ASSERT_TRUE(testing::waitFor([&] { return stateOf(*late, sent.ticket) == SlotState::kDone; }));
  EXPECT_EQ(slot.status.load(), kStatusSuccess);
  EXPECT_EQ(slot.released.load(), sent.seq);
  EXPECT_EQ(late->view().header()->attention.load(), 0u);
  EXPECT_EQ(daemon.executor().batchSizes(), (std::vector<std::size_t>{1, 1}));
}

// A stream-ordered request the daemon will not run leaves the caller's stream
// waiting: the shim's watcher is told (the attention word), never the stream.
TEST(Scheduler, AStreamOrderedRequestRefusedTellsTheWatcherAndReleasesNothing) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request bad = validRequest();
  bad.lda = 1;
  Request elsewhere = validRequest();
  elsewhere.device = uuid(0xcd);
  std::uint32_t told = 0;
  for (const Request& request : {bad, elsewhere}) {
    const StreamRequest sent = submitStreamOrdered(*connection, request);
    ASSERT_TRUE(
        testing::waitFor([&] { return stateOf(*connection, sent.ticket) == SlotState::kDone; }));
    const Slot& slot = connection->view().slot(sent.ticket.slot);
    EXPECT_NE(slot.status.load(), kStatusSuccess);
    EXPECT_EQ(slot.released.load(), 0u);
    // The daemon publishes the slot first and tells the watcher just after
    // (requestPublish), so the word may lag the slot by a moment.
    ++told;
    EXPECT_TRUE(testing::waitFor([&] {
      return connection->view().header()->attention.load() == told;
    })) << "attention "
        << connection->view().header()->attention.load() << ", expected " << told;
    connection->release(sent.ticket);
  }
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
}

// A client that leaves with requests still awaiting its streams: they are
// dropped, not left holding its places.
TEST(Scheduler, AwaitingRequestsOfAClientThatLeftAreDropped) {
  TempDir dir;
  Daemon daemon(dir);
  auto leaving = connect(dir);
  ASSERT_TRUE(leaving);
  for (int i = 0; i < 3; ++i)
    (void)submitStreamOrdered(*leaving, validRequest());
  ASSERT_TRUE(
      testing::waitFor([&] { return clientField(dir, leaving->clientId(), "outstanding") == 3; }));
  const std::uint32_t id = leaving->clientId();
  leaving.reset();
  ASSERT_TRUE(testing::waitFor([&] {
    const auto forgotten = daemon.executor().forgotten();
    return std::find(forgotten.begin(), forgotten.end(), id) != forgotten.end();
  }));
  daemon.stop();
  Json status;
  daemon.scheduler().addStatus(status);
  const std::string json = dumpJson(status);
  EXPECT_NE(json.find("\"awaiting\":0"), std::string::npos) << json;
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
}

// The daemon stops while a request still awaits its memory (a slow mapper,
// holding every open the request needs): it never reached the GPU, and is
// declined before the hang-up, so that its caller runs it itself rather
// than find the daemon gone with the request unanswered.
TEST(Scheduler, ARequestAwaitingItsMemoryWhenTheDaemonStopsIsDeclinedBeforeItHangsUp) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  std::atomic<bool> let_go{false};
  holdOpens(daemon.executor(), let_go);
  Request r = validRequest();
  r.beta = 1.0f;     // C += AB: must never run twice or half
  r.b.alloc_id = 1;  // A and B in one allocation: two opens, both the mapper's
  auto ticket = connection->submit(r, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok()) << ticket.message();
  ASSERT_TRUE(testing::waitFor(
      [&] { return clientField(dir, connection->clientId(), "outstanding") == 1; }));
  std::thread stopper([&] { daemon.stop(); });
  ASSERT_TRUE(testing::waitFor([&] { return !connection->alive(); }));
  EXPECT_EQ(stateOf(*connection, ticket.value()), SlotState::kDone);
  EXPECT_EQ(connection->view().slot(ticket.value().slot).status.load(), kStatusDeclined);
  let_go = true;
  stopper.join();
  EXPECT_TRUE(daemon.executor().batchSizes().empty()) << "a declined request ran";
}

// The same for a stream-ordered request whose caller's stream never got to
// it: declined, its stream never released, and the shim's watcher told.
TEST(Scheduler, AStreamOrderedRequestAwaitingItsStreamWhenTheDaemonStopsIsDeclined) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  const StreamRequest sent = submitStreamOrdered(*connection, validRequest());
  ASSERT_TRUE(testing::waitFor(
      [&] { return clientField(dir, connection->clientId(), "outstanding") == 1; }));
  daemon.stop();
  const Slot& slot = connection->view().slot(sent.ticket.slot);
  EXPECT_EQ(stateOf(*connection, sent.ticket), SlotState::kDone);
  EXPECT_EQ(slot.status.load(), kStatusDeclined);
  EXPECT_EQ(slot.released.load(), 0u);
  EXPECT_EQ(connection->view().header()->attention.load(), 1u) << "the watcher was not told";
  EXPECT_TRUE(daemon.executor().batchSizes().empty());
}

// A caller that sleeps on its slot (it does not poll at all, and the fake
// GPU takes 200 ms) is woken by one of the daemon's waker threads; the wake
// is counted and timed from the batch's being seen done, not from its launch.
TEST(Scheduler, ASleepingCallerIsWokenCountedAndTimed) {
  TempDir dir;
  Daemon daemon(dir, /*batch_ns=*/200'000'000);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  Request request = validRequest();
  auto ticket = connection->submit(request, nowNs() + kSecond);
  ASSERT_TRUE(ticket.ok()) << ticket.message();
  const shim::WaitResult result = connection->wait(ticket.value(), nowNs() + 30 * kSecond, 0);
  connection->release(ticket.value());
  ASSERT_EQ(result.outcome, WaitOutcome::kDone);
  EXPECT_EQ(result.status, kStatusSuccess);
  // Counted once the wake returned, and the batch's times once the server
  // took it back: both may be after the caller ran on.
  ASSERT_TRUE(testing::waitFor([&] {
    return gpuField(dir, nullptr, "wakes") == 1 && gpuField(dir, "round_us", "gpu") > 0;
  })) << gpuField(dir, nullptr, "wakes");
  EXPECT_GT(gpuField(dir, "round_us", "wake"), 0);
  EXPECT_LT(gpuField(dir, "round_us", "wake"), 200'000) << "timed from the launch, not from done";
  EXPECT_GE(gpuField(dir, "round_us", "gpu"), 200'000);
}

// Where a round's time goes, as the daemon sees it (round_us per GPU): the
// fake GPU takes 3 ms a batch, and a stream-ordered request waits 50 ms for
// its stream; each shows where it belongs and nowhere else (with margins: the
// daemon pops a request a little after the test pushed it).
TEST(Scheduler, StatusSaysWhereARoundsTimeGoes) {
  TempDir dir;
  // A slow fake GPU, 30 ms a batch: far above what a loaded machine (a
  // sanitizer's build, the other tests) adds to the steps around it.
  Daemon daemon(dir, /*batch_ns=*/30'000'000);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  EXPECT_EQ(call(*connection, validRequest()), kStatusSuccess);
  const StreamRequest sent = submitStreamOrdered(*connection, validRequest());
  // Its stream's time runs from the daemon's pop: popped first, so that a
  // pop late on a loaded machine does not shorten it.
  ASSERT_TRUE(testing::waitFor([&] { return gpuField(dir, "round_sums", "popped") == 2; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  connection->view().slot(sent.ticket.slot).ready.store(sent.seq);
  ASSERT_TRUE(
      testing::waitFor([&] { return stateOf(*connection, sent.ticket) == SlotState::kDone; }));
  auto gpuRound = [&](const char* field) { return gpuField(dir, "round_us", field); };
  // The second call's status is out a moment before its batch is taken back
  // and counted (under ASan, long enough for a look to come between).
  ASSERT_TRUE(testing::waitFor([&] { return gpuField(dir, "round_sums", "completed") == 2; }));
  EXPECT_GE(gpuRound("gpu"), 30'000) << "the fake GPU's 30 ms per batch";
  EXPECT_LT(gpuRound("gpu"), 1e6);
  // The fake GPU's 30 ms are in `gpu`, not in the publishing after it (which
  // takes microseconds, milliseconds when the machine is busy).
  EXPECT_GE(gpuRound("publish"), 0);
  EXPECT_LT(gpuRound("publish"), 30'000);
  // One of the two requests waited 50 ms for its stream; that is its
  // stream's time, not the batcher's.
  EXPECT_GE(gpuRound("stream_ready"), 25'000);
  // Well under the GPU's 30 ms and the stream's 50 ms, with room for a
  // server thread that a loaded machine keeps off its core for a while.
  EXPECT_LT(gpuRound("batch_wait"), 25'000);
  EXPECT_GE(gpuRound("ring"), 0);
  EXPECT_LT(gpuRound("ring"), 25'000);
  EXPECT_GE(gpuRound("handoff"), 0);
  EXPECT_LT(gpuRound("handoff"), 30'000) << "the fake GPU's 30 ms are not in the executor's queue";
  EXPECT_GE(gpuRound("launch"), 0);
  // The same as sums and counts, for readers that take a span of their own.
  auto reply = queryDaemonStatus(dir.socket(), "scheduler_test", 2000);
  ASSERT_TRUE(reply.ok());
  auto json = parseJson(reply.value());
  ASSERT_TRUE(json.ok());
  const Json* gpu = jsonAt(jsonFind(json.value(), "gpus"), 0);
  const Json* sums = jsonFind(gpu, "round_sums");
  ASSERT_NE(sums, nullptr);
  EXPECT_EQ(jsonNumber(jsonFind(sums, "completed")), 2);
  EXPECT_EQ(jsonNumber(jsonFind(sums, "launched")), 2);
  EXPECT_DOUBLE_EQ(jsonNumber(jsonFind(sums, "gpu_ns")) / 2 / 1e3,
                   jsonNumber(jsonFind(jsonFind(gpu, "round_us"), "gpu")));
}

TEST(Scheduler, StatusReportsEachGpu) {
  TempDir dir;
  Daemon daemon(dir);
  auto connection = connect(dir);
  ASSERT_TRUE(connection);
  EXPECT_EQ(call(*connection, validRequest()), kStatusSuccess);
  daemon.stop();
  Json status;
  daemon.scheduler().addStatus(status);
  const std::string json = dumpJson(status);
  EXPECT_NE(json.find("\"uuid\":\"GPU-abababab-abab-abab-abab-abababababab\""), std::string::npos)
      << json;
  EXPECT_NE(json.find("\"batches\":1"), std::string::npos) << json;
  EXPECT_NE(json.find("\"requests\":1"), std::string::npos) << json;
}

}  // namespace
}  // namespace stmux::daemon

// A daemon for CPU tests: the real server and scheduler on the real
// transport, with a fake executor standing in for the GPU.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "daemon/channel.h"
#include "daemon/scheduler.h"
#include "daemon/waker.h"
#include "shim/transport.h"
#include "stmux/config.h"
#include "stmux/segment.h"
#include "test_support.h"

namespace stmux::daemon {

// The wakers stmuxd runs by default: STMUX_DAEMON_WAKERS threads, polling
// for STMUX_DAEMON_SPIN_US.
inline WakerOptions defaultWakerOptions() {
  std::string errors;
  const Config defaults =
      parseEachVariable([](std::string_view) -> std::optional<std::string> { return std::nullopt; },
                        Scope::kDaemon, errors);
  return WakerOptions{static_cast<unsigned>(defaults.daemon_wakers),
                      static_cast<std::uint64_t>(defaults.daemon_spin_us) * 1000};
}

// Does what the executor does with a batch, minus the GPU: claim each
// request, complete it (publishing and waking as the executor does, with
// stmuxd's default number of waker threads), hand the batch back.
// Optionally slow, like a GPU.
// Its mapper "opens" every allocation it is asked for (`openAsAsked`), or
// does what `setOpen` says, and counts the jobs.
class FakeExecutor {
 public:
  using OpenFn = std::function<void(OpenJob&)>;

  static void openAsAsked(OpenJob& job) {
    job.ok = true;
    job.mapped = Mapped{job.operand.base, job.operand.alloc_bytes};
  }

  FakeExecutor(ExecutorChannel& channel, std::uint64_t batch_ns)
      : channel_(channel),
        batch_ns_(batch_ns),
        wakers_(defaultWakerOptions(), channel.gauges()),
        thread_([this] { run(); }),
        mapper_([this] { runMapper(); }) {}
  ~FakeExecutor() {
    stop_ = true;
    channel_.wakeMapper();
    mapper_.join();
    thread_.join();
  }
  // What every claimed request is answered (a cuBLAS status; success by
  // default), as a GPU's cuBLAS would.
  void setAnswer(std::int32_t status) { answer_ = status; }
  // While paused it takes no command, as an executor busy with a long batch.
  void pause(bool paused) { paused_ = paused; }
  void setOpen(OpenFn open) {
    std::lock_guard lock(mutex_);
    open_ = std::move(open);
  }
  std::vector<std::uint64_t> adopted() const {
    std::lock_guard lock(mutex_);
    return adopted_;
  }
  int opens() const { return opens_; }
  std::vector<std::size_t> batchSizes() const {
    std::lock_guard lock(mutex_);
    return sizes_;
  }
  std::vector<std::uint32_t> forgotten() const {
    std::lock_guard lock(mutex_);
    return forgotten_;
  }
  std::vector<std::uint64_t> released() const {
    std::lock_guard lock(mutex_);
    return released_;
  }

 private:
  void run() {
    while (!stop_) {
      if (paused_) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      std::unique_ptr<ExecCommand> command = channel_.takeCommand();
      if (!command) {
        channel_.sleep(1'000'000);
        continue;
      }
      std::lock_guard lock(mutex_);
      switch (command->kind) {
        case ExecCommand::Kind::kRun: {
          command->batch->taken_ns = nowNs();
          // Claimed before the "GPU" runs them, as the real executor does.
          const std::vector<Queued>& items = command->batch->items;
          std::vector<std::int32_t> statuses(items.size(), kNoWrite);
          for (std::size_t i = 0; i < items.size(); ++i) {
            Slot& slot = items[i].client->view.slot(items[i].request.slot);
            if (slotClaim(slot, items[i].request.generation)) statuses[i] = answer_;
          }
          command->batch->submitted_ns = nowNs();
          const std::uint64_t until = nowNs() + batch_ns_;
          while (nowNs() < until)
            cpuRelax();
          command->batch->seen_ns = nowNs();
          wakers_.publish(*command->batch, statuses);
          sizes_.push_back(command->batch->items.size());
          command->batch->done_ns = nowNs();
          channel_.finish(std::move(command->batch));
          break;
        }
        case ExecCommand::Kind::kAdopt:
          adopted_.push_back(command->operand.alloc_id);
          break;
        case ExecCommand::Kind::kClose:
          break;
        case ExecCommand::Kind::kRelease:
          released_.insert(released_.end(), command->alloc_ids.begin(), command->alloc_ids.end());
          break;
        case ExecCommand::Kind::kForget:
          forgotten_.push_back(command->client_id);
          break;
      }
    }
  }

  void runMapper() {
    while (!stop_) {
      std::unique_ptr<OpenJob> job = channel_.takeOpen();
      if (!job) {
        channel_.sleepMapper(1'000'000);
        continue;
      }
      OpenFn open;
      {
        std::lock_guard lock(mutex_);
        open = open_ ? open_ : openAsAsked;
      }
      ++opens_;
      open(*job);
      channel_.finishOpen(std::move(job));
    }
  }

  ExecutorChannel& channel_;
  std::uint64_t batch_ns_;
  mutable std::mutex mutex_;
  OpenFn open_;
  std::atomic<int> opens_{0};
  std::vector<std::uint64_t> adopted_;
  std::vector<std::size_t> sizes_;
  std::vector<std::uint32_t> forgotten_;
  std::vector<std::uint64_t> released_;
  Wakers wakers_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> paused_{false};
  std::atomic<std::int32_t> answer_{kStatusSuccess};
  std::thread thread_;
  std::thread mapper_;
};

inline Uuid uuid(std::uint8_t tag) {
  Uuid u{};
  for (std::uint8_t& b : u.bytes)
    b = tag;
  return u;
}

// The scheduler as the server sees it, able to play a daemon that dies:
// once `vanishing` is set, departures no longer reach the scheduler, which
// so declines nothing as the sockets close (as when stmuxd is killed).
class VanishingSink : public RequestSink {
 public:
  explicit VanishingSink(RequestSink& inner) : inner_(inner) {}
  std::atomic<bool> vanishing{false};

  void onAttach(const ClientPtr& client) override { inner_.onAttach(client); }
  void onDetach(const ClientPtr& client) override {
    if (!vanishing) inner_.onDetach(client);
  }
  void onRequest(const ClientPtr& client, const Request& request, std::uint64_t now_ns) override {
    inner_.onRequest(client, request, now_ns);
  }
  void onRelease(const ClientPtr& client, const std::uint64_t* ids, std::size_t count) override {
    inner_.onRelease(client, ids, count);
  }
  bool takesNotices() const override { return inner_.takesNotices(); }
  bool poll(std::uint64_t now_ns, std::uint64_t& wake_at_ns) override {
    return inner_.poll(now_ns, wake_at_ns);
  }
  bool busy() const override { return inner_.busy(); }
  int wakeFd() const override { return inner_.wakeFd(); }
  std::string mustEnd() const override { return inner_.mustEnd(); }
  void addStatus(nlohmann::ordered_json& status) const override { inner_.addStatus(status); }
  void addMetrics(MetricsText& out) const override { inner_.addMetrics(out); }

 private:
  RequestSink& inner_;
};

// A daemon made of the real server and scheduler, one fake GPU (`on_mps`:
// the daemon's context on it an MPS client).
class Daemon {
 public:
  explicit Daemon(const testing::TempDir& dir, std::uint64_t batch_ns = 0,
                  const std::function<void(daemon::ServerOptions&)>& adjust = {},
                  std::size_t mappings_per_client = 4096, bool on_mps = false)
      : wake_(Scheduler::makeWakeFd()),
        channel_(wake_.get()),
        scheduler_(BatcherOptions{}, {GpuInfo{0, uuid(0xab), "fake", on_mps}}, {&channel_},
                   mappings_per_client),
        executor_(channel_, batch_ns) {
    scheduler_.adoptWakeFd(std::move(wake_));
    auto options = testing::serverOptions(dir);
    options.devices = {uuid(0xab)};
    if (adjust) adjust(options);
    server_ = std::make_unique<testing::ServerThread>(options, sink_);
  }
  ~Daemon() { server_.reset(); }
  FakeExecutor& executor() { return executor_; }
  // For a test to say what the real executor would (MappingCache's gave-up).
  ExecutorChannel& channel() { return channel_; }
  // The scheduler is the server thread's: stop() (join that thread) before
  // reading it from the test's.
  Scheduler& scheduler() { return scheduler_; }
  void stop() { server_->stop(); }
  // Whether the server ended of itself, and why (Server::failure()).
  bool ended() const { return server_->ended(); }
  const std::string& failure() const { return server_->failure(); }
  // Gone as a killed daemon goes: the sockets close, and what awaited its
  // memory or its stream is left unanswered.
  void vanish() {
    sink_.vanishing = true;
    server_->stop();
  }

 private:
  UniqueFd wake_;
  ExecutorChannel channel_;
  Scheduler scheduler_;
  VanishingSink sink_{scheduler_};
  FakeExecutor executor_;
  std::unique_ptr<testing::ServerThread> server_;
};

// A daemon that dies as a SIGKILLed one does, in a process of its own: it
// claims each request it is given (its launch is now queued on its GPU) and
// hangs up on that client at once, while its process lives on until end().
// A killed process closes its files, sockets among them, before the driver
// has torn down what it queued; end() is the rest of its exit.
class HangingUpDaemon {
 public:
  explicit HangingUpDaemon(const testing::TempDir& dir) {
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) return;
    said_.reset(ends[0]);
    UniqueFd says(ends[1]);
    const pid_t parent = ::getpid();
    // The closer thread, where the server needs one (daemon/aside.h), is
    // this process's: the child of a process with threads starts none.
    (void)closedAside();
    pid_ = ::fork();
    if (pid_ != 0) return;
    // The child: only async-signal-safe work until the server runs, then
    // that server alone, on this thread. It dies with the test, whatever
    // ends it: a child left running would hold ctest's output open.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(1);
    said_.reset();
    class Sink : public RequestSink {
     public:
      explicit Sink(int says) : says_(says) {}
      void onRequest(const ClientPtr& client, const Request& request, std::uint64_t) override {
        if (!slotClaim(client->view.slot(request.slot), request.generation)) return;
        ::shutdown(client->socket.get(), SHUT_RDWR);
        tell(says_, 'h');
      }

     private:
      int says_;
    } sink(says.get());
    auto options = testing::serverOptions(dir);
    options.devices = {uuid(0xab)};
    Server server(options, sink);
    if (!server.listen().ok()) ::_exit(1);
    tell(says.get(), 'l');
    server.run();
    ::_exit(0);
  }
  ~HangingUpDaemon() { end(); }
  HangingUpDaemon(const HangingUpDaemon&) = delete;
  HangingUpDaemon& operator=(const HangingUpDaemon&) = delete;

  // Whether it listens (waits for that).
  bool listening() { return heard('l'); }
  // Whether it claimed a request and hung up on its client (waits for that).
  bool hungUp() { return heard('h'); }
  // Ends its process; waits for that.
  void end() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  static void tell(int fd, char what) { [[maybe_unused]] ssize_t n = ::write(fd, &what, 1); }
  bool heard(char what) {
    pollfd readable{said_.get(), POLLIN, 0};
    char got = 0;
    return pid_ > 0 && ::poll(&readable, 1, 20'000) == 1 && ::read(said_.get(), &got, 1) == 1 &&
           got == what;
  }

  pid_t pid_ = -1;
  UniqueFd said_;  // what the child says: 'l' listening, 'h' hung up
};

// A tenant's connection to the daemon at `dir`; null (the test failed) if
// it could not attach.
inline std::unique_ptr<shim::Connection> connectTo(const testing::TempDir& dir,
                                                   const std::string& name) {
  shim::ConnectOptions options;
  options.socket_path = dir.socket();
  options.name = name;
  auto connection = shim::Connection::open(options);
  EXPECT_TRUE(connection.ok()) << connection.message();
  return connection.ok() ? std::move(connection).value() : nullptr;
}

// An 8 x 8 x 8 SGEMM the Daemon's scheduler accepts: its GPU, every operand
// described.
inline Request validRequest() {
  Request r{};
  r.op = static_cast<std::uint32_t>(Op::kSgemm);
  r.transa = r.transb = kOpN;
  r.m = r.n = r.k = 8;
  r.lda = r.ldb = r.ldc = 8;
  r.alpha = 1.0f;
  r.beta = 0.0f;
  r.device = uuid(0xab);
  r.a.alloc_id = 1;
  r.b.alloc_id = 2;
  r.c.alloc_id = 3;
  return r;
}

}  // namespace stmux::daemon

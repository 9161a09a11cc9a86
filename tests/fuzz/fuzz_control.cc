// Fuzzes every control message stmuxd reads from a client, end to end: a real
// daemon::Server runs on its own thread for the whole run, and each input is a
// small script of connections and SOCK_SEQPACKET messages (with descriptors)
// sent to it: hellos of every role and version, releases with any count, status
// queries, garbage. After each input the server must still answer a status
// query with valid JSON, and once the input's connections are closed it must
// hold no client and no descriptor more than before: a hostile tenant can make
// it refuse or detach that tenant, nothing else.
//
// Input, record after record (at most kMaxRecords):
//   u8 flags   bits 0-1: descriptors to attach (0-3); bit 2: open a new
//              connection first; bit 3: write a valid header (magic, version,
//              the type in bits 4-7, the length) over the payload's first 16
//              bytes, so that mutations reach what lies behind the header
//   u8 kinds   two bits per descriptor: memfd, pipe, eventfd, this socket
//   chunk      the payload (u16 length, then bytes)
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <thread>

#include "daemon/server.h"
#include "stmux/control.h"
#include "stmux/json.h"
#include "stmux/log.h"
#include "tests/fuzz/fuzz_bytes.h"
#include "tests/test_support.h"

namespace stmux::fuzz {
namespace {

constexpr int kMaxRecords = 16;
constexpr int kMaxConnections = 4;
constexpr std::size_t kMaxPayload = 8192;

// Counts releases instead of keeping them: the run sends millions.
class Sink : public testing::TestSink {
 public:
  void onRelease(const daemon::ClientPtr&, const std::uint64_t*, std::size_t count) override {
    released += count;
  }
  std::atomic<std::uint64_t> released{0};
};

struct Daemon {
  std::string dir;
  std::string socket;
  Sink sink;
  std::unique_ptr<daemon::Server> server;
  std::thread thread;
};
Daemon* gDaemon = nullptr;

void removeSocketDir() {
  if (gDaemon == nullptr) return;
  ::unlink(gDaemon->socket.c_str());
  ::rmdir(gDaemon->dir.c_str());
}

UniqueFd connectTo(const std::string& path) {
  auto address = socketAddress(path);
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!address || ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address.value()),
                            sizeof(sockaddr_un)) != 0) {
    fail("cannot connect to the server under test");
  }
  return fd;
}

// A descriptor of the kind a hostile client might pass.
UniqueFd makeDescriptor(int kind, int socket) {
  switch (kind & 3) {
    case 0: {
      UniqueFd fd(::memfd_create("fuzz", MFD_CLOEXEC));
      if (::ftruncate(fd.get(), 4096) != 0) fail("ftruncate");
      return fd;
    }
    case 1: {
      int pipe_fds[2];
      if (::pipe2(pipe_fds, O_CLOEXEC) != 0) fail("pipe2");
      ::close(pipe_fds[1]);
      return UniqueFd(pipe_fds[0]);
    }
    case 2:
      return UniqueFd(::eventfd(0, EFD_CLOEXEC));
    default:
      return UniqueFd(::fcntl(socket, F_DUPFD_CLOEXEC, 0));
  }
}

// A status query, as stmuxctl makes it: parts, then the last one. (Not
// queryDaemonStatus(): it reads each part into a 1 MiB buffer, which would
// cost this run most of its speed.)
void checkServerAnswers() {
  UniqueFd fd = connectTo(gDaemon->socket);
  auto hello = makeMessage<HelloMsg>(MsgType::kHello);
  hello.role = static_cast<std::uint32_t>(Role::kControl);
  if (!sendMessage(fd.get(), &hello, sizeof(hello)).ok()) fail("cannot send a status query");
  std::string text;
  while (true) {
    auto reply = awaitMessage(fd.get(), 5'000'000'000, kStatusPartBytes + 4096);
    MsgHeader header;
    if (!reply || reply->would_block || reply->eof || reply->truncated ||
        !checkHeader(reply.value(), header).ok() ||
        (header.type != static_cast<std::uint32_t>(MsgType::kStatusReply) &&
         header.type != static_cast<std::uint32_t>(MsgType::kStatusPart))) {
      fail("the server stopped answering status queries");
    }
    text.append(reply->bytes.begin() + sizeof(MsgHeader), reply->bytes.end());
    if (header.type == static_cast<std::uint32_t>(MsgType::kStatusReply)) break;
  }
  auto json = parseJson(text);
  if (!json || jsonFind(json.value(), "daemon") == nullptr ||
      jsonFind(json.value(), "clients") == nullptr) {
    fail("the server's status reply is not the JSON it should be");
  }
}

// Closed connections are noticed on the server's thread; wait for it to let
// go of every client and descriptor the input made it take.
void checkServerLetGo(int before_fds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (gDaemon->sink.attached.load() != gDaemon->sink.detached.load() ||
         openDescriptors() != before_fds) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "stmux fuzz: %d attached, %d detached, %d descriptors (%d before)\n",
                   gDaemon->sink.attached.load(), gDaemon->sink.detached.load(), openDescriptors(),
                   before_fds);
      printDescriptors();
      fail("the server kept a client or a descriptor of closed connections");
    }
    std::this_thread::yield();
  }
}

template <class T>
std::vector<std::uint8_t> asBytes(const T& value) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(&value);
  return {p, p + sizeof(T)};
}

void writeSeeds(const char* dir) {
  auto record = [](ByteWriter& w, std::uint8_t flags, std::uint8_t kinds,
                   const std::vector<std::uint8_t>& payload) {
    w.u8(flags).u8(kinds).chunk(payload.data(), payload.size());
  };
  auto tenant = makeMessage<HelloMsg>(MsgType::kHello);
  tenant.role = static_cast<std::uint32_t>(Role::kTenant);
  setField(tenant.name, "seed");
  auto control = makeMessage<HelloMsg>(MsgType::kHello);
  control.role = static_cast<std::uint32_t>(Role::kControl);
  auto release = makeMessage<ReleaseMsg>(MsgType::kRelease);
  release.count = 3;
  release.alloc_ids[0] = 1, release.alloc_ids[1] = 2, release.alloc_ids[2] = 3;
  {
    ByteWriter w;  // a tenant attaches, releases, detaches
    record(w, 0, 0, asBytes(tenant));
    record(w, 0, 0, asBytes(release));
    writeSeed(dir, "tenant-release", w.data());
  }
  {
    ByteWriter w;  // a status query
    record(w, 0, 0, asBytes(control));
    writeSeed(dir, "control", w.data());
  }
  {
    ByteWriter w;  // a hello carrying a descriptor of each kind
    record(w, 3, 0b100100, asBytes(tenant));
    writeSeed(dir, "hello-with-fds", w.data());
  }
  {
    ByteWriter w;  // three tenants, one past the limit, and a release with too many ids
    record(w, 0, 0, asBytes(tenant));
    record(w, 4, 0, asBytes(tenant));
    record(w, 4, 0, asBytes(tenant));
    auto bad = release;
    bad.count = 1000;
    record(w, 0, 0, asBytes(bad));
    writeSeed(dir, "over-limit", w.data());
  }
  {
    ByteWriter w;  // another protocol version, then a header-only message
    auto old = tenant;
    old.header.version = kProtocolVersion + 1;
    record(w, 0, 0, asBytes(old));
    record(w, 4 | 8 | (static_cast<int>(MsgType::kStatusQuery) << 4), 0,
           std::vector<std::uint8_t>(16));
    writeSeed(dir, "version-and-header", w.data());
  }
}

}  // namespace
}  // namespace stmux::fuzz

using namespace stmux;
using namespace stmux::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  startTarget(writeSeeds);

  gDaemon = new Daemon;
  char dir[] = "/tmp/stmux-fuzz-XXXXXX";
  if (::mkdtemp(dir) == nullptr) fail("mkdtemp");
  gDaemon->dir = dir;
  gDaemon->socket = gDaemon->dir + "/stmuxd.sock";
  std::atexit(removeSocketDir);
  daemon::ServerOptions options;
  options.socket_path = gDaemon->socket;
  options.slots = 4;        // small segments: a tenant costs little
  options.max_clients = 2;  // an input with three tenants meets the limit
  options.spin_ns = 0;      // sleep in epoll at once: the fuzzer needs the core
  options.hello_timeout_ns = 1'000'000'000;
  gDaemon->server = std::make_unique<daemon::Server>(options, gDaemon->sink);
  if (Status status = gDaemon->server->listen(); !status.ok()) fail(status.message().c_str());
  gDaemon->thread = std::thread([] { gDaemon->server->run(); });
  // The server's threads and descriptors are all made; what it holds from now
  // on is for clients.
  checkServerAnswers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Counted per input: libFuzzer itself opens some (its symbolizer's pipes).
  const int before_fds = openDescriptors();
  ByteReader in(data, size);
  std::vector<UniqueFd> connections;
  connections.push_back(connectTo(gDaemon->socket));
  for (int record = 0; record < kMaxRecords && !in.empty(); ++record) {
    const std::uint8_t flags = in.u8();
    const std::uint8_t kinds = in.u8();
    std::vector<std::uint8_t> payload = in.chunk(kMaxPayload);
    if ((flags & 4) != 0 && connections.size() < kMaxConnections) {
      connections.push_back(connectTo(gDaemon->socket));
    }
    const int socket = connections.back().get();
    if ((flags & 8) != 0) {
      payload.resize(std::max(payload.size(), sizeof(MsgHeader)));
      const MsgHeader header{kControlMagic, kProtocolVersion,
                             static_cast<std::uint32_t>(flags >> 4),
                             static_cast<std::uint32_t>(payload.size())};
      std::memcpy(payload.data(), &header, sizeof(header));
    }
    std::array<UniqueFd, 3> passed;
    std::array<int, 3> fds{};
    const int fd_count = flags & 3;
    for (int i = 0; i < fd_count; ++i) {
      passed[i] = makeDescriptor(kinds >> (2 * i), socket);
      fds[i] = passed[i].get();
    }
    // A full socket buffer or a peer that already hung up is part of the game.
    (void)sendMessage(socket, payload.data(), payload.size(), fds.data(), fd_count);
  }
  checkServerAnswers();
  connections.clear();
  checkServerLetGo(before_fds);
  return 0;
}

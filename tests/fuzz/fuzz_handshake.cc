// Fuzzes the shim's side of the handshake: shim::Connection::open against a
// fake daemon (a thread listening on a socket of its own) that answers the
// hello with the input: a welcome, a refusal or anything else, carrying any
// number of descriptors of any kind, among them segment memfds of any size,
// any seals and a header patched anywhere. The shim must refuse what it cannot
// use with a message, never crash, never map something it then faults on
// (every byte of an accepted segment is read here), and close every descriptor
// it was handed.
//
// Input:
//   u8 shape       0: welcome, 1: refusal, 2: raw bytes, 3: a header then raw
//   ...            the message (writeMessage below)
//   u8 patches     up to 8 × (u16 offset, u8 byte) written over the message
//   u8 fd count    0-6 (the shim accepts 4 at most: more are cut off)
//   per fd         u8 kind, then what that kind reads (makeDescriptor below)
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>

#include "shim/transport.h"
#include "stmux/control.h"
#include "stmux/log.h"
#include "stmux/segment.h"
#include "tests/fuzz/fuzz_bytes.h"

namespace stmux::fuzz {
namespace {

constexpr std::size_t kMaxMessage = 8192;
constexpr int kMaxFds = 6;

enum Shape : std::uint8_t { kWelcome, kRefusal, kRaw, kHeaderThenRaw };
enum FdKind : std::uint8_t { kSegment, kMemfd, kPipe, kEventfd, kDevZero, kDirectory, kKinds };

struct Answer {
  std::vector<std::uint8_t> bytes;
  std::vector<UniqueFd> fds;
};

// The fake daemon: accepts one connection per input, reads the hello, sends
// the input's answer, and hangs up when the shim is done.
class FakeDaemon {
 public:
  FakeDaemon() {
    char dir[] = "/tmp/stmux-fuzz-XXXXXX";
    if (::mkdtemp(dir) == nullptr) fail("mkdtemp");
    dir_ = dir;
    socket_ = dir_ + "/stmuxd.sock";
    auto address = socketAddress(socket_);
    listen_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (!address ||
        ::bind(listen_.get(), reinterpret_cast<const sockaddr*>(&address.value()),
               sizeof(sockaddr_un)) != 0 ||
        ::listen(listen_.get(), 4) != 0) {
      fail("cannot listen");
    }
    thread_ = std::thread([this] { serve(); });
  }
  void removeFiles() const {
    ::unlink(socket_.c_str());
    ::rmdir(dir_.c_str());
  }
  const std::string& socket() const { return socket_; }

  // Arms the answer for the next connection.
  void arm(Answer answer) {
    std::lock_guard lock(mutex_);
    answer_ = std::move(answer);
    armed_ = true;
    hung_up_ = false;
  }
  // The shim is done: hang up, and wait until the fake daemon has closed
  // everything of this round.
  void hangUp() {
    std::unique_lock lock(mutex_);
    done_ = true;
    cv_.notify_all();
    cv_.wait(lock, [this] { return hung_up_; });
    done_ = false;
  }

 private:
  void serve() {
    while (true) {
      UniqueFd connection(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!connection.valid()) continue;
      Answer answer;
      {
        std::lock_guard lock(mutex_);
        if (!armed_) fail("a connection nobody expected");
        armed_ = false;
        answer = std::move(answer_);
      }
      checkHello(connection.get());
      sendAnswer(connection.get(), answer);
      answer.fds.clear();
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [this] { return done_; });
      connection.reset();
      hung_up_ = true;
      cv_.notify_all();
    }
  }

  // What the shim sends is checked too: one well-formed tenant hello.
  static void checkHello(int fd) {
    auto received = recvMessage(fd, /*block=*/true);
    HelloMsg hello;
    if (!received || !received->fds.empty() ||
        !decodeMessage(received.value(), MsgType::kHello, hello).ok() ||
        hello.role != static_cast<std::uint32_t>(Role::kTenant)) {
      fail("the shim's hello is malformed");
    }
  }

  // sendMessage() takes at most kMaxPassedFds; a hostile daemon sends more.
  static void sendAnswer(int fd, const Answer& answer) {
    iovec iov{const_cast<std::uint8_t*>(answer.bytes.data()), answer.bytes.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
    if (!answer.fds.empty()) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * answer.fds.size());
      cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
      cmsg->cmsg_level = SOL_SOCKET;
      cmsg->cmsg_type = SCM_RIGHTS;
      cmsg->cmsg_len = CMSG_LEN(sizeof(int) * answer.fds.size());
      for (std::size_t i = 0; i < answer.fds.size(); ++i) {
        const int passed = answer.fds[i].get();
        std::memcpy(CMSG_DATA(cmsg) + i * sizeof(int), &passed, sizeof(int));
      }
    }
    // A failed send leaves the shim to find the connection closed.
    (void)::sendmsg(fd, &msg, MSG_NOSIGNAL);
  }

  std::string dir_, socket_;
  UniqueFd listen_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  Answer answer_;
  bool armed_ = false;
  bool done_ = false;
  bool hung_up_ = false;
};

FakeDaemon* gDaemon = nullptr;

void removeFiles() {
  if (gDaemon != nullptr) gDaemon->removeFiles();
}

// ---- the answer ----

std::uint32_t slotsFrom(std::uint8_t choice) {
  return 1u << (choice % 9);  // 1 to 256, the daemon's range of powers of two
}

std::vector<std::uint8_t> writeMessage(ByteReader& in, Shape shape) {
  std::vector<std::uint8_t> bytes;
  switch (shape) {
    case kWelcome: {
      auto welcome = makeMessage<WelcomeMsg>(MsgType::kWelcome);
      welcome.client_id = in.u32();
      welcome.slot_count = slotsFrom(in.u8());
      const SegmentLayout layout = SegmentLayout::compute(welcome.slot_count);
      welcome.ring_capacity = layout.ring_capacity;
      welcome.device_count = in.u8();
      // The segment's size: as laid out, or a claim off by some bytes.
      welcome.segment_bytes = layout.total_bytes + static_cast<std::int16_t>(in.u16());
      if (in.u8() == 0xff) welcome.segment_bytes = in.u64();
      in.bytes(welcome.devices, sizeof(welcome.devices[0]) * 2);
      bytes.resize(sizeof(welcome));
      std::memcpy(bytes.data(), &welcome, sizeof(welcome));
      break;
    }
    case kRefusal: {
      auto refuse = makeMessage<RefuseMsg>(MsgType::kRefuse);
      refuse.daemon_version = in.u32();
      const auto reason = in.chunk(sizeof(refuse.reason));  // maybe without a NUL
      if (!reason.empty()) std::memcpy(refuse.reason, reason.data(), reason.size());
      bytes.resize(sizeof(refuse));
      std::memcpy(bytes.data(), &refuse, sizeof(refuse));
      break;
    }
    case kRaw:
      bytes = in.chunk(kMaxMessage);
      break;
    case kHeaderThenRaw: {
      bytes = in.chunk(kMaxMessage);
      bytes.resize(std::max(bytes.size(), sizeof(MsgHeader)));
      const MsgHeader header{kControlMagic, in.u32(), in.u32(),
                             static_cast<std::uint32_t>(bytes.size())};
      std::memcpy(bytes.data(), &header, sizeof(header));
      break;
    }
  }
  // A size off by a little, for the fixed-size messages.
  const auto resize = static_cast<std::int8_t>(in.u8());
  if (resize != 0 && (shape == kWelcome || shape == kRefusal)) {
    bytes.resize(static_cast<std::size_t>(
        std::max<std::int64_t>(0, static_cast<std::int64_t>(bytes.size()) + resize)));
    if (bytes.size() >= sizeof(MsgHeader)) {
      const auto length = static_cast<std::uint32_t>(bytes.size());
      std::memcpy(bytes.data() + offsetof(MsgHeader, bytes), &length, sizeof(length));
    }
  }
  const int patches = in.u8() % 9;
  for (int i = 0; i < patches && !bytes.empty(); ++i) {
    const std::size_t offset = in.u16() % bytes.size();
    bytes[offset] = in.u8();
  }
  return bytes;
}

// A memfd laid out as a segment by initSegment(), then sized, patched and
// sealed as the input says.
UniqueFd makeSegment(ByteReader& in) {
  const std::uint32_t slots = slotsFrom(in.u8());
  const std::uint32_t client_id = in.u32();
  const SegmentLayout layout = SegmentLayout::compute(slots);
  const auto size_delta = static_cast<std::int16_t>(in.u16());
  const std::size_t size = static_cast<std::size_t>(std::max<std::int64_t>(
      0, static_cast<std::int64_t>(layout.total_bytes) + std::int64_t{size_delta} * 64));
  const std::uint8_t seal_bits = in.u8();
  UniqueFd fd(::memfd_create("fuzz-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (::ftruncate(fd.get(), static_cast<off_t>(layout.total_bytes)) != 0) fail("ftruncate");
  {
    auto mapping = mapShared(fd.get(), layout.total_bytes);
    if (!mapping) fail("mmap");
    initSegment(mapping->base(), layout, client_id);
    auto* bytes = static_cast<std::uint8_t*>(mapping->base());
    const int patches = in.u8() % 9;
    for (int i = 0; i < patches; ++i) {
      // Most of what the shim checks is in the first bytes.
      const std::size_t offset = in.u16() % (sizeof(SegmentHeader) + sizeof(RingHeader));
      bytes[offset] = in.u8();
    }
  }
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) fail("ftruncate");
  std::uint32_t seals = 0;
  if (seal_bits & 1) seals |= F_SEAL_SHRINK;
  if (seal_bits & 2) seals |= F_SEAL_GROW;
  if (seal_bits & 4) seals |= F_SEAL_WRITE;
  if (seal_bits & 8) seals |= F_SEAL_FUTURE_WRITE;
  if (seal_bits & 16) seals |= F_SEAL_SEAL;
  if (seals != 0 && ::fcntl(fd.get(), F_ADD_SEALS, seals) != 0) fail("F_ADD_SEALS");
  return fd;
}

UniqueFd makeDescriptor(ByteReader& in) {
  switch (in.u8() % kKinds) {
    case kSegment:
      return makeSegment(in);
    case kMemfd: {
      UniqueFd fd(::memfd_create("fuzz", MFD_CLOEXEC));
      if (::ftruncate(fd.get(), off_t{in.u16()} * 16) != 0) fail("ftruncate");
      return fd;
    }
    case kPipe: {
      int pipe_fds[2];
      if (::pipe2(pipe_fds, O_CLOEXEC) != 0) fail("pipe2");
      ::close(pipe_fds[1]);
      return UniqueFd(pipe_fds[0]);
    }
    case kEventfd:
      return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    case kDevZero:
      return UniqueFd(::open("/dev/zero", O_RDWR | O_CLOEXEC));
    default:
      return UniqueFd(::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  }
}

// Reads every byte of an accepted segment: a mapping the shim keeps must be
// backed all the way.
void touchSegment(shim::Connection& connection) {
  SegmentView& view = connection.view();
  const auto* bytes = reinterpret_cast<const volatile std::uint8_t*>(view.header());
  std::uint8_t sum = 0;
  for (std::size_t i = 0; i < view.layout().total_bytes; i += 64)
    sum ^= bytes[i];
  sum ^= bytes[view.layout().total_bytes - 1];
  (void)sum;
  STMUX_FUZZ_CHECK(connection.devices().size() <= kMaxDevices);
  STMUX_FUZZ_CHECK(connection.slotCount() == view.header()->slot_count);
  (void)connection.alive();
  (void)connection.draining();
  (void)totals(connection.counters()).forwarded;
}

// ---- seeds ----

void welcomeRecord(ByteWriter& w, std::uint32_t client_id, std::uint8_t slots_choice) {
  w.u8(kWelcome).u32(client_id).u8(slots_choice).u8(1).u16(0).u8(0);
  Uuid device{};
  device.bytes[0] = 0x5a;
  w.object(device).object(Uuid{});
  w.u8(0).u8(0);  // no resize, no patches
}

void segmentFd(ByteWriter& w, std::uint32_t client_id, std::uint8_t slots_choice,
               std::int16_t size_delta, std::uint8_t seals) {
  w.u8(kSegment).u8(slots_choice).u32(client_id).u16(static_cast<std::uint16_t>(size_delta));
  w.u8(seals).u8(0);
}

void writeSeeds(const char* dir) {
  const std::uint8_t daemon_seals = 1 | 2 | 16;  // what stmuxd seals with
  {
    ByteWriter w;  // what stmuxd sends: welcome, segment memfd, doorbell eventfd
    welcomeRecord(w, 7, 6);
    w.u8(2);
    segmentFd(w, 7, 6, 0, daemon_seals);
    w.u8(kEventfd);
    writeSeed(dir, "welcome", w.data());
  }
  {
    ByteWriter w;  // a welcome whose segment is shorter than it says
    welcomeRecord(w, 3, 2);
    w.u8(2);
    segmentFd(w, 3, 2, -8, daemon_seals);
    w.u8(kEventfd);
    writeSeed(dir, "short-segment", w.data());
  }
  {
    ByteWriter w;  // a welcome with the descriptors the wrong way round
    welcomeRecord(w, 1, 0);
    w.u8(2).u8(kPipe);
    segmentFd(w, 1, 0, 0, 0);
    writeSeed(dir, "swapped-fds", w.data());
  }
  {
    ByteWriter w;  // a refusal
    const char reason[] = "the daemon already serves its maximum of 2 clients";
    w.u8(kRefusal).u32(kProtocolVersion).chunk(reason, sizeof(reason)).u8(0).u8(0).u8(0);
    writeSeed(dir, "refusal", w.data());
  }
  {
    ByteWriter w;  // a header of another version, then bytes
    const char tail[] = "0123456789abcdef0123456789abcdef";
    w.u8(kHeaderThenRaw).chunk(tail, sizeof(tail)).u32(kProtocolVersion + 1);
    w.u32(static_cast<std::uint32_t>(MsgType::kWelcome)).u8(0).u8(0).u8(1).u8(kDevZero);
    writeSeed(dir, "other-version", w.data());
  }
}

}  // namespace
}  // namespace stmux::fuzz

using namespace stmux;
using namespace stmux::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  startTarget(writeSeeds);
  gDaemon = new FakeDaemon;
  std::atexit(removeFiles);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Counted per input: libFuzzer itself opens some (its symbolizer's pipes).
  const int before_fds = openDescriptors();
  ByteReader in(data, size);
  Answer answer;
  const auto shape = static_cast<Shape>(in.u8() % 4);
  answer.bytes = writeMessage(in, shape);
  const int fd_count = in.u8() % (kMaxFds + 1);
  for (int i = 0; i < fd_count; ++i)
    answer.fds.push_back(makeDescriptor(in));
  gDaemon->arm(std::move(answer));

  shim::ConnectOptions options;
  options.socket_path = gDaemon->socket();
  options.name = "fuzz";
  options.timeout_ns = 5'000'000'000;
  auto connection = shim::Connection::open(options);
  if (connection.ok()) {
    touchSegment(*connection.value());
  } else {
    STMUX_FUZZ_CHECK(!connection.message().empty());
  }
  connection = Status::error("closed");
  gDaemon->hangUp();
  if (openDescriptors() != before_fds) {
    std::fprintf(stderr, "stmux fuzz: %d descriptors open, %d before\n", openDescriptors(),
                 before_fds);
    printDescriptors();
    fail("the shim kept a descriptor of a failed or closed connection");
  }
  return 0;
}

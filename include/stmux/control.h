// The control channel: a SOCK_SEQPACKET Unix socket, one message per packet,
// file descriptors passed with SCM_RIGHTS. It carries the hello and welcome,
// free notices and status queries; the socket's EOF is how each side learns
// the other is gone.
#pragma once

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "stmux/status.h"
#include "stmux/sys.h"
#include "stmux/wire.h"

namespace stmux {

inline constexpr int kMaxPassedFds = 4;

inline Result<sockaddr_un> socketAddress(std::string_view path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::error(
        fmt::format("socket path '{}' must be 1 to {} bytes", path, sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// Connects `fd` (an AF_UNIX socket) to a daemon's socket. connect() waits
// while the daemon's backlog is full, for ever where the daemon is stopped,
// stuck or flooded: the send timeout bounds that wait to `timeout_ns`
// (Linux), and only that, since every message is sent with MSG_DONTWAIT.
// 0, or -1 with errno set (EAGAIN: not taken within the timeout).
inline int connectWithin(int fd, const sockaddr_un& address, std::uint64_t timeout_ns) {
  const timeval bound{static_cast<time_t>(timeout_ns / 1'000'000'000),
                      static_cast<suseconds_t>(timeout_ns % 1'000'000'000 / 1'000)};
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &bound, sizeof(bound)) != 0) return -1;
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(sockaddr_un));
  } while (rc != 0 && errno == EINTR);
  return rc;
}

// Sends one whole message, with optional descriptors. Never blocks: a peer
// whose socket buffer is full is a peer that is not reading, and the daemon
// never waits for a client.
inline Status sendMessage(int fd, const void* data, std::size_t bytes, const int* fds = nullptr,
                          int fd_count = 0) {
  iovec iov{const_cast<void*>(data), bytes};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxPassedFds)] = {};
  if (fd_count > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fd_count);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fd_count);
    std::memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * fd_count);
  }
  ssize_t sent;
  STMUX_SYSCALL(sent, ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT));
  if (static_cast<std::size_t>(sent) != bytes) {
    return Status::error(fmt::format("sent {} of {} bytes", sent, bytes));
  }
  return Status::okStatus();
}

struct Received {
  std::vector<char> bytes;    // empty with eof
  std::vector<UniqueFd> fds;  // every descriptor that arrived, owned
  bool eof = false;           // the peer closed the socket
  bool would_block = false;   // nothing to read (non-blocking)
  bool truncated = false;     // message or descriptors cut off
};

// Receives one message of at most `max_bytes` (longer ones are marked
// truncated). Descriptors that arrive are always taken into ownership, and
// closed with `Received`, so a peer cannot leak them into us.
inline Result<Received> recvMessage(int fd, bool block, std::size_t max_bytes = 4096) {
  Received out;
  out.bytes.resize(max_bytes);
  iovec iov{out.bytes.data(), out.bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxPassedFds)] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | (block ? 0 : MSG_DONTWAIT));
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    out.bytes.clear();
    out.would_block = true;
    return out;
  }
  if (n < 0 && errno == ECONNRESET) {
    out.bytes.clear();
    out.eof = true;
    return out;
  }
  if (n < 0) return Status::error(fmt::format("recvmsg failed: {}", std::strerror(errno)));
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
      const std::size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < count; ++i) {
        int passed;
        std::memcpy(&passed, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
        out.fds.emplace_back(passed);
      }
    }
  }
  out.truncated = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
  out.bytes.resize(static_cast<std::size_t>(n));
  out.eof = n == 0;
  return out;
}

// Waits up to `timeout_ns` for one message of at most `max_bytes`; nothing
// in time comes back as `would_block`.
inline Result<Received> awaitMessage(int fd, std::uint64_t timeout_ns,
                                     std::size_t max_bytes = 4096) {
  const int ready = awaitReadable(fd, nowNs() + timeout_ns);
  if (ready < 0) return Status::error(fmt::format("poll failed: {}", std::strerror(errno)));
  if (ready == 0) {
    Received nothing;
    nothing.would_block = true;
    return nothing;
  }
  return recvMessage(fd, /*block=*/false, max_bytes);
}

// Checks the common header of a received message; on success the message's
// header is `header`.
inline Status checkHeader(const Received& received, MsgHeader& header) {
  if (received.bytes.size() < sizeof(MsgHeader)) {
    return Status::error(
        fmt::format("message of {} bytes is shorter than a header", received.bytes.size()));
  }
  std::memcpy(&header, received.bytes.data(), sizeof(header));
  if (header.magic != kControlMagic) {
    return Status::error(fmt::format("message magic {:#x} is not stmux's", header.magic));
  }
  if (header.bytes != received.bytes.size()) {
    return Status::error(
        fmt::format("message claims {} bytes but {} arrived", header.bytes, received.bytes.size()));
  }
  return Status::okStatus();
}

// Copies a fixed-size message out after checking its type and size.
template <class T>
Status decodeMessage(const Received& received, MsgType type, T& out) {
  MsgHeader header;
  STMUX_TRY(checkHeader(received, header));
  if (header.type != static_cast<std::uint32_t>(type) || received.bytes.size() != sizeof(T)) {
    return Status::error(fmt::format("expected message type {} of {} bytes, got type {} of {}",
                                     static_cast<std::uint32_t>(type), sizeof(T), header.type,
                                     received.bytes.size()));
  }
  std::memcpy(&out, received.bytes.data(), sizeof(T));
  return Status::okStatus();
}

// Copies a fixed-size char field into a std::string, stopping at the first NUL.
template <std::size_t N>
std::string fieldString(const char (&field)[N]) {
  std::size_t length = 0;
  while (length < N && field[length] != '\0')
    ++length;
  return std::string(field, length);
}

template <std::size_t N>
void setField(char (&field)[N], std::string_view text) {
  const std::size_t length = text.size() < N - 1 ? text.size() : N - 1;
  std::memcpy(field, text.data(), length);
  field[length] = '\0';
}

// Asks the daemon at `path` for its status, as a control client named
// `name`; returns the JSON text. Errors are whole sentences naming the path.
inline Result<std::string> queryDaemonStatus(const std::string& path, std::string_view name,
                                             int timeout_ms) {
  auto address = socketAddress(path);
  if (!address) return address.status();
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::error(fmt::format("socket() failed: {}", std::strerror(errno)));
  const std::uint64_t timeout_ns = std::uint64_t(timeout_ms) * 1'000'000;
  if (connectWithin(fd.get(), address.value(), timeout_ns) != 0) {
    const int err = errno;
    if (err == EAGAIN) {
      return Status::error(fmt::format(
          "the daemon at {} did not take the connection within {} ms (stopped, stuck or flooded)",
          path, timeout_ms));
    }
    struct stat st {};
    if (err != ENOENT && ::lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
      return Status::error(
          fmt::format("{} is not a socket: a daemon's socket is expected there", path));
    }
    // ENOENT: never started or exited cleanly (it removes its socket);
    // ECONNREFUSED: a socket file left by a daemon that died.
    if (err == ENOENT || err == ECONNREFUSED) {
      return Status::error(fmt::format("no daemon at {}: {}", path, std::strerror(err)));
    }
    return Status::error(fmt::format(
        "cannot connect to {}: {}{}", path, std::strerror(err),
        err == EACCES ? " (the socket is for members of its group, stmux by default)" : ""));
  }

  auto hello = makeMessage<HelloMsg>(MsgType::kHello);
  hello.pid = static_cast<std::int32_t>(::getpid());
  hello.role = static_cast<std::uint32_t>(Role::kControl);
  setField(hello.name, name);
  if (Status sent = sendMessage(fd.get(), &hello, sizeof(hello)); !sent.ok()) {
    return Status::error(fmt::format("cannot greet the daemon at {}: {}", path, sent.message()));
  }

  // The reply: parts (kStatusPart) then the last one (kStatusReply), all
  // within the timeout.
  const std::uint64_t deadline = nowNs() + timeout_ns;
  std::string json;
  while (true) {
    const std::uint64_t now = nowNs();
    auto received = awaitMessage(fd.get(), deadline > now ? deadline - now : 0, kMaxMessageBytes);
    if (!received) {
      return Status::error(fmt::format("no answer from {}: {}", path, received.message()));
    }
    if (received->would_block) {
      const std::string within = timeout_ms % 1000 == 0 ? fmt::format("{} s", timeout_ms / 1000)
                                                        : fmt::format("{} ms", timeout_ms);
      if (json.empty()) {
        return Status::error(
            fmt::format("the daemon at {} did not answer within {}", path, within));
      }
      return Status::error(
          fmt::format("the daemon at {} sent {} bytes of its status, then nothing more within {}",
                      path, json.size(), within));
    }
    if (received->eof) {
      return Status::error(fmt::format("the daemon at {} closed the connection {}", path,
                                       json.empty() ? "without answering" : "mid-answer"));
    }
    if (received->truncated) {
      return Status::error(
          fmt::format("a message from {} is longer than {} bytes", path, kMaxMessageBytes));
    }
    MsgHeader header;
    if (Status status = checkHeader(received.value(), header); !status.ok()) {
      return Status::error(fmt::format("unexpected answer from {}: {}", path, status.message()));
    }
    if (header.type == static_cast<std::uint32_t>(MsgType::kRefuse)) {
      RefuseMsg refuse;
      if (!decodeMessage(received.value(), MsgType::kRefuse, refuse).ok()) {
        return Status::error(
            fmt::format("the daemon at {} (protocol {}) refused in a message of {} "
                        "bytes this stmuxctl cannot read",
                        path, header.version, received->bytes.size()));
      }
      return Status::error(
          fmt::format("the daemon at {} refused: {}", path, fieldString(refuse.reason)));
    }
    const bool last = header.type == static_cast<std::uint32_t>(MsgType::kStatusReply);
    if (!last && header.type != static_cast<std::uint32_t>(MsgType::kStatusPart)) {
      return Status::error(
          fmt::format("unexpected answer from {}: message type {}, expected {} or {}", path,
                      header.type, static_cast<std::uint32_t>(MsgType::kStatusPart),
                      static_cast<std::uint32_t>(MsgType::kStatusReply)));
    }
    if (json.size() + received->bytes.size() - sizeof(MsgHeader) > kMaxStatusBytes) {
      return Status::error(
          fmt::format("the answer from {} is longer than {} bytes", path, kMaxStatusBytes));
    }
    json.append(received->bytes.begin() + sizeof(MsgHeader), received->bytes.end());
    if (last) return json;
  }
}

}  // namespace stmux

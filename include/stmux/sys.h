// Thin, checked wrappers over the system calls both sides use: file
// descriptors, futexes, clocks, shared mappings.
#pragma once

#include <fmt/format.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "stmux/log.h"
#include "stmux/status.h"

// Evaluates a system call that returns -1 and sets errno on failure, retrying
// on EINTR. On failure, returns a Status naming the call, file:line and errno.
#define STMUX_SYSCALL(result, call)                                                                \
  do {                                                                                             \
    do {                                                                                           \
      (result) = (call);                                                                           \
    } while ((result) == -1 && errno == EINTR);                                                    \
    if ((result) == -1) {                                                                          \
      return ::stmux::Status::error(                                                               \
          fmt::format("{} failed at {}:{}: {}", #call, __FILE__, __LINE__, std::strerror(errno))); \
    }                                                                                              \
  } while (0)

// Propagates a failed Status (or the status of a failed Result).
#define STMUX_TRY(expr)                      \
  do {                                       \
    ::stmux::Status stmux_try_ = (expr);     \
    if (!stmux_try_.ok()) return stmux_try_; \
  } while (0)

namespace stmux {

// An owned file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    // close() must not be retried on EINTR on Linux: the descriptor is gone.
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// An owned shared mapping.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* base, std::size_t bytes) : base_(base), bytes_(bytes) {}
  Mapping(Mapping&& other) noexcept
      : base_(std::exchange(other.base_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept {
    if (this != &other) {
      reset();
      base_ = std::exchange(other.base_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  void* base() const { return base_; }
  std::size_t bytes() const { return bytes_; }
  void reset() {
    if (base_ != nullptr) ::munmap(base_, bytes_);
    base_ = nullptr;
    bytes_ = 0;
  }
  // Gives the mapping up without unmapping it: it stays for the process's
  // life.
  void leak() {
    base_ = nullptr;
    bytes_ = 0;
  }

 private:
  void* base_ = nullptr;
  std::size_t bytes_ = 0;
};

inline Result<Mapping> mapShared(int fd, std::size_t bytes) {
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    return Status::error(fmt::format("mmap of {} bytes failed: {}", bytes, std::strerror(errno)));
  }
  return Mapping(base, bytes);
}

inline std::uint64_t nowNs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

// The CPU time the calling thread has used: unlike nowNs(), it does not
// count the time the thread waited for a core.
inline std::uint64_t threadCpuNs() {
  timespec ts;
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

// Waits until `deadline_ns` (nowNs()) at most for `fd` to be readable, through
// EINTR: 1 readable, 0 not by then, -1 an error (errno says which).
inline int awaitReadable(int fd, std::uint64_t deadline_ns) {
  pollfd watched{fd, POLLIN, 0};
  while (true) {
    const std::uint64_t now = nowNs();
    const std::uint64_t left_ms =
        now >= deadline_ns ? 0 : (deadline_ns - now + 999'999) / 1'000'000;
    const int ready =
        ::poll(&watched, 1, static_cast<int>(std::min<std::uint64_t>(left_ms, INT_MAX)));
    if (ready >= 0 || errno != EINTR) return ready > 0 ? 1 : ready;
  }
}

// Futexes on shared memory: no FUTEX_PRIVATE_FLAG, since waiter and waker are
// different processes mapping the same memfd.
inline void futexWait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
                      std::uint64_t timeout_ns) {
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000ull),
              static_cast<long>(timeout_ns % 1000000000ull)};
  // EAGAIN (the word changed), EINTR and ETIMEDOUT all mean: look again.
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr,
            0);
}

inline void futexWake(std::atomic<std::uint32_t>* word) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

// Names the calling thread as `top -H`, perf and gdb show it; the kernel
// keeps 15 bytes.
inline void nameThisThread(const std::string& name) {
  ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
}

// The calling thread's scheduling as sched_getattr and sched_setattr take
// it (SCHED_ATTR_SIZE_VER0; glibc wraps neither). For SCHED_OTHER,
// `runtime` is the thread's slice request to EEVDF (Linux 6.12 and later:
// the slice; earlier kernels report 0 and ignore it).
struct SchedAttr {
  std::uint32_t size = sizeof(SchedAttr), policy = 0;
  std::uint64_t flags = 0;
  std::int32_t nice = 0;
  std::uint32_t priority = 0;
  std::uint64_t runtime = 0, deadline = 0, period = 0;
};
// 0, or -1 with errno.
inline int schedGetattr(SchedAttr& attr) {
  return static_cast<int>(::syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0));
}
inline int schedSetattr(SchedAttr attr) {
  attr.size = sizeof attr;
  return static_cast<int>(::syscall(SYS_sched_setattr, 0, &attr, 0));
}
// `attr` (the thread's, as read) with a slice request of `us`: its policy,
// nice value and reset-on-fork flag stay, and no other flag is sent (each
// would change something else). 0, or -1 with errno.
inline int schedRequestSlice(SchedAttr attr, unsigned us) {
  constexpr std::uint64_t kResetOnFork = 0x01;  // SCHED_FLAG_RESET_ON_FORK
  attr.flags &= kResetOnFork;
  attr.runtime = std::uint64_t{us} * 1000;
  return schedSetattr(attr);
}

inline void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace stmux

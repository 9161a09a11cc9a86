// One logger for shim and daemon: fmt, to stderr, one write(2) per line.
//
// Level and subsystem are checked before any formatting happens, so a disabled
// log statement costs one relaxed load. Lines look like
//   gpu-host:4242:4250 WARN  shim: no daemon at /run/stmux/stmuxd.sock ...
// stderr, never stdout: stdout belongs to the program the shim is preloaded
// into, and journald collects the daemon's stderr.
#pragma once

#include <fmt/format.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <string>
#include <string_view>

#include "stmux/status.h"

namespace stmux {

enum class Level : std::uint8_t { kOff = 0, kError, kWarn, kInfo, kDebug, kTrace };

// Subsystems; the name is what STMUX_LOG uses ("sched=debug").
#define STMUX_SUBSYSTEMS(X)  \
  X(kConfig, "config")       \
  X(kTransport, "transport") \
  X(kShim, "shim")           \
  X(kSched, "sched")         \
  X(kExec, "exec")           \
  X(kMem, "mem")             \
  X(kStats, "stats")         \
  X(kDaemon, "daemon")

enum class Subsys : std::uint8_t {
#define STMUX_X(id, name) id,
  STMUX_SUBSYSTEMS(STMUX_X)
#undef STMUX_X
      kCount
};

inline constexpr std::size_t kSubsysCount = static_cast<std::size_t>(Subsys::kCount);

inline constexpr std::array<std::string_view, kSubsysCount> kSubsysNames = {
#define STMUX_X(id, name) name,
    STMUX_SUBSYSTEMS(STMUX_X)
#undef STMUX_X
};

inline constexpr std::array<std::string_view, 6> kLevelNames = {"off",  "error", "warn",
                                                                "info", "debug", "trace"};

// The per-subsystem thresholds: a message is written when its level is at or
// below its subsystem's threshold.
struct LogSpec {
  std::array<Level, kSubsysCount> levels;
  static LogSpec uniform(Level level) {
    LogSpec spec;
    spec.levels.fill(level);
    return spec;
  }
  bool operator==(const LogSpec&) const = default;
};

namespace detail {
// Constant-initialised, so logging works before any constructor has run.
inline std::atomic<std::uint8_t> gLogLevels[kSubsysCount] = {
#define STMUX_X(id, name) static_cast<std::uint8_t>(Level::kWarn),
    STMUX_SUBSYSTEMS(STMUX_X)
#undef STMUX_X
};

// Stops a log call from re-entering itself, e.g. through an intercepted call
// made while formatting, or a signal handler that logs.
inline thread_local bool tLogging = false;

inline std::string_view levelTag(Level level) {
  switch (level) {
    case Level::kError:
      return "ERROR";
    case Level::kWarn:
      return "WARN ";
    case Level::kInfo:
      return "INFO ";
    case Level::kDebug:
      return "DEBUG";
    case Level::kTrace:
      return "TRACE";
    case Level::kOff:
      break;
  }
  return "?    ";
}

// Never destroyed: lines are logged from exit handlers (the shim's counters)
// and from threads still running while static objects are destroyed.
inline const std::string& hostName() {
  static const std::string* name = [] {
    char buf[256] = {};
    if (gethostname(buf, sizeof(buf) - 1) != 0) return new std::string("?");
    return new std::string(buf);
  }();
  return *name;
}
}  // namespace detail

// Parses "level" or "level,subsys=level,...", e.g. "info" or "warn,sched=debug".
inline Result<LogSpec> parseLogSpec(std::string_view text) {
  auto accepted = [] {
    std::string levels, subsystems;
    for (std::size_t i = 0; i < kLevelNames.size(); ++i) {
      levels += (i > 0 ? "|" : "") + std::string(kLevelNames[i]);
    }
    for (std::size_t i = 0; i < kSubsysNames.size(); ++i) {
      subsystems += (i > 0 ? "|" : "") + std::string(kSubsysNames[i]);
    }
    return fmt::format("LEVEL[,SUBSYSTEM=LEVEL...] with LEVEL one of {} and SUBSYSTEM one of {}",
                       levels, subsystems);
  };
  auto parseLevel = [](std::string_view word) -> std::optional<Level> {
    for (std::size_t i = 0; i < kLevelNames.size(); ++i) {
      if (word == kLevelNames[i]) return static_cast<Level>(i);
    }
    return std::nullopt;
  };
  if (text.empty()) return Status::error(fmt::format("it is empty; accepted: {}", accepted()));

  LogSpec spec = LogSpec::uniform(Level::kWarn);
  bool first = true;
  while (true) {
    const std::size_t comma = text.find(',');
    const std::string_view item = text.substr(0, comma);
    const std::size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      if (!first) {
        return Status::error(
            fmt::format("'{}' must be SUBSYSTEM=LEVEL; accepted: {}", item, accepted()));
      }
      auto level = parseLevel(item);
      if (!level) {
        return Status::error(
            fmt::format("'{}' is not a log level; accepted: {}", item, accepted()));
      }
      spec = LogSpec::uniform(*level);
    } else {
      const std::string_view subsys = item.substr(0, eq);
      auto level = parseLevel(item.substr(eq + 1));
      std::size_t index = kSubsysNames.size();
      for (std::size_t i = 0; i < kSubsysNames.size(); ++i) {
        if (kSubsysNames[i] == subsys) index = i;
      }
      if (index == kSubsysNames.size()) {
        return Status::error(
            fmt::format("'{}' is not a subsystem; accepted: {}", subsys, accepted()));
      }
      if (!level) {
        return Status::error(
            fmt::format("'{}' is not a log level; accepted: {}", item.substr(eq + 1), accepted()));
      }
      spec.levels[index] = *level;
    }
    first = false;
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return spec;
}

inline void setLogSpec(const LogSpec& spec) {
  for (std::size_t i = 0; i < kSubsysCount; ++i) {
    detail::gLogLevels[i].store(static_cast<std::uint8_t>(spec.levels[i]),
                                std::memory_order_relaxed);
  }
}

inline bool logEnabled(Level level, Subsys subsys) {
  return static_cast<std::uint8_t>(level) <=
         detail::gLogLevels[static_cast<std::size_t>(subsys)].load(std::memory_order_relaxed);
}

// Writes one line; never throws, never recurses.
inline void logWrite(Level level, Subsys subsys, std::string_view message) noexcept {
  if (detail::tLogging) return;
  detail::tLogging = true;
  try {
    fmt::memory_buffer line;
    fmt::format_to(std::back_inserter(line), "{}:{}:{} {} {}: {}\n", detail::hostName(), getpid(),
                   static_cast<long>(syscall(SYS_gettid)), detail::levelTag(level),
                   kSubsysNames[static_cast<std::size_t>(subsys)], message);
    const char* data = line.data();
    std::size_t left = line.size();
    while (left > 0) {
      const ssize_t n = write(STDERR_FILENO, data, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      data += n;
      left -= static_cast<std::size_t>(n);
    }
  } catch (...) {
    // Out of memory while logging: drop the line rather than the process.
  }
  detail::tLogging = false;
}

template <class... Args>
void logFormat(Level level, Subsys subsys, fmt::format_string<Args...> format,
               Args&&... args) noexcept {
  try {
    logWrite(level, subsys, fmt::format(format, std::forward<Args>(args)...));
  } catch (...) {
  }
}

// One line per period at most for a condition that can repeat without end
// (a flood of connections, say): allow() says whether to log now, and how
// many occurrences were held back since the last line. Not thread-safe: one
// per thread that logs.
class LogLimiter {
 public:
  explicit LogLimiter(std::uint64_t period_ns = 1'000'000'000) : period_ns_(period_ns) {}
  bool allow(std::uint64_t now_ns, std::uint64_t& suppressed) {
    if (last_ns_ != 0 && now_ns - last_ns_ < period_ns_) {
      ++suppressed_;
      return false;
    }
    last_ns_ = now_ns;
    suppressed = suppressed_;
    suppressed_ = 0;
    return true;
  }

 private:
  std::uint64_t period_ns_;
  std::uint64_t last_ns_ = 0;
  std::uint64_t suppressed_ = 0;
};

}  // namespace stmux

#define STMUX_LOG(level, subsys, ...)                                                  \
  do {                                                                                 \
    if (::stmux::logEnabled(::stmux::Level::level, ::stmux::Subsys::subsys))           \
      ::stmux::logFormat(::stmux::Level::level, ::stmux::Subsys::subsys, __VA_ARGS__); \
  } while (0)

#define STMUX_ERROR(subsys, ...) STMUX_LOG(kError, subsys, __VA_ARGS__)
#define STMUX_WARN(subsys, ...) STMUX_LOG(kWarn, subsys, __VA_ARGS__)
#define STMUX_INFO(subsys, ...) STMUX_LOG(kInfo, subsys, __VA_ARGS__)
#define STMUX_DEBUG(subsys, ...) STMUX_LOG(kDebug, subsys, __VA_ARGS__)
#define STMUX_TRACE(subsys, ...) STMUX_LOG(kTrace, subsys, __VA_ARGS__)

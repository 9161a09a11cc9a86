// Every STMUX_* variable, in one table, parsed in one place.
//
// The table drives the Config struct, the parser, stmuxd's command-line flags
// (STMUX_WINDOW_US is --window-us), `stmuxd --print-config` and the README's
// list. An invalid value is an error naming the variable, the value and what is
// accepted; it never silently becomes the default.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "stmux/log.h"
#include "stmux/status.h"

namespace stmux {

// Who reads a variable. The shim parses only what it uses, so a daemon setting
// left in a tenant's environment cannot disable the tenant's interception.
enum class Scope { kShim, kDaemon, kBoth };

enum class Kind { kBool, kInt, kPow2, kPath, kLog, kDevices, kChoice, kUser, kFileOrOff };

// X(member, variable, kind, default, min, max, unit-or-choices, scope, help)
#define STMUX_CONFIG_VARS(X)                                                                     \
  X(disable, "STMUX_DISABLE", kBool, "0", 0, 1, "", kShim,                                       \
    "Send every intercepted call straight to cuBLAS (the preload stays harmless).")              \
  X(socket, "STMUX_SOCKET", kPath, "/run/stmux/stmuxd.sock", 1, 107, "", kBoth,                  \
    "Path of the daemon's Unix control socket.")                                                 \
  X(log, "STMUX_LOG", kLog, "warn", 0, 0, "", kBoth,                                             \
    "Log threshold, e.g. 'info' or 'warn,sched=debug'; 'stats=info' prints the shim's "          \
    "counters at exit.")                                                                         \
  X(timeout_ms, "STMUX_TIMEOUT_MS", kInt, "10000", 100, 3600000, "ms", kShim,                    \
    "How long a call waits for the daemon to start it (then it runs directly, and the shim "     \
    "detaches for as long, twice as long after each such stall in a row) and, once started, to " \
    "finish it (then it fails and the shim detaches); attaching waits at most this.")            \
  X(spin_us, "STMUX_SPIN_US", kInt, "100", 0, 1000000, "us", kShim,                              \
    "How long a caller polls (yielding the core after 5 us) for its completion before it "       \
    "sleeps on a futex.")                                                                        \
  X(reconnect_ms, "STMUX_RECONNECT_MS", kInt, "1000", 10, 600000, "ms", kShim,                   \
    "Longest back-off between attempts to attach to an absent daemon.")                          \
  X(sync, "STMUX_SYNC", kChoice, "auto", 0, 0, "keep|auto|spin|yield|blocking", kShim,           \
    "How the tenant's threads wait for its GPU: its CUDA context's scheduling flag (set at its " \
    "first GEMM; a flag the program chose itself is kept), which CUDA's own synchronizations "   \
    "follow. 'keep': CUDA's default (spin while the process has fewer contexts than cores); "    \
    "'spin', 'yield', 'blocking': that flag, 'blocking' also with no spinning before the "       \
    "shim's own futex wait; 'auto': while the tenants making calls outnumber this process's "    \
    "cores, 'blocking' where its calls are served and 'yield' where they go direct, else "       \
    "CUDA's default.")                                                                           \
  X(slice_us, "STMUX_SLICE_US", kInt, "0", 0, 100000, "us", kShim,                               \
    "The scheduler slice the shim asks the kernel for (EEVDF's, Linux 6.12 and later, which "    \
    "raises a request below 100 us to 100), once for each thread that makes a GEMM call while "  \
    "attached to stmuxd; a shorter slice lets a thread run sooner once it wakes or another "     \
    "yields. 0: the kernel's. "                                                                  \
    "A thread under a policy other than SCHED_OTHER keeps it. Not yet measured in stmux's "      \
    "rows (docs/BENCHMARKS.md, thirty-fourth session).")                                         \
  X(route, "STMUX_ROUTE", kChoice, "auto", 0, 0, "auto|serve", kShim,                            \
    "Which calls stmuxd serves: 'serve': every call it can; 'auto': the same, but measured now " \
    "and then with calls direct, which they take while that is clearly faster: on MPS stmuxd "   \
    "measures all its tenants on MPS together and sends them all one way; off MPS a process "    \
    "measures itself while no other tenant makes calls.")                                        \
  X(mode, "STMUX_MODE", kChoice, "host", 0, 0, "host|stream", kShim,                             \
    "How a served call keeps its stream's order. 'host': the caller's thread waits for its "     \
    "stream, then for the daemon; 'stream': the call returns once queued, as cuBLAS's does, "    \
    "and the GPU keeps the order (calls with beta != 0 and the legacy API still go 'host'). "    \
    "'host' measured faster on all rows but one (docs/BENCHMARKS.md).")                          \
  X(stream_wait, "STMUX_STREAM_WAIT", kChoice, "memop", 0, 0, "memop|kernel", kShim,             \
    "Under STMUX_MODE=stream, what a served call's stream waits in until the daemon is done: "   \
    "'memop': a stream memory operation on a word in host memory; 'kernel': a one-thread "       \
    "kernel polling that word, whose waiting streams taxed other processes' GPU work on MPS "    \
    "half as much, and which made more calls than 'memop' but with far worse tails "             \
    "(docs/BENCHMARKS.md).")                                                                     \
  X(daemon_user, "STMUX_DAEMON_USER", kUser, "stmux", 0, 4294967294, "", kShim,                  \
    "The user stmuxd runs as. A tenant attaches only to a daemon running as root, as the "       \
    "tenant's own uid or as this user, and otherwise runs every call directly.")                 \
  X(window_us, "STMUX_WINDOW_US", kInt, "20", 0, 1000000, "us", kDaemon,                         \
    "Longest a request waits for others to batch with.")                                         \
  X(max_batch, "STMUX_MAX_BATCH", kInt, "256", 1, 65536, "requests", kDaemon,                    \
    "Most requests launched in one batch.")                                                      \
  X(active_us, "STMUX_ACTIVE_US", kInt, "2000", 0, 10000000, "us", kDaemon,                      \
    "A tenant that submitted within this long counts as active when deciding whether all "       \
    "tenants are waiting.")                                                                      \
  X(devices, "STMUX_DEVICES", kDevices, "all", 0, 0, "", kDaemon,                                \
    "GPUs the daemon serves: 'all' or a comma-separated list of indices and GPU-UUIDs.")         \
  X(slots, "STMUX_SLOTS", kPow2, "256", 8, 16384, "requests", kDaemon,                           \
    "Requests one client process may have in flight (its ring holds twice as many).")            \
  X(max_clients, "STMUX_MAX_CLIENTS", kInt, "1024", 1, 65536, "clients", kDaemon,                \
    "Most client processes attached at once; more are refused and run directly.")                \
  X(max_clients_per_uid, "STMUX_MAX_CLIENTS_PER_UID", kInt, "512", 1, 65536, "clients", kDaemon, \
    "Most client processes of one user attached at once, so that one user cannot take "          \
    "every place; more are refused and run directly.")                                           \
  X(mps_clients, "STMUX_MPS_CLIENTS", kInt, "48", 0, 65536, "clients", kDaemon,                  \
    "MPS's limit of client processes per GPU (48 on CUDA 13.0), stmuxd included. stmuxd keeps "  \
    "a place on MPS for each of the others, which a tenant takes as its CUDA starts; one that "  \
    "finds none free runs without MPS, where its context can still be made, and is still "       \
    "served. Lower it to leave places to CUDA processes without stmux; 0: no places kept (a "    \
    "process beyond the limit then cannot start CUDA at all, as without stmux).")                \
  X(max_mappings, "STMUX_MAX_MAPPINGS", kInt, "4096", 1, 1000000, "allocations", kDaemon,        \
    "Client allocations the daemon keeps mapped per client; the least recently used closes "     \
    "first.")                                                                                    \
  X(daemon_spin_us, "STMUX_DAEMON_SPIN_US", kInt, "1000", 0, 10000000, "us", kDaemon,            \
    "How long the daemon's threads poll for work after the last request before they sleep.")     \
  X(daemon_wakers, "STMUX_DAEMON_WAKERS", kInt, "2", 0, 16, "threads", kDaemon,                  \
    "Threads per GPU that wake the callers sleeping on their completions, so that the "          \
    "executor's thread goes back to launching at once; 0: the executor wakes them itself.")      \
  X(spinning_tenants, "STMUX_SPINNING_TENANTS", kInt, "0", 0, 65536, "tenants", kDaemon,         \
    "Under STMUX_SYNC=auto, while the tenants making calls outnumber the cores, how many of "    \
    "them at a time still spin while they wait (CUDA's default scheduling and the shim's "       \
    "poll), taking turns every 100 ms; the others block. 0: all of them block.")                 \
  X(metrics_file, "STMUX_METRICS_FILE", kFileOrOff, "off", 1, 4095, "", kDaemon,                 \
    "Where stmuxd writes its metrics in the Prometheus text format, once a second and as it "    \
    "starts to stop, for node-exporter's textfile collector (a *.prom file in the directory it " \
    "reads); removed when stmuxd exits. 'off': none.")                                           \
  X(launch, "STMUX_LAUNCH", kChoice, "auto", 0, 0, "auto|batched|grouped", kDaemon,              \
    "How a batch that mixes shapes launches: one cublasSgemmBatched per shape, one "             \
    "cublasSgemmGroupedBatched, or whichever measured faster for the mix (auto).")               \
  X(launch_graphs, "STMUX_LAUNCH_GRAPHS", kBool, "0", 0, 1, "", kDaemon,                         \
    "On: a batch whose launches recur (the same shapes and counts, one cublasSgemmBatched "      \
    "per shape) is captured as a CUDA graph on its second sighting and replayed after, to "      \
    "cut the daemon's host time per batch. Off until measured (docs/BENCHMARKS.md).")

// The C++ type a kind parses to.
template <Kind K>
struct KindType;
template <>
struct KindType<Kind::kBool> {
  using type = bool;
};
template <>
struct KindType<Kind::kInt> {
  using type = std::int64_t;
};
template <>
struct KindType<Kind::kPow2> {
  using type = std::int64_t;
};
template <>
struct KindType<Kind::kPath> {
  using type = std::string;
};
template <>
struct KindType<Kind::kLog> {
  using type = LogSpec;
};
template <>
struct KindType<Kind::kDevices> {
  using type = std::vector<std::string>;  // empty means all
};
template <>
struct KindType<Kind::kChoice> {
  using type = std::string;
};
template <>
struct KindType<Kind::kUser> {
  using type = std::string;  // as given: resolved when the shim attaches
};
template <>
struct KindType<Kind::kFileOrOff> {
  using type = std::string;  // empty: off
};

struct Config {
#define STMUX_X(member, var, kind, def, lo, hi, unit, scope, help) \
  typename KindType<Kind::kind>::type member{};
  STMUX_CONFIG_VARS(STMUX_X)
#undef STMUX_X
};

// One row of the table, for printing and documentation.
struct VarInfo {
  std::string_view member;
  std::string_view name;
  Kind kind;
  std::string_view default_text;
  std::int64_t min;
  std::int64_t max;
  std::string_view unit;
  Scope scope;
  std::string_view help;
};

inline constexpr VarInfo kVars[] = {
#define STMUX_X(member, var, kind, def, lo, hi, unit, scope, help) \
  {#member, var, Kind::kind, def, lo, hi, unit, Scope::scope, help},
    STMUX_CONFIG_VARS(STMUX_X)
#undef STMUX_X
};

// useradd's limit on a user name.
inline constexpr std::size_t kMaxUserName = 32;

// What a kind accepts, in words; used in every error message and by --help.
inline std::string describeAccepted(const VarInfo& var) {
  const std::string unit = var.unit.empty() ? "" : fmt::format(" ({})", var.unit);
  switch (var.kind) {
    case Kind::kBool:
      return "0, 1, true, false, yes, no, on or off";
    case Kind::kInt:
      return fmt::format("an integer from {} to {}{}", var.min, var.max, unit);
    case Kind::kPow2:
      return fmt::format("a power of two from {} to {}{}", var.min, var.max, unit);
    case Kind::kPath:
      return fmt::format("an absolute path of at most {} bytes", var.max);
    case Kind::kLog:
      return "LEVEL[,SUBSYSTEM=LEVEL...], LEVEL one of off|error|warn|info|debug|trace";
    case Kind::kDevices:
      return "'all' or a comma-separated list of device indices and GPU UUIDs (GPU-...)";
    case Kind::kChoice:
      return fmt::format("one of {}", var.unit);
    case Kind::kFileOrOff:
      return fmt::format("'off' or an absolute path of at most {} bytes", var.max);
    case Kind::kUser:
      return fmt::format(
          "a user name of at most {} ASCII letters, digits, '_', '.' and '-', starting with a "
          "letter or '_', or a uid from {} to {}",
          kMaxUserName, var.min, var.max);
  }
  return "?";
}

namespace detail {

inline Status invalid(const VarInfo& var, std::string_view value, std::string_view why) {
  return Status::error(
      fmt::format("{}='{}' {}; accepted: {}", var.name, value, why, describeAccepted(var)));
}

inline Result<std::int64_t> parseInteger(const VarInfo& var, std::string_view text) {
  std::int64_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range) return invalid(var, text, "is out of range");
  if (ec != std::errc() || ptr != end || text.empty()) {
    return invalid(var, text, "is not an integer");
  }
  if (value < var.min || value > var.max) return invalid(var, text, "is out of range");
  return value;
}

template <Kind K>
Result<typename KindType<K>::type> parseValue(const VarInfo& var, std::string_view text);

template <>
inline Result<bool> parseValue<Kind::kBool>(const VarInfo& var, std::string_view text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower == "1" || lower == "true" || lower == "yes" || lower == "on") return true;
  if (lower == "0" || lower == "false" || lower == "no" || lower == "off") return false;
  return invalid(var, text, "is not a boolean");
}

template <>
inline Result<std::int64_t> parseValue<Kind::kInt>(const VarInfo& var, std::string_view text) {
  return parseInteger(var, text);
}

template <>
inline Result<std::int64_t> parseValue<Kind::kPow2>(const VarInfo& var, std::string_view text) {
  auto value = parseInteger(var, text);
  if (!value) return value;
  if ((value.value() & (value.value() - 1)) != 0) {
    return invalid(var, text, "is not a power of two");
  }
  return value;
}

template <>
inline Result<std::string> parseValue<Kind::kPath>(const VarInfo& var, std::string_view text) {
  if (text.empty()) return invalid(var, text, "is empty");
  // A relative path would be looked up from each process's working
  // directory at each attach: a tenant that changed directory never finds
  // the daemon again, and the daemon's own (under systemd) is /.
  if (text.front() != '/') return invalid(var, text, "is not an absolute path");
  if (static_cast<std::int64_t>(text.size()) > var.max) {
    return invalid(var, text, fmt::format("is too long ({} bytes)", text.size()));
  }
  if (text.find('\0') != std::string_view::npos) return invalid(var, text, "holds a NUL byte");
  return std::string(text);
}

template <>
inline Result<LogSpec> parseValue<Kind::kLog>(const VarInfo& var, std::string_view text) {
  auto spec = parseLogSpec(text);
  if (!spec) {
    return Status::error(fmt::format("{}='{}' is invalid: {}", var.name, text, spec.message()));
  }
  return spec;
}

template <>
inline Result<std::vector<std::string>> parseValue<Kind::kDevices>(const VarInfo& var,
                                                                   std::string_view text) {
  if (text == "all") return std::vector<std::string>{};
  std::vector<std::string> items;
  std::string_view rest = text;
  while (true) {
    const std::size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    const bool index =
        !item.empty() && item.size() <= 4 &&
        std::all_of(item.begin(), item.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
    // GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, as nvidia-smi -L prints it.
    const bool uuid = item.size() == 40 && item.substr(0, 4) == "GPU-" &&
                      std::all_of(item.begin() + 4, item.end(), [](unsigned char c) {
                        return std::isxdigit(c) != 0 || c == '-';
                      });
    if (!index && !uuid) {
      return invalid(var, text, fmt::format("has '{}', neither an index nor a GPU UUID", item));
    }
    if (std::find(items.begin(), items.end(), item) != items.end()) {
      return invalid(var, text, fmt::format("names '{}' twice", item));
    }
    items.emplace_back(item);
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return items;
}

template <>
inline Result<std::string> parseValue<Kind::kChoice>(const VarInfo& var, std::string_view text) {
  std::string_view choices = var.unit;
  while (true) {
    const std::size_t bar = choices.find('|');
    if (choices.substr(0, bar) == text) return std::string(text);
    if (bar == std::string_view::npos) break;
    choices.remove_prefix(bar + 1);
  }
  return invalid(var, text, "is not a choice");
}

template <>
inline Result<std::string> parseValue<Kind::kFileOrOff>(const VarInfo& var, std::string_view text) {
  if (text == "off") return std::string();
  if (text.empty() || text.front() != '/') return invalid(var, text, "is not an absolute path");
  if (static_cast<std::int64_t>(text.size()) > var.max) {
    return invalid(var, text, fmt::format("is too long ({} bytes)", text.size()));
  }
  if (text.find('\0') != std::string_view::npos) return invalid(var, text, "holds a NUL byte");
  if (text.back() == '/') return invalid(var, text, "names a directory, not a file");
  return std::string(text);
}

template <>
inline Result<std::string> parseValue<Kind::kUser>(const VarInfo& var, std::string_view text) {
  if (text.empty()) return invalid(var, text, "is empty");
  // All digits is a uid, as chown and systemd read it.
  if (std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c) != 0; })) {
    auto uid = parseInteger(var, text);
    if (!uid) return uid.status();
    return std::string(text);
  }
  if (text.size() > kMaxUserName) {
    return invalid(var, text, fmt::format("is too long ({} bytes)", text.size()));
  }
  // ASCII by hand: isalpha() follows the tenant's locale.
  auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; };
  const bool valid = letter(text.front()) && std::all_of(text.begin() + 1, text.end(), [&](char c) {
                       return letter(c) || (c >= '0' && c <= '9') || c == '.' || c == '-';
                     });
  if (!valid) return invalid(var, text, "is neither a user name nor a uid");
  return std::string(text);
}

inline bool inScope(Scope var, Scope wanted) {
  return wanted == Scope::kBoth || var == Scope::kBoth || var == wanted;
}

}  // namespace detail

// Looks a variable up by name: the environment, or flags layered over it.
using Lookup = std::function<std::optional<std::string>(std::string_view name)>;

inline Lookup environmentLookup() {
  return [](std::string_view name) -> std::optional<std::string> {
    const char* value = std::getenv(std::string(name).c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

// Parses the variables of `scope` (kBoth: all of them); the others keep their
// defaults. An invalid variable also keeps its default, and its error (one
// line each, naming variable, value and what is accepted) goes to `errors`;
// callers treat any error as fatal (parseConfig) or, like the shim, stop
// forwarding while still honouring the valid settings, such as STMUX_LOG.
inline Config parseEachVariable(const Lookup& lookup, Scope scope, std::string& errors) {
  Config config;
#define STMUX_X(member, var, kind, def, lo, hi, unit, sc, help)                                   \
  {                                                                                               \
    static constexpr VarInfo kInfo{#member, var, Kind::kind, def, lo, hi, unit, Scope::sc, help}; \
    const std::optional<std::string> given =                                                      \
        detail::inScope(kInfo.scope, scope) ? lookup(kInfo.name) : std::nullopt;                  \
    auto parsed = detail::parseValue<Kind::kind>(kInfo, given ? *given : kInfo.default_text);     \
    if (!parsed) {                                                                                \
      errors += (errors.empty() ? "" : "\n") + parsed.message();                                  \
      parsed = detail::parseValue<Kind::kind>(kInfo, kInfo.default_text);                         \
    }                                                                                             \
    config.member = std::move(parsed).value();                                                    \
  }
  STMUX_CONFIG_VARS(STMUX_X)
#undef STMUX_X
  return config;
}

// The configuration, or every error at once.
inline Result<Config> parseConfig(const Lookup& lookup, Scope scope) {
  std::string errors;
  Config config = parseEachVariable(lookup, scope, errors);
  if (!errors.empty()) return Status::error(errors);
  return config;
}

constexpr const VarInfo* findVar(std::string_view name) {
  for (const VarInfo& var : kVars) {
    if (var.name == name) return &var;
  }
  return nullptr;
}

namespace detail {
// The names of the STMUX_* variables in `environ`.
inline std::vector<std::string_view> stmuxNames(char** environ_ptr) {
  std::vector<std::string_view> names;
  for (char** entry = environ_ptr; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string_view text(*entry);
    if (text.substr(0, 6) == "STMUX_") names.push_back(text.substr(0, text.find('=')));
  }
  return names;
}
}  // namespace detail

// Settings of stmux's scripts (tools/*.sh) and tests, not of the daemon or
// the shim: left in a tenant's environment they are no typo, so nobody warns
// of them.
inline constexpr std::string_view kScriptVariables[] = {
    "STMUX_BUILD_DIR", "STMUX_TEST_PASSES",   "STMUX_FUZZ_SECONDS", "STMUX_SANITIZE",
    "STMUX_FUZZ",      "STMUX_BUILD_TARGETS", "STMUX_PACKAGE",      "STMUX_FUZZ_SEEDS",
    "STMUX_DIFF_SEED", "STMUX_DIFF_CALLS"};

// Names of STMUX_* variables in `environ` that the table does not know:
// usually a typo that would otherwise be ignored without a word.
inline std::vector<std::string> unknownVariables(char** environ_ptr) {
  std::vector<std::string> unknown;
  for (const std::string_view name : detail::stmuxNames(environ_ptr)) {
    if (findVar(name) == nullptr &&
        std::find(std::begin(kScriptVariables), std::end(kScriptVariables), name) ==
            std::end(kScriptVariables)) {
      unknown.emplace_back(name);
    }
  }
  return unknown;
}

// Names of STMUX_* variables in `environ` that only the other side reads
// (a tenant's setting in the daemon's environment, or the reverse): set
// there, they change nothing, which is worth a word.
inline std::vector<std::string> variablesReadElsewhere(char** environ_ptr, Scope here) {
  std::vector<std::string> elsewhere;
  for (const std::string_view name : detail::stmuxNames(environ_ptr)) {
    const VarInfo* var = findVar(name);
    if (var != nullptr && !detail::inScope(var->scope, here)) elsewhere.emplace_back(var->name);
  }
  return elsewhere;
}

// "STMUX_WINDOW_US" -> "window-us": the daemon flag that mirrors a variable.
inline std::string flagName(std::string_view variable) {
  std::string flag(variable.substr(6));
  for (char& c : flag)
    c = c == '_' ? '-' : static_cast<char>(std::tolower(c));
  return flag;
}

namespace detail {
inline std::string formatOne(bool v) {
  return v ? "1" : "0";
}
inline std::string formatOne(std::int64_t v) {
  return std::to_string(v);
}
inline std::string formatOne(const std::string& v) {
  return v;
}
inline std::string formatOne(const std::vector<std::string>& v) {
  return v.empty() ? "all" : fmt::format("{}", fmt::join(v, ","));
}
inline std::string formatOne(const LogSpec& spec) {
  // The most common threshold first, then the exceptions.
  std::array<int, kLevelNames.size()> counts{};
  for (Level level : spec.levels)
    ++counts[static_cast<std::size_t>(level)];
  const auto base =
      static_cast<std::size_t>(std::max_element(counts.begin(), counts.end()) - counts.begin());
  std::string text(kLevelNames[base]);
  for (std::size_t i = 0; i < kSubsysCount; ++i) {
    const auto level = static_cast<std::size_t>(spec.levels[i]);
    if (level != base) text += fmt::format(",{}={}", kSubsysNames[i], kLevelNames[level]);
  }
  return text;
}
}  // namespace detail

// The value as it would be written in the environment.
inline std::string formatValue(const Config& config, std::string_view member) {
#define STMUX_X(m, var, kind, def, lo, hi, unit, sc, help)   \
  if (member == #m) {                                        \
    if constexpr (Kind::kind == Kind::kFileOrOff) {          \
      if (detail::formatOne(config.m).empty()) return "off"; \
    }                                                        \
    return detail::formatOne(config.m);                      \
  }
  STMUX_CONFIG_VARS(STMUX_X)
#undef STMUX_X
  return "?";
}

// The README's configuration table, generated from kVars; a unit test checks
// that the README holds exactly this text.
inline std::string configMarkdownTable() {
  std::string table =
      "| Variable | Default | Accepted | Read by | Meaning |\n"
      "| --- | --- | --- | --- | --- |\n";
  for (const VarInfo& var : kVars) {
    const char* reader = var.scope == Scope::kShim     ? "shim"
                         : var.scope == Scope::kDaemon ? "daemon"
                                                       : "both";
    std::string accepted = describeAccepted(var);
    std::string escaped;
    for (char c : accepted)
      escaped += c == '|' ? std::string("\\|") : std::string(1, c);
    table += fmt::format("| `{}` | `{}` | {} | {} | {} |\n", var.name, var.default_text, escaped,
                         reader, var.help);
  }
  return table;
}

}  // namespace stmux

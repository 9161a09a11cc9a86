// stmuxctl: asks a running stmuxd what it is doing.
//
//   stmuxctl status [--json] [--socket PATH]
//
// It connects to the daemon's control socket and says hello as a control
// client; the daemon answers with one status message (JSON) and closes. With
// --json that text is printed as it arrived, for scripts; otherwise it is read
// (stmux/json.h, over nlohmann/json) and printed as tables. The reply is the
// daemon's to shape and grows over time (the scheduler adds "gpus"), so any
// field may be missing or of an unexpected type: such a cell prints "-",
// never a crash.
//
// Exit status: 0 done, 1 the daemon could not be asked, 2 bad usage or
// configuration.
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "stmux/config.h"
#include "stmux/control.h"
#include "stmux/json.h"
#include "stmux/log.h"
#include "stmux/status.h"
#include "stmux/sys.h"
#include "stmux/wire.h"

namespace stmux::tools {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitBroken = 3;

// The daemon answers from its event loop, which looks at new connections at
// least every 100 us while busy: 2 s of silence means it is stuck.
constexpr int kAnswerTimeoutMs = 2000;

std::string_view defaultSocket() {
  const VarInfo* var = findVar("STMUX_SOCKET");
  return var != nullptr ? var->default_text : "";
}

void usage(std::FILE* out) {
  fmt::print(out,
             "usage: stmuxctl status [--json] [--socket PATH]\n"
             "       stmuxctl help\n"
             "Shows what the stmux daemon (stmuxd) is doing: the GPUs it serves, the\n"
             "processes attached to it and how their cuBLAS calls fared.\n"
             "\n"
             "  status           the daemon, its GPUs and its clients, as tables\n"
             "    --json         the daemon's status reply as it sent it (JSON)\n"
             "    --socket PATH  the daemon's control socket (default: $STMUX_SOCKET,\n"
             "                   else {})\n"
             "  help, --help     this text\n"
             "\n"
             "Exit status: 0 done; 1 the daemon could not be asked (not running,\n"
             "refused, no answer); 2 bad usage or configuration; 3 the daemon answered\n"
             "but a GPU of its is broken (its context failed: the tenants' calls there\n"
             "run in their own cuBLAS until stmuxd restarts), so that a liveness probe\n"
             "restarts it.\n",
             defaultSocket());
}

struct Options {
  std::string command;
  bool json = false;
  bool help = false;
  std::optional<std::string> socket;
};

Result<Options> parseArgs(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      options.help = true;
    } else if (arg == "--json") {
      options.json = true;
    } else if (arg == "--socket") {
      if (i + 1 == argc) return Status::error("--socket needs a path");
      options.socket = argv[++i];
    } else if (arg.starts_with("--socket=")) {
      options.socket = std::string(arg.substr(9));
    } else if (arg.size() > 1 && arg[0] == '-') {
      return Status::error(fmt::format("unknown option '{}'", arg));
    } else if (options.command.empty()) {
      options.command = arg;
    } else {
      return Status::error(fmt::format("unexpected argument '{}'", arg));
    }
  }
  if (options.socket) {
    if (auto address = socketAddress(*options.socket); !address) {
      return Status::error("--socket: " + address.message());
    }
  }
  if (options.help || options.command == "help") return options;
  if (options.command.empty()) return Status::error("no command given");
  if (options.command != "status") {
    return Status::error(
        fmt::format("unknown command '{}'; accepted: status, help", options.command));
  }
  return options;
}

// The socket: --socket, else STMUX_SOCKET through the configuration table.
// Only STMUX_SOCKET is looked up: a tenant's setting left in the shell (a bad
// STMUX_TIMEOUT_MS, say) must not stop an operator from asking the daemon.
Result<std::string> socketPath(const Options& options) {
  if (options.socket) return *options.socket;  // checked by parseArgs
  const Lookup environment = environmentLookup();
  const Lookup only_socket = [&](std::string_view name) -> std::optional<std::string> {
    return name == "STMUX_SOCKET" ? environment(name) : std::nullopt;
  };
  auto config = parseConfig(only_socket, Scope::kShim);
  if (!config) return config.status();
  return config->socket;
}

// ---- the human summary -------------------------------------------------------

// Text from the daemon made safe for a terminal: a tenant chooses its own
// name, and must not be able to move the cursor or retitle the operator's
// window. C0 and C1 controls and DEL are written as escapes.
std::string printable(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    const auto next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0;
    if (c < 0x20 || c == 0x7f) {
      out += fmt::format("\\x{:02x}", c);
    } else if (c == 0xc2 && next >= 0x80 && next <= 0x9f) {  // U+0080..U+009F
      out += fmt::format("\\u{:04x}", next);
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// Columns line up by characters, not bytes, so UTF-8 names do not skew them.
std::size_t displayWidth(std::string_view text) {
  std::size_t width = 0;
  for (unsigned char c : text)
    width += (c & 0xc0) != 0x80;
  return width;
}

const Json* member(const Json* object, std::string_view key) {
  return jsonFind(object, key);
}

std::string numberText(double value) {
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 9.007e15) {
    return fmt::format("{}", static_cast<std::int64_t>(value));
  }
  return fmt::format("{:.6g}", value);
}

bool isNumber(const Json* value) {
  return value != nullptr && value->is_number();
}

// A count the daemon reported, above zero.
bool positive(const Json* value) {
  return isNumber(value) && jsonNumber(value) > 0;
}

bool isBool(const Json* value) {
  return value != nullptr && value->is_boolean();
}

std::string count(const Json* value) {
  return isNumber(value) ? numberText(jsonNumber(value)) : "-";
}

std::string text(const Json* value) {
  const std::string_view given = jsonString(value);
  return given.empty() ? "-" : printable(given);
}

std::string yesNo(const Json* value) {
  if (!isBool(value)) return "-";
  return jsonBool(value) ? "yes" : "no";
}

std::string decimal(const Json* value) {
  return isNumber(value) ? fmt::format("{:.1f}", jsonNumber(value)) : "-";
}

std::string duration(const Json* value) {
  if (!isNumber(value) || !std::isfinite(jsonNumber(value)) || jsonNumber(value) < 0) return "-";
  const double seconds = jsonNumber(value);
  if (seconds < 60) return fmt::format("{:.1f}s", seconds);
  if (seconds >= 1e15) return fmt::format("{:.3g}s", seconds);  // nonsense, but no overflow
  const auto whole = static_cast<std::uint64_t>(seconds);
  const std::uint64_t days = whole / 86400, hours = whole / 3600 % 24, minutes = whole / 60 % 60,
                      secs = whole % 60;
  if (days > 0) return fmt::format("{}d {:02}h {:02}m", days, hours, minutes);
  if (hours > 0) return fmt::format("{}h {:02}m {:02}s", hours, minutes, secs);
  return fmt::format("{}m {:02}s", minutes, secs);
}

// A sum over rows of a numeric field; unset until some row has the field.
struct Sum {
  std::optional<double> total;
  void add(const Json* value) {
    if (isNumber(value)) total = total.value_or(0) + jsonNumber(value);
  }
  std::string str() const { return total ? numberText(*total) : "-"; }
};

// Per-reason counts: a row's object of reason -> count, or the sum over rows,
// in the order the reasons first appear.
struct Reasons {
  std::vector<std::pair<std::string, double>> counts;
  bool seen = false;
  void add(const Json* object) {
    if (object == nullptr || !object->is_object()) return;
    seen = true;
    for (const auto& [name, value] : object->items()) {
      if (!value.is_number()) continue;
      const std::string key = printable(name);
      auto it = std::find_if(counts.begin(), counts.end(),
                             [&](const auto& entry) { return entry.first == key; });
      if (it == counts.end()) it = counts.insert(counts.end(), {key, 0.0});
      it->second += value.get<double>();
    }
  }
  std::string str(bool non_zero_only) const {
    std::string out;
    for (const auto& [key, value] : counts) {
      if (non_zero_only && value == 0) continue;
      out += fmt::format("{}{}={}", out.empty() ? "" : " ", key, numberText(value));
    }
    return out.empty() ? "-" : out;
  }
};

class Table {
 public:
  // A header ending in '>' is right-aligned (numbers); the '>' is not shown.
  explicit Table(std::vector<std::string> headers) {
    for (std::string& header : headers) {
      const bool right = !header.empty() && header.back() == '>';
      if (right) header.pop_back();
      right_.push_back(right);
      widths_.push_back(displayWidth(header));
    }
    add(std::move(headers));
  }
  void add(std::vector<std::string> row) {
    row.resize(widths_.size());
    for (std::size_t i = 0; i < row.size(); ++i)
      widths_[i] = std::max(widths_[i], displayWidth(row[i]));
    rows_.push_back(std::move(row));
  }
  std::string str() const {
    std::string out;
    for (const auto& row : rows_) {
      std::string line;
      for (std::size_t i = 0; i < row.size(); ++i) {
        const std::string pad(widths_[i] - displayWidth(row[i]), ' ');
        if (i > 0) line += "  ";
        line += right_[i] ? pad + row[i] : row[i] + (i + 1 < row.size() ? pad : "");
      }
      while (!line.empty() && line.back() == ' ')
        line.pop_back();
      out += line + '\n';
    }
    return out;
  }

 private:
  std::vector<bool> right_;
  std::vector<std::size_t> widths_;
  std::vector<std::vector<std::string>> rows_;
};

std::string daemonLine(const Json* daemon) {
  const Json* draining = member(daemon, "draining");
  const std::string state = !isBool(draining)    ? "-"
                            : jsonBool(draining) ? "draining (shutting down)"
                                                 : "serving";
  return fmt::format("stmuxd: pid {}, protocol {}, up {}, {}\n", count(member(daemon, "pid")),
                     count(member(daemon, "protocol")), duration(member(daemon, "uptime_s")),
                     state);
}

// STMUX_ROUTE=auto's route for the tenants on MPS; nothing from a daemon
// that does not report one.
std::string mpsRouteLine(const Json* route) {
  if (route == nullptr || !route->is_object()) return "";
  const Json* looking = member(route, "looking");
  const Json* tenants = member(route, "last_tenants");
  std::string last = "no look yet";
  const Json* gain = member(route, "last_gain");
  if (isNumber(tenants) && jsonNumber(tenants) > 0 && isNumber(gain)) {
    last = fmt::format("last look: {:.2f}x as many calls the other way, {} tenants",
                       jsonNumber(gain), count(tenants));
  }
  return fmt::format("tenants on MPS: calls go {}{} ({} looks; {})\n", text(member(route, "route")),
                     isBool(looking) && jsonBool(looking) ? ", looking at the other route" : "",
                     count(member(route, "looks")), last);
}

// The places on MPS stmuxd keeps for tenants; nothing where it keeps none.
std::string mpsPlacesLine(const Json* places) {
  if (places == nullptr || !places->is_object()) return "";
  return fmt::format(
      "places on MPS: {} of {} taken (STMUX_MPS_CLIENTS; a tenant finding none "
      "free runs off MPS)\n",
      count(member(places, "taken")), count(member(places, "kept")));
}

// How many of the GPUs the status lists are broken.
int brokenGpus(const Json* gpus) {
  int broken = 0;
  for (std::size_t i = 0; gpus != nullptr && gpus->is_array() && i < gpus->size(); ++i) {
    const Json* is_broken = member(jsonAt(gpus, i), "broken");
    broken += isBool(is_broken) && jsonBool(is_broken);
  }
  return broken;
}

std::string gpuTable(const Json* gpus) {
  if (gpus == nullptr) return "GPUs: not reported by this daemon\n";
  if (!gpus->is_array()) return "GPUs: -\n";
  if (gpus->size() == 0) return "GPUs: none served\n";
  Table table({"GPU", "NAME", "UUID", "STATE", "MPS", "QUEUED>", "IN FLIGHT>", "REQUESTS>",
               "BATCHES>", "MEAN BATCH>", "MAPPED>", "LAUNCHES"});
  Sum queued, in_flight, requests, batches, mapped;
  // The mean batch over every GPU: each GPU's weighted by its batches (the
  // requests also count those queued and those dropped, which no batch took).
  Sum launched;
  Reasons launches;
  const int broken = brokenGpus(gpus);
  for (std::size_t i = 0; i < gpus->size(); ++i) {
    const Json* gpu = jsonAt(gpus, i);
    const Json* is_broken = member(gpu, "broken");
    const bool known = isBool(is_broken);
    Reasons row_launches;
    row_launches.add(member(gpu, "launches"));
    launches.add(member(gpu, "launches"));
    queued.add(member(gpu, "queued"));
    in_flight.add(member(gpu, "in_flight"));
    requests.add(member(gpu, "requests"));
    batches.add(member(gpu, "batches"));
    if (const Json* b = member(gpu, "batches"), *m = member(gpu, "mean_batch");
        isNumber(b) && isNumber(m)) {
      launched.total = launched.total.value_or(0) + jsonNumber(b) * jsonNumber(m);
    }
    mapped.add(member(gpu, "mapped"));
    table.add({count(member(gpu, "index")), text(member(gpu, "name")), text(member(gpu, "uuid")),
               !known                ? "-"
               : jsonBool(is_broken) ? "BROKEN"
                                     : "ok",
               yesNo(member(gpu, "mps")), count(member(gpu, "queued")),
               count(member(gpu, "in_flight")), count(member(gpu, "requests")),
               count(member(gpu, "batches")), decimal(member(gpu, "mean_batch")),
               count(member(gpu, "mapped")), row_launches.str(/*non_zero_only=*/false)});
  }
  // Opens the mapper could not do hold up the GPU's batches (docs/ARCHITECTURE.md,
  // "Client memory"): said where there were any.
  std::string notes;
  for (std::size_t i = 0; i < gpus->size(); ++i) {
    const Json* inline_opens = member(jsonAt(gpus, i), "inline_opens");
    if (positive(inline_opens)) {
      notes += fmt::format(
          "GPU {}: {} allocations were opened on the executor's thread, not the mapper's "
          "(memory still mapped at their address, or closed since)\n",
          count(member(jsonAt(gpus, i), "index")), count(inline_opens));
    }
  }
  const bool mean = launched.total && batches.total && *batches.total > 0;
  table.add({"total", fmt::format("{} GPU{}", gpus->size(), gpus->size() == 1 ? "" : "s"), "",
             broken > 0 ? fmt::format("{} BROKEN", broken) : "", "", queued.str(), in_flight.str(),
             requests.str(), batches.str(),
             mean ? fmt::format("{:.1f}", *launched.total / *batches.total) : "-", mapped.str(),
             launches.str(/*non_zero_only=*/false)});
  return table.str() + notes;
}

std::string clientTable(const Json* clients) {
  if (clients == nullptr || !clients->is_array()) return "clients: -\n";
  if (clients->size() == 0) return "clients: none attached\n";
  Table table({"ID", "PID>", "UID>", "NAME", "ATTACHED>", "MPS", "ROUTE", "MODE", "SYNC",
               "REQUESTS>", "FORWARDED>", "FAILED>", "FALLBACKS"});
  Sum requests, forwarded, failed;
  Reasons fallbacks;
  for (std::size_t i = 0; i < clients->size(); ++i) {
    const Json* client = jsonAt(clients, i);
    Reasons row_fallbacks;
    row_fallbacks.add(member(client, "fallbacks"));
    fallbacks.add(member(client, "fallbacks"));
    requests.add(member(client, "requests"));
    forwarded.add(member(client, "forwarded"));
    failed.add(member(client, "failed"));
    table.add({count(member(client, "id")), count(member(client, "pid")),
               count(member(client, "uid")), text(member(client, "name")),
               duration(member(client, "attached_s")), text(member(client, "mps")),
               text(member(client, "route")), text(member(client, "mode")),
               text(member(client, "sync")), count(member(client, "requests")),
               count(member(client, "forwarded")), count(member(client, "failed")),
               row_fallbacks.str(/*non_zero_only=*/true)});
  }
  table.add({"total", "", "",
             fmt::format("{} client{}", clients->size(), clients->size() == 1 ? "" : "s"), "", "",
             "", "", "", requests.str(), forwarded.str(), failed.str(),
             fallbacks.str(/*non_zero_only=*/true)});
  // What an honest shim never makes the daemon do (docs/ARCHITECTURE.md,
  // "Client memory"): said for the clients that did.
  std::string notes;
  for (std::size_t i = 0; i < clients->size(); ++i) {
    const Json* client = jsonAt(clients, i);
    const Json* refused = member(client, "refused");
    const Json* failed_opens = member(client, "failed_opens");
    const Json* unopened = member(client, "declined_unopened");
    std::string what;
    if (positive(refused))
      what = fmt::format("{} requests refused beyond its slots", count(refused));
    if (positive(failed_opens)) {
      what += fmt::format(
          "{}{} opens of its memory failed or crowded out, {} requests declined unopened",
          what.empty() ? "" : "; ", count(failed_opens), count(unopened));
    }
    if (!what.empty()) {
      notes += fmt::format("client {} (pid {}): {}\n", count(member(client, "id")),
                           count(member(client, "pid")), what);
    }
  }
  return table.str() + notes;
}

// The clients' calls summed by cuBLAS entry point, in the order of the
// shim's list; entry points no client called are left out.
std::string entryPointTable(const Json* clients) {
  if (clients == nullptr || !clients->is_array()) return "";
  Table table({"ENTRY POINT", "CALLS>", "FORWARDED>", "FAILED>", "FALLBACKS"});
  bool any = false;
  for (std::string_view name : kEntryPointNames) {
    Sum calls, forwarded, failed;
    Reasons fallbacks;
    for (std::size_t i = 0; i < clients->size(); ++i) {
      const Json* point = member(member(jsonAt(clients, i), "entry_points"), std::string(name));
      calls.add(member(point, "calls"));
      forwarded.add(member(point, "forwarded"));
      failed.add(member(point, "failed"));
      fallbacks.add(member(point, "fallbacks"));
    }
    if (!calls.total) continue;
    any = true;
    table.add({std::string(name), calls.str(), forwarded.str(), failed.str(),
               fallbacks.str(/*non_zero_only=*/true)});
  }
  return any ? "\n" + table.str() : "";
}

std::string summary(const Json& status) {
  const Json* daemon = member(&status, "daemon");
  const Json* clients = member(&status, "clients");
  return daemonLine(daemon != nullptr && daemon->is_object() ? daemon : nullptr) +
         mpsRouteLine(member(&status, "mps_route")) + mpsPlacesLine(member(&status, "mps_places")) +
         "\n" + gpuTable(member(&status, "gpus")) + "\n" + clientTable(clients) +
         entryPointTable(clients);
}

int run(int argc, char** argv) {
  auto options = parseArgs(argc, argv);
  if (!options) {
    fmt::print(stderr, "stmuxctl: {}\n", options.message());
    usage(stderr);
    return kExitUsage;
  }
  if (options->help || options->command == "help") {
    usage(stdout);
    return std::fflush(stdout) == 0 ? kExitOk : kExitFailed;
  }
  auto path = socketPath(options.value());
  if (!path) {
    fmt::print(stderr, "stmuxctl: {}\n", path.message());
    return kExitUsage;
  }
  // stmuxctl logs nothing, but an STMUX_LOG in this shell that the daemon and
  // the shim would refuse is worth a word, not silence.
  if (const char* log = std::getenv("STMUX_LOG"); log != nullptr) {
    if (auto spec = parseLogSpec(log); !spec) {
      fmt::print(stderr,
                 "stmuxctl: note: STMUX_LOG='{}' is invalid ({}); stmuxd and libstmux.so "
                 "would refuse it\n",
                 log, spec.message());
    }
  }
  auto reply = queryDaemonStatus(path.value(), "stmuxctl", kAnswerTimeoutMs);
  if (!reply) {
    fmt::print(stderr, "stmuxctl: {}\n", reply.message());
    return kExitFailed;
  }
  auto status = parseJson(reply.value(), "the status reply", kMaxStatusBytes);
  if (options->json) {
    fmt::print("{}\n", reply.value());
  } else {
    if (!status) {
      fmt::print(stderr,
                 "stmuxctl: the daemon's status reply is not valid JSON: {} "
                 "('stmuxctl status --json' shows it as received)\n",
                 status.message());
      return kExitFailed;
    }
    fmt::print("{}", summary(status.value()));
  }
  if (std::fflush(stdout) != 0) {
    fmt::print(stderr, "stmuxctl: cannot write the output: {}\n", std::strerror(errno));
    return kExitFailed;
  }
  if (const int broken = status ? brokenGpus(member(&status.value(), "gpus")) : 0; broken > 0) {
    fmt::print(stderr,
               "stmuxctl: {} GPU{} of the daemon's {} broken: its context failed, and the "
               "tenants' calls there run in their own cuBLAS until stmuxd restarts\n",
               broken, broken == 1 ? "" : "s", broken == 1 ? "is" : "are");
    return kExitBroken;
  }
  return kExitOk;
}

}  // namespace
}  // namespace stmux::tools

int main(int argc, char** argv) {
  return stmux::tools::run(argc, argv);
}

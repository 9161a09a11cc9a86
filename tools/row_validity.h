// When a stmux-bench row counts: every tenant ran through the whole timed
// span and made progress in it. A row that fails is printed with the reason
// and never used for a ratio or a target. And whether a valid row was
// steady: its rate in windows of the span. Plain C++, tested with fake
// tenants (tests/row_validity_test.cc, tests/bench_test.cc).
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <regex>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "tools/barrier.h"

namespace stmux::tools {

inline std::string firstLine(const std::string& text) {
  const std::size_t end = text.find('\n');
  return text.substr(0, std::min<std::size_t>(end, 200));
}

// Python puts the error last, under its traceback.
inline std::string lastLine(const std::string& text) {
  const std::size_t end = text.find_last_not_of('\n');
  if (end == std::string::npos) return "";
  const std::size_t newline = text.rfind('\n', end);
  const std::size_t begin = newline == std::string::npos ? 0 : newline + 1;
  return firstLine(text.substr(begin, end + 1 - begin));
}

// What a failed tenant said: its first line of stderr that is not one of
// stmux's own log lines ("host:pid:tid LEVEL subsystem: ..."), which a
// preloaded shim may print before it, or, under a Python traceback, the
// exception at its end. A GPU that refused the tenant a context while MPS
// serves it is most often MPS's client limit (stmux/mps_seats.h: stmuxd keeps
// its own tenants beyond it off MPS, but not processes without the
// preload): said so.
inline std::string tenantError(const std::string& err) {
  static const std::regex stmux_line("^[^ :]+:[0-9]+:[0-9]+ [A-Z]+ +[a-z]+: ");
  std::istringstream lines(err);
  std::string said = firstLine(err);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || std::regex_search(line, stmux_line)) continue;
    said = line.rfind("Traceback", 0) == 0 ? lastLine(err) : firstLine(line);
    break;
  }
  if (said.find("busy or unavailable") != std::string::npos ||
      said.find("MPS_MAX_CLIENTS") != std::string::npos) {
    said += " (on MPS: its client limit)";
  }
  return said;
}

// How one tenant of a row ended.
struct TenantOutcome {
  int exit_status = -1;  // -1: still running when the bench stopped waiting
  std::string error;     // what it said (tenantError), for the reason
  std::optional<TenantResult> result;
};

struct RowVerdict {
  bool valid = true;
  std::string why;  // when not valid: the first tenant at fault and what it did
};

inline RowVerdict judgeRow(const std::vector<TenantOutcome>& tenants, const Span& span) {
  std::string first;
  int faulty = 0;
  for (std::size_t i = 0; i < tenants.size(); ++i) {
    const TenantOutcome& t = tenants[i];
    std::string why;
    if (t.exit_status < 0) {
      why = "did not finish";
    } else if (t.exit_status != 0) {
      why = "exited " + std::to_string(t.exit_status) + (t.error.empty() ? "" : ": " + t.error);
    } else if (!t.result) {
      why = "wrote no result";
    } else if (t.result->last_end_ns < span.stop_ns) {
      why = "stopped before the timed span ended";
    } else if (t.result->calls == 0) {
      why = "completed no step inside the timed span";
    }
    if (why.empty()) continue;
    if (++faulty == 1) first = "tenant " + std::to_string(i) + " " + why;
  }
  if (faulty == 0) return {};
  RowVerdict verdict;
  verdict.valid = false;
  verdict.why = faulty == 1 ? first
                            : std::to_string(faulty) + " of " + std::to_string(tenants.size()) +
                                  " tenants failed the row; " + first;
  return verdict;
}

namespace detail {
// Calls `visit(from_ns, to_ns, latency_ns)` for each step of `result` that
// overlapped the span, placed in it as offsets from its start: back to back
// from the start, stretched so that the counted steps (those that ended
// inside it) fill it, since the loop between steps is left out of each
// step's time; the step that crossed stop comes after them.
template <class Visit>
void placeSteps(const TenantResult& result, const Span& span, Visit&& visit) {
  const double length = static_cast<double>(span.stop_ns - span.start_ns);
  const std::size_t counted = std::min<std::size_t>(result.calls, result.latencies_ns.size());
  double total = 0;
  for (std::size_t i = 0; i < counted; ++i)
    total += result.latencies_ns[i];
  const double stretch = total > 0 && total < length ? length / total : 1.0;
  double ended = 0;
  for (std::uint32_t latency : result.latencies_ns) {
    const double from = ended;
    ended += latency * stretch;
    visit(from, ended, latency);
  }
}
}  // namespace detail

// How the tenants' steps of a valid row fell over its span: the share of all
// their timed steps that ended in each of `windows` equal parts of it (the
// shares add up to 1; a row's rate in a window is its rate times the
// window's share times `windows`). A tenant records only its steps'
// latencies, but it runs them back to back from the span's start until the
// first that ends at or after its stop, so its i-th step ends at about the
// sum of the first i latencies; that sum is stretched to the span, which
// spreads what it leaves out (the loop between two steps, and the part of
// the span after its last timed step, less than one step) evenly.
inline std::vector<double> windowShares(const std::vector<TenantOutcome>& tenants, const Span& span,
                                        int windows) {
  std::vector<double> shares(static_cast<std::size_t>(std::max(windows, 1)), 0.0);
  const double length = static_cast<double>(span.stop_ns - span.start_ns);
  double steps = 0;
  for (const TenantOutcome& tenant : tenants) {
    if (!tenant.result) continue;
    const std::size_t counted =
        std::min<std::size_t>(tenant.result->calls, tenant.result->latencies_ns.size());
    std::size_t placed = 0;
    detail::placeSteps(*tenant.result, span, [&](double, double ended, std::uint32_t) {
      if (placed++ >= counted) return;  // the step that crossed stop
      // Windows are (from, to]: a step that ends on a boundary is the earlier window's.
      const double place = std::ceil(ended / length * static_cast<double>(shares.size()));
      const std::size_t window = place < 1 ? 0 : static_cast<std::size_t>(place) - 1;
      shares[std::min(window, shares.size() - 1)] += 1;
    });
    steps += static_cast<double>(counted);
  }
  if (steps > 0) {
    for (double& share : shares)
      share /= steps;
  }
  return shares;
}

// A row's longest step: whose, when in the span it ended (placed as
// windowShares places steps), and how many tenants, its own among them, had
// a step at least a quarter as long over the same time. Many: something
// stalled them all (the daemon, the GPU, the machine); one: that tenant
// alone.
struct LongestStep {
  double us = 0;     // 0: no steps
  int tenant = -1;   // its index in the row
  double at_s = 0;   // when it ended, from the span's start
  int together = 0;  // tenants with a step at least us / 4 overlapping it
};

inline LongestStep longestStep(const std::vector<TenantOutcome>& tenants, const Span& span) {
  LongestStep longest;
  double from = 0, to = 0;
  for (std::size_t i = 0; i < tenants.size(); ++i) {
    if (!tenants[i].result) continue;
    detail::placeSteps(*tenants[i].result, span, [&](double start, double end, std::uint32_t ns) {
      if (ns / 1000.0 <= longest.us) return;
      longest.us = ns / 1000.0;
      longest.tenant = static_cast<int>(i);
      from = start;
      to = end;
    });
  }
  if (longest.tenant < 0) return longest;
  longest.at_s = to / 1e9;
  for (const TenantOutcome& tenant : tenants) {
    if (!tenant.result) continue;
    bool with = false;
    detail::placeSteps(*tenant.result, span, [&](double start, double end, std::uint32_t ns) {
      with = with || (ns / 1000.0 >= longest.us / 4 && start < to && end > from);
    });
    longest.together += with;
  }
  return longest;
}

}  // namespace stmux::tools

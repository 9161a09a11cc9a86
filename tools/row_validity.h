// When a stmux-bench row counts: every tenant ran through the whole timed
// span and made progress in it. A row that fails is printed with the reason
// and never used for a ratio or a target. Plain C++, tested with fake
// tenants (tests/row_validity_test.cc, tests/bench_test.cc).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tools/barrier.h"

namespace stmux::tools {

// How one tenant of a row ended.
struct TenantOutcome {
  int exit_status = -1;  // -1: still running when the bench stopped waiting
  std::string error;     // the first line of its stderr, for the reason
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

}  // namespace stmux::tools

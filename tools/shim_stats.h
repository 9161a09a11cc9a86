// The shim's exit line (STMUX_LOG=stats=info), as the programs that preload
// it read it back (stmux-bench, the GPU tests):
//   "N calls: S served by stmuxd (O stream-ordered), F failed; direct: reason=n ..."
//   "by entry point: name=N calls, S served, F failed, D direct; ..."
#pragma once

#include <map>
#include <regex>
#include <string>

namespace stmux::tools {

struct ShimStats {
  long calls = -1, served = -1, failed = -1;  // -1: no exit line was found
  long stream_ordered = -1;                   // of those served
  // The round line: host-mode calls served, and their mean waits for the
  // caller's earlier work and for seeing the daemon's answer (-1: no line).
  long timed = -1;
  double prior_wait_us = -1, completion_us = -1;
  std::map<std::string, long> direct;  // reason -> calls; reasons with none are not printed
  // By entry point (sgemm, gemv, ...); entry points with no calls are not printed.
  struct Entry {
    long calls = 0, served = 0, failed = 0, direct = 0;
  };
  std::map<std::string, Entry> entries;

  // The calls that went direct for `reason`; 0 when it was not printed.
  long directCalls(const std::string& reason) const {
    const auto it = direct.find(reason);
    return it == direct.end() ? 0 : it->second;
  }
};

// The first exit line in `err`.
inline ShimStats shimStats(const std::string& err) {
  ShimStats stats;
  std::smatch match;
  if (!std::regex_search(err, match,
                         std::regex("([0-9]+) calls: ([0-9]+) served by stmuxd \\(([0-9]+) "
                                    "stream-ordered\\), ([0-9]+) failed; direct:([^\n]*)"))) {
    return stats;
  }
  stats.calls = std::stol(match[1]);
  stats.served = std::stol(match[2]);
  stats.stream_ordered = std::stol(match[3]);
  stats.failed = std::stol(match[4]);
  const std::string direct = match[5];
  const std::regex pair("([a-z_]+)=([0-9]+)");
  for (auto it = std::sregex_iterator(direct.begin(), direct.end(), pair);
       it != std::sregex_iterator(); ++it) {
    stats.direct[(*it)[1]] = std::stol((*it)[2]);
  }
  if (std::regex_search(err, match, std::regex("by entry point:([^\n]*)"))) {
    const std::string line = match[1];
    const std::regex entry(
        "([a-z_]+)=([0-9]+) calls, ([0-9]+) served, ([0-9]+) failed, ([0-9]+) direct");
    for (auto it = std::sregex_iterator(line.begin(), line.end(), entry);
         it != std::sregex_iterator(); ++it) {
      stats.entries[(*it)[1]] = {std::stol((*it)[2]), std::stol((*it)[3]), std::stol((*it)[4]),
                                 std::stol((*it)[5])};
    }
  }
  if (std::regex_search(err, match,
                        std::regex("round: ([0-9]+) host-mode calls, mean prior-work wait "
                                   "([0-9.]+) us, mean completion ([0-9.]+) us"))) {
    stats.timed = std::stol(match[1]);
    stats.prior_wait_us = std::stod(match[2]);
    stats.completion_us = std::stod(match[3]);
  }
  return stats;
}

}  // namespace stmux::tools

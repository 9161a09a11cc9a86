// What the GPU tests read from the programs they preload the shim into: the
// shim's exit line (STMUX_LOG=stats=info),
//   "N calls: S served by stmuxd, F failed; direct: reason=n ...",
// and "key N" values the programs print.
#pragma once

#include <map>
#include <regex>
#include <sstream>
#include <string>

namespace stmux::testing {

struct ShimStats {
  long calls = -1, served = -1, failed = -1;
  std::map<std::string, long> direct;  // reason -> calls; reasons with none are not printed
};

inline ShimStats shimStats(const std::string& err) {
  ShimStats stats;
  std::smatch match;
  if (!std::regex_search(err, match,
                         std::regex("([0-9]+) calls: ([0-9]+) served by stmuxd, ([0-9]+) "
                                    "failed; direct:([^\n]*)"))) {
    return stats;
  }
  stats.calls = std::stol(match[1]);
  stats.served = std::stol(match[2]);
  stats.failed = std::stol(match[3]);
  const std::string direct = match[4];
  const std::regex pair("([a-z_]+)=([0-9]+)");
  for (auto it = std::sregex_iterator(direct.begin(), direct.end(), pair);
       it != std::sregex_iterator(); ++it) {
    stats.direct[(*it)[1]] = std::stol((*it)[2]);
  }
  return stats;
}

// The exit line of process `pid`, where several processes share one log
// (log lines start "host:pid:tid").
inline ShimStats shimStatsOf(const std::string& err, long pid) {
  std::istringstream lines(err);
  const std::string tag = ":" + std::to_string(pid) + ":";
  for (std::string line; std::getline(lines, line);) {
    if (line.find(tag) != std::string::npos && line.find(" calls: ") != std::string::npos) {
      return shimStats(line);
    }
  }
  return {};
}

// The first number printed after `key `, or -1.
inline long outValue(const std::string& out, const std::string& key) {
  std::smatch match;
  if (!std::regex_search(out, match, std::regex(key + " ([0-9]+)"))) return -1;
  return std::stol(match[1]);
}

}  // namespace stmux::testing

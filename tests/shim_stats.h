// What the GPU tests read from the programs they preload the shim into: the
// shim's exit line (tools/shim_stats.h), and "key N" values the programs
// print.
#pragma once

#include <map>
#include <regex>
#include <sstream>
#include <string>

#include "tools/shim_stats.h"

namespace stmux::testing {

using tools::ShimStats;
using tools::shimStats;

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

// What the tools that run stmuxd and its tenants share (stmux-bench,
// stmux-fault, the GPU tests): where the programs are, the daemon's status as
// JSON, and a wait for a condition.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "stmux/control.h"
#include "stmux/json.h"

namespace stmux::tools {

// The first of `candidates` (paths relative to `self_dir`) that exists, or "".
inline std::string findProgram(const std::filesystem::path& self_dir,
                               const std::vector<std::string>& candidates) {
  for (const std::string& candidate : candidates) {
    const std::filesystem::path path = (self_dir / candidate).lexically_normal();
    if (std::filesystem::exists(path)) return path.string();
  }
  return "";
}

// Where stmuxd and libstmux.so lie relative to a tool, as built (tools/,
// daemon/, shim/) or as installed (bin/, sbin/, lib/...).
inline const std::vector<std::string> kStmuxdBesideTools = {"stmuxd", "../daemon/stmuxd",
                                                            "../sbin/stmuxd"};
inline const std::vector<std::string> kShimBesideTools = {
    "../shim/libstmux.so", "../lib/libstmux.so", "../lib64/libstmux.so",
    "../lib/x86_64-linux-gnu/libstmux.so"};

// The daemon's status reply at `socket`, as stmuxctl gets it; nothing where
// it does not answer or answers with something that is not its JSON.
inline std::optional<Json> daemonStatus(const std::string& socket,
                                        std::string_view name = "stmux-status") {
  auto reply = queryDaemonStatus(socket, name, 2000);
  if (!reply.ok()) return std::nullopt;
  auto json = parseJson(reply.value(), "the status reply", kMaxStatusBytes);
  if (!json.ok()) return std::nullopt;
  return std::move(json).value();
}

// Polls `condition` every 20 ms for up to `seconds`; its last answer.
inline bool waitUntil(const std::function<bool()>& condition, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<long>(seconds * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
}

}  // namespace stmux::tools

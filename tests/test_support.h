// Helpers shared by the transport tests: a private socket directory, a
// RequestSink the test can script, and a Server running on its own thread.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "daemon/server.h"
#include "stmux/control.h"
#include "stmux/segment.h"
#include "stmux/sys.h"

namespace stmux::testing {

class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/stmux-test-XXXXXX";
    path_ = ::mkdtemp(name);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string socket() const { return path_ + "/stmuxd.sock"; }

 private:
  std::string path_;
};

// Polls `condition` until it holds or `timeout` passes.
inline bool waitFor(const std::function<bool()>& condition,
                    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return condition();
}

// Completes a request the way the executor does: claim, then publish.
inline void completeRequest(const daemon::ClientPtr& client, const Request& request,
                            std::int32_t status) {
  Slot& slot = client->view.slot(request.slot);
  if (slotClaim(slot, request.generation)) slotComplete(slot, request.generation, status);
}

class TestSink : public daemon::RequestSink {
 public:
  void onAttach(const daemon::ClientPtr&) override { ++attached; }
  void onDetach(const daemon::ClientPtr&) override {
    detach_ns = nowNs();
    ++detached;
  }
  void onRequest(const daemon::ClientPtr& client, const Request& request, std::uint64_t) override {
    ++requests;
    if (hold) {
      std::lock_guard lock(mutex_);
      held_.emplace_back(client, request);
      return;
    }
    // The test chooses each request's status through its `flags` field.
    completeRequest(client, request, static_cast<std::int32_t>(request.flags));
  }
  void onRelease(const daemon::ClientPtr&, const std::uint64_t* ids, std::size_t count) override {
    std::lock_guard lock(mutex_);
    released_.insert(released_.end(), ids, ids + count);
  }
  bool busy() const override {
    std::lock_guard lock(mutex_);
    return !held_.empty();
  }

  // Completes every held request with its own `flags` as status.
  std::size_t releaseHeld() {
    std::lock_guard lock(mutex_);
    for (auto& [client, request] : held_) {
      completeRequest(client, request, static_cast<std::int32_t>(request.flags));
    }
    const std::size_t count = held_.size();
    held_.clear();
    return count;
  }
  std::size_t heldCount() const {
    std::lock_guard lock(mutex_);
    return held_.size();
  }
  std::vector<std::uint64_t> released() const {
    std::lock_guard lock(mutex_);
    return released_;
  }

  std::atomic<int> attached{0};
  std::atomic<int> detached{0};
  std::atomic<std::uint64_t> requests{0};
  std::atomic<std::uint64_t> detach_ns{0};
  std::atomic<bool> hold{false};

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<daemon::ClientPtr, Request>> held_;
  std::vector<std::uint64_t> released_;
};

class ServerThread {
 public:
  ServerThread(daemon::ServerOptions options, daemon::RequestSink& sink)
      : server_(std::move(options), sink) {
    Status status = server_.listen();
    EXPECT_TRUE(status.ok()) << status.message();
    if (status.ok()) {
      thread_ = std::thread([this] {
        server_.run();
        ended_ = true;
      });
    }
  }
  ~ServerThread() { stop(); }
  void stop() {
    server_.requestStop();
    if (thread_.joinable()) thread_.join();
  }
  // Whether run() returned of itself (Server::failure()), which may be read
  // once it has.
  bool ended() const { return ended_; }
  const std::string& failure() const { return server_.failure(); }

 private:
  daemon::Server server_;
  std::atomic<bool> ended_{false};
  std::thread thread_;
};

// This process's soft limit on open files raised to at least `needed` for
// the object's life, where the hard limit allows (ok(); a test skips where
// not).
class FileLimit {
 public:
  explicit FileLimit(rlim_t needed) {
    if (::getrlimit(RLIMIT_NOFILE, &before_) != 0) return;
    if (before_.rlim_max != RLIM_INFINITY && before_.rlim_max < needed) return;
    rlimit raised = before_;
    raised.rlim_cur = std::max<rlim_t>(raised.rlim_cur, needed);
    ok_ = ::setrlimit(RLIMIT_NOFILE, &raised) == 0;
  }
  ~FileLimit() {
    if (ok_) ::setrlimit(RLIMIT_NOFILE, &before_);
  }
  FileLimit(const FileLimit&) = delete;
  FileLimit& operator=(const FileLimit&) = delete;
  bool ok() const { return ok_; }

 private:
  rlimit before_{};
  bool ok_ = false;
};

inline daemon::ServerOptions serverOptions(const TempDir& dir) {
  daemon::ServerOptions options;
  options.socket_path = dir.socket();
  options.slots = 64;
  options.spin_ns = 200'000;
  return options;
}

// A socket listening at `path`, as a daemon's would (invalid if it could
// not be made): one that accepts and never answers, where nothing accepts.
inline UniqueFd listenAt(const std::string& path) {
  auto address = socketAddress(path);
  UniqueFd listener(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!address ||
      ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address.value()),
             sizeof(sockaddr_un)) != 0 ||
      ::listen(listener.get(), 4) != 0) {
    return UniqueFd();
  }
  return listener;
}

// A program's "key value" lines, as the test programs print what they saw.
inline std::map<std::string, std::string> keyValues(const std::string& out) {
  std::map<std::string, std::string> values;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    const auto space = line.find(' ');
    if (space != std::string::npos) values[line.substr(0, space)] = line.substr(space + 1);
  }
  return values;
}

}  // namespace stmux::testing

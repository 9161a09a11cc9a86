// What the GPU tests share: a check for a CUDA device that skips the test,
// saying why, where there is none; a running stmuxd on a private socket,
// stopped with SIGTERM (which must exit 0); and its status as JSON.
//
// Every CUDA call happens in the programs the tests start, never in the test
// process itself, so forking them is safe.
#pragma once

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <filesystem>
#include <iostream>
#include <optional>

#include "stmux/control.h"
#include "stmux/json.h"
#include "test_support.h"
#include "tools/process.h"
#include "tools/stmux_programs.h"

namespace stmux::testing {

// The daemon's status reply, as stmuxctl gets it (the tools' own).
using tools::daemonStatus;

// A number from the first GPU's entry of a status reply, or -1.
inline double gpuField(const Json& status, const char* field) {
  return jsonNumber(jsonFind(jsonAt(jsonFind(status, "gpus"), 0), field), -1);
}

class DaemonFixture : public ::testing::Test {
 protected:
  // Whether SetUp starts the daemon (a test may want to start it later).
  virtual bool startDaemonAtSetUp() const { return true; }

  void SetUp() override {
    auto probe = run({IPC_CLIENT_PATH, "probe"}, {}, dir_.path() + "/probe");
    if (probe.status == 77) GTEST_SKIP() << "GPU test skipped: " << probe.out << probe.err;
    ASSERT_EQ(probe.status, 0) << probe.out << probe.err;
    if (startDaemonAtSetUp()) startDaemon();
  }

  void TearDown() override {
    stopDaemon();
    // What the daemon said is the first thing to read when a test failed.
    if (HasFailure() && daemon_.started()) {
      const std::string log = daemon_.err();
      std::cerr << "---- stmuxd's log (last 4 KiB) ----\n"
                << log.substr(log.size() > 4096 ? log.size() - 4096 : 0) << "----\n";
    }
  }

  // The daemon's environment beyond STMUX_LOG; a test may add to it.
  virtual std::map<std::string, std::string> daemonEnv() const { return {}; }

  // Starts stmuxd as daemon_, not waiting for it.
  void spawnDaemon() {
    std::map<std::string, std::string> env = daemonEnv();
    env["STMUX_LOG"] = "info";
    daemon_ = Process({STMUXD_PATH, "--socket", dir_.socket()}, env,
                      dir_.path() + "/stmuxd" + std::to_string(++daemons_));
  }

  void startDaemon() {
    spawnDaemon();
    ASSERT_TRUE(
        waitFor([&] { return daemonStatus(dir_.socket()).has_value(); }, std::chrono::seconds(60)))
        << "stmuxd did not come up: " << daemon_.err();
  }

  // SIGTERM: finish what is in flight, exit 0.
  void stopDaemon() {
    if (!daemon_.running()) return;
    daemon_.signal(SIGTERM);
    EXPECT_EQ(daemon_.wait(std::chrono::seconds(30)), 0) << daemon_.err();
  }

  TempDir dir_;
  Process daemon_;
  int daemons_ = 0;
};

}  // namespace stmux::testing

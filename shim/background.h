// The shim's own threads (the sweeper, the stream-order watcher): started
// with every signal blocked, so that the application's handlers run on its
// own threads, and named. One that calls CUDA (`calls_cuda`) is put in the
// relaxed stream-capture mode, so that nothing it calls can break a graph
// the application captures in cudaStreamCaptureModeGlobal on another
// thread; one that does not (the watcher, which must never wait on CUDA's
// locks: docs/ARCHITECTURE.md, "Stream-ordered mode") makes no CUDA call
// at all.
#pragma once

#include <signal.h>

#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "shim/driver.h"
#include "stmux/sys.h"

namespace stmux::shim {

// Starts `body` on a detached thread. Empty when it started, else why not.
template <class Body>
std::string startBackgroundThread(const Driver& driver, const char* name, bool calls_cuda,
                                  Body body) {
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  std::string failure;
  try {
    std::thread([&driver, name, calls_cuda, body = std::move(body)]() mutable {
      nameThisThread(name);
      if (calls_cuda) {
        CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
        driver.cuThreadExchangeStreamCaptureMode(&mode);
      }
      body();
    }).detach();
  } catch (const std::system_error& error) {
    failure = error.what();
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  return failure;
}

}  // namespace stmux::shim

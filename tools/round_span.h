// Where a served call's time went, from stmuxd's status answers: over a span
// of the reader's own, from two of them (their per-GPU "round_sums": sums
// and counts since the daemon started), or over the daemon's whole run, from
// one (its "round_us" and "mean_batch", warm-up and ramp-up included).
#pragma once

#include <optional>

#include "stmux/json.h"

namespace stmux::tools {

struct DaemonRound {
  // Means in us (-1: nothing of that kind measured), as stmux-bench's
  // Point::Round names them, and the mean batch.
  double ring = -1, stream_ready = -1, batch_wait = -1, handoff = -1, launch = -1, gpu = -1,
         publish = -1, wake = -1;
  double mean_batch = 0;
};

// GPU 0's round between the `before` and `after` status answers; nullopt
// where either lacks the sums (an older daemon) or the counts went back (a
// daemon restarted between them).
inline std::optional<DaemonRound> roundOverSpan(const Json& before, const Json& after) {
  const Json* a = jsonFind(jsonAt(jsonFind(before, "gpus"), 0), "round_sums");
  const Json* b = jsonFind(jsonAt(jsonFind(after, "gpus"), 0), "round_sums");
  if (a == nullptr || b == nullptr) return std::nullopt;
  bool back = false;
  const auto delta = [&](const char* name) {
    const double d = jsonNumber(jsonFind(b, name)) - jsonNumber(jsonFind(a, name));
    back |= d < 0;
    return d;
  };
  const auto mean = [&](const char* sum, const char* count) {
    const double n = delta(count), total = delta(sum);
    return n > 0 ? total / n / 1e3 : -1.0;
  };
  DaemonRound r;
  r.ring = mean("ring_ns", "popped");
  r.stream_ready = mean("ready_ns", "readied");
  r.batch_wait = mean("wait_ns", "launched");
  r.handoff = mean("handoff_ns", "completed");
  r.launch = mean("launch_ns", "completed");
  r.gpu = mean("gpu_ns", "completed");
  r.publish = mean("publish_ns", "completed");
  r.wake = mean("wake_ns", "wakes");
  const double batches = delta("batches");
  r.mean_batch = batches > 0 ? delta("launched") / batches : 0;
  if (back) return std::nullopt;
  return r;
}

// GPU 0's round over the daemon's whole run, from one status answer.
inline DaemonRound roundOverWholeRun(const Json& status) {
  const Json* gpu = jsonAt(jsonFind(status, "gpus"), 0);
  const Json* round = jsonFind(gpu, "round_us");
  const auto mean = [&](const char* name) { return jsonNumber(jsonFind(round, name), -1); };
  DaemonRound r;
  r.ring = mean("ring");
  r.stream_ready = mean("stream_ready");
  r.batch_wait = mean("batch_wait");
  r.handoff = mean("handoff");
  r.launch = mean("launch");
  r.gpu = mean("gpu");
  r.publish = mean("publish");
  r.wake = mean("wake");
  r.mean_batch = jsonNumber(jsonFind(gpu, "mean_batch"));
  return r;
}

}  // namespace stmux::tools

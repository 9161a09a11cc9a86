// The start barrier between stmux-bench and its tenants, and the files they
// exchange. Every tenant of a row (cuBLAS client, PyTorch script, the
// ceiling's one process, a test's fake) speaks it, so that the clock starts
// for all of them at once, when all of them are running:
//
//   1. the tenant sets up (context, handle, buffers), makes a few untimed
//      calls (under the preload they attach it to stmuxd), then creates its
//      ready file;
//   2. it goes on with untimed steps, looking for the go file, which the bench
//      writes once every tenant of the row is ready: "start_ns stop_ns"
//      (CLOCK_REALTIME);
//   3. it counts every step that ends in [start, stop) (the one that crosses
//      start included) and stops at the first step that ends at or after
//      stop, which shows it ran through the span; it times every step that
//      overlaps the span, those that cross its edges included, so that a
//      step stalled across an edge shows in the tail;
//   4. it writes its result file: "calls gemms_per_step last_end_ns", then one
//      latency in nanoseconds per line: the counted steps', then the one
//      that crossed stop.
//
// Files are written to a temporary name and renamed, so the other side never
// reads half of one. Plain C++ with no CUDA: tests use it with fake tenants.
#pragma once

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace stmux::tools {

inline std::uint64_t realtimeNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ull + ts.tv_nsec;
}

// Writes `text` to `path` so that a reader sees all of it or no file at all.
inline bool writeAtomically(const std::string& path, const std::string& text) {
  const std::string temporary = path + ".tmp";
  FILE* out = std::fopen(temporary.c_str(), "w");
  if (out == nullptr) return false;
  const bool written = std::fwrite(text.data(), 1, text.size(), out) == text.size();
  if (std::fclose(out) != 0 || !written) return false;
  return std::rename(temporary.c_str(), path.c_str()) == 0;
}

// The timed span, [start_ns, stop_ns) on CLOCK_REALTIME.
struct Span {
  std::uint64_t start_ns = 0;
  std::uint64_t stop_ns = 0;
  double seconds() const { return static_cast<double>(stop_ns - start_ns) / 1e9; }
};

inline std::optional<Span> readGo(const std::string& path) {
  std::ifstream in(path);
  Span span;
  if (!(in >> span.start_ns >> span.stop_ns) || span.stop_ns <= span.start_ns) return std::nullopt;
  return span;
}

inline bool writeGo(const std::string& path, const Span& span) {
  return writeAtomically(path,
                         std::to_string(span.start_ns) + " " + std::to_string(span.stop_ns) + "\n");
}

// What one tenant measured.
struct TenantResult {
  std::uint64_t calls = 0;        // steps that ended inside the span
  int gemms_per_step = 1;         // GEMMs one step makes
  std::uint64_t last_end_ns = 0;  // when its last step ended: at or after stop
  // One per step that overlapped the span: the `calls` counted, in order,
  // then (from a tenant that ran through) the one that crossed stop.
  std::vector<std::uint32_t> latencies_ns;
};

inline bool writeResult(const std::string& path, const TenantResult& result) {
  std::string text = std::to_string(result.calls) + " " + std::to_string(result.gemms_per_step) +
                     " " + std::to_string(result.last_end_ns) + "\n";
  text.reserve(text.size() + 9 * result.latencies_ns.size());
  for (std::uint32_t latency : result.latencies_ns)
    text += std::to_string(latency) + "\n";
  return writeAtomically(path, text);
}

inline std::optional<TenantResult> readResult(const std::string& path) {
  std::ifstream in(path);
  TenantResult result;
  if (!(in >> result.calls >> result.gemms_per_step >> result.last_end_ns) ||
      result.gemms_per_step < 1) {
    return std::nullopt;
  }
  result.latencies_ns.reserve(result.calls + 1);
  for (std::uint32_t value; result.latencies_ns.size() <= result.calls && in >> value;)
    result.latencies_ns.push_back(value);
  if (result.latencies_ns.size() < result.calls) return std::nullopt;
  return result;
}

// The tenant's side. Exit statuses of a tenant, beside 0 (done) and its own.
inline constexpr int kExitNoGo = 4;  // the go file did not come in time

struct TenantFiles {
  std::string ready, go, out;
  double wait_s = 600;  // longest wait for the go file after ready
};

// Runs the protocol around `step`, a callable that makes one step (one
// GEMM, or one batched launch, or one model step) and waits for it; it
// returns false on failure, which ends the tenant with status 1.
template <class Step>
int runBarrierLoop(const TenantFiles& files, int gemms_per_step, int warmup_steps, Step&& step) {
  for (int i = 0; i < warmup_steps; ++i) {
    if (!step()) return 1;
  }
  if (!writeAtomically(files.ready, std::to_string(::getpid()) + "\n")) {
    std::fprintf(stderr, "cannot write %s\n", files.ready.c_str());
    return 1;
  }
  const std::uint64_t give_up = realtimeNs() + static_cast<std::uint64_t>(files.wait_s * 1e9);
  std::optional<Span> span;
  std::uint64_t next_look = 0;
  while (!span) {
    if (!step()) return 1;
    const std::uint64_t now = realtimeNs();
    if (now < next_look) continue;
    next_look = now + 1'000'000;  // look for the go file once a millisecond
    if (::access(files.go.c_str(), F_OK) == 0) span = readGo(files.go);
    if (!span && now > give_up) {
      std::fprintf(stderr, "no go file %s within %.0f s of being ready\n", files.go.c_str(),
                   files.wait_s);
      return kExitNoGo;
    }
  }
  TenantResult result;
  result.gemms_per_step = gemms_per_step;
  result.latencies_ns.reserve(1 << 20);
  while (true) {
    timespec begin, end;
    clock_gettime(CLOCK_MONOTONIC, &begin);
    if (!step()) return 1;
    clock_gettime(CLOCK_MONOTONIC, &end);
    const std::uint64_t ended = realtimeNs();
    if (ended < span->start_ns) continue;  // before the span
    const std::int64_t took =
        (end.tv_sec - begin.tv_sec) * 1'000'000'000ll + (end.tv_nsec - begin.tv_nsec);
    result.latencies_ns.push_back(
        static_cast<std::uint32_t>(std::clamp<std::int64_t>(took, 0, UINT32_MAX)));
    if (ended >= span->stop_ns) {
      result.last_end_ns = ended;
      break;
    }
    ++result.calls;
  }
  if (!writeResult(files.out, result)) {
    std::fprintf(stderr, "cannot write %s\n", files.out.c_str());
    return 1;
  }
  return 0;
}

}  // namespace stmux::tools

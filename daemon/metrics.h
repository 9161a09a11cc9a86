// stmuxd's metrics in the Prometheus text exposition format (version 0.0.4),
// for node-exporter's textfile collector: the server and the scheduler each
// add their families to a MetricsText once a second, and a MetricsFile
// writes the result, atomically, from a thread of its own so that the
// server's thread never waits on the disk. No CUDA here.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "stmux/status.h"

namespace stmux::daemon {

using Labels = std::vector<std::pair<std::string_view, std::string>>;

class MetricsText {
 public:
  // Starts a family: its HELP and TYPE lines ("counter", "gauge",
  // "histogram"). Samples of one family must follow it, before the next.
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const Labels& labels, double value);
  // A histogram's buckets from per-bucket counts (not cumulative), the last
  // being +Inf: `counts` has one more element than `bounds`.
  void histogram(std::string_view name, const Labels& labels, const double* bounds,
                 const std::uint64_t* counts, std::size_t bound_count, double sum);
  const std::string& str() const { return text_; }

 private:
  void labels(const Labels& labels, std::string_view extra_name = {},
              std::string_view extra_value = {});
  std::string text_;
};

// Writes each text it is given to `path`, through a temporary file in the same
// directory and a rename, so that a reader never sees half of one. Failures
// are logged once a minute at most.
class MetricsFile {
 public:
  explicit MetricsFile(std::string path);
  ~MetricsFile();
  MetricsFile(const MetricsFile&) = delete;
  MetricsFile& operator=(const MetricsFile&) = delete;

  // Hands a text over; a newer one replaces one not yet written.
  void publish(std::string text);

  // Whether the file can be written as the writer does (its temporary
  // beside it, then a rename): checked at start, so that a path too long or
  // a folder missing or read-only is an error then, not a warning a minute.
  static Status check(const std::string& path);

 private:
  void run();

  std::string path_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::string next_;
  bool have_next_ = false;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace stmux::daemon

#include "daemon/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include "stmux/log.h"
#include "stmux/sys.h"

namespace stmux::daemon {
namespace {

// The length of the UTF-8 sequence `text` starts with, or 0 where it is not
// one (a stray or missing continuation byte, an overlong form, a surrogate,
// past U+10FFFF).
std::size_t utf8Length(std::string_view text) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) return 1;
  const std::size_t length = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc2 ? 2 : 0;
  if (length == 0 || lead > 0xf4 || text.size() < length) return 0;
  for (std::size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xc0) != 0x80) return 0;
  }
  if (lead == 0xe0 && byte(1) < 0xa0) return 0;   // overlong
  if (lead == 0xed && byte(1) >= 0xa0) return 0;  // a surrogate
  if (lead == 0xf0 && byte(1) < 0x90) return 0;   // overlong
  if (lead == 0xf4 && byte(1) >= 0x90) return 0;  // past U+10FFFF
  return length;
}

// Label values are any text (a tenant names its own program, cut to a field's
// size, perhaps inside a character): the format's three escapes keep them on
// one line, and a byte that is not UTF-8 becomes U+FFFD, as Prometheus
// refuses a file with one.
void appendEscaped(std::string& out, std::string_view value) {
  for (std::size_t i = 0; i < value.size();) {
    const char c = value[i];
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else if (const std::size_t length = utf8Length(value.substr(i)); length == 0) {
      out += "\xEF\xBF\xBD";
    } else {
      out.append(value, i, length);
      i += length;
      continue;
    }
    ++i;
  }
}

void appendNumber(std::string& out, double value) {
  if (std::isnan(value)) {
    out += "NaN";
  } else if (std::isinf(value)) {
    out += value > 0 ? "+Inf" : "-Inf";
  } else {
    out += fmt::format("{}", value);
  }
}

}  // namespace

void MetricsText::family(std::string_view name, std::string_view type, std::string_view help) {
  text_ += fmt::format("# HELP {} ", name);
  // HELP text escapes backslash and newline.
  for (const char c : help) {
    if (c == '\\') {
      text_ += "\\\\";
    } else if (c == '\n') {
      text_ += "\\n";
    } else {
      text_ += c;
    }
  }
  text_ += fmt::format("\n# TYPE {} {}\n", name, type);
}

void MetricsText::labels(const Labels& labels, std::string_view extra_name,
                         std::string_view extra_value) {
  if (labels.empty() && extra_name.empty()) return;
  text_ += '{';
  bool first = true;
  for (const auto& [name, value] : labels) {
    text_ += first ? "" : ",";
    first = false;
    text_ += name;
    text_ += "=\"";
    appendEscaped(text_, value);
    text_ += '"';
  }
  if (!extra_name.empty()) {
    text_ += first ? "" : ",";
    text_ += fmt::format("{}=\"{}\"", extra_name, extra_value);
  }
  text_ += '}';
}

void MetricsText::sample(std::string_view name, const Labels& labels, double value) {
  text_ += name;
  this->labels(labels);
  text_ += ' ';
  appendNumber(text_, value);
  text_ += '\n';
}

void MetricsText::histogram(std::string_view name, const Labels& labels, const double* bounds,
                            const std::uint64_t* counts, std::size_t bound_count, double sum) {
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i <= bound_count; ++i) {
    cumulative += counts[i];
    text_ += fmt::format("{}_bucket", name);
    this->labels(labels, "le", i < bound_count ? fmt::format("{}", bounds[i]) : "+Inf");
    text_ += fmt::format(" {}\n", cumulative);
  }
  text_ += fmt::format("{}_sum", name);
  this->labels(labels);
  text_ += ' ';
  appendNumber(text_, sum);
  text_ += fmt::format("\n{}_count", name);
  this->labels(labels);
  text_ += fmt::format(" {}\n", cumulative);
}

MetricsFile::MetricsFile(std::string path) : path_(std::move(path)), thread_([this] { run(); }) {}

MetricsFile::~MetricsFile() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void MetricsFile::publish(std::string text) {
  {
    std::lock_guard lock(mutex_);
    next_ = std::move(text);
    have_next_ = true;
  }
  wake_.notify_one();
}

namespace {
std::string temporaryOf(const std::string& path) {
  return path + ".tmp";
}
}  // namespace

Status MetricsFile::check(const std::string& path) {
  const std::string temporary = temporaryOf(path);
  UniqueFd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid()) {
    return Status::error(
        fmt::format("cannot create {} (the file is written there, then renamed "
                    "to {}): {}",
                    temporary, path, std::strerror(errno)));
  }
  ::unlink(temporary.c_str());
  return Status::okStatus();
}

void MetricsFile::run() {
  nameThisThread("stmux-metrics");
  LogLimiter failures(60'000'000'000ull);
  const std::string temporary = temporaryOf(path_);
  while (true) {
    std::string text;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [this] { return stop_ || have_next_; });
      if (!have_next_) return;  // stopping, nothing left to write
      text.swap(next_);
      have_next_ = false;
    }
    std::string error;
    UniqueFd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd.valid()) error = fmt::format("cannot create {}: {}", temporary, std::strerror(errno));
    for (std::size_t done = 0; error.empty() && done < text.size();) {
      const ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) error = fmt::format("cannot write {}: {}", temporary, std::strerror(errno));
      done += n > 0 ? static_cast<std::size_t>(n) : 0;
    }
    fd.reset();
    if (error.empty() && ::rename(temporary.c_str(), path_.c_str()) != 0) {
      error = fmt::format("cannot rename {} to {}: {}", temporary, path_, std::strerror(errno));
    }
    if (!error.empty()) {
      if (std::uint64_t held = 0; failures.allow(nowNs(), held)) {
        STMUX_WARN(kDaemon, "metrics: {} ({} more failures not logged)", error, held);
      }
    }
  }
}

}  // namespace stmux::daemon

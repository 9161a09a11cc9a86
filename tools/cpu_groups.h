// stmux-bench --tenant-cpu-quota: each tenant in a cgroup of its own with a
// CPU quota, as a Kubernetes pod with `limits.cpu` runs (its affinity still
// names every core), and how long the quota held each one back. The groups
// are made in a cpu hierarchy (v2 where its cpu controller is there, else
// v1's), which takes root, and removed once their processes are. A thread
// that spins in a wait spends the quota as if it worked, and once the quota
// is spent the kernel stops the whole process until the next period. The
// groups share one parent (stmux-bench-PID), as pods share kubepods: under
// contention the kernel weighs the tenants together, as one group, against
// the other groups at the top of the hierarchy (stmuxd's among them).
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "tools/proc_cpu.h"

namespace stmux::tools {

namespace detail {

// A hierarchy that can hold a CPU quota, as mounted: where, and whether it
// is v2.
struct CgroupMount {
  std::string dir;
  bool v2 = false;
};

// mountinfo escapes a space, tab, newline and backslash as \ and three
// octal digits.
inline std::string unescapeMountField(std::string_view field) {
  std::string out;
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() &&
        field.substr(i + 1, 3).find_first_not_of("01234567") == std::string_view::npos) {
      out.push_back(static_cast<char>((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 +
                                      (field[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(field[i]);
    }
  }
  return out;
}

// From the text of /proc/self/mountinfo ("ID PARENT MAJ:MIN ROOT MOUNTPOINT
// OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS"): every cgroup2 mount,
// and every v1 cgroup mount with the cpu controller.
inline std::vector<CgroupMount> cpuCgroupMounts(std::string_view mountinfo) {
  std::vector<CgroupMount> mounts;
  std::istringstream lines{std::string(mountinfo)};
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::vector<std::string> fields;
    for (std::string word; words >> word;)
      fields.push_back(word);
    const auto dash = std::find(fields.begin(), fields.end(), "-");
    if (fields.size() < 6 || dash == fields.end() || fields.end() - dash < 4) continue;
    const std::string& type = dash[1];
    const std::string& options = dash[3];
    bool v1_cpu = false;
    if (type == "cgroup") {
      std::istringstream each(options);
      for (std::string option; std::getline(each, option, ',');)
        v1_cpu = v1_cpu || option == "cpu";
    }
    if (type != "cgroup2" && !v1_cpu) continue;
    mounts.push_back({unescapeMountField(fields[4]), type == "cgroup2"});
  }
  return mounts;
}

}  // namespace detail

class CpuQuotaGroups {
 public:
  CpuQuotaGroups() = default;
  CpuQuotaGroups(const CpuQuotaGroups&) = delete;
  CpuQuotaGroups& operator=(const CpuQuotaGroups&) = delete;
  ~CpuQuotaGroups() {
    for (auto it = groups_.rbegin(); it != groups_.rend(); ++it)
      ::rmdir(it->c_str());
    if (!parent_.empty()) ::rmdir(parent_.c_str());
  }

  // Makes `count` groups, each limited to `cores`; false with `why` where it
  // cannot (no writable cpu hierarchy: not root, or no cgroups here).
  bool make(int count, double cores, std::string& why) {
    std::optional<detail::CgroupMount> chosen;
    for (const detail::CgroupMount& mount :
         detail::cpuCgroupMounts(readText("/proc/self/mountinfo"))) {
      const bool usable = !mount.v2 || hasWord(readText(mount.dir + "/cgroup.controllers"), "cpu");
      if (usable && (!chosen || mount.v2)) chosen = mount;
    }
    if (!chosen) {
      why = "no cgroup hierarchy with the cpu controller is mounted";
      return false;
    }
    v2_ = chosen->v2;
    parent_ = chosen->dir + "/stmux-bench-" + std::to_string(::getpid());
    if (v2_ && !writeFile(chosen->dir + "/cgroup.subtree_control", "+cpu", why)) return false;
    if (::mkdir(parent_.c_str(), 0755) != 0 && errno != EEXIST) {
      why = "cannot make " + parent_ + ": " + std::strerror(errno) + " (it takes root)";
      parent_.clear();
      return false;
    }
    if (v2_ && !writeFile(parent_ + "/cgroup.subtree_control", "+cpu", why)) return false;
    const long period_us = 100'000;
    const long quota_us = std::lround(cores * static_cast<double>(period_us));
    for (int i = 0; i < count; ++i) {
      const std::string group = parent_ + "/tenant" + std::to_string(i);
      if (::mkdir(group.c_str(), 0755) != 0 && errno != EEXIST) {
        why = "cannot make " + group + ": " + std::strerror(errno);
        return false;
      }
      groups_.push_back(group);
      const bool limited =
          v2_ ? writeFile(group + "/cpu.max",
                          std::to_string(quota_us) + " " + std::to_string(period_us), why)
              : writeFile(group + "/cpu.cfs_period_us", std::to_string(period_us), why) &&
                    writeFile(group + "/cpu.cfs_quota_us", std::to_string(quota_us), why);
      if (!limited) return false;
    }
    return true;
  }

  // `argv` started in group `i`: a shell that moves itself there, then
  // becomes the program, so that the program's first instruction already
  // runs under the quota (the same pid throughout).
  std::vector<std::string> startingIn(int i, const std::vector<std::string>& argv) const {
    std::vector<std::string> wrapped = {"/bin/sh", "-c", "echo $$ >\"$0\" && exec \"$@\"",
                                        groups_.at(i) + "/cgroup.procs"};
    wrapped.insert(wrapped.end(), argv.begin(), argv.end());
    return wrapped;
  }

  // How long group `i`'s processes have been held back by the quota so far,
  // in seconds (cpu.stat: v2's throttled_usec, v1's throttled_time in ns).
  std::optional<double> throttledSeconds(int i) const {
    std::istringstream lines(readText(groups_.at(i) + "/cpu.stat"));
    const std::string wanted = v2_ ? "throttled_usec" : "throttled_time";
    for (std::string name, value; lines >> name >> value;) {
      if (name != wanted) continue;
      char* end = nullptr;
      const double number = std::strtod(value.c_str(), &end);
      if (end == value.c_str() || *end != '\0') return std::nullopt;
      return number / (v2_ ? 1e6 : 1e9);
    }
    return std::nullopt;
  }

  int size() const { return static_cast<int>(groups_.size()); }

 private:
  static bool hasWord(const std::string& text, const std::string& word) {
    std::istringstream words(text);
    for (std::string each; words >> each;)
      if (each == word) return true;
    return false;
  }
  static bool writeFile(const std::string& path, const std::string& text, std::string& why) {
    std::ofstream out(path);
    out << text;
    out.flush();
    if (!out) {
      why = "cannot write '" + text + "' to " + path + ": " + std::strerror(errno);
      return false;
    }
    return true;
  }

  bool v2_ = false;
  std::string parent_;
  std::vector<std::string> groups_;
};

}  // namespace stmux::tools

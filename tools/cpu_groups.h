// stmux-bench --tenant-cpu-quota: each tenant in a cgroup of its own with a
// CPU quota, as a Kubernetes pod with `limits.cpu` runs (its affinity still
// names every core), and how long the quota held each one back. The groups
// are made in the process's cpu hierarchy (v2 where its cpu controller is
// there, else v1's), which takes root, and removed once their processes are.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "stmux/cpu_quota.h"

namespace stmux::tools {

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
    const auto mountinfo = detail::readSmallFile("/proc/self/mountinfo");
    std::optional<detail::CgroupMount> chosen;
    for (const detail::CgroupMount& mount : detail::cpuCgroupMounts(mountinfo.value_or(""))) {
      const auto controllers = detail::readSmallFile(mount.dir + "/cgroup.controllers");
      const bool usable = !mount.v2 || (controllers && hasWord(*controllers, "cpu"));
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

  // Moves process `pid` (all its threads) into group `i`.
  bool place(int i, pid_t pid, std::string& why) const {
    return writeFile(groups_.at(i) + "/cgroup.procs", std::to_string(pid), why);
  }

  // How long group `i`'s processes have been held back by the quota so far,
  // in seconds (cpu.stat: v2's throttled_usec, v1's throttled_time in ns).
  std::optional<double> throttledSeconds(int i) const {
    const auto stat = detail::readSmallFile(groups_.at(i) + "/cpu.stat");
    if (!stat) return std::nullopt;
    std::istringstream lines(*stat);
    const std::string wanted = v2_ ? "throttled_usec" : "throttled_time";
    for (std::string name, value; lines >> name >> value;) {
      if (name != wanted) continue;
      const auto number = detail::wholeNumber(value);
      if (!number) return std::nullopt;
      return static_cast<double>(*number) / (v2_ ? 1e6 : 1e9);
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

// A process's CPU quota, from its cgroups: cgroup v2's cpu.max and v1's
// cpu.cfs_quota_us over cpu.cfs_period_us, the tightest of the process's own
// cgroup and its ancestors up to the mount. A Kubernetes pod with
// `limits.cpu` runs under such a quota while its affinity still names every
// core, so counting the cores it may run on does not see it; a thread that
// spins in a wait spends the quota, and once it is spent the kernel stops
// the whole process until the next period (100 ms by default).
//
// Pure parsing over the texts of /proc/self/cgroup and /proc/self/mountinfo,
// and a reader that takes a prefix for the files, so that tests can build a
// tree of their own.
#pragma once

#include <algorithm>
#include <charconv>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace stmux {

namespace detail {

inline std::optional<long long> wholeNumber(std::string_view text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' '))
    text.remove_suffix(1);
  long long value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

// cgroup v2's cpu.max, "QUOTA PERIOD" in microseconds or "max PERIOD": the
// quota in cores, nullopt where there is none (or the text is not of that
// form).
inline std::optional<double> quotaCoresV2(std::string_view cpu_max) {
  const std::size_t space = cpu_max.find(' ');
  if (space == std::string_view::npos) return std::nullopt;
  const auto quota = wholeNumber(cpu_max.substr(0, space));
  const auto period = wholeNumber(cpu_max.substr(space + 1));
  if (!quota || !period || *quota <= 0 || *period <= 0) return std::nullopt;
  return static_cast<double>(*quota) / static_cast<double>(*period);
}

// cgroup v1's cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us.
inline std::optional<double> quotaCoresV1(std::string_view quota_us, std::string_view period_us) {
  const auto quota = wholeNumber(quota_us);
  const auto period = wholeNumber(period_us);
  if (!quota || !period || *quota <= 0 || *period <= 0) return std::nullopt;
  return static_cast<double>(*quota) / static_cast<double>(*period);
}

// A hierarchy that can hold a CPU quota, as mounted: where (`dir`), which
// of its cgroups is at that place (`root`), and whether it is v2.
struct CgroupMount {
  std::string dir;
  std::string root;
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
    mounts.push_back(
        {unescapeMountField(fields[4]), unescapeMountField(fields[3]), type == "cgroup2"});
  }
  return mounts;
}

// The process's cgroup in that hierarchy, from the text of /proc/self/cgroup
// ("ID:CONTROLLERS:PATH"; v2's line is "0::PATH").
inline std::optional<std::string> cgroupPathOf(std::string_view proc_cgroup, bool v2) {
  std::istringstream lines{std::string(proc_cgroup)};
  for (std::string line; std::getline(lines, line);) {
    const std::size_t first = line.find(':');
    const std::size_t second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    bool match = v2 && line.substr(0, first) == "0" && controllers.empty();
    if (!v2) {
      std::istringstream each(controllers);
      for (std::string controller; std::getline(each, controller, ',');)
        match = match || controller == "cpu";
    }
    if (match) return line.substr(second + 1);
  }
  return std::nullopt;
}

inline std::optional<std::string> readSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace detail

// The tightest CPU quota over the process's cgroups and their ancestors, in
// cores, or nullopt where none is set or none can be read. `prefix` goes
// before every mount's directory (tests); a cgroup that is not below its
// mount's root (another cgroup namespace's path) is read at the mount itself.
inline std::optional<double> cpuQuotaCores(std::string_view proc_cgroup, std::string_view mountinfo,
                                           const std::string& prefix = "") {
  std::optional<double> tightest;
  for (const detail::CgroupMount& mount : detail::cpuCgroupMounts(mountinfo)) {
    const std::optional<std::string> path = detail::cgroupPathOf(proc_cgroup, mount.v2);
    if (!path) continue;
    std::string below;
    const std::string root = mount.root == "/" ? "" : mount.root;
    if (path->compare(0, root.size(), root) == 0 &&
        (path->size() == root.size() || (*path)[root.size()] == '/')) {
      below = path->substr(root.size());
    }
    // From the process's cgroup up to the mount's, each level's limit.
    for (std::string level = below;; level = level.substr(0, level.rfind('/'))) {
      const std::string dir = prefix + mount.dir + level;
      std::optional<double> cores;
      if (mount.v2) {
        if (const auto max = detail::readSmallFile(dir + "/cpu.max")) {
          cores = detail::quotaCoresV2(*max);
        }
      } else {
        const auto quota = detail::readSmallFile(dir + "/cpu.cfs_quota_us");
        const auto period = detail::readSmallFile(dir + "/cpu.cfs_period_us");
        if (quota && period) cores = detail::quotaCoresV1(*quota, *period);
      }
      if (cores && (!tightest || *cores < *tightest)) tightest = cores;
      if (level.empty() || level == "/") break;
    }
  }
  return tightest;
}

// This process's.
inline std::optional<double> cpuQuotaCores() {
  const auto cgroup = detail::readSmallFile("/proc/self/cgroup");
  const auto mountinfo = detail::readSmallFile("/proc/self/mountinfo");
  if (!cgroup || !mountinfo) return std::nullopt;
  return cpuQuotaCores(*cgroup, *mountinfo);
}

}  // namespace stmux

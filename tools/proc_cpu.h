// What a process has cost the CPU so far, from /proc: its threads' user and
// system time, and their context switches, voluntary (a wait, a sleep, a
// futex) and involuntary (the scheduler took the core away: with more busy
// threads than cores, each one is a lost slice). stmux-bench samples tenants
// and the serving processes (stmuxd, MPS) at both ends of the timed span.
#pragma once

#include <dirent.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

namespace stmux::tools {

struct CpuSample {
  double cpu_s = 0;
  std::uint64_t voluntary = 0;
  std::uint64_t involuntary = 0;

  CpuSample& operator+=(const CpuSample& other) {
    cpu_s += other.cpu_s;
    voluntary += other.voluntary;
    involuntary += other.involuntary;
    return *this;
  }
  // What happened between `earlier` and this sample (0 where a thread that
  // was counted then has exited since).
  CpuSample since(const CpuSample& earlier) const {
    CpuSample d;
    d.cpu_s = cpu_s > earlier.cpu_s ? cpu_s - earlier.cpu_s : 0;
    d.voluntary = voluntary > earlier.voluntary ? voluntary - earlier.voluntary : 0;
    d.involuntary = involuntary > earlier.involuntary ? involuntary - earlier.involuntary : 0;
    return d;
  }
};

// utime + stime of the whole process, in seconds, from the text of
// /proc/PID/stat (the name in parentheses may hold spaces and parentheses).
inline std::optional<double> statCpuSeconds(const std::string& stat) {
  const std::size_t close = stat.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream fields(stat.substr(close + 1));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  // Fields 3 (state) to 13, then utime (14) and stime (15).
  for (int i = 3; i <= 13; ++i) {
    if (!(fields >> field)) return std::nullopt;
  }
  if (!(fields >> utime >> stime)) return std::nullopt;
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// voluntary_ctxt_switches and nonvoluntary_ctxt_switches from the text of a
// thread's /proc/PID/task/TID/status, added to `sample`.
inline bool addSwitches(const std::string& status, CpuSample& sample) {
  std::istringstream lines(status);
  bool voluntary = false, involuntary = false;
  for (std::string line; std::getline(lines, line);) {
    std::uint64_t value = 0;
    if (std::sscanf(line.c_str(), "voluntary_ctxt_switches: %" SCNu64, &value) == 1) {
      sample.voluntary += value;
      voluntary = true;
    } else if (std::sscanf(line.c_str(), "nonvoluntary_ctxt_switches: %" SCNu64, &value) == 1) {
      sample.involuntary += value;
      involuntary = true;
    }
  }
  return voluntary && involuntary;
}

inline std::string readText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The process `pid` now, all its threads; nullopt once it has gone.
inline std::optional<CpuSample> sampleCpu(long pid) {
  const std::string dir = "/proc/" + std::to_string(pid);
  const std::optional<double> cpu = statCpuSeconds(readText(dir + "/stat"));
  if (!cpu) return std::nullopt;
  CpuSample sample;
  sample.cpu_s = *cpu;
  DIR* tasks = ::opendir((dir + "/task").c_str());
  if (tasks == nullptr) return std::nullopt;
  while (const dirent* entry = ::readdir(tasks)) {
    if (entry->d_name[0] == '.') continue;
    addSwitches(readText(dir + "/task/" + entry->d_name + "/status"), sample);
  }
  ::closedir(tasks);
  return sample;
}

}  // namespace stmux::tools

// Running programs (stmuxd, the clients) from the tests and from stmux-bench:
// spawned with an environment of the caller's choosing, output captured in
// files, every wait bounded.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace stmux {

// A started program; its stdout and stderr go to files under `log_prefix`.
class Process {
 public:
  Process() = default;
  Process(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
          const std::string& log_prefix)
      : out_path_(log_prefix + ".out"), err_path_(log_prefix + ".err") {
    std::vector<std::string> environment;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry(*e);
      if (env.count(entry.substr(0, entry.find('='))) == 0) environment.push_back(entry);
    }
    for (const auto& [name, value] : env) {
      if (!value.empty() || name != "LD_PRELOAD") environment.push_back(name + "=" + value);
    }
    std::vector<char*> args, envp;
    for (const std::string& a : argv)
      args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    for (const std::string& e : environment)
      envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&actions, 2, err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    // A bare program name ("python3") is looked up in PATH.
    if (const int error = posix_spawnp(&pid_, args[0], &actions, nullptr, args.data(), envp.data());
        error != 0) {
      pid_ = -1;
      spawn_error_ = argv.empty() ? "no program" : argv[0] + ": " + std::strerror(error);
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  Process(Process&& other) noexcept { *this = std::move(other); }
  Process& operator=(Process&& other) noexcept {
    std::swap(pid_, other.pid_);
    std::swap(status_, other.status_);
    std::swap(out_path_, other.out_path_);
    std::swap(err_path_, other.err_path_);
    std::swap(spawn_error_, other.spawn_error_);
    return *this;
  }
  ~Process() {
    if (running()) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  bool started() const { return pid_ > 0; }
  // Why it could not be started, where it could not.
  const std::string& spawnError() const { return spawn_error_; }
  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0 && status_ < 0; }

  // The exit code (128 + signal for a signal), or -1 if it is still running
  // after `timeout`.
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(300)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (running()) {
      int raw = 0;
      const pid_t done = ::waitpid(pid_, &raw, WNOHANG);
      if (done == pid_) {
        status_ = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return status_;
  }
  void signal(int sig) const {
    if (running()) ::kill(pid_, sig);
  }

  std::string out() const { return slurp(out_path_); }
  std::string err() const { return slurp(err_path_); }

  // What a process that should have ended is doing: each thread's name,
  // state and kernel wait channel (/proc), then, where cuda-gdb or gdb is
  // installed, every thread's stack. For a test's failure message.
  std::string stuckReport() const {
    if (!running()) return "(not running)\n";
    const std::string proc = "/proc/" + std::to_string(pid_) + "/task";
    std::string text = "threads of pid " + std::to_string(pid_) + " (tid name state wchan):\n";
    std::error_code error;
    for (const auto& task : std::filesystem::directory_iterator(proc, error)) {
      const std::string dir = task.path().string();
      std::string name = slurp(dir + "/comm"), stat = slurp(dir + "/stat");
      if (!name.empty() && name.back() == '\n') name.pop_back();
      const std::size_t close = stat.rfind(')');
      const std::string state =
          close != std::string::npos && close + 2 < stat.size() ? stat.substr(close + 2, 1) : "?";
      text += "  " + task.path().filename().string() + " " + name + " " + state + " " +
              slurp(dir + "/wchan") + "\n";
    }
    for (const char* debugger :
         {"/usr/local/cuda/bin/cuda-gdb", "/usr/bin/cuda-gdb", "/usr/bin/gdb"}) {
      if (::access(debugger, X_OK) != 0) continue;
      Process gdb({debugger, "-p", std::to_string(pid_), "-batch", "-ex", "thread apply all bt 30"},
                  {}, out_path_ + ".stacks");
      gdb.wait(std::chrono::seconds(120));
      const std::string stacks = gdb.out();
      text += "stacks (" + std::string(debugger) + "):\n" +
              stacks.substr(0, std::min<std::size_t>(stacks.size(), 60'000));
      break;
    }
    return text;
  }

 private:
  static std::string slurp(const std::string& path) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }
  pid_t pid_ = -1;
  int status_ = -1;
  std::string out_path_, err_path_;
  std::string spawn_error_;
};

// Runs a program to completion.
struct Ran {
  int status;
  std::string out, err;
};
inline Ran run(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
               const std::string& log_prefix,
               std::chrono::milliseconds timeout = std::chrono::seconds(300)) {
  Process process(argv, env, log_prefix);
  if (!process.started()) return {127, "", process.spawnError()};  // as a shell says it
  const int status = process.wait(timeout);
  return {status, process.out(), process.err()};
}

inline int countOf(const std::string& text, const std::string& needle) {
  int count = 0;
  for (std::size_t at = text.find(needle); at != std::string::npos;
       at = text.find(needle, at + needle.size())) {
    ++count;
  }
  return count;
}

}  // namespace stmux

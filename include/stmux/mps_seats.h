// Places on MPS. An MPS server admits a fixed number of client processes (48
// per GPU on CUDA 13.0, measured on an H100), stmuxd among them, and the next
// process cannot make a CUDA context at all (cudaErrorDevicesUnavailable),
// with or without stmux. So stmuxd keeps one lock file per place left for
// tenants, in a directory beside its socket, and a tenant's shim takes one
// (flock) when its CUDA driver starts and asks where MPS's pipes are
// (shim/mps_steer.cc). The lock is the kernel's: it ends with the process,
// however the process ends, and nobody has to count. A tenant that finds
// no free place is told a pipe directory without an MPS control daemon in it
// (the places' own), so its driver runs it without MPS, time-sliced with the
// MPS server, and its GEMMs are still served (docs/ARCHITECTURE.md, "Places
// on MPS").
//
// The places count only processes that take one: a CUDA process without the
// preload takes MPS's place unseen (STMUX_MPS_CLIENTS can leave room for
// such).
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "stmux/status.h"
#include "stmux/sys.h"

namespace stmux {

// Where MPS's clients look for its control daemon when
// CUDA_MPS_PIPE_DIRECTORY is not set.
inline constexpr std::string_view kMpsDefaultPipeDirectory = "/tmp/nvidia-mps";
// The directory's file naming the pipe directory its places are for.
inline constexpr std::string_view kMpsSeatsPipeFile = "pipe";
inline constexpr std::string_view kMpsSeatPrefix = "seat-";

// The places of the daemon listening at `socket_path`.
inline std::string mpsSeatsDirectory(std::string_view socket_path) {
  return std::string(socket_path) + ".mps-seats";
}

// The pipe directory MPS's clients use, given CUDA_MPS_PIPE_DIRECTORY's value
// (null: unset).
inline std::string_view mpsPipeDirectory(const char* given) {
  return given != nullptr ? std::string_view(given) : kMpsDefaultPipeDirectory;
}

namespace detail {
inline std::string withoutTrailingSlashes(std::string_view path) {
  while (path.size() > 1 && path.back() == '/')
    path.remove_suffix(1);
  return std::string(path);
}
// The file of place `index`.
inline std::string seatName(long index) {
  return fmt::format("{}{}", kMpsSeatPrefix, index);
}
// seat-N's N, or -1 for any other name.
inline long seatIndex(std::string_view name) {
  if (name.substr(0, kMpsSeatPrefix.size()) != kMpsSeatPrefix) return -1;
  name.remove_prefix(kMpsSeatPrefix.size());
  long index = -1;
  auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), index);
  return ec == std::errc() && end == name.data() + name.size() && !name.empty() ? index : -1;
}
}  // namespace detail

// stmuxd: makes `directory` hold exactly `seats` places (seat-0 ..), for the
// MPS whose pipes are in `pipe_directory`, readable by the daemon's group (the
// tenants') within the umask. Places already there stay as they are, so that
// a tenant holding one keeps it across a daemon's restart; those beyond
// `seats` go.
inline Status prepareMpsSeats(const std::string& directory, long seats,
                              std::string_view pipe_directory) {
  const mode_t umask_before = ::umask(0);
  ::umask(umask_before | 0027);
  const int made = ::mkdir(directory.c_str(), 0750);
  const int made_error = errno;
  ::umask(umask_before);
  if (made != 0 && made_error != EEXIST) {
    return Status::error(fmt::format("cannot make {}: {}", directory, std::strerror(made_error)));
  }
  UniqueFd dir(::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  struct stat st {};
  if (!dir.valid() || ::fstat(dir.get(), &st) != 0) {
    return Status::error(
        fmt::format("{} is not a directory stmuxd can open: {}", directory, std::strerror(errno)));
  }
  if (st.st_uid != ::geteuid()) {
    return Status::error(fmt::format("{} belongs to uid {}, not to stmuxd's {}; remove it",
                                     directory, st.st_uid, ::geteuid()));
  }
  // Nobody but the daemon may add or take away places.
  if ((st.st_mode & 0022) != 0 && ::fchmod(dir.get(), st.st_mode & 0750) != 0) {
    return Status::error(fmt::format("cannot chmod {}: {}", directory, std::strerror(errno)));
  }
  // The pipe directory, replaced whole (a tenant never reads half of it).
  const std::string pipe = detail::withoutTrailingSlashes(pipe_directory) + "\n";
  const std::string temporary = fmt::format("{}.{}", kMpsSeatsPipeFile, ::getpid());
  {
    UniqueFd file(::openat(dir.get(), temporary.c_str(),
                           O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0640));
    if (!file.valid() ||
        ::write(file.get(), pipe.data(), pipe.size()) != static_cast<ssize_t>(pipe.size())) {
      return Status::error(
          fmt::format("cannot write {}/{}: {}", directory, temporary, std::strerror(errno)));
    }
  }
  if (::renameat(dir.get(), temporary.c_str(), dir.get(), std::string(kMpsSeatsPipeFile).c_str()) !=
      0) {
    return Status::error(
        fmt::format("cannot rename {}/{}: {}", directory, temporary, std::strerror(errno)));
  }
  for (long i = 0; i < seats; ++i) {
    const std::string name = detail::seatName(i);
    UniqueFd seat(
        ::openat(dir.get(), name.c_str(), O_RDONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0640));
    if (!seat.valid()) {
      return Status::error(
          fmt::format("cannot make {}/{}: {}", directory, name, std::strerror(errno)));
    }
  }
  UniqueFd listing(::dup(dir.get()));
  DIR* entries = listing.valid() ? ::fdopendir(listing.get()) : nullptr;
  if (entries == nullptr) {
    return Status::error(fmt::format("cannot list {}: {}", directory, std::strerror(errno)));
  }
  (void)listing.release();  // closedir closes it
  while (const dirent* entry = ::readdir(entries)) {
    if (detail::seatIndex(entry->d_name) >= seats) ::unlinkat(dir.get(), entry->d_name, 0);
  }
  ::closedir(entries);
  return Status::okStatus();
}

// stmuxd under STMUX_MPS_CLIENTS=0: no places kept, so none counted.
inline Status removeMpsSeats(const std::string& directory) {
  DIR* entries = ::opendir(directory.c_str());
  if (entries == nullptr) {
    if (errno == ENOENT) return Status::okStatus();
    return Status::error(fmt::format("cannot list {}: {}", directory, std::strerror(errno)));
  }
  while (const dirent* entry = ::readdir(entries)) {
    const std::string_view name(entry->d_name);
    if (name != "." && name != "..") ::unlinkat(::dirfd(entries), entry->d_name, 0);
  }
  ::closedir(entries);
  if (::rmdir(directory.c_str()) != 0) {
    return Status::error(fmt::format("cannot remove {}: {}", directory, std::strerror(errno)));
  }
  return Status::okStatus();
}

// The places as they stand, for stmuxctl status and the metrics.
struct MpsSeatCount {
  long kept = 0;   // seat files in the directory
  long taken = 0;  // those a process holds
};

namespace detail {
// The (device, inode) of each lock /proc/locks lists as held with flock, in
// its format "ID: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END" (the
// device numbers in hex; a line with "->" is a process waiting, not holding).
inline std::vector<std::pair<dev_t, ino_t>> heldFlocks(std::string_view proc_locks) {
  std::vector<std::pair<dev_t, ino_t>> held;
  while (!proc_locks.empty()) {
    const std::size_t end = proc_locks.find('\n');
    const std::string line(proc_locks.substr(0, end));
    proc_locks.remove_prefix(end == std::string_view::npos ? proc_locks.size() : end + 1);
    char kind[16] = {}, arrow[3] = {};
    unsigned major = 0, minor = 0;
    unsigned long long inode = 0;
    if (std::sscanf(line.c_str(), "%*[^:]: %2s", arrow) == 1 && std::string_view(arrow) == "->") {
      continue;
    }
    if (std::sscanf(line.c_str(), "%*[^:]: %15s %*s %*s %*d %x:%x:%llu", kind, &major, &minor,
                    &inode) == 4 &&
        std::string_view(kind) == "FLOCK") {
      held.emplace_back(makedev(major, minor), static_cast<ino_t>(inode));
    }
  }
  return held;
}
}  // namespace detail

// How many places `directory` keeps and how many are taken, given the text
// of /proc/locks (a lock is the kernel's: taken means a live process holds
// it). Reads without locking anything: taking a place even for an instant
// could send a tenant starting then off MPS.
inline Result<MpsSeatCount> countMpsSeats(const std::string& directory,
                                          std::string_view proc_locks) {
  DIR* entries = ::opendir(directory.c_str());
  if (entries == nullptr) {
    return Status::error(fmt::format("cannot list {}: {}", directory, std::strerror(errno)));
  }
  const std::vector<std::pair<dev_t, ino_t>> held = detail::heldFlocks(proc_locks);
  MpsSeatCount count;
  while (const dirent* entry = ::readdir(entries)) {
    if (detail::seatIndex(entry->d_name) < 0) continue;
    struct stat st {};
    if (::fstatat(::dirfd(entries), entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    ++count.kept;
    const std::pair<dev_t, ino_t> place(st.st_dev, st.st_ino);
    count.taken += std::find(held.begin(), held.end(), place) != held.end();
  }
  ::closedir(entries);
  return count;
}

// The same, from this machine's /proc/locks.
inline Result<MpsSeatCount> countMpsSeats(const std::string& directory) {
  std::ifstream in("/proc/locks");
  std::stringstream text;
  text << in.rdbuf();
  if (!in) return Status::error(fmt::format("cannot read /proc/locks: {}", std::strerror(errno)));
  return countMpsSeats(directory, text.str());
}

// A tenant's place, as it came out.
struct MpsSeat {
  enum class Outcome {
    kNotCounted,  // no MPS control daemon in the pipe directory, or no places kept for it
    kSeated,      // a place taken, held by `fd` to the process's end
    kNoRoom,      // every place taken: the process must stay off MPS
  };
  Outcome outcome = Outcome::kNotCounted;
  int fd = -1;      // the held place's lock (kSeated), close-on-exec
  long seats = 0;   // the places kept (kSeated, kNoRoom)
  std::string why;  // kNotCounted: why not, for the shim's debug log
};

// A tenant, before its CUDA driver connects to the MPS control daemon whose
// pipes are in `pipe_directory`: takes a free place of `directory`, kept by
// the daemon running as `daemon_uid`. Places of anybody else (a directory of
// another owner, or one others may write) are not counted: a user who could
// make them could otherwise keep every tenant off MPS.
inline MpsSeat takeMpsSeat(const std::string& directory, std::string_view pipe_directory,
                           uid_t daemon_uid) {
  MpsSeat seat;
  const std::string pipes = detail::withoutTrailingSlashes(pipe_directory);
  struct stat st {};
  if (::stat((pipes + "/control").c_str(), &st) != 0) {
    seat.why = fmt::format("no MPS control daemon in {}", pipes);
    return seat;
  }
  UniqueFd dir(::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dir.valid() || ::fstat(dir.get(), &st) != 0) {
    seat.why = fmt::format("stmuxd keeps no places in {}", directory);
    return seat;
  }
  if (st.st_uid != daemon_uid || (st.st_mode & 0022) != 0) {
    seat.why = fmt::format("{} is not stmuxd's (uid {}, mode {:o})", directory, st.st_uid,
                           st.st_mode & 07777);
    return seat;
  }
  char kept_for[4096];
  ssize_t length = -1;
  if (UniqueFd file(::openat(dir.get(), std::string(kMpsSeatsPipeFile).c_str(),
                             O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
      file.valid()) {
    length = ::read(file.get(), kept_for, sizeof(kept_for));
  }
  if (length <= 0 || std::string_view(kept_for, static_cast<std::size_t>(length)) != pipes + "\n") {
    seat.why = fmt::format("the places of {} are for another MPS than {}'s", directory, pipes);
    return seat;
  }
  for (long i = 0;; ++i) {
    const std::string name = detail::seatName(i);
    UniqueFd place(::openat(dir.get(), name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!place.valid()) break;  // past the last place
    seat.seats = i + 1;
    if (::flock(place.get(), LOCK_EX | LOCK_NB) == 0) {
      seat.outcome = MpsSeat::Outcome::kSeated;
      seat.fd = place.release();
      return seat;
    }
  }
  seat.outcome = MpsSeat::Outcome::kNoRoom;
  return seat;
}

}  // namespace stmux

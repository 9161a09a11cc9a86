// libstmux.so's getenv. The CUDA driver reads CUDA_MPS_PIPE_DIRECTORY once,
// through getenv, as it starts (seen on driver 580), before it connects to the
// MPS control daemon; it is the one moment a process can still be kept off
// MPS, and a preloaded library's getenv is the one place to answer it
// (docs/ARCHITECTURE.md, "Places on MPS"). Every other name, and that one
// asked by anybody else, is looked up as the C library's getenv does.
#include "shim/mps_steer.h"

#include <dlfcn.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "stmux/config.h"
#include "stmux/log.h"
#include "stmux/mps_seats.h"

namespace stmux::shim {
namespace {

constexpr std::string_view kPipeVariable = "CUDA_MPS_PIPE_DIRECTORY";

std::atomic<bool> g_kept_off{false};

// glibc's getenv: the first NAME=value of the environment. (Not the C
// library's own function: looking it up from inside getenv could run code,
// a preloaded malloc's first allocation, that asks getenv.)
char* lookUp(const char* name) {
  if (name == nullptr || environ == nullptr || *name == '\0') return nullptr;
  const std::size_t length = std::strlen(name);
  for (char** entry = environ; *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, name, length) == 0 && (*entry)[length] == '=') {
      return *entry + length + 1;
    }
  }
  return nullptr;
}

bool calledByTheCudaDriver(const void* return_address) {
  Dl_info info{};
  if (::dladdr(return_address, &info) == 0 || info.dli_fname == nullptr) return false;
  const char* slash = std::strrchr(info.dli_fname, '/');
  return std::string_view(slash != nullptr ? slash + 1 : info.dli_fname).starts_with("libcuda.so");
}

// The answer to the driver: the pipe directory as the environment says, or,
// for a process that found no free place, the places' own directory, where
// there is no MPS control daemon to connect to.
const char* decide() {
  char* given = lookUp(kPipeVariable.data());
  // MPS's own programs are MPS's business.
  if (std::string_view(program_invocation_short_name).starts_with("nvidia-cuda-mps")) return given;
  std::string errors;
  const Config config = parseEachVariable(environmentLookup(), Scope::kShim, errors);
  if (!errors.empty() || config.disable) return given;  // the shim says why at its first call
  setLogSpec(config.log);  // as the shim will: CUDA may start long before its first GEMM
  struct stat socket {};
  if (::stat(config.socket.c_str(), &socket) != 0) {
    STMUX_DEBUG(kShim, "no places on MPS counted: no stmuxd at {}", config.socket);
    return given;
  }
  // Never destroyed: the driver may keep the answer as long as it likes.
  static const std::string& directory = *new std::string(mpsSeatsDirectory(config.socket));
  const MpsSeat seat = takeMpsSeat(directory, mpsPipeDirectory(given), socket.st_uid);
  switch (seat.outcome) {
    case MpsSeat::Outcome::kNotCounted:
      STMUX_DEBUG(kShim, "no place on MPS taken: {}", seat.why);
      return given;
    case MpsSeat::Outcome::kSeated:
      STMUX_DEBUG(kShim, "took one of stmuxd's {} places on MPS", seat.seats);
      return given;
    case MpsSeat::Outcome::kNoRoom:
      break;
  }
  g_kept_off.store(true, std::memory_order_relaxed);
  STMUX_WARN(kShim,
             "MPS has no place left for this process (all {} that stmuxd keeps for its tenants "
             "are taken, STMUX_MPS_CLIENTS): it runs without MPS, time-sliced with the MPS "
             "server, so that its CUDA context can be made at all; its GEMMs are still served",
             seat.seats);
  return directory.c_str();
}

}  // namespace

bool keptOffMps() {
  return g_kept_off.load(std::memory_order_relaxed);
}

}  // namespace stmux::shim

extern "C" __attribute__((visibility("default"))) char* getenv(const char* name) {
  using namespace stmux::shim;
  if (kPipeVariable == name && calledByTheCudaDriver(__builtin_return_address(0))) {
    // Once a process: a place taken is held to its end.
    static std::once_flag once;
    static const char* answer = nullptr;
    std::call_once(once, [] {
      try {
        answer = decide();
      } catch (...) {  // out of memory: as if there were no places
        answer = lookUp(kPipeVariable.data());
      }
    });
    return const_cast<char*>(answer);
  }
  return lookUp(name);
}

// Which of this process's allocations the shim has exported to the daemon.
//
// An operand is identified by its allocation's CU_POINTER_ATTRIBUTE_BUFFER_ID,
// never by address: an allocation freed and another made at the same address
// has a new buffer id, and gets a new entry and a new IPC handle. The shim
// cannot see frees (it exports only cuBLAS names, and nvcc-built programs reach
// the driver through cuGetProcAddress), so it finds them two ways: a new
// buffer id at a cached base means the old one is gone; and a sweep (the
// shim's sweeper thread, once a second) asks the driver whether each cached
// allocation still exists. Either way the daemon is told, so it unmaps the
// memory.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "shim/driver.h"
#include "stmux/wire.h"

namespace stmux::shim {

class AllocationCache {
 public:
  enum class Failure { kNone, kNotExportable, kCudaError };
  struct Described {
    Failure failure = Failure::kNone;
    OperandDesc desc{};
    int device = -1;  // the client's ordinal of the GPU holding it
  };

  Described describe(const Driver& driver, const void* pointer);

  // Asks the driver whether each cached allocation still exists; those that
  // do not (another buffer id at its address, or none) are dropped and handed
  // out by the next takeGone(). One the driver could not answer for stays.
  void sweep(const Driver& driver);

  // Ids of allocations found gone since the last call: the daemon should
  // unmap them.
  std::vector<std::uint64_t> takeGone();
  // Ids taken but not told to the daemon: handed out again.
  void giveBack(const std::vector<std::uint64_t>& gone);

  std::size_t size();

  // fork(): hold the lock across it; the child starts empty, since its
  // allocations (and its CUDA context) are not the parent's.
  void forkPrepare() { mutex_.lock(); }
  void forkParent() { mutex_.unlock(); }
  void forkChild();

 private:
  struct Entry {
    std::uint64_t base;
    std::uint64_t bytes;
    int device;
    IpcHandle handle;
  };
  std::mutex mutex_;
  std::unordered_map<std::uint64_t, Entry> by_id_;  // buffer id -> allocation
  std::map<std::uint64_t, std::uint64_t> by_base_;  // base address -> buffer id
  std::vector<std::uint64_t> gone_;
};

}  // namespace stmux::shim

// Which client allocations one GPU's executor has mapped, and when each may
// be closed.
//
// Keyed by (client, allocation id), never by address: a client that frees an
// allocation and makes another gets the same address back with a new
// CU_POINTER_ATTRIBUTE_BUFFER_ID (DESIGN.md, "Facts checked"). A mapping
// closes when the client says it freed it, when the client detaches, when the
// client holds more than its limit (least recently used first), or when a new
// allocation of the client's overlaps it in the client's address space: live
// allocations never overlap, so the old one was freed. That last rule matters
// beyond memory: CUDA refuses to open a handle to memory at an address whose
// freed predecessor is still mapped here (cudaErrorAlreadyMapped), and the
// client's notice of the free travels on another channel than its next
// request, so it may come second. A mapping is never closed while a batch in
// flight uses it: batches complete in id order, and each entry remembers the
// last batch that used it.
//
// The opening and closing themselves (CUDA IPC) are passed in as functions,
// so this bookkeeping is tested without a GPU. Opening is mostly the mapper
// thread's (the scheduler holds a request until its memory is mapped, and
// the executor adopts the mapping); `acquire` opens only what the mapper
// could not, or what was closed since.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <unordered_map>
#include <vector>

#include "stmux/status.h"
#include "stmux/wire.h"

namespace stmux::daemon {

struct Mapped {
  std::uint64_t base = 0;   // device address of the allocation in the daemon
  std::uint64_t bytes = 0;  // its real size, as the driver reports it
};

// Where an allocation of a client ends in its address space: one of 0 bytes
// counts as 1, as it still holds its address; the end of the address space
// for sizes a client made up that would go past it.
inline std::uint64_t allocationEnd(std::uint64_t base, std::uint64_t bytes) {
  const std::uint64_t size = std::max<std::uint64_t>(bytes, 1);
  return size > UINT64_MAX - base ? UINT64_MAX : base + size;
}

// Whether two allocations of a client overlap in its address space.
inline bool allocationsOverlap(std::uint64_t base, std::uint64_t bytes, std::uint64_t other_base,
                               std::uint64_t other_bytes) {
  return base < allocationEnd(other_base, other_bytes) && other_base < allocationEnd(base, bytes);
}

class MappingCache {
 public:
  // Opens a handle; sets `already_mapped` when CUDA refused because memory at
  // that address is mapped already.
  using OpenFn = std::function<Result<Mapped>(const IpcHandle&, bool& already_mapped)>;
  using CloseFn = std::function<void(const Mapped&)>;
  // Told of each allocation the cache gives up on its own (the client's least
  // recently used beyond its limit, idle ones closed to make room at an
  // address, or ones a new allocation of the client overlaps), and of an id
  // a request names as other memory than is mapped under it; not of those
  // the client released or left: whoever routes
  // requests here (the scheduler) then has the next use opened off this
  // thread again, instead of taking it for mapped.
  using GaveUpFn = std::function<void(std::uint32_t client, std::uint64_t alloc_id)>;

  MappingCache(std::size_t per_client_limit, OpenFn open, CloseFn close, GaveUpFn gave_up = {})
      : limit_(per_client_limit),
        open_(std::move(open)),
        close_(std::move(close)),
        gave_up_(std::move(gave_up)) {}
  ~MappingCache();

  // The mapping for the allocation an operand describes, opened if need be,
  // marked as used by `batch_id` (not closable until that batch completes);
  // an error for an id mapped as other memory (reported: the mapper opens
  // such a new description).
  Result<Mapped> acquire(std::uint32_t client, const OperandDesc& operand, std::uint64_t batch_id);

  // Takes a mapping opened elsewhere (the mapper) for the allocation an
  // operand describes, by the same rules as `acquire`. False if it cannot
  // (the allocation is mapped already, or overlaps one a batch in flight
  // uses): the caller closes it.
  bool adopt(std::uint32_t client, const OperandDesc& operand, const Mapped& mapped);
  // The client freed the allocation.
  void release(std::uint32_t client, std::uint64_t alloc_id);
  // The client is gone.
  void forgetClient(std::uint32_t client);
  // Every batch up to and including `batch_id` has completed.
  void batchCompleted(std::uint64_t batch_id);

  std::size_t size() const { return open_count_; }
  std::size_t clientSize(std::uint32_t client) const;
  std::size_t pendingCloses() const { return deferred_.size(); }

 private:
  struct Entry {
    IpcHandle handle;
    Mapped mapped;
    std::uint64_t client_base = 0;  // where the client has it
    std::uint64_t client_bytes = 0;
    std::uint64_t last_batch = 0;
    std::list<std::uint64_t>::iterator lru;  // position in the client's recency list
  };
  struct ClientMaps {
    std::unordered_map<std::uint64_t, Entry> entries;
    std::list<std::uint64_t> lru;                    // alloc ids, most recently used first
    std::map<std::uint64_t, std::uint64_t> by_base;  // client base -> alloc id
  };
  bool inUse(const Entry& entry) const { return entry.last_batch > completed_; }
  // Closes now if no batch in flight uses it, else once its last batch is done.
  void retire(const Entry& entry);
  // Retires and forgets one entry of `maps`.
  void drop(ClientMaps& maps, std::uint64_t alloc_id);
  // Drops one entry the client did not ask to, and says so (gave_up_).
  void giveUp(std::uint32_t client, ClientMaps& maps, std::uint64_t alloc_id);
  void evictIfFull(std::uint32_t client, ClientMaps& maps);
  // Gives up entries overlapping [base, base + bytes); false if one is in use.
  bool dropOverlapping(std::uint32_t client, ClientMaps& maps, std::uint64_t base,
                       std::uint64_t bytes);
  void insert(ClientMaps& maps, const OperandDesc& operand, const Mapped& mapped,
              std::uint64_t batch_id);

  std::size_t limit_;
  OpenFn open_;
  CloseFn close_;
  GaveUpFn gave_up_;
  std::unordered_map<std::uint32_t, ClientMaps> clients_;
  std::vector<std::pair<std::uint64_t, Mapped>> deferred_;  // (last batch, mapping)
  std::uint64_t completed_ = 0;
  std::size_t open_count_ = 0;
};

}  // namespace stmux::daemon

#include "daemon/mapping_cache.h"

#include <algorithm>

#include "stmux/log.h"

namespace stmux::daemon {

MappingCache::~MappingCache() {
  // The executor destroys the cache only after its last batch completed.
  for (auto& [client, maps] : clients_) {
    for (auto& [id, entry] : maps.entries)
      close_(entry.mapped);
  }
  for (auto& [batch, mapped] : deferred_)
    close_(mapped);
}

Result<Mapped> MappingCache::acquire(std::uint32_t client, const OperandDesc& operand,
                                     std::uint64_t batch_id) {
  ClientMaps& maps = clients_[client];
  if (auto it = maps.entries.find(operand.alloc_id); it != maps.entries.end()) {
    Entry& entry = it->second;
    if (entry.handle == operand.handle && entry.client_base == operand.base) {
      entry.last_batch = std::max(entry.last_batch, batch_id);
      maps.lru.splice(maps.lru.begin(), maps.lru, entry.lru);
      return entry.mapped;
    }
    // Same id, other memory: only a broken or hostile client does this, and
    // a batch meets it only where requests describing the id two ways are
    // in flight together (the scheduler has the mapper open a new
    // description first). Not opened here, every tenant's launches waiting
    // (a client alternating two was, at every batch): declined, and
    // reported, so that its next use goes to the mapper.
    if (gave_up_) gave_up_(client, operand.alloc_id);
    return Status::error("its allocation id names other memory than is mapped under it");
  }
  if (!dropOverlapping(client, maps, operand.base, operand.alloc_bytes)) {
    return Status::error("it overlaps an allocation a batch in flight still uses");
  }
  evictIfFull(client, maps);
  bool already_mapped = false;
  auto opened = open_(operand.handle, already_mapped);
  if (!opened && already_mapped) {
    // A freed predecessor we could not place (the client's description of it
    // was not enough): close every idle mapping of this client and retry.
    STMUX_DEBUG(kMem, "client {}: memory at {:#x} is mapped already; closing idle mappings", client,
                operand.base);
    std::vector<std::uint64_t> idle;
    for (const auto& [id, entry] : maps.entries) {
      if (!inUse(entry)) idle.push_back(id);
    }
    for (std::uint64_t id : idle)
      giveUp(client, maps, id);
    opened = open_(operand.handle, already_mapped);
  }
  if (!opened) return opened;
  insert(maps, operand, opened.value(), batch_id);
  STMUX_DEBUG(kMem, "client {}: mapped allocation {} ({} bytes)", client, operand.alloc_id,
              opened->bytes);
  return opened;
}

bool MappingCache::adopt(std::uint32_t client, const OperandDesc& operand, const Mapped& mapped) {
  ClientMaps& maps = clients_[client];
  if (auto it = maps.entries.find(operand.alloc_id); it != maps.entries.end()) {
    if (it->second.handle == operand.handle && it->second.client_base == operand.base) {
      return false;  // mapped already: keep that one
    }
    if (inUse(it->second)) return false;
    drop(maps, operand.alloc_id);
  }
  if (!dropOverlapping(client, maps, operand.base, operand.alloc_bytes)) return false;
  evictIfFull(client, maps);
  insert(maps, operand, mapped, /*batch_id=*/0);
  STMUX_DEBUG(kMem, "client {}: adopted allocation {} ({} bytes)", client, operand.alloc_id,
              mapped.bytes);
  return true;
}

void MappingCache::insert(ClientMaps& maps, const OperandDesc& operand, const Mapped& mapped,
                          std::uint64_t batch_id) {
  maps.lru.push_front(operand.alloc_id);
  maps.entries.emplace(operand.alloc_id, Entry{operand.handle, mapped, operand.base,
                                               operand.alloc_bytes, batch_id, maps.lru.begin()});
  maps.by_base[operand.base] = operand.alloc_id;
  ++open_count_;
}

bool MappingCache::dropOverlapping(std::uint32_t client, ClientMaps& maps, std::uint64_t base,
                                   std::uint64_t bytes) {
  const std::uint64_t end = allocationEnd(base, bytes);
  // Entries starting before `end`, from the last one starting at or before
  // `base` (which may reach into the range) onwards.
  auto it = maps.by_base.upper_bound(base);
  if (it != maps.by_base.begin()) --it;
  std::vector<std::uint64_t> overlapping;
  for (; it != maps.by_base.end() && it->first < end; ++it) {
    const Entry& entry = maps.entries.at(it->second);
    if (!allocationsOverlap(base, bytes, entry.client_base, entry.client_bytes)) continue;
    if (inUse(entry)) return false;
    overlapping.push_back(it->second);
  }
  // Freed, as live allocations never overlap; reported, as the scheduler
  // may still take it for mapped (two ids a confused client described over
  // the same bytes), and would send it straight to a batch to be opened on
  // this thread again.
  for (std::uint64_t id : overlapping) {
    STMUX_DEBUG(kMem, "allocation {} was freed (a new one overlaps it): closing it", id);
    giveUp(client, maps, id);
  }
  return true;
}

void MappingCache::giveUp(std::uint32_t client, ClientMaps& maps, std::uint64_t alloc_id) {
  drop(maps, alloc_id);
  if (gave_up_) gave_up_(client, alloc_id);
}

void MappingCache::evictIfFull(std::uint32_t client, ClientMaps& maps) {
  // Oldest first; one still used by a batch in flight stays (the limit is
  // then exceeded until that batch completes).
  std::vector<std::uint64_t> evict;
  std::size_t size = maps.entries.size();
  for (auto it = maps.lru.rbegin(); size >= limit_ && it != maps.lru.rend(); ++it) {
    if (inUse(maps.entries.at(*it))) continue;
    evict.push_back(*it);
    --size;
  }
  for (std::uint64_t id : evict)
    giveUp(client, maps, id);
}

void MappingCache::retire(const Entry& entry) {
  --open_count_;
  if (!inUse(entry)) {
    close_(entry.mapped);
  } else {
    deferred_.emplace_back(entry.last_batch, entry.mapped);
  }
}

void MappingCache::drop(ClientMaps& maps, std::uint64_t alloc_id) {
  auto it = maps.entries.find(alloc_id);
  if (it == maps.entries.end()) return;
  retire(it->second);
  maps.lru.erase(it->second.lru);
  if (auto base = maps.by_base.find(it->second.client_base);
      base != maps.by_base.end() && base->second == alloc_id) {
    maps.by_base.erase(base);
  }
  maps.entries.erase(it);
}

void MappingCache::release(std::uint32_t client, std::uint64_t alloc_id) {
  if (auto maps = clients_.find(client); maps != clients_.end()) drop(maps->second, alloc_id);
}

void MappingCache::forgetClient(std::uint32_t client) {
  auto maps = clients_.find(client);
  if (maps == clients_.end()) return;
  for (auto& [id, entry] : maps->second.entries)
    retire(entry);
  clients_.erase(maps);
}

void MappingCache::batchCompleted(std::uint64_t batch_id) {
  completed_ = std::max(completed_, batch_id);
  auto done = std::partition(deferred_.begin(), deferred_.end(),
                             [this](const auto& item) { return item.first > completed_; });
  for (auto it = done; it != deferred_.end(); ++it)
    close_(it->second);
  deferred_.erase(done, deferred_.end());
}

std::size_t MappingCache::clientSize(std::uint32_t client) const {
  auto it = clients_.find(client);
  return it == clients_.end() ? 0 : it->second.entries.size();
}

}  // namespace stmux::daemon

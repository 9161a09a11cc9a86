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

Result<Mapped> MappingCache::acquire(std::uint32_t client, std::uint64_t alloc_id,
                                     const IpcHandle& handle, std::uint64_t batch_id) {
  ClientMaps& maps = clients_[client];
  auto it = maps.entries.find(alloc_id);
  if (it != maps.entries.end()) {
    if (it->second.handle == handle) {
      it->second.last_batch = std::max(it->second.last_batch, batch_id);
      maps.lru.splice(maps.lru.begin(), maps.lru, it->second.lru);
      return it->second.mapped;
    }
    // Same id, other memory: only a broken or hostile client does this. The
    // old mapping goes; the new handle is opened like any other.
    STMUX_WARN(kMem, "client {} reused allocation id {} for another allocation", client, alloc_id);
    retire(it->second);
    maps.lru.erase(it->second.lru);
    maps.entries.erase(it);
  }
  evictIfFull(maps);
  auto opened = open_(handle);
  if (!opened) return opened;
  maps.lru.push_front(alloc_id);
  maps.entries.emplace(alloc_id, Entry{handle, opened.value(), batch_id, maps.lru.begin()});
  ++open_count_;
  STMUX_DEBUG(kMem, "client {}: mapped allocation {} ({} bytes)", client, alloc_id, opened->bytes);
  return opened;
}

void MappingCache::evictIfFull(ClientMaps& maps) {
  // Oldest first; one still used by a batch in flight stays (the limit is
  // then exceeded until that batch completes).
  for (auto it = maps.lru.end(); maps.entries.size() >= limit_ && it != maps.lru.begin();) {
    --it;
    auto entry = maps.entries.find(*it);
    if (entry->second.last_batch > completed_) continue;
    retire(entry->second);
    maps.entries.erase(entry);
    it = maps.lru.erase(it);
  }
}

void MappingCache::retire(const Entry& entry) {
  --open_count_;
  if (entry.last_batch <= completed_) {
    close_(entry.mapped);
  } else {
    deferred_.emplace_back(entry.last_batch, entry.mapped);
  }
}

void MappingCache::release(std::uint32_t client, std::uint64_t alloc_id) {
  auto maps = clients_.find(client);
  if (maps == clients_.end()) return;
  auto it = maps->second.entries.find(alloc_id);
  if (it == maps->second.entries.end()) return;
  retire(it->second);
  maps->second.lru.erase(it->second.lru);
  maps->second.entries.erase(it);
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

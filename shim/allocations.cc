#include "shim/allocations.h"

#include <cstring>

#include "stmux/log.h"

namespace stmux::shim {

AllocationCache::Described AllocationCache::describe(const Driver& driver, const void* pointer) {
  Described out;
  const auto address = reinterpret_cast<CUdeviceptr>(pointer);
  unsigned long long buffer_id = 0;
  int device = -1;
  CUmemorytype type{};
  unsigned int ipc_capable = 0;  // the driver writes a boolean
  CUpointer_attribute attributes[] = {
      CU_POINTER_ATTRIBUTE_BUFFER_ID, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
      CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE};
  void* values[] = {&buffer_id, &device, &type, &ipc_capable};
  if (driver.cuPointerGetAttributes(4, attributes, values, address) != CUDA_SUCCESS ||
      buffer_id == 0) {
    out.failure = Failure::kNotExportable;  // not memory CUDA knows
    return out;
  }
  // Managed memory, host memory, stream-ordered pools and VMM allocations
  // cannot be exported with cuIpcGetMemHandle.
  if (type != CU_MEMORYTYPE_DEVICE || ipc_capable == 0) {
    out.failure = Failure::kNotExportable;
    return out;
  }

  std::lock_guard lock(mutex_);
  auto it = by_id_.find(buffer_id);
  if (it == by_id_.end()) {
    CUdeviceptr base = 0;
    size_t bytes = 0;
    if (driver.cuMemGetAddressRange(&base, &bytes, address) != CUDA_SUCCESS) {
      out.failure = Failure::kCudaError;
      return out;
    }
    CUipcMemHandle handle;
    if (driver.cuIpcGetMemHandle(&handle, base) != CUDA_SUCCESS) {
      out.failure = Failure::kNotExportable;
      return out;
    }
    // A different allocation at this base before: it was freed.
    if (auto old = by_base_.find(base); old != by_base_.end()) {
      gone_.push_back(old->second);
      by_id_.erase(old->second);
      by_base_.erase(old);
    }
    Entry entry{base, bytes, device, {}};
    static_assert(sizeof(handle) == sizeof(entry.handle));
    std::memcpy(entry.handle.bytes, &handle, sizeof(handle));
    it = by_id_.emplace(buffer_id, entry).first;
    by_base_[base] = buffer_id;
    STMUX_DEBUG(kShim, "exported allocation {} ({} bytes on GPU {})", buffer_id, bytes, device);
  }
  const Entry& entry = it->second;
  out.device = entry.device;
  out.desc.alloc_id = buffer_id;
  out.desc.base = entry.base;
  out.desc.offset = address - entry.base;
  out.desc.alloc_bytes = entry.bytes;
  out.desc.handle = entry.handle;
  return out;
}

void AllocationCache::sweep(const Driver& driver) {
  // The driver is asked without the lock, which every served call takes to
  // describe its operands: a sweep of many allocations held it for one
  // query each, and the calls meanwhile waited for all of them.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> cached;  // base, buffer id
  {
    std::lock_guard lock(mutex_);
    cached.assign(by_base_.begin(), by_base_.end());
  }
  std::vector<std::pair<std::uint64_t, std::uint64_t>> freed;
  for (const auto& [base, id] : cached) {
    // The plural query reports a freed address as buffer id 0 rather than
    // failing, and needs no current context (the sweeper thread has none).
    unsigned long long now = 0;
    CUpointer_attribute attribute = CU_POINTER_ATTRIBUTE_BUFFER_ID;
    void* value = &now;
    // A query that failed says nothing of the allocation: kept, looked at
    // again at the next sweep. Buffer ids are never reused, so another id
    // (or none) at its base means it was freed.
    if (driver.cuPointerGetAttributes(1, &attribute, &value, base) == CUDA_SUCCESS && now != id) {
      freed.emplace_back(base, id);
    }
  }
  if (freed.empty()) return;
  std::lock_guard lock(mutex_);
  for (const auto& [base, id] : freed) {
    // Unless describe() found its base reused meanwhile, and said so.
    const auto it = by_base_.find(base);
    if (it == by_base_.end() || it->second != id) continue;
    gone_.push_back(id);
    by_id_.erase(id);
    by_base_.erase(it);
  }
}

void AllocationCache::giveBack(const std::vector<std::uint64_t>& gone) {
  std::lock_guard lock(mutex_);
  gone_.insert(gone_.end(), gone.begin(), gone.end());
}

std::vector<std::uint64_t> AllocationCache::takeGone() {
  std::lock_guard lock(mutex_);
  std::vector<std::uint64_t> gone;
  gone.swap(gone_);
  return gone;
}

std::size_t AllocationCache::size() {
  std::lock_guard lock(mutex_);
  return by_id_.size();
}

void AllocationCache::forkChild() {
  by_id_.clear();
  by_base_.clear();
  gone_.clear();
  mutex_.unlock();
}

}  // namespace stmux::shim

#include "shim/callers.h"

#include <link.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace stmux::shim {
namespace {

// The loaded segments calls came from, and whether each is cuBLAS's. Entries
// are only ever added, without a lock (a fork may come at any time): a
// thread reserves an index, fills the entry, then marks it set; readers skip
// entries not yet set, and two threads may add the same range. At most
// kMaxRanges: past that, lookups walk the loaded objects each time, correct
// but slower. An object unloaded while its
// address range is cached keeps its answer; a library loaded at the same
// addresses later would inherit it (dlclose of cuBLAS while a program keeps
// calling GEMMs is not a case stmux serves).
struct Range {
  std::uintptr_t start = 0, end = 0;
  bool cublas = false;
};
struct Entry {
  Range range;
  std::atomic<bool> set{false};
};
constexpr std::size_t kMaxRanges = 64;
Entry g_entries[kMaxRanges];
std::atomic<std::size_t> g_reserved{0};

bool isCublas(const char* path) {
  if (path == nullptr) return false;
  const char* slash = std::strrchr(path, '/');
  const std::string_view name(slash != nullptr ? slash + 1 : path);
  return name.starts_with("libcublas.so") || name.starts_with("libcublasLt.so");
}

struct Search {
  std::uintptr_t address;
  Range found;
  bool hit = false;
};

int visit(dl_phdr_info* info, size_t, void* data) {
  auto* search = static_cast<Search*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& segment = info->dlpi_phdr[i];
    if (segment.p_type != PT_LOAD) continue;
    const std::uintptr_t start = info->dlpi_addr + segment.p_vaddr;
    const std::uintptr_t end = start + segment.p_memsz;
    if (search->address >= start && search->address < end) {
      search->found = Range{start, end, isCublas(info->dlpi_name)};
      search->hit = true;
      return 1;
    }
  }
  return 0;
}

}  // namespace

namespace {

// The cached range holding `address`, if any.
const Range* cached(std::uintptr_t address) {
  const std::size_t reserved = std::min(g_reserved.load(std::memory_order_acquire), kMaxRanges);
  for (std::size_t i = 0; i < reserved; ++i) {
    const Entry& entry = g_entries[i];
    if (entry.set.load(std::memory_order_acquire) && address >= entry.range.start &&
        address < entry.range.end) {
      return &entry.range;
    }
  }
  return nullptr;
}

}  // namespace

bool calledFromCublas(const void* return_address) {
  const auto address = reinterpret_cast<std::uintptr_t>(return_address);
  if (const Range* range = cached(address)) return range->cublas;
  Search search{address, {}};
  dl_iterate_phdr(visit, &search);
  // In no loaded object (code made at run time): not cuBLAS.
  if (!search.hit) return false;
  // Threads that missed at once would each add it: the first one does.
  if (cached(address) != nullptr) return search.found.cublas;
  if (const std::size_t index = g_reserved.fetch_add(1, std::memory_order_acq_rel);
      index < kMaxRanges) {
    g_entries[index].range = search.found;
    g_entries[index].set.store(true, std::memory_order_release);
  }
  return search.found.cublas;
}

}  // namespace stmux::shim

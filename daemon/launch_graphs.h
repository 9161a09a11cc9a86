// Which batches the executor launches by replaying a CUDA graph
// (STMUX_LAUNCH_GRAPHS): CUDA-free, so that CI tests it.
//
// A batch's launches cost the executor's thread more host time than anything
// else it does for the batch (docs/BENCHMARKS.md, the round breakdown), and
// that thread's time per batch bounds the rate on small shapes. When the same
// launches recur, with the same buffer (so the same pointer-array addresses),
// the same keys and the same problem counts (so the same sizes and cuBLAS
// arguments), the executor captures the arrays' copy and the cuBLAS calls
// into a graph once and replays it: only the arrays' contents change, and a
// replay reads them afresh.
//
// A signature is captured on its `capture_after`-th sighting, so that a mix
// seen once pays no capture. At most `capacity` signatures are remembered,
// the least recently seen forgotten first (its graph destroyed through the
// function given); a signature whose capture failed launches directly while
// it is remembered.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "stmux/gemm.h"

namespace stmux::daemon {

struct LaunchSignature {
  std::size_t buffer = 0;
  // Each group's key and problems, in launch order.
  std::vector<std::pair<BatchKey, std::size_t>> groups;
  bool operator==(const LaunchSignature&) const = default;
};

struct LaunchSignatureHash {
  std::size_t operator()(const LaunchSignature& s) const {
    std::size_t h = s.buffer * 0x9e3779b97f4a7c15ull;
    for (const auto& [key, problems] : s.groups)
      h = (h ^ BatchKeyHash{}(key) ^ (problems * 0xbf58476d1ce4e5b9ull)) * 0x100000001b3ull;
    return h;
  }
};

template <class Graph>
class LaunchGraphs {
 public:
  enum class Action { kLaunch, kCapture, kReplay };

  LaunchGraphs(std::size_t capacity, std::uint32_t capture_after,
               std::function<void(Graph&)> destroy)
      : capacity_(capacity > 0 ? capacity : 1),
        capture_after_(capture_after > 0 ? capture_after : 1),
        destroy_(std::move(destroy)) {}
  ~LaunchGraphs() {
    for (auto& [signature, entry] : entries_) {
      if (entry.graph) destroy_(*entry.graph);
    }
  }
  LaunchGraphs(const LaunchGraphs&) = delete;
  LaunchGraphs& operator=(const LaunchGraphs&) = delete;

  // What to do with a batch of this signature; for kReplay, `graph` is set.
  // After kCapture the caller says how the capture went (captured()).
  Action next(const LaunchSignature& signature, Graph*& graph) {
    auto [it, inserted] = entries_.try_emplace(signature);
    Entry& entry = it->second;
    if (inserted) {
      lru_.push_front(&it->first);
      entry.lru = lru_.begin();
      evictBeyondCapacity();
    } else {
      lru_.splice(lru_.begin(), lru_, entry.lru);
    }
    if (entry.graph) {
      graph = &*entry.graph;
      return Action::kReplay;
    }
    if (entry.failed || ++entry.sightings < capture_after_) return Action::kLaunch;
    return Action::kCapture;
  }

  // The capture next() asked for: its graph, or none if it failed (that
  // signature then launches directly).
  void captured(const LaunchSignature& signature, std::optional<Graph> graph) {
    auto it = entries_.find(signature);
    if (it == entries_.end()) {
      if (graph) destroy_(*graph);
      return;
    }
    if (graph) {
      it->second.graph = std::move(graph);
    } else {
      it->second.failed = true;
    }
  }

  std::size_t size() const { return entries_.size(); }
  std::size_t graphs() const {
    std::size_t n = 0;
    for (const auto& [signature, entry] : entries_)
      n += entry.graph ? 1 : 0;
    return n;
  }

 private:
  struct Entry {
    std::uint32_t sightings = 0;
    std::optional<Graph> graph;
    bool failed = false;
    typename std::list<const LaunchSignature*>::iterator lru;
  };

  // The newest entry is at the front and is never the one forgotten.
  void evictBeyondCapacity() {
    while (entries_.size() > capacity_) {
      const LaunchSignature* oldest = lru_.back();
      lru_.pop_back();
      auto it = entries_.find(*oldest);
      if (it->second.graph) destroy_(*it->second.graph);
      entries_.erase(it);
    }
  }

  std::size_t capacity_;
  std::uint32_t capture_after_;
  std::function<void(Graph&)> destroy_;
  // Keys of an unordered_map stay where they are through rehashing.
  std::list<const LaunchSignature*> lru_;  // most recently seen first
  std::unordered_map<LaunchSignature, Entry, LaunchSignatureHash> entries_;
};

}  // namespace stmux::daemon

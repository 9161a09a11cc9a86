// How one batch's requests are laid out for launching: CUDA-free, so that CI
// tests it. The executor (daemon/executor.cc) carries the plan out.
//
// Requests are grouped by BatchKey, keys in first-seen order; each group is
// one cublasSgemmBatched launch (or part of one grouped launch), its
// problems' pointers side by side in the batch's pointer arrays. A strided
// batch is as many problems as it has, while the arrays (max_batch problems)
// have room for them after one per request; else it goes alone. A request
// that cannot be in a batched launch at all (operands not 16-byte aligned)
// goes alone too: a group of its own, launched by itself with the pointers
// cuBLAS can see.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "stmux/gemm.h"
#include "stmux/wire.h"

namespace stmux::daemon {

struct PlanItem {
  BatchKey key;
  std::int64_t problems = 1;  // a strided batch's count, else 1
  bool batchable = true;      // may share a batched launch
};

// A run of `count` requests with one key, at `start` in the plan's order,
// their `problems` at `first` in the pointer arrays (none when alone).
struct LaunchGroup {
  BatchKey key;
  std::size_t start = 0;
  std::size_t count = 0;
  std::size_t first = 0;
  std::size_t problems = 0;
  bool alone = false;
};

struct LaunchPlan {
  std::vector<LaunchGroup> groups;
  std::vector<std::size_t> order;  // the items' indices, group by group
  std::size_t problems = 0;        // pointers in each array
};

inline LaunchPlan planLaunches(const std::vector<PlanItem>& items, std::size_t max_batch) {
  LaunchPlan plan;
  std::vector<std::size_t> group_of(items.size());
  std::size_t room = max_batch > items.size() ? max_batch - items.size() : 0;
  for (std::size_t j = 0; j < items.size(); ++j) {
    const PlanItem& item = items[j];
    const auto further = static_cast<std::uint64_t>(item.problems > 1 ? item.problems - 1 : 0);
    const bool alone = !item.batchable || further > room;
    if (!alone) room -= further;
    std::size_t g = 0;
    if (alone) {
      g = plan.groups.size();
    } else {
      while (g < plan.groups.size() && (plan.groups[g].alone || !(plan.groups[g].key == item.key)))
        ++g;
    }
    if (g == plan.groups.size()) plan.groups.push_back(LaunchGroup{item.key, 0, 0, 0, 0, alone});
    ++plan.groups[g].count;
    if (!alone) plan.groups[g].problems += 1 + further;
    group_of[j] = g;
  }
  for (std::size_t g = 1; g < plan.groups.size(); ++g) {
    plan.groups[g].start = plan.groups[g - 1].start + plan.groups[g - 1].count;
    plan.groups[g].first = plan.groups[g - 1].first + plan.groups[g - 1].problems;
  }
  if (!plan.groups.empty()) plan.problems = plan.groups.back().first + plan.groups.back().problems;
  plan.order.resize(items.size());
  std::vector<std::size_t> fill(plan.groups.size(), 0);
  for (std::size_t j = 0; j < items.size(); ++j) {
    const std::size_t g = group_of[j];
    plan.order[plan.groups[g].start + fill[g]++] = j;
  }
  return plan;
}

// What the requests of a launch cuBLAS refused (its status, as the wire
// writes cuBLAS's) are told. An error cuBLAS finds before it launches
// anything (its arguments, its handle, memory for its workspace, the GPU)
// left C untouched: declined, the caller runs the call itself and gets
// cuBLAS's own answer, which for a call the daemon's cuBLAS refused and the
// caller's accepts (another cuBLAS version, the daemon's GPU memory full) is
// its result. Any other error may come after part of the launch ran: a
// failure, which a caller with beta == 0 runs again and any other reports.
inline std::int32_t answerForRefusedLaunch(std::int32_t cublas_status) {
  switch (cublas_status) {
    case kStatusNotInitialized:
    case kStatusAllocFailed:
    case kStatusInvalidValue:
    case kStatusArchMismatch:
    case kStatusMappingError:
    case kStatusNotSupported:
      return kStatusDeclined;
    default:
      return kStatusExecutionFailed;
  }
}

}  // namespace stmux::daemon

// Latency percentiles for the benchmarks, from samples in nanoseconds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace stmux::tools {

// Where the p-quantile (p in 0..1) of `count` (> 0) sorted samples stands,
// by nearest rank: the smallest sample that at least a share p of the
// samples do not exceed. With few samples it is the largest (p99 of 50
// samples is their maximum), never a value below the tail.
inline std::size_t nearestRank(std::size_t count, double p) {
  const double rank = std::ceil(p * static_cast<double>(count));
  return static_cast<std::size_t>(std::clamp(rank - 1, 0.0, static_cast<double>(count - 1)));
}

// That sample of `values`, in microseconds. `values` is taken by value: the
// selection reorders it, and callers' samples keep their order (a tenant's
// latencies, in step order, also place its steps in time).
inline double percentileUs(std::vector<std::uint32_t> values, double p) {
  if (values.empty()) return 0;
  const std::size_t index = nearestRank(values.size(), p);
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(index),
                   values.end());
  return values[index] / 1000.0;
}

}  // namespace stmux::tools

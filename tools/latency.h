// Latency percentiles for the benchmarks, from samples in nanoseconds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace stmux::tools {

// The p-quantile (p in 0..1) in microseconds. `values` is taken by value:
// the selection reorders it, and callers' samples keep their order (a tenant's
// latencies, in step order, also place its steps in time).
inline double percentileUs(std::vector<std::uint32_t> values, double p) {
  if (values.empty()) return 0;
  const auto index = static_cast<std::size_t>(p * static_cast<double>(values.size() - 1));
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(index),
                   values.end());
  return values[index] / 1000.0;
}

}  // namespace stmux::tools

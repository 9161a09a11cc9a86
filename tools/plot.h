// Line charts as PNG files, with no library beyond the standard one.
//
// stmux-bench plots throughput and p99 latency against the number of tenant
// processes, one line per mode. The project depends only on the CUDA toolkit,
// Boost headers, fmt and GoogleTest, so the rasterizer, the bitmap font and the
// PNG encoder (stored deflate blocks: bigger files, no zlib) all live here.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "stmux/status.h"

namespace stmux::tools {

struct Series {
  std::string label;  // legend text
  // (x, y), drawn in x order. A point whose y cannot be drawn (NaN, inf, or
  // non-positive on a log axis) breaks the line there; one whose x cannot be
  // drawn is dropped, since it has no place in x order to leave a gap at.
  std::vector<std::pair<double, double>> points;
  std::uint32_t rgb = 0;  // 0xRRGGBB
};

struct Chart {
  std::string title, x_label, y_label;
  bool log_x = false, log_y = false;  // base 10
  std::vector<Series> series;
};

// What writePng accepts for each of width and height.
inline constexpr int kMinImageSide = 64;
inline constexpr int kMaxImageSide = 8192;

// Renders the charts side by side, one panel of equal width each, into a
// width x height RGB PNG at path.
[[nodiscard]] Status writePng(const std::string& path, const std::vector<Chart>& charts,
                              int width = 1400, int height = 520);

// The same PNG as bytes; empty when width or height is outside
// kMinImageSide..kMaxImageSide.
std::vector<std::uint8_t> renderPng(const std::vector<Chart>& charts, int width, int height);

// A short tick label: 0.5, 20, 1.5k, 10M, 1e-5. step is the spacing between
// ticks, which decides how many digits it takes to tell neighbours apart.
// Exposed for the tests.
std::string formatTickLabel(double value, double step);

}  // namespace stmux::tools

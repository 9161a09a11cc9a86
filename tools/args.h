// The tools' numeric flag values, read one way: a value is taken whole or not
// at all, in range or not at all. What a tool says about a refused value
// (the flag, the value, what it accepts) stays the tool's.
#pragma once

#include <charconv>
#include <cmath>
#include <optional>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace stmux::tools {

// `text` as a whole number in [least, most], or nothing: decimal digits,
// with a leading '-' only for a signed T; no space, no '+', nothing after.
template <class T>
std::optional<T> wholeIn(std::string_view text, T least, T most) {
  T value{};
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || error != std::errc() || end != text.data() + text.size() || value < least ||
      value > most) {
    return std::nullopt;
  }
  return value;
}

// `text` as a finite decimal number in [least, most], or nothing: e.g. "2",
// "0.5", "1e-3"; not "nan", "inf", hex or a value with anything after.
inline std::optional<double> realIn(std::string_view text, double least, double most) {
  double value = 0;
  const auto [end, error] =
      std::from_chars(text.data(), text.data() + text.size(), value, std::chars_format::general);
  if (text.empty() || error != std::errc() || end != text.data() + text.size() ||
      !std::isfinite(value) || !(value >= least && value <= most)) {
    return std::nullopt;
  }
  return value;
}

// `text`'s comma-separated items, each read by `parse` (string_view to an
// optional), or nothing where `parse` refuses any item, an empty one too
// ("", "a,,b" and "a," each hold one).
template <class T, class Parse>
std::optional<std::vector<T>> splitList(std::string_view text, Parse&& parse) {
  std::vector<T> items;
  for (;;) {
    const std::size_t comma = text.find(',');
    auto parsed = parse(text.substr(0, comma));
    if (!parsed) return std::nullopt;
    items.push_back(std::move(*parsed));
    if (comma == std::string_view::npos) return items;
    text.remove_prefix(comma + 1);
  }
}

}  // namespace stmux::tools

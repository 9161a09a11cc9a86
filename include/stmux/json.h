// JSON in stmux is nlohmann/json (docs/ARCHITECTURE.md says why). This
// header holds only what the library leaves to its user:
//   - parseJson(): the strict read of a document from another process (the
//     daemon's status reply, a benchmark's results). The size is checked
//     before any byte is parsed and nesting is bounded, and a refusal is a
//     Result that says what was wrong and where, not an exception;
//   - dumpJson(): compact text that is valid JSON whatever bytes the strings
//     hold (client-supplied program names);
//   - lookups that never throw, for replies whose fields may be missing or of
//     another type.
#pragma once

#include <fmt/format.h>

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "stmux/status.h"

namespace stmux {

// Objects keep their members in the order they were written or read, so the
// status reply and stmux-bench's results read in the order the code lists
// them (nlohmann::json would sort them by name).
using Json = nlohmann::ordered_json;

inline constexpr int kJsonMaxDepth = 64;
// The daemon's status reply may be this long (kMaxStatusBytes, wire.h).
inline constexpr std::size_t kJsonMaxBytes = std::size_t{256} << 20;

namespace detail {

inline std::string jsonSize(std::size_t bytes) {
  constexpr std::size_t kMiB = std::size_t{1} << 20;
  if (bytes < kMiB) return fmt::format("{} bytes", bytes);
  if (bytes % kMiB == 0) return fmt::format("{} MiB", bytes / kMiB);
  return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / static_cast<double>(kMiB));
}

// Where the nesting first goes past `max_depth`. Only called once the parser
// has stopped there, so everything before that point is valid JSON and
// brackets inside strings are the only ones to skip.
inline std::size_t jsonTooDeepAt(std::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return i;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return text.size();
}

// The library's reason quotes the token it stopped in ("last read: '...'"),
// which may be a string as long as the document: the first 200 bytes of it.
inline std::string jsonShortened(std::string_view reason) {
  constexpr std::size_t kMax = 200;
  if (reason.size() <= kMax) return std::string(reason);
  std::size_t cut = kMax;
  while (cut > 0 && (static_cast<unsigned char>(reason[cut]) & 0xc0) == 0x80)
    --cut;  // not inside a UTF-8 sequence
  return fmt::format("{}... ({} bytes more)", reason.substr(0, cut), reason.size() - cut);
}

struct JsonTooDeep {};

}  // namespace detail

// Parses one JSON document (RFC 8259), surrounded by optional whitespace, as
// nlohmann/json does (UTF-8 checked, \u escapes and surrogate pairs decoded,
// of duplicate member names the last kept), and refuses, with a message:
//   - a text longer than `max_bytes`, before parsing it ("<what> is 300 MiB,
//     the limit is 256 MiB");
//   - nesting deeper than `max_depth`, so a hostile document cannot make a
//     tree that costs more to walk than to send;
//   - anything that is not JSON: "invalid JSON at byte N: <the library's
//     reason>", N counted from 0; a number too large for a double: "invalid
//     JSON: number overflow parsing '1e400'".
inline Result<Json> parseJson(std::string_view text, std::string_view what = "the document",
                              std::size_t max_bytes = kJsonMaxBytes,
                              int max_depth = kJsonMaxDepth) {
  if (text.size() > max_bytes) {
    return Status::error(fmt::format("{} is {}, the limit is {}", what,
                                     detail::jsonSize(text.size()), detail::jsonSize(max_bytes)));
  }
  // The library takes a NUL byte for the end of the input and would accept
  // "{}\0anything"; a JSON text holds none (in a string it must be escaped).
  if (const std::size_t nul = text.find('\0'); nul != std::string_view::npos) {
    return Status::error(fmt::format("invalid JSON at byte {}: a NUL byte", nul));
  }
  // The callback sees each container as it opens, at the depth of its
  // parent (the document itself at 0); throwing is the one way it can stop
  // the parse.
  const Json::parser_callback_t check = [max_depth](int depth, Json::parse_event_t event, Json&) {
    const bool opens =
        event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start;
    if (opens && depth >= max_depth) throw detail::JsonTooDeep{};
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), check);
  } catch (const Json::parse_error& error) {
    // The library counts bytes from 1; its message is "[json.exception.
    // parse_error.101] parse error at line L, column C: <reason>".
    std::string_view reason = error.what();
    if (const std::size_t colon = reason.find(": "); colon != std::string_view::npos) {
      reason.remove_prefix(colon + 2);
    }
    return Status::error(fmt::format("invalid JSON at byte {}: {}",
                                     error.byte == 0 ? 0 : error.byte - 1,
                                     detail::jsonShortened(reason)));
  } catch (const Json::exception& error) {
    // Only out_of_range.406, a number too large for a double, which the
    // library reports without its place.
    std::string_view reason = error.what();
    if (const std::size_t bracket = reason.find("] "); bracket != std::string_view::npos) {
      reason.remove_prefix(bracket + 2);
    }
    return Status::error(fmt::format("invalid JSON: {}", reason));
  } catch (const detail::JsonTooDeep&) {
    return Status::error(fmt::format("invalid JSON at byte {}: nesting deeper than {} levels",
                                     detail::jsonTooDeepAt(text, max_depth), max_depth));
  }
}

// Compact JSON text, ASCII only: other characters are \u escapes, so that a
// string a tenant chose (its name) cannot carry a terminal's control
// sequences (C1 controls are UTF-8 too) to whoever prints the text, as
// `stmuxctl status --json` does. Bytes in strings that are not UTF-8 become
// U+FFFD (the library would throw), so the text is always valid JSON; NaN
// and infinity become null, as JSON has neither.
inline std::string dumpJson(const Json& value) {
  return value.dump(-1, ' ', /*ensure_ascii=*/true, Json::error_handler_t::replace);
}

// The member named `key` of an object; nullptr when `object` is nullptr, not
// an object, or has no such member. (The library's at() throws and its
// operator[] on a const value asserts.)
inline const Json* jsonFind(const Json* object, std::string_view key) {
  if (object == nullptr || !object->is_object()) return nullptr;
  const auto it = object->find(key);
  return it == object->end() ? nullptr : &*it;
}
inline const Json* jsonFind(const Json& object, std::string_view key) {
  return jsonFind(&object, key);
}

// The index-th element of an array; nullptr when `array` is nullptr, not an
// array, or shorter.
inline const Json* jsonAt(const Json* array, std::size_t index) {
  if (array == nullptr || !array->is_array() || index >= array->size()) return nullptr;
  return &(*array)[index];
}

// The value as a double (an integer or a floating-point number), or
// `fallback` when it is nullptr or not a number.
inline double jsonNumber(const Json* value, double fallback = 0) {
  return value != nullptr && value->is_number() ? value->get<double>() : fallback;
}

// The value, or `fallback` when it is nullptr or not a string.
inline std::string_view jsonString(const Json* value, std::string_view fallback = {}) {
  return value != nullptr && value->is_string()
             ? std::string_view(value->get_ref<const Json::string_t&>())
             : fallback;
}

// The value, or `fallback` when it is nullptr or not a boolean.
inline bool jsonBool(const Json* value, bool fallback = false) {
  return value != nullptr && value->is_boolean() ? value->get<bool>() : fallback;
}

}  // namespace stmux

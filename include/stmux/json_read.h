// A small, strict JSON reader (RFC 8259): stmuxctl reads the daemon's status
// reply with it, tests read what JsonWriter (json.h) writes.
//
// Strict because its input crosses a process boundary: a document that is not
// JSON is refused with what was wrong and the byte offset where it was found,
// rather than half-read. Input must be UTF-8; \uXXXX escapes, surrogate pairs
// included, become UTF-8. Nesting deeper than kJsonMaxDepth is refused, so a
// hostile document cannot exhaust the stack of the recursive parser.
#pragma once

#include <fmt/format.h>

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "stmux/status.h"

namespace stmux {

inline constexpr int kJsonMaxDepth = 64;

class JsonValue {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  JsonValue() = default;
  static JsonValue boolean(bool flag) {
    JsonValue v(Type::kBool);
    v.bool_ = flag;
    return v;
  }
  static JsonValue number(double number) {
    JsonValue v(Type::kNumber);
    v.number_ = number;
    return v;
  }
  static JsonValue string(std::string text) {
    JsonValue v(Type::kString);
    v.string_ = std::move(text);
    return v;
  }
  static JsonValue array() { return JsonValue(Type::kArray); }
  static JsonValue object() { return JsonValue(Type::kObject); }

  Type type() const { return type_; }
  bool isNull() const { return type_ == Type::kNull; }
  bool isBool() const { return type_ == Type::kBool; }
  bool isNumber() const { return type_ == Type::kNumber; }
  bool isString() const { return type_ == Type::kString; }
  bool isArray() const { return type_ == Type::kArray; }
  bool isObject() const { return type_ == Type::kObject; }

  // The value, or `fallback` when it is of another type.
  bool asBool(bool fallback = false) const { return isBool() ? bool_ : fallback; }
  double asNumber(double fallback = 0) const { return isNumber() ? number_ : fallback; }
  std::string_view asString(std::string_view fallback = {}) const {
    return isString() ? std::string_view(string_) : fallback;
  }

  // Elements of an array, members of an object; 0 for anything else.
  std::size_t size() const { return items_.size(); }
  // The index-th element or member value; nullptr when out of range.
  const JsonValue* at(std::size_t index) const {
    return index < items_.size() ? &items_[index] : nullptr;
  }
  // The index-th member's key of an object, in document order.
  std::string_view keyAt(std::size_t index) const {
    return index < keys_.size() ? std::string_view(keys_[index]) : std::string_view();
  }
  // The first member named `key` of an object; nullptr when there is none or
  // this is not an object. (RFC 8259 leaves duplicate names to the reader.)
  const JsonValue* find(std::string_view key) const {
    for (std::size_t i = 0; i < keys_.size(); ++i) {
      if (keys_[i] == key) return &items_[i];
    }
    return nullptr;
  }

  void push(JsonValue item) { items_.push_back(std::move(item)); }
  void add(std::string key, JsonValue item) {
    keys_.push_back(std::move(key));
    items_.push_back(std::move(item));
  }

 private:
  explicit JsonValue(Type type) : type_(type) {}

  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<std::string> keys_;  // an object's keys, parallel to items_
  std::vector<JsonValue> items_;   // an array's elements or an object's values
};

namespace detail {

#define STMUX_JSON_TRY(expr)               \
  do {                                     \
    ::stmux::Status json_try_ = (expr);    \
    if (!json_try_.ok()) return json_try_; \
  } while (0)

// Recursive descent. A parse error is an expected outcome, so it is a Status,
// like every other failure in stmux, not an exception.
class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : text_(text) {}

  Result<JsonValue> document() {
    skipSpace();
    JsonValue root;
    STMUX_JSON_TRY(value(root, 0));
    skipSpace();
    if (pos_ != text_.size()) return fail("unexpected data after the document");
    return root;
  }

 private:
  Status fail(std::string_view what) const { return failAt(pos_, what); }
  Status failAt(std::size_t offset, std::string_view what) const {
    return Status::error(fmt::format("invalid JSON at byte {}: {}", offset, what));
  }
  // What is at the current position, for "expected X, found Y".
  std::string found() const {
    if (pos_ >= text_.size()) return "end of input";
    const auto c = static_cast<unsigned char>(text_[pos_]);
    if (c >= 0x20 && c < 0x7f) return fmt::format("'{}'", static_cast<char>(c));
    return fmt::format("byte {:#04x}", c);
  }
  Status expected(std::string_view what) const {
    return fail(fmt::format("expected {}, found {}", what, found()));
  }

  bool atEnd() const { return pos_ >= text_.size(); }
  char peek() const { return atEnd() ? '\0' : text_[pos_]; }

  void skipSpace() {
    while (!atEnd()) {
      const char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  bool literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Status value(JsonValue& out, int depth) {
    switch (peek()) {
      case '{':
        return object(out, depth + 1);
      case '[':
        return array(out, depth + 1);
      case '"': {
        std::string text;
        STMUX_JSON_TRY(string(text));
        out = JsonValue::string(std::move(text));
        return Status::okStatus();
      }
      case 't':
        if (!literal("true")) return fail("unknown literal; accepted: true, false, null");
        out = JsonValue::boolean(true);
        return Status::okStatus();
      case 'f':
        if (!literal("false")) return fail("unknown literal; accepted: true, false, null");
        out = JsonValue::boolean(false);
        return Status::okStatus();
      case 'n':
        if (!literal("null")) return fail("unknown literal; accepted: true, false, null");
        out = JsonValue();
        return Status::okStatus();
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return number(out);
        return expected("a value");
    }
  }

  Status object(JsonValue& out, int depth) {
    if (depth > kJsonMaxDepth) {
      return fail(fmt::format("nesting deeper than {} levels", kJsonMaxDepth));
    }
    out = JsonValue::object();
    ++pos_;  // '{'
    skipSpace();
    if (peek() == '}') {
      ++pos_;
      return Status::okStatus();
    }
    while (true) {
      if (peek() != '"') return expected("a member name in double quotes");
      std::string key;
      STMUX_JSON_TRY(string(key));
      skipSpace();
      if (peek() != ':') return expected("':' after a member name");
      ++pos_;
      skipSpace();
      JsonValue member;
      STMUX_JSON_TRY(value(member, depth));
      out.add(std::move(key), std::move(member));
      skipSpace();
      if (peek() == '}') {
        ++pos_;
        return Status::okStatus();
      }
      if (peek() != ',') return expected("',' or '}' after an object member");
      ++pos_;
      skipSpace();
    }
  }

  Status array(JsonValue& out, int depth) {
    if (depth > kJsonMaxDepth) {
      return fail(fmt::format("nesting deeper than {} levels", kJsonMaxDepth));
    }
    out = JsonValue::array();
    ++pos_;  // '['
    skipSpace();
    if (peek() == ']') {
      ++pos_;
      return Status::okStatus();
    }
    while (true) {
      JsonValue element;
      STMUX_JSON_TRY(value(element, depth));
      out.push(std::move(element));
      skipSpace();
      if (peek() == ']') {
        ++pos_;
        return Status::okStatus();
      }
      if (peek() != ',') return expected("',' or ']' after an array element");
      ++pos_;
      skipSpace();
    }
  }

  // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  Status number(JsonValue& out) {
    const std::size_t start = pos_;
    auto digits = [&] {
      const std::size_t first = pos_;
      while (!atEnd() && text_[pos_] >= '0' && text_[pos_] <= '9')
        ++pos_;
      return pos_ - first;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (peek() >= '0' && peek() <= '9') return fail("a number must not have a leading zero");
    } else if (digits() == 0) {
      return expected("a digit");
    }
    if (peek() == '.') {
      ++pos_;
      if (digits() == 0) return expected("a digit after the decimal point");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) return expected("a digit in the exponent");
    }
    const std::string_view text = text_.substr(start, pos_ - start);
    double number = 0;
    // from_chars: locale-independent, unlike strtod. The grammar is checked
    // above, so the only failure left is a magnitude a double cannot hold.
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), number);
    if (ec == std::errc::result_out_of_range) {
      if (!underflows(text)) return failAt(start, "the number is too large for a double");
      number = text[0] == '-' ? -0.0 : 0.0;
    } else if (ec != std::errc() || end != text.data() + text.size()) {
      return failAt(start, "the number cannot be read");
    }
    out = JsonValue::number(number);
    return Status::okStatus();
  }

  // Whether an out-of-range number underflows (rounds to zero) rather than
  // overflows: the decimal exponent of its first significant digit is < 0.
  static bool underflows(std::string_view text) {
    if (text[0] == '-') text.remove_prefix(1);
    const std::size_t e = text.find_first_of("eE");
    const std::string_view mantissa = text.substr(0, e);
    const std::size_t dot = mantissa.find('.');
    const std::string_view integer = mantissa.substr(0, dot);
    const std::string_view fraction =
        dot == std::string_view::npos ? std::string_view() : mantissa.substr(dot + 1);
    std::int64_t scale;
    if (const std::size_t first = integer.find_first_not_of('0'); first != std::string_view::npos) {
      scale = static_cast<std::int64_t>(integer.size() - 1 - first);
    } else if (const std::size_t first = fraction.find_first_not_of('0');
               first != std::string_view::npos) {
      scale = -static_cast<std::int64_t>(first + 1);
    } else {
      return true;  // zero
    }
    std::int64_t exponent = 0;
    bool negative = false;
    if (e != std::string_view::npos) {
      std::string_view digits = text.substr(e + 1);
      if (digits[0] == '+' || digits[0] == '-') {
        negative = digits[0] == '-';
        digits.remove_prefix(1);
      }
      for (char c : digits) {
        // Saturate: far beyond any double either way, and no overflow.
        if (exponent < 1'000'000'000) exponent = exponent * 10 + (c - '0');
      }
    }
    return scale + (negative ? -exponent : exponent) < 0;
  }

  Status string(std::string& out) {
    ++pos_;  // '"'
    while (true) {
      if (atEnd()) return fail("unterminated string");
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return Status::okStatus();
      }
      if (c < 0x20) {
        return fail(fmt::format("control character {:#04x} in a string must be escaped", c));
      }
      if (c == '\\') {
        STMUX_JSON_TRY(escape(out));
      } else if (c < 0x80) {
        out += static_cast<char>(c);
        ++pos_;
      } else {
        STMUX_JSON_TRY(utf8(out));
      }
    }
  }

  Status escape(std::string& out) {
    const std::size_t start = pos_;
    ++pos_;  // '\\'
    if (atEnd()) return fail("unterminated string");
    const char c = text_[pos_++];
    switch (c) {
      case '"':
        out += '"';
        return Status::okStatus();
      case '\\':
        out += '\\';
        return Status::okStatus();
      case '/':
        out += '/';
        return Status::okStatus();
      case 'b':
        out += '\b';
        return Status::okStatus();
      case 'f':
        out += '\f';
        return Status::okStatus();
      case 'n':
        out += '\n';
        return Status::okStatus();
      case 'r':
        out += '\r';
        return Status::okStatus();
      case 't':
        out += '\t';
        return Status::okStatus();
      case 'u':
        break;
      default:
        return failAt(start, "unknown escape; accepted: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX");
    }
    std::uint32_t code = 0;
    STMUX_JSON_TRY(hex4(code));
    if (code >= 0xdc00 && code <= 0xdfff) {
      return failAt(start, "\\u escape is a low surrogate without a high one before it");
    }
    if (code >= 0xd800 && code <= 0xdbff) {
      if (text_.substr(pos_, 2) != "\\u") {
        return failAt(start, "\\u escape is a high surrogate without a low one after it");
      }
      pos_ += 2;
      std::uint32_t low = 0;
      STMUX_JSON_TRY(hex4(low));
      if (low < 0xdc00 || low > 0xdfff) {
        return failAt(start, "\\u escape is a high surrogate without a low one after it");
      }
      code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
    }
    appendUtf8(out, code);
    return Status::okStatus();
  }

  Status hex4(std::uint32_t& code) {
    for (int i = 0; i < 4; ++i) {
      const char c = peek();
      std::uint32_t digit;
      if (c >= '0' && c <= '9') {
        digit = static_cast<std::uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        digit = static_cast<std::uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        digit = static_cast<std::uint32_t>(c - 'A' + 10);
      } else {
        return expected("a hex digit in a \\u escape");
      }
      code = code * 16 + digit;
      ++pos_;
    }
    return Status::okStatus();
  }

  static void appendUtf8(std::string& out, std::uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xc0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xe0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    }
  }

  // One multi-byte UTF-8 sequence, copied through after checking it is the
  // shortest encoding of a scalar value (no overlong forms, no surrogates,
  // nothing above U+10FFFF).
  Status utf8(std::string& out) {
    const auto lead = static_cast<unsigned char>(text_[pos_]);
    std::size_t length;
    std::uint32_t code;
    if (lead >= 0xc2 && lead <= 0xdf) {
      length = 2;
      code = lead & 0x1f;
    } else if (lead >= 0xe0 && lead <= 0xef) {
      length = 3;
      code = lead & 0x0f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      length = 4;
      code = lead & 0x07;
    } else {
      return fail(fmt::format("byte {:#04x} cannot start a UTF-8 sequence", lead));
    }
    for (std::size_t i = 1; i < length; ++i) {
      const std::size_t at = pos_ + i;
      const auto next = at < text_.size() ? static_cast<unsigned char>(text_[at]) : 0;
      if ((next & 0xc0) != 0x80) return fail("truncated UTF-8 sequence");
      code = (code << 6) | (next & 0x3f);
    }
    static constexpr std::uint32_t kShortest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < kShortest[length]) return fail("overlong UTF-8 sequence");
    if (code >= 0xd800 && code <= 0xdfff) return fail("UTF-8 sequence encodes a surrogate");
    if (code > 0x10ffff) return fail("UTF-8 sequence encodes a value above U+10FFFF");
    out.append(text_.substr(pos_, length));
    pos_ += length;
    return Status::okStatus();
  }

  std::string_view text_;
  std::size_t pos_ = 0;
};

#undef STMUX_JSON_TRY

}  // namespace detail

// Parses one JSON document (RFC 8259), surrounded by optional whitespace.
inline Result<JsonValue> parseJson(std::string_view text) {
  return detail::JsonParser(text).document();
}

}  // namespace stmux

// Fuzzes the JSON the tools read from the daemon (include/stmux/json_read.h:
// stmuxctl and stmux-bench parse its status reply) and the writer that makes
// it from client-supplied strings (include/stmux/json.h: program names).
//
// For any input:
//   - parseJson() accepts or refuses it with a message; what it accepts,
//     written again with JsonWriter, parses to the same tree (numbers to six
//     significant digits, as the writer keeps them);
//   - the input as a string value, written by JsonWriter, is always valid
//     JSON; it reads back as itself when it is ASCII, and what was read
//     (invalid UTF-8 now U+FFFD) reads back unchanged when written again.
#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>

#include "stmux/json.h"
#include "stmux/json_read.h"
#include "tests/fuzz/fuzz_bytes.h"

namespace stmux::fuzz {
namespace {

void write(const JsonValue& value, JsonWriter& out) {
  switch (value.type()) {
    case JsonValue::Type::kNull:
      out.raw("null");
      break;
    case JsonValue::Type::kBool:
      out.value(value.asBool());
      break;
    case JsonValue::Type::kNumber:
      out.value(value.asNumber());
      break;
    case JsonValue::Type::kString:
      out.value(value.asString());
      break;
    case JsonValue::Type::kArray:
      out.beginArray();
      for (std::size_t i = 0; i < value.size(); ++i)
        write(*value.at(i), out);
      out.endArray();
      break;
    case JsonValue::Type::kObject:
      out.beginObject();
      for (std::size_t i = 0; i < value.size(); ++i) {
        out.key(value.keyAt(i));
        write(*value.at(i), out);
      }
      out.endObject();
      break;
  }
}

bool sameNumber(double a, double b) {
  return std::fabs(a - b) <= 1e-5 * std::fabs(a) + 1e-300;
}

bool same(const JsonValue& a, const JsonValue& b) {
  if (a.type() != b.type() || a.size() != b.size()) return false;
  switch (a.type()) {
    case JsonValue::Type::kNull:
      return true;
    case JsonValue::Type::kBool:
      return a.asBool() == b.asBool();
    case JsonValue::Type::kNumber:
      return sameNumber(a.asNumber(), b.asNumber());
    case JsonValue::Type::kString:
      return a.asString() == b.asString();
    case JsonValue::Type::kArray:
    case JsonValue::Type::kObject:
      for (std::size_t i = 0; i < a.size(); ++i) {
        if (a.keyAt(i) != b.keyAt(i) || !same(*a.at(i), *b.at(i))) return false;
      }
      // find() agrees with the first member of that name.
      if (a.isObject() && a.size() > 0) return a.find(a.keyAt(0)) == a.at(0);
      return true;
  }
  return false;
}

void writeSeeds(const char* dir) {
  auto text = [dir](const char* name, std::string_view json) {
    writeSeed(dir, name, std::vector<std::uint8_t>(json.begin(), json.end()));
  };
  // What stmuxd answers a status query with (daemon/server.cc), abridged.
  text("status", R"({"daemon":{"pid":4242,"protocol":1,"uptime_s":12.5,"draining":false},)"
                 R"("clients":[{"id":1,"pid":77,"uid":1000,"name":"python3","attached_s":3.25,)"
                 R"("requests":120,"forwarded":118,"failed":0,"fallbacks":{"no_daemon":2}}],)"
                 R"("gpus":[{"index":0,"uuid":"GPU-00000000-0000-0000-0000-000000000000",)"
                 R"("name":"NVIDIA H200","broken":false,"queued":0,"in_flight":1,)"
                 R"("mean_batch":7.5,"launches":{"full":1,"window":3}}]})");
  text("escapes", R"(["\"\\\/\b\f\n\r\t", "\u00e9\ud83d\ude00", "caf)"
                  "\xc3\xa9"
                  R"(", -0.0, 1e-400, 2.5E+3, null, true])");
  text("name", "a program name\x01\x7f\xff\xc3");
}

}  // namespace
}  // namespace stmux::fuzz

using namespace stmux;
using namespace stmux::fuzz;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  startTarget(writeSeeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);

  auto parsed = parseJson(input);
  if (parsed) {
    JsonWriter out;
    write(parsed.value(), out);
    auto again = parseJson(out.str());
    STMUX_FUZZ_CHECK(again.ok());
    STMUX_FUZZ_CHECK(same(parsed.value(), again.value()));
  } else {
    STMUX_FUZZ_CHECK(parsed.message().rfind("invalid JSON at byte ", 0) == 0);
  }

  JsonWriter name;
  name.value(input);
  auto read = parseJson(name.str());
  STMUX_FUZZ_CHECK(read.ok() && read->isString());
  bool ascii = true;
  for (unsigned char c : input)
    ascii &= c < 0x80;
  if (ascii) STMUX_FUZZ_CHECK(read->asString() == input);
  // Once through, the string is valid UTF-8 and stays what it is.
  JsonWriter rewritten;
  rewritten.value(read->asString());
  auto reread = parseJson(rewritten.str());
  STMUX_FUZZ_CHECK(reread.ok() && reread->asString() == read->asString());
  return 0;
}

// Fuzzes the JSON the tools read from the daemon (include/stmux/json.h's
// parseJson over nlohmann/json: stmuxctl and stmux-bench parse its status
// reply with it) and the dump that writes it from client-supplied strings
// (dumpJson: program names).
//
// For any input:
//   - parseJson() accepts it or refuses it with a message that says so;
//     what it accepts, dumped, parses to the same tree and dumps to the same
//     text;
//   - with a nesting limit of 4, it accepts the same tree or refuses for the
//     nesting, saying where;
//   - the input as a string value, dumped, is always valid JSON; it reads
//     back as itself when it is ASCII, and what was read (invalid UTF-8 now
//     U+FFFD) reads back unchanged when dumped again.
#include <cstdlib>
#include <string>
#include <string_view>

#include "stmux/json.h"
#include "tests/fuzz/fuzz_bytes.h"

namespace stmux::fuzz {
namespace {

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
    const std::string text = dumpJson(parsed.value());
    auto again = parseJson(text);
    STMUX_FUZZ_CHECK(again.ok());
    STMUX_FUZZ_CHECK(again.value() == parsed.value());
    STMUX_FUZZ_CHECK(dumpJson(again.value()) == text);
  } else {
    STMUX_FUZZ_CHECK(parsed.message().rfind("invalid JSON", 0) == 0);
  }

  auto shallow = parseJson(input, "the input", kJsonMaxBytes, 4);
  if (shallow) {
    STMUX_FUZZ_CHECK(parsed.ok() && shallow.value() == parsed.value());
  } else if (parsed) {
    const std::string& message = shallow.message();
    STMUX_FUZZ_CHECK(message.rfind("invalid JSON at byte ", 0) == 0);
    STMUX_FUZZ_CHECK(message.find(": nesting deeper than 4 levels") != std::string::npos);
    const std::size_t at = std::strtoul(message.c_str() + 21, nullptr, 10);
    STMUX_FUZZ_CHECK(at < input.size() && (input[at] == '[' || input[at] == '{'));
  }

  Json name = std::string(input);
  auto read = parseJson(dumpJson(name));
  STMUX_FUZZ_CHECK(read.ok() && read->is_string());
  bool ascii = true;
  for (unsigned char c : input)
    ascii &= c < 0x80;
  if (ascii) STMUX_FUZZ_CHECK(read.value() == input);
  // Once through, the string is valid UTF-8 and stays what it is.
  auto reread = parseJson(dumpJson(read.value()));
  STMUX_FUZZ_CHECK(reread.ok() && reread.value() == read.value());
  return 0;
}

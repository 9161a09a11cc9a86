// stmux's part of JSON (include/stmux/json.h) over nlohmann/json: the strict
// parse refuses what is too large, too deep or not JSON, saying what and
// where; dumpJson() always writes valid JSON, which parses back to what was
// written; the lookups never throw.
#include "stmux/json.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace stmux {
namespace {

Json parsed(std::string_view text) {
  auto result = parseJson(text);
  EXPECT_TRUE(result.ok()) << "'" << text << "': " << result.message();
  return result.ok() ? std::move(result).value() : Json();
}

TEST(Json, Scalars) {
  EXPECT_TRUE(parsed("null").is_null());
  EXPECT_EQ(parsed("true"), true);
  EXPECT_EQ(parsed("false"), false);
  EXPECT_EQ(parsed("0"), 0);
  EXPECT_TRUE(parsed("42").is_number_integer()) << "integers stay integers";
  EXPECT_EQ(parsed("42"), 42);
  EXPECT_EQ(parsed("-17"), -17);
  EXPECT_EQ(parsed("9007199254740993"), std::uint64_t{9007199254740993}) << "exact past 2^53";
  EXPECT_TRUE(parsed("30.8").is_number_float());
  EXPECT_EQ(parsed("30.8"), 30.8);
  EXPECT_EQ(parsed("1.5e3"), 1500.0);
  EXPECT_EQ(parsed("-2.25E-2"), -0.0225);
  EXPECT_EQ(parsed("1E+2"), 100.0);
  EXPECT_EQ(parsed("1.7976931348623157e308"), std::numeric_limits<double>::max());
  // -0 is the integer 0; -0.0 keeps its sign.
  EXPECT_TRUE(std::signbit(parsed("-0.0").get<double>()));
  // Too small for a double rounds to zero, keeping its sign; too large is an
  // error (InvalidDocuments).
  EXPECT_EQ(parsed("1e-400"), 0.0);
  EXPECT_EQ(parsed("0.000000000000000000000001e-380"), 0.0);
  EXPECT_TRUE(std::signbit(parsed("-1e-400").get<double>()));
  EXPECT_EQ(parsed("\"text\""), "text");
  EXPECT_EQ(parsed(" \t\r\n 7 \n"), 7) << "whitespace around the document";
}

TEST(Json, LookupsFallBackOnTheWrongType) {
  const Json v = parsed(R"({"n":1,"s":"x","a":[1,2],"b":true,"f":2.5})");
  EXPECT_EQ(jsonNumber(jsonFind(v, "s"), -1), -1);
  EXPECT_EQ(jsonNumber(jsonFind(v, "n"), -1), 1);
  EXPECT_EQ(jsonNumber(jsonFind(v, "f"), -1), 2.5);
  EXPECT_EQ(jsonString(jsonFind(v, "n"), "none"), "none");
  EXPECT_EQ(jsonString(jsonFind(v, "s"), "none"), "x");
  EXPECT_TRUE(jsonBool(jsonFind(v, "n"), true));
  EXPECT_FALSE(jsonBool(jsonFind(v, "s")));
  EXPECT_TRUE(jsonBool(jsonFind(v, "b")));
  EXPECT_EQ(jsonFind(v, "missing"), nullptr);
  EXPECT_EQ(jsonFind(jsonFind(v, "a"), "0"), nullptr) << "find on an array";
  EXPECT_EQ(jsonFind(nullptr, "n"), nullptr);
  EXPECT_EQ(jsonAt(jsonFind(v, "a"), 2), nullptr);
  EXPECT_EQ(jsonAt(jsonFind(v, "n"), 0), nullptr) << "at on a number";
  EXPECT_EQ(jsonAt(&v, 0), nullptr) << "at on an object";
  EXPECT_EQ(jsonAt(nullptr, 0), nullptr);
  EXPECT_EQ(jsonNumber(jsonAt(jsonFind(v, "a"), 1)), 2);
  EXPECT_EQ(jsonNumber(nullptr, 7), 7);
  EXPECT_EQ(jsonString(nullptr, "none"), "none");
  EXPECT_FALSE(jsonBool(nullptr));
}

TEST(Json, ObjectsKeepTheirOrder) {
  const Json v = parsed(R"({ "z" : 1 , "a":{"inner":[true,null,{}]}, "m":[] , "z":2})");
  ASSERT_TRUE(v.is_object());
  // Of duplicate names (RFC 8259 leaves them to the reader) the library keeps
  // the last value, in the first one's place.
  ASSERT_EQ(v.size(), 3u);
  auto it = v.begin();
  EXPECT_EQ((it++).key(), "z");
  EXPECT_EQ((it++).key(), "a");
  EXPECT_EQ((it++).key(), "m");
  EXPECT_EQ(v.at("z"), 2);
  const Json* inner = jsonFind(jsonFind(v, "a"), "inner");
  ASSERT_NE(inner, nullptr);
  ASSERT_TRUE(inner->is_array());
  ASSERT_EQ(inner->size(), 3u);
  EXPECT_EQ((*inner)[0], true);
  EXPECT_TRUE((*inner)[1].is_null());
  EXPECT_TRUE((*inner)[2].is_object());
  EXPECT_EQ((*inner)[2].size(), 0u);
  EXPECT_TRUE(v.at("m").is_array());
  EXPECT_EQ(v.at("m").size(), 0u);
  // Written, members come out in the order they were added, not sorted.
  Json written;
  written["zeta"] = 1;
  written["alpha"] = 2;
  EXPECT_EQ(dumpJson(written), R"({"zeta":1,"alpha":2})");
}

TEST(Json, EscapesBecomeUtf8) {
  EXPECT_EQ(parsed(R"("\" \\ \/ \b \f \n \r \t")"), "\" \\ / \b \f \n \r \t");
  EXPECT_EQ(parsed(R"("\u0041\u00e9\u20AC")"), "A\xc3\xa9\xe2\x82\xac");
  EXPECT_EQ(parsed(R"("\ud83d\ude00")"), "\xf0\x9f\x98\x80") << "a surrogate pair";
  EXPECT_EQ(parsed(R"("\uDBFF\uDFFF")"), "\xf4\x8f\xbf\xbf") << "U+10FFFF";
  EXPECT_EQ(parsed(R"("a\u0000b")"), std::string("a\0b", 3));
  // UTF-8 in the input passes through unchanged.
  EXPECT_EQ(parsed("\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(parsed(R"({"k\u00e9y":1})").begin().key(), "k\xc3\xa9y") << "escapes in member names";
}

TEST(Json, ReadsBackWhatDumpJsonWrites) {
  std::string every_byte;
  for (int c = 1; c < 0x80; ++c)
    every_byte += static_cast<char>(c);
  const std::string unicode = "GPU \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80";

  Json json;
  json["ascii"] = every_byte;
  json["unicode"] = unicode;
  json["empty"] = "";
  json["int"] = std::int64_t{-9007199254740992};
  json["big"] = std::uint64_t{1} << 63;
  json["double"] = 30.8;
  json["whole"] = 2.0;
  json["tiny"] = 1.5e-300;
  json["nan"] = std::nan("");
  json["inf"] = std::numeric_limits<double>::infinity();
  json["yes"] = true;
  json["no"] = false;
  json["list"] = Json::array({1, "two", Json::object({{"three", 3.0}}), Json::array()});
  json["nested"]["spliced"]["deep"] = Json::array({Json::array({Json::array({"x"})})});

  const std::string text = dumpJson(json);
  EXPECT_NE(text.find(R"("yes":true,"no":false,"list":[1,"two",{"three":3.0},[]],)"),
            std::string::npos)
      << "compact, in the order written: " << text;
  // Integers are written as integers, doubles as doubles (shortest form
  // that reads back the same), non-finite doubles as null.
  EXPECT_NE(text.find(R"("int":-9007199254740992,)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"("big":9223372036854775808,)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"("double":30.8,)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"("whole":2.0,)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"("nan":null,"inf":null,)"), std::string::npos) << text;

  auto result = parseJson(text);
  ASSERT_TRUE(result.ok()) << result.message() << "\n" << text;
  const Json& v = result.value();
  EXPECT_EQ(v.at("ascii"), every_byte);
  EXPECT_EQ(v.at("unicode"), unicode);
  EXPECT_EQ(v.at("empty"), "");
  EXPECT_EQ(v.at("int"), -9007199254740992);
  EXPECT_EQ(v.at("big"), std::uint64_t{1} << 63);
  EXPECT_EQ(v.at("double"), 30.8);
  EXPECT_TRUE(v.at("whole").is_number_float());
  EXPECT_EQ(v.at("tiny"), 1.5e-300);
  EXPECT_TRUE(v.at("nan").is_null()) << "JSON has no NaN";
  EXPECT_TRUE(v.at("inf").is_null());
  EXPECT_EQ(v.at("yes"), true);
  EXPECT_EQ(v.at("no"), false);
  EXPECT_EQ(v.at("list"), json.at("list"));
  EXPECT_EQ(v.at("nested").at("spliced").at("deep")[0][0][0], "x");
  EXPECT_EQ(v.begin().key(), "ascii");
  EXPECT_EQ((--v.end()).key(), "nested");
}

// Program names are whatever bytes a client sent: what is not UTF-8 becomes
// U+FFFD (the library would throw), so the text is JSON and reads back.
TEST(Json, DumpJsonReplacesWhatIsNotUtf8) {
  Json json;
  json["name"] = std::string("ok\xff\xc3(\xed\xa0\x80\xe2\x82");
  const std::string text = dumpJson(json);
  auto read = parseJson(text);
  ASSERT_TRUE(read.ok()) << read.message() << "\n" << text;
  const std::string name = read->at("name");
  EXPECT_EQ(name.rfind("ok\xef\xbf\xbd", 0), 0u) << name;
  EXPECT_NE(name.find('('), std::string::npos) << name;
  EXPECT_EQ(name.find('\xff'), std::string::npos) << name;
}

// A name a tenant chose goes out as ASCII: U+009B (CSI, a terminal's control
// sequence start, which is UTF-8 too) reached `stmuxctl status --json`'s
// terminal raw. It reads back the same.
TEST(Json, DumpJsonWritesAsciiOnly) {
  Json json;
  json["name"] = std::string(
      "ev\xc2\x9b"
      "31mil \xc3\xa9");
  const std::string text = dumpJson(json);
  EXPECT_TRUE(std::all_of(text.begin(), text.end(), [](char c) {
    return static_cast<unsigned char>(c) < 0x80;
  })) << text;
  EXPECT_NE(text.find("\\u009b"), std::string::npos) << text;
  auto read = parseJson(text);
  ASSERT_TRUE(read.ok()) << read.message();
  EXPECT_EQ(read->at("name"), json["name"]);
}

TEST(Json, NestingIsLimited) {
  const auto nested = [](int depth) {
    return std::string(static_cast<std::size_t>(depth), '[') +
           std::string(static_cast<std::size_t>(depth), ']');
  };
  EXPECT_TRUE(parseJson(nested(kJsonMaxDepth)).ok());
  auto deep = parseJson(nested(kJsonMaxDepth + 1));
  ASSERT_FALSE(deep.ok());
  EXPECT_EQ(deep.message(), "invalid JSON at byte 64: nesting deeper than 64 levels");
  // Far deeper than any stack would take: refused, not a crash.
  EXPECT_FALSE(parseJson(std::string(1'000'000, '[')).ok());
  std::string objects;
  for (int i = 0; i <= kJsonMaxDepth; ++i)
    objects += R"({"a":)";
  auto deep_objects = parseJson(objects + "1" + std::string(kJsonMaxDepth + 1, '}'));
  ASSERT_FALSE(deep_objects.ok());
  EXPECT_EQ(deep_objects.message(),
            fmt::format("invalid JSON at byte {}: nesting deeper than 64 levels", 5 * 64));
  // Brackets in strings are not nesting, and the limit is the caller's.
  EXPECT_TRUE(parseJson(R"([["[[[[", "\"[{"]])", "", kJsonMaxBytes, 2).ok());
  auto three = parseJson(R"([["[[[[", "\"[{", [[]]]])", "", kJsonMaxBytes, 2);
  ASSERT_FALSE(three.ok());
  EXPECT_EQ(three.message(), "invalid JSON at byte 18: nesting deeper than 2 levels");
}

TEST(Json, SizeIsCheckedBeforeParsing) {
  auto small = parseJson("[1,2,3]", "the reply", 6);
  ASSERT_FALSE(small.ok());
  EXPECT_EQ(small.message(), "the reply is 7 bytes, the limit is 6 bytes");
  EXPECT_TRUE(parseJson("[1,2,3]", "the reply", 7).ok());
  // Refused for its size even though it is not JSON either: nothing is read.
  const std::string large(3 << 19, '[');
  auto refused = parseJson(large, "the status reply", std::size_t{1} << 20);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.message(), "the status reply is 1.5 MiB, the limit is 1 MiB");
  auto whole = parseJson(std::string(2 << 20, ' '), "the status reply", std::size_t{1} << 20);
  EXPECT_EQ(whole.message(), "the status reply is 2 MiB, the limit is 1 MiB");
}

struct Invalid {
  std::string text;
  std::size_t offset;  // npos: the library does not say where
  std::string says;
};

class JsonInvalid : public ::testing::TestWithParam<Invalid> {};

TEST_P(JsonInvalid, IsRefusedWithWhereAndWhy) {
  const Invalid& c = GetParam();
  auto result = parseJson(c.text);
  ASSERT_FALSE(result.ok()) << "'" << c.text << "' was accepted";
  const std::string where = c.offset == std::string::npos
                                ? "invalid JSON: "
                                : "invalid JSON at byte " + std::to_string(c.offset) + ": ";
  EXPECT_EQ(result.message().rfind(where, 0), 0u)
      << "'" << c.text << "': " << result.message() << "; wanted " << where;
  EXPECT_NE(result.message().find(c.says), std::string::npos)
      << "'" << c.text << "': " << result.message() << "; wanted '" << c.says << "'";
}

// The offsets and reasons are nlohmann/json's (3.11): the byte where it
// stopped, which for a token is often its end.
INSTANTIATE_TEST_SUITE_P(
    Documents, JsonInvalid,
    ::testing::Values(
        Invalid{"", 0, "unexpected end of input; expected '[', '{', or a literal"},
        Invalid{"   ", 3, "unexpected end of input"},
        Invalid{"{", 1, "parsing object key - unexpected end of input; expected string literal"},
        Invalid{R"({"a" 1})", 5, "unexpected number literal; expected ':'"},
        Invalid{R"({"a":1,})", 7, "unexpected '}'; expected string literal"},
        Invalid{R"({"a":1 "b":2})", 9, "unexpected string literal; expected '}'"},
        Invalid{"{1:2}", 1, "expected string literal"}, Invalid{"{'a':1}", 1, "invalid literal"},
        Invalid{"[1,]", 3, "unexpected ']'; expected '[', '{', or a literal"},
        Invalid{"[1 2]", 3, "unexpected number literal; expected ']'"},
        Invalid{"[1,\n 2,\n x]", 9, "invalid literal"}, Invalid{"[", 1, "unexpected end of input"},
        Invalid{"01", 1, "unexpected number literal; expected end of input"},
        Invalid{"-01", 2, "unexpected number literal; expected end of input"},
        Invalid{"1.", 2, "expected digit after '.'"},
        Invalid{"1.e5", 2, "expected digit after '.'"}, Invalid{".5", 0, "invalid literal"},
        Invalid{"+1", 0, "invalid literal"},
        Invalid{"1e", 2, "expected '+', '-', or digit after exponent"},
        Invalid{"1e+", 3, "expected digit after exponent sign"},
        Invalid{"-", 1, "expected digit after '-'"}, Invalid{"-x", 1, "expected digit after '-'"},
        Invalid{"[1e400]", std::string::npos, "number overflow parsing '1e400'"},
        Invalid{"-1e400", std::string::npos, "number overflow parsing '-1e400'"},
        Invalid{"0x10", 1, "invalid literal"}, Invalid{"[NaN]", 1, "invalid literal"},
        Invalid{"tru", 3, "invalid literal"}, Invalid{"True", 0, "invalid literal"},
        Invalid{"[nul]", 4, "invalid literal"}, Invalid{"'a'", 0, "invalid literal"},
        Invalid{"\"abc", 4, "missing closing quote"},
        Invalid{"\"abc\\", 5, "forbidden character after backslash"},
        Invalid{"\"a\x01\"", 2, "control character U+0001 (SOH) must be escaped"},
        Invalid{"\"a\nb\"", 2, "control character U+000A (LF) must be escaped"},
        Invalid{R"("\x")", 2, "forbidden character after backslash"},
        Invalid{R"("\U0041")", 2, "forbidden character after backslash"},
        Invalid{R"("\u12")", 5, R"('\u' must be followed by 4 hex digits)"},
        Invalid{R"("\u12g4")", 5, R"('\u' must be followed by 4 hex digits)"},
        Invalid{R"("\ud800")", 7, "surrogate U+D800..U+DBFF must be followed by U+DC00..U+DFFF"},
        Invalid{R"("ab\ud800\u0041")", 14, "surrogate U+D800..U+DBFF must be followed"},
        Invalid{R"("\ud800\n")", 8, "surrogate U+D800..U+DBFF must be followed"},
        Invalid{R"("\udc00")", 6, "surrogate U+DC00..U+DFFF must follow U+D800..U+DBFF"},
        Invalid{"\"\xff\"", 1, "ill-formed UTF-8 byte"},
        Invalid{"\"\x80\"", 1, "ill-formed UTF-8 byte"},
        Invalid{"\"\xc0\xaf\"", 1, "ill-formed UTF-8 byte"},
        Invalid{"\"\xe0\x80\xaf\"", 2, "ill-formed UTF-8 byte"},
        Invalid{"\"\xf0\x80\x80\xaf\"", 2, "ill-formed UTF-8 byte"},
        Invalid{"\"\xed\xa0\x80\"", 2, "ill-formed UTF-8 byte"},
        Invalid{"\"\xf4\x90\x80\x80\"", 2, "ill-formed UTF-8 byte"},
        Invalid{"\"\xe2\x82\"", 3, "ill-formed UTF-8 byte"},
        Invalid{"\"ok\xe2\x82", 5, "ill-formed UTF-8 byte"},
        Invalid{"{} x", 3, "expected end of input"}, Invalid{"[] []", 3, "expected end of input"},
        Invalid{R"({"a":1}})", 7, "unexpected '}'; expected end of input"},
        // The library would stop at a NUL and accept what came before it.
        Invalid{std::string("{}\0", 3), 2, "a NUL byte"},
        Invalid{std::string("{}\0{}", 5), 2, "a NUL byte"}));

// Where a reason quotes its token, a long one is cut, so a refused reply of
// 256 MiB does not become a message of 256 MiB.
TEST(Json, ALongTokenIsCutInTheMessage) {
  auto result = parseJson("[\"" + std::string(100'000, 'a'));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.message().rfind("invalid JSON at byte 100002: ", 0), 0u) << result.message();
  EXPECT_NE(result.message().find("missing closing quote"), std::string::npos);
  EXPECT_LT(result.message().size(), 400u) << result.message();
  EXPECT_NE(result.message().find("bytes more)"), std::string::npos) << result.message();
}

// RFC 8259 lets a parser ignore a byte order mark; the library does.
TEST(Json, AByteOrderMarkIsIgnored) {
  EXPECT_EQ(parsed("\xef\xbb\xbf{}"), Json::object());
}

}  // namespace
}  // namespace stmux

// The JSON reader (include/stmux/json_read.h): it reads back everything
// JsonWriter writes, escapes included, and refuses every malformed document
// with the byte offset of the fault.
#include "stmux/json_read.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "stmux/json.h"

namespace stmux {
namespace {

JsonValue parsed(std::string_view text) {
  auto result = parseJson(text);
  EXPECT_TRUE(result.ok()) << "'" << text << "': " << result.message();
  return result.ok() ? std::move(result).value() : JsonValue();
}

TEST(JsonRead, Scalars) {
  EXPECT_TRUE(parsed("null").isNull());
  EXPECT_TRUE(parsed("true").asBool(false));
  EXPECT_FALSE(parsed("false").asBool(true));
  EXPECT_TRUE(parsed("false").isBool());
  EXPECT_EQ(parsed("0").asNumber(-1), 0);
  EXPECT_TRUE(std::signbit(parsed("-0").asNumber(1)));
  EXPECT_EQ(parsed("42").asNumber(), 42);
  EXPECT_EQ(parsed("-17").asNumber(), -17);
  EXPECT_EQ(parsed("1.5e3").asNumber(), 1500);
  EXPECT_EQ(parsed("-2.25E-2").asNumber(), -0.0225);
  EXPECT_EQ(parsed("30.8").asNumber(), 30.8);
  EXPECT_EQ(parsed("1E+2").asNumber(), 100);
  EXPECT_EQ(parsed("9007199254740992").asNumber(), 9007199254740992.0);
  EXPECT_EQ(parsed("1.7976931348623157e308").asNumber(), std::numeric_limits<double>::max());
  // Too small for a double rounds to zero, keeping its sign; too large is an error.
  EXPECT_EQ(parsed("1e-400").asNumber(1), 0);
  EXPECT_EQ(parsed("0.000000000000000000000001e-380").asNumber(1), 0);
  EXPECT_TRUE(std::signbit(parsed("-1e-400").asNumber(1)));
  EXPECT_EQ(parsed("\"text\"").asString(), "text");
  EXPECT_EQ(parsed(" \t\r\n 7 \n").asNumber(), 7) << "whitespace around the document";
}

TEST(JsonRead, AccessorsFallBackOnTheWrongType) {
  const JsonValue v = parsed(R"({"n":1,"s":"x","a":[1,2]})");
  EXPECT_EQ(v.find("s")->asNumber(-1), -1);
  EXPECT_EQ(v.find("n")->asString("none"), "none");
  EXPECT_TRUE(v.find("n")->asBool(true));
  EXPECT_EQ(v.find("missing"), nullptr);
  EXPECT_EQ(v.find("a")->find("0"), nullptr) << "find on an array";
  EXPECT_EQ(v.find("a")->at(2), nullptr);
  EXPECT_EQ(v.find("n")->at(0), nullptr) << "at on a number";
  EXPECT_EQ(v.find("n")->size(), 0u);
  EXPECT_EQ(v.find("a")->at(1)->asNumber(), 2);
}

TEST(JsonRead, ObjectsKeepTheirOrder) {
  const JsonValue v = parsed(R"({ "z" : 1 , "a":{"inner":[true,null,{}]}, "m":[] , "z":2})");
  ASSERT_TRUE(v.isObject());
  ASSERT_EQ(v.size(), 4u);
  EXPECT_EQ(v.keyAt(0), "z");
  EXPECT_EQ(v.keyAt(1), "a");
  EXPECT_EQ(v.keyAt(2), "m");
  EXPECT_EQ(v.keyAt(3), "z");
  EXPECT_EQ(v.keyAt(4), "");
  EXPECT_EQ(v.find("z")->asNumber(), 1) << "find returns the first of duplicate names";
  EXPECT_EQ(v.at(3)->asNumber(), 2);
  const JsonValue* inner = v.find("a")->find("inner");
  ASSERT_NE(inner, nullptr);
  ASSERT_TRUE(inner->isArray());
  ASSERT_EQ(inner->size(), 3u);
  EXPECT_TRUE(inner->at(0)->asBool());
  EXPECT_TRUE(inner->at(1)->isNull());
  EXPECT_TRUE(inner->at(2)->isObject());
  EXPECT_EQ(inner->at(2)->size(), 0u);
  EXPECT_TRUE(v.find("m")->isArray());
  EXPECT_EQ(v.find("m")->size(), 0u);
}

TEST(JsonRead, EscapesBecomeUtf8) {
  EXPECT_EQ(parsed(R"("\" \\ \/ \b \f \n \r \t")").asString(), "\" \\ / \b \f \n \r \t");
  EXPECT_EQ(parsed(R"("\u0041\u00e9\u20AC")").asString(), "A\xc3\xa9\xe2\x82\xac");
  EXPECT_EQ(parsed(R"("\ud83d\ude00")").asString(), "\xf0\x9f\x98\x80") << "a surrogate pair";
  EXPECT_EQ(parsed(R"("\uDBFF\uDFFF")").asString(), "\xf4\x8f\xbf\xbf") << "U+10FFFF";
  EXPECT_EQ(parsed(R"("a\u0000b")").asString(), std::string("a\0b", 3));
  // UTF-8 in the input passes through unchanged.
  EXPECT_EQ(parsed("\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"").asString(),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(parsed(R"({"k\u00e9y":1})").keyAt(0), "k\xc3\xa9y") << "escapes in member names";
}

TEST(JsonRead, ReadsBackWhatJsonWriterWrites) {
  std::string every_byte;
  for (int c = 1; c < 0x80; ++c)
    every_byte += static_cast<char>(c);
  const std::string unicode = "GPU \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80";

  JsonWriter json;
  json.beginObject();
  json.field("ascii", std::string_view(every_byte));
  json.field("unicode", std::string_view(unicode));
  json.field("empty", "");
  json.field("int", std::int64_t{-9007199254740992});
  json.field("big", std::int64_t{1} << 53);
  json.field("double", 30.8);
  json.field("tiny", 1.5e-300);
  json.field("nan", std::nan(""));
  json.field("inf", std::numeric_limits<double>::infinity());
  json.field("yes", true);
  json.field("no", false);
  json.key("list").beginArray();
  json.value(std::int64_t{1}).value("two").beginObject().field("three", 3.0).endObject();
  json.beginArray().endArray();
  json.endArray();
  json.key("nested").beginObject().raw(R"("spliced":{"deep":[[["x"]]]})").endObject();
  json.endObject();

  auto result = parseJson(json.str());
  ASSERT_TRUE(result.ok()) << result.message() << "\n" << json.str();
  const JsonValue& v = result.value();
  EXPECT_EQ(v.find("ascii")->asString(), every_byte);
  EXPECT_EQ(v.find("unicode")->asString(), unicode);
  EXPECT_TRUE(v.find("empty")->isString());
  EXPECT_EQ(v.find("empty")->asString("x"), "");
  EXPECT_EQ(v.find("int")->asNumber(), -9007199254740992.0);
  EXPECT_EQ(v.find("big")->asNumber(), 9007199254740992.0);
  EXPECT_EQ(v.find("double")->asNumber(), 30.8);
  EXPECT_EQ(v.find("tiny")->asNumber(), 1.5e-300);
  EXPECT_TRUE(v.find("nan")->isNull()) << "JSON has no NaN";
  EXPECT_TRUE(v.find("inf")->isNull());
  EXPECT_TRUE(v.find("yes")->asBool());
  EXPECT_FALSE(v.find("no")->asBool(true));
  const JsonValue* list = v.find("list");
  ASSERT_EQ(list->size(), 4u);
  EXPECT_EQ(list->at(0)->asNumber(), 1);
  EXPECT_EQ(list->at(1)->asString(), "two");
  EXPECT_EQ(list->at(2)->find("three")->asNumber(), 3);
  EXPECT_TRUE(list->at(3)->isArray());
  const JsonValue* deep = v.find("nested")->find("spliced")->find("deep");
  ASSERT_NE(deep, nullptr);
  EXPECT_EQ(deep->at(0)->at(0)->at(0)->asString(), "x");
  EXPECT_EQ(v.keyAt(0), "ascii");
  EXPECT_EQ(v.keyAt(v.size() - 1), "nested");
}

TEST(JsonRead, NestingIsLimited) {
  const auto nested = [](int depth) {
    return std::string(static_cast<std::size_t>(depth), '[') +
           std::string(static_cast<std::size_t>(depth), ']');
  };
  EXPECT_TRUE(parseJson(nested(kJsonMaxDepth)).ok());
  auto deep = parseJson(nested(kJsonMaxDepth + 1));
  ASSERT_FALSE(deep.ok());
  EXPECT_NE(deep.message().find("at byte 64: nesting deeper than 64 levels"), std::string::npos)
      << deep.message();
  // Far deeper than any stack would take: refused, not a crash.
  EXPECT_FALSE(parseJson(std::string(1'000'000, '[')).ok());
  std::string objects;
  for (int i = 0; i <= kJsonMaxDepth; ++i)
    objects += R"({"a":)";
  EXPECT_FALSE(parseJson(objects + "1" + std::string(kJsonMaxDepth + 1, '}')).ok());
}

struct Invalid {
  std::string text;
  std::size_t offset;
  std::string says;
};

class JsonReadInvalid : public ::testing::TestWithParam<Invalid> {};

TEST_P(JsonReadInvalid, IsRefusedWithItsOffset) {
  const Invalid& c = GetParam();
  auto result = parseJson(c.text);
  ASSERT_FALSE(result.ok()) << "'" << c.text << "' was accepted";
  const std::string where = "invalid JSON at byte " + std::to_string(c.offset) + ": ";
  EXPECT_EQ(result.message().rfind(where, 0), 0u)
      << "'" << c.text << "': " << result.message() << "; wanted " << where;
  EXPECT_NE(result.message().find(c.says), std::string::npos)
      << "'" << c.text << "': " << result.message() << "; wanted '" << c.says << "'";
}

INSTANTIATE_TEST_SUITE_P(
    Documents, JsonReadInvalid,
    ::testing::Values(
        Invalid{"", 0, "expected a value, found end of input"},
        Invalid{"   ", 3, "expected a value"},
        Invalid{"{", 1, "expected a member name in double quotes, found end of input"},
        Invalid{R"({"a" 1})", 5, "expected ':' after a member name, found '1'"},
        Invalid{R"({"a":1,})", 7, "expected a member name"},
        Invalid{R"({"a":1 "b":2})", 7, "expected ',' or '}'"},
        Invalid{"{1:2}", 1, "expected a member name"},
        Invalid{"{'a':1}", 1, "expected a member name"},
        Invalid{"[1,]", 3, "expected a value, found ']'"},
        Invalid{"[1 2]", 3, "expected ',' or ']'"},
        Invalid{"[1,\n 2,\n x]", 9, "expected a value, found 'x'"},
        Invalid{"[", 1, "expected a value, found end of input"}, Invalid{"01", 1, "leading zero"},
        Invalid{"-01", 2, "leading zero"},
        Invalid{"1.", 2, "expected a digit after the decimal point"},
        Invalid{"1.e5", 2, "expected a digit after the decimal point"},
        Invalid{".5", 0, "expected a value, found '.'"},
        Invalid{"+1", 0, "expected a value, found '+'"},
        Invalid{"1e", 2, "expected a digit in the exponent"},
        Invalid{"1e+", 3, "expected a digit in the exponent"},
        Invalid{"-", 1, "expected a digit, found end of input"},
        Invalid{"-x", 1, "expected a digit, found 'x'"},
        Invalid{"[1e400]", 1, "too large for a double"},
        Invalid{"-1e400", 0, "too large for a double"},
        Invalid{"0x10", 1, "unexpected data after the document"},
        Invalid{"[NaN]", 1, "expected a value, found 'N'"}, Invalid{"tru", 0, "unknown literal"},
        Invalid{"True", 0, "expected a value, found 'T'"}, Invalid{"[nul]", 1, "unknown literal"},
        Invalid{"'a'", 0, "expected a value, found '''"},
        Invalid{"\"abc", 4, "unterminated string"}, Invalid{"\"abc\\", 5, "unterminated string"},
        Invalid{"\"a\x01\"", 2, "control character 0x01"},
        Invalid{"\"a\nb\"", 2, "control character 0x0a"}, Invalid{R"("\x")", 1, "unknown escape"},
        Invalid{R"("\U0041")", 1, "unknown escape"},
        Invalid{R"("\u12")", 5, R"(expected a hex digit in a \u escape, found '"')"},
        Invalid{R"("\u12g4")", 5, "expected a hex digit"},
        Invalid{R"("\ud800")", 1, "high surrogate without a low one"},
        Invalid{R"("ab\ud800\u0041")", 3, "high surrogate without a low one"},
        Invalid{R"("\ud800\n")", 1, "high surrogate without a low one"},
        Invalid{R"("\udc00")", 1, "low surrogate without a high one"},
        Invalid{"\"\xff\"", 1, "byte 0xff cannot start a UTF-8 sequence"},
        Invalid{"\"\x80\"", 1, "byte 0x80 cannot start"},
        Invalid{"\"\xc0\xaf\"", 1, "byte 0xc0 cannot start"},
        Invalid{"\"\xe0\x80\xaf\"", 1, "overlong"}, Invalid{"\"\xf0\x80\x80\xaf\"", 1, "overlong"},
        Invalid{"\"\xed\xa0\x80\"", 1, "encodes a surrogate"},
        Invalid{"\"\xf4\x90\x80\x80\"", 1, "above U+10FFFF"},
        Invalid{"\"\xe2\x82\"", 1, "truncated UTF-8"},
        Invalid{"\"ok\xe2\x82", 3, "truncated UTF-8"},
        Invalid{"\xef\xbb\xbf{}", 0, "expected a value, found byte 0xef"},
        Invalid{"{} x", 3, "unexpected data after the document"},
        Invalid{"[] []", 3, "unexpected data after the document"},
        Invalid{R"({"a":1}})", 7, "unexpected data after the document"},
        Invalid{std::string("{}\0", 3), 2, "unexpected data after the document"}));

}  // namespace
}  // namespace stmux

// tools/args.h: a flag's value is taken whole and in range, or not at all.
#include "tools/args.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string_view>
#include <vector>

namespace stmux::tools {
namespace {

TEST(Args, AWholeNumberIsTakenOnlyWholeAndInRange) {
  EXPECT_EQ(wholeIn("32", 1, 256), 32);
  EXPECT_EQ(wholeIn("-20", -20, 19), -20);
  EXPECT_EQ(wholeIn<std::uint64_t>("18446744073709551615", 0, UINT64_MAX), UINT64_MAX);
  for (const char* text :
       {"", "0", "257", "3.5", "1e2", " 5", "5 ", "+5", "5x", "0x10", "99999999999999999999"}) {
    EXPECT_FALSE(wholeIn(text, 1, 256)) << "'" << text << "'";
  }
  EXPECT_FALSE(wholeIn<unsigned>("-1", 0, 10)) << "a negative unsigned";
  EXPECT_FALSE(wholeIn<std::uint64_t>("18446744073709551616", 0, UINT64_MAX)) << "past 2^64";
}

TEST(Args, ARealNumberIsTakenOnlyFiniteWholeAndInRange) {
  EXPECT_EQ(realIn("2", 0.1, 600), 2.0);
  EXPECT_EQ(realIn("0.5", 0.1, 600), 0.5);
  EXPECT_EQ(realIn("1e-2", 0.01, 1024), 0.01);
  EXPECT_EQ(realIn("-3", -1e6, 1e6), -3.0);
  for (const char* text :
       {"", "0.05", "601", "nan", "inf", "-inf", "2s", " 2", "+2", "0x10", "1e999"}) {
    EXPECT_FALSE(realIn(text, 0.1, 600)) << "'" << text << "'";
  }
}

TEST(Args, AListIsTakenOnlyIfEveryItemIsEvenAnEmptyOne) {
  auto number = [](std::string_view item) { return wholeIn(item, 1, 256); };
  EXPECT_EQ(splitList<int>("32", number), std::vector<int>({32}));
  EXPECT_EQ(splitList<int>("1,8,32", number), std::vector<int>({1, 8, 32}));
  for (const char* text : {"", ",", "1,", ",1", "1,,8", "1,x"}) {
    EXPECT_FALSE(splitList<int>(text, number)) << "'" << text << "'";
  }
}

}  // namespace
}  // namespace stmux::tools

// The README stays true: it lists every STMUX_* variable exactly as the
// configuration table defines it, and its test command is the one CI runs.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>

#include "stmux/config.h"

namespace stmux {
namespace {

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(Readme, ListsEveryVariableAsTheTableDefinesIt) {
  const std::string readme = readFile(STMUX_SOURCE_DIR "/README.md");
  ASSERT_FALSE(readme.empty());
  const std::string table = configMarkdownTable();
  EXPECT_NE(readme.find(table), std::string::npos)
      << "README.md's configuration table is out of date; replace it with:\n"
      << table;
}

TEST(Readme, ItsTestCommandIsWhatCiRuns) {
  const std::string readme = readFile(STMUX_SOURCE_DIR "/README.md");
  const std::string ci = readFile(STMUX_SOURCE_DIR "/.ci/run");
  std::string last;
  std::istringstream lines(ci);
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty() && line[0] != '#') last = line;
  }
  ASSERT_EQ(last, "bash tools/test.sh");
  EXPECT_NE(readme.find("\n" + last + "\n"), std::string::npos)
      << "the README does not show CI's test command";
}

}  // namespace
}  // namespace stmux

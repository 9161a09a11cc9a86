// The README stays true: it lists every STMUX_* variable exactly as the
// configuration table defines it, and its test command is the one CI runs.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
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

// A variable a script reads is the daemon's or the shim's (the table's), or
// one of the scripts' own, which the runtime must not call a typo and the
// README must name (STMUX_PACKAGE once was neither).
TEST(Readme, EveryVariableTheScriptsReadIsKnownAndNamed) {
  const std::string readme = readFile(STMUX_SOURCE_DIR "/README.md");
  std::set<std::string> names;
  const std::regex variable(R"(\bSTMUX_[A-Z0-9_]+)");
  std::vector<std::filesystem::path> scripts = {STMUX_SOURCE_DIR "/.ci/run"};
  for (const auto& entry : std::filesystem::directory_iterator(STMUX_SOURCE_DIR "/tools")) {
    if (entry.path().extension() == ".sh") scripts.push_back(entry.path());
  }
  for (const auto& script : scripts) {
    const std::string text = readFile(script.string());
    for (std::sregex_iterator it(text.begin(), text.end(), variable), end; it != end; ++it)
      names.insert(it->str());
  }
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    const bool ours = std::find(std::begin(kScriptVariables), std::end(kScriptVariables), name) !=
                      std::end(kScriptVariables);
    EXPECT_TRUE(ours || findVar(name) != nullptr)
        << name << " is read by a script but is neither a setting nor in kScriptVariables";
    if (ours) {
      EXPECT_NE(readme.find("`" + name + "`"), std::string::npos)
          << name << " is not in the README";
    }
  }
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

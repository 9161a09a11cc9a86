// The README stays true: it lists every STMUX_* variable exactly as the
// configuration table defines it, and its test command is the one CI runs;
// and the scripts it names say what they take.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include "stmux/config.h"
#include "tools/process.h"

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

// The project's scripts say what they take: --help and -h, and an argument
// they do not take refused (exit 2) rather than ignored (package.sh -h built
// a package; demo.sh --out plotted the last run's results).
TEST(Scripts, RefuseWhatTheyDoNotTake) {
  char name[] = "/tmp/stmux-scripts-test-XXXXXX";
  ASSERT_NE(::mkdtemp(name), nullptr);
  const std::string tmp = name;
  for (const char* script : {"build.sh", "package.sh", "demo.sh", "test.sh"}) {
    for (const char* help : {"--help", "-h"}) {
      const Ran ran = run({"bash", std::string(STMUX_SOURCE_DIR "/tools/") + script, help}, {},
                          tmp + "/" + script, std::chrono::seconds(30));
      EXPECT_EQ(ran.status, 0) << script << " " << help << ": " << ran.err;
      EXPECT_FALSE(ran.out.empty()) << script << " " << help;
    }
  }
  const std::pair<std::vector<std::string>, std::string> refused[] = {
      {{"build.sh", "--jobs"}, "takes no arguments"},
      {{"package.sh", "now"}, "takes no arguments"},
      {{"demo.sh", "--tenants", "1", "--out", "/tmp/x"}, "writes its results to"},
      {{"demo.sh", "--out=/tmp/x"}, "writes its results to"},
  };
  for (const auto& [args, said] : refused) {
    std::vector<std::string> argv{"bash", std::string(STMUX_SOURCE_DIR "/tools/") + args[0]};
    argv.insert(argv.end(), args.begin() + 1, args.end());
    const Ran ran = run(argv, {}, tmp + "/refused", std::chrono::seconds(30));
    EXPECT_EQ(ran.status, 2) << args[0] << ": " << ran.err;
    EXPECT_NE(ran.err.find(said), std::string::npos) << args[0] << ": " << ran.err;
  }
  std::filesystem::remove_all(tmp);
}

}  // namespace
}  // namespace stmux

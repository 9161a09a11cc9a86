// stmux-join-probe (tools/join_probe.cc): its flags anywhere; on a GPU, that
// each compute and allocation kind runs every iteration it is asked for and
// CUDA keeps the order it probes (an event join on the legacy stream, shared
// by threads), which every stmux guarantee on such calls rests on.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "test_support.h"
#include "tools/process.h"

namespace stmux {
namespace {

using testing::TempDir;

TEST(JoinProbe, ABadFlagIsNamedWithWhatIsAccepted) {
  TempDir dir;
  const struct {
    std::vector<std::string> args;
    std::string said;
  } cases[] = {
      {{"--threads", "0"}, "--threads '0': accepted: an integer from 1 to 64"},
      {{"--iterations", "1e3"}, "--iterations '1e3': accepted: an integer from 1 to 100000000"},
      {{"--words", "0"}, "--words '0': accepted: an integer from 1 to 1048576"},
      {{"--compute", "gemm"}, "--compute 'gemm': accepted: copy or kernel"},
      {{"--alloc", "pool"}, "--alloc 'pool': accepted: fixed or per-iteration"},
      {{"extra"}, "unexpected argument 'extra'"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {STMUX_JOIN_PROBE_PATH};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    const Ran ran = run(argv, {}, dir.path() + "/bad");
    EXPECT_EQ(ran.status, 2) << c.said;
    EXPECT_NE(ran.err.find(c.said), std::string::npos) << ran.err;
  }
  const Ran help = run({STMUX_JOIN_PROBE_PATH, "--help"}, {}, dir.path() + "/help");
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("--compute KIND"), std::string::npos) << help.out;
}

TEST(JoinProbe, EveryKindRunsItsIterationsAndEveryReadBackIsRight) {
  TempDir dir;
  for (const char* compute : {"kernel", "copy"}) {
    for (const char* alloc : {"per-iteration", "fixed"}) {
      const std::string kind = std::string(compute) + "/" + alloc;
      const Ran ran = run({STMUX_JOIN_PROBE_PATH, "--threads", "8", "--iterations", "500",
                           "--compute", compute, "--alloc", alloc},
                          {}, dir.path() + "/probe");
      if (ran.status == 3 && ran.err.find("no CUDA device") != std::string::npos) {
        GTEST_SKIP() << "GPU test skipped: " << ran.err;
      }
      EXPECT_EQ(ran.status, 0) << kind << "\n" << ran.out << ran.err;
      EXPECT_NE(ran.out.find("iterations 4000 wrong 0 early 0 as_written 0 other 0\n"),
                std::string::npos)
          << kind << "\n"
          << ran.out;
    }
  }
}

}  // namespace
}  // namespace stmux

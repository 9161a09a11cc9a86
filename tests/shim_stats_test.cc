// The shim's exit lines as stmux-bench and the GPU tests read them back
// (tools/shim_stats.h): what the shim prints (shim/intercept.cc,
// printCounters) must parse, field by field.
#include "tools/shim_stats.h"

#include <gtest/gtest.h>

namespace stmux::tools {
namespace {

TEST(ShimStats, TheExitLinesParseFieldByField) {
  const std::string err =
      "host:12:12 INFO  stats: 1500 calls: 1200 served by stmuxd (800 stream-ordered), 3 failed; "
      "direct: no_op=200 measured_direct=97\n"
      "host:12:12 INFO  stats: by entry point: sgemm=1000 calls, 900 served, 3 failed, 97 "
      "direct; strided_batched=500 calls, 300 served, 0 failed, 200 direct\n"
      "host:12:12 INFO  stats: round: 400 host-mode calls, mean prior-work wait 12.5 us, mean "
      "completion 3.0 us\n";
  const ShimStats stats = shimStats(err);
  EXPECT_EQ(stats.calls, 1500);
  EXPECT_EQ(stats.served, 1200);
  EXPECT_EQ(stats.stream_ordered, 800);
  EXPECT_EQ(stats.failed, 3);
  EXPECT_EQ(stats.directCalls("no_op"), 200);
  EXPECT_EQ(stats.directCalls("measured_direct"), 97);
  EXPECT_EQ(stats.directCalls("busy"), 0);
  EXPECT_EQ(stats.timed, 400);
  EXPECT_DOUBLE_EQ(stats.prior_wait_us, 12.5);
  EXPECT_DOUBLE_EQ(stats.completion_us, 3.0);
  ASSERT_EQ(stats.entries.size(), 2u);
  EXPECT_EQ(stats.entries.at("sgemm").calls, 1000);
  EXPECT_EQ(stats.entries.at("sgemm").served, 900);
  EXPECT_EQ(stats.entries.at("sgemm").failed, 3);
  EXPECT_EQ(stats.entries.at("sgemm").direct, 97);
  EXPECT_EQ(stats.entries.at("strided_batched").calls, 500);
  EXPECT_EQ(stats.entries.at("strided_batched").direct, 200);
}

TEST(ShimStats, NoLinesMeanNothingWasCounted) {
  const ShimStats none = shimStats("stmux-cublas-client: done\n");
  EXPECT_EQ(none.calls, -1);
  EXPECT_EQ(none.timed, -1);
  // A process that served nothing in host mode prints no round line.
  const ShimStats direct = shimStats(
      "7 calls: 0 served by stmuxd (0 stream-ordered), 0 failed; "
      "direct: no_daemon=7\n");
  EXPECT_EQ(direct.calls, 7);
  EXPECT_EQ(direct.directCalls("no_daemon"), 7);
  EXPECT_EQ(direct.timed, -1);
  EXPECT_EQ(direct.prior_wait_us, -1);
}

}  // namespace
}  // namespace stmux::tools

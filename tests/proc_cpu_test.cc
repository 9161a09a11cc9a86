// tools/proc_cpu.h: what stmux-bench reads from /proc to say how much CPU the
// tenants and the serving processes used, and how often they lost a core.
#include "tools/proc_cpu.h"

#include <gtest/gtest.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <thread>

namespace stmux::tools {
namespace {

TEST(ProcCpu, ReadsUserAndSystemTimePastANameWithParentheses) {
  const long ticks = ::sysconf(_SC_CLK_TCK);
  // Fields 1..15 of /proc/PID/stat: utime 3 s and stime 1 s in ticks.
  const std::string stat = "4242 (odd) name (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 " +
                           std::to_string(3 * ticks) + " " + std::to_string(ticks) + " 0 0 20 0";
  const auto seconds = statCpuSeconds(stat);
  ASSERT_TRUE(seconds.has_value());
  EXPECT_DOUBLE_EQ(*seconds, 4.0);
  EXPECT_FALSE(statCpuSeconds("4242 (cut short) S 1 2").has_value());
  EXPECT_FALSE(statCpuSeconds("").has_value());
}

TEST(ProcCpu, AddsBothKindsOfContextSwitch) {
  CpuSample sample;
  EXPECT_TRUE(
      addSwitches("Name:\tx\nvoluntary_ctxt_switches:\t120\n"
                  "nonvoluntary_ctxt_switches:\t7\n",
                  sample));
  EXPECT_TRUE(addSwitches("voluntary_ctxt_switches:\t1\nnonvoluntary_ctxt_switches:\t2\n", sample));
  EXPECT_EQ(sample.voluntary, 121u);
  EXPECT_EQ(sample.involuntary, 9u);
  EXPECT_FALSE(addSwitches("Name:\tgone\n", sample));
}

TEST(ProcCpu, ThisProcessUsesCpuWhenItComputesAndSwitchesWhenItSleeps) {
  const auto before = sampleCpu(::getpid());
  ASSERT_TRUE(before.has_value());
  // Another thread of this process computes until it has used 300 ms of CPU
  // (its own clock: however busy the machine): threads count.
  std::thread busy([] {
    auto used = [] {
      timespec ts;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
      return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
    };
    volatile unsigned long spin = 0;
    while (used() < 0.3)
      spin = spin + 1;
  });
  for (int i = 0; i < 50; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  busy.join();
  const auto after = sampleCpu(::getpid());
  ASSERT_TRUE(after.has_value());
  const CpuSample used = after->since(*before);
  EXPECT_GE(used.cpu_s, 0.28);     // /proc counts in ticks of 10 ms
  EXPECT_GE(used.voluntary, 50u);  // each sleep gave the core up
  EXPECT_FALSE(sampleCpu(-1).has_value());
}

}  // namespace
}  // namespace stmux::tools

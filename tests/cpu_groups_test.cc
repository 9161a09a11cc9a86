// stmux-bench's tenants under a CPU quota (tools/cpu_groups.h): where the
// hierarchies that can hold one are mounted, and, where this machine lets
// the test make cgroups, a process started in a group is in it from its
// start and held back by its quota.
#include "tools/cpu_groups.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "test_support.h"
#include "tools/process.h"

namespace stmux::tools {
namespace {

TEST(CpuGroupMounts, TheHierarchiesThatCanHoldAQuotaAreFound) {
  const auto mounts = detail::cpuCgroupMounts(
      "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
      "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup "
      "rw,cpu,cpuacct\n"
      "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
      "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
      "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
      "42 31 0:39 / /mnt/a\\040b rw - cgroup2 none rw\n"
      "short line\n");
  ASSERT_EQ(mounts.size(), 3u);
  EXPECT_EQ(mounts[0].dir, "/sys/fs/cgroup/cpu,cpuacct");
  EXPECT_FALSE(mounts[0].v2);
  EXPECT_EQ(mounts[1].dir, "/sys/fs/cgroup/unified");
  EXPECT_TRUE(mounts[1].v2);
  EXPECT_EQ(mounts[2].dir, "/mnt/a b") << "mountinfo's octal escapes are undone";
  EXPECT_TRUE(detail::cpuCgroupMounts("").empty());
}

TEST(CpuQuotaGroups, AProcessStartedInAGroupIsInItFromItsStartAndIsHeldBack) {
  CpuQuotaGroups groups;
  if (std::string why; !groups.make(1, 0.05, why)) {
    GTEST_SKIP() << "cannot make cgroups with a CPU quota here: " << why;
  }
  testing::TempDir dir;
  const std::optional<double> before = groups.throttledSeconds(0);
  ASSERT_TRUE(before.has_value());
  // Its first command already reads the group as its own; then half a
  // second of busy work, which a twentieth of a core takes far longer to do.
  Process busy(groups.startingIn(0, {"/bin/sh", "-c",
                                     "cat /proc/self/cgroup; end=$(($(date +%s%N) + 500000000)); "
                                     "while [ $(date +%s%N) -lt $end ]; do :; done"}),
               {}, dir.path() + "/busy");
  ASSERT_EQ(busy.wait(std::chrono::seconds(30)), 0) << busy.err();
  EXPECT_NE(busy.out().find("/tenant0\n"), std::string::npos)
      << "not in its group from the start:\n"
      << busy.out();
  const std::optional<double> after = groups.throttledSeconds(0);
  ASSERT_TRUE(after.has_value());
  EXPECT_GT(*after - *before, 0.1) << "seconds the quota held a busy process back";
}

}  // namespace
}  // namespace stmux::tools

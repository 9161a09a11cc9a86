// A process's CPU quota from its cgroups (stmux/cpu_quota.h): both
// hierarchies' files, the tightest level, and the cases that have none.
#include "stmux/cpu_quota.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>

#include "test_support.h"
#include "tools/cpu_groups.h"

namespace stmux {
namespace {

TEST(CpuQuotaFiles, EachHierarchysFormatGivesCores) {
  EXPECT_DOUBLE_EQ(*detail::quotaCoresV2("50000 100000\n"), 0.5);
  EXPECT_DOUBLE_EQ(*detail::quotaCoresV2("250000 100000"), 2.5);
  EXPECT_FALSE(detail::quotaCoresV2("max 100000\n").has_value());
  EXPECT_FALSE(detail::quotaCoresV2("").has_value());
  EXPECT_FALSE(detail::quotaCoresV2("50000").has_value());
  EXPECT_FALSE(detail::quotaCoresV2("50000 0").has_value());
  EXPECT_DOUBLE_EQ(*detail::quotaCoresV1("20000\n", "100000\n"), 0.2);
  EXPECT_FALSE(detail::quotaCoresV1("-1\n", "100000\n").has_value());
  EXPECT_FALSE(detail::quotaCoresV1("x", "100000").has_value());
}

constexpr std::string_view kV1Mountinfo =
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

TEST(CpuQuotaFiles, TheMountsThatCanHoldAQuotaAreFound) {
  const auto mounts = detail::cpuCgroupMounts(kV1Mountinfo);
  ASSERT_EQ(mounts.size(), 2u);
  EXPECT_EQ(mounts[0].dir, "/sys/fs/cgroup/cpu,cpuacct");
  EXPECT_FALSE(mounts[0].v2);
  EXPECT_EQ(mounts[1].dir, "/sys/fs/cgroup/unified");
  EXPECT_TRUE(mounts[1].v2);
  const auto escaped =
      detail::cpuCgroupMounts("1 2 0:1 /a\\040b /mnt/c\\134g rw - cgroup2 none rw\n");
  ASSERT_EQ(escaped.size(), 1u);
  EXPECT_EQ(escaped[0].root, "/a b");
  EXPECT_EQ(escaped[0].dir, "/mnt/c\\g");
}

TEST(CpuQuotaFiles, TheProcesssCgroupIsReadForEachHierarchy) {
  const std::string_view cgroup = "4:memory:/m\n2:cpuacct,cpu:/pod/c1\n0::/pod2/c2\n";
  EXPECT_EQ(detail::cgroupPathOf(cgroup, false), "/pod/c1");
  EXPECT_EQ(detail::cgroupPathOf(cgroup, true), "/pod2/c2");
  EXPECT_FALSE(detail::cgroupPathOf("4:memory:/m\n", false).has_value());
  EXPECT_FALSE(detail::cgroupPathOf("4:memory:/m\n", true).has_value());
}

// A tree of cgroup files under a temporary directory.
class CpuQuota : public ::testing::Test {
 protected:
  void write(const std::string& file, const std::string& text) {
    const std::filesystem::path path = dir_.path() + file;
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << text;
  }
  std::optional<double> quota(std::string_view cgroup, std::string_view mountinfo) {
    return cpuQuotaCores(cgroup, mountinfo, dir_.path());
  }
  testing::TempDir dir_;
};

constexpr std::string_view kV2Mountinfo =
    "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

TEST_F(CpuQuota, TheTightestLevelFromTheProcesssCgroupUpCounts) {
  write("/sys/fs/cgroup/kubepods/cpu.max", "400000 100000\n");
  write("/sys/fs/cgroup/kubepods/pod1/cpu.max", "150000 100000\n");
  write("/sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "max 100000\n");
  EXPECT_DOUBLE_EQ(*quota("0::/kubepods/pod1/c1\n", kV2Mountinfo), 1.5);
  write("/sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "50000 100000\n");
  EXPECT_DOUBLE_EQ(*quota("0::/kubepods/pod1/c1\n", kV2Mountinfo), 0.5);
  // A sibling's limit is not the process's.
  write("/sys/fs/cgroup/kubepods/pod2/cpu.max", "10000 100000\n");
  EXPECT_DOUBLE_EQ(*quota("0::/kubepods/pod1/c1\n", kV2Mountinfo), 0.5);
}

TEST_F(CpuQuota, AVersionOneQuotaCountsAndUnlimitedLevelsDoNot) {
  write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
  write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  write("/sys/fs/cgroup/cpu,cpuacct/t/cpu.cfs_quota_us", "-1\n");
  write("/sys/fs/cgroup/cpu,cpuacct/t/cpu.cfs_period_us", "100000\n");
  EXPECT_FALSE(quota("2:cpu,cpuacct:/t\n0::/\n", kV1Mountinfo).has_value());
  write("/sys/fs/cgroup/cpu,cpuacct/t/cpu.cfs_quota_us", "80000\n");
  write("/sys/fs/cgroup/cpu,cpuacct/t/cpu.cfs_period_us", "50000\n");
  EXPECT_DOUBLE_EQ(*quota("2:cpu,cpuacct:/t\n0::/\n", kV1Mountinfo), 1.6);
}

// In a container the mount's root is the container's cgroup: the process's
// path is below it, or (without a cgroup namespace) a path of the host's,
// which is then read at the mount.
TEST_F(CpuQuota, AMountRootedBelowTheHierarchysRootIsReadWhereItIs) {
  const std::string_view mountinfo =
      "29 23 0:26 /kubepods/pod1/c1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
  write("/sys/fs/cgroup/cpu.max", "200000 100000\n");
  EXPECT_DOUBLE_EQ(*quota("0::/kubepods/pod1/c1\n", mountinfo), 2.0);
  EXPECT_DOUBLE_EQ(*quota("0::/elsewhere\n", mountinfo), 2.0);
  write("/sys/fs/cgroup/sub/cpu.max", "100000 100000\n");
  EXPECT_DOUBLE_EQ(*quota("0::/kubepods/pod1/c1/sub\n", mountinfo), 1.0);
  // A sibling sharing a prefix of the root's name is not below it.
  EXPECT_DOUBLE_EQ(*quota("0::/kubepods/pod1/c10\n", mountinfo), 2.0);
}

TEST_F(CpuQuota, NoFilesOrNoMountsMeanNoQuota) {
  EXPECT_FALSE(quota("0::/a\n", kV2Mountinfo).has_value());
  EXPECT_FALSE(quota("0::/a\n", "").has_value());
  EXPECT_FALSE(quota("", kV2Mountinfo).has_value());
}

// The real thing, where this machine lets the test make cgroups: a process
// placed in a group of stmux-bench's reads its quota, and a busy one is held
// back by it.
TEST(CpuQuotaGroups, AProcessPlacedInAGroupSeesItsQuotaAndIsHeldBack) {
  tools::CpuQuotaGroups groups;
  if (std::string why; !groups.make(1, 0.2, why)) {
    GTEST_SKIP() << "cannot make cgroups with a CPU quota here: " << why;
  }
  int placed[2], told[2];
  ASSERT_EQ(::pipe(placed), 0);
  ASSERT_EQ(::pipe(told), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    char go = 0;
    if (::read(placed[0], &go, 1) != 1) ::_exit(2);
    const std::optional<double> quota = cpuQuotaCores();
    const int milli = quota ? static_cast<int>(*quota * 1000 + 0.5) : -1;
    if (::write(told[1], &milli, sizeof milli) != sizeof milli) ::_exit(2);
    // Half a second of work, which a fifth of a core takes longer to do.
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
    volatile unsigned long spins = 0;
    while (std::chrono::steady_clock::now() < until)
      spins = spins + 1;
    ::_exit(0);
  }
  std::string why;
  const bool moved = groups.place(0, child, why);
  const std::optional<double> before = groups.throttledSeconds(0);
  ASSERT_EQ(::write(placed[1], "g", 1), 1);
  int milli = 0;
  ASSERT_EQ(::read(told[0], &milli, sizeof milli), static_cast<ssize_t>(sizeof milli));
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(moved) << why;
  EXPECT_EQ(milli, 200) << "the quota the placed process read, in thousandths of a core";
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const std::optional<double> after = groups.throttledSeconds(0);
  ASSERT_TRUE(before && after);
  EXPECT_GT(*after - *before, 0.1) << "seconds the quota held a busy process back";
}

}  // namespace
}  // namespace stmux

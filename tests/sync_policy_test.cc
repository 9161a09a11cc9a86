// STMUX_SYNC's choices (shim/sync_policy.h): which scheduling flag a tenant's
// context gets, and when the program's own choice is left alone.
#include "shim/sync_policy.h"

#include <gtest/gtest.h>

namespace stmux::shim {
namespace {

TEST(SyncPolicy, EachModeNamesItsFlag) {
  EXPECT_EQ(parseSyncMode("blocking"), SyncMode::kBlocking);
  EXPECT_EQ(parseSyncMode("keep"), SyncMode::kKeep);
  EXPECT_FALSE(parseSyncMode("Blocking").has_value());
  EXPECT_EQ(chooseSync(SyncMode::kSpin, 1, 16).sched, kSchedSpin);
  EXPECT_EQ(chooseSync(SyncMode::kYield, 1, 16).sched, kSchedYield);
  const SyncChoice blocking = chooseSync(SyncMode::kBlocking, 1, 16);
  EXPECT_EQ(blocking.sched, kSchedBlocking);
  EXPECT_FALSE(blocking.spin) << "a blocking tenant does not spin in the shim's wait either";
  EXPECT_TRUE(chooseSync(SyncMode::kKeep, 500, 2).spin);
}

TEST(SyncPolicy, AutoChangesNothingUnlessTenantsOutnumberTheCores) {
  EXPECT_EQ(chooseSync(SyncMode::kAuto, 16, 16).sched, kSchedAuto);
  EXPECT_TRUE(chooseSync(SyncMode::kAuto, 16, 16).spin);
  EXPECT_EQ(chooseSync(SyncMode::kAuto, 16, 16, /*served=*/false).sched, kSchedAuto);
  EXPECT_EQ(chooseSync(SyncMode::kAuto, 1, 1).sched, kSchedAuto);
}

// Beyond the cores a served tenant blocks in both waits, and one whose calls
// go direct yields (its CUDA waits are its only ones).
TEST(SyncPolicy, AutoBlocksServedTenantsAndYieldsDirectOnesBeyondTheCores) {
  EXPECT_EQ(chooseSync(SyncMode::kAuto, 17, 16).sched, kSchedBlocking);
  EXPECT_FALSE(chooseSync(SyncMode::kAuto, 17, 16).spin);
  EXPECT_EQ(chooseSync(SyncMode::kAuto, 17, 16, /*served=*/false).sched, kSchedYield);
  EXPECT_EQ(chooseSync(SyncMode::kBlocking, 17, 16, /*served=*/false).sched, kSchedBlocking);
  EXPECT_EQ(chooseSync(SyncMode::kKeep, 17, 16, /*served=*/false).sched, kSchedAuto);
}

// STMUX_SPINNING_TENANTS: a tenant whose turn to spin it is keeps CUDA's
// default and the shim's poll among more tenants than cores; the others, and
// every tenant of the other modes, are as without turns.
TEST(SyncPolicy, ATenantWhoseTurnToSpinItIsSpinsUnderAuto) {
  const SyncChoice turn = chooseSync(SyncMode::kAuto, 32, 16, /*served=*/true, /*may_spin=*/true);
  EXPECT_EQ(turn.sched, kSchedAuto);
  EXPECT_TRUE(turn.spin);
  const SyncChoice other = chooseSync(SyncMode::kAuto, 32, 16, /*served=*/true, /*may_spin=*/false);
  EXPECT_EQ(other.sched, kSchedBlocking);
  EXPECT_FALSE(other.spin);
  const SyncChoice blocking = chooseSync(SyncMode::kBlocking, 32, 16, true, /*may_spin=*/true);
  EXPECT_EQ(blocking.sched, kSchedBlocking) << "an explicit mode is not changed by a turn";
  EXPECT_FALSE(blocking.spin);
  EXPECT_EQ(chooseSync(SyncMode::kYield, 32, 16, true, true).sched, kSchedYield);
}

TEST(SyncPolicy, TheProgramsOwnFlagIsKeptAndTheShimsOwnIsChanged) {
  constexpr unsigned kOther = 0x10;  // a flag that is not about scheduling
  // CUDA's default: set, the other bits kept.
  EXPECT_EQ(contextFlags(kOther | kSchedAuto, std::nullopt, kSchedBlocking),
            kOther | kSchedBlocking);
  // Already so: nothing to do.
  EXPECT_FALSE(contextFlags(kSchedBlocking, kSchedBlocking, kSchedBlocking).has_value());
  // The program chose yield itself: kept, whatever the shim wants.
  EXPECT_FALSE(contextFlags(kSchedYield, std::nullopt, kSchedBlocking).has_value());
  EXPECT_FALSE(contextFlags(kSchedYield, kSchedBlocking, kSchedAuto).has_value());
  // The shim set blocking; back to CUDA's default when it wants that.
  EXPECT_EQ(contextFlags(kOther | kSchedBlocking, kSchedBlocking, kSchedAuto), kOther | kSchedAuto);
}

}  // namespace
}  // namespace stmux::shim

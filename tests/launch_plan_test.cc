// How a batch's requests are laid out for launching (daemon/launch_plan.h).
#include "daemon/launch_plan.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace stmux::daemon {
namespace {

BatchKey key(std::int64_t m) {
  Request r{};
  r.m = m, r.n = 8, r.k = 8, r.lda = m, r.ldb = 8, r.ldc = m;
  r.alpha = 1.0f;
  return BatchKey::of(r);
}

TEST(LaunchPlan, RequestsOfOneKeyShareAGroupInFirstSeenOrder) {
  const std::vector<PlanItem> items{{key(4)}, {key(8)}, {key(4)}, {key(8)}, {key(16)}};
  const LaunchPlan plan = planLaunches(items, 256);
  ASSERT_EQ(plan.groups.size(), 3u);
  EXPECT_EQ(plan.groups[0].key, key(4));
  EXPECT_EQ(plan.groups[0].count, 2u);
  EXPECT_EQ(plan.groups[1].key, key(8));
  EXPECT_EQ(plan.groups[1].start, 2u);
  EXPECT_EQ(plan.groups[1].first, 2u);
  EXPECT_EQ(plan.groups[2].count, 1u);
  EXPECT_EQ(plan.order, (std::vector<std::size_t>{0, 2, 1, 3, 4}));
  EXPECT_EQ(plan.problems, 5u);
}

TEST(LaunchPlan, AStridedBatchIsAsManyProblemsAsItHasInItsKeysGroup) {
  const std::vector<PlanItem> items{{key(4), 1}, {key(4), 6}, {key(8), 3}};
  const LaunchPlan plan = planLaunches(items, 256);
  ASSERT_EQ(plan.groups.size(), 2u);
  EXPECT_EQ(plan.groups[0].count, 2u);
  EXPECT_EQ(plan.groups[0].problems, 7u);
  EXPECT_EQ(plan.groups[1].first, 7u);
  EXPECT_EQ(plan.groups[1].problems, 3u);
  EXPECT_EQ(plan.problems, 10u);
}

TEST(LaunchPlan, AStridedBatchWithNoRoomLeftGoesAloneAndEveryRequestStillFits) {
  // max_batch 8, 4 requests: room for 4 further problems.
  const std::vector<PlanItem> items{{key(4), 3}, {key(4), 4}, {key(4), 2}, {key(4)}};
  const LaunchPlan plan = planLaunches(items, 8);
  ASSERT_EQ(plan.groups.size(), 2u);
  EXPECT_FALSE(plan.groups[0].alone);
  EXPECT_EQ(plan.groups[0].count, 3u);  // the batches of 3 and 2, and the single one
  EXPECT_EQ(plan.groups[0].problems, 6u);
  EXPECT_TRUE(plan.groups[1].alone);  // 3 further problems: no room after the first's 2
  EXPECT_EQ(plan.groups[1].problems, 0u);
  EXPECT_EQ(plan.order[plan.groups[1].start], 1u);
  EXPECT_LE(plan.problems, 8u);
}

TEST(LaunchPlan, ARequestThatCannotBeBatchedIsAGroupOfItsOwn) {
  const std::vector<PlanItem> items{{key(4)}, {key(4), 1, false}, {key(4)}, {key(4), 5, false}};
  const LaunchPlan plan = planLaunches(items, 256);
  ASSERT_EQ(plan.groups.size(), 3u);
  EXPECT_EQ(plan.groups[0].count, 2u);
  EXPECT_TRUE(plan.groups[1].alone);
  EXPECT_TRUE(plan.groups[2].alone);
  EXPECT_EQ(plan.problems, 2u);  // alone groups use no room in the arrays
  EXPECT_EQ(plan.order, (std::vector<std::size_t>{0, 2, 1, 3}));
}

TEST(LaunchPlan, RandomBatchesNeverOverflowTheArraysAndPlaceEveryRequestOnce) {
  std::mt19937 random(11);
  for (int round = 0; round < 2000; ++round) {
    const std::size_t max_batch = 1 + random() % 64;
    std::vector<PlanItem> items(1 + random() % max_batch);
    for (PlanItem& item : items) {
      item.key = key(1 + random() % 3);
      item.problems = random() % 4 == 0 ? 1 + random() % 40 : 1;
      item.batchable = random() % 10 != 0;
    }
    const LaunchPlan plan = planLaunches(items, max_batch);
    ASSERT_LE(plan.problems, max_batch);
    std::vector<int> seen(items.size(), 0);
    std::size_t problems = 0;
    for (const LaunchGroup& group : plan.groups) {
      std::size_t group_problems = 0;
      for (std::size_t r = group.start; r < group.start + group.count; ++r) {
        const PlanItem& item = items[plan.order[r]];
        ++seen[plan.order[r]];
        EXPECT_EQ(item.key, group.key);
        if (!item.batchable) {
          EXPECT_TRUE(group.alone);
        }
        group_problems += static_cast<std::size_t>(item.problems);
      }
      if (group.alone) {
        EXPECT_EQ(group.count, 1u);
      } else {
        EXPECT_EQ(group.problems, group_problems);
        EXPECT_EQ(group.first, problems);
        problems += group.problems;
      }
    }
    EXPECT_EQ(problems, plan.problems);
    for (int s : seen)
      ASSERT_EQ(s, 1);
  }
}

// What cuBLAS refuses before launching anything leaves C untouched: the
// caller runs the call itself and gets its own cuBLAS's answer (which may be
// success: another cuBLAS version, the daemon's GPU memory full), not the
// daemon's cuBLAS's status handed on as if the call were wrong (found by
// review). Anything else may have run in part: a failure.
TEST(AnswerForRefusedLaunch, WhatCublasRefusesBeforeLaunchingIsDeclinedAndTheRestFailed) {
  for (const std::int32_t status :
       {kStatusNotInitialized, kStatusAllocFailed, kStatusInvalidValue, kStatusArchMismatch,
        kStatusMappingError, kStatusNotSupported}) {
    EXPECT_EQ(answerForRefusedLaunch(status), kStatusDeclined) << status;
  }
  for (const std::int32_t status :
       std::initializer_list<std::int32_t>{kStatusExecutionFailed, kStatusInternalError, 16, 99}) {
    EXPECT_EQ(answerForRefusedLaunch(status), kStatusExecutionFailed) << status;
  }
}

}  // namespace
}  // namespace stmux::daemon

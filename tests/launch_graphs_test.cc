// Which batches the executor replays as CUDA graphs (daemon/launch_graphs.h),
// with ints for graphs.
#include "daemon/launch_graphs.h"

#include <gtest/gtest.h>

#include <vector>

namespace stmux::daemon {
namespace {

using Graphs = LaunchGraphs<int>;

LaunchSignature signature(std::size_t buffer, std::int64_t m, std::size_t problems) {
  Request r{};
  r.m = m, r.n = 8, r.k = 8, r.lda = m, r.ldb = 8, r.ldc = m;
  r.alpha = 1.0f;
  return LaunchSignature{buffer, {{BatchKey::of(r), problems}}};
}

Graphs::Action next(Graphs& graphs, const LaunchSignature& s, int* replayed = nullptr) {
  int* graph = nullptr;
  const Graphs::Action action = graphs.next(s, graph);
  if (replayed != nullptr) *replayed = graph != nullptr ? *graph : -1;
  return action;
}

TEST(LaunchGraphs, ASignatureIsCapturedOnItsNthSightingThenReplayed) {
  std::vector<int> destroyed;
  {
    Graphs graphs(16, 2, [&](int& g) { destroyed.push_back(g); });
    const LaunchSignature s = signature(0, 64, 10);
    EXPECT_EQ(next(graphs, s), Graphs::Action::kLaunch) << "seen once: no capture";
    EXPECT_EQ(next(graphs, s), Graphs::Action::kCapture);
    graphs.captured(s, 7);
    int replayed = 0;
    EXPECT_EQ(next(graphs, s, &replayed), Graphs::Action::kReplay);
    EXPECT_EQ(replayed, 7);
    EXPECT_EQ(next(graphs, s, &replayed), Graphs::Action::kReplay);
    EXPECT_EQ(graphs.graphs(), 1u);
    EXPECT_TRUE(destroyed.empty());
  }
  EXPECT_EQ(destroyed, std::vector<int>{7}) << "the cache's end destroys its graphs";
}

TEST(LaunchGraphs, AnyDifferenceIsAnotherSignature) {
  Graphs graphs(16, 1, [](int&) {});
  const LaunchSignature s = signature(0, 64, 10);
  EXPECT_EQ(next(graphs, s), Graphs::Action::kCapture);
  graphs.captured(s, 1);
  // Another buffer (other array addresses), other problems, another key.
  for (const LaunchSignature& other :
       {signature(1, 64, 10), signature(0, 64, 11), signature(0, 32, 10)}) {
    EXPECT_EQ(next(graphs, other), Graphs::Action::kCapture);
    graphs.captured(other, std::nullopt);
  }
  // Two groups are not one.
  LaunchSignature two = s;
  two.groups.push_back(signature(0, 32, 3).groups.front());
  EXPECT_EQ(next(graphs, two), Graphs::Action::kCapture);
  EXPECT_EQ(graphs.size(), 5u);
}

TEST(LaunchGraphs, AFailedCaptureLaunchesDirectlyFromThenOn) {
  Graphs graphs(16, 1, [](int&) {});
  const LaunchSignature s = signature(0, 64, 10);
  EXPECT_EQ(next(graphs, s), Graphs::Action::kCapture);
  graphs.captured(s, std::nullopt);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(next(graphs, s), Graphs::Action::kLaunch);
  EXPECT_EQ(graphs.graphs(), 0u);
}

TEST(LaunchGraphs, TheLeastRecentlySeenIsForgottenAndItsGraphDestroyed) {
  std::vector<int> destroyed;
  Graphs graphs(2, 1, [&](int& g) { destroyed.push_back(g); });
  const LaunchSignature a = signature(0, 16, 2), b = signature(0, 32, 2), c = signature(0, 48, 2);
  ASSERT_EQ(next(graphs, a), Graphs::Action::kCapture);
  graphs.captured(a, 1);
  ASSERT_EQ(next(graphs, b), Graphs::Action::kCapture);
  graphs.captured(b, 2);
  ASSERT_EQ(next(graphs, a), Graphs::Action::kReplay);   // a is now the more recent
  ASSERT_EQ(next(graphs, c), Graphs::Action::kCapture);  // b goes
  EXPECT_EQ(destroyed, std::vector<int>{2});
  graphs.captured(c, 3);
  EXPECT_EQ(graphs.size(), 2u);
  EXPECT_EQ(next(graphs, a), Graphs::Action::kReplay);
  EXPECT_EQ(next(graphs, b), Graphs::Action::kCapture) << "forgotten, so captured afresh";
  EXPECT_EQ(destroyed, (std::vector<int>{2, 3}));
}

TEST(LaunchGraphs, ACaptureForAForgottenSignatureIsDestroyed) {
  std::vector<int> destroyed;
  Graphs graphs(1, 1, [&](int& g) { destroyed.push_back(g); });
  graphs.captured(signature(0, 16, 2), 9);  // never asked for, or forgotten since
  EXPECT_EQ(destroyed, std::vector<int>{9});
  EXPECT_EQ(graphs.size(), 0u);
}

}  // namespace
}  // namespace stmux::daemon

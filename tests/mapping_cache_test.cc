// Mapping bookkeeping (daemon/mapping_cache.cc) with fake open/close: keys
// are allocations not addresses, limits evict least recently used first, and
// nothing a batch in flight uses is ever closed under it.
#include "daemon/mapping_cache.h"

#include <gtest/gtest.h>

#include <set>

namespace stmux::daemon {
namespace {

class MappingCacheTest : public ::testing::Test {
 protected:
  MappingCache make(std::size_t limit) {
    return MappingCache(
        limit,
        [this](const IpcHandle& handle) -> Result<Mapped> {
          if (handle.bytes[0] == 0xee) return Status::error("cannot open");
          ++opens_;
          const std::uint64_t base = 0x10000 * (next_++);
          open_.insert(base);
          return Mapped{base, 4096};
        },
        [this](const Mapped& mapped) {
          EXPECT_EQ(open_.erase(mapped.base), 1u) << "closed twice or never opened";
          ++closes_;
        });
  }
  static IpcHandle handle(std::uint8_t tag) {
    IpcHandle h{};
    h.bytes[0] = tag;
    return h;
  }

  int opens_ = 0, closes_ = 0;
  std::uint64_t next_ = 1;
  std::set<std::uint64_t> open_;
};

TEST_F(MappingCacheTest, OpensOncePerAllocation) {
  auto cache = make(16);
  auto first = cache.acquire(1, 100, handle(1), 1);
  auto again = cache.acquire(1, 100, handle(1), 2);
  ASSERT_TRUE(first.ok() && again.ok());
  EXPECT_EQ(first->base, again->base);
  EXPECT_EQ(opens_, 1);
  EXPECT_EQ(cache.size(), 1u);
}

TEST_F(MappingCacheTest, ClientsAreKeptApart) {
  auto cache = make(16);
  auto a = cache.acquire(1, 100, handle(1), 1);
  auto b = cache.acquire(2, 100, handle(1), 1);  // same id, another client
  EXPECT_NE(a->base, b->base);
  EXPECT_EQ(opens_, 2);
}

TEST_F(MappingCacheTest, ANewHandleUnderAnOldIdReplacesTheMapping) {
  auto cache = make(16);
  auto old = cache.acquire(1, 100, handle(1), 1);
  cache.batchCompleted(1);
  auto fresh = cache.acquire(1, 100, handle(2), 2);
  EXPECT_NE(old->base, fresh->base);
  EXPECT_EQ(closes_, 1) << "the old mapping was kept";
  EXPECT_EQ(cache.size(), 1u);
}

TEST_F(MappingCacheTest, ReleaseClosesOnlyAfterTheBatchUsingItCompletes) {
  auto cache = make(16);
  ASSERT_TRUE(cache.acquire(1, 100, handle(1), 7).ok());
  cache.release(1, 100);
  EXPECT_EQ(closes_, 0) << "closed while batch 7 may still read it";
  EXPECT_EQ(cache.pendingCloses(), 1u);
  cache.batchCompleted(6);
  EXPECT_EQ(closes_, 0);
  cache.batchCompleted(7);
  EXPECT_EQ(closes_, 1);
  EXPECT_EQ(cache.pendingCloses(), 0u);
}

TEST_F(MappingCacheTest, TheLeastRecentlyUsedGoesFirstAtTheLimit) {
  auto cache = make(2);
  ASSERT_TRUE(cache.acquire(1, 1, handle(1), 1).ok());
  ASSERT_TRUE(cache.acquire(1, 2, handle(2), 1).ok());
  cache.batchCompleted(1);
  ASSERT_TRUE(cache.acquire(1, 1, handle(1), 2).ok());  // 1 is now the most recent
  cache.batchCompleted(2);
  ASSERT_TRUE(cache.acquire(1, 3, handle(3), 3).ok());  // evicts 2
  EXPECT_EQ(cache.clientSize(1), 2u);
  EXPECT_EQ(closes_, 1);
  const int opens = opens_;
  ASSERT_TRUE(cache.acquire(1, 1, handle(1), 3).ok());
  EXPECT_EQ(opens_, opens) << "the recently used mapping was evicted";
}

TEST_F(MappingCacheTest, MappingsInUseAreNotEvictedEvenAtTheLimit) {
  auto cache = make(2);
  ASSERT_TRUE(cache.acquire(1, 1, handle(1), 5).ok());
  ASSERT_TRUE(cache.acquire(1, 2, handle(2), 5).ok());
  ASSERT_TRUE(cache.acquire(1, 3, handle(3), 5).ok());  // all three in batch 5
  EXPECT_EQ(closes_, 0);
  EXPECT_EQ(cache.clientSize(1), 3u);
  cache.batchCompleted(5);
  ASSERT_TRUE(cache.acquire(1, 4, handle(4), 6).ok());
  EXPECT_EQ(cache.clientSize(1), 2u);
}

TEST_F(MappingCacheTest, ForgettingAClientClosesAllItsMappings) {
  auto cache = make(16);
  for (std::uint64_t id = 1; id <= 5; ++id)
    ASSERT_TRUE(cache.acquire(1, id, handle(1), 1).ok());
  ASSERT_TRUE(cache.acquire(2, 1, handle(1), 1).ok());
  cache.forgetClient(1);
  EXPECT_EQ(closes_, 0) << "batch 1 is still in flight";
  cache.batchCompleted(1);
  EXPECT_EQ(closes_, 5);
  EXPECT_EQ(cache.clientSize(2), 1u);
}

TEST_F(MappingCacheTest, AFailedOpenIsReportedAndNotCached) {
  auto cache = make(16);
  auto failed = cache.acquire(1, 9, handle(0xee), 1);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.message().find("cannot open"), std::string::npos);
  EXPECT_EQ(cache.size(), 0u);
}

TEST_F(MappingCacheTest, DestructionClosesEverything) {
  {
    auto cache = make(16);
    ASSERT_TRUE(cache.acquire(1, 1, handle(1), 1).ok());
    ASSERT_TRUE(cache.acquire(1, 2, handle(2), 2).ok());
    cache.release(1, 2);  // deferred
  }
  EXPECT_TRUE(open_.empty());
}

}  // namespace
}  // namespace stmux::daemon

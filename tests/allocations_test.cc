// The shim's cache of exported allocations (shim/allocations.cc) against a
// fake CUDA driver: an allocation is found gone only when the driver says so
// (another buffer id at its address, or none), never because a query failed;
// ids not told to the daemon are handed out again.
#include "shim/allocations.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

namespace stmux::shim {
namespace {

// One 1 MiB allocation per base the test makes, with a buffer id; an
// address the map does not hold is not CUDA's.
struct FakeMemory {
  std::mutex mutex;  // guards ids while a sweep runs on a thread of its own
  std::map<CUdeviceptr, unsigned long long> ids;
  bool failing = false;  // every query fails, as with a driver in trouble
  // A sweep's query of this address waits (up to 2 s) until let go.
  CUdeviceptr held = 0;
  std::condition_variable changed;
  bool holding = false;
  bool let_go = false;
};
FakeMemory* g_memory = nullptr;
constexpr std::size_t kBytes = 1 << 20;

CUresult fakePointerGetAttributes(unsigned count, CUpointer_attribute* attributes, void** values,
                                  CUdeviceptr address) {
  std::unique_lock lock(g_memory->mutex);
  if (g_memory->failing) return CUDA_ERROR_UNKNOWN;
  if (count == 1 && address == g_memory->held) {  // the sweep's query
    g_memory->holding = true;
    g_memory->changed.notify_all();
    g_memory->changed.wait_for(lock, std::chrono::seconds(2), [] { return g_memory->let_go; });
    g_memory->holding = false;
  }
  const auto it = g_memory->ids.find(address);
  for (unsigned i = 0; i < count; ++i) {
    switch (attributes[i]) {
      case CU_POINTER_ATTRIBUTE_BUFFER_ID:
        *static_cast<unsigned long long*>(values[i]) = it == g_memory->ids.end() ? 0 : it->second;
        break;
      case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *static_cast<int*>(values[i]) = 0;
        break;
      case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *static_cast<CUmemorytype*>(values[i]) = CU_MEMORYTYPE_DEVICE;
        break;
      case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *static_cast<unsigned*>(values[i]) = 1;
        break;
      default:
        return CUDA_ERROR_INVALID_VALUE;
    }
  }
  return CUDA_SUCCESS;
}
CUresult fakeMemGetAddressRange(CUdeviceptr* base, size_t* bytes, CUdeviceptr address) {
  *base = address;
  *bytes = kBytes;
  return CUDA_SUCCESS;
}
CUresult fakeIpcGetMemHandle(CUipcMemHandle* handle, CUdeviceptr base) {
  std::memset(handle, 0, sizeof(*handle));
  std::memcpy(handle, &base, sizeof(base));
  return CUDA_SUCCESS;
}

class AllocationsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_memory = &memory_;
    driver_.cuPointerGetAttributes = fakePointerGetAttributes;
    driver_.cuMemGetAddressRange = fakeMemGetAddressRange;
    driver_.cuIpcGetMemHandle = fakeIpcGetMemHandle;
  }
  const void* at(CUdeviceptr base) { return reinterpret_cast<const void*>(base); }

  FakeMemory memory_;
  Driver driver_;
  AllocationCache cache_;
};

TEST_F(AllocationsTest, AnAllocationIsGoneOnlyWhenTheDriverSaysSo) {
  memory_.ids = {{0x10000000, 11}, {0x20000000, 12}};
  EXPECT_EQ(cache_.describe(driver_, at(0x10000000)).desc.alloc_id, 11u);
  EXPECT_EQ(cache_.describe(driver_, at(0x20000000)).desc.alloc_id, 12u);
  ASSERT_EQ(cache_.size(), 2u);
  // A driver that cannot answer: nothing is taken for freed.
  memory_.failing = true;
  cache_.sweep(driver_);
  EXPECT_EQ(cache_.size(), 2u);
  EXPECT_TRUE(cache_.takeGone().empty());
  // One freed (no buffer at its address), one freed and its address reused.
  memory_.failing = false;
  memory_.ids = {{0x20000000, 13}};
  cache_.sweep(driver_);
  EXPECT_EQ(cache_.size(), 0u);
  std::vector<std::uint64_t> gone = cache_.takeGone();
  std::sort(gone.begin(), gone.end());
  EXPECT_EQ(gone, (std::vector<std::uint64_t>{11, 12}));
  EXPECT_TRUE(cache_.takeGone().empty()) << "handed out once";
}

TEST_F(AllocationsTest, IdsNotToldToTheDaemonAreHandedOutAgain) {
  memory_.ids = {{0x10000000, 21}};
  (void)cache_.describe(driver_, at(0x10000000));
  memory_.ids.clear();
  cache_.sweep(driver_);
  std::vector<std::uint64_t> gone = cache_.takeGone();
  ASSERT_EQ(gone, std::vector<std::uint64_t>{21});
  cache_.giveBack(gone);  // the release message could not be sent
  EXPECT_EQ(cache_.takeGone(), std::vector<std::uint64_t>{21});
}

// The sweep asks the driver about each allocation without the cache's lock,
// which every served call takes to describe its operands: they waited for a
// whole sweep. An allocation described again at a reused base meanwhile is
// handed out as gone once.
TEST_F(AllocationsTest, CallsAreDescribedWhileASweepWaitsForTheDriver) {
  memory_.ids = {{0x10000000, 31}, {0x20000000, 32}};
  (void)cache_.describe(driver_, at(0x10000000));
  (void)cache_.describe(driver_, at(0x20000000));
  memory_.held = 0x10000000;
  std::atomic<bool> swept{false};
  std::thread sweeper([&] {
    cache_.sweep(driver_);
    swept = true;
  });
  {
    std::unique_lock lock(memory_.mutex);
    ASSERT_TRUE(
        memory_.changed.wait_for(lock, std::chrono::seconds(2), [&] { return memory_.holding; }));
    memory_.ids[0x10000000] = 33;  // freed, and its address reused
    memory_.ids[0x30000000] = 34;
  }
  EXPECT_EQ(cache_.describe(driver_, at(0x30000000)).desc.alloc_id, 34u);
  EXPECT_EQ(cache_.describe(driver_, at(0x10000000)).desc.alloc_id, 33u);
  EXPECT_FALSE(swept) << "describe() waited for the sweep's queries";
  {
    std::lock_guard lock(memory_.mutex);
    memory_.let_go = true;
  }
  memory_.changed.notify_all();
  sweeper.join();
  EXPECT_EQ(cache_.takeGone(), std::vector<std::uint64_t>{31}) << "the freed allocation, once";
  EXPECT_EQ(cache_.size(), 3u);
  EXPECT_EQ(cache_.describe(driver_, at(0x10000000)).desc.alloc_id, 33u);
}

}  // namespace
}  // namespace stmux::shim

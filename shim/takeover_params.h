// The arguments of the shim's own SGEMM kernel (shim/takeover_sgemm.cu),
// shared by the kernel and the host code that launches it, passed by value as
// the kernel's one parameter. Plain C types only: nvcc and the host compiler
// must lay it out alike.
#pragma once

#include <stdint.h>

namespace stmux::shim {

// The kernel's shape: a block of 256 threads computes 64 x 64 tiles of C.
constexpr int kTakeoverThreads = 256;
constexpr int kTakeoverTile = 64;
// Entries of the kernel's gate table (TakeoverParams::gate).
constexpr uint32_t kTakeoverGates = 4096;
// How long the wait kernel (stmux_wait_released) sleeps between its reads of
// the word it waits for: the interval stmux-handoff-bench's polling waiters
// were measured with.
constexpr unsigned kWaitSleepNs = 2000;

// The gate entry of the launch for slot `slot` of a caller with
// `slot_count` slots (TakeoverParams::gate). A name (caller, seq) is one
// call only among the caller's slots of one entry, and seqs are counted per
// slot: each slot of a caller has an entry of its own while the caller's
// slots fit the table; beyond it (STMUX_SLOTS above kTakeoverGates) two
// slots would share one with the same seq in flight, and one launch could
// take the other's answer, so none has an entry (each block reads its word).
constexpr uint32_t takeoverGate(uint32_t caller, uint32_t slot, uint32_t slot_count) {
  return slot_count <= kTakeoverGates
             ? static_cast<uint32_t>((uint64_t{caller} * slot_count + slot) % kTakeoverGates)
             : kTakeoverGates;
}

// Column-major, as cuBLAS: for each of `count` problems,
// C = alpha * op(A) * op(B) + beta * C, with C not read when beta == 0 and A
// and B not read when alpha == 0 or k == 0, then the epilogue
// (stmux/epilogue.h) with `bias` (m floats, the same for every problem).
// Problem i's operands are the pointers plus i times the strides (in
// elements).
struct TakeoverParams {
  const float* a;
  const float* b;
  float* c;
  const float* bias;
  uint32_t epilogue;
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  int64_t count;
  int64_t stride_a, stride_b, stride_c;
  float alpha, beta;
  int32_t transa, transb;  // cublasOperation_t: 0 N, otherwise T (C is T for real data)
  // Stream order (shim/stream_order.h): when not null, the kernel computes
  // only if this word (host memory) has reached `seq`, compared cyclically,
  // and returns at once otherwise.
  const uint32_t* takeover;
  uint32_t seq;
  // Where the launch's blocks learn that word from the one of them that reads
  // it: reads of one word of host memory from many blocks at once are
  // served one after another (about 1 us each on an H100). When `caller` is
  // not 0, (caller, seq) must name this launch alone among those given
  // entry `gate` (< kTakeoverGates); with 0, each block reads the word.
  uint32_t gate;
  uint32_t caller;  // below 2^31
};

}  // namespace stmux::shim

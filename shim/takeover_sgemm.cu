// The shim's own FP32 GEMM, for stream-ordered calls the daemon does not
// finish (lost, stuck, or declining them). It is queued on the caller's
// stream behind the wait for the call, at the call, and computes only if the
// shim gave up on the daemon (TakeoverParams::takeover); so the shim never
// launches anything while a stream waits on the daemon. Launching then was
// seen to deadlock: a kernel loaded on first use (CUDA's lazy loading, cuBLAS's
// included) may wait for the context's work, which includes the waiting
// stream, and the program's own lazy loads block other threads' launches.
// Loaded explicitly before the context's first stream-ordered call
// (shim/takeover_kernel.h).
//
// Correct for every shape, transpose and batch count, with 64-bit indices.
// Each block computes 64 x 64 tiles of C, each thread a 4 x 4 piece of one
// held in registers, from 16-deep slices of op(A) and op(B) in shared memory;
// the next slice is read from global memory while this one is multiplied. The
// standby grid is a single wave (shim/takeover_kernel.cc), so the blocks loop
// over the tiles, of every problem of a batch.
#include "shim/takeover_params.h"
#include "stmux/epilogue.h"

namespace {

using stmux::shim::kTakeoverThreads;
using stmux::shim::kTakeoverTile;
constexpr int kDepth = 16;                                         // the k slice
constexpr int kPiece = 4;                                          // each thread's rows and columns
constexpr int kLoads = kTakeoverTile * kDepth / kTakeoverThreads;  // of A and of B, per thread
constexpr int kPitch = kTakeoverTile + 4;  // a shared row: 16-byte aligned, fewer bank conflicts
static_assert(kTakeoverThreads == (kTakeoverTile / kPiece) * (kTakeoverTile / kPiece));

struct Slice {
  float a[kDepth][kPitch];  // op(A)[row, k] at [k][row]
  float b[kDepth][kPitch];  // op(B)[k, col] at [k][col]
};

// Where this thread's i-th load of a slice lands: along the tile, or along
// the slice's depth, whichever is contiguous in memory (coalesced reads).
struct Spot {
  int along;  // row of op(A) or column of op(B), within the tile
  int depth;  // within the slice
};
__device__ __forceinline__ Spot spotOf(int load, bool along_contiguous) {
  const int l = static_cast<int>(threadIdx.x) + load * kTakeoverThreads;
  return along_contiguous ? Spot{l % kTakeoverTile, l / kTakeoverTile}
                          : Spot{l / kDepth, l % kDepth};
}

// The gate table (TakeoverParams::gate): per entry, the launch that claimed
// it last, (caller << 32 | seq), and that launch's answer, its name shifted
// left by one with whether it computes in the low bit. Zero at module load.
__device__ unsigned long long gate_claims[stmux::shim::kTakeoverGates];
__device__ unsigned long long gate_answers[stmux::shim::kTakeoverGates];
// How long a block waits for the block that claimed its entry to answer
// before it reads the word itself: about 50 us.
constexpr long long kGateWaitCycles = 100'000;

// Whether the launch computes: the shim gave up on the daemon (run by one
// thread of each block).
__device__ bool takenOver(const stmux::shim::TakeoverParams& p) {
  const auto read = [&] {
    return static_cast<int32_t>(*static_cast<const volatile uint32_t*>(p.takeover) - p.seq) >= 0;
  };
  if (p.caller == 0 || p.gate >= stmux::shim::kTakeoverGates) return read();
  const unsigned long long launch = static_cast<unsigned long long>(p.caller) << 32 | p.seq;
  if (atomicExch(&gate_claims[p.gate], launch) != launch) {
    // The first block of this launch here (or one after another launch's
    // claim): it reads, and tells.
    const bool taken = read();
    atomicExch(&gate_answers[p.gate], launch << 1 | static_cast<unsigned long long>(taken));
    return taken;
  }
  // The block that claimed it is running (it claimed), so it answers soon.
  const long long start = clock64();
  while (clock64() - start < kGateWaitCycles) {
    const unsigned long long answer =
        *static_cast<volatile unsigned long long*>(&gate_answers[p.gate]);
    if (answer >> 1 == launch) return (answer & 1) != 0;
  }
  return read();
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kTakeoverThreads)
    stmux_takeover_sgemm(const stmux::shim::TakeoverParams p) {
  if (p.takeover != nullptr) {
    __shared__ bool computes;
    if (threadIdx.x == 0) computes = takenOver(p);
    __syncthreads();
    if (!computes) return;  // the daemon computed it
  }
  __shared__ __align__(16) Slice slice;
  const int piece_row = static_cast<int>(threadIdx.x) % (kTakeoverTile / kPiece) * kPiece;
  const int piece_col = static_cast<int>(threadIdx.x) / (kTakeoverTile / kPiece) * kPiece;
  const int64_t row_tiles = (p.m + kTakeoverTile - 1) / kTakeoverTile;
  const int64_t col_tiles = (p.n + kTakeoverTile - 1) / kTakeoverTile;
  const int64_t tiles_per_problem = row_tiles * col_tiles;
  const bool reads = p.alpha != 0.0f && p.k > 0;
  // Which index of a slice is contiguous in memory: op(A)'s row when A is
  // not transposed, op(B)'s column when B is.
  const bool a_along_contiguous = p.transa == 0;
  const bool b_along_contiguous = p.transb != 0;
  // Every loop bound is the same for the whole block, so __syncthreads is
  // reached by all its threads.
  for (int64_t tile = blockIdx.x; tile < tiles_per_problem * p.count; tile += gridDim.x) {
    const int64_t problem = tile / tiles_per_problem;
    const int64_t within = tile % tiles_per_problem;
    const int64_t row0 = within % row_tiles * kTakeoverTile;
    const int64_t col0 = within / row_tiles * kTakeoverTile;
    const float* a = p.a + problem * p.stride_a;
    const float* b = p.b + problem * p.stride_b;
    float* c = p.c + problem * p.stride_c;

    float next_a[kLoads], next_b[kLoads];
    const auto fetch = [&](int64_t k0) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const Spot sa = spotOf(i, a_along_contiguous);
        const int64_t row = row0 + sa.along, ka = k0 + sa.depth;
        next_a[i] = row < p.m && ka < p.k
                        ? (p.transa == 0 ? a[row + ka * p.lda] : a[ka + row * p.lda])
                        : 0.0f;
        const Spot sb = spotOf(i, b_along_contiguous);
        const int64_t col = col0 + sb.along, kb = k0 + sb.depth;
        next_b[i] = col < p.n && kb < p.k
                        ? (p.transb == 0 ? b[kb + col * p.ldb] : b[col + kb * p.ldb])
                        : 0.0f;
      }
    };
    float sum[kPiece][kPiece] = {};
    if (reads) fetch(0);
    for (int64_t k0 = 0; reads && k0 < p.k; k0 += kDepth) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const Spot sa = spotOf(i, a_along_contiguous);
        slice.a[sa.depth][sa.along] = next_a[i];
        const Spot sb = spotOf(i, b_along_contiguous);
        slice.b[sb.depth][sb.along] = next_b[i];
      }
      __syncthreads();
      if (k0 + kDepth < p.k) fetch(k0 + kDepth);  // in flight while this slice is used
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const float4 ra = *reinterpret_cast<const float4*>(&slice.a[d][piece_row]);
        const float4 rb = *reinterpret_cast<const float4*>(&slice.b[d][piece_col]);
        const float av[kPiece] = {ra.x, ra.y, ra.z, ra.w};
        const float bv[kPiece] = {rb.x, rb.y, rb.z, rb.w};
#pragma unroll
        for (int i = 0; i < kPiece; ++i) {
#pragma unroll
          for (int j = 0; j < kPiece; ++j)
            sum[i][j] = fmaf(av[i], bv[j], sum[i][j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      const int64_t col = col0 + piece_col + j;
#pragma unroll
      for (int i = 0; i < kPiece; ++i) {
        const int64_t row = row0 + piece_row + i;
        if (row >= p.m || col >= p.n) continue;
        float* out = c + row + col * p.ldc;
        // As BLAS: with k == 0 (or alpha 0) there is no product, so a
        // non-finite alpha gives no NaN and a negative one no -0.
        const float product = reads ? p.alpha * sum[i][j] : 0.0f;
        const float value = p.beta == 0.0f ? product : product + p.beta * *out;
        const float bias = (p.epilogue & stmux::kEpilogueBias) != 0 ? p.bias[row] : 0.0f;
        *out = stmux::applyEpilogue(p.epilogue, value, bias);
      }
    }
  }
}

// STMUX_STREAM_WAIT=kernel: holds its stream until the slot's `released`
// word (host memory) reaches `seq`, compared cyclically, in place of a
// cuStreamWaitValue32 on that word. One thread, sleeping between reads so as
// to cost the memory system little. On MPS, streams waiting this way taxed
// other processes' work about half as much as streams waiting in a stream
// memory operation (docs/BENCHMARKS.md, twenty-sixth session), and the word
// stays one the shim's watcher can set from the host.
extern "C" __global__ void __launch_bounds__(1)
    stmux_wait_released(const uint32_t* released, uint32_t seq) {
  while (static_cast<int32_t>(*static_cast<const volatile uint32_t*>(released) - seq) < 0) {
    __nanosleep(stmux::shim::kWaitSleepNs);
  }
}

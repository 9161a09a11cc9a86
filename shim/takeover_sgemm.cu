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
// A plain shared-memory tiled kernel: correct for every shape, transpose and
// batch count, with 64-bit indices; speed matters little on this path.
#include "shim/takeover_params.h"
#include "stmux/epilogue.h"

namespace {

constexpr int kTile = 16;

__device__ __forceinline__ float loadA(const stmux::shim::TakeoverParams& p, const float* a,
                                       int64_t row, int64_t col) {
  // op(A)[row, col]: A is m x k (N) or k x m (T).
  return p.transa == 0 ? a[row + col * p.lda] : a[col + row * p.lda];
}

__device__ __forceinline__ float loadB(const stmux::shim::TakeoverParams& p, const float* b,
                                       int64_t row, int64_t col) {
  // op(B)[row, col]: B is k x n (N) or n x k (T).
  return p.transb == 0 ? b[row + col * p.ldb] : b[col + row * p.ldb];
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kTile* kTile)
    stmux_takeover_sgemm(const stmux::shim::TakeoverParams p) {
  if (p.takeover != nullptr &&
      static_cast<int32_t>(*static_cast<const volatile uint32_t*>(p.takeover) - p.seq) < 0) {
    return;  // the daemon computed it
  }
  __shared__ float tile_a[kTile][kTile + 1];
  __shared__ float tile_b[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_tiles = (p.m + kTile - 1) / kTile;
  const int64_t col_tiles = (p.n + kTile - 1) / kTile;
  const bool reads = p.alpha != 0.0f && p.k > 0;
  // Every loop bound is the same for the whole block, so __syncthreads is
  // reached by all its threads.
  for (int64_t problem = blockIdx.z; problem < p.count; problem += gridDim.z) {
    const float* a = p.a + problem * p.stride_a;
    const float* b = p.b + problem * p.stride_b;
    float* c = p.c + problem * p.stride_c;
    for (int64_t col_tile = blockIdx.y; col_tile < col_tiles; col_tile += gridDim.y) {
      for (int64_t row_tile = blockIdx.x; row_tile < row_tiles; row_tile += gridDim.x) {
        const int64_t row = row_tile * kTile + tx;
        const int64_t col = col_tile * kTile + ty;
        float sum = 0.0f;
        for (int64_t k0 = 0; reads && k0 < p.k; k0 += kTile) {
          tile_a[ty][tx] = row < p.m && k0 + ty < p.k ? loadA(p, a, row, k0 + ty) : 0.0f;
          const int64_t b_col = col_tile * kTile + ty;
          tile_b[ty][tx] = k0 + tx < p.k && b_col < p.n ? loadB(p, b, k0 + tx, b_col) : 0.0f;
          __syncthreads();
#pragma unroll
          for (int i = 0; i < kTile; ++i)
            sum = fmaf(tile_a[i][tx], tile_b[ty][i], sum);
          __syncthreads();
        }
        if (row < p.m && col < p.n) {
          float* out = c + row + col * p.ldc;
          // As BLAS: with k == 0 (or alpha 0) there is no product, so a
          // non-finite alpha gives no NaN and a negative one no -0.
          const float product = reads ? p.alpha * sum : 0.0f;
          const float value = p.beta == 0.0f ? product : product + p.beta * *out;
          const float bias = (p.epilogue & stmux::kEpilogueBias) != 0 ? p.bias[row] : 0.0f;
          *out = stmux::applyEpilogue(p.epilogue, value, bias);
        }
      }
    }
  }
}

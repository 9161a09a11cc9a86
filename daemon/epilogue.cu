// The daemon's epilogue kernel: after a batch's GEMM launches, one launch
// applies every request's epilogue (bias, ReLU, GELU: stmux/epilogue.h) to its
// C, on the same stream. Requests with and without epilogues share the GEMM
// launches, so the epilogue cannot be fused into them; it is a pass over C of
// its own, one read and one write of each element.
//
// blockIdx.y picks the request (looping when the batch has more than the
// grid), and the grid's x dimension strides over that request's problems * m
// * n elements. Two entry points: the items in device memory (copied there
// ahead of the launch), or in the launch's parameters for a batch of at most
// kEpilogueInlineItems. Loaded by daemon/executor.cc from the fat binary
// embedded in it (daemon/epilogue_fatbin.h, generated).
#include "daemon/epilogue_params.h"
#include "stmux/epilogue.h"

namespace {

__device__ __forceinline__ void applyEpilogues(const stmux::daemon::EpilogueItem* items,
                                               int64_t count) {
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t step = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < count; i += gridDim.y) {
    const stmux::daemon::EpilogueItem item = items[i];
    if (item.m <= 0 || item.n <= 0 || item.problems <= 0) continue;
    const uint64_t m = static_cast<uint64_t>(item.m);
    const uint64_t n = static_cast<uint64_t>(item.n);
    const uint64_t problems = static_cast<uint64_t>(item.problems);
    // m * n is at most C's extent in floats (ldc >= m), which the executor
    // has checked fits an allocation. problems * m * n need not fit 63 bits
    // (a C shared by every problem, stride 0, has a small extent), so the
    // problems go in passes of at most 2^63 elements; one pass in practice.
    // Below 2^63, e + step cannot wrap.
    const uint64_t per_problem = m * n;
    const uint64_t per_pass = INT64_MAX / per_problem;
    for (uint64_t p0 = 0; p0 < problems;) {
      const uint64_t take = problems - p0 < per_pass ? problems - p0 : per_pass;
      const uint64_t elements = take * per_problem;
      for (uint64_t e = first; e < elements; e += step) {
        const uint64_t column = e / m;  // over every problem's columns
        const uint64_t row = e - column * m;
        const uint64_t problem = column / n;
        const uint64_t col = column - problem * n;
        float* x = item.c + static_cast<int64_t>(p0 + problem) * item.stride_c +
                   static_cast<int64_t>(row) + static_cast<int64_t>(col) * item.ldc;
        const float bias = (item.epilogue & stmux::kEpilogueBias) != 0 ? item.bias[row] : 0.0f;
        *x = stmux::applyEpilogue(item.epilogue, *x, bias);
      }
      p0 += take;
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    stmux_epilogue(const stmux::daemon::EpilogueItem* items, int64_t count) {
  applyEpilogues(items, count);
}

// __grid_constant__: the items are read where the launch put them, not copied
// to each thread's local memory, as indexing a by-value parameter otherwise
// needs.
extern "C" __global__ void __launch_bounds__(256)
    stmux_epilogue_inline(const __grid_constant__ stmux::daemon::EpilogueInline inline_items,
                          int64_t count) {
  applyEpilogues(inline_items.items, count);
}

// One request's epilogue, as the daemon's epilogue kernel (daemon/epilogue.cu)
// reads it from device memory, in an array with one entry per request of a
// batch. Plain C types only: nvcc and the host compiler must lay it out alike.
#pragma once

#include <stdint.h>

namespace stmux::daemon {

// Column-major, as cuBLAS: for each of `problems` problems, problem i's C
// (m x n, leading dimension ldc) at c + i * stride_c floats, every element
// C[row, col] becomes applyEpilogue(epilogue, C[row, col], bias[row])
// (stmux/epilogue.h). `bias` (m floats, the same for every problem) is read
// only with kEpilogueBias.
struct EpilogueItem {
  float* c;
  const float* bias;
  int64_t m, n, ldc;
  int64_t problems, stride_c;
  uint32_t epilogue;
  uint32_t reserved;  // explicit padding: the same size on both sides
};

static_assert(sizeof(EpilogueItem) == 64, "EpilogueItem must be laid out alike by nvcc and g++");

// A batch with at most this many epilogues passes them in the launch's own
// parameters (2 KiB, within the 4 KiB every CUDA version takes), to the
// kernel stmux_epilogue_inline: no copy to device memory ahead of the launch,
// which is an operation of its own on the stream. Larger batches copy theirs.
constexpr int kEpilogueInlineItems = 32;
struct EpilogueInline {
  EpilogueItem items[kEpilogueInlineItems];
};

}  // namespace stmux::daemon

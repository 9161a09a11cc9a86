// Epilogues: what is applied to each element of a GEMM's result after
// alpha * op(A) op(B) + beta * C, as cuBLASLt's CUBLASLT_EPILOGUE_BIAS,
// _RELU, _RELU_BIAS, _GELU and _GELU_BIAS do (PyTorch's nn.Linear with a
// bias, and its fused addmm + ReLU or GELU). A bias is a vector of m floats,
// one per row of C, added to every column.
//
// One definition for every place that applies them: the daemon's epilogue
// kernel, the shim's takeover kernel and the tests' host reference. Plain C
// types and no library: nvcc and the host compiler both include it.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define STMUX_HOST_DEVICE __host__ __device__
#else
#define STMUX_HOST_DEVICE
#endif

namespace stmux {

// Request::epilogue bits. At most one activation.
inline constexpr uint32_t kEpilogueNone = 0;
inline constexpr uint32_t kEpilogueBias = 1u << 0;
inline constexpr uint32_t kEpilogueRelu = 1u << 1;
inline constexpr uint32_t kEpilogueGelu = 1u << 2;

STMUX_HOST_DEVICE inline bool validEpilogue(uint32_t epilogue) {
  return (epilogue & ~(kEpilogueBias | kEpilogueRelu | kEpilogueGelu)) == 0 &&
         (epilogue & (kEpilogueRelu | kEpilogueGelu)) != (kEpilogueRelu | kEpilogueGelu);
}

// `x` (one element of the GEMM's result) with the epilogue applied; `bias`
// is its row's bias, read only with kEpilogueBias. GELU is the tanh
// approximation, as cuBLASLt's (and PyTorch's gelu(approximate="tanh")).
STMUX_HOST_DEVICE inline float applyEpilogue(uint32_t epilogue, float x, float bias) {
  if ((epilogue & kEpilogueBias) != 0) x += bias;
  if ((epilogue & kEpilogueRelu) != 0) x = x > 0.0f ? x : 0.0f;
  if ((epilogue & kEpilogueGelu) != 0) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    x = 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
  }
  return x;
}

}  // namespace stmux

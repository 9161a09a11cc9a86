// The path of an intercepted SGEMM: check, submit to the daemon, or fall back
// to the real cuBLAS, counting why.
#pragma once

#include <cublas_api.h>

#include <cstdint>
#include <optional>

#include "stmux/wire.h"

namespace stmux::shim {

// One call as the application made it, whichever entry point it came through.
struct Gemm {
  EntryPoint entry = EntryPoint::kSgemm;  // which, for the counts
  bool legacy = false;  // cublasSgemm (v1): no handle, scalars by value, no status
  cublasHandle_t handle = nullptr;
  std::int32_t transa = 0, transb = 0;
  std::int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  const float* alpha = nullptr;  // v2: as given (host or device pointer mode)
  const float* beta = nullptr;
  float alpha_value = 0, beta_value = 0;  // legacy: the values
  const float* a = nullptr;
  const float* b = nullptr;
  float* c = nullptr;
  // Strided-batched calls: problems, and floats between one's operands and
  // the next's.
  std::int64_t count = 1;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  // Set by entry points whose precision is not the handle's math mode (a
  // GEMV never uses TF32; GemmEx's compute type may say): the cublasMath_t
  // and cublasEmulationStrategy_t to run with. -1: the handle's.
  std::int32_t math_mode = -1;
  std::int32_t emulation = -1;
  // cublasLtMatmul: no handle. The call names its stream, and the entry
  // point has checked that alpha and beta are host pointers and set the
  // precision (math_mode, emulation).
  bool lt = false;
  cudaStream_t stream = nullptr;
  // Applied to C after the GEMM (stmux/epilogue.h), with `bias` (m floats).
  std::uint32_t epilogue = 0;
  const float* bias = nullptr;
  // The entry point already knows the call runs directly, and why (a form
  // stmux does not serve, or one cuBLAS refuses or returns from at once).
  std::optional<Fallback> direct_because;
};

// The real call with the application's own arguments, as a cheap reference to
// a lambda at the entry point.
class DirectCall {
 public:
  template <class F>
  explicit DirectCall(F& f) : object_(&f), call_([](void* o) { return (*static_cast<F*>(o))(); }) {}
  cublasStatus_t operator()() const { return call_(object_); }

 private:
  void* object_;
  cublasStatus_t (*call_)(void*);
};

// Serves the call through the daemon, or runs `direct`. Never throws.
cublasStatus_t intercept(const Gemm& gemm, DirectCall direct) noexcept;

}  // namespace stmux::shim

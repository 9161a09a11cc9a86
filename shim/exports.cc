// libstmux.so's exported functions. Their shells come from the hook list
// (hooks.h); each forwards to a hooks:: function below, which turns the call
// into a Gemm and a DirectCall with the caller's own arguments. A hook added to
// the list without its function here fails to compile.
#include <cublas_api.h>

#include "shim/hooks.h"
#include "shim/intercept.h"
#include "shim/real.h"
#include "stmux/wire.h"

namespace stmux::shim::hooks {

#define STMUX_DECLARE(ret, name, params, args) ret name params noexcept;
STMUX_HOOKS(STMUX_DECLARE)
#undef STMUX_DECLARE

namespace {

template <class Int>
Gemm makeGemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, Int m,
              Int n, Int k, const float* alpha, const float* a, Int lda, const float* b, Int ldb,
              const float* beta, float* c, Int ldc) {
  Gemm gemm;
  gemm.handle = handle;
  gemm.transa = static_cast<std::int32_t>(transa);
  gemm.transb = static_cast<std::int32_t>(transb);
  gemm.m = m, gemm.n = n, gemm.k = k;
  gemm.lda = lda, gemm.ldb = ldb, gemm.ldc = ldc;
  gemm.alpha = alpha, gemm.beta = beta;
  gemm.a = a, gemm.b = b, gemm.c = c;
  return gemm;
}

// The legacy API's transpose letters; anything else is invalid (-1), and the
// real function reports it.
std::int32_t legacyOp(char op) {
  switch (op) {
    case 'N':
    case 'n':
      return kOpN;
    case 'T':
    case 't':
      return kOpT;
    case 'C':
    case 'c':
      return kOpC;
    default:
      return -1;
  }
}

}  // namespace

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa,
                              cublasOperation_t transb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemm_v2 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemm_v2(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C,
                               ldc);
  };
  return intercept(makeGemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemm_v2_64(cublasHandle_t handle, cublasOperation_t transa,
                                 cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                                 const float* alpha, const float* A, int64_t lda, const float* B,
                                 int64_t ldb, const float* beta, float* C, int64_t ldc) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemm_v2_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemm_v2_64(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C,
                                  ldc);
  };
  return intercept(makeGemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc),
                   DirectCall(direct));
}

void cublasSgemm(char transa, char transb, int m, int n, int k, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemm == nullptr) return;
  auto direct = [&] {
    real.cublasSgemm(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return CUBLAS_STATUS_SUCCESS;  // the legacy API reports through cublasGetError()
  };
  Gemm gemm;
  gemm.legacy = true;
  gemm.transa = legacyOp(transa);
  gemm.transb = legacyOp(transb);
  gemm.m = m, gemm.n = n, gemm.k = k;
  gemm.lda = lda, gemm.ldb = ldb, gemm.ldc = ldc;
  gemm.alpha_value = alpha, gemm.beta_value = beta;
  gemm.a = A, gemm.b = B, gemm.c = C;
  (void)intercept(gemm, DirectCall(direct));
}

}  // namespace stmux::shim::hooks

extern "C" {
#define STMUX_EXPORT(ret, name, params, args)              \
  __attribute__((visibility("default"))) ret name params { \
    return stmux::shim::hooks::name args;                  \
  }
STMUX_HOOKS(STMUX_EXPORT)
#undef STMUX_EXPORT
}

// libstmux.so's exported functions. Their shells come from the hook list
// (hooks.h); each forwards to a hooks:: function below, which turns the call
// into a Gemm and a DirectCall with the caller's own arguments. A hook added to
// the list without its function here fails to compile.
#include <cublas_api.h>

#include "shim/hooks.h"
#include "shim/intercept.h"
#include "shim/real.h"
#include "stmux/gemm.h"
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

// A GEMV as the GEMM that computes it (stmux/gemm.h, gemvAsGemm), in the
// precision of cublasSgemv: full FP32, whatever the handle's math mode.
template <class Int>
Gemm makeGemv(cublasHandle_t handle, cublasOperation_t trans, Int m, Int n, const float* alpha,
              const float* a, Int lda, const float* x, Int incx, const float* beta, float* y,
              Int incy) {
  const GemvShape shape{static_cast<std::int32_t>(trans), m, n, lda, incx, incy};
  Gemm gemm;
  gemm.entry = EntryPoint::kGemv;
  gemm.handle = handle;
  gemm.alpha = alpha, gemm.beta = beta;
  gemm.math_mode = CUBLAS_DEFAULT_MATH;
  gemm.emulation = CUBLAS_EMULATION_STRATEGY_DEFAULT;
  if (checkGemvArgs(shape) != kStatusSuccess) {
    gemm.direct_because = Fallback::kInvalidArgs;
    return gemm;
  }
  // cuBLAS returns at once when m or n is 0, leaving y as it is; the GEMM
  // would scale y by beta.
  if (m == 0 || n == 0) {
    gemm.direct_because = Fallback::kNoOp;
    return gemm;
  }
  const std::optional<GemvAsGemm> as = gemvAsGemm(shape);
  if (!as) {
    gemm.direct_because = Fallback::kUnservedForm;
    return gemm;
  }
  const GemmShape& g = as->shape;
  gemm.transa = g.transa, gemm.transb = g.transb;
  gemm.m = g.m, gemm.n = g.n, gemm.k = g.k;
  gemm.lda = g.lda, gemm.ldb = g.ldb, gemm.ldc = g.ldc;
  gemm.a = as->x_first ? x : a;
  gemm.b = as->x_first ? a : x;
  gemm.c = y;
  return gemm;
}

// A GemmEx: served when it is an SGEMM, all data FP32 and FP32 compute; the
// compute type sets the precision (32F: the handle's math mode, as
// cublasSgemm; PEDANTIC: never reduced; FAST_TF32: TF32 allowed).
template <class Int>
Gemm makeGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, Int m,
                Int n, Int k, const void* alpha, const void* a, cudaDataType atype, Int lda,
                const void* b, cudaDataType btype, Int ldb, const void* beta, void* c,
                cudaDataType ctype, Int ldc, cublasComputeType_t compute) {
  Gemm gemm = makeGemm(handle, transa, transb, m, n, k, static_cast<const float*>(alpha),
                       static_cast<const float*>(a), lda, static_cast<const float*>(b), ldb,
                       static_cast<const float*>(beta), static_cast<float*>(c), ldc);
  gemm.entry = EntryPoint::kGemmEx;
  if (atype != CUDA_R_32F || btype != CUDA_R_32F || ctype != CUDA_R_32F) {
    gemm.direct_because = Fallback::kUnservedForm;
    return gemm;
  }
  switch (compute) {
    case CUBLAS_COMPUTE_32F:
      break;
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      gemm.math_mode = CUBLAS_PEDANTIC_MATH;
      break;
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      gemm.math_mode = CUBLAS_TF32_TENSOR_OP_MATH;
      break;
    default:
      gemm.direct_because = Fallback::kUnservedForm;
  }
  return gemm;
}

// A strided batch (bmm): `count` GEMMs whose operands lie `stride` floats
// apart. Served unless a stride is negative or the outputs overlap.
template <class Int>
Gemm makeStrided(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, Int m,
                 Int n, Int k, const float* alpha, const float* a, Int lda, long long stride_a,
                 const float* b, Int ldb, long long stride_b, const float* beta, float* c, Int ldc,
                 long long stride_c, Int count) {
  Gemm gemm = makeGemm(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  gemm.entry = EntryPoint::kStridedBatched;
  gemm.count = count;
  gemm.stride_a = stride_a, gemm.stride_b = stride_b, gemm.stride_c = stride_c;
  const GemmShape shape{gemm.transa, gemm.transb, m,     n,        k,        lda,
                        ldb,         ldc,         count, stride_a, stride_b, stride_c};
  if (checkGemmArgs(shape) != kStatusSuccess) {
    gemm.direct_because = Fallback::kInvalidArgs;
  } else if (count == 0) {
    gemm.direct_because = Fallback::kNoOp;
  } else if (!servedStrides(shape)) {
    gemm.direct_because = Fallback::kUnservedForm;
  }
  return gemm;
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
  gemm.entry = EntryPoint::kSgemmLegacy;
  gemm.legacy = true;
  gemm.transa = legacyOp(transa);
  gemm.transb = legacyOp(transb);
  gemm.m = m, gemm.n = n, gemm.k = k;
  gemm.lda = lda, gemm.ldb = ldb, gemm.ldc = ldc;
  gemm.alpha_value = alpha, gemm.beta_value = beta;
  gemm.a = A, gemm.b = B, gemm.c = C;
  (void)intercept(gemm, DirectCall(direct));
}

cublasStatus_t cublasSgemv_v2(cublasHandle_t handle, cublasOperation_t trans, int m, int n,
                              const float* alpha, const float* A, int lda, const float* x, int incx,
                              const float* beta, float* y, int incy) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemv_v2 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemv_v2(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy);
  };
  return intercept(makeGemv(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemv_v2_64(cublasHandle_t handle, cublasOperation_t trans, int64_t m,
                                 int64_t n, const float* alpha, const float* A, int64_t lda,
                                 const float* x, int64_t incx, const float* beta, float* y,
                                 int64_t incy) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemv_v2_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemv_v2_64(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy);
  };
  return intercept(makeGemv(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy),
                   DirectCall(direct));
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasGemmEx == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                             beta, C, Ctype, ldc, computeType, algo);
  };
  return intercept(makeGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                              beta, C, Ctype, ldc, computeType),
                   DirectCall(direct));
}

cublasStatus_t cublasGemmEx_64(cublasHandle_t handle, cublasOperation_t transa,
                               cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                               const void* alpha, const void* A, cudaDataType Atype, int64_t lda,
                               const void* B, cudaDataType Btype, int64_t ldb, const void* beta,
                               void* C, cudaDataType Ctype, int64_t ldc,
                               cublasComputeType_t computeType, cublasGemmAlgo_t algo) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasGemmEx_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasGemmEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype,
                                ldb, beta, C, Ctype, ldc, computeType, algo);
  };
  return intercept(makeGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                              beta, C, Ctype, ldc, computeType),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long int strideA, const float* B, int ldb,
                                         long long int strideB, const float* beta, float* C,
                                         int ldc, long long int strideC, int batchCount) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemmStridedBatched == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemmStridedBatched(handle, transa, transb, m, n, k, alpha, A, lda, strideA,
                                          B, ldb, strideB, beta, C, ldc, strideC, batchCount);
  };
  return intercept(makeStrided(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb,
                               strideB, beta, C, ldc, strideC, batchCount),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemmStridedBatched_64(cublasHandle_t handle, cublasOperation_t transa,
                                            cublasOperation_t transb, int64_t m, int64_t n,
                                            int64_t k, const float* alpha, const float* A,
                                            int64_t lda, long long int strideA, const float* B,
                                            int64_t ldb, long long int strideB, const float* beta,
                                            float* C, int64_t ldc, long long int strideC,
                                            int64_t batchCount) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemmStridedBatched_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemmStridedBatched_64(handle, transa, transb, m, n, k, alpha, A, lda,
                                             strideA, B, ldb, strideB, beta, C, ldc, strideC,
                                             batchCount);
  };
  return intercept(makeStrided(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb,
                               strideB, beta, C, ldc, strideC, batchCount),
                   DirectCall(direct));
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

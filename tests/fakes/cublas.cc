// A stand-in for libcublas where there is no GPU, for shim_process_test:
// every function of libcublas that libstmux.so hooks (shim/hooks.h), with
// cuBLAS's own signatures, and the handle getters it reads. cublasSgemm_v2 and the
// legacy cublasSgemm compute on the host ("device" memory is host memory,
// tests/fakes/cuda.cc), so that a test sees what a call run directly wrote;
// the other hooks only answer success. A handle is in host pointer mode,
// the default math mode and emulation strategy.
#include <cublasLt.h>
#include <cublas_api.h>

#include <cstdint>
#include <cstdlib>

namespace {

struct Handle {
  cudaStream_t stream = nullptr;
};

float element(const float* m, std::int64_t ld, bool transposed, std::int64_t row,
              std::int64_t col) {
  return transposed ? m[col + row * ld] : m[row + col * ld];
}

// C = alpha op(A) op(B) + beta C, column-major; beta 0 never reads C.
void gemm(cublasOperation_t transa, cublasOperation_t transb, std::int64_t m, std::int64_t n,
          std::int64_t k, float alpha, const float* a, std::int64_t lda, const float* b,
          std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  for (std::int64_t col = 0; col < n; ++col) {
    for (std::int64_t row = 0; row < m; ++row) {
      float sum = 0.0f;
      for (std::int64_t i = 0; i < k; ++i) {
        sum += element(a, lda, transa != CUBLAS_OP_N, row, i) *
               element(b, ldb, transb != CUBLAS_OP_N, i, col);
      }
      float& out = c[row + col * ldc];
      out = alpha * sum + (beta == 0.0f ? 0.0f : beta * out);
    }
  }
}

bool valid(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda, std::int64_t ldb,
           std::int64_t ldc) {
  return m >= 0 && n >= 0 && k >= 0 && lda >= 1 && ldb >= 1 && ldc >= (m > 1 ? m : 1);
}

cublasOperation_t legacyOp(char op) {
  return op == 'N' || op == 'n' ? CUBLAS_OP_N : CUBLAS_OP_T;
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = reinterpret_cast<cublasHandle_t>(new Handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete reinterpret_cast<Handle*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  reinterpret_cast<Handle*>(handle)->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
  *stream = reinterpret_cast<Handle*>(handle)->stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t, cublasPointerMode_t* mode) {
  *mode = CUBLAS_POINTER_MODE_HOST;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetMathMode(cublasHandle_t, cublasMath_t* mode) {
  *mode = CUBLAS_DEFAULT_MATH;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetEmulationStrategy(cublasHandle_t, cublasEmulationStrategy_t* strategy) {
  *strategy = CUBLAS_EMULATION_STRATEGY_DEFAULT;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa,
                              cublasOperation_t transb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!valid(m, n, k, lda, ldb, ldc)) return CUBLAS_STATUS_INVALID_VALUE;
  gemm(transa, transb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
  return CUBLAS_STATUS_SUCCESS;
}
void cublasSgemm(char transa, char transb, int m, int n, int k, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  if (valid(m, n, k, lda, ldb, ldc)) {
    gemm(legacyOp(transa), legacyOp(transb), m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

// The others: answered, nothing computed.
cublasStatus_t cublasSgemm_v2_64(cublasHandle_t, cublasOperation_t, cublasOperation_t, int64_t,
                                 int64_t, int64_t, const float*, const float*, int64_t,
                                 const float*, int64_t, const float*, float*, int64_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgemv_v2(cublasHandle_t, cublasOperation_t, int, int, const float*,
                              const float*, int, const float*, int, const float*, float*, int) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgemv_v2_64(cublasHandle_t, cublasOperation_t, int64_t, int64_t, const float*,
                                 const float*, int64_t, const float*, int64_t, const float*, float*,
                                 int64_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGemmEx_64(cublasHandle_t, cublasOperation_t, cublasOperation_t, int64_t,
                               int64_t, int64_t, const void*, const void*, cudaDataType, int64_t,
                               const void*, cudaDataType, int64_t, const void*, void*, cudaDataType,
                               int64_t, cublasComputeType_t, cublasGemmAlgo_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                         int, int, const float*, const float*, int, long long int,
                                         const float*, int, long long int, const float*, float*,
                                         int, long long int, int) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgemmStridedBatched_64(cublasHandle_t, cublasOperation_t, cublasOperation_t,
                                            int64_t, int64_t, int64_t, const float*, const float*,
                                            int64_t, long long int, const float*, int64_t,
                                            long long int, const float*, float*, int64_t,
                                            long long int, int64_t) {
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"

// The intercepted cuBLAS entry points: the one list. It drives the exported
// functions (exports.cc), the table of real functions (real.h) and the
// version script (exports.map.in), so the three cannot disagree. Two lists,
// one per library, for the two version nodes: libcublas's and cuBLASLt's.
//
// X(return type, name, (parameters), (arguments)). Pure macros: the version
// script is made by running the preprocessor over this file alone.
#pragma once

#define STMUX_HOOKS(X)                                                                             \
  X(cublasStatus_t, cublasSgemm_v2,                                                                \
    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,      \
     int k, const float* alpha, const float* A, int lda, const float* B, int ldb,                  \
     const float* beta, float* C, int ldc),                                                        \
    (handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc))                        \
  X(cublasStatus_t, cublasSgemm_v2_64,                                                             \
    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int64_t m,         \
     int64_t n, int64_t k, const float* alpha, const float* A, int64_t lda, const float* B,        \
     int64_t ldb, const float* beta, float* C, int64_t ldc),                                       \
    (handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc))                        \
  X(void, cublasSgemm,                                                                             \
    (char transa, char transb, int m, int n, int k, float alpha, const float* A, int lda,          \
     const float* B, int ldb, float beta, float* C, int ldc),                                      \
    (transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc))                                \
  X(cublasStatus_t, cublasSgemv_v2,                                                                \
    (cublasHandle_t handle, cublasOperation_t trans, int m, int n, const float* alpha,             \
     const float* A, int lda, const float* x, int incx, const float* beta, float* y, int incy),    \
    (handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy))                                  \
  X(cublasStatus_t, cublasSgemv_v2_64,                                                             \
    (cublasHandle_t handle, cublasOperation_t trans, int64_t m, int64_t n, const float* alpha,     \
     const float* A, int64_t lda, const float* x, int64_t incx, const float* beta, float* y,       \
     int64_t incy),                                                                                \
    (handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy))                                  \
  X(cublasStatus_t, cublasGemmEx,                                                                  \
    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,      \
     int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,          \
     cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,          \
     cublasComputeType_t computeType, cublasGemmAlgo_t algo),                                      \
    (handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,    \
     computeType, algo))                                                                           \
  X(cublasStatus_t, cublasGemmEx_64,                                                               \
    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int64_t m,         \
     int64_t n, int64_t k, const void* alpha, const void* A, cudaDataType Atype, int64_t lda,      \
     const void* B, cudaDataType Btype, int64_t ldb, const void* beta, void* C,                    \
     cudaDataType Ctype, int64_t ldc, cublasComputeType_t computeType, cublasGemmAlgo_t algo),     \
    (handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,    \
     computeType, algo))                                                                           \
  X(cublasStatus_t, cublasSgemmStridedBatched,                                                     \
    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,      \
     int k, const float* alpha, const float* A, int lda, long long int strideA, const float* B,    \
     int ldb, long long int strideB, const float* beta, float* C, int ldc, long long int strideC,  \
     int batchCount),                                                                              \
    (handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc,       \
     strideC, batchCount))                                                                         \
  X(cublasStatus_t, cublasSgemmStridedBatched_64,                                                  \
    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int64_t m,         \
     int64_t n, int64_t k, const float* alpha, const float* A, int64_t lda, long long int strideA, \
     const float* B, int64_t ldb, long long int strideB, const float* beta, float* C, int64_t ldc, \
     long long int strideC, int64_t batchCount),                                                   \
    (handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc,       \
     strideC, batchCount))

// cuBLASLt's. libcublas calls these itself (its own GEMMs may run through
// cublasLtMatmul); the shim passes such calls through untouched, telling them
// by their return address (shim/callers.h).
#define STMUX_LT_HOOKS(X)                                                                      \
  X(cublasStatus_t, cublasLtMatmul,                                                            \
    (cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc, const void* alpha,        \
     const void* A, cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc, \
     const void* beta, const void* C, cublasLtMatrixLayout_t Cdesc, void* D,                   \
     cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo, void* workspace,          \
     size_t workspaceSizeInBytes, cudaStream_t stream),                                        \
    (lightHandle, computeDesc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo,      \
     workspace, workspaceSizeInBytes, stream))

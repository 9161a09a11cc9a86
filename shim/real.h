// The real cuBLAS functions behind the shim: resolved once, never per call.
#pragma once

#include <cublasLt.h>
#include <cublas_api.h>

#include "shim/hooks.h"

namespace stmux::shim {

struct RealCublas {
#define STMUX_REAL_POINTER(ret, name, params, args) ret(*name) params = nullptr;
  STMUX_HOOKS(STMUX_REAL_POINTER)
#undef STMUX_REAL_POINTER
  // Read at call time, never intercepted.
  cublasStatus_t (*cublasGetStream_v2)(cublasHandle_t, cudaStream_t*) = nullptr;
  cublasStatus_t (*cublasGetPointerMode_v2)(cublasHandle_t, cublasPointerMode_t*) = nullptr;
  cublasStatus_t (*cublasGetMathMode)(cublasHandle_t, cublasMath_t*) = nullptr;
  cublasStatus_t (*cublasGetEmulationStrategy)(cublasHandle_t,
                                               cublasEmulationStrategy_t*) = nullptr;
};

// The real functions: the next definitions after the shim (RTLD_NEXT), or
// those of a libcublas the program loaded privately (dlopen RTLD_LOCAL, as a
// Python extension may). Every member is null while no libcublas is loaded
// (looked for again at each call until one is).
const RealCublas& realCublas();

struct RealCublasLt {
#define STMUX_REAL_POINTER(ret, name, params, args) ret(*name) params = nullptr;
  STMUX_LT_HOOKS(STMUX_REAL_POINTER)
#undef STMUX_REAL_POINTER
  // What a call's descriptors say, read at call time, never intercepted.
  cublasStatus_t (*cublasLtMatmulDescGetAttribute)(cublasLtMatmulDesc_t,
                                                   cublasLtMatmulDescAttributes_t, void*, size_t,
                                                   size_t*) = nullptr;
  cublasStatus_t (*cublasLtMatrixLayoutGetAttribute)(cublasLtMatrixLayout_t,
                                                     cublasLtMatrixLayoutAttribute_t, void*, size_t,
                                                     size_t*) = nullptr;
  // Whether a caller's algorithm fits its call, and the workspace it needs.
  cublasStatus_t (*cublasLtMatmulAlgoCheck)(cublasLtHandle_t, cublasLtMatmulDesc_t,
                                            cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                            cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                            const cublasLtMatmulAlgo_t*,
                                            cublasLtMatmulHeuristicResult_t*) = nullptr;
};

// The same for cuBLASLt, resolved on its first use (a program may call
// cuBLASLt before, or without, libcublas).
const RealCublasLt& realCublasLt();

}  // namespace stmux::shim

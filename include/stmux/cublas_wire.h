// The wire's mirrored cuBLAS values checked against cuBLAS's own headers.
// Included by the two places that see both: the shim and the executor.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include "stmux/wire.h"

namespace stmux {

#define STMUX_SAME(a, b) static_assert(static_cast<int>(a) == static_cast<int>(b), #a " != " #b)
STMUX_SAME(CUBLAS_STATUS_SUCCESS, kStatusSuccess);
STMUX_SAME(CUBLAS_STATUS_NOT_INITIALIZED, kStatusNotInitialized);
STMUX_SAME(CUBLAS_STATUS_ALLOC_FAILED, kStatusAllocFailed);
STMUX_SAME(CUBLAS_STATUS_INVALID_VALUE, kStatusInvalidValue);
STMUX_SAME(CUBLAS_STATUS_ARCH_MISMATCH, kStatusArchMismatch);
STMUX_SAME(CUBLAS_STATUS_MAPPING_ERROR, kStatusMappingError);
STMUX_SAME(CUBLAS_STATUS_EXECUTION_FAILED, kStatusExecutionFailed);
STMUX_SAME(CUBLAS_STATUS_INTERNAL_ERROR, kStatusInternalError);
STMUX_SAME(CUBLAS_STATUS_NOT_SUPPORTED, kStatusNotSupported);
STMUX_SAME(CUBLAS_OP_N, kOpN);
STMUX_SAME(CUBLAS_OP_T, kOpT);
STMUX_SAME(CUBLAS_OP_C, kOpC);
#undef STMUX_SAME
static_assert(sizeof(cudaIpcMemHandle_t) == sizeof(IpcHandle));

// kStatusDeclined must never be mistaken for a cuBLAS status.
static_assert(kStatusDeclined < 0);

}  // namespace stmux

// Who called a hooked function: the application (or a framework), or cuBLAS
// itself. libcublas runs some of its own GEMMs through cublasLtMatmul, and
// those calls reach the shim's cublasLtMatmul too; they are libcublas's
// business (a call of some entry point stmux does not serve, or one the shim
// is already running directly) and go straight through, uncounted.
#pragma once

namespace stmux::shim {

// Whether `return_address` (a hooked function's __builtin_return_address(0))
// lies in libcublas or libcublasLt. The answer for each loaded object's
// segment is cached: after the first call from a place, a lookup is a scan of
// a few words, lock-free.
bool calledFromCublas(const void* return_address);

}  // namespace stmux::shim

#include "shim/real.h"

#include <dlfcn.h>

#include <mutex>

#include "stmux/log.h"

namespace stmux::shim {
namespace {

// The names of the libraries whose symbols the shim stands in for.
constexpr const char* kCublasLibrary = STMUX_CUBLAS_LIBRARY;
constexpr const char* kCublasLtLibrary = STMUX_CUBLASLT_LIBRARY;

template <class T>
void resolve(T& slot, const char* name, void* fallback) {
  void* symbol = ::dlsym(RTLD_NEXT, name);
  if (symbol == nullptr && fallback != nullptr) symbol = ::dlsym(fallback, name);
  slot = reinterpret_cast<T>(symbol);
  if (symbol == nullptr) STMUX_ERROR(kShim, "cannot find the real {}: {}", name, ::dlerror());
}

}  // namespace

const RealCublas& realCublas() {
  static RealCublas real;
  static std::once_flag once;
  std::call_once(once, [] {
    // Already loaded by whoever called us; RTLD_NOLOAD never loads a new one.
    void* library = ::dlopen(kCublasLibrary, RTLD_NOW | RTLD_NOLOAD | RTLD_LOCAL);
#define STMUX_RESOLVE(ret, name, params, args) resolve(real.name, #name, library);
    STMUX_HOOKS(STMUX_RESOLVE)
#undef STMUX_RESOLVE
    resolve(real.cublasGetStream_v2, "cublasGetStream_v2", library);
    resolve(real.cublasGetPointerMode_v2, "cublasGetPointerMode_v2", library);
    resolve(real.cublasGetMathMode, "cublasGetMathMode", library);
    resolve(real.cublasGetEmulationStrategy, "cublasGetEmulationStrategy", library);
  });
  return real;
}

const RealCublasLt& realCublasLt() {
  static RealCublasLt real;
  static std::once_flag once;
  std::call_once(once, [] {
    void* library = ::dlopen(kCublasLtLibrary, RTLD_NOW | RTLD_NOLOAD | RTLD_LOCAL);
#define STMUX_RESOLVE(ret, name, params, args) resolve(real.name, #name, library);
    STMUX_LT_HOOKS(STMUX_RESOLVE)
#undef STMUX_RESOLVE
    resolve(real.cublasLtMatmulDescGetAttribute, "cublasLtMatmulDescGetAttribute", library);
    resolve(real.cublasLtMatrixLayoutGetAttribute, "cublasLtMatrixLayoutGetAttribute", library);
  });
  return real;
}

}  // namespace stmux::shim

#include "shim/real.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>

#include "stmux/log.h"

namespace stmux::shim {
namespace {

// The names of the libraries whose symbols the shim stands in for.
constexpr const char* kCublasLibrary = STMUX_CUBLAS_LIBRARY;
constexpr const char* kCublasLtLibrary = STMUX_CUBLASLT_LIBRARY;

// A symbol of `library`'s version node (libcublas's symbols are versioned
// "libcublas.so.13", its name), so that another cuBLAS loaded first (a .so.12
// a plugin brought) is never taken for it; unversioned where none matches.
void* find(void* where, const char* name, const char* library) {
  void* symbol = ::dlvsym(where, name, library);
  return symbol != nullptr ? symbol : ::dlsym(where, name);
}

template <class T>
void resolve(T& slot, const char* name, void* fallback, const char* library) {
  void* symbol = find(RTLD_NEXT, name, library);
  if (symbol == nullptr && fallback != nullptr) symbol = find(fallback, name, library);
  slot = reinterpret_cast<T>(symbol);
  if (symbol == nullptr) STMUX_ERROR(kShim, "cannot find the real {}: {}", name, ::dlerror());
}

// Whether the library that defines `probe` is loaded yet: searched after the
// shim, or privately loaded under `library`'s name (RTLD_NOLOAD never loads).
bool loaded(const char* library, const char* probe, void*& handle) {
  handle = ::dlopen(library, RTLD_NOW | RTLD_NOLOAD | RTLD_LOCAL);
  return find(RTLD_NEXT, probe, library) != nullptr || handle != nullptr;
}

// The table `T` once `fill` found its library, resolved once then; until the
// library is loaded nothing is remembered, so that a program whose first
// hooked call came before it loaded libcublas (one linked to cuBLASLt alone
// that loads libcublas later) finds it at a later call. Until then every
// member is null and the hooks answer CUBLAS_STATUS_NOT_INITIALIZED.
template <class T, class Fill>
const T& lookUp(const char* library, const char* probe, Fill fill) {
  static T real;
  static std::atomic<bool> found{false};
  static std::mutex mutex;
  static bool said_absent = false;  // under mutex
  if (found.load(std::memory_order_acquire)) return real;
  std::lock_guard lock(mutex);
  if (found.load(std::memory_order_relaxed)) return real;
  void* handle = nullptr;
  if (!loaded(library, probe, handle)) {
    if (!said_absent) {
      STMUX_WARN(kShim, "{} is not loaded yet; its hooked calls fail until it is", library);
      said_absent = true;
    }
    return real;
  }
  fill(real, handle);
  found.store(true, std::memory_order_release);
  return real;
}

}  // namespace

const RealCublas& realCublas() {
  return lookUp<RealCublas>(kCublasLibrary, "cublasCreate_v2", [](RealCublas& real, void* library) {
#define STMUX_RESOLVE(ret, name, params, args) resolve(real.name, #name, library, kCublasLibrary);
    STMUX_HOOKS(STMUX_RESOLVE)
#undef STMUX_RESOLVE
    resolve(real.cublasGetStream_v2, "cublasGetStream_v2", library, kCublasLibrary);
    resolve(real.cublasGetPointerMode_v2, "cublasGetPointerMode_v2", library, kCublasLibrary);
    resolve(real.cublasGetMathMode, "cublasGetMathMode", library, kCublasLibrary);
    resolve(real.cublasGetEmulationStrategy, "cublasGetEmulationStrategy", library, kCublasLibrary);
  });
}

const RealCublasLt& realCublasLt() {
  return lookUp<RealCublasLt>(
      kCublasLtLibrary, "cublasLtCreate", [](RealCublasLt& real, void* library) {
#define STMUX_RESOLVE(ret, name, params, args) resolve(real.name, #name, library, kCublasLtLibrary);
        STMUX_LT_HOOKS(STMUX_RESOLVE)
#undef STMUX_RESOLVE
        resolve(real.cublasLtMatmulDescGetAttribute, "cublasLtMatmulDescGetAttribute", library,
                kCublasLtLibrary);
        resolve(real.cublasLtMatrixLayoutGetAttribute, "cublasLtMatrixLayoutGetAttribute", library,
                kCublasLtLibrary);
        resolve(real.cublasLtMatmulAlgoCheck, "cublasLtMatmulAlgoCheck", library, kCublasLtLibrary);
      });
}

}  // namespace stmux::shim

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

template <class T>
void resolve(T& slot, const char* name, void* fallback) {
  void* symbol = ::dlsym(RTLD_NEXT, name);
  if (symbol == nullptr && fallback != nullptr) symbol = ::dlsym(fallback, name);
  slot = reinterpret_cast<T>(symbol);
  if (symbol == nullptr) STMUX_ERROR(kShim, "cannot find the real {}: {}", name, ::dlerror());
}

// Whether the library that defines `probe` is loaded yet: searched after the
// shim, or privately loaded under `library`'s name (RTLD_NOLOAD never loads).
bool loaded(const char* library, const char* probe, void*& handle) {
  handle = ::dlopen(library, RTLD_NOW | RTLD_NOLOAD | RTLD_LOCAL);
  return ::dlsym(RTLD_NEXT, probe) != nullptr || handle != nullptr;
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
#define STMUX_RESOLVE(ret, name, params, args) resolve(real.name, #name, library);
    STMUX_HOOKS(STMUX_RESOLVE)
#undef STMUX_RESOLVE
    resolve(real.cublasGetStream_v2, "cublasGetStream_v2", library);
    resolve(real.cublasGetPointerMode_v2, "cublasGetPointerMode_v2", library);
    resolve(real.cublasGetMathMode, "cublasGetMathMode", library);
    resolve(real.cublasGetEmulationStrategy, "cublasGetEmulationStrategy", library);
  });
}

const RealCublasLt& realCublasLt() {
  return lookUp<RealCublasLt>(
      kCublasLtLibrary, "cublasLtCreate", [](RealCublasLt& real, void* library) {
#define STMUX_RESOLVE(ret, name, params, args) resolve(real.name, #name, library);
        STMUX_LT_HOOKS(STMUX_RESOLVE)
#undef STMUX_RESOLVE
        resolve(real.cublasLtMatmulDescGetAttribute, "cublasLtMatmulDescGetAttribute", library);
        resolve(real.cublasLtMatrixLayoutGetAttribute, "cublasLtMatrixLayoutGetAttribute", library);
      });
}

}  // namespace stmux::shim

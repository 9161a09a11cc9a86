#include "shim/driver.h"

#include <dlfcn.h>

#include <mutex>

#include "stmux/log.h"

namespace stmux::shim {
namespace {

using GetProcAddress = CUresult (*)(const char*, void**, int, cuuint64_t,
                                    CUdriverProcAddressQueryResult*);

template <class T>
bool lookup(GetProcAddress get, T& slot, const char* name, int version) {
  void* fn = nullptr;
  CUdriverProcAddressQueryResult found{};
  const CUresult result = get(name, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &found);
  if (result != CUDA_SUCCESS || found != CU_GET_PROC_ADDRESS_SUCCESS || fn == nullptr) {
    STMUX_WARN(kShim, "the CUDA driver has no {}", name);
    return false;
  }
  slot = reinterpret_cast<T>(fn);
  return true;
}

}  // namespace

const Driver* cudaDriver() {
  static Driver driver;
  static const Driver* result = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* library = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) {
      STMUX_WARN(kShim, "cannot load libcuda.so.1: {}", ::dlerror());
      return;
    }
    auto get = reinterpret_cast<GetProcAddress>(::dlsym(library, "cuGetProcAddress_v2"));
    if (get == nullptr) {
      STMUX_WARN(kShim, "libcuda.so.1 has no cuGetProcAddress_v2 (driver too old)");
      return;
    }
    bool ok = true;
#define STMUX_LOOKUP(name, version) ok &= lookup(get, driver.name, #name, version);
    STMUX_DRIVER_FUNCTIONS(STMUX_LOOKUP)
#undef STMUX_LOOKUP
    if (ok) result = &driver;
  });
  return result;
}

std::optional<ContextId> currentContext(const Driver& driver) {
  CUcontext context = nullptr;
  ContextId id = 0;
  if (driver.cuCtxGetCurrent(&context) != CUDA_SUCCESS || context == nullptr ||
      driver.cuCtxGetId(context, &id) != CUDA_SUCCESS) {
    return std::nullopt;
  }
  return id;
}

}  // namespace stmux::shim

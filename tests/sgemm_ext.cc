// A shared library linked to libcublas, loaded by tests/dlopen_client.cc with
// dlopen(RTLD_LOCAL) the way Python loads an extension module: with the shim
// preloaded, its calls to cublasSgemm_v2 must reach the shim.
#include <cublas_api.h>
#include <dlfcn.h>

extern "C" __attribute__((visibility("default"))) const char* stmuxTestWhereIsSgemm() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&cublasSgemm_v2), &info) == 0) return "?";
  return info.dli_fname;
}

extern "C" __attribute__((visibility("default"))) int stmuxTestNullHandleCall() {
  const float one = 1.0f;
  return static_cast<int>(cublasSgemm_v2(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, nullptr,
                                         4, nullptr, 4, &one, nullptr, 4));
}

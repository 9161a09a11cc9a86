// A program that links no cuBLAS and loads it late, through an extension
// library (argv[1]) opened with dlopen(RTLD_LOCAL). Before that, under the
// preload, it calls the shim's cublasSgemm_v2 (found with dlsym) while no
// libcublas is loaded. Prints where the extension's cublasSgemm_v2 binds, and
// where a lookup on libcublas's own handle lands (which a preloaded library
// cannot intercept).
#include <dlfcn.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: dlopen_client EXTENSION LIBCUBLAS\n");
    return 2;
  }
  using Sgemm = int (*)(void*, int, int, int, int, int, const float*, const float*, int,
                        const float*, int, const float*, float*, int);
  if (auto early = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "cublasSgemm_v2"))) {
    const float one = 1.0f;
    std::printf("early_null_handle %d\n",
                early(nullptr, 0, 0, 1, 1, 1, &one, nullptr, 1, nullptr, 1, &one, nullptr, 1));
  }
  void* extension = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (extension == nullptr) {
    std::fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
    return 1;
  }
  auto where = reinterpret_cast<const char* (*)()>(dlsym(extension, "stmuxTestWhereIsSgemm"));
  auto call = reinterpret_cast<int (*)()>(dlsym(extension, "stmuxTestNullHandleCall"));
  if (where == nullptr || call == nullptr) return 1;
  std::printf("extension_binds_to %s\n", where());
  std::printf("extension_null_handle %d\n", call());
  void* cublas = dlopen(argv[2], RTLD_NOW | RTLD_NOLOAD);
  Dl_info info{};
  void* direct = cublas != nullptr ? dlsym(cublas, "cublasSgemm_v2") : nullptr;
  std::printf("dlsym_on_libcublas %s\n",
              direct != nullptr && dladdr(direct, &info) != 0 ? info.dli_fname : "?");
  return 0;
}

// shim/callers.h: telling a call cuBLAS makes itself from the application's,
// by the return address, against the libraries really loaded here.
#include "shim/callers.h"

#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace {

int applicationFunction() {
  return 1;
}

// An address inside `library` (dlopened by name), at `symbol`.
const void* addressIn(const std::string& library, const char* symbol) {
  void* handle = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return nullptr;
  return ::dlsym(handle, symbol);
}

TEST(Callers, AddressesInCublasAndCublasLtAreCublasAndNoOthers) {
  const std::string major = std::to_string(CUBLAS_MAJOR);
  const void* cublas = addressIn("libcublas.so." + major, "cublasCreate_v2");
  const void* lt = addressIn("libcublasLt.so." + major, "cublasLtCreate");
  ASSERT_NE(cublas, nullptr) << ::dlerror();
  ASSERT_NE(lt, nullptr) << ::dlerror();
  // Twice each: the first answer is looked up, the second cached.
  for (int pass = 0; pass < 2; ++pass) {
    SCOPED_TRACE(pass == 0 ? "looked up" : "cached");
    EXPECT_TRUE(stmux::shim::calledFromCublas(cublas));
    EXPECT_TRUE(stmux::shim::calledFromCublas(static_cast<const char*>(lt) + 16));
    EXPECT_FALSE(
        stmux::shim::calledFromCublas(reinterpret_cast<const void*>(&applicationFunction)));
    EXPECT_FALSE(stmux::shim::calledFromCublas(reinterpret_cast<const void*>(&std::fflush)));
    // Nowhere in a loaded object: not cuBLAS.
    EXPECT_FALSE(stmux::shim::calledFromCublas(reinterpret_cast<const void*>(16)));
  }
  EXPECT_EQ(applicationFunction(), 1);
}

}  // namespace

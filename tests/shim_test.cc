// libstmux.so preloaded into ordinary programs, on any machine (no GPU
// needed): which symbols it exports, that the program's calls reach it, that
// what cuBLAS answers comes back unchanged, and that it is harmless where it
// has nothing to do.
#include <gtest/gtest.h>

#include <regex>
#include <set>

#include <fmt/format.h>

#include "test_support.h"
#include "tools/process.h"

namespace stmux {
namespace {

using testing::keyValues;
using testing::TempDir;

Ran probe(const TempDir& dir, std::map<std::string, std::string> env) {
  env.emplace("STMUX_SOCKET", dir.path() + "/nobody-here.sock");
  return run({CUBLAS_CLIENT_PATH, "probe"}, env, dir.path() + "/probe", std::chrono::seconds(120));
}

TEST(Shim, ExportsExactlyTheHookedNamesUnderTheirLibrariesVersionNodes) {
  TempDir dir;
  auto nm = run({"/usr/bin/env", "nm", "-D", "--with-symbol-versions", "--defined-only", SHIM_PATH},
                {}, dir.path() + "/nm");
  if (nm.status == 127) GTEST_SKIP() << "nm (binutils) is not installed: export check skipped";
  ASSERT_EQ(nm.status, 0) << nm.err;
  std::set<std::string> exported;
  std::istringstream lines(nm.out);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string address, type, name;
    fields >> address >> type >> name;
    exported.insert(type + " " + name);
  }
  const std::string node = "libcublas.so." + std::to_string(CUBLAS_MAJOR);
  const std::string lt_node = "libcublasLt.so." + std::to_string(CUBLAS_MAJOR);
  EXPECT_EQ(
      exported,
      (std::set<std::string>{
          "T cublasSgemm@@" + node, "T cublasSgemm_v2@@" + node, "T cublasSgemm_v2_64@@" + node,
          "T cublasSgemv_v2@@" + node, "T cublasSgemv_v2_64@@" + node, "T cublasGemmEx@@" + node,
          "T cublasGemmEx_64@@" + node, "T cublasSgemmStridedBatched@@" + node,
          "T cublasSgemmStridedBatched_64@@" + node, "A " + node, "T cublasLtMatmul@@" + lt_node,
          "A " + lt_node,
          // The CUDA driver's question of where MPS's pipes
          // are (shim/mps_steer.cc).
          std::string("T getenv@@") + GETENV_NODE, std::string("A ") + GETENV_NODE}))
      << nm.out;
}

TEST(Shim, TheProgramsCallsReachThePreloadedShimAndStatusesComeBackUnchanged) {
  TempDir dir;
  auto plain = probe(dir, {});
  ASSERT_EQ(plain.status, 0) << plain.err;
  auto shimmed = probe(dir, {{"LD_PRELOAD", SHIM_PATH}, {"STMUX_LOG", "stats=info"}});
  ASSERT_EQ(shimmed.status, 0) << shimmed.err;
  auto before = keyValues(plain.out), after = keyValues(shimmed.out);
  EXPECT_NE(before["cublasSgemm_v2"].find("libcublas.so"), std::string::npos) << plain.out;
  EXPECT_NE(after["cublasSgemm_v2"].find("libstmux.so"), std::string::npos) << shimmed.out;
  EXPECT_NE(before["cublasLtMatmul"].find("libcublasLt.so"), std::string::npos) << plain.out;
  EXPECT_NE(after["cublasLtMatmul"].find("libstmux.so"), std::string::npos) << shimmed.out;
  // Where no GPU lets cublasCreate succeed, the calls that need a handle
  // are not made.
  const bool handle = after["create"] == "0";
  for (const char* key :
       {"v2_null_handle", "v2_64_null_handle", "strided_null_handle", "create", "v2_bad_lda",
        "strided_negative_count", "legacy_bad_op", "lt_null_handle"}) {
    const bool needs_handle =
        std::string_view(key) == "v2_bad_lda" || std::string_view(key) == "strided_negative_count";
    if (needs_handle && !handle) continue;
    ASSERT_TRUE(before.count(key) == 1 && after.count(key) == 1) << key << " not printed:\n"
                                                                 << plain.out << "\n"
                                                                 << shimmed.out;
    EXPECT_EQ(before[key], after[key]) << key;
  }
  // The shim's own account, printed at exit: every call went straight to
  // cuBLAS, each for its reason.
  EXPECT_NE(shimmed.err.find("0 served by stmuxd"), std::string::npos) << shimmed.err;
  EXPECT_NE(shimmed.err.find("bad_handle=4"), std::string::npos) << shimmed.err;
  EXPECT_NE(shimmed.err.find("invalid_args="), std::string::npos) << shimmed.err;
  // And by entry point.
  EXPECT_NE(shimmed.err.find(fmt::format("sgemm={} calls, 0 served, 0 failed, {} direct",
                                         handle ? 3 : 2, handle ? 3 : 2)),
            std::string::npos)
      << shimmed.err;
  EXPECT_NE(
      shimmed.err.find(fmt::format("strided_batched={} calls, 0 served, 0 failed", handle ? 2 : 1)),
      std::string::npos)
      << shimmed.err;
  EXPECT_NE(shimmed.err.find("sgemm_legacy=1 calls, 0 served, 0 failed, 1 direct"),
            std::string::npos)
      << shimmed.err;
  EXPECT_NE(shimmed.err.find("lt_matmul=1 calls, 0 served, 0 failed, 1 direct"), std::string::npos)
      << shimmed.err;
}

TEST(Shim, DisableSendsEveryCallStraightToCublas) {
  TempDir dir;
  auto plain = probe(dir, {});
  auto disabled =
      probe(dir, {{"LD_PRELOAD", SHIM_PATH}, {"STMUX_DISABLE", "1"}, {"STMUX_LOG", "stats=info"}});
  ASSERT_EQ(disabled.status, 0) << disabled.err;
  EXPECT_EQ(keyValues(plain.out)["v2_null_handle"], keyValues(disabled.out)["v2_null_handle"]);
  EXPECT_TRUE(std::regex_search(disabled.err, std::regex("direct: disabled=[0-9]+\n")))
      << disabled.err;
}

TEST(Shim, AnInvalidSettingIsReportedAndCallsGoStraightToCublas) {
  TempDir dir;
  auto ran = probe(
      dir, {{"LD_PRELOAD", SHIM_PATH}, {"STMUX_TIMEOUT_MS", "0"}, {"STMUX_LOG", "stats=info"}});
  ASSERT_EQ(ran.status, 0) << ran.err;
  EXPECT_NE(ran.err.find("STMUX_TIMEOUT_MS='0' is out of range; accepted: an integer from 100 to "
                         "3600000 (ms)"),
            std::string::npos)
      << ran.err;
  EXPECT_NE(ran.err.find("bad_config="), std::string::npos) << ran.err;
  EXPECT_EQ(countOf(ran.err, "out of range"), 1) << "reported more than once";
}

TEST(Shim, ALibraryLoadedLaterWithDlopenIsServedToo) {
  TempDir dir;
  const std::string cublas = "libcublas.so." + std::to_string(CUBLAS_MAJOR);
  auto ran = run({DLOPEN_CLIENT_PATH, SGEMM_EXT_PATH, cublas},
                 {{"LD_PRELOAD", SHIM_PATH},
                  {"STMUX_SOCKET", dir.path() + "/none.sock"},
                  {"STMUX_LOG", "stats=info"}},
                 dir.path() + "/dlopen");
  ASSERT_EQ(ran.status, 0) << ran.out << ran.err;
  auto values = keyValues(ran.out);
  EXPECT_NE(values["extension_binds_to"].find("libstmux.so"), std::string::npos) << ran.out;
  // A hooked call before any libcublas was loaded fails, and is not
  // remembered: the extension's call, once libcublas is in, reaches it and is
  // counted (it was answered NOT_INITIALIZED unseen for the process's life).
  EXPECT_EQ(values["early_null_handle"], "1") << "CUBLAS_STATUS_NOT_INITIALIZED\n" << ran.out;
  EXPECT_NE(ran.err.find("is not loaded yet"), std::string::npos) << ran.err;
  EXPECT_NE(ran.err.find("bad_handle=1"), std::string::npos) << ran.err;
  // What the README says plainly: a lookup on libcublas's own handle finds
  // libcublas's function, which no preloaded library can stand in front of.
  EXPECT_NE(values["dlsym_on_libcublas"].find("libcublas.so"), std::string::npos) << ran.out;
}

TEST(Shim, PreloadedIntoAProgramWithoutCudaItIsHarmless) {
  TempDir dir;
  auto ran = run({"/bin/sh", "-c", "echo hello"},
                 {{"LD_PRELOAD", SHIM_PATH}, {"STMUX_LOG", "info"}}, dir.path() + "/sh");
  EXPECT_EQ(ran.status, 0);
  EXPECT_EQ(ran.out, "hello\n");
  EXPECT_EQ(ran.err, "") << "the shim spoke up in a program that never called it";
}

}  // namespace
}  // namespace stmux

// Which calls the daemon computes at the caller's precision (stmux/precision.h).
#include "stmux/precision.h"

#include <gtest/gtest.h>

#include <map>

namespace stmux {
namespace {

CallerPrecision with(std::map<std::string, std::string> env) {
  return CallerPrecision::of([env](std::string_view name) -> std::optional<std::string> {
    const auto it = env.find(std::string(name));
    if (it == env.end()) return std::nullopt;
    return it->second;
  });
}

TEST(CallerPrecision, ACallerWithTf32OverriddenOffRunsItsTf32CallsDirectly) {
  const CallerPrecision off = with({{"NVIDIA_TF32_OVERRIDE", "0"}});
  EXPECT_FALSE(off.reproducible(kTf32MathMode, kDefaultEmulation));
  EXPECT_TRUE(off.reproducible(0, kDefaultEmulation)) << "full FP32 is FP32 anywhere";
  // The TF32 mode with a flag beside it (cublasSetMathMode takes them or'ed).
  EXPECT_FALSE(off.reproducible(kTf32MathMode | 16, kDefaultEmulation)) << "no reduced reductions";
  EXPECT_FALSE(off.reproducible(kTf32MathMode | 8, kDefaultEmulation)) << "FP64 emulation";
  EXPECT_TRUE(off.reproducible(16, kDefaultEmulation)) << "full FP32, no reduced reductions";
  // Only 0 changes anything (NVIDIA's documentation).
  // The deprecated tensor-op mode may pick TF32 kernels for FP32 routines.
  EXPECT_FALSE(off.reproducible(kTensorOpMathMode, kDefaultEmulation));
  EXPECT_TRUE(off.reproducible(kPedanticMathMode, kDefaultEmulation));
  EXPECT_TRUE(with({{"NVIDIA_TF32_OVERRIDE", "1"}}).reproducible(kTf32MathMode, kDefaultEmulation));
  EXPECT_TRUE(with({}).reproducible(kTf32MathMode, kDefaultEmulation));
}

TEST(CallerPrecision, ACallerWhoseEmulationStrategyIsSetRunsDefaultStrategyCallsDirectly) {
  const CallerPrecision set = with({{"CUBLAS_EMULATION_STRATEGY", "eager"}});
  EXPECT_FALSE(set.reproducible(0, kDefaultEmulation));
  EXPECT_TRUE(set.reproducible(0, kDefaultEmulation + 1)) << "a strategy the handle names";
  EXPECT_TRUE(with({{"CUBLAS_EMULATION_STRATEGY", ""}}).reproducible(0, kDefaultEmulation));
}

// FP32 emulated with BF16x9 in the caller's cuBLAS (on GPUs that have it):
// the daemon's would compute plain FP32. Only pedantic calls are left alone.
TEST(CallerPrecision, ACallerEmulatingSinglePrecisionRunsItsFp32CallsDirectly) {
  const CallerPrecision set = with({{"CUBLAS_EMULATE_SINGLE_PRECISION", "1"}});
  EXPECT_FALSE(set.reproducible(0, kDefaultEmulation));
  EXPECT_FALSE(set.reproducible(kTf32MathMode, kDefaultEmulation));
  EXPECT_FALSE(set.reproducible(16, kDefaultEmulation)) << "a flag beside the default mode";
  EXPECT_TRUE(set.reproducible(kPedanticMathMode, kDefaultEmulation));
  EXPECT_TRUE(with({{"CUBLAS_EMULATE_SINGLE_PRECISION", "0"}}).reproducible(0, kDefaultEmulation));
  EXPECT_TRUE(with({{"CUBLAS_EMULATE_SINGLE_PRECISION", ""}}).reproducible(0, kDefaultEmulation));
}

// The math modes and emulation strategies cuBLAS names (the shim checks the
// constants against cublas_api.h), each mode with or without its flags.
TEST(KnownPrecision, CublasModesWithTheirFlagsAndStrategiesOnly) {
  for (std::uint32_t mode = 0; mode <= kLastMathMode; ++mode) {
    EXPECT_TRUE(knownPrecision(mode, 0)) << mode;
    EXPECT_TRUE(knownPrecision(mode | 16, 0)) << mode;
    EXPECT_TRUE(knownPrecision(mode | 8 | 16, kLastEmulation)) << mode;
  }
  EXPECT_FALSE(knownPrecision(kLastMathMode + 1, 0));
  EXPECT_FALSE(knownPrecision(32, 0)) << "an unknown flag";
  EXPECT_FALSE(knownPrecision(0xffffffffu, 0));
  EXPECT_FALSE(knownPrecision(0, kLastEmulation + 1));
}

}  // namespace
}  // namespace stmux

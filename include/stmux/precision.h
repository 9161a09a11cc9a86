// Whether the daemon's cuBLAS computes a call at the precision the caller's
// own cuBLAS would. Three environment variables of the caller's change that
// precision inside cuBLAS itself, where the handle's state does not show it,
// and the daemon, another process, never sees them:
//   NVIDIA_TF32_OVERRIDE=0            TF32 off, whatever the handle or
//                                     compute type asks for;
//   CUBLAS_EMULATION_STRATEGY         what the DEFAULT emulation strategy
//                                     means;
//   CUBLAS_EMULATE_SINGLE_PRECISION   FP32 emulated with BF16x9 where the
//                                     GPU has it, unless pedantic.
// Such calls run directly. stmuxd clears all three from its own environment
// at start, so that only each caller's asking counts (daemon/main.cc,
// kCallerPrecisionVariables).
//
// Pure logic, tested without a GPU (precision_test).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace stmux {

// cublasMath_t's TF32 mode, the flags a mode may carry beside it (no reduced
// precision reductions; FP64 emulation, which FP32 routines ignore), and
// cublasEmulationStrategy_t's default (checked against cublas_api.h where the
// shim includes it).
inline constexpr int kTensorOpMathMode = 1;  // deprecated: FP16 or TF32 for FP32 routines
inline constexpr int kPedanticMathMode = 2;
inline constexpr int kTf32MathMode = 3;
inline constexpr int kMathModeFlags = 16 | 8;
inline constexpr int kDefaultEmulation = 0;
inline constexpr int kLastMathMode = 4;   // CUBLAS_FP32_EMULATED_BF16X9_MATH
inline constexpr int kLastEmulation = 2;  // CUBLAS_EMULATION_STRATEGY_EAGER

// Whether cuBLAS names this math mode (one mode, with the flags it may
// carry) and emulation strategy: the daemon runs no request with others.
inline bool knownPrecision(std::uint32_t math_mode, std::uint32_t emulation) {
  return (math_mode & ~static_cast<std::uint32_t>(kMathModeFlags)) <=
             static_cast<std::uint32_t>(kLastMathMode) &&
         emulation <= static_cast<std::uint32_t>(kLastEmulation);
}

inline constexpr const char* kCallerPrecisionVariables[] = {
    "NVIDIA_TF32_OVERRIDE", "CUBLAS_EMULATION_STRATEGY", "CUBLAS_EMULATE_SINGLE_PRECISION"};

struct CallerPrecision {
  bool tf32_off = false;       // NVIDIA_TF32_OVERRIDE=0
  bool emulation_set = false;  // CUBLAS_EMULATION_STRATEGY is set
  bool fp32_emulated = false;  // CUBLAS_EMULATE_SINGLE_PRECISION is set, and not to 0

  static CallerPrecision of(
      const std::function<std::optional<std::string>(std::string_view)>& lookup) {
    CallerPrecision p;
    const std::optional<std::string> tf32 = lookup("NVIDIA_TF32_OVERRIDE");
    p.tf32_off = tf32 && *tf32 == "0";
    const std::optional<std::string> emulation = lookup("CUBLAS_EMULATION_STRATEGY");
    p.emulation_set = emulation && !emulation->empty();
    const std::optional<std::string> fp32 = lookup("CUBLAS_EMULATE_SINGLE_PRECISION");
    p.fp32_emulated = fp32 && !fp32->empty() && *fp32 != "0";
    return p;
  }

  // Whether a call with these (resolved) settings gets the same precision
  // from the daemon's cuBLAS as from the caller's.
  bool reproducible(int math_mode, int emulation) const {
    const int mode = math_mode & ~kMathModeFlags;
    // The deprecated tensor-op mode may use TF32 too.
    if (tf32_off && (mode == kTf32MathMode || mode == kTensorOpMathMode)) return false;
    if (emulation_set && emulation == kDefaultEmulation) return false;
    if (fp32_emulated && mode != kPedanticMathMode) return false;
    return true;
  }
};

}  // namespace stmux

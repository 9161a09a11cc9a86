// stmux-differential: the program of the differential correctness suite.
//
// An ordinary cuBLAS application that knows nothing of stmux. Every call it
// makes through an interposed symbol (cublasSgemm_v2, cublasGemmEx,
// cublasSgemv_v2, cublasSgemmStridedBatched, cublasLtMatmul: what
// LD_PRELOAD=libstmux.so stands in front of) it makes again through the real
// library's own function, looked up with dlsym on that library's handle,
// where no preload can stand in front of it; both results are checked
// against a float64 reference. What varies from call to call (the handle's
// stream, how the operands were written and C is read back, where the
// operands live, transposes, leading dimensions, scalars, math mode, sizes,
// arguments cuBLAS refuses; for cublasLtMatmul also its epilogue, batch,
// output, algorithm and the forms stmux leaves to cuBLASLt) is drawn from a
// generator seeded by (seed, thread, call) alone, so any call replays by
// itself. tests/differential_gpu_test.cc runs it preloaded in several
// processes and holds its counts against the shim's.
#include <cublasLt.h>
#include <cublas_api.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <getopt.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "stmux/epilogue.h"
#include "stmux/sys.h"
#include "tools/args.h"
#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

namespace {

using stmux::check::Buffers;
using stmux::check::GemmCase;
using stmux::check::kSentinel;
using stmux::tools::realIn;
using stmux::tools::wholeIn;

#define DIFFERENTIAL_STR_(x) #x
#define DIFFERENTIAL_STR(x) DIFFERENTIAL_STR_(x)
// The libcublas this program was built against, by its soname.
constexpr const char* kCublasSoname = "libcublas.so." DIFFERENTIAL_STR(CUBLAS_VER_MAJOR);
// libcublasLt, which that libcublas needs, of the same major version.
constexpr const char* kCublasLtSoname = "libcublasLt.so." DIFFERENTIAL_STR(CUBLAS_VER_MAJOR);

using SgemmFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                   int, const float*, const float*, int, const float*, int,
                                   const float*, float*, int);
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void*, cudaDataType, int, const void*,
                                    cudaDataType, int, const void*, void*, cudaDataType, int,
                                    cublasComputeType_t, cublasGemmAlgo_t);
using SgemvFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, int, int, const float*,
                                   const float*, int, const float*, int, const float*, float*, int);
using StridedFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                     int, const float*, const float*, int, long long int,
                                     const float*, int, long long int, const float*, float*, int,
                                     long long int, int);
using LtMatmulFn = cublasStatus_t (*)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void*,
                                      const void*, cublasLtMatrixLayout_t, const void*,
                                      cublasLtMatrixLayout_t, const void*, const void*,
                                      cublasLtMatrixLayout_t, void*, cublasLtMatrixLayout_t,
                                      const cublasLtMatmulAlgo_t*, void*, size_t, cudaStream_t);
// libcublas's and libcublasLt's own functions, past any preload.
struct RealFunctions {
  SgemmFn sgemm = nullptr;
  GemmExFn gemm_ex = nullptr;
  SgemvFn gemv = nullptr;
  StridedFn strided = nullptr;
  LtMatmulFn lt_matmul = nullptr;
};

constexpr int kMaxThreads = 16;

// ---- the classes a call is drawn from -----------------------------------------

enum Class {
  kStream,
  kWrite,
  kRead,
  kAlloc,
  kTransA,
  kTransB,
  kLd,
  kAlpha,
  kBeta,
  kMath,
  kSize,
  kArgs,
  kRoute,
  kEntry,
  // cublasLtMatmul's own, drawn and counted for its calls alone (applies()).
  kLtForm,
  kLtEpilogue,
  kLtBatch,
  kLtOutput,
  kLtAlgo,
  kClassCount
};

// The handle's stream.
enum Stream { kLegacyStream, kPerThreadStream, kBlockingStream, kNonBlockingStream };
// How A, B and C are written before the call: only orders that are right when
// cuBLAS is called directly.
enum Write {
  kMemcpyPageable,    // plain cudaMemcpy from pageable memory (its DMA may land after it returns)
  kMemcpyPinned,      // plain cudaMemcpy from pinned memory
  kAsyncPageable,     // cudaMemcpyAsync from pageable memory on the call's stream
  kAsyncPinned,       // cudaMemcpyAsync from pinned memory on the call's stream
  kAsyncLegacy,       // cudaMemcpyAsync on the legacy stream (call streams that wait for it)
  kMemset,            // C's block set by cudaMemset2D after its copy (Async on non-blocking)
  kKernelOnStream,    // staged on the device, then cublasScopy on the call's stream
  kKernelOnLegacy,    // the same on the legacy stream (call streams that wait for it)
  kEventOtherStream,  // copies on another stream of this thread, joined by an event
  kOtherThread,       // copies by another thread on its stream, joined by its event
};
// How C is read back after the call.
enum Read { kReadAsync, kReadSyncMemcpy };
// Where the operands live.
enum Alloc { kPerCall, kArena, kAlias, kPool, kManaged, kHost };
// kShapeMismatch (cublasLtMatmul's alone, whose layouts carry the shapes):
// A's inner dimension one short of B's.
enum Args { kValid, kBadLda, kBadLdb, kBadLdc, kNegativeDim, kShapeMismatch };
// Where the shim must send the call: to the daemon, or straight to cuBLAS
// for one of the reasons it counts.
enum Route { kServed, kNoOp, kInvalidArgs, kNotExportable, kUnservedForm, kDevicePointerMode };
// The entry point called: cublasSgemm_v2; cublasGemmEx with FP32 data; for
// a GEMM with one column (op(B) = x, unit increments), cublasSgemv_v2;
// cublasSgemmStridedBatched with a batch of one (its batches of several are
// checked problem by problem by stmux-cublas-client's check); or
// cublasLtMatmul with FP32 layouts, batches of one or several.
enum Entry { kSgemm, kGemmEx, kGemv, kStrided, kLtMatmul };

// cublasLtMatmul's form: served, or the one thing about it that sends it
// straight to cuBLASLt: D apart from C with beta != 0, a bias batch stride
// with a batch of several, an epilogue with an auxiliary output, alpha and
// beta in device memory.
enum LtForm { kServedForm, kApartWithBeta, kBiasBatchStride, kAuxEpilogue, kDevicePointers };
enum LtEpilogue {
  kLtDefault,
  kLtBias,
  kLtRelu,
  kLtReluBias,
  kLtGelu,
  kLtGeluBias,
  kLtReluAux,  // not served
  kLtGeluAux,  // not served
};
// A batch of one, or of several problems with their own A and B, or with one
// A (stride 0) or one B for all.
enum LtBatch { kBatchOne, kBatchSeveral, kBroadcastA, kBroadcastB };
enum LtOutput { kDIsC, kDApart };
// The algorithm: nullptr, cuBLASLt's own heuristic query; or the first of
// cublasLtMatmulAlgoGetHeuristic's, told each operand's alignment, as
// PyTorch asks for it.
enum LtAlgo { kImplicitAlgo, kHeuristicAlgo };

constexpr std::string_view kStreamNames[] = {"legacy", "per_thread", "blocking", "non_blocking"};
constexpr std::string_view kWriteNames[] = {
    "memcpy_pageable",    "memcpy_pinned", "async_pageable",   "async_pinned",
    "async_legacy",       "memset",        "kernel_on_stream", "kernel_on_legacy",
    "event_other_stream", "other_thread"};
constexpr std::string_view kReadNames[] = {"async_on_stream", "sync_then_memcpy"};
constexpr std::string_view kAllocNames[] = {"per_call", "arena",   "alias",
                                            "pool",     "managed", "host"};
constexpr std::string_view kOpNames[] = {"N", "T", "C"};
constexpr std::string_view kLdNames[] = {"minimum", "padded"};
constexpr float kAlphas[] = {1.0f, 0.0f, -1.5f, 0.5f, 2.0f};
constexpr std::string_view kAlphaNames[] = {"1", "0", "-1.5", "0.5", "2"};
constexpr float kBetas[] = {0.0f, 1.0f, -1.0f, 0.5f};
constexpr std::string_view kBetaNames[] = {"0", "1", "-1", "0.5"};
constexpr std::string_view kMathNames[] = {"default", "tf32"};
constexpr std::string_view kSizeNames[] = {"zero", "one", "small", "large"};
constexpr std::string_view kArgsNames[] = {"valid",   "bad_lda",      "bad_ldb",
                                           "bad_ldc", "negative_dim", "shape_mismatch"};
// The shim's own names for its reasons.
constexpr std::string_view kRouteNames[] = {
    "served", "no_op", "invalid_args", "not_exportable", "unserved_form", "device_pointer_mode"};
// The shim's own names for its entry points.
constexpr std::string_view kEntryNames[] = {"sgemm", "gemm_ex", "gemv", "strided_batched",
                                            "lt_matmul"};
constexpr std::string_view kLtFormNames[] = {"served", "d_apart_beta", "bias_batch_stride",
                                             "aux_epilogue", "device_pointer_mode"};
constexpr std::string_view kLtEpilogueNames[] = {"default", "bias",      "relu",     "relu_bias",
                                                 "gelu",    "gelu_bias", "relu_aux", "gelu_aux"};
constexpr cublasLtEpilogue_t kLtEpilogues[] = {
    CUBLASLT_EPILOGUE_DEFAULT,   CUBLASLT_EPILOGUE_BIAS,    CUBLASLT_EPILOGUE_RELU,
    CUBLASLT_EPILOGUE_RELU_BIAS, CUBLASLT_EPILOGUE_GELU,    CUBLASLT_EPILOGUE_GELU_BIAS,
    CUBLASLT_EPILOGUE_RELU_AUX,  CUBLASLT_EPILOGUE_GELU_AUX};
// What each does to D, as stmux/epilogue.h says (the auxiliary outputs aside).
constexpr std::uint32_t kLtEpilogueBits[] = {
    stmux::kEpilogueNone, stmux::kEpilogueBias,
    stmux::kEpilogueRelu, stmux::kEpilogueRelu | stmux::kEpilogueBias,
    stmux::kEpilogueGelu, stmux::kEpilogueGelu | stmux::kEpilogueBias,
    stmux::kEpilogueRelu, stmux::kEpilogueGelu};
constexpr std::string_view kLtBatchNames[] = {"one", "several", "broadcast_a", "broadcast_b"};
constexpr std::string_view kLtOutputNames[] = {"d_is_c", "d_apart"};
constexpr std::string_view kLtAlgoNames[] = {"implicit", "heuristic"};

struct ClassInfo {
  std::string_view name;
  std::span<const std::string_view> values;
};
constexpr ClassInfo kClasses[kClassCount] = {{"stream", kStreamNames},
                                             {"write", kWriteNames},
                                             {"read", kReadNames},
                                             {"alloc", kAllocNames},
                                             {"transa", kOpNames},
                                             {"transb", kOpNames},
                                             {"ld", kLdNames},
                                             {"alpha", kAlphaNames},
                                             {"beta", kBetaNames},
                                             {"math", kMathNames},
                                             {"size", kSizeNames},
                                             {"args", kArgsNames},
                                             {"route", kRouteNames},
                                             {"entry", kEntryNames},
                                             {"lt_form", kLtFormNames},
                                             {"lt_epilogue", kLtEpilogueNames},
                                             {"lt_batch", kLtBatchNames},
                                             {"lt_output", kLtOutputNames},
                                             {"lt_algo", kLtAlgoNames}};
constexpr std::size_t maxValues() {
  std::size_t most = 0;
  for (const ClassInfo& info : kClasses)
    most = std::max(most, info.values.size());
  return most;
}
constexpr std::size_t kMaxValues = maxValues();

// Whether class `k` has a value in a call of entry point `entry`.
constexpr bool applies(int k, int entry) {
  return k < kLtForm || entry == kLtMatmul;
}

// --only: per class, the values a call must have to be made (a bit per
// value; 0: any).
struct Selection {
  std::uint64_t values[kClassCount] = {};

  bool selects(const int* value) const {
    for (int k = 0; k < kClassCount; ++k) {
      if (values[k] != 0 && (values[k] >> value[k] & 1) == 0) return false;
    }
    return true;
  }
};

// Bounds of what is drawn, which size every buffer below.
constexpr std::int64_t kSmallDim = 64;
constexpr std::int64_t kLargeDim = 300;
constexpr std::int64_t kMaxPad = 7;
constexpr std::int64_t kMaxOffset = 40;  // floats before an operand in its buffer
constexpr std::size_t kMaxGap = 63;      // floats between buffers in an arena
// GemmCase's buffers: offset, columns at the leading dimension, a 64-float tail.
constexpr std::size_t kMaxOperandFloats = kMaxOffset + (kLargeDim + kMaxPad) * kLargeDim + 64;
// Each buffer in an arena may start up to 3 floats later, 16 bytes aligned.
constexpr std::size_t kArenaFloats = 3 * (kMaxOperandFloats + kMaxGap + 3);
// cublasLtMatmul: batches of several are of small problems, each problem's
// buffer padded to a multiple of 4 floats, so that all fit one buffer.
constexpr std::int64_t kMaxBatch = 6;
static_assert(kMaxBatch * (kMaxOffset + (kSmallDim + kMaxPad) * kSmallDim + 64 + 3) <=
              static_cast<std::int64_t>(kMaxOperandFloats));
// The bias buffer: offset, then one vector of m floats, or one per problem
// (a bias batch stride), and a tail.
constexpr std::size_t kBiasFloats = kMaxOffset + kMaxBatch * (kLargeDim + kMaxPad + 3) + 64;
// The workspace each thread gives cuBLASLt, as PyTorch does.
constexpr std::size_t kWorkspaceBytes = std::size_t{4} << 20;
// An auxiliary output: GELU's input, FP32 at a leading dimension of m
// rounded up to 8 (ReLU's bit mask, at m rounded up to 128 bits, is smaller).
constexpr std::size_t kAuxFloats = (kLargeDim + 8) * kLargeDim;

// ---- drawing a call -----------------------------------------------------------

std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Each call's generator depends on these three alone, never on timing.
std::uint64_t callSeed(std::uint64_t seed, int thread, std::uint64_t call) {
  return splitmix(splitmix(splitmix(seed) ^ static_cast<std::uint64_t>(thread)) ^ call);
}

int pick(std::mt19937_64& random, std::initializer_list<int> weights) {
  int total = 0;
  for (int w : weights)
    total += w;
  int draw = std::uniform_int_distribution<int>(0, total - 1)(random);
  int index = 0;
  for (int w : weights) {
    if (draw < w) return index;
    draw -= w;
    ++index;
  }
  return index - 1;
}

bool chance(std::mt19937_64& random, double p) {
  return std::uniform_real_distribution<double>(0.0, 1.0)(random) < p;
}

std::int64_t between(std::mt19937_64& random, std::int64_t lo, std::int64_t hi) {
  return std::uniform_int_distribution<std::int64_t>(lo, hi)(random);
}

std::int64_t roundUp(std::int64_t x, std::int64_t to) {
  return (x + to - 1) / to * to;
}

// cublasLtMatmul's own numbers and buffers, beyond the GEMM every entry point
// draws; its class values say which form, epilogue, batch, output and
// algorithm.
struct LtCase {
  std::int64_t count = 1;  // problems
  // With count > 1, floats from one problem's buffer to the next's (0: one
  // buffer for all), multiples of 4: every problem as aligned as the first.
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  std::int64_t bias_offset = 0;  // floats before the bias in its buffer, a multiple of 4
  std::int64_t bias_stride = 0;  // floats from one problem's bias to the next's (0: one bias)
  bool bias_type = false;        // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE set, to FP32
  bool same_layout = false;      // D == C described by C's layout object itself
  std::vector<float> bias;       // the bias buffer, from its first float
  std::vector<float> c;          // C's buffer when D is apart from it (Case::in.c is D's)
};

struct Case {
  int thread = 0;
  std::uint64_t call = 0;
  int value[kClassCount] = {};  // each class's value (where it applies), an index into its names
  GemmCase gemm;
  std::size_t gap[3] = {};  // floats before A's, B's and C's buffers in an arena
  std::size_t align = 1;    // floats each buffer's start in an arena is a multiple of
  // in.c: written before the call; in.c0: C as the call finds it. For
  // cublasLtMatmul C is D (all problems'), which is C unless D is apart.
  Buffers in;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;  // kGemmEx's and kLtMatmul's
  LtCase lt;
  bool stream_waits_for_legacy() const { return value[kStream] != kNonBlockingStream; }
  bool isLt() const { return value[kEntry] == kLtMatmul; }
  bool dApart() const { return isLt() && value[kLtOutput] == kDApart; }
  std::uint32_t epilogue() const {
    return isLt() ? kLtEpilogueBits[value[kLtEpilogue]] : stmux::kEpilogueNone;
  }
};

// cublasLtMatmul's own draws, on top of what every entry point draws. Each
// form stmux leaves to cuBLASLt is drawn alone, with valid arguments, never a
// no-op, on memory the shim can export: the reason the shim counts is then
// that form's, whatever order it checks them in.
void drawLt(Case& c, std::mt19937_64& random) {
  int* v = c.value;
  GemmCase& g = c.gemm;
  LtCase& lt = c.lt;
  // N and T: cuBLAS reads OP_C of real data as T; cuBLASLt's documentation
  // does not say that it does.
  g.transa = std::min(g.transa, 1);
  g.transb = std::min(g.transb, 1);
  // k >= 1: cuBLASLt's documentation does not say what k == 0 does, and
  // PyTorch never asks.
  g.k = std::max<std::int64_t>(g.k, 1);
  // Arguments cuBLASLt refuses, drawn again: more often than the other entry
  // points', as a share of fewer calls, and mostly what only its layouts can
  // get wrong.
  v[kArgs] = chance(random, 0.02) ? kBadLda + pick(random, {1, 1, 1, 0, 3}) : kValid;
  if (v[kArgs] != kValid && v[kAlloc] == kAlias) v[kAlloc] = kPerCall;
  v[kLtForm] = v[kArgs] == kValid ? pick(random, {84, 5, 4, 4, 3}) : kServedForm;
  const int form = v[kLtForm];

  if (form == kAuxEpilogue || v[kArgs] != kValid) {
    v[kLtBatch] = kBatchOne;
  } else if (form == kBiasBatchStride) {
    v[kLtBatch] = kBatchSeveral + pick(random, {2, 1, 1});
  } else {
    v[kLtBatch] = pick(random, {55, 25, 10, 10});
  }
  if (v[kLtBatch] != kBatchOne) {
    for (std::int64_t* d : {&g.m, &g.n, &g.k})
      *d = std::min(*d, kSmallDim);
    if (v[kAlloc] == kAlias) v[kAlloc] = kPerCall;  // A and B would share one problem's buffer
    lt.count = between(random, 2, kMaxBatch);
  }

  if (form == kAuxEpilogue) {
    v[kLtEpilogue] = chance(random, 0.5) ? kLtReluAux : kLtGeluAux;
  } else if (form == kBiasBatchStride) {
    v[kLtEpilogue] = std::array{kLtBias, kLtReluBias, kLtGeluBias}[between(random, 0, 2)];
  } else {
    v[kLtEpilogue] = pick(random, {25, 20, 10, 15, 10, 20});
  }

  // D apart from C is served with beta == 0 alone (C is then never read).
  // With alpha and beta in device memory, D == C and beta != 0: cuBLASLt
  // cannot see beta == 0 before its kernel runs, and does not say that it
  // then leaves C (NaN) unread.
  const bool apart = form == kApartWithBeta || (form != kAuxEpilogue && form != kDevicePointers &&
                                                v[kArgs] == kValid && chance(random, 0.15));
  v[kLtOutput] = apart ? kDApart : kDIsC;
  if ((form == kApartWithBeta || form == kDevicePointers) && v[kBeta] == 0) {
    v[kBeta] = 1 + pick(random, {1, 1, 1});
  }
  if (apart && form != kApartWithBeta) v[kBeta] = 0;
  lt.same_layout = !apart && chance(random, 0.5);
  if (form != kServedForm) {
    if (v[kAlloc] == kPool || v[kAlloc] == kManaged || v[kAlloc] == kHost) v[kAlloc] = kPerCall;
    g.m = std::max<std::int64_t>(g.m, 1);
    g.n = std::max<std::int64_t>(g.n, 1);
  }
  // alpha == 0 with beta == 1 makes D a copy of C, or with D == C and no
  // epilogue a no-op: with a form left to cuBLASLt, one more reason to send
  // it there. Not drawn; nor with an epilogue, where cuBLASLt's own answer
  // depends on the kernel it picks (H200: most applied the epilogue, those
  // for the smallest shapes left D alone), so no reference holds for it.
  if ((form != kServedForm || c.epilogue() != stmux::kEpilogueNone) && kAlphas[v[kAlpha]] == 0.0f &&
      kBetas[v[kBeta]] == 1.0f) {
    v[kAlpha] = 0;
  }
  g.alpha = kAlphas[v[kAlpha]];
  g.beta = kBetas[v[kBeta]];
  // TF32 where the math class allows it: cuBLASLt has no math mode, the
  // compute type alone says.
  c.compute = v[kMath] == 1         ? CUBLAS_COMPUTE_32F_FAST_TF32
              : chance(random, 0.3) ? CUBLAS_COMPUTE_32F_PEDANTIC
                                    : CUBLAS_COMPUTE_32F;

  v[kLtAlgo] = pick(random, {1, 1});
  // Without an algorithm, cuBLASLt's own query uses the default preferences
  // (operands 256-byte aligned) and its documentation does not say that it
  // looks at the pointers: each operand then starts 16 bytes aligned, all
  // that its kernels need. A heuristic query is told each one's alignment.
  if (v[kLtAlgo] == kImplicitAlgo) {
    c.align = 4;
    for (std::int64_t* offset : {&g.a_offset, &g.b_offset, &g.c_offset})
      *offset -= *offset % 4;
  }
  if ((kLtEpilogueBits[v[kLtEpilogue]] & stmux::kEpilogueBias) != 0) {
    // 16 bytes aligned always: no preference tells the query the bias's
    // alignment, and PyTorch saw a kernel that assumed 16 fault on less.
    lt.bias_offset = 4 * between(random, 0, kMaxOffset / 4);
    lt.bias_type = chance(random, 0.5);
  }
}

// `one` appended to a batch's buffer `all`, padded with sentinels to
// `stride` floats (0: not padded).
void append(std::vector<float>& all, const std::vector<float>& one, std::int64_t stride) {
  all.insert(all.end(), one.begin(), one.end());
  if (stride > 0) all.resize(all.size() + static_cast<std::size_t>(stride) - one.size(), kSentinel);
}

// cublasLtMatmul's buffers: each problem's operands as makeInputs lays them
// out, at the strides; D apart from C gets C's values in a buffer of its own
// and NaN in its own block (never read); the bias, one vector of m or one per
// problem, at its offset.
void makeLtInputs(Case& c, std::mt19937_64& random) {
  GemmCase& g = c.gemm;
  LtCase& lt = c.lt;
  const int batch = c.value[kLtBatch];
  for (std::int64_t p = 0; p < lt.count; ++p) {
    Buffers one = c.value[kAlloc] == kAlias ? stmux::check::makeAliasedInputs(g, random)
                                            : stmux::check::makeInputs(g, random);
    if (p == 0 && lt.count > 1) {
      const auto padded = [](std::size_t floats) {
        return roundUp(static_cast<std::int64_t>(floats), 4);
      };
      lt.stride_a = batch == kBroadcastA ? 0 : padded(g.aFloats());
      lt.stride_b = batch == kBroadcastB ? 0 : padded(g.bFloats());
      lt.stride_c = padded(g.cFloats());
    }
    if (p == 0 || lt.stride_a != 0) append(c.in.a, one.a, lt.stride_a);
    if (p == 0 || lt.stride_b != 0) append(c.in.b, one.b, lt.stride_b);
    if (c.dApart()) {
      append(lt.c, one.c0, lt.stride_c);
      for (std::int64_t j = 0; j < g.n; ++j) {
        for (std::int64_t i = 0; i < g.m; ++i)
          one.c[g.c_offset + j * g.ldc() + i] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    append(c.in.c, one.c, lt.stride_c);
  }
  c.in.c0 = c.in.c;

  if ((c.epilogue() & stmux::kEpilogueBias) != 0) {
    if (c.value[kLtForm] == kBiasBatchStride) {
      lt.bias_stride = roundUp(g.m + between(random, 0, kMaxPad), 4);
    }
    const std::int64_t vectors = lt.bias_stride != 0 ? lt.count : 1;
    lt.bias.assign(
        static_cast<std::size_t>(lt.bias_offset + (vectors - 1) * lt.bias_stride + g.m + 64),
        kSentinel);
    std::uniform_real_distribution<float> value(-1.0f, 1.0f);
    for (std::int64_t p = 0; p < vectors; ++p) {
      for (std::int64_t i = 0; i < g.m; ++i)
        lt.bias[lt.bias_offset + p * lt.bias_stride + i] = value(random);
    }
  }
}

// `pageable_unordered`: whether a plain cudaMemcpy from pageable memory may
// precede a call on a non-blocking stream (below); `lt_pageable_unordered`:
// the same for cublasLtMatmul's calls. Nothing when the call's values are
// not among `only`'s (found before its operands are made, which is most of
// the work).
std::optional<Case> draw(std::uint64_t seed, int thread, std::uint64_t call,
                         bool pageable_unordered, bool lt_pageable_unordered,
                         const Selection& only) {
  std::mt19937_64 random(callSeed(seed, thread, call));
  Case c;
  c.thread = thread;
  c.call = call;
  int* v = c.value;
  GemmCase& g = c.gemm;
  v[kArgs] =
      chance(random, 0.005) ? static_cast<int>(between(random, kBadLda, kNegativeDim)) : kValid;
  v[kStream] = pick(random, {1, 1, 1, 1});
  v[kRead] = pick(random, {1, 1});
  v[kAlloc] = pick(random, {30, 25, 10, 10, 8, 8});
  // An aliased B takes A's leading dimension, which would mend a bad one.
  if (v[kArgs] != kValid && v[kAlloc] == kAlias) v[kAlloc] = kPerCall;

  const bool large = chance(random, 0.02);
  auto dim = [&] {
    if (chance(random, 0.03)) return std::int64_t{0};
    if (chance(random, 0.06)) return std::int64_t{1};
    return large ? between(random, kSmallDim + 1, kLargeDim) : between(random, 2, kSmallDim);
  };
  g.name = "differential";
  g.m = dim(), g.n = dim(), g.k = dim();
  g.transa = static_cast<int>(between(random, 0, 2));
  g.transb = static_cast<int>(between(random, 0, 2));
  std::int64_t* pads[] = {&g.lda_pad, &g.ldb_pad, &g.ldc_pad};
  for (std::int64_t* pad : pads)
    *pad = chance(random, 0.3) ? between(random, 1, kMaxPad) : 0;
  std::int64_t* offsets[] = {&g.a_offset, &g.b_offset, &g.c_offset};
  for (std::int64_t* offset : offsets)
    *offset = chance(random, 0.5) ? 0 : between(random, 1, kMaxOffset);
  for (std::size_t& gap : c.gap)
    gap = static_cast<std::size_t>(between(random, 0, kMaxGap));
  v[kAlpha] = pick(random, {40, 8, 17, 17, 18});
  v[kBeta] = pick(random, {35, 25, 20, 20});
  g.alpha = kAlphas[v[kAlpha]];
  g.beta = kBetas[v[kBeta]];
  v[kMath] = chance(random, 0.3) ? 1 : 0;
  g.math = v[kMath] == 1 ? stmux::check::kTf32Math : stmux::check::kDefaultMath;
  v[kEntry] = pick(random, {42, 14, 14, 14, 16});
  // GemmEx: FP32 compute, TF32 allowed where the math class allows it.
  c.compute = v[kMath] == 1
                  ? (chance(random, 0.5) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F)
              : chance(random, 0.3) ? CUBLAS_COMPUTE_32F_PEDANTIC
                                    : CUBLAS_COMPUTE_32F;
  // A GEMV is the GEMM with one column, x contiguous; valid arguments only
  // (it has no ldb or ldc to get wrong), m and k at least 1 (a GEMV returns
  // at once on an empty A, where the GEMM would scale C by beta).
  if (v[kEntry] == kGemv && v[kArgs] != kValid) v[kEntry] = kSgemm;
  if (v[kEntry] == kGemv) {
    g.n = 1;
    g.transb = 0;
    g.ldb_pad = 0;
    g.m = std::max<std::int64_t>(g.m, 1);
    g.k = std::max<std::int64_t>(g.k, 1);
  }
  if (v[kEntry] == kLtMatmul) drawLt(c, random);

  // Arguments cuBLAS refuses: every dimension at least 1, so that nothing
  // but the broken rule could make cuBLAS return early.
  if (v[kArgs] != kValid) {
    g.m = std::max<std::int64_t>(g.m, 2);
    g.n = std::max<std::int64_t>(g.n, 2);
    g.k = std::max<std::int64_t>(g.k, 2);
    if (v[kArgs] == kBadLda) g.lda_pad = -1;
    if (v[kArgs] == kBadLdb) g.ldb_pad = -1;
    if (v[kArgs] == kBadLdc) g.ldc_pad = -1;
    if (v[kArgs] == kNegativeDim) *std::array{&g.m, &g.n, &g.k}[between(random, 0, 2)] = -1;
  }
  v[kTransA] = g.transa;
  v[kTransB] = g.transb;

  // cublasLtMatmul's no-ops: the GEMM's (k >= 1), unless an epilogue
  // changes D (stmux/gemm.h, gemmIsNoOp).
  const bool lt = c.isLt();
  const bool no_op =
      lt ? g.noOp() && (g.m == 0 || g.n == 0 || c.epilogue() == stmux::kEpilogueNone) : g.noOp();
  if (v[kArgs] != kValid) {
    v[kRoute] = kInvalidArgs;  // the shim checks the arguments first
  } else if (no_op) {
    v[kRoute] = kNoOp;
  } else if (lt && v[kLtForm] == kDevicePointers) {
    v[kRoute] = kDevicePointerMode;
  } else if (lt && v[kLtForm] != kServedForm) {
    v[kRoute] = kUnservedForm;
  } else if (g.alpha == 0.0f || (lt && g.k == 0)) {
    v[kRoute] = kUnservedForm;  // only C is scaled: left to cuBLAS (shim/intercept.cc)
  } else if (v[kAlloc] == kPool || v[kAlloc] == kManaged || v[kAlloc] == kHost) {
    v[kRoute] = kNotExportable;
  } else {
    v[kRoute] = kServed;
  }

  // Legacy-stream writes only where the call's stream waits for that stream.
  // A plain copy from pageable memory runs there too, and its DMA may land
  // after it returns: on a non-blocking stream only stmux's wait for the
  // legacy stream orders it before a served call. cuBLAS itself was seen (H200)
  // overtaking it (alpha == beta == 0 zeroed C before the NaNs landed), and
  // so was C's read-back after a call that launched nothing. A memset of C's
  // block only with valid arguments (it needs ldc >= m).
  const int legacy = c.stream_waits_for_legacy() ? 1 : 0;
  const bool unordered = lt ? lt_pageable_unordered : pageable_unordered;
  const int pageable = legacy == 1 || (unordered && v[kRoute] == kServed) ? 20 : 0;
  const int memset = v[kArgs] == kValid ? 8 : 0;
  v[kWrite] = pick(random, {pageable, 10, 10, 14, 10 * legacy, memset, 8, 6 * legacy, 8, 8});

  v[kLd] = g.lda_pad > 0 || g.ldb_pad > 0 || g.ldc_pad > 0 ? 1 : 0;
  const std::int64_t dims[] = {g.m, g.n, g.k};
  v[kSize] = std::ranges::any_of(dims, [](std::int64_t d) { return d == 0; })          ? 0
             : std::ranges::any_of(dims, [](std::int64_t d) { return d == 1; })        ? 1
             : std::ranges::any_of(dims, [](std::int64_t d) { return d > kSmallDim; }) ? 3
                                                                                       : 2;
  if (!only.selects(v)) return std::nullopt;
  if (lt) {
    makeLtInputs(c, random);
  } else {
    c.in = v[kAlloc] == kAlias ? stmux::check::makeAliasedInputs(g, random)
                               : stmux::check::makeInputs(g, random);
  }

  if (v[kWrite] == kMemset) {
    // C is copied in whole, then each problem's block set: all bits (a NaN)
    // when beta is 0 or D is apart from C (nothing reads it then), which the
    // result must not keep; zeros otherwise.
    const std::uint32_t bits = g.beta == 0.0f || c.dApart() ? 0xffffffffu : 0u;
    float set;
    std::memcpy(&set, &bits, sizeof(set));
    for (std::int64_t p = 0; p < c.lt.count; ++p) {
      for (std::int64_t j = 0; j < g.n; ++j) {
        for (std::int64_t i = 0; i < g.m; ++i)
          c.in.c0[p * c.lt.stride_c + g.c_offset + j * g.ldc() + i] = set;
      }
    }
  }
  return c;
}

std::string_view computeName(cublasComputeType_t compute) {
  switch (compute) {
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      return "32F_FAST_TF32";
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      return "32F_PEDANTIC";
    default:
      return "32F";
  }
}

std::string describe(const Case& c, std::uint64_t seed) {
  const GemmCase& g = c.gemm;
  std::string text = "seed=" + std::to_string(seed) + " thread=" + std::to_string(c.thread) +
                     " call=" + std::to_string(c.call);
  for (int k = 0; k < kClassCount; ++k) {
    if (!applies(k, c.value[kEntry])) continue;
    text += " ";
    text += kClasses[k].name;
    text += "=";
    text += kClasses[k].values[c.value[k]];
  }
  char numbers[320];
  std::snprintf(numbers, sizeof(numbers),
                " m=%lld n=%lld k=%lld lda=%lld ldb=%lld ldc=%lld offsets=%lld,%lld,%lld "
                "gaps=%zu,%zu,%zu",
                static_cast<long long>(g.m), static_cast<long long>(g.n),
                static_cast<long long>(g.k), static_cast<long long>(g.lda()),
                static_cast<long long>(g.ldb()), static_cast<long long>(g.ldc()),
                static_cast<long long>(g.a_offset), static_cast<long long>(g.b_offset),
                static_cast<long long>(g.c_offset), c.gap[0], c.gap[1], c.gap[2]);
  text += numbers;
  if (c.value[kEntry] == kGemmEx || c.isLt()) {
    text += " compute=";
    text += computeName(c.compute);
  }
  if (c.isLt()) {
    const LtCase& lt = c.lt;
    std::snprintf(numbers, sizeof(numbers),
                  " count=%lld strides=%lld,%lld,%lld bias_offset=%lld bias_stride=%lld "
                  "bias_type=%s d_layout=%s",
                  static_cast<long long>(lt.count), static_cast<long long>(lt.stride_a),
                  static_cast<long long>(lt.stride_b), static_cast<long long>(lt.stride_c),
                  static_cast<long long>(lt.bias_offset), static_cast<long long>(lt.bias_stride),
                  lt.bias_type ? "32F" : "default", lt.same_layout ? "c_itself" : "own");
    text += numbers;
  }
  return text;
}

// ---- options --------------------------------------------------------------------

struct Options {
  std::uint64_t seed = 0;
  bool seed_given = false;
  std::uint64_t calls = 1000;
  int threads = 4;
  bool replay = false;
  int replay_thread = 0;
  std::uint64_t replay_call = 0;
  bool allow_lost = false;
  // Set in main: whether the calls are interposed (cuBLAS's, cuBLASLt's) and
  // the daemon is expected to stay (draw() says what it allows).
  bool pageable_unordered = false;
  bool lt_pageable_unordered = false;
  bool quiet = false;
  // A call drawn with other values is skipped (counted as such).
  Selection only;
  std::string only_args;  // as given, for the rerun line
  // Each write's copies wait this long on their stream first (a host
  // function), so that a call not ordered after them finds them late.
  std::uint64_t delay_writes_us = 0;
  // event_other_stream writes also mark their stream, and the call's stream
  // reads the mark right after its wait (Worker::joinReport).
  bool mark_joins = false;
  // Each thread draws no call after this many seconds (0: no limit).
  double seconds = 0;
};

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: stmux-differential [--seed N] [--calls N] [--threads T] [--replay THREAD:CALL]\n"
      "                          [--allow-lost-calls] [--only CLASS=VALUE[,VALUE...]]...\n"
      "                          [--delay-writes-us US] [--mark-joins] [--seconds S]\n"
      "                          [--quiet]\n"
      "Each call made twice, through the symbol the program links (which\n"
      "LD_PRELOAD=libstmux.so interposes) and through the real library's own function,\n"
      "both checked against a float64 reference: libcublas's cublasSgemm_v2,\n"
      "cublasGemmEx, cublasSgemv_v2 and cublasSgemmStridedBatched, and libcublasLt's\n"
      "cublasLtMatmul (epilogues, batches, D apart from C, and the forms stmux leaves\n"
      "to cuBLASLt). Calls are drawn from (seed, thread, call).\n"
      "  --seed N              64-bit seed (default: from the clock; printed first)\n"
      "  --calls N             calls in all, split over the threads (default 1000)\n"
      "  --threads T           worker threads, 1 to %d (default 4)\n"
      "  --replay THREAD:CALL  run that one call of thread THREAD (< T) alone\n"
      "  --allow-lost-calls    CUBLAS_STATUS_EXECUTION_FAILED from the interposed call\n"
      "                        with beta != 0 (a daemon that died mid-call) counts as\n"
      "                        lost, not a mismatch; its C is not compared\n"
      "  --only CLASS=VALUES   make only the calls drawn with one of these values of\n"
      "                        CLASS (the names of the per-class lines below, e.g.\n"
      "                        write=event_other_stream,other_thread); the others\n"
      "                        are drawn, then skipped before their operands are\n"
      "                        made (counted as skipped). Repeat for more classes:\n"
      "                        a call must match each\n"
      "  --delay-writes-us US  hold each write's stream US microseconds (0 to 1000000;\n"
      "                        default 0) before its copies: a call not ordered after\n"
      "                        them then finds them late, nearly every time\n"
      "  --mark-joins          event_other_stream writes also set a word to a mark of\n"
      "                        their own on their stream before its event, and the\n"
      "                        call's stream copies the word right after waiting for\n"
      "                        the event: a wrong result then says whether the\n"
      "                        call's stream went on before the write was done\n"
      "  --seconds S           draw no call after S seconds (0.1 to 86400; default no\n"
      "                        limit): each thread stops at its next call, before\n"
      "                        --calls when time runs out first, and the run says so\n"
      "  --quiet               no per-class lines\n"
      "Preloaded, and without --allow-lost-calls, plain copies from pageable memory also\n"
      "precede served calls on non-blocking streams, which only stmux's wait orders.\n"
      "Output: the seed line; one line per mismatch, with its replay command; per class\n"
      "  'class NAME=VALUE calls N mismatches M' (lt_* classes: cublasLtMatmul's calls\n"
      "  alone); per entry point 'entry NAME calls N expected_served S expected_direct D';\n"
      "  then the totals 'calls N mismatches M lost L expected_direct_no_op A\n"
      "   expected_direct_invalid_args B expected_direct_not_exportable C\n"
      "   expected_direct_unserved_form D expected_direct_device_pointer_mode E\n"
      "   skipped S' (S: calls --only left out).\n"
      "Exit status: 0 no mismatch, 1 a mismatch, 2 bad usage, 3 CUDA error.\n",
      kMaxThreads);
}

// A whole unsigned number in [lo, hi], or false.
bool parseNumber(std::string_view text, std::uint64_t lo, std::uint64_t hi, std::uint64_t& out) {
  const auto value = wholeIn<std::uint64_t>(text, lo, hi);
  if (value) out = *value;
  return value.has_value();
}

bool bad(const char* flag, const char* value, const char* accepted) {
  std::fprintf(stderr, "stmux-differential: %s '%s': accepted: %s\n", flag, value, accepted);
  return false;
}

// --only CLASS=VALUE[,VALUE...] into `only`'s bits for CLASS.
bool parseOnly(const std::string_view text, Selection& only) {
  const std::size_t equals = text.find('=');
  const std::string_view name = text.substr(0, equals);
  const ClassInfo* info = std::find_if(std::begin(kClasses), std::end(kClasses),
                                       [&](const ClassInfo& i) { return i.name == name; });
  if (equals == std::string_view::npos || info == std::end(kClasses)) {
    std::vector<std::string_view> names;
    for (const ClassInfo& i : kClasses)
      names.push_back(i.name);
    return bad("--only", std::string(text).c_str(),
               fmt::format("CLASS=VALUE, CLASS one of {}", fmt::join(names, ", ")).c_str());
  }
  const auto k = static_cast<std::size_t>(info - std::begin(kClasses));
  std::string_view rest = text.substr(equals + 1);
  while (true) {
    const std::string_view value = rest.substr(0, rest.find(','));
    const auto found = std::find(info->values.begin(), info->values.end(), value);
    if (found == info->values.end()) {
      return bad("--only", std::string(text).c_str(),
                 fmt::format("{}'s values: {}", name, fmt::join(info->values, ", ")).c_str());
    }
    only.values[k] |= std::uint64_t{1} << (found - info->values.begin());
    if (value.size() == rest.size()) return true;
    rest.remove_prefix(value.size() + 1);
  }
}

bool parse(int argc, char** argv, Options& o) {
  static const option kLong[] = {{"seed", required_argument, nullptr, 's'},
                                 {"calls", required_argument, nullptr, 'c'},
                                 {"threads", required_argument, nullptr, 't'},
                                 {"replay", required_argument, nullptr, 'r'},
                                 {"allow-lost-calls", no_argument, nullptr, 'l'},
                                 {"only", required_argument, nullptr, 'o'},
                                 {"quiet", no_argument, nullptr, 'q'},
                                 {"delay-writes-us", required_argument, nullptr, 'd'},
                                 {"mark-joins", no_argument, nullptr, 'j'},
                                 {"seconds", required_argument, nullptr, 'S'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
  int c;
  std::string replay;
  while ((c = getopt_long(argc, argv, "", kLong, nullptr)) != -1) {
    std::uint64_t value = 0;
    switch (c) {
      case 's':
        if (!parseNumber(optarg, 0, kMax, value)) {
          return bad("--seed", optarg, "an unsigned 64-bit integer");
        }
        o.seed = value;
        o.seed_given = true;
        break;
      case 'c':
        if (!parseNumber(optarg, 1, 1'000'000'000, value)) {
          return bad("--calls", optarg, "an integer from 1 to 1000000000");
        }
        o.calls = value;
        break;
      case 't':
        if (!parseNumber(optarg, 1, kMaxThreads, value)) {
          return bad("--threads", optarg, "an integer from 1 to 16");
        }
        o.threads = static_cast<int>(value);
        break;
      case 'r':
        replay = optarg;
        o.replay = true;
        break;
      case 'l':
        o.allow_lost = true;
        break;
      case 'o':
        if (!parseOnly(optarg, o.only)) return false;
        o.only_args += std::string(" --only ") + optarg;
        break;
      case 'q':
        o.quiet = true;
        break;
      case 'j':
        o.mark_joins = true;
        break;
      case 'd':
        if (!parseNumber(optarg, 0, 1'000'000, value)) {
          return bad("--delay-writes-us", optarg, "an integer from 0 to 1000000");
        }
        o.delay_writes_us = value;
        break;
      case 'S':
        if (const auto seconds = realIn(optarg, 0.1, 86'400)) {
          o.seconds = *seconds;
        } else {
          return bad("--seconds", optarg, "a number of seconds from 0.1 to 86400");
        }
        break;
      case 'h':
        usage(stdout);
        std::exit(0);
      default:  // getopt_long has said what was wrong
        return false;
    }
  }
  if (optind < argc) {
    std::fprintf(stderr, "stmux-differential: unexpected argument '%s'; accepted: options only\n",
                 argv[optind]);
    return false;
  }
  if (o.replay) {
    const std::size_t colon = replay.find(':');
    std::uint64_t thread = 0;
    if (colon == std::string::npos ||
        !parseNumber(std::string_view(replay).substr(0, colon), 0, kMaxThreads - 1, thread) ||
        !parseNumber(std::string_view(replay).substr(colon + 1), 0, kMax, o.replay_call)) {
      return bad("--replay", replay.c_str(), "THREAD:CALL, THREAD from 0 to 15, CALL from 0");
    }
    o.replay_thread = static_cast<int>(thread);
    if (o.replay_thread >= o.threads) {
      return bad("--replay", replay.c_str(), "a THREAD below --threads");
    }
    if (!o.seed_given) {
      std::fprintf(stderr, "stmux-differential: --replay needs the run's --seed\n");
      return false;
    }
  }
  return true;
}

// ---- counts -------------------------------------------------------------------

struct Counts {
  std::atomic<std::uint64_t> calls{0}, mismatches{0}, lost{0};
  std::atomic<std::uint64_t> skipped{0};  // drawn with values --only leaves out
  std::atomic<std::uint64_t> routes[std::size(kRouteNames)] = {};
  // By entry point: calls, and those the shim should send straight to cuBLAS.
  std::atomic<std::uint64_t> entry_calls[std::size(kEntryNames)] = {};
  std::atomic<std::uint64_t> entry_direct[std::size(kEntryNames)] = {};
  std::atomic<std::uint64_t> class_calls[kClassCount][kMaxValues] = {};
  std::atomic<std::uint64_t> class_mismatches[kClassCount][kMaxValues] = {};

  void add(const Case& c, bool mismatch, bool lost_call) {
    calls.fetch_add(1, std::memory_order_relaxed);
    if (mismatch) mismatches.fetch_add(1, std::memory_order_relaxed);
    if (lost_call) lost.fetch_add(1, std::memory_order_relaxed);
    routes[c.value[kRoute]].fetch_add(1, std::memory_order_relaxed);
    entry_calls[c.value[kEntry]].fetch_add(1, std::memory_order_relaxed);
    if (c.value[kRoute] != kServed) {
      entry_direct[c.value[kEntry]].fetch_add(1, std::memory_order_relaxed);
    }
    for (int k = 0; k < kClassCount; ++k) {
      if (!applies(k, c.value[kEntry])) continue;
      class_calls[k][c.value[k]].fetch_add(1, std::memory_order_relaxed);
      if (mismatch) class_mismatches[k][c.value[k]].fetch_add(1, std::memory_order_relaxed);
    }
  }
};

std::mutex g_print_mutex;

// ---- the other thread ---------------------------------------------------------

struct Copy {
  void* dst;
  const void* src;
  std::size_t bytes;
};

// The other thread of "other_thread" writes: it queues the copies on a stream
// of its own and records an event there, and tells the worker once the event
// is recorded (not completed); the worker's stream then waits for the event.
// --delay-writes-us: a host function that holds its stream `*us` microseconds.
void CUDART_CB holdStream(void* us) {
  std::this_thread::sleep_for(std::chrono::microseconds(*static_cast<const std::uint64_t*>(us)));
}
void holdFirst(cudaStream_t stream, const std::uint64_t& us) {
  if (us > 0) {
    EXIT_ON_CUDA_ERROR(cudaLaunchHostFunc(stream, holdStream, const_cast<std::uint64_t*>(&us)));
  }
}

class CopyThread {
 public:
  explicit CopyThread(const std::uint64_t& delay_us) : delay_us_(delay_us) {
    EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    EXIT_ON_CUDA_ERROR(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    thread_ = std::thread([this] { loop(); });
  }
  ~CopyThread() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream_));
    EXIT_ON_CUDA_ERROR(cudaEventDestroy(event_));
    EXIT_ON_CUDA_ERROR(cudaStreamDestroy(stream_));
  }
  CopyThread(const CopyThread&) = delete;
  CopyThread& operator=(const CopyThread&) = delete;

  // Has the copies queued by the other thread; returns its event once recorded.
  cudaEvent_t copy(const std::vector<Copy>& copies) {
    std::unique_lock lock(mutex_);
    job_ = &copies;
    recorded_ = false;
    cv_.notify_all();
    cv_.wait(lock, [this] { return recorded_; });
    return event_;
  }

 private:
  void loop() {
    std::unique_lock lock(mutex_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || job_ != nullptr; });
      if (stop_) return;
      const std::vector<Copy>& copies = *job_;
      lock.unlock();
      holdFirst(stream_, delay_us_);
      for (const Copy& c : copies) {
        EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDefault, stream_));
      }
      EXIT_ON_CUDA_ERROR(cudaEventRecord(event_, stream_));
      lock.lock();
      job_ = nullptr;
      recorded_ = true;
      cv_.notify_all();
    }
  }

  const std::uint64_t& delay_us_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t event_ = nullptr;
  std::mutex mutex_;
  std::condition_variable cv_;
  const std::vector<Copy>* job_ = nullptr;
  bool recorded_ = false;
  bool stop_ = false;
  std::thread thread_;
};

// ---- arguments -----------------------------------------------------------------

float* deviceAlloc(std::size_t floats) {
  float* p = nullptr;
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&p), floats * sizeof(float)));
  return p;
}

cublasOperation_t op(int t) {
  return static_cast<cublasOperation_t>(t);
}

// The largest power of two up to 256 that `pointer` is a multiple of, as
// PyTorch tells cuBLASLt's heuristic query.
std::uint32_t alignmentOf(const void* pointer) {
  std::uint32_t alignment = 256;
  while (alignment > 1 && reinterpret_cast<std::uintptr_t>(pointer) % alignment != 0)
    alignment /= 2;
  return alignment;
}

// One cublasLtMatmul call's descriptors: made for it and destroyed once it
// returns, as PyTorch does (so the shim may keep nothing of them).
class LtDescriptors {
 public:
  LtDescriptors(const Case& c, const float* bias, void* aux) {
    const GemmCase& g = c.gemm;
    const LtCase& lt = c.lt;
    const int epilogue = c.value[kLtEpilogue];
    EXIT_ON_CUBLAS_ERROR(cublasLtMatmulDescCreate(&desc_, c.compute, CUDA_R_32F));
    set(CUBLASLT_MATMUL_DESC_TRANSA, static_cast<std::int32_t>(op(g.transa)));
    set(CUBLASLT_MATMUL_DESC_TRANSB, static_cast<std::int32_t>(op(g.transb)));
    if (epilogue != kLtDefault) {
      set(CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<std::uint32_t>(kLtEpilogues[epilogue]));
    }
    if ((kLtEpilogueBits[epilogue] & stmux::kEpilogueBias) != 0) {
      set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(bias));
      if (lt.bias_type) {
        set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<std::int32_t>(CUDA_R_32F));
      }
      if (lt.bias_stride != 0) set(CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, lt.bias_stride);
    }
    if (epilogue == kLtReluAux || epilogue == kLtGeluAux) {
      // ReLU's bit mask at a multiple of 128 bits, GELU's input (FP32, as D)
      // at a multiple of 8 floats; a batch of one.
      set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
      set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
          roundUp(std::max<std::int64_t>(g.m, 1), epilogue == kLtReluAux ? 128 : 8));
    }
    if (c.value[kLtForm] == kDevicePointers) {
      set(CUBLASLT_MATMUL_DESC_POINTER_MODE,
          static_cast<std::int32_t>(CUBLASLT_POINTER_MODE_DEVICE));
    }
    // kShapeMismatch: A's inner dimension one short of B's (k >= 2 then).
    const std::int64_t inner = c.value[kArgs] == kShapeMismatch ? g.k - 1 : g.k;
    a_ = layout(g.transa == 0 ? g.m : inner, g.transa == 0 ? inner : g.m, g.lda(), lt.count,
                lt.stride_a);
    b_ = layout(g.rowsB(), g.colsB(), g.ldb(), lt.count, lt.stride_b);
    c_ = layout(g.m, g.n, g.ldc(), lt.count, lt.stride_c);
    d_ = lt.same_layout ? c_ : layout(g.m, g.n, g.ldc(), lt.count, lt.stride_c);
  }
  ~LtDescriptors() {
    if (d_ != c_) EXIT_ON_CUBLAS_ERROR(cublasLtMatrixLayoutDestroy(d_));
    for (cublasLtMatrixLayout_t layout : {a_, b_, c_})
      EXIT_ON_CUBLAS_ERROR(cublasLtMatrixLayoutDestroy(layout));
    EXIT_ON_CUBLAS_ERROR(cublasLtMatmulDescDestroy(desc_));
  }
  LtDescriptors(const LtDescriptors&) = delete;
  LtDescriptors& operator=(const LtDescriptors&) = delete;

  cublasLtMatmulDesc_t desc() const { return desc_; }
  cublasLtMatrixLayout_t a() const { return a_; }
  cublasLtMatrixLayout_t b() const { return b_; }
  cublasLtMatrixLayout_t c() const { return c_; }
  cublasLtMatrixLayout_t d() const { return d_; }

  // The first algorithm cublasLtMatmulAlgoGetHeuristic offers, told the
  // workspace and where the operands lie; false when it offers none.
  bool heuristic(cublasLtHandle_t handle, const void* a, const void* b, const void* c,
                 const void* d, cublasLtMatmulAlgo_t& algo) const {
    cublasLtMatmulPreference_t preference = nullptr;
    EXIT_ON_CUBLAS_ERROR(cublasLtMatmulPreferenceCreate(&preference));
    const std::uint64_t workspace = kWorkspaceBytes;
    EXIT_ON_CUBLAS_ERROR(cublasLtMatmulPreferenceSetAttribute(
        preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, const void*> alignments[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d}};
    for (const auto& [attribute, pointer] : alignments) {
      const std::uint32_t alignment = alignmentOf(pointer);
      EXIT_ON_CUBLAS_ERROR(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &alignment,
                                                                sizeof(alignment)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc_, a_, b_, c_, d_,
                                                                 preference, 1, &result, &found);
    EXIT_ON_CUBLAS_ERROR(cublasLtMatmulPreferenceDestroy(preference));
    if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
    algo = result.algo;
    return true;
  }

 private:
  template <class T>
  void set(cublasLtMatmulDescAttributes_t attribute, T value) {
    EXIT_ON_CUBLAS_ERROR(cublasLtMatmulDescSetAttribute(desc_, attribute, &value, sizeof(value)));
  }

  static cublasLtMatrixLayout_t layout(std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                       std::int64_t count, std::int64_t stride) {
    cublasLtMatrixLayout_t layout = nullptr;
    EXIT_ON_CUBLAS_ERROR(cublasLtMatrixLayoutCreate(&layout, CUDA_R_32F,
                                                    static_cast<std::uint64_t>(rows),
                                                    static_cast<std::uint64_t>(cols), ld));
    if (count > 1) {
      const auto batch = static_cast<std::int32_t>(count);
      EXIT_ON_CUBLAS_ERROR(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
      EXIT_ON_CUBLAS_ERROR(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
    return layout;
  }

  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr, d_ = nullptr;
};

// ---- cublasLtMatmul's reference -------------------------------------------------

// GELU's slope is at most 1.129, so an error in its input grows by that much.
// cuBLASLt may compute its tanh with the hardware's approximation (relative
// error 2^-11), which moves GELU(x) by up to |x| 2^-12: allowed twice that.
constexpr double kGeluSlope = 1.13;
constexpr double kGeluTanhError = 1.0 / 2048;

// One problem of a cublasLtMatmul call: its buffers as makeInputs laid them
// out (C as the call reads it: the separate C when D is apart) and its
// float64 reference, epilogue applied.
struct LtProblem {
  Buffers in;
  stmux::check::Reference reference;
};

std::vector<LtProblem> ltReferences(const Case& c) {
  const GemmCase& g = c.gemm;
  const LtCase& lt = c.lt;
  const std::uint32_t bits = c.epilogue();
  std::vector<LtProblem> problems(static_cast<std::size_t>(lt.count));
  for (std::int64_t p = 0; p < lt.count; ++p) {
    // Problem p's part of a batch's buffer (all of it for a batch of one or
    // an operand all share).
    auto part = [&](const std::vector<float>& all, std::int64_t stride) {
      if (lt.count == 1 || stride == 0) return all;
      const auto from = all.begin() + p * stride;
      return std::vector<float>(from, from + stride);
    };
    LtProblem& problem = problems[p];
    problem.in.a = part(c.in.a, lt.stride_a);
    problem.in.b = part(c.in.b, lt.stride_b);
    problem.in.c = part(c.in.c, lt.stride_c);
    problem.in.c0 = part(c.dApart() ? lt.c : c.in.c0, lt.stride_c);
    stmux::check::Reference& ref = problem.reference;
    ref = stmux::check::reference(g, problem.in);
    if (bits == stmux::kEpilogueNone) continue;
    ref.slack.assign(ref.expected.size(), 0.0);
    for (std::int64_t j = 0; j < g.n; ++j) {
      for (std::int64_t i = 0; i < g.m; ++i) {
        const std::size_t at = j * g.m + i;
        const float bias = (bits & stmux::kEpilogueBias) != 0
                               ? lt.bias[lt.bias_offset + p * lt.bias_stride + i]
                               : 0.0f;
        const double x = ref.expected[at] + bias;
        ref.expected[at] = stmux::applyEpilogue(bits, static_cast<float>(ref.expected[at]), bias);
        ref.scale[at] += std::fabs(bias);
        if ((bits & stmux::kEpilogueGelu) != 0) {
          ref.scale[at] *= kGeluSlope;
          ref.slack[at] = std::fabs(x) * kGeluTanhError;
        }
      }
    }
  }
  return problems;
}

// D after the call (all problems') against each problem's reference; the
// first problem that is wrong says so.
stmux::check::Verdict verifyLt(const Case& c, const std::vector<LtProblem>& problems,
                               const std::vector<float>& result) {
  const LtCase& lt = c.lt;
  for (std::int64_t p = 0; p < lt.count; ++p) {
    const LtProblem& problem = problems[p];
    const auto from = result.begin() + p * lt.stride_c;
    const std::vector<float> part =
        lt.count == 1 ? result : std::vector<float>(from, from + lt.stride_c);
    stmux::check::Verdict verdict =
        stmux::check::verify(c.gemm, problem.in, problem.reference, part);
    if (!verdict.ok) {
      if (lt.count > 1) {
        verdict.problem = "problem " + std::to_string(p) + " of " + std::to_string(lt.count) +
                          ": " + verdict.problem;
      }
      return verdict;
    }
  }
  return {};
}

// ---- one worker thread ----------------------------------------------------------

class Worker {
 public:
  Worker(int index, const Options& options, RealFunctions real, Counts& counts)
      : index_(index),
        options_(options),
        real_(real),
        counts_(counts),
        copy_thread_(options.delay_writes_us) {
    EXIT_ON_CUBLAS_ERROR(cublasCreate_v2(&handle_));
    EXIT_ON_CUBLAS_ERROR(cublasCreate_v2(&helper_));
    EXIT_ON_CUDA_ERROR(cudaStreamCreate(&blocking_));
    EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&non_blocking_, cudaStreamNonBlocking));
    EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
    EXIT_ON_CUDA_ERROR(cudaEventCreateWithFlags(&side_event_, cudaEventDisableTiming));
    arena_ = deviceAlloc(kArenaFloats);
    EXIT_ON_CUDA_ERROR(
        cudaMallocManaged(reinterpret_cast<void**>(&managed_), kArenaFloats * sizeof(float)));
    EXIT_ON_CUDA_ERROR(
        cudaMallocHost(reinterpret_cast<void**>(&host_), kArenaFloats * sizeof(float)));
    EXIT_ON_CUDA_ERROR(
        cudaMallocHost(reinterpret_cast<void**>(&pinned_), 4 * kMaxOperandFloats * sizeof(float)));
    EXIT_ON_CUDA_ERROR(
        cudaMallocHost(reinterpret_cast<void**>(&readback_), kMaxOperandFloats * sizeof(float)));
    staging_ = deviceAlloc(3 * kMaxOperandFloats);
    ref_c_ = deviceAlloc(kMaxOperandFloats);
    EXIT_ON_CUBLAS_ERROR(cublasLtCreate(&lt_handle_));
    EXIT_ON_CUDA_ERROR(cudaMalloc(&workspace_, kWorkspaceBytes));
    bias_ = deviceAlloc(kBiasFloats);
    lt_c_ = deviceAlloc(kMaxOperandFloats);
    aux_ = deviceAlloc(kAuxFloats);
    scalars_ = deviceAlloc(2);
    if (options_.mark_joins) {
      EXIT_ON_CUDA_ERROR(cudaMalloc(&marks_, 2 * sizeof(std::uint32_t)));
      EXIT_ON_CUDA_ERROR(cudaMemset(marks_, 0, 2 * sizeof(std::uint32_t)));
    }
    EXIT_ON_CUDA_ERROR(cudaMallocHost(reinterpret_cast<void**>(&lt_pinned_),
                                      (kBiasFloats + kMaxOperandFloats + 2) * sizeof(float)));
  }

  ~Worker() {
    EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
    EXIT_ON_CUDA_ERROR(cudaFree(arena_));
    EXIT_ON_CUDA_ERROR(cudaFree(managed_));
    EXIT_ON_CUDA_ERROR(cudaFreeHost(host_));
    EXIT_ON_CUDA_ERROR(cudaFreeHost(pinned_));
    EXIT_ON_CUDA_ERROR(cudaFreeHost(readback_));
    EXIT_ON_CUDA_ERROR(cudaFree(staging_));
    EXIT_ON_CUDA_ERROR(cudaFree(ref_c_));
    EXIT_ON_CUDA_ERROR(cudaFree(workspace_));
    for (float* p : {bias_, lt_c_, aux_, scalars_})
      EXIT_ON_CUDA_ERROR(cudaFree(p));
    EXIT_ON_CUDA_ERROR(cudaFree(marks_));
    EXIT_ON_CUDA_ERROR(cudaFreeHost(lt_pinned_));
    EXIT_ON_CUBLAS_ERROR(cublasLtDestroy(lt_handle_));
    EXIT_ON_CUDA_ERROR(cudaEventDestroy(side_event_));
    for (cudaStream_t s : {blocking_, non_blocking_, side_})
      EXIT_ON_CUDA_ERROR(cudaStreamDestroy(s));
    cublasDestroy_v2(helper_);
    cublasDestroy_v2(handle_);
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Draws call `call` of this thread, makes it both ways, checks and counts
  // it; prints the case when it is wrong (or always, with `verbose`).
  void run(std::uint64_t call, bool verbose) {
    std::optional<Case> drawn = draw(options_.seed, index_, call, options_.pageable_unordered,
                                     options_.lt_pageable_unordered, options_.only);
    if (!drawn) {
      counts_.skipped.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    const Case& c = *drawn;
    std::string problem;
    bool lost = false;
    const bool ok = c.isLt() ? makeAndCheckLt(c, problem, lost) : makeAndCheck(c, problem, lost);
    counts_.add(c, !ok, lost);
    if (!ok || verbose) {
      std::lock_guard lock(g_print_mutex);
      if (!ok) {
        std::printf(
            "MISMATCH %s: %s; replay: stmux-differential --seed %llu --threads %d%s%s "
            "--replay %d:%llu\n",
            describe(c, options_.seed).c_str(), problem.c_str(),
            static_cast<unsigned long long>(options_.seed), options_.threads,
            options_.allow_lost ? " --allow-lost-calls" : "",
            options_.mark_joins ? " --mark-joins" : "", index_,
            static_cast<unsigned long long>(call));
      } else {
        std::printf("ok %s%s\n", describe(c, options_.seed).c_str(), lost ? " (lost)" : "");
      }
      std::fflush(stdout);
    }
  }

 private:
  struct Operands {
    float* a = nullptr;  // the buffers, each from its first float (operand offsets not added)
    float* b = nullptr;
    float* c = nullptr;
  };

  cudaStream_t streamOf(int kind) const {
    switch (kind) {
      case kLegacyStream:
        return nullptr;
      case kPerThreadStream:
        return cudaStreamPerThread;
      case kBlockingStream:
        return blocking_;
      default:
        return non_blocking_;
    }
  }

  Operands place(const Case& c, cudaStream_t stream) {
    const std::size_t sizes[] = {c.in.a.size(), c.in.b.size(), c.in.c.size()};
    Operands d;
    float** out[] = {&d.a, &d.b, &d.c};
    switch (c.value[kAlloc]) {
      case kPerCall:
        for (int i = 0; i < 3; ++i)
          *out[i] = deviceAlloc(sizes[i]);
        break;
      case kAlias:
        d.a = deviceAlloc(sizes[0]);
        d.b = d.a;
        d.c = deviceAlloc(sizes[2]);
        break;
      case kPool:
        for (int i = 0; i < 3; ++i) {
          EXIT_ON_CUDA_ERROR(
              cudaMallocAsync(reinterpret_cast<void**>(out[i]), sizes[i] * sizeof(float), stream));
        }
        // Usable from the other streams and threads that may write it.
        EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
        break;
      default: {
        float* base = c.value[kAlloc] == kArena     ? arena_
                      : c.value[kAlloc] == kManaged ? managed_
                                                    : host_;
        std::size_t at = 0;
        for (int i = 0; i < 3; ++i) {
          at += c.gap[i];
          at = (at + c.align - 1) / c.align * c.align;
          *out[i] = base + at;
          at += sizes[i];
        }
        if (at > kArenaFloats) {
          std::fprintf(stderr, "stmux-differential: a case needs %zu floats of arena, has %zu\n",
                       at, kArenaFloats);
          std::exit(3);
        }
      }
    }
    return d;
  }

  void release(const Case& c, const Operands& d, cudaStream_t stream) {
    switch (c.value[kAlloc]) {
      case kPerCall:
        for (float* p : {d.a, d.b, d.c})
          EXIT_ON_CUDA_ERROR(cudaFree(p));
        break;
      case kAlias:
        EXIT_ON_CUDA_ERROR(cudaFree(d.a));
        EXIT_ON_CUDA_ERROR(cudaFree(d.c));
        break;
      case kPool:
        for (float* p : {d.a, d.b, d.c})
          EXIT_ON_CUDA_ERROR(cudaFreeAsync(p, stream));
        break;
      default:
        break;
    }
  }

  // Writes A, B and C by the drawn method, the last step before the call.
  void write(const Case& c, const Operands& d, cudaStream_t stream) {
    struct Target {
      float* dst;
      const float* pageable;
      const float* pinned;
      std::size_t floats;
    };
    std::vector<Target> targets = {{d.a, c.in.a.data(), pinned_, c.in.a.size()}};
    if (d.b != d.a) {
      targets.push_back({d.b, c.in.b.data(), pinned_ + kMaxOperandFloats, c.in.b.size()});
    }
    targets.push_back({d.c, c.in.c.data(), pinned_ + 2 * kMaxOperandFloats, c.in.c.size()});
    const int method = c.value[kWrite];
    switch (method) {
      case kMemcpyPageable:
      case kMemcpyPinned:
        for (const Target& t : targets) {
          EXIT_ON_CUDA_ERROR(cudaMemcpy(t.dst, method == kMemcpyPageable ? t.pageable : t.pinned,
                                        t.floats * sizeof(float), cudaMemcpyDefault));
        }
        break;
      case kAsyncPageable:
      case kAsyncPinned:
      case kAsyncLegacy:
      case kMemset: {
        const cudaStream_t on = method == kAsyncLegacy ? cudaStreamLegacy : stream;
        holdFirst(on, options_.delay_writes_us);
        for (const Target& t : targets) {
          EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(t.dst,
                                             method == kAsyncPageable ? t.pageable : t.pinned,
                                             t.floats * sizeof(float), cudaMemcpyDefault, on));
        }
        if (method == kMemset) memsetBlock(c, d, stream);
        break;
      }
      case kKernelOnStream:
      case kKernelOnLegacy: {
        // The data reaches a device staging buffer first, ordered before the
        // kernel on the same stream; the kernel (not intercepted) writes it.
        const cudaStream_t on = method == kKernelOnLegacy ? cudaStreamLegacy : stream;
        EXIT_ON_CUBLAS_ERROR(cublasSetStream_v2(helper_, on));
        holdFirst(on, options_.delay_writes_us);
        float* staging = staging_;
        for (const Target& t : targets) {
          EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(staging, t.pinned, t.floats * sizeof(float),
                                             cudaMemcpyHostToDevice, on));
          EXIT_ON_CUBLAS_ERROR(
              cublasScopy_v2(helper_, static_cast<int>(t.floats), staging, 1, t.dst, 1));
          staging += kMaxOperandFloats;
        }
        break;
      }
      case kEventOtherStream:
        holdFirst(side_, options_.delay_writes_us);
        for (const Target& t : targets) {
          EXIT_ON_CUDA_ERROR(
              cudaMemcpyAsync(t.dst, t.pinned, t.floats * sizeof(float), cudaMemcpyDefault, side_));
        }
        if (options_.mark_joins) {
          mark_ = mark_ % 255 + 1;  // a byte, never 0, other than the last write's
          EXIT_ON_CUDA_ERROR(cudaMemsetAsync(marks_, mark_, sizeof(std::uint32_t), side_));
        }
        EXIT_ON_CUDA_ERROR(cudaEventRecord(side_event_, side_));
        EXIT_ON_CUDA_ERROR(cudaStreamWaitEvent(stream, side_event_, 0));
        if (options_.mark_joins) {
          EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(marks_ + 1, marks_, sizeof(std::uint32_t),
                                             cudaMemcpyDeviceToDevice, stream));
        }
        break;
      case kOtherThread: {
        std::vector<Copy> copies;
        for (const Target& t : targets)
          copies.push_back({t.dst, t.pinned, t.floats * sizeof(float)});
        EXIT_ON_CUDA_ERROR(cudaStreamWaitEvent(stream, copy_thread_.copy(copies), 0));
        break;
      }
    }
  }

  // Each problem's m x n block of C set as c.in.c0 has it: all bits when
  // beta == 0 or D is apart from C, zeros otherwise. Plain cudaMemset2D runs
  // on the legacy stream, which a non-blocking stream does not wait for;
  // there it is cudaMemset2DAsync on the call's stream.
  void memsetBlock(const Case& c, const Operands& d, cudaStream_t stream) {
    const GemmCase& g = c.gemm;
    if (g.m <= 0 || g.n <= 0) return;
    const int value = g.beta == 0.0f || c.dApart() ? 0xff : 0;
    const std::size_t pitch = static_cast<std::size_t>(g.ldc()) * sizeof(float);
    const std::size_t width = static_cast<std::size_t>(g.m) * sizeof(float);
    const auto height = static_cast<std::size_t>(g.n);
    for (std::int64_t p = 0; p < c.lt.count; ++p) {
      float* block = d.c + p * c.lt.stride_c + g.c_offset;
      if (c.stream_waits_for_legacy()) {
        EXIT_ON_CUDA_ERROR(cudaMemset2D(block, pitch, value, width, height));
      } else {
        EXIT_ON_CUDA_ERROR(cudaMemset2DAsync(block, pitch, value, width, height, stream));
      }
    }
  }

  std::vector<float> readBack(int method, const float* source, std::size_t floats,
                              cudaStream_t stream) {
    std::vector<float> result(floats);
    if (method == kReadAsync) {
      EXIT_ON_CUDA_ERROR(
          cudaMemcpyAsync(readback_, source, floats * sizeof(float), cudaMemcpyDefault, stream));
      EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
      std::memcpy(result.data(), readback_, floats * sizeof(float));
    } else {
      EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
      EXIT_ON_CUDA_ERROR(
          cudaMemcpy(result.data(), source, floats * sizeof(float), cudaMemcpyDefault));
    }
    return result;
  }

  // A, B, C and C as found staged in pinned memory for the writes; the real
  // call's C set to C as the interposed call finds it, by a copy from pinned
  // memory, which is complete when it returns.
  void stage(const Case& c) {
    const Buffers& in = c.in;
    const std::size_t nc = in.c.size();
    if (std::max({in.a.size(), in.b.size(), nc}) > kMaxOperandFloats) {
      std::fprintf(stderr, "stmux-differential: a case outgrew its staging buffers\n");
      std::exit(3);
    }
    std::memcpy(pinned_, in.a.data(), in.a.size() * sizeof(float));
    std::memcpy(pinned_ + kMaxOperandFloats, in.b.data(), in.b.size() * sizeof(float));
    std::memcpy(pinned_ + 2 * kMaxOperandFloats, in.c.data(), nc * sizeof(float));
    std::memcpy(pinned_ + 3 * kMaxOperandFloats, in.c0.data(), nc * sizeof(float));
    EXIT_ON_CUDA_ERROR(cudaMemcpy(ref_c_, pinned_ + 3 * kMaxOperandFloats, nc * sizeof(float),
                                  cudaMemcpyHostToDevice));
  }

  // Makes the call through the interposed symbol, then through libcublas's
  // own function into a C of its own with the same contents; true when both
  // are right. `lost`: the interposed call reported a loss it may report.
  bool makeAndCheck(const Case& c, std::string& problem, bool& lost) {
    const GemmCase& g = c.gemm;
    const Buffers& in = c.in;
    const cudaStream_t stream = streamOf(c.value[kStream]);
    EXIT_ON_CUBLAS_ERROR(cublasSetStream_v2(handle_, stream));
    EXIT_ON_CUBLAS_ERROR(cublasSetMathMode(
        handle_, c.value[kMath] == 1 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    const std::size_t nc = in.c.size();
    stage(c);

    const Operands d = place(c, stream);
    write(c, d, stream);
    const auto m = static_cast<int>(g.m), n = static_cast<int>(g.n), k = static_cast<int>(g.k);
    const auto lda = static_cast<int>(g.lda()), ldb = static_cast<int>(g.ldb()),
               ldc = static_cast<int>(g.ldc());
    const float* a = d.a + g.a_offset;
    const float* b = d.b + g.b_offset;
    // The GEMV's A is stored rows(op(A)) x k when transa is N, k x m otherwise.
    const int gemv_m = g.transa == 0 ? m : k, gemv_n = g.transa == 0 ? k : m;
    // The same call through the interposed symbol (sgemm, gemm_ex, gemv),
    // or through libcublas's own, into C.
    auto call = [&](SgemmFn sgemm, GemmExFn gemm_ex, SgemvFn gemv, StridedFn strided, float* out) {
      switch (c.value[kEntry]) {
        case kStrided:  // one problem: the strides are never used
          return strided(handle_, op(g.transa), op(g.transb), m, n, k, &g.alpha, a, lda,
                         static_cast<long long>(g.aFloats()), b, ldb,
                         static_cast<long long>(g.bFloats()), &g.beta, out, ldc,
                         static_cast<long long>(g.cFloats()), 1);
        case kGemmEx:
          return gemm_ex(handle_, op(g.transa), op(g.transb), m, n, k, &g.alpha, a, CUDA_R_32F, lda,
                         b, CUDA_R_32F, ldb, &g.beta, out, CUDA_R_32F, ldc, c.compute,
                         CUBLAS_GEMM_DEFAULT);
        case kGemv:
          return gemv(handle_, op(g.transa), gemv_m, gemv_n, &g.alpha, a, lda, b, 1, &g.beta, out,
                      1);
        default:
          return sgemm(handle_, op(g.transa), op(g.transb), m, n, k, &g.alpha, a, lda, b, ldb,
                       &g.beta, out, ldc);
      }
    };
    const cublasStatus_t status = call(&cublasSgemm_v2, &cublasGemmEx, &cublasSgemv_v2,
                                       &cublasSgemmStridedBatched, d.c + g.c_offset);
    const std::vector<float> result = readBack(c.value[kRead], d.c, nc, stream);
    const std::string join = joinProblem(c);
    std::optional<stmux::check::Reference> reference;
    std::optional<stmux::check::Verdict> verdict;  // the interposed call's
    std::string again;
    if (c.value[kRoute] != kInvalidArgs) {
      reference = stmux::check::reference(g, in);
      verdict = stmux::check::verify(g, in, *reference, result);
      if (!verdict->ok && status == CUBLAS_STATUS_SUCCESS) {
        again = lookAgain(g, in, *reference, d.c, nc) + (join.empty() ? joinHeld(c) : "");
      }
    }
    const cublasStatus_t real_status =
        call(real_.sgemm, real_.gemm_ex, real_.gemv, real_.strided, ref_c_ + g.c_offset);
    const std::vector<float> real_result = readBack(kReadAsync, ref_c_, nc, stream);
    release(c, d, stream);
    if (!join.empty()) {
      problem = join;
      if (verdict && !verdict->ok) problem += "; interposed call: " + verdict->problem + again;
      return false;
    }

    char statuses[96];
    std::snprintf(statuses, sizeof(statuses), "status %d, real cuBLAS %d", status, real_status);
    if (c.value[kRoute] == kInvalidArgs) {
      const auto untouched = [&](const std::vector<float>& r) {
        return std::memcmp(r.data(), in.c0.data(), nc * sizeof(float)) == 0;
      };
      if (status != CUBLAS_STATUS_INVALID_VALUE || real_status != CUBLAS_STATUS_INVALID_VALUE) {
        problem = std::string(statuses) + ", both must be CUBLAS_STATUS_INVALID_VALUE";
      } else if (!untouched(result)) {
        problem = "refused, yet C changed";
      } else if (!untouched(real_result)) {
        problem = "refused by real cuBLAS, yet its C changed";
      }
      return problem.empty();
    }
    lost = options_.allow_lost && status == CUBLAS_STATUS_EXECUTION_FAILED && g.beta != 0.0f;
    if ((status != CUBLAS_STATUS_SUCCESS && !lost) || real_status != CUBLAS_STATUS_SUCCESS) {
      problem = std::string(statuses) + ", both must be CUBLAS_STATUS_SUCCESS";
      return false;
    }
    if (!lost && !verdict->ok) {
      problem = "interposed call: " + verdict->problem + again;
      return false;
    }
    if (const auto real = stmux::check::verify(g, in, *reference, real_result); !real.ok) {
      problem = "real cuBLAS: " + real.problem;
      return false;
    }
    return true;
  }

  // A wrong interposed result looked at again once the whole device is idle:
  // right then, it was read back before it had landed; C as the write left
  // it, the call's result was lost or the write's copies landed after it.
  static std::string lookAgain(const GemmCase& g, const Buffers& in,
                               const stmux::check::Reference& reference, const float* c,
                               std::size_t floats) {
    EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
    std::vector<float> now(floats);
    EXIT_ON_CUDA_ERROR(cudaMemcpy(now.data(), c, floats * sizeof(float), cudaMemcpyDefault));
    if (stmux::check::verify(g, in, reference, now).ok) {
      return "; once the device was idle, C was right (read back too early)";
    }
    if (std::memcmp(now.data(), in.c.data(), floats * sizeof(float)) == 0) {
      return "; once the device was idle, C was as the write left it (the result lost, or the "
             "write landed after it)";
    }
    return "; once the device was idle, C was still wrong";
  }

  // Whether the case's write marked its stream (--mark-joins).
  bool marked(const Case& c) const {
    return options_.mark_joins && c.value[kWrite] == kEventOtherStream;
  }
  // A marked write's mark as the call's stream read it right after its wait
  // for the write's event (the stream synchronized since): "" where it was
  // the write's, else what went wrong.
  std::string joinProblem(const Case& c) const {
    if (!marked(c)) return "";
    std::uint32_t seen = 0;
    EXIT_ON_CUDA_ERROR(cudaMemcpy(&seen, marks_ + 1, sizeof(seen), cudaMemcpyDeviceToHost));
    if (seen == mark_ * 0x01010101u) return "";
    return fmt::format(
        "the call's stream went on past its wait for the write's event before the "
        "write was done: right after the wait it read {:#x}, not the write's mark "
        "{}",
        seen, mark_);
  }
  // ... and what a wrong result adds where the mark was right.
  std::string joinHeld(const Case& c) const {
    return marked(c) ? "; the call's stream did wait for the write (it read the write's mark)" : "";
  }

  // cublasLtMatmul: the call through the interposed symbol, then through
  // libcublasLt's own function into a D of its own with the same contents,
  // each with descriptors of its own; true when both are right.
  bool makeAndCheckLt(const Case& c, std::string& problem, bool& lost) {
    const GemmCase& g = c.gemm;
    const LtCase& lt = c.lt;
    const int* v = c.value;
    const cudaStream_t stream = streamOf(v[kStream]);
    const std::size_t nc = c.in.c.size();
    stage(c);
    // The bias, C when D is apart, and alpha and beta in device memory:
    // copies from pinned memory, complete when they return. Neither call
    // may write them.
    if (lt.bias.size() > kBiasFloats || lt.c.size() > kMaxOperandFloats) {
      std::fprintf(stderr, "stmux-differential: a case outgrew its staging buffers\n");
      std::exit(3);
    }
    float* const pinned_bias = lt_pinned_;
    float* const pinned_c = lt_pinned_ + kBiasFloats;
    float* const pinned_scalars = pinned_c + kMaxOperandFloats;
    if (!lt.bias.empty()) {
      std::memcpy(pinned_bias, lt.bias.data(), lt.bias.size() * sizeof(float));
      EXIT_ON_CUDA_ERROR(
          cudaMemcpy(bias_, pinned_bias, lt.bias.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    if (!lt.c.empty()) {
      std::memcpy(pinned_c, lt.c.data(), lt.c.size() * sizeof(float));
      EXIT_ON_CUDA_ERROR(
          cudaMemcpy(lt_c_, pinned_c, lt.c.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    const bool device_scalars = v[kLtForm] == kDevicePointers;
    if (device_scalars) {
      pinned_scalars[0] = g.alpha;
      pinned_scalars[1] = g.beta;
      EXIT_ON_CUDA_ERROR(
          cudaMemcpy(scalars_, pinned_scalars, 2 * sizeof(float), cudaMemcpyHostToDevice));
    }

    const Operands d = place(c, stream);
    write(c, d, stream);
    const float* a = d.a + g.a_offset;
    const float* b = d.b + g.b_offset;
    const void* alpha = device_scalars ? static_cast<const void*>(scalars_) : &g.alpha;
    const void* beta = device_scalars ? static_cast<const void*>(scalars_ + 1) : &g.beta;
    // The same call through the interposed symbol, or through libcublasLt's
    // own, into the D buffer `out` (C too, unless D is apart from it).
    auto call = [&](LtMatmulFn matmul, float* out) {
      float* d_first = out + g.c_offset;
      const float* c_first = c.dApart() ? lt_c_ + g.c_offset : d_first;
      const LtDescriptors descriptors(c, bias_ + lt.bias_offset, aux_);
      cublasLtMatmulAlgo_t chosen;
      const bool heuristic = v[kLtAlgo] == kHeuristicAlgo &&
                             descriptors.heuristic(lt_handle_, a, b, c_first, d_first, chosen);
      return matmul(lt_handle_, descriptors.desc(), alpha, a, descriptors.a(), b, descriptors.b(),
                    beta, c_first, descriptors.c(), d_first, descriptors.d(),
                    heuristic ? &chosen : nullptr, workspace_, kWorkspaceBytes, stream);
    };
    const cublasStatus_t status = call(&cublasLtMatmul, d.c);
    const std::vector<float> result = readBack(v[kRead], d.c, nc, stream);
    const std::string join = joinProblem(c);
    const cublasStatus_t real_status = call(real_.lt_matmul, ref_c_);
    const std::vector<float> real_result = readBack(kReadAsync, ref_c_, nc, stream);
    std::vector<float> c_after;
    if (c.dApart()) c_after = readBack(kReadAsync, lt_c_, lt.c.size(), stream);
    release(c, d, stream);
    if (!join.empty()) {
      problem = join;
      return false;
    }

    char statuses[96];
    std::snprintf(statuses, sizeof(statuses), "status %d, real cuBLASLt %d", status, real_status);
    if (c.dApart() && std::memcmp(c_after.data(), lt.c.data(), lt.c.size() * sizeof(float)) != 0) {
      problem = std::string(statuses) + ": C changed, though D is apart from it";
      return false;
    }
    // Refused: both alike, and D as it was. Arguments cuBLASLt must refuse;
    // a no-op and an auxiliary output, which it may (and the shim leaves to
    // it either way).
    const int route = v[kRoute];
    const bool may_refuse = route == kNoOp || v[kLtForm] == kAuxEpilogue;
    if (route == kInvalidArgs ||
        (may_refuse && (status != CUBLAS_STATUS_SUCCESS || real_status != CUBLAS_STATUS_SUCCESS))) {
      const auto untouched = [&](const std::vector<float>& r) {
        return std::memcmp(r.data(), c.in.c0.data(), nc * sizeof(float)) == 0;
      };
      if (status == CUBLAS_STATUS_SUCCESS || status != real_status) {
        problem = std::string(statuses) + (route == kInvalidArgs
                                               ? ", both must refuse it alike"
                                               : ", both must succeed or refuse it alike");
      } else if (!untouched(result)) {
        problem = "refused, yet D changed";
      } else if (!untouched(real_result)) {
        problem = "refused by real cuBLASLt, yet its D changed";
      }
      return problem.empty();
    }
    lost = options_.allow_lost && status == CUBLAS_STATUS_EXECUTION_FAILED && g.beta != 0.0f;
    if ((status != CUBLAS_STATUS_SUCCESS && !lost) || real_status != CUBLAS_STATUS_SUCCESS) {
      problem = std::string(statuses) + ", both must be CUBLAS_STATUS_SUCCESS";
      return false;
    }
    const std::vector<LtProblem> problems = ltReferences(c);
    if (!lost) {
      if (const auto verdict = verifyLt(c, problems, result); !verdict.ok) {
        problem = "interposed call: " + verdict.problem + joinHeld(c);
        return false;
      }
    }
    if (const auto verdict = verifyLt(c, problems, real_result); !verdict.ok) {
      problem = "real cuBLASLt: " + verdict.problem;
      return false;
    }
    return true;
  }

  const int index_;
  const Options& options_;
  const RealFunctions real_;
  Counts& counts_;
  cublasHandle_t handle_ = nullptr;  // the calls
  cublasHandle_t helper_ = nullptr;  // the kernels that write operands
  cudaStream_t blocking_ = nullptr, non_blocking_ = nullptr, side_ = nullptr;
  // --mark-joins: the last event_other_stream write's mark (a byte, 1 to
  // 255), and on the device that mark as set by the write (memset: the byte
  // four times) and as the call's stream read it after its wait.
  std::uint32_t mark_ = 0;
  std::uint32_t* marks_ = nullptr;
  cudaEvent_t side_event_ = nullptr;
  float* arena_ = nullptr;                // device memory, A, B and C at offsets in it
  float* managed_ = nullptr;              // the same in managed memory
  float* host_ = nullptr;                 // the same in pinned host memory
  float* pinned_ = nullptr;               // A, B, C and C as found, staged for copies
  float* readback_ = nullptr;             // pinned, for C read back
  float* staging_ = nullptr;              // device, for the kernel writes
  float* ref_c_ = nullptr;                // device, the real call's C
  cublasLtHandle_t lt_handle_ = nullptr;  // cublasLtMatmul's calls
  void* workspace_ = nullptr;             // device, cuBLASLt's, kWorkspaceBytes
  float* bias_ = nullptr;                 // device, the bias buffer
  float* lt_c_ = nullptr;                 // device, C when D is apart from it
  float* aux_ = nullptr;                  // device, an epilogue's auxiliary output
  float* scalars_ = nullptr;              // device, alpha and beta in device pointer mode
  float* lt_pinned_ = nullptr;            // the bias, C and the scalars, staged for copies
  CopyThread copy_thread_;
};

// libcublas's and libcublasLt's own functions: dlsym on a library's handle
// searches that library (and what it needs), never a preloaded one. Both
// are loaded already: the program links them (libcublasLt also as
// libcublas's dependency).
RealFunctions realFunctions() {
  void* cublas = dlopen(kCublasSoname, RTLD_NOW | RTLD_NOLOAD);
  void* cublas_lt = dlopen(kCublasLtSoname, RTLD_NOW | RTLD_NOLOAD);
  auto find = [&](void* library, const char* soname, const char* name) {
    void* real = library != nullptr ? dlsym(library, name) : nullptr;
    if (real == nullptr) {
      std::fprintf(stderr, "stmux-differential: cannot find %s in %s: %s\n", name, soname,
                   dlerror());
      std::exit(3);
    }
    return real;
  };
  RealFunctions real;
  real.sgemm = reinterpret_cast<SgemmFn>(find(cublas, kCublasSoname, "cublasSgemm_v2"));
  real.gemm_ex = reinterpret_cast<GemmExFn>(find(cublas, kCublasSoname, "cublasGemmEx"));
  real.gemv = reinterpret_cast<SgemvFn>(find(cublas, kCublasSoname, "cublasSgemv_v2"));
  real.strided =
      reinterpret_cast<StridedFn>(find(cublas, kCublasSoname, "cublasSgemmStridedBatched"));
  real.lt_matmul = reinterpret_cast<LtMatmulFn>(find(cublas_lt, kCublasLtSoname, "cublasLtMatmul"));
  return real;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse(argc, argv, options)) {
    std::fprintf(
        stderr,
        "stmux-differential: options: --seed N, --calls N, --threads T, "
        "--replay THREAD:CALL, --allow-lost-calls, --only CLASS=VALUES, --delay-writes-us US, "
        "--mark-joins, --seconds S, --quiet, --help\n");
    return 2;
  }
  if (!options.seed_given)
    options.seed = splitmix(stmux::nowNs() ^ static_cast<std::uint64_t>(getpid()) << 40);
  if (options.replay) {
    std::printf("seed %llu (replaying call %llu of thread %d)\n",
                static_cast<unsigned long long>(options.seed),
                static_cast<unsigned long long>(options.replay_call), options.replay_thread);
  } else {
    std::printf(
        "seed %llu (rerun: stmux-differential --seed %llu --threads %d --calls %llu%s%s%s%s%s)\n",
        static_cast<unsigned long long>(options.seed),
        static_cast<unsigned long long>(options.seed), options.threads,
        static_cast<unsigned long long>(options.calls),
        options.allow_lost ? " --allow-lost-calls" : "", options.mark_joins ? " --mark-joins" : "",
        options.only_args.c_str(),
        options.delay_writes_us == 0
            ? ""
            : fmt::format(" --delay-writes-us {}", options.delay_writes_us).c_str(),
        options.seconds == 0 ? "" : fmt::format(" --seconds {}", options.seconds).c_str());
  }
  std::fflush(stdout);

  if (reportedNoDevice()) return 3;
  const RealFunctions real = realFunctions();
  // What the program's own calls bind to, looked up as the dynamic linker
  // would: the preloaded shim, when there is one.
  const void* bound = dlsym(RTLD_DEFAULT, "cublasSgemm_v2");
  const bool preloaded = bound != reinterpret_cast<const void*>(real.sgemm);
  std::printf("real cuBLAS resolved past the preload: %s\n", preloaded ? "yes" : "no");
  const void* lt_bound = dlsym(RTLD_DEFAULT, "cublasLtMatmul");
  const bool lt_preloaded = lt_bound != reinterpret_cast<const void*>(real.lt_matmul);
  std::printf("real cuBLASLt resolved past the preload: %s\n", lt_preloaded ? "yes" : "no");
  // Without the preload, or with the daemon expected to go away, a served
  // call may run straight through cuBLAS, which does not order it.
  options.pageable_unordered = preloaded && !options.allow_lost;
  options.lt_pageable_unordered = lt_preloaded && !options.allow_lost;
  std::printf("plain copies from pageable memory before served calls on non-blocking streams: %s\n",
              options.pageable_unordered ? "drawn" : "not drawn");

  Counts counts;
  const std::uint64_t start = stmux::nowNs();
  std::uint64_t requested = options.calls;
  if (options.replay) {
    requested = 1;
    Worker worker(options.replay_thread, options, real, counts);
    worker.run(options.replay_call, !options.quiet);
  } else {
    const std::uint64_t deadline =
        options.seconds == 0 ? 0 : start + static_cast<std::uint64_t>(options.seconds * 1e9);
    std::atomic<std::uint64_t> drawn{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < options.threads; ++t) {
      const std::uint64_t share = options.calls / options.threads +
                                  (static_cast<std::uint64_t>(t) < options.calls % options.threads);
      threads.emplace_back([&, t, share] {
        Worker worker(t, options, real, counts);
        for (std::uint64_t call = 0; call < share && (deadline == 0 || stmux::nowNs() < deadline);
             ++call) {
          worker.run(call, false);
          drawn.fetch_add(1, std::memory_order_relaxed);
        }
      });
    }
    for (std::thread& thread : threads)
      thread.join();
    if (drawn.load() < options.calls) {
      std::printf("stopped at the --seconds limit: %llu of %llu calls drawn\n",
                  static_cast<unsigned long long>(drawn.load()),
                  static_cast<unsigned long long>(options.calls));
      requested = drawn.load();
    }
  }
  const double seconds = static_cast<double>(stmux::nowNs() - start) / 1e9;

  if (!options.quiet) {
    for (int k = 0; k < kClassCount; ++k) {
      for (std::size_t v = 0; v < kClasses[k].values.size(); ++v) {
        std::printf("class %.*s=%.*s calls %llu mismatches %llu\n",
                    static_cast<int>(kClasses[k].name.size()), kClasses[k].name.data(),
                    static_cast<int>(kClasses[k].values[v].size()), kClasses[k].values[v].data(),
                    static_cast<unsigned long long>(counts.class_calls[k][v].load()),
                    static_cast<unsigned long long>(counts.class_mismatches[k][v].load()));
      }
    }
  }
  std::printf("elapsed %.2f s, %.0f calls/s\n", seconds,
              static_cast<double>(counts.calls.load()) / std::max(seconds, 1e-9));
  for (std::size_t e = 0; e < std::size(kEntryNames); ++e) {
    const std::uint64_t calls = counts.entry_calls[e].load();
    const std::uint64_t direct = counts.entry_direct[e].load();
    std::printf("entry %.*s calls %llu expected_served %llu expected_direct %llu\n",
                static_cast<int>(kEntryNames[e].size()), kEntryNames[e].data(),
                static_cast<unsigned long long>(calls),
                static_cast<unsigned long long>(calls - direct),
                static_cast<unsigned long long>(direct));
  }
  std::printf("calls %llu mismatches %llu lost %llu",
              static_cast<unsigned long long>(counts.calls.load()),
              static_cast<unsigned long long>(counts.mismatches.load()),
              static_cast<unsigned long long>(counts.lost.load()));
  for (std::size_t r = kNoOp; r < std::size(kRouteNames); ++r) {
    std::printf(" expected_direct_%.*s %llu", static_cast<int>(kRouteNames[r].size()),
                kRouteNames[r].data(), static_cast<unsigned long long>(counts.routes[r].load()));
  }
  std::printf(" skipped %llu\n", static_cast<unsigned long long>(counts.skipped.load()));
  std::fflush(stdout);
  // Every call drawn was made or left out by --only.
  const bool all = counts.calls.load() + counts.skipped.load() == requested;
  return counts.mismatches.load() == 0 && all ? 0 : 1;
}

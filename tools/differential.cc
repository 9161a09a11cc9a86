// stmux-differential: the program of the differential correctness suite.
//
// An ordinary cuBLAS application that knows nothing of stmux. Every call it
// makes through cublasSgemm_v2 (which LD_PRELOAD=libstmux.so interposes) it
// makes again through libcublas's own cublasSgemm_v2, looked up with dlsym on
// libcublas's handle, where no preload can stand in front of it; both results
// are checked against a float64 reference. What varies from call to call
// (the handle's stream, how the operands were written and C is read back,
// where the operands live, transposes, leading dimensions, scalars, math
// mode, sizes, arguments cuBLAS refuses) is drawn from a generator seeded by
// (seed, thread, call) alone, so any call replays by itself.
// tests/differential_gpu_test.cc runs it preloaded in several processes and
// holds its counts against the shim's.
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
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

namespace {

using stmux::check::Buffers;
using stmux::check::GemmCase;

#define DIFFERENTIAL_STR_(x) #x
#define DIFFERENTIAL_STR(x) DIFFERENTIAL_STR_(x)
// The libcublas this program was built against, by its soname.
constexpr const char* kCublasSoname = "libcublas.so." DIFFERENTIAL_STR(CUBLAS_VER_MAJOR);

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
// libcublas's own functions, past any preload.
struct RealFunctions {
  SgemmFn sgemm = nullptr;
  GemmExFn gemm_ex = nullptr;
  SgemvFn gemv = nullptr;
  StridedFn strided = nullptr;
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
enum Args { kValid, kBadLda, kBadLdb, kBadLdc, kNegativeDim };
// Where the shim must send the call: to the daemon, or straight to cuBLAS
// for one of the reasons it counts.
enum Route { kServed, kNoOp, kInvalidArgs, kNotExportable };
// The entry point called: cublasSgemm_v2; cublasGemmEx with FP32 data; for
// a GEMM with one column (op(B) = x, unit increments), cublasSgemv_v2; or
// cublasSgemmStridedBatched with a batch of one (its batches of several are
// checked problem by problem by stmux-cublas-client's check).
enum Entry { kSgemm, kGemmEx, kGemv, kStrided };

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
constexpr std::string_view kArgsNames[] = {"valid", "bad_lda", "bad_ldb", "bad_ldc",
                                           "negative_dim"};
constexpr std::string_view kRouteNames[] = {"served", "no_op", "invalid_args", "not_exportable"};
constexpr std::string_view kEntryNames[] = {"sgemm", "gemm_ex", "gemv", "strided_batched"};

struct ClassInfo {
  std::string_view name;
  std::span<const std::string_view> values;
};
constexpr ClassInfo kClasses[kClassCount] = {
    {"stream", kStreamNames}, {"write", kWriteNames}, {"read", kReadNames}, {"alloc", kAllocNames},
    {"transa", kOpNames},     {"transb", kOpNames},   {"ld", kLdNames},     {"alpha", kAlphaNames},
    {"beta", kBetaNames},     {"math", kMathNames},   {"size", kSizeNames}, {"args", kArgsNames},
    {"route", kRouteNames},   {"entry", kEntryNames}};
constexpr std::size_t kMaxValues = std::size(kWriteNames);

// Bounds of what is drawn, which size every buffer below.
constexpr std::int64_t kSmallDim = 64;
constexpr std::int64_t kLargeDim = 300;
constexpr std::int64_t kMaxPad = 7;
constexpr std::int64_t kMaxOffset = 40;  // floats before an operand in its buffer
constexpr std::size_t kMaxGap = 63;      // floats between buffers in an arena
// GemmCase's buffers: offset, columns at the leading dimension, a 64-float tail.
constexpr std::size_t kMaxOperandFloats = kMaxOffset + (kLargeDim + kMaxPad) * kLargeDim + 64;
constexpr std::size_t kArenaFloats = 3 * (kMaxOperandFloats + kMaxGap);

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

struct Case {
  int thread = 0;
  std::uint64_t call = 0;
  int value[kClassCount] = {};  // each class's value, an index into its names
  GemmCase gemm;
  std::size_t gap[3] = {};  // floats before A's, B's and C's buffers in an arena
  Buffers in;               // in.c: written before the call; in.c0: C as the call finds it
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;  // kGemmEx's
  bool stream_waits_for_legacy() const { return value[kStream] != kNonBlockingStream; }
};

// `pageable_unordered`: whether a plain cudaMemcpy from pageable memory may
// precede a call on a non-blocking stream (below).
Case draw(std::uint64_t seed, int thread, std::uint64_t call, bool pageable_unordered) {
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
  v[kEntry] = pick(random, {50, 17, 17, 16});
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

  if (v[kArgs] != kValid) {
    v[kRoute] = kInvalidArgs;  // the shim checks the arguments first
  } else if (g.noOp()) {
    v[kRoute] = kNoOp;
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
  const int pageable = legacy == 1 || (pageable_unordered && v[kRoute] == kServed) ? 20 : 0;
  const int memset = v[kArgs] == kValid ? 8 : 0;
  v[kWrite] = pick(random, {pageable, 10, 10, 14, 10 * legacy, memset, 8, 6 * legacy, 8, 8});

  c.in = v[kAlloc] == kAlias ? stmux::check::makeAliasedInputs(g, random)
                             : stmux::check::makeInputs(g, random);
  v[kLd] = g.lda_pad > 0 || g.ldb_pad > 0 || g.ldc_pad > 0 ? 1 : 0;
  const std::int64_t dims[] = {g.m, g.n, g.k};
  v[kSize] = std::ranges::any_of(dims, [](std::int64_t d) { return d == 0; })          ? 0
             : std::ranges::any_of(dims, [](std::int64_t d) { return d == 1; })        ? 1
             : std::ranges::any_of(dims, [](std::int64_t d) { return d > kSmallDim; }) ? 3
                                                                                       : 2;

  if (v[kWrite] == kMemset) {
    // C is copied in whole, then its block set: all bits (a NaN) when beta is
    // 0, which the result must not keep; zeros otherwise.
    const std::uint32_t bits = g.beta == 0.0f ? 0xffffffffu : 0u;
    float set;
    std::memcpy(&set, &bits, sizeof(set));
    for (std::int64_t j = 0; j < g.n; ++j) {
      for (std::int64_t i = 0; i < g.m; ++i)
        c.in.c0[g.c_offset + j * g.ldc() + i] = set;
    }
  }
  return c;
}

std::string describe(const Case& c, std::uint64_t seed) {
  const GemmCase& g = c.gemm;
  std::string text = "seed=" + std::to_string(seed) + " thread=" + std::to_string(c.thread) +
                     " call=" + std::to_string(c.call);
  for (int k = 0; k < kClassCount; ++k) {
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
  return text + numbers;
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
  // Set in main: whether the calls are interposed and the daemon is expected
  // to stay (draw() says what it allows).
  bool pageable_unordered = false;
  bool quiet = false;
};

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: stmux-differential [--seed N] [--calls N] [--threads T] [--replay THREAD:CALL]\n"
      "                          [--allow-lost-calls] [--quiet]\n"
      "Each cublasSgemm_v2 call made twice, through the symbol the program links (which\n"
      "LD_PRELOAD=libstmux.so interposes) and through libcublas's own function, both\n"
      "checked against a float64 reference. Calls are drawn from (seed, thread, call).\n"
      "  --seed N              64-bit seed (default: from the clock; printed first)\n"
      "  --calls N             calls in all, split over the threads (default 1000)\n"
      "  --threads T           worker threads, 1 to %d (default 4)\n"
      "  --replay THREAD:CALL  run that one call of thread THREAD (< T) alone\n"
      "  --allow-lost-calls    CUBLAS_STATUS_EXECUTION_FAILED from the interposed call\n"
      "                        with beta != 0 (a daemon that died mid-call) counts as\n"
      "                        lost, not a mismatch; its C is not compared\n"
      "  --quiet               no per-class lines\n"
      "Preloaded, and without --allow-lost-calls, plain copies from pageable memory also\n"
      "precede served calls on non-blocking streams, which only stmux's wait orders.\n"
      "Output: the seed line; one line per mismatch, with its replay command; per class\n"
      "  'class NAME=VALUE calls N mismatches M'; then the totals\n"
      "  'calls N mismatches M lost L expected_direct_no_op A\n"
      "   expected_direct_invalid_args B expected_direct_not_exportable C'.\n"
      "Exit status: 0 no mismatch, 1 a mismatch, 2 bad usage, 3 CUDA error.\n",
      kMaxThreads);
}

// A whole unsigned number in [lo, hi], or false.
bool parseNumber(const char* text, std::uint64_t lo, std::uint64_t hi, std::uint64_t& out) {
  if (text == nullptr || *text < '0' || *text > '9') return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || *end != '\0' || value < lo || value > hi) return false;
  out = value;
  return true;
}

bool bad(const char* flag, const char* value, const char* accepted) {
  std::fprintf(stderr, "stmux-differential: %s '%s': accepted: %s\n", flag, value, accepted);
  return false;
}

bool parse(int argc, char** argv, Options& o) {
  static const option kLong[] = {{"seed", required_argument, nullptr, 's'},
                                 {"calls", required_argument, nullptr, 'c'},
                                 {"threads", required_argument, nullptr, 't'},
                                 {"replay", required_argument, nullptr, 'r'},
                                 {"allow-lost-calls", no_argument, nullptr, 'l'},
                                 {"quiet", no_argument, nullptr, 'q'},
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
      case 'q':
        o.quiet = true;
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
        !parseNumber(replay.substr(0, colon).c_str(), 0, kMaxThreads - 1, thread) ||
        !parseNumber(replay.substr(colon + 1).c_str(), 0, kMax, o.replay_call)) {
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
  std::atomic<std::uint64_t> routes[std::size(kRouteNames)] = {};
  std::atomic<std::uint64_t> class_calls[kClassCount][kMaxValues] = {};
  std::atomic<std::uint64_t> class_mismatches[kClassCount][kMaxValues] = {};

  void add(const Case& c, bool mismatch, bool lost_call) {
    calls.fetch_add(1, std::memory_order_relaxed);
    if (mismatch) mismatches.fetch_add(1, std::memory_order_relaxed);
    if (lost_call) lost.fetch_add(1, std::memory_order_relaxed);
    routes[c.value[kRoute]].fetch_add(1, std::memory_order_relaxed);
    for (int k = 0; k < kClassCount; ++k) {
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
class CopyThread {
 public:
  CopyThread() {
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

  cudaStream_t stream_ = nullptr;
  cudaEvent_t event_ = nullptr;
  std::mutex mutex_;
  std::condition_variable cv_;
  const std::vector<Copy>* job_ = nullptr;
  bool recorded_ = false;
  bool stop_ = false;
  std::thread thread_;
};

// ---- one worker thread ----------------------------------------------------------

float* deviceAlloc(std::size_t floats) {
  float* p = nullptr;
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&p), floats * sizeof(float)));
  return p;
}

cublasOperation_t op(int t) {
  return static_cast<cublasOperation_t>(t);
}

class Worker {
 public:
  Worker(int index, const Options& options, RealFunctions real, Counts& counts)
      : index_(index), options_(options), real_(real), counts_(counts) {
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
    Case c = draw(options_.seed, index_, call, options_.pageable_unordered);
    std::string problem;
    bool lost = false;
    const bool ok = makeAndCheck(c, problem, lost);
    counts_.add(c, !ok, lost);
    if (!ok || verbose) {
      std::lock_guard lock(g_print_mutex);
      if (!ok) {
        std::printf(
            "MISMATCH %s: %s; replay: stmux-differential --seed %llu --threads %d%s "
            "--replay %d:%llu\n",
            describe(c, options_.seed).c_str(), problem.c_str(),
            static_cast<unsigned long long>(options_.seed), options_.threads,
            options_.allow_lost ? " --allow-lost-calls" : "", index_,
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
        for (const Target& t : targets) {
          EXIT_ON_CUDA_ERROR(
              cudaMemcpyAsync(t.dst, t.pinned, t.floats * sizeof(float), cudaMemcpyDefault, side_));
        }
        EXIT_ON_CUDA_ERROR(cudaEventRecord(side_event_, side_));
        EXIT_ON_CUDA_ERROR(cudaStreamWaitEvent(stream, side_event_, 0));
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

  // C's m x n block set as c.in.c0 has it: all bits when beta == 0, zeros
  // otherwise. Plain cudaMemset2D runs on the legacy stream, which a
  // non-blocking stream does not wait for; there it is cudaMemset2DAsync on
  // the call's stream.
  void memsetBlock(const Case& c, const Operands& d, cudaStream_t stream) {
    const GemmCase& g = c.gemm;
    if (g.m <= 0 || g.n <= 0) return;
    const int value = g.beta == 0.0f ? 0xff : 0;
    float* block = d.c + g.c_offset;
    const std::size_t pitch = static_cast<std::size_t>(g.ldc()) * sizeof(float);
    const std::size_t width = static_cast<std::size_t>(g.m) * sizeof(float);
    const auto height = static_cast<std::size_t>(g.n);
    if (c.stream_waits_for_legacy()) {
      EXIT_ON_CUDA_ERROR(cudaMemset2D(block, pitch, value, width, height));
    } else {
      EXIT_ON_CUDA_ERROR(cudaMemset2DAsync(block, pitch, value, width, height, stream));
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
    if (std::max({in.a.size(), in.b.size(), nc}) > kMaxOperandFloats) {
      std::fprintf(stderr, "stmux-differential: a case outgrew its staging buffers\n");
      std::exit(3);
    }
    std::memcpy(pinned_, in.a.data(), in.a.size() * sizeof(float));
    std::memcpy(pinned_ + kMaxOperandFloats, in.b.data(), in.b.size() * sizeof(float));
    std::memcpy(pinned_ + 2 * kMaxOperandFloats, in.c.data(), nc * sizeof(float));
    std::memcpy(pinned_ + 3 * kMaxOperandFloats, in.c0.data(), nc * sizeof(float));
    // The real call's C: C as the interposed call finds it, written first by
    // a copy from pinned memory, which is complete when it returns.
    EXIT_ON_CUDA_ERROR(cudaMemcpy(ref_c_, pinned_ + 3 * kMaxOperandFloats, nc * sizeof(float),
                                  cudaMemcpyHostToDevice));

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
    const cublasStatus_t real_status =
        call(real_.sgemm, real_.gemm_ex, real_.gemv, real_.strided, ref_c_ + g.c_offset);
    const std::vector<float> real_result = readBack(kReadAsync, ref_c_, nc, stream);
    release(c, d, stream);

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
    const stmux::check::Reference reference = stmux::check::reference(g, in);
    if (!lost) {
      if (const auto verdict = stmux::check::verify(g, in, reference, result); !verdict.ok) {
        problem = "interposed call: " + verdict.problem;
        return false;
      }
    }
    if (const auto verdict = stmux::check::verify(g, in, reference, real_result); !verdict.ok) {
      problem = "real cuBLAS: " + verdict.problem;
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
  cudaEvent_t side_event_ = nullptr;
  float* arena_ = nullptr;     // device memory, A, B and C at offsets in it
  float* managed_ = nullptr;   // the same in managed memory
  float* host_ = nullptr;      // the same in pinned host memory
  float* pinned_ = nullptr;    // A, B, C and C as found, staged for copies
  float* readback_ = nullptr;  // pinned, for C read back
  float* staging_ = nullptr;   // device, for the kernel writes
  float* ref_c_ = nullptr;     // device, the real call's C
  CopyThread copy_thread_;
};

std::uint64_t monotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull + ts.tv_nsec;
}

// libcublas's own functions: dlsym on libcublas's handle searches that
// library (and what it needs), never a preloaded one.
RealFunctions realFunctions() {
  void* cublas = dlopen(kCublasSoname, RTLD_NOW | RTLD_NOLOAD);
  auto find = [&](const char* name) {
    void* real = cublas != nullptr ? dlsym(cublas, name) : nullptr;
    if (real == nullptr) {
      std::fprintf(stderr, "stmux-differential: cannot find %s in %s: %s\n", name, kCublasSoname,
                   dlerror());
      std::exit(3);
    }
    return real;
  };
  RealFunctions real;
  real.sgemm = reinterpret_cast<SgemmFn>(find("cublasSgemm_v2"));
  real.gemm_ex = reinterpret_cast<GemmExFn>(find("cublasGemmEx"));
  real.gemv = reinterpret_cast<SgemvFn>(find("cublasSgemv_v2"));
  real.strided = reinterpret_cast<StridedFn>(find("cublasSgemmStridedBatched"));
  return real;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse(argc, argv, options)) {
    std::fprintf(stderr,
                 "stmux-differential: options: --seed N, --calls N, --threads T, "
                 "--replay THREAD:CALL, --allow-lost-calls, --quiet, --help\n");
    return 2;
  }
  if (!options.seed_given)
    options.seed = splitmix(monotonicNs() ^ static_cast<std::uint64_t>(getpid()) << 40);
  if (options.replay) {
    std::printf("seed %llu (replaying call %llu of thread %d)\n",
                static_cast<unsigned long long>(options.seed),
                static_cast<unsigned long long>(options.replay_call), options.replay_thread);
  } else {
    std::printf("seed %llu (rerun: stmux-differential --seed %llu --threads %d --calls %llu%s)\n",
                static_cast<unsigned long long>(options.seed),
                static_cast<unsigned long long>(options.seed), options.threads,
                static_cast<unsigned long long>(options.calls),
                options.allow_lost ? " --allow-lost-calls" : "");
  }
  std::fflush(stdout);

  int devices = 0;
  if (const cudaError_t error = cudaGetDeviceCount(&devices);
      error != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "stmux-differential: no CUDA device (%s)\n",
                 error != cudaSuccess ? cudaGetErrorString(error) : "none found");
    return 3;
  }
  const RealFunctions real = realFunctions();
  // What the program's own calls bind to, looked up as the dynamic linker
  // would: the preloaded shim, when there is one.
  const void* bound = dlsym(RTLD_DEFAULT, "cublasSgemm_v2");
  const bool preloaded = bound != reinterpret_cast<const void*>(real.sgemm);
  std::printf("real cuBLAS resolved past the preload: %s\n", preloaded ? "yes" : "no");
  // Without the preload, or with the daemon expected to go away, a served
  // call may run straight through cuBLAS, which does not order it.
  options.pageable_unordered = preloaded && !options.allow_lost;
  std::printf("plain copies from pageable memory before served calls on non-blocking streams: %s\n",
              options.pageable_unordered ? "drawn" : "not drawn");

  Counts counts;
  const std::uint64_t start = monotonicNs();
  std::uint64_t requested = options.calls;
  if (options.replay) {
    requested = 1;
    Worker worker(options.replay_thread, options, real, counts);
    worker.run(options.replay_call, !options.quiet);
  } else {
    std::vector<std::thread> threads;
    for (int t = 0; t < options.threads; ++t) {
      const std::uint64_t share = options.calls / options.threads +
                                  (static_cast<std::uint64_t>(t) < options.calls % options.threads);
      threads.emplace_back([&, t, share] {
        Worker worker(t, options, real, counts);
        for (std::uint64_t call = 0; call < share; ++call)
          worker.run(call, false);
      });
    }
    for (std::thread& thread : threads)
      thread.join();
  }
  const double seconds = static_cast<double>(monotonicNs() - start) / 1e9;

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
  std::printf(
      "calls %llu mismatches %llu lost %llu expected_direct_no_op %llu "
      "expected_direct_invalid_args %llu expected_direct_not_exportable %llu\n",
      static_cast<unsigned long long>(counts.calls.load()),
      static_cast<unsigned long long>(counts.mismatches.load()),
      static_cast<unsigned long long>(counts.lost.load()),
      static_cast<unsigned long long>(counts.routes[kNoOp].load()),
      static_cast<unsigned long long>(counts.routes[kInvalidArgs].load()),
      static_cast<unsigned long long>(counts.routes[kNotExportable].load()));
  std::fflush(stdout);
  return counts.mismatches.load() == 0 && counts.calls.load() == requested ? 0 : 1;
}

// stmux-cublas-client: an ordinary cuBLAS program that knows nothing of stmux.
//
// It links libcublas like any application, so LD_PRELOAD=libstmux.so can sit
// in front of it unseen; the shim's tests and stmux-bench run it with and
// without. Modes:
//   probe    no GPU needed: where cublasSgemm_v2 and cublasLtMatmul resolve,
//            and the statuses of calls cuBLAS must refuse
//   check    the case matrix against a float64 reference, through
//            cublasSgemm_v2, cublasSgemm_v2_64 and the legacy cublasSgemm
//   stress   verified calls in a loop for a while, counting what came back,
//            from one thread or several
//   paths    calls the shim must hand to cuBLAS itself (graph capture, another
//            thread's capture of a blocking stream, device pointer mode, pool
//            and managed memory), verified
//   fork     children forked before and after this process used CUDA
//   idle-free  one call, then memory freed while the process stays idle
//   loop     a closed loop {sgemm; wait}, a tenant of stmux-bench (its start
//            barrier: tools/barrier.h)
//   ceiling  one cublasSgemmBatched of R per round instead (stmux-bench)
#include <cublasLt.h>
#include <cublas_api.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <getopt.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "stmux/sys.h"
#include "tools/args.h"
#include "tools/barrier.h"
#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

// The legacy API lives in cublas.h, which may not be included with
// cublas_api.h's users in mind (cublas_v2.h renames cublasSgemm); declared here.
extern "C" {
void cublasSgemm(char transa, char transb, int m, int n, int k, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc);
cublasStatus_t cublasGetError(void);
cublasStatus_t cublasInit(void);
cublasStatus_t cublasShutdown(void);
}

namespace {

using stmux::check::Buffers;
using stmux::check::GemmCase;
using stmux::tools::realIn;
using stmux::tools::wholeIn;

cublasOperation_t op(int t) {
  return static_cast<cublasOperation_t>(t);
}
char legacyOp(int t) {
  return "NTC"[t];
}

struct Options {
  std::string mode;
  bool quick = false;
  std::uint64_t seed = 0;
  double seconds = 5;
  bool seconds_given = false;  // sync-flags: its calls go on for --seconds
  float beta = 0.0f;
  std::int64_t m = 256, n = 256, k = 256;
  int count = 1;
  stmux::tools::TenantFiles files;  // loop, ceiling: the bench's barrier
  std::string apis = "all";
  bool mixed = false;  // loop: --tenant picks a seed shape; ceiling: all three, grouped
  int tenant = 0;
  int threads = 1;          // stress
  bool same_shape = false;  // stress: every call --m x --n x --k, not a random shape
  // The program's own scheduling choice (cudaSetDeviceFlags before its
  // context): 0 leaves CUDA's default.
  unsigned sync_flag = 0;
  unsigned slice_us = 0;  // --slice-us: the main thread's slice request; 0: the kernel's
};

// The seed shapes, for mixed-shape runs: RNN mat-vec, ResNet-18 conv2_2, a cube.
constexpr std::int64_t kSeedShapes[3][3] = {{512, 1, 512}, {256, 128, 1152}, {256, 256, 256}};

void usage(FILE* out) {
  std::fprintf(out,
               "usage: stmux-cublas-client MODE [options]\n"
               "An ordinary cuBLAS program (it knows nothing of stmux), for tests and benchmarks.\n"
               "  probe                          no GPU needed: symbol binding and refusals\n"
               "  devices                        the CUDA devices, one line each (exit 3 if none)\n"
               "  check [--quick] [--seed N] [--api all|v2|v2_64|legacy]\n"
               "                                 the case matrix against a float64 reference\n"
               "  stress --seconds S [--beta B] [--seed N] [--threads T] [--same-shape]\n"
               "                                 verified calls in a loop; counts statuses;\n"
               "                                 T threads, each with its own handle; random\n"
               "                                 shapes up to 96^3, or with --same-shape each\n"
               "                                 --m x --n x --k (default 256^3)\n"
               "  paths                          verified calls the shim must leave to cuBLAS:\n"
               "                                 graph capture, another thread's capture of\n"
               "                                 a blocking stream, device pointer mode, pool\n"
               "                                 (cudaMallocAsync) and managed memory\n"
               "  fork                           verified calls in children forked before\n"
               "                                 this process touches CUDA, then in itself\n"
               "                                 around a child forked after\n"
               "  idle-free --seconds S          one call; S s idle; C freed; S s idle\n"
               "  reset                          verified calls, then cudaDeviceReset and a new\n"
               "                                 handle, three times\n"
               "  outlive [--m M --n N --k K] [--seconds S]\n"
               "                                 one call, beta 0 (prints \"calling\" first),\n"
               "                                 checked; then C zeroed, S s idle (default 5),\n"
               "                                 and C checked still zero: \"late_written 0\"\n"
               "  loop --m M --n N --k K --ready FILE --go FILE --out FILE\n"
               "                                 closed loop {sgemm; sync}: writes FILE ready\n"
               "                                 once warm, times the span the go FILE names,\n"
               "                                 results to --out (stmux-bench's protocol,\n"
               "                                 tools/barrier.h)\n"
               "  sync-flags [--seconds S]       200 calls {sgemm; sync} (for S s at least,\n"
               "                                 if given), then prints its CUDA context's\n"
               "                                 scheduling flag: \"sched 0xN\"\n"
               "  accumulate --threads T --count N\n"
               "                                 T threads, a handle each on one shared\n"
               "                                 stream, each adding A_t B_t into one C N\n"
               "                                 times (beta 1); C checked exactly\n"
               "  ceiling --count R --m M --n N --k K --ready F --go F --out F\n"
               "                                 one cublasSgemmBatched of R per round\n"
               "  --tenant I (loop, ceiling)     this tenant's index among the bench's tenants\n"
               "  --mixed (loop, ceiling)        the three seed shapes: loop takes shape\n"
               "                                 --tenant %% 3; ceiling spreads R over all\n"
               "                                 three in one cublasSgemmGroupedBatched\n"
               "  --sync spin|yield|blocking (any mode)  the program's own choice of how\n"
               "                                 CUDA waits (cudaSetDeviceFlags before its\n"
               "                                 context); default CUDA's\n"
               "  --slice-us N (any mode)        the main thread's EEVDF slice request to the\n"
               "                                 kernel (sched_setattr, Linux 6.12 and later),\n"
               "                                 100..100000; default the kernel's\n"
               "Exit status: 0 all right, 1 a wrong result or status, 2 bad usage, 3 CUDA error\n"
               "or --slice-us refused,\n"
               "4 (loop, ceiling) no go file within 600 s of being ready.\n");
}

// Parses `text` as a number in [least, most]; otherwise says which flag had
// what value and what it accepts.
template <class T>
bool number(const char* flag, const char* text, T least, T most, T& into) {
  std::optional<T> value;
  if constexpr (std::is_integral_v<T>) {
    value = wholeIn<T>(text, least, most);
  } else if (const auto real = realIn(text, least, most)) {
    value = static_cast<T>(*real);
  }
  if (!value) {
    std::fprintf(stderr, "stmux-cublas-client: %s '%s': accepted: %s from %s to %s\n", flag, text,
                 std::is_integral_v<T> ? "an integer" : "a number", std::to_string(least).c_str(),
                 std::to_string(most).c_str());
    return false;
  }
  into = *value;
  return true;
}

// False (having said why) on bad usage.
bool parse(int argc, char** argv, Options& o) {
  if (argc < 2) {
    std::fprintf(stderr, "stmux-cublas-client: no MODE given\n");
    return false;
  }
  o.mode = argv[1];
  if (o.mode == "--help" || o.mode == "-h") {
    usage(stdout);
    std::exit(0);
  }
  static const char* const kModeNames[] = {
      "probe",     "devices",    "check",      "stress", "loop",  "ceiling", "paths",
      "idle-free", "sync-flags", "accumulate", "fork",   "reset", "outlive"};
  if (std::find_if(std::begin(kModeNames), std::end(kModeNames),
                   [&](const char* name) { return o.mode == name; }) == std::end(kModeNames)) {
    std::fprintf(stderr,
                 "stmux-cublas-client: unknown MODE '%s': accepted: probe, devices, check, "
                 "stress, paths, fork, reset, outlive, idle-free, sync-flags, accumulate, loop, "
                 "ceiling\n",
                 o.mode.c_str());
    return false;
  }
  static const option kLong[] = {
      {"quick", no_argument, nullptr, 'q'},          {"seed", required_argument, nullptr, 's'},
      {"seconds", required_argument, nullptr, 'S'},  {"beta", required_argument, nullptr, 'b'},
      {"m", required_argument, nullptr, 'm'},        {"n", required_argument, nullptr, 'n'},
      {"k", required_argument, nullptr, 'k'},        {"count", required_argument, nullptr, 'c'},
      {"ready", required_argument, nullptr, 'r'},    {"go", required_argument, nullptr, 'g'},
      {"out", required_argument, nullptr, 'o'},      {"api", required_argument, nullptr, 'p'},
      {"mixed", no_argument, nullptr, 'x'},          {"tenant", required_argument, nullptr, 't'},
      {"threads", required_argument, nullptr, 'T'},  {"sync", required_argument, nullptr, 'y'},
      {"slice-us", required_argument, nullptr, 'L'}, {"same-shape", no_argument, nullptr, 'e'},
      {"help", no_argument, nullptr, 'h'},           {nullptr, 0, nullptr, 0}};
  optind = 2;
  int c;
  bool ok = true;
  while (ok && (c = getopt_long(argc, argv, "", kLong, nullptr)) != -1) {
    switch (c) {
      case 'q':
        o.quick = true;
        break;
      case 's':
        ok = number<std::uint64_t>("--seed", optarg, 0, UINT64_MAX >> 1, o.seed);
        break;
      case 'S':
        ok = number("--seconds", optarg, 0.001, 86400.0, o.seconds);
        o.seconds_given = true;
        break;
      case 'b':
        ok = number("--beta", optarg, -1e6f, 1e6f, o.beta);
        break;
      case 'm':
        ok = number<std::int64_t>("--m", optarg, 1, 65536, o.m);
        break;
      case 'n':
        ok = number<std::int64_t>("--n", optarg, 1, 65536, o.n);
        break;
      case 'k':
        ok = number<std::int64_t>("--k", optarg, 1, 65536, o.k);
        break;
      case 'c':
        ok = number("--count", optarg, 1, 65536, o.count);
        break;
      case 'r':
        o.files.ready = optarg;
        break;
      case 'g':
        o.files.go = optarg;
        break;
      case 'o':
        o.files.out = optarg;
        break;
      case 'p':
        o.apis = optarg;
        break;
      case 'x':
        o.mixed = true;
        break;
      case 't':
        ok = number("--tenant", optarg, 0, 1 << 20, o.tenant);
        break;
      case 'T':
        ok = number("--threads", optarg, 1, 256, o.threads);
        break;
      case 'e':
        o.same_shape = true;
        break;
      case 'y':
        if (std::strcmp(optarg, "spin") == 0) {
          o.sync_flag = cudaDeviceScheduleSpin;
        } else if (std::strcmp(optarg, "yield") == 0) {
          o.sync_flag = cudaDeviceScheduleYield;
        } else if (std::strcmp(optarg, "blocking") == 0) {
          o.sync_flag = cudaDeviceScheduleBlockingSync;
        } else {
          std::fprintf(stderr,
                       "stmux-cublas-client: --sync '%s': accepted: spin, yield, blocking\n",
                       optarg);
          ok = false;
        }
        break;
      case 'L':
        ok = number("--slice-us", optarg, 100u, 100000u, o.slice_us);
        break;
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        return false;  // getopt said what was wrong
    }
  }
  if (!ok) return false;
  if (optind != argc) {
    std::fprintf(stderr, "stmux-cublas-client: unexpected argument '%s'\n", argv[optind]);
    return false;
  }
  if ((o.mode == "loop" || o.mode == "ceiling") &&
      (o.files.ready.empty() || o.files.go.empty() || o.files.out.empty())) {
    std::fprintf(stderr, "stmux-cublas-client: %s needs --ready, --go and --out\n", o.mode.c_str());
    return false;
  }
  return true;
}

// --slice-us: asks the kernel's EEVDF scheduler for a slice of `us` for the
// calling thread (sched_setattr's sched_runtime under SCHED_OTHER; the
// kernel clamps it to 0.1 .. 100 ms): a shorter slice gives an earlier
// deadline, so the thread runs sooner once it wakes.
bool requestSlice(unsigned us) {
  stmux::SchedAttr attr;  // this thread's: its policy and nice value stay
  if (stmux::schedGetattr(attr) != 0) {
    std::fprintf(stderr, "stmux-cublas-client: --slice-us %u: sched_getattr: %s\n", us,
                 std::strerror(errno));
    return false;
  }
  if (stmux::schedRequestSlice(attr, us) != 0) {
    std::fprintf(stderr, "stmux-cublas-client: --slice-us %u: sched_setattr: %s\n", us,
                 std::strerror(errno));
    return false;
  }
  return true;
}

// A handle on its own non-blocking stream; on failure says why (with the
// device's free memory, the usual cause when many processes share a GPU).
bool makeHandle(cublasHandle_t& handle, cudaStream_t& stream) {
  // The context first, so that a failure to make one is named as such.
  if (const cudaError_t error = cudaFree(nullptr); error != cudaSuccess) {
    std::fprintf(stderr, "stmux-cublas-client: cannot create a CUDA context: %s (%s)\n",
                 cudaGetErrorString(error), cudaGetErrorName(error));
    return false;
  }
  const cublasStatus_t status = cublasCreate_v2(&handle);
  if (status != CUBLAS_STATUS_SUCCESS) {
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    std::fprintf(stderr, "stmux-cublas-client: cublasCreate failed: %s (%zu of %zu MiB free)\n",
                 cublasGetStatusString(status), free_bytes >> 20, total_bytes >> 20);
    return false;
  }
  EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasSetStream_v2(handle, stream);
  return true;
}

// ---- probe ------------------------------------------------------------------

int probe() {
  Dl_info info{};
  const void* symbol = reinterpret_cast<const void*>(&cublasSgemm_v2);
  std::printf("cublasSgemm_v2 %s\n",
              dladdr(symbol, &info) != 0 && info.dli_fname ? info.dli_fname : "?");
  const float one = 1.0f;
  std::printf("v2_null_handle %d\n",
              static_cast<int>(cublasSgemm_v2(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one,
                                              nullptr, 4, nullptr, 4, &one, nullptr, 4)));
  std::printf("v2_64_null_handle %d\n",
              static_cast<int>(cublasSgemm_v2_64(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one,
                                                 nullptr, 4, nullptr, 4, &one, nullptr, 4)));
  symbol = reinterpret_cast<const void*>(&cublasLtMatmul);
  std::printf("cublasLtMatmul %s\n",
              dladdr(symbol, &info) != 0 && info.dli_fname ? info.dli_fname : "?");
  std::printf("lt_null_handle %d\n",
              static_cast<int>(cublasLtMatmul(nullptr, nullptr, &one, nullptr, nullptr, nullptr,
                                              nullptr, &one, nullptr, nullptr, nullptr, nullptr,
                                              nullptr, nullptr, 0, nullptr)));
  std::printf("strided_null_handle %d\n",
              static_cast<int>(cublasSgemmStridedBatched(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4,
                                                         &one, nullptr, 4, 16, nullptr, 4, 16, &one,
                                                         nullptr, 4, 16, 2)));
  cublasHandle_t handle = nullptr;
  const cublasStatus_t created = cublasCreate_v2(&handle);
  std::printf("create %d\n", static_cast<int>(created));
  if (created == CUBLAS_STATUS_SUCCESS) {
    std::printf("v2_bad_lda %d\n",
                static_cast<int>(cublasSgemm_v2(handle, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one,
                                                nullptr, 3, nullptr, 4, &one, nullptr, 4)));
    std::printf("strided_negative_count %d\n",
                static_cast<int>(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4,
                                                           4, &one, nullptr, 4, 16, nullptr, 4, 16,
                                                           &one, nullptr, 4, 16, -1)));
    cublasDestroy_v2(handle);
  }
  cublasSgemm('X', 'N', 4, 4, 4, 1.0f, nullptr, 4, nullptr, 4, 0.0f, nullptr, 4);
  std::printf("legacy_bad_op %d\n", static_cast<int>(cublasGetError()));
  return 0;
}

// ---- check ------------------------------------------------------------------

struct Device {
  float* a = nullptr;
  float* b = nullptr;
  float* c = nullptr;
};

enum class Api { kV2, kV2_64, kLegacy };
const char* apiName(Api api) {
  return api == Api::kV2 ? "v2" : api == Api::kV2_64 ? "v2_64" : "legacy";
}

// How a v2 call is made: plainly, with alpha and beta in device memory,
// captured into a CUDA graph that is then launched, or plainly while another
// thread captures a blocking stream of its own (kBesideCapture).
enum class Via { kPlain, kDevicePointers, kGraph, kBesideCapture };

// Ends the capture on `stream`, then launches its graph there and waits for it.
void launchCaptured(cudaStream_t stream) {
  cudaGraph_t graph;
  EXIT_ON_CUDA_ERROR(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  EXIT_ON_CUDA_ERROR(cudaGraphInstantiate(&exec, graph, 0));
  EXIT_ON_CUDA_ERROR(cudaGraphLaunch(exec, stream));
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  EXIT_ON_CUDA_ERROR(cudaGraphExecDestroy(exec));
  EXIT_ON_CUDA_ERROR(cudaGraphDestroy(graph));
}

// Another thread's capture of a blocking stream (cudaStreamCaptureModeThreadLocal,
// so that this thread's calls are its own business), open from construction
// until close(): a memset captured, the graph launched. CUDA forbids any use
// of the legacy stream meanwhile, and such a use invalidates the capture, which
// then fails to end (exit 3).
class CaptureBeside {
 public:
  CaptureBeside() {
    EXIT_ON_CUDA_ERROR(cudaMalloc(&scratch_, 256));
    thread_ = std::thread([this] {
      cudaStream_t blocking = nullptr;
      EXIT_ON_CUDA_ERROR(cudaStreamCreate(&blocking));
      EXIT_ON_CUDA_ERROR(cudaStreamBeginCapture(blocking, cudaStreamCaptureModeThreadLocal));
      EXIT_ON_CUDA_ERROR(cudaMemsetAsync(scratch_, 1, 256, blocking));
      open_.set_value();
      done_.get_future().wait();
      launchCaptured(blocking);
      EXIT_ON_CUDA_ERROR(cudaStreamDestroy(blocking));
    });
    open_.get_future().wait();
  }
  void close() {
    done_.set_value();
    thread_.join();
    EXIT_ON_CUDA_ERROR(cudaFree(scratch_));
  }

 private:
  void* scratch_ = nullptr;
  std::promise<void> open_, done_;
  std::thread thread_;
};

// Runs one case: inputs copied in on the call's own stream with no wait, so
// the call is correct only if it is ordered after them.
cublasStatus_t runCase(const GemmCase& c, Api api, cublasHandle_t handle, cudaStream_t stream,
                       const Buffers& in, std::vector<float>& result, Device& d,
                       Via via = Via::kPlain, double hold_capture_s = 0) {
  float* pinned = nullptr;
  const std::size_t largest = std::max({in.a.size(), in.b.size(), in.c.size()});
  EXIT_ON_CUDA_ERROR(
      cudaMallocHost(reinterpret_cast<void**>(&pinned), 3 * largest * sizeof(float)));
  std::memcpy(pinned, in.a.data(), in.a.size() * sizeof(float));
  std::memcpy(pinned + largest, in.b.data(), in.b.size() * sizeof(float));
  std::memcpy(pinned + 2 * largest, in.c.data(), in.c.size() * sizeof(float));
  EXIT_ON_CUDA_ERROR(
      cudaMemcpyAsync(d.a, pinned, in.a.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(d.b, pinned + largest, in.b.size() * sizeof(float),
                                     cudaMemcpyHostToDevice, stream));
  EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(d.c, pinned + 2 * largest, in.c.size() * sizeof(float),
                                     cudaMemcpyHostToDevice, stream));
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const float* a = d.a + c.a_offset;
  const float* b = d.b + c.b_offset;
  float* cc = d.c + c.c_offset;
  float* scalars = nullptr;  // alpha, beta on the device (Via::kDevicePointers)
  switch (api) {
    case Api::kV2: {
      const float* alpha = &c.alpha;
      const float* beta = &c.beta;
      if (via == Via::kDevicePointers) {
        const float values[2] = {c.alpha, c.beta};
        EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&scalars), sizeof(values)));
        EXIT_ON_CUDA_ERROR(cudaMemcpy(scalars, values, sizeof(values), cudaMemcpyHostToDevice));
        EXIT_ON_CUBLAS_ERROR(cublasSetPointerMode_v2(handle, CUBLAS_POINTER_MODE_DEVICE));
        alpha = scalars, beta = scalars + 1;
      }
      std::optional<CaptureBeside> beside;
      if (via == Via::kBesideCapture) beside.emplace();
      if (via == Via::kGraph) {
        // Global: any thread's unsafe call during the capture invalidates it.
        EXIT_ON_CUDA_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        std::this_thread::sleep_for(std::chrono::duration<double>(hold_capture_s));
      }
      status = cublasSgemm_v2(handle, op(c.transa), op(c.transb), static_cast<int>(c.m),
                              static_cast<int>(c.n), static_cast<int>(c.k), alpha, a,
                              static_cast<int>(c.lda()), b, static_cast<int>(c.ldb()), beta, cc,
                              static_cast<int>(c.ldc()));
      if (beside) beside->close();
      if (via == Via::kGraph) launchCaptured(stream);
      if (via == Via::kDevicePointers) {
        EXIT_ON_CUBLAS_ERROR(cublasSetPointerMode_v2(handle, CUBLAS_POINTER_MODE_HOST));
      }
      break;
    }
    case Api::kV2_64:
      status = cublasSgemm_v2_64(handle, op(c.transa), op(c.transb), c.m, c.n, c.k, &c.alpha, a,
                                 c.lda(), b, c.ldb(), &c.beta, cc, c.ldc());
      break;
    case Api::kLegacy:
      // The legacy API runs on the legacy default stream, which waits for
      // the copies on `stream` only if they are done: make them done.
      EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
      cublasSgemm(legacyOp(c.transa), legacyOp(c.transb), static_cast<int>(c.m),
                  static_cast<int>(c.n), static_cast<int>(c.k), c.alpha, a,
                  static_cast<int>(c.lda()), b, static_cast<int>(c.ldb()), c.beta, cc,
                  static_cast<int>(c.ldc()));
      status = cublasGetError();
      EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
      break;
  }
  result.assign(in.c.size(), 0.0f);
  EXIT_ON_CUDA_ERROR(
      cudaMemcpyAsync(pinned, d.c, result.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  std::memcpy(result.data(), pinned, result.size() * sizeof(float));
  EXIT_ON_CUDA_ERROR(cudaFreeHost(pinned));
  if (scalars != nullptr) EXIT_ON_CUDA_ERROR(cudaFree(scalars));
  return status;
}

Device allocate(const GemmCase& c) {
  Device d;
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&d.a), c.aFloats() * sizeof(float)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&d.b), c.bFloats() * sizeof(float)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&d.c), c.cFloats() * sizeof(float)));
  return d;
}

void release(Device& d) {
  EXIT_ON_CUDA_ERROR(cudaFree(d.a));
  EXIT_ON_CUDA_ERROR(cudaFree(d.b));
  EXIT_ON_CUDA_ERROR(cudaFree(d.c));
  d = {};
}

// One cublasSgemm_v2 of `c` on fresh random inputs in `d`: its status, and
// whether C matches the float64 reference.
struct Checked {
  cublasStatus_t status;
  bool right;
  bool ok() const { return status == CUBLAS_STATUS_SUCCESS && right; }
};
Checked callChecked(const GemmCase& c, cublasHandle_t handle, cudaStream_t stream, Device& d,
                    std::mt19937_64& random) {
  const Buffers in = stmux::check::makeInputs(c, random);
  std::vector<float> result;
  const cublasStatus_t status = runCase(c, Api::kV2, handle, stream, in, result, d);
  return {status, status == CUBLAS_STATUS_SUCCESS && stmux::check::verify(c, in, result).ok};
}

// One cublasSgemmStridedBatched of `batch`, inputs copied in on the call's
// stream with no wait; C's whole buffer comes back in `result`.
cublasStatus_t runStrided(const stmux::check::StridedBatch& batch, cublasHandle_t handle,
                          cudaStream_t stream, std::vector<float>& result) {
  const GemmCase& c = batch.c;
  float *a = nullptr, *b = nullptr, *cc = nullptr;
  for (auto [device, host] :
       {std::pair{&a, &batch.a}, std::pair{&b, &batch.b}, std::pair{&cc, &batch.c_all}}) {
    EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(device), host->size() * sizeof(float)));
    EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(*device, host->data(), host->size() * sizeof(float),
                                       cudaMemcpyHostToDevice, stream));
  }
  const cublasStatus_t status = cublasSgemmStridedBatched(
      handle, op(c.transa), op(c.transb), static_cast<int>(c.m), static_cast<int>(c.n),
      static_cast<int>(c.k), &c.alpha, a + c.a_offset, static_cast<int>(c.lda()), batch.stride_a,
      b + c.b_offset, static_cast<int>(c.ldb()), batch.stride_b, &c.beta, cc + c.c_offset,
      static_cast<int>(c.ldc()), batch.stride_c, static_cast<int>(batch.count));
  result.resize(batch.c_all.size());
  EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(result.data(), cc, result.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream));
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  for (float* p : {a, b, cc})
    EXIT_ON_CUDA_ERROR(cudaFree(p));
  return status;
}

int check(const Options& o) {
  std::mt19937_64 random(o.seed != 0 ? o.seed
                                     : stmux::nowNs() ^ (std::uint64_t{1} << 32) * getpid());
  std::vector<Api> apis;
  if (o.apis == "all" || o.apis == "v2") apis.push_back(Api::kV2);
  if (o.apis == "all" || o.apis == "v2_64") apis.push_back(Api::kV2_64);
  if (o.apis == "all" || o.apis == "legacy") apis.push_back(Api::kLegacy);
  if (apis.empty()) {
    std::fprintf(stderr, "stmux-cublas-client: --api '%s': accepted: all, v2, v2_64, legacy\n",
                 o.apis.c_str());
    return 2;
  }
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  if (std::find(apis.begin(), apis.end(), Api::kLegacy) != apis.end()) cublasInit();

  // What a reader of the output needs to account for each call: no-ops
  // (cuBLAS returns at once), legacy calls with beta != 0 and other calls
  // with alpha 0 (which only scale C: stmux leaves them to cuBLAS) counted
  // apart.
  int failures = 0, calls = 0, no_ops = 0, legacy_nonzero_beta = 0, alpha_zero = 0;
  const auto countUnserved = [&](const GemmCase& c) {
    if (c.noOp()) {
      ++no_ops;
    } else if (c.alpha == 0.0f) {
      ++alpha_zero;
    }
  };
  for (const GemmCase& c : stmux::check::caseMatrix(o.quick)) {
    for (Api api : apis) {
      // The legacy API has no handle: its math mode is the default, and
      // beta != 0 goes straight to cuBLAS under stmux; run it anyway.
      if (api == Api::kLegacy && c.math != stmux::check::kDefaultMath) continue;
      cublasSetMathMode(handle, static_cast<cublasMath_t>(c.math));
      const Buffers in = stmux::check::makeInputs(c, random);
      Device d = allocate(c);
      std::vector<float> result;
      const cublasStatus_t status = runCase(c, api, handle, stream, in, result, d);
      release(d);
      ++calls;
      if (api == Api::kLegacy && c.beta != 0.0f) {
        ++legacy_nonzero_beta;
      } else {
        countUnserved(c);
      }
      if (status != CUBLAS_STATUS_SUCCESS) {
        std::printf("FAIL %s %s: status %d\n", c.name.c_str(), apiName(api), status);
        ++failures;
        continue;
      }
      const auto verdict = stmux::check::verify(c, in, result);
      if (!verdict.ok) {
        std::printf("FAIL %s %s: %s\n", c.name.c_str(), apiName(api), verdict.problem.c_str());
        ++failures;
      } else {
        std::printf("ok %s %s worst %.3f\n", c.name.c_str(), apiName(api), verdict.worst);
      }
    }
  }

  // A buffer freed and another made in its place between calls: the second
  // call must use the new memory, whatever address it got.
  const GemmCase reuse = stmux::check::caseMatrix(true)[0];
  cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH);
  int reused = 0;
  for (int round = 0; round < 4; ++round) {
    Device d = allocate(reuse);
    const void* before = d.c;
    const Buffers in = stmux::check::makeInputs(reuse, random);
    std::vector<float> result;
    cublasStatus_t status = runCase(reuse, Api::kV2, handle, stream, in, result, d);
    ++calls;
    EXIT_ON_CUDA_ERROR(cudaFree(d.c));
    EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&d.c), reuse.cFloats() * sizeof(float)));
    reused += d.c == before ? 1 : 0;
    const Buffers again = stmux::check::makeInputs(reuse, random);
    if (status == CUBLAS_STATUS_SUCCESS) {
      status = runCase(reuse, Api::kV2, handle, stream, again, result, d);
      ++calls;
    }
    release(d);
    const auto verdict = stmux::check::verify(reuse, again, result);
    if (status != CUBLAS_STATUS_SUCCESS || !verdict.ok) {
      std::printf("FAIL realloc round %d: status %d %s\n", round, status, verdict.problem.c_str());
      ++failures;
    }
  }
  std::printf("realloc same_address %d of 4\n", reused);

  // Strided batches (bmm): one problem, several, and A and B shared by all
  // (stride 0), each problem checked.
  int strided = 0;
  for (const GemmCase& c : stmux::check::caseMatrix(true)) {
    for (auto [count, broadcast] : {std::pair{1, false}, {3, false}, {2, true}}) {
      cublasSetMathMode(handle, static_cast<cublasMath_t>(c.math));
      const stmux::check::StridedBatch batch =
          stmux::check::makeStridedInputs(c, count, broadcast, random);
      std::vector<float> result;
      const cublasStatus_t status = runStrided(batch, handle, stream, result);
      ++calls, ++strided;
      countUnserved(c);
      const auto verdict =
          status == CUBLAS_STATUS_SUCCESS
              ? stmux::check::verifyStrided(batch, result)
              : stmux::check::Verdict{false, 0, "status " + std::to_string(status)};
      std::printf("%s strided %s x%d%s%s%s\n", verdict.ok ? "ok" : "FAIL", c.name.c_str(), count,
                  broadcast ? " broadcast" : "", verdict.ok ? "" : ": ", verdict.problem.c_str());
      failures += verdict.ok ? 0 : 1;
    }
  }
  std::printf("strided batches %d\n", strided);

  // Arguments cuBLAS refuses: the same status must come back.
  const float one = 1.0f;
  const cublasStatus_t bad = cublasSgemm_v2(handle, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, &one,
                                            nullptr, 7, nullptr, 8, &one, nullptr, 8);
  ++calls;
  if (bad != CUBLAS_STATUS_INVALID_VALUE) {
    std::printf("FAIL bad-lda: status %d, cuBLAS says %d\n", bad, CUBLAS_STATUS_INVALID_VALUE);
    ++failures;
  }
  std::printf("calls %d no_op %d refused 1 legacy_nonzero_beta %d alpha_zero %d failures %d\n",
              calls, no_ops, legacy_nonzero_beta, alpha_zero, failures);
  if (std::find(apis.begin(), apis.end(), Api::kLegacy) != apis.end()) cublasShutdown();
  cublasDestroy_v2(handle);
  return failures == 0 ? 0 : 1;
}

// ---- stress -----------------------------------------------------------------

struct StressCounts {
  std::atomic<long> ok{0}, failed{0}, wrong{0}, other{0};
};

// Verified calls of random small shapes (or all of one, --same-shape) until
// `until_ns`, on a handle and stream of this thread's own.
void stressThread(const Options& o, std::uint64_t seed, std::uint64_t until_ns,
                  StressCounts& counts) {
  std::mt19937_64 random(seed);
  std::uniform_int_distribution<int> size(8, 96);
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) std::exit(3);
  const GemmCase same{"stress", 0, 0, o.m, o.n, o.k};
  Device d = allocate(o.same_shape ? same : GemmCase{"stress", 0, 0, 96, 96, 96});
  while (stmux::nowNs() < until_ns) {
    GemmCase c =
        o.same_shape ? same : GemmCase{"stress", 0, 0, size(random), size(random), size(random)};
    c.beta = o.beta;
    const Checked call = callChecked(c, handle, stream, d, random);
    if (call.status == CUBLAS_STATUS_SUCCESS) {
      if (!call.right && counts.wrong.fetch_add(1) < 3) {  // the first few, for whoever looks
        std::printf("FAIL stress thread seed %llu: m %lld n %lld k %lld beta %g came back wrong\n",
                    static_cast<unsigned long long>(seed), static_cast<long long>(c.m),
                    static_cast<long long>(c.n), static_cast<long long>(c.k), c.beta);
      }
      if (call.right) ++counts.ok;
    } else if (call.status == CUBLAS_STATUS_EXECUTION_FAILED) {
      ++counts.failed;  // allowed for beta != 0 when the daemon dies mid-call
    } else {
      ++counts.other;
    }
  }
  release(d);
  EXIT_ON_CUDA_ERROR(cudaStreamDestroy(stream));
  cublasDestroy_v2(handle);
}

int stress(const Options& o) {
  const std::uint64_t seed = o.seed != 0 ? o.seed : stmux::nowNs() * 31 + getpid();
  const std::uint64_t until = stmux::nowNs() + static_cast<std::uint64_t>(o.seconds * 1e9);
  StressCounts counts;
  std::vector<std::thread> threads;
  for (int t = 1; t < o.threads; ++t)
    threads.emplace_back([&, t] { stressThread(o, seed + t, until, counts); });
  stressThread(o, seed, until, counts);
  for (std::thread& thread : threads)
    thread.join();
  std::printf("stress ok %ld execution_failed %ld wrong %ld other %ld beta %g threads %d\n",
              counts.ok.load(), counts.failed.load(), counts.wrong.load(), counts.other.load(),
              o.beta, o.threads);
  const bool failed_allowed = o.beta != 0.0f;
  return counts.wrong == 0 && counts.other == 0 && (counts.failed == 0 || failed_allowed) &&
                 counts.ok > 0
             ? 0
             : 1;
}

// ---- paths ------------------------------------------------------------------

// Verified calls the shim must not send to the daemon, each made the way an
// application would, beside plain calls it must send. Prints how many of
// each, for the test to compare with the shim's counters.
int paths(const Options& o) {
  std::mt19937_64 random(o.seed != 0 ? o.seed : stmux::nowNs() + getpid());
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  enum class Memory { kDevice, kPool, kManaged };
  struct Path {
    const char* name;
    Via via;
    Memory memory;
    double hold_capture_s = 0;  // the capture stays open this long
  };
  const Path kPaths[] = {{"plain", Via::kPlain, Memory::kDevice},
                         {"device_pointer_mode", Via::kDevicePointers, Memory::kDevice},
                         {"graph_capture", Via::kGraph, Memory::kDevice},
                         // Long enough for the shim's sweeper to run meanwhile.
                         {"graph_capture_held", Via::kGraph, Memory::kDevice, 2.5},
                         // While another thread captures a blocking stream:
                         // a served call's wait for the legacy stream would
                         // invalidate that capture.
                         {"beside_capture", Via::kBesideCapture, Memory::kDevice},
                         {"pool", Via::kPlain, Memory::kPool},
                         {"managed", Via::kPlain, Memory::kManaged}};
  const GemmCase cases[] = {{"nt-odd", 0, 1, 33, 17, 29},
                            {"beta-half", 0, 0, 48, 40, 32, 0, 0, 0, 1.0f, 0.5f}};
  int failures = 0;
  std::size_t plain_calls = std::size(cases);
  // Memory the shim has exported, alive throughout, so that its sweeper
  // queries the driver while the held capture is open.
  Device kept = allocate(cases[0]);
  ++plain_calls;
  if (const Checked call = callChecked(cases[0], handle, stream, kept, random); !call.ok()) {
    std::printf("FAIL kept %s: status %d\n", cases[0].name.c_str(), call.status);
    ++failures;
  }
  for (const Path& path : kPaths) {
    for (const GemmCase& c : cases) {
      Device d;
      float** pointers[] = {&d.a, &d.b, &d.c};
      const std::size_t floats[] = {c.aFloats(), c.bFloats(), c.cFloats()};
      for (int i = 0; i < 3; ++i) {
        void** p = reinterpret_cast<void**>(pointers[i]);
        const std::size_t bytes = floats[i] * sizeof(float);
        if (path.memory == Memory::kDevice) EXIT_ON_CUDA_ERROR(cudaMalloc(p, bytes));
        if (path.memory == Memory::kPool) EXIT_ON_CUDA_ERROR(cudaMallocAsync(p, bytes, stream));
        if (path.memory == Memory::kManaged) EXIT_ON_CUDA_ERROR(cudaMallocManaged(p, bytes));
      }
      const Buffers in = stmux::check::makeInputs(c, random);
      std::vector<float> result;
      const cublasStatus_t status =
          runCase(c, Api::kV2, handle, stream, in, result, d, path.via, path.hold_capture_s);
      for (float* p : {d.a, d.b, d.c}) {
        if (path.memory == Memory::kPool) {
          EXIT_ON_CUDA_ERROR(cudaFreeAsync(p, stream));
        } else {
          EXIT_ON_CUDA_ERROR(cudaFree(p));
        }
      }
      EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
      const auto verdict = stmux::check::verify(c, in, result);
      if (status != CUBLAS_STATUS_SUCCESS || !verdict.ok) {
        std::printf("FAIL %s %s: status %d %s\n", path.name, c.name.c_str(), status,
                    verdict.problem.c_str());
        ++failures;
      } else {
        std::printf("ok %s %s worst %.3f\n", path.name, c.name.c_str(), verdict.worst);
      }
    }
  }
  release(kept);
  std::printf("per_path %zu plain_calls %zu failures %d\n", std::size(cases), plain_calls,
              failures);
  cublasDestroy_v2(handle);
  return failures == 0 ? 0 : 1;
}

// ---- fork -------------------------------------------------------------------

// A few verified calls of the quick case matrix; the number that failed.
int verifiedCalls(cublasHandle_t handle, cudaStream_t stream, std::mt19937_64& random) {
  int failures = 0;
  const auto cases = stmux::check::caseMatrix(true);
  for (std::size_t i = 0; i < 6; ++i) {
    const GemmCase& c = cases[i];
    Device d = allocate(c);
    const Checked call = callChecked(c, handle, stream, d, random);
    release(d);
    if (!call.ok()) {
      std::printf("FAIL pid %d %s: status %d\n", getpid(), c.name.c_str(), call.status);
      ++failures;
    }
  }
  return failures;
}

// A program that resets its GPU (cudaDeviceReset) and goes on with a new
// handle: the context made next may come back under the old one's handle,
// without anything made in the old one.
int resetMode(const Options& o) {
  std::mt19937_64 random(o.seed != 0 ? o.seed : stmux::nowNs() + getpid());
  constexpr int kRounds = 3;
  int failures = 0;
  for (int round = 0; round < kRounds; ++round) {
    cublasHandle_t handle;
    cudaStream_t stream;
    if (!makeHandle(handle, stream)) return 3;
    failures += verifiedCalls(handle, stream, random);
    cublasDestroy_v2(handle);
    EXIT_ON_CUDA_ERROR(cudaStreamDestroy(stream));
    EXIT_ON_CUDA_ERROR(cudaDeviceReset());
  }
  std::printf("rounds %d failures %d\n", kRounds, failures);
  return failures == 0 ? 0 : 1;
}

// For a test that kills the daemon during a call: one call (beta 0), long
// enough on the GPU for the kill to find it there, checked; then C zeroed,
// and after --seconds checked still zero, so that a launch of the dead
// daemon that wrote C after the call came back is seen.
int outlive(const Options& o) {
  if (o.m * o.n > INT32_MAX) {
    std::fprintf(stderr, "stmux-cublas-client: outlive: --m x --n must be at most 2^31 - 1\n");
    return 2;
  }
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  const std::size_t a_bytes = sizeof(float) * o.m * o.k, b_bytes = sizeof(float) * o.k * o.n,
                    c_bytes = sizeof(float) * o.m * o.n;
  float *a = nullptr, *b = nullptr, *c = nullptr;
  EXIT_ON_CUDA_ERROR(cudaMalloc(&a, a_bytes));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&b, b_bytes));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&c, c_bytes));
  // Every byte 0x3f: every element the same float, near 0.75.
  EXIT_ON_CUDA_ERROR(cudaMemset(a, 0x3f, a_bytes));
  EXIT_ON_CUDA_ERROR(cudaMemset(b, 0x3f, b_bytes));
  EXIT_ON_CUDA_ERROR(cudaMemset(c, 0, c_bytes));
  EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
  float element = 0.0f;
  EXIT_ON_CUDA_ERROR(cudaMemcpy(&element, a, sizeof(float), cudaMemcpyDeviceToHost));
  std::printf("calling\n");
  std::fflush(stdout);
  const float one = 1.0f, zero = 0.0f;
  const cublasStatus_t status =
      cublasSgemm_v2(handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(o.m), static_cast<int>(o.n),
                     static_cast<int>(o.k), &one, a, static_cast<int>(o.m), b,
                     static_cast<int>(o.k), &zero, c, static_cast<int>(o.m));
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  float last = 0.0f;
  EXIT_ON_CUDA_ERROR(cudaMemcpy(&last, c + (o.m * o.n - 1), sizeof(float), cudaMemcpyDeviceToHost));
  const double expected = static_cast<double>(o.k) * element * element;
  // Loose: it tells a computed C from a zero or garbage one; FP32 sums of
  // k equal terms drift by up to k ulps.
  const bool right = std::fabs(last - expected) <= 1e-2 * expected;
  EXIT_ON_CUDA_ERROR(cudaMemsetAsync(c, 0, c_bytes, stream));
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  std::printf("status %d result_ok %d (%g, expected %g)\n", static_cast<int>(status), right ? 1 : 0,
              last, expected);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
  float sum = 0.0f;  // of |C|: not a call stmux serves
  if (cublasSasum_v2(handle, static_cast<int>(o.m * o.n), c, 1, &sum) != CUBLAS_STATUS_SUCCESS) {
    std::printf("FAIL cublasSasum\n");
    return 3;
  }
  std::printf("late_written %d (sum of |C| %g)\n", sum != 0.0f ? 1 : 0, sum);
  return status == CUBLAS_STATUS_SUCCESS && right && sum == 0.0f ? 0 : 1;
}

// Exit status of child `pid`, 128 + signal when killed.
int reap(pid_t pid) {
  int raw = 0;
  while (waitpid(pid, &raw, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
}

// What the fork tests need: children forked before this process touches
// CUDA (as a pre-fork server does) each make calls of their own; a child
// forked after it attached (as a data loader's workers are) leaves the
// parent's connection alone, and the parent's calls go on being served.
int forkMode(const Options& o) {
  std::mt19937_64 random(o.seed != 0 ? o.seed : stmux::nowNs() + getpid());
  // A call cuBLAS refuses at once (no handle) loads whatever sits in front of
  // cuBLAS without making a CUDA context.
  const float one = 1.0f;
  if (cublasSgemm_v2(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, nullptr, 4, nullptr, 4, &one,
                     nullptr, 4) != CUBLAS_STATUS_NOT_INITIALIZED) {
    std::printf("FAIL a call without a handle was not refused\n");
    return 1;
  }
  std::fflush(stdout);
  std::vector<pid_t> early;
  for (int i = 0; i < 2; ++i) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("stmux-cublas-client: fork");
      return 3;
    }
    if (pid == 0) {
      std::mt19937_64 child_random(random() + static_cast<std::uint64_t>(getpid()));
      cublasHandle_t handle;
      cudaStream_t stream;
      if (!makeHandle(handle, stream)) std::exit(3);
      const int failures = verifiedCalls(handle, stream, child_random);
      std::printf("early_child %d failures %d\n", getpid(), failures);
      cublasDestroy_v2(handle);
      std::exit(failures == 0 ? 0 : 1);
    }
    early.push_back(pid);
  }
  int failures = 0;
  for (pid_t pid : early) {
    if (const int status = reap(pid); status != 0) {
      std::printf("FAIL early child %d exited %d\n", pid, status);
      ++failures;
    }
  }

  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  failures += verifiedCalls(handle, stream, random);
  std::fflush(stdout);
  const pid_t late = fork();
  if (late < 0) {
    std::perror("stmux-cublas-client: fork");
    return 3;
  }
  if (late == 0) {
    // CUDA is not usable in a child forked after the parent made a context;
    // such children do CPU work and exit, running exit handlers (the shim's
    // among them).
    std::printf("late_child %d\n", getpid());
    std::exit(0);
  }
  if (const int status = reap(late); status != 0) {
    std::printf("FAIL late child %d exited %d\n", late, status);
    ++failures;
  }
  failures += verifiedCalls(handle, stream, random);
  std::printf("parent %d failures %d\n", getpid(), failures);
  cublasDestroy_v2(handle);
  return failures == 0 ? 0 : 1;
}

// ---- idle-free --------------------------------------------------------------

// Calls, then the context's scheduling flag as they left it (STMUX_SYNC's
// GPU test). The driver's cuCtxGetFlags, through the runtime: this program
// links no libcuda.
int syncFlags(const Options& options) {
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  constexpr int kN = 64;
  float *a = nullptr, *b = nullptr, *c = nullptr;
  EXIT_ON_CUDA_ERROR(cudaMalloc(&a, kN * kN * sizeof(float)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&b, kN * kN * sizeof(float)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&c, kN * kN * sizeof(float)));
  const float one = 1.0f, zero = 0.0f;
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::duration<double>(options.seconds_given ? options.seconds : 0.0);
  for (int i = 0; i < 200 || std::chrono::steady_clock::now() < end; ++i) {
    if (cublasSgemm_v2(handle, CUBLAS_OP_N, CUBLAS_OP_N, kN, kN, kN, &one, a, kN, b, kN, &zero, c,
                       kN) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "stmux-cublas-client: sgemm failed\n");
      return 1;
    }
    EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  }
  using GetFlags = CUresult (*)(unsigned int*);
  const auto get_flags = driverFunction<GetFlags>("cuCtxGetFlags", 7000);
  unsigned int flags = 0;
  if (get_flags(&flags) != CUDA_SUCCESS) {
    std::fprintf(stderr, "stmux-cublas-client: cuCtxGetFlags failed\n");
    return 3;
  }
  std::printf("sched 0x%x\n", flags & CU_CTX_SCHED_MASK);
  return 0;
}

// --threads threads, each with its own handle on one stream they share,
// each adding A_t B_t into one C (alpha and beta 1) --count times, as a
// program's threads may: the stream runs the calls one after the other, so C
// ends as C0 + count * sum_t A_t B_t. Small integers throughout, so every sum
// is exact in FP32 whatever the calls' order.
int accumulate(const Options& o) {
  constexpr int kN = 64;
  constexpr std::size_t kFloats = kN * kN;
  std::mt19937_64 random(o.seed != 0 ? o.seed : stmux::nowNs() + getpid());
  std::uniform_int_distribution<int> small(-1, 1);
  cublasHandle_t first_handle;
  cudaStream_t stream;
  if (!makeHandle(first_handle, stream)) return 3;
  std::vector<std::vector<float>> a(o.threads, std::vector<float>(kFloats)),
      b(o.threads, std::vector<float>(kFloats));
  std::vector<float> c(kFloats);
  for (int t = 0; t < o.threads; ++t) {
    for (std::size_t i = 0; i < kFloats; ++i) {
      a[t][i] = static_cast<float>(small(random));
      b[t][i] = static_cast<float>(small(random));
    }
  }
  for (float& x : c)
    x = static_cast<float>(small(random));
  std::vector<float*> a_device(o.threads), b_device(o.threads);
  float* c_device = nullptr;
  for (int t = 0; t < o.threads; ++t) {
    EXIT_ON_CUDA_ERROR(cudaMalloc(&a_device[t], kFloats * sizeof(float)));
    EXIT_ON_CUDA_ERROR(cudaMalloc(&b_device[t], kFloats * sizeof(float)));
    EXIT_ON_CUDA_ERROR(
        cudaMemcpy(a_device[t], a[t].data(), kFloats * sizeof(float), cudaMemcpyHostToDevice));
    EXIT_ON_CUDA_ERROR(
        cudaMemcpy(b_device[t], b[t].data(), kFloats * sizeof(float), cudaMemcpyHostToDevice));
  }
  EXIT_ON_CUDA_ERROR(cudaMalloc(&c_device, kFloats * sizeof(float)));
  EXIT_ON_CUDA_ERROR(
      cudaMemcpy(c_device, c.data(), kFloats * sizeof(float), cudaMemcpyHostToDevice));

  std::atomic<long> failed{0};
  auto work = [&](int t, cublasHandle_t handle) {
    const float one = 1.0f;
    for (int i = 0; i < o.count; ++i) {
      if (cublasSgemm_v2(handle, CUBLAS_OP_N, CUBLAS_OP_N, kN, kN, kN, &one, a_device[t], kN,
                         b_device[t], kN, &one, c_device, kN) != CUBLAS_STATUS_SUCCESS) {
        ++failed;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < o.threads; ++t) {
    threads.emplace_back([&, t] {
      cublasHandle_t handle;
      EXIT_ON_CUBLAS_ERROR(cublasCreate_v2(&handle));
      EXIT_ON_CUBLAS_ERROR(cublasSetStream_v2(handle, stream));
      work(t, handle);
      EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
      EXIT_ON_CUBLAS_ERROR(cublasDestroy_v2(handle));
    });
  }
  work(0, first_handle);
  for (std::thread& thread : threads)
    thread.join();
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  std::vector<float> result(kFloats);
  EXIT_ON_CUDA_ERROR(
      cudaMemcpy(result.data(), c_device, kFloats * sizeof(float), cudaMemcpyDeviceToHost));

  long wrong = 0;
  double worst = 0;
  for (int col = 0; col < kN; ++col) {
    for (int row = 0; row < kN; ++row) {
      double sum = 0;
      for (int t = 0; t < o.threads; ++t) {
        for (int l = 0; l < kN; ++l)
          sum += static_cast<double>(a[t][row + l * kN]) * b[t][l + col * kN];
      }
      const double expected = c[row + col * kN] + static_cast<double>(o.count) * sum;
      const double error = std::abs(result[row + col * kN] - expected);
      worst = std::max(worst, error);
      if (error != 0) ++wrong;
    }
  }
  std::printf("accumulate threads %d calls %ld failed %ld wrong %ld worst_error %g\n", o.threads,
              static_cast<long>(o.threads) * o.count, failed.load(), wrong, worst);
  for (int t = 0; t < o.threads; ++t) {
    EXIT_ON_CUDA_ERROR(cudaFree(a_device[t]));
    EXIT_ON_CUDA_ERROR(cudaFree(b_device[t]));
  }
  EXIT_ON_CUDA_ERROR(cudaFree(c_device));
  return wrong == 0 && failed == 0 ? 0 : 1;
}

// One served call, then idleness around freeing C: the test watches the
// daemon's mappings meanwhile. Each step is printed when it is done.
int idleFree(const Options& o) {
  std::mt19937_64 random(stmux::nowNs() + getpid());
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  const GemmCase c = stmux::check::caseMatrix(true)[0];
  Device d = allocate(c);
  if (const Checked call = callChecked(c, handle, stream, d, random); !call.ok()) {
    std::printf("FAIL call: status %d\n", call.status);
    return 1;
  }
  const auto idle = std::chrono::duration<double>(o.seconds);
  std::printf("called\n");
  std::fflush(stdout);
  std::this_thread::sleep_for(idle);
  EXIT_ON_CUDA_ERROR(cudaFree(d.c));
  std::printf("freed\n");
  std::fflush(stdout);
  std::this_thread::sleep_for(idle);
  EXIT_ON_CUDA_ERROR(cudaFree(d.a));
  EXIT_ON_CUDA_ERROR(cudaFree(d.b));
  cublasDestroy_v2(handle);
  return 0;
}

// ---- loop and ceiling (stmux-bench) -------------------------------------------

void fill(float* device, std::size_t count, std::mt19937_64& random) {
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::vector<float> host(count);
  for (float& x : host)
    x = value(random);
  EXIT_ON_CUDA_ERROR(
      cudaMemcpy(device, host.data(), count * sizeof(float), cudaMemcpyHostToDevice));
}

// Runs `step` under stmux-bench's start barrier (tools/barrier.h). A few
// untimed steps first: context, handle, kernels and (under the preload) the
// attach to stmuxd are all done before the tenant says it is ready.
template <class Step>
int timeLoop(const Options& o, int gemms_per_step, Step&& step) {
  constexpr int kWarmupSteps = 20;
  return stmux::tools::runBarrierLoop(o.files, gemms_per_step, kWarmupSteps,
                                      [&] { return step() == CUBLAS_STATUS_SUCCESS; });
}

int loop(Options o) {
  if (o.mixed) {
    const auto& shape = kSeedShapes[o.tenant % 3];
    o.m = shape[0], o.n = shape[1], o.k = shape[2];
  }
  std::mt19937_64 random(stmux::nowNs() + getpid());
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  float *a, *b, *c;
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&a), o.m * o.k * sizeof(float)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&b), o.k * o.n * sizeof(float)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&c), o.m * o.n * sizeof(float)));
  fill(a, o.m * o.k, random);
  fill(b, o.k * o.n, random);
  const float alpha = 1.0f, beta = 0.0f;
  return timeLoop(o, 1, [&] {
    const cublasStatus_t status = cublasSgemm_v2(
        handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(o.m), static_cast<int>(o.n),
        static_cast<int>(o.k), &alpha, a, static_cast<int>(o.m), b, static_cast<int>(o.k), &beta, c,
        static_cast<int>(o.m));
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    return cudaStreamSynchronize(stream) == cudaSuccess ? CUBLAS_STATUS_SUCCESS
                                                        : CUBLAS_STATUS_EXECUTION_FAILED;
  });
}

int ceiling(const Options& o) {
  std::mt19937_64 random(stmux::nowNs() + getpid());
  cublasHandle_t handle;
  cudaStream_t stream;
  if (!makeHandle(handle, stream)) return 3;
  // Requests grouped by shape: one group, or the three seed shapes.
  std::vector<std::array<int, 3>> shapes;
  if (o.mixed) {
    for (const auto& shape : kSeedShapes) {
      shapes.push_back(
          {static_cast<int>(shape[0]), static_cast<int>(shape[1]), static_cast<int>(shape[2])});
    }
  } else {
    shapes.push_back({static_cast<int>(o.m), static_cast<int>(o.n), static_cast<int>(o.k)});
  }
  std::vector<int> sizes(shapes.size(), 0);
  for (int i = 0; i < o.count; ++i)
    ++sizes[i % shapes.size()];
  std::vector<const float*> as, bs;
  std::vector<float*> cs;
  for (std::size_t g = 0; g < shapes.size(); ++g) {
    const auto [m, n, k] = shapes[g];
    for (int i = 0; i < sizes[g]; ++i) {
      float *a, *b, *c;
      EXIT_ON_CUDA_ERROR(
          cudaMalloc(reinterpret_cast<void**>(&a), std::size_t(m) * k * sizeof(float)));
      EXIT_ON_CUDA_ERROR(
          cudaMalloc(reinterpret_cast<void**>(&b), std::size_t(k) * n * sizeof(float)));
      EXIT_ON_CUDA_ERROR(
          cudaMalloc(reinterpret_cast<void**>(&c), std::size_t(m) * n * sizeof(float)));
      fill(a, std::size_t(m) * k, random);
      fill(b, std::size_t(k) * n, random);
      as.push_back(a), bs.push_back(b), cs.push_back(c);
    }
  }
  const float** da;
  const float** db;
  float** dc;
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&da), o.count * sizeof(float*)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&db), o.count * sizeof(float*)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&dc), o.count * sizeof(float*)));
  EXIT_ON_CUDA_ERROR(cudaMemcpy(da, as.data(), o.count * sizeof(float*), cudaMemcpyHostToDevice));
  EXIT_ON_CUDA_ERROR(cudaMemcpy(db, bs.data(), o.count * sizeof(float*), cudaMemcpyHostToDevice));
  EXIT_ON_CUDA_ERROR(cudaMemcpy(dc, cs.data(), o.count * sizeof(float*), cudaMemcpyHostToDevice));
  const int groups = static_cast<int>(shapes.size());
  std::vector<cublasOperation_t> ops(groups, CUBLAS_OP_N);
  std::vector<int> m(groups), n(groups), k(groups);
  std::vector<float> alpha(groups, 1.0f), beta(groups, 0.0f);
  for (int g = 0; g < groups; ++g)
    m[g] = shapes[g][0], n[g] = shapes[g][1], k[g] = shapes[g][2];
  return timeLoop(o, o.count, [&] {
    const cublasStatus_t status =
        groups == 1 ? cublasSgemmBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, m[0], n[0], k[0],
                                         &alpha[0], da, m[0], db, k[0], &beta[0], dc, m[0], o.count)
                    : cublasSgemmGroupedBatched(handle, ops.data(), ops.data(), m.data(), n.data(),
                                                k.data(), alpha.data(), da, m.data(), db, k.data(),
                                                beta.data(), dc, m.data(), groups, sizes.data());
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    return cudaStreamSynchronize(stream) == cudaSuccess ? CUBLAS_STATUS_SUCCESS
                                                        : CUBLAS_STATUS_EXECUTION_FAILED;
  });
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse(argc, argv, options)) {
    std::fprintf(stderr, "see stmux-cublas-client --help\n");
    return 2;
  }
  if (options.slice_us != 0 && !requestSlice(options.slice_us)) return 3;
  if (options.mode == "probe") return probe();
  // Its first children must be forked before this process initializes CUDA.
  if (options.mode == "fork") return forkMode(options);
  if (reportedNoDevice()) return 3;
  if (options.sync_flag != 0) EXIT_ON_CUDA_ERROR(cudaSetDeviceFlags(options.sync_flag));
  if (options.mode == "devices") {
    int devices = 0;
    EXIT_ON_CUDA_ERROR(cudaGetDeviceCount(&devices));
    for (int i = 0; i < devices; ++i) {
      cudaDeviceProp prop{};
      EXIT_ON_CUDA_ERROR(cudaGetDeviceProperties(&prop, i));
      std::printf("GPU %d: %s, %zu MiB\n", i, prop.name, prop.totalGlobalMem >> 20);
    }
    return 0;
  }
  if (options.mode == "check") return check(options);
  if (options.mode == "stress") return stress(options);
  if (options.mode == "loop") return loop(options);
  if (options.mode == "paths") return paths(options);
  if (options.mode == "idle-free") return idleFree(options);
  if (options.mode == "sync-flags") return syncFlags(options);
  if (options.mode == "accumulate") return accumulate(options);
  if (options.mode == "reset") return resetMode(options);
  if (options.mode == "outlive") return outlive(options);
  return ceiling(options);
}

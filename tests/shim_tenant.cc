// A tenant for shim_process_test: a program linked to the fake libcublas
// (tests/fakes/cublas.cc) with the fake libcuda (tests/fakes/cuda.cc) on
// its library path, run with libstmux.so preloaded (or, for `dlclose`,
// loading it itself). Each mode is one thing a real program may do to the
// shim; it prints what it saw as "key value" lines and exits 0 unless it
// could not do its part.
//
//   served N          N cublasSgemm_v2 calls (8x8x8)
//   alpha0            one cublasSgemm_v2 with alpha 0, beta 2, C all 1: prints C[0]
//   legacy            one legacy cublasSgemm, A and B all 1: prints C[0]
//   gemm-ex ALGO...   one cublasGemmEx (FP32 data and compute) per ALGO,
//                     a cublasGemmAlgo_t's value: prints each status
//   fork-attaching    a thread's first call attaches while the main thread
//                     forks: the child prints how many sockets it holds
//   fork-constructing a thread's first call makes the shim (loading the
//                     driver takes a while: FAKE_CUDA_LOAD_MS) while the
//                     main thread forks; the child makes a call: prints
//                     whether it came back within 5 s
//   cancel            a thread in a served call (the daemon is slow) is
//                     cancelled and joined
//   dlclose SHIM      loads SHIM, makes 3 calls through it, unloads it, and
//                     lives on 1.5 s (the shim's threads may still run)
//   mps-pipes S       starts the driver (cuInit), which asks where MPS's
//                     pipes are, makes one call and lives on S seconds:
//                     prints what the driver was told, and what the
//                     program itself is told when it asks
//   slice [batch]     reads its main thread's scheduling, makes one call and
//                     reads it again (SCHED_BATCH first, the program's own
//                     choice, with `batch`): prints "before"/"after" lines
//                     of "POLICY SLICE_NS" (sched_getattr) and the status
//   beside-capture N STREAM
//                     N cublasSgemm_v2 calls on STREAM (legacy, or other: a
//                     blocking stream of its own) while the fake driver has
//                     another thread's capture of a blocking stream open
//                     (FAKE_CUDA_BLOCKING_CAPTURE): prints the calls failed
//                     and the uses of the legacy stream that would have
//                     invalidated the capture
//   steady S T        T threads, each a call every 2 ms for S seconds, each
//                     with its own C: prints the share of the threads' time
//                     spent inside calls after the first second, and the
//                     longest such call (ms)
#include <cublas_api.h>
#include <dirent.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "stmux/sys.h"

extern "C" void cublasSgemm(char transa, char transb, int m, int n, int k, float alpha,
                            const float* A, int lda, const float* B, int ldb, float beta, float* C,
                            int ldc);

namespace {

constexpr int kDim = 8;

// "Device" memory for the fake driver: one 64 KiB allocation per pointer.
float* allocation(float value) {
  void* memory = nullptr;
  if (posix_memalign(&memory, 64 << 10, 64 << 10) != 0) std::abort();
  float* floats = static_cast<float*>(memory);
  for (int i = 0; i < kDim * kDim; ++i)
    floats[i] = value;
  return floats;
}

float* const A = allocation(1.0f);
float* const B = allocation(1.0f);
float* const C = allocation(1.0f);

cublasHandle_t handle() {
  static cublasHandle_t h = [] {
    cublasHandle_t created = nullptr;
    if (cublasCreate_v2(&created) != CUBLAS_STATUS_SUCCESS) std::abort();
    return created;
  }();
  return h;
}

cublasStatus_t sgemm(float alpha, float beta, float* c = C) {
  return cublasSgemm_v2(handle(), CUBLAS_OP_N, CUBLAS_OP_N, kDim, kDim, kDim, &alpha, A, kDim, B,
                        kDim, &beta, c, kDim);
}

// Of `calls` plain calls (C = A B), how many failed.
int failedOf(int calls) {
  int failed = 0;
  for (int i = 0; i < calls; ++i)
    failed += sgemm(1.0f, 0.0f) == CUBLAS_STATUS_SUCCESS ? 0 : 1;
  return failed;
}

int socketsHeld() {
  int sockets = 0;
  DIR* fds = opendir("/proc/self/fd");
  if (fds == nullptr) return -1;
  for (dirent* entry; (entry = readdir(fds)) != nullptr;) {
    char path[300], target[256];
    std::snprintf(path, sizeof(path), "/proc/self/fd/%s", entry->d_name);
    const ssize_t n = readlink(path, target, sizeof(target) - 1);
    if (n > 0) {
      target[n] = '\0';
      if (std::strncmp(target, "socket:", 7) == 0) ++sockets;
    }
  }
  closedir(fds);
  return sockets;
}

// The calling thread's policy and slice request (sched_getattr's
// sched_runtime: the slice, for SCHED_OTHER, from Linux 6.12).
std::string scheduling() {
  stmux::SchedAttr attr;
  if (stmux::schedGetattr(attr) != 0) return "error";
  return std::to_string(attr.policy) + " " + std::to_string(attr.runtime);
}

int usage() {
  std::fprintf(
      stderr,
      "usage: stmux-shim-tenant MODE [ARG]; modes: served N, alpha0, legacy, gemm-ex ALGO..., "
      "fork-attaching, fork-constructing, cancel, dlclose SHIM, mps-pipes S, slice [batch], "
      "beside-capture N legacy|other, steady S T\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string mode = argv[1];
  if (mode == "served" && argc == 3) {
    std::printf("failed %d\n", failedOf(std::atoi(argv[2])));
    return 0;
  }
  if (mode == "beside-capture" && argc == 4) {
    const std::string stream = argv[3];
    if (stream != "legacy" && stream != "other") return usage();
    void* cuda = dlopen("libcuda.so.1", RTLD_NOW);
    auto invalidations =
        cuda != nullptr ? reinterpret_cast<int (*)()>(dlsym(cuda, "fakeCudaCaptureInvalidations"))
                        : nullptr;
    if (invalidations == nullptr) return 1;
    // Any handle the fake driver takes for a stream that is not the legacy one.
    if (stream == "other" && cublasSetStream_v2(handle(), reinterpret_cast<cudaStream_t>(0x61)) !=
                                 CUBLAS_STATUS_SUCCESS) {
      return 1;
    }
    const int failed = failedOf(std::atoi(argv[2]));  // before the count is read
    std::printf("failed %d\ninvalidations %d\n", failed, invalidations());
    return 0;
  }
  if (mode == "mps-pipes" && argc == 3) {
    void* cuda = dlopen("libcuda.so.1", RTLD_NOW);
    auto init =
        cuda != nullptr ? reinterpret_cast<int (*)(unsigned)>(dlsym(cuda, "cuInit")) : nullptr;
    auto told = cuda != nullptr
                    ? reinterpret_cast<const char* (*)()>(dlsym(cuda, "fakeCudaMpsPipeDirectory"))
                    : nullptr;
    if (init == nullptr || told == nullptr || init(0) != 0) return 1;
    const char* own = std::getenv("CUDA_MPS_PIPE_DIRECTORY");
    std::printf("driver_pipes %s\nown_pipes %s\n", told(), own != nullptr ? own : "(unset)");
    std::printf("status %d\n", static_cast<int>(sgemm(1.0f, 0.0f)));
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(argv[2]) * 1000));
    return 0;
  }
  if (mode == "slice" && (argc == 2 || (argc == 3 && std::string(argv[2]) == "batch"))) {
    if (argc == 3) {
      const sched_param none{};
      if (sched_setscheduler(0, SCHED_BATCH, &none) != 0) return 1;
    }
    std::printf("before %s\n", scheduling().c_str());
    std::printf("status %d\n", static_cast<int>(sgemm(1.0f, 0.0f)));
    std::printf("after %s\n", scheduling().c_str());
    return 0;
  }
  if (mode == "alpha0") {
    std::printf("status %d\n", static_cast<int>(sgemm(0.0f, 2.0f)));
    std::printf("c0 %g\n", C[0]);
    return 0;
  }
  if (mode == "gemm-ex" && argc >= 3) {
    const float one = 1.0f, zero = 0.0f;
    for (int i = 2; i < argc; ++i) {
      const auto algo = static_cast<cublasGemmAlgo_t>(std::atoi(argv[i]));
      const cublasStatus_t status = cublasGemmEx(
          handle(), CUBLAS_OP_N, CUBLAS_OP_N, kDim, kDim, kDim, &one, A, CUDA_R_32F, kDim, B,
          CUDA_R_32F, kDim, &zero, C, CUDA_R_32F, kDim, CUBLAS_COMPUTE_32F, algo);
      std::printf("status_%s %d\n", argv[i], static_cast<int>(status));
    }
    return 0;
  }
  if (mode == "legacy") {
    C[0] = -1.0f;
    cublasSgemm('N', 'N', kDim, kDim, kDim, 1.0f, A, kDim, B, kDim, 0.0f, C, kDim);
    std::printf("c0 %g\n", C[0]);
    return 0;
  }
  if (mode == "fork-attaching") {
    // The first call attaches, to a daemon that accepts and never answers:
    // the attempt lasts until the shim's welcome timeout.
    std::thread first([] { (void)sgemm(1.0f, 0.0f); });
    usleep(200'000);
    const pid_t child = fork();
    if (child == 0) {
      std::printf("child_sockets %d\n", socketsHeld());
      std::fflush(stdout);
      _exit(0);
    }
    first.join();
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
  }
  if (mode == "fork-constructing") {
    std::thread first([] { (void)sgemm(1.0f, 0.0f); });
    usleep(100'000);
    float* const mine = allocation(0.0f);  // not the C the parent's thread writes
    const pid_t child = fork();
    if (child == 0) {
      (void)sgemm(1.0f, 0.0f, mine);
      _exit(0);
    }
    first.join();
    int status = 0;
    bool ended = false;
    for (int waited_ms = 0; waited_ms < 5000 && !ended; waited_ms += 10) {
      ended = waitpid(child, &status, WNOHANG) == child;
      if (!ended) usleep(10'000);
    }
    if (!ended) {
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
    }
    std::free(mine);
    std::printf("child_returned %d\n", ended && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return 0;
  }
  if (mode == "cancel") {
    (void)sgemm(1.0f, 0.0f);  // attached
    pthread_t caller;
    pthread_create(
        &caller, nullptr,
        [](void*) -> void* {
          while (true) {
            (void)sgemm(1.0f, 0.0f);
            pthread_testcancel();
          }
          return nullptr;
        },
        nullptr);
    usleep(300'000);  // inside a served call, the daemon taking its time
    pthread_cancel(caller);
    pthread_join(caller, nullptr);
    std::printf("joined 1\n");
    return 0;
  }
  if (mode == "steady" && argc == 4) {
    const double seconds = std::atof(argv[2]);
    const int threads = std::atoi(argv[3]);
    using Clock = std::chrono::steady_clock;
    const Clock::time_point start = Clock::now();
    const Clock::time_point settled = start + std::chrono::seconds(1);
    const Clock::time_point end =
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    std::vector<double> inside_s(threads), longest_s(threads);
    std::vector<std::thread> callers;
    for (int t = 0; t < threads; ++t) {
      callers.emplace_back([&, t] {
        float* const mine = allocation(0.0f);
        for (Clock::time_point now = Clock::now(); now < end; now = Clock::now()) {
          (void)sgemm(1.0f, 0.0f, mine);
          const Clock::time_point after = Clock::now();
          if (now >= settled) {
            const double took = std::chrono::duration<double>(after - now).count();
            inside_s[t] += took;
            longest_s[t] = std::max(longest_s[t], took);
          }
          usleep(2'000);
        }
        std::free(mine);
      });
    }
    for (std::thread& caller : callers)
      caller.join();
    double inside = 0, longest = 0;
    for (int t = 0; t < threads; ++t) {
      inside += inside_s[t];
      longest = std::max(longest, longest_s[t]);
    }
    const double span = std::chrono::duration<double>(end - settled).count();
    std::printf("inside_share %.3f\nlongest_ms %.1f\n", inside / (threads * span), longest * 1e3);
    return 0;
  }
  if (mode == "dlclose" && argc == 3) {
    void* shim = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
    if (shim == nullptr) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 1;
    }
    using Sgemm = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                     int, const float*, const float*, int, const float*, int,
                                     const float*, float*, int);
    const auto through = reinterpret_cast<Sgemm>(dlsym(shim, "cublasSgemm_v2"));
    if (through == nullptr) return 1;
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < 3; ++i) {
      (void)through(handle(), CUBLAS_OP_N, CUBLAS_OP_N, kDim, kDim, kDim, &one, A, kDim, B, kDim,
                    &zero, C, kDim);
    }
    dlclose(shim);
    usleep(1'500'000);
    std::printf("survived 1\n");
    return 0;
  }
  return usage();
}

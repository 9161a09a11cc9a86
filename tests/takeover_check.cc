// Checks the shim's own SGEMM kernel (shim/takeover_kernel.h) on a GPU:
// - every case of the SGEMM case matrix, and strided batches (stride 0 too),
//   against a float64 reference, writes outside C caught;
// - that it runs while another stream of its context waits on the GPU for a
//   word no one has written yet: the situation it exists for.
// Exit 0: all passed; 1: a failure (printed); 77: no CUDA device (skipped).
#include <cuda.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "shim/takeover_kernel.h"
#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

namespace {

using stmux::check::GemmCase;
using stmux::shim::Driver;
using stmux::shim::TakeoverParams;

int failures = 0;

#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    if (const auto status_ = (call); status_ != 0) {                                        \
      std::printf("FAIL %s:%d: %s returned %d\n", __FILE__, __LINE__, #call, int(status_)); \
      return false;                                                                         \
    }                                                                                       \
  } while (0)

TakeoverParams paramsFor(const GemmCase& c, float* a, float* b, float* c_ptr) {
  TakeoverParams p{};
  p.a = a + c.a_offset, p.b = b + c.b_offset, p.c = c_ptr + c.c_offset;
  p.m = c.m, p.n = c.n, p.k = c.k;
  p.lda = c.lda(), p.ldb = c.ldb(), p.ldc = c.ldc();
  p.count = 1;
  p.alpha = c.alpha, p.beta = c.beta;
  p.transa = c.transa, p.transb = c.transb;
  return p;
}

// `count` problems of case `c`, each with its own A, B and C at `stride`
// floats from the last, or sharing A (and B) where `broadcast` says so.
bool checkCase(const Driver& driver, CUfunction kernel, CUstream stream, const GemmCase& c,
               int count, bool broadcast, std::mt19937_64& random) {
  std::vector<stmux::check::Buffers> inputs;
  for (int i = 0; i < count; ++i)
    inputs.push_back(stmux::check::makeInputs(c, random));
  if (broadcast) {
    for (auto& in : inputs)
      in.a = inputs[0].a, in.b = inputs[0].b;
  }
  const std::size_t sa = broadcast ? 0 : c.aFloats(), sb = broadcast ? 0 : c.bFloats();
  const std::size_t sc = c.cFloats();
  float *a = nullptr, *b = nullptr, *c_dev = nullptr;
  CHECK_CUDA(cudaMalloc(&a, sizeof(float) * (broadcast ? c.aFloats() : sa * count)));
  CHECK_CUDA(cudaMalloc(&b, sizeof(float) * (broadcast ? c.bFloats() : sb * count)));
  CHECK_CUDA(cudaMalloc(&c_dev, sizeof(float) * sc * count));
  for (int i = 0; i < count; ++i) {
    CHECK_CUDA(cudaMemcpy(a + sa * i, inputs[i].a.data(), sizeof(float) * c.aFloats(),
                          cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(b + sb * i, inputs[i].b.data(), sizeof(float) * c.bFloats(),
                          cudaMemcpyHostToDevice));
    CHECK_CUDA(
        cudaMemcpy(c_dev + sc * i, inputs[i].c.data(), sizeof(float) * sc, cudaMemcpyHostToDevice));
  }
  TakeoverParams p = paramsFor(c, a, b, c_dev);
  p.count = count;
  p.stride_a = static_cast<int64_t>(sa), p.stride_b = static_cast<int64_t>(sb);
  p.stride_c = static_cast<int64_t>(sc);
  CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, p));
  CHECK_CUDA(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
  bool ok = true;
  for (int i = 0; i < count; ++i) {
    std::vector<float> result(sc);
    CHECK_CUDA(
        cudaMemcpy(result.data(), c_dev + sc * i, sizeof(float) * sc, cudaMemcpyDeviceToHost));
    const auto verdict = stmux::check::verify(c, inputs[i], result);
    if (!verdict.ok) {
      std::printf("FAIL %s (problem %d of %d%s): %s\n", c.name.c_str(), i, count,
                  broadcast ? ", A and B broadcast" : "", verdict.problem.c_str());
      ok = false;
      break;
    }
  }
  cudaFree(a), cudaFree(b), cudaFree(c_dev);
  return ok;
}

// One stream waits on the GPU for a host word; the kernel must still run to
// completion on another stream of the same context.
bool checkRunsWhileAStreamWaits(const Driver& driver, CUfunction kernel, CUstream stream) {
  unsigned* word = nullptr;
  CHECK_CUDA(cudaHostAlloc(&word, sizeof(unsigned), cudaHostAllocMapped));
  *word = 0;
  CUdeviceptr device_word = 0;
  CHECK_CUDA(driver.cuMemHostGetDevicePointer(&device_word, word, 0));
  CUstream waiting = nullptr;
  CHECK_CUDA(driver.cuStreamCreate(&waiting, CU_STREAM_NON_BLOCKING));
  CHECK_CUDA(driver.cuStreamWaitValue32(waiting, device_word, 1, CU_STREAM_WAIT_VALUE_GEQ));

  GemmCase c{"while-waiting", 0, 0, 64, 64, 64};
  std::mt19937_64 random(7);
  bool finished = false;
  std::thread watchdog([&] {
    // Lets the waiting stream go after 20 s whatever happens, so that a
    // failure is reported rather than hung on.
    for (int i = 0; i < 2000 && !__atomic_load_n(&finished, __ATOMIC_ACQUIRE); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    __atomic_store_n(word, 1u, __ATOMIC_RELEASE);
  });
  const auto start = std::chrono::steady_clock::now();
  const bool ok = checkCase(driver, kernel, stream, c, 1, false, random);
  const bool in_time = __atomic_load_n(word, __ATOMIC_ACQUIRE) == 0;
  __atomic_store_n(&finished, true, __ATOMIC_RELEASE);
  watchdog.join();
  CHECK_CUDA(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(waiting)));
  cudaFreeHost(word);
  if (!in_time) {
    std::printf("FAIL the kernel did not finish while another stream waited (%.1f s)\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return false;
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) {
    std::printf(
        "usage: %s\nChecks the shim's takeover SGEMM kernel on the GPU; exits 77 "
        "where there is none.\n",
        argv[0]);
    return std::string_view(argv[1]) == "--help" ? 0 : 2;
  }
  if (const cudaError_t error = cudaFree(nullptr); error != cudaSuccess) {
    std::printf("GPU test skipped: %s\n", noDeviceReason(error).c_str());
    return 77;
  }
  const Driver* driver = stmux::shim::cudaDriver();
  if (driver == nullptr) {
    std::printf("FAIL the CUDA driver's functions could not be found\n");
    return 1;
  }
  CUfunction kernel = nullptr;
  if (const CUresult result = stmux::shim::loadTakeoverKernel(*driver, &kernel);
      result != CUDA_SUCCESS) {
    std::printf("FAIL loading the kernel: CUDA error %d\n", static_cast<int>(result));
    return 1;
  }
  CUstream stream = nullptr;
  if (driver->cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS) {
    std::printf("FAIL cuStreamCreate\n");
    return 1;
  }

  std::mt19937_64 random(2026);
  int cases = 0;
  for (GemmCase c : stmux::check::caseMatrix()) {
    // The kernel computes in FP32 whatever the math mode (the call's own
    // TF32 would be within a looser bound): checked at FP32's.
    c.math = stmux::check::kDefaultMath;
    failures += !checkCase(*driver, kernel, stream, c, 1, false, random);
    ++cases;
    if (c.m > 0 && c.n > 0 && c.m * c.n * std::max<int64_t>(c.k, 1) < (1 << 22)) {
      failures += !checkCase(*driver, kernel, stream, c, 3, false, random);
      failures += !checkCase(*driver, kernel, stream, c, 2, true, random);
      cases += 2;
    }
  }
  // More problems than a grid's z holds, and more columns than its y.
  failures += !checkCase(*driver, kernel, stream, GemmCase{"batch-70000", 0, 0, 2, 2, 2}, 70000,
                         false, random);
  failures += !checkCase(*driver, kernel, stream, GemmCase{"wide-1x1100000x2", 0, 1, 1, 1100000, 2},
                         1, false, random);
  cases += 2;
  failures += !checkRunsWhileAStreamWaits(*driver, kernel, stream);
  ++cases;
  std::printf("%d of %d checks passed\n", cases - failures, cases);
  return failures == 0 ? 0 : 1;
}

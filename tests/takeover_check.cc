// Checks the shim's own SGEMM kernel (shim/takeover_kernel.h) on a GPU:
// - every case of the SGEMM case matrix, and strided batches (stride 0 too),
//   against a float64 reference, writes outside C caught;
// - epilogues (bias, ReLU, GELU), against the same call without one;
// - that it runs while another stream of its context waits on the GPU for a
//   word no one has written yet;
// - that, queued behind a stream-ordered call, it computes only when the
//   takeover word says the shim gave up on the daemon;
// - that the wait kernel holds its stream until a host word reaches its
//   value, compared cyclically;
// and prints what it costs behind a served call and how fast it computes.
// Exit 0: all passed; 1: a failure (printed); 77: no CUDA device (skipped).
#include <cuda.h>
#include <cuda_runtime.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "shim/takeover_kernel.h"
#include "stmux/epilogue.h"
#include "tools/cuda_exit.h"
#include "tools/gemm_check.h"

namespace {

using stmux::check::GemmCase;
using stmux::shim::Driver;
using stmux::shim::TakeoverKernel;
using stmux::shim::TakeoverParams;

int failures = 0;
constexpr std::chrono::seconds kWaitBound{20};

#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    if (const auto status_ = (call); status_ != 0) {                                        \
      std::printf("FAIL %s:%d: %s returned %d\n", __FILE__, __LINE__, #call, int(status_)); \
      return false;                                                                         \
    }                                                                                       \
  } while (0)

// A strided batch (stmux::check::StridedBatch) in GPU memory, ready to run.
struct Staged {
  Staged(const GemmCase& c, int count, bool broadcast, std::mt19937_64& random)
      : batch(stmux::check::makeStridedInputs(c, count, broadcast, random)) {}
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  ~Staged() { cudaFree(a), cudaFree(b), cudaFree(c); }

  stmux::check::StridedBatch batch;
  float *a = nullptr, *b = nullptr, *c = nullptr;
  TakeoverParams params{};
};

bool stage(Staged& s) {
  const stmux::check::StridedBatch& batch = s.batch;
  const GemmCase& c = batch.c;
  for (auto [buffer, host] :
       {std::pair{&s.a, &batch.a}, std::pair{&s.b, &batch.b}, std::pair{&s.c, &batch.c_all}}) {
    CHECK_CUDA(cudaMalloc(buffer, sizeof(float) * host->size()));
    CHECK_CUDA(
        cudaMemcpy(*buffer, host->data(), sizeof(float) * host->size(), cudaMemcpyHostToDevice));
  }
  TakeoverParams& p = s.params;
  p.a = s.a + c.a_offset, p.b = s.b + c.b_offset, p.c = s.c + c.c_offset;
  p.m = c.m, p.n = c.n, p.k = c.k;
  p.lda = c.lda(), p.ldb = c.ldb(), p.ldc = c.ldc();
  p.count = batch.count;
  p.stride_a = batch.stride_a, p.stride_b = batch.stride_b, p.stride_c = batch.stride_c;
  p.alpha = c.alpha, p.beta = c.beta;
  p.transa = c.transa, p.transb = c.transb;
  return true;
}

// Checks each problem's C once the kernel is done.
bool verify(const Staged& s) {
  std::vector<float> result(s.batch.c_all.size());
  CHECK_CUDA(cudaMemcpy(result.data(), s.c, sizeof(float) * result.size(), cudaMemcpyDeviceToHost));
  const auto verdict = stmux::check::verifyStrided(s.batch, result);
  if (!verdict.ok) {
    std::printf("FAIL %s: %s\n", s.batch.c.name.c_str(), verdict.problem.c_str());
    return false;
  }
  return true;
}

bool checkCase(const Driver& driver, const TakeoverKernel& kernel, CUstream stream,
               const GemmCase& c, int count, bool broadcast, std::mt19937_64& random) {
  Staged s(c, count, broadcast, random);
  if (!stage(s)) return false;
  CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, s.params));
  CHECK_CUDA(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
  return verify(s);
}

// Each epilogue, with beta 0 and not, on a strided batch: the same inputs
// run without the epilogue (checked against the reference), then with it,
// where every element must be the epilogue of the first result with its
// row's bias, and nothing outside C written.
bool checkEpilogues(const Driver& driver, const TakeoverKernel& kernel, CUstream stream) {
  using namespace stmux;
  std::mt19937_64 random(13);
  bool ok = true;
  for (const std::uint32_t epilogue :
       {kEpilogueBias, kEpilogueRelu, kEpilogueGelu, kEpilogueRelu | kEpilogueBias,
        kEpilogueGelu | kEpilogueBias}) {
    for (const float beta : {0.0f, 0.5f}) {
      GemmCase c{"epilogue", 1, 0, 37, 19, 23};
      c.beta = beta;
      c.ldc_pad = 3;
      const std::uint64_t seed = random();
      std::mt19937_64 plain_random(seed), epilogue_random(seed);
      Staged plain(c, 2, false, plain_random), with(c, 2, false, epilogue_random);
      if (!stage(plain) || !stage(with)) return false;
      std::vector<float> bias(c.m);
      std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
      for (float& b : bias)
        b = uniform(random);
      float* device_bias = nullptr;
      CHECK_CUDA(cudaMalloc(&device_bias, sizeof(float) * bias.size()));
      CHECK_CUDA(cudaMemcpy(device_bias, bias.data(), sizeof(float) * bias.size(),
                            cudaMemcpyHostToDevice));
      with.params.epilogue = epilogue;
      with.params.bias = device_bias;
      CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, plain.params));
      CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, with.params));
      CHECK_CUDA(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
      cudaFree(device_bias);
      ok &= verify(plain);
      std::vector<float> want(plain.batch.c_all.size()), got(want.size());
      CHECK_CUDA(
          cudaMemcpy(want.data(), plain.c, sizeof(float) * want.size(), cudaMemcpyDeviceToHost));
      CHECK_CUDA(
          cudaMemcpy(got.data(), with.c, sizeof(float) * got.size(), cudaMemcpyDeviceToHost));
      // Inside C: the epilogue applied; anywhere else: as it was.
      std::vector<bool> in_c(want.size(), false);
      for (std::int64_t p = 0; p < 2; ++p) {
        for (std::int64_t col = 0; col < c.n; ++col) {
          for (std::int64_t row = 0; row < c.m; ++row) {
            const std::size_t i = c.c_offset + p * plain.batch.stride_c + col * c.ldc() + row;
            in_c[i] = true;
            want[i] = applyEpilogue(epilogue, want[i], bias[row]);
          }
        }
      }
      for (std::size_t i = 0; i < want.size(); ++i) {
        const float bound = in_c[i] ? 1e-5f * (std::fabs(want[i]) + 1.0f) : 0.0f;
        if (!(std::fabs(got[i] - want[i]) <= bound)) {
          std::printf("FAIL epilogue %u, beta %g: element %zu is %g, want %g%s\n", epilogue,
                      static_cast<double>(beta), i, static_cast<double>(got[i]),
                      static_cast<double>(want[i]), in_c[i] ? "" : " (outside C)");
          ok = false;
          break;
        }
      }
    }
  }
  return ok;
}

// The wait kernel (STMUX_STREAM_WAIT=kernel) holds its stream while the host
// word is short of `seq`, compared cyclically (`below`: a value short of it,
// across the wrap when `start` is near 2^32), and lets it go once the host
// stores `seq`; prints how long that took to be seen.
bool checkWaitKernel(const Driver& driver, const TakeoverKernel& kernel, CUstream stream,
                     unsigned start, unsigned below, unsigned seq) {
  unsigned* words = nullptr;  // [0]: the word waited for; [1]: set by the stream after the wait
  CHECK_CUDA(cudaHostAlloc(&words, 2 * sizeof(unsigned), cudaHostAllocMapped));
  words[0] = start, words[1] = 0;
  CUdeviceptr device_words = 0;
  CHECK_CUDA(driver.cuMemHostGetDevicePointer(&device_words, words, 0));
  CHECK_CUDA(stmux::shim::launchWaitKernel(driver, kernel, stream, device_words, seq));
  CHECK_CUDA(driver.cuStreamWriteValue32(stream, device_words + sizeof(unsigned), 1,
                                         CU_STREAM_WRITE_VALUE_DEFAULT));
  bool ok = true;
  for (const unsigned value : {start, below}) {
    __atomic_store_n(&words[0], value, __ATOMIC_RELEASE);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (driver.cuStreamQuery(stream) != CUDA_ERROR_NOT_READY ||
        __atomic_load_n(&words[1], __ATOMIC_ACQUIRE) != 0) {
      std::printf("FAIL the wait kernel for %u let its stream go at %u\n", seq, value);
      ok = false;
    }
  }
  const auto released = std::chrono::steady_clock::now();
  __atomic_store_n(&words[0], seq, __ATOMIC_RELEASE);
  while (__atomic_load_n(&words[1], __ATOMIC_ACQUIRE) == 0 &&
         std::chrono::steady_clock::now() - released < kWaitBound) {
  }
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - released)
          .count();
  if (__atomic_load_n(&words[1], __ATOMIC_ACQUIRE) == 0) {
    std::printf("FAIL the wait kernel for %u kept its stream after the word reached it\n", seq);
    __atomic_store_n(&words[0], seq + (1u << 30), __ATOMIC_RELEASE);  // let it go, whatever broke
    ok = false;
  } else {
    std::printf("wait kernel: waited from %u for %u, let go %.1f us after the host's store\n",
                start, seq, us);
  }
  CHECK_CUDA(driver.cuStreamSynchronize(stream));
  cudaFreeHost(words);
  return ok;
}

// One stream waits on the GPU for a host word; the kernel must still run to
// completion on another stream of the same context. Nothing that waits for
// the whole device (cudaMalloc, cudaFree) may happen while the stream waits.
bool checkRunsWhileAStreamWaits(const Driver& driver, const TakeoverKernel& kernel,
                                CUstream stream) {
  std::mt19937_64 random(7);
  Staged s(GemmCase{"while-waiting", 0, 0, 64, 64, 64}, 1, false, random);
  if (!stage(s)) return false;
  unsigned* word = nullptr;
  CHECK_CUDA(cudaHostAlloc(&word, sizeof(unsigned), cudaHostAllocMapped));
  *word = 0;
  CUdeviceptr device_word = 0;
  CHECK_CUDA(driver.cuMemHostGetDevicePointer(&device_word, word, 0));
  CUstream waiting = nullptr;
  CHECK_CUDA(driver.cuStreamCreate(&waiting, CU_STREAM_NON_BLOCKING));
  CHECK_CUDA(driver.cuStreamWaitValue32(waiting, device_word, 1, CU_STREAM_WAIT_VALUE_GEQ));

  const auto start = std::chrono::steady_clock::now();
  CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, s.params));
  // Polled, with a bound, so that a failure is reported rather than hung on.
  CUresult done = CUDA_ERROR_NOT_READY;
  while (done == CUDA_ERROR_NOT_READY && std::chrono::steady_clock::now() - start < kWaitBound) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    done = driver.cuStreamQuery(stream);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  __atomic_store_n(word, 1u, __ATOMIC_RELEASE);
  CHECK_CUDA(driver.cuStreamSynchronize(waiting));
  CHECK_CUDA(driver.cuStreamSynchronize(stream));
  cudaFreeHost(word);
  if (done != CUDA_SUCCESS) {
    std::printf("FAIL the kernel did not finish while another stream waited (%.1f s, CUDA %d)\n",
                seconds, static_cast<int>(done));
    return false;
  }
  return verify(s);
}

// Queued behind a call, the kernel computes only once the shim has given up
// on the daemon: the takeover word at the call's number or past it
// (cyclically); below it, C is left exactly as it was. Each block reading the
// word, and through a gate, where one block reads it for all: every launch
// at the same entry, each under its own name.
bool checkStandby(const Driver& driver, const TakeoverKernel& kernel, CUstream stream) {
  std::uint32_t* word = nullptr;
  CHECK_CUDA(cudaHostAlloc(&word, sizeof(std::uint32_t), cudaHostAllocMapped));
  CUdeviceptr device_word = 0;
  CHECK_CUDA(driver.cuMemHostGetDevicePointer(&device_word, word, 0));
  std::mt19937_64 random(11);
  bool ok = true;
  struct Case {
    std::uint32_t word, seq;
    bool computes;
  } cases[] = {{0, 1, false},
               {6, 7, false},
               {7, 7, true},
               {9, 7, true},
               {3, 0xfffffff0u, true} /* past it, wrapped */,
               {0xfffffff0u, 3, false} /* below it, wrapped */};
  std::uint32_t caller = 0;
  for (const bool gated : {false, true}) {
    for (const Case& c : cases) {
      // 12 tiles a problem: blocks that wait at the gate for the one reading.
      Staged s(GemmCase{"standby", 1, 0, 200, 150, 29}, 2, false, random);
      if (!stage(s)) return false;
      *word = c.word;
      s.params.takeover = reinterpret_cast<const std::uint32_t*>(device_word);
      s.params.seq = c.seq;
      s.params.caller = gated ? ++caller : 0;
      s.params.gate = 5;
      CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, s.params));
      CHECK_CUDA(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
      if (c.computes) {
        ok &= verify(s);
        continue;
      }
      std::vector<float> after(s.batch.c_all.size());
      CHECK_CUDA(
          cudaMemcpy(after.data(), s.c, sizeof(float) * after.size(), cudaMemcpyDeviceToHost));
      if (std::memcmp(after.data(), s.batch.c_all.data(), sizeof(float) * after.size()) != 0) {
        std::printf("FAIL standby%s: takeover word %u, call %u: C was written\n",
                    gated ? " (gated)" : "", c.word, c.seq);
        ok = false;
      }
    }
  }
  // A call larger than the standby grid (a wave of 7 blocks here, the GPU's
  // own too): its loops cover every tile and problem.
  TakeoverKernel narrow = kernel;
  narrow.wave = 7;
  for (const TakeoverKernel* k : std::array<const TakeoverKernel*, 2>{&narrow, &kernel}) {
    Staged large(GemmCase{"standby-large", 1, 1, 300, 260, 70}, 5, false, random);
    if (!stage(large)) return false;
    *word = 12;
    large.params.takeover = reinterpret_cast<const std::uint32_t*>(device_word);
    large.params.seq = 12;
    large.params.caller = ++caller;
    large.params.gate = 5;
    CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, *k, stream, large.params));
    CHECK_CUDA(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
    ok &= verify(large);
  }
  cudaFreeHost(word);
  return ok;
}

// Prints (not checked: tests assert no speed) what the kernel costs behind a
// call the daemon served, a launch whose blocks return at once, with the
// GPU's wave as its grid and with 64 blocks; and how fast it computes a
// large call it takes over.
bool timeIt(const Driver& driver, const TakeoverKernel& kernel, CUstream stream) {
  std::uint32_t* word = nullptr;
  CHECK_CUDA(cudaHostAlloc(&word, sizeof(std::uint32_t), cudaHostAllocMapped));
  CUdeviceptr device_word = 0;
  CHECK_CUDA(driver.cuMemHostGetDevicePointer(&device_word, word, 0));
  cudaEvent_t start = nullptr, end = nullptr;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&end));
  const auto cs = reinterpret_cast<cudaStream_t>(stream);
  const auto elapsed_ms = [&] {
    float ms = -1;
    cudaEventSynchronize(end);
    cudaEventElapsedTime(&ms, start, end);
    return ms;
  };
  constexpr std::int64_t kSide = 8192;
  float *a = nullptr, *b = nullptr, *c = nullptr;
  for (float** buffer : {&a, &b, &c}) {
    CHECK_CUDA(cudaMalloc(buffer, sizeof(float) * kSide * kSide));
    CHECK_CUDA(cudaMemset(*buffer, 0, sizeof(float) * kSide * kSide));
  }
  TakeoverParams p{};
  p.a = a, p.b = b, p.c = c;
  p.m = p.n = p.k = p.lda = p.ldb = p.ldc = kSide;
  p.count = 1;
  p.alpha = 1.0f;
  p.takeover = reinterpret_cast<const std::uint32_t*>(device_word);
  p.seq = 2;
  *word = 1;  // served: every block returns at once
  TakeoverKernel sixty_four = kernel;
  sixty_four.wave = 64;
  constexpr int kLaunches = 2000;
  for (const TakeoverKernel* k : std::array<const TakeoverKernel*, 2>{&kernel, &sixty_four}) {
    for (const bool gated : {true, false}) {
      // Each launch its own name (TakeoverParams::caller), the first not timed.
      p.caller = gated ? 1 : 0;
      CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, *k, stream, p));
      CHECK_CUDA(cudaEventRecord(start, cs));
      for (int i = 0; i < kLaunches; ++i) {
        ++p.seq;
        CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, *k, stream, p));
      }
      ++p.seq;
      CHECK_CUDA(cudaEventRecord(end, cs));
      std::printf("timing: a served call's kernel, %u blocks, %s: %.2f us on the GPU\n", k->wave,
                  gated ? "one block reading the word" : "each block reading it",
                  1000.0 * elapsed_ms() / kLaunches);
    }
  }
  p.caller = 1;
  *word = p.seq;  // taken over: computed, in one wave
  CHECK_CUDA(cudaEventRecord(start, cs));
  CHECK_CUDA(stmux::shim::launchTakeoverKernel(driver, kernel, stream, p));
  CHECK_CUDA(cudaEventRecord(end, cs));
  const double ms = elapsed_ms();
  std::printf("timing: a %lldx%lldx%lld call taken over: %.1f ms, %.0f GFLOP/s\n",
              static_cast<long long>(kSide), static_cast<long long>(kSide),
              static_cast<long long>(kSide), ms, 2.0 * kSide * kSide * kSide / ms / 1e6);
  CHECK_CUDA(cudaGetLastError());
  cudaFree(a), cudaFree(b), cudaFree(c);
  cudaEventDestroy(start), cudaEventDestroy(end);
  cudaFreeHost(word);
  return true;
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
    int devices = 0;
    if (stmux::noDevice(cudaGetDeviceCount(&devices), devices)) {
      std::printf("GPU test skipped: no CUDA device: %s\n", stmux::noDeviceReason(error).c_str());
      return 77;
    }
    std::printf("FAIL the CUDA device cannot be used: %s\n", cudaGetErrorString(error));
    return 1;
  }
  const Driver* driver = stmux::shim::cudaDriver();
  if (driver == nullptr) {
    std::printf("FAIL the CUDA driver's functions could not be found\n");
    return 1;
  }
  TakeoverKernel kernel;
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
  // k == 0: no product, whatever alpha is (BLAS; it was alpha * 0, NaN here).
  for (const float alpha :
       {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), -2.0f}) {
    GemmCase k0{"k-0-alpha", 0, 0, 12, 9, 0};
    k0.alpha = alpha;
    failures += !checkCase(*driver, kernel, stream, k0, 1, false, random);
    ++cases;
  }
  cases += 2;
  failures += !checkEpilogues(*driver, kernel, stream);
  failures += !checkRunsWhileAStreamWaits(*driver, kernel, stream);
  failures += !checkStandby(*driver, kernel, stream);
  failures += !checkWaitKernel(*driver, kernel, stream, 5, 6, 7);
  failures += !checkWaitKernel(*driver, kernel, stream, 0xfffffffeu, 0, 1);  // across the wrap
  cases += 5;
  failures += !timeIt(*driver, kernel, stream);
  ++cases;
  std::printf("%d of %d checks passed\n", cases - failures, cases);
  return failures == 0 ? 0 : 1;
}

// stmux-join-probe: whether CUDA alone keeps the order that stmux's two wrong
// results broke (docs/RELIABILITY.md, "The wrong result in the soak"), with
// neither stmux nor the differential program's many kinds of call.
//
// Each of --threads threads loops: it copies A (a word of its own for this
// iteration) and C (all bits set) from pinned memory on a non-blocking stream
// of its own, records an event there, makes the legacy default stream (which
// every thread shares) wait for the event, then on the legacy stream copies
// A into C (a copy, or cuBLAS's scopy kernel: --compute) and C back into
// pinned memory, and synchronizes the legacy stream. C read back is A's word
// everywhere, or the order was broken; a wrong C is read again once the
// device is idle, which tells a read-back that came early (C now right) from
// a copy into C that landed after the compute (C as the write left it).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <getopt.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tools/args.h"
#include "tools/cuda_exit.h"

namespace stmux::tools {
namespace {

enum class Compute { kCopy, kKernel };
enum class Alloc { kFixed, kPerIteration };

struct Options {
  int threads = 16;
  long iterations = 20'000;  // per thread
  unsigned words = 64;
  Compute compute = Compute::kKernel;
  Alloc alloc = Alloc::kPerIteration;
};

struct Totals {
  std::atomic<long> iterations{0}, wrong{0}, early{0}, as_written{0}, other{0};
};

// A word no other (thread, iteration) writes, never all bits set, and never
// a NaN's bit pattern (cublasScopy copies floats).
std::uint32_t wordOf(int thread, long iteration) {
  return (static_cast<std::uint32_t>(thread + 1) << 24) |
         (static_cast<std::uint32_t>(iteration) & 0xffffff);
}

void runThread(const Options& o, int index, Totals& totals) {
  const std::size_t bytes = o.words * sizeof(std::uint32_t);
  cudaStream_t side = nullptr;
  cudaEvent_t joined = nullptr;
  cublasHandle_t handle = nullptr;
  EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  EXIT_ON_CUDA_ERROR(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming));
  EXIT_ON_CUBLAS_ERROR(cublasCreate_v2(&handle));
  EXIT_ON_CUBLAS_ERROR(cublasSetStream_v2(handle, cudaStreamLegacy));
  std::uint32_t *source_a = nullptr, *source_c = nullptr, *readback = nullptr;
  for (std::uint32_t** p : {&source_a, &source_c, &readback}) {
    EXIT_ON_CUDA_ERROR(cudaMallocHost(reinterpret_cast<void**>(p), bytes));
  }
  std::memset(source_c, 0xff, bytes);
  std::uint32_t *a = nullptr, *c = nullptr;
  const auto allocate = [&] {
    EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&a), bytes));
    EXIT_ON_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&c), bytes));
  };
  const auto release = [&] {
    EXIT_ON_CUDA_ERROR(cudaFree(a));
    EXIT_ON_CUDA_ERROR(cudaFree(c));
  };
  if (o.alloc == Alloc::kFixed) allocate();
  std::vector<std::uint32_t> again(o.words);
  for (long i = 0; i < o.iterations; ++i) {
    if (o.alloc == Alloc::kPerIteration) allocate();
    const std::uint32_t word = wordOf(index, i);
    for (unsigned w = 0; w < o.words; ++w)
      source_a[w] = word;
    EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(a, source_a, bytes, cudaMemcpyHostToDevice, side));
    EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(c, source_c, bytes, cudaMemcpyHostToDevice, side));
    EXIT_ON_CUDA_ERROR(cudaEventRecord(joined, side));
    EXIT_ON_CUDA_ERROR(cudaStreamWaitEvent(cudaStreamLegacy, joined, 0));
    if (o.compute == Compute::kCopy) {
      EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(c, a, bytes, cudaMemcpyDeviceToDevice, cudaStreamLegacy));
    } else {
      EXIT_ON_CUBLAS_ERROR(cublasScopy_v2(handle, static_cast<int>(o.words),
                                          reinterpret_cast<float*>(a), 1,
                                          reinterpret_cast<float*>(c), 1));
    }
    EXIT_ON_CUDA_ERROR(
        cudaMemcpyAsync(readback, c, bytes, cudaMemcpyDeviceToHost, cudaStreamLegacy));
    EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(cudaStreamLegacy));
    unsigned wrong = 0;
    for (unsigned w = 0; w < o.words; ++w)
      wrong += readback[w] != word ? 1 : 0;
    if (wrong > 0) {
      EXIT_ON_CUDA_ERROR(cudaDeviceSynchronize());
      EXIT_ON_CUDA_ERROR(cudaMemcpy(again.data(), c, bytes, cudaMemcpyDeviceToHost));
      bool right = true, as_written = true;
      for (unsigned w = 0; w < o.words; ++w) {
        right &= again[w] == word;
        as_written &= again[w] == 0xffffffffu;
      }
      (right ? totals.early : as_written ? totals.as_written : totals.other)++;
      totals.wrong++;
      std::printf(
          "WRONG thread=%d iteration=%ld: %u of %u words read back wrong (word 0 %08x, "
          "expected %08x); once the device was idle, C was %s\n",
          index, i, wrong, o.words, readback[0], word,
          right        ? "right (read back too early)"
          : as_written ? "as the write left it (the compute lost, or the write late)"
                       : "still wrong, not as the write left it");
      std::fflush(stdout);
    }
    if (o.alloc == Alloc::kPerIteration) release();
    totals.iterations++;
  }
  if (o.alloc == Alloc::kFixed) release();
  for (std::uint32_t* p : {source_a, source_c, readback})
    EXIT_ON_CUDA_ERROR(cudaFreeHost(p));
  EXIT_ON_CUBLAS_ERROR(cublasDestroy_v2(handle));
  EXIT_ON_CUDA_ERROR(cudaEventDestroy(joined));
  EXIT_ON_CUDA_ERROR(cudaStreamDestroy(side));
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: stmux-join-probe [options]\n"
               "Threads share the legacy default stream: each copies A and C on a non-blocking\n"
               "stream of its own, joins it to the legacy stream by an event, then computes\n"
               "C = A and reads C back on the legacy stream. C read back must be A.\n\n"
               "  --threads T       threads, 1..64 (default 16)\n"
               "  --iterations N    per thread, 1..100000000 (default 20000)\n"
               "  --words W         32-bit words in A and C, 1..1048576 (default 64)\n"
               "  --compute KIND    copy (cudaMemcpyAsync) or kernel (cublasScopy; default)\n"
               "  --alloc KIND      fixed (once per thread) or per-iteration (cudaMalloc and\n"
               "                    cudaFree each iteration; default)\n"
               "  --help            this text\n"
               "Output: a WRONG line for each wrong read-back, then 'iterations N wrong W\n"
               "early E as_written S other O'.\n"
               "Exit status: 0 every read-back right, 1 one wrong, 2 bad usage, 3 CUDA error.\n");
}

std::optional<Options> parseArgs(int argc, char** argv) {
  static const option kLong[] = {{"threads", required_argument, nullptr, 't'},
                                 {"iterations", required_argument, nullptr, 'i'},
                                 {"words", required_argument, nullptr, 'w'},
                                 {"compute", required_argument, nullptr, 'c'},
                                 {"alloc", required_argument, nullptr, 'a'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  Options o;
  const auto refuse = [](const char* flag, const char* value, const char* accepted) {
    std::fprintf(stderr, "stmux-join-probe: %s '%s': accepted: %s\n", flag, value, accepted);
    return std::nullopt;
  };
  for (int c; (c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1;) {
    const std::string_view value = optarg != nullptr ? optarg : "";
    switch (c) {
      case 't':
        if (const auto n = wholeIn<int>(value, 1, 64)) {
          o.threads = *n;
        } else {
          return refuse("--threads", optarg, "an integer from 1 to 64");
        }
        break;
      case 'i':
        if (const auto n = wholeIn<long>(value, 1, 100'000'000)) {
          o.iterations = *n;
        } else {
          return refuse("--iterations", optarg, "an integer from 1 to 100000000");
        }
        break;
      case 'w':
        if (const auto n = wholeIn<unsigned>(value, 1, 1u << 20)) {
          o.words = *n;
        } else {
          return refuse("--words", optarg, "an integer from 1 to 1048576");
        }
        break;
      case 'c':
        if (value == "copy" || value == "kernel") {
          o.compute = value == "copy" ? Compute::kCopy : Compute::kKernel;
        } else {
          return refuse("--compute", optarg, "copy or kernel");
        }
        break;
      case 'a':
        if (value == "fixed" || value == "per-iteration") {
          o.alloc = value == "fixed" ? Alloc::kFixed : Alloc::kPerIteration;
        } else {
          return refuse("--alloc", optarg, "fixed or per-iteration");
        }
        break;
      case 'h':
        usage(stdout);
        std::exit(0);
      default:
        usage(stderr);
        return std::nullopt;
    }
  }
  if (optind < argc) {
    std::fprintf(stderr, "stmux-join-probe: unexpected argument '%s'\n", argv[optind]);
    return std::nullopt;
  }
  return o;
}

}  // namespace
}  // namespace stmux::tools

int main(int argc, char** argv) {
  using namespace stmux::tools;
  const std::optional<Options> options = parseArgs(argc, argv);
  if (!options) return 2;
  if (reportedNoDevice()) return 3;
  EXIT_ON_CUDA_ERROR(cudaFree(nullptr));  // the context, before the threads
  Totals totals;
  std::vector<std::thread> threads;
  for (int t = 0; t < options->threads; ++t)
    threads.emplace_back(runThread, std::cref(*options), t, std::ref(totals));
  // Progress every 10 s on stderr, for long runs.
  const long all = options->iterations * options->threads;
  for (auto next = std::chrono::steady_clock::now() + std::chrono::seconds(10);
       totals.iterations.load() < all;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (std::chrono::steady_clock::now() < next) continue;
    next += std::chrono::seconds(10);
    std::fprintf(stderr, "stmux-join-probe: %ld of %ld iterations, %ld wrong\n",
                 totals.iterations.load(), all, totals.wrong.load());
  }
  for (std::thread& t : threads)
    t.join();
  std::printf("iterations %ld wrong %ld early %ld as_written %ld other %ld\n",
              totals.iterations.load(), totals.wrong.load(), totals.early.load(),
              totals.as_written.load(), totals.other.load());
  return totals.wrong.load() == 0 ? 0 : 1;
}

// stmux-launch-bench: how should a batch that mixes shapes launch?
//
// For mixes of K distinct shapes (G requests each), times on the GPU
//   batched: K cublasSgemmBatched launches, one per shape, back to back
//   grouped: one cublasSgemmGroupedBatched launch of K groups
// with CUDA events around each, pointer arrays already on the device (as the
// executor has them), after a warm-up, as the median of many repetitions. The
// executor's STMUX_LAUNCH=auto rule comes from this table
// (docs/BENCHMARKS.md).
//
// Then what a batch costs the executor's thread, the host side of its round:
// the pointer arrays written to pinned memory, copied to the device, the
// cuBLAS calls and the batch's event, with two batches in flight as the
// executor keeps them; against the copy and the calls captured once per
// buffer as a CUDA graph and replayed; for one shape (one cublasSgemmBatched)
// and for mixes (one per shape, or one grouped call).
// Medians of each step's host time, the batches per second each sustains,
// and whether the replays wrote what the launches did.
//
// With --drift, instead: stmux-bench's ceiling loop (one cublasSgemmBatched
// of R, then a stream sync, step after step) for a while, per half second:
// the rate, the host's cuBLAS call, the GPU's work alone and the CPUs the
// thread ran on, so that a ceiling that moves between runs shows where.
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <getopt.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tools/args.h"
#include "tools/cuda_exit.h"

namespace {

using stmux::tools::realIn;
using stmux::tools::wholeIn;

struct Shape {
  int m, n, k;
};

struct Mix {
  std::string name;
  std::vector<Shape> shapes;  // K of them
  int per_shape;              // G requests each
};

// Device buffers and pointer arrays for one mix, laid out group by group.
struct Prepared {
  std::vector<float*> owned;
  const float** a = nullptr;
  const float** b = nullptr;
  float** c = nullptr;
  std::vector<const float*> pointers;  // [A... | B... | C...], as the device arrays hold them
  int total = 0;
};

Prepared prepare(const Mix& mix, std::mt19937& random) {
  Prepared p;
  std::vector<const float*> as, bs;
  std::vector<float*> cs;
  std::uniform_real_distribution<float> value(-1, 1);
  auto alloc = [&](std::size_t floats) {
    float* d;
    EXIT_ON_CUDA_ERROR(cudaMalloc(&d, floats * sizeof(float)));
    std::vector<float> host(floats);
    for (float& x : host)
      x = value(random);
    EXIT_ON_CUDA_ERROR(cudaMemcpy(d, host.data(), floats * sizeof(float), cudaMemcpyHostToDevice));
    p.owned.push_back(d);
    return d;
  };
  for (const Shape& s : mix.shapes) {
    for (int i = 0; i < mix.per_shape; ++i) {
      as.push_back(alloc(std::size_t(s.m) * s.k));
      bs.push_back(alloc(std::size_t(s.k) * s.n));
      cs.push_back(alloc(std::size_t(s.m) * s.n));
    }
  }
  p.total = static_cast<int>(as.size());
  p.pointers = as;
  p.pointers.insert(p.pointers.end(), bs.begin(), bs.end());
  p.pointers.insert(p.pointers.end(), cs.begin(), cs.end());
  EXIT_ON_CUDA_ERROR(cudaMalloc(&p.a, p.total * sizeof(float*)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&p.b, p.total * sizeof(float*)));
  EXIT_ON_CUDA_ERROR(cudaMalloc(&p.c, p.total * sizeof(float*)));
  EXIT_ON_CUDA_ERROR(cudaMemcpy(p.a, as.data(), p.total * sizeof(float*), cudaMemcpyHostToDevice));
  EXIT_ON_CUDA_ERROR(cudaMemcpy(p.b, bs.data(), p.total * sizeof(float*), cudaMemcpyHostToDevice));
  EXIT_ON_CUDA_ERROR(cudaMemcpy(p.c, cs.data(), p.total * sizeof(float*), cudaMemcpyHostToDevice));
  return p;
}

void release(Prepared& p) {
  for (float* d : p.owned)
    cudaFree(d);
  cudaFree(p.a);
  cudaFree(p.b);
  cudaFree(p.c);
}

void launchBatched(cublasHandle_t handle, const Mix& mix, const Prepared& p) {
  const float alpha = 1, beta = 0;
  int offset = 0;
  for (const Shape& s : mix.shapes) {
    EXIT_ON_CUBLAS_ERROR(cublasSgemmBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, s.m, s.n, s.k, &alpha,
                                            p.a + offset, s.m, p.b + offset, s.k, &beta,
                                            p.c + offset, s.m, mix.per_shape));
    offset += mix.per_shape;
  }
}

void launchGrouped(cublasHandle_t handle, const Mix& mix, const Prepared& p) {
  const int groups = static_cast<int>(mix.shapes.size());
  std::vector<cublasOperation_t> ops(groups, CUBLAS_OP_N);
  std::vector<int> m, n, k, sizes(groups, mix.per_shape);
  std::vector<float> alpha(groups, 1), beta(groups, 0);
  for (const Shape& s : mix.shapes)
    m.push_back(s.m), n.push_back(s.n), k.push_back(s.k);
  EXIT_ON_CUBLAS_ERROR(cublasSgemmGroupedBatched(
      handle, ops.data(), ops.data(), m.data(), n.data(), k.data(), alpha.data(), p.a, m.data(),
      p.b, k.data(), beta.data(), p.c, m.data(), groups, sizes.data()));
}

template <class Launch>
float medianUs(cudaStream_t stream, Launch&& launch, int reps) {
  cudaEvent_t start, stop;
  EXIT_ON_CUDA_ERROR(cudaEventCreate(&start));
  EXIT_ON_CUDA_ERROR(cudaEventCreate(&stop));
  for (int i = 0; i < 10; ++i)
    launch();
  EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  std::vector<float> times;
  for (int i = 0; i < reps; ++i) {
    EXIT_ON_CUDA_ERROR(cudaEventRecord(start, stream));
    launch();
    EXIT_ON_CUDA_ERROR(cudaEventRecord(stop, stream));
    EXIT_ON_CUDA_ERROR(cudaEventSynchronize(stop));
    float ms = 0;
    EXIT_ON_CUDA_ERROR(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000);
  }
  std::nth_element(times.begin(), times.begin() + reps / 2, times.end());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return times[reps / 2];
}

double nowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

// One of the executor's batch buffers: the pointer arrays in pinned host
// memory and on the device, the batch's event, and (for replays) the copy and
// the GEMM captured from this buffer.
struct Slot {
  const float** host = nullptr;
  const float** device = nullptr;
  cudaEvent_t done = nullptr;
  cudaGraphExec_t graph = nullptr;
};

struct HostCost {
  double write_us = 0, copy_us = 0, gemm_us = 0, record_us = 0;  // the launch, step by step
                                                                 // (gemm: the cuBLAS calls)
  double launch_us = 0;                                          // all of it
  double graph_us = 0;     // the arrays written, the graph launched, the event recorded
  double launch_rate = 0;  // batches per second, two in flight
  double graph_rate = 0;
  bool same = false;  // the replays wrote what the launches did
};

// The executor's launch of a batch of `mix` from `slot`: the pointer arrays'
// copy, then one cublasSgemmBatched per shape or one grouped call;
// `copied`, if given, is when the copy was queued.
void enqueue(cublasHandle_t handle, cudaStream_t stream, const Mix& mix, bool grouped,
             const Slot& slot, int total, double* copied = nullptr) {
  EXIT_ON_CUDA_ERROR(cudaMemcpyAsync(slot.device, slot.host, 3 * total * sizeof(float*),
                                     cudaMemcpyHostToDevice, stream));
  if (copied != nullptr) *copied = nowUs();
  Prepared arrays;  // the slot's arrays, as the launches read them
  arrays.a = slot.device;
  arrays.b = slot.device + total;
  arrays.c = const_cast<float**>(slot.device + 2 * total);
  if (grouped) {
    launchGrouped(handle, mix, arrays);
  } else {
    launchBatched(handle, mix, arrays);
  }
}

// Every C of `p`, copied back.
std::vector<float> results(const Mix& mix, const Prepared& p) {
  std::vector<float> out;
  int i = 0;
  for (const Shape& s : mix.shapes) {
    for (int g = 0; g < mix.per_shape; ++g, ++i) {
      const std::size_t at = out.size(), floats = std::size_t(s.m) * s.n;
      out.resize(at + floats);
      EXIT_ON_CUDA_ERROR(cudaMemcpy(out.data() + at, p.pointers[2 * p.total + i],
                                    floats * sizeof(float), cudaMemcpyDeviceToHost));
    }
  }
  return out;
}

HostCost hostCost(cublasHandle_t handle, cudaStream_t stream, const Mix& mix, bool grouped,
                  std::mt19937& random) {
  constexpr int kWarmup = 200, kBatches = 5000;
  Prepared p = prepare(mix, random);
  const int count = p.total;
  std::vector<Slot> slots(2);  // as the executor: two batches in flight (BatcherOptions)
  for (Slot& slot : slots) {
    EXIT_ON_CUDA_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&slot.host),
                                     3 * count * sizeof(float*), cudaHostAllocDefault));
    EXIT_ON_CUDA_ERROR(
        cudaMalloc(reinterpret_cast<void**>(&slot.device), 3 * count * sizeof(float*)));
    EXIT_ON_CUDA_ERROR(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
  }
  HostCost cost;
  // Runs kBatches batches round the slots, each waiting (polling, as the
  // executor does) for its slot's previous batch; returns batches per second.
  auto run = [&](bool replay, std::vector<double>* steps) {
    double start = 0;
    for (int i = 0; i < kWarmup + kBatches; ++i) {
      if (i == kWarmup) start = nowUs();
      Slot& slot = slots[i % slots.size()];
      while (cudaEventQuery(slot.done) == cudaErrorNotReady) {
      }
      double t[5];
      t[0] = nowUs();
      std::copy(p.pointers.begin(), p.pointers.end(), slot.host);
      t[1] = nowUs();
      if (replay) {
        EXIT_ON_CUDA_ERROR(cudaGraphLaunch(slot.graph, stream));
        t[2] = t[3] = nowUs();
      } else {
        enqueue(handle, stream, mix, grouped, slot, count, &t[2]);
        t[3] = nowUs();
      }
      EXIT_ON_CUDA_ERROR(cudaEventRecord(slot.done, stream));
      t[4] = nowUs();
      if (i >= kWarmup) {
        for (int step = 0; step < 4; ++step)
          steps[step].push_back(t[step + 1] - t[step]);
        steps[4].push_back(t[4] - t[0]);
      }
    }
    EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
    return kBatches / ((nowUs() - start) / 1e6);
  };
  std::vector<double> launched[5], replayed[5];
  cost.launch_rate = run(false, launched);
  const std::vector<float> direct = results(mix, p);
  for (int i = 0; i < p.total; ++i) {  // the replays must write every C again
    const Shape& s = mix.shapes[i / mix.per_shape];
    EXIT_ON_CUDA_ERROR(cudaMemset(const_cast<float*>(p.pointers[2 * p.total + i]), 0,
                                  std::size_t(s.m) * s.n * sizeof(float)));
  }
  for (Slot& slot : slots) {
    std::copy(p.pointers.begin(), p.pointers.end(), slot.host);
    cudaGraph_t graph;
    EXIT_ON_CUDA_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    enqueue(handle, stream, mix, grouped, slot, count);
    EXIT_ON_CUDA_ERROR(cudaStreamEndCapture(stream, &graph));
    EXIT_ON_CUDA_ERROR(cudaGraphInstantiate(&slot.graph, graph, 0));
    EXIT_ON_CUDA_ERROR(cudaGraphDestroy(graph));
    EXIT_ON_CUDA_ERROR(cudaGraphUpload(slot.graph, stream));
  }
  cost.graph_rate = run(true, replayed);
  cost.same = results(mix, p) == direct;
  cost.write_us = median(launched[0]);
  cost.copy_us = median(launched[1]);
  cost.gemm_us = median(launched[2]);
  cost.record_us = median(launched[3]);
  cost.launch_us = median(launched[4]);
  cost.graph_us = median(replayed[4]);
  for (Slot& slot : slots) {
    cudaGraphExecDestroy(slot.graph);
    cudaEventDestroy(slot.done);
    cudaFree(slot.device);
    cudaFreeHost(slot.host);
  }
  release(p);
  return cost;
}

// ---- --drift ------------------------------------------------------------------

// Pearson's r of two series of the same length (0 when either is flat).
double correlation(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < x.size(); ++i)
    mx += x[i] / n, my += y[i] / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxy += (x[i] - mx) * (y[i] - my);
    sxx += (x[i] - mx) * (x[i] - mx);
    syy += (y[i] - my) * (y[i] - my);
  }
  return sxx > 0 && syy > 0 ? sxy / std::sqrt(sxx * syy) : 0;
}

// The ceiling's loop for `seconds`. Every 16th step is split: the stream is
// held at a gate (cuStreamWaitValue32 on a host-mapped word) until the cuBLAS
// call has returned, so that events around the launch time the GPU's work
// alone, and the call itself is timed on the host's clock. The other steps
// are the ceiling's own and make the rate.
int drift(double seconds, const Shape& shape, int count, std::mt19937& random) {
  using WaitValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
  const auto wait_value = driverFunction<WaitValue>("cuStreamWaitValue32", 12000);
  cublasHandle_t handle;
  EXIT_ON_CUBLAS_ERROR(cublasCreate(&handle));
  cudaStream_t stream;
  EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  EXIT_ON_CUBLAS_ERROR(cublasSetStream(handle, stream));
  const Mix mix{"drift", {shape}, count};
  Prepared p = prepare(mix, random);
  unsigned* gate = nullptr;
  EXIT_ON_CUDA_ERROR(
      cudaHostAlloc(reinterpret_cast<void**>(&gate), sizeof(unsigned), cudaHostAllocMapped));
  *gate = 0;
  unsigned* device_gate = nullptr;
  EXIT_ON_CUDA_ERROR(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_gate), gate, 0));
  cudaEvent_t start, stop;
  EXIT_ON_CUDA_ERROR(cudaEventCreate(&start));
  EXIT_ON_CUDA_ERROR(cudaEventCreate(&stop));
  unsigned opened = 0;
  double call_us = 0, gpu_us = 0;
  int splits = 0;
  const auto split = [&] {
    ++opened;
    if (wait_value(stream, reinterpret_cast<CUdeviceptr>(device_gate), opened,
                   CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS) {
      std::fprintf(stderr, "stmux-launch-bench: cuStreamWaitValue32 failed\n");
      std::exit(3);
    }
    EXIT_ON_CUDA_ERROR(cudaEventRecord(start, stream));
    const double before = nowUs();
    launchBatched(handle, mix, p);
    call_us += nowUs() - before;
    EXIT_ON_CUDA_ERROR(cudaEventRecord(stop, stream));
    __atomic_store_n(gate, opened, __ATOMIC_RELEASE);
    EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
    float ms = 0;
    EXIT_ON_CUDA_ERROR(cudaEventElapsedTime(&ms, start, stop));
    gpu_us += ms * 1000;
    ++splits;
  };
  const auto step = [&] {
    launchBatched(handle, mix, p);
    EXIT_ON_CUDA_ERROR(cudaStreamSynchronize(stream));
  };
  for (int i = 0; i < 2000; ++i)
    i % 16 == 8 ? split() : step();
  std::printf("the ceiling's loop, %d x %dx%dx%d per step, for %.0f s; per half second:\n", count,
              shape.m, shape.n, shape.k, seconds);
  std::printf("%6s %12s %9s %13s %11s  %s\n", "t s", "GEMMs/s", "step us", "cuBLAS call us",
              "GPU work us", "CPUs");
  std::vector<double> rates, steps, calls, gpus;
  const double began = nowUs();
  double window_began = began;
  long window_steps = 0;
  std::set<int> cpus;
  call_us = gpu_us = 0, splits = 0;
  for (long i = 0;; ++i) {
    if (i % 16 == 8) {
      split();
    } else {
      step();
      ++window_steps;
    }
    if (i % 64 == 0) cpus.insert(sched_getcpu());
    const double now = nowUs();
    // A window is half a second, or longer where that held no split step
    // (steps of a large shape).
    if (now - window_began < 500'000 || splits == 0) continue;
    // Every step of the window, the split ones (1 in 16, a little longer)
    // included.
    const double step_us = (now - window_began) / static_cast<double>(window_steps + splits);
    rates.push_back(count * 1e6 / step_us);
    steps.push_back(step_us);
    calls.push_back(call_us / splits);
    gpus.push_back(gpu_us / splits);
    std::string on;
    for (int cpu : cpus)
      on += (on.empty() ? "" : ",") + std::to_string(cpu);
    std::printf("%6.1f %12.0f %9.2f %13.2f %11.2f  %s\n", (now - began) / 1e6, rates.back(),
                step_us, calls.back(), gpus.back(), on.c_str());
    window_began = now, window_steps = 0, call_us = gpu_us = 0, splits = 0;
    cpus.clear();
    if (now - began >= seconds * 1e6) break;
  }
  const auto [low, high] = std::minmax_element(rates.begin(), rates.end());
  const auto [call_low, call_high] = std::minmax_element(calls.begin(), calls.end());
  const auto [gpu_low, gpu_high] = std::minmax_element(gpus.begin(), gpus.end());
  std::printf(
      "windows: %.0f to %.0f GEMMs/s (%.1f%% apart); cuBLAS call %.2f to %.2f us, GPU "
      "work %.2f to %.2f us;\nthe step's correlation with the call %.2f, with the GPU's "
      "work %.2f\n",
      *low, *high, 100 * (*high / *low - 1), *call_low, *call_high, *gpu_low, *gpu_high,
      correlation(steps, calls), correlation(steps, gpus));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFreeHost(gate);
  release(p);
  cublasDestroy(handle);
  return 0;
}

}  // namespace

int usage(FILE* to) {
  if (to != stdout) {
    std::fprintf(to, "see stmux-launch-bench --help\n");
    return 2;
  }
  std::fprintf(to,
               "usage: stmux-launch-bench [--drift SECONDS [--shape MxNxK] [--count R]] [--help]\n"
               "Times K cublasSgemmBatched launches against one cublasSgemmGroupedBatched\n"
               "for mixes of K shapes; then the host time of one batch's launch as the\n"
               "executor makes it (pointer arrays written and copied, the GEMMs, the\n"
               "event), step by step, against replaying the copy and the GEMMs as a CUDA\n"
               "graph, and the batches per second each sustains with two in flight.\n"
               "Prints two tables (needs a CUDA device); exits 1 if a replay's results\n"
               "differ from the launch's.\n"
               "  --drift SECONDS  instead, stmux-bench's ceiling loop (one cublasSgemmBatched\n"
               "                   of R, then a sync) for SECONDS (1..600), per half second:\n"
               "                   the rate, the host's cuBLAS call, the GPU's work alone\n"
               "                   and the CPUs the thread ran on\n"
               "  --shape MxNxK    its GEMM (default 512x1x512, the rnn shape)\n"
               "  --count R        GEMMs per launch (1..4096, default 32)\n"
               "Exit status: 0 done, 1 a replay differed, 2 bad arguments, 3 no CUDA device.\n");
  return 0;
}

int main(int argc, char** argv) {
  double drift_s = 0;
  Shape drift_shape{512, 1, 512};
  int drift_count = 32;
  const option long_options[] = {{"drift", required_argument, nullptr, 'd'},
                                 {"shape", required_argument, nullptr, 's'},
                                 {"count", required_argument, nullptr, 'c'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  const auto bad = [](const char* flag, const char* value, const char* accepted) {
    std::fprintf(stderr, "stmux-launch-bench: %s '%s' is not %s\n", flag, value, accepted);
    return usage(stderr);
  };
  for (int c; (c = getopt_long(argc, argv, "h", long_options, nullptr)) != -1;) {
    switch (c) {
      case 'd':
        if (const auto seconds = realIn(optarg, 1, 600)) {
          drift_s = *seconds;
        } else {
          return bad("--drift", optarg, "a number of seconds, 1..600");
        }
        break;
      case 's': {
        int consumed = 0;
        if (std::sscanf(optarg, "%dx%dx%d%n", &drift_shape.m, &drift_shape.n, &drift_shape.k,
                        &consumed) != 3 ||
            optarg[consumed] != '\0' || drift_shape.m < 1 || drift_shape.n < 1 ||
            drift_shape.k < 1 || drift_shape.m > 16384 || drift_shape.n > 16384 ||
            drift_shape.k > 16384) {
          return bad("--shape", optarg, "MxNxK, each 1..16384");
        }
        break;
      }
      case 'c': {
        const auto count = wholeIn(optarg, 1, 4096);
        if (!count) return bad("--count", optarg, "a number of GEMMs per launch, 1..4096");
        drift_count = *count;
        break;
      }
      case 'h':
        return usage(stdout);
      default:
        return usage(stderr);
    }
  }
  if (optind < argc) {
    std::fprintf(stderr, "stmux-launch-bench: unexpected argument '%s'\n", argv[optind]);
    return usage(stderr);
  }
  if (drift_s == 0 &&
      (drift_shape.m != 512 || drift_shape.n != 1 || drift_shape.k != 512 || drift_count != 32)) {
    std::fprintf(stderr, "stmux-launch-bench: --shape and --count go with --drift\n");
    return usage(stderr);
  }
  if (reportedNoDevice()) return 3;
  if (drift_s > 0) {
    std::mt19937 random(1234);
    return drift(drift_s, drift_shape, drift_count, random);
  }
  cudaDeviceProp prop{};
  EXIT_ON_CUDA_ERROR(cudaGetDeviceProperties(&prop, 0));
  cublasHandle_t handle;
  EXIT_ON_CUBLAS_ERROR(cublasCreate(&handle));
  cudaStream_t stream;
  EXIT_ON_CUDA_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  EXIT_ON_CUBLAS_ERROR(cublasSetStream(handle, stream));
  std::mt19937 random(1234);

  const Shape rnn{512, 1, 512}, conv{256, 128, 1152}, cube{256, 256, 256};
  const std::vector<Shape> squares = {{64, 64, 64}, {96, 96, 96}, {128, 128, 128}, {160, 160, 160}};
  const std::vector<Mix> mixes = {
      {"1 shape x 32 (256^3)", {cube}, 32},
      {"2 shapes x 16", {cube, rnn}, 16},
      {"3 seed shapes x 11", {rnn, conv, cube}, 11},
      {"3 seed shapes x 86", {rnn, conv, cube}, 86},
      {"4 squares x 8", squares, 8},
      {"8 squares x 4",
       {{32, 32, 32},
        {48, 48, 48},
        {64, 64, 64},
        {80, 80, 80},
        {96, 96, 96},
        {112, 112, 112},
        {128, 128, 128},
        {144, 144, 144}},
       4},
      {"16 squares x 2", {}, 2},
      {"32 squares x 1", {}, 1},
  };
  std::printf("device: %s\n", prop.name);
  std::printf("%-24s %6s %12s %12s %8s\n", "mix", "gemms", "batched us", "grouped us", "ratio");
  for (Mix mix : mixes) {
    if (mix.shapes.empty()) {
      const int count = mix.name.rfind("16", 0) == 0 ? 16 : 32;
      for (int i = 0; i < count; ++i)
        mix.shapes.push_back({32 + 8 * i, 32 + 8 * i, 32 + 8 * i});
    }
    Prepared p = prepare(mix, random);
    const float batched = medianUs(
        stream, [&] { launchBatched(handle, mix, p); }, 200);
    const float grouped = medianUs(
        stream, [&] { launchGrouped(handle, mix, p); }, 200);
    std::printf("%-24s %6d %12.1f %12.1f %8.2f\n", mix.name.c_str(), p.total, batched, grouped,
                batched / grouped);
    release(p);
  }

  // The executor's own batches: one shape (its cuBLAS call: one
  // cublasSgemmBatched), and mixes as STMUX_LAUNCH=auto launches them.
  struct Launch {
    Mix mix;
    bool grouped;
  };
  const std::vector<Launch> launches = {
      {{"rnn 512x1x512", {rnn}, 10}, false},
      {{"rnn 512x1x512", {rnn}, 32}, false},
      {{"cube 256^3", {cube}, 10}, false},
      {{"cube 256^3", {cube}, 32}, false},
      {{"3 seed x 11", {rnn, conv, cube}, 11}, false},
      {{"4 squares x 8", squares, 8}, true},
  };
  std::printf(
      "\nthe host time of one batch's launch, median us, and batches/s with two in flight\n");
  std::printf("%-16s %7s %6s %7s %7s %7s %7s %8s %8s %11s %11s %5s\n", "batch", "launch", "gemms",
              "write", "copy", "calls", "record", "launch", "graph", "launch b/s", "graph b/s",
              "same");
  int status = 0;
  for (const Launch& l : launches) {
    const HostCost c = hostCost(handle, stream, l.mix, l.grouped, random);
    std::printf("%-16s %7s %6zu %7.1f %7.1f %7.1f %7.1f %8.1f %8.1f %11.0f %11.0f %5s\n",
                l.mix.name.c_str(), l.grouped ? "grouped" : "batched",
                l.mix.shapes.size() * static_cast<std::size_t>(l.mix.per_shape), c.write_us,
                c.copy_us, c.gemm_us, c.record_us, c.launch_us, c.graph_us, c.launch_rate,
                c.graph_rate, c.same ? "yes" : "NO");
    if (!c.same) status = 1;
  }
  cublasDestroy(handle);
  return status;
}

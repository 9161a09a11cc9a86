// stmux-launch-bench: how should a batch that mixes shapes launch?
//
// For mixes of K distinct shapes (G requests each), times on the GPU
//   batched: K cublasSgemmBatched launches, one per shape, back to back
//   grouped: one cublasSgemmGroupedBatched launch of K groups
// with CUDA events around each, pointer arrays already on the device (as the
// executor has them), after a warm-up, as the median of many repetitions. The
// executor's STMUX_LAUNCH=auto rule comes from this table
// (docs/BENCHMARKS.md).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>
#include "tools/cuda_exit.h"

namespace {

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

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) {
    const bool help = std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h";
    if (!help) {
      std::fprintf(stderr, "stmux-launch-bench: unexpected argument '%s'; it takes none\n",
                   argv[1]);
    }
    std::fprintf(help ? stdout : stderr,
                 "usage: stmux-launch-bench [--help]\n"
                 "Times K cublasSgemmBatched launches against one cublasSgemmGroupedBatched\n"
                 "for mixes of K shapes; prints a table (needs a CUDA device).\n");
    return help ? 0 : 2;
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
  const std::vector<Mix> mixes = {
      {"1 shape x 32 (256^3)", {cube}, 32},
      {"2 shapes x 16", {cube, rnn}, 16},
      {"3 seed shapes x 11", {rnn, conv, cube}, 11},
      {"3 seed shapes x 86", {rnn, conv, cube}, 86},
      {"4 squares x 8", {{64, 64, 64}, {96, 96, 96}, {128, 128, 128}, {160, 160, 160}}, 8},
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
  cublasDestroy(handle);
  return 0;
}

// Checking SGEMM results: the case matrix, fresh random inputs, a float64
// reference, and a comparison that also catches unwritten and stray writes.
//
// Plain C++ with no stmux and no CUDA in it: the ordinary cuBLAS client
// (stmux-cublas-client) and the daemon's test client both use it, and neither
// may depend on what it tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace stmux::check {

enum MathMode { kDefaultMath = 0, kPedanticMath = 2, kTf32Math = 3 };  // cublasMath_t values

struct GemmCase {
  std::string name;
  int transa = 0, transb = 0;  // 0 N, 1 T, 2 C
  std::int64_t m = 0, n = 0, k = 0;
  std::int64_t lda_pad = 0, ldb_pad = 0, ldc_pad = 0;  // added to the minimum
  float alpha = 1.0f, beta = 0.0f;
  std::int64_t a_offset = 0, b_offset = 0, c_offset = 0;  // floats before the operand
  int math = kDefaultMath;

  std::int64_t rowsA() const { return transa == 0 ? m : k; }
  std::int64_t colsA() const { return transa == 0 ? k : m; }
  std::int64_t rowsB() const { return transb == 0 ? k : n; }
  std::int64_t colsB() const { return transb == 0 ? n : k; }
  std::int64_t lda() const { return std::max<std::int64_t>(1, rowsA()) + lda_pad; }
  std::int64_t ldb() const { return std::max<std::int64_t>(1, rowsB()) + ldb_pad; }
  std::int64_t ldc() const { return std::max<std::int64_t>(1, m) + ldc_pad; }
  // Floats each allocation holds: the operand's offset, its columns, and a
  // tail after it, so writes past the operand would land on sentinels.
  std::size_t aFloats() const { return a_offset + lda() * std::max<std::int64_t>(1, colsA()) + 64; }
  std::size_t bFloats() const { return b_offset + ldb() * std::max<std::int64_t>(1, colsB()) + 64; }
  std::size_t cFloats() const { return c_offset + ldc() * std::max<std::int64_t>(1, n) + 64; }
  bool noOp() const { return m == 0 || n == 0 || ((k == 0 || alpha == 0.0f) && beta == 1.0f); }
};

// The matrix of cases from the daemon and shim issues: both transposes,
// leading dimensions above the minimum, beta != 0 with C pre-filled, sizes 0,
// 1, odd and beyond 1024, operands at offsets inside larger allocations, the
// seed shapes, and the math modes.
inline std::vector<GemmCase> caseMatrix(bool quick = false) {
  std::vector<GemmCase> cases;
  auto add = [&](GemmCase c) { cases.push_back(std::move(c)); };
  add({"nn-64", 0, 0, 64, 64, 64});
  add({"nt-odd", 0, 1, 33, 17, 29});
  add({"tn-odd", 1, 0, 33, 17, 29});
  add({"tt-odd", 1, 1, 31, 45, 7});
  add({"cc-odd", 2, 2, 19, 23, 11});
  add({"ld-above-min", 0, 0, 37, 21, 13, 7, 3, 5});
  add({"ld-above-min-tt", 1, 1, 37, 21, 13, 2, 9, 1});
  add({"beta-half", 0, 0, 48, 40, 32, 0, 0, 0, 1.0f, 0.5f});
  add({"alpha-beta", 1, 0, 40, 48, 24, 0, 0, 3, -1.5f, 2.0f});
  add({"m-1", 0, 0, 1, 50, 30});
  add({"n-1", 0, 1, 50, 1, 30});
  add({"k-1", 1, 0, 50, 30, 1});
  add({"all-1", 0, 0, 1, 1, 1, 0, 0, 0, 2.0f, 0.25f});
  add({"m-0", 0, 0, 0, 8, 8});
  add({"n-0", 0, 0, 8, 0, 8});
  add({"k-0-beta", 0, 0, 12, 9, 0, 0, 0, 0, 1.0f, 0.5f});
  add({"k-0-zero", 0, 0, 12, 9, 0});
  add({"alpha-0", 0, 0, 16, 16, 16, 0, 0, 0, 0.0f, 0.75f});
  add({"odd-1x513x7", 0, 0, 1, 513, 7});
  add({"offsets", 1, 0, 40, 30, 20, 1, 2, 3, 1.0f, 1.0f, 1000, 333, 4097});
  add({"rnn-512x1x512", 0, 0, 512, 1, 512});
  add({"pedantic", 0, 0, 96, 80, 72, 0, 0, 0, 1.0f, 0.0f, 0, 0, 0, kPedanticMath});
  add({"tf32", 0, 1, 96, 80, 72, 0, 0, 0, 1.0f, 0.5f, 0, 0, 0, kTf32Math});
  if (!quick) {
    add({"resnet-256x128x1152", 0, 0, 256, 128, 1152});
    add({"cube-256", 0, 0, 256, 256, 256});
    add({"large-1100x1030x1050", 0, 1, 1100, 1030, 1050, 5, 0, 3, 1.0f, 0.5f});
  }
  return cases;
}

// What goes in around an operand: a value no result equals, so a write past
// the operand shows.
inline constexpr float kSentinel = 12345.75f;

struct Buffers {
  std::vector<float> a, b, c;  // whole allocations, host copies
  std::vector<float> c0;       // C before the call
};

// Fresh random inputs, never zeros. With beta == 0, C is poisoned with NaN so
// an unwritten element shows; otherwise it holds random values the result
// must use.
inline Buffers makeInputs(const GemmCase& c, std::mt19937_64& random) {
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  Buffers buffers;
  buffers.a.assign(c.aFloats(), kSentinel);
  buffers.b.assign(c.bFloats(), kSentinel);
  buffers.c.assign(c.cFloats(), kSentinel);
  for (std::int64_t j = 0; j < c.colsA(); ++j) {
    for (std::int64_t i = 0; i < c.rowsA(); ++i)
      buffers.a[c.a_offset + j * c.lda() + i] = value(random);
  }
  for (std::int64_t j = 0; j < c.colsB(); ++j) {
    for (std::int64_t i = 0; i < c.rowsB(); ++i)
      buffers.b[c.b_offset + j * c.ldb() + i] = value(random);
  }
  for (std::int64_t j = 0; j < c.n; ++j) {
    for (std::int64_t i = 0; i < c.m; ++i) {
      buffers.c[c.c_offset + j * c.ldc() + i] =
          c.beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : value(random);
    }
  }
  buffers.c0 = buffers.c;
  return buffers;
}

// A and B in one buffer, the same pointer passed for both (cuBLAS only reads
// them): `c` gets one leading dimension and offset for both, and the buffer
// holds A's values where A reads, B's where only B reads, sentinels elsewhere.
// `a` and `b` are then the same buffer, so the reference reads it for both.
inline Buffers makeAliasedInputs(GemmCase& c, std::mt19937_64& random) {
  const std::int64_t ld = std::max(c.lda(), c.ldb());
  c.lda_pad += ld - c.lda();
  c.ldb_pad += ld - c.ldb();
  c.b_offset = c.a_offset;
  Buffers buffers = makeInputs(c, random);
  std::vector<float> shared(std::max(buffers.a.size(), buffers.b.size()), kSentinel);
  std::copy(buffers.b.begin(), buffers.b.end(), shared.begin());
  for (std::int64_t j = 0; j < c.colsA(); ++j) {
    for (std::int64_t i = 0; i < c.rowsA(); ++i) {
      const std::size_t index = c.a_offset + j * ld + i;
      shared[index] = buffers.a[index];
    }
  }
  buffers.a = shared;
  buffers.b = std::move(shared);
  return buffers;
}

struct Verdict {
  bool ok = true;
  double worst = 0;     // worst error over its allowed bound
  std::string problem;  // the first thing wrong
};

// The float64 reference of one case, m x n column-major: each element's
// expected value and the scale of its error bound. Computed once, it checks
// any number of results of the same call. `slack`, where a caller sets it:
// each element's error allowed on top, for what is applied after the dot
// product (an epilogue) and does not scale with it.
struct Reference {
  std::vector<double> expected, scale;
  std::vector<double> slack;  // empty: none
};

inline Reference reference(const GemmCase& c, const Buffers& in) {
  Reference ref;
  const std::size_t m = c.m > 0 ? static_cast<std::size_t>(c.m) : 0;
  const std::size_t n = c.n > 0 ? static_cast<std::size_t>(c.n) : 0;
  ref.expected.assign(m * n, 0.0);
  ref.scale.assign(m * n, 0.0);
  auto a = [&](std::int64_t i, std::int64_t l) {
    return c.transa == 0 ? in.a[c.a_offset + l * c.lda() + i] : in.a[c.a_offset + i * c.lda() + l];
  };
  auto b = [&](std::int64_t l, std::int64_t j) {
    return c.transb == 0 ? in.b[c.b_offset + j * c.ldb() + l] : in.b[c.b_offset + l * c.ldb() + j];
  };
  std::vector<double> row_sum(m), row_abs(m);
  for (std::int64_t j = 0; j < c.n; ++j) {
    std::fill(row_sum.begin(), row_sum.end(), 0.0);
    std::fill(row_abs.begin(), row_abs.end(), 0.0);
    for (std::int64_t l = 0; l < c.k; ++l) {
      const double blj = b(l, j);
      for (std::int64_t i = 0; i < c.m; ++i) {
        const double product = static_cast<double>(a(i, l)) * blj;
        row_sum[i] += product;
        row_abs[i] += std::fabs(product);
      }
    }
    for (std::int64_t i = 0; i < c.m; ++i) {
      const std::size_t index = c.c_offset + j * c.ldc() + i;
      const double c0 = c.beta == 0.0f ? 0.0 : in.c0[index];
      // As BLAS: with k == 0 (or alpha 0) there is no product term.
      const bool product = c.k > 0 && c.alpha != 0.0f;
      ref.expected[j * m + i] = (product ? c.alpha * row_sum[i] : 0.0) + c.beta * c0;
      ref.scale[j * m + i] =
          (product ? std::fabs(c.alpha) * row_abs[i] : 0.0) + std::fabs(c.beta * c0);
    }
  }
  return ref;
}

// Compares C after the call with a float64 reference. Each element may differ
// by a bound from the FP32 (or TF32) error of its dot product; elements
// outside the m x n block must be exactly as they were.
inline Verdict verify(const GemmCase& c, const Buffers& in, const Reference& ref,
                      const std::vector<float>& result) {
  Verdict verdict;
  const double unit = c.math == kTf32Math ? 1.0 / 1024 : 1.0 / (1 << 23);
  const double allowed = unit * (2.0 * static_cast<double>(c.k) + 4.0);
  std::vector<bool> inside(result.size(), false);
  for (std::int64_t j = 0; j < c.n && verdict.ok; ++j) {
    for (std::int64_t i = 0; i < c.m; ++i) {
      const std::size_t index = c.c_offset + j * c.ldc() + i;
      inside[index] = true;
      const double expected = ref.expected[j * c.m + i];
      const double got = result[index];
      const double error = std::fabs(got - expected);
      const double slack = ref.slack.empty() ? 0.0 : ref.slack[j * c.m + i];
      const double bound = allowed * ref.scale[j * c.m + i] + slack + 1e-30;
      if (!(error <= bound)) {  // NaN fails too
        verdict.ok = false;
        char text[200];
        std::snprintf(text, sizeof(text), "C(%lld,%lld) = %.9g, expected %.9g (error %.3g > %.3g)",
                      static_cast<long long>(i), static_cast<long long>(j), got, expected, error,
                      bound);
        verdict.problem = text;
        break;
      }
      verdict.worst = std::max(verdict.worst, error / bound);
    }
  }
  for (std::size_t index = 0; index < result.size() && verdict.ok; ++index) {
    if (!inside[index] && !(result[index] == in.c0[index])) {
      verdict.ok = false;
      verdict.problem = "element " + std::to_string(index) + " outside C's m x n block changed";
    }
  }
  return verdict;
}

inline Verdict verify(const GemmCase& c, const Buffers& in, const std::vector<float>& result) {
  return verify(c, in, reference(c, in), result);
}

// A strided batch of `count` problems of case `c` (cublasSgemmStridedBatched):
// problem i's A, B and C at i times the stride in one buffer each, each
// problem's operands as makeInputs lays them out; with `broadcast`, A and B
// are one problem's, shared (stride 0), as PyTorch's bmm of an expanded
// tensor passes them.
struct StridedBatch {
  GemmCase c;
  std::int64_t count = 1;
  bool broadcast = false;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;  // floats
  std::vector<Buffers> problems;                          // what each problem sees
  std::vector<float> a, b, c_all;                         // the whole buffers
};

inline StridedBatch makeStridedInputs(const GemmCase& c, std::int64_t count, bool broadcast,
                                      std::mt19937_64& random) {
  StridedBatch batch;
  batch.c = c;
  batch.count = count;
  batch.broadcast = broadcast;
  batch.stride_a = broadcast ? 0 : static_cast<std::int64_t>(c.aFloats());
  batch.stride_b = broadcast ? 0 : static_cast<std::int64_t>(c.bFloats());
  batch.stride_c = static_cast<std::int64_t>(c.cFloats());
  for (std::int64_t i = 0; i < count; ++i) {
    batch.problems.push_back(makeInputs(c, random));
    if (broadcast) {
      batch.problems[i].a = batch.problems[0].a;
      batch.problems[i].b = batch.problems[0].b;
    }
    const Buffers& in = batch.problems[i];
    if (!broadcast || i == 0) {
      batch.a.insert(batch.a.end(), in.a.begin(), in.a.end());
      batch.b.insert(batch.b.end(), in.b.begin(), in.b.end());
    }
    batch.c_all.insert(batch.c_all.end(), in.c.begin(), in.c.end());
  }
  return batch;
}

// Checks every problem's C in `c_all` (the C buffer after the call); the
// first problem that is wrong says so.
inline Verdict verifyStrided(const StridedBatch& batch, const std::vector<float>& c_all) {
  Verdict all;
  for (std::int64_t i = 0; i < batch.count; ++i) {
    const auto from = c_all.begin() + i * batch.stride_c;
    const std::vector<float> result(from, from + batch.stride_c);
    Verdict verdict = verify(batch.c, batch.problems[i], result);
    if (!verdict.ok) {
      verdict.problem = "problem " + std::to_string(i) + " of " + std::to_string(batch.count) +
                        (batch.broadcast ? " (A and B shared)" : "") + ": " + verdict.problem;
      return verdict;
    }
    all.worst = std::max(all.worst, verdict.worst);
  }
  return all;
}

}  // namespace stmux::check

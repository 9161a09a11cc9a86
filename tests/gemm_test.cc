// SGEMM argument rules (include/stmux/gemm.h): every rejected case, the
// extents an operand spans, and the fit check the daemon's isolation rests on.
#include "stmux/gemm.h"

#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <random>
#include <vector>

namespace stmux {
namespace {

GemmShape shape(std::int32_t ta, std::int32_t tb, std::int64_t m, std::int64_t n, std::int64_t k,
                std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
  return GemmShape{ta, tb, m, n, k, lda, ldb, ldc};
}

TEST(Gemm, AcceptsValidArguments) {
  EXPECT_EQ(checkGemmArgs(shape(kOpN, kOpN, 4, 5, 6, 4, 6, 4)), kStatusSuccess);
  EXPECT_EQ(checkGemmArgs(shape(kOpT, kOpT, 4, 5, 6, 6, 5, 4)), kStatusSuccess);
  EXPECT_EQ(checkGemmArgs(shape(kOpC, kOpN, 4, 5, 6, 6, 6, 4)), kStatusSuccess);
  // Leading dimensions above the minimum.
  EXPECT_EQ(checkGemmArgs(shape(kOpN, kOpN, 4, 5, 6, 100, 100, 100)), kStatusSuccess);
  // Zero sizes are legal; leading dimensions must still be at least 1.
  EXPECT_EQ(checkGemmArgs(shape(kOpN, kOpN, 0, 0, 0, 1, 1, 1)), kStatusSuccess);
}

TEST(Gemm, RejectsEachInvalidArgumentAsCublasDoes) {
  const struct {
    GemmShape s;
    const char* why;
  } cases[] = {
      {shape(3, kOpN, 4, 5, 6, 4, 6, 4), "transa out of range"},
      {shape(kOpN, -1, 4, 5, 6, 4, 6, 4), "transb out of range"},
      {shape(kOpN, kOpN, -1, 5, 6, 4, 6, 4), "m < 0"},
      {shape(kOpN, kOpN, 4, -1, 6, 4, 6, 4), "n < 0"},
      {shape(kOpN, kOpN, 4, 5, -1, 4, 6, 4), "k < 0"},
      {shape(kOpN, kOpN, 4, 5, 6, 3, 6, 4), "lda < m (A not transposed)"},
      {shape(kOpT, kOpN, 4, 5, 6, 5, 6, 4), "lda < k (A transposed)"},
      {shape(kOpN, kOpN, 4, 5, 6, 4, 5, 4), "ldb < k (B not transposed)"},
      {shape(kOpN, kOpT, 4, 5, 6, 4, 4, 4), "ldb < n (B transposed)"},
      {shape(kOpN, kOpN, 4, 5, 6, 4, 6, 3), "ldc < m"},
      {shape(kOpN, kOpN, 0, 5, 6, 0, 6, 1), "lda < 1"},
      {shape(kOpN, kOpN, 0, 0, 0, 1, 1, 0), "ldc < 1"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(checkGemmArgs(c.s), kStatusInvalidValue) << c.why;
  }
}

TEST(Gemm, ExtentsCoverTheLastElementExactly) {
  // A: 4 x 6 in a column of 10, B: 6 x 5 in 7, C: 4 x 5 in 4.
  auto e = gemmExtents(shape(kOpN, kOpN, 4, 5, 6, 10, 7, 4));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->a, ((6 - 1) * 10 + 4) * 4u);
  EXPECT_EQ(e->b, ((5 - 1) * 7 + 6) * 4u);
  EXPECT_EQ(e->c, ((5 - 1) * 4 + 4) * 4u);
  // Transposed: A stored k x m = 6 x 4, B stored n x k = 5 x 6.
  e = gemmExtents(shape(kOpT, kOpT, 4, 5, 6, 6, 5, 4));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->a, ((4 - 1) * 6 + 6) * 4u);
  EXPECT_EQ(e->b, ((6 - 1) * 5 + 5) * 4u);
}

TEST(Gemm, EmptyOperandsSpanNothing) {
  auto e = gemmExtents(shape(kOpN, kOpN, 4, 5, 0, 4, 1, 4));  // k = 0: A, B unused
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->a, 0u);
  EXPECT_EQ(e->b, 0u);
  EXPECT_GT(e->c, 0u);
  e = gemmExtents(shape(kOpN, kOpN, 0, 5, 3, 1, 3, 1));  // m = 0: A and C unused
  EXPECT_EQ(e->a, 0u);
  EXPECT_EQ(e->c, 0u);
  EXPECT_GT(e->b, 0u);
}

TEST(Gemm, AnExtentBeyondAnyAllocationIsRefused) {
  EXPECT_FALSE(gemmExtents(shape(kOpN, kOpN, 1, 2, INT64_MAX / 2, 1, INT64_MAX / 2, 1)));
  EXPECT_FALSE(operandBytes(2, INT64_MAX, INT64_MAX).has_value());
  EXPECT_EQ(operandBytes(INT_MAX, 1, INT_MAX).value(), std::uint64_t{INT_MAX} * 4);
}

TEST(Gemm, AStridedBatchSpansEveryProblemAndAZeroStrideSharesTheOperand) {
  // 3 problems of A 4 x 6 (ld 4) 30 floats apart, B shared, C 20 apart.
  GemmShape s = shape(kOpN, kOpN, 4, 5, 6, 4, 6, 4);
  s.count = 3, s.stride_a = 30, s.stride_b = 0, s.stride_c = 20;
  ASSERT_EQ(checkGemmArgs(s), kStatusSuccess);
  auto e = gemmExtents(s);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->a, (2 * 30 + (6 - 1) * 4 + 4) * 4u);
  EXPECT_EQ(e->b, ((5 - 1) * 6 + 6) * 4u);
  EXPECT_EQ(e->c, (2 * 20 + (5 - 1) * 4 + 4) * 4u);
  EXPECT_TRUE(servedStrides(s));
  s.stride_c = 19;  // problem 1's C would begin inside problem 0's
  EXPECT_FALSE(servedStrides(s));
  s.stride_c = 20, s.stride_a = -30;
  EXPECT_FALSE(servedStrides(s));
  EXPECT_FALSE(gemmExtents(s).has_value()) << "the daemon refuses what the shim never sends";
  s.stride_a = INT64_MAX / 8;
  EXPECT_FALSE(gemmExtents(s).has_value()) << "past 2^63 bytes";
  s.count = -1;
  EXPECT_EQ(checkGemmArgs(s), kStatusInvalidValue);
}

// Valid arguments bound n and ldc one by one; their product may pass 2^63
// (computed in 64 bits it overflowed: undefined, which UBSan reports).
TEST(Gemm, StridesAreJudgedWithoutOverflowForAnyValidShape) {
  GemmShape s = shape(kOpN, kOpN, 1, (std::int64_t{1} << 40) + 1, 1, 1, 1, std::int64_t{1} << 24);
  s.count = 2, s.stride_c = INT64_MAX;
  ASSERT_EQ(checkGemmArgs(s), kStatusSuccess);
  EXPECT_FALSE(servedStrides(s)) << "C spans 2^64 elements: no stride keeps two apart";
  s.n = 2;
  EXPECT_TRUE(servedStrides(s));
}

TEST(Gemm, ARequestsBatchCountOfZeroIsOneProblem) {
  Request r{};
  EXPECT_EQ(problemsOf(r), 1);
  r.batch_count = 7;
  EXPECT_EQ(problemsOf(r), 7);
  EXPECT_EQ(GemmShape::of(r).count, 7);
}

TEST(Gemm, OperandsMustFitTheirAllocation) {
  EXPECT_TRUE(operandFits(0, 400, 400));
  EXPECT_TRUE(operandFits(100, 300, 400));
  EXPECT_FALSE(operandFits(104, 300, 400)) << "one float past the end";
  EXPECT_FALSE(operandFits(401, 0 + 4, 400));
  EXPECT_FALSE(operandFits(UINT64_MAX - 2, 8, 400)) << "offset + extent overflows";
  EXPECT_FALSE(operandFits(2, 4, 400)) << "misaligned for float";
  EXPECT_TRUE(operandFits(UINT64_MAX, 0, 0)) << "an unused operand fits anywhere";
}

TEST(Gemm, NoOpsAreThoseCublasReturnsEarlyOn) {
  Request r{};
  r.m = 4, r.n = 5, r.k = 6, r.alpha = 1, r.beta = 0;
  EXPECT_FALSE(gemmIsNoOp(r));
  r.m = 0;
  EXPECT_TRUE(gemmIsNoOp(r));
  r.m = 4, r.k = 0, r.beta = 1;
  EXPECT_TRUE(gemmIsNoOp(r));
  r.beta = 0.5f;
  EXPECT_FALSE(gemmIsNoOp(r)) << "k = 0 with beta != 1 still scales C";
  r.k = 6, r.alpha = 0, r.beta = 1;
  EXPECT_TRUE(gemmIsNoOp(r));
}

TEST(Gemm, EpiloguesAreCheckedAndOneActivationAtMost) {
  GemmShape s = shape(kOpN, kOpN, 4, 5, 6, 4, 6, 4);
  for (std::uint32_t epilogue : {kEpilogueNone, kEpilogueBias, kEpilogueRelu, kEpilogueGelu,
                                 kEpilogueRelu | kEpilogueBias, kEpilogueGelu | kEpilogueBias}) {
    s.epilogue = epilogue;
    EXPECT_EQ(checkGemmArgs(s), kStatusSuccess) << "epilogue " << epilogue;
  }
  for (std::uint32_t epilogue :
       {kEpilogueRelu | kEpilogueGelu, kEpilogueRelu | kEpilogueGelu | kEpilogueBias, 1u << 3,
        1u << 31, kEpilogueBias | 1u << 4}) {
    s.epilogue = epilogue;
    EXPECT_FALSE(validEpilogue(epilogue)) << "epilogue " << epilogue;
    EXPECT_EQ(checkGemmArgs(s), kStatusInvalidValue) << "epilogue " << epilogue;
  }
}

TEST(Gemm, ABiasSpansMFloatsForEveryProblemAndOnlyWhenItIsRead) {
  GemmShape s = shape(kOpN, kOpN, 7, 5, 6, 7, 6, 9);
  EXPECT_EQ(gemmExtents(s)->bias, 0u) << "no epilogue";
  s.epilogue = kEpilogueRelu;
  EXPECT_EQ(gemmExtents(s)->bias, 0u) << "an activation reads no bias";
  for (std::uint32_t epilogue : {kEpilogueBias, kEpilogueBias | kEpilogueGelu}) {
    s.epilogue = epilogue;
    EXPECT_EQ(gemmExtents(s)->bias, 7u * 4) << "m floats, not ldc";
  }
  s.count = 3, s.stride_a = 42, s.stride_b = 30, s.stride_c = 45;
  EXPECT_EQ(gemmExtents(s)->bias, 7u * 4) << "one bias vector for every problem";
  s.count = 1;
  s.n = 0;
  EXPECT_EQ(gemmExtents(s)->bias, 0u) << "an empty C: nothing is read";
  s.n = 5, s.m = 0, s.lda = 1, s.ldc = 1;
  EXPECT_EQ(gemmExtents(s)->bias, 0u);
}

TEST(Gemm, AnEpilogueIsNeverANoOpUnlessCIsEmpty) {
  Request r{};
  r.m = 4, r.n = 5, r.k = 0, r.alpha = 1, r.beta = 1;
  ASSERT_TRUE(gemmIsNoOp(r));
  for (std::uint32_t epilogue : {kEpilogueBias, kEpilogueRelu, kEpilogueGelu}) {
    r.epilogue = epilogue;
    EXPECT_FALSE(gemmIsNoOp(r)) << "k = 0, beta = 1, epilogue " << epilogue;
  }
  r.k = 6, r.alpha = 0;
  EXPECT_FALSE(gemmIsNoOp(r)) << "alpha = 0, beta = 1 with an epilogue";
  r.m = 0;
  EXPECT_TRUE(gemmIsNoOp(r)) << "m = 0: no element to apply it to";
  r.m = 4, r.n = 0;
  EXPECT_TRUE(gemmIsNoOp(r)) << "n = 0";
}

// The tanh approximation of GELU (cuBLASLt's, and PyTorch's
// gelu(approximate="tanh")), in double.
double referenceGelu(double x) {
  const double kSqrt2OverPi = std::sqrt(2.0 / std::acos(-1.0));
  return 0.5 * x * (1.0 + std::tanh(kSqrt2OverPi * (x + 0.044715 * x * x * x)));
}

TEST(Gemm, EpiloguesComputeBiasReluAndTanhGelu) {
  EXPECT_EQ(applyEpilogue(kEpilogueNone, -1.5f, 100.0f), -1.5f) << "the bias is not read";
  EXPECT_EQ(applyEpilogue(kEpilogueBias, -1.5f, 0.25f), -1.25f);
  EXPECT_EQ(applyEpilogue(kEpilogueRelu, -1.5f, 100.0f), 0.0f);
  EXPECT_EQ(applyEpilogue(kEpilogueRelu, 2.5f, 100.0f), 2.5f);
  EXPECT_EQ(applyEpilogue(kEpilogueRelu | kEpilogueBias, -1.5f, 2.0f), 0.5f) << "bias first";
  EXPECT_EQ(applyEpilogue(kEpilogueRelu | kEpilogueBias, 1.5f, -2.0f), 0.0f) << "bias first";
  // GELU against the float64 formula, from deep in the negative tail (where
  // 1 + tanh cancels in FP32, so the bound is absolute there) to where it is
  // x itself; the erf form differs by up to about 1e-3 and would fail.
  std::mt19937 random(11);
  std::uniform_real_distribution<float> value(-12.0f, 12.0f);
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, -0.5f, 3.0f, -3.0f, 1e-4f, -1e-4f};
  for (int i = 0; i < 2000; ++i)
    xs.push_back(value(random));
  for (float x : xs) {
    const double expected = referenceGelu(x);
    const double bound = 1e-6 * std::max(1.0, std::fabs(static_cast<double>(x)));
    EXPECT_NEAR(applyEpilogue(kEpilogueGelu, x, 100.0f), expected, bound) << "x = " << x;
    EXPECT_NEAR(applyEpilogue(kEpilogueGelu | kEpilogueBias, x - 0.75f, 0.75f), expected, bound)
        << "x = " << x << " as (x - 0.75) + 0.75";
  }
  EXPECT_GT(std::fabs(referenceGelu(1.0) - 0.5 * (1.0 + std::erf(1.0 / std::sqrt(2.0)))), 1e-4)
      << "the two GELUs differ by more than the bound";
}

TEST(Gemm, BatchKeysSplitOnEveryField) {
  Request base{};
  base.m = base.n = base.k = 8;
  base.lda = base.ldb = base.ldc = 8;
  base.alpha = 1;
  const BatchKey key = BatchKey::of(base);
  EXPECT_EQ(BatchKey::of(base), key);
  auto differs = [&](auto mutate) {
    Request r = base;
    mutate(r);
    return !(BatchKey::of(r) == key) && BatchKeyHash{}(BatchKey::of(r)) != BatchKeyHash{}(key);
  };
  EXPECT_TRUE(differs([](Request& r) { r.transa = kOpT; }));
  EXPECT_TRUE(differs([](Request& r) { r.transb = kOpT; }));
  EXPECT_TRUE(differs([](Request& r) { r.m = 9; }));
  EXPECT_TRUE(differs([](Request& r) { r.n = 9; }));
  EXPECT_TRUE(differs([](Request& r) { r.k = 9; }));
  EXPECT_TRUE(differs([](Request& r) { r.lda = 9; }));
  EXPECT_TRUE(differs([](Request& r) { r.ldb = 9; }));
  EXPECT_TRUE(differs([](Request& r) { r.ldc = 9; }));
  EXPECT_TRUE(differs([](Request& r) { r.math_mode = 3; }));
  EXPECT_TRUE(differs([](Request& r) { r.alpha = 2; }));
  EXPECT_TRUE(differs([](Request& r) { r.beta = -0.0f; }));  // bitwise, not ==
  // What is not part of the key does not split.
  Request other = base;
  other.a.offset = 64;
  other.slot = 3;
  EXPECT_EQ(BatchKey::of(other), key);
  // Nor the epilogue: requests with and without one share a GEMM launch and
  // the executor applies it afterwards.
  other.epilogue = kEpilogueGelu | kEpilogueBias;
  other.bias.alloc_id = 9;
  EXPECT_EQ(BatchKey::of(other), key);
}

// Column-major references, as BLAS defines them, in double: GEMV with any
// non-zero increments (a negative one starts at the far end), and GEMM.
void referenceGemv(const GemvShape& s, double alpha, const std::vector<double>& a,
                   const std::vector<double>& x, double beta, std::vector<double>& y) {
  const std::int64_t rows = s.rowsY(), length = s.lengthX();
  auto at = [](std::int64_t i, std::int64_t count, std::int64_t inc) {
    return static_cast<std::size_t>(inc > 0 ? i * inc : (count - 1 - i) * -inc);
  };
  for (std::int64_t i = 0; i < rows; ++i) {
    double sum = 0;
    for (std::int64_t j = 0; j < length; ++j) {
      const double aij = s.trans == kOpN ? a[static_cast<std::size_t>(i + j * s.lda)]
                                         : a[static_cast<std::size_t>(j + i * s.lda)];
      sum += aij * x[at(j, length, s.incx)];
    }
    double& out = y[at(i, rows, s.incy)];
    out = alpha * sum + beta * out;
  }
}

void referenceGemm(const GemmShape& s, double alpha, const double* a, const double* b, double beta,
                   double* c) {
  for (std::int64_t i = 0; i < s.m; ++i) {
    for (std::int64_t j = 0; j < s.n; ++j) {
      double sum = 0;
      for (std::int64_t p = 0; p < s.k; ++p) {
        const double aip = s.transa == kOpN ? a[i + p * s.lda] : a[p + i * s.lda];
        const double bpj = s.transb == kOpN ? b[p + j * s.ldb] : b[j + p * s.ldb];
        sum += aip * bpj;
      }
      c[i + j * s.ldc] = alpha * sum + beta * c[i + j * s.ldc];
    }
  }
}

TEST(Gemv, ArgumentsAreCheckedAsCublasDoes) {
  EXPECT_EQ(checkGemvArgs({kOpN, 3, 2, 3, 1, 1}), kStatusSuccess);
  EXPECT_EQ(checkGemvArgs({kOpT, 3, 2, 3, -2, 5}), kStatusSuccess);
  EXPECT_EQ(checkGemvArgs({kOpN, 0, 0, 1, 1, 1}), kStatusSuccess);
  EXPECT_EQ(checkGemvArgs({7, 3, 2, 3, 1, 1}), kStatusInvalidValue);
  EXPECT_EQ(checkGemvArgs({kOpN, -1, 2, 3, 1, 1}), kStatusInvalidValue);
  EXPECT_EQ(checkGemvArgs({kOpN, 3, -1, 3, 1, 1}), kStatusInvalidValue);
  EXPECT_EQ(checkGemvArgs({kOpN, 3, 2, 2, 1, 1}), kStatusInvalidValue) << "lda < m";
  EXPECT_EQ(checkGemvArgs({kOpN, 0, 2, 0, 1, 1}), kStatusInvalidValue) << "lda < 1";
  EXPECT_EQ(checkGemvArgs({kOpN, 3, 2, 3, 0, 1}), kStatusInvalidValue) << "incx 0";
  EXPECT_EQ(checkGemvArgs({kOpN, 3, 2, 3, 1, 0}), kStatusInvalidValue) << "incy 0";
}

// Every GEMV with positive increments, computed as the GEMM gemvAsGemm
// gives (its arguments valid for cuBLAS, its operands where the GEMV's are),
// equals the GEMV; negative increments are not taken.
TEST(Gemv, TheGemmItMapsToComputesTheSameY) {
  std::mt19937 random(7);
  std::uniform_real_distribution<double> value(-1, 1);
  int checked = 0;
  for (std::int32_t trans : {kOpN, kOpT, kOpC}) {
    for (std::int64_t m = 1; m <= 5; ++m) {
      for (std::int64_t n = 1; n <= 5; ++n) {
        for (std::int64_t incx : {1, 2, 3}) {
          for (std::int64_t incy : {1, 2, 4}) {
            const GemvShape s{trans, m, n, m + (m + n) % 3, incx, incy};
            ASSERT_EQ(checkGemvArgs(s), kStatusSuccess);
            const auto as = gemvAsGemm(s);
            ASSERT_TRUE(as.has_value());
            ASSERT_EQ(checkGemmArgs(as->shape), kStatusSuccess)
                << "trans " << trans << " m " << m << " n " << n;
            std::vector<double> a(static_cast<std::size_t>(s.lda * n));
            std::vector<double> x(static_cast<std::size_t>((s.lengthX() - 1) * incx + 1));
            std::vector<double> y(static_cast<std::size_t>((s.rowsY() - 1) * incy + 1));
            for (auto* v : {&a, &x, &y}) {
              for (double& e : *v)
                e = value(random);
            }
            // Each GEMM operand must lie within the GEMV operand it stands for.
            const auto extents = gemmExtents(as->shape);
            ASSERT_TRUE(extents.has_value());
            const auto bytes = [](const std::vector<double>& v) {
              return v.size() * sizeof(float);
            };
            EXPECT_LE(extents->a, bytes(as->x_first ? x : a));
            EXPECT_LE(extents->b, bytes(as->x_first ? a : x));
            EXPECT_LE(extents->c, bytes(y));
            std::vector<double> by_gemv = y, by_gemm = y;
            referenceGemv(s, 0.75, a, x, -0.5, by_gemv);
            referenceGemm(as->shape, 0.75, as->x_first ? x.data() : a.data(),
                          as->x_first ? a.data() : x.data(), -0.5, by_gemm.data());
            for (std::size_t i = 0; i < y.size(); ++i) {
              ASSERT_DOUBLE_EQ(by_gemv[i], by_gemm[i])
                  << "element " << i << ", trans " << trans << " m " << m << " n " << n << " incx "
                  << incx << " incy " << incy;
            }
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_EQ(checked, 3 * 5 * 5 * 3 * 3);
  EXPECT_FALSE(gemvAsGemm({kOpN, 3, 2, 3, -1, 1}).has_value());
  EXPECT_FALSE(gemvAsGemm({kOpN, 3, 2, 3, 1, -2}).has_value());
}

}  // namespace
}  // namespace stmux

// SGEMM argument rules (include/stmux/gemm.h): every rejected case, the
// extents an operand spans, and the fit check the daemon's isolation rests on.
#include "stmux/gemm.h"

#include <gtest/gtest.h>

#include <climits>

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
}

}  // namespace
}  // namespace stmux

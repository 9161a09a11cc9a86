// SGEMM argument rules, shared by the shim (to send invalid calls straight to
// cuBLAS, which then reports them itself) and the daemon (which trusts no
// client): cuBLAS's own checks and each operand's full extent in memory.
//
// Column-major, as cuBLAS: C (m x n) = alpha * op(A) (m x k) * op(B) (k x n)
// + beta * C. op(A) = A stored m x k when transa is N, k x m otherwise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "stmux/epilogue.h"
#include "stmux/wire.h"

namespace stmux {

// Request::batch_count as a number of problems: 0 (a request that is not
// batched) is one.
inline std::int64_t problemsOf(const Request& r) {
  return r.batch_count == 0 ? 1 : r.batch_count;
}

struct GemmShape {
  std::int32_t transa = kOpN;
  std::int32_t transb = kOpN;
  std::int64_t m = 0, n = 0, k = 0;
  std::int64_t lda = 1, ldb = 1, ldc = 1;
  // Strided-batched calls: `count` problems, problem i's operands `i *
  // stride` floats after the first's (a stride of 0 shares the operand).
  std::int64_t count = 1;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  // Applied to every problem's C afterwards (stmux/epilogue.h); with
  // kEpilogueBias, one bias vector of m floats for all of them.
  std::uint32_t epilogue = kEpilogueNone;

  static GemmShape of(const Request& r) {
    return {r.transa, r.transb,      r.m,        r.n,        r.k,        r.lda,     r.ldb,
            r.ldc,    problemsOf(r), r.stride_a, r.stride_b, r.stride_c, r.epilogue};
  }
  // Rows and columns of each operand as stored.
  std::int64_t rowsA() const { return transa == kOpN ? m : k; }
  std::int64_t colsA() const { return transa == kOpN ? k : m; }
  std::int64_t rowsB() const { return transb == kOpN ? k : n; }
  std::int64_t colsB() const { return transb == kOpN ? n : k; }
};

inline bool validTranspose(std::int32_t op) {
  return op == kOpN || op == kOpT || op == kOpC;
}

// cuBLAS's argument checks for cublasSgemm: kStatusSuccess, or the status
// cuBLAS returns for the first rule broken.
inline std::int32_t checkGemmArgs(const GemmShape& s) {
  if (!validTranspose(s.transa) || !validTranspose(s.transb)) return kStatusInvalidValue;
  if (!validEpilogue(s.epilogue)) return kStatusInvalidValue;
  if (s.m < 0 || s.n < 0 || s.k < 0 || s.count < 0) return kStatusInvalidValue;
  if (s.lda < std::max<std::int64_t>(1, s.rowsA())) return kStatusInvalidValue;
  if (s.ldb < std::max<std::int64_t>(1, s.rowsB())) return kStatusInvalidValue;
  if (s.ldc < std::max<std::int64_t>(1, s.m)) return kStatusInvalidValue;
  return kStatusSuccess;
}

// Bytes from an operand's first element to one past its last: 0 when it has
// no elements (it is then never read or written), nullopt when the extent
// does not fit in 63 bits (no allocation is that large).
inline std::optional<std::uint64_t> operandBytes(std::int64_t rows, std::int64_t cols,
                                                 std::int64_t ld) {
  if (rows <= 0 || cols <= 0) return 0;
  const auto elements = static_cast<unsigned __int128>(cols - 1) * static_cast<std::uint64_t>(ld) +
                        static_cast<std::uint64_t>(rows);
  const unsigned __int128 bytes = elements * sizeof(float);
  if (bytes > static_cast<unsigned __int128>(INT64_MAX)) return std::nullopt;
  return static_cast<std::uint64_t>(bytes);
}

// An operand's extent over `count` problems `stride` floats apart: nullopt
// for a negative stride (no served form walks backwards) or past 63 bits.
inline std::optional<std::uint64_t> stridedBytes(std::optional<std::uint64_t> one,
                                                 std::int64_t count, std::int64_t stride) {
  if (!one || *one == 0 || count <= 1) return one;
  if (stride < 0) return std::nullopt;
  const unsigned __int128 bytes = static_cast<unsigned __int128>(count - 1) *
                                      static_cast<std::uint64_t>(stride) * sizeof(float) +
                                  *one;
  if (bytes > static_cast<unsigned __int128>(INT64_MAX)) return std::nullopt;
  return static_cast<std::uint64_t>(bytes);
}

struct GemmExtents {
  std::uint64_t a = 0, b = 0, c = 0;
  std::uint64_t bias = 0;
};

// The extent of each operand for valid arguments (checkGemmArgs first), over
// all of its problems.
inline std::optional<GemmExtents> gemmExtents(const GemmShape& s) {
  auto a = stridedBytes(operandBytes(s.rowsA(), s.colsA(), s.lda), s.count, s.stride_a);
  auto b = stridedBytes(operandBytes(s.rowsB(), s.colsB(), s.ldb), s.count, s.stride_b);
  auto c = stridedBytes(operandBytes(s.m, s.n, s.ldc), s.count, s.stride_c);
  if (!a || !b || !c) return std::nullopt;
  const std::uint64_t bias = (s.epilogue & kEpilogueBias) != 0 && s.m > 0 && s.n > 0
                                 ? static_cast<std::uint64_t>(s.m) * sizeof(float)
                                 : 0;
  return GemmExtents{*a, *b, *c, bias};
}

// Whether stmux serves a strided-batched call of these (valid) arguments:
// strides not negative, and each problem's C apart from the others' (cuBLAS
// gives no order between problems, so overlapping outputs are left to it).
inline bool servedStrides(const GemmShape& s) {
  if (s.count <= 1) return true;
  if (s.stride_a < 0 || s.stride_b < 0) return false;
  if (s.m == 0 || s.n == 0) return s.stride_c >= 0;
  // Valid arguments bound n and ldc one by one, not their product.
  const __int128 c_elements = static_cast<__int128>(s.n - 1) * s.ldc + s.m;
  return s.stride_c >= c_elements;
}

// cublasSgemv: y = alpha * op(A) x + beta * y, A stored m x n.
struct GemvShape {
  std::int32_t trans = kOpN;
  std::int64_t m = 0, n = 0, lda = 1, incx = 1, incy = 1;
  std::int64_t rowsY() const { return trans == kOpN ? m : n; }  // op(A)'s rows
  std::int64_t lengthX() const { return trans == kOpN ? n : m; }
};

// cuBLAS's argument checks for cublasSgemv.
inline std::int32_t checkGemvArgs(const GemvShape& s) {
  if (!validTranspose(s.trans)) return kStatusInvalidValue;
  if (s.m < 0 || s.n < 0) return kStatusInvalidValue;
  if (s.lda < std::max<std::int64_t>(1, s.m)) return kStatusInvalidValue;
  if (s.incx == 0 || s.incy == 0) return kStatusInvalidValue;
  return kStatusSuccess;
}

// The GEMM that computes a GEMV (valid arguments, m and n > 0), so that the
// daemon batches GEMVs with GEMMs of the same shape. With unit increments, x
// and y are columns: C = y (rows(y) x 1) = op(A) x, the GEMM's A being A.
// With other positive increments they are rows whose leading dimension is
// the increment: y^T (1 x rows(y)) = x^T op(A)^T, the GEMM's A being x and
// its B being A. A negative increment walks backwards, which no GEMM does:
// nullopt. `x_first` says which layout.
struct GemvAsGemm {
  GemmShape shape;
  bool x_first = false;
};
inline std::optional<GemvAsGemm> gemvAsGemm(const GemvShape& s) {
  const std::int64_t rows = s.rowsY(), length = s.lengthX();
  if (s.incx == 1 && s.incy == 1) {
    return GemvAsGemm{GemmShape{s.trans, kOpN, rows, 1, length, s.lda,
                                std::max<std::int64_t>(1, length), std::max<std::int64_t>(1, rows)},
                      false};
  }
  if (s.incx < 1 || s.incy < 1) return std::nullopt;
  return GemvAsGemm{
      GemmShape{kOpN, s.trans == kOpN ? kOpT : kOpN, 1, rows, length, s.incx, s.lda, s.incy}, true};
}

// Nothing to compute: cuBLAS returns success without touching memory. An
// epilogue always has something to do to a C that is not empty. (cuBLASLt's
// own answer to alpha 0 and beta 1 with an epilogue depends on the kernel it
// picks: on the H200 some left D alone, most applied the epilogue. stmux
// applies it, as the arithmetic says.)
inline bool gemmIsNoOp(const Request& r) {
  if (r.m == 0 || r.n == 0) return true;
  return (r.k == 0 || r.alpha == 0.0f) && r.beta == 1.0f && r.epilogue == kEpilogueNone;
}

// Whether an operand, placed at `offset` in an allocation of `alloc_bytes`,
// lies wholly inside it and is aligned for floats.
inline bool operandFits(std::uint64_t offset, std::uint64_t extent, std::uint64_t alloc_bytes) {
  if (extent == 0) return true;
  if (offset % alignof(float) != 0) return false;
  return offset <= alloc_bytes && extent <= alloc_bytes - offset;
}

// Requests that may share one cublasSgemmBatched launch: same GPU (one
// batcher per GPU), transposes, sizes, leading dimensions, math mode and
// scalars (compared bit for bit: -0.0 and 0.0, or two NaNs, are not merged).
struct BatchKey {
  std::int32_t transa, transb;
  std::int64_t m, n, k, lda, ldb, ldc;
  std::uint32_t math_mode, emulation;
  std::uint32_t alpha_bits, beta_bits;

  static BatchKey of(const Request& r) {
    BatchKey key{r.transa, r.transb, r.m,         r.n,         r.k, r.lda,
                 r.ldb,    r.ldc,    r.math_mode, r.emulation, 0,   0};
    std::memcpy(&key.alpha_bits, &r.alpha, sizeof(float));
    std::memcpy(&key.beta_bits, &r.beta, sizeof(float));
    return key;
  }
  bool operator==(const BatchKey&) const = default;
};

struct BatchKeyHash {
  std::size_t operator()(const BatchKey& key) const {
    std::uint64_t h = 0xcbf29ce484222325ull;
    auto mix = [&h](std::uint64_t v) {
      h ^= v;
      h *= 0x100000001b3ull;
    };
    mix(static_cast<std::uint64_t>(key.transa) | static_cast<std::uint64_t>(key.transb) << 8);
    for (std::int64_t v : {key.m, key.n, key.k, key.lda, key.ldb, key.ldc}) {
      mix(static_cast<std::uint64_t>(v));
    }
    mix(key.math_mode | static_cast<std::uint64_t>(key.emulation) << 32);
    mix(key.alpha_bits | static_cast<std::uint64_t>(key.beta_bits) << 32);
    return static_cast<std::size_t>(h);
  }
};

}  // namespace stmux

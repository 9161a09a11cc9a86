// libstmux.so's exported functions. Their shells come from the hook lists
// (hooks.h); each forwards to a hooks:: function below, which turns the call
// into a Gemm and a DirectCall with the caller's own arguments. A hook added to
// a list without its function here fails to compile.
#include <cublasLt.h>
#include <cublas_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <new>
#include <optional>
#include <unordered_map>

#include "shim/callers.h"
#include "shim/hooks.h"
#include "shim/intercept.h"
#include "shim/real.h"
#include "stmux/gemm.h"
#include "stmux/wire.h"

namespace stmux::shim::hooks {

#define STMUX_DECLARE(ret, name, params, args) ret name params noexcept;
STMUX_HOOKS(STMUX_DECLARE)
#undef STMUX_DECLARE
// cuBLASLt's take their caller's return address first (shim/callers.h).
#define STMUX_DECLARE(ret, name, params, args) \
  ret name(const void* caller, STMUX_UNPAREN params) noexcept;
#define STMUX_UNPAREN(...) __VA_ARGS__
STMUX_LT_HOOKS(STMUX_DECLARE)
#undef STMUX_DECLARE

namespace {

template <class Int>
Gemm makeGemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, Int m,
              Int n, Int k, const float* alpha, const float* a, Int lda, const float* b, Int ldb,
              const float* beta, float* c, Int ldc) {
  Gemm gemm;
  gemm.handle = handle;
  gemm.transa = static_cast<std::int32_t>(transa);
  gemm.transb = static_cast<std::int32_t>(transb);
  gemm.m = m, gemm.n = n, gemm.k = k;
  gemm.lda = lda, gemm.ldb = ldb, gemm.ldc = ldc;
  gemm.alpha = alpha, gemm.beta = beta;
  gemm.a = a, gemm.b = b, gemm.c = c;
  return gemm;
}

// The legacy API's transpose letters; anything else is invalid (-1), and the
// real function reports it.
std::int32_t legacyOp(char op) {
  switch (op) {
    case 'N':
    case 'n':
      return kOpN;
    case 'T':
    case 't':
      return kOpT;
    case 'C':
    case 'c':
      return kOpC;
    default:
      return -1;
  }
}

// A GEMV as the GEMM that computes it (stmux/gemm.h, gemvAsGemm), in the
// precision of cublasSgemv: full FP32, whatever the handle's math mode.
template <class Int>
Gemm makeGemv(cublasHandle_t handle, cublasOperation_t trans, Int m, Int n, const float* alpha,
              const float* a, Int lda, const float* x, Int incx, const float* beta, float* y,
              Int incy) {
  const GemvShape shape{static_cast<std::int32_t>(trans), m, n, lda, incx, incy};
  Gemm gemm;
  gemm.entry = EntryPoint::kGemv;
  gemm.handle = handle;
  gemm.alpha = alpha, gemm.beta = beta;
  gemm.math_mode = CUBLAS_DEFAULT_MATH;
  gemm.emulation = CUBLAS_EMULATION_STRATEGY_DEFAULT;
  if (checkGemvArgs(shape) != kStatusSuccess) {
    gemm.direct_because = Fallback::kInvalidArgs;
    return gemm;
  }
  // cuBLAS returns at once when m or n is 0, leaving y as it is; the GEMM
  // would scale y by beta.
  if (m == 0 || n == 0) {
    gemm.direct_because = Fallback::kNoOp;
    return gemm;
  }
  const std::optional<GemvAsGemm> as = gemvAsGemm(shape);
  if (!as) {
    gemm.direct_because = Fallback::kUnservedForm;
    return gemm;
  }
  const GemmShape& g = as->shape;
  gemm.transa = g.transa, gemm.transb = g.transb;
  gemm.m = g.m, gemm.n = g.n, gemm.k = g.k;
  gemm.lda = g.lda, gemm.ldb = g.ldb, gemm.ldc = g.ldc;
  gemm.a = as->x_first ? x : a;
  gemm.b = as->x_first ? a : x;
  gemm.c = y;
  return gemm;
}

// The cublasMath_t an FP32 compute type asks for: 32F `plain` (whatever
// else sets the precision), PEDANTIC never reduced, FAST_TF32 TF32 allowed;
// nullopt for a compute type that is not FP32.
std::optional<std::int32_t> fp32MathMode(cublasComputeType_t compute, std::int32_t plain) {
  switch (compute) {
    case CUBLAS_COMPUTE_32F:
      return plain;
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      return CUBLAS_PEDANTIC_MATH;
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      return CUBLAS_TF32_TENSOR_OP_MATH;
    default:
      return std::nullopt;
  }
}

// A GemmEx: served when it is an SGEMM, all data FP32 and FP32 compute; the
// compute type sets the precision (fp32MathMode; 32F: the handle's math mode,
// as cublasSgemm).
// The tensor-op algorithms (deprecated) let cuBLAS use FP16 kernels for 32F
// compute "for backward compatibility": not what the daemon's call computes.
// An algorithm this cuBLAS does not list, or one it may pick by timing
// (CUBLAS_GEMM_AUTOTUNE), gets cuBLAS's own answer: run directly.
template <class Int>
Gemm makeGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, Int m,
                Int n, Int k, const void* alpha, const void* a, cudaDataType atype, Int lda,
                const void* b, cudaDataType btype, Int ldb, const void* beta, void* c,
                cudaDataType ctype, Int ldc, cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  Gemm gemm = makeGemm(handle, transa, transb, m, n, k, static_cast<const float*>(alpha),
                       static_cast<const float*>(a), lda, static_cast<const float*>(b), ldb,
                       static_cast<const float*>(beta), static_cast<float*>(c), ldc);
  gemm.entry = EntryPoint::kGemmEx;
  const std::optional<std::int32_t> math = fp32MathMode(compute, gemm.math_mode);
  const bool plain_algo = algo >= CUBLAS_GEMM_DEFAULT && algo <= CUBLAS_GEMM_ALGO23;
  if (atype != CUDA_R_32F || btype != CUDA_R_32F || ctype != CUDA_R_32F || !math || !plain_algo) {
    gemm.direct_because = Fallback::kUnservedForm;
    return gemm;
  }
  gemm.math_mode = *math;
  return gemm;
}

// A strided batch (bmm): `count` GEMMs whose operands lie `stride` floats
// apart. Served unless a stride is negative or the outputs overlap.
template <class Int>
Gemm makeStrided(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, Int m,
                 Int n, Int k, const float* alpha, const float* a, Int lda, long long stride_a,
                 const float* b, Int ldb, long long stride_b, const float* beta, float* c, Int ldc,
                 long long stride_c, Int count) {
  Gemm gemm = makeGemm(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  gemm.entry = EntryPoint::kStridedBatched;
  gemm.count = count;
  gemm.stride_a = stride_a, gemm.stride_b = stride_b, gemm.stride_c = stride_c;
  const GemmShape shape{gemm.transa, gemm.transb, m,     n,        k,        lda,
                        ldb,         ldc,         count, stride_a, stride_b, stride_c};
  if (checkGemmArgs(shape) != kStatusSuccess) {
    gemm.direct_because = Fallback::kInvalidArgs;
  } else if (count == 0) {
    gemm.direct_because = Fallback::kNoOp;
  } else if (!servedStrides(shape)) {
    gemm.direct_because = Fallback::kUnservedForm;
  }
  return gemm;
}

// What a cublasLtMatmul call's descriptors say, read through the real
// cuBLASLt; false where an attribute cannot be read.
class LtReader {
 public:
  explicit LtReader(const RealCublasLt& real) : real_(real) {}
  template <class T>
  bool get(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, T& value) const {
    std::size_t written = 0;
    return real_.cublasLtMatmulDescGetAttribute(desc, attribute, &value, sizeof(T), &written) ==
               CUBLAS_STATUS_SUCCESS &&
           written == sizeof(T);
  }
  template <class T>
  bool get(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attribute,
           T& value) const {
    std::size_t written = 0;
    return real_.cublasLtMatrixLayoutGetAttribute(layout, attribute, &value, sizeof(T), &written) ==
               CUBLAS_STATUS_SUCCESS &&
           written == sizeof(T);
  }

 private:
  const RealCublasLt& real_;
};

// One matrix as a cuBLASLt layout describes it.
struct LtLayout {
  std::uint32_t type = 0;
  std::int32_t order = 0;
  std::uint64_t rows = 0, cols = 0;
  std::int64_t ld = 0;
  std::int32_t count = 1;
  std::int64_t stride = 0;
  std::uint32_t batch_mode = 0;   // 0: strided; otherwise arrays of pointers
  std::int64_t plane_offset = 0;  // planar complex data; 0 for real data
};

bool readLayout(const LtReader& lt, cublasLtMatrixLayout_t layout, LtLayout& out) {
  if (layout == nullptr) return false;
  if (!lt.get(layout, CUBLASLT_MATRIX_LAYOUT_TYPE, out.type) ||
      !lt.get(layout, CUBLASLT_MATRIX_LAYOUT_ORDER, out.order) ||
      !lt.get(layout, CUBLASLT_MATRIX_LAYOUT_ROWS, out.rows) ||
      !lt.get(layout, CUBLASLT_MATRIX_LAYOUT_COLS, out.cols) ||
      !lt.get(layout, CUBLASLT_MATRIX_LAYOUT_LD, out.ld) ||
      !lt.get(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, out.count) ||
      !lt.get(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, out.stride)) {
    return false;
  }
  // A cuBLASLt too old to know batch modes has only strided batches.
  if (!lt.get(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, out.batch_mode)) out.batch_mode = 0;
  if (!lt.get(layout, CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, out.plane_offset)) out.plane_offset = 0;
  return true;
}

// cuBLASLt's epilogues that stmux applies, as kEpilogue* bits; nullopt for
// the others (auxiliary outputs, gradients).
std::optional<std::uint32_t> epilogueOf(std::uint32_t lt) {
  switch (lt) {
    case CUBLASLT_EPILOGUE_DEFAULT:
      return kEpilogueNone;
    case CUBLASLT_EPILOGUE_BIAS:
      return kEpilogueBias;
    case CUBLASLT_EPILOGUE_RELU:
      return kEpilogueRelu;
    case CUBLASLT_EPILOGUE_RELU_BIAS:
      return kEpilogueRelu | kEpilogueBias;
    case CUBLASLT_EPILOGUE_GELU:
      return kEpilogueGelu;
    case CUBLASLT_EPILOGUE_GELU_BIAS:
      return kEpilogueGelu | kEpilogueBias;
    default:
      return std::nullopt;
  }
}

// The caller's algorithm (cublasLtMatmul's `algo`): the daemon runs the call
// its own way, but where cuBLASLt would refuse this algorithm (it does not
// fit the call, or needs more workspace than the caller gave), the call runs
// directly, for cuBLASLt to say so (found by review: an autotuner trying
// every candidate got success from each). cublasLtMatmulAlgoCheck costs
// microseconds, and a framework passes the same algorithm for the same call
// again and again: each thread keeps its answers, by what the shim read of
// the call (all it serves is in `key`) and the algorithm's bytes.
class AlgoChecks {
 public:
  static constexpr std::size_t kKeyWords = 20 + std::size(cublasLtMatmulAlgo_t{}.data);
  using Key = std::array<std::uint64_t, kKeyWords>;

  static bool fits(const RealCublasLt& real, cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                   cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                   cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t& algo,
                   std::size_t workspace, const Key& key) {
    thread_local std::unordered_map<Key, bool, Hash> known;
    if (const auto found = known.find(key); found != known.end()) return found->second;
    cublasLtMatmulHeuristicResult_t result{};
    const bool fits = real.cublasLtMatmulAlgoCheck != nullptr &&
                      real.cublasLtMatmulAlgoCheck(handle, desc, a, b, c, d, &algo, &result) ==
                          CUBLAS_STATUS_SUCCESS &&
                      result.state == CUBLAS_STATUS_SUCCESS && result.workspaceSize <= workspace;
    // The hooks throw nothing: an answer memory cannot be had for is not kept.
    try {
      if (known.size() >= kMostKept) known.clear();  // a few calls' checks again
      known.emplace(key, fits);
    } catch (const std::bad_alloc&) {
    }
    return fits;
  }

 private:
  static constexpr std::size_t kMostKept = 256;
  struct Hash {
    std::size_t operator()(const Key& key) const {
      std::uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
      for (const std::uint64_t word : key)
        h = (h ^ word) * 1099511628211ull;
      return static_cast<std::size_t>(h);
    }
  };
};

// A cublasLtMatmul: served when it is an FP32 GEMM (all four matrices FP32,
// column-major, strided batches of one count; FP32 scalars in host memory;
// compute 32F, 32F_PEDANTIC or 32F_FAST_TF32, which sets the precision as
// for GemmEx) with an epilogue stmux applies, writing D in place of C or not
// reading C (beta == 0). PyTorch's nn.Linear with a bias is one.
Gemm makeLtMatmul(const RealCublasLt& real, cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                  const void* alpha, const void* a, cublasLtMatrixLayout_t a_layout, const void* b,
                  cublasLtMatrixLayout_t b_layout, const void* beta, const void* c,
                  cublasLtMatrixLayout_t c_layout, void* d, cublasLtMatrixLayout_t d_layout,
                  const cublasLtMatmulAlgo_t* algo, std::size_t workspace, cudaStream_t stream) {
  Gemm gemm;
  gemm.entry = EntryPoint::kLtMatmul;
  gemm.lt = true;
  gemm.stream = stream;
  const auto direct = [&gemm](Fallback why) {
    gemm.direct_because = why;
    return gemm;
  };
  if (handle == nullptr) return direct(Fallback::kBadHandle);
  const LtReader lt(real);
  std::int32_t compute = 0, scale_type = 0, pointer_mode = 0, transa = 0, transb = 0;
  std::int32_t transc = CUBLAS_OP_N, fill = CUBLAS_FILL_MODE_FULL;
  std::int32_t bias_type = -1;
  std::uint32_t epilogue = 0;
  const void* bias = nullptr;
  std::int64_t bias_stride = 0;
  if (desc == nullptr || !lt.get(desc, CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, compute) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_SCALE_TYPE, scale_type) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, pointer_mode) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_TRANSA, transa) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_TRANSB, transb) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_TRANSC, transc) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_FILL_MODE, fill) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, bias_type) ||
      !lt.get(desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, bias_stride)) {
    return direct(Fallback::kInvalidArgs);
  }
  if (pointer_mode != CUBLASLT_POINTER_MODE_HOST) return direct(Fallback::kDevicePointerMode);
  // D transposed, or one triangle of it (cuBLASLt supports neither for these
  // types today, and reports that itself).
  if (transc != CUBLAS_OP_N || fill != CUBLAS_FILL_MODE_FULL) {
    return direct(Fallback::kUnservedForm);
  }
  // Scaling factors and their like are for narrow types; with FP32 cuBLASLt
  // refuses them, and it reports that itself.
  for (const cublasLtMatmulDescAttributes_t attribute :
       {CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_C_SCALE_POINTER, CUBLASLT_MATMUL_DESC_D_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER, CUBLASLT_MATMUL_DESC_AMAX_D_POINTER,
        CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER,
        CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR}) {
    const void* pointer = nullptr;
    if (!lt.get(desc, attribute, pointer)) return direct(Fallback::kInvalidArgs);
    if (pointer != nullptr) return direct(Fallback::kUnservedForm);
  }
  // So are scaling modes, an auxiliary output's type and FP8's fast
  // accumulation, each at its default (0, -1, 0) or unknown to this cuBLASLt.
  for (const cublasLtMatmulDescAttributes_t attribute :
       {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_C_SCALE_MODE, CUBLASLT_MATMUL_DESC_D_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE}) {
    std::int32_t mode = 0;
    if (lt.get(desc, attribute, mode) && mode != 0) return direct(Fallback::kUnservedForm);
  }
  std::int32_t aux_type = -1;
  std::int8_t fast_accum = 0;
  if ((lt.get(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, aux_type) && aux_type != -1) ||
      (lt.get(desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast_accum) && fast_accum != 0)) {
    return direct(Fallback::kUnservedForm);
  }
  // No handle: 32F is full FP32, as cuBLASLt computes it.
  const std::optional<std::int32_t> math =
      fp32MathMode(static_cast<cublasComputeType_t>(compute), CUBLAS_DEFAULT_MATH);
  const std::optional<std::uint32_t> ours = epilogueOf(epilogue);
  if (!math || scale_type != CUDA_R_32F || !ours) return direct(Fallback::kUnservedForm);
  gemm.math_mode = *math;
  gemm.emulation = CUBLAS_EMULATION_STRATEGY_DEFAULT;
  gemm.epilogue = *ours;
  if ((gemm.epilogue & kEpilogueBias) != 0) {
    if (bias_type != -1 && bias_type != CUDA_R_32F) return direct(Fallback::kUnservedForm);
    if (bias == nullptr) return direct(Fallback::kInvalidArgs);
    gemm.bias = static_cast<const float*>(bias);
  }

  LtLayout la, lb, lc, ld;
  if (!readLayout(lt, a_layout, la) || !readLayout(lt, b_layout, lb) ||
      !readLayout(lt, c_layout, lc) || !readLayout(lt, d_layout, ld)) {
    return direct(Fallback::kInvalidArgs);
  }
  for (const LtLayout* layout : {&la, &lb, &lc, &ld}) {
    if (layout->type != CUDA_R_32F || layout->order != CUBLASLT_ORDER_COL ||
        layout->batch_mode != 0 || layout->plane_offset != 0 || layout->count != ld.count) {
      return direct(Fallback::kUnservedForm);
    }
    if (layout->rows > INT64_MAX || layout->cols > INT64_MAX) {
      return direct(Fallback::kInvalidArgs);
    }
    // cuBLASLt "usually" takes only sizes an int32_t holds (cublasLt.h),
    // where the daemon's cuBLAS would run the _64 calls: left to it.
    if (layout->rows > INT32_MAX || layout->cols > INT32_MAX || layout->ld > INT32_MAX) {
      return direct(Fallback::kUnservedForm);
    }
  }
  if (!validTranspose(transa) || !validTranspose(transb) || ld.count < 1) {
    return direct(Fallback::kInvalidArgs);
  }
  // The conjugate transpose of real data is its transpose to cuBLAS, but
  // cuBLASLt does not say so for FP32: left to it.
  if (transa == kOpC || transb == kOpC) return direct(Fallback::kUnservedForm);
  // D is m x n; op(A) m x k; op(B) k x n; C as D.
  const auto m = static_cast<std::int64_t>(ld.rows), n = static_cast<std::int64_t>(ld.cols);
  const auto a_rows = static_cast<std::int64_t>(la.rows),
             a_cols = static_cast<std::int64_t>(la.cols);
  const auto b_rows = static_cast<std::int64_t>(lb.rows),
             b_cols = static_cast<std::int64_t>(lb.cols);
  const std::int64_t k = transa == kOpN ? a_cols : a_rows;
  if ((transa == kOpN ? a_rows : a_cols) != m || (transb == kOpN ? b_rows : b_cols) != k ||
      (transb == kOpN ? b_cols : b_rows) != n || lc.rows != ld.rows || lc.cols != ld.cols) {
    return direct(Fallback::kInvalidArgs);
  }
  gemm.transa = transa, gemm.transb = transb;
  gemm.m = m, gemm.n = n, gemm.k = k;
  gemm.lda = la.ld, gemm.ldb = lb.ld, gemm.ldc = ld.ld;
  gemm.alpha = static_cast<const float*>(alpha);
  gemm.beta = static_cast<const float*>(beta);
  gemm.a = static_cast<const float*>(a);
  gemm.b = static_cast<const float*>(b);
  gemm.c = static_cast<float*>(d);
  gemm.count = ld.count;
  if (gemm.count > 1) {
    gemm.stride_a = la.stride, gemm.stride_b = lb.stride, gemm.stride_c = ld.stride;
    // One bias for every problem, as the daemon applies it.
    if ((gemm.epilogue & kEpilogueBias) != 0 && bias_stride != 0) {
      return direct(Fallback::kUnservedForm);
    }
  }
  // D in place of C, or C not read at all (but described as cuBLASLt
  // requires, or it refuses the call).
  if (c != d) {
    if (lc.ld < std::max<std::int64_t>(1, m)) return direct(Fallback::kInvalidArgs);
    if (beta == nullptr) return direct(Fallback::kInvalidArgs);
    if (*static_cast<const float*>(beta) != 0.0f) return direct(Fallback::kUnservedForm);
  } else if (lc.ld != ld.ld || (gemm.count > 1 && lc.stride != ld.stride)) {
    return direct(Fallback::kUnservedForm);
  }
  const GemmShape shape{gemm.transa,
                        gemm.transb,
                        m,
                        n,
                        k,
                        gemm.lda,
                        gemm.ldb,
                        gemm.ldc,
                        gemm.count,
                        gemm.stride_a,
                        gemm.stride_b,
                        gemm.stride_c,
                        gemm.epilogue};
  if (checkGemmArgs(shape) != kStatusSuccess) return direct(Fallback::kInvalidArgs);
  if (!servedStrides(shape)) return direct(Fallback::kUnservedForm);
  if (algo != nullptr) {
    AlgoChecks::Key key{reinterpret_cast<std::uintptr_t>(handle),
                        static_cast<std::uint64_t>(gemm.transa),
                        static_cast<std::uint64_t>(gemm.transb),
                        static_cast<std::uint64_t>(m),
                        static_cast<std::uint64_t>(n),
                        static_cast<std::uint64_t>(k),
                        static_cast<std::uint64_t>(gemm.lda),
                        static_cast<std::uint64_t>(gemm.ldb),
                        static_cast<std::uint64_t>(gemm.ldc),
                        static_cast<std::uint64_t>(lc.ld),
                        c == d,
                        static_cast<std::uint64_t>(gemm.count),
                        static_cast<std::uint64_t>(gemm.stride_a),
                        static_cast<std::uint64_t>(gemm.stride_b),
                        static_cast<std::uint64_t>(gemm.stride_c),
                        static_cast<std::uint64_t>(lc.stride),
                        gemm.epilogue,
                        static_cast<std::uint64_t>(bias_type),
                        static_cast<std::uint64_t>(gemm.math_mode),
                        workspace};
    std::copy(std::begin(algo->data), std::end(algo->data), key.end() - std::size(algo->data));
    if (!AlgoChecks::fits(real, handle, desc, a_layout, b_layout, c_layout, d_layout, *algo,
                          workspace, key)) {
      return direct(Fallback::kInvalidArgs);
    }
  }
  return gemm;
}

}  // namespace

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa,
                              cublasOperation_t transb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemm_v2 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemm_v2(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C,
                               ldc);
  };
  return intercept(makeGemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemm_v2_64(cublasHandle_t handle, cublasOperation_t transa,
                                 cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                                 const float* alpha, const float* A, int64_t lda, const float* B,
                                 int64_t ldb, const float* beta, float* C, int64_t ldc) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemm_v2_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemm_v2_64(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C,
                                  ldc);
  };
  return intercept(makeGemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc),
                   DirectCall(direct));
}

void cublasSgemm(char transa, char transb, int m, int n, int k, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemm == nullptr) return;
  auto direct = [&] {
    real.cublasSgemm(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return CUBLAS_STATUS_SUCCESS;  // the legacy API reports through cublasGetError()
  };
  Gemm gemm;
  gemm.entry = EntryPoint::kSgemmLegacy;
  gemm.legacy = true;
  gemm.transa = legacyOp(transa);
  gemm.transb = legacyOp(transb);
  gemm.m = m, gemm.n = n, gemm.k = k;
  gemm.lda = lda, gemm.ldb = ldb, gemm.ldc = ldc;
  gemm.alpha_value = alpha, gemm.beta_value = beta;
  gemm.a = A, gemm.b = B, gemm.c = C;
  (void)intercept(gemm, DirectCall(direct));
}

cublasStatus_t cublasSgemv_v2(cublasHandle_t handle, cublasOperation_t trans, int m, int n,
                              const float* alpha, const float* A, int lda, const float* x, int incx,
                              const float* beta, float* y, int incy) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemv_v2 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemv_v2(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy);
  };
  return intercept(makeGemv(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemv_v2_64(cublasHandle_t handle, cublasOperation_t trans, int64_t m,
                                 int64_t n, const float* alpha, const float* A, int64_t lda,
                                 const float* x, int64_t incx, const float* beta, float* y,
                                 int64_t incy) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemv_v2_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemv_v2_64(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy);
  };
  return intercept(makeGemv(handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy),
                   DirectCall(direct));
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasGemmEx == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                             beta, C, Ctype, ldc, computeType, algo);
  };
  return intercept(makeGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                              beta, C, Ctype, ldc, computeType, algo),
                   DirectCall(direct));
}

cublasStatus_t cublasGemmEx_64(cublasHandle_t handle, cublasOperation_t transa,
                               cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                               const void* alpha, const void* A, cudaDataType Atype, int64_t lda,
                               const void* B, cudaDataType Btype, int64_t ldb, const void* beta,
                               void* C, cudaDataType Ctype, int64_t ldc,
                               cublasComputeType_t computeType, cublasGemmAlgo_t algo) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasGemmEx_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasGemmEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype,
                                ldb, beta, C, Ctype, ldc, computeType, algo);
  };
  return intercept(makeGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
                              beta, C, Ctype, ldc, computeType, algo),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long int strideA, const float* B, int ldb,
                                         long long int strideB, const float* beta, float* C,
                                         int ldc, long long int strideC, int batchCount) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemmStridedBatched == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemmStridedBatched(handle, transa, transb, m, n, k, alpha, A, lda, strideA,
                                          B, ldb, strideB, beta, C, ldc, strideC, batchCount);
  };
  return intercept(makeStrided(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb,
                               strideB, beta, C, ldc, strideC, batchCount),
                   DirectCall(direct));
}

cublasStatus_t cublasSgemmStridedBatched_64(cublasHandle_t handle, cublasOperation_t transa,
                                            cublasOperation_t transb, int64_t m, int64_t n,
                                            int64_t k, const float* alpha, const float* A,
                                            int64_t lda, long long int strideA, const float* B,
                                            int64_t ldb, long long int strideB, const float* beta,
                                            float* C, int64_t ldc, long long int strideC,
                                            int64_t batchCount) noexcept {
  const RealCublas& real = realCublas();
  if (real.cublasSgemmStridedBatched_64 == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasSgemmStridedBatched_64(handle, transa, transb, m, n, k, alpha, A, lda,
                                             strideA, B, ldb, strideB, beta, C, ldc, strideC,
                                             batchCount);
  };
  return intercept(makeStrided(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb,
                               strideB, beta, C, ldc, strideC, batchCount),
                   DirectCall(direct));
}

cublasStatus_t cublasLtMatmul(const void* caller, cublasLtHandle_t lightHandle,
                              cublasLtMatmulDesc_t computeDesc, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t Adesc, const void* B,
                              cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
                              cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                              const cublasLtMatmulAlgo_t* algo, void* workspace,
                              size_t workspaceSizeInBytes, cudaStream_t stream) noexcept {
  const RealCublasLt& real = realCublasLt();
  if (real.cublasLtMatmul == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  auto direct = [&] {
    return real.cublasLtMatmul(lightHandle, computeDesc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc,
                               D, Ddesc, algo, workspace, workspaceSizeInBytes, stream);
  };
  if (calledFromCublas(caller)) return direct();
  return intercept(makeLtMatmul(real, lightHandle, computeDesc, alpha, A, Adesc, B, Bdesc, beta, C,
                                Cdesc, D, Ddesc, algo, workspaceSizeInBytes, stream),
                   DirectCall(direct));
}

}  // namespace stmux::shim::hooks

extern "C" {
#define STMUX_EXPORT(ret, name, params, args)              \
  __attribute__((visibility("default"))) ret name params { \
    return stmux::shim::hooks::name args;                  \
  }
STMUX_HOOKS(STMUX_EXPORT)
#undef STMUX_EXPORT
#define STMUX_EXPORT(ret, name, params, args)                                         \
  __attribute__((visibility("default"), noinline)) ret name params {                  \
    return stmux::shim::hooks::name(__builtin_return_address(0), STMUX_UNPAREN args); \
  }
STMUX_LT_HOOKS(STMUX_EXPORT)
#undef STMUX_EXPORT
}

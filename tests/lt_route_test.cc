// Which cublasLtMatmul calls the shim may serve (shim/exports.cc,
// makeLtMatmul), read from real cuBLASLt descriptors (no GPU needed): every
// attribute the daemon does not model must be at its default, or the call
// runs directly and cuBLASLt answers it, as it would without stmux. The
// test stands in for intercept() and records what the entry point made of
// each call.
#include <cublasLt.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>

#include "shim/hooks.h"
#include "shim/intercept.h"
#include "shim/real.h"

namespace stmux::shim {

namespace {
std::optional<Gemm> seen;  // the last call intercept() was given
}  // namespace

cublasStatus_t intercept(const Gemm& gemm, DirectCall) noexcept {
  seen = gemm;
  return CUBLAS_STATUS_SUCCESS;
}

namespace hooks {
#define STMUX_DECLARE(ret, name, params, args) \
  ret name(const void* caller, STMUX_UNPAREN params) noexcept;
#define STMUX_UNPAREN(...) __VA_ARGS__
STMUX_LT_HOOKS(STMUX_DECLARE)
#undef STMUX_DECLARE
}  // namespace hooks

namespace {

#define CHECK_LT(call) ASSERT_EQ((call), CUBLAS_STATUS_SUCCESS) << #call

// An 8x8x8 FP32 matmul, D over C: served as it stands.
class LtRouteTest : public ::testing::Test {
 protected:
  void SetUp() override { create(); }
  void TearDown() override { destroy(); }
  void create() {
    CHECK_LT(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    for (cublasLtMatrixLayout_t* layout : {&a_, &b_, &c_, &d_}) {
      CHECK_LT(cublasLtMatrixLayoutCreate(layout, CUDA_R_32F, 8, 8, 8));
    }
  }
  void destroy() {
    cublasLtMatmulDescDestroy(desc_);
    for (cublasLtMatrixLayout_t layout : {a_, b_, c_, d_})
      cublasLtMatrixLayoutDestroy(layout);
    desc_ = nullptr, a_ = b_ = c_ = d_ = nullptr;
  }
  // The plain matmul again.
  void fresh() {
    destroy();
    create();
  }
  template <class T>
  void set(cublasLtMatmulDescAttributes_t attribute, T value) {
    CHECK_LT(cublasLtMatmulDescSetAttribute(desc_, attribute, &value, sizeof(value)));
  }
  template <class T>
  void set(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attribute, T value) {
    CHECK_LT(cublasLtMatrixLayoutSetAttribute(layout, attribute, &value, sizeof(value)));
  }
  // "served", or the fallback reason the entry point gave.
  std::string route(float alpha = 1.0f, float beta = 0.0f, bool d_apart = false,
                    const cublasLtMatmulAlgo_t* algo = nullptr, std::size_t workspace = 0) {
    seen.reset();
    hooks::cublasLtMatmul(nullptr, reinterpret_cast<cublasLtHandle_t>(0x1), desc_, &alpha, a_mem_,
                          a_, b_mem_, b_, &beta, c_mem_, c_, d_apart ? d_mem_ : c_mem_, d_, algo,
                          nullptr, workspace, nullptr);
    if (!seen) return "not intercepted";
    if (!seen->direct_because) return "served";
    return std::string(kFallbackNames[static_cast<std::size_t>(*seen->direct_because)]);
  }

  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr, d_ = nullptr;
  float a_mem_[64] = {}, b_mem_[64] = {}, c_mem_[64] = {}, d_mem_[64] = {};
};

TEST_F(LtRouteTest, APlainFp32MatmulIsServed) {
  EXPECT_EQ(route(), "served");
  EXPECT_EQ(route(1.0f, 0.0f, /*d_apart=*/true), "served") << "D apart from C, beta 0";
  set(CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, std::int32_t{4});
  EXPECT_EQ(route(), "served") << "a scheduling hint changes no result";
}

// cuBLASLt refuses these for FP32 data (or they ask for what the daemon
// does not compute): left to it.
TEST_F(LtRouteTest, ScalingModesAndAuxiliaryAttributesRunDirectly) {
  for (const cublasLtMatmulDescAttributes_t attribute :
       {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_C_SCALE_MODE, CUBLASLT_MATMUL_DESC_D_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE}) {
    fresh();
    set(attribute, std::int32_t{1});
    EXPECT_EQ(route(), "unserved_form") << "scale mode attribute " << attribute;
  }
  static float scale = 1.0f;
  for (const cublasLtMatmulDescAttributes_t attribute :
       {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER}) {
    fresh();
    set(attribute, static_cast<void*>(&scale));
    EXPECT_EQ(route(), "unserved_form") << "pointer attribute " << attribute;
  }
  fresh();
  set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, std::int32_t{CUDA_R_32F});
  EXPECT_EQ(route(), "unserved_form") << "an auxiliary output's type";
  fresh();
  set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, std::int8_t{1});
  EXPECT_EQ(route(), "unserved_form") << "FP8 fast accumulation";
}

TEST_F(LtRouteTest, PlanarComplexLayoutsRunDirectly) {
  set(b_, CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, std::int64_t{64});
  EXPECT_EQ(route(), "unserved_form");
}

// Forms cuBLASLt does not document for FP32 data, which the daemon's cuBLAS
// would run all the same: left to cuBLASLt (found by review).
TEST_F(LtRouteTest, AConjugateTransposeAndSizesBeyondInt32RunDirectly) {
  set(CUBLASLT_MATMUL_DESC_TRANSA, std::int32_t{CUBLAS_OP_C});
  EXPECT_EQ(route(), "unserved_form") << "A conjugate-transposed";
  fresh();
  set(CUBLASLT_MATMUL_DESC_TRANSB, std::int32_t{CUBLAS_OP_C});
  EXPECT_EQ(route(), "unserved_form") << "B conjugate-transposed";
  fresh();
  set(CUBLASLT_MATMUL_DESC_TRANSA, std::int32_t{CUBLAS_OP_T});
  EXPECT_EQ(route(), "served") << "A transposed";
  fresh();
  set(a_, CUBLASLT_MATRIX_LAYOUT_LD, std::int64_t{1} << 31);
  EXPECT_EQ(route(), "unserved_form") << "a leading dimension of 2^31";
  fresh();
  set(d_, CUBLASLT_MATRIX_LAYOUT_ROWS, std::uint64_t{1} << 31);
  EXPECT_EQ(route(), "unserved_form") << "2^31 rows";
}

// The caller's algorithm is checked as cuBLASLt checks it: one that does not
// fit the call, or needs more workspace than the caller gave, runs directly,
// for cuBLASLt to refuse (found by review: served, each got success). A
// thread keeps its answers.
TEST_F(LtRouteTest, AnAlgorithmCuBlasLtWouldRefuseRunsDirectly) {
  static int checks = 0;
  static std::size_t needs = 0;
  static cublasStatus_t answer = CUBLAS_STATUS_SUCCESS;
  auto& real = const_cast<RealCublasLt&>(realCublasLt());
  const auto saved = real.cublasLtMatmulAlgoCheck;
  real.cublasLtMatmulAlgoCheck = [](cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                    cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                    cublasLtMatrixLayout_t, const cublasLtMatmulAlgo_t*,
                                    cublasLtMatmulHeuristicResult_t* result) {
    ++checks;
    result->workspaceSize = needs;
    result->state = CUBLAS_STATUS_SUCCESS;
    return answer;
  };
  cublasLtMatmulAlgo_t algo{};
  algo.data[0] = 1;
  needs = 1024;
  EXPECT_EQ(route(1.0f, 0.0f, false, &algo, 1024), "served");
  EXPECT_EQ(route(1.0f, 0.0f, false, &algo, 1024), "served");
  EXPECT_EQ(checks, 1) << "checked again for the same call and algorithm";
  EXPECT_EQ(route(1.0f, 0.0f, false, &algo, 512), "invalid_args") << "less workspace than needed";
  algo.data[0] = 2;
  answer = CUBLAS_STATUS_NOT_SUPPORTED;
  EXPECT_EQ(route(1.0f, 0.0f, false, &algo, 1 << 20), "invalid_args")
      << "an algorithm that does not fit the call";
  EXPECT_EQ(checks, 3);
  EXPECT_EQ(route(), "served") << "no algorithm: cuBLASLt would pick one";
  real.cublasLtMatmulAlgoCheck = saved;
}

// cuBLASLt checks C's layout even when beta 0 leaves C unread.
TEST_F(LtRouteTest, ACLayoutCuBlasLtRefusesRunsDirectlyWhenDIsApart) {
  set(c_, CUBLASLT_MATRIX_LAYOUT_LD, std::int64_t{4});  // fewer than its 8 rows
  EXPECT_EQ(route(1.0f, 0.0f, /*d_apart=*/true), "invalid_args");
}

}  // namespace
}  // namespace stmux::shim

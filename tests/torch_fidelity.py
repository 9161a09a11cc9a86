#!/usr/bin/env python3
"""PyTorch's FP32 GEMM operators on the GPU, each checked against a float64
reference on the CPU, with TF32 off and then on; run under the preload by
shim_gpu_test, which reads the shim's counts by cuBLAS entry point. Prints
"ok OP" or "FAIL OP: why" per operator (OP_tf32 for the TF32 round) and
"ops N" at the end. Exit status: 0 all right, 1 a wrong result, 77 no
PyTorch with a CUDA device (the test then skips).

What each operator reaches in PyTorch 2.x (aten/src/ATen/native/cuda/Blas.cpp,
aten/src/ATen/cuda/CUDABlas.cpp, matmul in native/LinearAlgebra.cpp):
mm, matmul of matrices, addmm with a 2-D C, F.linear (nn.Linear's forward)
without a bias, and matmul of a batch by a matrix (the batch folded into one
mm) reach cublasSgemm; addmm with a 1-D bias and F.linear with a bias (a 3-D
input folded into one addmm) cublasLtMatmul with a BIAS epilogue, and
torch._addmm_activation RELU_BIAS or GELU_BIAS (tanh GELU), all dimensions
being above 1; bmm, baddbmm and matmul of batches, or of a matrix by a batch
(the matrix expanded, a batch stride of 0) cublasSgemmStridedBatched (a
batch of one cublasSgemm, in recent versions); mv and addmv cublasSgemv.
With torch.backends.cuda.matmul.allow_tf32 PyTorch sets the handle's math
mode to CUBLAS_TF32_TENSOR_OP_MATH and the Lt compute type to
CUBLAS_COMPUTE_32F_FAST_TF32. The encoder layer (eval, no_grad) runs
PyTorch's fused fast path (native/transformers/): q, k and v projected by
one mm, the output projection addmm with a bias, the feed-forward network
_addmm_activation (RELU_BIAS) then addmm, attention bmm or a fused kernel
of PyTorch's own.

Each result is checked against float64 on the CPU, not against the same
program's output without the preload (which shim_gpu_test runs first, with
the same checks): stmuxd runs its own kernels, batched with other callers'
GEMMs, so its results differ from cuBLAS's in the last bits even when both
are right, and a comparison between the two runs would need the same bound
as one against float64; float64 is the exact answer whichever kernels ran,
it needs no file handed from one run to the next, and the plain run passing
shows the bounds hold for cuBLAS itself on that machine.

Bounds, for an element of one operator: FP32 accumulation over the inner
dimension, 8e-5 times the element's sum of |products| (its worst case,
K 2^-24, is 3e-5 at the largest K here, 512); TF32 keeps 10 of each
operand's mantissa bits (2^-10 relative where it truncates), 2e-3 a product,
so 1e-2 of the same sum; GELU(x) may add 5e-4 |x| (a tanh the GPU
approximates to 2^-11). For the encoder layer (two matrix products deep
before each LayerNorm, whose output is of order 1): |got - want| <= 1e-4
(1 + |want|) in FP32, 2e-2 (1 + |want|) with TF32. On the CPU, over five
seeds, float32 left at most 3e-7 (1 + |want|); every product's operands
rounded to TF32 4e-4, so a layer computed in TF32 where FP32 was asked for
fails the FP32 bound; truncated to TF32 1.7e-3.
"""
import copy
import sys

try:
    import torch
except ImportError:
    print("PyTorch is not installed")
    sys.exit(77)
if not torch.cuda.is_available():
    print("PyTorch finds no CUDA device")
    sys.exit(77)

torch.manual_seed(2026)
device = torch.device("cuda")
FP32 = 8e-5  # of each element's sum of |products|
TF32 = 1e-2
ENCODER_FP32 = 1e-4  # of 1 + |want|
ENCODER_TF32 = 2e-2
linear = torch.nn.functional.linear


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float32, device=device) * 2 - 1


def verdict(name, got, want, bound):
    if got.shape != want.shape:
        print(f"FAIL {name}: shape {tuple(got.shape)} against {tuple(want.shape)}")
        return False
    error = (got - want).abs()
    if torch.all(error <= bound):  # a NaN fails
        print(f"ok {name}")
        return True
    worst = torch.argmax(torch.nan_to_num(error - bound, nan=float("inf"))).item()
    print(f"FAIL {name}: element {worst}: {got.flatten()[worst].item()} against "
          f"{want.flatten()[worst].item()} (bound {bound.flatten()[worst].item():.3g})")
    return False


def check(name, gemm, tolerance):
    """`gemm`: (run, inputs, reference, products, slack): run on the GPU
    tensors; reference (run where None) gives the exact result of float64
    copies on the CPU, products (reference where None) the sum of |products|
    from their absolute values, slack (where not None) what the bound allows
    beyond the GEMM's rounding."""
    run, inputs, reference, products, slack = gemm
    reference = reference or run
    products = products or reference
    got = run(*inputs).double().cpu()
    exact = [t.double().cpu() for t in inputs]
    want = reference(*exact)
    bound = tolerance * (products(*(t.abs() for t in exact)).abs() + 1e-6)
    if slack is not None:
        bound += slack(*exact)
    return verdict(name, got, want, bound)


def op(run, *inputs, reference=None, products=None, slack=None):
    return (run, inputs, reference, products, slack)


def gemm_ops():
    """The operators, each on fresh inputs; name -> op."""
    ops = {
        "mm": op(lambda a, b: torch.mm(a, b), rand(64, 48), rand(48, 32)),
        "mm_transposed": op(lambda a, b: torch.mm(a.t(), b.t()), rand(48, 64), rand(32, 48)),
        "matmul_2d": op(lambda a, b: a @ b, rand(33, 17), rand(17, 29)),
        "addmm_2d": op(lambda c, a, b: torch.addmm(c, a, b), rand(40, 24), rand(40, 16),
                       rand(16, 24)),
        "addmm_bias": op(lambda c, a, b: torch.addmm(c, a, b), rand(24), rand(40, 16),
                         rand(16, 24)),
        "linear_no_bias": op(lambda x, w: linear(x, w), rand(4, 512), rand(256, 512)),
        "linear_bias": op(lambda x, w, b: linear(x, w, b), rand(8, 512), rand(256, 512),
                          rand(256)),
        "linear_bias_3d": op(lambda x, w, b: linear(x, w, b), rand(4, 16, 64), rand(32, 64),
                             rand(32)),
        "bmm": op(lambda a, b: torch.bmm(a, b), rand(8, 16, 24), rand(8, 24, 12)),
        "bmm_batch_1": op(lambda a, b: torch.bmm(a, b), rand(1, 16, 24), rand(1, 24, 12)),
        "bmm_shared_b": op(lambda a, b: torch.bmm(a, b.expand(6, 24, 12)), rand(6, 16, 24),
                           rand(1, 24, 12)),
        "baddbmm": op(lambda c, a, b: torch.baddbmm(c, a, b), rand(8, 16, 12), rand(8, 16, 24),
                      rand(8, 24, 12)),
        "baddbmm_scaled": op(lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=2),
                             rand(5, 20, 9), rand(5, 20, 14), rand(5, 14, 9)),
        "matmul_batched": op(lambda a, b: a @ b, rand(2, 3, 16, 8), rand(2, 3, 8, 20)),
        "matmul_batch_by_matrix": op(lambda a, b: a @ b, rand(4, 16, 24), rand(24, 12)),
        "matmul_matrix_by_batch": op(lambda a, b: a @ b, rand(16, 24), rand(4, 24, 12)),
        "mv": op(lambda a, v: torch.mv(a, v), rand(64, 48), rand(48)),
        "mv_transposed": op(lambda a, v: torch.mv(a.t(), v), rand(48, 64), rand(48)),
        "addmv": op(lambda y, a, v: torch.addmv(y, a, v), rand(64), rand(64, 48), rand(48)),
    }
    if hasattr(torch, "_addmm_activation"):
        addmm = lambda c, a, b: torch.addmm(c, a, b)  # noqa: E731
        ops["addmm_relu"] = op(
            lambda c, a, b: torch._addmm_activation(c, a, b),
            rand(24), rand(40, 16), rand(16, 24),
            reference=lambda c, a, b: torch.relu(addmm(c, a, b)), products=addmm)
        # cuBLASLt's GELU epilogue, and PyTorch's own fallback, are the tanh
        # approximation (the CPU's _addmm_activation is not). Its tanh may be
        # the GPU's approximate one, 2^-11 relative: x/2 * 2^-11 of GELU(x).
        ops["addmm_gelu"] = op(
            lambda c, a, b: torch._addmm_activation(c, a, b, use_gelu=True),
            rand(24), rand(40, 16), rand(16, 24),
            reference=lambda c, a, b: torch.nn.functional.gelu(addmm(c, a, b),
                                                               approximate="tanh"),
            products=addmm, slack=lambda c, a, b: 5e-4 * addmm(c, a, b).abs())
    return ops


def check_encoder(name, tolerance):
    """A small nn.TransformerEncoderLayer on the GPU against a float64 copy of
    it on the CPU, both in eval mode under no_grad."""
    torch.manual_seed(64)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                             batch_first=True).eval()
    exact = copy.deepcopy(layer).double()
    layer = layer.to(device)
    x = torch.randn(4, 32, 64)
    with torch.no_grad():
        got = layer(x.to(device)).double().cpu()
        want = exact(x.double())
    return verdict(name, got, want, tolerance * (1 + want.abs()))


if not hasattr(torch, "_addmm_activation"):
    print(f"note: PyTorch {torch.__version__} has no torch._addmm_activation; "
          "addmm_relu and addmm_gelu skipped")
checked = failures = 0
for suffix, tf32 in (("", False), ("_tf32", True)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for name, gemm in gemm_ops().items():
        checked += 1
        failures += 0 if check(name + suffix, gemm, TF32 if tf32 else FP32) else 1
    checked += 1
    failures += 0 if check_encoder("encoder_layer" + suffix,
                                   ENCODER_TF32 if tf32 else ENCODER_FP32) else 1
torch.backends.cuda.matmul.allow_tf32 = False
torch.cuda.synchronize()
print(f"ops {checked}")
sys.exit(1 if failures else 0)

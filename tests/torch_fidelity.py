#!/usr/bin/env python3
"""PyTorch's FP32 GEMM operators on the GPU, each checked against a float64
reference on the CPU; run under the preload by shim_gpu_test, which reads
the shim's counts by cuBLAS entry point. Prints "ok OP" or "FAIL OP: why"
per operator and "ops N" at the end. Exit status: 0 all right, 1 a wrong
result, 77 no PyTorch with a CUDA device (the test then skips).

What each operator reaches in PyTorch 2.x (aten/src/ATen/cuda/CUDABlas.cpp):
mm, matmul of matrices, addmm with a 2-D C and F.linear without a bias
reach cublasSgemm; bmm and matmul of batches (an expanded operand with a
stride of 0 too) cublasSgemmStridedBatched; mv and addmv cublasSgemv.
"""
import sys

try:
    import torch
except ImportError:
    print("PyTorch is not installed")
    sys.exit(77)
if not torch.cuda.is_available():
    print("PyTorch finds no CUDA device")
    sys.exit(77)

torch.backends.cuda.matmul.allow_tf32 = False  # FP32 results, as the bounds assume
torch.manual_seed(2026)
device = torch.device("cuda")


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float32, device=device) * 2 - 1


def check(name, run, *inputs):
    got = run(*inputs).double().cpu()
    want = run(*(t.double().cpu() for t in inputs))
    scale = run(*(t.double().abs().cpu() for t in inputs)).abs()
    # FP32 accumulation over the inner dimension: a bound from each element's
    # sum of absolute products.
    bound = 1e-5 * (scale + 1e-6) * 8
    error = (got - want).abs()
    if torch.all(error <= bound):
        print(f"ok {name}")
        return True
    worst = torch.argmax(error - bound).item()
    print(f"FAIL {name}: element {worst}: {got.flatten()[worst].item()} against "
          f"{want.flatten()[worst].item()}")
    return False


ops = [
    ("mm", lambda a, b: torch.mm(a, b), rand(64, 48), rand(48, 32)),
    ("mm_transposed", lambda a, b: torch.mm(a.t(), b.t()), rand(48, 64), rand(32, 48)),
    ("matmul_2d", lambda a, b: a @ b, rand(33, 17), rand(17, 29)),
    ("addmm_2d", lambda c, a, b: torch.addmm(c, a, b), rand(40, 24), rand(40, 16), rand(16, 24)),
    ("linear_no_bias", lambda x, w: torch.nn.functional.linear(x, w), rand(4, 512), rand(256, 512)),
    ("bmm", lambda a, b: torch.bmm(a, b), rand(8, 16, 24), rand(8, 24, 12)),
    ("bmm_batch_1", lambda a, b: torch.bmm(a, b), rand(1, 16, 24), rand(1, 24, 12)),
    ("bmm_shared_b", lambda a, b: torch.bmm(a, b.expand(6, 24, 12)), rand(6, 16, 24),
     rand(1, 24, 12)),
    ("matmul_batched", lambda a, b: a @ b, rand(2, 3, 16, 8), rand(2, 3, 8, 20)),
    ("mv", lambda a, v: torch.mv(a, v), rand(64, 48), rand(48)),
    ("mv_transposed", lambda a, v: torch.mv(a.t(), v), rand(48, 64), rand(48)),
    ("addmv", lambda y, a, v: torch.addmv(y, a, v), rand(64), rand(64, 48), rand(48)),
]
failures = 0
for name, run, *inputs in ops:
    failures += 0 if check(name, run, *inputs) else 1
torch.cuda.synchronize()
print(f"ops {len(ops)}")
sys.exit(1 if failures else 0)

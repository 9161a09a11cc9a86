#!/usr/bin/env python3
"""stmux-torch-tenant: an unmodified PyTorch inference process, for stmux-bench.

It knows nothing of stmux: each step runs a small model in FP32 on the GPU and
then torch.cuda.synchronize(), in a closed loop, under stmux-bench's start
barrier (tools/barrier.h): a few untimed steps, the ready file, untimed steps
until the go file names the span, then every step that ends inside the span is
timed. Workloads (cuBLAS calls per step in brackets):
  rnn    h = tanh(mm(W, h) + mm(U, x)), 512 hidden, batch 1      [2]
  cube   relu(mm(A, B)), 256 x 256 x 256                         [1]
  mlp    3 x (nn.Linear(512, 512) with bias, ReLU), batch 4      [3]
  multi  four independent mm of 256 x 64 x 256, summed           [4]
  attn   self-attention, batch 4, sequence 64, 8 heads of 64:    [6]
         q, k, v and output nn.Linear(512, 512) with bias, and
         softmax(bmm(q, k^T)) and its bmm with v, 32 GEMMs each
Exit status: 0 done, 1 a failed step or an unwritable file, 2 bad usage,
3 no usable CUDA device or --sync or --slice-us refused, 4 no go file in time,
5 PyTorch is not installed.
"""
import argparse
import os
import sys
import time

WORKLOADS = {"rnn": 2, "cube": 1, "mlp": 3, "multi": 4, "attn": 6}
SYNC_FLAGS = {"spin": 1, "yield": 2, "blocking": 4}  # cudaDeviceSchedule*
WARMUP_STEPS = 20


def write_atomically(path, text):
    temporary = path + ".tmp"
    with open(temporary, "w") as out:
        out.write(text)
    os.rename(temporary, path)


def read_go(path):
    try:
        with open(path) as f:
            start, stop = (int(word) for word in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    return (start, stop) if stop > start else None


def set_sync(flag):
    """The program's own choice of how CUDA waits, made as an application
    would: cudaSetDeviceFlags, through the CUDA runtime PyTorch loaded, before
    its context exists."""
    import ctypes
    with open("/proc/self/maps") as maps:
        path = next((line.split()[-1] for line in maps if "/libcudart.so" in line), None)
    if path is None:
        raise RuntimeError("PyTorch has not loaded libcudart.so")
    status = ctypes.CDLL(path).cudaSetDeviceFlags(ctypes.c_uint(flag))
    if status != 0:
        raise RuntimeError(f"cudaSetDeviceFlags({flag}) returned {status}")


def set_slice(microseconds):
    """The calling thread's slice request to the kernel's EEVDF scheduler
    (sched_setattr's sched_runtime for SCHED_OTHER, Linux 6.12 and later;
    the kernel clamps it to 0.1 .. 100 ms): a shorter slice gives an earlier
    deadline, so the thread runs sooner once it wakes."""
    import ctypes
    import platform
    number = {"x86_64": 314, "aarch64": 274}.get(platform.machine())
    if number is None:
        raise RuntimeError(f"no sched_setattr number known for {platform.machine()}")

    class SchedAttr(ctypes.Structure):  # SCHED_ATTR_SIZE_VER0
        _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32),
                    ("flags", ctypes.c_uint64), ("nice", ctypes.c_int32),
                    ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                    ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]

    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), policy=0,
                     nice=os.getpriority(os.PRIO_PROCESS, 0), runtime=microseconds * 1000)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(number), 0, ctypes.byref(attr), 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def make_step(torch, workload, tenant):
    torch.manual_seed(1000 + tenant)
    dev = torch.device("cuda")
    randn = lambda *shape: torch.randn(*shape, device=dev)  # noqa: E731
    if workload == "rnn":
        w, u, x = randn(512, 512) / 23, randn(512, 512) / 23, randn(512, 1)
        state = {"h": randn(512, 1)}

        def run():
            state["h"] = torch.tanh(torch.mm(w, state["h"]) + torch.mm(u, x))
    elif workload == "cube":
        a, b = randn(256, 256), randn(256, 256)

        def run():
            torch.relu(torch.mm(a, b))
    elif workload == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(512, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 512), torch.nn.ReLU()).to(dev).eval()
        x = randn(4, 512)

        def run():
            model(x)
    elif workload == "multi":
        pairs = [(randn(256, 64), randn(64, 256)) for _ in range(4)]

        def run():
            sum(torch.mm(a, b) for a, b in pairs)
    else:  # attn
        batch, seq, heads, dim = 4, 64, 8, 64
        width = heads * dim
        q_proj, k_proj, v_proj, out_proj = (
            torch.nn.Linear(width, width).to(dev).eval() for _ in range(4))
        x = randn(batch, seq, width)

        def split(t):  # [batch, seq, width] -> [batch * heads, seq, dim]
            return t.view(batch, seq, heads, dim).transpose(1, 2).reshape(-1, seq, dim)

        def run():
            # Spelled out rather than nn.MultiheadAttention, whose fused
            # kernels may bypass cuBLAS: bmm is cublasSgemmStridedBatched.
            q, k, v = split(q_proj(x)) * dim ** -0.5, split(k_proj(x)), split(v_proj(x))
            weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
            context = torch.bmm(weights, v).view(batch, heads, seq, dim).transpose(1, 2)
            out_proj(context.reshape(batch, seq, width))

    def step():
        run()
        torch.cuda.synchronize()
    return step


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Tenants of stmux-bench; see tools/barrier.h for the protocol.")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--ready", required=True, help="file to create once warm")
    parser.add_argument("--go", required=True, help="file that names the timed span")
    parser.add_argument("--out", required=True, help="file for the results")
    parser.add_argument("--tenant", type=int, default=0, help="this tenant's index")
    parser.add_argument("--wait-s", type=float, default=600,
                        help="longest wait for the go file once ready (default 600)")
    parser.add_argument("--sync", choices=sorted(SYNC_FLAGS),
                        help="how CUDA waits, chosen by the program (default CUDA's)")
    parser.add_argument("--slice-us", type=int,
                        help="the main thread's EEVDF slice request, 100..100000 us "
                             "(default the kernel's)")
    args = parser.parse_args()
    if args.slice_us is not None and not 100 <= args.slice_us <= 100000:
        parser.error(f"--slice-us {args.slice_us}: accepted: 100..100000")

    try:
        import torch
    except ImportError as error:
        print(f"stmux-torch-tenant: PyTorch is not installed for {sys.executable}: {error}",
              file=sys.stderr)
        return 5
    if not torch.cuda.is_available():
        print("stmux-torch-tenant: PyTorch sees no usable CUDA device", file=sys.stderr)
        return 3
    if args.sync:
        try:
            set_sync(SYNC_FLAGS[args.sync])
        except (OSError, RuntimeError) as error:
            print(f"stmux-torch-tenant: --sync {args.sync}: {error}", file=sys.stderr)
            return 3
    if args.slice_us is not None:
        try:
            set_slice(args.slice_us)
        except (OSError, RuntimeError) as error:
            print(f"stmux-torch-tenant: --slice-us {args.slice_us}: {error}", file=sys.stderr)
            return 3
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32, as the cuBLAS tenants
    with torch.inference_mode():
        step = make_step(torch, args.workload, args.tenant)
        for _ in range(WARMUP_STEPS):
            step()
        write_atomically(args.ready, f"{os.getpid()}\n")
        give_up = time.time_ns() + int(args.wait_s * 1e9)
        span, next_look = None, 0
        while span is None:
            step()
            now = time.time_ns()
            if now < next_look:
                continue
            next_look = now + 1_000_000
            if os.path.exists(args.go):
                span = read_go(args.go)
            if span is None and now > give_up:
                print(f"stmux-torch-tenant: no go file {args.go} within {args.wait_s:g} s",
                      file=sys.stderr)
                return 4
        start, stop = span
        # tools/barrier.h: every step that ends in [start, stop) is counted;
        # every one that overlaps the span is timed, those crossing its
        # edges included, the one that crosses stop last.
        latencies = []
        clock = time.perf_counter_ns
        while True:
            begin = clock()
            step()
            took = clock() - begin
            ended = time.time_ns()
            if ended < start:
                continue
            latencies.append(took)
            if ended >= stop:
                break
    lines = [f"{len(latencies) - 1} {WORKLOADS[args.workload]} {ended}"]
    lines += [str(min(t, 2**32 - 1)) for t in latencies]
    write_atomically(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

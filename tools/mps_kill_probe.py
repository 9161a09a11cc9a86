#!/usr/bin/env python3
"""What a SIGKILL of one CUDA process does to another process's work on the
same GPU, with no stmux involved: the question behind stmuxd killed on MPS
(docs/ARCHITECTURE.md, "Known limits").

Each round starts a bystander, a PyTorch process checking small matrix
products in a loop, then a victim, a PyTorch process multiplying large
matrices back to back on its own memory; the victim is killed with SIGKILL
while its kernels run (or, with --victim idle, while it waits with nothing
on the GPU), and the bystander goes on for a few seconds more. One JSON line
per round tells whether the bystander's work came out right to the end.

Run it with and without an MPS control daemon started (it starts none):
  python3 tools/mps_kill_probe.py --rounds 3
Needs PyTorch with CUDA. Exit 0 when every round ran (whatever the
bystander saw), 2 on bad arguments, 1 when a round could not be run.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

VICTIM = r"""
import sys, time, torch
torch.backends.cuda.matmul.allow_tf32 = False
side, idle = int(sys.argv[1]), sys.argv[2] == "idle"
a = torch.randn(side, side, device="cuda")
b = torch.randn(side, side, device="cuda")
c = a @ b
torch.cuda.synchronize()
print("running", flush=True)
if idle:
    time.sleep(3600)
while True:
    for _ in range(4):
        c = a @ b  # queued back to back: the GPU never idles
    torch.cuda.synchronize()
"""

BYSTANDER = r"""
import json, sys, time, torch
torch.backends.cuda.matmul.allow_tf32 = False
x = torch.randn(256, 256, device="cuda")
want = (x.double() @ x.double()).float()
torch.cuda.synchronize()
print("ready", flush=True)
seconds = float(sys.stdin.readline())  # told once the victim runs
steps, started = 0, time.monotonic()
try:
    while time.monotonic() - started < seconds:
        y = x @ x
        torch.cuda.synchronize()
        steps += 1
        if not torch.allclose(y, want, rtol=1e-3, atol=1e-3):
            raise RuntimeError("a wrong product")
    print(json.dumps({"ok": True, "steps": steps}), flush=True)
except Exception as error:
    print(json.dumps({"ok": False, "steps": steps,
                      "after_s": round(time.monotonic() - started, 3),
                      "error": str(error).splitlines()[0][:200]}), flush=True)
"""


def wait_for_line(process, word, timeout_s):
    """Reads process's stdout until a line is `word`; False on end or time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            return False
        if line.strip() == word:
            return True
    return False


def one_round(args, number):
    bystander = subprocess.Popen([sys.executable, "-c", BYSTANDER], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait_for_line(bystander, "ready", 120):
        bystander.kill()
        raise RuntimeError(f"round {number}: the bystander did not start: "
                           f"{bystander.stderr.read()[-500:]}")
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(args.side), args.victim],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if not wait_for_line(victim, "running", 120):
        victim.kill()
        bystander.kill()
        raise RuntimeError(f"round {number}: the victim did not start")
    bystander.stdin.write(f"{args.bystander_seconds}\n")
    bystander.stdin.flush()
    time.sleep(args.kill_after_s)
    killed = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    ended_ms = (time.monotonic() - killed) * 1000
    out, err = bystander.communicate(timeout=args.bystander_seconds + 120)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"ok": False, "error": err.strip()[-200:]}
    result.update(round=number, victim=args.victim, side=args.side,
                  victim_ended_ms=round(ended_ms, 1),
                  mps=os.path.exists(os.environ.get("CUDA_MPS_PIPE_DIRECTORY",
                                                    "/tmp/nvidia-mps") + "/control"),
                  bystander_exit=bystander.returncode)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3)")
    parser.add_argument("--victim", choices=["busy", "idle"], default="busy",
                        help="killed with its kernels running (busy, the default) or idle")
    parser.add_argument("--side", type=int, default=8192,
                        help="the victim's matrices are side x side (default 8192)")
    parser.add_argument("--kill-after-s", type=float, default=1.0,
                        help="seconds the victim runs before its SIGKILL (default 1)")
    parser.add_argument("--bystander-seconds", type=float, default=6.0,
                        help="how long the bystander checks products (default 6)")
    args = parser.parse_args()
    if args.rounds < 1 or args.side < 1 or args.kill_after_s < 0:
        parser.error("--rounds and --side must be at least 1, --kill-after-s not negative")
    if args.bystander_seconds <= args.kill_after_s + 1:
        parser.error("--bystander-seconds must exceed --kill-after-s by more than 1")
    try:
        for number in range(1, args.rounds + 1):
            print(json.dumps(one_round(args, number)), flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"mps_kill_probe: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

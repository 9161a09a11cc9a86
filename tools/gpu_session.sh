#!/usr/bin/env bash
# Runs steps of stmux's GPU work on a machine with a CUDA device, each logged
# under $OUT (default gpu-logs/), with a short summary on stdout:
#   info build unit gpu launch bench transport handoff
# (bench takes its arguments from $BENCH_ARGS, e.g. "--shapes cube --tenants 1,32")
# e.g. bash tools/gpu_session.sh info build gpu launch
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu-logs}
build=${STMUX_BUILD_DIR:-build-gpu}
jobs=$(nproc)
mkdir -p "$out"
if [ $# -eq 0 ] || [ "$1" = "--help" ]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
status=0
for step in "$@"; do
  start=$(date +%s)
  case "$step" in
    info)
      { nvidia-smi; nproc; g++ --version | head -1; nvcc --version | tail -1; cmake --version | head -1; } \
        >"$out/info.log" 2>&1
      grep -E "NVIDIA H|Driver Version" "$out/info.log" | head -3 ;;
    build)
      generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
      if ! { cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTMUX_WERROR=ON \
             && cmake --build "$build" -j"$jobs"; } >"$out/build.log" 2>&1; then
        tail -40 "$out/build.log"; exit 1
      fi ;;
    unit)
      ctest --test-dir "$build" -L 'unit|e2e' -LE gpu -j"$jobs" --timeout 600 --output-on-failure \
        >"$out/unit.log" 2>&1 || status=1
      grep -E "tests passed|\*\*\*Failed|Timeout" "$out/unit.log" | tail -8 ;;
    gpu)
      ctest --test-dir "$build" -L gpu --timeout 900 --output-on-failure -V >"$out/gpu.log" 2>&1 || status=1
      grep -E "tests passed|\*\*\*Failed|Timeout|Skipped|Failure|FAIL " "$out/gpu.log" | tail -30 ;;
    launch)
      "$build/tools/stmux-launch-bench" >"$out/launch.log" 2>&1 || status=1
      cat "$out/launch.log" ;;
    transport)
      "$build/tools/stmux-transport-bench" --json "$out/transport.json" >"$out/transport.log" 2>&1 || status=1
      cat "$out/transport.log" ;;
    handoff)
      # Without MPS, then with an MPS control daemon of its own (stopped after).
      "$build/tools/stmux-handoff-bench" --json "$out/handoff.json" >"$out/handoff.log" 2>&1 || status=1
      mps=$(mktemp -d)
      if CUDA_MPS_PIPE_DIRECTORY=$mps CUDA_MPS_LOG_DIRECTORY=$mps nvidia-cuda-mps-control -d; then
        CUDA_MPS_PIPE_DIRECTORY=$mps "$build/tools/stmux-handoff-bench" --json "$out/handoff-mps.json" \
          >>"$out/handoff.log" 2>&1 || status=1
        echo quit | CUDA_MPS_PIPE_DIRECTORY=$mps nvidia-cuda-mps-control
      fi
      cat "$out/handoff.log" ;;
    bench)
      # Arguments in $BENCH_ARGS; per-run files stay in /tmp, the results come back.
      # shellcheck disable=SC2086
      "$build/tools/stmux-bench" --out /tmp/stmux-bench ${BENCH_ARGS:-} >"$out/bench.log" 2>&1 || status=1
      cp /tmp/stmux-bench/bench.json "$out/bench${BENCH_TAG:-}.json" 2>/dev/null
      python3 "$build/tools/stmux-plot" /tmp/stmux-bench/bench.json -o "$out/bench${BENCH_TAG:-}.png" \
        >/dev/null 2>&1
      grep -vE "^\[[0-9]+/" "$out/bench.log" | tail -45 ;;
    *) echo "unknown step '$step'; steps: info build unit gpu launch bench transport handoff" >&2; exit 2 ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s"
done
exit $status

#!/usr/bin/env bash
# The main job: builds stmux if needed, then runs a short stmux-bench
# comparison on this machine's GPU (time-slicing, MPS, stmux with its daemon,
# and the in-process ceiling), prints the table, the targets and a summary.
# Needs an NVIDIA GPU. Arguments go to stmux-bench (see its --help), e.g.
# --shapes rnn --tenants 1,16; STMUX_BUILD_DIR names the build directory.
set -euo pipefail
# --help: the comment above (stmux-bench --help lists the arguments).
case "${1:-}" in
  -h | --help)
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
esac
for arg in "$@"; do
  case $arg in
    --out | --out=*)
      echo "stmux: the demo writes its results to \$STMUX_BUILD_DIR/demo; for another folder" \
           "run stmux-bench --out itself" >&2
      exit 2
      ;;
  esac
done
cd "$(dirname "$0")/.."
build_dir=${STMUX_BUILD_DIR:-build}

# The GPU first, so that a machine without one learns it before a long build.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  echo "stmux: the demo needs an NVIDIA GPU, and this machine has no NVIDIA driver" \
       "(no nvidia-smi, no /dev/nvidia0); bash tools/test.sh builds and tests everything" \
       "that runs without one" >&2
  exit 1
fi
bash tools/build.sh
if ! gpus=$("$build_dir/tools/stmux-cublas-client" devices 2>&1); then
  echo "stmux: an NVIDIA driver is installed but no CUDA device is usable: $gpus;" \
       "bash tools/test.sh still builds and tests everything that runs without one" >&2
  exit 1
fi
echo "stmux: $gpus" >&2
if [ $# -eq 0 ]; then
  # About two minutes on an H200 with 16 cores (after a 45 s build): 10 rows
  # (32 tenants; five modes; two shapes), each with every tenant ready and
  # 3 s of common warm-up before its 3 timed seconds. stmux's rate at R = 32
  # rose for its first 3 to 4 s of serving (cube 256^3: about 300,000
  # GEMMs/s, then 320,000 to 340,000; docs/BENCHMARKS.md), so a shorter
  # warm-up measured the rise. These arguments and --tenants 1,32 add one
  # tenant alone.
  set -- --shapes cube,rnn --tenants 32 --seconds 3 --warmup 3
fi
echo "stmux: running stmux-bench $*; results in $build_dir/demo" >&2
status=0
# An earlier run's results must not pass for this one's.
rm -f "$build_dir/demo/bench.json" "$build_dir/demo/bench.png"
"$build_dir/tools/stmux-bench" --out "$build_dir/demo" "$@" || status=$?
if [ ! -f "$build_dir/demo/bench.json" ]; then
  echo "stmux: stmux-bench wrote no results (exit status $status); nothing to plot" >&2
  exit $status
fi
# The plot, by stmux-plot with whichever python3 has matplotlib.
for py in python3 /usr/bin/python3; do
  if "$py" -c 'import matplotlib' 2>/dev/null; then
    "$py" "$build_dir/tools/stmux-plot" "$build_dir/demo/bench.json" -o "$build_dir/demo/bench.png" &&
      echo "  plot: $build_dir/demo/bench.png"
    exit $status
  fi
done
echo "  no plot: matplotlib is not installed (apt-get install python3-matplotlib)"
exit $status

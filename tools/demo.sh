#!/usr/bin/env bash
# The main job: builds stmux if needed, then runs a short stmux-bench
# comparison on this machine's GPU (time-only, MPS, stmux with its daemon, and
# the in-process ceiling) and prints the table. Needs a CUDA device.
# Arguments go to stmux-bench (see --help), e.g. --shapes rnn --tenants 1,16.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${STMUX_BUILD_DIR:-build}
bash tools/build.sh >/dev/null
if ! "$build_dir/tools/stmux-cublas-client" devices; then
  echo "stmux: the demo needs a CUDA device, and this machine has none usable (see above);" \
       "bash tools/test.sh still builds and tests everything that runs without one" >&2
  exit 1
fi
if [ $# -eq 0 ]; then
  set -- --shapes cube,rnn --tenants 1,8,32 --seconds 1 --warmup 0.5
fi
exec "$build_dir/tools/stmux-bench" --out "$build_dir/demo" "$@"

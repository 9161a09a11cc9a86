#!/usr/bin/env bash
# The main job: build, start stmuxd, run a short comparison, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
[ -x build/daemon/stmuxd ] || missing+=("the daemon (stmuxd)")
[ -f build/shim/libstmux.so ] || missing+=("the preloaded library (libstmux.so)")
[ -x build/tools/stmux-bench ] || missing+=("the benchmark (stmux-bench)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "stmux: not built yet: ${missing[*]}; see README.md, 'Status'" >&2
  exit 1
fi

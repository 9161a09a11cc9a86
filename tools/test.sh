#!/usr/bin/env bash
# Installs what is missing, builds stmux and runs every test. GPU tests skip,
# saying so, where there is no GPU. CI runs exactly this (.ci/run). Extra
# arguments go to ctest, e.g. -L unit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
ctest --test-dir "${STMUX_BUILD_DIR:-build}" --output-on-failure -j"$(nproc 2>/dev/null || echo 2)" \
  --timeout 900 "$@"

#!/usr/bin/env bash
# Session 34: tenants under a CPU quota (issue 17). Rows: name mode quota args...
set -u
B=build-gpu/tools/stmux-bench
row() {
  local tag=$1 shape=$2 R=$3 mode=$4 q=$5; shift 5
  timeout 90 $B --out /tmp/q-$tag --shapes $shape --tenants $R --modes $mode --seconds 2 --warmup 1 \
    --tenant-cpu-quota $q "$@" > $OUT/q-$tag.log 2>&1
  grep -E '^(torch|cube)' $OUT/q-$tag.log | sed "s/^/$tag q=$q: /"
  cp /tmp/q-$tag/bench.json $OUT/q-$tag.json 2>/dev/null
}
for spec in ${QUOTA_ROWS:-}; do
  IFS=: read -r tag shape R mode q extra <<<"$spec"
  # shellcheck disable=SC2086
  row "$tag" "$shape" "$R" "$mode" "$q" ${extra//,/ }
done

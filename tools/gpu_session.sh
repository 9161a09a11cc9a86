#!/usr/bin/env bash
# Runs steps of stmux's GPU work on a machine with a CUDA device, each logged
# under $OUT (default gpu-logs/), with a short summary on stdout:
#   info build unit gpu asan launch drift bench transport handoff waiters sync wake slice modes wakers graphs
#   spinners placement demo2 demo10 fuzz fault fault-start fault-end hunt join asan-build
#   mpskill daemon-ab
# (bench takes its arguments from $BENCH_ARGS, e.g. "--shapes cube --tenants 1,32";
# gpu runs the GPU tests whose names match $GPU_TESTS, a ctest -R regex, e.g.
# "differential" (default all: more than one 600 s call may hold); asan
# builds everything with ASan+UBSan (<build>-asan) and runs those GPU tests
# (asan-build only builds);
# sync (variants $SYNC_VARIANTS, shapes $SYNC_SHAPES, a CPU quota per tenant $SYNC_QUOTA, $SYNC_ROUNDS rounds), slice (a shorter scheduler slice for MPS's tenants: $SLICE_US, $SLICE_ROUNDS, $SLICE_SHAPES), modes (MPS alone; host, stream, and stream with STMUX_STREAM_WAIT=kernel) and demo2
# (+ demo10) are the comparisons of issues 17, 12 and 18, each on one machine; $TENANTS overrides their tenant counts; waiters runs the
# hand-off on MPS with $WAITERS (default "0 31") other streams waiting on the
# GPU, on each thing they can wait on); fault runs stmux-fault with
# $FAULT_ARGS, e.g. "--soak-seconds 300" (docs/RELIABILITY.md), and
# fault-start the same in the background, for runs longer than one call,
# which fault-end collects; hunt runs
# $HUNT_PROCS stmux-differential processes making only the calls $HUNT_ONLY
# (--only flags; default the soak's wrong call's kind) selects, for
# $HUNT_SECONDS, beside stress tenants of a daemon, without and with the
# preload; join runs $JOIN_PROCS (default 4) stmux-join-probe processes of 16
# threads at once, with each compute kind, $JOIN_ITERATIONS (default 10000) a
# thread (CUDA alone keeping an event join on the legacy stream; no stmux);
# mpskill runs tools/mps_kill_probe.py (what a SIGKILLed CUDA process does to
# another's work, no stmux) on an MPS control daemon of its own, the victim
# busy ($MPSKILL_ROUNDS rounds, default 3) and idle (1), then without MPS; wakers compares stmux
# rows with $WAKERS waker threads (STMUX_DAEMON_WAKERS); graphs compares stmux rows with
# STMUX_LAUNCH_GRAPHS off and on; spinners compares stmux-on-MPS rows with
# $SPINNERS tenants at a time spinning (STMUX_SPINNING_TENANTS); drift splits the
# ceiling's loop over time into the host's call and the GPU's work
# (stmux-launch-bench --drift); placement confines stmuxd's threads to
# each CPU list of $PLACEMENTS (taskset); fuzz runs each carried libFuzzer target
# for $FUZZ_RUNS inputs; daemon-ab runs $BENCH_ARGS with this tree's stmuxd,
# the one of each of $OLD_TARBALL (gzipped git archives, space-separated), and
# this tree's again
# The GPU's clocks, power and temperature are sampled every 0.5 s throughout
# into $OUT/gpu-clocks.csv (nvidia-smi, read only), and the demo and bench
# steps print each row's SM clock beside its rate.
# e.g. bash tools/gpu_session.sh info build gpu launch
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu-logs}
build=${STMUX_BUILD_DIR:-build-gpu}
jobs=$(nproc)
mkdir -p "$out"
if [ $# -eq 0 ] || [ "$1" = "--help" ]; then
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
  exit 0
fi
status=0
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)  # the build steps'

# The card as the steps found it (METHOD.md: measure it as it is, never set
# its clocks): a sample every 0.5 s, the throttle reasons where this
# nvidia-smi knows the field.
fields=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu
for reasons in clocks_event_reasons.active clocks_throttle_reasons.active; do
  nvidia-smi -i 0 --query-gpu="$fields,$reasons" --format=csv >/dev/null 2>&1 && fields+=",$reasons" && break
done
nvidia-smi -i 0 --query-gpu="$fields" --format=csv,nounits -lms 500 >"$out/gpu-clocks.csv" 2>&1 &
sampler=$!
trap 'kill "$sampler" 2>/dev/null' EXIT

# Each valid row of a stmux-bench result ($1) with the SM clock (MHz) and
# power (W) sampled over its timed span, and the throttle reasons seen.
clocks_by_row() {
  python3 - "$1" "$out/gpu-clocks.csv" <<'PY'
import csv, datetime, json, sys
samples = []
with open(sys.argv[2]) as f:
    for line in csv.reader(f):
        try:
            when = datetime.datetime.strptime(line[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((when, float(line[1]), float(line[3]), line[5].strip() if len(line) > 5 else ""))
        except (ValueError, IndexError):
            continue  # the header, or a field the card does not report
for p in json.load(open(sys.argv[1]))["points"]:
    span = p.get("span_unix_s")
    inside = [s for s in samples if span and span[0] <= s[0] <= span[1]]
    if not inside:
        continue
    sm = [s[1] for s in inside]
    reasons = sorted({s[3] for s in inside} - {"", "0x0000000000000000"})
    print(f"{p['shape']} R={p['tenants']} {p['mode']}: {p['gemms_per_s']:,.0f}/s; SM {min(sm):.0f}-{max(sm):.0f} MHz"
          f" (mean {sum(sm) / len(sm):.0f}), {sum(s[2] for s in inside) / len(inside):.0f} W,"
          f" {len(inside)} samples{'; reasons ' + ' '.join(reasons) if reasons else ''}")
PY
}
# Rows of mode $5 (default stmux) at $TENANTS (default 8,32) with stmuxd's
# --$2 set to each of the values $3, for shapes $4, twice round after round
# so that drift shows; one log per value and round, $1 naming them.
daemon_flag_rows() {
  local tag=$1 flag=$2 values=$3 shapes=$4 mode=${5:-stmux} round value
  for round in 1 2; do
    for value in $values; do
      "$build/tools/stmux-bench" --out "/tmp/stmux-$tag-$value-$round" --shapes "$shapes" \
        --tenants "${TENANTS:-8,32}" --modes "$mode" --seconds 3 --stmuxd-args "--$flag=$value" \
        >"$out/$tag-$value-$round.log" 2>&1 || status=1
      grep -E "^(cube|rnn|torch)|^round|^   " "$out/$tag-$value-$round.log" | grep -v "numbers:" |
        sed "s/^/$tag $value, round $round: /"
    done
  done
}
for step in "$@"; do
  start=$(date +%s)
  case "$step" in
    info)
      { nvidia-smi; nproc; lscpu || grep -m1 'model name' /proc/cpuinfo; g++ --version | head -1; nvcc --version | tail -1; cmake --version | head -1; } \
        >"$out/info.log" 2>&1
      grep -E "NVIDIA H|Driver Version" "$out/info.log" | head -3 ;;
    build)
      if ! { cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTMUX_WERROR=ON \
             && cmake --build "$build" -j"$jobs"; } >"$out/build.log" 2>&1; then
        tail -40 "$out/build.log"; exit 1
      fi ;;
    unit)
      ctest --test-dir "$build" -L 'unit|e2e' -LE gpu -j"$jobs" --timeout 600 --output-on-failure \
        >"$out/unit.log" 2>&1 || status=1
      grep -E "tests passed|\*\*\*Failed|Timeout" "$out/unit.log" | tail -8 ;;
    gpu)
      ctest --test-dir "$build" -L gpu -R "${GPU_TESTS:-.}" --timeout 900 --output-on-failure -V \
        >"$out/gpu.log" 2>&1 || status=1
      grep -E "tests passed|\*\*\*Failed|Timeout|Skipped|Failure|FAIL " "$out/gpu.log" | tail -30
      # On the GPU machine a test skipped for want of a device found none.
      if grep -q "GPU test skipped: .*no CUDA device" "$out/gpu.log"; then
        echo "stmux: GPU tests skipped for want of a CUDA device on the GPU machine" >&2
        status=1
      fi ;;
    asan-build|asan)
      # Issue 14: the GPU tests under ASan+UBSan, every target built with
      # them; sanitizer options as tools/test.sh sets them, and what NVIDIA's
      # libraries keep to the end left out of the leak report. asan-build
      # only builds (no GPU used: it may run beside the soak, whose check of
      # the GPU's memory another GPU process would spoil); asan then builds
      # what changed and runs the tests.
      if ! STMUX_BUILD_DIR="$build-asan" STMUX_SANITIZE=address,undefined bash tools/build.sh \
           >"$out/$step.log" 2>&1; then
        tail -40 "$out/$step.log"; exit 1
      fi
      if [ "$step" = asan ]; then
        ASAN_OPTIONS=${ASAN_OPTIONS:-protect_shadow_gap=0:detect_leaks=1:verify_asan_link_order=0} \
        LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tools/lsan-cuda.supp:print_suppressions=0} \
        UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
        STMUX_DIFF_CALLS=${STMUX_DIFF_CALLS:-20000} \
          ctest --test-dir "$build-asan" -L gpu -R "${GPU_TESTS:-.}" --timeout 900 --output-on-failure -V \
          >"$out/asan.log" 2>&1 || status=1
        grep -E "tests passed|\*\*\*Failed|Timeout|Skipped|ERROR: (Address|Leak)Sanitizer|runtime error|SUMMARY" \
          "$out/asan.log" | sort | uniq -c | sort -rn | head -30
        if grep -q "GPU test skipped: .*no CUDA device" "$out/asan.log"; then
          echo "stmux: GPU tests skipped for want of a CUDA device under ASan" >&2
          status=1
        fi
      fi ;;
    drift)
      # Issue 18: where a ceiling row's rate moves between runs: the ceiling's
      # loop, rnn then cube, $DRIFT_SECONDS (default 8) each, in
      # $DRIFT_ROUNDS (default 3) fresh processes, every half second split
      # into the host's cuBLAS call and the GPU's work.
      for round in $(seq "${DRIFT_ROUNDS:-3}"); do
        for shape in 512x1x512 256x256x256; do
          "$build/tools/stmux-launch-bench" --drift "${DRIFT_SECONDS:-8}" --shape "$shape" \
            >"$out/drift-$shape-$round.log" 2>&1 || status=1
          tail -2 "$out/drift-$shape-$round.log" | tr '\n' ' ' | sed "s/^/$shape, round $round: /"; echo
        done
      done ;;
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
    mpskill)
      mps=$(mktemp -d)
      if CUDA_MPS_PIPE_DIRECTORY=$mps CUDA_MPS_LOG_DIRECTORY=$mps nvidia-cuda-mps-control -d; then
        for victim in "busy ${MPSKILL_ROUNDS:-3}" "idle 1"; do
          read -r kind rounds <<<"$victim"
          CUDA_MPS_PIPE_DIRECTORY=$mps timeout 300 python3 tools/mps_kill_probe.py --victim "$kind" \
            --rounds "$rounds" >>"$out/mpskill-mps.log" 2>&1 || status=1
        done
        echo quit | CUDA_MPS_PIPE_DIRECTORY=$mps nvidia-cuda-mps-control
      else
        status=1
      fi
      timeout 300 python3 tools/mps_kill_probe.py --rounds 2 >"$out/mpskill-plain.log" 2>&1 || status=1
      [ -f "$out/mpskill-mps.log" ] && sed 's/^/on MPS: /' "$out/mpskill-mps.log"
      sed 's/^/no MPS: /' "$out/mpskill-plain.log" ;;
    waiters)
      # Issue 12: what streams waiting on the GPU, as stream-ordered tenants'
      # do, cost another process's hand-off; on an MPS control daemon of its own.
      mps=$(mktemp -d)
      if CUDA_MPS_PIPE_DIRECTORY=$mps CUDA_MPS_LOG_DIRECTORY=$mps nvidia-cuda-mps-control -d; then
        for n in ${WAITERS:-0 31}; do
          for on in none host device kernel hostfn; do
            [ "$n" = 0 ] && [ "$on" != none ] && continue
            echo "-- $n waiters on $on" >>"$out/waiters.log"
            CUDA_MPS_PIPE_DIRECTORY=$mps "$build/tools/stmux-handoff-bench" --mechanisms alone,host,memop,hostfn \
              --rounds 2000 --waiters "$n" --wait-on "$on" --json "$mps/waiters-$n-$on.json" \
              >>"$out/waiters.log" 2>&1 || status=1
          done
        done
        echo quit | CUDA_MPS_PIPE_DIRECTORY=$mps nvidia-cuda-mps-control
        # One file of all the runs' results (few files come back from a GPU machine).
        python3 -c 'import json, sys; print(json.dumps([json.load(open(f)) for f in sys.argv[1:]], indent=1))' \
          "$mps"/waiters-*.json >"$out/waiters.json"
      else
        echo "waiters: could not start an MPS control daemon" >>"$out/waiters.log"; status=1
      fi
      cat "$out/waiters.log" ;;
    bench)
      # Arguments in $BENCH_ARGS; per-run files stay in /tmp, the results come back.
      # shellcheck disable=SC2086
      "$build/tools/stmux-bench" --out /tmp/stmux-bench ${BENCH_ARGS:-} >"$out/bench.log" 2>&1 || status=1
      cp /tmp/stmux-bench/bench.json "$out/bench${BENCH_TAG:-}.json" 2>/dev/null
      python3 "$build/tools/stmux-plot" /tmp/stmux-bench/bench.json -o "$out/bench${BENCH_TAG:-}.png" \
        >/dev/null 2>&1
      grep -vE "^\[[0-9]+/" "$out/bench.log" | tail -45
      clocks_by_row /tmp/stmux-bench/bench.json | tee -a "$out/bench.log" ;;
    daemon-ab)
      # A change to stmuxd measured against other trees, in one call: each
      # of $OLD_TARBALL (one or more, space-separated: `git archive <commit>
      # | gzip`, carried with the work tree) is unpacked and its stmuxd alone
      # built, then stmux-bench runs $BENCH_ARGS with this tree's stmuxd,
      # each other one in turn (--stmuxd), and this tree's again, so that
      # drift over the call shows; everything but the daemon is this tree's.
      # Each run is named after its tarball (new, <name>..., new-again).
      read -r -a tarballs <<<"${OLD_TARBALL:-}"
      if [ ${#tarballs[@]} -eq 0 ]; then
        echo "stmux: daemon-ab needs OLD_TARBALL, gzipped git archives of the trees to compare with" >&2
        status=1; continue
      fi
      runs=(new); declare -A daemons=([new]=$build/daemon/stmuxd [new-again]=$build/daemon/stmuxd)
      for tarball in "${tarballs[@]}"; do
        name=$(basename "$tarball"); name=${name%%.*}
        old=/tmp/stmux-ab-tree-$name
        if [ ! -f "$tarball" ] || [ -n "${daemons[$name]:-}" ]; then
          echo "stmux: daemon-ab: $tarball is not a file, or its name ($name) is taken" >&2
          status=1; continue 2
        fi
        rm -rf "$old" && mkdir -p "$old" && tar xzf "$tarball" -C "$old"
        if ! { cmake -S "$old" -B "$old/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
               && cmake --build "$old/build" -j"$jobs" --target stmuxd; } >"$out/daemon-ab-build-$name.log" 2>&1; then
          tail -20 "$out/daemon-ab-build-$name.log"; status=1; continue 2
        fi
        runs+=("$name"); daemons[$name]=$old/build/daemon/stmuxd
      done
      runs+=(new-again)
      for run in "${runs[@]}"; do
        # shellcheck disable=SC2086  # BENCH_ARGS is split into flags on purpose
        "$build/tools/stmux-bench" --out "/tmp/stmux-ab-$run" --stmuxd "${daemons[$run]}" ${BENCH_ARGS:-} \
          >"$out/daemon-ab-$run.log" 2>&1 || status=1
        cp "/tmp/stmux-ab-$run/bench.json" "$out/daemon-ab-$run.json" 2>/dev/null
        grep -E "^(cube|rnn|resnet|mixed|torch|[0-9]+x)" "$out/daemon-ab-$run.log" | sed "s/^/$run: /"
      done ;;
    sync)
      # Issue 17: how tenants wait. stmux on MPS with STMUX_SYNC=keep and
      # auto, MPS alone with its tenants spinning (CUDA's default) and
      # blocking, and for the cuBLAS tenants stmux off MPS (which admits
      # more than MPS's 48 clients: R = 48 and beyond) with auto; one rows
      # line per variant in sync.log.
      # $SYNC_VARIANTS picks variants by tag (default all but the yield
      # ones, serve (auto with every call served) and the slice ones
      # (auto-slice: auto with STMUX_SLICE_US=$SLICE_US, default 100;
      # mps-yield-slice: MPS alone's tenants yielding, with --slice-us)),
      # $SYNC_SHAPES the shapes;
      # $SYNC_QUOTA puts each tenant under a CPU quota of that many cores
      # (stmux-bench --tenant-cpu-quota); $SYNC_ROUNDS (default 1) runs the
      # variants that many times in turn, each round's tags prefixed rN-.
      for round in $(seq "${SYNC_ROUNDS:-1}"); do
        for variant in "keep stmux-mps --tenant-env STMUX_SYNC=keep" \
                       "auto stmux-mps --tenant-env STMUX_SYNC=auto" \
                       "yield stmux-mps --tenant-env STMUX_SYNC=yield" \
                       "serve stmux-mps --tenant-env STMUX_SYNC=auto --tenant-env STMUX_ROUTE=serve" \
                       "auto-slice stmux-mps --tenant-env STMUX_SYNC=auto --tenant-env STMUX_SLICE_US=${SLICE_US:-100}" \
                       "auto-plain stmux --tenant-env STMUX_SYNC=auto --shapes cube" \
                       "mps-spin mps" "mps-yield mps --tenant-args=--sync=yield" \
                       "mps-yield-slice mps --tenant-args=--sync=yield --tenant-args=--slice-us=${SLICE_US:-100}" \
                       "mps-blocking mps --tenant-args=--sync=blocking"; do
          # shellcheck disable=SC2086  # the variant's words are its arguments
          set -- $variant
          tag=$1 mode=$2; shift 2
          [[ " ${SYNC_VARIANTS:-keep auto auto-plain mps-spin mps-blocking} " == *" $tag "* ]] || continue
          [ "${SYNC_ROUNDS:-1}" = 1 ] || tag="r$round-$tag"
          "$build/tools/stmux-bench" --out "/tmp/stmux-sync-$tag" --shapes "${SYNC_SHAPES:-cube,torch-rnn,torch-cube}" \
            --tenants "${TENANTS:-8,32,48}" --modes "$mode" ${SYNC_QUOTA:+--tenant-cpu-quota "$SYNC_QUOTA"} \
            "$@" >"$out/sync-$tag.log" 2>&1 || status=1
          cp "/tmp/stmux-sync-$tag/bench.json" "$out/sync-$tag.json" 2>/dev/null
          grep -E "^(cube|torch)" "$out/sync-$tag.log" | sed "s/^/$tag: /"
        done
      done ;;
    wake)
      # Issue 17: the CPU's share of a tenant's tail, no GPU: how late a
      # spinning, yielding or blocking process gets its core back at each of
      # $TENANTS (default 16,32,48) processes, with the kernel's slice and
      # $SLICE_US (default 100).
      procs_list=${TENANTS:-16,32,48}
      for procs in ${procs_list//,/ }; do
        "$build/tools/stmux-wake-probe" --procs "$procs" --slice-us "0,${SLICE_US:-100}" \
          --json "$out/wake-$procs.json" >"$out/wake-$procs.log" 2>&1 || status=1
        cat "$out/wake-$procs.log"
      done ;;
    slice)
      # Issue 17: what a shorter EEVDF slice (sched_setattr, Linux 6.12 and
      # later; the tenants' --slice-us) does to the tails: MPS alone, its
      # tenants spinning and yielding, with the kernel's slice and with
      # $SLICE_US us (default 100), $SLICE_ROUNDS rounds (default 2) of
      # shapes $SLICE_SHAPES (default torch-rnn,cube) at $TENANTS (32,48).
      for round in $(seq "${SLICE_ROUNDS:-2}"); do
        for sync in spin yield; do
          for slice in "" "${SLICE_US:-100}"; do
            tag="r$round-$sync${slice:+-slice$slice}"
            "$build/tools/stmux-bench" --out "/tmp/stmux-slice-$tag" \
              --shapes "${SLICE_SHAPES:-torch-rnn,cube}" --tenants "${TENANTS:-32,48}" --modes mps \
              --tenant-args="--sync=$sync${slice:+ --slice-us=$slice}" >"$out/slice-$tag.log" 2>&1 ||
              status=1
            cp "/tmp/stmux-slice-$tag/bench.json" "$out/slice-$tag.json" 2>/dev/null
            grep -E "^(cube|torch)" "$out/slice-$tag.log" | sed "s/^/$tag: /"
          done
        done
      done ;;
    modes)
      # Issue 12: host against stream-ordered mode on MPS, the latter with
      # each wait (STMUX_STREAM_WAIT), with where a round's time goes;
      # tenants' CUDA waits as STMUX_SYNC=auto sets them; and first MPS
      # alone, the same shapes, for the targets' ratios.
      for mode in mps host stream stream-kernel; do
        wait=memop; [ "$mode" = stream-kernel ] && wait=kernel
        modes=stmux-mps shim_mode=${mode%-kernel}
        [ "$mode" = mps ] && modes=mps shim_mode=host  # no preload there: unread
        "$build/tools/stmux-bench" --out "/tmp/stmux-modes-$mode" --shapes cube,rnn,torch-rnn,torch-cube \
          --tenants "${TENANTS:-1,32}" --modes "$modes" --tenant-env "STMUX_MODE=$shim_mode" \
          --tenant-env "STMUX_STREAM_WAIT=$wait" \
          --tenant-env STMUX_SYNC=auto >"$out/modes-$mode.log" 2>&1 || status=1
        cp "/tmp/stmux-modes-$mode/bench.json" "$out/modes-$mode.json" 2>/dev/null
        grep -E "^(cube|rnn|torch)|^round|^  " "$out/modes-$mode.log" | grep -v "numbers:" | sed "s/^/$mode: /"
      done ;;
    wakers)
      # STMUX_DAEMON_WAKERS (daemon/waker.h): stmux rows with each of $WAKERS
      # (default "0 1 2 4") waker threads.
      daemon_flag_rows wakers daemon-wakers "${WAKERS:-0 1 2 4}" "${WAKER_SHAPES:-rnn,cube}" ;;
    graphs)
      # STMUX_LAUNCH_GRAPHS (daemon/launch_graphs.h): stmux rows with it off
      # and on; each row's round breakdown (launch is the executor's host
      # time), and its note says what share of the batches were replays.
      daemon_flag_rows graphs launch-graphs "off on" "${GRAPH_SHAPES:-rnn,cube}" ;;
    spinners)
      # Issue 17: STMUX_SPINNING_TENANTS (daemon/server.cc), stmux on MPS
      # rows with each of $SPINNERS (default "0 4 8 12") tenants at a time
      # spinning while they wait, the rest blocking (STMUX_SYNC=auto, the
      # default), at $TENANTS (default 8,32).
      daemon_flag_rows spinners spinning-tenants "${SPINNERS:-0 4 8 12}" \
        "${SPINNER_SHAPES:-cube,torch-rnn,torch-cube}" stmux-mps ;;
    placement)
      # Issues 17 and 18: stmux rows with stmuxd's threads confined (taskset)
      # to each CPU list of $PLACEMENTS (default: unconfined, 4 CPUs of
      # distinct physical cores and, where cores have hyperthreads, the 4
      # hyperthreads of 2 cores), at $TENANTS (default 32), round after round
      # twice; the CPUs' topology first, one log per variant and round.
      firsts=() pairs=()
      : >"$out/topology.log"
      for c in /sys/devices/system/cpu/cpu[0-9]*; do
        list=$(cat "$c/topology/thread_siblings_list") n=${c##*/cpu}
        echo "${c##*/} core $(cat "$c/topology/core_id") package $(cat "$c/topology/physical_package_id")" \
          "siblings $list" >>"$out/topology.log"
        [ "${list%%[,-]*}" = "$n" ] && firsts+=("$n") && [ "$list" != "$n" ] && pairs+=("$list")
      done
      echo "$(nproc) CPUs, ${#firsts[@]} physical cores"
      variants=${PLACEMENTS:-all $(IFS=,; echo "${firsts[*]:0:4}") ${pairs[1]:+${pairs[0]},${pairs[1]}}}
      stmuxd=$(realpath "$build/daemon/stmuxd")
      for cpus in $variants; do  # a wrapper that confines stmuxd, for each list
        [ "$cpus" = all ] && continue
        printf '#!/bin/sh\nexec taskset -c %s %s "$@"\n' "$cpus" "$stmuxd" >"/tmp/stmuxd-on-${cpus//[,-]/_}"
        chmod +x "/tmp/stmuxd-on-${cpus//[,-]/_}"
      done
      for round in 1 2; do
        for cpus in $variants; do
          daemon=$stmuxd
          [ "$cpus" != all ] && daemon=/tmp/stmuxd-on-${cpus//[,-]/_}
          "$build/tools/stmux-bench" --out "/tmp/stmux-placement" --shapes "${PLACEMENT_SHAPES:-cube,rnn}" \
            --tenants "${TENANTS:-32}" --modes stmux --stmuxd "$daemon" \
            >"$out/placement-${cpus//[,-]/_}-$round.log" 2>&1 || status=1
          grep -E "^(cube|rnn|torch)|^   " "$out/placement-${cpus//[,-]/_}-$round.log" | grep -v "numbers:" |
            sed "s/^/cpus $cpus, round $round: /"
        done
      done ;;
    demo2)
      # Issue 18: the demo twice, each from a fresh clone and build.
      for n in 1 2; do
        fresh=$(mktemp -d)/stmux
        # A copy of the tree's files without build directories or .git, which
        # is what a fresh clone holds: a .git on the GPU machine need not be
        # this tree's (one there once held an older commit, and its clone ran
        # old code).
        mkdir -p "$fresh" && tar -cf - --exclude='./build*' --exclude="./$out" --exclude=./.git . |
          tar -xf - -C "$fresh" || exit 1
        ( cd "$fresh" && time bash tools/demo.sh ) >"$out/demo$n.log" 2>&1 || status=1
        cp "$fresh/build/demo/bench.json" "$out/demo$n.json" 2>/dev/null
        grep -E "^(cube|rnn)[^ ]* +32 " "$out/demo$n.log" | sed "s/^/demo $n: /"
        clocks_by_row "$out/demo$n.json" | sed "s/^/demo $n clocks: /"
      done
      # Issue 18's criterion: each R = 32 row's two rates, and how far apart
      # (the larger over the smaller); demo10's rows are the third to compare.
      python3 - "$out/demo1.json" "$out/demo2.json" <<'PY'
import json, sys
rates = [{(p["shape"], p["mode"]): p["gemms_per_s"] for p in json.load(open(f))["points"]
          if p["tenants"] == 32 and p.get("valid")} for f in sys.argv[1:]]
for key in sorted(set(rates[0]) & set(rates[1])):
    a, b = rates[0][key], rates[1][key]
    print(f"demo spread {key[0]} {key[1]}: {a:,.0f} / {b:,.0f}: {100 * (max(a, b) / min(a, b) - 1):.1f}%")
PY
      ;;
    demo10)
      # Issue 18's yardstick for demo2: the demo's rows (R = 32, its 3 s
      # warm-up) for 10 s each (its own step: the two demos and this do not
      # fit one 600 s call).
      "$build/tools/stmux-bench" --out /tmp/stmux-demo10 --shapes cube,rnn --tenants 32 \
        --seconds 10 --warmup 3 >"$out/demo10.log" 2>&1 || status=1
      cp /tmp/stmux-demo10/bench.json "$out/demo10.json" 2>/dev/null
      grep -E "^(cube|rnn)" "$out/demo10.log" | sed "s/^/10 s: /"
      clocks_by_row "$out/demo10.json" | sed "s/^/10 s clocks: /" ;;
    fuzz)
      # Issue 14: each libFuzzer target for $FUZZ_RUNS inputs (default 10^7)
      # over every core, from a fuzz build made elsewhere (clang need not be
      # here) and carried in $FUZZ_DIR (default build-fuzz/tests/fuzz): its
      # seeds, then its corpus; $FUZZ_TARGETS picks targets (default all).
      # Crashes and sanitizer reports are counted; what failed is kept in $out.
      dir=$(realpath "${FUZZ_DIR:-build-fuzz/tests/fuzz}")
      for target in ${FUZZ_TARGETS:-fuzz_ring fuzz_operands fuzz_json fuzz_handshake fuzz_control}; do
        begun=$(date +%s) work=$(mktemp -d) artifacts=$(realpath "$out")/$target-
        mkdir -p "$work/seeds" "$work/corpus"
        STMUX_FUZZ_SEEDS="$work/seeds" "$dir/$target" >/dev/null 2>&1
        [ -d "$dir/runs/$target/corpus" ] && cp -r "$dir/runs/$target/corpus/." "$work/corpus/"
        ( cd "$work" && "$dir/$target" -jobs="$jobs" -workers="$jobs" -runs=$(( ${FUZZ_RUNS:-10000000} / jobs )) \
            -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 -artifact_prefix="$artifacts" \
            corpus seeds ) >"$out/fuzz-$target.log" 2>&1 || status=1
        for log in "$work"/fuzz-*.log; do echo "== ${log##*/}"; tail -12 "$log"; done >>"$out/fuzz-$target.log"
        inputs=$(cat "$work"/fuzz-*.log | awk '/stat::number_of_executed_units/ {n += $2} END {print n + 0}')
        reports=$(cat "$work"/fuzz-*.log | grep -cE "ERROR: libFuzzer|SUMMARY: [A-Za-z]+Sanitizer|runtime error")
        echo "$target: $inputs inputs over $jobs jobs, $reports reports, $(( $(date +%s) - begun )) s"
        [ "$reports" = 0 ] || status=1
      done ;;
    fault)
      # shellcheck disable=SC2086  # FAULT_ARGS is split into flags on purpose
      "$build/tools/stmux-fault" ${FAULT_ARGS:-} --out /tmp/stmux-fault >"$out/fault.log" 2>&1 || status=1
      cp /tmp/stmux-fault/fault.json "$out/fault.json" 2>/dev/null
      grep -vE "^\[soak\] [0-9]+ of" "$out/fault.log" | tail -40 ;;
    fault-start)
      # The fault suite (e.g. issue 14's 10-minute soak) outlasts one 600 s
      # call: stmux-fault with $FAULT_ARGS in a process session of its own,
      # which the device machine leaves running when the call returns (until
      # the machine goes back: keep the next call within its warm time).
      # Only steps that use no GPU (asan-build) should run meanwhile: each
      # scenario compares the GPU's memory in use before and after, which
      # another GPU process spoils. fault-end waits for it and brings its
      # results back. The background shell holds none of this script's
      # output: a caller reading it through a pipe (| tail) would otherwise
      # wait for the whole run.
      bg=/tmp/stmux-fault-bg
      rm -rf "$bg" && mkdir -p "$bg"
      # shellcheck disable=SC2086,SC2016  # FAULT_ARGS split on purpose; the inner
      # shell expands its own arguments
      setsid bash -c '"$@" >"$0/fault.log" 2>&1 </dev/null; echo $? >"$0/rc"' "$bg" \
        "$(realpath "$build/tools/stmux-fault")" ${FAULT_ARGS:-} --out "$bg/out" </dev/null >/dev/null 2>&1 &
      echo "stmux-fault ${FAULT_ARGS:-} started in the background (session $!); logs in $bg" ;;
    fault-end)
      # Waits (at most $FAULT_WAIT_S, default 540 s) for fault-start's run.
      bg=/tmp/stmux-fault-bg
      if [ ! -f "$bg/fault.log" ]; then
        echo "fault-end: no fault-start ran on this machine ($bg/fault.log is missing)"; exit 1
      fi
      while [ ! -f "$bg/rc" ] && [ $(( $(date +%s) - start )) -lt "${FAULT_WAIT_S:-540}" ]; do sleep 5; done
      cp "$bg/fault.log" "$out/fault.log"
      cp "$bg/out/fault.json" "$out/fault.json" 2>/dev/null
      if [ -f "$bg/rc" ]; then
        echo "stmux-fault exited $(cat "$bg/rc")"
        [ "$(cat "$bg/rc")" = 0 ] || status=1
      else
        echo "stmux-fault is still running: call fault-end again"; status=1
      fi
      grep -vE "^\[soak\] [0-9]+ of" "$out/fault.log" | tail -40 ;;
    hunt)
      # A kind of call under load, e.g. the soak's open mismatch
      # (docs/RELIABILITY.md): $HUNT_PROCS differential processes of
      # $HUNT_THREADS threads (default 3), each drawing calls for
      # $HUNT_SECONDS (default 60; at most $HUNT_CALLS calls, if set), each
      # write's copies held $HUNT_DELAY_US (default 2000; 0 holds none) on
      # their stream first, so that a call not ordered after them finds them
      # late nearly every time; beside $HUNT_LOAD stress tenants of 2 threads
      # served by a daemon of its own; first without the preload (CUDA alone),
      # then with it, in STMUX_MODE=$HUNT_MODE (default host) and, as in the
      # differential suite, STMUX_ROUTE=serve (auto may send a lone process
      # off MPS direct). Mismatch and totals lines in hunt.log. By default
      # the kind of call the soak found wrong.
      soak_case="--only write=event_other_stream --only alloc=managed"
      dir=$(mktemp -d)
      "$build/daemon/stmuxd" --socket "$dir/sock" >"$dir/stmuxd.log" 2>&1 &
      daemon=$!
      for _ in $(seq 100); do [ -S "$dir/sock" ] && break; sleep 0.1; done
      preload=(LD_PRELOAD="$(realpath "$build/shim/libstmux.so")" STMUX_SOCKET="$dir/sock"
               STMUX_MODE="${HUNT_MODE:-host}" STMUX_ROUTE=serve)
      for with in no yes; do
        load=()
        for i in $(seq "${HUNT_LOAD:-6}"); do
          env "${preload[@]}" "$build/tools/stmux-cublas-client" stress --seconds "$(( ${HUNT_SECONDS:-60} + 60 ))" \
            --threads 2 --seed "$i" >"$dir/load-$with-$i.log" 2>&1 &
          load+=($!)
        done
        procs=()
        for i in $(seq "${HUNT_PROCS:-8}"); do
          [ "$with" = yes ] && env=("${preload[@]}") || env=()
          # shellcheck disable=SC2086  # HUNT_ONLY is split into flags on purpose
          env ${env[@]+"${env[@]}"} "$build/tools/stmux-differential" --threads "${HUNT_THREADS:-3}" \
            --calls "${HUNT_CALLS:-1000000000}" --seconds "${HUNT_SECONDS:-60}" --delay-writes-us "${HUNT_DELAY_US:-2000}" \
            --quiet ${HUNT_ONLY:-$soak_case} \
            >"$dir/diff-$with-$i.log" 2>&1 &
          procs+=($!)
        done
        for p in "${procs[@]}"; do wait "$p" || status=1; done
        kill "${load[@]}" 2>/dev/null; wait "${load[@]}" 2>/dev/null
        for i in $(seq "${HUNT_PROCS:-8}"); do
          grep -hE "^(seed|MISMATCH|calls |elapsed)" "$dir/diff-$with-$i.log" | sed "s/^/preload $with: /"
        done >>"$out/hunt.log"
        grep -c MISMATCH "$dir"/diff-$with-*.log | awk -F: -v w="$with" '{n += $2} END {print "preload " w ": " n " mismatches"}'
      done
      kill -TERM "$daemon"; wait "$daemon"
      cp "$dir/stmuxd.log" "$out/hunt-stmuxd.log" ;;
    join)
      for compute in kernel copy; do
        pids=()
        for i in $(seq "${JOIN_PROCS:-4}"); do
          "$build/tools/stmux-join-probe" --compute "$compute" --iterations "${JOIN_ITERATIONS:-10000}" \
            >"$out/join-$compute-$i.log" 2>&1 &
          pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || status=1; done
        grep -h '^iterations' "$out"/join-"$compute"-*.log |
          awk -v c="$compute" '{n += $2; w += $4} END {print "join " c ": iterations " n " wrong " w}'
        grep -h WRONG "$out"/join-"$compute"-*.log | head -5
      done ;;
    *) echo "unknown step '$step'; steps: info build unit gpu asan launch drift bench transport handoff waiters sync wake slice modes wakers graphs spinners placement demo2 demo10 fuzz fault fault-start fault-end hunt join asan-build mpskill daemon-ab" >&2; exit 2 ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s"
done
exit $status

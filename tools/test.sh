#!/usr/bin/env bash
# Installs what is missing, builds stmux and runs every test. GPU tests skip,
# saying so, where there is no GPU. CI runs exactly this (.ci/run), all passes.
# Five passes, each in a build directory of its own (docs/TESTING.md says what
# runs in each and why):
#   normal  ${STMUX_BUILD_DIR:-build}   every test
#   asan    <build dir>-asan            ASan+UBSan (g++): every test that needs no GPU
#   tsan    <build dir>-tsan            TSan (g++): every test that needs no GPU
#   fuzz    <build dir>-fuzz            clang: each libFuzzer target for
#                                       STMUX_FUZZ_SECONDS (default 20) seconds
#   package <build dir>-deb             the Debian package (tools/package.sh),
#                                       built and checked (tests/package_check.sh)
# STMUX_TEST_PASSES picks passes, e.g. STMUX_TEST_PASSES=normal for the quick
# one (default: "normal asan tsan fuzz package"). Extra arguments go to the normal
# pass's ctest, e.g. -L unit. A pass whose tests fail does not stop the next;
# the script fails at the end if any did.
set -euo pipefail
# --help: the comment above.
case "${1:-}" in
  -h | --help)
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
esac
cd "$(dirname "$0")/.."
build_dir=${STMUX_BUILD_DIR:-build}
jobs=$(nproc 2>/dev/null || echo 2)
passes=${STMUX_TEST_PASSES:-normal asan tsan fuzz package}
for pass in $passes; do
  case $pass in
    normal | asan | tsan | fuzz | package) ;;
    *)
      echo "stmux: STMUX_TEST_PASSES names '$pass'; accepted: normal, asan, tsan, fuzz, package" >&2
      exit 2
      ;;
  esac
done

# Every sanitizer report ends the program with an error (the builds add
# -fno-sanitize-recover=all), so a test that triggers one fails. The CUDA
# driver needs ASan's shadow gap unprotected (a CPU-only run does not care).
# The e2e tests preload libstmux.so, which puts it ahead of the ASan runtime
# in the load order; ASan refuses that unless told not to verify it
# (docs/TESTING.md says why it still works).
export ASAN_OPTIONS=${ASAN_OPTIONS:-protect_shadow_gap=0:detect_leaks=1:verify_asan_link_order=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

summary=()
failed=0
seconds() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# run_pass NAME TITLE DIR [VAR=VALUE...] -- [CTEST ARGS...]: builds into DIR
# with tools/build.sh under those variables (a failed build stops everything),
# then runs ctest there; times both. The CPU tests take seconds each, under a
# sanitizer too: those passes allow 300 s, not the GPU tests' 900. (A fuzz
# test bounds itself: tests/fuzz/CMakeLists.txt.)
run_pass() {
  local name=$1 title=$2 dir=$3 start=$SECONDS status=0
  shift 3
  local vars=()
  while [ "$1" != "--" ]; do vars+=("$1"); shift; done
  shift
  echo "stmux: pass $name: $title ($dir)" >&2
  env STMUX_BUILD_DIR="$dir" ${vars[@]+"${vars[@]}"} bash tools/build.sh
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" "$@" || status=$?
  # A sanitizer's report fails the pass even where ctest let it go: a test
  # that skipped after doing real work is listed as skipped whatever its
  # exit status (GoogleTest's skip pattern wins).
  local log="$dir/Testing/Temporary/LastTest.log"
  if [ "$name" = asan ] || [ "$name" = tsan ]; then
    if [ -f "$log" ] && grep -qE "ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|runtime error:" "$log"; then
      echo "stmux: pass $name: a sanitizer reported (in $log):" >&2
      grep -E "ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|runtime error:" "$log" |
        sort | uniq -c | head -20 >&2
      status=1
    fi
  fi
  # ctest lists skipped tests without their reason: say why, once per reason.
  # A GoogleTest skip's reason is the line after its "file:line: Skipped"; a
  # program's is its "GPU test skipped: ..." line; a script's ends ": skipped".
  if [ -f "$log" ]; then
    awk '/: Skipped$/ { if ((getline reason) > 0) print reason; next }
         /^(GPU|PyTorch) test skipped: / || /: skipped$/ { print }' "$log" | sort | uniq -c |
      sed -e 's/^ *\([0-9]*\) \(GPU\|PyTorch\) test skipped: /stmux: \1 \2 tests skipped: /' \
          -e 's/^ *\([0-9]*\) \(.*\)$/stmux: \1 tests skipped: \2/' >&2 || true
  fi
  passed "$name" $status $start
}

# passed NAME STATUS START: records and prints how a pass ended.
passed() {
  local took result=passed
  took=$(seconds $((SECONDS - $3)))
  [ "$2" -eq 0 ] || { result=FAILED; failed=1; }
  summary+=("$1 $result in $took")
  echo "stmux: pass $1 $result in $took" >&2
}

for pass in $passes; do
  case $pass in
    normal)
      run_pass normal "every test" "$build_dir" -- --timeout 900 "$@"
      ;;
    asan)
      run_pass asan "ASan+UBSan, every test that needs no GPU" "${build_dir}-asan" \
        STMUX_SANITIZE=address,undefined STMUX_BUILD_TARGETS=stmux_cpu_tests -- --timeout 300 \
        -L '^(unit|e2e)$'
      ;;
    tsan)
      run_pass tsan "TSan, every test that needs no GPU" "${build_dir}-tsan" \
        STMUX_SANITIZE=thread STMUX_BUILD_TARGETS=stmux_cpu_tests -- --timeout 300 \
        -L '^(unit|e2e)$'
      ;;
    fuzz)
      run_pass fuzz "libFuzzer targets, ${STMUX_FUZZ_SECONDS:-20} s each" "${build_dir}-fuzz" \
        STMUX_FUZZ=1 STMUX_BUILD_TARGETS=stmux_fuzz -- -L '^fuzz$'
      ;;
    package)
      start=$SECONDS
      echo "stmux: pass package: the Debian package, built and checked (${build_dir}-deb)" >&2
      status=0
      STMUX_BUILD_DIR=$build_dir bash tools/package.sh >/dev/null || status=$?
      passed package $status $start
      ;;
  esac
done
if [ ${#summary[@]} -gt 1 ]; then
  (IFS=,; echo "stmux: ${summary[*]}" | sed 's/,/, /g' >&2)
fi
exit $failed

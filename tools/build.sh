#!/usr/bin/env bash
# Installs what is missing (Debian/Ubuntu packages) and builds stmux into
# ${STMUX_BUILD_DIR:-build}. tools/test.sh and tools/demo.sh start with it.
# tools/test.sh's sanitizer and fuzz passes (docs/TESTING.md) set, for a
# build directory of their own:
#   STMUX_SANITIZE=address,undefined or thread   every target with that sanitizer
#   STMUX_FUZZ=1                                 clang, and the libFuzzer targets
#   STMUX_BUILD_TARGETS="t1 t2"                  build only these targets
# and tools/package.sh sets STMUX_PACKAGE=1: the prefix /usr, no tests.
set -euo pipefail
# --help: the comment above.
case "${1:-}" in
  -h | --help)
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
  "") ;;
  *)
    echo "stmux: tools/build.sh takes no arguments, only the environment variables of --help" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
build_dir=${STMUX_BUILD_DIR:-build}
jobs=$(nproc 2>/dev/null || echo 2)
sanitize=${STMUX_SANITIZE:-}
fuzz=${STMUX_FUZZ:-}
targets=${STMUX_BUILD_TARGETS:-}
package=${STMUX_PACKAGE:-}
# The fuzz targets need clang (libFuzzer); CMake reads CXX when it configures.
[ -z "$fuzz" ] || export CXX=clang++

# The CUDA toolkit is not a Debian package we can install here: find it.
if ! command -v nvcc >/dev/null 2>&1; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then export PATH="$dir:$PATH"; break; fi
  done
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "stmux: the CUDA toolkit (nvcc, cuBLAS headers and libraries) is required;" \
       "install it from NVIDIA, or put its bin/ on PATH" >&2
  exit 1
fi

# Install only what is missing, so that a machine with no network but all the
# packages already present works.
have_header() { echo "#include <$1>" | "${CXX:-c++}" -std=c++20 -fsyntax-only -x c++ - >/dev/null 2>&1; }
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v "${CXX:-c++}" >/dev/null 2>&1 || missing+=(g++)
have_header boost/lockfree/spsc_queue.hpp || missing+=(libboost-dev)
have_header fmt/format.h || missing+=(libfmt-dev)
have_header nlohmann/json.hpp || missing+=(nlohmann-json3-dev)
have_header gtest/gtest.h || missing+=(libgtest-dev libgmock-dev)
# stmux-plot and the tests of it and of deploy/: matplotlib and PyYAML for the
# system's python3 (or whichever python3 is first on PATH).
has_module() { python3 -c "import $1" 2>/dev/null || /usr/bin/python3 -c "import $1" 2>/dev/null; }
has_module matplotlib || missing+=(python3-matplotlib)
has_module yaml || missing+=(python3-yaml)
# Links a program with these flags: whether a sanitizer's runtime is installed.
links() {
  local dir
  dir=$(mktemp -d)
  echo "$1" | "${CXX:-c++}" "${@:2}" -x c++ - -o "$dir/a.out" >/dev/null 2>&1
  local status=$?
  rm -rf "$dir"
  return $status
}
optional=()  # installed where the distribution has them
if [ -n "$sanitize" ] && ! links 'int main() {}' -fsanitize="$sanitize"; then
  # g++'s sanitizer runtimes (libasan, libubsan, libtsan) come with libgcc-N-dev.
  missing+=("libgcc-$("${CXX:-c++}" -dumpversion | cut -d. -f1)-dev")
fi
if [ -n "$fuzz" ] && ! links 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' \
    -fsanitize=fuzzer,address,undefined; then
  # Debian puts clang's runtimes (libFuzzer among them) in libclang-rt-dev;
  # Ubuntu ships them with clang itself.
  missing+=(clang)
  optional+=(libclang-rt-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "stmux: ${missing[*]} missing: updating apt-get's package lists" >&2
  $sudo apt-get update -qq
  for package in ${optional[@]+"${optional[@]}"}; do
    apt-cache show "$package" >/dev/null 2>&1 && missing+=("$package")
  done
  echo "stmux: installing ${missing[*]} with apt-get (a minute or two)" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
options=()
[ -z "$sanitize" ] || options+=(-DSTMUX_SANITIZE="$sanitize")
[ -z "$fuzz" ] || options+=(-DSTMUX_FUZZ=ON)
[ -z "$package" ] || options+=(-DCMAKE_INSTALL_PREFIX=/usr -DSTMUX_BUILD_TESTS=OFF)
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  echo "stmux: configuring $build_dir${options[*]+ (${options[*]})}" >&2
  mkdir -p "$build_dir"
  cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DSTMUX_WERROR=ON ${options[@]+"${options[@]}"} >"$build_dir/configure.log" 2>&1 ||
    { cat "$build_dir/configure.log" >&2; exit 1; }
fi
build_args=()
for target in $targets; do build_args+=(--target "$target"); done
# Progress every tenth of the way ("[k/N]" from ninja, "[ p%]" from make);
# every other line (warnings, errors) as it comes.
echo "stmux: building ${targets:+$targets }in $build_dir with $jobs jobs" \
     "(from scratch: a few minutes on 2 cores)" >&2
cmake --build "$build_dir" -j"$jobs" ${build_args[@]+"${build_args[@]}"} 2>&1 | awk 'BEGIN { next_pct = 10 }
  match($0, /^\[ *[0-9]+\/[0-9]+\]/) {
    split(substr($0, 2, RLENGTH - 2), kn, "/"); pct = int(100 * kn[1] / kn[2])
  }
  match($0, /^\[ *[0-9]+%\]/) { pct = substr($0, 2, RLENGTH - 3) + 0 }
  /^\[ *[0-9]+(\/[0-9]+|%)\]/ {
    if (pct >= next_pct) { printf "stmux: built %d%%\n", pct > "/dev/stderr"; next_pct = pct - pct % 10 + 10 }
    next
  }
  /^ninja: no work to do/ { next }
  { print > "/dev/stderr" }'
echo "stmux: build done" >&2

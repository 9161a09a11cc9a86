#!/usr/bin/env bash
# Builds the Debian package of stmux (library, daemon, tools, systemd units,
# docs; its maintainer scripts create the stmux user and group) and checks it
# (tests/package_check.sh). The build directory, ${STMUX_BUILD_DIR:-build}-deb,
# is configured with the prefix /usr and without the tests. Prints the .deb's
# path last. Install it with: apt-get install ./stmux_VERSION_ARCH.deb
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h | --help)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *)
    echo "stmux: tools/package.sh takes no arguments (see --help)" >&2
    exit 2
    ;;
esac
build_dir=${STMUX_BUILD_DIR:-build}-deb
command -v dpkg-deb >/dev/null 2>&1 || {
  echo "stmux: building a Debian package needs dpkg-deb (Debian or Ubuntu)" >&2
  exit 1
}
STMUX_BUILD_DIR=$build_dir STMUX_PACKAGE=1 bash tools/build.sh
echo "stmux: packaging in $build_dir" >&2
(cd "$build_dir" && cpack -G DEB >cpack.log 2>&1) || { cat "$build_dir/cpack.log" >&2; exit 1; }
deb=$(sed -n 's/^CPack: - package: \(.*\.deb\) generated\.$/\1/p' "$build_dir/cpack.log")
[ -n "$deb" ] || { echo "stmux: cpack named no .deb:" >&2; cat "$build_dir/cpack.log" >&2; exit 1; }
bash tests/package_check.sh "$deb"
echo "$deb"

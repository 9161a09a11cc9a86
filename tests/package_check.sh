#!/usr/bin/env bash
# Checks a stmux .deb (tools/package.sh builds one and runs this): its control
# fields, that it holds every installed part where Debian and systemd look,
# that the units name the packaged daemon, and what its maintainer scripts do,
# run against stand-ins for adduser, getent and systemctl, then a real dpkg
# install, removal and purge in a throwaway overlay of this machine (nothing
# on this machine changes). Prints each failed check; exits 1 if any failed.
set -uo pipefail
deb=${1:?usage: package_check.sh STMUX.deb}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "package_check: $*" >&2; failures=$((failures + 1)); }

# Control fields.
info=$(dpkg-deb --info "$deb") || { echo "package_check: $deb is not a .deb" >&2; exit 1; }
for field in "Package: stmux" "Depends: .*adduser" "Maintainer: ." "Architecture: ."; do
  grep -Eq "^ *$field" <<<"$info" || fail "no control field matching '$field'"
done

# Contents: every installed part, none under /usr/local.
contents=$(dpkg-deb --contents "$deb" | awk '{print $6}')
for path in ./usr/bin/stmuxd ./usr/bin/stmuxctl ./usr/bin/stmux-bench ./usr/bin/stmux-plot \
            ./usr/lib/systemd/system/stmuxd.service ./usr/lib/systemd/system/stmux-mps.service \
            ./usr/share/doc/stmux/README.md ./usr/share/doc/stmux/stmuxd.env.example \
            ./usr/share/doc/stmux/stmuxd-mps.conf; do
  grep -qx "$path" <<<"$contents" || fail "missing $path"
done
grep -Eqx '\./usr/lib/([a-z0-9_]+-linux-gnu/)?libstmux\.so' <<<"$contents" ||
  fail "missing libstmux.so under /usr/lib"
grep -q '^\./usr/local' <<<"$contents" && fail "installs under /usr/local"

# The unit starts the packaged daemon.
dpkg-deb --extract "$deb" "$work/root"
unit="$work/root/usr/lib/systemd/system/stmuxd.service"
grep -qx 'ExecStart=/usr/bin/stmuxd' "$unit" || fail "stmuxd.service does not start /usr/bin/stmuxd"
# The packaged programs load (their libraries found without the build tree)
# and answer --help.
for program in stmuxd stmuxctl stmux-bench; do
  "$work/root/usr/bin/$program" --help >/dev/null 2>&1 || fail "/usr/bin/$program --help failed"
done

# Maintainer scripts: present, executable, valid sh.
dpkg-deb --control "$deb" "$work/control"
for script in postinst prerm postrm; do
  [ -x "$work/control/$script" ] || { fail "no executable $script"; continue; }
  sh -n "$work/control/$script" || fail "$script is not valid sh"
done

# postinst against stand-ins that log their arguments. getent answers as
# STANDIN_KNOWN says (the names that exist); /run/systemd/system decides the
# systemctl calls, and a machine that boots with systemd has it.
bin="$work/bin"
mkdir -p "$bin"
for tool in adduser addgroup systemctl; do
  # shellcheck disable=SC2016  # $* and $STANDIN_LOG belong to the stand-in
  printf '#!/bin/sh\necho "%s $*" >>"$STANDIN_LOG"\n' "$tool" >"$bin/$tool"
done
cat >"$bin/getent" <<'STANDIN'
#!/bin/sh
for known in $STANDIN_KNOWN; do [ "$1:$2" = "$known" ] && exit 0; done
exit 2
STANDIN
chmod +x "$bin"/*
# With SYSTEMD=1 a script runs where /run/systemd/system exists: a private
# mount namespace with a tmpfs on /run (root only; unshare from util-linux).
systemd_run=()
if [ -d /run/systemd/system ]; then
  systemd_run=(env)
elif unshare -m sh -c 'mount -t tmpfs tmpfs /run' 2>/dev/null; then
  systemd_run=(unshare -m sh -c 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec "$@"' sh)
fi
runs() {  # [SYSTEMD=1] runs KNOWN SCRIPT ARGS...: the stand-ins' log
  : >"$work/log"
  local prefix=()
  if [ "${SYSTEMD:-}" = 1 ]; then prefix=("${systemd_run[@]}"); fi
  ${prefix[@]+"${prefix[@]}"} env STANDIN_LOG="$work/log" STANDIN_KNOWN="$1" PATH="$bin:/usr/bin:/bin" \
    sh "$work/control/$2" "${@:3}" || fail "$2 ${*:3} exited non-zero"
  cat "$work/log"
}
log=$(runs "" postinst configure)
grep -q '^addgroup --system stmux$' <<<"$log" || fail "a first install does not create group stmux: $log"
grep -q '^adduser --system --ingroup stmux .* stmux$' <<<"$log" ||
  fail "a first install does not create user stmux: $log"
grep -q 'systemctl' <<<"$log" && [ ! -d /run/systemd/system ] && fail "systemctl called without systemd: $log"
log=$(runs "group:stmux passwd:stmux" postinst configure 0.0.9)
grep -q 'add' <<<"$log" && fail "an upgrade creates the user or group again: $log"
log=$(runs "" prerm upgrade 0.1.1)
grep -q 'stop' <<<"$log" && fail "an upgrade stops stmuxd in prerm: $log"
runs "" postrm remove >/dev/null
systemd_checked="unit handling with systemd not checked (needs root and unshare)"
if [ ${#systemd_run[@]} -gt 0 ]; then
  log=$(SYSTEMD=1 runs "" postinst configure)
  grep -q '^systemctl daemon-reload$' <<<"$log" || fail "a first install does not reload systemd: $log"
  grep -q 'try-restart' <<<"$log" && fail "a first install restarts stmuxd: $log"
  log=$(SYSTEMD=1 runs "group:stmux passwd:stmux" postinst configure 0.0.9)
  grep -q '^systemctl try-restart stmuxd.service$' <<<"$log" || fail "an upgrade does not restart stmuxd: $log"
  log=$(SYSTEMD=1 runs "" prerm remove)
  grep -q '^systemctl stop stmuxd.service stmux-mps.service$' <<<"$log" ||
    fail "removal does not stop stmuxd: $log"
  log=$(SYSTEMD=1 runs "" postrm remove)
  grep -q '^systemctl daemon-reload$' <<<"$log" || fail "removal does not reload systemd: $log"
  systemd_checked="unit handling with systemd checked"
fi

# A real install, removal and purge with dpkg, in a throwaway copy of this
# machine: an overlay over / with its changes on a tmpfs, in a private mount
# namespace (root, unshare and overlayfs), so that nothing here changes.
overlay_root() {  # overlay_root DIR: mounts the copy at DIR/root (in the caller's namespace)
  mkdir -p "$1/layer" "$1/root" &&
    mount -t tmpfs tmpfs "$1/layer" && mkdir "$1/layer/upper" "$1/layer/work" &&
    mount -t overlay overlay -o "lowerdir=/,upperdir=$1/layer/upper,workdir=$1/layer/work" \
      "$1/root"
}
roundtrip="install and removal with dpkg not tried (needs root, unshare and overlayfs)"
if [ "$(id -u)" = 0 ] && command -v chroot >/dev/null &&
   unshare -m --propagation private sh -c "$(declare -f overlay_root); overlay_root $work/probe" \
     2>/dev/null; then
  cp "$deb" "$work/stmux.deb"
  # shellcheck disable=SC2016  # expanded in the namespace and in the chroot
  if ! out=$(unshare -m --propagation private bash -ec "$(declare -f overlay_root)"'
      overlay_root "$1"
      root=$1/root
      for d in proc dev sys; do mount --rbind "/$d" "$root/$d"; done
      # No systemd in the copy: the scripts take their plain branch (the
      # systemd branch is checked above against stand-ins).
      mount -t tmpfs tmpfs "$root/run"
      mount -t tmpfs tmpfs "$root/tmp"
      cp "$1/stmux.deb" "$root/tmp/"
      exec chroot "$root" sh -ec "
        step() { echo \"\$*\" >&2; }
        step \"dpkg -i\";  dpkg -i /tmp/stmux.deb >/dev/null
        dpkg -s stmux | grep -q \"^Status: install ok installed\"
        step \"the user and group\"; getent passwd stmux >/dev/null; getent group stmux >/dev/null
        step \"the programs run\"; /usr/bin/stmuxd --help >/dev/null; /usr/bin/stmuxctl --help >/dev/null
        step \"dpkg -r\"; dpkg -r stmux >/dev/null
        test ! -e /usr/bin/stmuxd; test ! -e /usr/lib/systemd/system/stmuxd.service
        step \"dpkg -P\"; dpkg -P stmux >/dev/null
        if dpkg -s stmux >/dev/null 2>&1; then echo \"still known to dpkg after purge\" >&2; exit 1; fi
        step \"the user stays after purge, as Debian leaves system users\"; getent passwd stmux >/dev/null
      "' bash "$work" 2>&1); then
    fail "install, removal and purge in a throwaway root failed at: $(tail -3 <<<"$out" | tr '\n' ' ')"
  fi
  roundtrip="installed, removed and purged with dpkg in a throwaway root"
fi

if [ $failures -ne 0 ]; then
  echo "package_check: $failures check(s) failed for $deb" >&2
  exit 1
fi
echo "package_check: $deb: control fields, $(wc -l <<<"$contents") paths, unit and maintainer" \
  "scripts as expected; $systemd_checked; $roundtrip" >&2

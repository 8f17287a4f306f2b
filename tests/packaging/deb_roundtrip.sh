#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The Debian packages on this machine, end to end (ctest deb_roundtrip; needs root):
#  1. scripts/build-deb.sh builds otpgate and otpgate-console (lintian: no errors);
#     otpgate needs no Qt, /etc/otpgate/* are conffiles;
#  2. apt installs both; the otpgate user and /var/lib/otpgate exist;
#  3. without GST_PLUGIN_PATH, gst-inspect-1.0 finds otpencrypt in GStreamer's plugin
#     folder, license LGPL;
#  4. otp-gateway --check-config refuses the installed template and accepts it once its
#     paths point at a throwaway PKI and a local qkd-kme-sim; otp-transfer's likewise;
#  5. systemd-analyze verify accepts both units;
#  6. the gateway runs as otpgate and writes its offset journals; otp-transfer makes its
#     job database;
#  7. remove (not purge): journals and job database survive unchanged; reinstall and a
#     reinstall over the installed package leave them unchanged, and the gateway goes on
#     from the same journals (the reserved offset only grows);
#  8. purge keeps the journals (and says so).
# At the end, even on failure, everything is purged and what the test made is removed
# (an installed libgstotp.so would otherwise stand beside build/plugins for later tests).
#   tests/packaging/deb_roundtrip.sh SOURCE_DIR BUILD_DIR
# Exit 77 (skipped): not root, or otpgate already installed or its state already there.
set -euo pipefail
src=$(realpath "${1:?usage: deb_roundtrip.sh SOURCE_DIR BUILD_DIR}")
build=$(realpath "${2:?usage: deb_roundtrip.sh SOURCE_DIR BUILD_DIR}")
state=/var/lib/otpgate
etc=/etc/otpgate
plugindir=$(pkg-config --variable=pluginsdir gstreamer-1.0)

say() { echo "deb_roundtrip: $*"; }
fail() {
  echo "deb_roundtrip: FAILED: $*" >&2
  exit 1
}
skip() {
  echo "deb_roundtrip: SKIPPED: $*"
  exit 77
}

[ "$(id -u)" -eq 0 ] || skip "needs root (installs and removes the package)"
for p in otpgate otpgate-console; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  if [ -n "$status" ] && [[ $status != *not-installed ]]; then
    skip "$p is installed on this machine (or its config is left); the test would remove it"
  fi
done
for d in "$state" "$etc" /var/cache/otpgate; do
  [ ! -e "$d" ] || skip "$d exists (another install's state); the test would delete it"
done
[ ! -e "$plugindir/libgstotp.so" ] || skip "$plugindir/libgstotp.so exists (installed by hand?)"
user_existed=
id otpgate >/dev/null 2>&1 && user_existed=1

work=$(mktemp -d /tmp/otpgate-deb.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  dpkg --purge otpgate otpgate-console >"$work/purge-at-exit.log" 2>&1
  rm -rf "$state" "$etc" /var/cache/otpgate
  if [ -z "$user_existed" ] && id otpgate >/dev/null 2>&1; then
    userdel otpgate
    groupdel otpgate 2>/dev/null
  fi
  if [ -e "$plugindir/libgstotp.so" ]; then
    echo "deb_roundtrip: FAILED: $plugindir/libgstotp.so is still installed" >&2
    rc=1
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# 1. Build, lintian, what the packages hold.
out=$build/packaging-test
"$src/scripts/build-deb.sh" "$out" || fail "the package build or lintian failed"
version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
arch=$(dpkg --print-architecture)
deb=$out/otpgate_${version}_$arch.deb
console_deb=$out/otpgate-console_${version}_$arch.deb
[ -f "$deb" ] && [ -f "$console_deb" ] || fail "no $deb or $console_deb"
say "lintian: $(grep -c '^E:' "$out/lintian.log" || true) errors, $(grep -c '^W:' "$out/lintian.log" || true) warnings"
depends=$(dpkg-deb -f "$deb" Depends)
say "otpgate Depends: $depends"
if grep -qi 'qt' <<<"$depends"; then fail "otpgate depends on Qt: $depends"; fi
grep -q 'libqt6widgets6' <<<"$(dpkg-deb -f "$console_deb" Depends)" || fail "otpgate-console does not depend on Qt 6 Widgets"
dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles >"$work/conffiles"
for f in gateway.toml transfer.toml; do
  grep -qx "$etc/$f" "$work/conffiles" || fail "$etc/$f is not a conffile ($(tr '\n' ' ' <"$work/conffiles"))"
done
dpkg-deb -c "$deb" >"$work/contents"
grep -q " ./${plugindir#/}/libgstotp.so$" "$work/contents" || fail "the plugin is not in $plugindir"
if grep -q 'otp-console' "$work/contents"; then fail "otpgate holds otp-console"; fi

install_debs() {
  apt-get install -y -q --no-install-recommends "$@" >"$work/apt.log" 2>&1 ||
    { cat "$work/apt.log" >&2; fail "apt-get install $*"; }
}

# 2. Install.
install_debs "$deb" "$console_deb"
id otpgate >/dev/null || fail "no otpgate user after install"
[ "$(stat -c '%U:%G %a' "$state")" = "otpgate:otpgate 700" ] ||
  fail "$state is $(stat -c '%U:%G %a' "$state"), expected otpgate:otpgate 700"
for f in /usr/bin/otp-gateway /usr/bin/otp-transfer /usr/bin/qkd-kme-sim /usr/bin/otp-console \
  "$etc/gateway.toml" "$etc/transfer.toml" /lib/systemd/system/otp-gateway.service \
  /lib/systemd/system/otp-transfer.service /usr/share/man/man1/otp-gateway.1.gz \
  /usr/share/doc/otpgate/install.md; do
  [ -e "$f" ] || fail "$f is not installed"
done
say "installed: $(dpkg-query -W -f='${Package} ${Version}, ' otpgate otpgate-console)user $(id otpgate)"

# 3. The plugin, found by GStreamer on its own (fresh registry, no plugin path).
unset GST_PLUGIN_PATH GST_PLUGIN_PATH_1_0 GST_PLUGIN_SYSTEM_PATH GST_PLUGIN_SYSTEM_PATH_1_0
export GST_REGISTRY_1_0=$work/registry.bin
gst-inspect-1.0 otpencrypt >"$work/inspect.txt" 2>&1 || { cat "$work/inspect.txt" >&2; fail "gst-inspect-1.0 otpencrypt"; }
grep -E '^  (Filename|Version|License|Binary package|Origin URL) ' "$work/inspect.txt" | sed 's/^/  /'
found=$(sed -n 's/^  Filename  *//p' "$work/inspect.txt")
# (/lib is /usr/lib on a merged-/usr system, and GStreamer may name either.)
[ "$(realpath "$found")" = "$(realpath "$plugindir/libgstotp.so")" ] || fail "otpencrypt is from $found, not $plugindir"
grep -qE '^  License +LGPL$' "$work/inspect.txt" || fail "the plugin's license is not LGPL"

# 4. The installed templates: refused as they come, accepted once filled in.
as_otpgate() { setpriv --reuid=otpgate --regid=otpgate --init-groups -- "$@"; }
mkdir -m 0700 "$work/gst"
chown otpgate:otpgate "$work/gst"
if as_otpgate otp-gateway --config "$etc/gateway.toml" --check-config >"$work/check0.txt" 2>&1; then
  fail "--check-config accepted the template before its certificates exist"
fi
say "the unfilled template is refused: $(cat "$work/check0.txt")"
"$src/scripts/make-test-pki.sh" "$work/pki" sae-a sae-b >/dev/null
install -m 0644 "$work/pki/sae-a.crt" "$etc/sae-a.crt"
install -m 0644 "$work/pki/ca.crt" "$etc/kme-ca.crt"
install -m 0640 -g otpgate "$work/pki/sae-a.key" "$etc/sae-a.key"
qkd-kme-sim --cert "$work/pki/kme.crt" --key "$work/pki/kme.key" --ca "$work/pki/ca.crt" \
  --sae sae-a --sae sae-b --port 0 --port-file "$work/kme.port" >"$work/kme.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do [ -s "$work/kme.port" ] && break; sleep 0.05; done  # 30 s bounds a hang
[ -s "$work/kme.port" ] || { cat "$work/kme.log" >&2; fail "qkd-kme-sim did not start"; }
kme_port=$(cat "$work/kme.port")
# Point at the local KME and peer, deliver to loopback, any free status port.
sed -i -e "s#^url = .*#url = \"https://localhost:$kme_port\"#" \
  -e 's#^address = .*#address = "127.0.0.1"#' -e 's#10\.1\.0\.50#127.0.0.2#' \
  -e 's#^listen = "127.0.0.1:8080"#listen = "127.0.0.1:0"#' "$etc/gateway.toml"
as_otpgate otp-gateway --config "$etc/gateway.toml" --check-config ||
  fail "--check-config refused the filled-in $etc/gateway.toml"
mkdir -p "$work/incoming"
chown otpgate:otpgate "$work/incoming"
# The service user must reach it: mktemp's 0700 folder kept it out, and --check-config says
# so ("... is not writable by this user"), as the service would have failed to write there.
chmod 0711 "$work"
sed -i -e "s#^url = .*#url = \"https://localhost:$kme_port\"#" \
  -e 's#^transfer = .*#transfer = "127.0.0.1:7400"#' -e 's#^listen = "0.0.0.0:7400"#listen = "127.0.0.1:7400"#' \
  -e "s#^incoming_dir = .*#incoming_dir = \"$work/incoming\"#" "$etc/transfer.toml"
as_otpgate otp-transfer --config "$etc/transfer.toml" --check-config ||
  fail "--check-config refused the filled-in $etc/transfer.toml"

# 5. The units.
printf '[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n' >"$work/probe.service"
if ! systemd-analyze verify "$work/probe.service" >"$work/probe.txt" 2>&1; then
  say "SKIPPED the unit check: systemd-analyze verify fails here even on a trivial unit ($(head -n 1 "$work/probe.txt"))"
else
  for unit in otp-gateway otp-transfer; do
    systemd-analyze verify "/lib/systemd/system/$unit.service" >"$work/verify.txt" 2>&1 ||
      { cat "$work/verify.txt" >&2; fail "systemd-analyze verify $unit.service"; }
    if grep -q "$unit.service" "$work/verify.txt"; then cat "$work/verify.txt" >&2; fail "systemd-analyze verify warns about $unit.service"; fi
  done
  say "systemd-analyze verify: otp-gateway.service and otp-transfer.service are accepted"
  grep -q "^ExecStart=/usr/bin/otp-gateway --config $etc/gateway.toml$" /lib/systemd/system/otp-gateway.service ||
    fail "otp-gateway.service does not run /usr/bin/otp-gateway with $etc/gateway.toml"
fi

# 6. Run the gateway as its unit would (user otpgate, installed paths) until its offset
# journals reserve pad; the transfer CLI makes the job database.
journal=$state/sae-a-to-sae-b-video-1.journal
reserved() { [ -f "$journal" ] && sed -n '1s/^otpgate-offset-journal 1 reserved //p' "$journal" || echo 0; }
run_gateway_until_reserved_above() {  # MIN: run until the video journal reserves more than MIN
  local min=$1 log=$work/gateway-$1.log
  setpriv --reuid=otpgate --regid=otpgate --init-groups -- \
    env GST_REGISTRY_1_0="$work/gst/registry.bin" otp-gateway --config "$etc/gateway.toml" >"$log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 300); do
    [ "$(reserved)" -gt "$min" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || true
  [ "$(reserved)" -gt "$min" ] || { cat "$log" >&2; fail "the gateway did not reserve pad beyond $min in $journal"; }
}
run_gateway_until_reserved_above 0
as_otpgate env GST_REGISTRY_1_0="$work/gst/registry.bin" otp-transfer --config "$etc/transfer.toml" jobs >/dev/null ||
  fail "otp-transfer jobs as otpgate"
[ -f "$state/transfer-jobs.sqlite" ] || fail "no job database in $state"
snapshot() { (cd "$state" && find . -type f \( -name '*.journal' -o -name 'transfer-jobs.sqlite' \) -print0 | sort -z | xargs -0 sha256sum); }
snapshot >"$work/state.before"
first=$(reserved)
say "state after the first run: $(awk '{print $2}' "$work/state.before" | tr '\n' ' ')(video journal reserves $first bytes)"

# 7. Remove, reinstall, reinstall over it: the same state, used again.
dpkg --remove otpgate otpgate-console >"$work/remove.log" 2>&1 || { cat "$work/remove.log" >&2; fail "dpkg --remove"; }
[ ! -e "$plugindir/libgstotp.so" ] && [ ! -e /usr/bin/otp-gateway ] || fail "remove left the plugin or the gateway"
snapshot | cmp -s - "$work/state.before" || fail "removing the package changed or deleted $state"
grep -q "localhost:$kme_port" "$etc/gateway.toml" || fail "removing the package lost the filled-in $etc/gateway.toml"
say "removed: journals and job database unchanged, $etc/gateway.toml kept"
install_debs "$deb" "$console_deb"
snapshot | cmp -s - "$work/state.before" || fail "reinstalling changed $state"
grep -q "localhost:$kme_port" "$etc/gateway.toml" || fail "reinstalling replaced the filled-in $etc/gateway.toml"
dpkg -i "$deb" >"$work/reinstall.log" 2>&1 || { cat "$work/reinstall.log" >&2; fail "dpkg -i over the installed package"; }
snapshot | cmp -s - "$work/state.before" || fail "installing over the installed package changed $state"
run_gateway_until_reserved_above "$first"
say "reinstalled: same journals, the gateway went on from them (reserved $first -> $(reserved) bytes)"

# 8. Purge: the journals stay.
dpkg --purge otpgate otpgate-console >"$work/purge.log" 2>&1 || { cat "$work/purge.log" >&2; fail "dpkg --purge"; }
[ -f "$journal" ] && [ -f "$state/transfer-jobs.sqlite" ] || fail "purge deleted the journals or the job database"
[ ! -e "$etc/gateway.toml" ] || fail "purge left the conffile $etc/gateway.toml"
grep -q "kept $state" "$work/purge.log" || fail "purge did not say it kept $state"
say "purged: $(grep "kept $state" "$work/purge.log")"
say "passed"

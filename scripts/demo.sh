#!/usr/bin/env bash
# The README's first command: installs what is missing, builds, and runs the main job
# on one machine: qkd-kme-sim (QKD-like key rate) serving two sites over mutual TLS,
# and one direction of a link taking pad at a conference-like rate.
#   scripts/demo.sh [--seconds N] [--media-mbps R] ...   (extra options go to otp-keys-demo)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -- qkd-kme-sim otp-keys-demo

work=$(mktemp -d /tmp/otpgate-demo.XXXXXX)
sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$root/scripts/make-test-pki.sh" "$work/pki" sae-a sae-b >/dev/null
# 10 Mbit/s of key (a short-reach QKD link) into a 4 MB store that starts full.
"$root/build/keyclient/qkd-kme-sim" --cert "$work/pki/kme.crt" --key "$work/pki/kme.key" \
  --ca "$work/pki/ca.crt" --sae sae-a --sae sae-b --port 0 --port-file "$work/kme.port" \
  --key-rate 10e6 --store-bytes 4000000 &
sim_pid=$!
for _ in $(seq 100); do [ -s "$work/kme.port" ] && break; sleep 0.1; done
[ -s "$work/kme.port" ] || { echo "demo: qkd-kme-sim did not start" >&2; exit 1; }

"$root/build/keyclient/otp-keys-demo" --kme-url "https://localhost:$(cat "$work/kme.port")" \
  --pki "$work/pki" --state-dir "$work/state" "$@"

#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# ICE between two otp-gateways on two test hosts (network namespaces made here, routed
# through this host), with qkd-kme-sim on this host: audio sent at site A arrives at
# site B byte-identical. Skips (77) where namespaces cannot be made.
#   ice_netns.sh BUILD_DIR
set -euo pipefail
build=$1
src=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" -eq 0 ] && command -v ip >/dev/null || { echo "needs root and iproute2: skipped"; exit 77; }
tag=otpg$$
a=${tag}a b=${tag}b
work=$(mktemp -d /tmp/otpgate-netns.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done  # out of the namespaces
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
  ip link del "v${tag}a" 2>/dev/null || true
  ip link del "v${tag}b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# wait_for WHAT COMMAND...: until COMMAND succeeds; 60 s only bounds a hang.
wait_for() {
  local what=$1 until=$((SECONDS + 60))
  shift
  while ! "$@" 2>/dev/null; do
    if [ $SECONDS -ge $until ]; then
      echo "FAIL: no sign within 60 s that $what" >&2
      cat "$work"/*.log >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.05
  done
}
ip netns add "$a" 2>/dev/null || { echo "cannot create network namespaces here: skipped"; exit 77; }
ip netns add "$b"
# This host is 10.213.1.1 towards A (10.213.1.2) and 10.213.2.1 towards B (10.213.2.2).
for side in a b; do
  ns=${tag}$side net=$([ $side = a ] && echo 1 || echo 2)
  ip link add "v${tag}$side" type veth peer name eth0 netns "$ns"
  ip addr add "10.213.$net.1/24" dev "v${tag}$side"
  ip link set "v${tag}$side" up
  ip netns exec "$ns" ip addr add "10.213.$net.2/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip route add default via "10.213.$net.1"
done
sysctl -qw net.ipv4.ip_forward=1 || { echo "cannot route between the test hosts: skipped"; exit 77; }

OTPGATE_PKI_EXTRA_SANS="IP:10.213.1.1,IP:10.213.2.1" "$src/scripts/make-test-pki.sh" "$work/pki" sae-a sae-b >/dev/null
"$build/keyclient/qkd-kme-sim" --host 0.0.0.0 --cert "$work/pki/kme.crt" --key "$work/pki/kme.key" \
  --ca "$work/pki/ca.crt" --sae sae-a --sae sae-b --port 0 --port-file "$work/port" >"$work/kme.log" 2>&1 &
pids+=($!)
wait_for "the KME is listening" test -s "$work/port"
kme_port=$(cat "$work/port")
export GST_PLUGIN_PATH=$build/plugins

config() {  # me peer net peer_net
  cat <<CONF
[site]
name = "site-$1"
sae_id = "$1"
state_dir = "$work/state-$1"
[kme]
url = "https://10.213.$3.1:$kme_port"
tls_cert = "$work/pki/$1.crt"
tls_key = "$work/pki/$1.key"
tls_ca = "$work/pki/ca.crt"
[peer]
sae_id = "$2"
address = "10.213.$4.2"
transport = "ice"
[ice]
signalling_listen = "0.0.0.0:7400"
peer_signalling = "10.213.$4.2:7400"
[status]
listen = "127.0.0.1:7480"
[[stream]]
name = "audio-1"
local_rtp_port = 5004
deliver_rtp = "127.0.0.1:6004"
CONF
}
config sae-a sae-b 1 2 >"$work/a.toml"
config sae-b sae-a 2 1 >"$work/b.toml"
ip netns exec "$a" "$build/gateway/otp-gateway" --config "$work/a.toml" >"$work/ga.log" 2>&1 &
pids+=($!)
ip netns exec "$b" "$build/gateway/otp-gateway" --config "$work/b.toml" >"$work/gb.log" 2>&1 &
pids+=($!)
for ns in "$a" "$b"; do
  wait_for "the gateway in $ns serves its status" ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/127.0.0.1/7480"
done
caps="application/x-rtp,media=audio,clock-rate=8000,encoding-name=L16,channels=1,payload=96"
size() { stat -c %s "$1" 2>/dev/null || echo 0; }
receive() {  # site B's conference system: what gateway B delivers, written as it comes
  ip netns exec "$b" gst-launch-1.0 -e -q udpsrc port=6004 caps="$caps" ! rtpL16depay \
    ! filesink buffer-mode=unbuffered location="$work/received.raw" >"$work/rx.log" 2>&1 &
  rx=$!
  pids+=($rx)
  wait_for "site B's receiver is listening" ip netns exec "$b" bash -c "ss -Hlun 'sport = :6004' | grep -q ."
}
send() {  # site A's conference system: N buffers of audio to gateway A (also kept in sent.raw)
  ip netns exec "$a" gst-launch-1.0 -q audiotestsrc is-live=true num-buffers="$1" samplesperbuffer=160 \
    wave=sine ! audio/x-raw,format=S16BE,rate=8000,channels=1 ! tee name=t \
    t. ! queue ! filesink location="$work/sent.raw" t. ! queue ! rtpL16pay pt=96 \
    ! udpsink host=127.0.0.1 port=5004
}
# Warm-up until audio comes through (ICE connected, the first keys fetched).
receive
warm() { send 5; [ "$(size "$work/received.raw")" -gt 0 ]; }
wait_for "audio crosses the gateways over ICE" warm
kill -INT $rx; wait $rx || true
# The audio that is compared: all of it has come out before the receiver stops.
receive
send 100
all_arrived() { [ "$(size "$work/received.raw")" -ge "$(size "$work/sent.raw")" ]; }
wait_for "all the audio arrived at site B" all_arrived
kill -INT $rx; wait $rx || true
if ! cmp -s "$work/sent.raw" "$work/received.raw"; then
  echo "FAIL: audio over ICE between the test hosts differs" >&2
  cat "$work/ga.log" "$work/gb.log" >&2
  exit 1
fi
echo "PASS: $(stat -c %s "$work/sent.raw") bytes of audio byte-identical over ICE between two network namespaces"

#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Two gst-launch-1.0 processes on loopback, keys from qkd-kme-sim over mutual TLS:
# site A sends audio as RTP through otpencrypt over UDP, site B decrypts it, and the
# audio B writes is byte-identical to what A sent.
#   gst_launch_udp_kme.sh BUILD_DIR PKI_DIR
set -euo pipefail
build=$1
pki=$2
work=$(mktemp -d /tmp/otpgate-gst-launch.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
export GST_PLUGIN_PATH=$build/plugins

"$build/keyclient/qkd-kme-sim" --cert "$pki/kme.crt" --key "$pki/kme.key" --ca "$pki/ca.crt" \
  --sae sae-a --sae sae-b --port 0 --port-file "$work/port" >"$work/kme.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do [ -s "$work/port" ] && break; sleep 0.05; done  # 30 s bounds a hang
[ -s "$work/port" ] || { echo "FAIL: the KME never listened" >&2; cat "$work/kme.log" >&2; exit 1; }
kme="kme-url=https://localhost:$(cat "$work/port") tls-ca=$pki/ca.crt"
udp_port=$(( 11000 + RANDOM % 8000 ))  # below the gateway tests' range
caps="application/x-rtp,media=audio,clock-rate=8000,encoding-name=L16,channels=1,payload=96"

gst-launch-1.0 -e -q udpsrc port=$udp_port caps=application/x-otp \
  ! otpdecrypt $kme sae-id=sae-b peer-sae-id=sae-a tls-cert=$pki/sae-b.crt tls-key=$pki/sae-b.key \
  ! "$caps" ! rtpL16depay ! filesink buffer-mode=unbuffered location="$work/received.raw" >"$work/rx.log" 2>&1 &
rx=$!
pids+=($rx)
# Ready when its UDP socket is bound (not after a guessed sleep).
for _ in $(seq 600); do ss -Hlun "sport = :$udp_port" | grep -q . && break; sleep 0.05; done
ss -Hlun "sport = :$udp_port" | grep -q . || { echo "FAIL: the receiver never bound UDP $udp_port" >&2; cat "$work/rx.log" >&2; exit 1; }

gst-launch-1.0 -q audiotestsrc is-live=true num-buffers=150 samplesperbuffer=160 wave=sine \
  ! audio/x-raw,format=S16BE,rate=8000,channels=1 ! tee name=t \
  t. ! queue ! filesink location="$work/sent.raw" \
  t. ! queue ! rtpL16pay pt=96 \
     ! otpencrypt $kme sae-id=sae-a peer-sae-id=sae-b tls-cert=$pki/sae-a.crt tls-key=$pki/sae-a.key \
       journal="$work/a.journal" on-key-exhausted=block \
     ! udpsink host=127.0.0.1 port=$udp_port >"$work/tx.log" 2>&1
# The last packets are in flight: wait until all the audio has come out (30 s bounds a hang).
for _ in $(seq 600); do
  [ "$(stat -c %s "$work/received.raw" 2>/dev/null || echo 0)" -ge "$(stat -c %s "$work/sent.raw")" ] && break
  sleep 0.05
done
kill -INT $rx
wait $rx || true

sent=$(stat -c %s "$work/sent.raw")
received=$(stat -c %s "$work/received.raw" 2>/dev/null || echo 0)
echo "sent $sent bytes of audio, received $received bytes after decryption"
if [ "$sent" -eq 0 ] || ! cmp -s "$work/sent.raw" "$work/received.raw"; then
  echo "FAIL: the decrypted audio differs from what was sent" >&2
  cat "$work/rx.log" "$work/tx.log" >&2
  exit 1
fi
echo "PASS: byte-identical audio over UDP with keys from qkd-kme-sim"

#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The README's first command: installs what is missing, builds, and runs the two-site
# expert-panel demo on one machine: qkd-kme-sim (QKD-like key rate, mutual TLS),
# otp-gateway at site A and at site B, and a simulated conference system at each site
# (ten participants in all, VP8 video and Opus audio over RTP), then prints a summary.
# Meanwhile site A's lab sends a sample exome specimen (FASTQ.gz, BAM, VCF) to site B
# with otp-transfer over the same QKD link, and the job tables of both sites are shown.
#   scripts/demo.sh [--seconds N] [--profile panel|full] [--key-rate BITS_PER_S]
#                   [--policy drop|block|fallback-aes]
#   scripts/demo.sh --sip [--seconds N] [--key-rate BITS_PER_S]
# --key-rate throttles the simulated QKD link; the KME then starts with only a few
# seconds of that rate in store, so a rate below the call's shows within seconds: packets
# dropped (drop), delayed (block) or sent with AES keyed from QKD (fallback-aes), never
# in the clear. The full profile (about 21 Mbit/s per site) needs more key than the
# default 10 Mbit/s link makes.
# --sip runs a SIP call instead (scripts/demo_sip.py): Kamailio and baresip at each site,
# the call through both proxies and both gateways, and what each side heard.
# OTPGATE_DEMO_SKIP_SETUP=1 skips installing and building (tests run it on a built tree).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=20
profile=panel
key_rate=10e6
key_rate_given=
policy=drop
sip=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --key-rate) key_rate=$2; key_rate_given=1; shift 2 ;;
    --policy) policy=$2; shift 2 ;;
    --sip) sip=1; shift ;;
    *) echo "demo: unknown option $1 (use --seconds N, --profile panel|full, --key-rate BITS_PER_S, --policy drop|block|fallback-aes, --sip)" >&2; exit 2 ;;
  esac
done
case "$policy" in drop|block|fallback-aes) ;; *)
  echo "demo: unknown --policy $policy (use drop, block or fallback-aes)" >&2; exit 2 ;;
esac
if ! awk -v r="$key_rate" 'BEGIN { exit !(r + 0 > 0) }'; then
  echo "demo: --key-rate $key_rate is not a positive number of bits per second (e.g. 1e6)" >&2
  exit 2
fi
if [ -z "${OTPGATE_DEMO_SKIP_SETUP:-}" ]; then
  "$root/scripts/install-deps.sh"
  "$root/scripts/build.sh" -- qkd-kme-sim otp-gateway otp-conference-sim otp-transfer otp-console gstotp
fi
export GST_PLUGIN_PATH=$root/build/plugins
bin=$root/build

work=$(mktemp -d /tmp/otpgate-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_DEMO:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# A throttled link starts with 3 s of its rate in store (at least 256 KiB): the gateways'
# rings take most of it, and the shortage shows in the first seconds.
store_bytes=16000000
[ -n "$key_rate_given" ] && store_bytes=$(awk -v r="$key_rate" 'BEGIN { b = r / 8 * 3; if (b < 262144) b = 262144; printf "%d", b }')
"$root/scripts/make-test-pki.sh" "$work/pki" sae-a sae-b >/dev/null
if [ -n "$sip" ]; then
  python3 -u "$root/scripts/demo_sip.py" --build "$bin" --work "$work/sip" --pki "$work/pki" \
    --seconds "$seconds" --key-rate "$key_rate" && exit 0 || exit $?
fi
"$bin/keyclient/qkd-kme-sim" --cert "$work/pki/kme.crt" --key "$work/pki/kme.key" --ca "$work/pki/ca.crt" \
  --sae sae-a --sae sae-b --port 0 --port-file "$work/kme.port" --key-rate "$key_rate" \
  --store-bytes "$store_bytes" >"$work/kme.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do [ -s "$work/kme.port" ] && break; sleep 0.05; done  # 30 s bounds a hang
[ -s "$work/kme.port" ] || { cat "$work/kme.log" >&2; echo "demo: qkd-kme-sim did not start (its log is above)" >&2; exit 1; }
kme_port=$(cat "$work/kme.port")

# Ports: A's participants p1-p5 send to gateway A on 21000+i and arrive at site B's
# conference system on 26000+i; B's participants p6-p10 send to gateway B on 25000+i
# and arrive at site A on 24000+i. Between the gateways: B listens on 22000+i, A on 23000+i
# (below the kernel's ephemeral range, 32768-60999, so that no sending socket takes one).
site_config() {  # site me peer local_base peer_listen_base listen_base deliver_base status_port
  local site=$1 me=$2 peer=$3 local_base=$4 peer_listen=$5 listen_base=$6 deliver_base=$7 status=$8
  cat <<CONF
[site]
name = "$site"
sae_id = "$me"
state_dir = "$work/state-$me"
[kme]
url = "https://localhost:$kme_port"
tls_cert = "$work/pki/$me.crt"
tls_key = "$work/pki/$me.key"
tls_ca = "$work/pki/ca.crt"
[peer]
sae_id = "$peer"
address = "127.0.0.1"
[policy]
on_key_exhausted = "$policy"
[keys]
ring_bytes = 524288
[status]
listen = "127.0.0.1:$status"
CONF
  local first_local first_remote
  if [ "$me" = sae-a ]; then first_local=1; first_remote=6; else first_local=6; first_remote=1; fi
  for k in 0 1 2 3 4; do
    for m in 0 1; do
      local i=$((2 * k + m)) media=video
      [ $m -eq 1 ] && media=audio
      cat <<CONF
[[stream]]
name = "p$((first_local + k))-$media"
direction = "send"
local_rtp_port = $((local_base + i))
peer_port = $((peer_listen + i))
[[stream]]
name = "p$((first_remote + k))-$media"
direction = "receive"
listen_port = $((listen_base + i))
deliver_rtp = "127.0.0.1:$((deliver_base + i))"
CONF
    done
  done
}
site_config hospital-a sae-a sae-b 21000 22000 23000 24000 48080 >"$work/site-a.toml"
site_config hospital-b sae-b sae-a 25000 23000 22000 26000 48081 >"$work/site-b.toml"
"$bin/gateway/otp-gateway" --config "$work/site-a.toml" --check-config
"$bin/gateway/otp-gateway" --config "$work/site-b.toml" --check-config
"$bin/gateway/otp-gateway" --config "$work/site-a.toml" >"$work/gateway-a.out" 2>"$work/gateway-a.log" &
pids+=($!)
"$bin/gateway/otp-gateway" --config "$work/site-b.toml" >"$work/gateway-b.out" 2>"$work/gateway-b.log" &
pids+=($!)
for port in 48080 48081; do
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/api/v1/status" >/dev/null && break; sleep 0.05; done
  curl -sf "http://127.0.0.1:$port/api/v1/status" >/dev/null ||
    { cat "$work"/gateway-*.log >&2; echo "demo: a gateway's status API on port $port never answered (logs above)" >&2; exit 1; }
done

# Specimen transfer: site B receives, site A sends; both services serve their job API.
transfer_config() {  # site me peer listen api
  cat <<CONF
[site]
name = "$1"
sae_id = "$2"
state_dir = "$work/transfer-state-$2"
[kme]
url = "https://localhost:$kme_port"
tls_cert = "$work/pki/$2.crt"
tls_key = "$work/pki/$2.key"
tls_ca = "$work/pki/ca.crt"
[peer]
sae_id = "$3"
transfer = "127.0.0.1:47400"
[keys]
ring_bytes = 1048576
[transfer]
listen = "127.0.0.1:$4"
incoming_dir = "$work/incoming-$2"
data_root = "$work/sequencer"
[api]
listen = "127.0.0.1:$5"
CONF
}
transfer_config hospital-a sae-a sae-b 47401 47480 >"$work/transfer-a.toml"
transfer_config hospital-b sae-b sae-a 47400 47481 >"$work/transfer-b.toml"
"$root/media-samples/make-sequencing-samples.sh" "$work/sequencer" S-DEMO-01 >/dev/null
"$bin/transfer/otp-transfer" -c "$work/transfer-b.toml" serve >"$work/transfer-b.log" 2>&1 &
pids+=($!)
"$bin/transfer/otp-transfer" -c "$work/transfer-a.toml" serve >"$work/transfer-a.log" 2>&1 &
pids+=($!)
for port in 47480 47481; do
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/api/v1/status" >/dev/null && break; sleep 0.05; done
  curl -sf "http://127.0.0.1:$port/api/v1/status" >/dev/null ||
    { cat "$work"/transfer-*.log >&2; echo "demo: a transfer service's job API on port $port never answered (logs above)" >&2; exit 1; }
done

echo "demo: the specimen transfer page: http://127.0.0.1:47480/ (site A) and http://127.0.0.1:47481/ (site B)"
echo "demo: watch it live in the operator console (another terminal, with a display):"
echo "  $bin/qt-console/otp-console -g http://127.0.0.1:48080 -g http://127.0.0.1:48081 -t http://127.0.0.1:47480 -t http://127.0.0.1:47481"
echo "demo: expert panel, 10 participants ($profile profile), ${seconds}s, KME key rate $key_rate bit/s, on key exhausted: $policy"
media_bps=$([ "$profile" = full ] && echo 21e6 || echo 1.4e6)  # per site, both sites draw on the link
if awk -v r="$key_rate" -v m="$media_bps" 'BEGIN { exit !(r + 0 < 2 * m) }'; then
  case "$policy" in
    drop) expect="packets dropped for lack of key (never sent in the clear), gaps in the received streams" ;;
    block) expect="no drops but media held back until key arrives: long gaps in the received streams" ;;
    fallback-aes) expect="AES-256-GCM keyed from QKD takes over (its share and start time in the summary)" ;;
  esac
  echo "demo: the link makes less key than the call needs ($key_rate against about $media_bps bit/s per site, both sites): expect $expect once the KME's store ($store_bytes bytes) is used up, within a few seconds"
fi
with_transfer=1
if [ -n "$key_rate_given" ] && awk -v r="$key_rate" 'BEGIN { exit !(r + 0 < 50e6) }'; then
  with_transfer=
  echo "demo: the specimen transfer is skipped: a throttled link's key goes to the call"
fi
"$bin/gateway/otp-conference-sim" --site hospital-a --first-participant 1 --send-base 21000 \
  --receive-base 24000 --seconds "$seconds" --profile "$profile" --gateway-status-port 48080 >"$work/conf-a.out" &
conf_a=$!
"$bin/gateway/otp-conference-sim" --site hospital-b --first-participant 6 --send-base 25000 \
  --receive-base 26000 --seconds "$seconds" --profile "$profile" --gateway-status-port 48081 >"$work/conf-b.out" &
conf_b=$!
transfer_rc=0
if [ -n "$with_transfer" ]; then
  sleep 2  # the call is up; now the lab sends a specimen over the same QKD link
  "$bin/transfer/otp-transfer" -c "$work/transfer-a.toml" send S-DEMO-01 "$work/sequencer/S-DEMO-01" \
    >"$work/transfer-send.out" 2>&1 &
  transfer_pid=$!
fi
wait $conf_b
wait $conf_a
if [ -n "$with_transfer" ]; then wait $transfer_pid && transfer_rc=0 || transfer_rc=$?; fi
# The gateways stop cleanly and say how much fetched key they wiped unused.
kill -TERM "${pids[1]}" "${pids[2]}" 2>/dev/null || true
wait "${pids[1]}" "${pids[2]}" 2>/dev/null || true
echo
echo "== summary =="
cat "$work/conf-a.out" "$work/conf-b.out"
for site in a b; do
  wiped=$(grep -h "otp-gateway: stopped" "$work/gateway-$site.out" 2>/dev/null | sed 's/^otp-gateway: stopped; //')
  echo "hospital-$site gateway at stop: ${wiped:-no stop line (see $work/gateway-$site.log)}"
done
echo "status API while it ran: http://127.0.0.1:48080/api/v1/status and /metrics (site B: 48081)"
echo
echo "== specimen transfer (otp-transfer, one-time pad, SHA-256 at both ends) =="
if [ -n "$with_transfer" ]; then
  grep -v "^progress" "$work/transfer-send.out" || true
  echo "-- site A jobs:"
  "$bin/transfer/otp-transfer" -c "$work/transfer-a.toml" jobs
  echo "-- site B jobs:"
  "$bin/transfer/otp-transfer" -c "$work/transfer-b.toml" jobs
  echo "received at site B:"
  (cd "$work/incoming-sae-b" && find . -type f ! -path "./.partial/*" | sort | sed 's/^/  /')
  echo "web page while it ran: http://127.0.0.1:47480/ (site A: start transfers), http://127.0.0.1:47481/ (site B)"
  echo "job API: http://127.0.0.1:47480/api/v1/jobs (site A), http://127.0.0.1:47481/api/v1/jobs (site B)"
else
  echo "skipped (throttled key rate)"
fi
if [ "$transfer_rc" -ne 0 ]; then
  echo "demo: FAILED: the specimen transfer did not complete" >&2
  exit 1
fi
if grep -q "auth failures [1-9]" "$work/conf-a.out" "$work/conf-b.out"; then
  echo "demo: FAILED: authentication failures" >&2
  exit 1
fi

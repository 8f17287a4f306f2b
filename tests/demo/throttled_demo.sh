#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The demo on a throttled QKD link: the summary must show the shortage the way each policy
# handles it (drops with drop, an AES share with fallback-aes), no packet in the clear, no
# authentication failure, and the key economy lines. Runs scripts/demo.sh on a built tree.
#   tests/demo/throttled_demo.sh ROOT
set -euo pipefail
root=$1
export OTPGATE_DEMO_SKIP_SETUP=1
fail() { echo "throttled_demo: $*" >&2; exit 1; }

run() {  # policy -> summary in $out
  out=$(mktemp)
  if ! "$root/scripts/demo.sh" --seconds 8 --key-rate 4e5 --policy "$1" >"$out" 2>&1; then
    cat "$out"
    fail "the demo with --policy $1 exited non-zero"
  fi
  grep -q "expect packets dropped\|expect AES\|expect no drops" "$out" ||
    { cat "$out"; fail "the banner does not say what a throttled run shows"; }
  for site in hospital-a hospital-b; do
    grep -q "^$site key economy: sending: key drawn from the KME" "$out" ||
      { cat "$out"; fail "no key economy line for $site"; }
    grep -q "^$site gateway took in [0-9]* packets: .* none in the clear" "$out" ||
      { cat "$out"; fail "$site: packets not accounted for (in the clear?)"; }
    grep -q "^$site gateway at stop: fetched key wiped unused: sending [0-9]* bytes" "$out" ||
      { cat "$out"; fail "$site: no key-wiped-at-stop line"; }
  done
  if grep -q "auth failures [1-9]" "$out"; then cat "$out"; fail "authentication failures"; fi
}

run drop
grep -q "key shortage: packets dropped for lack of key [1-9]" "$out" ||
  { cat "$out"; fail "--policy drop on a 400 kbit/s link dropped nothing"; }
grep -q "longest stretch of drops [0-9.]* s" "$out" || { cat "$out"; fail "no drop stretch"; }
echo "drop: $(grep -h 'key shortage' "$out" | head -1)"

run fallback-aes
grep -q "sent with AES [1-9][0-9]* of [0-9]* packets ([0-9.]*%), from" "$out" ||
  { cat "$out"; fail "--policy fallback-aes on a 400 kbit/s link never used AES"; }
echo "fallback-aes: $(grep -h 'key shortage' "$out" | head -1)"

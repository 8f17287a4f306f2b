#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The demo's SIP profile (scripts/demo.sh --sip) as the README runs it: the call is answered
# through both proxies and gateways, each side hears the other's tone, both gateways count
# media both ways with pad used, and the hang-up frees every lane. Runs on a built tree.
#   tests/demo/sip_demo.sh ROOT
set -euo pipefail
root=$1
export OTPGATE_DEMO_SKIP_SETUP=1
fail() { cat "$out"; echo "sip_demo: $*" >&2; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! command -v kamailio >/dev/null || ! command -v baresip >/dev/null; then
  echo "SKIP: kamailio or baresip is not installed (scripts/install-deps.sh installs them)"
  exit 77
fi
"$root/scripts/demo.sh" --sip --seconds 8 >"$out" 2>&1 || fail "the demo exited non-zero"
grep -q "^== summary (SIP call) ==" "$out" || fail "no summary"
grep -q "^call .*: both gateways had it answered" "$out" || fail "the call was not answered"
for site in A B; do
  for media in audio video; do
    line=$(grep "^  gateway $site $media" "$out") || fail "no $media line for gateway $site"
    # packets both ways and pad used both ways, none of them zero
    echo "$line" | grep -Eq ": [1-9][0-9]* packets from its endpoint -> [1-9][0-9]* OTP to the partner; [1-9][0-9]* OTP from the partner -> [1-9][0-9]* to its endpoint; pad used [1-9][0-9]* KiB sending, [1-9][0-9]* KiB receiving" ||
      fail "gateway $site $media: media or key not counted both ways: $line"
  done
done
grep -q "^the callee (b@, site B) heard 4[34][0-9] Hz for .*: the other side's tone" "$out" ||
  fail "the callee did not hear the caller's 440 Hz"
grep -q "^the caller (a@, site A) heard 6[56][0-9] Hz for .*: the other side's tone" "$out" ||
  fail "the caller did not hear the callee's 660 Hz"
grep -q "^after the hang-up: no calls at either gateway, every call key lane free" "$out" ||
  fail "the hang-up did not free the call"
echo "sip_demo: PASS"

#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Builds the decoder fuzz target with clang's libFuzzer + AddressSanitizer and runs it
# briefly (FUZZ_SECONDS, default 20). Skips (exit 77) where clang/libFuzzer is missing.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$src/build}/fuzz
seconds=${FUZZ_SECONDS:-20}
if ! command -v clang++ >/dev/null; then echo "clang++ not installed: fuzz target skipped"; exit 77; fi
mkdir -p "$out/corpus"
clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$src/keyclient/include" -I"$src/plugins/codec/include" -I"$src/tests/support" \
  "$src/tests/fuzz/fuzz_decoder.cpp" "$src"/plugins/codec/src/*.cpp \
  "$src/keyclient/src/basics.cpp" "$src/keyclient/src/hex.cpp" "$src/keyclient/src/key_ring.cpp" \
  -lsrtp2 -lcrypto -o "$out/fuzz_decoder"
# Seed with valid shapes: an RTP header, an announcement prefix, a record prefix.
printf '\x80\x60\x00\x01\x00\x00\x00\xa0\x11\x22\x33\x44payload-and-24-bytes-of-trailer..' > "$out/corpus/rtp"
printf 'OTPA\x00\x00\x00\x26' > "$out/corpus/announcement"
printf 'OTPD\x00\x00\x00\x28' > "$out/corpus/record"
"$out/fuzz_decoder" -max_total_time="$seconds" -max_len=4096 "$out/corpus" 2>&1 | tail -5

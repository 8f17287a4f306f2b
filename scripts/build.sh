#!/usr/bin/env bash
# Configures and builds otpgate in ./build (ccache when present).
#   scripts/build.sh [cmake -D options...] [-- ninja targets...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cmake_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do cmake_args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
cmake -S "$root" -B "$root/build" -G Ninja "${cmake_args[@]}" >/dev/null
ninja -C "$root/build" "$@"

#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Configures and builds otpgate in ./build (ccache when present).
#   scripts/build.sh [cmake -D options...] [-- ninja targets...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cmake_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do cmake_args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
cmake -S "$root" -B "$root/build" -G Ninja "${cmake_args[@]}" >/dev/null
ninja -C "$root/build" "$@"

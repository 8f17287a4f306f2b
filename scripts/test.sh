#!/usr/bin/env bash
# The README's second command: installs what is missing, builds everything with
# warnings as errors, and runs every test through ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -DOTPGATE_WERROR=ON -DOTPGATE_BUILD_TESTS=ON -DOTPGATE_BUILD_BENCH=ON
cd "$root/build"
ctest --output-on-failure -j"$(nproc)" --timeout 300

#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The README's second command: installs what is missing, builds everything with
# warnings as errors, and runs every test through ctest. A skipped test fails the run
# unless tests/skips-allowed.txt names it (each skip's reason is printed either way), so
# a change to the machine cannot silently drop a test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -DOTPGATE_WERROR=ON -DOTPGATE_BUILD_TESTS=ON -DOTPGATE_BUILD_BENCH=ON
cd "$root/build"
set +e
ctest --output-on-failure -j"$(nproc)" --timeout 300 2>&1 | tee ctest-output.log
rc=${PIPESTATUS[0]}
set -e
skipped=$(sed -nE 's/.*Test +#[0-9]+: ([^ ]+) \.*\*\*\*Skipped.*/\1/p' ctest-output.log | sort -u)
unexpected=()
for name in $skipped; do
  reason=$(ctest -R "^${name}\$" -V 2>&1 | grep -iE "skip" | grep -v "^ *[0-9/]* *Test" | tail -1 | sed -E 's/^[0-9]+: //')
  echo "test.sh: skipped: $name: ${reason:-no reason printed}"
  grep -qE "^${name}[[:space:]]" "$root/tests/skips-allowed.txt" || unexpected+=("$name")
done
if [ ${#unexpected[@]} -ne 0 ]; then
  echo "test.sh: skipped and not on tests/skips-allowed.txt: ${unexpected[*]} (give the machine what the test needs, or add it there with the reason it may skip)" >&2
  [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"

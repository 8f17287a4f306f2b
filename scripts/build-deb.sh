#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Builds the Debian packages otpgate and otpgate-console (debian/: debhelper, the
# project's own CMake install rules) from a copy of this tree, reusing ccache, and
# checks them with lintian (errors fail the build).
#   scripts/build-deb.sh [OUT_DIR]            (default: build/deb)
# The .deb files end up in OUT_DIR; the build log is OUT_DIR/build.log. Where others
# build in the same tree, hold the build lock: flock /tmp/otpgate-build.lock scripts/build-deb.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/build/deb}")
version=$(dpkg-parsechangelog -l "$root/debian/changelog" -S Version)
arch=$(dpkg --print-architecture)
src=$out/otpgate-${version%-*}

# A copy of the tree as it is (tracked and new files, nothing git ignores), so the
# build writes nothing into the tree and sees one consistent state of it.
rm -rf "$src" "$out"/otpgate*_"$version"_* "$out/build.log"
mkdir -p "$src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$src"
else
  tar -C "$root" --exclude=./build --exclude=./.git -cf - . | tar -xf - -C "$src"
fi

# debhelper gives the build a HOME of its own: name ccache's folder, and let paths below
# the copy hash alike wherever the copy is (build/deb, the packaging test's folder).
if command -v ccache >/dev/null; then
  CCACHE_DIR=${CCACHE_DIR:-$(ccache -k cache_dir)}
  export CCACHE_DIR CCACHE_BASEDIR=$src
fi
DEB_BUILD_OPTIONS="parallel=$(nproc) ${DEB_BUILD_OPTIONS:-}"
export DEB_BUILD_OPTIONS
echo "build-deb: building otpgate $version in $src (log: $out/build.log)"
start=$(date +%s)
if ! (cd "$src" && dpkg-buildpackage -b -us -uc) >"$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log" >&2
  echo "build-deb: FAILED (whole log: $out/build.log)" >&2
  exit 1
fi
echo "build-deb: built in $(($(date +%s) - start)) s:"
ls -1 "$out"/otpgate*_"$version"_*.deb | sed 's/^/  /'
rm -rf "$src"

changes=$out/otpgate_${version}_${arch}.changes
echo "build-deb: lintian $(basename "$changes")"
lintian --fail-on error --tag-display-limit 0 "$changes" | tee "$out/lintian.log"

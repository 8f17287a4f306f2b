#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Installs every Debian package otpgate needs, once, in one place.
# Called by the README's commands and by .ci/run; a no-op when all are present.
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build pkg-config ccache clang-format git openssl ca-certificates curl
  # crypto, HTTP, formats, CLI
  libssl-dev libcurl4-openssl-dev libcpp-httplib-dev nlohmann-json3-dev
  libtomlplusplus-dev libcli11-dev libboost-dev libsqlite3-dev libsimdjson-dev
  # GStreamer (elements, pipelines, GstHarness via gstcheck) and SRTP for the AES mode
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-tools
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad libsrtp2-dev
  # ICE between gateways behind NAT (NiceAgent, nicesrc/nicesink)
  libnice-dev gstreamer1.0-nice
  # the operator console (Qt 6 Widgets, Network, Charts, Test; offscreen platform for tests;
  # Qt6Charts' CMake package needs Qt6OpenGL's, which qt6-charts-dev does not pull in)
  qt6-base-dev qt6-charts-dev libqt6opengl6-dev libgl-dev
  # the transfer web page's end-to-end test: headless Chromium over the DevTools protocol
  chromium python3-websocket
  # sequencing samples for the transfer demo and tests (htslib's test data, samtools, bgzip/tabix)
  samtools tabix htslib-test
  # tests and benchmarks (clang + its runtime: the libFuzzer target of the decoder)
  libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
  # the Debian packages (scripts/build-deb.sh, debian/): debhelper, lintian, man pages from
  # --help; their test installs them and checks the units (systemd-analyze, man for
  # their Documentation=) and the otpgate user (adduser)
  debhelper dpkg-dev lintian help2man systemd man-db adduser
  # calls through the gateways with real SIP software (docs/sip.md): two Kamailio proxies
  # (rtpengine module in the main package), baresip endpoints, SIPp for load
  kamailio baresip-core sip-tester
  # the SIP benchmark's baseline (bench/bench_sip.cpp runs it itself, userspace only)
  rtpengine-daemon
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# rtpengine-daemon's service must never run (it would add iptables rules and want the kernel
# module): masked before the package comes (systemd), disabled after it (other inits).
rtpengine_new=0
[[ " ${missing[*]} " == *" rtpengine-daemon "* ]] && rtpengine_new=1
if [ $rtpengine_new -eq 1 ] && command -v systemctl >/dev/null; then
  $SUDO systemctl mask rtpengine-daemon.service >/dev/null 2>&1 || true
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [ $rtpengine_new -eq 1 ] && [ ! -d /run/systemd/system ]; then
  $SUDO update-rc.d rtpengine-daemon disable >/dev/null 2>&1 || true
fi

#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""bench_sip that fails part-way (here: an "rtpengine" that never answers ping) exits 1
with one line naming what failed, and leaves none of its processes behind: the KME and
the two gateways it started are stopped on the way out. (Its failures used to exit()
on the spot, which left them running and skewed every later run's CPU figures.)

Usage: bench_sip_failure.py BENCH_SIP"""
import os
import subprocess
import sys
import time


def main():
    bench = sys.argv[1]
    run = subprocess.Popen([bench, "--quick", "--rtpengine", "/bin/false"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, (run.returncode, out[-2000:], err[-2000:])
    assert "bench_sip: rtpengine did not answer ping on its ng socket" in err, err[-2000:]
    work = f"otpgate-bench-sip-{run.pid}/"
    deadline = time.monotonic() + 10
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if work in cmdline:
                left.append(cmdline)
        if not left:
            break
        assert time.monotonic() < deadline, f"left running after the failure: {left}"
        time.sleep(0.2)
    print("PASS: a failed bench_sip run exits 1 with its reason and stops what it started")
    return 0


if __name__ == "__main__":
    sys.exit(main())

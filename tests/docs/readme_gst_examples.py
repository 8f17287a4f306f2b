#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Runs the README's GStreamer examples as written (docs as tests): the set-up block, the
live call (site B, then site A) and the file over TCP (site B, then site A). Only what a
test must change is changed, each substitution listed below: display sinks become
fakesink, the live sources are bounded (num-buffers), ports and paths are made private to
this run, and the build step is skipped (the tree is built). A README whose pipelines do
not run, or whose receiver does not decode what the sender sent, fails this test.
Run: tests/docs/readme_gst_examples.py SOURCE_DIR BUILD_DIR"""
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

source, build = sys.argv[1], sys.argv[2]
readme = open(os.path.join(source, "README.md")).read()
section = readme[readme.index("Set up once (a throwaway PKI"):readme.index("The receiver fails loudly")]
blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
if len(blocks) != 4:
    sys.exit(f"readme_gst_examples: expected 4 shell blocks in the README's GStreamer section "
             f"(set-up, call site B, call site A, file), found {len(blocks)}")
setup, call_b, call_a, file_cmds = blocks

work = tempfile.mkdtemp(prefix="otpgate-readme-")
kme_port = str(20000 + random.randrange(9000))
base = 11000 + random.randrange(7000)
ports = {"5004": str(base), "5006": str(base + 2), "7000": str(base + 4)}


def adapt(text):
    """The substitutions, and nothing else."""
    text = text.replace("/tmp/otp-pki", f"{work}/pki").replace("/tmp/otp-a-", f"{work}/otp-a-")
    text = text.replace("8443", kme_port)
    for old, new in ports.items():
        text = text.replace(f"port={old}", f"port={new}")
    text = text.replace("autovideosink", "fakesink").replace("autoaudiosink", "fakesink")
    text = text.replace("videotestsrc is-live=true", "videotestsrc is-live=true num-buffers=60")
    text = text.replace("audiotestsrc is-live=true", "audiotestsrc is-live=true num-buffers=150")
    text = text.replace("location=specimen.bam", f"location={work}/specimen.bam")
    text = text.replace("location=received.bam", f"location={work}/received.bam")
    return text


setup_lines = [l for l in adapt(setup).splitlines() if not l.startswith("./scripts/build.sh")]
env_script = "\n".join(setup_lines).replace("$PWD/build/plugins", f"{build}/plugins")
env_script = env_script.replace("build/keyclient/qkd-kme-sim", f"{build}/keyclient/qkd-kme-sim")
env_script = env_script.replace("scripts/make-test-pki.sh", f"{source}/scripts/make-test-pki.sh")
# The set-up block starts the KME in the background: keep its PID to stop it.
env_script = env_script.replace(" &\n", " >\"$W/kme.log\" 2>&1 &\necho $! > \"$W/kme.pid\"\n")


def shell(script, log, background=False):
    full = f"set -e\nW={work}\n{env_script}\nfor i in $(seq 100); do curl -sk https://localhost:{kme_port}/ >/dev/null 2>&1 && break; sleep 0.05; done\n{script}"
    if background:
        return subprocess.Popen(["bash", "-c", full], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(["bash", "-c", full], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                          timeout=120).returncode


def stop(proc):
    try:
        os.killpg(proc.pid, 2)
        proc.wait(timeout=10)
    except Exception:
        os.killpg(proc.pid, 9)


def kill_kme():
    try:
        os.kill(int(open(f"{work}/kme.pid").read()), 9)
    except Exception:
        pass


failed = []
try:
    # The live call: site B's receivers (verbose, to see what they decode), then site A.
    b = shell(adapt(call_b).replace("gst-launch-1.0", "gst-launch-1.0 -v", 1), f"{work}/call-b.log",
              background=True)
    time.sleep(1.5)
    rc = shell(adapt(call_a), f"{work}/call-a.log")
    time.sleep(1.0)
    stop(b)
    kill_kme()
    log_b = open(f"{work}/call-b.log").read()
    if rc != 0:
        failed.append("site A's call pipeline failed:\n" + open(f"{work}/call-a.log").read()[-2000:])
    if "ERROR" in log_b:
        failed.append("site B's call pipeline reported an error:\n" + log_b[-2000:])
    if not re.search(r"vp8dec.*src: caps = video/x-raw.*width=\(int\)640", log_b):
        failed.append("site B never decoded the VP8 video site A sent")
    if not re.search(r"opusdec.*src: caps = audio/x-raw", log_b):
        failed.append("site B never decoded the Opus audio site A sent")

    # The file over TCP: site B, then site A; the file must arrive identical.
    with open(f"{work}/specimen.bam", "wb") as f:
        f.write(os.urandom(3 << 20))
    lines = [l for l in adapt(file_cmds).splitlines() if l.strip()]
    receiver = lines[0]
    sender = "\n".join(lines[1:])
    b = shell(receiver, f"{work}/file-b.log", background=True)
    time.sleep(1.5)
    rc = shell(sender, f"{work}/file-a.log")
    try:
        b.wait(timeout=30)  # the receiver ends with the stream (EOS on the final record)
    except subprocess.TimeoutExpired:
        stop(b)
        failed.append("site B's file receiver did not finish after the sender did")
    kill_kme()
    if rc != 0:
        failed.append("site A's file sender failed:\n" + open(f"{work}/file-a.log").read()[-2000:])
    same = os.path.exists(f"{work}/received.bam") and \
        open(f"{work}/received.bam", "rb").read() == open(f"{work}/specimen.bam", "rb").read()
    if not same:
        failed.append("the file received at site B differs from specimen.bam:\n" +
                      open(f"{work}/file-b.log").read()[-2000:])
finally:
    kill_kme()
    if not os.environ.get("KEEP"):
        shutil.rmtree(work, ignore_errors=True)

if failed:
    print("readme_gst_examples: FAIL\n" + "\n".join(failed))
    sys.exit(1)
print("readme_gst_examples: the README's call and file examples run as written and deliver")

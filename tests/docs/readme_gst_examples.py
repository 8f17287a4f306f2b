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

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from script_support import tcp_listening, udp_bound, wait_until  # noqa: E402

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


# The pipelines' shells take the set-up's variables; the set-up itself runs once, first.
env_only = "\n".join(l for l in env_script.splitlines() if re.match(r"(export )?\w+=", l))


def set_up():
    """The README's set-up block, once, as a user runs it; ready when its KME listens."""
    rc = subprocess.run(["bash", "-c", f"set -e\nW={work}\n{env_script}"],
                        stdout=open(f"{work}/setup.log", "w"), stderr=subprocess.STDOUT,
                        timeout=120).returncode
    if rc != 0:
        raise AssertionError("the set-up block failed:\n" + open(f"{work}/setup.log").read())
    wait_until(lambda: tcp_listening(int(kme_port)), "the set-up block's KME is listening")


def shell(script, log, background=False):
    full = f"set -e\nW={work}\n{env_only}\n{script}"
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
    set_up()
    # The live call: site B's receivers (verbose, to see what they decode), then site A.
    b = shell(adapt(call_b).replace("gst-launch-1.0", "gst-launch-1.0 -v", 1), f"{work}/call-b.log",
              background=True)
    # Site B is ready once both its UDP sockets are bound (no guessed sleep).
    wait_until(lambda: udp_bound(int(ports["5004"])) and udp_bound(int(ports["5006"])),
               "site B's receivers are listening")
    rc = shell(adapt(call_a), f"{work}/call-a.log")
    decoded = {"the VP8 video": r"vp8dec.*src: caps = video/x-raw.*width=\(int\)640",
               "the Opus audio": r"opusdec.*src: caps = audio/x-raw"}

    def log_b():
        return open(f"{work}/call-b.log").read()
    try:  # site B has decoded both (or says why not); the deadline only bounds a hang
        wait_until(lambda: all(re.search(p, log_b()) for p in decoded.values()) or
                   "ERROR" in log_b(), "site B decodes what site A sent", 30)
    except AssertionError:
        pass
    stop(b)
    if rc != 0:
        failed.append("site A's call pipeline failed:\n" + open(f"{work}/call-a.log").read()[-2000:])
    if "ERROR" in log_b():
        failed.append("site B's call pipeline reported an error:\n" + log_b()[-2000:])
    for what, pattern in decoded.items():
        if not re.search(pattern, log_b()):
            failed.append(f"site B never decoded {what} site A sent")

    # The file over TCP: site B, then site A; the file must arrive identical.
    with open(f"{work}/specimen.bam", "wb") as f:
        f.write(os.urandom(3 << 20))
    lines = [l for l in adapt(file_cmds).splitlines() if l.strip()]
    receiver = lines[0]
    sender = "\n".join(lines[1:])
    b = shell(receiver, f"{work}/file-b.log", background=True)
    wait_until(lambda: tcp_listening(int(ports["7000"])), "site B's file receiver is listening")
    rc = shell(sender, f"{work}/file-a.log")
    try:
        b.wait(timeout=30)  # the receiver ends with the stream (EOS on the final record)
    except subprocess.TimeoutExpired:
        stop(b)
        failed.append("site B's file receiver did not finish after the sender did")
    if rc != 0:
        failed.append("site A's file sender failed:\n" + open(f"{work}/file-a.log").read()[-2000:])
    same = os.path.exists(f"{work}/received.bam") and \
        open(f"{work}/received.bam", "rb").read() == open(f"{work}/specimen.bam", "rb").read()
    if not same:
        failed.append("the file received at site B differs from specimen.bam:\n" +
                      open(f"{work}/file-b.log").read()[-2000:])
except AssertionError as e:
    failed.append(str(e))
finally:
    kill_kme()
    if not os.environ.get("KEEP"):
        shutil.rmtree(work, ignore_errors=True)

if failed:
    print("readme_gst_examples: FAIL\n" + "\n".join(failed))
    sys.exit(1)
print("readme_gst_examples: the README's call and file examples run as written and deliver")

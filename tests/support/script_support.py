# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the Python script tests share (tests/docs, tests/web): code blocks taken from the
Markdown as written, readiness waits (a port bound, a line printed, an API answering)
bounded only by a generous deadline that catches a hang, and the processes a test
started. Import with sys.path pointing here (tests/support)."""
import fcntl
import os
import re
import signal
import socket
import subprocess
import tempfile
import time


def section(text, start, end):
    """The text from the heading or phrase `start` up to `end` (both as written)."""
    if start not in text or end not in text:
        raise SystemExit(f"the docs no longer have {start!r} ... {end!r}: update the test")
    return text[text.index(start):text.index(end, text.index(start))]


def blocks(text, language):
    """The ```language blocks of `text`, in order."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(block):
    """The command lines of a shell block: comments and blank lines out, a trailing
    `# comment` cut, continuation lines joined."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def wait_until(check, what, seconds=60):
    """Polls `check` until it returns something true; the deadline only bounds a hang."""
    until = time.monotonic() + seconds
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # not up yet
            pass
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {seconds} s waiting for: {what}")
        time.sleep(0.05)


def _bound(table, port, state=None):
    with open(table) as f:
        for row in f.readlines()[1:]:
            fields = row.split()
            if int(fields[1].split(":")[1], 16) == port and (state is None or fields[3] == state):
                return True
    return False


def udp_bound(port):
    """True once something has bound UDP `port` (IPv4 or IPv6)."""
    return any(_bound(t, port) for t in ("/proc/net/udp", "/proc/net/udp6"))


def tcp_listening(port):
    return any(_bound(t, port, "0A") for t in ("/proc/net/tcp", "/proc/net/tcp6"))


# The tens of ports this process has claimed (see claim_ports), each with its lock file
# open until the process exits.
_CLAIMED = {}


def claim_ports(port):
    """Claims the ten ports `port` lies in against every other test process, as the C++
    tests' fixture does (tests/gateway/gateway_fixture.hpp, PortClaims): an exclusive
    flock on $TMPDIR/otpgate-test-ports/udp-<first of the ten>.lock, held until this process
    exits. False when another process holds them. Finding a port free is not enough: two
    tests can both find it free before either binds it."""
    ten = port // 10
    if ten in _CLAIMED:
        return True
    folder = os.path.join(tempfile.gettempdir(), "otpgate-test-ports")
    os.makedirs(folder, exist_ok=True)
    try:
        os.chmod(folder, 0o1777)
    except OSError:
        pass  # another user's folder: usable as it is
    try:
        fd = os.open(os.path.join(folder, f"udp-{ten * 10}.lock"), os.O_RDONLY | os.O_CREAT,
                     0o644)
    except OSError:
        return False  # another user's file we may not open: taken, as far as we can tell
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMED[ten] = fd
    return True


def free_ports(count, low=12000, high=19000, taken=()):
    """`count` ports below the ephemeral range, claimed by this process (claim_ports) and
    free for both TCP and UDP right now."""
    found = []
    port = low + (os.getpid() * 37) % (high - low)
    for _ in range(high - low):
        if len(found) == count:
            break
        port = low + (port + 1 - low) % (high - low)
        if port in found or port in taken or not claim_ports(port):
            continue
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        found.append(port)
    if len(found) < count:
        raise SystemExit(f"only {len(found)} of {count} free ports in {low}-{high - 1}")
    return found


class Processes:
    """Background processes with their output in files; all stopped at the end."""

    def __init__(self, work, env):
        self.work, self.env, self.running = work, env, []
        self.quiet = False  # True: no "started:" line per process (the demo)

    def start(self, args, log, shell=False):
        if not self.quiet:
            print("started:", args if shell else " ".join(args), flush=True)
        if shell:
            args = "exec " + args  # signals reach the program, not a shell
        p = subprocess.Popen(args, stdout=open(os.path.join(self.work, log), "w"),
                             stderr=subprocess.STDOUT, env=self.env, shell=shell,
                             start_new_session=True)
        p.log = os.path.join(self.work, log)
        self.running.append(p)
        return p

    def output(self, p):
        return open(p.log, errors="replace").read()

    def wait_for_line(self, p, pattern, what, seconds=60):
        """The first match of `pattern` in the process's output; fails at once if it ends."""
        def check():
            m = re.search(pattern, self.output(p))
            if m:
                return m
            if p.poll() is not None:
                raise SystemExit(f"{what}: the process ended ({p.returncode}) first:\n"
                                 + self.output(p)[-3000:])
            return None
        return wait_until(check, what, seconds)

    def stop(self, p, sig=signal.SIGTERM, seconds=30):
        """Signals the process group; returns the exit code (killed after `seconds`)."""
        if p.poll() is None:
            os.killpg(p.pid, sig)
            try:
                p.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return p.returncode

    def stop_all(self):
        for p in self.running:
            try:
                self.stop(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

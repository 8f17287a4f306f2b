#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Runs the README's `otp-transfer` and `otp-gateway` examples as written (docs as tests),
with the configs a user copies from the docs: docs/transfer.md's TOML for otp-transfer,
gateway/examples/site-a.toml (docs/gateway.md's reference) for otp-gateway, each
mirrored for site B. Two sites on one machine, each in a folder of its own that stands for
its root (/etc/otpgate, /srv, /var/lib/otpgate, /data), keys from qkd-kme-sim with a test
PKI made by scripts/make-test-pki.sh. Changed, and nothing else: paths moved under the
site's folder, host names to 127.0.0.1/localhost, ports to free ones, `runuser -u otpgate
--` dropped (no such user here), the binaries taken from the build tree (on PATH, with
GST_PLUGIN_PATH as the README says). Not run: apt, install, editor, systemctl (the Debian
package test covers them).

What must come of it:
- otp-transfer: `--check-config` (docs/install.md) exits 0 at both sites; `serve` receives; `send` exits 0 and every file arrives with its SHA-256
  and the manifest; `watch` sends a run folder while it is written and exits 0 at the
  completion marker; `send --method aes` is recorded as AES; `jobs` lists them; a sender
  killed mid-job is shown interrupted and `start JOB_ID` completes it.
- otp-gateway: `--check-config` exits 0 for both sites (README and docs/gateway.md lines);
  both run; the status API answers (docs/install.md's curl); RTP and RTCP sent to each
  site's conference ports arrive at the other site's delivery ports byte-identical, for
  every stream both ways; SIGTERM stops it with exit 0 and the key it wiped.
A README or doc whose commands or config do not work as written fails this test.
Run: tests/docs/readme_daemon_examples.py SOURCE_DIR BUILD_DIR"""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from script_support import Processes, blocks, commands, free_ports, section, wait_until  # noqa: E402

source, build = sys.argv[1], sys.argv[2]


def read(path):
    return open(os.path.join(source, path)).read()


readme = read("README.md")
transfer_block = blocks(section(readme, "## Sending a specimen: `otp-transfer`", "\n## "), "sh")
install_block = blocks(section(readme, "## Install on a site", "\n## "), "sh")
running_block = blocks(section(read("docs/gateway.md"), "## Running it", "\n### "), "")
transfer_doc_config = blocks(section(read("docs/transfer.md"), "## Who runs what", "\n## Protocol"),
                             "toml")
install_md = section(read("docs/install.md"), "## Setting up the gateway",
                     "## Setting up the transfer")
for name, found in [("README otp-transfer", transfer_block), ("README Install", install_block),
                    ("docs/gateway.md Running it", running_block),
                    ("docs/transfer.md config", transfer_doc_config)]:
    if len(found) != 1:
        sys.exit(f"readme_daemon_examples: expected one code block in the {name} section, "
                 f"found {len(found)}")
# The configs are where the package puts them (docs/install.md), and nowhere else: a
# command naming another file fails as it would on an installed site.
installed = re.search(
    r"puts the templates in `(/etc/otpgate/[\w.-]+)` and `(/etc/otpgate/[\w.-]+)`",
    read("docs/install.md"))
if not installed:
    sys.exit("readme_daemon_examples: docs/install.md no longer says where the config templates go")
gateway_config_path, transfer_config_path = installed.groups()


def site_commands(block):
    """(site, command) for each command of a block whose comments say `# site A ...` or
    `# site B ...` before the commands of that site."""
    out, site = [], None
    for line in block.splitlines():
        m = re.match(r"#\s*site ([AB])\b", line)
        if m:
            site = m.group(1).lower()
        for command in commands(line):
            out.append((site, command))
    return out


transfer_cmds = site_commands(transfer_block[0])
if any(site is None for site, _ in transfer_cmds):
    sys.exit("readme_daemon_examples: a command in the README's otp-transfer block follows no "
             "`# site A` / `# site B` comment: " + repr(transfer_cmds))
gateway_cmds = [c for c in commands(install_block[0]) if " otp-gateway --" in f" {c}"] + \
    commands(running_block[0])
status_curl = [c for c in commands("\n".join(blocks(install_md, "sh"))) if c.startswith("curl ")]
# The README's health check after the gateway starts.
health_curl = [c for c in commands(install_block[0]) if c.startswith("curl ")]
if len(health_curl) != 1 or "/healthz" not in health_curl[0]:
    sys.exit(f"readme_daemon_examples: expected the README Install block's one /healthz curl, "
             f"found {health_curl}")
transfer_setup = section(read("docs/install.md"), "## Setting up the transfer service", "\n## ")
transfer_checks = [c for c in commands("\n".join(blocks(transfer_setup, "sh")))
                   if " otp-transfer " in f" {c} " and c.endswith("--check-config")]
if len(transfer_checks) != 1:
    sys.exit(f"readme_daemon_examples: expected docs/install.md's otp-transfer --check-config, "
             f"found {transfer_checks}")
if len(status_curl) != 1:
    sys.exit(f"readme_daemon_examples: expected docs/install.md's one status curl, found "
             f"{status_curl}")

work = tempfile.mkdtemp(prefix="otpgate-daemons-")
env = dict(os.environ, GST_PLUGIN_PATH=os.path.join(build, "plugins"),
           PATH=os.pathsep.join([os.path.join(build, "transfer"), os.path.join(build, "gateway"),
                                 os.environ["PATH"]]))
procs = Processes(work, env)
failed = []
ports = {}


def port(*what):
    """A free port for `what` (the same one every time it is asked for)."""
    if what not in ports:
        ports[what] = free_ports(1, taken=set(ports.values()))[0]
    return ports[what]


def other(site):
    return "b" if site == "a" else "a"


def mirror(text):
    """Site A's text as site B's: every sae-/hospital-/kme-/transfer-/gateway- a <-> b."""
    return re.sub(r"\b(sae|hospital|kme|transfer|gateway)-([ab])\b",
                  lambda m: m.group(1) + "-" + other(m.group(2)), text)


def at(site, text):
    """Absolute paths of a site moved under its folder."""
    return re.sub(r"(?<![\w./-])(/etc/otpgate|/srv|/var/lib/otpgate|/data)(?=[/\"\s]|$)",
                  lambda m: f"{work}/site-{site}{m.group(1)}", text)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def api(p, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{p}{path}", timeout=10) as r:
        return json.load(r)


def run(command, site, log, seconds=180, stderr=subprocess.STDOUT):
    """Runs a command line as written (with the site's paths); returns (code, output)."""
    print(f"site {site.upper()}: {command}", flush=True)
    with open(os.path.join(work, log), "w") as out:
        code = subprocess.run(at(site, command), shell=True, env=env, stdout=out,
                              stderr=stderr, timeout=seconds).returncode
    return code, open(os.path.join(work, log)).read()


def check(condition, message):
    if not condition:
        failed.append(message)
    return condition


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def files_under(root, relative_to):
    return {os.path.relpath(os.path.join(d, f), relative_to): os.path.join(d, f)
            for d, _, names in os.walk(root) for f in names}


def received_intact(site_root, source_dir, specimen, job_id, what):
    """Every file of `source_dir` in site B's incoming folder with the same SHA-256, and the
    job's manifest naming each (as FOLDER/PATH, as docs/transfer.md says)."""
    incoming = f"{site_root}/srv/otpgate/incoming/{specimen}"
    sent = files_under(source_dir, os.path.dirname(source_dir))
    got = files_under(f"{incoming}/{job_id}", f"{incoming}/{job_id}")
    if not check(set(got) == set(sent), f"{what}: received {sorted(got)}, sent {sorted(sent)}"):
        return
    for rel in sent:
        check(sha256(got[rel]) == sha256(sent[rel]), f"{what}: {rel} differs at site B")
    manifest = f"{incoming}/{job_id}.sha256"
    if check(os.path.exists(manifest), f"{what}: no manifest {manifest}"):
        lines = open(manifest).read()
        for rel in sent:
            check(f"{sha256(sent[rel])}  {rel}" in lines, f"{what}: manifest lacks {rel}")


def one(pattern, text, what):
    m = re.search(pattern, text)
    if not m:
        raise SystemExit(f"{what}: {pattern!r} not in:\n{text[-3000:]}")
    return m.group(1)


def start_kme(name, *options):
    procs.start([os.path.join(build, "keyclient/qkd-kme-sim"), "--cert", f"{work}/pki/kme.crt",
                 "--key", f"{work}/pki/kme.key", "--ca", f"{work}/pki/ca.crt", "--sae", "sae-a",
                 "--sae", "sae-b", "--port", "0", "--port-file", f"{work}/{name}.port", *options],
                f"{name}.log")
    return wait_until(lambda: int(open(f"{work}/{name}.port").read()), f"{name} is listening")


def site_setup():
    """A test PKI installed where the docs put it, for both sites."""
    subprocess.run([os.path.join(source, "scripts/make-test-pki.sh"), f"{work}/pki", "sae-a",
                    "sae-b"], check=True, stdout=subprocess.DEVNULL)
    for site in "ab":
        etc = f"{work}/site-{site}/etc/otpgate"
        os.makedirs(etc)
        shutil.copy(f"{work}/pki/ca.crt", f"{etc}/kme-ca.crt")
        for ext in ("crt", "key"):
            shutil.copy(f"{work}/pki/sae-{site}.{ext}", f"{etc}/sae-{site}.{ext}")
        os.makedirs(f"{work}/site-{site}/var/lib/otpgate")


# ---------------------------------------------------------------------------------------
# otp-transfer

def transfer_config(site, kme_port):
    """docs/transfer.md's config (site A's), for `site`; written where the README's
    commands look for it."""
    text = transfer_doc_config[0] if site == "a" else mirror(transfer_doc_config[0])
    text = re.sub(r'url = "https://kme-[ab]\.hospital-[ab]\.example:443"',
                  f'url = "https://localhost:{kme_port}"', text)
    text = re.sub(r'transfer = "transfer-([ab])\.hospital-[ab]\.example:7400"',
                  lambda m: f'transfer = "127.0.0.1:{port("transfer", m.group(1))}"', text)
    text = text.replace('listen = "0.0.0.0:7400"', f'listen = "0.0.0.0:{port("transfer", site)}"')
    text = text.replace('listen = "127.0.0.1:7480"', f'listen = "127.0.0.1:{port("api", site)}"')
    text = at(site, text)
    if ".example" in text:
        raise SystemExit("docs/transfer.md's config has a host the test cannot place:\n" + text)
    os.makedirs(f"{work}/site-{site}/srv/sequencer/runs", exist_ok=True)  # data_root
    write(at(site, transfer_config_path), text.encode())
    return text


def transfer_examples():
    kme = start_kme("kme-transfer", "--key-rate", "40e6", "--start-empty", "--max-key-size",
                    "65536")  # 5 MB/s of key: a large job runs long enough to be killed
    config_a = transfer_config("a", kme)
    transfer_config("b", kme)
    b_root = f"{work}/site-b"
    for site in "ab":  # docs/install.md's check, as the service will run it
        command = transfer_checks[0].replace("runuser -u otpgate -- ", "")
        code, out = run(command, site, f"check-transfer-{site}.log")
        check(code == 0 and re.search(r"\bvalid\b.*: site hospital-" + site, out),
              f"`{command}` at site {site}: exit {code}:\n{out}")
    def at_site(site, test):
        return [c for s, c in transfer_cmds if s == site and test(c)]
    serve = at_site("b", lambda c: c.endswith(" serve"))
    sends = at_site("a", lambda c: " send " in c)
    watch = at_site("a", lambda c: " watch " in c)
    jobs = at_site("a", lambda c: c.endswith(" jobs"))
    start = at_site("a", lambda c: " start JOB_ID" in c)
    if not (len(serve) == 1 and len(sends) == 2 and len(watch) == 1 and jobs and start):
        raise SystemExit("the README's otp-transfer block changed shape (serve at site B; send, "
                         "watch, send --method aes, jobs, start at site A): " + repr(transfer_cmds))

    # Site B: the receiving service, ready once it says where its job API is.
    receiver = procs.start(at("b", serve[0]), "serve-b.log", shell=True)
    api_b = int(procs.wait_for_line(receiver, r"job API on http://[^:]+:(\d+)/", "serve is up")
                .group(1))
    wait_until(lambda: api(api_b, "/api/v1/status"), "site B's job API answers")

    def b_job(specimen):
        jobs = api(api_b, "/api/v1/jobs")["jobs"]
        return next((j for j in jobs if j["specimen_id"] == specimen), None)

    # send: a specimen folder (FASTQ.gz, BAM in a subfolder, VCF).
    specimen, folder = re.search(r"send (\S+) (\S+)$", sends[0]).groups()
    local = at("a", folder)
    write(f"{local}/{specimen}_R1.fastq.gz", os.urandom(1536 << 10))
    write(f"{local}/aligned/{specimen}.bam", os.urandom(700 << 10))
    write(f"{local}/{specimen}.vcf", b"##fileformat=VCFv4.2\n" * 2000)
    code, out = run(sends[0], "a", "send.log")
    if check(code == 0, f"`{sends[0]}` exited {code}:\n{out[-2000:]}"):
        job = one(r"job (J\S+) completed: 3 files", out, "send")
        received_intact(b_root, local, specimen, job, f"`{sends[0]}`")

    # watch: the run folder grows while the command runs; the completion marker ends it.
    run_folder, specimen = re.search(r"watch (\S+) .*?(S-\d+)", watch[0]).groups()
    local = at("a", run_folder)
    marker = one(r'completion_markers = \["([^"]+)"', config_a, "completion_markers")
    write(f"{local}/Data/lane1_R1.fastq.gz", os.urandom(300 << 10))
    watcher = procs.start(at("a", watch[0]), "watch.log", shell=True)
    job = procs.wait_for_line(watcher, r"job (J\S+): specimen " + specimen, "watch made its job") \
        .group(1)
    first = f"{os.path.basename(local)}/Data/lane1_R1.fastq.gz"
    wait_until(lambda: any(f["path"] == first
                           for f in api(api_b, f"/api/v1/jobs/{job}")["files"]),
               "site B is receiving the run's first file")
    with open(f"{local}/Data/lane1_R1.fastq.gz", "ab") as f:
        f.write(os.urandom(200 << 10))
    write(f"{local}/Data/lane1_R2.fastq.gz", os.urandom(400 << 10))
    write(f"{local}/{marker}", b"")
    try:
        code = watcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = "still running 120 s after the completion marker"
    if check(code == 0, f"`{watch[0]}` ended {code}:\n{procs.output(watcher)[-2000:]}"):
        received_intact(b_root, local, specimen, job, f"`{watch[0]}`")

    # send --method aes
    specimen, folder = re.search(r"send (\S+) (\S+)", sends[1]).groups()
    local = at("a", folder)
    write(f"{local}/{specimen}.bam", os.urandom(900 << 10))
    code, out = run(sends[1], "a", "send-aes.log")
    if check(code == 0, f"`{sends[1]}` exited {code}:\n{out[-2000:]}"):
        job = one(r"job (J\S+) completed: 1 files, .* \(AES\)", out, "send --method aes")
        received_intact(b_root, local, specimen, job, f"`{sends[1]}`")
        check((b_job(specimen) or {}).get("method") == "AES", "site B does not record AES")

    # start JOB_ID: a sender killed mid-job (the README's send, another specimen) resumes.
    specimen, folder = "S-0045", re.search(r"send \S+ (\S+)$", sends[0]).group(1) \
        .replace("S-0042", "S-0045")
    local = at("a", folder)
    write(f"{local}/{specimen}.bam", os.urandom(24 << 20))
    sender = procs.start(at("a", sends[0].replace("S-0042", specimen)), "send-killed.log",
                         shell=True)
    job = procs.wait_for_line(sender, r"job (J\S+): specimen " + specimen, "send made its job") \
        .group(1)
    wait_until(lambda: (b_job(specimen) or {}).get("transferred", 0) > 0,
               "site B committed the first bytes of the job to be killed")
    procs.stop(sender, signal.SIGKILL)
    check((b_job(specimen) or {}).get("transfer_state") != "completed",
          "the job completed before its sender was killed (the KME should throttle it)")

    code, table = run(jobs[0], "a", "jobs.log")
    check(code == 0, f"`{jobs[0]}` exited {code}")
    row = next((l for l in table.splitlines() if l.startswith(job)), "")
    check("interrupted" in row, f"`{jobs[0]}` does not show the killed job interrupted:\n{table}")
    check(len(re.findall(r"\bcompleted\b", table)) >= 3 and re.search(r"\bAES\s*$", table, re.M),
          f"`{jobs[0]}` lacks the completed jobs or the AES one:\n{table}")

    code, out = run(start[0].replace("JOB_ID", job), "a", "start.log")
    if check(code == 0, f"`{start[0]}` exited {code}:\n{out[-2000:]}"):
        check(f"job {job} completed" in out, f"`{start[0]}` did not complete the job:\n{out}")
        received_intact(b_root, local, specimen, job, f"`{start[0]}` after a killed sender")
    check(procs.stop(receiver) == 0, "serve did not stop with exit 0 on SIGTERM")


# ---------------------------------------------------------------------------------------
# otp-gateway

def gateway_config(site, kme_port):
    """gateway/examples/site-a.toml for `site`: ports the two sites cannot share on one
    machine made distinct (a site's peer_port is the other's listen_port)."""
    text = read("gateway/examples/site-a.toml")
    text = text if site == "a" else mirror(text)
    text = re.sub(r'url = "https://kme-[ab]\.hospital-[ab]\.example:443"',
                  f'url = "https://localhost:{kme_port}"', text)
    text = re.sub(r'address = "gateway-[ab]\.hospital-[ab]\.example"', 'address = "127.0.0.1"',
                  text)
    kinds = {"local_rtp_port": ("local", site), "local_rtcp_port": ("local", site),
             "listen_port": ("listen", site), "peer_port": ("listen", other(site))}
    text = re.sub(r"^(\w+)( = )(\d+)", lambda m: m.group(1) + m.group(2) + str(
        port(*kinds[m.group(1)], m.group(3))) if m.group(1) in kinds else m.group(0), text,
        flags=re.M)
    text = re.sub(r'^(deliver_rtc?p = )"[^":]+:(\d+)"',
                  lambda m: f'{m.group(1)}"127.0.0.1:{port("deliver", site, m.group(2))}"', text,
                  flags=re.M)
    text = re.sub(r'^listen = "127\.0\.0\.1:8080"',
                  f'listen = "127.0.0.1:{port("status", site)}"', text, flags=re.M)
    text = at(site, text)
    if ".example" in text or "10.1.0.50" in text:
        raise SystemExit("the example gateway config has an address the test cannot place:\n"
                         + text)
    write(at(site, gateway_config_path), text.encode())
    return text


def streams_of(config):
    """Each [[stream]]: its name and its ports as configured."""
    out = []
    for chunk in config.split("[[stream]]")[1:]:
        fields = dict(re.findall(r'^(\w+) = "?([^"\s]+)"?', chunk, re.M))
        out.append(fields)
    return out


def rtp(seq, ssrc, size):
    header = bytes([0x80, 96, seq >> 8 & 0xff, seq & 0xff, 0, 0, 0, 0]) + ssrc.to_bytes(4, "big")
    return header + bytes((seq * 7 + i) & 0xff for i in range(size))


def rtcp(ssrc):
    return bytes([0x80, 200, 0, 6]) + ssrc.to_bytes(4, "big") + bytes(range(20))


def media_flows(configs, status_ports):
    """RTP (and RTCP where configured) from each site's conference system to each of its
    streams arrives at the other site's delivery ports byte-identical."""
    lanes = []
    for site in "ab":
        theirs = {s["name"]: s for s in streams_of(configs[other(site)])}
        for s in streams_of(configs[site]):
            if s.get("direction", "both") not in ("both", "send"):
                continue
            peer = theirs[s["name"]]
            lanes.append((f"{s['name']} {site}->{other(site)}", int(s["local_rtp_port"]),
                          int(peer["deliver_rtp"].split(":")[1])))
            if "local_rtcp_port" in s and "deliver_rtcp" in peer:
                lanes.append((f"{s['name']} RTCP {site}->{other(site)}",
                              int(s["local_rtcp_port"]), int(peer["deliver_rtcp"].split(":")[1])))
    sinks = []
    for _, _, deliver in lanes:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sink.bind(("127.0.0.1", deliver))
        sink.setblocking(False)
        sinks.append(sink)
    conference = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def packet(i, ssrc, n):
        return rtcp(ssrc) if "RTCP" in lanes[i][0] else rtp(n, ssrc, 600)

    # Until every lane delivers (the first keys of the call are fetched meanwhile).
    flowing, n = set(), 0

    def warm():
        nonlocal n
        for i, (_, local, _) in enumerate(lanes):
            conference.sendto(packet(i, 0xd0 + i, n), ("127.0.0.1", local))
            try:
                while True:
                    sinks[i].recv(65536)
                    flowing.add(i)
            except BlockingIOError:
                pass
        n += 1
        return len(flowing) == len(lanes)
    try:
        wait_until(warm, "media flows on every stream both ways", 60)
    except AssertionError as e:
        failed.append(f"{e}: flowing {[lanes[i][0] for i in sorted(flowing)]}")
        return
    # Then 100 packets per lane, each of which must arrive.
    sent = [[packet(i, 0xc0 + i, k) for k in range(100)] for i in range(len(lanes))]
    got = [[] for _ in lanes]
    for k in range(100):
        for i, (_, local, _) in enumerate(lanes):
            conference.sendto(sent[i][k], ("127.0.0.1", local))
    for i, sink in enumerate(sinks):
        sink.setblocking(True)
        sink.settimeout(10)  # bounds a hang only
        try:
            while len(got[i]) < len(sent[i]):
                p = sink.recv(65536)
                if p[4 if "RTCP" in lanes[i][0] else 8:][:4] == (0xc0 + i).to_bytes(4, "big"):
                    got[i].append(p)
        except socket.timeout:
            pass
        check(got[i] == sent[i], f"{lanes[i][0]}: {len(got[i])} of {len(sent[i])} arrived intact")
    print("media: " + ", ".join(f"{lane[0]} {len(g)}/{len(p)}" for lane, g, p in
                                zip(lanes, got, sent)), flush=True)
    for site in "ab":
        status = api(status_ports[site], "/api/v1/status")
        for s in status["streams"]:
            check(s["receive"]["auth-failures"] == 0, f"site {site} {s['name']}: auth failures")


def gateway_examples():
    kme = start_kme("kme-gateway")
    configs = {site: gateway_config(site, kme) for site in "ab"}
    checks = [c for c in gateway_cmds if c.endswith("--check-config")]
    runs = [c for c in gateway_cmds if "--check-config" not in c]
    if len(checks) != 2 or len(runs) != 1:
        raise SystemExit("the otp-gateway commands changed shape: " + repr(gateway_cmds))
    for command in checks:
        command = command.replace("runuser -u otpgate -- ", "")
        for site in "ab":
            code, out = run(command, site, f"check-{site}.log")
            check(code == 0 and re.search(r"\bvalid\b.*: site hospital-" + site, out),
                  f"`{command}` at site {site}: exit {code}:\n{out}")
    gateways, status_ports = {}, {}
    for site in "ab":
        gateways[site] = procs.start(at(site, runs[0]), f"gateway-{site}.log", shell=True)
    for site in "ab":
        m = procs.wait_for_line(gateways[site], r"running (\d+) streams .* status on "
                                r"http://[^:]+:(\d+)/api/v1/status", f"gateway {site} is up")
        status_ports[site] = int(m.group(2))
        check(m.group(1) == str(len(streams_of(configs[site]))), f"gateway {site}: {m.group(0)}")
    # docs/install.md's status check, at site A's status.listen.
    for command in status_curl:
        command = command.replace(":8080/", f":{status_ports['a']}/")
        code, out = run(command, "a", "curl.log", 30, subprocess.DEVNULL)  # no progress meter
        check(code == 0 and json.loads(out)["site"] == "hospital-a",
              f"`{command}`: exit {code}: {out[:500]}")
    media_flows(configs, status_ports)
    # The README's /healthz check, at site A, after media crossed both ways.
    for command in health_curl:
        command = command.replace(":8080/", f":{status_ports['a']}/")
        code, out = run(command, "a", "healthz.log", 30, subprocess.DEVNULL)
        check(code == 0 and json.loads(out)["status"] == "healthy",
              f"`{command}`: exit {code}: {out[:500]}")
    for site in "ab":
        code = procs.stop(gateways[site])
        out = procs.output(gateways[site])
        check(code == 0 and "stopped; fetched key wiped unused" in out,
              f"gateway {site} on SIGTERM: exit {code}:\n{out[-2000:]}")
        for s in streams_of(configs[site]):
            journal = f"{work}/site-{site}/var/lib/otpgate/sae-{site}-to-sae-{other(site)}-" \
                      f"{s['name']}.journal"
            check(os.path.exists(journal), f"no offset journal {journal}")


try:
    site_setup()
    transfer_examples()
    gateway_examples()
except (AssertionError, SystemExit) as e:
    failed.append(str(e))
except Exception:  # a bug in the test, or an answer it did not expect: say where
    failed.append(traceback.format_exc())
finally:
    procs.stop_all()
    if failed or os.environ.get("KEEP"):
        print(f"(work folder kept: {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)

if failed:
    print("readme_daemon_examples: FAIL\n" + "\n".join(failed))
    sys.exit(1)
print("readme_daemon_examples: the README's otp-transfer and otp-gateway examples run as "
      "written and deliver")

#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The transfer web page end to end in headless Chromium (DevTools protocol), against real
services: qkd-kme-sim, site A's `otp-transfer serve` (page, API, data root) and site B's
receiving service. Checks the job table against the database, starts a transfer from the
form and sees it complete, is refused a folder outside the data root with a visible
message, aborts and deletes a job, switches language, and saves a screenshot.
    test_web_page.py BUILD_DIR SOURCE_DIR
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request

import websocket  # Debian: python3-websocket

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from script_support import wait_until as wait_for  # noqa: E402

build, source = sys.argv[1], sys.argv[2]
if not shutil.which("chromium"):
    print("chromium is not installed (scripts/install-deps.sh installs it)")
    sys.exit(77)
work = tempfile.mkdtemp(prefix="otpgate-web-")
procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)


def start(args, log):
    p = subprocess.Popen(args, stdout=open(os.path.join(work, log), "w"), stderr=subprocess.STDOUT,
                         env=dict(os.environ, GST_PLUGIN_PATH=os.path.join(build, "plugins")))
    procs.append(p)
    return p


try:
    pki = os.path.join(work, "pki")
    subprocess.run([os.path.join(source, "scripts/make-test-pki.sh"), pki, "sae-a", "sae-b"],
                   check=True, stdout=subprocess.DEVNULL)
    # 5 MB/s of key from an empty store (a full one is not throttled at all): the large
    # job (larger than the store) is still running when it is aborted.
    start([os.path.join(build, "keyclient/qkd-kme-sim"), "--cert", f"{pki}/kme.crt", "--key",
           f"{pki}/kme.key", "--ca", f"{pki}/ca.crt", "--port", "0", "--port-file",
           f"{work}/kme.port", "--key-rate", "40e6", "--max-key-size", "65536",
           "--start-empty"], "kme.log")
    kme_port = wait_for(lambda: open(f"{work}/kme.port").read().strip(), "the KME")
    data_root = os.path.join(work, "sequencer")
    subprocess.run([os.path.join(source, "media-samples/make-sequencing-samples.sh"), data_root,
                    "S-WEB-1", "S-WEB-2"], check=True, stdout=subprocess.DEVNULL)
    os.makedirs(f"{data_root}/S-BIG")
    with open(f"{data_root}/S-BIG/reads.bam", "wb") as f:
        # Larger than the KME's store (128 MiB, which fills at 5 MB/s while the page loads
        # and the smaller jobs run): at least 96 MiB must come at the key rate, about 19 s,
        # long enough to see its progress, ETA and abort (96 MiB could finish in 3 s).
        for _ in range(224 // 32):
            f.write(os.urandom(32 << 20))
    transfer_port, api_a, api_b = free_port(), free_port(), free_port()

    def config(me, peer, listen, api_port):
        path = os.path.join(work, f"{me}.toml")
        with open(path, "w") as f:
            f.write(f"""[site]
name = "hospital-{me[-1]}"
sae_id = "{me}"
state_dir = "{work}/state-{me}"
[kme]
url = "https://localhost:{kme_port}"
tls_cert = "{pki}/{me}.crt"
tls_key = "{pki}/{me}.key"
tls_ca = "{pki}/ca.crt"
[peer]
sae_id = "{peer}"
transfer = "127.0.0.1:{transfer_port}"
[keys]
ring_bytes = 1048576
[transfer]
listen = "127.0.0.1:{listen}"
incoming_dir = "{work}/incoming-{me}"
data_root = "{data_root}"
[api]
listen = "127.0.0.1:{api_port}"
""")
        return path

    a_toml = config("sae-a", "sae-b", 0, api_a)
    b_toml = config("sae-b", "sae-a", transfer_port, api_b)
    cli = os.path.join(build, "transfer/otp-transfer")
    start([cli, "-c", b_toml, "serve"], "serve-b.log")
    start([cli, "-c", a_toml, "serve"], "serve-a.log")
    wait_for(lambda: api(api_a, "/api/v1/status"), "site A's service")
    wait_for(lambda: api(api_b, "/api/v1/status"), "site B's service")
    # A job that exists before the page is opened (sent with the CLI).
    subprocess.run([cli, "-c", a_toml, "send", "S-WEB-1", f"{data_root}/S-WEB-1"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, GST_PLUGIN_PATH=os.path.join(build, "plugins")))

    devtools = free_port()
    start(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--lang=en-US", f"--user-data-dir={work}/chromium", f"--remote-debugging-port={devtools}",
           "--window-size=1400,900", "about:blank"], "chromium.log")
    targets = wait_for(lambda: [t for t in api(devtools, "/json/list") if t["type"] == "page"],
                       "Chromium's DevTools")
    ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=30)
    next_id = [0]

    def cdp(method, **params):
        next_id[0] += 1
        ws.send(json.dumps({"id": next_id[0], "method": method, "params": params}))
        while True:
            message = json.loads(ws.recv())
            if message.get("id") == next_id[0]:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(expression):
        result = cdp("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    cdp("Page.enable")
    cdp("Page.navigate", url=f"http://127.0.0.1:{api_a}/")

    def jobs_a():
        return api(api_a, "/api/v1/jobs")["jobs"]

    # 1. The table shows the jobs the database holds.
    first = jobs_a()[0]["job_id"]
    wait_for(lambda: js(f"!!document.getElementById('job-{first}')"), "the existing job's row")
    assert js("document.querySelectorAll('#jobs tr:not(.detail)').length") == len(jobs_a())
    assert js(f"document.querySelector('#job-{first} td.state').textContent") == "completed"

    # 2. Language: labels from one table, switchable.
    js("document.getElementById('lang').value='ja'; document.getElementById('lang').dispatchEvent(new Event('change')); 0")
    wait_for(lambda: js("document.querySelector('h1').textContent") == "検体転送", "Japanese labels")
    wait_for(lambda: js(f"document.querySelector('#job-{first} td.state').textContent") == "完了",
             "Japanese states")
    js("document.getElementById('lang').value='en'; document.getElementById('lang').dispatchEvent(new Event('change')); 0")
    wait_for(lambda: js("document.querySelector('h1').textContent") == "Specimen transfers", "English")

    # 3. Start a transfer from the form; it completes.
    wait_for(lambda: js("[...document.getElementById('folder').options].some(o => o.value === 'S-WEB-2')"),
             "the folder list")
    assert "available now" in js("document.getElementById('budget').textContent")
    # The pre-start forecast comes from the job API (one computation): the key a folder
    # needs, whether the KME holds it now, and the link's key rate measured between two
    # listings (the simulator makes 5 MB/s; this site's sends drew on it meanwhile).
    def web2_listed():
        return [f for f in api(api_a, "/api/v1/folders")["folders"] if f["folder"] == "S-WEB-2"][0]
    web2 = wait_for(lambda: web2_listed()["forecast"]["key_rate_bits_per_s"] > 0 and web2_listed(),
                    "a key rate measured between listings")
    assert web2["key_needed_otp"] > web2["bytes"], web2
    assert web2["forecast"]["key_rate_bits_per_s"] > 0, web2
    assert web2["forecast"]["covered"] in (True, False), web2
    js("document.getElementById('folder').value='S-WEB-2'; document.getElementById('method').value='otp';"
       "document.getElementById('method').dispatchEvent(new Event('change')); 0")
    wait_for(lambda: any(words in js("document.getElementById('budget').textContent")
                         for words in ("covered by the key the KME holds now", "about")),
             "the key forecast in the form")
    js("document.getElementById('specimen').value='S-WEB-2'; document.getElementById('folder').value='S-WEB-2';"
       "document.getElementById('method').value='otp'; document.getElementById('start').click(); 0")
    job2 = wait_for(lambda: [j for j in jobs_a() if j["specimen_id"] == "S-WEB-2"], "the new job")[0]
    wait_for(lambda: [j for j in jobs_a() if j["job_id"] == job2["job_id"]][0]["transfer_state"] == "completed",
             "the form's transfer to complete", 60)
    wait_for(lambda: js(f"document.querySelector('#job-{job2['job_id']} td.state')?.textContent") == "completed",
             "the row to show completed")
    assert "started" in js("document.getElementById('message').textContent")

    # 4. A folder outside the data root is refused, visibly, and creates no job.
    before = len(jobs_a())
    js("const s=document.getElementById('folder'); s.add(new Option('evil','../../etc')); s.value='../../etc';"
       "document.getElementById('specimen').value='S-EVIL'; document.getElementById('start').click(); 0")
    wait_for(lambda: js("document.getElementById('message').className") == "error", "the refusal")
    text = js("document.getElementById('message').textContent")
    assert "data root" in text, text
    assert len(jobs_a()) == before

    # 5. Abort a running job, then delete it (the page asks first).
    js("document.getElementById('folder').value='S-BIG'; document.getElementById('specimen').value='S-BIG';"
       "document.getElementById('start').click(); 0")
    big = wait_for(lambda: [j for j in jobs_a() if j["specimen_id"] == "S-BIG" and j["transfer_state"] == "running"],
                   "the large job to run", 60)[0]["job_id"]
    wait_for(lambda: js(f"!!document.querySelector('#job-{big} button[data-action=abort]')"), "its Abort button")
    # A running job shows a progress bar that advances, and its ETA (from the job API).
    first_value = wait_for(lambda: js(f"document.querySelector('#job-{big} td.progress progress')?.value"),
                           "the progress bar to start")
    wait_for(lambda: js(f"document.querySelector('#job-{big} td.progress progress').value") > first_value,
             "the progress bar to advance", 60)
    try:
        wait_for(lambda: js(f"document.querySelector('#job-{big} td.progress .eta')?.textContent || ''").startswith("ETA "),
                 "the running job's ETA", 60)
    except AssertionError:
        print(api(api_a, f"/api/v1/jobs/{big}"), js(f"document.getElementById('job-{big}').outerHTML"))
        raise
    running_job = api(api_a, f"/api/v1/jobs/{big}")
    assert running_job["forecast"]["key_needed_bytes"] > 0, running_job
    js(f"document.querySelector('#job-{big} button[data-action=abort]').click(); 0")
    wait_for(lambda: [j for j in jobs_a() if j["job_id"] == big][0]["transfer_state"] == "aborted",
             "the job to be aborted", 60)
    wait_for(lambda: js(f"!!document.querySelector('#job-{big} button[data-action=delete]')"), "its Delete button")
    js("window.confirmed = 0; window.confirm = () => { window.confirmed++; return true; }; 0")
    js(f"document.querySelector('#job-{big} button[data-action=delete]').click(); 0")
    wait_for(lambda: not [j for j in jobs_a() if j["job_id"] == big], "the job to be deleted")
    assert js("window.confirmed") == 1
    wait_for(lambda: js(f"!document.getElementById('job-{big}')"), "the row to disappear")

    # 6. The page fits 1280 px and 800 px without sideways scrolling (columns collapse into
    # a detail row); a screenshot at each width, and the 1280 px one as web-page.png.
    os.makedirs(os.path.join(build, "test-artifacts"), exist_ok=True)
    for width in (1280, 800):
        cdp("Emulation.setDeviceMetricsOverride", width=width, height=800, deviceScaleFactor=1, mobile=False)
        wait_for(lambda: js("window.innerWidth") == width, f"the {width} px viewport")
        js("window.scrollTo(0, 0); 0")
        overflow = js("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert overflow[0] <= overflow[1], f"at {width} px the page scrolls sideways: {overflow}"
        assert js("[...document.querySelectorAll('#jobs tr.detail')].some(r => getComputedStyle(r).display !== 'none')"), \
            f"at {width} px the collapsed columns are not in a detail row"
        shot = cdp("Page.captureScreenshot", format="png")["data"]
        for name in [f"web-page-{width}.png"] + (["web-page.png"] if width == 1280 else []):
            with open(os.path.join(build, "test-artifacts", name), "wb") as f:
                f.write(base64.b64decode(shot))
    print("web page: all checks passed; screenshots in", os.path.join(build, "test-artifacts"))
finally:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    if os.environ.get("KEEP_WEB_TEST"):
        print("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)

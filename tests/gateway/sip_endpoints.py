#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A call with real SIP software through two otp-gateways (issue 15, docs/sip.md):
qkd-kme-sim, otp-gateway A and B with [sip] only, Kamailio A and B (their rtpengine module
pointed at their own gateway's ng socket), baresip B (callee, auto-answer, a 660 Hz tone,
records what it hears) and baresip A (caller, a 440 Hz tone), Opus and VP8 (fakevideo),
dialling b@ through proxy A -> proxy B. Checked: the call is answered and both gateways
show it with audio and video crossing both ways; a second call that finds too few call
lanes at gateway A is answered 488 at its caller; hold and resume make two re-INVITEs that
keep the call's streams, and audio flows again after them; the recordings carry the other
side's tone; the hang-up ends the call at both gateways (lanes free); a call that proxy A
routes past gateway B has its answer refused and its caller sends nothing. Exit 77 (skip)
where kamailio or baresip is not installed.

Usage: sip_endpoints.py SOURCE_DIR BUILD_DIR"""
import glob
import json
import os
import re
import socket
import shutil
import struct
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from script_support import (Processes, free_ports, tcp_listening, udp_bound,  # noqa: E402
                            wait_until)

KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules"

KAMAILIO_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
disable_tcp=yes
listen=udp:127.0.0.1:{port}
mpath="{modules}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "rtpengine.so"
modparam("rtpengine", "rtpengine_sock", "udp:127.0.0.1:{ng}")

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{
            if (is_method("BYE")) rtpengine_delete();
            if (is_method("INVITE")) {{
                xlog("L_INFO", "re-INVITE $ci\\n");
                rtpengine_offer("replace-origin replace-session-connection ICE=remove RTP/AVP");
                t_on_reply("SDP");
            }}
            t_relay();
            exit;
        }}
        if (is_method("ACK") && t_check_trans()) {{ t_relay(); }}
        exit;
    }}
    if (is_method("CANCEL")) {{
        rtpengine_delete();
        if (t_check_trans()) t_relay();
        exit;
    }}
    if (is_method("INVITE")) {{
        record_route();
        if (!rtpengine_offer("replace-origin replace-session-connection ICE=remove RTP/AVP")) {{
            xlog("L_ERR", "rtpengine_offer refused\\n");
            sl_send_reply("488", "Not Acceptable Here");
            exit;
        }}
        t_on_reply("SDP");
    }}
    {next_hop}
    if (!t_relay()) sl_reply_error();
}}

onreply_route[SDP] {{
    if (has_body("application/sdp")) {{
        if (!rtpengine_answer("replace-origin replace-session-connection ICE=remove")) {{
            # Refused (e.g. an answer from a site without a gateway): a 2xx goes on whatever
            # the route does, so its SDP must not let the endpoints reach each other.
            xlog("L_ERR", "otpgate refused the answer: media disabled\\n");
            subst_body("/m=([a-z]+) [0-9]+/m=\\1 0/g");
            subst_body("/c=IN IP4 [0-9.]+/c=IN IP4 0.0.0.0/g");
        }}
    }}
}}
"""

BARESIP_CONFIG = """sip_listen 127.0.0.1:{port}
net_interface 127.0.0.1
audio_source ausine,{tone}
audio_player sndfile,/dev/null
audio_alert sndfile,/dev/null
video_source fakevideo,nil
video_display fakevideo,nil
module_path /usr/lib/baresip/modules
module stdio.so
module opus.so
module ausine.so
module sndfile.so
module fakevideo.so
module vp8.so
module cons.so
cons_listen 127.0.0.1:{console}
module_app account.so
module_app menu.so
"""


def frequency(wav_path):
    """The tone's frequency from zero crossings of a PCM/float WAV (first channel)."""
    data = open(wav_path, "rb").read()
    pos, fmt, samples = 12, None, None
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if kind == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif kind == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    tag, channels, rate, _, _, bits = fmt
    width = bits // 8
    code = {(1, 2): "h", (3, 4): "f", (1, 4): "i"}[(tag if tag != 0xFFFE else 1, width)]
    count = len(samples) // (width * channels)
    values = struct.unpack("<" + code * (count * channels), samples[:count * width * channels])
    mono = values[::channels]
    loud = [i for i, v in enumerate(mono) if abs(v) > (0.05 if code == "f" else 1000)]
    if len(loud) < rate:
        return 0.0, len(loud) / rate
    mono = mono[loud[0]:loud[-1]]
    crossings = sum(1 for a, b in zip(mono, mono[1:]) if a < 0 <= b)
    return crossings * rate / len(mono), len(loud) / rate


def main():
    source, build = sys.argv[1], sys.argv[2]
    for program in ("kamailio", "baresip"):
        if not shutil.which(program):
            print(f"SKIP: {program} is not installed (scripts/install-deps.sh installs it)")
            return 77
    if not os.path.exists(os.path.join(KAMAILIO_MODULES, "rtpengine.so")):
        print("SKIP: Kamailio's rtpengine module is not installed")
        return 77
    pki = os.path.join(build, "test-pki", "good")
    work = tempfile.mkdtemp(prefix="otpgate-sip-")
    env = dict(os.environ, GST_PLUGIN_PATH=os.path.join(build, "plugins"))
    procs = Processes(work, env)
    (kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b) = free_ports(7)
    # baresip listens on its SIP port (UDP, TCP) and the next one (TLS): six in a row.
    spare = free_ports(40, taken=(kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b))
    sip_b = next(p for p in spare if all(p + i in spare for i in range(1, 6)))
    sip_a, sip_a2 = sip_b + 2, sip_b + 4
    consoles = free_ports(3, taken=(kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b,
                                    *spare))  # baresip's UDP console, per endpoint
    media = 4000 + (os.getpid() % 70) * 80  # A: media..+39, B: +40..+79
    try:
        procs.start([os.path.join(build, "keyclient", "qkd-kme-sim"), "--port", str(kme_port),
                     "--cert", f"{pki}/kme.crt", "--key", f"{pki}/kme.key", "--ca",
                     f"{pki}/ca.crt"], "kme.log")
        wait_until(lambda: tcp_listening(kme_port), "the KME")
        gateways = {}
        for me, peer, status, ng, low in (("sae-a", "sae-b", status_a, ng_a, media),
                                          ("sae-b", "sae-a", status_b, ng_b, media + 40)):
            config = os.path.join(work, f"{me}.toml")
            with open(config, "w") as f:
                f.write(f"""[site]
name = "{me}-site"
sae_id = "{me}"
state_dir = "{work}/{me}-state"
[kme]
url = "https://127.0.0.1:{kme_port}"
tls_cert = "{pki}/{me}.crt"
tls_key = "{pki}/{me}.key"
tls_ca = "{pki}/ca.crt"
[peer]
sae_id = "{peer}"
address = "127.0.0.1"
[status]
listen = "127.0.0.1:{status}"
[sip]
ng_listen = "127.0.0.1:{ng}"
media_address = "127.0.0.1"
port_min = {low}
port_max = {low + 39}
max_media = 3
""")
            gateways[me] = procs.start([os.path.join(build, "gateway", "otp-gateway"),
                                        "--config", config], f"{me}.log")
            wait_until(lambda: udp_bound(ng), f"gateway {me}'s ng socket")

        def status(port):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status") as r:
                return json.load(r)

        for port in (status_a, status_b):
            wait_until(lambda: status(port), "a gateway's status API")
        for name, port, ng, next_hop in (
                ("a", proxy_a, ng_a,
                 # b@localhost: a misrouted call straight to the callee, past site B's gateway
                 f'if ($rd == "localhost") {{ $du = "sip:127.0.0.1:{sip_b}"; }} '
                 f'else {{ $du = "sip:127.0.0.1:{proxy_b}"; }}'),
                ("b", proxy_b, ng_b, "")):
            cfg = os.path.join(work, f"kamailio-{name}.cfg")
            with open(cfg, "w") as f:
                f.write(KAMAILIO_CFG.format(port=port, ng=ng, modules=KAMAILIO_MODULES,
                                            next_hop=next_hop))
            p = procs.start(["kamailio", "-f", cfg, "-DD", "-E", "-m", "64", "-M", "16",
                             "-Y", work, "-P", os.path.join(work, f"kamailio-{name}.pid")],
                            f"kamailio-{name}.log")
            wait_until(lambda: udp_bound(port) or p.poll() is not None, f"kamailio {name}")
            if p.poll() is not None:
                raise SystemExit(f"kamailio {name} ended at start")

        endpoints = {}
        for (name, port, account), console in zip((
                ("callee", sip_b, f"<sip:b@127.0.0.1:{sip_b};transport=udp>;regint=0;"
                                  "answermode=auto"),
                ("caller", sip_a, f"<sip:a@127.0.0.1:{sip_a};transport=udp>;regint=0;"
                                  f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\""),
                ("caller2", sip_a2, f"<sip:a2@127.0.0.1:{sip_a2};transport=udp>;regint=0;"
                                    f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\"")),
                consoles):
            home = os.path.join(work, name)
            os.makedirs(home)
            with open(os.path.join(home, "config"), "w") as f:
                f.write(BARESIP_CONFIG.format(port=port, tone=440 if name == "caller" else 660,
                                              console=console))
            with open(os.path.join(home, "accounts"), "w") as f:
                f.write(account + "\n")
            endpoints[name] = home
        # sndfile writes its recordings into the working directory.
        callee = procs.start(["sh", "-c", f"cd {endpoints['callee']} && exec baresip -f ."],
                             "callee.log")
        wait_until(lambda: udp_bound(sip_b), "the callee's SIP socket")
        caller = procs.start(["sh", "-c", f"cd {endpoints['caller']} && exec baresip -f . -t 14 "
                              f"-e '/dial sip:b@127.0.0.1:{sip_b}'"], "caller.log")
        # While it runs, both gateways show the call with packets each way.
        def running():
            calls = [status(p)["calls"] for p in (status_a, status_b)]
            if not all(c and c[0]["state"] == "answered" for c in calls):
                return None
            # Audio and video, each with media both ways at both gateways.
            m = [media["packets"] for c in calls for media in c[0]["media"]]
            types = [media["type"] for c in calls for media in c[0]["media"]]
            ok = len(m) == 4 and all(x["to_peer"] > 50 and x["to_local"] > 50 for x in m)
            return list(zip(types, m)) if ok else None
        seen = wait_until(running, "the call answered with media both ways at both gateways",
                          20)
        print("media packets at A and B:", seen)
        # A second call (audio and video) while the first holds two of the three call
        # lanes: gateway A refuses the offer, proxy A answers 488, nothing is relayed.
        second = procs.start(["sh", "-c", f"cd {endpoints['caller2']} && exec baresip -f . "
                              f"-t 4 -e '/dial sip:b@127.0.0.1:{sip_b}'"], "caller2.log")
        second.wait(timeout=30)
        assert "488 Not Acceptable Here" in procs.output(second), procs.output(second)[-2000:]
        print("the second call was refused: 488 Not Acceptable Here at its caller")
        for port in (status_a, status_b):
            assert len(status(port)["calls"]) == 1 and status(port)["sip"]["free_media"] == 1
        # Hold and resume (baresip's /hold and /resume through its UDP console): two
        # re-INVITEs through both proxies and gateways; the same streams carry on.
        streams = [[m["stream"] for m in status(p)["calls"][0]["media"]]
                   for p in (status_a, status_b)]
        proxies = [p for p in procs.running if "kamailio-" in p.log]

        def reinvites(count):
            return all(procs.output(p).count("re-INVITE") >= count for p in proxies)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ui:
            ui.sendto(b"/hold\n", ("127.0.0.1", consoles[1]))
            wait_until(lambda: reinvites(1), "the hold re-INVITE at both proxies", 10)
            ui.sendto(b"/resume\n", ("127.0.0.1", consoles[1]))
            wait_until(lambda: reinvites(2), "the resume re-INVITE at both proxies", 10)
        delivered = status(status_b)["calls"][0]["media"][0]["packets"]["to_local"]
        wait_until(lambda: status(status_b)["calls"][0]["media"][0]["packets"]["to_local"]
                   > delivered + 25, "audio at the callee after the resume", 10)
        for port, names in zip((status_a, status_b), streams):
            st = status(port)
            assert [m["stream"] for m in st["calls"][0]["media"]] == names, st["calls"]
            assert len(st["calls"]) == 1 and st["sip"]["free_media"] == 1, st["sip"]
        print("hold and resume: two re-INVITEs, the same streams, audio again after resume")
        caller.wait(timeout=30)
        wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                   "the hang-up to end the call at both gateways", 20)
        for port in (status_a, status_b):
            st = status(port)
            assert st["sip"]["free_media"] == 3, st["sip"]
        # A call routed past site B's gateway: gateway A refuses the callee's unmarked answer,
        # the route disables the media in the 200 OK, and the caller sends nothing at all
        # (with the answer passed on as it came, it would send plain RTP to the callee).
        misrouted = procs.start(["sh", "-c", f"cd {endpoints['caller2']} && exec baresip -f . "
                                 f"-t 5 -e '/dial sip:b@localhost:{sip_b}'"], "caller3.log")
        misrouted.wait(timeout=30)
        sent = [int(x) for x in re.findall(r"audio=(\d+)/", procs.output(misrouted))]
        assert sent and not any(sent), procs.output(misrouted)[-2000:]
        print(f"the misrouted call sent nothing ({len(sent)} status lines with audio=0)")
        wait_until(lambda: not status(status_a)["calls"], "the misrouted call's BYE at gateway A")
        assert status(status_a)["sip"]["free_media"] == 3
        procs.stop(callee)
        # Each heard the other's tone (caller 440 Hz, callee 660 Hz), so neither heard itself.
        for name, tone in (("callee", 440), ("caller", 660)):
            # sndfile records up to the first re-INVITE (the hold); the status lines show
            # what is received after the resume.
            dumps = sorted(glob.glob(os.path.join(endpoints[name], "dump-*-dec.wav")))
            assert dumps, f"the {name} wrote no recording"
            hz, seconds = frequency(dumps[0])
            print(f"the {name} heard {hz:.1f} Hz for {seconds:.1f} s")
            assert abs(hz - tone) < 5 and seconds > 3, (name, hz, seconds)
        log = procs.output(callee)
        after = log[log.rindex("got re-INVITE"):log.index("terminated")]
        received = [int(x) for x in re.findall(r"audio=\d+/(\d+)", after)]
        assert received and received[-1] > 50000, received[-5:]
        print(f"after the resume the callee receives {received[-1]} bit/s of audio")
        print("PASS: a baresip call through Kamailio A, gateway A, gateway B, Kamailio B")
        return 0
    except BaseException:
        for p in procs.running:
            print(f"--- {p.log}\n" + procs.output(p)[-2500:])
        raise
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A call with real SIP software through two otp-gateways (issue 15, docs/sip.md):
qkd-kme-sim, otp-gateway A and B with [sip] only, Kamailio A and B (their rtpengine module
pointed at their own gateway's ng socket), baresip B (callee, auto-answer, a 660 Hz tone,
records what it hears) and baresip A (caller, a 440 Hz tone), Opus and VP8 (fakevideo),
dialling b@ through proxy A -> proxy B. Checked: the call is answered and both gateways
show it with audio and video crossing both ways; video frames arrive at the callee (decoded
and shown, baresip's /video_debug); a second call that finds too few call lanes at gateway A
is answered 488 at its caller; hold and resume make two re-INVITEs that keep the call's
streams, and audio flows again after them; the recordings carry the other side's tone; the
hang-up ends the call at both gateways (lanes free); a call that proxy A routes past gateway
B has its answer refused and its caller sends nothing. Exit 77 (skip) where kamailio or
baresip is not installed.

Usage: sip_endpoints.py SOURCE_DIR BUILD_DIR"""
import glob
import os
import re
import socket
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts"))
from script_support import free_ports, udp_bound, wait_until  # noqa: E402
from sip_lab import SipLab, frequency, missing_software  # noqa: E402


def main():
    source, build = sys.argv[1], sys.argv[2]
    why = missing_software()
    if why:
        print(f"SKIP: {why}")
        return 77
    work = tempfile.mkdtemp(prefix="otpgate-sip-")
    lab = SipLab(build, work)
    procs = lab.procs
    status = lab.status
    (kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b) = free_ports(7)
    # baresip listens on its SIP port (UDP, TCP) and the next one (TLS): six in a row.
    spare = free_ports(40, taken=(kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b))
    sip_b = next(p for p in spare if all(p + i in spare for i in range(1, 6)))
    sip_a, sip_a2 = sip_b + 2, sip_b + 4
    consoles = free_ports(3, taken=(kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b,
                                    *spare))  # baresip's UDP console, per endpoint
    media = 4000 + (os.getpid() % 70) * 80  # A: media..+39, B: +40..+79
    try:
        lab.start_kme(kme_port)
        for me, peer, status_port, ng, low in (("sae-a", "sae-b", status_a, ng_a, media),
                                               ("sae-b", "sae-a", status_b, ng_b, media + 40)):
            lab.start_gateway(lab.gateway_config(me, peer, status_port, ng, low, low + 39),
                              ng, status_port, me)
        for name, port, ng, next_hop in (
                ("a", proxy_a, ng_a,
                 # b@localhost: a misrouted call straight to the callee, past site B's gateway
                 f'if ($rd == "localhost") {{ $du = "sip:127.0.0.1:{sip_b}"; }} '
                 f'else {{ $du = "sip:127.0.0.1:{proxy_b}"; }}'),
                ("b", proxy_b, ng_b, "")):
            lab.start_kamailio(name, port, f"udp:127.0.0.1:{ng}", next_hop)

        endpoints = {}
        for (name, port, account), console in zip((
                ("callee", sip_b, f"<sip:b@127.0.0.1:{sip_b};transport=udp>;regint=0;"
                                  "answermode=auto"),
                ("caller", sip_a, f"<sip:a@127.0.0.1:{sip_a};transport=udp>;regint=0;"
                                  f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\""),
                ("caller2", sip_a2, f"<sip:a2@127.0.0.1:{sip_a2};transport=udp>;regint=0;"
                                    f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\"")),
                consoles):
            endpoints[name] = lab.baresip_home(name, port, 440 if name == "caller" else 660,
                                               console, account)
        callee = lab.start_baresip(endpoints["callee"], "callee.log")
        wait_until(lambda: udp_bound(sip_b), "the callee's SIP socket")
        caller = lab.start_baresip(endpoints["caller"], "caller.log",
                                   f"-t 14 -e '/dial sip:b@127.0.0.1:{sip_b}'")
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
        # Video frames arrive at the callee: baresip decodes the VP8 and hands each frame to
        # its display (fakevideo), which counts them; /video_debug on its console says how many.
        def frames_shown():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ui:
                ui.settimeout(2)
                ui.sendto(b"/video_debug\n", ("127.0.0.1", consoles[0]))
                m = re.search(rb"vidisp: fakevideo (\d+) x (\d+) frames=(\d+)", ui.recv(65535))
            return int(m.group(3)) if m else 0
        def at_least(count):
            frames = frames_shown()
            return frames if frames >= count else None
        shown = wait_until(lambda: at_least(50), "50 video frames shown at the callee", 10)
        more = wait_until(lambda: at_least(shown + 25), "more frames at the callee", 10)
        print(f"the callee's display got {shown}, then {more} video frames")
        # A second call (audio and video) while the first holds two of the three call
        # lanes: gateway A refuses the offer, proxy A answers 488, nothing is relayed.
        second = lab.start_baresip(endpoints["caller2"], "caller2.log",
                                   f"-t 4 -e '/dial sip:b@127.0.0.1:{sip_b}'")
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
        misrouted = lab.start_baresip(endpoints["caller2"], "caller3.log",
                                      f"-t 5 -e '/dial sip:b@localhost:{sip_b}'")
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
        lab.dump_logs()
        raise
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

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
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts"))
from loopback_capture import Capture, sip_to  # noqa: E402
from script_support import free_ports, udp_bound, wait_until  # noqa: E402
from sip_lab import SipLab, heard, skip_unless_runnable  # noqa: E402


def main():
    source, build = sys.argv[1], sys.argv[2]
    skip_unless_runnable()
    lab = SipLab.temporary(build, "otpgate-sip-")
    procs = lab.procs
    status = lab.status
    (kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b) = free_ports(7)
    # baresip listens on its SIP port (UDP, TCP) and the next one (TLS): six in a row.
    spare = free_ports(40, taken=(kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b))
    sip_b = next(p for p in spare if all(p + i in spare for i in range(1, 6)))
    sip_a, sip_a2 = sip_b + 2, sip_b + 4
    consoles = free_ports(3, taken=(kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b,
                                    *spare))  # baresip's UDP console, per endpoint
    # Media ports: each SIP test has a region of its own (2400-7839; SIPp's RTP takes 8000
    # up, the C++ call tests 10000 up), so tests that ctest runs side by side never find
    # each other's ports busy (a gateway skips a taken port, and a range can run out).
    media = 4000 + (os.getpid() % 10) * 80  # 4000-4799; A: media..+39, B: +40..+79
    with lab:
        lab.start_kme(kme_port)
        for me, peer, status_port, ng, low in (("sae-a", "sae-b", status_a, ng_a, media),
                                               ("sae-b", "sae-a", status_b, ng_b, media + 40)):
            lab.start_gateway(lab.gateway_config(me, peer, status_port, ng, low, low + 39),
                              ng, status_port, me)
        # b@localhost: a misrouted call straight to the callee, past site B's gateway
        hop_a = (f'if ($rd == "localhost") {{ $du = "sip:127.0.0.1:{sip_b}"; }} '
                 f'else {{ $du = "sip:127.0.0.1:{proxy_b}"; }}')
        for name, port, ng, next_hop in (("a", proxy_a, ng_a, hop_a), ("b", proxy_b, ng_b, "")):
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
                                   f"-t 60 -e '/dial sip:b@127.0.0.1:{sip_b}'")
        # While it runs, both gateways show the call with audio and video, each with
        # packets both ways.
        seen = wait_until(lambda: lab.media_flowing((status_a, status_b), 4, 50),
                          "the call answered with media both ways at both gateways", 20)
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
        # Kamailio A restarts mid-call (SIGTERM, then the same route again): the media never
        # pass the proxy, so they go on between the gateways without a gap (measured in a
        # loopback capture), and the BYE after the restart still ends the call at both
        # gateways: its path is in the SIP messages (Record-Route), not in the proxy.
        kamailio_a = next(p for p in proxies if p.log.endswith("kamailio-a.log"))
        capture = Capture()
        time.sleep(1)
        stopped = time.monotonic()
        code = procs.stop(kamailio_a)
        lab.start_kamailio("a-restarted", proxy_a, f"udp:127.0.0.1:{ng_a}", hop_a)
        restarted = time.monotonic()
        time.sleep(1)
        seen = capture.close()
        print(f"Kamailio A restarted mid-call (SIGTERM: exit {code}): down "
              f"{(restarted - stopped) * 1000:.0f} ms")
        site_a, site_b = range(media, media + 40), range(media + 40, media + 80)
        for way, src, dst in (("A to B", site_a, site_b), ("B to A", site_b, site_a)):
            times = [t for t, sport, dport, _ in seen if sport in src and dport in dst]
            assert times and times[0] < stopped - 0.5 and times[-1] > restarted + 0.5, \
                (way, len(times))
            gap = max(b - a for a, b in zip(times, times[1:]))
            print(f"  OTP media {way}: {len(times)} datagrams, longest gap "
                  f"{gap * 1000:.0f} ms")
            assert gap < 0.3, (way, gap)
        ui_caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ui_caller.sendto(b"/hangup\n", ("127.0.0.1", consoles[1]))
        hung_up = time.monotonic()
        wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                   "the BYE after the restart to end the call at both gateways", 10)
        print(f"the BYE through the restarted proxy ended the call at both gateways after "
              f"{(time.monotonic() - hung_up) * 1000:.0f} ms")
        ui_caller.sendto(b"/quit\n", ("127.0.0.1", consoles[1]))
        ui_caller.close()
        caller.wait(timeout=30)
        for port in (status_a, status_b):
            st = status(port)
            assert st["sip"]["free_media"] == 3, st["sip"]
        # A call routed past site B's gateway: gateway A refuses the callee's unmarked answer,
        # the route disables the media in the 200 OK, and the caller sends nothing at all
        # (with the answer passed on as it came, it would send plain RTP to the callee).
        # The route also ends such a call at once: it frees the call at gateway A, and on the
        # caller's ACK the dialog module sends a BYE each way. A loopback capture shows the
        # 200 OK and the BYE reaching the caller, and that it sent no media at all.
        capture = Capture()
        misrouted = lab.start_baresip(endpoints["caller2"], "caller3.log",
                                      f"-t 4 -e '/dial sip:b@localhost:{sip_b}'")
        bye = wait_until(lambda: sip_to(capture.seen, sip_a2, b"BYE "),
                         "the route's BYE to the misrouted call's caller", 20)[0][0]
        calls_then = [status(p)["calls"] for p in (status_a, status_b)]
        misrouted.wait(timeout=30)
        seen = capture.close()
        assert calls_then == [[], []], calls_then
        assert "session closed" in procs.output(misrouted), procs.output(misrouted)[-2000:]
        invite = sip_to(seen, proxy_a, b"INVITE ")[0][1]
        ok = [(t, d) for t, d in sip_to(seen, sip_a2, b"SIP/2.0 200 ") if b" INVITE" in
              d[d.index(b"CSeq:"):d.index(b"\r\n", d.index(b"CSeq:"))]][0]
        ports = [int(x) for x in re.findall(rb"\nm=\w+ (\d+)", invite)]
        answered = re.findall(rb"\nm=\w+ (\d+)", ok[1])
        assert ports and answered and set(answered) == {b"0"}, ok[1]
        assert b"c=IN IP4 0.0.0.0" in ok[1] and b"c=IN IP4 127" not in ok[1], ok[1]
        sent = [d for _, sport, _, d in seen if any(sport in (p, p + 1) for p in ports)]
        assert not sent, f"the misrouted caller sent {len(sent)} datagrams from {ports}"
        print(f"the misrouted call: the 200 OK reached its caller with every media disabled, "
              f"the route's BYE {(bye - ok[0]) * 1000:.0f} ms later; no call left at either "
              f"gateway, and nothing sent from the caller's media ports {ports}")
        assert bye - ok[0] < 2, bye - ok[0]
        assert status(status_a)["sip"]["free_media"] == 3
        procs.stop(callee)
        # Each heard the other's tone (caller 440 Hz, callee 660 Hz), so neither heard itself.
        for name, tone in (("callee", 440), ("caller", 660)):
            # sndfile records up to the first re-INVITE (the hold); the status lines show
            # what is received after the resume.
            heard(endpoints[name], name, tone, 3)
        log = procs.output(callee)
        after = log[log.rindex("got re-INVITE"):log.index("terminated")]
        received = [int(x) for x in re.findall(r"audio=\d+/(\d+)", after)]
        assert received and received[-1] > 50000, received[-5:]
        print(f"after the resume the callee receives {received[-1]} bit/s of audio")
        print("PASS: a baresip call through Kamailio A, gateway A, gateway B, Kamailio B")
        return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Sites whose Kamailio route uses rtpengine_manage() (docs/sip.md, "Kamailio with
rtpengine_manage"): the one function many sites already call for rtpengine wherever SDP or
the end of a call passes, which picks offer, answer or delete by itself. Two such proxies,
two otp-gateways, baresip A (caller, 440 Hz) and B (callee, 660 Hz, auto-answer), Opus
audio.

Checked: the call is answered with audio both ways at both gateways; hold and resume (two
re-INVITEs through rtpengine_manage) keep the call's stream, and audio reaches the callee
again after them; each side heard the other's tone; the hang-up (a BYE: delete) frees the
call at both gateways; a second call that the caller gives up while it still rings (a
CANCEL: delete, and the 487 through the failure route) leaves no call and every lane free
at both gateways. Exit 77 (skip) where kamailio or baresip is not installed.

Usage: sip_rtpengine_manage.py SOURCE_DIR BUILD_DIR"""
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts"))
from script_support import free_ports, udp_bound, wait_until  # noqa: E402
from sip_lab import KAMAILIO_MANAGE_CFG, SipLab, heard, skip_unless_runnable  # noqa: E402


def main():
    source, build = sys.argv[1], sys.argv[2]
    skip_unless_runnable()
    lab = SipLab.temporary(build, "otpgate-manage-")
    procs = lab.procs
    status = lab.status
    fixed = free_ports(7)
    (kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b) = fixed
    # Each baresip listens on its SIP port (UDP, TCP) and the next one (TLS).
    spare = free_ports(16, taken=fixed)
    pairs = [p for p in spare if p + 1 in spare]
    sip_b = pairs[0]
    sip_a = next(p for p in pairs if p > sip_b + 1)
    sip_b2 = next(p for p in pairs if p > sip_a + 1)
    consoles = free_ports(3, taken=(*fixed, *spare))
    # Media ports in a region of this test's own (see sip_endpoints.py).
    media = 1100 + (os.getpid() % 5) * 100  # 1100-1599; A: media..+39, B: +40..+79
    with lab:
        lab.start_kme(kme_port)
        for me, peer, status_port, ng, low in (("sae-a", "sae-b", status_a, ng_a, media),
                                               ("sae-b", "sae-a", status_b, ng_b, media + 40)):
            lab.start_gateway(lab.gateway_config(me, peer, status_port, ng, low, low + 39),
                              ng, status_port, me)
        proxies = [lab.start_kamailio("a", proxy_a, f"udp:127.0.0.1:{ng_a}",
                                      f'$du = "sip:127.0.0.1:{proxy_b}";',
                                      route=KAMAILIO_MANAGE_CFG),
                   lab.start_kamailio("b", proxy_b, f"udp:127.0.0.1:{ng_b}", "",
                                      route=KAMAILIO_MANAGE_CFG)]
        homes = {}
        for name, port, console, tone, account in (
                ("callee", sip_b, consoles[0], 660,
                 f"<sip:b@127.0.0.1:{sip_b};transport=udp>;regint=0;answermode=auto"),
                ("caller", sip_a, consoles[1], 440,
                 f"<sip:a@127.0.0.1:{sip_a};transport=udp>;regint=0;"
                 f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\""),
                ("ringing", sip_b2, consoles[2], 880,
                 f"<sip:r@127.0.0.1:{sip_b2};transport=udp>;regint=0;answermode=manual")):
            homes[name] = lab.baresip_home(name, port, tone, console, account, video=False)
        callee = lab.start_baresip(homes["callee"], "callee.log")
        ringing = lab.start_baresip(homes["ringing"], "ringing.log")
        wait_until(lambda: udp_bound(sip_b) and udp_bound(sip_b2), "the callees' SIP sockets")
        caller = lab.start_baresip(homes["caller"], "caller.log",
                                   f"-t 60 -e '/dial sip:b@127.0.0.1:{sip_b}'")
        print("audio packets at A and B:",
              wait_until(lambda: lab.media_flowing((status_a, status_b), 2, 50),
                         "the call answered with audio both ways at both gateways", 20))
        streams = [[m["stream"] for m in status(p)["calls"][0]["media"]]
                   for p in (status_a, status_b)]

        time.sleep(3)  # the recordings stop at the first re-INVITE (sndfile)

        def reinvites(count):
            return all(procs.output(p).count("in-dialog INVITE") >= count for p in proxies)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ui:
            ui.sendto(b"/hold\n", ("127.0.0.1", consoles[1]))
            wait_until(lambda: reinvites(1), "the hold re-INVITE at both proxies", 10)
            ui.sendto(b"/resume\n", ("127.0.0.1", consoles[1]))
            wait_until(lambda: reinvites(2), "the resume re-INVITE at both proxies", 10)
            delivered = status(status_b)["calls"][0]["media"][0]["packets"]["to_local"]
            wait_until(lambda: status(status_b)["calls"][0]["media"][0]["packets"]["to_local"]
                       > delivered + 25, "audio at the callee after the resume", 10)
            for port, names in zip((status_a, status_b), streams):
                calls = status(port)["calls"]
                assert len(calls) == 1 and [m["stream"] for m in calls[0]["media"]] == names, \
                    calls
            print("hold and resume: two re-INVITEs, the same stream, audio again after them")
            ui.sendto(b"/hangup\n", ("127.0.0.1", consoles[1]))
            wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                       "the BYE to end the call at both gateways", 10)
            print("the BYE (rtpengine_manage: delete) ended the call at both gateways")
            # A call given up while it rings: offered at both gateways, then CANCELled.
            ui.sendto(f"/dial sip:r@127.0.0.1:{sip_b2}\n".encode(), ("127.0.0.1", consoles[1]))
            offered = wait_until(
                lambda: [len(status(p)["calls"]) for p in (status_a, status_b)] == [1, 1],
                "the second call offered at both gateways", 10)
            time.sleep(1)  # ringing (manual answer)
            offered = [len(status(p)["calls"]) for p in (status_a, status_b)]
            ui.sendto(b"/hangup\n", ("127.0.0.1", consoles[1]))
            wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                       "the CANCEL to free the ringing call at both gateways", 10)
            print(f"a call given up while ringing (calls at A, B then: {offered}) was freed "
                  "at both gateways by the CANCEL")
            assert offered == [1, 1], offered
            ui.sendto(b"/quit\n", ("127.0.0.1", consoles[1]))
        caller.wait(timeout=30)
        for port in (status_a, status_b):
            sip = status(port)["sip"]
            assert sip["free_media"] == 3 and not status(port)["calls"], sip
            print(f"gateway on {port}: repeated answers {sip['repeated_answers']}, repeated "
                  f"offers {sip['repeated_offers']}, every lane free")
        procs.stop(callee)
        for name, tone in (("callee", 440), ("caller", 660)):
            heard(homes[name], name, tone, 2)
        print("PASS: calls through two sites whose Kamailio routes use rtpengine_manage()")
        return 0


if __name__ == "__main__":
    sys.exit(main())

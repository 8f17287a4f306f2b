#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A call between endpoints that insist on SDES-SRTP (docs/sip.md, "Pointing a room system at
the proxy"): baresip A and B with mediaenc=srtp-mand (RTP/SAVP, a=crypto; they refuse a call
without SRTP), Opus audio, through Kamailio A -> gateway A -> gateway B -> Kamailio B, as in
sip_endpoints.py. The gateways do not terminate the endpoints' SRTP: they carry it as opaque
RTP inside the one-time pad.

Checked in a loopback capture: the callee's INVITE still offers RTP/SAVP with the caller's
own a=crypto line (same key: SDES runs end to end), and no x-otp marker reaches it; each
endpoint receives the SRTP datagrams the other sent, byte for byte (each one delivered is
one sent, and every one sent while the call ran is delivered); between the gateways no
datagram carries any 16-byte piece of them after their RTP header (the pad covers them);
each endpoint's recording has the other's tone (so its SRTP decrypted what came through);
the hang-up frees the call at both gateways.
Exit 77 (skip) where kamailio or baresip is not installed.

Usage: sip_sdes_srtp.py SOURCE_DIR BUILD_DIR"""
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

ENDPOINT_RTP = range(40000, 50000)  # baresip's rtp_ports (sip_lab.py)


def crypto_lines(message):
    return re.findall(rb"a=crypto:[^\r\n]*", message)


def main():
    source, build = sys.argv[1], sys.argv[2]
    skip_unless_runnable()
    if not os.path.exists("/usr/lib/baresip/modules/srtp.so"):
        print("SKIP: baresip's srtp module is not installed")
        return 77
    lab = SipLab.temporary(build, "otpgate-srtp-")
    procs = lab.procs
    status = lab.status
    fixed = free_ports(7)
    (kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b) = fixed
    # Each baresip listens on its SIP port (UDP, TCP) and the next one (TLS).
    spare = free_ports(12, taken=fixed)
    sip_b = next(p for p in spare if p + 1 in spare)
    sip_a = next(p for p in spare if p + 1 in spare and p > sip_b + 1)
    consoles = free_ports(2, taken=(*fixed, *spare))
    # Media ports in a region of this test's own (see sip_endpoints.py).
    media = 1600 + (os.getpid() % 10) * 80  # 1600-2399; A: media..+39, B: +40..+79
    site_a, site_b = range(media, media + 40), range(media + 40, media + 80)
    with lab:
        lab.start_kme(kme_port)
        for me, peer, status_port, ng, ports in (("sae-a", "sae-b", status_a, ng_a, site_a),
                                                 ("sae-b", "sae-a", status_b, ng_b, site_b)):
            lab.start_gateway(lab.gateway_config(me, peer, status_port, ng, ports[0], ports[-1]),
                              ng, status_port, me)
        lab.start_kamailio("a", proxy_a, f"udp:127.0.0.1:{ng_a}",
                           f'$du = "sip:127.0.0.1:{proxy_b}";')
        lab.start_kamailio("b", proxy_b, f"udp:127.0.0.1:{ng_b}", "")  # to the R-URI
        homes = {}
        for name, port, console, tone, account in (
                ("callee", sip_b, consoles[0], 660,
                 f"<sip:b@127.0.0.1:{sip_b};transport=udp>;regint=0;answermode=auto;"
                 "mediaenc=srtp-mand"),
                ("caller", sip_a, consoles[1], 440,
                 f"<sip:a@127.0.0.1:{sip_a};transport=udp>;regint=0;"
                 f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\";mediaenc=srtp-mand")):
            homes[name] = lab.baresip_home(name, port, tone, console, account, video=False,
                                           extra="module srtp.so\n")
        capture = Capture()
        callee = lab.start_baresip(homes["callee"], "callee.log")
        wait_until(lambda: udp_bound(sip_b), "the callee's SIP socket")
        caller = lab.start_baresip(homes["caller"], "caller.log",
                                   f"-t 60 -e '/dial sip:b@127.0.0.1:{sip_b}'")
        print("audio packets at A and B:",
              wait_until(lambda: lab.media_flowing((status_a, status_b), 2, 100),
                         "the call answered with audio both ways at both gateways", 20))
        time.sleep(3)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ui:
            ui.sendto(b"/hangup\n", ("127.0.0.1", consoles[1]))
            hung_up = time.monotonic()
            wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                       "the hang-up to end the call at both gateways", 10)
            ui.sendto(b"/quit\n", ("127.0.0.1", consoles[1]))
        caller.wait(timeout=30)
        time.sleep(0.3)  # the last datagrams on their way
        seen = capture.close()
        for port in (status_a, status_b):
            assert status(port)["sip"]["free_media"] == 3, status(port)["sip"]

        # SDES end to end: the callee is offered the caller's own crypto line.
        sent = sip_to(seen, proxy_a, b"INVITE ")[0][1]
        got = sip_to(seen, sip_b, b"INVITE ")[0][1]
        assert b"RTP/SAVP" in sent and crypto_lines(sent), sent
        assert b"m=audio" in got and b"RTP/SAVP" in got, got
        assert crypto_lines(got) == crypto_lines(sent), (crypto_lines(sent), crypto_lines(got))
        assert b"x-otp" not in got, got
        print(f"the callee was offered RTP/SAVP with the caller's {len(crypto_lines(got))} "
              "crypto line(s), unchanged; no x-otp marker")

        def datagrams(sources, destinations):
            return [(t, d) for t, src, dst, d in seen if src in sources and dst in destinations]
        for way, first, last in (("caller to callee", site_a, site_b),
                                 ("callee to caller", site_b, site_a)):
            srtp_in = datagrams(ENDPOINT_RTP, first)   # an endpoint to its gateway
            otp = [d for _, d in datagrams(first, last)]  # gateway to gateway
            srtp_out = {d for _, d in datagrams(last, ENDPOINT_RTP)}  # to the other endpoint
            assert len(srtp_in) > 150 and len(srtp_out) > 150 and len(otp) > 150, \
                (way, len(srtp_in), len(otp), len(srtp_out))
            sent = {d for _, d in srtp_in}
            foreign = srtp_out - sent
            assert not foreign, f"{way}: {len(foreign)} of {len(srtp_out)} delivered datagrams " \
                "are not datagrams the endpoint sent"
            # Every one sent while the call ran is delivered (not the first and last half
            # second: before the answer reached both gateways, after the first delete).
            start = srtp_in[0][0]
            running = [d for t, d in srtp_in if start + 0.5 < t < hung_up - 0.5]
            missing = [d for d in running if d not in srtp_out]
            assert len(running) > 100 and not missing, (way, len(running), len(missing))
            # No 16-byte piece of the SRTP datagrams after their RTP header, at any offset,
            # between the gateways.
            pieces = {d[i:i + 16] for d in sent for i in range(12, len(d) - 15, 16)}
            leaked = [d for d in otp if any(d[i:i + 16] in pieces
                                            for i in range(0, max(0, len(d) - 15)))]
            assert not leaked, f"{way}: {len(leaked)} datagrams between the gateways carry " \
                "SRTP payload bytes as sent"
            print(f"{way}: {len(srtp_in)} SRTP datagrams in, {len(otp)} OTP datagrams between "
                  f"the gateways (none with SRTP bytes in them), {len(srtp_out)} delivered, "
                  f"each one a datagram the endpoint sent, all {len(running)} sent while the "
                  "call ran among them")
        procs.stop(callee)
        for name, tone in (("callee", 440), ("caller", 660)):
            heard(homes[name], name, tone, 3)
        print("PASS: an SDES-SRTP call through both gateways, its SRTP inside the pad")
        return 0


if __name__ == "__main__":
    sys.exit(main())

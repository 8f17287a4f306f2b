#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Ten concurrent calls with real SIP software through two otp-gateways (docs/sip.md, Tests):
ten baresip callers at site A, each with its own tone, dial ten baresip callees at site B (each
with its own tone, auto-answer, recording what it hears with sndfile) through Kamailio A ->
Kamailio B at the same time; G.711 (PCMU) audio only, to keep 20 endpoints light on CPU.

Checked: both gateways show all ten calls answered at once, each with audio both ways; every
callee's recording carries its own caller's tone and every caller's its own callee's tone (a
call's media reaching another call, or two calls mixed, changes the frequency); after the
hang-ups every call and lane is free at both gateways. Gateway A's key budget is set for ten
such calls (sip.key_rate_bits_per_s = 750 kbit/s, the store not counted): an eleventh caller
dialling while the ten run is refused at its offer for lack of key budget, and gets 488 from
proxy A. Exit 77 (skip) where kamailio or baresip
is not installed.

Usage: sip_ten_calls.py SOURCE_DIR BUILD_DIR"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts"))
from script_support import free_ports, udp_bound, wait_until  # noqa: E402
from sip_lab import SipLab, cpu_seconds, heard, skip_unless_runnable, recordings  # noqa: E402

CALLS = 10
# Ten PCMU calls need 10 x (8000 + 16 x 50) B/s = 704 kbit/s of pad from each sender; an
# eleventh would need 774 (docs/sip.md, "Admission").
BUDGET = "key_rate_bits_per_s = 750000\nadmission_horizon_s = 0\n"
SECONDS = 10  # each caller's call length (baresip -t)


def main():
    source, build = sys.argv[1], sys.argv[2]
    skip_unless_runnable()
    lab = SipLab.temporary(build, "otpgate-sip10-")
    status = lab.status
    fixed = free_ports(7)
    (kme_port, status_a, status_b, ng_a, ng_b, proxy_a, proxy_b) = fixed
    # Each baresip listens on its SIP port (UDP, TCP) and the next one (TLS).
    spare = free_ports(8 * CALLS + 8, taken=fixed)
    sip_ports = []
    for p in spare:
        if p + 1 in spare and not {p, p + 1} & {q + i for q in sip_ports for i in (0, 1)}:
            sip_ports.append(p)
    assert len(sip_ports) >= 2 * CALLS + 1, "not enough free port pairs"
    consoles = free_ports(2 * CALLS + 1, taken=(*fixed, *spare))
    # Media ports in a region of this test's own (see sip_endpoints.py).
    media = 4800 + (os.getpid() % 10) * 120  # 4800-5999; A: media..+59, B: +60..+119
    caller_tone = [420 + 60 * i for i in range(CALLS)]  # 420..960 Hz
    callee_tone = [1020 + 60 * i for i in range(CALLS)]  # 1020..1560 Hz
    with lab:
        lab.start_kme(kme_port)
        gateways = {}
        for me, peer, status_port, ng, low in (("sae-a", "sae-b", status_a, ng_a, media),
                                               ("sae-b", "sae-a", status_b, ng_b, media + 60)):
            gateways[me] = lab.start_gateway(
                lab.gateway_config(me, peer, status_port, ng, low, low + 59, max_media=CALLS + 1,
                                   extra=BUDGET if me == "sae-a" else ""),
                ng, status_port, me)
        proxy = lab.start_kamailio("a", proxy_a, f"udp:127.0.0.1:{ng_a}",
                           f'$du = "sip:127.0.0.1:{proxy_b}";')
        lab.start_kamailio("b", proxy_b, f"udp:127.0.0.1:{ng_b}", "")  # to the R-URI

        homes = {}
        for i in range(CALLS):
            for side, port, console, tone, account in (
                    ("callee", sip_ports[i], consoles[i], callee_tone[i],
                     f"<sip:b{i}@127.0.0.1:{sip_ports[i]};transport=udp>;regint=0;"
                     "answermode=auto;audio_codecs=PCMU"),
                    ("caller", sip_ports[CALLS + i], consoles[CALLS + i], caller_tone[i],
                     f"<sip:a{i}@127.0.0.1:{sip_ports[CALLS + i]};transport=udp>;regint=0;"
                     f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\";"
                     "audio_codecs=PCMU")):
                # ausine makes 48 kHz stereo only: baresip resamples it for G.711.
                homes[side, i] = lab.baresip_home(
                    f"{side}{i}", port, tone, console, account, video=False,
                    extra="module g711.so\nausrc_srate 48000\nausrc_channels 2\n")
        callees = [lab.start_baresip(homes["callee", i], f"callee{i}.log")
                   for i in range(CALLS)]
        for i in range(CALLS):
            wait_until(lambda: udp_bound(sip_ports[i]), f"callee {i}'s SIP socket")
        callers = [lab.start_baresip(homes["caller", i], f"caller{i}.log",
                                     f"-t {SECONDS} -e '/dial sip:b{i}@127.0.0.1:"
                                     f"{sip_ports[i]}'") for i in range(CALLS)]
        started = time.monotonic()

        seen = {}  # the last status, for the message of a timeout

        def all_up():
            calls = [status(p)["calls"] for p in (status_a, status_b)]
            seen["calls"] = [[(x["state"], [m["packets"] for m in x["media"]]) for x in c]
                             for c in calls]
            if not all(len(c) == CALLS and all(x["state"] == "answered" for x in c)
                       for c in calls):
                return None
            packets = [m["packets"] for c in calls for call in c for m in call["media"]]
            if len(packets) == 2 * CALLS and all(x["to_peer"] > 50 and x["to_local"] > 50
                                                 for x in packets):
                return packets
            return None
        try:
            wait_until(all_up, f"{CALLS} calls answered at once with audio both ways at both "
                       "gateways", SECONDS - 2)
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen at A, B: {seen.get('calls')}") from None
        print(f"{CALLS} calls answered at once with audio both ways at both gateways, "
              f"{time.monotonic() - started:.1f} s after the first dial")
        # An eleventh call while the ten run: over gateway A's key budget, refused at its
        # offer (lanes and ports would allow it), 488 at its caller, nothing held for it.
        eleventh = lab.baresip_home(
            "caller-extra", sip_ports[2 * CALLS], 300, consoles[2 * CALLS],
            f"<sip:x@127.0.0.1:{sip_ports[2 * CALLS]};transport=udp>;regint=0;"
            f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\";audio_codecs=PCMU",
            video=False, extra="module g711.so\nausrc_srate 48000\nausrc_channels 2\n")
        refused = lab.start_baresip(eleventh, "caller-extra.log",
                                    f"-t 4 -e '/dial sip:b0@127.0.0.1:{sip_ports[0]}'")
        refused.wait(timeout=30)
        assert "488 Not Acceptable Here" in lab.procs.output(refused), \
            lab.procs.output(refused)[-2000:]
        # The gateway's error-reason, as proxy A's rtpengine module logs it.
        reason = [line for line in lab.procs.output(proxy).splitlines()
                  if "proxy replied with error: key budget:" in line]
        assert reason, "proxy A logged no key-budget refusal from gateway A"
        assert " refused: key budget:" in lab.procs.output(gateways["sae-a"]), \
            "gateway A logged no line for the refused offer"
        print("the eleventh call was refused for lack of key budget, 488 at its caller:",
              reason[-1][-200:])
        assert len(status(status_a)["calls"]) == CALLS
        assert status(status_a)["sip"]["free_media"] == 1, status(status_a)["sip"]
        cpu = {me: cpu_seconds(p.pid) for me, p in gateways.items()}
        load = time.monotonic()
        for p in callers:
            p.wait(timeout=SECONDS + 20)
        load = time.monotonic() - load
        for me, p in gateways.items():
            print(f"gateway {me}: {100 * (cpu_seconds(p.pid) - cpu[me]) / load:.0f} % of a "
                  f"core while the {CALLS} calls ran")
        wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                   "the hang-ups to end every call at both gateways", 20)
        for port in (status_a, status_b):
            assert status(port)["sip"]["free_media"] == CALLS + 1, status(port)["sip"]
        print(f"after the hang-ups both gateways have no call and {CALLS} free lanes")
        for i, p in enumerate(callees):
            lab.procs.stop(p)
            assert "Set audio decoder: PCMU 8000Hz" in lab.procs.output(p), f"callee {i}: codec"
        # Each endpoint heard its own peer's tone, and nobody else's.
        for i in range(CALLS):
            for side, tone in (("callee", caller_tone[i]), ("caller", callee_tone[i])):
                assert len(recordings(homes[side, i])) == 1, (side, i)
                heard(homes[side, i], f"{side} {i}", tone, SECONDS / 2)
        print(f"PASS: {CALLS} concurrent baresip calls, each heard only its own peer")
        return 0


if __name__ == "__main__":
    sys.exit(main())

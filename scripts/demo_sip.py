#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The demo's --sip profile (scripts/demo.sh --sip): a SIP call between the two sites through
their own proxies and gateways, on one machine. qkd-kme-sim, otp-gateway A and B with only
[sip], Kamailio A and B (their rtpengine module drives their own gateway over ng, the route
of docs/sip.md), baresip B (the callee, auto-answer, a 660 Hz tone, records what it hears)
and baresip A (the caller, a 440 Hz tone) dialling b@ through proxy A -> proxy B, Opus audio
and VP8 video. The caller hangs up after --seconds; the summary says what each side heard,
what crossed each gateway and how much key it used, and that the hang-up freed everything.

Usage: demo_sip.py --build BUILD_DIR --work DIR --pki DIR [--seconds N] [--key-rate BITS]"""
import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sip_lab import SipLab, frequency, missing_software, recordings  # noqa: E402
from script_support import free_ports, udp_bound, wait_until  # noqa: E402

STATUS_A, STATUS_B = 48080, 48081  # as in the panel profile, so the console command is the same


def listen_free(port):
    """Whether a server can listen on the port now. As the gateway's status server binds
    (SO_REUSEADDR), connections of an earlier run still in TIME_WAIT do not count; a
    plain bind would wait them out (60 s after the panel demo or a previous run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def kib(n):
    return f"{n / 1024:.0f} KiB"


def media_lines(site, call):
    out = []
    for m in call["media"]:
        p, k = m["packets"], m["key_used_bytes"]
        out.append(f"  gateway {site} {m['type']:5}: {p['from_local']} packets from its "
                   f"endpoint -> {p['to_peer']} OTP to the partner; {p['from_peer']} OTP from "
                   f"the partner -> {p['to_local']} to its endpoint; pad used {kib(k['send'])} "
                   f"sending, {kib(k['receive'])} receiving (lanes {m['send_lane']}/"
                   f"{m['receive_lane']})")
    return out


def main():
    ap = argparse.ArgumentParser(description="the demo's SIP call (scripts/demo.sh --sip)")
    ap.add_argument("--build", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--key-rate", default="10e6")
    args = ap.parse_args()
    why = missing_software()
    if why:
        print(f"demo: the SIP profile needs Kamailio and baresip: {why}", file=sys.stderr)
        return 2
    if args.seconds < 8:
        print(f"demo: --seconds {args.seconds} is too short for a SIP call (use 8 or more)",
              file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)
    lab = SipLab(args.build, args.work, args.pki)
    lab.procs.quiet = True
    for port in (STATUS_A, STATUS_B):
        if not listen_free(port):
            print(f"demo: port {port} (a gateway's status API) is taken: stop the program "
                  "using it (another demo?)", file=sys.stderr)
            return 2
    taken = (STATUS_A, STATUS_B)
    kme, ng_a, ng_b, proxy_a, proxy_b, console_a, console_b = free_ports(7, taken=taken)
    taken += (kme, ng_a, ng_b, proxy_a, proxy_b, console_a, console_b)
    # baresip listens on its SIP port (UDP, TCP) and the next one (TLS): four in a row.
    spare = free_ports(40, taken=taken)
    sip_b = next(p for p in spare if all(p + i in spare for i in range(1, 4)))
    sip_a = sip_b + 2
    media = 46000  # A: 46000-46039, B: 46040-46079 (a gateway skips a port that is taken)
    try:
        lab.start_kme(kme, ["--sae", "sae-a", "--sae", "sae-b", "--key-rate", args.key_rate])
        for me, peer, status, ng, low in (("sae-a", "sae-b", STATUS_A, ng_a, media),
                                          ("sae-b", "sae-a", STATUS_B, ng_b, media + 40)):
            lab.start_gateway(lab.gateway_config(me, peer, status, ng, low, low + 39), ng,
                              status, me)
        lab.start_kamailio("a", proxy_a, f"udp:127.0.0.1:{ng_a}",
                           f'$du = "sip:127.0.0.1:{proxy_b}";')
        lab.start_kamailio("b", proxy_b, f"udp:127.0.0.1:{ng_b}")
        callee = lab.baresip_home("callee", sip_b, 660, console_b,
                                  f"<sip:b@127.0.0.1:{sip_b};transport=udp>;regint=0;"
                                  "answermode=auto")
        caller = lab.baresip_home("caller", sip_a, 440, console_a,
                                  f"<sip:a@127.0.0.1:{sip_a};transport=udp>;regint=0;"
                                  f"outbound=\"sip:127.0.0.1:{proxy_a};transport=udp\"")
        print(f"demo: site A: Kamailio on udp 127.0.0.1:{proxy_a}, otp-gateway ng "
              f"127.0.0.1:{ng_a}, status http://127.0.0.1:{STATUS_A}/")
        print(f"demo: site B: Kamailio on udp 127.0.0.1:{proxy_b}, otp-gateway ng "
              f"127.0.0.1:{ng_b}, status http://127.0.0.1:{STATUS_B}/")
        print("demo: watch the call in the operator console (another terminal, with a display):")
        print(f"  {args.build}/qt-console/otp-console -g http://127.0.0.1:{STATUS_A} "
              f"-g http://127.0.0.1:{STATUS_B}")
        callee_p = lab.start_baresip(callee, "callee.log")
        wait_until(lambda: udp_bound(sip_b), "the callee's SIP socket")
        print(f"demo: baresip a@ (440 Hz) dials b@ (660 Hz) through proxy A and proxy B, "
              f"Opus + VP8, hangs up after {args.seconds} s")
        dialled = time.monotonic()
        caller_p = lab.start_baresip(caller, "caller.log",
                                     f"-t {args.seconds} -e '/dial sip:b@127.0.0.1:{sip_b}'")

        def answered():
            calls = [lab.status(p)["calls"] for p in (STATUS_A, STATUS_B)]
            return calls if all(c and c[0]["state"] == "answered" for c in calls) else None
        wait_until(answered, "the call answered at both gateways", 30)
        setup = time.monotonic() - dialled
        last = None
        while caller_p.poll() is None:  # the call's last counters before the hang-up
            try:
                now = answered()
                last = now or last
            except OSError:
                pass
            time.sleep(0.5)
        wait_until(lambda: not lab.status(STATUS_A)["calls"] and
                   not lab.status(STATUS_B)["calls"], "the hang-up to end the call at both "
                   "gateways", 20)
        after = [lab.status(p)["sip"] for p in (STATUS_A, STATUS_B)]
        lab.procs.stop(callee_p)
        print("\n== summary (SIP call) ==")
        print(f"call {last[0][0]['call_id']}: both gateways had it answered {setup:.1f} s after "
              f"the dial (baresip and both proxies start their work at the dial)")
        for site, calls in zip("AB", last):
            print("\n".join(media_lines(site, calls[0])))
        heard_ok = True
        for name, home, tone in (("callee (b@, site B)", callee, 440),
                                 ("caller (a@, site A)", caller, 660)):
            dumps = recordings(home)
            hz, secs = frequency(dumps[0]) if dumps else (0.0, 0.0)
            ok = abs(hz - tone) < 5 and secs > 2
            heard_ok &= ok
            print(f"the {name} heard {hz:.0f} Hz for {secs:.1f} s: "
                  + ("the other side's tone" if ok else f"NOT the other side's {tone} Hz tone"))
        freed = all(s["free_media"] == s["max_media"] for s in after)
        print("after the hang-up: no calls at either gateway, "
              + ("every call key lane free" if freed else f"lanes still held: {after}"))
        return 0 if heard_ok and freed else 1
    except BaseException:
        lab.dump_logs()
        raise
    finally:
        lab.stop()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A load run with real SIP software (docs/sip.md, Tests): SIPp (Debian's sip-tester) places 50
concurrent calls through Kamailio A -> Kamailio B to a SIPp UAS behind site B, both otp-gateways
with max_media = 50, each call with RTP both ways (SIPp's rtp_stream: PCMU from a generated file,
the caller's and the callee's different) for several seconds.

Kamailio B reaches gateway B through a small ng relay in this script, which points every SDP
between the sites at one UDP relay socket per media and direction, so that every datagram
between the two gateways passes here and is checked: a key announcement, or a protected RTP
packet (SIPp's RTP header, 24 more bytes, a payload that is none of the 160-byte blocks SIPp
sends). Plain RTP between the gateways fails the test.

Checked: SIPp answers all 50 calls (its statistics file and exit codes); both gateways show 50
answered calls with packets both ways; at the endpoints (loopback capture for 1.5 s) each side
receives the other's RTP byte for byte, from all 50 calls (distinct SSRCs); after the BYEs
every call and lane is free at both gateways. Printed: setup time per call (INVITE to 200 OK at
the caller), calls/s, and the CPU of each gateway per call. Exit 77 (skip) where sipp or
kamailio is not installed.

Usage: sip_load_sipp.py SOURCE_DIR BUILD_DIR"""
import os
import random
import re
import select
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts"))
from loopback_capture import Capture  # noqa: E402
from script_support import free_ports, udp_bound, wait_until  # noqa: E402
from sip_lab import SipLab, cpu_seconds, skip_unless_runnable  # noqa: E402

CALLS = 50
RATE = 25  # new calls per second
HOLD_MS = 9000  # each call's length after its ACK
BLOCK = 160  # PCMU, 20 ms

HEADERS = """Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>"""
SDP = """v=0
      o=sipp 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000"""

UAC = f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="otpgate load caller">
  <send retrans="500"><![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      {HEADERS}
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      {SDP}
    ]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
  <send><![CDATA[
      ACK [next_url] SIP/2.0
      {HEADERS}[peer_tag_param]
      [routes]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]></send>
  <nop><action><exec rtp_stream="caller.ulaw,-1,0"/></action></nop>
  <pause milliseconds="{HOLD_MS}"/>
  <send retrans="500"><![CDATA[
      BYE [next_url] SIP/2.0
      {HEADERS}[peer_tag_param]
      [routes]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""

UAS = f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="otpgate load callee">
  <recv request="INVITE" crlf="true"/>
  <send><![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      [last_Record-Route:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      {SDP}
    ]]></send>
  <recv request="ACK" crlf="true"/>
  <nop><action><exec rtp_stream="callee.ulaw,-1,0"/></action></nop>
  <recv request="BYE"/>
  <send><![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]></send>
</scenario>
"""


def bdecode(data, i=0):
    """One bencoded value at `i`: (value, next index). Strings stay bytes."""
    c = data[i:i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if c in (b"l", b"d"):
        items, i = [], i + 1
        while data[i:i + 1] != b"e":
            value, i = bdecode(data, i)
            items.append(value)
        return (items if c == b"l" else dict(zip(items[::2], items[1::2]))), i + 1
    colon = data.index(b":", i)
    end = colon + 1 + int(data[i:colon])
    return data[colon + 1:end], end


def bencode(v):
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, list):
        return b"l" + b"".join(bencode(x) for x in v) + b"e"
    return b"d" + b"".join(bencode(k) + bencode(v[k]) for k in sorted(v)) + b"e"


class WanRelay:
    """Stands between Kamailio B and gateway B's ng socket and between the two gateways.

    An SDP that crosses between the sites (it carries a=x-otp) gets each accepted media's port
    replaced by a relay socket that forwards to that port: in an offer or answer from the
    partner site (where gateway B will send) and in gateway B's replies (where gateway A will
    send). Every datagram through a relay socket is checked by `is_otp`."""

    def __init__(self, ng_listen, gateway_ng, plain_blocks):
        self.plain = plain_blocks
        self.ng = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ng.bind(("127.0.0.1", ng_listen))
        self.up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.up.connect(("127.0.0.1", gateway_ng))
        self.waiting = {}  # cookie -> proxy address
        self.sent_at, self.latency = {}, []  # ng request -> reply time at gateway B (ms)
        self.relays = {}  # gateway port -> socket
        self.target = {}  # socket fd -> (socket, gateway port)
        self.poll = select.epoll()
        for s in (self.ng, self.up):
            self.poll.register(s.fileno(), select.EPOLLIN)
        self.announcements = self.protected = 0
        self.bad = []  # (length, first bytes) of datagrams that were not OTP
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def relay_port(self, port):
        if port not in self.relays:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("127.0.0.1", 0))
            self.relays[port] = s
            self.target[s.fileno()] = (s, port)
            self.poll.register(s.fileno(), select.EPOLLIN)
        return self.relays[port].getsockname()[1]

    def through_relay(self, message):
        sdp = message.get(b"sdp")
        if not sdp or b"a=x-otp:" not in sdp:
            return message
        def swap(m):
            port = int(m.group(2))
            return m.group(1) + (b"%d" % self.relay_port(port) if port else b"0")
        message[b"sdp"] = re.sub(rb"(?m)^(m=\w+ )(\d+)", swap, sdp)
        return message

    def is_otp(self, d):
        if d[:4] == b"OTPA":
            self.announcements += 1
            return True
        # SIPp's RTP: version 2, PCMU, 12-byte header, 160-byte payload; protected: + 24 bytes.
        return (len(d) == 12 + BLOCK + 24 and d[0] == 0x80 and d[1] & 0x7F == 0
                and d[12:12 + BLOCK] not in self.plain)

    def run(self):
        while not self.stop.is_set():
            for fd, _ in self.poll.poll(0.2):
                if fd == self.ng.fileno():
                    d, sender = self.ng.recvfrom(65535)
                    cookie, body = d.split(b" ", 1)
                    self.waiting[cookie] = sender
                    self.sent_at.setdefault(cookie, time.monotonic())
                    message = self.through_relay(bdecode(body)[0])
                    self.up.send(cookie + b" " + bencode(message))
                elif fd == self.up.fileno():
                    d = self.up.recv(65535)
                    cookie, body = d.split(b" ", 1)
                    if cookie in self.sent_at:
                        self.latency.append((time.monotonic() - self.sent_at.pop(cookie)) * 1000)
                    message = self.through_relay(bdecode(body)[0])
                    # A retransmitted request gets its reply twice (the second from the
                    # gateway's reply cache): the proxy takes whichever comes.
                    self.ng.sendto(cookie + b" " + bencode(message), self.waiting[cookie])
                else:
                    s, port = self.target[fd]
                    while True:
                        try:
                            d = s.recv(65535, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        if self.is_otp(d):
                            self.protected += d[:4] != b"OTPA"
                        else:
                            self.bad.append((len(d), d[:16].hex()))
                        s.sendto(d, ("127.0.0.1", port))

    def close(self):
        self.stop.set()
        self.thread.join()


def capture_rtp(ports, seconds):
    """UDP payloads sent to `ports` on loopback during `seconds`: {port: [payload, ...]}."""
    capture = Capture()
    time.sleep(seconds)
    seen = {p: [] for p in ports}
    for _, _, dst, payload in capture.close():
        if dst in seen:
            seen[dst].append(payload)
    return seen


def blocks(data):
    return {data[i:i + BLOCK] for i in range(0, len(data), BLOCK)}


def main():
    source, build = sys.argv[1], sys.argv[2]
    skip_unless_runnable(("kamailio", "sipp"))
    work = tempfile.mkdtemp(prefix="otpgate-sipp-")
    lab = SipLab(build, work)
    status = lab.status
    ports = free_ports(12)
    (kme_port, status_a, status_b, ng_a, ng_b, ng_relay, proxy_a, proxy_b, sip_uac, sip_uas,
     rtp_uac, rtp_uas) = ports
    # Four ports per call media, 50 media and some to spare at each gateway.
    # Media ports in a region of this test's own (see sip_endpoints.py).
    media = 6000 + (os.getpid() % 4) * 460  # 6000-7839; A: media..+219, B: +230..+449
    # Each side's RTP: 2 s of PCMU that is not silence, different for caller and callee.
    audio = {}
    for name, seed in (("caller", 1), ("callee", 2)):
        rnd = random.Random(seed)
        audio[name] = bytes(rnd.randrange(256) for _ in range(BLOCK * 100))
        with open(os.path.join(work, f"{name}.ulaw"), "wb") as f:
            f.write(audio[name])
    plain = blocks(audio["caller"]) | blocks(audio["callee"])
    relay = None
    try:
        lab.start_kme(kme_port)
        gateways = {}
        for me, peer, status_port, ng, low in (("sae-a", "sae-b", status_a, ng_a, media),
                                               ("sae-b", "sae-a", status_b, ng_b, media + 230)):
            gateways[me] = lab.start_gateway(
                lab.gateway_config(me, peer, status_port, ng, low, low + 219, max_media=CALLS),
                ng, status_port, me)
        # Key for every call lane in each sender's rings before the first INVITE (about
        # 231 KiB a lane, docs/sip.md), so that the run measures calls, not the start-up.
        def rings_full(port):
            send = [x for x in status(port)["links"] if x["direction"] == "send"]
            return send and send[0]["ring_bytes"] >= CALLS * 200 * 1024
        for port in (status_a, status_b):
            wait_until(lambda: rings_full(port), "key in every call lane's ring", 30)
        relay = WanRelay(ng_relay, ng_b, plain)
        lab.start_kamailio("a", proxy_a, f"udp:127.0.0.1:{ng_a}",
                           f'$du = "sip:127.0.0.1:{proxy_b}";', children=2)
        lab.start_kamailio("b", proxy_b, f"udp:127.0.0.1:{ng_relay}",
                           f'$du = "sip:127.0.0.1:{sip_uas}";', children=2)
        common = "-i 127.0.0.1 -mi 127.0.0.1 -trace_stat -trace_err -fd 1"
        uas = lab.start_sipp("callee", UAS, f"{common} -p {sip_uas} -mp {rtp_uas} -m {CALLS}")
        wait_until(lambda: udp_bound(sip_uas), "the SIPp UAS's SIP socket")
        cpu_before = {me: cpu_seconds(p.pid) for me, p in gateways.items()}
        started = time.monotonic()
        uac = lab.start_sipp("caller", UAC,
                             f"127.0.0.1:{proxy_a} -s b {common} -p {sip_uac} -mp {rtp_uac} "
                             f"-m {CALLS} -l {CALLS} -r {RATE} -trace_rtt -rtt_freq 1")

        progress = {}

        def all_up():
            calls = [status(p)["calls"] for p in (status_a, status_b)]
            progress["answered calls at A, B"] = [
                sum(x["state"] == "answered" for x in c) for c in calls]
            progress["media without packets both ways"] = sum(
                1 for c in calls for call in c for m in call["media"]
                if not (m["packets"]["to_peer"] > 10 and m["packets"]["to_local"] > 10))
            if not all(len(c) == CALLS and all(x["state"] == "answered" for x in c)
                       for c in calls):
                return None
            packets = [m["packets"] for c in calls for call in c for m in call["media"]]
            if len(packets) == 2 * CALLS and all(x["to_peer"] > 10 and x["to_local"] > 10
                                                 for x in packets):
                return packets
            return None
        try:
            wait_until(all_up, f"{CALLS} answered calls with packets both ways at both gateways",
                       HOLD_MS / 1000 - 1)
        finally:
            print("at the gateways:", progress)
        up = time.monotonic() - started
        print(f"{CALLS} calls answered with RTP both ways at both gateways "
              f"{up:.1f} s after the first INVITE")
        # Both endpoints receive the other's RTP unchanged, from every call.
        window = time.monotonic()
        cpu_window = {me: cpu_seconds(p.pid) for me, p in gateways.items()}
        seen = capture_rtp((rtp_uac, rtp_uas), 1.5)
        window = time.monotonic() - window
        cpu_window = {me: cpu_seconds(p.pid) - cpu_window[me] for me, p in gateways.items()}
        for port, heard, name in ((rtp_uas, "caller", "callee"), (rtp_uac, "callee", "caller")):
            payloads = seen[port]
            expected = blocks(audio[heard])
            wrong = [p for p in payloads if p[12:] not in expected or p[0] != 0x80]
            ssrcs = {p[8:12] for p in payloads}
            print(f"the {name} received {len(payloads)} RTP packets in {window:.1f} s from "
                  f"{len(ssrcs)} calls, {len(wrong)} not the {heard}'s bytes")
            assert not wrong and len(ssrcs) == CALLS, (name, len(wrong), len(ssrcs))
            assert len(payloads) > CALLS * 50 * window * 0.8, (name, len(payloads))
        uac_code = uac.wait(timeout=60)
        uas_code = uas.wait(timeout=30)
        stats = {}
        for name in ("caller", "callee"):
            path = next(os.path.join(work, f) for f in os.listdir(work)
                        if f.startswith(name + "_") and f.endswith(".csv") and "rtt" not in f)
            rows = [r.rstrip(";\n").split(";") for r in open(path)]
            stats[name] = dict(zip(rows[0], rows[-1]))
            print(f"SIPp {name}: exit {uac_code if name == 'caller' else uas_code}, "
                  f"{stats[name]['SuccessfulCall(C)']} successful calls, "
                  f"{stats[name]['FailedCall(C)']} failed")
        assert uac_code == 0 and uas_code == 0, (uac_code, uas_code)
        for name in ("caller", "callee"):
            assert int(stats[name]["SuccessfulCall(C)"]) == CALLS, stats[name]
            assert int(stats[name]["FailedCall(C)"]) == 0, stats[name]
        # Setup time per call: INVITE sent to 200 OK received at the caller.
        rtt = next(os.path.join(work, f) for f in os.listdir(work) if f.endswith("_rtt.csv"))
        rows = [r.split(";") for r in open(rtt).read().splitlines()[1:] if r.strip()]
        setup = sorted(float(r[1]) for r in rows)
        answered_at = sorted(float(r[0]) for r in rows)
        assert len(setup) == CALLS, len(setup)
        rate = (CALLS - 1) / ((answered_at[-1] - answered_at[0]) / 1000)
        print(f"call setup (INVITE to 200 OK through 2 proxies, 2 gateways): p50 "
              f"{statistics.median(setup):.1f} ms, p99 {setup[int(0.99 * (CALLS - 1))]:.1f} ms, "
              f"max {setup[-1]:.1f} ms; {rate:.1f} calls/s answered (offered {RATE})")
        ng = sorted(relay.latency)
        print(f"gateway B's ng replies ({len(ng)}: ping, offer, answer, delete): p50 "
              f"{statistics.median(ng):.1f} ms, p99 {ng[int(0.99 * (len(ng) - 1))]:.1f} ms, "
              f"max {ng[-1]:.1f} ms")
        for me in gateways:
            print(f"gateway {me}: {100 * cpu_window[me] / window:.0f} % of a core for {CALLS} "
                  f"calls ({1000 * cpu_window[me] / window / CALLS:.1f} ms of CPU per call per "
                  f"second), {cpu_seconds(gateways[me].pid) - cpu_before[me]:.1f} s CPU for the "
                  f"whole run")
        # After the BYEs: nothing left at either gateway.
        wait_until(lambda: not status(status_a)["calls"] and not status(status_b)["calls"],
                   "every call ended at both gateways", 20)
        for port in (status_a, status_b):
            assert status(port)["sip"]["free_media"] == CALLS, status(port)["sip"]
        print(f"after the BYEs both gateways have no call and {CALLS} free lanes")
        relay.close()
        print(f"between the gateways: {relay.protected} protected RTP packets, "
              f"{relay.announcements} key announcements, {len(relay.bad)} not OTP")
        assert not relay.bad, relay.bad[:5]
        # Every call's RTP both ways for most of its length went through the relay.
        assert relay.protected > CALLS * 2 * 50 * (HOLD_MS / 1000) * 0.7, relay.protected
        print(f"PASS: {CALLS} concurrent SIPp calls with RTP through both proxies and gateways")
        return 0
    except BaseException:
        lab.dump_logs()
        raise
    finally:
        if relay:
            relay.stop.set()
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

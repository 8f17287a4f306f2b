# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the SIP tests see on loopback: every UDP datagram (AF_PACKET), and the SIP messages
among them."""
import socket
import struct
import threading
import time


class Capture:
    """Every UDP datagram on loopback while it runs, as (arrival time, source port,
    destination port, payload); AF_PACKET, so it needs CAP_NET_RAW (root)."""

    def __init__(self):
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        except PermissionError:
            raise SystemExit("the loopback capture of the calls' datagrams needs CAP_NET_RAW "
                             "(run the test as root)")
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.seen, self.done = [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            try:
                frame, address = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            if address[2] == socket.PACKET_OUTGOING:  # loopback shows each packet twice
                continue
            ip = frame[14:]
            if ip[9] != 17:
                continue
            udp = ip[(ip[0] & 15) * 4:]
            src, dst = struct.unpack("!HH", udp[:4])
            self.seen.append((time.monotonic(), src, dst, udp[8:]))

    def close(self):
        self.done.set()
        self.thread.join()
        self.sock.close()
        return self.seen


def sip_to(seen, port, start):
    """(time, datagram) of the SIP messages sent to `port` whose first line starts with
    `start`."""
    return [(t, d) for t, _, dst, d in seen if dst == port and d.startswith(start)]

#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Independent reference for docs/wire-format.md: computes the test vectors from the
specification alone (Poly1305 per RFC 8439, written here from scratch), so the C++
codec is checked against something that does not share its code.
Run: python3 tests/codec/wire_vectors.py"""

E = 1 << 18  # epoch


def pad(i):
    return (i * 131 + 7) & 0xFF


def pad_bytes(off, n):
    return bytes(pad(off + i) for i in range(n))


def poly1305(key, msg):
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    p, acc = (1 << 130) - 5, 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i:i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def tag(P, msg):
    r = pad_bytes(P // E * E, 16)
    s = pad_bytes(P, 16)
    return poly1305(r + s, msg)


def be(v, n):
    return v.to_bytes(n, "big")


def key_id(i):
    return bytes([0x7E, 0x57]) + bytes(6) + be(i, 8)


def xor(data, off):
    return bytes(b ^ k for b, k in zip(data, pad_bytes(off, len(data))))


def announcement(P, base, key_len, count):
    body = be(P, 8) + be(base, 8) + be(key_len, 4) + be(count, 2) + b"".join(key_id(i) for i in range(count))
    head = b"OTPA" + be(len(body) + 16, 4) + body
    return head + tag(P, head)


def datagram(kind, packet, header_len, P):
    header, payload = packet[:header_len], packet[header_len:]
    body = header + xor(payload, P + 16) + be(P, 8)
    return body + tag(P, kind + body)


def record(kind, stream_id, index, P, payload):
    head = b"OTP" + kind + be(24 + len(payload) + 16, 4) + be(stream_id, 8) + be(index, 8) + be(P, 8)
    body = head + xor(payload, P + 16)
    return body + tag(P, body)


RTP = bytes.fromhex("80600001000000a011223344") + b"physician audio!"
RTCP = bytes.fromhex("80c8000655667788") + bytes(range(20))

# Datagram mode, pad of 4 keys x 1024 bytes from offset 0:
# r = pad[0,16), announcement mask at 16, RTP at 32 (16 + 16), RTCP at 64 (16 + 20).
VECTORS = {
    "announcement": announcement(16, 0, 1024, 4),
    "rtp": datagram(b"R", RTP, 12, 32),
    "rtcp": datagram(b"C", RTCP, 8, 64),
}
# Stream mode, stream_id 0x0102030405060708, fresh pad: announcement at 16, then
# stream start at 32, data "exome chunk" at 48, final at 48 + 16 + 11 = 75.
SID = 0x0102030405060708
VECTORS["stream_announcement"] = announcement(16, 0, 1024, 4)
VECTORS["stream_start"] = record(b"S", SID, 0, 32, b"")
VECTORS["stream_data"] = record(b"D", SID, 1, 48, b"exome chunk")
VECTORS["stream_final"] = record(b"F", SID, 2, 75, b"")

if __name__ == "__main__":
    for name, value in VECTORS.items():
        print(f"{name} ({len(value)} bytes):\n{value.hex()}\n")

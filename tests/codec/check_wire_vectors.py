#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Runs the independent reference (wire_vectors.py) and checks that every vector it
computes is, byte for byte, the one docs/wire-format.md publishes and the one
tests/codec/test_vectors.cpp holds the C++ codec to. A drift in any of the three fails.
Run: python3 tests/codec/check_wire_vectors.py ROOT"""
import re
import subprocess
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
out = subprocess.run([sys.executable, f"{root}/tests/codec/wire_vectors.py"], check=True,
                     capture_output=True, text=True).stdout
# "name (N bytes):" then one line of hex.
vectors = dict(re.findall(r"^(\w+) \(\d+ bytes\):\n([0-9a-f]+)$", out, re.M))
if len(vectors) < 7:
    sys.exit(f"check_wire_vectors: the reference printed {len(vectors)} vectors, expected 7")

doc = open(f"{root}/docs/wire-format.md").read()
# A vector in the doc: "name (N bytes):" then a fenced block of hex lines.
doc_vectors = {name: "".join(body.split())
               for name, body in re.findall(r"^(\w+) \(\d+ bytes\):\n```\n([0-9a-f\n]+)```",
                                            doc, re.M)}
cpp = open(f"{root}/tests/codec/test_vectors.cpp").read()
# Adjacent string literals of hex, joined as the compiler joins them.
cpp_strings = {"".join(re.findall(r'"([0-9a-f]*)"', group))
               for group in re.findall(r'(?:"[0-9a-f]+"\s*)+', cpp)}

failed = False
for name, hex_bytes in vectors.items():
    if doc_vectors.get(name) != hex_bytes:
        print(f"check_wire_vectors: {name}: docs/wire-format.md differs from the reference")
        failed = True
    if hex_bytes not in cpp_strings:
        print(f"check_wire_vectors: {name}: tests/codec/test_vectors.cpp does not hold the "
              f"reference's bytes")
        failed = True
if failed:
    sys.exit(1)
print(f"check_wire_vectors: {len(vectors)} vectors agree (reference, docs, C++ test)")

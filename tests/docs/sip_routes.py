#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The Kamailio routes docs/sip.md shows are the ones the tests run (docs as tests): the
route of "Kamailio (one site)" against the lab's template (scripts/sip_lab.py,
KAMAILIO_CFG, which sip_endpoints.py, the demo and the other SIP tests start), the route
of "Kamailio with rtpengine_manage" against KAMAILIO_MANAGE_CFG (sip_rtpengine_manage.py),
and the lines of "Scale-out" / "Kamailio" against tests/gateway/sip_scaleout.py (SITE_CFG). Each
template is filled in with the docs' placeholders (the ng socket, PARTNER-PROXY, the
instances' addresses); then both sides are compared line by line without comments,
blank lines, the lab's xlog lines and indentation. Also: the modules the docs list in
prose are the ones the lab loads before the block.

Usage: sip_routes.py SOURCE_DIR"""
import difflib
import os
import re
import sys


def functional(text):
    """The lines that do something: comments, blank lines and xlog lines out, whitespace
    collapsed, then re-split so that `{ a; b; }` on one line equals it over three."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#(\s.*|)$", "", line).strip()
        if not line or re.fullmatch(r"xlog\(.*\);", line):
            continue
        # One statement or brace per entry, so that `{ a; b; }` on one line equals it
        # over three.
        out += re.split(r"(?<=[;{}])\s+", " ".join(line.split()))
    return out


def compare(what, docs, lab):
    docs_lines, lab_lines = functional(docs), functional(lab)
    if docs_lines != lab_lines:
        diff = "\n".join(difflib.unified_diff(docs_lines, lab_lines, "docs/sip.md", "the lab",
                                              lineterm=""))
        print(f"FAIL: {what}: docs/sip.md and the route the tests run differ:\n{diff}")
        return False
    print(f"{what}: {len(docs_lines)} statements, the same in docs/sip.md and the lab")
    return True


def block_after(text, heading):
    """The first ``` block after `heading` (as written)."""
    if heading not in text:
        raise SystemExit(f"docs/sip.md no longer has {heading!r}: update this test")
    rest = text[text.index(heading):]
    m = re.search(r"```\n(.*?)```", rest, re.S)
    return rest[:m.start()], m.group(1)


def main():
    source = sys.argv[1]
    sys.path.insert(0, os.path.join(source, "scripts"))
    sys.path.insert(0, os.path.join(source, "tests", "gateway"))
    sys.path.insert(0, os.path.join(source, "tests", "support"))
    import sip_lab
    import sip_scaleout
    docs = open(os.path.join(source, "docs", "sip.md")).read()
    ok = True

    # Kamailio (one site), and with rtpengine_manage: the lab's templates with the docs'
    # placeholders; the lab's head (global settings, modules) is what comes before the
    # docs' first line.
    heads = {}
    for what, heading, template in (
            ("Kamailio (one site)", "### Kamailio (one site)", sip_lab.KAMAILIO_CFG),
            ("Kamailio with rtpengine_manage", "### Kamailio with `rtpengine_manage`",
             sip_lab.KAMAILIO_MANAGE_CFG)):
        prose, block = block_after(docs, heading)
        lab = template.format(
            port=5060, rtpengine_sock="udp:127.0.0.1:22222", modules=sip_lab.KAMAILIO_MODULES,
            next_hop='$du = "sip:PARTNER-PROXY:5060";', extra="", children=1, media_set="")
        first = block.strip().splitlines()[0]
        if first not in lab:
            print(f"FAIL: {what}: the docs' route starts with {first!r}, which the lab does "
                  "not have")
            return 1
        heads[what] = prose, lab[:lab.index(first)]
        ok &= compare(what, block, lab[lab.index(first):])
    prose, head = heads["Kamailio (one site)"]
    listed = re.findall(r"`(\w+)`", prose[prose.index("besides"):])
    loaded = [m for m in re.findall(r'loadmodule "(\w+)\.so"', head) if m != "xlog"]
    if listed != loaded:
        print(f"FAIL: docs/sip.md lists the modules {listed}, the lab loads {loaded} (and "
              "xlog) before the route")
        ok = False

    # Scale-out: the lines of a site with two instances (its set 0, the weighted one, is
    # the rtpengine_sock the test hands to the lab's template).
    _, block = block_after(docs, "Site A with two instances")
    lines = block.splitlines()
    set0 = [i for i, line in enumerate(lines) if '"rtpengine_sock", "udp:' in line]
    if len(set0) != 1:
        print("FAIL: the Scale-out block has no single set-0 rtpengine_sock line")
        return 1
    del lines[set0[0]]
    instances = {"N1": "10.1.0.11:22222", "N2": "10.1.0.12:22222"}
    lab = sip_scaleout.SITE_CFG.format(ng1="N1", ng2="N2", tout=sip_scaleout.TOUT_MS,
                                       retr=sip_scaleout.RETR, disable=sip_scaleout.DISABLE_S,
                                       peer="sae-b", partner="PARTNER-PROXY:5060")
    for placeholder, address in instances.items():
        lab = lab.replace(f"udp:127.0.0.1:{placeholder}", f"udp:{address}")
    ok &= compare("Scale-out", "\n".join(lines), lab)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

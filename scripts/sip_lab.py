# SPDX-License-Identifier: LGPL-2.1-or-later
"""The two-site SIP lab on one machine, shared by the demo's --sip profile and the SIP tests
(docs/sip.md): qkd-kme-sim, otp-gateways with [sip], Kamailio proxies whose rtpengine module
drives the gateways over ng, and baresip endpoints (a tone out, what they hear recorded).
Each piece is started by a method of SipLab; the route of each proxy is the one docs/sip.md
shows. Processes come from tests/support/script_support.py (started in their own session,
all killed at the end)."""
import glob
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import traceback
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "support"))
from script_support import Processes, tcp_listening, udp_bound, wait_until  # noqa: E402

# baresip's status line, once a second while a call runs: "[0:00:16] audio=99366/0 (bit/s)".
BARESIP_BITRATE = re.compile(r"^\s*\[\d+:\d\d:\d\d\] (audio|video)=")

KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules"

# {rtpengine_sock}: one or more ng sockets ("udp:127.0.0.1:22222", or a weighted set
# "udp:127.0.0.1:22222=2 udp:127.0.0.1:22223=1"); {extra}: more module parameters;
# {next_hop}: route lines run before the INVITE is relayed; {media_set}: route lines run
# before every rtpengine command of a request (e.g. "route(OTPSET);", which picks the
# rtpengine set of a scaled-out site: docs/sip.md, Scale-out).
KAMAILIO_HEAD = """#!KAMAILIO
debug=2
log_stderror=yes
children={children}
disable_tcp=yes
listen=udp:127.0.0.1:{port}
mpath="{modules}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
{more_modules}loadmodule "rtpengine.so"
modparam("rtpengine", "rtpengine_sock", "{rtpengine_sock}")
{extra}
"""
KAMAILIO_CFG = KAMAILIO_HEAD.replace("{more_modules}", 'loadmodule "dialog.so"\n') + """\
request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{
            {media_set}
            if (is_method("ACK") && dlg_isflagset("1")) {{
                # The ACK of a 200 OK whose answer otpgate refused: end the call at once.
                t_relay();
                dlg_bye("all");
                exit;
            }}
            if (is_method("BYE")) rtpengine_delete();
            if (is_method("INVITE")) {{
                xlog("L_INFO", "re-INVITE $ci\\n");
                rtpengine_offer("replace-origin replace-session-connection ICE=remove RTP/AVP");
                t_on_reply("SDP");
            }}
            t_relay();
            exit;
        }}
        if (is_method("ACK") && t_check_trans()) t_relay();
        exit;
    }}
    if (is_method("CANCEL")) {{
        {media_set}
        rtpengine_delete();
        if (t_check_trans()) t_relay();
        exit;
    }}
    if (is_method("INVITE")) {{
        {media_set}
        record_route();
        if (!rtpengine_offer("replace-origin replace-session-connection ICE=remove RTP/AVP")) {{
            xlog("L_ERR", "rtpengine_offer refused\\n");
            send_reply("488", "Not Acceptable Here");
            exit;
        }}
        dlg_manage();
        t_on_reply("SDP");
    }}
    {next_hop}
    if (!t_relay()) sl_reply_error();
}}

onreply_route[SDP] {{
    if (has_body("application/sdp")) {{
        if (!rtpengine_answer("replace-origin replace-session-connection ICE=remove")) {{
            # Refused (e.g. an answer from a site without a gateway): a 2xx goes on whatever
            # the route does, so its SDP must not let the endpoints reach each other.
            xlog("L_ERR", "otpgate refused the answer: media disabled, call ended\\n");
            subst_body("/m=([a-z]+) [0-9]+/m=\\1 0/g");
            subst_body("/c=IN IP4 [0-9.]+/c=IN IP4 0.0.0.0/g");
            # Free the call at the gateway, and end the call once its ACK has come.
            rtpengine_delete();
            dlg_setflag("1");
        }}
    }}
}}
"""

# The same site with the route many Kamailio sites already run for rtpengine: one
# rtpengine_manage() wherever SDP or the end of a call passes (it sends offer, answer or
# delete by itself: offer for an INVITE with SDP, answer for a reply or ACK with SDP, delete
# for a BYE or CANCEL and in a failure route). Same placeholders as KAMAILIO_CFG.
KAMAILIO_MANAGE_CFG = KAMAILIO_HEAD.replace("{more_modules}", "") + """\
request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{
            {media_set}
            xlog("L_INFO", "in-dialog $rm $ci\\n");
            if (is_method("INVITE|ACK|BYE|UPDATE")) {{
                rtpengine_manage("replace-origin replace-session-connection ICE=remove RTP/AVP");
            }}
            t_on_reply("MANAGE");
            t_relay();
            exit;
        }}
        if (is_method("ACK") && t_check_trans()) t_relay();
        exit;
    }}
    if (is_method("CANCEL")) {{
        {media_set}
        rtpengine_manage();
        if (t_check_trans()) t_relay();
        exit;
    }}
    if (is_method("INVITE")) {{
        {media_set}
        record_route();
        if (!rtpengine_manage("replace-origin replace-session-connection ICE=remove RTP/AVP")) {{
            send_reply("488", "Not Acceptable Here");
            exit;
        }}
        t_on_reply("MANAGE");
        t_on_failure("MANAGE");
    }}
    {next_hop}
    if (!t_relay()) sl_reply_error();
}}

onreply_route[MANAGE] {{
    if (has_body("application/sdp") &&
        !rtpengine_manage("replace-origin replace-session-connection ICE=remove RTP/AVP")) {{
        # A refused answer must not let the endpoints reach each other (see KAMAILIO_CFG),
        # and frees the call at the gateway.
        subst_body("/m=([a-z]+) [0-9]+/m=\\1 0/g");
        subst_body("/c=IN IP4 [0-9.]+/c=IN IP4 0.0.0.0/g");
        rtpengine_delete();
    }}
}}

failure_route[MANAGE] {{
    rtpengine_manage();
}}
"""

# rtp_ports: baresip binds its RTP at random within it, so it lies inside the kernel's
# ephemeral range, away from the SIP and console ports the tests pick beforehand with
# free_ports (12000-18999): a call's RTP socket once took a caller's SIP port before that
# caller started ("SIP Transport failed: Address already in use").
BARESIP_CONFIG = """sip_listen 127.0.0.1:{port}
net_interface 127.0.0.1
rtp_ports 40000-49999
audio_source ausine,{tone}
audio_player sndfile,/dev/null
audio_alert sndfile,/dev/null
video_source fakevideo,nil
video_display fakevideo,nil
module_path /usr/lib/baresip/modules
module stdio.so
module opus.so
module ausine.so
module sndfile.so
module fakevideo.so
module vp8.so
module cons.so
cons_listen 127.0.0.1:{console}
module_app account.so
module_app menu.so
"""


def missing_software(programs=("kamailio", "baresip")):
    """Why the lab cannot run here (None when it can), for a test that uses `programs`."""
    for program in programs:
        if not shutil.which(program):
            return f"{program} is not installed (scripts/install-deps.sh installs it)"
    if not os.path.exists(os.path.join(KAMAILIO_MODULES, "rtpengine.so")):
        return "Kamailio's rtpengine module is not installed"
    return None


def skip_unless_runnable(programs=("kamailio", "baresip")):
    """For a test: exits 77 (ctest's skip) with a SKIP line where `programs` cannot run."""
    why = missing_software(programs)
    if why:
        print(f"SKIP: {why}")
        sys.exit(77)


def frequency(wav_path):
    """The tone's frequency from zero crossings of a PCM/float WAV (first channel), and
    how many seconds of it are loud."""
    data = open(wav_path, "rb").read()
    pos, fmt, samples = 12, None, None
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if kind == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif kind == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    tag, channels, rate, _, _, bits = fmt
    width = bits // 8
    code = {(1, 2): "h", (3, 4): "f", (1, 4): "i"}[(tag if tag != 0xFFFE else 1, width)]
    count = len(samples) // (width * channels)
    values = struct.unpack("<" + code * (count * channels), samples[:count * width * channels])
    mono = values[::channels]
    loud = [i for i, v in enumerate(mono) if abs(v) > (0.05 if code == "f" else 1000)]
    if len(loud) < rate:
        return 0.0, len(loud) / rate
    mono = mono[loud[0]:loud[-1]]
    crossings = sum(1 for a, b in zip(mono, mono[1:]) if a < 0 <= b)
    return crossings * rate / len(mono), len(loud) / rate


def recordings(home):
    """What the baresip in `home` recorded with sndfile (what it decoded), one file per
    stream it received, oldest first."""
    return sorted(glob.glob(os.path.join(home, "dump-*-dec.wav")))


def heard(home, who, tone, min_seconds):
    """Checks that `who` (the baresip in `home`) heard `tone` (within 5 Hz) in its first
    recording for more than `min_seconds`; prints and returns (Hz, seconds)."""
    dumps = recordings(home)
    assert dumps, f"the {who} wrote no recording"
    hz, seconds = frequency(dumps[0])
    print(f"the {who} heard {hz:.1f} Hz for {seconds:.1f} s (its peer sent {tone} Hz)")
    assert abs(hz - tone) < 5 and seconds > min_seconds, (who, hz, seconds)
    return hz, seconds


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SipLab:
    """The lab's processes under `work`, with the built programs of `build`."""

    def __init__(self, build, work, pki=None):
        self.build, self.work = build, work
        self.remove_work = False
        self.pki = pki or os.path.join(build, "test-pki", "good")
        self.procs = Processes(work, dict(os.environ,
                                          GST_PLUGIN_PATH=os.path.join(build, "plugins")))

    @classmethod
    def temporary(cls, build, prefix):
        """A lab in a new folder under /tmp, removed when the lab is left (`with`)."""
        lab = cls(build, tempfile.mkdtemp(prefix=prefix))
        lab.remove_work = True
        return lab

    # `with lab:` a test's body: a failure prints the logs (dump_logs) and goes on up; either
    # way every process is stopped and a temporary folder removed.
    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        try:
            if kind is not None:
                self.dump_logs("".join(traceback.format_exception(kind, error, trace)))
        finally:
            self.stop()
            if self.remove_work:
                shutil.rmtree(self.work, ignore_errors=True)
        return False

    @classmethod
    def media_flowing(cls, status_ports, media_count, at_least):
        """(type, packets) of every media of each gateway's first call once all of them
        are answered with `media_count` media in all, each with more than `at_least`
        packets both ways between the gateways and to the endpoint; else None (for
        wait_until)."""
        calls = [cls.status(p)["calls"] for p in status_ports]
        if not all(c and c[0]["state"] == "answered" for c in calls):
            return None
        media = [(m["type"], m["packets"]) for c in calls for m in c[0]["media"]]
        ok = len(media) == media_count and all(
            p["to_peer"] > at_least and p["to_local"] > at_least for _, p in media)
        return media if ok else None

    def start_kme(self, port, extra=()):
        p = self.procs.start([os.path.join(self.build, "keyclient", "qkd-kme-sim"), "--port",
                              str(port), "--cert", f"{self.pki}/kme.crt", "--key",
                              f"{self.pki}/kme.key", "--ca", f"{self.pki}/ca.crt", *extra],
                             "kme.log")
        wait_until(lambda: tcp_listening(port), "the KME")
        self.kme_port = port
        return p

    def gateway_config(self, me, peer, status, ng, port_min, port_max, max_media=3,
                       peer_address="127.0.0.1", name=None, extra=""):
        """Writes a [sip]-only gateway config; returns its path."""
        name = name or me
        config = os.path.join(self.work, f"{name}.toml")
        with open(config, "w") as f:
            f.write(f"""[site]
name = "{name}-site"
sae_id = "{me}"
state_dir = "{self.work}/{name}-state"
[kme]
url = "https://127.0.0.1:{self.kme_port}"
tls_cert = "{self.pki}/{me}.crt"
tls_key = "{self.pki}/{me}.key"
tls_ca = "{self.pki}/ca.crt"
[peer]
sae_id = "{peer}"
address = "{peer_address}"
[status]
listen = "127.0.0.1:{status}"
[sip]
ng_listen = "127.0.0.1:{ng}"
media_address = "127.0.0.1"
port_min = {port_min}
port_max = {port_max}
max_media = {max_media}
{extra}""")
        return config

    def start_gateway(self, config, ng, status, name):
        p = self.procs.start([os.path.join(self.build, "gateway", "otp-gateway"), "--config",
                              config], f"{name}.log")
        wait_until(lambda: udp_bound(ng) or p.poll() is not None, f"gateway {name}'s ng socket")
        if p.poll() is not None:
            raise SystemExit(f"gateway {name} ended at start:\n" + self.procs.output(p)[-2000:])
        wait_until(lambda: self.status(status), f"gateway {name}'s status API")
        return p

    @staticmethod
    def status(port):
        # Generous: under a loaded CI machine (tests run two at a time on two cores) a reply
        # can take seconds; a gateway that is really stuck still fails the caller's wait.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=20) as r:
            return json.load(r)

    def start_kamailio(self, name, port, rtpengine_sock, next_hop="", extra="", children=1,
                       media_set="", route=KAMAILIO_CFG):
        """Kamailio `name` on `port` with `route` (KAMAILIO_CFG or KAMAILIO_MANAGE_CFG)."""
        cfg = os.path.join(self.work, f"kamailio-{name}.cfg")
        with open(cfg, "w") as f:
            f.write(route.format(port=port, rtpengine_sock=rtpengine_sock,
                                        modules=KAMAILIO_MODULES, next_hop=next_hop,
                                        extra=extra, children=children, media_set=media_set))
        p = self.procs.start(["kamailio", "-f", cfg, "-DD", "-E", "-m", "64", "-M", "16",
                              "-Y", self.work, "-P",
                              os.path.join(self.work, f"kamailio-{name}.pid")],
                             f"kamailio-{name}.log")
        wait_until(lambda: udp_bound(port) or p.poll() is not None, f"kamailio {name}")
        if p.poll() is not None:
            raise SystemExit(f"kamailio {name} ended at start:\n" + self.procs.output(p)[-2000:])
        return p

    def baresip_home(self, name, port, tone, console, account, video=True, extra=""):
        """A baresip configuration folder: `account` is its accounts line; video=False
        leaves the video modules out (audio-only calls); `extra`: more config lines."""
        home = os.path.join(self.work, name)
        os.makedirs(home)
        config = BARESIP_CONFIG.format(port=port, tone=tone, console=console)
        if not video:
            config = "".join(line for line in config.splitlines(True)
                             if "video" not in line and "vp8" not in line)
        with open(os.path.join(home, "config"), "w") as f:
            f.write(config + extra)
        with open(os.path.join(home, "accounts"), "w") as f:
            f.write(account + "\n")
        return home

    def start_baresip(self, home, log, args=""):
        # sndfile writes its recordings into the working directory.
        return self.procs.start(["sh", "-c", f"cd {home} && exec baresip -f . {args}"], log)

    def start_sipp(self, name, scenario, args):
        """SIPp (Debian's sip-tester) running the XML `scenario` (text) in the lab's folder,
        where it writes its statistics files; `args` are its options."""
        path = os.path.join(self.work, f"{name}.xml")
        with open(path, "w") as f:
            f.write(scenario)
        return self.procs.start(["sh", "-c", f"cd {self.work} && exec sipp -sf {path} -nostdin "
                                 f"{args}"], f"{name}.log")

    def dump_logs(self, failure=None):
        """After a failure: what failed (`failure`, else the exception being handled),
        first (CI keeps only the head and the tail of a test's output), then the end of
        each process's log, baresip's once-a-second bitrate lines left out."""
        failure = failure or traceback.format_exc()
        print("FAILED here (the same again after the logs):\n" + failure, flush=True)
        for p in self.procs.running:
            text = "\n".join(line for line in self.procs.output(p).splitlines()
                             if line.strip() and not BARESIP_BITRATE.match(line))
            ended = "" if p.poll() is None else f" (ended, exit {p.returncode})"
            print(f"--- {p.log}{ended}\n" + text[-2500:])

    def stop(self):
        self.procs.stop_all()

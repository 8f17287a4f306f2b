// SPDX-License-Identifier: LGPL-2.1-or-later
// Calls through otp-gateway ([sip], issue 15): two gateways and qkd-kme-sim on loopback,
// driven over their ng sockets with datagrams in the shape Kamailio 5.6.3's rtpengine
// module sends them (checked against the capture in tests/data/sip), in the order the two
// sites' proxies send them for one INVITE: proxy A offers to gateway A, proxy B offers
// what came out to gateway B, proxy B answers the callee's SDP to gateway B, proxy A
// answers what came out to gateway A. Then RTP from a fake caller reaches the fake callee
// byte for byte and back, and a tap between the gateways (the SDP between the sites is
// pointed at it, as a WAN hop) sees only OTP.
#include <linux/capability.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "admission.hpp"
#include "call_media_pump.hpp"
#include "gateway_fixture.hpp"
#include "media_threads.hpp"
#include "otpgate/otp_wire.hpp"
#include "otpgate/sip.hpp"

namespace {

namespace bencode = otpgate::bencode;
namespace sdp = otpgate::sdp;
using nlohmann::json;

std::string bstr(std::string_view s) {
  return std::to_string(s.size()) + ":" + std::string(s);
}

struct NgKeys {
  std::string call_id, from_tag, to_tag;
};

// An ng datagram as Kamailio 5.6.3's rtpengine module builds it (keys in the order it
// adds them, not sorted): rtpengine_offer("replace-origin replace-session-connection
// trust-address ICE=remove RTP/AVP"), rtpengine_answer("replace-origin
// replace-session-connection ICE=remove"), rtpengine_delete(). `extra` goes in before
// call-id (e.g. a direction list).
std::string kamailio(std::string_view cookie, std::string_view command, const NgKeys& k,
                     std::string_view body_sdp = {}, std::string_view extra = {}) {
  std::string d = std::string(cookie) + " d8:supportsl10:load limite";
  if (command == "offer" || command == "answer") {
    d += "3:sdp" + bstr(body_sdp) + "3:ICE6:remove";
    if (command == "offer") d += "5:flagsl13:trust-addresse";
    d += "7:replacel6:origin18:session-connectione";
    if (command == "offer") d += "18:transport-protocol7:RTP/AVP";
  }
  d += std::string(extra);
  d += "7:call-id" + bstr(k.call_id) + "13:received-froml3:IP49:127.0.0.1e";
  d += "8:from-tag" + bstr(k.from_tag);
  if (!k.to_tag.empty() && command != "offer") d += "6:to-tag" + bstr(k.to_tag);
  d += "7:command" + bstr(command) + "e";
  return d;
}

std::string read_capture(const std::string& name) {
  std::ifstream in(std::string(OTPGATE_SIP_TEST_DATA) + "/" + name, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

Bytes bytes_of(const std::string& s) {
  return {s.begin(), s.end()};
}

// The reply to one ng datagram, as a dictionary.
bencode::Dict ng(std::uint16_t port, const std::string& datagram) {
  UdpSocket proxy;
  proxy.send_to(port, bytes_of(datagram));
  const auto reply = proxy.receive(10000);
  if (!reply) return {{"result", "no reply"}};
  const std::string text(reply->begin(), reply->end());
  const auto parts = otpgate::ng::split_datagram(text);
  EXPECT_TRUE(parts);
  EXPECT_EQ(parts->cookie, datagram.substr(0, datagram.find(' ')));
  return *bencode::decode(parts->body).dict();
}

std::string text_of(const bencode::Dict& d, const char* key) {
  const auto it = d.find(key);
  return it != d.end() && it->second.string() ? *it->second.string() : "";
}

// The SDP of an ok reply (fails the test with the error-reason otherwise).
std::string ok_sdp(const bencode::Dict& reply) {
  EXPECT_EQ(text_of(reply, "result"), "ok") << text_of(reply, "error-reason");
  return text_of(reply, "sdp");
}

std::string endpoint_sdp(std::uint16_t port, const std::string& direction = "sendrecv",
                         const std::string& address = "127.0.0.1") {
  return "v=0\r\no=- 4711 1 IN IP4 " + address + "\r\ns=-\r\nc=IN IP4 " + address +
         "\r\nt=0 0\r\nm=audio " + std::to_string(port) +
         " RTP/AVP 96 101\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:101 "
         "telephone-event/8000\r\na=" +
         direction + "\r\n";
}

// Threads of this process whose name starts with `prefix`.
std::size_t threads_named(const std::string& prefix) {
  std::size_t n = 0;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    if (std::getline(comm, name) && name.starts_with(prefix)) ++n;
  }
  return n;
}

std::uint16_t media_port(const std::string& text) {
  return sdp::parse(text).media.at(0).port;
}

std::string with_media_port(const std::string& text, std::uint16_t port) {
  sdp::Session s = sdp::parse(text);
  s.media.at(0).port = port;
  return sdp::format(s);
}

// A hop between the gateways: records every datagram on `listen` and forwards it to
// the gateway it stands for.
class Tap {
 public:
  explicit Tap(std::uint16_t listen)
      : port_(listen), hop_(listen, [this](const Bytes& d, const UdpHop& hop) {
          {
            std::lock_guard lock(mutex_);
            seen_.push_back(d);
          }
          if (const std::uint16_t target = target_) hop.send(target, d);
        }) {}
  std::uint16_t port() const { return port_; }
  void forward_to(std::uint16_t target) { target_ = target; }
  std::vector<Bytes> seen() {
    std::lock_guard lock(mutex_);
    return seen_;
  }

 private:
  std::uint16_t port_;
  std::atomic<std::uint16_t> target_{0};
  std::mutex mutex_;
  std::vector<Bytes> seen_;
  UdpHop hop_;  // last: its thread uses the members above
};

Bytes random_rtp(std::uint16_t seq, std::uint32_t ssrc, std::mt19937& random) {
  Bytes p = rtp(seq, ssrc, 96, 0);
  for (int i = 0; i < 160; ++i) p.push_back(static_cast<std::uint8_t>(random()));
  return p;
}

// How many of `sent` are missing from `got` when `got` is `sent` with some left out, in
// the same order; nothing when `got` holds a packet that was not sent, or out of order.
std::optional<std::size_t> left_out_in_order(const std::vector<Bytes>& sent,
                                             const std::vector<Bytes>& got) {
  std::size_t at = 0;
  for (const Bytes& packet : got) {
    while (at < sent.size() && sent[at] != packet) ++at;
    if (at == sent.size()) return std::nullopt;
    ++at;
  }
  return sent.size() - got.size();
}

class GatewayCallsTest : public GatewayTest {
 protected:
  // Ports: A's media from sip_+0, B's from sip_+60 (15 media each), endpoints from sip_+120.
  // `extra` goes into both [sip] sections, `extra_b` (when given) into gateway B's instead.
  void start_sip(int max_media = 12, int timeout_s = 60, const std::string& extra = "",
                 const std::optional<std::string>& extra_b = std::nullopt) {
    // Below the fixture's ports and the kernel's ephemeral range (32768-60999), where a
    // sending socket could take one of them.
    sip_ = sip_block_port(base_);  // a block each
    start([&](std::string& a, std::string& b) {
      auto section = [&](int offset) {
        return "[sip]\nng_listen = \"127.0.0.1:0\"\nmedia_address = \"127.0.0.1\"\nport_min = " +
               std::to_string(sip_ + offset) +
               "\nport_max = " + std::to_string(sip_ + offset + 59) +
               "\nmax_media = " + std::to_string(max_media) +
               "\nmedia_timeout_s = " + std::to_string(timeout_s) + "\n" + extra;
      };
      a += section(0);
      b += section(60);
      if (extra_b) b.replace(b.rfind(extra), extra.size(), *extra_b);
    });
  }
  std::uint16_t endpoint_port(int i) const {
    return static_cast<std::uint16_t>(sip_ + 120 + 2 * i);
  }

  struct Placed {
    std::string to_b, to_callee, to_a, to_caller;  // the SDP each step put out
  };
  // One INVITE and its 200 OK through both proxies. With taps, the SDP between the sites
  // names the tap, which forwards to the gateway it stands for.
  Placed place(const NgKeys& k, const std::string& caller, const std::string& callee,
               Tap* before_a = nullptr, Tap* before_b = nullptr) {
    Placed p;
    p.to_b = ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, caller)));
    if (before_a && !p.to_b.empty()) {
      before_a->forward_to(media_port(p.to_b));
      p.to_b = with_media_port(p.to_b, before_a->port());
    }
    p.to_callee = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k, p.to_b)));
    p.to_a = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k, callee)));
    if (before_b && !p.to_a.empty()) {
      before_b->forward_to(media_port(p.to_a));
      p.to_a = with_media_port(p.to_a, before_b->port());
    }
    p.to_caller = ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k, p.to_a)));
    return p;
  }
  void hang_up(const NgKeys& k) {
    for (auto* g : {a_.get(), b_.get()}) {
      const auto reply = ng(g->ng_port(), kamailio(cookie(), "delete", k));
      EXPECT_EQ(text_of(reply, "result"), "ok");
      EXPECT_EQ(text_of(reply, "warning"), "");
    }
  }
  std::string cookie() { return "1_4104_" + std::to_string(++sequence_); }

  // A call placed through both proxies between endpoints of its own (endpoint ports 2 *
  // pair and 2 * pair + 1), with the ports the gateways' SDP named: each endpoint's, and
  // each gateway's OTP port as it named it to the other.
  struct RunningCall {
    NgKeys k;
    std::unique_ptr<UdpSocket> caller, callee;
    std::uint16_t a_local = 0, b_local = 0, a_otp = 0, b_otp = 0;
  };
  RunningCall place_call(const std::string& id, int pair) {
    RunningCall c;
    c.k = {id, "f" + id, "t" + id};
    c.caller = std::make_unique<UdpSocket>(endpoint_port(2 * pair));
    c.callee = std::make_unique<UdpSocket>(endpoint_port(2 * pair + 1));
    const Placed p = place(c.k, endpoint_sdp(endpoint_port(2 * pair)),
                           endpoint_sdp(endpoint_port(2 * pair + 1)));
    c.a_local = media_port(p.to_caller);
    c.b_local = media_port(p.to_callee);
    c.a_otp = media_port(p.to_b);
    c.b_otp = media_port(p.to_a);
    return c;
  }

  // Sends `count` packets from `from` to `to_port`; what `sink` receives, in order.
  static std::vector<Bytes> send(const UdpSocket& from, std::uint16_t to_port,
                                 const UdpSocket& sink, int count, std::uint32_t ssrc,
                                 std::vector<Bytes>& sent, std::mt19937& random) {
    for (int i = 0; i < count; ++i) {
      sent.push_back(random_rtp(static_cast<std::uint16_t>(i), ssrc, random));
      from.send_to(to_port, sent.back());
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    std::vector<Bytes> received;
    while (received.size() < static_cast<std::size_t>(count)) {
      auto p = sink.receive(3000);
      if (!p) break;
      received.push_back(*p);
    }
    return received;
  }

  json status(otpgate::gateway::Gateway& g) { return get_json(g.status_port(), "/api/v1/status"); }

  // The receiving element's counters of the first media of the only call at `g`.
  json call_media_receive(otpgate::gateway::Gateway& g) {
    const json st = status(g);
    const std::string stream = st["calls"][0]["media"][0]["stream"];
    for (const auto& s : st["streams"])
      if (s["name"] == stream) return s["receive"];
    ADD_FAILURE() << "no stream " << stream << " in the status";
    return json::object();
  }

  std::uint16_t sip_ = 0;
  int sequence_ = 0;
  std::mt19937 random_{4711};
};

enum class Protection { otp, aes };

// Every datagram a tap saw is protected as `expected`: an announcement, or a protected RTP
// packet of one that was sent (clear header, payload changed, trailer added: the pad
// offset, with the AES flag for AES from QKD, then the tag); none is plain RTP, none
// protected the other way.
void expect_only(Protection expected, const std::vector<Bytes>& seen,
                 const std::vector<Bytes>& sent) {
  std::size_t protected_packets = 0;
  for (const Bytes& d : seen) {
    if (otpgate::otp::classify(d) == otpgate::otp::DatagramType::announcement) continue;
    const auto plain = std::find_if(sent.begin(), sent.end(), [&](const Bytes& p) {
      return std::equal(p.begin(), p.begin() + 12, d.begin());
    });
    ASSERT_NE(plain, sent.end()) << "a datagram between the gateways that was not sent";
    ASSERT_EQ(d.size(), plain->size() + otpgate::otp::kTrailerBytes);
    EXPECT_FALSE(std::equal(plain->begin() + 12, plain->end(), d.begin() + 12))
        << "plain RTP between the gateways";
    std::uint64_t field = 0;
    for (std::size_t i = 0; i < 8; ++i)
      field = field << 8 | d[d.size() - otpgate::otp::kTrailerBytes + i];
    EXPECT_EQ((field & otpgate::otp::kAesFlag) != 0, expected == Protection::aes)
        << (expected == Protection::aes ? "not an AES packet" : "an AES packet, not OTP");
    ++protected_packets;
  }
  EXPECT_GE(protected_packets, sent.size());
}

}  // namespace

TEST(GatewayCallsNg, TheOfferBuiltHereIsWhatKamailioSent) {
  const std::string captured = read_capture("kamailio-5.6.3-offer.bin");
  const auto parts = otpgate::ng::split_datagram(captured);
  ASSERT_TRUE(parts);
  const auto request = otpgate::ng::parse_request(bencode::decode(parts->body));
  EXPECT_EQ(kamailio(parts->cookie, "offer", {request.call_id, request.from_tag, ""}, request.sdp),
            captured);
}

TEST(GatewayCallsConfig, SipAloneIsAConfigAndItsKeysAreChecked) {
  const std::string pki = otpgate::testing::pki_dir().string();
  const std::string base =
      "[site]\nname = \"a\"\nsae_id = \"sae-a\"\n[kme]\nurl = "
      "\"https://127.0.0.1:1\"\ntls_cert = \"" +
      pki + "/sae-a.crt\"\ntls_key = \"" + pki + "/sae-a.key\"\ntls_ca = \"" + pki +
      "/ca.crt\"\n[peer]\nsae_id = \"sae-b\"\naddress = \"127.0.0.1\"\n";
  auto load = [](const std::string& text) {
    try {
      otpgate::gateway::parse_config(text, "a.toml");
      return std::string("loaded");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
  };
  auto parse = [&](const std::string& sip) { return load(base + sip); };
  EXPECT_EQ(parse("[sip]\nmedia_address = \"10.0.0.1\"\nport_min = 30000\nport_max = 30031\n"),
            "loaded");
  EXPECT_NE(parse("").find("at least one [[stream]] table (or a [sip] section"), std::string::npos);
  EXPECT_NE(parse("[sip]\nmedia_address = \"10.0.0.1\"\nport_min = 30000\nport_max = 30030\n")
                .find("sip.port_max = 30030"),
            std::string::npos);
  EXPECT_NE(parse("[sip]\nmedia_address = \"gw.example\"\nport_min = 30000\nport_max = 30031\n")
                .find("sip.media_address"),
            std::string::npos);
  EXPECT_NE(parse("[sip]\nmedia_adress = \"10.0.0.1\"\n").find("did you mean"), std::string::npos);
  const std::string sip =
      "[sip]\nmedia_address = \"10.0.0.1\"\nport_min = 30000\nport_max = 30031\n";
  EXPECT_NE(parse(sip + "[[stream]]\nname = \"a\"\nlocal_rtp_port = 30004\npeer_port = 5000\n"
                        "listen_port = 5002\ndeliver_rtp = \"127.0.0.1:5004\"\n")
                .find("a port outside sip.port_min-sip.port_max"),
            std::string::npos);
  EXPECT_NE(parse(sip + "over_budget = \"drop\"\n").find("sip.over_budget"), std::string::npos);
  EXPECT_NE(parse(sip + "over_budget = \"drop\"\n").find("\"refuse\", \"cap\" or \"aes\""),
            std::string::npos);
  EXPECT_NE(parse(sip + "admission_horizon_s = -1\n").find("sip.admission_horizon_s"),
            std::string::npos);
  EXPECT_EQ(parse(sip + "over_budget = \"aes\"\nadmission_horizon_s = 0\n"), "loaded");
  std::string ice =
      base + sip +
      "[ice]\nsignalling_listen = \"127.0.0.1:0\"\npeer_signalling = \"127.0.0.1:1\"\n";
  ice.insert(ice.find("[peer]\n") + 7, "transport = \"ice\"\n");
  EXPECT_NE(load(ice).find("calls over ICE are not supported yet"), std::string::npos);
}

TEST_F(GatewayCallsTest, CallCrossesBothGatewaysAsOtpAndHangUpFreesItsPortsAndLanes) {
  start_sip();
  const std::size_t udpsrc_threads_before_the_call = threads_named("udpsrc");
  const std::size_t media_threads_before_the_call = threads_named("otp-media");
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  Tap towards_a(endpoint_port(2)), towards_b(endpoint_port(3));  // the WAN hop, each way
  const NgKeys k{"0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b", "a4f1c9b2e0", "7f3e91aa"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)),
                         &towards_a, &towards_b);
  ASSERT_FALSE(p.to_caller.empty());
  // The partner leg carries the marker and the sender's lane; the local legs neither.
  EXPECT_NE(p.to_b.find("a=x-otp:sae-a"), std::string::npos) << p.to_b;
  EXPECT_NE(p.to_b.find("a=x-otp-lane:0"), std::string::npos) << p.to_b;
  EXPECT_NE(p.to_a.find("a=x-otp:sae-b"), std::string::npos) << p.to_a;
  for (const auto* s : {&p.to_callee, &p.to_caller}) {
    EXPECT_EQ(s->find("x-otp"), std::string::npos) << *s;
    EXPECT_NE(s->find("c=IN IP4 127.0.0.1"), std::string::npos) << *s;
    EXPECT_NE(s->find("a=rtpmap:96 opus/48000/2"), std::string::npos) << *s;
  }
  const std::uint16_t a_local = media_port(p.to_caller), b_local = media_port(p.to_callee);
  EXPECT_GE(a_local, sip_);
  EXPECT_LT(a_local, sip_ + 60);
  EXPECT_GE(b_local, sip_ + 60);
  EXPECT_LT(b_local, sip_ + 120);

  std::vector<Bytes> sent_ab, sent_ba;
  const auto at_callee = send(caller, a_local, callee, 200, 0xca11e4, sent_ab, random_);
  const auto at_caller = send(callee, b_local, caller, 200, 0xca11ee, sent_ba, random_);
  EXPECT_EQ(at_callee, sent_ab);
  EXPECT_EQ(at_caller, sent_ba);
  expect_only(Protection::otp, towards_b.seen(), sent_ab);
  expect_only(Protection::otp, towards_a.seen(), sent_ba);
  // Each gateway moves the call's datagrams, both ways, on the media threads every call
  // shares (call_media_pump.hpp): a call adds no thread, and no GStreamer source thread
  // (the static streams' udpsrc threads are all there are).
  EXPECT_EQ(threads_named("otp-media"), media_threads_before_the_call);
  EXPECT_GE(media_threads_before_the_call, 2u);
  EXPECT_EQ(threads_named("udpsrc"), udpsrc_threads_before_the_call);

  // The status shows the call with its counters and the key it used, at both sites.
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    ASSERT_EQ(st["calls"].size(), 1u) << st.dump(2);
    const json& call = st["calls"][0];
    EXPECT_EQ(call["call_id"], k.call_id);
    EXPECT_EQ(call["state"], "answered");
    EXPECT_EQ(call["offer_from"], g == a_.get() ? "local" : "partner");
    const json& media = call["media"][0];
    EXPECT_EQ(media["packets"]["from_local"], 200);  // to_peer adds announcements
    EXPECT_EQ(media["packets"]["to_local"], 200);
    EXPECT_GT(media["key_used_bytes"]["send"].get<std::uint64_t>(), 200u * 160u);
    EXPECT_EQ(st["sip"]["free_media"], 11);
    const std::string metrics = g->metrics_text();
    EXPECT_NE(metrics.find("otpgate_call_packets_total{site=\"" + st["site"].get<std::string>() +
                           "\",call_id=\"" + k.call_id + "\",media=\"0\",path=\"from_local\"} 200"),
              std::string::npos)
        << metrics;
  }
  // The static streams still run beside the call.
  std::map<int, std::vector<Bytes>> sent;
  EXPECT_EQ(exchange(true, 20, sent)[0], sent[0]);

  hang_up(k);
  EXPECT_EQ(threads_named("otp-media"), media_threads_before_the_call);
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    EXPECT_TRUE(st["calls"].empty());
    EXPECT_EQ(st["sip"]["free_media"], 12);
    EXPECT_EQ(st["streams"].size(), 2u);  // audio-1, video-1
  }
  // Its ports are free again: a conference system could bind them.
  UdpSocket again_a(a_local), again_b(b_local);
  // A second delete is answered as rtpengine does: ok, with a warning.
  const auto reply = ng(a_->ng_port(), kamailio(cookie(), "delete", k));
  EXPECT_EQ(text_of(reply, "result"), "ok");
  EXPECT_EQ(text_of(reply, "warning"), "unknown call");
}

// [media] pin_threads (default true): each call media thread is bound to a CPU of its own,
// one per CPU the process may use; pin_threads = false leaves them to the kernel. Both
// gateways run in this process: A pins, B does not.
TEST_F(GatewayCallsTest, CallMediaThreadsStayOnACpuOfTheirOwnUnlessToldNot) {
  start_sip(12, 60, "", "[media]\npin_threads = false\nbatch_window_us = 3000\n");
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ASSERT_EQ(::sched_getaffinity(0, sizeof allowed, &allowed), 0);
  const int cpus = CPU_COUNT(&allowed);
  const auto threads = static_cast<std::size_t>(std::clamp(cpus, 1, 4));

  const json a = json::parse(a_->status_json())["media_threads"];
  const json b = json::parse(b_->status_json())["media_threads"];
  ASSERT_EQ(a["call_media_threads"], threads) << a.dump();
  ASSERT_EQ(b["call_media_threads"], threads) << b.dump();
  std::vector<int> pinned;
  for (const json& cpu : a["call_media_thread_cpus"]) {
    ASSERT_TRUE(cpu.is_number_integer()) << a.dump();
    EXPECT_TRUE(CPU_ISSET(cpu.get<int>(), &allowed)) << cpu;
    pinned.push_back(cpu.get<int>());
  }
  std::sort(pinned.begin(), pinned.end());
  EXPECT_EQ(std::adjacent_find(pinned.begin(), pinned.end()), pinned.end())
      << "two threads on one CPU: " << a.dump();
  for (const json& cpu : b["call_media_thread_cpus"]) EXPECT_TRUE(cpu.is_null()) << b.dump();

  // What the kernel holds: A's threads each on one CPU, B's on every CPU allowed.
  std::size_t on_one_cpu = 0, on_all = 0;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    if (!std::getline(comm, name) || name != "otp-media") continue;
    cpu_set_t set;
    CPU_ZERO(&set);
    ASSERT_EQ(::sched_getaffinity(std::stoi(task.path().filename().string()), sizeof set, &set), 0);
    if (CPU_COUNT(&set) == 1) ++on_one_cpu;
    if (CPU_EQUAL(&set, &allowed)) ++on_all;
  }
  if (cpus >= 2) {
    EXPECT_EQ(on_one_cpu, threads);
    EXPECT_EQ(on_all, threads);
  } else {
    EXPECT_EQ(on_one_cpu, 2 * threads);  // one CPU: pinned or not, they share it
  }

  // Every other thread of ours is named too, as top -H shows them (docs/gateway.md).
  for (const char* name : {"otp-keys-send", "otp-keys-recv", "otp-bus", "otp-ng", "otp-status"}) {
    EXPECT_GE(threads_named(name), 2u) << name;  // one per gateway at least
  }

  // The pinned gateway relays a call as before.
  RunningCall c = place_call("pinned-threads-call", 0);
  std::vector<Bytes> there, back;
  EXPECT_EQ(send(*c.caller, c.a_local, *c.callee, 30, 0x1234, there, random_), there);
  EXPECT_EQ(send(*c.callee, c.b_local, *c.caller, 30, 0x4321, back, random_), back);
  hang_up(c.k);

  // [media] batch_window_us: 0 (off) unless set; B's 3000. Each gateway read this call's
  // 60 packets (30 from its endpoint, 30 from the partner, with the partner's key
  // announcements besides) on its threads, counted.
  const json a_after = json::parse(a_->status_json())["media_threads"];
  const json b_after = json::parse(b_->status_json())["media_threads"];
  EXPECT_EQ(a_after["call_media_batch_window_us"], 0);
  EXPECT_EQ(b_after["call_media_batch_window_us"], 3000);
  for (const json& m : {a_after, b_after}) {
    std::uint64_t datagrams = 0, wakeups = 0;
    for (const json& n : m["call_media_datagrams"]) datagrams += n.get<std::uint64_t>();
    for (const json& n : m["call_media_wakeups"]) wakeups += n.get<std::uint64_t>();
    EXPECT_GE(datagrams, 60u) << m.dump();
    EXPECT_GE(wakeups, 1u) << m.dump();
    EXPECT_EQ(m["call_media_paced_wakeups"].size(), threads) << m.dump();
  }
  for (const json& n : a_after["call_media_paced_wakeups"]) EXPECT_EQ(n, 0) << a_after.dump();
  const std::string metrics = a_->metrics_text();
  EXPECT_NE(metrics.find("otpgate_call_media_datagrams_total{site=\""), std::string::npos);
  EXPECT_NE(metrics.find("otpgate_call_media_wakeups_total{site=\""), std::string::npos);
}

// One MediaLoops thread fed from one UDP socket: what reaches the pad behind it, in order.
class OneMediaLoop {
 public:
  explicit OneMediaLoop(std::chrono::microseconds window)
      : gst_ready_((gst_init(nullptr, nullptr), true)), loops_(1, {}, nullptr, window) {
    socket_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in at{};
    at.sin_family = AF_INET;
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof at;
    EXPECT_EQ(::bind(socket_, reinterpret_cast<sockaddr*>(&at), sizeof at), 0);
    EXPECT_EQ(::getsockname(socket_, reinterpret_cast<sockaddr*>(&at), &length), 0);
    to_ = at;
    sender_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    feed_ = GST_PAD(gst_object_ref_sink(gst_pad_new("feed", GST_PAD_SRC)));
    collect_ = GST_PAD(gst_object_ref_sink(gst_pad_new("collect", GST_PAD_SINK)));
    gst_pad_set_element_private(collect_, this);
    gst_pad_set_chain_function(collect_, [](GstPad* pad, GstObject*, GstBuffer* buffer) {
      auto* self = static_cast<OneMediaLoop*>(gst_pad_get_element_private(pad));
      GstMapInfo map;
      const std::lock_guard lock(self->mutex_);
      if (gst_buffer_map(buffer, &map, GST_MAP_READ)) {
        self->received_.emplace_back(map.data, map.data + map.size);
        gst_buffer_unmap(buffer, &map);
      }
      // A mark on the buffer itself: it is there again only when the same buffer is.
      static const GQuark seen = g_quark_from_static_string("one-media-loop-seen");
      if (gst_mini_object_get_qdata(GST_MINI_OBJECT(buffer), seen)) ++self->reused_;
      gst_mini_object_set_qdata(GST_MINI_OBJECT(buffer), seen, self, nullptr);
      // As an element holding a packet while its key is on its way.
      if (self->hold_every_ > 0 && self->received_.size() % self->hold_every_ == 0) {
        self->held_.emplace_back(buffer, self->received_.size() - 1);
      } else {
        gst_buffer_unref(buffer);
      }
      return GST_FLOW_OK;
    });
    gst_pad_set_event_function(collect_, [](GstPad*, GstObject*, GstEvent* event) -> gboolean {
      gst_event_unref(event);
      return TRUE;
    });
    EXPECT_EQ(gst_pad_link(feed_, collect_), GST_PAD_LINK_OK);
    gst_pad_set_active(collect_, TRUE);
    gst_pad_set_active(feed_, TRUE);
    gst_pad_push_event(feed_, gst_event_new_stream_start("one-media-loop"));
    GstSegment segment;
    gst_segment_init(&segment, GST_FORMAT_TIME);
    gst_pad_push_event(feed_, gst_event_new_segment(&segment));
    id_ = loops_.add(loops_.pick(), socket_, feed_);
  }
  ~OneMediaLoop() {
    loops_.remove(id_);
    for (auto& [buffer, index] : held_) gst_buffer_unref(buffer);
    gst_pad_set_active(feed_, FALSE);
    gst_pad_set_active(collect_, FALSE);
    gst_object_unref(feed_);
    gst_object_unref(collect_);
    ::close(sender_);
    ::close(socket_);
  }
  // `count` datagrams numbered from `first`, one every `gap` (none: a burst).
  void send(int count, std::chrono::microseconds gap, int first = 0) {
    for (int i = first; i < first + count; ++i) {
      const std::uint32_t n = htonl(static_cast<std::uint32_t>(i));
      ::sendto(sender_, &n, sizeof n, 0, reinterpret_cast<const sockaddr*>(&to_), sizeof to_);
      if (gap.count() > 0) std::this_thread::sleep_for(gap);
    }
  }
  // Waits (up to 10 s) for `count` datagrams; true when they came numbered 0..count-1.
  bool received_in_order(int count) {
    for (int i = 0; i < 1000 && received() < static_cast<std::size_t>(count); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const std::lock_guard lock(mutex_);
    if (received_.size() != static_cast<std::size_t>(count)) return false;
    for (int i = 0; i < count; ++i) {
      std::uint32_t n = 0;
      if (received_[static_cast<std::size_t>(i)].size() != sizeof n) return false;
      std::memcpy(&n, received_[static_cast<std::size_t>(i)].data(), sizeof n);
      if (ntohl(n) != static_cast<std::uint32_t>(i)) return false;
    }
    return true;
  }
  otpgate::gateway::MediaLoops::ThreadStats stats() const { return loops_.thread_stats().at(0); }

  // From now on the pad keeps every n-th buffer it gets (0: none).
  void hold_every(std::size_t n) {
    const std::lock_guard lock(mutex_);
    hold_every_ = n;
  }
  void send_bytes(const std::vector<std::uint8_t>& datagram) {
    ASSERT_EQ(::sendto(sender_, datagram.data(), datagram.size(), 0,
                       reinterpret_cast<const sockaddr*>(&to_), sizeof to_),
              static_cast<ssize_t>(datagram.size()))
        << std::strerror(errno);
  }
  // Waits (up to 10 s) for `count` datagrams; what came, in order.
  std::vector<std::vector<std::uint8_t>> wait_for(std::size_t count) {
    for (int i = 0; i < 1000 && received() < count; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const std::lock_guard lock(mutex_);
    return received_;
  }
  // Datagrams that came in a buffer an earlier one came in.
  std::size_t reused() {
    const std::lock_guard lock(mutex_);
    return reused_;
  }
  // The indices of the held datagrams whose buffers no longer hold what arrived in them.
  std::vector<std::size_t> held_and_changed() {
    const std::lock_guard lock(mutex_);
    std::vector<std::size_t> changed;
    for (const auto& [buffer, index] : held_) {
      GstMapInfo map;
      if (!gst_buffer_map(buffer, &map, GST_MAP_READ)) {
        changed.push_back(index);
        continue;
      }
      if (std::vector<std::uint8_t>(map.data, map.data + map.size) != received_[index]) {
        changed.push_back(index);
      }
      gst_buffer_unmap(buffer, &map);
    }
    return changed;
  }
  std::size_t held() {
    const std::lock_guard lock(mutex_);
    return held_.size();
  }

 private:
  std::size_t received() {
    const std::lock_guard lock(mutex_);
    return received_.size();
  }
  bool gst_ready_;  // before anything of GStreamer's is made (a test may run alone)
  otpgate::gateway::MediaLoops loops_;
  int socket_ = -1, sender_ = -1;
  sockaddr_in to_{};
  GstPad* feed_ = nullptr;
  GstPad* collect_ = nullptr;
  std::uint64_t id_ = 0;
  std::mutex mutex_;
  std::vector<std::vector<std::uint8_t>> received_;
  std::size_t reused_ = 0;
  std::size_t hold_every_ = 0;
  std::vector<std::pair<GstBuffer*, std::size_t>> held_;  // buffer, index in received_
};

// [media] batch_window_us: a thread that can expect 3 datagrams or more per window waits
// out the window after each wake-up, so that one wake-up reads several; a quiet one never
// waits (its datagrams are not held up); with 0 no thread ever waits. Nothing is lost or
// reordered either way.
TEST(MediaLoopsTest, ABusyThreadReadsSeveralDatagramsPerWakeUpAndAQuietOneNeverWaits) {
  using std::chrono::microseconds;
  {
    // About 1000 a second against a 50 ms window: about 50 per window once busy (the
    // first 100 ms measure the rate): some 120 wake-ups. A machine whose 1 ms sleeps take
    // 10 ms still stays below 300.
    OneMediaLoop busy(microseconds(50000));
    busy.send(1000, microseconds(1000));
    ASSERT_TRUE(busy.received_in_order(1000));
    const auto s = busy.stats();
    EXPECT_EQ(s.datagrams, 1000u);
    EXPECT_GT(s.paced, 0u);
    EXPECT_LT(s.wakeups, 300u) << "paced " << s.paced;  // one per datagram without batching
  }
  {
    // 10 a second: 0.5 per window, below 3. Every wake-up is followed by epoll_wait.
    OneMediaLoop quiet(microseconds(50000));
    quiet.send(10, microseconds(100000));
    ASSERT_TRUE(quiet.received_in_order(10));
    EXPECT_EQ(quiet.stats().datagrams, 10u);
    EXPECT_EQ(quiet.stats().paced, 0u);
  }
  {
    OneMediaLoop off(microseconds(0));
    off.send(500, microseconds(200));
    ASSERT_TRUE(off.received_in_order(500));
    EXPECT_EQ(off.stats().datagrams, 500u);
    EXPECT_EQ(off.stats().paced, 0u);
  }
}

// A paced thread whose wake-up hit a bound (64 datagrams read from one socket: a burst, or
// a thread falling behind) reads again at once, not a window later. A burst of 192 costs
// the window its first datagram fell into and at most the wake-up that read its last
// ones: two paced wake-ups at most, where a window after every 64 would make it three or
// four.
TEST(MediaLoopsTest, APacedThreadReadsABurstAtOnceNotAWindowPerSixtyFourDatagrams) {
  using std::chrono::microseconds;
  OneMediaLoop loop(microseconds(200000));
  int sent = 300;
  loop.send(sent, microseconds(1000));  // about 200 a window: busy
  ASSERT_TRUE(loop.received_in_order(sent));
  ASSERT_GT(loop.stats().paced, 0u) << "the thread was not busy: the test shows nothing";
  std::uint64_t paced = 0;
  for (int burst = 0; burst < 4; ++burst) {
    const std::uint64_t paced_before = loop.stats().paced;
    loop.send(192, microseconds(0), sent);
    sent += 192;
    ASSERT_TRUE(loop.received_in_order(sent)) << "burst " << burst;
    paced += loop.stats().paced - paced_before;
  }
  EXPECT_EQ(loop.stats().datagrams, static_cast<std::uint64_t>(sent));
  // Three or more a burst if wake-ups that left datagrams waiting were paced too.
  EXPECT_LE(paced, 9u) << "paced after wake-ups that left datagrams waiting";
}

// Datagrams land straight in the buffers that go into the element, which are used again
// once the element lets go of them. Every size arrives whole, from one byte to the largest
// UDP datagram (those above a buffer's 2 KiB spill into a buffer of their own), and a
// buffer the element still holds (a packet waiting for its key) is never written into.
TEST(MediaLoopsTest, DatagramsOfEverySizeArriveWholeAndHeldBuffersAreNeverReused) {
  // Writing into a held buffer is a GStreamer critical (and a refused map), not a crash.
  // The count outlives the handler, however the test ends.
  static std::atomic<int> criticals{0};
  criticals = 0;
  const guint handler = g_log_set_handler(
      "GStreamer", static_cast<GLogLevelFlags>(G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING),
      [](const gchar*, GLogLevelFlags, const gchar*, gpointer) { ++criticals; }, nullptr);
  const std::unique_ptr<const guint, void (*)(const guint*)> remove_handler(
      &handler, [](const guint* id) { g_log_remove_handler("GStreamer", *id); });
  OneMediaLoop loop(std::chrono::microseconds(0));
  std::vector<std::vector<std::uint8_t>> sent;
  const auto datagram = [&sent](std::size_t size) {
    std::vector<std::uint8_t> d(size);
    for (std::size_t i = 0; i < size; ++i) {
      d[i] = static_cast<std::uint8_t>((i * 7 + sent.size() * 13) & 0xff);
    }
    sent.push_back(d);
    return d;
  };
  for (const std::size_t size :
       {std::size_t{1}, std::size_t{172}, std::size_t{2047}, std::size_t{2048}, std::size_t{2049},
        std::size_t{9000}, std::size_t{65507}, std::size_t{172}, std::size_t{1}}) {
    loop.send_bytes(datagram(size));
  }
  ASSERT_EQ(loop.wait_for(sent.size()), sent);
  // 300 small datagrams that the pad drops at once: a handful of buffers carry them all
  // (each one is allocated anew without the reuse).
  const std::size_t before = loop.reused();
  // Eight at a time, each eight read before the next: a socket's receive room is small
  // (net.core.rmem_max) against a media thread kept off its CPU on a busy machine.
  const auto send_in_eights = [&](std::size_t (*size_of)(int)) {
    for (int i = 0; i < 300; ++i) {
      loop.send_bytes(datagram(size_of(i)));
      if (i % 8 == 7) loop.wait_for(sent.size());
    }
  };
  send_in_eights([](int i) { return 172 + static_cast<std::size_t>(i % 50); });
  ASSERT_EQ(loop.wait_for(sent.size()), sent);
  EXPECT_GE(loop.reused() - before, 280u);
  // Every third one is kept, as a packet waiting for key: the rest arrive whole beside
  // them, and what the kept ones hold does not change.
  loop.hold_every(3);
  send_in_eights([](int i) { return 100 + static_cast<std::size_t>(i % 1900); });
  ASSERT_EQ(loop.wait_for(sent.size()), sent);
  EXPECT_GE(loop.held(), 100u);
  EXPECT_EQ(loop.held_and_changed(), std::vector<std::size_t>{});
  EXPECT_EQ(criticals, 0);
}

// A media thread that may not be raised above time-shared work (no CAP_SYS_NICE, no
// RLIMIT_NICE) is not bound to a CPU: it could not leave a busy one. The threads are
// started from a thread that dropped CAP_SYS_NICE (capabilities are per thread and
// inherited), as a gateway run without the unit's LimitNICE= would be.
TEST(MediaLoopsTest, ThreadsThatCannotBeRaisedAreNotBound) {
  const std::vector<int> cpus = otpgate::gateway::allowed_cpus();
  std::vector<std::optional<int>> unraised_cpus, raised_cpus;
  nlohmann::json unraised_status;
  bool nice_allowed = false;
  std::thread([&] {
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    ASSERT_EQ(::syscall(SYS_capget, &header, data), 0);
    data[CAP_SYS_NICE / 32].effective &= ~(1u << (CAP_SYS_NICE % 32));
    data[CAP_SYS_NICE / 32].permitted &= ~(1u << (CAP_SYS_NICE % 32));
    ASSERT_EQ(::syscall(SYS_capset, &header, data), 0);
    rlimit nice_limit{};
    ASSERT_EQ(::getrlimit(RLIMIT_NICE, &nice_limit), 0);
    if (nice_limit.rlim_cur >= 30) {  // RLIMIT_NICE lets any thread reach nice -10
      nice_allowed = true;
      return;
    }
    otpgate::gateway::MediaScheduling scheduling(0);
    otpgate::gateway::MediaLoops loops(1, {cpus.front()}, &scheduling);
    for (const auto& t : loops.thread_stats()) unraised_cpus.push_back(t.cpu);
    unraised_status = scheduling.status();
  }).join();
  if (nice_allowed) GTEST_SKIP() << "RLIMIT_NICE allows nice -10 without CAP_SYS_NICE here";
  ASSERT_EQ(unraised_cpus.size(), 1u);
  EXPECT_FALSE(unraised_cpus[0].has_value()) << "a time-shared media thread was bound";
  EXPECT_EQ(unraised_status["unraised_threads"], 1) << unraised_status.dump();
  // The same from this thread, which may raise them: bound.
  otpgate::gateway::MediaScheduling scheduling(0);
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), -10) != 0) {
    GTEST_SKIP() << "this process may not raise threads";
  }
  ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 0);
  otpgate::gateway::MediaLoops loops(1, {cpus.front()}, &scheduling);
  for (const auto& t : loops.thread_stats()) raised_cpus.push_back(t.cpu);
  ASSERT_EQ(raised_cpus.size(), 1u);
  EXPECT_EQ(raised_cpus[0], cpus.front());
}

TEST_F(GatewayCallsTest, ACallHungUpRightAfterItsAnswerLeavesNoMediaRunning) {
  // The answer returns once a media's sockets are bound and its pipelines built; they
  // start on the gateway's starter thread right after. A delete that follows at once
  // must find each start done or dropped, never still to come: otherwise a pipeline torn
  // down would start afterwards and keep the media's ports (and its lane's encryptor).
  start_sip();
  for (int i = 0; i < 30; ++i) {
    const NgKeys k{"quick-" + std::to_string(i), "f" + std::to_string(i), "t" + std::to_string(i)};
    const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
    ASSERT_FALSE(p.to_caller.empty()) << i;
    hang_up(k);
    for (const std::uint16_t rtp : {media_port(p.to_caller), media_port(p.to_callee)}) {
      // The unit's ports: the peer's (base), the local RTP (base + 2) and RTCP (base + 3).
      for (const int port : {rtp - 2, rtp + 0, rtp + 1}) {
        EXPECT_NO_THROW(UdpSocket(static_cast<std::uint16_t>(port)))
            << "call " << i << " port " << port;
      }
    }
  }
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    EXPECT_TRUE(st["calls"].empty());
    EXPECT_EQ(st["sip"]["free_media"], 12);
  }
}

TEST_F(GatewayCallsTest, PartnerLegsWithoutTheMarkerAreRefused) {
  start_sip();
  const NgKeys k{"refused-1", "f1", "t1"};
  auto refusal = [&](otpgate::gateway::Gateway& g, const std::string& datagram) {
    const auto reply = ng(g.ng_port(), datagram);
    EXPECT_EQ(text_of(reply, "result"), "error");
    return text_of(reply, "error-reason");
  };
  // An offer the proxy got on its external interface, in clear: refused.
  EXPECT_NE(refusal(*b_, kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0)),
                                  "9:directionl8:external8:internale"))
                .find("offer from the external interface without a=x-otp:sae-a"),
            std::string::npos);
  // An answer from the partner site without the marker (a gateway-less site, or a proxy
  // that routed around gateway B): refused, and nothing is built.
  ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0)))));
  EXPECT_NE(refusal(*a_, kamailio(cookie(), "answer", k, endpoint_sdp(endpoint_port(1))))
                .find("SDP from the partner site without a=x-otp:sae-b refused"),
            std::string::npos);
  json st = status(*a_);
  EXPECT_EQ(st["calls"][0]["state"], "offered");
  EXPECT_TRUE(st["calls"][0]["media"][0]["stream"].is_null());
  EXPECT_EQ(st["streams"].size(), 2u);
  // Marked for another SAE, or from an address that is not the peer gateway: refused.
  std::string marked = endpoint_sdp(endpoint_port(0)) + "a=x-otp:sae-x\r\na=x-otp-lane:0\r\n";
  EXPECT_NE(refusal(*b_, kamailio(cookie(), "offer", {"refused-2", "f2", ""}, marked))
                .find("a=x-otp names SAE \"sae-x\", not this gateway's peer \"sae-a\""),
            std::string::npos);
  marked = endpoint_sdp(endpoint_port(0), "sendrecv", "192.0.2.7") +
           "a=x-otp:sae-a\r\na=x-otp-lane:0\r\n";
  EXPECT_NE(refusal(*b_, kamailio(cookie(), "offer", {"refused-3", "f3", ""}, marked))
                .find("the partner's media address 192.0.2.7 is not peer.address 127.0.0.1"),
            std::string::npos);
  EXPECT_TRUE(status(*b_)["calls"].empty());
  EXPECT_EQ(status(*b_)["sip"]["free_media"], 12);
}

// A local leg naming the partner gateway's address (a misconfigured or hostile local
// device, an unmarked external offer) would have this gateway send the partner's media,
// decrypted, across to the partner site in clear: refused. Gateway A here has its peer on
// 127.0.0.2 and its own media address on 127.0.0.1 (which a one-host lab shares with the
// peer, and which stays allowed).
TEST_F(GatewayCallsTest, ALocalLegNamingThePartnerGatewayIsRefused) {
  sip_ = sip_block_port(base_);
  start([&](std::string& a, std::string&) {
    const std::string peer = "address = \"127.0.0.1\"";
    a.replace(a.find(peer), peer.size(), "address = \"127.0.0.2\"");
    a += "[sip]\nng_listen = \"127.0.0.1:0\"\nmedia_address = \"127.0.0.1\"\nport_min = " +
         std::to_string(sip_) + "\nport_max = " + std::to_string(sip_ + 59) + "\n";
  });
  const auto refused =
      ng(a_->ng_port(), kamailio(cookie(), "offer", {"to-peer-1", "f1", ""},
                                 endpoint_sdp(endpoint_port(0), "sendrecv", "127.0.0.2")));
  EXPECT_EQ(text_of(refused, "result"), "error");
  EXPECT_NE(text_of(refused, "error-reason")
                .find("the local endpoint's address 127.0.0.2 is the partner gateway's "
                      "(peer.address 127.0.0.2): decrypted media would cross to the partner "
                      "site in clear"),
            std::string::npos)
      << text_of(refused, "error-reason");
  EXPECT_TRUE(status(*a_)["calls"].empty());
  // The same address spelled as IPv4-mapped IPv6, or hidden behind a host name: refused.
  const auto mapped =
      ng(a_->ng_port(), kamailio(cookie(), "offer", {"to-peer-2", "f1", ""},
                                 endpoint_sdp(endpoint_port(0), "sendrecv", "::ffff:127.0.0.2")));
  EXPECT_NE(text_of(mapped, "error-reason").find("is the partner gateway's"), std::string::npos)
      << text_of(mapped, "error-reason");
  const auto named =
      ng(a_->ng_port(), kamailio(cookie(), "offer", {"to-peer-3", "f1", ""},
                                 endpoint_sdp(endpoint_port(0), "sendrecv", "localhost")));
  EXPECT_NE(text_of(named, "error-reason").find("c= localhost is not an IP address"),
            std::string::npos)
      << text_of(named, "error-reason");
  EXPECT_TRUE(status(*a_)["calls"].empty());
  // The same offer from a local endpoint: taken.
  EXPECT_FALSE(ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", {"local-1", "f2", ""},
                                                 endpoint_sdp(endpoint_port(0)))))
                   .empty());
}

TEST_F(GatewayCallsTest, ReInviteHoldsAndResumesOnTheSamePortsAndPadStream) {
  start_sip();
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1)), moved_caller(endpoint_port(4));
  const NgKeys k{"reinvite-1", "f1", "t1"};
  const Placed first = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  const std::uint16_t a_local = media_port(first.to_caller), b_local = media_port(first.to_callee);
  std::vector<Bytes> sent;
  EXPECT_EQ(send(caller, a_local, callee, 50, 1, sent, random_), sent);
  const std::string stream = status(*a_)["calls"][0]["media"][0]["stream"];

  // Hold (caller sendonly, callee recvonly): the same ports on every leg, no new media.
  const Placed hold = place(k, endpoint_sdp(endpoint_port(0), "sendonly"),
                            endpoint_sdp(endpoint_port(1), "recvonly"));
  EXPECT_EQ(media_port(hold.to_b), media_port(first.to_b));
  EXPECT_EQ(media_port(hold.to_callee), b_local);
  EXPECT_EQ(media_port(hold.to_a), media_port(first.to_a));
  EXPECT_EQ(media_port(hold.to_caller), a_local);
  EXPECT_NE(hold.to_callee.find("a=sendonly"), std::string::npos);
  // Resume from another port of the caller's: media follows it, on the same stream.
  place(k, endpoint_sdp(endpoint_port(4)), endpoint_sdp(endpoint_port(1)));
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    ASSERT_EQ(st["calls"].size(), 1u);
    EXPECT_EQ(st["calls"][0]["media"].size(), 1u);
    EXPECT_EQ(st["streams"].size(), 3u);
    EXPECT_EQ(st["sip"]["free_media"], 11);
  }
  EXPECT_EQ(status(*a_)["calls"][0]["media"][0]["stream"], stream);
  sent.clear();
  EXPECT_EQ(send(callee, b_local, moved_caller, 50, 2, sent, random_), sent);
  sent.clear();
  EXPECT_EQ(send(moved_caller, a_local, callee, 50, 3, sent, random_), sent);
  hang_up(k);
}

TEST_F(GatewayCallsTest, TenConcurrentCallsKeepTheirMediaApart) {
  start_sip();
  std::vector<RunningCall> calls;
  for (int i = 0; i < 10; ++i) calls.push_back(place_call("call-" + std::to_string(i), i));
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    EXPECT_EQ(st["calls"].size(), 10u);
    EXPECT_EQ(st["sip"]["free_media"], 2);
  }
  for (int i = 0; i < 10; ++i) {
    RunningCall& c = calls[i];
    std::vector<Bytes> there, back;
    EXPECT_EQ(send(*c.caller, c.a_local, *c.callee, 30, 100 + i, there, random_), there) << i;
    EXPECT_EQ(send(*c.callee, c.b_local, *c.caller, 30, 200 + i, back, random_), back) << i;
  }
  for (const auto& c : calls) hang_up(c.k);
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    EXPECT_TRUE(st["calls"].empty());
    EXPECT_EQ(st["sip"]["free_media"], 12);
    EXPECT_EQ(st["sip"]["free_port_units"], 15);
  }
}

// The sockets of all call media share a few media threads (call_media_pump.hpp). A flood of forged
// datagrams (random bytes, and plain RTP) on one call's OTP ports at both gateways delivers nothing
// to that call's endpoints and takes nothing from the other calls on the same threads: each of
// their packets arrives, byte for byte; the flooded call still carries its own media afterwards.
TEST_F(GatewayCallsTest, AFloodOnOneCallsOtpPortsLeavesEveryCallsMediaWhole) {
  start_sip();
  std::vector<RunningCall> calls;  // two per media thread, or more, whatever the cores
  for (int i = 0; i < 4; ++i) calls.push_back(place_call("flood-" + std::to_string(i), i));
  std::atomic<bool> flooding{true};
  std::atomic<std::uint64_t> flooded{0};
  std::thread attacker([&] {
    const UdpSocket from;
    std::mt19937 random(99);
    for (std::uint16_t seq = 0; flooding; ++seq) {
      for (int i = 0; i < 32; ++i) {
        Bytes forged = random_rtp(seq, 0xbad, random);  // plain RTP ...
        if (i % 2 == 1) {
          for (auto& b : forged) b = static_cast<std::uint8_t>(random());  // ... or noise
        }
        from.send_to(calls[0].a_otp, forged);
        from.send_to(calls[0].b_otp, forged);
        flooded += 2;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  for (int i = 1; i < 4; ++i) {
    RunningCall& c = calls[i];
    std::vector<Bytes> there, back;
    EXPECT_EQ(send(*c.caller, c.a_local, *c.callee, 100, 300 + i, there, random_), there) << i;
    EXPECT_EQ(send(*c.callee, c.b_local, *c.caller, 100, 400 + i, back, random_), back) << i;
  }
  flooding = false;
  attacker.join();
  EXPECT_GT(flooded.load(), 1000u);
  // Nothing forged reached the flooded call's endpoints.
  EXPECT_FALSE(calls[0].callee->receive(200).has_value());
  EXPECT_FALSE(calls[0].caller->receive(200).has_value());
  // The gateways saw the flood (packets in from the peer) and refused all of it.
  int seen = 0;
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);  // held: a range over a temporary's member would dangle
    for (const json& call : st["calls"]) {
      if (call["call_id"] != "flood-0") continue;
      ++seen;
      EXPECT_GT(call["media"][0]["packets"]["from_peer"].get<std::uint64_t>(), 100u);
      EXPECT_EQ(call["media"][0]["packets"]["to_local"], 0);
    }
  }
  EXPECT_EQ(seen, 2);
  RunningCall& c = calls[0];
  std::vector<Bytes> there, back;
  EXPECT_EQ(send(*c.caller, c.a_local, *c.callee, 30, 500, there, random_), there);
  EXPECT_EQ(send(*c.callee, c.b_local, *c.caller, 30, 501, back, random_), back);
  for (const auto& r : calls) hang_up(r.k);
}

// Every call shares a few media threads. A call whose first key is late (its lane was used
// before, so the lane's refill thread must restart it, and that thread is stuck in a KME
// request that does not return) has its packets held by its encryptor, not by the thread:
// the calls already running on the same threads lose nothing, and are delivered while the
// late calls still wait (with an encryptor that waited in the thread, they would come
// only after). A to B only: B's receiver of a B-to-A stream may need the hung KME itself.
TEST_F(GatewayCallsTest, ACallWaitingForItsFirstKeyHoldsUpNoOtherCall) {
  constexpr int kLanes = 8;
  start_sip(kLanes);
  const std::size_t loops = threads_named("otp-media") / 2;  // per gateway, both in this process
  ASSERT_GE(loops, 1u);
  ASSERT_LE(2 * loops, static_cast<std::size_t>(kLanes));
  int pairs = 0;
  auto call = [&](const std::string& id) { return place_call(id, pairs++); };
  // "whole" when every packet arrived, in order; the counts otherwise (no byte dumps).
  auto delivered = [&](RunningCall& c, int count, std::uint32_t ssrc) {
    std::vector<Bytes> sent;
    const auto got = send(*c.caller, c.a_local, *c.callee, count, ssrc, sent, random_);
    return got == sent ? std::string("whole")
                       : std::to_string(got.size()) + " of " + std::to_string(sent.size());
  };
  std::vector<RunningCall> steady, used, late;
  for (std::size_t i = 0; i < loops; ++i) {  // one on every thread
    steady.push_back(call("steady-" + std::to_string(i)));
    EXPECT_EQ(delivered(steady.back(), 50, 100), "whole");
  }
  for (std::size_t i = loops; i < kLanes; ++i) {  // every other lane carries a call once
    used.push_back(call("used-" + std::to_string(i)));
    EXPECT_EQ(delivered(used.back(), 10, 150), "whole");
  }
  for (const RunningCall& c : used) hang_up(c.k);
  auto faults = sim_->faults();
  faults.hang = true;  // the KME takes requests and never answers them
  sim_->set_faults(faults);
  // A's sender asks the KME for its status every 500 ms when it needs nothing else; its
  // request then hangs for the client's 4 s timeout.
  ASSERT_TRUE(otpgate::testing::eventually([&] { return sim_->stats().requests_hung > 0; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  for (std::size_t i = 0; i < loops; ++i) {  // one more on every thread, on a used lane
    late.push_back(call("late-" + std::to_string(i)));
    for (int n = 0; n < 20; ++n) {
      late.back().caller->send_to(late.back().a_local,
                                  random_rtp(static_cast<std::uint16_t>(n), 7, random_));
    }
  }
  for (std::size_t i = 0; i < loops; ++i) {
    EXPECT_EQ(delivered(steady[i], 100, static_cast<std::uint32_t>(200 + i)), "whole")
        << "steady call " << i << ", beside a call waiting for key on the same thread";
  }
  {
    const json st = status(*a_);  // held: a range over a temporary's member would dangle
    int waiting = 0;
    for (const json& c : st["calls"]) {
      if (!c["call_id"].get<std::string>().starts_with("late-")) continue;
      ++waiting;
      EXPECT_EQ(c["media"][0]["packets"]["from_local"], 20) << c.dump();
      EXPECT_EQ(c["media"][0]["packets"]["to_peer"], 0)
          << "a late call sent before the steady calls were delivered";
    }
    EXPECT_EQ(waiting, static_cast<int>(loops));
  }
  faults.hang = false;  // the KME answers again: the late calls' media flows
  sim_->set_faults(faults);
  for (const RunningCall& c : late) {
    EXPECT_TRUE(otpgate::testing::eventually([&] {
      c.caller->send_to(c.a_local, random_rtp(1, 9, random_));
      return c.callee->receive(100).has_value();
    })) << c.k.call_id
        << ": no media once the KME answered";
  }
  for (const auto* group : {&steady, &late})
    for (const RunningCall& c : *group) hang_up(c.k);
}

TEST_F(GatewayCallsTest, MediaTimeoutEndsACallThatWasNeverAnswered) {
  start_sip(12, 5);
  const NgKeys k{"timeout-1", "f1", ""};
  ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0)))));
  const auto offered = std::chrono::steady_clock::now();
  EXPECT_EQ(status(*a_)["sip"]["free_media"], 11);
  while (!status(*a_)["calls"].empty() &&
         std::chrono::steady_clock::now() - offered < std::chrono::seconds(15)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_TRUE(status(*a_)["calls"].empty());
  EXPECT_GE(std::chrono::steady_clock::now() - offered, std::chrono::seconds(4));
  EXPECT_EQ(status(*a_)["sip"]["free_media"], 12);
}

TEST_F(GatewayCallsTest, ALaneGoesOnFromCallToCallWithoutReusingPad) {
  start_sip(1);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  std::uint64_t offset_after_first = 0;
  for (int round = 0; round < 2; ++round) {
    const NgKeys k{"lane-" + std::to_string(round), "f", "t"};
    const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
    ASSERT_NE(p.to_b.find("a=x-otp-lane:0"), std::string::npos);  // the one lane, again
    std::vector<Bytes> there, back;
    EXPECT_EQ(send(caller, media_port(p.to_caller), callee, 40, 10 + round, there, random_), there)
        << "round " << round;
    EXPECT_EQ(send(callee, media_port(p.to_callee), caller, 40, 20 + round, back, random_), back)
        << "round " << round;
    // The lane's pad stream goes on: the second call starts above what the first used.
    const json st = status(*a_);
    const std::string stream = st["calls"][0]["media"][0]["stream"];
    for (const auto& s : st["streams"]) {
      if (s["name"] != stream) continue;
      const std::uint64_t offset = s["key_supply"]["send"]["bytes_consumed"];
      if (round == 1) {
        EXPECT_GT(offset, offset_after_first);
      }
      offset_after_first = offset;
    }
    hang_up(k);
  }
  // Both calls refused no key as a replay and lost none.
  for (auto* g : {a_.get(), b_.get()}) {
    for (const auto& s : status(*g)["streams"]) EXPECT_EQ(s["receive"]["auth-failures"], 0);
  }
}

// A sender announces pad ahead of use (announce_lead_ms, at least a ring's worth), so when
// a call ends, most of what its lane holds was announced to that call's receiver, which is
// gone. The next call on the lane must not build on it: its receiver never saw those
// announcements, nor can it verify any announcement whose epoch key lies in them. Seen in
// sip_scaleout_kamailio_sets: a call on a lane handed on from a busy call had no media
// until the sender reached a resync run (25 s of audio). Here call 1 runs at a rate that
// makes its sender announce past the next epoch boundary, then call 2 takes its lane.
TEST_F(GatewayCallsTest, ACallOnALaneAnEarlierCallAnnouncedOnHasMediaAtOnce) {
  start_sip(1);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  std::uint64_t flushed_before = 0;
  for (int round = 0; round < 3; ++round) {
    const NgKeys k{"handed-on-" + std::to_string(round), "f", "t"};
    const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
    ASSERT_NE(p.to_b.find("a=x-otp-lane:0"), std::string::npos);  // the one lane, again
    // Round 0 runs long and fast (about 1 MB of pad at 350 kB/s, several epochs, refills
    // within the resync interval announced a second ahead); the later rounds must get every
    // packet through at once, both ways.
    const int count = round == 0 ? 6000 : 300;
    std::vector<Bytes> there, back;
    const auto at_callee =
        send(caller, media_port(p.to_caller), callee, count, 30 + round, there, random_);
    const auto at_caller =
        send(callee, media_port(p.to_callee), caller, count, 40 + round, back, random_);
    // Every packet arrives, byte for byte and in order, but for a few at the very start
    // that waited for their key longer than the receiver's key-wait (500 ms): a KME that
    // answers the receiving site slowly (a loaded machine) costs those, counted as
    // drops-no-key where they were dropped. A lane the receiver cannot follow would lose
    // them all, or every packet up to the next resync.
    for (const auto& [gateway, sent, got, direction] :
         {std::tuple{b_.get(), &there, &at_callee, "A to B"},
          std::tuple{a_.get(), &back, &at_caller, "B to A"}}) {
      const auto missing = left_out_in_order(*sent, *got);
      ASSERT_TRUE(missing) << direction << ", round " << round
                           << ": a packet arrived changed, twice or out of order";
      EXPECT_LE(*missing, sent->size() / 20) << direction << ", round " << round;
      const json received = call_media_receive(*gateway);
      EXPECT_EQ(received["drops-no-key"], *missing) << direction << ", round " << round;
      for (const char* counter : {"auth-failures", "replays", "window-overruns"})
        EXPECT_EQ(received[counter], 0) << counter << ", " << direction << ", round " << round;
    }
    const json st = status(*a_);
    const std::string stream = st["calls"][0]["media"][0]["stream"];
    for (const auto& s : st["streams"]) {
      if (s["name"] != stream) continue;
      // What call 1's receiver was told about and call 2 did not use is wiped, never sent.
      const std::uint64_t flushed = s["key_supply"]["send"]["bytes_flushed"];
      if (round > 0) {
        EXPECT_GT(flushed, flushed_before) << "round " << round;
      }
      flushed_before = flushed;
    }
    hang_up(k);
  }
}

TEST(GatewayCallsConfig, CheckConfigFindsTheNgPortTaken) {
  const std::string pki = otpgate::testing::pki_dir().string();
  const auto port = static_cast<std::uint16_t>(base_port() + 7);
  UdpSocket taken(port);
  const std::string text =
      "[site]\nname = \"a\"\nsae_id = \"sae-a\"\nstate_dir = \"/tmp\"\n[kme]\nurl = "
      "\"https://127.0.0.1:1\"\ntls_cert = \"" +
      pki + "/sae-a.crt\"\ntls_key = \"" + pki + "/sae-a.key\"\ntls_ca = \"" + pki +
      "/ca.crt\"\n[peer]\nsae_id = \"sae-b\"\naddress = \"127.0.0.1\"\n[sip]\nng_listen = "
      "\"127.0.0.1:" +
      std::to_string(port) +
      "\"\nmedia_address = \"127.0.0.1\"\nport_min = 30000\nport_max = 30031\n";
  const auto checks =
      otpgate::gateway::check_offline(otpgate::gateway::parse_config(text, "a.toml"));
  std::string problems;
  for (const auto& p : checks.problems()) problems += p + "\n";
  EXPECT_NE(problems.find("sip.ng_listen"), std::string::npos) << problems;
}

// The partner's name is looked up once, at start (a call's setup runs on the ng thread
// and must never wait for DNS); a name that does not resolve stops the start with one line.
TEST(GatewayCallsConfig, APeerNameThatDoesNotResolveStopsTheStart) {
  const std::string pki = otpgate::testing::pki_dir().string();
  otpgate::testing::TestDir dir;
  const std::string text =
      "[site]\nname = \"a\"\nsae_id = \"sae-a\"\nstate_dir = \"" + dir.path.string() +
      "\"\n[kme]\nurl = \"https://127.0.0.1:1\"\ntls_cert = \"" + pki +
      "/sae-a.crt\"\ntls_key = \"" + pki + "/sae-a.key\"\ntls_ca = \"" + pki +
      "/ca.crt\"\n[peer]\nsae_id = \"sae-b\"\naddress = \"no-such-gateway.invalid\"\n[sip]\n"
      "ng_listen = \"127.0.0.1:0\"\nmedia_address = \"127.0.0.1\"\nport_min = 30000\n"
      "port_max = 30031\n";
  otpgate::gateway::Gateway gateway(otpgate::gateway::parse_config(text, "a.toml"));
  try {
    gateway.start();
    ADD_FAILURE() << "started with a peer name that does not resolve";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("peer.address \"no-such-gateway.invalid\" does not "
                                         "resolve"),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("give an IP address"), std::string::npos) << e.what();
  }
}

TEST_F(GatewayCallsTest, ReInviteAddsVideoAndContentIsNotRelayed) {
  start_sip();
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  UdpSocket caller_video(endpoint_port(4)), callee_video(endpoint_port(5));
  const NgKeys k{"add-video-1", "f1", "t1"};
  place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  // The re-INVITE adds video (with its b=AS and codec lines) and a BFCP content channel.
  auto with_video = [&](int audio, int video) {
    return endpoint_sdp(endpoint_port(audio)) + "m=video " + std::to_string(endpoint_port(video)) +
           " RTP/AVP 100\r\nb=AS:1500\r\na=rtpmap:100 VP8/90000\r\na=sendrecv\r\n"
           "m=application 5070 TCP/BFCP *\r\na=floorctrl:c-s\r\n";
  };
  const Placed p = place(k, with_video(0, 4), with_video(1, 5));
  ASSERT_FALSE(p.to_caller.empty());
  const sdp::Session to_b = sdp::parse(p.to_b);
  ASSERT_EQ(to_b.media.size(), 3u);
  EXPECT_EQ(sdp::attributes(to_b.media[1], "x-otp-lane"), std::vector<std::string>{"1"});
  EXPECT_NE(p.to_b.find("b=AS:1500"), std::string::npos);
  EXPECT_NE(p.to_b.find("a=rtpmap:100 VP8/90000"), std::string::npos);
  for (const auto* s : {&p.to_b, &p.to_callee, &p.to_a, &p.to_caller})
    EXPECT_EQ(sdp::parse(*s).media[2].port, 0) << *s;  // BFCP: not relayed
  const sdp::Session to_caller = sdp::parse(p.to_caller), to_callee = sdp::parse(p.to_callee);
  std::vector<Bytes> there, back;
  EXPECT_EQ(send(caller_video, to_caller.media[1].port, callee_video, 40, 7, there, random_),
            there);
  EXPECT_EQ(send(callee_video, to_callee.media[1].port, caller_video, 40, 8, back, random_), back);
  there.clear();
  EXPECT_EQ(send(caller, to_caller.media[0].port, callee, 20, 9, there, random_), there);
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    ASSERT_EQ(st["calls"][0]["media"].size(), 2u);
    EXPECT_EQ(st["calls"][0]["media"][1]["type"], "video");
    EXPECT_EQ(st["sip"]["free_media"], 10);
  }
  // query answers in rtpengine's shape, with the call's media.
  const auto q = ng(a_->ng_port(), kamailio(cookie(), "query", k));
  EXPECT_EQ(text_of(q, "result"), "ok");
  EXPECT_TRUE(q.contains("tags"));
  hang_up(k);
  EXPECT_EQ(status(*a_)["sip"]["free_media"], 12);
}

TEST(GatewayCallsConfig, TheSipExampleLoads) {
  std::ifstream in(std::string(OTPGATE_SOURCE_DIR) + "/gateway/examples/site-a-sip.toml");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  ASSERT_FALSE(text.empty());
  // Its certificate paths are the installed ones; the test PKI stands in for them.
  const std::string pki = otpgate::testing::pki_dir().string();
  for (const auto& [from, to] : {std::pair{"/etc/otpgate/sae-a.crt", "/sae-a.crt"},
                                 std::pair{"/etc/otpgate/sae-a.key", "/sae-a.key"},
                                 std::pair{"/etc/otpgate/kme-ca.crt", "/ca.crt"}}) {
    const std::string path = from;
    text.replace(text.find(path), path.size(), pki + to);
  }
  const auto config = otpgate::gateway::parse_config(text, "site-a-sip.toml");
  ASSERT_TRUE(config.sip);
  EXPECT_TRUE(config.streams.empty());
  EXPECT_EQ(config.sip->ng_listen.port, 22222);
  EXPECT_EQ(config.sip->max_media, 8u);
}

TEST_F(GatewayCallsTest, OffersBeyondTheKeyRateAreRefusedAndAnEndedCallFreesItsShare) {
  // 200 kbit/s of key: Opus audio is expected to take 64 kbit/s of payload plus 16 bytes of
  // tag key per packet at 50 packets/s, 70.4 kbit/s of pad; two fit, a third does not, nor
  // does a VP8 video (1.5 Mbit/s). Key in store is not counted here (horizon 0).
  start_sip(12, 60, "key_rate_bits_per_s = 200000\nadmission_horizon_s = 0\n");
  auto offer = [&](const std::string& id, const std::string& body) {
    return ng(a_->ng_port(), kamailio(cookie(), "offer", {id, "f", ""}, body));
  };
  ok_sdp(offer("budget-1", endpoint_sdp(endpoint_port(0))));
  ok_sdp(offer("budget-2", endpoint_sdp(endpoint_port(2))));
  auto third = offer("budget-3", endpoint_sdp(endpoint_port(4)));
  EXPECT_EQ(text_of(third, "result"), "error");
  EXPECT_EQ(text_of(third, "error-reason"),
            "key budget: this call's media need 70 kbit/s of pad, 59 kbit/s are free; 2 call "
            "media running take 141 kbit/s and 2 static streams 0 kbit/s (measured), of a budget "
            "of 200 kbit/s: the key rate 200 kbit/s (sip.key_rate_bits_per_s); key in store not "
            "counted (sip.admission_horizon_s = 0) (sip.over_budget = \"refuse\")");
  const std::string video =
      "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 "
      "0\r\nm=video 7000 RTP/AVP 100\r\na=rtpmap:100 VP8/90000\r\n";
  EXPECT_NE(text_of(offer("budget-4", video), "error-reason").find("key budget"),
            std::string::npos);
  EXPECT_EQ(status(*a_)["sip"]["free_media"], 10);  // nothing held for the refused ones
  // An ended call gives its share back.
  const auto ended = ng(a_->ng_port(), kamailio(cookie(), "delete", {"budget-1", "f", ""}));
  EXPECT_EQ(text_of(ended, "result"), "ok");
  ok_sdp(offer("budget-3", endpoint_sdp(endpoint_port(4))));
}

// --- Key-aware admission: the arithmetic (gateway/src/admission.hpp) --------------------

namespace {

namespace admission = otpgate::gateway::admission;

admission::Input link_of(double key_rate_bits_per_s, admission::OverBudget policy) {
  admission::Input in;
  in.key_rate_bytes_per_s = key_rate_bits_per_s / 8;
  in.policy = policy;
  return in;
}

admission::Want opus(std::size_t index) {
  return {index, "audio", 64'000, 6'000};
}
admission::Want vp8(std::size_t index) {
  return {index, "video", 1'500'000, 128'000};
}

}  // namespace

TEST(GatewayAdmission, PadPerMediaAndItsInverse) {
  // Opus at 64 kbit/s: 8000 B/s + 16 B x 50 packets/s; VP8 at 1.5 Mbit/s: 187500 B/s in
  // 156.25 packets of 1200 B, 16 B each.
  EXPECT_DOUBLE_EQ(admission::pad_bytes_per_s(64'000), 8'800);
  EXPECT_DOUBLE_EQ(admission::pad_bytes_per_s(1'500'000), 190'000);
  EXPECT_DOUBLE_EQ(admission::pad_bytes_per_s(0), 0);
  for (double bits : {8'000.0, 64'000.0, 480'000.0, 917'368.0, 1'500'000.0})
    EXPECT_NEAR(admission::payload_bits_per_s(admission::pad_bytes_per_s(bits)), bits, 1e-6);
  EXPECT_EQ(admission::payload_bits_per_s(800), 0);  // only the tag keys of 50 packets
  // AES: one 44-byte master key per 1024 packets.
  EXPECT_DOUBLE_EQ(admission::aes_pad_bytes_per_s(64'000, 1024), 44.0 * 50 / 1024);
}

TEST(GatewayAdmission, FloorsComeFromTheCodecsOffered) {
  auto media = [](const std::string& text) {
    return sdp::parse("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n" +
                      text)
        .media.at(0);
  };
  EXPECT_EQ(admission::floor_bits_per_s(media("m=audio 7000 RTP/AVP 96 0 101\r\na=rtpmap:96 "
                                              "opus/48000/2\r\na=rtpmap:101 "
                                              "telephone-event/8000\r\n")),
            6'000);
  EXPECT_EQ(admission::floor_bits_per_s(media("m=audio 7000 RTP/AVP 0 8\r\n")), 64'000);
  EXPECT_EQ(admission::floor_bits_per_s(media("m=audio 7000 RTP/AVP 18\r\n")), 8'000);
  EXPECT_EQ(admission::floor_bits_per_s(
                media("m=video 7000 RTP/AVP 100\r\nb=AS:1500\r\na=rtpmap:100 VP8/90000\r\n")),
            128'000);
  // Never above what the media asks for.
  EXPECT_EQ(admission::floor_bits_per_s(
                media("m=video 7000 RTP/AVP 100\r\nb=TIAS:64000\r\na=rtpmap:100 VP8/90000\r\n")),
            64'000);
}

TEST(GatewayAdmission, RunningCallsStaticStreamsAndTheStoreMakeTheBudget) {
  auto in = link_of(200'000, admission::OverBudget::refuse);  // 25000 B/s
  in.wanted = {opus(0)};
  in.calls_bytes_per_s = 2 * 8'800;
  in.calls_running = 2;
  EXPECT_FALSE(admission::decide(in).admitted);  // 3 x 8800 > 25000
  in.calls_bytes_per_s = 8'800;
  in.calls_running = 1;
  EXPECT_TRUE(admission::decide(in).admitted);
  // A static stream measured at 10 kB/s of pad leaves 6200 B/s: Opus no longer fits.
  in.static_bytes_per_s = 10'000;
  in.static_streams = 1;
  const auto refused = admission::decide(in);
  EXPECT_FALSE(refused.admitted);
  EXPECT_EQ(refused.reason,
            "key budget: this call's media need 70 kbit/s of pad, 50 kbit/s are free; 1 call "
            "media running take 70 kbit/s and 1 static streams 80 kbit/s (measured), of a budget "
            "of 200 kbit/s: the key rate 200 kbit/s (sip.key_rate_bits_per_s); key in store not "
            "counted (sip.admission_horizon_s = 0) (sip.over_budget = \"refuse\")");
  // VP8 video (190000 B/s) beyond the rate: 128 MiB held covers it for 60 s (+2.2 MB/s),
  // not for a 65-minute panel (+34415 B/s: budget 59415 B/s).
  in = link_of(200'000, admission::OverBudget::refuse);
  in.wanted = {vp8(0)};
  in.held_bytes = 128.0 * (1 << 20);
  in.horizon_s = 60;
  EXPECT_TRUE(admission::decide(in).admitted);
  in.horizon_s = 3900;
  const auto panel = admission::decide(in);
  EXPECT_FALSE(panel.admitted);
  EXPECT_NEAR(panel.budget_bytes_per_s, 25'000 + 134'217'728.0 / 3900, 1e-6);
  EXPECT_NE(panel.reason.find("+ 128 MiB of key held over 3900 s (sip.admission_horizon_s)"),
            std::string::npos)
      << panel.reason;
  in.horizon_s = 0;  // the store not counted
  EXPECT_DOUBLE_EQ(admission::decide(in).budget_bytes_per_s, 25'000);
}

TEST(GatewayAdmission, CapGivesAudioItsRateAndVideoTheRest) {
  // 1 Mbit/s = 125000 B/s: Opus 8800, VP8 the remaining 116200 B/s of pad, which carries
  // 116200 / (1 + 16/1200) B/s = 917368 bit/s of payload.
  auto in = link_of(1'000'000, admission::OverBudget::cap);
  in.wanted = {vp8(0), opus(1)};
  const auto d = admission::decide(in);
  ASSERT_TRUE(d.admitted) << d.reason;
  EXPECT_EQ(d.media[0].tias, 917'368u);
  EXPECT_FALSE(d.media[1].tias);
  EXPECT_LE(d.media[0].pad_bytes_per_s + d.media[1].pad_bytes_per_s, 125'000);
  // Two videos share what audio leaves, from the smaller want: a 200 kbit/s content share
  // keeps its rate, the main video gets the rest.
  in.wanted = {vp8(0), opus(1), {2, "video", 200'000, 128'000}};
  const auto shared = admission::decide(in);
  ASSERT_TRUE(shared.admitted);
  EXPECT_FALSE(shared.media[2].tias);
  EXPECT_EQ(shared.media[0].tias,
            static_cast<std::uint64_t>(admission::payload_bits_per_s(125'000 - 8'800 - 25'800)));
  // Not even the floor: refused, naming the media.
  in.wanted = {vp8(0), opus(1)};
  in.calls_bytes_per_s = 125'000 - 8'800 - 10'000;  // 10000 B/s left for video: 74 kbit/s
  const auto floor = admission::decide(in);
  EXPECT_FALSE(floor.admitted);
  EXPECT_NE(floor.reason.find("media 0 (video) would get 74 kbit/s, below its floor of 128 kbit/s"),
            std::string::npos)
      << floor.reason;
}

TEST(GatewayAdmission, AesTakesTheMediaThatDoNotFit) {
  auto in = link_of(200'000, admission::OverBudget::aes);
  in.wanted = {vp8(0), opus(1)};
  const auto d = admission::decide(in);
  ASSERT_TRUE(d.admitted);
  EXPECT_TRUE(d.media[0].aes);
  EXPECT_FALSE(d.media[1].aes);  // audio first, and it fits
  EXPECT_DOUBLE_EQ(d.media[1].pad_bytes_per_s, 8'800);
  EXPECT_LT(d.media[0].pad_bytes_per_s, 10);  // 44 B per 1024 packets
  in.calls_bytes_per_s = 25'000;              // nothing left: both in AES, never refused
  const auto full = admission::decide(in);
  EXPECT_TRUE(full.admitted);
  EXPECT_TRUE(full.media[0].aes && full.media[1].aes);
}

// --- Key-aware admission through both gateways ------------------------------------------

namespace {

// A room system's SDP: VP8 video (b=AS:1500) first, Opus audio second.
std::string video_call_sdp(std::uint16_t video_port, std::uint16_t audio_port) {
  return "v=0\r\no=- 4711 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video " +
         std::to_string(video_port) +
         " RTP/AVP 100\r\nb=AS:1500\r\na=rtpmap:100 VP8/90000\r\na=sendrecv\r\nm=audio " +
         std::to_string(audio_port) + " RTP/AVP 96\r\na=rtpmap:96 opus/48000/2\r\na=sendrecv\r\n";
}

std::vector<std::string> b_lines(const sdp::Media& m) {
  std::vector<std::string> out;
  for (const auto& l : m.lines) {
    if (l.type == 'b') out.push_back(l.value);
  }
  return out;
}

json stream_named(const json& status, const std::string& name) {
  for (const auto& s : status["streams"]) {
    if (s["name"] == name) return s;
  }
  return nullptr;
}

}  // namespace

TEST_F(GatewayCallsTest, OverBudgetCapWritesTiasTowardsTheEndpointsAndMediaStillCross) {
  // 1 Mbit/s of key, the store not counted: Opus keeps its rate, the VP8 video is capped to
  // 917368 bit/s (GatewayAdmission.CapGivesAudioItsRateAndVideoTheRest), by each gateway
  // in the SDP towards its own endpoint (who sends what that gateway encrypts).
  start_sip(12, 60,
            "key_rate_bits_per_s = 1000000\nadmission_horizon_s = 0\nover_budget = \"cap\"\n");
  UdpSocket caller_video(endpoint_port(0)), caller_audio(endpoint_port(1));
  UdpSocket callee_video(endpoint_port(2)), callee_audio(endpoint_port(3));
  const NgKeys k{"cap-1", "f1", "t1"};
  const Placed p = place(k, video_call_sdp(endpoint_port(0), endpoint_port(1)),
                         video_call_sdp(endpoint_port(2), endpoint_port(3)));
  ASSERT_FALSE(p.to_caller.empty());
  const std::vector<std::string> capped{"AS:917", "TIAS:917368"};
  for (const auto* s : {&p.to_callee, &p.to_caller}) {
    const sdp::Session session = sdp::parse(*s);
    EXPECT_EQ(b_lines(session.media[0]), capped) << *s;
    EXPECT_TRUE(b_lines(session.media[1]).empty()) << *s;  // audio fits at its rate
    // b= before the attributes, as RFC 4566 orders them.
    EXPECT_EQ(session.media[0].lines.at(0).type, 'b') << *s;
  }
  // Between the sites the endpoints' own lines travel as they were.
  for (const auto* s : {&p.to_b, &p.to_a})
    EXPECT_EQ(b_lines(sdp::parse(*s).media[0]), std::vector<std::string>{"AS:1500"});
  for (auto* g : {a_.get(), b_.get()}) {
    const json media = status(*g)["calls"][0]["media"];
    EXPECT_EQ(media[0]["cap_bits_per_s"], 917368);
    EXPECT_EQ(media[0]["cipher"], "otp");
    EXPECT_TRUE(media[1]["cap_bits_per_s"].is_null());
  }
  const sdp::Session to_caller = sdp::parse(p.to_caller), to_callee = sdp::parse(p.to_callee);
  std::vector<Bytes> there, back, audio;
  EXPECT_EQ(send(caller_video, to_caller.media[0].port, callee_video, 60, 31, there, random_),
            there);
  EXPECT_EQ(send(callee_video, to_callee.media[0].port, caller_video, 60, 32, back, random_), back);
  EXPECT_EQ(send(caller_audio, to_caller.media[1].port, callee_audio, 30, 33, audio, random_),
            audio);
  // Nothing is left for a second call's audio, not even Opus's 6 kbit/s floor: refused.
  const auto second =
      ng(a_->ng_port(), kamailio(cookie(), "offer", {"cap-2", "f2", ""},
                                 video_call_sdp(endpoint_port(4), endpoint_port(5))));
  EXPECT_EQ(text_of(second, "result"), "error");
  EXPECT_NE(text_of(second, "error-reason")
                .find("media 1 (audio) would get 0 kbit/s, below its "
                      "floor of 6 kbit/s (sip.over_budget = \"cap\")"),
            std::string::npos)
      << text_of(second, "error-reason");
  hang_up(k);
}

TEST_F(GatewayCallsTest, OverBudgetAesRunsTheVideoInAesBothWaysAndAudioInOtp) {
  // 200 kbit/s of key: the audio fits (70.4 kbit/s of pad), the VP8 video does not, so it
  // runs in AES-256-GCM keyed from QKD, both ways (a=x-otp-cipher between the sites).
  start_sip(12, 60,
            "key_rate_bits_per_s = 200000\nadmission_horizon_s = 0\nover_budget = \"aes\"\n");
  UdpSocket caller_video(endpoint_port(0)), caller_audio(endpoint_port(1));
  UdpSocket callee_video(endpoint_port(2)), callee_audio(endpoint_port(3));
  Tap towards_a(endpoint_port(4)), towards_b(endpoint_port(5));  // the video's WAN hop
  const NgKeys k{"aes-1", "f1", "t1"};
  const Placed p =
      place(k, video_call_sdp(endpoint_port(0), endpoint_port(1)),
            video_call_sdp(endpoint_port(2), endpoint_port(3)), &towards_a, &towards_b);
  ASSERT_FALSE(p.to_caller.empty());
  for (const auto* s : {&p.to_b, &p.to_a}) {
    const sdp::Session session = sdp::parse(*s);
    EXPECT_EQ(sdp::attributes(session.media[0], "x-otp-cipher"),
              std::vector<std::string>{"aes-256-gcm"})
        << *s;
    EXPECT_TRUE(sdp::attributes(session.media[1], "x-otp-cipher").empty()) << *s;
  }
  for (const auto* s : {&p.to_callee, &p.to_caller})
    EXPECT_EQ(s->find("x-otp"), std::string::npos) << *s;

  const sdp::Session to_caller = sdp::parse(p.to_caller), to_callee = sdp::parse(p.to_callee);
  std::vector<Bytes> there, back, audio_there, audio_back;
  EXPECT_EQ(send(caller_video, to_caller.media[0].port, callee_video, 80, 41, there, random_),
            there);
  EXPECT_EQ(send(callee_video, to_callee.media[0].port, caller_video, 80, 42, back, random_), back);
  EXPECT_EQ(send(caller_audio, to_caller.media[1].port, callee_audio, 40, 43, audio_there, random_),
            audio_there);
  EXPECT_EQ(send(callee_audio, to_callee.media[1].port, caller_audio, 40, 44, audio_back, random_),
            audio_back);
  expect_only(Protection::aes, towards_b.seen(), there);
  expect_only(Protection::aes, towards_a.seen(), back);
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    const json media = st["calls"][0]["media"];
    EXPECT_EQ(media[0]["cipher"], "aes-256-gcm");
    EXPECT_EQ(media[1]["cipher"], "otp");
    const json video = stream_named(st, media[0]["stream"]);
    const json voice = stream_named(st, media[1]["stream"]);
    EXPECT_EQ(video["cipher"], "aes-256-gcm");
    EXPECT_GE(video["send"]["aes-packets"].get<std::uint64_t>(), 80u);
    EXPECT_GE(video["receive"]["aes-packets"].get<std::uint64_t>(), 80u);
    EXPECT_EQ(voice["cipher"], "otp");
    EXPECT_EQ(voice["send"]["aes-packets"], 0);
    EXPECT_GE(voice["send"]["pad-bytes-used"].get<std::uint64_t>(), 40u * 160u);
  }
  hang_up(k);
}

// Two media of one partner SDP naming the same key lane would put two decryptors on one
// pad stream: refused, nothing held.
TEST_F(GatewayCallsTest, APartnerNamingOneKeyLaneForTwoMediaIsRefused) {
  start_sip();
  const NgKeys k{"lane-twice", "f1", ""};
  std::string to_b =
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k,
                                        video_call_sdp(endpoint_port(0), endpoint_port(1)))));
  const auto second = to_b.find("a=x-otp-lane:1");
  ASSERT_NE(second, std::string::npos) << to_b;
  to_b.replace(second, 14, "a=x-otp-lane:0");
  const auto refused = ng(b_->ng_port(), kamailio(cookie(), "offer", k, to_b));
  EXPECT_EQ(text_of(refused, "result"), "error");
  EXPECT_EQ(text_of(refused, "error-reason"),
            "media 1 (audio): the partner names key lane 0 for two media (a=x-otp-lane)");
  EXPECT_TRUE(status(*b_)["calls"].empty());
  EXPECT_EQ(status(*b_)["sip"]["free_media"], 12);
}

TEST_F(GatewayCallsTest, AesFromThePartnerIsRefusedWhereThePolicyDoesNotAllowIt) {
  // Site A would run the video in AES; site B accepts calls in the one-time pad only.
  start_sip(12, 60,
            "key_rate_bits_per_s = 200000\nadmission_horizon_s = 0\nover_budget = \"aes\"\n",
            "key_rate_bits_per_s = 200000\nadmission_horizon_s = 0\n");
  const NgKeys k{"aes-mismatch", "f1", ""};
  const std::string to_b =
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k,
                                        video_call_sdp(endpoint_port(0), endpoint_port(1)))));
  ASSERT_NE(to_b.find("a=x-otp-cipher:aes-256-gcm"), std::string::npos) << to_b;
  const auto refused = ng(b_->ng_port(), kamailio(cookie(), "offer", k, to_b));
  EXPECT_EQ(text_of(refused, "result"), "error");
  EXPECT_EQ(
      text_of(refused, "error-reason"),
      "media 0 (video): the partner runs it in AES-256-GCM (a=x-otp-cipher), which this "
      "site does not allow for calls (sip.over_budget = \"refuse\", policy.cipher = \"otp\")");
  // A cipher that is neither: refused too.
  std::string odd = to_b;
  odd.replace(odd.find("aes-256-gcm"), 11, "null");
  EXPECT_NE(text_of(ng(b_->ng_port(), kamailio(cookie(), "offer", k, odd)), "error-reason")
                .find("a=x-otp-cipher must be given once, as otp or aes-256-gcm"),
            std::string::npos);
  EXPECT_TRUE(status(*b_)["calls"].empty());
}

TEST_F(GatewayCallsTest, KeyInStoreAdmitsAVideoBeyondTheRateOnlyWhenItCoversTheHorizon) {
  // 200 kbit/s of key and the simulator's store (128 MiB, shared by the link's SAEs, tens
  // of MiB of it reported to each): VP8 video (1.52 Mbit/s of pad, 165 kB/s above the
  // rate) fits for 60 s at gateway A (needs 10 MB held), not for a 65-minute panel at
  // gateway B (would need 643 MB).
  start_sip(12, 60, "key_rate_bits_per_s = 200000\nadmission_horizon_s = 60\n",
            "key_rate_bits_per_s = 200000\nadmission_horizon_s = 3900\n");
  // Both have read the KME's status for the link (16 MiB held by each at least).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  auto kme_bytes = [&](otpgate::gateway::Gateway& g) {
    const json st = status(g);  // held: the range below refers into it
    for (const auto& l : st["links"]) {
      if (l["direction"] == "send") return l["kme_bytes"].get<std::uint64_t>();
    }
    return std::uint64_t{0};
  };
  while ((kme_bytes(*a_) < (16u << 20) || kme_bytes(*b_) < (16u << 20)) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const std::string video =
      "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video " +
      std::to_string(endpoint_port(0)) + " RTP/AVP 100\r\na=rtpmap:100 VP8/90000\r\n";
  ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", {"store-a", "f", ""}, video)));
  const auto refused = ng(b_->ng_port(), kamailio(cookie(), "offer", {"store-b", "f", ""}, video));
  EXPECT_EQ(text_of(refused, "result"), "error");
  const std::string reason = text_of(refused, "error-reason");
  EXPECT_NE(reason.find("this call's media need 1520 kbit/s of pad"), std::string::npos) << reason;
  EXPECT_NE(reason.find("of key held over 3900 s (sip.admission_horizon_s)"), std::string::npos)
      << reason;
  // The budget named is the rate plus the key held spread over the panel, not the rate alone.
  std::smatch numbers;
  ASSERT_TRUE(
      std::regex_search(reason, numbers,
                        std::regex("of a budget of ([0-9]+) kbit/s: the key rate 200 kbit/s "
                                   "\\(sip.key_rate_bits_per_s\\) \\+ ([0-9]+) MiB of key held")))
      << reason;
  const double held_mib = std::stod(numbers[2]);
  EXPECT_GE(held_mib, 16) << reason;
  EXPECT_NEAR(std::stod(numbers[1]), 200 + held_mib * (1 << 20) * 8 / 3900 / 1000, 2) << reason;
}

TEST_F(GatewayCallsTest, StaticStreamsMeasuredPadCountsAgainstTheBudget) {
  // 300 kbit/s of key, the store not counted. An Opus offer (70.4 kbit/s) fits while the
  // static streams are idle; while site A's conference system sends about 1.6 Mbit/s on
  // its static audio-1 stream, the same offer is refused, the streams' measured pad named.
  start_sip(12, 60, "key_rate_bits_per_s = 300000\nadmission_horizon_s = 0\n");
  ok_sdp(ng(a_->ng_port(),
            kamailio(cookie(), "offer", {"idle", "f", ""}, endpoint_sdp(endpoint_port(0)))));
  EXPECT_EQ(text_of(ng(a_->ng_port(), kamailio(cookie(), "delete", {"idle", "f", ""})), "result"),
            "ok");
  std::atomic<bool> sending{true};
  std::thread conference([&] {
    UdpSocket system;
    for (std::uint16_t seq = 0; sending; ++seq) {
      system.send_to(base_ + 0, rtp(seq, 0x5ec, 111, 1000));  // audio-1's local_rtp_port
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(3));
  const auto busy = ng(a_->ng_port(), kamailio(cookie(), "offer", {"busy", "f", ""},
                                               endpoint_sdp(endpoint_port(0))));
  sending = false;
  conference.join();
  EXPECT_EQ(text_of(busy, "result"), "error");
  const std::string reason = text_of(busy, "error-reason");
  std::smatch measured;
  ASSERT_TRUE(std::regex_search(reason, measured,
                                std::regex("2 static streams ([0-9]+) kbit/s \\(measured\\)")))
      << reason;
  EXPECT_GT(std::stoi(measured[1]), 300) << reason;
  EXPECT_TRUE(status(*a_)["calls"].empty());
}

// A resent INVITE that the proxy ran through rtpengine_offer again (a new cookie, the same
// call-id, from-tag and SDP), and retransmitted 200 OKs run through rtpengine_answer again,
// in the orders two proxies can produce them, the duplicate offers also after the answers:
// each duplicate is answered with the SDP the first got, and the call keeps its ports,
// lanes and streams, its media crossing byte for byte.
TEST_F(GatewayCallsTest, RepeatedOffersAndAnswersLeaveARunningCallAsItIs) {
  start_sip(4);
  enum Step {
    offer_a,
    offer_b,
    answer_b,
    answer_a,
    dup_offer_a,
    dup_offer_b,
    dup_answer_b,
    dup_answer_a
  };
  struct Order {
    std::vector<Step> steps;
    bool video_refused = false;  // audio + video offered, the callee answers video with port 0
  };
  const std::vector<Order> orders{
      {{offer_a, dup_offer_a, offer_b, answer_b, answer_a}},
      {{offer_a, offer_b, dup_offer_a, dup_offer_b, answer_b, answer_a}},
      {{offer_a, offer_b, answer_b, dup_offer_a, answer_a, dup_answer_b}},
      {{offer_a, offer_b, answer_b, answer_a, dup_offer_a, dup_offer_b, dup_answer_b,
        dup_answer_a}},
      {{offer_a, offer_b, answer_b, answer_a, dup_offer_a, dup_offer_b, dup_answer_b}, true},
      {{offer_a, offer_b, answer_b, dup_offer_b, answer_a, dup_offer_a, dup_answer_a}, true},
  };
  for (std::size_t n = 0; n < orders.size(); ++n) {
    UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
    const NgKeys k{"dup-" + std::to_string(n), "from-" + std::to_string(n),
                   "to-" + std::to_string(n)};
    auto video = [&](int port) {
      return "m=video " + std::to_string(port) +
             " RTP/AVP 100\r\nb=AS:1500\r\na=rtpmap:100 VP8/90000\r\na=sendrecv\r\n";
    };
    std::string caller_sdp = endpoint_sdp(endpoint_port(0)),
                callee_sdp = endpoint_sdp(endpoint_port(1));
    if (orders[n].video_refused) {
      caller_sdp += video(endpoint_port(4));
      callee_sdp += video(0);
    }
    Placed p;
    json running_a, running_b;  // each gateway's call once both answers were through
    for (const Step step : orders[n].steps) {
      switch (step) {
        case offer_a:
          p.to_b = ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, caller_sdp)));
          break;
        case offer_b:
          p.to_callee = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k, p.to_b)));
          break;
        case answer_b:
          p.to_a = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k, callee_sdp)));
          break;
        case answer_a:
          p.to_caller = ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k, p.to_a)));
          running_a = status(*a_)["calls"];
          running_b = status(*b_)["calls"];
          break;
        case dup_offer_a:
          EXPECT_EQ(ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, caller_sdp))), p.to_b)
              << "order " << n;
          break;
        case dup_offer_b:
          EXPECT_EQ(ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k, p.to_b))), p.to_callee)
              << "order " << n;
          break;
        case dup_answer_b:
          EXPECT_EQ(ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k, callee_sdp))), p.to_a)
              << "order " << n;
          break;
        case dup_answer_a:
          EXPECT_EQ(ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k, p.to_a))), p.to_caller)
              << "order " << n;
          break;
      }
    }
    ASSERT_FALSE(p.to_caller.empty()) << "order " << n;
    // The same call at each gateway as right after the answers: media, ports, lanes, stream.
    for (auto* calls : {&running_a, &running_b}) {
      for (auto& c : *calls) c.erase("last_signal");
    }
    json now_a = status(*a_)["calls"], now_b = status(*b_)["calls"];
    for (auto* calls : {&now_a, &now_b}) {
      for (auto& c : *calls) {
        c.erase("last_signal");
        for (auto& m : c["media"]) m.erase("packets"), m.erase("key_used_bytes");
      }
    }
    for (auto* calls : {&running_a, &running_b}) {
      for (auto& c : *calls) {
        for (auto& m : c["media"]) m.erase("packets"), m.erase("key_used_bytes");
      }
    }
    EXPECT_EQ(now_a, running_a) << "order " << n;
    EXPECT_EQ(now_b, running_b) << "order " << n;
    ASSERT_EQ(now_a.size(), 1u);
    EXPECT_EQ(now_a[0]["media"].size(), 1u);
    for (auto* g : {a_.get(), b_.get()}) {
      const json st = status(*g);
      EXPECT_EQ(st["sip"]["free_media"], 3) << "order " << n;
      EXPECT_EQ(st["streams"].size(), 3u) << "order " << n;  // two static, one call
    }
    std::vector<Bytes> there, back;
    EXPECT_EQ(send(caller, media_port(p.to_caller), callee, 40, 300 + n, there, random_), there)
        << "order " << n;
    EXPECT_EQ(send(callee, media_port(p.to_callee), caller, 40, 400 + n, back, random_), back)
        << "order " << n;
    hang_up(k);
  }
}

// Early media, then the final answer: rtpengine_manage sends an answer for the 183 and
// again for the 200 OK, whose SDP a callee may have changed (its o= version bumped, here
// with a new codec order). The second answer updates the same call: ports, lanes and
// streams stay, the media cross byte for byte before and after it.
TEST_F(GatewayCallsTest, AnEarlyMediaAnswerThenTheFinalOneKeepTheSameCall) {
  start_sip(4);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"early-1", "from-early", "to-early"};
  Placed p;
  p.to_b =
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0)))));
  p.to_callee = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k, p.to_b)));
  // The 183's SDP.
  p.to_a =
      ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k, endpoint_sdp(endpoint_port(1)))));
  p.to_caller = ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k, p.to_a)));
  auto media_of = [](json calls) {
    for (auto& c : calls) {
      for (auto& m : c["media"]) m.erase("packets"), m.erase("key_used_bytes");
    }
    return calls;
  };
  const json early_a = media_of(status(*a_)["calls"]), early_b = media_of(status(*b_)["calls"]);
  std::vector<Bytes> there, back;
  EXPECT_EQ(send(caller, media_port(p.to_caller), callee, 30, 500, there, random_), there);
  EXPECT_EQ(send(callee, media_port(p.to_callee), caller, 30, 600, back, random_), back);
  // Counters only grow on a stream kept (a stream built anew would count from 0).
  auto packets = [&](otpgate::gateway::Gateway& g) {
    return status(g)["calls"][0]["media"][0]["packets"];
  };
  const json early_packets_a = packets(*a_), early_packets_b = packets(*b_);
  // The 200 OK's SDP: version 2, the codecs in another order.
  std::string final_sdp = endpoint_sdp(endpoint_port(1));
  final_sdp.replace(final_sdp.find("4711 1"), 6, "4711 2");
  final_sdp.replace(final_sdp.find("RTP/AVP 96 101"), 14, "RTP/AVP 101 96");
  const std::string to_a = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k, final_sdp)));
  EXPECT_NE(to_a.find("RTP/AVP 101 96"), std::string::npos) << to_a;
  EXPECT_EQ(media_port(to_a), media_port(p.to_a)) << "the final answer moved the call's port";
  const std::string to_caller = ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k, to_a)));
  EXPECT_EQ(media_port(to_caller), media_port(p.to_caller));
  EXPECT_EQ(media_of(status(*a_)["calls"]), early_a) << "the final answer changed the call at A";
  EXPECT_EQ(media_of(status(*b_)["calls"]), early_b) << "the final answer changed the call at B";
  there.clear();
  back.clear();
  EXPECT_EQ(send(caller, media_port(to_caller), callee, 30, 700, there, random_), there);
  EXPECT_EQ(send(callee, media_port(p.to_callee), caller, 30, 800, back, random_), back);
  for (const auto& [g, early] :
       {std::pair{a_.get(), early_packets_a}, {b_.get(), early_packets_b}}) {
    const json now = packets(*g);
    for (const char* counter : {"from_local", "to_peer", "from_peer", "to_local"}) {
      EXPECT_GE(now[counter].get<std::uint64_t>(), early[counter].get<std::uint64_t>() + 30)
          << counter << ": the stream was built anew";
    }
  }
  for (auto* g : {a_.get(), b_.get()}) EXPECT_EQ(status(*g)["sip"]["free_media"], 3);
  hang_up(k);
}

// A proxy asking for SRTP (transport-protocol RTP/SAVP, as Kamailio's "RTP/SAVP" flag
// sends it) on the leg to the local endpoint: refused with a reason naming the fix, as the
// gateway does not terminate SRTP and the leg would be plain. Towards the partner it is
// accepted (the pad protects that leg), and the call goes on once the flag is dropped.
// Endpoints with their own SDES-SRTP make the flag true: taken.
TEST_F(GatewayCallsTest, AnOfferAskingForSrtpTowardsTheEndpointIsRefusedWithTheFix) {
  start_sip(4);
  const NgKeys k{"savp-1", "from-savp", "to-savp"};
  auto savp = [](std::string datagram) {
    const std::string avp = "18:transport-protocol7:RTP/AVP";
    datagram.replace(datagram.find(avp), avp.size(), "18:transport-protocol8:RTP/SAVP");
    return datagram;
  };
  const std::string to_b = ok_sdp(
      ng(a_->ng_port(), savp(kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0))))));
  const json free_before = status(*b_)["sip"]["free_media"];
  const auto refused = ng(b_->ng_port(), savp(kamailio(cookie(), "offer", k, to_b)));
  EXPECT_EQ(text_of(refused, "result"), "error");
  EXPECT_EQ(text_of(refused, "error-reason"),
            "transport-protocol RTP/SAVP asks for SRTP towards the endpoint, which otp-gateway "
            "does not terminate: drop it from the proxy's rtpengine_offer flags (endpoints may "
            "keep their own SDES-SRTP end to end)");
  EXPECT_TRUE(status(*b_)["calls"].empty()) << "a refused offer left a call";
  EXPECT_EQ(status(*b_)["sip"]["free_media"], free_before);
  // Without the flag the same offer is taken.
  const std::string to_callee = ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k, to_b)));
  EXPECT_NE(to_callee.find("RTP/AVP"), std::string::npos) << to_callee;
  hang_up(k);
  // Endpoints with their own SDES-SRTP: the leg to the endpoint is SRTP, the flag true.
  const NgKeys sdes{"savp-2", "from-savp2", "to-savp2"};
  std::string srtp_sdp = endpoint_sdp(endpoint_port(2));
  srtp_sdp.replace(srtp_sdp.find("RTP/AVP"), 7, "RTP/SAVP");
  srtp_sdp += "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + std::string(40, 'A') + "\r\n";
  const std::string srtp_to_b =
      ok_sdp(ng(a_->ng_port(), savp(kamailio(cookie(), "offer", sdes, srtp_sdp))));
  const std::string srtp_to_callee =
      ok_sdp(ng(b_->ng_port(), savp(kamailio(cookie(), "offer", sdes, srtp_to_b))));
  EXPECT_NE(srtp_to_callee.find("RTP/SAVP"), std::string::npos) << srtp_to_callee;
  EXPECT_NE(srtp_to_callee.find("a=crypto:1 AES_CM_128_HMAC_SHA1_80"), std::string::npos);
  hang_up(sdes);
}

// Opportunistic SRTP asked for towards the endpoint (rtpengine_offer's OSRTP-offer flag,
// or an OSRTP list): the gateway does not terminate SRTP, and OSRTP falls back to plain
// RTP by design, so the offer is taken, its SDP plain (no a=crypto), and one warning says
// that leg is not encrypted. Towards the partner the flag changes nothing.
TEST_F(GatewayCallsTest, AnOfferAskingForOpportunisticSrtpIsTakenPlainWithOneWarning) {
  start_sip(4);
  const auto with_flag = [](std::string datagram) {
    const std::string flags = "5:flagsl13:trust-address";
    datagram.replace(datagram.find(flags), flags.size(), flags + "11:OSRTP-offer");
    return datagram;
  };
  testing::internal::CaptureStderr();
  const NgKeys k{"osrtp-1", "from-osrtp", "to-osrtp"};
  const std::string to_b = ok_sdp(
      ng(a_->ng_port(), with_flag(kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0))))));
  const std::string to_callee =
      ok_sdp(ng(b_->ng_port(), with_flag(kamailio(cookie(), "offer", k, to_b))));
  EXPECT_NE(to_callee.find("RTP/AVP"), std::string::npos) << to_callee;
  EXPECT_EQ(to_callee.find("a=crypto"), std::string::npos) << to_callee;
  // The OSRTP list form, on a second call: taken too, and no second warning.
  const NgKeys k2{"osrtp-2", "from-osrtp2", "to-osrtp2"};
  const std::string list = "5:OSRTPl5:offere";
  const std::string to_b2 = ok_sdp(
      ng(a_->ng_port(), kamailio(cookie(), "offer", k2, endpoint_sdp(endpoint_port(2)), list)));
  ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k2, to_b2, list)));
  const std::string said = testing::internal::GetCapturedStderr();
  const std::string warning =
      "the proxy asks for opportunistic SRTP (OSRTP-offer) towards the "
      "endpoint, which otp-gateway does not terminate";
  const auto first = said.find(warning);
  EXPECT_NE(first, std::string::npos) << said;
  EXPECT_NE(said.find("call osrtp-1:"), std::string::npos) << said;
  EXPECT_EQ(said.find(warning, first + 1), std::string::npos) << "said twice:\n" << said;
  hang_up(k);
  hang_up(k2);
}

namespace {

// An ng client at a given loopback source address (127.0.0.2: not the proxy).namespace {

// An ng client at a given loopback source address (127.0.0.2: not the proxy).
class NgClient {
 public:
  explicit NgClient(const char* address) : fd_(::socket(AF_INET, SOCK_DGRAM, 0)) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    ::inet_pton(AF_INET, address, &a.sin_addr);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      throw std::runtime_error("bind failed");
  }
  ~NgClient() { ::close(fd_); }
  NgClient(const NgClient&) = delete;
  NgClient& operator=(const NgClient&) = delete;
  // The reply's dictionary; {"result": "no reply"} when none came within `timeout_ms`.
  bencode::Dict call(std::uint16_t port, const std::string& datagram, int timeout_ms = 5000) {
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::sendto(fd_, datagram.data(), datagram.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to);
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return {{"result", "no reply"}};
    std::string buffer(65536, '\0');
    const ssize_t n = ::recv(fd_, buffer.data(), buffer.size(), 0);
    buffer.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    const auto parts = otpgate::ng::split_datagram(buffer);
    if (!parts) return {{"result", "garbled"}};
    return *bencode::decode(parts->body).dict();
  }

 private:
  int fd_;
};

std::string without_supports(std::string datagram) {
  const std::string supports = "8:supportsl10:load limite";
  datagram.erase(datagram.find(supports), supports.size());
  return datagram;
}

}  // namespace

// A full instance (max_media = 1, its lane taken) refuses a new call so that Kamailio
// moves to the next instance of its set: `load limit` with the reason as message (it
// announces supports: load limit), or exactly "Parallel session limit reached" for a proxy
// that does not; logged and counted. A running call's re-INVITE that wants more is refused
// plainly (another instance has none of its state), and the running call goes on.
TEST_F(GatewayCallsTest, AFullInstanceRefusesNewCallsSoThatTheProxyTriesTheNextOne) {
  start_sip(1);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"full-1", "f1", "t1"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  const std::string detail = "no call key lane free: 1 call media run already (sip.max_media)";
  const auto limited = ng(a_->ng_port(), kamailio(cookie(), "offer", {"full-2", "f2", ""},
                                                  endpoint_sdp(endpoint_port(2))));
  EXPECT_EQ(text_of(limited, "result"), "load limit");
  EXPECT_EQ(text_of(limited, "message"), detail);
  const auto refused =
      ng(a_->ng_port(), without_supports(kamailio(cookie(), "offer", {"full-3", "f3", ""},
                                                  endpoint_sdp(endpoint_port(2)))));
  EXPECT_EQ(text_of(refused, "result"), "error");
  EXPECT_EQ(text_of(refused, "error-reason"), "Parallel session limit reached");
  // A re-INVITE of the running call adding video: refused with the reason itself.
  const std::string with_video = endpoint_sdp(endpoint_port(0)) + "m=video " +
                                 std::to_string(endpoint_port(4)) +
                                 " RTP/AVP 100\r\na=rtpmap:100 VP8/90000\r\n";
  const auto more = ng(a_->ng_port(), kamailio(cookie(), "offer", k, with_video));
  EXPECT_EQ(text_of(more, "result"), "error");
  EXPECT_EQ(text_of(more, "error-reason"), detail);
  const json st = status(*a_);
  EXPECT_EQ(st["sip"]["offers_refused_full"], 2);
  EXPECT_EQ(st["sip"]["ng"]["overloaded"], 2);
  ASSERT_EQ(st["calls"].size(), 1u);
  EXPECT_EQ(st["sip"]["free_media"], 0);
  const std::string metrics = a_->metrics_text();
  EXPECT_NE(metrics.find("otpgate_sip_offers_refused_full_total{site=\"" +
                         st["site"].get<std::string>() + "\"} 2"),
            std::string::npos)
      << metrics;
  std::vector<Bytes> there;
  EXPECT_EQ(send(caller, media_port(p.to_caller), callee, 30, 77, there, random_), there);
  hang_up(k);
}

// Only sip.ng_clients drive the gateway: a datagram from another source (127.0.0.2 here)
// gets no reply, and its delete leaves the call it names running; counted.
TEST_F(GatewayCallsTest, DatagramsFromOutsideNgClientsAreIgnored) {
  start_sip(12, 60, "ng_clients = [\"127.0.0.1\"]\n");
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"guarded-1", "f1", "t1"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  NgClient stranger("127.0.0.2");
  EXPECT_EQ(text_of(stranger.call(a_->ng_port(), kamailio(cookie(), "delete", k), 700), "result"),
            "no reply");
  EXPECT_EQ(text_of(stranger.call(a_->ng_port(),
                                  kamailio(cookie(), "offer", {"evil", "e", ""},
                                           endpoint_sdp(endpoint_port(2))),
                                  300),
                    "result"),
            "no reply");
  const json st = status(*a_);
  ASSERT_EQ(st["calls"].size(), 1u);
  EXPECT_EQ(st["calls"][0]["call_id"], "guarded-1");
  EXPECT_EQ(st["sip"]["ng"]["unlisted"], 2);
  std::vector<Bytes> there;
  EXPECT_EQ(send(caller, media_port(p.to_caller), callee, 30, 78, there, random_), there);
  NgClient proxy("127.0.0.1");  // the listed client is answered
  EXPECT_EQ(text_of(proxy.call(a_->ng_port(), kamailio(cookie(), "ping", {})), "result"), "pong");
  hang_up(k);
}

TEST(GatewayCallsConfig, NgClientsAreRequiredOffLoopback) {
  const std::string pki = otpgate::testing::pki_dir().string();
  const std::string base =
      "[site]\nname = \"a\"\nsae_id = \"sae-a\"\n[kme]\nurl = "
      "\"https://127.0.0.1:1\"\ntls_cert = \"" +
      pki + "/sae-a.crt\"\ntls_key = \"" + pki + "/sae-a.key\"\ntls_ca = \"" + pki +
      "/ca.crt\"\n[peer]\nsae_id = \"sae-b\"\naddress = \"127.0.0.1\"\n[sip]\nmedia_address = "
      "\"10.0.0.1\"\nport_min = 30000\nport_max = 30031\n";
  auto load = [&](const std::string& sip) {
    try {
      otpgate::gateway::parse_config(base + sip, "a.toml");
      return std::string("loaded");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
  };
  const std::string open = load("ng_listen = \"10.0.0.1:22222\"\n");
  EXPECT_EQ(open,
            "a.toml: sip.ng_clients is missing: expected the SIP proxies' addresses, e.g. "
            "ng_clients = [\"10.1.0.2\"], when sip.ng_listen (10.0.0.1) is not a loopback "
            "address: anyone who can reach the ng socket could open calls and end others'");
  EXPECT_EQ(open.find('\n'), std::string::npos);
  EXPECT_EQ(load("ng_listen = \"0.0.0.0:22222\"\n").find("sip.ng_clients is missing"), 8u);
  EXPECT_EQ(load("ng_listen = \"10.0.0.1:22222\"\nng_clients = [\"10.0.0.2\", \"proxy-a\"]\n"),
            "loaded");
  EXPECT_NE(load("ng_clients = []\n").find("sip.ng_clients = []"), std::string::npos);
  EXPECT_NE(load("ng_clients = [\"a b\"]\n").find("sip.ng_clients"), std::string::npos);
  EXPECT_EQ(load("ng_listen = \"[::1]:22222\"\n"), "loaded");
  EXPECT_EQ(load("ng_listen = \"127.0.0.5:22222\"\n"), "loaded");  // all of 127.0.0.0/8
  EXPECT_EQ(load("delete_delay_s = 30\n"), "loaded");
  EXPECT_NE(load("delete_delay_s = 7200\n").find("sip.delete_delay_s"), std::string::npos);
}

// A forked call: the callee's first branch (to-tag t1) answered, then another (t2) took
// over with its own endpoint. A delete of branch t1 leaves the call and its media; the
// running branch's delete with delete-delay 2 keeps the media that long, an offer within
// it revives the call, and the delete-delay 0 that follows ends it at once.
TEST_F(GatewayCallsTest, BranchDeletesAndDeleteDelay) {
  start_sip(4);
  UdpSocket caller(endpoint_port(0)), first(endpoint_port(1)), second(endpoint_port(2));
  const NgKeys k{"fork-1", "f1", "t1"}, k2{"fork-1", "f1", "t2"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  const std::string to_a2 =
      ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k2, endpoint_sdp(endpoint_port(2)))));
  ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k2, to_a2)));
  const std::uint16_t a_local = media_port(p.to_caller), b_local = media_port(p.to_callee);
  std::vector<Bytes> sent;
  EXPECT_EQ(send(caller, a_local, second, 20, 90, sent, random_), sent);
  // The losing branch's delete (its 487, through the proxies): nothing ends.
  for (auto* g : {a_.get(), b_.get()}) {
    const auto r = ng(g->ng_port(), kamailio(cookie(), "delete", k));
    EXPECT_EQ(text_of(r, "result"), "ok");
    EXPECT_EQ(status(*g)["calls"].size(), 1u);
    EXPECT_EQ(status(*g)["sip"]["branch_deletes"], 1);
  }
  sent.clear();
  EXPECT_EQ(send(second, b_local, caller, 20, 91, sent, random_), sent);
  // The running branch's delete with a delay: media go on.
  for (auto* g : {a_.get(), b_.get()}) {
    EXPECT_EQ(text_of(ng(g->ng_port(), kamailio(cookie(), "delete", k2, {}, "12:delete-delayi2e")),
                      "result"),
              "ok");
    EXPECT_EQ(status(*g)["calls"][0]["state"], "deleting");
  }
  sent.clear();
  EXPECT_EQ(send(caller, a_local, second, 20, 92, sent, random_), sent);
  // A re-offer within it revives the call (here the same INVITE again).
  EXPECT_EQ(
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0))))),
      p.to_b);
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));
  EXPECT_EQ(status(*a_)["calls"].size(), 1u);
  EXPECT_EQ(status(*a_)["calls"][0]["state"], "answered");
  EXPECT_EQ(status(*a_)["sip"]["revived"], 1);
  EXPECT_TRUE(status(*b_)["calls"].empty());  // B's delete-delay ran out
  EXPECT_EQ(status(*b_)["sip"]["free_media"], 4);
  // delete-delay 0: now.
  EXPECT_EQ(text_of(ng(a_->ng_port(), kamailio(cookie(), "delete", k2, {}, "12:delete-delayi0e")),
                    "result"),
            "ok");
  EXPECT_TRUE(status(*a_)["calls"].empty());
  EXPECT_EQ(status(*a_)["sip"]["free_media"], 4);
}

// A parallel fork through rtpengine_offer per branch: the same offer once per branch,
// each with its via-branch. The first branch fails while the others ring (its delete comes
// before any answer), the second answers, the third's delete follows: each ends only its
// branch; the call and its media go on until the answering branch's delete.
TEST_F(GatewayCallsTest, AParallelForksLosingBranchDeletesLeaveTheAnsweredBranch) {
  start_sip(4);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"parallel-fork-1", "f1", "t2"};
  auto via = [](int branch) { return "10:via-branch10:z9hG4bK-b" + std::to_string(branch); };
  const std::string caller_sdp = endpoint_sdp(endpoint_port(0));
  const std::string to_b =
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, caller_sdp, via(1))));
  ASSERT_FALSE(to_b.empty());
  for (int branch : {2, 3}) {
    EXPECT_EQ(ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k, caller_sdp, via(branch)))),
              to_b)
        << "branch " << branch << "'s offer is the same offer";
  }
  auto branch_delete = [&](int branch, int deletes_so_far) {
    EXPECT_EQ(
        text_of(ng(a_->ng_port(), kamailio(cookie(), "delete", k, {}, via(branch))), "result"),
        "ok");
    EXPECT_EQ(status(*a_)["calls"].size(), 1u) << "branch " << branch << "'s delete ended the call";
    EXPECT_EQ(status(*a_)["sip"]["branch_deletes"], deletes_so_far);
  };
  branch_delete(1, 1);  // a 486 from branch 1 while 2 and 3 ring
  ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "offer", k, to_b)));
  const std::string to_a =
      ok_sdp(ng(b_->ng_port(), kamailio(cookie(), "answer", k, endpoint_sdp(endpoint_port(1)))));
  const std::string to_caller =
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "answer", k, to_a, via(2))));
  ASSERT_FALSE(to_caller.empty());
  branch_delete(3, 2);  // branch 3's 487 once branch 2 answered
  std::vector<Bytes> sent;
  EXPECT_EQ(send(caller, media_port(to_caller), callee, 20, 93, sent, random_), sent);
  EXPECT_EQ(text_of(ng(a_->ng_port(), kamailio(cookie(), "delete", k, {}, via(2))), "result"),
            "ok");
  EXPECT_TRUE(status(*a_)["calls"].empty());
  EXPECT_EQ(status(*a_)["sip"]["free_media"], 4);
  EXPECT_EQ(text_of(ng(b_->ng_port(), kamailio(cookie(), "delete", k)), "result"), "ok");
}

// sip.delete_delay_s applies to a delete without delete-delay.
TEST_F(GatewayCallsTest, ConfiguredDeleteDelay) {
  start_sip(4, 60, "delete_delay_s = 1\n");
  const NgKeys k{"delay-1", "f1", "t1"};
  place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  EXPECT_EQ(text_of(ng(a_->ng_port(), kamailio(cookie(), "delete", k)), "result"), "ok");
  EXPECT_EQ(status(*a_)["calls"][0]["state"], "deleting");
  std::this_thread::sleep_for(std::chrono::milliseconds(2600));
  EXPECT_TRUE(status(*a_)["calls"].empty());
  EXPECT_EQ(status(*a_)["sip"]["delayed_deletes"], 1);
}

// The proxy never sends delete and the callee vanished; the caller keeps sending. Each
// gateway ends the call after media_timeout_s: A hears nothing from the partner, B
// nothing from its endpoint; the caller's packets alone do not keep it (or its pad use).
TEST_F(GatewayCallsTest, MediaFlowingOneWayOnlyEndsTheCallAtTheMediaTimeout) {
  start_sip(12, 5);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"one-way-1", "f1", "t1"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  const auto placed = std::chrono::steady_clock::now();
  std::atomic<bool> sending{true};
  std::thread keeps_sending([&] {
    for (std::uint16_t seq = 0; sending; ++seq) {
      caller.send_to(media_port(p.to_caller), random_rtp(seq, 0x1e7, random_));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  auto both_ended = [&] { return status(*a_)["calls"].empty() && status(*b_)["calls"].empty(); };
  while (!both_ended() && std::chrono::steady_clock::now() - placed < std::chrono::seconds(12))
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  const auto ended = std::chrono::steady_clock::now() - placed;
  sending = false;
  keeps_sending.join();
  EXPECT_TRUE(both_ended());
  EXPECT_GE(ended, std::chrono::seconds(4));
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    EXPECT_EQ(st["sip"]["timed_out_one_way"], 1);
    EXPECT_EQ(st["sip"]["free_media"], 12);
  }
}

// A call on hold carries media one way only (music on hold from the caller): that is not
// a vanished party, and the call runs on past the media timeout.
TEST_F(GatewayCallsTest, ACallOnHoldWithMediaOneWayOutlivesTheMediaTimeout) {
  start_sip(12, 5);
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"on-hold-1", "f1", "t1"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0), "sendonly"),
                         endpoint_sdp(endpoint_port(1), "recvonly"));
  std::atomic<bool> sending{true};
  std::thread music([&] {
    for (std::uint16_t seq = 0; sending; ++seq) {
      caller.send_to(media_port(p.to_caller), random_rtp(seq, 0x401d, random_));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(9));  // well over the media timeout
  sending = false;
  music.join();
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    ASSERT_EQ(st["calls"].size(), 1u) << st.dump();
    EXPECT_GT(st["calls"][0]["media"][0]["packets"]["from_local"].get<std::uint64_t>() +
                  st["calls"][0]["media"][0]["packets"]["to_local"].get<std::uint64_t>(),
              200u);
    EXPECT_EQ(st["sip"]["timed_out_one_way"], 0);
  }
  hang_up(k);
}

// A restarted proxy reuses a cookie (same source address and port here) with another
// request: it is run, not answered with the old process's reply.
TEST_F(GatewayCallsTest, AReusedCookieFromARestartedProxyIsNotAnsweredFromTheCache) {
  start_sip(4);
  NgClient proxy("127.0.0.1");
  const auto first = proxy.call(a_->ng_port(), kamailio("1_4104_1", "offer", {"before", "f", ""},
                                                        endpoint_sdp(endpoint_port(0))));
  const auto again = proxy.call(a_->ng_port(), kamailio("1_4104_1", "offer", {"after", "f", ""},
                                                        endpoint_sdp(endpoint_port(2))));
  ASSERT_EQ(text_of(first, "result"), "ok");
  ASSERT_EQ(text_of(again, "result"), "ok");
  EXPECT_NE(media_port(text_of(first, "sdp")), media_port(text_of(again, "sdp")));
  const json st = status(*a_);
  EXPECT_EQ(st["calls"].size(), 2u);
  EXPECT_EQ(st["sip"]["ng"]["cookie_reused"], 1);
  // A true retransmission (same bytes) still gets its reply from the cache.
  const auto resent = proxy.call(a_->ng_port(), kamailio("1_4104_1", "offer", {"after", "f", ""},
                                                         endpoint_sdp(endpoint_port(2))));
  EXPECT_EQ(text_of(resent, "sdp"), text_of(again, "sdp"));
  EXPECT_EQ(status(*a_)["sip"]["ng"]["retransmissions"], 1);
}

// A receive lane follows one sender lane's pad stream and has one decryptor at a time. A
// partner SDP for a media that already runs here (a re-INVITE) may not move it to another
// a=x-otp-lane: its decryptor keeps the lane it was built on, so the bookkeeping would
// call that lane free and hand it to the next call while the old decryptor still takes
// from it (two consumers on one single-consumer pad stream). Here a re-offer from A names
// lane 5 for the running media on lane 0; then another call names lane 0.
TEST_F(GatewayCallsTest, APartnerCannotMoveARunningMediaToAnotherKeyLane) {
  start_sip();
  UdpSocket caller(endpoint_port(0)), callee(endpoint_port(1));
  const NgKeys k{"lane-move-1", "f1", "t1"};
  const Placed p = place(k, endpoint_sdp(endpoint_port(0)), endpoint_sdp(endpoint_port(1)));
  ASSERT_NE(p.to_b.find("a=x-otp-lane:0"), std::string::npos) << p.to_b;
  std::vector<Bytes> sent;
  EXPECT_EQ(send(caller, media_port(p.to_caller), callee, 20, 1, sent, random_), sent);
  // The re-INVITE from the caller's side, its SDP between the sites naming another lane.
  std::string to_b = ok_sdp(ng(
      a_->ng_port(), kamailio(cookie(), "offer", k, endpoint_sdp(endpoint_port(0), "sendonly"))));
  const auto at = to_b.find("a=x-otp-lane:0");
  ASSERT_NE(at, std::string::npos) << to_b;
  to_b.replace(at, 14, "a=x-otp-lane:5");
  const auto moved = ng(b_->ng_port(), kamailio(cookie(), "offer", k, to_b));
  // Refused, or else the media's decryptor moved with it; either way its status names the
  // lane its decryptor takes from.
  if (text_of(moved, "result") == "ok") {
    EXPECT_EQ(status(*b_)["calls"][0]["media"][0]["receive_lane"], 5) << text_of(moved, "sdp");
  } else {
    EXPECT_NE(text_of(moved, "error-reason").find("lane"), std::string::npos)
        << text_of(moved, "error-reason");
    EXPECT_EQ(status(*b_)["calls"][0]["media"][0]["receive_lane"], 0);
  }
  // Another call whose sender names lane 0 while call 1's decryptor still takes from it.
  const NgKeys k2{"lane-move-2", "f2", "t2"};
  std::string to_b2 =
      ok_sdp(ng(a_->ng_port(), kamailio(cookie(), "offer", k2, endpoint_sdp(endpoint_port(4)))));
  const auto lane_at = to_b2.find("a=x-otp-lane:");
  ASSERT_NE(lane_at, std::string::npos) << to_b2;
  to_b2.replace(lane_at, 14, "a=x-otp-lane:0");
  const auto second = ng(b_->ng_port(), kamailio(cookie(), "offer", k2, to_b2));
  EXPECT_EQ(text_of(second, "result"), "error")
      << "receive lane 0 given to a second call while call 1's decryptor uses it";
  EXPECT_NE(text_of(second, "error-reason").find("still in use by another call here"),
            std::string::npos)
      << text_of(second, "error-reason");
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// Calls through otp-gateway ([sip], issue 15): two gateways and qkd-kme-sim on loopback,
// driven over their ng sockets with datagrams in the shape Kamailio 5.6.3's rtpengine
// module sends them (checked against the capture in tests/data/sip), in the order the two
// sites' proxies send them for one INVITE: proxy A offers to gateway A, proxy B offers
// what came out to gateway B, proxy B answers the callee's SDP to gateway B, proxy A
// answers what came out to gateway A. Then RTP from a fake caller reaches the fake callee
// byte for byte and back, and a tap between the gateways (the SDP between the sites is
// pointed at it, as a WAN hop) sees only OTP.
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gateway_fixture.hpp"
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

class GatewayCallsTest : public GatewayTest {
 protected:
  // Ports: A's media from sip_+0, B's from sip_+60 (15 media each), endpoints from sip_+120.
  void start_sip(int max_media = 12, int timeout_s = 60, const std::string& extra = "") {
    // Below the fixture's ports and the kernel's ephemeral range (32768-60999), where a
    // sending socket could take one of them.
    sip_ = static_cast<std::uint16_t>(10000 + ((base_ - 20000) / 120) % 62 * 160);  // a block each
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

  std::uint16_t sip_ = 0;
  int sequence_ = 0;
  std::mt19937 random_{4711};
};

// Every datagram a tap saw is OTP: an announcement, or a protected RTP packet (clear
// header, payload changed, trailer added) of one that was sent; none is plain RTP.
void expect_only_otp(const std::vector<Bytes>& seen, const std::vector<Bytes>& sent) {
  std::size_t protected_packets = 0;
  for (const Bytes& d : seen) {
    if (otpgate::otp::classify(d) == otpgate::otp::DatagramType::announcement) continue;
    const auto plain = std::find_if(sent.begin(), sent.end(), [&](const Bytes& p) {
      return std::equal(p.begin(), p.begin() + 12, d.begin());
    });
    ASSERT_NE(plain, sent.end()) << "a datagram between the gateways that was not sent";
    EXPECT_EQ(d.size(), plain->size() + otpgate::otp::kTrailerBytes);
    EXPECT_FALSE(std::equal(plain->begin() + 12, plain->end(), d.begin() + 12))
        << "plain RTP between the gateways";
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
  std::string ice =
      base + sip +
      "[ice]\nsignalling_listen = \"127.0.0.1:0\"\npeer_signalling = \"127.0.0.1:1\"\n";
  ice.insert(ice.find("[peer]\n") + 7, "transport = \"ice\"\n");
  EXPECT_NE(load(ice).find("calls over ICE are not supported yet"), std::string::npos);
}

TEST_F(GatewayCallsTest, CallCrossesBothGatewaysAsOtpAndHangUpFreesItsPortsAndLanes) {
  start_sip();
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
  expect_only_otp(towards_b.seen(), sent_ab);
  expect_only_otp(towards_a.seen(), sent_ba);

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
  struct Running {
    NgKeys k;
    std::unique_ptr<UdpSocket> caller, callee;
    std::uint16_t a_local = 0, b_local = 0;
  };
  std::vector<Running> calls(10);
  for (int i = 0; i < 10; ++i) {
    Running& c = calls[i];
    c.k = {"call-" + std::to_string(i), "f" + std::to_string(i), "t" + std::to_string(i)};
    c.caller = std::make_unique<UdpSocket>(endpoint_port(2 * i));
    c.callee = std::make_unique<UdpSocket>(endpoint_port(2 * i + 1));
    const Placed p =
        place(c.k, endpoint_sdp(endpoint_port(2 * i)), endpoint_sdp(endpoint_port(2 * i + 1)));
    c.a_local = media_port(p.to_caller);
    c.b_local = media_port(p.to_callee);
  }
  for (auto* g : {a_.get(), b_.get()}) {
    const json st = status(*g);
    EXPECT_EQ(st["calls"].size(), 10u);
    EXPECT_EQ(st["sip"]["free_media"], 2);
  }
  for (int i = 0; i < 10; ++i) {
    Running& c = calls[i];
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
  // does a VP8 video (1.5 Mbit/s).
  start_sip(12, 60, "key_rate_bits_per_s = 200000\n");
  auto offer = [&](const std::string& id, const std::string& body) {
    return ng(a_->ng_port(), kamailio(cookie(), "offer", {id, "f", ""}, body));
  };
  ok_sdp(offer("budget-1", endpoint_sdp(endpoint_port(0))));
  ok_sdp(offer("budget-2", endpoint_sdp(endpoint_port(2))));
  auto third = offer("budget-3", endpoint_sdp(endpoint_port(4)));
  EXPECT_EQ(text_of(third, "result"), "error");
  EXPECT_EQ(text_of(third, "error-reason"),
            "key budget: this call's media need 70 kbit/s of pad, 2 call media running take "
            "141 kbit/s, the link's key rate is 200 kbit/s (sip.key_rate_bits_per_s)");
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

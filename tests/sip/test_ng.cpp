// SPDX-License-Identifier: LGPL-2.1-or-later
// rtpengine ng messages as Kamailio's rtpengine module (5.6, Debian 12) sends them, byte
// for byte: typed requests, replies with the cookie, errors, the reply cache.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <string>

#include "ng_test_handler.hpp"
#include "otpgate/sip.hpp"

namespace bencode = otpgate::bencode;
namespace ng = otpgate::ng;
using otpgate::test::RecordingHandler;

namespace {

using Clock = ng::ReplyCache::Clock;

// A bencoded string, so the SDP's length prefix is right by construction.
std::string bstr(std::string_view s) {
  return std::to_string(s.size()) + ":" + std::string(s);
}

// What baresip offers through Kamailio (CRLF, as it is sent).
const std::string kOfferSdp =
    "v=0\r\n"
    "o=- 1186837357 1976489876 IN IP4 192.0.2.10\r\n"
    "s=-\r\n"
    "c=IN IP4 192.0.2.10\r\n"
    "t=0 0\r\n"
    "m=audio 10000 RTP/AVP 96 0 101\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=sendrecv\r\n";

// rtpengine_offer("replace-origin replace-session-connection trust-address ICE=remove RTP/AVP")
// in Kamailio 5.6.3 (Debian 12): keys in the order the module adds them, cookie
// "<rank>_<pid>_<seq>". Byte for byte what it sent (tests/data/sip/kamailio-5.6.3-offer.bin,
// captured from kamailio with this route and the INVITE carrying kOfferSdp).
std::string kamailio_offer(std::string_view cookie) {
  return std::string(cookie) + " d8:supportsl10:load limite3:sdp" + bstr(kOfferSdp) +
         "3:ICE6:remove5:flagsl13:trust-addresse7:replacel6:origin18:session-connectione"
         "18:transport-protocol7:RTP/AVP"
         "7:call-id36:0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b"
         "13:received-froml3:IP49:127.0.0.1e"
         "8:from-tag10:a4f1c9b2e0"
         "7:command5:offere";
}

std::string read_file(const std::string& name) {
  std::ifstream in(std::string(OTPGATE_SIP_TEST_DATA) + "/" + name, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// rtpengine_answer("replace-origin replace-session-connection ICE=remove") on the 200 OK,
// built the same way (from-tag, then to-tag).
std::string kamailio_answer(std::string_view cookie, std::string_view sdp) {
  return std::string(cookie) + " d8:supportsl10:load limite3:sdp" + bstr(sdp) +
         "3:ICE6:remove7:replacel6:origin18:session-connectione"
         "7:call-id36:0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b"
         "13:received-froml3:IP49:127.0.0.1e"
         "8:from-tag10:a4f1c9b2e06:to-tag8:7f3e91aa"
         "7:command6:answere";
}

std::string error_reply(std::string_view cookie, std::string_view reason) {
  return std::string(cookie) + " d12:error-reason" + bstr(reason) + "6:result5:errore";
}

ng::Request request_of(const std::string& datagram) {
  const auto parts = ng::split_datagram(datagram);
  EXPECT_TRUE(parts);
  return ng::parse_request(bencode::decode(parts->body));
}

std::string refusal(const std::string& body) {
  try {
    ng::parse_request(bencode::decode(body));
  } catch (const ng::Refused& e) {
    return e.what();
  }
  return "accepted";
}

}  // namespace

TEST(NgMessages, TheOfferBuiltHereIsWhatKamailioSent) {
  EXPECT_EQ(kamailio_offer("0_4104_1"), read_file("kamailio-5.6.3-offer.bin"));
  // Its ping at start-up, and our pong to it.
  EXPECT_EQ(read_file("kamailio-5.6.3-ping.bin"), "0_4104_0 d7:command4:pinge");
  otpgate::test::RecordingHandler handler;
  ng::Processor p(handler);
  EXPECT_EQ(p.process(read_file("kamailio-5.6.3-ping.bin"), "127.0.0.1/35000",
                      ng::ReplyCache::Clock::now()),
            "0_4104_0 d6:result4:ponge");
}

TEST(NgMessages, KamailioOfferIsTyped) {
  const ng::Request q = request_of(kamailio_offer("0_4104_1"));
  EXPECT_EQ(q.command, ng::Command::offer);
  EXPECT_EQ(q.call_id, "0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b");
  EXPECT_EQ(q.from_tag, "a4f1c9b2e0");
  EXPECT_EQ(q.to_tag, "");
  EXPECT_EQ(q.via_branch, "");  // only with the via-branch= flag
  EXPECT_EQ(q.sdp, kOfferSdp);
  EXPECT_EQ(q.ice, "remove");
  EXPECT_EQ(q.transport_protocol, "RTP/AVP");
  EXPECT_EQ(q.replace, (std::vector<std::string>{"origin", "session-connection"}));
  EXPECT_EQ(q.received_from_family, "IP4");
  EXPECT_EQ(q.received_from_address, "127.0.0.1");
  EXPECT_EQ(q.supports, (std::vector<std::string>{"load-limit"}));
  EXPECT_TRUE(q.has_flag("trust address"));
  EXPECT_TRUE(q.has_flag("trust-address"));
  EXPECT_FALSE(q.has_flag("asymmetric"));
}

TEST(NgMessages, KamailioAnswerNeedsToTag) {
  const ng::Request q = request_of(kamailio_answer("9276_4", kOfferSdp));
  EXPECT_EQ(q.command, ng::Command::answer);
  EXPECT_EQ(q.to_tag, "7f3e91aa");
  EXPECT_EQ(refusal("d7:command6:answer7:call-id1:c8:from-tag1:f3:sdp3:v=0e"),
            "missing key \"to-tag\"");
}

TEST(NgMessages, SpacesAndHyphensInKeysAndFlagsAreTheSame) {
  // rtpengine's documented example uses "transport protocol" and "address family".
  const ng::Request q = ng::parse_request(bencode::decode(
      "d7:command5:offer7:call-id1:c8:from-tag1:f3:sdp3:v=018:transport protocol8:RTP/SAVP"
      "14:address family3:IP613:received froml3:IP410:10.65.31.4e5:flagsl18:SIP source addressee"));
  EXPECT_EQ(q.transport_protocol, "RTP/SAVP");
  EXPECT_EQ(q.address_family, "IP6");
  EXPECT_EQ(q.received_from_address, "10.65.31.4");
  EXPECT_TRUE(q.has_flag("SIP-source-address"));
  EXPECT_EQ(
      refusal("d7:command5:query7:call-id1:c13:received-froml3:IP41:ae13:received froml3:IP41:aee"),
      "key \"received-from\" given twice (with a space and a hyphen)");
}

TEST(NgMessages, DeleteQueryListPing) {
  ng::Request q = ng::parse_request(bencode::decode(
      "d7:call-id1:c8:from-tag1:f6:to-tag1:t10:via-branch3:b.17:command6:delete5:flagsl5:fatalee"));
  EXPECT_EQ(q.command, ng::Command::remove);
  EXPECT_EQ(q.via_branch, "b.1");
  EXPECT_EQ(q.to_tag, "t");
  EXPECT_TRUE(q.has_flag("fatal"));
  q = ng::parse_request(bencode::decode("d7:command5:query7:call-id1:ce"));
  EXPECT_EQ(q.command, ng::Command::query);
  q = ng::parse_request(bencode::decode("d7:command4:list5:limiti5ee"));
  EXPECT_EQ(q.command, ng::Command::list);
  EXPECT_EQ(q.limit, 5);
  q = ng::parse_request(bencode::decode("d7:command4:list5:limit2:10e"));
  EXPECT_EQ(q.limit, 10);
  q = ng::parse_request(bencode::decode("d7:command4:pinge"));
  EXPECT_EQ(q.command, ng::Command::ping);
}

// OpenSIPS 3.x's rtpengine module (not packaged in Debian 12, so built from its source's
// rtpe_function_call): no "supports", "received-from" always, flag words turned into the
// same keys as Kamailio's (replace list, ICE string, transport-protocol string), an
// "in-iface"/"out-iface" pair as the direction list, and "delete-delay" spelt with a
// hyphen; its delete carries no to-tag unless the route asks for one.
TEST(NgMessages, OpenSipsOfferAnswerAndDeleteAreTyped) {
  const ng::Request offer = request_of(
      "5843_1_7 d3:sdp" + bstr(kOfferSdp) +
      "9:directionl8:external8:internale5:flagsl13:trust-addresse"
      "7:replacel6:origin18:session-connectione3:ICE6:remove18:transport-protocol7:RTP/AVP"
      "7:call-id12:os-call-0001"
      "13:received-froml3:IP410:192.0.2.10e8:from-tag6:os-f017:command5:offere");
  EXPECT_EQ(offer.command, ng::Command::offer);
  EXPECT_EQ(offer.call_id, "os-call-0001");
  EXPECT_EQ(offer.sdp, kOfferSdp);
  EXPECT_EQ(offer.direction, (std::vector<std::string>{"external", "internal"}));
  EXPECT_EQ(offer.replace, (std::vector<std::string>{"origin", "session-connection"}));
  EXPECT_EQ(offer.ice, "remove");
  EXPECT_EQ(offer.transport_protocol, "RTP/AVP");
  EXPECT_EQ(offer.received_from_address, "192.0.2.10");
  EXPECT_TRUE(offer.supports.empty());
  const ng::Request answer =
      request_of("5843_1_8 d3:sdp" + bstr(kOfferSdp) +
                 "7:replacel6:origin18:session-connectione3:ICE6:remove7:call-id12:os-call-0001"
                 "13:received-froml3:IP410:192.0.2.20e8:from-tag6:os-f016:to-tag6:os-t01"
                 "7:command6:answere");
  EXPECT_EQ(answer.command, ng::Command::answer);
  EXPECT_EQ(answer.to_tag, "os-t01");
  const ng::Request remove = request_of(
      "5843_1_9 d12:delete-delayi0e7:call-id12:os-call-0001"
      "13:received-froml3:IP410:192.0.2.10e8:from-tag6:os-f017:command6:deletee");
  EXPECT_EQ(remove.command, ng::Command::remove);
  EXPECT_EQ(remove.to_tag, "");
  EXPECT_EQ(remove.delete_delay, 0);
}

TEST(NgMessages, RefusesWhatIsNotARequest) {
  EXPECT_EQ(refusal("l7:commande"), "the message is not a dictionary");
  EXPECT_EQ(refusal("d4:calldee"), "missing key \"command\"");
  EXPECT_EQ(refusal("d7:commandi1ee"), "key \"command\" must be a string");
  EXPECT_EQ(refusal("d7:command15:start recordinge"), "unknown command \"start recording\"");
  EXPECT_EQ(refusal("d7:command5:offer8:from-tag1:f3:sdp3:v=0e"), "missing key \"call-id\"");
  EXPECT_EQ(refusal("d7:command5:offer7:call-id1:c3:sdp3:v=0e"), "missing key \"from-tag\"");
  EXPECT_EQ(refusal("d7:command5:offer7:call-id1:c8:from-tag1:fe"), "missing key \"sdp\"");
  EXPECT_EQ(refusal("d7:command5:offer7:call-id1:c8:from-tag1:f3:sdp0:e"), "empty SDP");
  EXPECT_EQ(refusal("d7:command6:delete7:call-id1:c8:from-tag1:f5:flagsi1ee"),
            "key \"flags\" must be a list of strings");
  EXPECT_EQ(refusal("d7:command6:delete7:call-id1:c8:from-tag1:f5:flagsli1eee"),
            "key \"flags\" must be a list of strings");
  EXPECT_EQ(refusal("d7:command5:query7:call-id1:c13:received-froml3:IP4ee"),
            "key \"received-from\" must be [family, address]");
  EXPECT_EQ(refusal("d7:command4:list5:limiti0ee"), "key \"limit\" must be above 0");
  EXPECT_EQ(refusal("d7:command4:list5:limit2:1xe"), "key \"limit\" must be an integer");
  // A newline in a call-id or tag would forge a line in the gateway's log.
  EXPECT_EQ(refusal("d7:command6:delete7:call-id3:a\nb8:from-tag1:fe"),
            "key \"call-id\" has a control character");
  EXPECT_EQ(refusal("d7:command6:delete7:call-id1:c8:from-tag2:f\x7f"
                    "e"),
            "key \"from-tag\" has a control character");
}

TEST(NgMessages, SplitsTheCookie) {
  auto d = ng::split_datagram("5323_1 d7:command4:pinge");
  ASSERT_TRUE(d);
  EXPECT_EQ(d->cookie, "5323_1");
  EXPECT_EQ(d->body, "d7:command4:pinge");
  EXPECT_FALSE(ng::split_datagram("d7:command4:pinge"));   // no cookie
  EXPECT_FALSE(ng::split_datagram(" d7:command4:pinge"));  // empty cookie
  EXPECT_FALSE(ng::split_datagram(std::string(65, 'c') + " de"));
  EXPECT_FALSE(ng::split_datagram(std::string_view("a\0b de", 6)));
  EXPECT_FALSE(ng::split_datagram(""));
}

TEST(NgMessages, RepliesByteExact) {
  EXPECT_EQ(ng::format_reply("5323_1", ng::reply_pong()), "5323_1 d6:result4:ponge");
  EXPECT_EQ(ng::format_reply("7_1", ng::reply_ok("v=0\r\n")), "7_1 d6:result2:ok3:sdp5:v=0\r\ne");
  EXPECT_EQ(ng::format_reply("7_2", ng::reply_ok({}, "unknown call")),
            "7_2 d6:result2:ok7:warning12:unknown calle");
  EXPECT_EQ(ng::format_reply("7_3", ng::reply_error("no key")),
            "7_3 d12:error-reason6:no key6:result5:errore");
  EXPECT_EQ(ng::format_reply("7_4", ng::reply_list({"a", "b"})),
            "7_4 d5:callsl1:a1:be6:result2:oke");
}

TEST(NgMessages, QueryReplyHasRtpenginesShape) {
  ng::QueryResult r;
  r.created = 1700000000;
  r.last_signal = 1700000005;
  ng::TagStats caller{"ftag", "ttag", 1700000000, {}};
  caller.medias.push_back({"audio", "RTP/AVP", {}});
  caller.medias[0].streams.push_back({30000, "192.0.2.10", 10000, false, 5, 800, 0, 1700000009});
  caller.medias[0].streams.push_back({30001, "", 0, true, 1, 60, 0, 0});
  r.tags.push_back(caller);
  const bencode::Dict d = ng::reply_query(r);
  const bencode::Value v(d);
  // Decoded back, as Kamailio's stats parsing walks it.
  const bencode::Value decoded = bencode::decode(bencode::encode(v));
  const auto& tags = *decoded.dict()->at("tags").dict();
  const auto& tag = *tags.at("ftag").dict();
  EXPECT_EQ(tag.at("in dialogue with"), bencode::Value("ttag"));
  const auto& media = *tag.at("medias").list()->at(0).dict();
  EXPECT_EQ(media.at("index"), bencode::Value(1));
  EXPECT_EQ(media.at("type"), bencode::Value("audio"));
  const auto& rtp = *media.at("streams").list()->at(0).dict();
  EXPECT_EQ(rtp.at("local port"), bencode::Value(30000));
  EXPECT_EQ(*rtp.at("endpoint").dict(),
            (bencode::Dict{{"family", "IPv4"}, {"address", "192.0.2.10"}, {"port", 10000}}));
  EXPECT_EQ(*rtp.at("stats").dict(),
            (bencode::Dict{{"packets", 5}, {"bytes", 800}, {"errors", 0}}));
  EXPECT_EQ(rtp.at("last packet"), bencode::Value(1700000009));
  const auto& rtcp = *media.at("streams").list()->at(1).dict();
  EXPECT_FALSE(rtcp.contains("endpoint"));
  EXPECT_EQ(*rtcp.at("flags").list(), (bencode::List{"RTCP"}));
  EXPECT_EQ(d.at("result"), bencode::Value("ok"));
  EXPECT_EQ(d.at("last signal"), bencode::Value(1700000005));
  EXPECT_EQ(*d.at("totals").dict()->at("RTP").dict(),
            (bencode::Dict{{"packets", 5}, {"bytes", 800}, {"errors", 0}}));
  EXPECT_EQ(*d.at("totals").dict()->at("RTCP").dict(),
            (bencode::Dict{{"packets", 1}, {"bytes", 60}, {"errors", 0}}));
}

TEST(NgProcessor, AnswersKamailiosOfferWithTheRewrittenSdp) {
  RecordingHandler handler;
  ng::Processor p(handler);
  const auto reply = p.process(kamailio_offer("9276_3"), "127.0.0.1/5060", Clock::now());
  ASSERT_TRUE(reply);
  const std::string expected_sdp =
      "v=0\r\n"
      "o=- 1186837357 1976489876 IN IP4 203.0.113.5\r\n"
      "s=-\r\n"
      "c=IN IP4 203.0.113.5\r\n"
      "t=0 0\r\n"
      "m=audio 30000 RTP/AVP 96 0 101\r\n"
      "a=rtpmap:96 opus/48000/2\r\n"
      "a=rtpmap:0 PCMU/8000\r\n"
      "a=rtpmap:101 telephone-event/8000\r\n"
      "a=sendrecv\r\n"
      "a=rtcp:30001\r\n";
  EXPECT_EQ(*reply, "9276_3 d6:result2:ok3:sdp" + bstr(expected_sdp) + "e");
  ASSERT_EQ(handler.offers.size(), 1u);
  EXPECT_EQ(handler.offers[0].call_id, "0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b");
  EXPECT_EQ(p.counters().replies, 1u);
}

TEST(NgProcessor, RetransmissionGetsTheSameReplyAndRunsOnce) {
  RecordingHandler handler;
  ng::Processor p(handler);
  const auto now = Clock::now();
  const auto first = p.process(kamailio_offer("9276_3"), "127.0.0.1/5060", now);
  // Kamailio resends the same datagram after rtpengine_tout_ms without a reply.
  const auto again =
      p.process(kamailio_offer("9276_3"), "127.0.0.1/5060", now + std::chrono::seconds(1));
  ASSERT_TRUE(first && again);
  EXPECT_EQ(*first, *again);
  EXPECT_EQ(handler.offers.size(), 1u);  // the offer ran once: one set of ports
  EXPECT_EQ(p.counters().retransmissions, 1u);
  // A new cookie is a new command; so is the same cookie from another proxy process.
  EXPECT_NE(p.process(kamailio_offer("9276_4"), "127.0.0.1/5060", now), first);
  p.process(kamailio_offer("9276_3"), "127.0.0.1/5062", now);
  EXPECT_EQ(handler.offers.size(), 3u);
  EXPECT_EQ(handler.next_port, 30006);
}

TEST(NgProcessor, ErrorsAreRepliesNeverCrashes) {
  RecordingHandler handler;
  ng::Processor p(handler);
  const auto now = Clock::now();
  EXPECT_EQ(
      p.process("1_1 d7:command5:startoe", "s", now),
      error_reply("1_1", "malformed message: bencode: dictionary key is not a string at byte 17"));
  EXPECT_EQ(p.process("1_2 d7:command4:jumpe", "s", now),
            error_reply("1_2", "unknown command \"jump\""));
  EXPECT_EQ(p.process("1_3 ", "s", now),
            error_reply("1_3", "malformed message: bencode: empty input at byte 0"));
  EXPECT_FALSE(p.process("no-cookie-here", "s", now));
  EXPECT_EQ(p.counters().dropped, 1u);
  handler.refuse = "not enough key towards sae-b for 1.6 Mbit/s";
  EXPECT_EQ(p.process(kamailio_offer("1_4"), "s", now),
            error_reply("1_4", "not enough key towards sae-b for 1.6 Mbit/s"));
  handler.refuse.clear();
  handler.throw_internal = true;
  EXPECT_EQ(p.process(kamailio_offer("1_5"), "s", now),
            error_reply("1_5", "internal error: port pool"));
  EXPECT_EQ(p.counters().errors, 5u);
}

// Every refusal is one log line at the gateway too (the proxy logs it in its own words, if
// at all): what was refused, for which call, from where, and why; never the SDP.
TEST(NgProcessor, RefusalsAreLoggedOneLineEach) {
  RecordingHandler handler;
  ng::Processor p(handler);
  std::vector<std::string> lines;
  p.set_refusal_log([&](const std::string& line) { lines.push_back(line); });
  const auto now = Clock::now();
  p.process(kamailio_offer("2_1"), "127.0.0.1:5060", now);  // accepted: no line
  handler.refuse = "key budget: this call's media need 70 kbit/s of pad";
  p.process(kamailio_offer("2_2"), "127.0.0.1:5060", now);
  handler.refuse.clear();
  handler.full = "no free key lane (sip.max_media = 8)";
  p.process(kamailio_offer("2_3"), "127.0.0.1:5060", now);
  p.process("2_4 d7:command4:jumpe", "127.0.0.1:5060", now);
  // A command name that would start a forged line of its own stays on this one.
  p.process("2_5 d7:command29:x\notp-gateway[info]: all finee", "127.0.0.1:5060", now);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[3].find('\n'), std::string::npos) << lines[3];
  EXPECT_NE(lines[3].find("x?otp-gateway[info]: all fine"), std::string::npos) << lines[3];
  EXPECT_EQ(lines[0],
            "offer for call 0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b from 127.0.0.1:5060 refused: "
            "key budget: this call's media need 70 kbit/s of pad");
  EXPECT_EQ(lines[1],
            "offer for call 0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b from 127.0.0.1:5060 refused: "
            "no free key lane (sip.max_media = 8)");
  EXPECT_EQ(lines[2], "request from 127.0.0.1:5060 refused: unknown command \"jump\"");
  for (const auto& line : lines) EXPECT_EQ(line.find("v=0"), std::string::npos) << line;
}

TEST(NgProcessor, DeleteQueryListAndPing) {
  RecordingHandler handler;
  ng::Processor p(handler);
  const auto now = Clock::now();
  EXPECT_EQ(p.process("5323_1 d7:command4:pinge", "s", now), "5323_1 d6:result4:ponge");
  EXPECT_EQ(p.process(kamailio_answer("2_1", kOfferSdp), "s", now)->substr(0, 20),
            "2_1 d6:result2:ok3:s");
  EXPECT_EQ(p.process("2_2 d7:call-id1:x8:from-tag1:f7:command6:deletee", "s", now),
            "2_2 d6:result2:ok7:warning12:unknown calle");
  EXPECT_EQ(p.process("2_3 d7:call-id36:0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b8:from-tag1:f"
                      "7:command6:deletee",
                      "s", now),
            "2_3 d6:result2:oke");
  EXPECT_EQ(p.process("2_4 d7:command4:list5:limiti1ee", "s", now),
            "2_4 d5:callsl2:c1e6:result2:oke");
  EXPECT_EQ(handler.list_limit, 1u);
  EXPECT_EQ(p.process("2_5 d7:command4:liste", "s", now), "2_5 d5:callsl2:c12:c2e6:result2:oke");
  EXPECT_EQ(handler.list_limit, 32u);  // rtpengine's default
  const auto q = p.process("2_6 d7:command5:query7:call-id2:c1e", "s", now);
  ASSERT_TRUE(q);
  EXPECT_NE(q->find("6:result2:ok"), std::string::npos);
}

TEST(NgReplyCache, BoundedInEntriesAndAge) {
  ng::ReplyCache cache(2, std::chrono::seconds(30));
  const auto t0 = Clock::now();
  cache.insert("a", "ra", "A", t0);
  cache.insert("b", "rb", "B", t0);
  cache.insert("c", "rc", "C", t0);  // evicts the oldest
  EXPECT_EQ(cache.find("a", "ra", t0), nullptr);
  ASSERT_NE(cache.find("b", "rb", t0), nullptr);
  EXPECT_EQ(*cache.find("c", "rc", t0), "C");
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.find("c", "rc", t0 + std::chrono::seconds(31)), nullptr);
  EXPECT_EQ(cache.size(), 0u);
}

// A restarted Kamailio counts its cookies from the start again (`<rank>_<pid>_<seq>`; a
// container often gives the new process the same pids, and the module's socket may get
// the same source port): a cached cookie with another request is a new command, run and
// answered for itself, never with the reply cached for the old process's request.
TEST(NgProcessor, AReusedCookieWithAnotherRequestIsRunNotAnsweredFromTheCache) {
  RecordingHandler handler;
  ng::Processor p(handler);
  const auto now = Clock::now();
  const auto first = p.process(kamailio_offer("1_4104_7"), "127.0.0.1/40000", now);
  std::string other = kamailio_offer("1_4104_7");
  const std::string old_id = "0ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b";
  other.replace(other.find(old_id), old_id.size(), "1ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b");
  const auto second = p.process(other, "127.0.0.1/40000", now + std::chrono::seconds(2));
  ASSERT_TRUE(first && second);
  EXPECT_NE(*first, *second);
  ASSERT_EQ(handler.offers.size(), 2u);
  EXPECT_EQ(handler.offers[1].call_id, "1ba2cf53-9a78-41de-8fe6-f8b3a2b6ae4b");
  EXPECT_NE(second->find("a=rtcp:30003"), std::string::npos) << *second;  // its own ports
  EXPECT_EQ(p.counters().cookie_reused, 1u);
  EXPECT_EQ(p.counters().retransmissions, 0u);
  // The new request now owns the cookie: its own retransmission gets its own reply.
  EXPECT_EQ(p.process(other, "127.0.0.1/40000", now + std::chrono::seconds(3)), second);
  EXPECT_EQ(handler.offers.size(), 2u);
  EXPECT_EQ(p.counters().retransmissions, 1u);
}

TEST(NgReplyCache, ARequestIsARetransmissionOnlyByteForByteAndBytesAreBounded) {
  ng::ReplyCache cache(100, std::chrono::seconds(30), 10);
  const auto t0 = Clock::now();
  cache.insert("k", "req", "REP", t0);
  bool reused = false;
  EXPECT_EQ(cache.find("k", "req2", t0, &reused), nullptr);
  EXPECT_TRUE(reused);
  ASSERT_NE(cache.find("k", "req", t0, &reused), nullptr);
  EXPECT_FALSE(reused);
  cache.insert("k", "new", "NEW", t0);  // replaces
  EXPECT_EQ(cache.find("k", "req", t0), nullptr);
  EXPECT_EQ(*cache.find("k", "new", t0), "NEW");
  cache.insert("j", "abc", "DEF", t0);  // 6 + 6 bytes > 10: the oldest goes
  EXPECT_EQ(cache.find("k", "new", t0), nullptr);
  EXPECT_EQ(*cache.find("j", "abc", t0), "DEF");
  EXPECT_EQ(cache.size(), 1u);
}

// A full instance: to Kamailio (which sends supports: load limit) `result: load limit`
// with the detail as `message`; to a proxy that does not announce it exactly
// "Parallel session limit reached", the one error-reason Kamailio's module moves to the
// next instance of its set for (it compares the whole string, length included).
TEST(NgProcessor, AFullInstanceAnswersLoadLimitOrTheExactSessionLimitReason) {
  RecordingHandler handler;
  handler.full = "no call key lane free: 1 call media run already (sip.max_media)";
  ng::Processor p(handler);
  const auto now = Clock::now();
  const auto kamailio = p.process(kamailio_offer("1_1_1"), "127.0.0.1/1", now);
  ASSERT_TRUE(kamailio);
  EXPECT_EQ(*kamailio, "1_1_1 d7:message" + bstr(handler.full) + "6:result10:load limite");
  std::string without = kamailio_offer("1_1_2");
  without.erase(without.find("8:supportsl10:load limite"), 25);
  const auto other = p.process(without, "127.0.0.1/1", now);
  ASSERT_TRUE(other);
  EXPECT_EQ(*other, error_reply("1_1_2", "Parallel session limit reached"));
  EXPECT_EQ(p.counters().overloaded, 2u);
  handler.full.clear();
  handler.refuse = "key budget: ...";  // other refusals keep their reason
  EXPECT_EQ(*p.process(kamailio_offer("1_1_3"), "127.0.0.1/1", now),
            error_reply("1_1_3", "key budget: ..."));
}

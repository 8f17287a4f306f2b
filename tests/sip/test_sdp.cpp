// SPDX-License-Identifier: LGPL-2.1-or-later
// SDP parsing and rewriting with SDP as baresip, Cisco and Poly room systems send it and
// Kamailio forwards it (unchanged): offers, hold, added video, rejected media, ICE.
#include <gtest/gtest.h>

#include <string>

#include "otpgate/sip.hpp"

namespace sdp = otpgate::sdp;

namespace {

// baresip 1.0 (Opus + VP8, no ICE), as Kamailio forwards its INVITE.
const std::string kBaresip =
    "v=0\r\n"
    "o=- 1186837357 1976489876 IN IP4 192.0.2.10\r\n"
    "s=-\r\n"
    "c=IN IP4 192.0.2.10\r\n"
    "t=0 0\r\n"
    "a=tool:baresip 1.0.0\r\n"
    "m=audio 10000 RTP/AVP 96 0 8 101\r\n"
    "b=AS:106\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=fmtp:96 stereo=1;sprop-stereo=1\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=sendrecv\r\n"
    "a=label:1\r\n"
    "a=ssrc:3188397124 cname:8c6a0ac0-1c43-4d2e\r\n"
    "m=video 10002 RTP/AVP 97\r\n"
    "a=rtpmap:97 VP8/90000\r\n"
    "a=fmtp:97 max-fs=3600;max-fr=30\r\n"
    "a=rtcp-fb:* nack\r\n"
    "a=rtcp-fb:* nack pli\r\n"
    "a=rtcp-fb:* ccm fir\r\n"
    "a=sendrecv\r\n"
    "a=label:2\r\n";

// A Cisco room system: session and media bandwidth, H.264 main and content (slides)
// video, BFCP for the floor, TIAS on every RTP media.
const std::string kCisco =
    "v=0\r\n"
    "o=tandberg 3 1 IN IP4 198.51.100.7\r\n"
    "s=-\r\n"
    "c=IN IP4 198.51.100.7\r\n"
    "b=AS:6000\r\n"
    "t=0 0\r\n"
    "m=audio 2326 RTP/AVP 108 101 9 0 8\r\n"
    "b=TIAS:128000\r\n"
    "a=rtpmap:108 MP4A-LATM/90000\r\n"
    "a=fmtp:108 profile-level-id=24;object=23;bitrate=128000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=sendrecv\r\n"
    "m=video 2328 RTP/AVP 97 126\r\n"
    "b=TIAS:6000000\r\n"
    "a=rtpmap:97 H264/90000\r\n"
    "a=fmtp:97 profile-level-id=428016;max-mbps=490000;max-fs=8160;packetization-mode=0\r\n"
    "a=rtpmap:126 H264/90000\r\n"
    "a=fmtp:126 profile-level-id=428016;max-mbps=490000;max-fs=8160;packetization-mode=1\r\n"
    "a=content:main\r\n"
    "a=label:11\r\n"
    "a=rtcp:2329 IN IP4 198.51.100.7\r\n"
    "a=sendrecv\r\n"
    "m=application 5070 UDP/BFCP *\r\n"
    "a=floorctrl:c-s\r\n"
    "a=confid:1\r\n"
    "a=floorid:2 mstrm:12\r\n"
    "a=userid:3\r\n"
    "m=video 2330 RTP/AVP 97\r\n"
    "b=AS:1920\r\n"
    "a=rtpmap:97 H264/90000\r\n"
    "a=content:slides\r\n"
    "a=label:12\r\n"
    "a=sendrecv\r\n";

// A Poly endpoint with ICE, RTCP on the next port, G.722 first; sent with LF line ends.
const std::string kPolyIceLf =
    "v=0\n"
    "o=- 1619611232 1619611232 IN IP4 198.51.100.20\n"
    "s=Polycom IP Phone\n"
    "c=IN IP4 198.51.100.20\n"
    "t=0 0\n"
    "a=ice-options:trickle\n"
    "m=audio 2222 RTP/AVP 9 0 8 18 127\n"
    "a=rtpmap:9 G722/8000\n"
    "a=rtpmap:0 PCMU/8000\n"
    "a=rtpmap:8 PCMA/8000\n"
    "a=rtpmap:18 G729/8000\n"
    "a=fmtp:18 annexb=no\n"
    "a=rtpmap:127 telephone-event/8000\n"
    "a=ice-ufrag:Zm9vYmFy\n"
    "a=ice-pwd:c2VjcmV0cGFzc3dvcmRmb3JpY2U\n"
    "a=candidate:1 1 UDP 2130706431 198.51.100.20 2222 typ host\n"
    "a=candidate:1 2 UDP 2130706430 198.51.100.20 2223 typ host\n"
    "a=candidate:2 1 UDP 1694498815 203.0.113.99 40222 typ srflx raddr 198.51.100.20 rport 2222\n"
    "a=end-of-candidates\n"
    "a=rtcp:2223 IN IP4 198.51.100.20\n"
    "a=sendrecv\n";

sdp::Rewrite to_gateway(std::size_t media, std::uint16_t first_port = 40000) {
  sdp::Rewrite r;
  r.address = "203.0.113.5";
  for (std::size_t i = 0; i < media; ++i) {
    const auto port = static_cast<std::uint16_t>(first_port + 2 * i);
    r.ports.push_back({port, static_cast<std::uint16_t>(port + 1)});
  }
  return r;
}

}  // namespace

TEST(Sdp, ParsesSessionAndMediaSections) {
  const sdp::Session s = sdp::parse(kCisco);
  ASSERT_EQ(s.media.size(), 4u);
  EXPECT_EQ(s.lines.front(), (sdp::Line{'v', "0"}));
  EXPECT_EQ(s.media[0].type, "audio");
  EXPECT_EQ(s.media[0].port, 2326);
  EXPECT_EQ(s.media[0].proto, "RTP/AVP");
  EXPECT_EQ(s.media[0].formats, (std::vector<std::string>{"108", "101", "9", "0", "8"}));
  EXPECT_TRUE(s.media[0].rtp());
  EXPECT_EQ(s.media[2].type, "application");
  EXPECT_FALSE(s.media[2].rtp());
  EXPECT_EQ(sdp::attributes(s.media[3], "content"), (std::vector<std::string>{"slides"}));
  const auto c = sdp::connection(s, s.media[1]);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->address, "198.51.100.7");
  EXPECT_EQ(sdp::direction(s, s.media[1]), sdp::Direction::sendrecv);
  // Unchanged lines come out as they went in.
  EXPECT_EQ(sdp::format(s), kCisco);
}

TEST(Sdp, ToleratesLfAndWritesCrlf) {
  const sdp::Session s = sdp::parse(kPolyIceLf);
  std::string crlf;
  for (const char ch : kPolyIceLf) {
    if (ch == '\n') crlf += '\r';
    crlf += ch;
  }
  EXPECT_EQ(sdp::format(s), crlf);
  EXPECT_EQ(sdp::format(sdp::parse(kBaresip + "\r\n")), kBaresip);  // a trailing blank line
}

TEST(Sdp, RewritesBaresipOfferTowardsThePartnerSite) {
  sdp::Rewrite r = to_gateway(2);
  r.replace_origin = true;
  r.otp_sae = "sae-a";
  const std::string out = sdp::format(sdp::rewrite(sdp::parse(kBaresip), r));
  EXPECT_EQ(out,
            "v=0\r\n"
            "o=- 1186837357 1976489876 IN IP4 203.0.113.5\r\n"
            "s=-\r\n"
            "c=IN IP4 203.0.113.5\r\n"
            "t=0 0\r\n"
            "a=tool:baresip 1.0.0\r\n"
            "m=audio 40000 RTP/AVP 96 0 8 101\r\n"
            "b=AS:106\r\n"
            "a=rtpmap:96 opus/48000/2\r\n"
            "a=fmtp:96 stereo=1;sprop-stereo=1\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\n"
            "a=fmtp:101 0-15\r\n"
            "a=sendrecv\r\n"
            "a=label:1\r\n"
            "a=ssrc:3188397124 cname:8c6a0ac0-1c43-4d2e\r\n"
            "a=rtcp:40001\r\n"
            "a=x-otp:sae-a\r\n"
            "m=video 40002 RTP/AVP 97\r\n"
            "a=rtpmap:97 VP8/90000\r\n"
            "a=fmtp:97 max-fs=3600;max-fr=30\r\n"
            "a=rtcp-fb:* nack\r\n"
            "a=rtcp-fb:* nack pli\r\n"
            "a=rtcp-fb:* ccm fir\r\n"
            "a=sendrecv\r\n"
            "a=label:2\r\n"
            "a=rtcp:40003\r\n"
            "a=x-otp:sae-a\r\n");
  // The partner's gateway reads the marker back per media.
  const sdp::Session back = sdp::parse(out);
  EXPECT_EQ(sdp::otp_sae(back, back.media[0]), "sae-a");
  EXPECT_EQ(sdp::otp_sae(back, back.media[1]), "sae-a");
  EXPECT_EQ(sdp::otp_sae(sdp::parse(kBaresip), sdp::parse(kBaresip).media[0]), std::nullopt);
}

TEST(Sdp, StripsIceAndRewritesFullRtcpAttribute) {
  sdp::Rewrite r = to_gateway(1);
  r.strip_ice = true;
  const sdp::Session s = sdp::rewrite(sdp::parse(kPolyIceLf), r);
  EXPECT_EQ(sdp::format(s),
            "v=0\r\n"
            "o=- 1619611232 1619611232 IN IP4 198.51.100.20\r\n"
            "s=Polycom IP Phone\r\n"
            "c=IN IP4 203.0.113.5\r\n"
            "t=0 0\r\n"
            "m=audio 40000 RTP/AVP 9 0 8 18 127\r\n"
            "a=rtpmap:9 G722/8000\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:18 G729/8000\r\n"
            "a=fmtp:18 annexb=no\r\n"
            "a=rtpmap:127 telephone-event/8000\r\n"
            "a=rtcp:40001 IN IP4 203.0.113.5\r\n"
            "a=sendrecv\r\n");
  // Without strip_ice the ICE lines stay (the leg towards a local ICE endpoint).
  const std::string kept = sdp::format(sdp::rewrite(sdp::parse(kPolyIceLf), to_gateway(1)));
  EXPECT_NE(kept.find("a=ice-ufrag:Zm9vYmFy\r\n"), std::string::npos);
  EXPECT_NE(kept.find("a=candidate:1 1 UDP"), std::string::npos);
}

TEST(Sdp, RewritesEveryMediaOfACiscoCallAndKeepsBandwidthAndContent) {
  sdp::Rewrite r = to_gateway(4);
  r.ports[1].rtcp.reset();  // this media multiplexes RTCP: no a=rtcp
  const sdp::Session s = sdp::rewrite(sdp::parse(kCisco), r);
  EXPECT_EQ(s.media[0].port, 40000);
  EXPECT_EQ(s.media[1].port, 40002);
  EXPECT_TRUE(sdp::attributes(s.media[1], "rtcp").empty());
  EXPECT_EQ(s.media[2].port, 40004);
  EXPECT_EQ(s.media[3].port, 40006);
  EXPECT_EQ(sdp::attributes(s.media[3], "rtcp"), (std::vector<std::string>{"40007"}));
  const std::string out = sdp::format(s);
  for (const char* kept :
       {"b=AS:6000\r\n", "b=TIAS:128000\r\n", "b=TIAS:6000000\r\n", "b=AS:1920\r\n",
        "a=content:slides\r\n", "a=content:main\r\n", "a=floorctrl:c-s\r\n",
        "a=fmtp:126 profile-level-id=428016;max-mbps=490000;max-fs=8160;"
        "packetization-mode=1\r\n"}) {
    EXPECT_NE(out.find(kept), std::string::npos) << kept;
  }
  EXPECT_EQ(out.find("c=IN IP4 198.51.100.7"), std::string::npos);
  EXPECT_EQ(out.find("a=rtcp:2329"), std::string::npos);
  EXPECT_NE(out.find("o=tandberg 3 1 IN IP4 198.51.100.7\r\n"),
            std::string::npos);  // no replace_origin
}

TEST(Sdp, HoldReInviteKeepsZeroAddressAndDirection) {
  // baresip puts the call on hold: c=0.0.0.0 (RFC 2543 style) and a=sendonly.
  const std::string hold =
      "v=0\r\n"
      "o=- 1186837357 1976489877 IN IP4 192.0.2.10\r\n"
      "s=-\r\n"
      "c=IN IP4 0.0.0.0\r\n"
      "t=0 0\r\n"
      "m=audio 10000 RTP/AVP 96 101\r\n"
      "a=rtpmap:96 opus/48000/2\r\n"
      "a=rtpmap:101 telephone-event/8000\r\n"
      "a=sendonly\r\n";
  const sdp::Session in = sdp::parse(hold);
  EXPECT_TRUE(sdp::connection(in, in.media[0])->zero());
  EXPECT_EQ(sdp::direction(in, in.media[0]), sdp::Direction::sendonly);
  const sdp::Session out = sdp::rewrite(in, to_gateway(1));
  EXPECT_EQ(sdp::connection(out, out.media[0])->address, "0.0.0.0");
  EXPECT_EQ(sdp::direction(out, out.media[0]), sdp::Direction::sendonly);
  EXPECT_EQ(out.media[0].port, 40000);
  // Session-level direction applies where the media has none.
  const sdp::Session inactive = sdp::parse(
      "v=0\r\no=- 1 2 IN IP6 2001:db8::1\r\ns=-\r\nc=IN IP6 ::\r\nt=0 0\r\na=inactive\r\n"
      "m=audio 10000 RTP/AVP 0\r\n");
  EXPECT_EQ(sdp::direction(inactive, inactive.media[0]), sdp::Direction::inactive);
  EXPECT_TRUE(sdp::connection(inactive, inactive.media[0])->zero());
}

TEST(Sdp, AddedVideoAndRejectedMedia) {
  // Re-INVITE adding video; the answer rejects it with port 0 (and keeps audio).
  const std::string answer =
      "v=0\r\n"
      "o=- 77 79 IN IP4 192.0.2.20\r\n"
      "s=-\r\n"
      "t=0 0\r\n"
      "m=audio 20000 RTP/AVP 96\r\n"
      "c=IN IP4 192.0.2.20\r\n"
      "a=rtpmap:96 opus/48000/2\r\n"
      "a=sendrecv\r\n"
      "m=video 0 RTP/AVP 97\r\n"
      "c=IN IP4 192.0.2.20\r\n"
      "a=rtpmap:97 VP8/90000\r\n";
  sdp::Rewrite r = to_gateway(2);
  r.otp_sae = "sae-b";
  const sdp::Session s = sdp::rewrite(sdp::parse(answer), r);
  EXPECT_EQ(s.media[0].port, 40000);
  EXPECT_EQ(sdp::connection(s, s.media[0])->address, "203.0.113.5");
  EXPECT_TRUE(s.media[1].rejected());
  EXPECT_EQ(s.media[1].port, 0);  // stays rejected
  EXPECT_EQ(sdp::connection(s, s.media[1])->address, "192.0.2.20");
  EXPECT_EQ(sdp::otp_sae(s, s.media[1]), std::nullopt);  // nothing crosses there
  EXPECT_EQ(sdp::otp_sae(s, s.media[0]), "sae-b");
  EXPECT_EQ(sdp::expected_bitrate(s.media[1]).bits_per_second, 0u);
}

TEST(Sdp, MediaWithoutAnyConnectionGetsOne) {
  const sdp::Session s = sdp::rewrite(
      sdp::parse("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0\r\n"
                 "b=AS:64\r\na=sendrecv\r\n"),
      [] {
        sdp::Rewrite r;
        r.address = "2001:db8::5";
        r.ports = {{6000, std::nullopt}};
        return r;
      }());
  EXPECT_EQ(sdp::format(s),
            "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
            "c=IN IP6 2001:db8::5\r\nb=AS:64\r\na=sendrecv\r\n");
}

TEST(Sdp, RemovesAMarkerTowardsTheLocalEndpoint) {
  sdp::Rewrite r = to_gateway(1);
  r.otp_sae = "sae-b";
  const sdp::Session marked = sdp::rewrite(sdp::parse(kPolyIceLf), r);
  sdp::Rewrite local = to_gateway(1, 50000);
  local.remove_otp = true;
  const std::string out = sdp::format(sdp::rewrite(marked, local));
  EXPECT_EQ(out.find("x-otp"), std::string::npos);
  // Marking again replaces, never doubles, the marker.
  const sdp::Session twice = sdp::rewrite(marked, r);
  EXPECT_EQ(sdp::attributes(twice.media[0], "x-otp"), (std::vector<std::string>{"sae-b"}));
}

TEST(Sdp, RefusesMalformedSdpAndBadOptions) {
  auto error = [](const std::string& text) -> std::string {
    try {
      sdp::parse(text);
    } catch (const sdp::ParseError& e) {
      return e.what();
    }
    return "parsed";
  };
  EXPECT_EQ(error(""), "SDP is empty");
  EXPECT_EQ(error("o=- 1 1 IN IP4 a\r\n"), "SDP line 1: SDP must start with v=0");
  EXPECT_EQ(error("v=0\r\ns=-\r\n"), "SDP has no o= line");
  EXPECT_EQ(error("v=0\r\no=- 1 1 IN IP4 a\r\n"), "SDP has no s= line");
  EXPECT_EQ(error("\r\no=- 1 1 IN IP4 a\r\ns=-\r\n"), "SDP line 1: blank line inside SDP");
  EXPECT_EQ(error("v=0\r\n\r\no=- 1 1 IN IP4 a\r\ns=-\r\n"), "SDP line 2: blank line inside SDP");
  EXPECT_EQ(error("\r\n\n"), "SDP is empty");
  EXPECT_EQ(error("v=0\r\nhello\r\n"), "SDP line 2: not a \"x=value\" line");
  EXPECT_EQ(error("v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 70000 RTP/AVP 0\r\n"),
            "SDP line 4: m= port \"70000\" is not 0-65535");
  EXPECT_EQ(error("v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 7 RTP/AVP\r\n"),
            "SDP line 4: m= needs media, port, protocol and at least one format");
  EXPECT_EQ(error("v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 7/x RTP/AVP 0\r\n"),
            "SDP line 4: m= port count \"/x\" is not a number");
  EXPECT_EQ(error("v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nc=IN IPX a\r\n"),
            "SDP line 4: c= must be \"IN IP4|IP6 address\", not \"IN IPX a\"");
  EXPECT_EQ(error(std::string("v=0\r\ns=a\0b\r\n", 12)), "SDP line 2: holds a NUL or a stray CR");
  EXPECT_EQ(
      sdp::parse("v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 7/2 RTP/AVP 0\r\n").media[0].port_count,
      "/2");
  EXPECT_THROW(sdp::parse(kCisco, 100), sdp::ParseError);
  const sdp::Session s = sdp::parse(kBaresip);
  EXPECT_THROW(sdp::rewrite(s, to_gateway(1)), std::invalid_argument);  // 2 media
  sdp::Rewrite r = to_gateway(2);
  r.otp_sae = "sae\r\na=evil";
  EXPECT_THROW(sdp::rewrite(s, r), std::invalid_argument);
  r.otp_sae = "";
  EXPECT_THROW(sdp::rewrite(s, r), std::invalid_argument);
  r = to_gateway(2);
  r.address.clear();
  EXPECT_THROW(sdp::rewrite(s, r), std::invalid_argument);
}

TEST(SdpBitrate, FromTiasAsOrCodecDefaults) {
  using Source = sdp::Bitrate::Source;
  const sdp::Session cisco = sdp::parse(kCisco);
  EXPECT_EQ(sdp::expected_bitrate(cisco.media[0]).bits_per_second, 128'000u);
  EXPECT_EQ(sdp::expected_bitrate(cisco.media[0]).source, Source::tias);
  EXPECT_EQ(sdp::expected_bitrate(cisco.media[1]).bits_per_second, 6'000'000u);
  EXPECT_EQ(sdp::expected_bitrate(cisco.media[2]).bits_per_second, 0u);  // BFCP, not RTP
  EXPECT_EQ(sdp::expected_bitrate(cisco.media[3]).bits_per_second, 1'920'000u);
  EXPECT_EQ(sdp::expected_bitrate(cisco.media[3]).source, Source::as);
  const sdp::Session baresip = sdp::parse(kBaresip);
  EXPECT_EQ(sdp::expected_bitrate(baresip.media[0]).bits_per_second, 106'000u);
  const sdp::Bitrate vp8 = sdp::expected_bitrate(baresip.media[1]);
  EXPECT_EQ(vp8.bits_per_second, 1'500'000u);
  EXPECT_EQ(vp8.source, Source::codec);
  EXPECT_EQ(vp8.codec, "vp8");
  // Poly: G722 64, PCMU 64, PCMA 64, G729 8 and telephone-event: the highest, 64 kbit/s.
  const sdp::Session poly = sdp::parse(kPolyIceLf);
  EXPECT_EQ(sdp::expected_bitrate(poly.media[0]).bits_per_second, 64'000u);
  EXPECT_EQ(sdp::expected_bitrate(poly.media[0]).codec, "g722");
  // Static payload types without a=rtpmap; Opus's own cap; an unknown audio codec.
  auto rate = [](const std::string& media) {
    return sdp::expected_bitrate(sdp::parse("v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\n" + media).media[0]);
  };
  EXPECT_EQ(rate("m=audio 5 RTP/AVP 18\r\n").bits_per_second, 8'000u);
  EXPECT_EQ(rate("m=audio 5 RTP/AVP 18\r\n").codec, "g729");
  EXPECT_EQ(rate("m=audio 5 RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
                 "a=fmtp:111 minptime=10; useinbandfec=1; maxaveragebitrate=32000\r\n")
                .bits_per_second,
            32'000u);
  EXPECT_EQ(rate("m=audio 5 RTP/AVP 98\r\na=rtpmap:98 x-unknown/16000\r\n").bits_per_second,
            64'000u);
  EXPECT_EQ(rate("m=video 5 UDP/TLS/RTP/SAVPF 100 101\r\na=rtpmap:100 H264/90000\r\n"
                 "a=rtpmap:101 rtx/90000\r\n")
                .bits_per_second,
            1'500'000u);
  EXPECT_EQ(rate("m=audio 5 RTP/AVP 101\r\na=rtpmap:101 telephone-event/8000\r\n").bits_per_second,
            0u);
  EXPECT_EQ(sdp::codec_bitrate("audio", "OPUS"), 64'000u);
  EXPECT_EQ(sdp::codec_bitrate("video", "H264"), 1'500'000u);
  EXPECT_EQ(sdp::codec_bitrate("audio", "H264"), std::nullopt);
}

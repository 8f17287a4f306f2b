// SPDX-License-Identifier: LGPL-2.1-or-later
// libFuzzer target for what the ng control socket takes from the network: every input is
// an ng datagram (cookie, space, bencode) handed to the message layer with a handler that
// parses and rewrites the SDP it carries, and is also decoded as bencode and parsed as SDP
// on its own. Nothing may crash, hang or read out of bounds; a decoded value re-encodes to
// the same value; every reply carries the request's cookie and decodes as a dictionary
// with a result; formatted SDP parses back to the same session.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "otpgate/sip.hpp"

using namespace otpgate;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

void fuzz_sdp(std::string_view text) {
  sdp::Session s;
  try {
    s = sdp::parse(text);
  } catch (const sdp::ParseError&) {
    return;
  }
  const std::string once = sdp::format(s);
  check(sdp::format(sdp::parse(once)) == once);
  for (const auto& m : s.media) {
    (void)sdp::expected_bitrate(m);
    (void)sdp::direction(s, m);
    (void)sdp::connection(s, m);
    (void)sdp::otp_sae(s, m);
  }
  sdp::Rewrite r;
  r.address = "203.0.113.5";
  for (std::size_t i = 0; i < s.media.size(); ++i) {
    r.ports.push_back({static_cast<std::uint16_t>(30000 + 2 * i),
                       i % 2 == 0 ? std::optional<std::uint16_t>(30001 + 2 * i) : std::nullopt});
  }
  r.strip_ice = true;
  r.replace_origin = true;
  r.otp_sae = "sae-a";
  const std::string rewritten = sdp::format(sdp::rewrite(s, r));
  const sdp::Session back = sdp::parse(rewritten);  // must parse: we wrote it
  for (std::size_t i = 0; i < back.media.size(); ++i) {
    if (!back.media[i].rejected()) check(sdp::otp_sae(back, back.media[i]) == "sae-a");
  }
}

class FuzzHandler : public ng::Handler {
 public:
  std::string offer(const ng::Request& q) override { return rewrite(q); }
  std::string answer(const ng::Request& q) override { return rewrite(q); }
  std::optional<std::string> remove(const ng::Request& q) override {
    if (q.call_id.empty()) return "unknown call";
    return std::nullopt;
  }
  ng::QueryResult query(const ng::Request& q) override {
    ng::QueryResult r;
    r.tags.push_back({q.from_tag, q.to_tag, 1, {{"audio", "RTP/AVP", {{1, q.call_id, 2}}}}});
    return r;
  }
  std::vector<std::string> list(std::size_t limit) override {
    return std::vector<std::string>(std::min<std::size_t>(limit, 3), "call");
  }

 private:
  static std::string rewrite(const ng::Request& q) {
    sdp::Session s;
    try {
      s = sdp::parse(q.sdp);
    } catch (const sdp::ParseError& e) {
      throw ng::Refused(e.what());
    }
    sdp::Rewrite r;
    r.address = "2001:db8::5";
    r.ports.assign(s.media.size(), sdp::MediaPorts{40000, 40001});
    r.strip_ice = q.ice == "remove";
    return sdp::format(sdp::rewrite(std::move(s), r));
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);

  try {
    const bencode::Value v = bencode::decode(input);
    const std::string encoded = bencode::encode(v);
    check(bencode::decode(encoded) == v);
    check(bencode::encode(bencode::decode(encoded)) == encoded);
  } catch (const bencode::DecodeError&) {
  }

  static FuzzHandler handler;
  static ng::Processor processor(handler);
  static auto now = ng::ReplyCache::Clock::time_point();
  now += std::chrono::milliseconds(10);  // entries age out as in a long run
  const auto reply = processor.process(input, "127.0.0.1/5060", now);
  if (reply) {
    const auto parts = ng::split_datagram(*reply);
    check(parts.has_value());
    check(parts->cookie == ng::split_datagram(input)->cookie);
    const bencode::Value answer = bencode::decode(parts->body);
    check(answer.dict() != nullptr && answer.dict()->contains("result"));
  }
  if (const auto parts = ng::split_datagram(input)) fuzz_sdp(parts->body);
  fuzz_sdp(input);
  return 0;
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// Known-answer tests: fixed pad bytes in, exact wire bytes out. The expected values
// come from tests/codec/wire_vectors.py, an independent implementation of
// docs/wire-format.md (its own Poly1305 per RFC 8439), and are quoted in that document.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "memory_pad.hpp"
#include "otpgate/otp_codec.hpp"

using namespace otpgate;
using Bytes = std::vector<std::uint8_t>;

namespace {

std::string hex(std::span<const std::uint8_t> bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (auto b : bytes) {
    s.push_back(kHex[b >> 4]);
    s.push_back(kHex[b & 15]);
  }
  return s;
}

Bytes from_hex(const std::string& h) {
  Bytes b;
  for (std::size_t i = 0; i < h.size(); i += 2)
    b.push_back(static_cast<std::uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return b;
}

const Bytes kRtp = from_hex(
    "80600001000000a011223344"
    "70687973696369616e20617564696f21");
const Bytes kRtcp = from_hex(
    "80c8000655667788"
    "000102030405060708090a0b0c0d0e0f10111213");

const std::string kAnnouncement =
    "4f54504100000066000000000000001000000000000000000000040000047e57"
    "00000000000000000000000000007e5700000000000000000000000000017e57"
    "00000000000000000000000000027e5700000000000000000000000000032e14"
    "b6a0d24173f0dddbb8dbdba4ea70";
const std::string kRtpWire =
    "80600001000000a011223344e772e453ca45c04dc112d44ddf57ae6500000000"
    "00000020a766acac2000626e453a205e7aeb0f5d";
const std::string kRtcpWire =
    "80c8000655667788f77bff8307830f8b079b1f9317932fab37bb3fa300000000"
    "00000040f805b917d5598d503f8dcf2ac3ca3852";
const std::string kStreamStart =
    "4f54505300000028010203040506070800000000000000000000000000000020"
    "d5d8516e138279d84e00fbeaf28d6ca7";
const std::string kStreamData =
    "4f54504400000033010203040506070800000000000000010000000000000030"
    "a232a23db676ba34aa0c8ef4c68ffc7b372d8b290c428b93d79eae";
const std::string kStreamFinal =
    "4f5450460000002801020304050607080000000000000002000000000000004b"
    "a8a97b15e3268ffc98907a86d4bea9fb";

}  // namespace

TEST(WireFormatVectors, DatagramMode) {
  otpgate::testing::MemoryPad tx(0, 4096, 1024);
  tx.fill_for_sending();
  otp::Encoder encoder(tx, 0, 0);
  Bytes out(otp::kMaxAnnouncementBytes);
  const std::size_t n = encoder.next_announcement(out, false);
  EXPECT_EQ(hex(std::span(out).first(n)), kAnnouncement);
  EXPECT_EQ(encoder.next_announcement(out, false), 0u);

  std::size_t written = 0;
  ASSERT_EQ(encoder.protect_datagram(kRtp, out, written), otp::Encoder::Status::ok);
  EXPECT_EQ(hex(std::span(out).first(written)), kRtpWire);
  ASSERT_EQ(encoder.protect_datagram(kRtcp, out, written), otp::Encoder::Status::ok);
  EXPECT_EQ(hex(std::span(out).first(written)), kRtcpWire);

  // And the decoder opens exactly these bytes.
  otpgate::testing::MemoryPad rx(0, 4096, 1024);
  otp::Decoder decoder(rx);
  Bytes plain(200);
  EXPECT_EQ(decoder.open_datagram(from_hex(kAnnouncement), plain, written),
            otp::Decoder::Verdict::announcement);
  ASSERT_EQ(decoder.open_datagram(from_hex(kRtpWire), plain, written),
            otp::Decoder::Verdict::plaintext);
  EXPECT_EQ(Bytes(plain.begin(), plain.begin() + static_cast<long>(written)), kRtp);
  ASSERT_EQ(decoder.open_datagram(from_hex(kRtcpWire), plain, written),
            otp::Decoder::Verdict::plaintext);
  EXPECT_EQ(Bytes(plain.begin(), plain.begin() + static_cast<long>(written)), kRtcp);
}

TEST(WireFormatVectors, StreamMode) {
  otpgate::testing::MemoryPad tx(0, 4096, 1024);
  tx.fill_for_sending();
  otp::Encoder encoder(tx, 0x0102030405060708, 0);
  Bytes out(otp::kMaxAnnouncementBytes);
  EXPECT_EQ(hex(std::span(out).first(encoder.next_announcement(out, false))), kAnnouncement);
  std::size_t consumed = 0, written = 0;
  ASSERT_EQ(encoder.protect_record(otp::RecordKind::stream_start, {}, out, consumed, written),
            otp::Encoder::Status::ok);
  EXPECT_EQ(hex(std::span(out).first(written)), kStreamStart);
  const std::string chunk = "exome chunk";
  const Bytes payload(chunk.begin(), chunk.end());
  ASSERT_EQ(encoder.protect_record(otp::RecordKind::data, payload, out, consumed, written),
            otp::Encoder::Status::ok);
  EXPECT_EQ(consumed, payload.size());
  EXPECT_EQ(hex(std::span(out).first(written)), kStreamData);
  ASSERT_EQ(encoder.protect_record(otp::RecordKind::final, {}, out, consumed, written),
            otp::Encoder::Status::ok);
  EXPECT_EQ(hex(std::span(out).first(written)), kStreamFinal);
}

// The exported wire functions (otp_wire.hpp) read the documented fields of these vectors.
TEST(WireFormatVectors, ExportedParsersReadTheDocumentedFields) {
  const Bytes announcement = from_hex(kAnnouncement);
  EXPECT_EQ(otp::classify(announcement), otp::DatagramType::announcement);
  const auto a = otp::parse_announcement(announcement);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->mask_offset, 16u);
  EXPECT_EQ(a->base, 0u);
  EXPECT_EQ(a->key_length, 1024u);
  EXPECT_EQ(a->count, 4u);
  EXPECT_EQ(hex(a->id(3).bytes()), "7e570000000000000000000000000003");
  EXPECT_EQ(hex(a->tag), "2e14b6a0d24173f0dddbb8dbdba4ea70");
  EXPECT_EQ(otp::record_size(announcement), announcement.size());
  // Written back from its keys: the same bytes before the tag.
  std::vector<keys::KeyAnnouncement> keys;
  for (std::uint16_t i = 0; i < a->count; ++i)
    keys.push_back({a->base + 1024u * i, a->id(i), 1024});
  Bytes rewritten(announcement.size());
  EXPECT_EQ(otp::write_announcement(rewritten, a->mask_offset, keys), announcement.size());
  EXPECT_TRUE(std::equal(a->authenticated.begin(), a->authenticated.end(), rewritten.begin()));
  Bytes truncated = announcement;
  truncated.pop_back();
  EXPECT_FALSE(otp::parse_announcement(truncated));

  EXPECT_EQ(otp::datagram_pad_offset(from_hex(kRtpWire)), 32u);
  EXPECT_EQ(otp::datagram_pad_offset(from_hex(kRtcpWire)), 64u);
  EXPECT_EQ(otp::clear_header_length(kRtp, otp::DatagramType::rtp), 12u);
  EXPECT_EQ(otp::clear_header_length(kRtcp, otp::DatagramType::rtcp), 8u);
  EXPECT_FALSE(otp::datagram_pad_offset(Bytes(otp::kTrailerBytes - 1)));

  const Bytes data = from_hex(kStreamData);
  EXPECT_EQ(otp::record_size(std::span(data).first(otp::kRecordPrefixBytes)), data.size());
  const auto h = otp::parse_record_header(data);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->kind, otp::RecordKind::data);
  EXPECT_EQ(h->stream_id, 0x0102030405060708u);
  EXPECT_EQ(h->index, 1u);
  EXPECT_EQ(h->pad_offset, 48u);
  Bytes header(otp::kRecordHeaderBytes);
  otp::write_record_header(header, *h, data.size());
  EXPECT_TRUE(std::equal(header.begin(), header.end(), data.begin()));
  Bytes unknown_kind = data;
  unknown_kind[3] = 'X';
  EXPECT_FALSE(otp::record_size(unknown_kind));
  EXPECT_FALSE(otp::parse_record_header(unknown_kind));

  const Bytes preamble = {'O', 'T', 'P', 'S', 'T', 'R', 'M', 1, 0x4f};
  EXPECT_TRUE(otp::starts_with_preamble(preamble));
  EXPECT_FALSE(otp::starts_with_preamble(std::span(preamble).first(7)));
}

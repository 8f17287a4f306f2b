// SPDX-License-Identifier: LGPL-2.1-or-later
// The OTP codec end to end over in-memory pad: round trips, announcements, and the
// adversarial cases (tampering, replay, loss, reordering, duplication, truncation).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <random>
#include <set>

#include "memory_pad.hpp"
#include "otpgate/checked_cast.hpp"
#include "otpgate/otp_codec.hpp"

using namespace otpgate;
using otp::Decoder;
using otp::Encoder;
using Bytes = std::vector<std::uint8_t>;

namespace {

Bytes rtp_packet(std::uint16_t seq, std::uint32_t ssrc, std::size_t payload, std::uint8_t csrcs = 0,
                 bool extension = false) {
  Bytes p;
  p.push_back(static_cast<std::uint8_t>(0x80 | (extension ? 0x10 : 0) | csrcs));
  p.push_back(96);
  p.push_back(static_cast<std::uint8_t>(seq >> 8));
  p.push_back(static_cast<std::uint8_t>(seq));
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<std::uint8_t>(seq * 160 >> (24 - 8 * i)));
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<std::uint8_t>(ssrc >> (24 - 8 * i)));
  for (int c = 0; c < csrcs; ++c)
    p.insert(p.end(), {0xc5, 0xc5, 0xc5, static_cast<std::uint8_t>(c)});
  if (extension) p.insert(p.end(), {0xbe, 0xde, 0x00, 0x01, 0x10, 0xaa, 0x00, 0x00});
  for (std::size_t i = 0; i < payload; ++i) p.push_back(static_cast<std::uint8_t>(seq + i * 3));
  return p;
}

Bytes rtcp_sender_report(std::uint32_t ssrc) {
  Bytes p{0x80, 200, 0x00, 0x06};
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<std::uint8_t>(ssrc >> (24 - 8 * i)));
  for (int i = 0; i < 20; ++i) p.push_back(static_cast<std::uint8_t>(i));
  // compound: an SDES after it
  p.insert(p.end(), {0x81, 202, 0x00, 0x02, 0, 0, 0, 1, 1, 1, 'x', 0});
  return p;
}

struct Link {
  explicit Link(std::uint32_t key_length = 1024, std::uint64_t pad_bytes = 4u << 20,
                std::uint64_t start = 0)
      : tx(start, pad_bytes, key_length),
        rx(start, pad_bytes, key_length),
        encoder(tx, 42),
        decoder(rx) {
    tx.fill_for_sending();
  }
  // Everything the sender puts on the wire for one packet: announcements, then it.
  std::vector<Bytes> send(const Bytes& packet) {
    std::vector<Bytes> wire;
    Bytes buf(otp::kMaxAnnouncementBytes);
    while (std::size_t n = encoder.next_announcement(buf, true))
      wire.emplace_back(buf.begin(), buf.begin() + n);
    Bytes out(packet.size() + otp::kTrailerBytes);
    std::size_t written = 0;
    if (encoder.protect_datagram(packet, out, written) == Encoder::Status::ok) {
      out.resize(written);
      wire.push_back(out);
    }
    return wire;
  }
  Decoder::Verdict receive(const Bytes& datagram, Bytes* plain = nullptr) {
    Bytes out(datagram.size());
    std::size_t written = 0;
    const auto v = decoder.open_datagram(datagram, out, written);
    if (plain) *plain = Bytes(out.begin(), out.begin() + written);
    return v;
  }
  otpgate::testing::MemoryPad tx, rx;
  Encoder encoder;
  Decoder decoder;
};

}  // namespace

TEST(Codec, RtpRoundTripKeepsTheHeaderInTheClear) {
  Link link;
  const Bytes packet = rtp_packet(1, 0x11223344, 1200, 2, true);
  const auto wire = link.send(packet);
  ASSERT_GE(wire.size(), 2u);  // announcement(s) first
  EXPECT_EQ(otp::classify(wire.front()), otp::DatagramType::announcement);
  const Bytes& protected_packet = wire.back();
  ASSERT_EQ(protected_packet.size(), packet.size() + otp::kTrailerBytes);
  const std::size_t header = 12 + 8 + 8;
  EXPECT_TRUE(std::equal(packet.begin(), packet.begin() + header, protected_packet.begin()));
  EXPECT_FALSE(
      std::equal(packet.begin() + header, packet.end(), protected_packet.begin() + header));
  for (std::size_t i = 0; i + 1 < wire.size(); ++i) {
    EXPECT_EQ(link.receive(wire[i]), Decoder::Verdict::announcement);
  }
  Bytes plain;
  ASSERT_EQ(link.receive(protected_packet, &plain), Decoder::Verdict::plaintext);
  EXPECT_EQ(plain, packet);
}

TEST(Codec, RtcpCompoundIsProtectedAfterItsFirstEightBytes) {
  Link link;
  const Bytes report = rtcp_sender_report(0x55667788);
  const auto wire = link.send(report);
  const Bytes& p = wire.back();
  EXPECT_EQ(otp::classify(p), otp::DatagramType::rtcp);
  EXPECT_TRUE(std::equal(report.begin(), report.begin() + 8, p.begin()));
  EXPECT_FALSE(std::equal(report.begin() + 8, report.end(), p.begin() + 8));
  for (const auto& d : wire) {
    Bytes plain;
    const auto v = link.receive(d, &plain);
    if (&d == &wire.back()) {
      ASSERT_EQ(v, Decoder::Verdict::plaintext);
      EXPECT_EQ(plain, report);
    }
  }
}

TEST(Codec, EveryFlippedBitIsCaughtAndNothingIsConsumed) {
  Link link;
  const Bytes packet = rtp_packet(7, 0xabcdef01, 64, 1, true);
  const auto wire = link.send(packet);
  for (std::size_t i = 0; i + 1 < wire.size(); ++i) link.receive(wire[i]);
  const Bytes good = wire.back();
  std::uint64_t rejected = 0;
  for (std::size_t bit = 0; bit < good.size() * 8; ++bit) {
    Bytes bad = good;
    bad[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
    Bytes plain;
    const auto v = link.receive(bad, &plain);
    EXPECT_NE(v, Decoder::Verdict::plaintext) << "bit " << bit;
    rejected += v != Decoder::Verdict::plaintext;
  }
  EXPECT_EQ(rejected, good.size() * 8);
  EXPECT_GT(link.decoder.stats().auth_failures, good.size() * 6);  // most are tag failures
  Bytes plain;
  ASSERT_EQ(link.receive(good, &plain), Decoder::Verdict::plaintext) << "forgeries burned no pad";
  EXPECT_EQ(plain, packet);
}

TEST(Codec, AReplayedPacketIsRejected) {
  Link link;
  const auto wire = link.send(rtp_packet(1, 1, 200));
  for (const auto& d : wire) link.receive(d);
  EXPECT_EQ(link.receive(wire.back()), Decoder::Verdict::replay);
  EXPECT_EQ(link.decoder.stats().replays, 1u);
  EXPECT_EQ(link.decoder.stats().units, 1u);
}

TEST(Codec, LossReorderingAndDuplicationDeliverEachSurvivorExactlyOnce) {
  Link link;
  std::vector<Bytes> wire;
  std::map<std::uint16_t, Bytes> sent;
  for (std::uint16_t seq = 0; seq < 2000; ++seq) {
    const Bytes p = rtp_packet(seq, 0x1234, 100 + seq % 1100);
    sent[seq] = p;
    for (auto& d : link.send(p)) wire.push_back(std::move(d));
  }
  std::mt19937 rng(7);
  std::vector<Bytes> network;
  for (const auto& d : wire) {
    if (rng() % 10 == 0) continue;  // 10% loss
    network.push_back(d);
    if (rng() % 20 == 0) network.push_back(d);  // 5% duplicates
  }
  for (std::size_t i = 0; i + 8 < network.size(); i += 8) {  // reorder within bursts of 8
    std::shuffle(network.begin() + i, network.begin() + i + 8, rng);
  }
  std::map<std::uint16_t, int> delivered;
  for (const auto& d : network) {
    Bytes plain;
    if (link.receive(d, &plain) == Decoder::Verdict::plaintext) {
      const std::uint16_t seq = static_cast<std::uint16_t>(plain[2] << 8 | plain[3]);
      ASSERT_EQ(plain, sent[seq]);
      ++delivered[seq];
    }
  }
  std::size_t survivors = 0;
  for (const auto& d : wire) {
    if (otp::classify(d) == otp::DatagramType::rtp &&
        std::find(network.begin(), network.end(), d) != network.end()) {
      ++survivors;
    }
  }
  EXPECT_EQ(delivered.size(), survivors) << "every packet that arrived is delivered";
  for (const auto& [seq, count] : delivered) EXPECT_EQ(count, 1) << seq;
  EXPECT_EQ(link.decoder.stats().auth_failures, 0u);
}

TEST(Codec, AnnouncementsSurviveLossThroughRepeats) {
  Link link;
  std::vector<Bytes> wire;
  for (std::uint16_t seq = 0; seq < 200; ++seq) {
    for (auto& d : link.send(rtp_packet(seq, 9, 1000))) wire.push_back(std::move(d));
  }
  // Drop the first transmission of every announcement.
  std::set<Bytes> seen;
  std::size_t ok = 0;
  for (const auto& d : wire) {
    if (otp::classify(d) == otp::DatagramType::announcement && seen.insert(d).second) continue;
    ok += link.receive(d) == Decoder::Verdict::plaintext;
  }
  EXPECT_GE(link.encoder.stats().announcement_repeats, link.encoder.stats().announcements);
  EXPECT_GT(ok, 150u) << "after the first repeat arrives, packets decrypt";
}

TEST(Codec, PacketsWaitingForKeyAreCountedNotDecrypted) {
  Link link;
  link.rx.hold_deliveries = true;  // the KME has not relayed the keys yet
  const auto wire = link.send(rtp_packet(1, 1, 500));
  for (std::size_t i = 0; i + 1 < wire.size(); ++i) {
    EXPECT_EQ(link.receive(wire[i]), Decoder::Verdict::announcement_pending);
  }
  // Its key is on its way (a verified announcement, or the stream's first, named it).
  EXPECT_EQ(link.receive(wire.back()), Decoder::Verdict::key_pending);
  EXPECT_EQ(link.decoder.stats().key_pending, 1u);
  link.rx.release_held();
  link.decoder.poll();
  EXPECT_EQ(link.decoder.stats().announcements_verified, wire.size() - 1);
  EXPECT_EQ(link.receive(wire.back()), Decoder::Verdict::plaintext);
}

// A stream's first announcement names 64 keys; with 256-bit keys (as some vendors' KMEs
// cap them) that is 2 KiB of pad, a few packets. While the receiving KME still relays
// the first keys, the later announcements cannot be verified either (their tags use pad
// the first one named), but they will be once those keys arrive: packets on their pad
// wait too, instead of being dropped as if nobody had announced it.
TEST(Codec, PacketsOnPadOfAnnouncementsTheFirstKeysWillVerifyWaitForThem) {
  Link link(32, 1u << 20);
  link.rx.hold_deliveries = true;  // the receiving KME has not relayed the first keys yet
  std::vector<Bytes> sent, data;
  std::map<Decoder::Verdict, int> verdicts;
  for (std::uint16_t seq = 0; seq < 20; ++seq) {
    sent.push_back(rtp_packet(seq, 3, 500));
    for (const auto& d : link.send(sent.back())) {
      const auto v = link.receive(d);
      if (otp::classify(d) == otp::DatagramType::announcement) continue;
      data.push_back(d);
      ++verdicts[v];
    }
  }
  ASSERT_EQ(data.size(), sent.size());
  EXPECT_EQ(verdicts[Decoder::Verdict::key_pending], 20) << "a packet was dropped, not held";
  link.rx.hold_deliveries = false;  // the keys arrive
  link.rx.release_held();
  link.decoder.poll();
  for (std::size_t i = 0; i < data.size(); ++i) {
    Bytes plain;
    EXPECT_EQ(link.receive(data[i], &plain), Decoder::Verdict::plaintext) << "packet " << i;
    EXPECT_EQ(plain, sent[i]) << "packet " << i;
  }
}

namespace {

// An altered copy of an announcement: one big-endian field rewritten (tag unchanged).
Bytes altered(const Bytes& announcement, std::size_t at, std::uint64_t value, int bytes) {
  Bytes copy = announcement;
  for (int i = bytes - 1; i >= 0; --i, value >>= 8) copy[at + i] = static_cast<std::uint8_t>(value);
  return copy;
}
constexpr std::size_t kMaskAt = otp::kAnnouncementMaskAt, kBaseAt = otp::kAnnouncementBaseAt,
                      kKeyLengthAt = otp::kAnnouncementKeyLengthAt;

std::uint64_t be64(const Bytes& b, std::size_t at) {
  return otp::load_be<std::uint64_t>(std::span(b).subspan(at).first<8>());
}

}  // namespace

TEST(CodecForgery, AlteredCopiesRacingTheGenuineAnnouncementNeverStopTheStream) {
  // Each altered copy arrives just before the genuine announcement it copies: other
  // key_length, other base, other mask offset. The genuine one must still verify, no key
  // may be wiped unused, and every packet must decrypt.
  for (const std::size_t field : {kKeyLengthAt, kBaseAt, kMaskAt}) {
    Link link;
    std::size_t delivered = 0, sent = 0;
    for (std::uint16_t seq = 0; seq < 120; ++seq) {
      for (const auto& d : link.send(rtp_packet(seq, 5, 1000))) {
        if (otp::classify(d) == otp::DatagramType::announcement) {
          const int width = field == kKeyLengthAt ? 4 : 8;
          const std::uint64_t old = field == kKeyLengthAt ? 1024 : be64(d, field);
          const auto forged = altered(d, field, field == kKeyLengthAt ? 512 : old + 4096, width);
          EXPECT_NE(link.receive(forged), Decoder::Verdict::announcement);
          link.receive(d);
          continue;
        }
        ++sent;
        delivered += link.receive(d) == Decoder::Verdict::plaintext;
      }
    }
    EXPECT_EQ(delivered, sent) << "field at byte " << field;
    EXPECT_EQ(link.decoder.stats().replays, 0u);
  }
}

TEST(CodecForgery, AForgedAnnouncementOnHeldPadIsRefusedWithoutFetchingAnything) {
  Link link;
  // The first send announces the whole key ring; hold its last announcement back.
  auto wire = link.send(rtp_packet(0, 5, 1000));
  ASSERT_GE(wire.size(), 3u);
  const Bytes genuine = wire[wire.size() - 2];
  wire.erase(wire.end() - 2);
  for (const auto& d : wire) link.receive(d);
  // Another key_ID and a mask inside pad the receiver holds: verifiable at once, and false.
  const std::uint64_t requests = link.rx.requests;
  // The first key_ID altered.
  Bytes forged = altered(genuine, otp::kAnnouncementKeyIdsAt, 0x0bad0bad0bad0badull, 8);
  EXPECT_EQ(link.receive(forged), Decoder::Verdict::auth_failure);
  EXPECT_EQ(link.rx.requests, requests) << "a forgery made the receiver ask its KME for keys";
  EXPECT_EQ(link.receive(genuine), Decoder::Verdict::announcement);
}

TEST(CodecForgery, PacketsNamingUnannouncedPadAreDroppedAtOnce) {
  Link link;
  for (std::uint16_t seq = 0; seq < 5; ++seq) {
    for (const auto& d : link.send(rtp_packet(seq, 5, 1000))) link.receive(d);
  }
  Bytes forged = link.send(rtp_packet(6, 5, 1000)).back();
  const std::size_t p_at = forged.size() - otp::kTrailerBytes;
  forged = altered(forged, p_at, (12u << 20) + 4096, 8);  // beyond anything announced
  EXPECT_EQ(link.receive(forged), Decoder::Verdict::no_key) << "it must not be made to wait";
  EXPECT_EQ(link.decoder.stats().key_pending, 0u);
}

// Packets on a candidate's pad wait for the keys that will verify it; a forger can copy a
// candidate with its pad moved elsewhere, and packets naming that pad then wait too, but
// only until those keys arrive: the forged candidate fails its tag, its pad is nobody's,
// and the forged packets are dropped, while the genuine stream goes on.
TEST(CodecForgery, APacketOnAForgedCandidatesPadWaitsOnlyUntilTheKeysThatRefuteIt) {
  Link link(32, 64u << 10);        // 32 announcements of 2 KiB, all candidates of the first
  link.rx.hold_deliveries = true;  // the first keys are still being relayed
  const auto wire = link.send(rtp_packet(0, 3, 500));
  ASSERT_GE(wire.size(), 3u);
  const Bytes genuine = wire.back();
  for (std::size_t i = 0; i + 1 < wire.size(); ++i) link.receive(wire[i]);
  // The second announcement (its tag on pad the first one names) with its keys moved to
  // 4 MiB, beyond anything the sender announced.
  const std::uint64_t far = 4u << 20;
  const Bytes forged_announcement = altered(wire[1], kBaseAt, far, 8);
  EXPECT_EQ(link.receive(forged_announcement), Decoder::Verdict::announcement_pending);
  const std::size_t p_at = genuine.size() - otp::kTrailerBytes;
  const Bytes forged_packet = altered(genuine, p_at, far + 64, 8);
  EXPECT_EQ(link.receive(forged_packet), Decoder::Verdict::key_pending);
  EXPECT_EQ(link.receive(genuine), Decoder::Verdict::key_pending);
  link.rx.hold_deliveries = false;  // the keys arrive
  link.rx.release_held();
  link.decoder.poll();
  EXPECT_EQ(link.receive(forged_packet), Decoder::Verdict::no_key) << "the forgery still waits";
  Bytes plain;
  EXPECT_EQ(link.receive(genuine, &plain), Decoder::Verdict::plaintext);
  EXPECT_EQ(plain, rtp_packet(0, 3, 500));
  EXPECT_GE(link.decoder.stats().auth_failures, 1u) << "the forged candidate was not refuted";
}

TEST(CodecForgery, AFloodOfBlindForgeriesLeavesGenuineTrafficAlone) {
  Link link;
  std::mt19937_64 rng(7);
  std::size_t delivered = 0, sent = 0;
  Bytes any_announcement;
  for (std::uint16_t seq = 0; seq < 400; ++seq) {
    for (const auto& d : link.send(rtp_packet(seq, 5, 1000))) {
      if (otp::classify(d) == otp::DatagramType::announcement) {
        if (any_announcement.empty()) any_announcement = d;
      } else {
        ++sent;
      }
      const bool ok = link.receive(d) == Decoder::Verdict::plaintext;
      delivered += ok && otp::classify(d) != otp::DatagramType::announcement;
    }
    // Four blind forgeries per genuine packet: announcements with random key_IDs and pad
    // positions (bootstrap-shaped ones included), and packets at random offsets.
    for (int f = 0; f < 4; ++f) {
      Bytes forged = altered(any_announcement, kMaskAt, rng() % (8u << 20), 8);
      const std::uint64_t base = be64(forged, kMaskAt) / 1024 * 1024;
      forged = altered(forged, kBaseAt, base, 8);
      for (std::size_t k = 30; k + 16 < forged.size(); k += 8)
        forged = altered(forged, k, rng(), 8);
      link.receive(forged);
      Bytes packet = link.send(rtp_packet(1, 5, 100)).back();
      link.receive(altered(packet, packet.size() - otp::kTrailerBytes, rng() % (8u << 20), 8));
    }
  }
  EXPECT_EQ(delivered, sent);
  EXPECT_LE(link.decoder.stats().announcements_pending, 16u + 16u);
}

TEST(Codec, ASmallKeySizeNeedsMoreAnnouncementsButWorks) {
  Link link(32, 1u << 20);  // 256-bit keys, as some vendor KMEs cap them
  std::size_t ok = 0;
  for (std::uint16_t seq = 0; seq < 300; ++seq) {
    for (const auto& d : link.send(rtp_packet(seq, 3, 1200))) {
      ok += link.receive(d) == Decoder::Verdict::plaintext;
    }
  }
  EXPECT_EQ(ok, 300u);
  EXPECT_GT(link.encoder.stats().keys_announced, 300u * 1200 / 32);
}

TEST(Codec, KeyConsumptionIsCloseToOnePerPayloadByte) {
  Link link(1024, 64u << 20);
  std::uint64_t payload = 0;
  for (std::uint32_t i = 0; i < 20000; ++i) {
    const Bytes p = rtp_packet(static_cast<std::uint16_t>(i), 5, 1200);
    for (const auto& d : link.send(p)) link.receive(d);
    payload += 1200;
  }
  const auto& s = link.encoder.stats();
  const double ratio = double(s.pad_bytes_used + s.pad_bytes_skipped) / double(payload);
  EXPECT_LT(ratio, 1.02) << "pad per payload byte";
  EXPECT_EQ(link.decoder.stats().units, 20000u);
}

TEST(Codec, ExhaustedPadRefusesRatherThanSendingPlaintext) {
  Link link(1024, 8192);
  std::size_t protected_count = 0;
  for (std::uint16_t seq = 0; seq < 20; ++seq) {
    const Bytes p = rtp_packet(seq, 1, 1000);
    const auto wire = link.send(p);
    for (const auto& d : wire) {
      EXPECT_NE(d, p) << "never the plaintext";
      protected_count += otp::classify(d) == otp::DatagramType::rtp;
    }
  }
  EXPECT_EQ(protected_count, 8u);  // 16 (r) + 16 (mask) + 8 x 1016 <= 8192
  EXPECT_EQ(link.encoder.stats().no_key, 12u);
}

// ---- stream mode

namespace {
// `aes_rekey` > 0: AES-256-GCM records with a new key every `aes_rekey` records.
std::vector<Bytes> stream_records(Encoder& e, const Bytes& data, std::size_t record_size,
                                  std::uint32_t aes_rekey = 0) {
  std::vector<Bytes> records;
  Bytes buf(otp::kMaxAnnouncementBytes);
  auto announce = [&] {
    while (std::size_t n = e.next_announcement(buf, false))
      records.emplace_back(buf.begin(), buf.begin() + n);
  };
  auto emit = [&](otp::RecordKind kind, std::span<const std::uint8_t> payload) {
    announce();
    Bytes out(payload.size() + otp::kRecordOverhead);
    std::size_t consumed = 0, written = 0;
    EXPECT_EQ(aes_rekey ? e.protect_record_aes(kind, payload, out, consumed, written, aes_rekey)
                        : e.protect_record(kind, payload, out, consumed, written),
              Encoder::Status::ok);
    out.resize(written);
    records.push_back(out);
    return consumed;
  };
  emit(otp::RecordKind::stream_start, {});
  for (std::size_t at = 0; at < data.size();) {
    at += emit(otp::RecordKind::data,
               std::span(data).subspan(at, std::min(record_size, data.size() - at)));
  }
  emit(otp::RecordKind::final, {});
  return records;
}

struct StreamResult {
  Bytes data;
  Decoder::Verdict last = Decoder::Verdict::plaintext;
  bool finished = false;
};

StreamResult open_stream(Decoder& d, const std::vector<Bytes>& records) {
  StreamResult r;
  Bytes out(otp::kMaxUnitPayload);
  for (const auto& rec : records) {
    std::size_t written = 0;
    otp::RecordKind kind{};
    const auto v = d.open_record(rec, out, written, kind);
    if (v != Decoder::Verdict::plaintext && v != Decoder::Verdict::announcement &&
        v != Decoder::Verdict::announcement_pending) {
      r.last = v;
      break;
    }
    r.data.insert(r.data.end(), out.begin(), out.begin() + written);
  }
  r.finished = d.stream_finished();
  return r;
}
}  // namespace

TEST(CodecStream, AFileRoundTripsAcrossEpochs) {
  otpgate::testing::MemoryPad tx(0, 4u << 20, 1024), rx(0, 4u << 20, 1024);
  tx.fill_for_sending();
  Encoder e(tx, 0xfeedfacecafebeef);
  Decoder d(rx);
  Bytes data(1'500'000);
  std::mt19937 rng(3);
  for (auto& b : data) b = static_cast<std::uint8_t>(rng());
  const auto records = stream_records(e, data, 32768);
  const auto result = open_stream(d, records);
  EXPECT_EQ(result.last, Decoder::Verdict::plaintext);
  EXPECT_TRUE(result.finished);
  EXPECT_EQ(result.data, data);
  EXPECT_LT(double(e.stats().pad_bytes_used + e.stats().pad_bytes_skipped) / double(data.size()),
            1.002);
}

TEST(CodecStream, TruncationReorderingAndSplicingAreDetected) {
  Bytes data(200000, 0x42);
  auto make = [&](std::uint64_t id, otpgate::testing::MemoryPad& tx) {
    Encoder e(tx, id);
    return stream_records(e, data, 16384);
  };
  {  // truncated: no final record
    otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
    tx.fill_for_sending();
    auto records = make(1, tx);
    records.pop_back();
    Decoder d(rx);
    EXPECT_FALSE(open_stream(d, records).finished);
  }
  {  // two data records swapped
    otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
    tx.fill_for_sending();
    auto records = make(1, tx);
    std::vector<std::size_t> data_at;
    for (std::size_t i = 0; i < records.size(); ++i)
      if (records[i][3] == 'D') data_at.push_back(i);
    std::swap(records[data_at[1]], records[data_at[2]]);
    Decoder d(rx);
    EXPECT_EQ(open_stream(d, records).last, Decoder::Verdict::out_of_sequence);
  }
  {  // a record of another stream (same pad source) spliced in
    otpgate::testing::MemoryPad tx(0, 2u << 20, 1024), rx(0, 2u << 20, 1024);
    tx.fill_for_sending();
    auto first = make(1, tx);
    auto second = make(2, tx);
    std::size_t data_index = 0;
    while (first[data_index][3] != 'D') ++data_index;
    std::size_t other = 0;
    while (second[other][3] != 'D') ++other;
    first.insert(first.begin() + static_cast<long>(data_index) + 1, second.begin(),
                 second.begin() + static_cast<long>(other));
    first[data_index + 1 + other] = second[other];  // replaces a data record
    Decoder d(rx);
    EXPECT_EQ(open_stream(d, first).last, Decoder::Verdict::out_of_sequence);
  }
}

TEST(CodecStream, NoRecordUsesPadWhoseAnnouncementIsNotSentYet) {
  // Keys that enter the ring between the sender draining announcements and protecting a
  // record must not be used by it: a stream receiver would wait for an announcement
  // queued behind the record. Found when otp-transfer ran the KME dry.
  otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
  tx.fill_for_sending(8192);  // 8 keys ready and queued for announcement
  Encoder e(tx, 5);
  Bytes buf(otp::kMaxAnnouncementBytes), out(otp::kMaxUnitPayload + otp::kRecordOverhead);
  std::vector<Bytes> wire;
  while (std::size_t n = e.next_announcement(buf, false))
    wire.emplace_back(buf.begin(), buf.begin() + n);
  std::size_t consumed = 0, written = 0;
  ASSERT_EQ(e.protect_record(otp::RecordKind::stream_start, {}, out, consumed, written),
            Encoder::Status::ok);
  wire.emplace_back(out.begin(), out.begin() + long(written));
  const Bytes payload(6000, 0x33);  // within the announced 8 KiB
  ASSERT_EQ(e.protect_record(otp::RecordKind::data, payload, out, consumed, written),
            Encoder::Status::ok);
  wire.emplace_back(out.begin(), out.begin() + long(written));
  tx.top_up();  // the refill adds keys (and queues their announcement) right now
  // 4000 more bytes would run past the announced pad: refused until announced.
  const Bytes more(4000, 0x44);
  EXPECT_EQ(e.protect_record(otp::RecordKind::data, more, out, consumed, written),
            Encoder::Status::no_key);
  while (std::size_t n = e.next_announcement(buf, false))
    wire.emplace_back(buf.begin(), buf.begin() + n);
  ASSERT_EQ(e.protect_record(otp::RecordKind::data, more, out, consumed, written),
            Encoder::Status::ok);
  wire.emplace_back(out.begin(), out.begin() + long(written));
  Decoder d(rx);
  const auto result = open_stream(d, wire);
  EXPECT_EQ(result.last, Decoder::Verdict::plaintext);
  EXPECT_EQ(result.data.size(), payload.size() + more.size());
}

namespace {
// A receiver whose KME answers late: requested keys are handed out only once opened.
class LatePad : public keys::PadSource {
 public:
  explicit LatePad(otpgate::testing::MemoryPad& inner) : inner_(inner) {}
  std::optional<std::uint64_t> peek_offset() override { return std::nullopt; }
  std::uint64_t available() const override { return 0; }
  std::optional<std::uint64_t> take(std::span<std::uint8_t>) override { return std::nullopt; }
  std::optional<keys::KeyAnnouncement> next_announcement() override { return std::nullopt; }
  bool request(const keys::KeyAnnouncement& a) override { return inner_.request(a); }
  std::optional<keys::PadSegment> pop_segment() override {
    return open_ ? inner_.pop_segment() : std::nullopt;
  }
  void release(const keys::PadSegment& s) override { inner_.release(s); }
  bool open_ = false;

 private:
  otpgate::testing::MemoryPad& inner_;
};
}  // namespace

TEST(CodecStream, AnnouncementsFarAheadOfSlowKeysAreAllKept) {
  // Stream mode sends each announcement once: hundreds may wait for a slow KME at once.
  otpgate::testing::MemoryPad tx(0, 6u << 20, 256), rx(0, 6u << 20, 256);
  tx.fill_for_sending(6u << 20);
  Encoder e(tx, 8);
  const Bytes data(5'500'000, 0x61);
  auto records = stream_records(e, data, 32768);
  // All announcements first (as when a sender's ring runs far ahead), then the records.
  std::stable_partition(records.begin(), records.end(), [](const Bytes& r) { return r[3] == 'A'; });
  ASSERT_GT(e.stats().announcements, 300u);
  LatePad late(rx);
  Decoder d(late);
  d.use_stream_limits();
  Bytes out(otp::kMaxUnitPayload);
  std::size_t i = 0;
  for (; records[i][3] == 'A'; ++i) {
    std::size_t written = 0;
    otp::RecordKind kind{};
    EXPECT_EQ(d.open_record(records[i], out, written, kind),
              Decoder::Verdict::announcement_pending);
  }
  late.open_ = true;  // the keys arrive
  const auto result = open_stream(d, std::vector<Bytes>(records.begin() + long(i), records.end()));
  EXPECT_EQ(result.last, Decoder::Verdict::plaintext);
  EXPECT_TRUE(result.finished);
  EXPECT_EQ(result.data, data);
}

// ---- stream mode with AES-256-GCM records (keys from the pad)

TEST(CodecStreamAes, AFileRoundTripsWithRekeysAndLittlePad) {
  otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
  tx.fill_for_sending();
  Encoder e(tx, 77);
  Decoder d(rx);
  Bytes data(3'000'000);
  std::mt19937 rng(5);
  for (auto& b : data) b = static_cast<std::uint8_t>(rng());
  const auto records = stream_records(e, data, 32768, 8);
  // Ciphertext, not plaintext, on the wire.
  const Bytes& first_data =
      *std::find_if(records.begin(), records.end(), [](const Bytes& r) { return r[3] == 'D'; });
  EXPECT_NE(0, std::memcmp(first_data.data() + otp::kRecordHeaderBytes, data.data(), 1024));
  const auto result = open_stream(d, records);
  EXPECT_EQ(result.last, Decoder::Verdict::plaintext);
  EXPECT_TRUE(result.finished);
  EXPECT_EQ(result.data, data);
  EXPECT_EQ(e.stats().aes_units, records.size() - e.stats().announcements);
  EXPECT_GE(e.stats().aes_rekeys, 12u);  // ~94 records / 8
  // Pad only for keys (and the epoch's r): far below the data size.
  EXPECT_LT(e.stats().pad_bytes_used, 1024u);
  EXPECT_EQ(d.stats().aes_units, e.stats().aes_units);
}

TEST(CodecStreamAes, TamperingForgedKeysAndReorderingAreRejected) {
  Bytes data(400000, 0x5a);
  auto fresh = [](otpgate::testing::MemoryPad& tx) { tx.fill_for_sending(); };
  {  // every flipped byte of a data record fails it
    otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
    fresh(tx);
    Encoder e(tx, 9);
    auto records = stream_records(e, data, 16384, 4);
    std::size_t at = 0;
    while (records[at][3] != 'D') ++at;
    records[at][otp::kRecordHeaderBytes + 100] ^= 1;
    Decoder d(rx);
    EXPECT_EQ(open_stream(d, records).last, Decoder::Verdict::auth_failure);
  }
  {  // a forged record naming a key that is not used yet consumes no pad: the genuine
     // stream that later uses that key still opens
    otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
    fresh(tx);
    Encoder e(tx, 9);
    auto records = stream_records(e, data, 16384, 4);
    std::vector<std::size_t> data_at;
    for (std::size_t i = 0; i < records.size(); ++i)
      if (records[i][3] == 'D') data_at.push_back(i);
    Bytes forged = records[data_at[0]];
    const Bytes& later = records[data_at[8]];  // its key offset is a later key's
    std::copy(later.begin() + 24, later.begin() + 32, forged.begin() + 24);
    Decoder d(rx);
    std::vector<Bytes> with_forgery(records.begin(), records.begin() + long(data_at[0]));
    with_forgery.push_back(forged);
    EXPECT_EQ(open_stream(d, with_forgery).last, Decoder::Verdict::auth_failure);
    const std::vector<Bytes> rest(records.begin() + long(data_at[0]), records.end());
    const auto result = open_stream(d, rest);
    EXPECT_EQ(result.last, Decoder::Verdict::plaintext);
    EXPECT_TRUE(result.finished);
    EXPECT_EQ(result.data, data);
  }
  {  // swapped data records
    otpgate::testing::MemoryPad tx(0, 1u << 20, 1024), rx(0, 1u << 20, 1024);
    fresh(tx);
    Encoder e(tx, 9);
    auto records = stream_records(e, data, 16384, 4);
    std::vector<std::size_t> data_at;
    for (std::size_t i = 0; i < records.size(); ++i)
      if (records[i][3] == 'D') data_at.push_back(i);
    std::swap(records[data_at[2]], records[data_at[3]]);
    Decoder d(rx);
    EXPECT_EQ(open_stream(d, records).last, Decoder::Verdict::out_of_sequence);
  }
}

// ---- AES mode (SRTP AES-256-GCM via libsrtp2, master keys from the pad)

namespace {
Bytes protect_aes(Link& link, const Bytes& packet, std::uint32_t rekey_interval,
                  std::vector<Bytes>& wire) {
  Bytes buf(otp::kMaxAnnouncementBytes);
  while (std::size_t n = link.encoder.next_announcement(buf, true))
    wire.emplace_back(buf.begin(), buf.begin() + n);
  Bytes out(packet.size() + otp::kMaxDatagramOverhead);
  std::size_t written = 0;
  EXPECT_EQ(link.encoder.protect_datagram_aes(packet, out, written, rekey_interval),
            Encoder::Status::ok);
  out.resize(written);
  wire.push_back(out);
  return out;
}
}  // namespace

TEST(CodecAes, RoundTripWithRekeysForRtpAndRtcp) {
  Link link;
  std::vector<Bytes> wire;
  std::vector<Bytes> sent;
  for (std::uint16_t seq = 0; seq < 100; ++seq) {
    sent.push_back(rtp_packet(seq, 0xa5, 1000));
    protect_aes(link, sent.back(), 16, wire);
  }
  sent.push_back(rtcp_sender_report(0xa5));
  protect_aes(link, sent.back(), 16, wire);
  EXPECT_EQ(link.encoder.aes_rekeys(), 7u);  // 101 packets, a new key every 16
  EXPECT_EQ(wire.back().size(), sent.back().size() + 4 + 16 + 8) << "SRTCP index, tag, key offset";
  std::vector<Bytes> got;
  for (const auto& w : wire) {
    Bytes plain;
    if (link.receive(w, &plain) == Decoder::Verdict::plaintext) got.push_back(plain);
  }
  EXPECT_EQ(got, sent);
  EXPECT_EQ(link.decoder.stats().aes_units, 101u);
}

// A receiver that accepts no AES (DecoderConfig::accept_aes = false) refuses AES units
// before opening them, genuine or not, and draws no AES key from the pad for them; the
// sender's announcements (one-time pad) are still verified.
TEST(CodecAes, AReceiverThatAcceptsNoAesRefusesAesUnitsUnopened) {
  Link link;
  std::vector<Bytes> wire;
  for (std::uint16_t seq = 0; seq < 50; ++seq)
    protect_aes(link, rtp_packet(seq, 0xa5, 500), 16, wire);
  otpgate::testing::MemoryPad rx(0, 4u << 20, 1024);
  otp::DecoderConfig config;
  config.accept_aes = false;
  Decoder d(rx, config);
  std::size_t refused = 0, announcements = 0;
  for (const auto& w : wire) {
    Bytes out(w.size());
    std::size_t written = 0;
    const auto v = d.open_datagram(w, out, written);
    if (v == Decoder::Verdict::cipher_refused) ++refused;
    if (v == Decoder::Verdict::announcement) ++announcements;
    EXPECT_NE(v, Decoder::Verdict::plaintext);
    EXPECT_EQ(written, 0u);
  }
  EXPECT_EQ(refused, 50u);
  EXPECT_GT(announcements, 0u);
  EXPECT_EQ(d.stats().cipher_refused, 50u);
  EXPECT_EQ(d.stats().aes_units, 0u);
  // The same wire to a receiver that accepts AES: every packet opens.
  std::size_t opened = 0;
  for (const auto& w : wire) opened += link.receive(w) == Decoder::Verdict::plaintext;
  EXPECT_EQ(opened, 50u);
  // Pad for the announcements only: none for the AES master keys the packets name.
  EXPECT_EQ(d.stats().pad_bytes_used + 4 * otp::kAesKeyBytes, link.decoder.stats().pad_bytes_used);
}

TEST(CodecAes, TamperingAndReplayAreRejected) {
  Link link;
  std::vector<Bytes> wire;
  const Bytes packet = rtp_packet(1, 7, 300);
  const Bytes good = protect_aes(link, packet, 100, wire);
  for (std::size_t i = 0; i + 1 < wire.size(); ++i) link.receive(wire[i]);
  for (std::size_t at : {std::size_t{2}, std::size_t{20}, good.size() - 20, good.size() - 1}) {
    Bytes bad = good;
    bad[at] ^= 1;
    EXPECT_NE(link.receive(bad), Decoder::Verdict::plaintext) << at;
  }
  Bytes plain;
  ASSERT_EQ(link.receive(good, &plain), Decoder::Verdict::plaintext)
      << "forgeries consumed nothing";
  EXPECT_EQ(plain, packet);
  EXPECT_EQ(link.receive(good), Decoder::Verdict::replay);
}

TEST(CodecAes, WhenPadRunsOutTheCurrentKeyCarriesOn) {
  Link link(1024, 4096);
  std::vector<Bytes> wire;
  ASSERT_TRUE(link.encoder.prepare_aes());
  // Use up the pad with OTP packets, then AES still works with the key drawn before.
  for (std::uint16_t seq = 0; seq < 10; ++seq) link.send(rtp_packet(seq, 1, 1000));
  EXPECT_GT(link.encoder.stats().no_key, 0u);
  const Bytes packet = rtp_packet(50, 1, 1000);
  protect_aes(link, packet, 1, wire);  // rekey due, no pad: keep the old key
  EXPECT_EQ(link.encoder.aes_rekeys(), 1u);
}

TEST(SealedMessage, RoundTripsAndRefusesAnyChange) {
  const Bytes key = otpgate::testing::MemoryPad::pad_bytes(1000, 600);
  const std::string text = R"({"audio-1":"v=0 candidate..."})";
  const Bytes plain(text.begin(), text.end());
  const Bytes sealed = otp::seal_message(key, plain);
  ASSERT_EQ(sealed.size(), plain.size() + otp::kTagBytes);
  EXPECT_EQ(std::search(sealed.begin(), sealed.end(), plain.begin(), plain.begin() + 8),
            sealed.end())
      << "encrypted, not only authenticated";
  EXPECT_EQ(otp::open_message(key, sealed), plain);
  for (std::size_t i = 0; i < sealed.size(); ++i) {
    Bytes bad = sealed;
    bad[i] ^= 0x20;
    EXPECT_FALSE(otp::open_message(key, bad)) << i;
  }
  Bytes other_key = key;
  other_key[3] ^= 1;
  EXPECT_FALSE(otp::open_message(other_key, sealed));
  EXPECT_FALSE(otp::open_message(std::span(key).first(40), sealed)) << "key too short";
}

TEST(CheckedCast, RefusesToLoseAValue) {
  EXPECT_EQ(otpgate::checked_cast<std::uint16_t>(std::size_t{65535}), 65535u);
  EXPECT_THROW(otpgate::checked_cast<std::uint16_t>(std::size_t{65536}), std::range_error);
  EXPECT_THROW(otpgate::checked_cast<std::size_t>(-1), std::range_error);
  EXPECT_THROW(otpgate::checked_cast<int>(std::uint64_t{1} << 31), std::range_error);
}

namespace {
// A sender's key source whose second run is a resync run: it starts at the next epoch
// and is announced only once the stream has reached it (as KeySupply does).
class RunThenResyncPad final : public keys::PadSource {
 public:
  RunThenResyncPad(std::uint64_t first_run, std::uint64_t resync_at, std::uint64_t second_run) {
    add_run(0, first_run, false);
    add_run(resync_at, second_run, true);
  }
  std::optional<std::uint64_t> peek_offset() override { return ring_.peek_offset(); }
  std::uint64_t available() const override { return ring_.bytes_available(); }
  std::optional<std::uint64_t> take(std::span<std::uint8_t> out) override {
    return ring_.take(out);
  }
  std::optional<keys::KeyAnnouncement> next_announcement() override {
    if (announcements_.empty()) return std::nullopt;
    const auto position = ring_.peek_offset();
    if (announcements_.front().resync && position && *position < announcements_.front().offset)
      return std::nullopt;
    auto a = announcements_.front();
    announcements_.pop_front();
    return a;
  }
  bool request(const keys::KeyAnnouncement&) override { return false; }
  std::optional<keys::PadSegment> pop_segment() override { return std::nullopt; }
  void release(const keys::PadSegment&) override {}

 private:
  void add_run(std::uint64_t from, std::uint64_t bytes, bool resync) {
    for (std::uint64_t off = from; off < from + bytes; off += 1024) {
      const keys::KeyId id = otpgate::testing::test_key_id(off / 1024);
      announcements_.push_back({off, id, 1024, resync && off == from});
      ring_.push(off, id, otpgate::testing::MemoryPad::pad_bytes(off, 1024));
    }
  }
  keys::KeyRing ring_{64, 1024};
  std::deque<keys::KeyAnnouncement> announcements_;
};
}  // namespace

TEST(Codec, ATailTooShortForAPacketIsSkippedToReachTheResyncRun) {
  // Run one: 2 KiB. Its epoch key, the announcement's mask and two 900-byte packets leave
  // 208 bytes, too few for a third; the resync run at the next epoch is announced only
  // once the stream gets there, so the tail must be wiped for the stream to go on.
  RunThenResyncPad tx(2048, otp::kEpochBytes, 8192);
  otpgate::testing::MemoryPad rx(0, otp::kEpochBytes + 8192, 1024);
  Encoder encoder(tx, 7);
  Decoder decoder(rx);
  Bytes buf(otp::kMaxAnnouncementBytes);
  std::size_t delivered = 0;
  for (std::uint16_t seq = 0; seq < 6; ++seq) {
    const Bytes packet = rtp_packet(seq, 0x5150, 900 - 12);
    Bytes out(packet.size() + otp::kTrailerBytes);
    std::size_t written = 0;
    Encoder::Status status = Encoder::Status::no_key;
    // As otpencrypt does: announcements first, and once more if key is there but unusable.
    for (int attempt = 0; attempt < 2 && status != Encoder::Status::ok; ++attempt) {
      while (std::size_t n = encoder.next_announcement(buf, false)) {
        Bytes a(buf.begin(), buf.begin() + n), scratch(n);
        std::size_t none = 0;
        decoder.open_datagram(a, scratch, none);
      }
      status = encoder.protect_datagram(packet, out, written);
    }
    ASSERT_EQ(status, Encoder::Status::ok) << "packet " << seq << " found no usable key";
    Bytes plain(written);
    std::size_t n = 0;
    ASSERT_EQ(decoder.open_datagram(std::span(out).first(written), plain, n),
              Decoder::Verdict::plaintext)
        << "packet " << seq;
    EXPECT_EQ(Bytes(plain.begin(), plain.begin() + n), packet);
    ++delivered;
  }
  EXPECT_EQ(delivered, 6u);
  // The epoch key, the announcement mask and two masks with 888-byte payloads.
  EXPECT_EQ(encoder.stats().pad_bytes_skipped, 2048u - 16 - 16 - 2 * (16 + 888));
}

TEST(Codec, AWindowSmallerThanTheSendersLeadIsToldApartFromReplays) {
  // The sender announces 2 MiB ahead; the receiver's window holds 256 KiB. Verified keys
  // far ahead move the window past pad the sender has not used yet: its packets are
  // refused as window overruns (raise window-size), not as replays (an attack).
  otpgate::testing::MemoryPad tx(0, 4u << 20, 8192), rx(0, 4u << 20, 8192);
  tx.fill_for_sending(2u << 20);
  Encoder encoder(tx, 9, 0);
  otp::DecoderConfig config;
  config.window_bytes = otp::kEpochBytes;
  Decoder decoder(rx, config);
  Bytes buf(otp::kMaxAnnouncementBytes);
  std::map<Decoder::Verdict, int> verdicts;
  for (std::uint16_t seq = 0; seq < 200; ++seq) {
    while (std::size_t n = encoder.next_announcement(buf, false)) {
      Bytes scratch(n);
      std::size_t none = 0;
      decoder.open_datagram(std::span(buf).first(n), scratch, none);
    }
    const Bytes packet = rtp_packet(seq, 0x77, 1000);
    Bytes out(packet.size() + otp::kTrailerBytes), plain(out.size());
    std::size_t written = 0, n = 0;
    ASSERT_EQ(encoder.protect_datagram(packet, out, written), Encoder::Status::ok);
    ++verdicts[decoder.open_datagram(std::span(out).first(written), plain, n)];
  }
  EXPECT_GT(verdicts[Decoder::Verdict::window_overrun], 0);
  EXPECT_EQ(decoder.stats().window_overruns,
            std::uint64_t(verdicts[Decoder::Verdict::window_overrun]));
  EXPECT_EQ(decoder.stats().replays, 0u) << "a small window was reported as replays";
  // The same receiver with a window larger than the lead delivers everything.
  otpgate::testing::MemoryPad tx2(0, 4u << 20, 8192), rx2(0, 4u << 20, 8192);
  tx2.fill_for_sending(2u << 20);
  Encoder encoder2(tx2, 9, 0);
  config.window_bytes = 4u << 20;
  Decoder decoder2(rx2, config);
  for (std::uint16_t seq = 0; seq < 200; ++seq) {
    while (std::size_t n = encoder2.next_announcement(buf, false)) {
      Bytes scratch(n);
      std::size_t none = 0;
      decoder2.open_datagram(std::span(buf).first(n), scratch, none);
    }
    const Bytes packet = rtp_packet(seq, 0x77, 1000);
    Bytes out(packet.size() + otp::kTrailerBytes), plain(out.size());
    std::size_t written = 0, n = 0;
    ASSERT_EQ(encoder2.protect_datagram(packet, out, written), Encoder::Status::ok);
    EXPECT_EQ(decoder2.open_datagram(std::span(out).first(written), plain, n),
              Decoder::Verdict::plaintext);
  }
}

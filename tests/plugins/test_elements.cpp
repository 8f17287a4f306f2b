// SPDX-License-Identifier: LGPL-2.1-or-later
// otpencrypt/otpdecrypt through GstHarness and real pipelines: round trips, tampering,
// replay, loss/reordering/duplication, key exhaustion, pad-file reuse, configuration
// errors, stream mode over TCP, and keys from qkd-kme-sim over mTLS.
#include <gst/app/gstappsink.h>
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <thread>

#include "memory_pad.hpp"
#include "otpgate/otp_codec.hpp"
#include "test_pki.hpp"

namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

namespace {

class GstEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    g_setenv("GST_PLUGIN_PATH", OTPGATE_PLUGIN_DIR, TRUE);
    gst_init(nullptr, nullptr);
  }
};
const auto* const kGstEnvironment = ::testing::AddGlobalTestEnvironment(new GstEnvironment);

Bytes rtp_packet(std::uint16_t seq, std::uint32_t ssrc, std::size_t payload) {
  Bytes p{0x80, 96, static_cast<std::uint8_t>(seq >> 8), static_cast<std::uint8_t>(seq), 0, 0,
          0,    0};
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<std::uint8_t>(ssrc >> (24 - 8 * i)));
  for (std::size_t i = 0; i < payload; ++i) p.push_back(static_cast<std::uint8_t>(seq * 7 + i));
  return p;
}

GstBuffer* buffer_of(const Bytes& b) {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, b.size(), nullptr);
  gst_buffer_fill(buf, 0, b.data(), b.size());
  return buf;
}

Bytes bytes_of(GstBuffer* buf) {
  Bytes b(gst_buffer_get_size(buf));
  gst_buffer_extract(buf, 0, b.data(), b.size());
  gst_buffer_unref(buf);
  return b;
}

std::vector<Bytes> pull_all(GstHarness* h) {
  std::vector<Bytes> out;
  while (GstBuffer* b = gst_harness_try_pull(h)) out.push_back(bytes_of(b));
  return out;
}

guint64 stat(GstElement* e, const char* field) {
  GstStructure* s = nullptr;
  g_object_get(e, "stats", &s, nullptr);
  guint64 v = 0;
  if (s) gst_structure_get_uint64(s, field, &v);
  if (s) gst_structure_free(s);
  return v;
}

class ElementTest : public ::testing::Test {
 protected:
  void SetUp() override { make_pad(8u << 20); }
  void TearDown() override {
    for (GstHarness* h : harnesses_) gst_harness_teardown(h);
  }
  void make_pad(std::size_t size) {
    Bytes pad(size);
    RAND_bytes(pad.data(), static_cast<int>(pad.size()));
    std::ofstream(pad_path(), std::ios::binary)
        .write(reinterpret_cast<char*>(pad.data()), static_cast<long>(pad.size()));
  }
  std::string pad_path() const { return (dir_ / "pad.bin").string(); }

  GstHarness* encryptor(const char* caps = "application/x-rtp", const char* extra = "") {
    GstElement* e = gst_parse_launch(
        (std::string("otpencrypt pad-file=") + pad_path() + " " + extra).c_str(), nullptr);
    GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
    gst_object_unref(e);
    harnesses_.push_back(h);
    if (caps) gst_harness_set_src_caps_str(h, caps);
    wait_for_key(h->element);
    return h;
  }
  // The refill thread loads the first keys right after start; a sender that pushes
  // before that drops (never sends plaintext), which tests of other things don't want.
  static void wait_for_key(GstElement* e) {
    EXPECT_TRUE(otpgate::testing::eventually([&] { return stat(e, "key-available") > 0; }));
  }
  GstHarness* decryptor(const char* extra = "") {
    GstElement* e = gst_parse_launch(
        (std::string("otpdecrypt pad-file=") + pad_path() + " " + extra).c_str(), nullptr);
    GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
    gst_object_unref(e);
    harnesses_.push_back(h);
    gst_harness_set_src_caps_str(h, "application/x-otp");
    return h;
  }
  // An element on a key supply of the test's own (`key-supply`), with `caps` upstream.
  GstHarness* on_key_supply(const char* factory, otpgate::keys::PadSource& pad, const char* caps) {
    GstElement* e = gst_element_factory_make(factory, nullptr);
    g_object_set(e, "key-supply", &pad, nullptr);
    GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
    gst_object_unref(e);
    harnesses_.push_back(h);
    gst_harness_set_src_caps_str(h, caps);
    return h;
  }
  // A decryptor whose site's KME has not relayed any key yet: `sent` is protected and each
  // packet pushed into it in the buffer `wrap` makes (the caller's reference). What it
  // held and dropped meanwhile (nothing leaves before its key), and what left it, in
  // order, once the keys arrived.
  struct HeldForKeys {
    std::uint64_t held = 0, dropped = 0;
    std::vector<Bytes> released;
  };
  HeldForKeys held_until_keys_arrive(const std::vector<Bytes>& sent,
                                     GstBuffer* (*wrap)(const Bytes&)) {
    constexpr std::uint32_t kKeyLength = 128u << 10;
    otpgate::testing::MemoryPad sending(0, 16u << 20, kKeyLength);
    otpgate::testing::MemoryPad receiving(0, 16u << 20, kKeyLength);
    sending.fill_for_sending(16u << 20);
    receiving.hold_deliveries = true;  // the receiving site's KME has not relayed them yet
    GstHarness* enc = on_key_supply("otpencrypt", sending, "application/x-rtp");
    GstHarness* dec = on_key_supply("otpdecrypt", receiving, "application/x-otp");
    g_object_set(dec->element, "key-wait", 5000u, nullptr);
    HeldForKeys r;
    for (const auto& w : protect(enc, sent)) {
      EXPECT_EQ(gst_harness_push(dec, wrap(w)), GST_FLOW_OK);
      EXPECT_TRUE(pull_all(dec).empty()) << "a packet left before its key arrived";
    }
    r.held = stat(dec->element, "packets-held");
    r.dropped = stat(dec->element, "drops-no-key");
    receiving.release_held();  // the keys arrive: the held packets leave, in order
    EXPECT_TRUE(otpgate::testing::eventually([&] {
      for (auto& out : pull_all(dec)) r.released.push_back(std::move(out));
      return stat(dec->element, "packets-held") == 0;
    }));
    for (auto& out : pull_all(dec)) r.released.push_back(std::move(out));
    for (GstHarness* h : {enc, dec}) {  // before the pads they use go away
      gst_harness_teardown(h);
      std::erase(harnesses_, h);
    }
    return r;
  }
  // An otpencrypt (site A, blocking for key) and an otpdecrypt (site B) on `sim`.
  std::pair<GstHarness*, GstHarness*> kme_pair(const otpgate::kmesim::KmeSimulator& sim,
                                               const std::string& journal) {
    const std::string pki = otpgate::testing::pki_dir().string();
    auto kme = [&](const std::string& me, const std::string& peer) {
      return "kme-url=" + sim.url() + " sae-id=" + me + " peer-sae-id=" + peer +
             " tls-cert=" + pki + "/" + me + ".crt tls-key=" + pki + "/" + me +
             ".key tls-ca=" + pki + "/ca.crt";
    };
    auto harness = [&](const std::string& launch, const char* caps) {
      GstElement* e = gst_parse_launch(launch.c_str(), nullptr);
      GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
      gst_object_unref(e);
      harnesses_.push_back(h);
      gst_harness_set_src_caps_str(h, caps);
      return h;
    };
    return {harness("otpencrypt " + kme("sae-a", "sae-b") +
                        " journal=" + (dir_ / journal).string() + " on-key-exhausted=block",
                    "application/x-rtp"),
            harness("otpdecrypt " + kme("sae-b", "sae-a"), "application/x-otp")};
  }
  // Protects `packets`; returns the wire (announcements and packets, in order).
  std::vector<Bytes> protect(GstHarness* enc, const std::vector<Bytes>& packets) {
    std::vector<Bytes> wire;
    for (const auto& p : packets) {
      EXPECT_EQ(gst_harness_push(enc, buffer_of(p)), GST_FLOW_OK);
      for (auto& w : pull_all(enc)) wire.push_back(std::move(w));
    }
    return wire;
  }
  std::vector<Bytes> open(GstHarness* dec, const std::vector<Bytes>& wire) {
    std::vector<Bytes> plain;
    for (const auto& w : wire) {
      gst_harness_push(dec, buffer_of(w));
      for (auto& p : pull_all(dec)) plain.push_back(std::move(p));
    }
    // Packets whose keys were still being fetched are held (never blocking the stream)
    // and leave in order once the keys are placed.
    EXPECT_TRUE(
        otpgate::testing::eventually([&] { return stat(dec->element, "packets-held") == 0; }));
    for (auto& p : pull_all(dec)) plain.push_back(std::move(p));
    return plain;
  }

  // As a call runs: each packet goes through `enc` and reaches `dec` before the next is
  // sent, `gap` apart; then what `dec` still holds for its keys is waited for. What came
  // out of `dec`, in order.
  std::vector<Bytes> relay_live(GstHarness* enc, GstHarness* dec, const std::vector<Bytes>& sent,
                                std::chrono::milliseconds gap) {
    std::vector<Bytes> got;
    for (const auto& p : sent) {
      EXPECT_EQ(gst_harness_push(enc, buffer_of(p)), GST_FLOW_OK);
      for (const auto& w : pull_all(enc)) {
        gst_harness_push(dec, buffer_of(w));
        for (auto& out : pull_all(dec)) got.push_back(std::move(out));
      }
      std::this_thread::sleep_for(gap);
    }
    EXPECT_TRUE(otpgate::testing::eventually([&] {
      for (auto& out : pull_all(dec)) got.push_back(std::move(out));
      return stat(dec->element, "packets-held") == 0;
    }));
    for (auto& out : pull_all(dec)) got.push_back(std::move(out));
    return got;
  }

  otpgate::testing::TestDir test_dir_;
  const fs::path dir_ = test_dir_.path;
  std::vector<GstHarness*> harnesses_;
};

// Where any 16 bytes of a sent payload appear anywhere on the wire (whatever header or
// trailer a leak would carry), or "" when nowhere. RTP headers stay in the clear and are
// not searched for.
std::string plaintext_on_wire(const std::vector<Bytes>& wire, const std::vector<Bytes>& sent) {
  std::set<Bytes> chunks;
  for (const auto& p : sent)
    for (std::size_t i = 12; i + 16 <= p.size(); ++i)
      chunks.emplace(p.begin() + i, p.begin() + i + 16);
  for (std::size_t d = 0; d < wire.size(); ++d) {
    const Bytes& w = wire[d];
    for (std::size_t i = 0; i + 16 <= w.size(); ++i)
      if (chunks.contains(Bytes(w.begin() + i, w.begin() + i + 16)))
        return "datagram " + std::to_string(d) + ", byte " + std::to_string(i);
  }
  return "";
}

std::vector<Bytes> packets(std::size_t n, std::size_t payload = 1200) {
  std::vector<Bytes> v;
  for (std::size_t i = 0; i < n; ++i)
    v.push_back(rtp_packet(static_cast<std::uint16_t>(i), 0x1000 + i % 3, payload - i % 50));
  return v;
}

}  // namespace

TEST_F(ElementTest, RtpRoundTripIsByteIdenticalWithSeveralSsrcs) {
  GstHarness* enc = encryptor();
  GstHarness* dec = decryptor();
  const auto sent = packets(300);
  const auto wire = protect(enc, sent);
  EXPECT_EQ(plaintext_on_wire(wire, sent), "") << "plaintext on the wire";
  EXPECT_EQ(open(dec, wire), sent);
  EXPECT_EQ(stat(dec->element, "packets-out"), 300u);
  EXPECT_EQ(stat(dec->element, "auth-failures"), 0u);
  EXPECT_GT(stat(enc->element, "announcements"), 0u);
  EXPECT_EQ(stat(enc->element, "packets-in"), 300u);
}

// Both elements send each packet in the buffer they sent the previous one in when
// downstream has let go of it (the gateway's call media send it at once): no allocation
// per packet. A buffer downstream still holds is never written into, and a reused one
// carries nothing of its previous packet (timestamps, flags).
TEST_F(ElementTest, AnOutputBufferIsUsedAgainOnlyOnceDownstreamHasLetGoOfIt) {
  static const GQuark mark = g_quark_from_static_string("test-sent-before");
  // Pulls what `h` sent: the buffers, each marked; `reused` counts those marked already.
  const auto pull_marked = [](GstHarness* h, std::size_t& reused) {
    std::vector<GstBuffer*> out;
    while (GstBuffer* b = gst_harness_try_pull(h)) {
      if (gst_mini_object_get_qdata(GST_MINI_OBJECT(b), mark)) ++reused;
      gst_mini_object_set_qdata(GST_MINI_OBJECT(b), mark, h, nullptr);
      out.push_back(b);
    }
    return out;
  };
  GstHarness* enc = encryptor();
  GstHarness* dec = decryptor();
  const auto sent = packets(40, 300);
  std::vector<Bytes> wire;
  std::size_t reused = 0;
  for (std::size_t i = 0; i < sent.size(); ++i) {
    GstBuffer* in = buffer_of(sent[i]);
    if (i == 0) GST_BUFFER_PTS(in) = GST_SECOND;  // the only one with a timestamp
    ASSERT_EQ(gst_harness_push(enc, in), GST_FLOW_OK);
    for (GstBuffer* b : pull_marked(enc, reused)) {
      if (i > 0) {
        EXPECT_EQ(GST_BUFFER_PTS(b), GST_CLOCK_TIME_NONE) << "packet " << i;
      }
      wire.push_back(bytes_of(b));
    }
  }
  EXPECT_GE(reused, sent.size() - 2) << "the encryptor allocated a buffer per packet";
  // Downstream keeps one: the next packet goes out in another buffer, and the kept one
  // still holds its own packet.
  const Bytes extra = rtp_packet(40, 0x1000, 300);
  ASSERT_EQ(gst_harness_push(enc, buffer_of(extra)), GST_FLOW_OK);
  std::vector<GstBuffer*> kept = pull_marked(enc, reused);
  ASSERT_FALSE(kept.empty());
  const Bytes kept_bytes = bytes_of(gst_buffer_ref(kept.back()));
  const Bytes later = rtp_packet(41, 0x1000, 300);
  ASSERT_EQ(gst_harness_push(enc, buffer_of(later)), GST_FLOW_OK);
  for (GstBuffer* b : pull_marked(enc, reused)) {
    EXPECT_NE(b, kept.back());
    wire.push_back(bytes_of(b));
  }
  EXPECT_EQ(bytes_of(gst_buffer_ref(kept.back())), kept_bytes);
  wire.insert(wire.end() - 1, kept_bytes);
  for (GstBuffer* b : kept) gst_buffer_unref(b);

  std::vector<Bytes> plain;
  std::size_t reused_out = 0;
  for (const auto& w : wire) {
    ASSERT_EQ(gst_harness_push(dec, buffer_of(w)), GST_FLOW_OK);
    // Packets whose keys are still being placed leave later, several at once: taken as
    // they come, as the gateway sends them.
    EXPECT_TRUE(
        otpgate::testing::eventually([&] { return stat(dec->element, "packets-held") == 0; }));
    for (GstBuffer* b : pull_marked(dec, reused_out)) plain.push_back(bytes_of(b));
  }
  std::vector<Bytes> expected = sent;
  expected.push_back(extra);
  expected.push_back(later);
  EXPECT_EQ(plain, expected);
  EXPECT_GE(reused_out, expected.size() / 2) << "the decryptor allocated a buffer per packet";
}

TEST_F(ElementTest, RtcpLeavesOnItsOwnPad) {
  GstHarness* enc = encryptor("application/x-rtcp");
  GstHarness* dec = decryptor();
  GstHarness* rtcp = gst_harness_new_with_element(dec->element, nullptr, "rtcp_src");
  harnesses_.push_back(rtcp);
  Bytes report{0x80, 200, 0, 6, 0, 0, 0x10, 0x01};
  for (int i = 0; i < 20; ++i) report.push_back(static_cast<std::uint8_t>(i));
  const auto wire = protect(enc, {report});
  EXPECT_TRUE(open(dec, wire).empty());
  const auto got = pull_all(rtcp);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], report);
}

TEST_F(ElementTest, OneFlippedBitAnywhereDropsThePacketAndCountsIt) {
  GstHarness* enc = encryptor();
  GstHarness* dec = decryptor();
  const auto wire = protect(enc, {rtp_packet(1, 0xabc, 160)});
  const Bytes good = wire.back();
  open(dec, {wire.begin(), wire.end() - 1});  // announcements
  const std::size_t positions[] = {
      1, 9, 12, 100, good.size() - 24, good.size() - 17, good.size() - 16, good.size() - 1};
  for (std::size_t at : positions) {
    Bytes bad = good;
    bad[at] ^= 0x04;
    EXPECT_TRUE(open(dec, {bad}).empty()) << "byte " << at;
  }
  const guint64 dropped = stat(dec->element, "auth-failures") +
                          stat(dec->element, "drops-malformed") +
                          stat(dec->element, "drops-no-key") + stat(dec->element, "replays");
  EXPECT_EQ(dropped, std::size(positions));
  EXPECT_GE(stat(dec->element, "auth-failures"), 6u);
  EXPECT_EQ(open(dec, {good}).size(), 1u);
}

// drops-no-key counts packets: an announcement naming pad nobody holds (a forgery, or one
// sent on key this receiver lost) is counted as such, not as a dropped packet, so that
// what an operator reads as lost media is media.
TEST_F(ElementTest, AnAnnouncementNobodyCanVerifyIsNotCountedAsADroppedPacket) {
  GstHarness* enc = encryptor();
  GstHarness* dec = decryptor();
  const auto wire = protect(enc, {rtp_packet(1, 0xabc, 160)});
  ASSERT_EQ(otpgate::otp::classify(wire.front()), otpgate::otp::DatagramType::announcement);
  Bytes forged = wire.front();
  // Its mask moved 1000 epochs on: pad far beyond anything announced.
  std::uint64_t mask = 0;
  for (std::size_t i = 0; i < 8; ++i)
    mask = mask << 8 | forged[otpgate::otp::kAnnouncementMaskAt + i];
  mask += 1000 * otpgate::otp::kEpochBytes;
  for (std::size_t i = 0; i < 8; ++i)
    forged[otpgate::otp::kAnnouncementMaskAt + i] = static_cast<std::uint8_t>(mask >> (56 - 8 * i));
  EXPECT_TRUE(open(dec, {forged}).empty());
  EXPECT_EQ(stat(dec->element, "announcements-unverifiable"), 1u);
  EXPECT_EQ(stat(dec->element, "drops-no-key"), 0u);
  EXPECT_EQ(open(dec, wire).size(), 1u);  // the genuine stream is not disturbed
  EXPECT_EQ(stat(dec->element, "drops-no-key"), 0u);
}

TEST_F(ElementTest, AReplayedPacketIsDropped) {
  GstHarness* enc = encryptor();
  GstHarness* dec = decryptor();
  auto wire = protect(enc, {rtp_packet(5, 1, 300)});
  wire.push_back(wire.back());
  EXPECT_EQ(open(dec, wire).size(), 1u);
  EXPECT_EQ(stat(dec->element, "replays"), 1u);
}

TEST_F(ElementTest, LossReorderingAndDuplicatesDeliverEverySurvivorOnce) {
  GstHarness* enc = encryptor();
  GstHarness* dec = decryptor();
  const auto sent = packets(1000, 900);
  const auto wire = protect(enc, sent);
  std::mt19937 rng(11);
  std::vector<Bytes> network;
  std::set<Bytes> survivors;
  for (const auto& w : wire) {
    if (rng() % 10 == 0) continue;
    network.push_back(w);
    if (rng() % 10 == 0) network.push_back(w);
    if (otpgate::otp::classify(w) == otpgate::otp::DatagramType::rtp) survivors.insert(w);
  }
  for (std::size_t i = 0; i + 6 < network.size(); i += 6)
    std::shuffle(network.begin() + i, network.begin() + i + 6, rng);
  const auto got = open(dec, network);
  std::map<Bytes, int> count;
  for (const auto& g : got) ++count[g];
  for (const auto& [packet, n] : count) {
    EXPECT_EQ(n, 1);
    EXPECT_NE(std::find(sent.begin(), sent.end(), packet), sent.end());
  }
  // Every RTP packet that arrived at least once (and whose announcement got through,
  // directly or repeated) came out exactly once.
  EXPECT_GE(got.size() + stat(dec->element, "drops-no-key"), survivors.size());
  EXPECT_GT(got.size(), survivors.size() * 95 / 100);
  EXPECT_EQ(stat(dec->element, "auth-failures"), 0u);
}

TEST_F(ElementTest, KeyExhaustionDropsAndSignalsButNeverSendsPlaintext) {
  make_pad(64 * 1024);
  GstHarness* enc = encryptor();
  int exhausted = 0, low = 0;
  g_signal_connect_swapped(enc->element, "key-exhausted", G_CALLBACK(+[](int* n) { ++*n; }),
                           &exhausted);
  g_signal_connect_swapped(enc->element, "key-low", G_CALLBACK(+[](int* n) { ++*n; }), &low);
  const auto sent = packets(100);
  const auto wire = protect(enc, sent);
  EXPECT_EQ(plaintext_on_wire(wire, sent), "") << "plaintext on the wire";
  EXPECT_GT(stat(enc->element, "drops-no-key"), 40u);
  EXPECT_LT(stat(enc->element, "packets-out"), 70u);
  EXPECT_EQ(exhausted, 1) << "once per episode";
  EXPECT_GE(low, 1);
}

namespace {
// A sender's key source the test runs dry and refills: while closed it holds no key, as a
// KME that has run out; open, it serves `inner` again. Only the element's streaming
// thread calls it; the test only opens and closes it.
class GatedPad final : public otpgate::keys::PadSource {
 public:
  explicit GatedPad(otpgate::keys::PadSource& inner) : inner_(inner) {}
  std::atomic<bool> open{true};
  std::optional<std::uint64_t> peek_offset() override {
    return open ? inner_.peek_offset() : std::nullopt;
  }
  std::uint64_t available() const override { return open ? inner_.available() : 0; }
  std::optional<std::uint64_t> take(std::span<std::uint8_t> out) override {
    return open ? inner_.take(out) : std::nullopt;
  }
  std::optional<otpgate::keys::KeyAnnouncement> next_announcement() override {
    return inner_.next_announcement();
  }
  bool request(const otpgate::keys::KeyAnnouncement& a) override { return inner_.request(a); }
  std::optional<otpgate::keys::PadSegment> pop_segment() override { return inner_.pop_segment(); }
  void release(const otpgate::keys::PadSegment& s) override { inner_.release(s); }

 private:
  otpgate::keys::PadSource& inner_;
};
}  // namespace

// on-key-exhausted=block: a packet that finds no key waits for it (the key-exhausted
// signal says it is waiting) and leaves once key is back, none dropped; shutting down
// while it waits ends the push with FLUSHING, nothing dropped either.
TEST_F(ElementTest, BlockPolicyWaitsForKeyAndShutsDownCleanly) {
  otpgate::testing::MemoryPad memory(0, 4u << 20, 4096);
  memory.fill_for_sending();
  GatedPad pad(memory);
  GstElement* e = gst_element_factory_make("otpencrypt", nullptr);
  g_object_set(e, "key-supply", static_cast<otpgate::keys::PadSource*>(&pad), nullptr);
  gst_util_set_object_arg(G_OBJECT(e), "on-key-exhausted", "block");
  GstHarness* enc = gst_harness_new_with_element(e, "sink", "src");
  gst_object_unref(e);
  harnesses_.push_back(enc);
  gst_harness_set_src_caps_str(enc, "application/x-rtp");
  std::atomic<int> exhausted{0};
  g_signal_connect_swapped(enc->element, "key-exhausted",
                           G_CALLBACK(+[](std::atomic<int>* n) { ++*n; }), &exhausted);
  EXPECT_FALSE(protect(enc, packets(5)).empty());
  auto push_all = [&](const std::vector<Bytes>& ps, std::atomic<GstFlowReturn>& result) {
    return std::thread([&, ps] {
      for (const auto& p : ps) {
        result = gst_harness_push(enc, buffer_of(p));
        if (result != GST_FLOW_OK) break;
      }
    });
  };
  // The key runs out: the pusher's first packet waits; key comes back: all of them leave.
  pad.open = false;
  const auto sent = packets(40);
  std::atomic<GstFlowReturn> result{GST_FLOW_OK};
  std::thread pusher = push_all(sent, result);
  EXPECT_TRUE(otpgate::testing::eventually([&] { return exhausted == 1; }));
  pad.open = true;
  pusher.join();
  EXPECT_EQ(result.load(), GST_FLOW_OK);
  EXPECT_EQ(stat(enc->element, "drops-no-key"), 0u) << "waiting for key, not dropping";
  const auto wire = pull_all(enc);
  EXPECT_EQ(std::count_if(wire.begin(), wire.end(),
                          [](const Bytes& w) {
                            return otpgate::otp::classify(w) == otpgate::otp::DatagramType::rtp;
                          }),
            40)
      << "every packet left once key was back";
  EXPECT_EQ(plaintext_on_wire(wire, sent), "") << "plaintext on the wire";
  // It runs out again, and the element is shut down while a packet waits.
  pad.open = false;
  std::thread waiting = push_all(packets(10), result);
  EXPECT_TRUE(otpgate::testing::eventually([&] { return exhausted == 2; }));
  gst_element_set_state(enc->element, GST_STATE_NULL);
  waiting.join();
  EXPECT_EQ(result.load(), GST_FLOW_FLUSHING);
  EXPECT_EQ(stat(enc->element, "drops-no-key"), 0u);
}

// non-blocking=true (how otp-gateway drives many calls from one thread): a packet that
// would wait for key never holds up the push. Packets are held in arrival order (4096 at
// most, the oldest gives way) and leave once key comes; past key-wait they are dropped;
// stopping drops what is held. Nothing ever leaves in the clear.
TEST_F(ElementTest, NonBlockingHoldsPacketsInOrderUntilKeyComesAndNeverWaitsInThePush) {
  otpgate::testing::MemoryPad memory(0, 4u << 20, 4096);
  memory.fill_for_sending();
  GatedPad pad(memory);
  pad.open = false;  // the stream's first key is still on its way
  auto make = [&](const char* key_wait) {
    GstElement* e = gst_element_factory_make("otpencrypt", nullptr);
    g_object_set(e, "key-supply", static_cast<otpgate::keys::PadSource*>(&pad), nullptr);
    gst_util_set_object_arg(G_OBJECT(e), "on-key-exhausted", "block");
    gst_util_set_object_arg(G_OBJECT(e), "non-blocking", "true");
    gst_util_set_object_arg(G_OBJECT(e), "key-wait", key_wait);
    GstHarness* h = gst_harness_new_with_element(e, "sink", "src");
    gst_object_unref(e);
    harnesses_.push_back(h);
    gst_harness_set_src_caps_str(h, "application/x-rtp");
    return h;
  };
  auto rtp_out = [](const std::vector<Bytes>& wire) {
    std::vector<std::uint16_t> seqs;
    for (const auto& w : wire)
      if (otpgate::otp::classify(w) == otpgate::otp::DatagramType::rtp)
        seqs.push_back(static_cast<std::uint16_t>(w[2] << 8 | w[3]));
    return seqs;
  };
  GstHarness* enc = make("60000");
  std::vector<Bytes> sent;
  for (std::uint16_t seq = 0; seq < 4100; ++seq) {
    sent.push_back(rtp_packet(seq, 0x5eed, 100));
    ASSERT_EQ(gst_harness_push(enc, buffer_of(sent.back())), GST_FLOW_OK);
  }
  EXPECT_TRUE(rtp_out(pull_all(enc)).empty()) << "a packet left before there was key";
  EXPECT_EQ(stat(enc->element, "packets-held"), 4096u);
  EXPECT_EQ(stat(enc->element, "key-waits"), 4100u);
  EXPECT_EQ(stat(enc->element, "drops-no-key"), 4u) << "the oldest give way to the bound";
  pad.open = true;  // the first key arrives: the release timer sends them, in order
  std::vector<Bytes> wire;
  EXPECT_TRUE(otpgate::testing::eventually([&] {
    for (auto& w : pull_all(enc)) wire.push_back(std::move(w));
    return stat(enc->element, "packets-held") == 0 && rtp_out(wire).size() == 4096;
  }));
  std::vector<std::uint16_t> expected(4096);
  std::iota(expected.begin(), expected.end(), std::uint16_t{4});
  EXPECT_EQ(rtp_out(wire), expected);
  EXPECT_EQ(plaintext_on_wire(wire, sent), "") << "plaintext on the wire";
  // The key runs out: held again; stopping drops them and sends nothing.
  pad.open = false;
  for (std::uint16_t seq = 0; seq < 10; ++seq) {
    ASSERT_EQ(gst_harness_push(enc, buffer_of(rtp_packet(seq, 0x5eed, 100))), GST_FLOW_OK);
  }
  EXPECT_EQ(stat(enc->element, "packets-held"), 10u);
  gst_element_set_state(enc->element, GST_STATE_NULL);
  EXPECT_TRUE(rtp_out(pull_all(enc)).empty());
  EXPECT_EQ(stat(enc->element, "packets-held"), 0u);

  // A key that does not come within key-wait: the held packets are dropped and counted.
  GstHarness* late = make("200");
  for (std::uint16_t seq = 0; seq < 5; ++seq) {
    ASSERT_EQ(gst_harness_push(late, buffer_of(rtp_packet(seq, 0x5eed, 100))), GST_FLOW_OK);
  }
  EXPECT_TRUE(otpgate::testing::eventually([&] {
    return stat(late->element, "drops-no-key") == 5 && stat(late->element, "packets-held") == 0;
  }));
  EXPECT_TRUE(rtp_out(pull_all(late)).empty());

  // Large datagrams: at most 4 MiB held (not 4096 x 64 KiB per stream), the oldest give way.
  GstHarness* large = make("60000");
  for (std::uint16_t seq = 0; seq < 100; ++seq) {
    ASSERT_EQ(gst_harness_push(large, buffer_of(rtp_packet(seq, 0x1a, 60000))), GST_FLOW_OK);
  }
  EXPECT_LE(stat(large->element, "packets-held") * 60012, 4u << 20);
  EXPECT_GE(stat(large->element, "packets-held"), 60u);
  EXPECT_EQ(stat(large->element, "packets-held") + stat(large->element, "drops-no-key"), 100u);
  // The end of the stream does not wait for key either: what still waits is dropped.
  EXPECT_TRUE(gst_harness_push_event(large, gst_event_new_eos()));
  EXPECT_EQ(stat(large->element, "packets-held"), 0u);
  EXPECT_EQ(stat(large->element, "drops-no-key"), 100u);
  EXPECT_TRUE(rtp_out(pull_all(large)).empty());
}

TEST_F(ElementTest, TwoRunsOnOnePadFileNeverReuseAByte) {
  auto offsets_of = [](const std::vector<Bytes>& wire) {
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (const auto& w : wire) {
      if (otpgate::otp::classify(w) != otpgate::otp::DatagramType::rtp) continue;
      const std::uint64_t p = *otpgate::otp::datagram_pad_offset(w);
      ranges.emplace_back(p, p + 16 + (w.size() - 24 - 12));
    }
    return ranges;
  };
  GstHarness* first = encryptor();
  const auto run1 = offsets_of(protect(first, packets(200)));
  gst_harness_teardown(first);
  harnesses_.erase(std::find(harnesses_.begin(), harnesses_.end(), first));
  GstHarness* second = encryptor();
  const auto wire2 = protect(second, packets(200));
  const auto run2 = offsets_of(wire2);
  std::uint64_t end1 = 0;
  for (auto [b, e] : run1) end1 = std::max(end1, e);
  std::uint64_t begin2 = UINT64_MAX;
  for (auto [b, e] : run2) {
    EXPECT_GE(b, end1);
    begin2 = std::min(begin2, b);
  }
  // A short run wastes little of a pre-shared pad: what its ring held (1 MiB) and at most
  // one journal chunk (256 KiB); it once moved the journal by 4 MiB.
  EXPECT_LE(begin2 - end1, (1u << 20) + (256u << 10) + (64u << 10));
  // ... and the second run still decrypts (a fresh receiver, journal beside the pad).
  fs::remove(pad_path() + ".received");
  GstHarness* dec = decryptor();
  EXPECT_EQ(open(dec, wire2).size(), 200u);
}

TEST_F(ElementTest, MissingKeySourceIsAClearConfigurationError) {
  GstElement* enc = gst_element_factory_make("otpencrypt", nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(enc, bus);
  EXPECT_EQ(gst_element_set_state(enc, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
  ASSERT_NE(m, nullptr);
  GError* err = nullptr;
  gst_message_parse_error(m, &err, nullptr);
  EXPECT_NE(std::string(err->message).find("no key source: set kme-url"), std::string::npos)
      << err->message;
  g_error_free(err);
  gst_message_unref(m);
  gst_element_set_state(enc, GST_STATE_NULL);
  gst_object_unref(enc);
  gst_object_unref(bus);
}

// ---- stream mode

namespace {
std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0)
    EVP_DigestUpdate(ctx, buf, static_cast<std::size_t>(in.gcount()));
  unsigned char md[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  for (unsigned i = 0; i < n; ++i)
    hex += "0123456789abcdef"[md[i] >> 4], hex += "0123456789abcdef"[md[i] & 15];
  return hex;
}

// Runs a pipeline to EOS or error; returns the error text ("" on success).
std::string run(GstElement* pipeline, int seconds = 60) {
  gst_element_set_state(pipeline, GST_STATE_PLAYING);
  GstBus* bus = gst_element_get_bus(pipeline);
  GstMessage* m = gst_bus_timed_pop_filtered(
      bus, GST_SECOND * seconds, static_cast<GstMessageType>(GST_MESSAGE_EOS | GST_MESSAGE_ERROR));
  std::string error = m ? "" : "timeout";
  if (m && GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
    GError* err = nullptr;
    gst_message_parse_error(m, &err, nullptr);
    error = err->message;
    g_error_free(err);
  }
  if (m) gst_message_unref(m);
  gst_object_unref(bus);
  gst_element_set_state(pipeline, GST_STATE_NULL);
  return error;
}
}  // namespace

TEST_F(ElementTest, AMultiMegabyteFileCrossesARealTcpConnectionIntact) {
  make_pad(16u << 20);
  const fs::path input = dir_ / "specimen.bam", output = dir_ / "received.bam";
  {
    Bytes data(6u << 20);
    RAND_bytes(data.data(), static_cast<int>(data.size()));
    std::ofstream(input, std::ios::binary)
        .write(reinterpret_cast<char*>(data.data()), static_cast<long>(data.size()));
  }
  GstElement* receiver = gst_parse_launch(
      ("tcpserversrc name=src host=127.0.0.1 port=0 ! otpdecrypt pad-file=" + pad_path() +
       " ! filesink location=" + output.string())
          .c_str(),
      nullptr);
  gst_element_set_state(receiver, GST_STATE_PAUSED);
  GstElement* src = gst_bin_get_by_name(GST_BIN(receiver), "src");
  int port = 0;
  ASSERT_TRUE(otpgate::testing::eventually([&] {
    g_object_get(src, "current-port", &port, nullptr);
    return port > 0;
  }));
  gst_object_unref(src);
  std::string receive_error;
  std::thread rx([&] { receive_error = run(receiver); });
  GstElement* sender = gst_parse_launch(
      ("filesrc location=" + input.string() + " ! otpencrypt pad-file=" + pad_path() +
       " ! tcpclientsink host=127.0.0.1 port=" + std::to_string(port))
          .c_str(),
      nullptr);
  EXPECT_EQ(run(sender), "");
  rx.join();
  EXPECT_EQ(receive_error, "");
  EXPECT_EQ(fs::file_size(output), fs::file_size(input));
  EXPECT_EQ(sha256_file(output), sha256_file(input));
  gst_object_unref(sender);
  gst_object_unref(receiver);
}

TEST_F(ElementTest, ATruncatedStreamIsAnErrorNotASuccess) {
  GstHarness* enc = encryptor(nullptr, "mode=stream record-size=4096");
  gst_harness_set_src_caps_str(enc, "application/octet-stream");
  Bytes data(50000, 0x5a);
  gst_harness_push(enc, buffer_of(data));
  gst_harness_push_event(enc, gst_event_new_eos());
  auto stream = pull_all(enc);
  ASSERT_GT(stream.size(), 3u);
  stream.pop_back();  // the final record never arrives

  GstElement* dec = gst_parse_launch(("otpdecrypt pad-file=" + pad_path()).c_str(), nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(dec, bus);
  GstHarness* h = gst_harness_new_with_element(dec, "sink", "src");
  harnesses_.push_back(h);
  gst_harness_set_src_caps_str(h, "application/x-otp");
  for (const auto& s : stream) gst_harness_push(h, buffer_of(s));
  gst_harness_push_event(h, gst_event_new_eos());
  GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
  ASSERT_NE(m, nullptr);
  GError* err = nullptr;
  gst_message_parse_error(m, &err, nullptr);
  EXPECT_NE(std::string(err->message).find("ended before its final record"), std::string::npos)
      << err->message;
  g_error_free(err);
  gst_message_unref(m);
  gst_object_unref(bus);
  gst_object_unref(dec);
}

TEST_F(ElementTest, KeysFromTheKmeSimulatorOverMutualTls) {
  otpgate::kmesim::KmeSimulator sim(otpgate::testing::simulator_config());
  sim.start();
  auto [enc, dec] = kme_pair(sim, "a.journal");
  g_object_set(dec->element, "key-wait", 5000u, nullptr);  // the first mTLS fetch, loaded
  const auto sent = packets(200);
  const auto wire = protect(enc, sent);
  // The slave fetches keys from its KME after the announcements: fed in one burst, the
  // packets wait for them (held in order, also those on pad of announcements that the
  // first keys verify) and each comes out once.
  const auto got = open(dec, wire);
  EXPECT_EQ(got.size(), sent.size());
  EXPECT_TRUE(got == sent) << "a packet changed or out of order";
  EXPECT_EQ(stat(dec->element, "drops-no-key"), 0u);
  // The same wire again: every packet is refused as a replay, none comes out twice.
  EXPECT_TRUE(open(dec, wire).empty());
  EXPECT_EQ(stat(dec->element, "replays"), sent.size());
  EXPECT_GT(sim.stats().keys_to_slaves, 0u);
}

TEST_F(ElementTest, AesModeRoundTripsWithMasterKeysFromThePad) {
  GstHarness* enc = encryptor("application/x-rtp", "cipher=aes-256-gcm rekey-interval=50");
  GstHarness* dec = decryptor();
  const auto sent = packets(300, 800);
  const auto wire = protect(enc, sent);
  EXPECT_EQ(plaintext_on_wire(wire, sent), "") << "plaintext on the wire";
  EXPECT_EQ(open(dec, wire), sent);
  EXPECT_EQ(stat(enc->element, "aes-packets"), 300u);
  EXPECT_EQ(stat(enc->element, "aes-rekeys"), 6u);
  EXPECT_EQ(stat(dec->element, "aes-packets"), 300u);
  EXPECT_LT(stat(enc->element, "pad-bytes-used"), 10000u) << "AES spends 44 bytes of pad per key";
}

TEST_F(ElementTest, FallbackAesCarriesTheCallWhenPadRunsOutAndNeverSendsPlaintext) {
  make_pad(48 * 1024);
  GstHarness* enc =
      encryptor("application/x-rtp", "on-key-exhausted=fallback-aes rekey-interval=1000");
  GstHarness* dec = decryptor();
  int exhausted = 0;
  g_signal_connect_swapped(enc->element, "key-exhausted", G_CALLBACK(+[](int* n) { ++*n; }),
                           &exhausted);
  const auto sent = packets(200, 600);
  const auto wire = protect(enc, sent);
  EXPECT_EQ(plaintext_on_wire(wire, sent), "") << "plaintext on the wire";
  EXPECT_EQ(stat(enc->element, "drops-no-key"), 0u) << "nothing dropped: AES took over";
  EXPECT_GT(stat(enc->element, "aes-packets"), 50u);
  EXPECT_LT(stat(enc->element, "aes-packets"), 200u) << "OTP first, while pad lasted";
  EXPECT_EQ(exhausted, 1);
  EXPECT_EQ(open(dec, wire), sent);
}

// A receiver whose stream is agreed as one-time pad only (accept-aes=false) opens the
// sender's OTP packets and refuses its AES ones unopened: a sender that falls back to AES
// (or is set to it) cannot run the stream in AES unnoticed. One warning says why.
TEST_F(ElementTest, AReceiverThatAcceptsNoAesRefusesAesPacketsAndSaysWhy) {
  make_pad(48 * 1024);
  GstHarness* enc =
      encryptor("application/x-rtp", "on-key-exhausted=fallback-aes rekey-interval=1000");
  GstHarness* dec = decryptor("accept-aes=false");
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(dec->element, bus);
  const auto sent = packets(200, 600);
  const auto wire = protect(enc, sent);
  const guint64 aes = stat(enc->element, "aes-packets");
  ASSERT_GT(aes, 50u);
  ASSERT_LT(aes, 200u);
  const auto got = open(dec, wire);
  // The OTP packets (sent first, while pad lasted) come through, byte for byte.
  ASSERT_EQ(got.size(), sent.size() - aes);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), sent.begin()));
  EXPECT_EQ(stat(dec->element, "drops-cipher"), aes);
  EXPECT_EQ(stat(dec->element, "aes-packets"), 0u);
  EXPECT_EQ(stat(dec->element, "auth-failures"), 0u);
  int warnings = 0;
  std::string text;
  while (GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_WARNING)) {
    GError* err = nullptr;
    gst_message_parse_warning(m, &err, nullptr);
    text = err->message;
    ++warnings;
    g_error_free(err);
    gst_message_unref(m);
  }
  EXPECT_EQ(warnings, 1) << "one warning, not one per packet";
  EXPECT_NE(text.find("does not accept (accept-aes=false)"), std::string::npos) << text;
  gst_element_set_bus(dec->element, nullptr);
  gst_object_unref(bus);
}

TEST_F(ElementTest, AKeySupplySharedInsideTheProcessFeedsTheElement) {
  // The gateway's way: it owns one key supply per direction and hands it to the element.
  otpgate::keys::KeySupplyConfig config;
  config.role = otpgate::keys::SaeRole::master;
  config.peer_sae_id = "site-b";
  config.journal = dir_ / "shared.journal";
  config.reserve_chunk = 1u << 20;
  otpgate::keys::KeySupply supply(otpgate::keys::PadFileConfig{pad_path()}, config);
  supply.start();
  GstElement* e = gst_element_factory_make("otpencrypt", nullptr);
  g_object_set(e, "key-supply", static_cast<otpgate::keys::PadSource*>(&supply), nullptr);
  GstHarness* enc = gst_harness_new_with_element(e, "sink", "src");
  gst_object_unref(e);
  harnesses_.push_back(enc);
  gst_harness_set_src_caps_str(enc, "application/x-rtp");
  wait_for_key(enc->element);
  GstHarness* dec = decryptor();
  const auto sent = packets(100);
  EXPECT_EQ(open(dec, protect(enc, sent)), sent);
  EXPECT_GT(supply.stats().bytes_consumed, 100u * 1100u) << "the pad came from the shared supply";
  gst_harness_teardown(enc);  // before the supply it uses goes away
  harnesses_.erase(std::find(harnesses_.begin(), harnesses_.end(), enc));
}

TEST_F(ElementTest, AnRtpStreamGoesThroughAKmeWithEveryQuirkOfAnotherVendor) {
  // A third-party KME pair's ways: a second enc_keys before the slave fetched the first
  // batch replaces it, keys capped at 1024 bits and 128 per request (less is delivered,
  // not refused), HTML error pages, stored_key_count counting the pair's pending keys.
  auto config = otpgate::testing::simulator_config();
  config.max_key_size = 1024;
  config.max_keys_per_request = 128;
  config.faults.replace_unfetched_batch = true;
  config.faults.cap_instead_of_refuse = true;
  config.faults.error_style = otpgate::kmesim::ErrorStyle::html;
  config.faults.stored_count_of_pair = true;
  otpgate::kmesim::KmeSimulator sim(config);
  sim.start();
  auto [enc, dec] = kme_pair(sim, "q.journal");
  const auto sent = packets(150);
  EXPECT_EQ(relay_live(enc, dec, sent, std::chrono::milliseconds(0)), sent);
  EXPECT_EQ(sim.stats().keys_replaced, 0u) << "the sender let the KME replace unfetched keys";
  EXPECT_EQ(stat(dec->element, "drops-no-key"), 0u);
}

// The receiver holds packets whose keys are on their way, bounded in bytes as well as in
// packets: a sender of 60 KB datagrams (its genuine traffic, while the receiving KME is
// slow) makes it hold at most 4 MiB, not 4096 x 64 KiB. The oldest give way and are
// counted; the rest leave in order once the keys arrive. Keys of 128 KiB, so that the
// stream's first announcement names more pad (8 MiB) than the bound holds.
TEST_F(ElementTest, TheDecryptorHoldsAtMostFourMiBOfLargeDatagramsWaitingForKeys) {
  std::vector<Bytes> sent;
  for (std::uint16_t seq = 0; seq < 100; ++seq) sent.push_back(rtp_packet(seq, 0x1a, 60000));
  const auto r = held_until_keys_arrive(sent, buffer_of);
  EXPECT_LE(r.held * (sent[0].size() + otpgate::otp::kTrailerBytes), 4u << 20);
  EXPECT_GE(r.held, 60u);
  EXPECT_EQ(r.held + r.dropped, 100u);
  EXPECT_EQ(r.released,
            std::vector<Bytes>(sent.end() - static_cast<std::ptrdiff_t>(r.held), sent.end()));
}

// The same bound counts the memory a held packet keeps, not its bytes alone: the gateway
// receives each datagram into a 2 KiB buffer, so 4096 held 200-byte packets would pin
// 8 MiB. Here each arrives in a buffer of 16 KiB: at most 256 are held (4 MiB), the
// oldest give way, and those held leave whole once their keys arrive.
TEST_F(ElementTest, HeldPacketsCountTheBufferMemoryTheyKeep) {
  constexpr gsize kRoom = 16u << 10;
  std::vector<Bytes> sent;
  for (std::uint16_t seq = 0; seq < 400; ++seq) sent.push_back(rtp_packet(seq, 0x1b, 160));
  const auto r = held_until_keys_arrive(sent, [](const Bytes& w) {
    GstBuffer* roomy = gst_buffer_new_allocate(nullptr, kRoom, nullptr);
    gst_buffer_fill(roomy, 0, w.data(), w.size());
    gst_buffer_set_size(roomy, static_cast<gssize>(w.size()));
    return roomy;
  });
  EXPECT_LE(r.held, (4u << 20) / kRoom);
  EXPECT_GE(r.held, (4u << 20) / kRoom - 8);
  EXPECT_EQ(r.held + r.dropped, 400u);
  EXPECT_EQ(r.released,
            std::vector<Bytes>(sent.end() - static_cast<std::ptrdiff_t>(r.held), sent.end()));
}

// A KME that caps keys at 256 bits and relays them to the receiving site 150 ms late: a
// stream's first announcement names only 2 KiB of pad, and the ones after it can be
// verified only once its keys are here. Packets on their pad wait for those keys (up to
// key-wait) instead of being dropped as unannounced: none is lost at the stream's start.
TEST_F(ElementTest, SmallKeysRelayedLateCostNoPacketAtTheStreamsStart) {
  auto config = otpgate::testing::simulator_config();
  config.max_key_size = 256;
  config.relay_delay = std::chrono::milliseconds(150);
  otpgate::kmesim::KmeSimulator sim(config);
  sim.start();
  auto [enc, dec] = kme_pair(sim, "small.journal");
  // Room for a loaded machine: without the fix packets are dropped at once, not held.
  g_object_set(dec->element, "key-wait", 5000u, nullptr);
  const auto sent = packets(100);
  const auto got = relay_live(enc, dec, sent, std::chrono::milliseconds(10));  // 100 a second
  EXPECT_EQ(got.size(), sent.size());
  EXPECT_TRUE(got == sent) << "a packet changed or out of order";
  EXPECT_EQ(stat(dec->element, "drops-no-key"), 0u);
  EXPECT_GE(stat(dec->element, "key-waits"), 1u)
      << "no packet waited: the relay delay did not bite";
}

// sender-restarted: a sender that restarts (a new process on the same journal resumes at
// its reservation, a 16 MiB chunk boundary) is told apart from a running sender's
// periodic resync (every 2 s, a fresh epoch) and from its first announcement.
TEST_F(ElementTest, TheDecryptorSignalsASenderThatRestartedButNotItsResyncs) {
  otpgate::kmesim::KmeSimulator sim(otpgate::testing::simulator_config());
  sim.start();
  auto [enc, dec] = kme_pair(sim, "restart.journal");
  int signalled = 0;
  g_signal_connect(dec->element, "sender-restarted",
                   G_CALLBACK(+[](GstElement*, gpointer count) { ++*static_cast<int*>(count); }),
                   &signalled);
  auto run = [&](GstHarness* from, std::uint16_t first, int count) {
    std::vector<Bytes> sent;
    for (int i = 0; i < count; ++i)
      sent.push_back(rtp_packet(static_cast<std::uint16_t>(first + i), 0x77, 1200));
    // 600 kB/s: the sender's 1 MiB ring refills every second.
    return relay_live(from, dec, sent, std::chrono::milliseconds(2)) == sent;
  };
  EXPECT_TRUE(run(enc, 0, 1500));  // 3 s and more: past a resync
  EXPECT_EQ(signalled, 0) << "the first announcement or a resync read as a restart";
  EXPECT_EQ(stat(dec->element, "sender-restarts"), 0u);
  // The sender restarts: a new element on the same journal.
  gst_harness_teardown(enc);
  std::erase(harnesses_, enc);
  GstHarness* restarted = kme_pair(sim, "restart.journal").first;
  EXPECT_TRUE(run(restarted, 1500, 200));
  EXPECT_EQ(signalled, 1);
  EXPECT_EQ(stat(dec->element, "sender-restarts"), 1u);
}

TEST_F(ElementTest, OnlyTheSenderHasAKeyLowSignalAndItsThreshold) {
  // A property that does nothing misleads: the receiver has no key-low signal.
  for (const auto& [name, sends] :
       {std::pair{"otpencrypt", true}, std::pair{"otpdecrypt", false}}) {
    GstElement* e = gst_element_factory_make(name, nullptr);
    ASSERT_NE(e, nullptr) << name;
    const bool has_threshold =
        g_object_class_find_property(G_OBJECT_GET_CLASS(e), "key-low-threshold") != nullptr;
    const bool has_signal = g_signal_lookup("key-low", G_OBJECT_TYPE(e)) != 0;
    EXPECT_EQ(has_threshold, sends) << name;
    EXPECT_EQ(has_signal, sends) << name;
    gst_object_unref(e);
  }
}

TEST_F(ElementTest, AnOldPadFileStreamSentAgainFailsAsAReplayAtOnce) {
  GstHarness* enc = encryptor(nullptr, "mode=stream record-size=4096");
  gst_harness_set_src_caps_str(enc, "application/octet-stream");
  const Bytes data(30000, 0x3c);
  gst_harness_push(enc, buffer_of(data));
  gst_harness_push_event(enc, gst_event_new_eos());
  const auto stream = pull_all(enc);
  // The first run receives it; its journal now lies past that pad.
  {
    GstHarness* first = decryptor("mode=stream");
    for (const auto& s : stream) gst_harness_push(first, buffer_of(s));
    Bytes got;
    for (auto& b : pull_all(first)) got.insert(got.end(), b.begin(), b.end());
    EXPECT_EQ(got, data);
    gst_harness_teardown(first);
    harnesses_.erase(std::find(harnesses_.begin(), harnesses_.end(), first));
  }
  // The same bytes again (a recorded stream replayed): refused as a replay, named as one,
  // without waiting out key-timeout for keys that will never be handed out again.
  GstElement* dec = gst_parse_launch(
      ("otpdecrypt mode=stream key-timeout=60000 pad-file=" + pad_path()).c_str(), nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(dec, bus);
  GstHarness* h = gst_harness_new_with_element(dec, "sink", "src");
  harnesses_.push_back(h);
  gst_harness_set_src_caps_str(h, "application/x-otp");
  std::thread feed([&] {
    for (const auto& s : stream) gst_harness_push(h, buffer_of(s));
  });
  GstMessage* m = gst_bus_timed_pop_filtered(bus, 20 * GST_SECOND, GST_MESSAGE_ERROR);
  ASSERT_NE(m, nullptr) << "no error within 20 s (key-timeout is 60 s)";
  GError* err = nullptr;
  gst_message_parse_error(m, &err, nullptr);
  EXPECT_NE(std::string(err->message).find("an earlier run already used"), std::string::npos)
      << err->message;
  g_error_free(err);
  gst_message_unref(m);
  feed.join();
  EXPECT_TRUE(pull_all(h).empty()) << "a replayed stream delivered data";
  gst_object_unref(bus);
  gst_object_unref(dec);
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// Element cost per 1200-byte RTP packet, all in one harness and one run:
// identity (baseline), srtpenc AES-256-GCM, srtpenc AES-128-ICM + HMAC-SHA1-80,
// otpencrypt and otpdecrypt. Prints each one's cost above identity and the ratio
// otpencrypt / srtpenc-GCM (target <= 0.25); then pad consumed per payload byte
// (target <= 1.02), wire bytes added per packet, and key-announcement bytes per pad
// byte at KME key sizes of 256, 1024 and 8192 bits.
//   bench_elements [--quick]
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <openssl/rand.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "memory_pad.hpp"
#include "otpgate/otp_codec.hpp"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using Bytes = std::vector<std::uint8_t>;

namespace {

constexpr std::size_t kPayload = 1200;

Bytes rtp_packet(std::uint16_t seq) {
  Bytes p{0x80,
          96,
          static_cast<std::uint8_t>(seq >> 8),
          static_cast<std::uint8_t>(seq),
          0,
          0,
          0,
          0,
          0x12,
          0x34,
          0x56,
          0x78};
  p.resize(12 + kPayload, static_cast<std::uint8_t>(seq));
  return p;
}

GstBuffer* buffer_of(const Bytes& b) {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, b.size(), nullptr);
  gst_buffer_fill(buf, 0, b.data(), b.size());
  return buf;
}

std::vector<GstBuffer*> rtp_buffers(std::size_t n) {
  std::vector<GstBuffer*> v;
  for (std::size_t i = 0; i < n; ++i)
    v.push_back(buffer_of(rtp_packet(static_cast<std::uint16_t>(i))));
  return v;
}

// Pushes every buffer and pulls every output; returns ns per input buffer.
double run(GstHarness* h, std::vector<GstBuffer*> buffers,
           std::vector<GstBuffer*>* outputs = nullptr) {
  const auto start = Clock::now();
  for (GstBuffer* b : buffers) {
    gst_harness_push(h, b);
    while (GstBuffer* out = gst_harness_try_pull(h)) {
      if (outputs) {
        outputs->push_back(out);
      } else {
        gst_buffer_unref(out);
      }
    }
  }
  return std::chrono::duration<double, std::nano>(Clock::now() - start).count() /
         double(buffers.size());
}

GstHarness* harness(const std::string& description, const char* sink, const char* src,
                    const char* caps, GstBuffer* srtp_key = nullptr) {
  GstElement* e = gst_parse_launch(description.c_str(), nullptr);
  if (srtp_key) g_object_set(e, "key", srtp_key, nullptr);  // before it starts
  GstHarness* h = gst_harness_new_with_element(e, sink, src);
  gst_object_unref(e);
  gst_harness_set_src_caps_str(h, caps);
  return h;
}

GstHarness* srtpenc(int cipher, int auth, std::size_t key_bytes) {
  Bytes key(key_bytes);
  RAND_bytes(key.data(), static_cast<int>(key.size()));
  GstBuffer* k = buffer_of(key);
  GstHarness* h =
      harness("srtpenc rtp-cipher=" + std::to_string(cipher) + " rtp-auth=" + std::to_string(auth),
              "rtp_sink_0", "rtp_src_0",
              "application/x-rtp,payload=96,clock-rate=48000,ssrc=(uint)305419896", k);
  gst_buffer_unref(k);
  return h;
}

guint64 stat(GstElement* e, const char* field) {
  GstStructure* s = nullptr;
  g_object_get(e, "stats", &s, nullptr);
  guint64 v = 0;
  if (s) {
    gst_structure_get_uint64(s, field, &v);
    gst_structure_free(s);
  }
  return v;
}

void wait_for_key(GstElement* e) {
  for (int i = 0; i < 5000 && stat(e, "key-available") == 0; ++i) g_usleep(1000);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  gst_init(nullptr, nullptr);
  const std::size_t n = quick ? 500 : 10000;
  const int rounds = quick ? 1 : 5;
  const fs::path dir = fs::temp_directory_path() / ("otpgate-bench-" + std::to_string(::getpid()));
  fs::create_directories(dir);

  double identity = 1e18, gcm = 1e18, icm = 1e18, enc = 1e18, dec = 1e18;
  guint64 pad_used = 0, pad_skipped = 0, wire_in = 0, wire_out = 0, out_packets = 0;
  for (int round = 0; round < rounds; ++round) {
    GstHarness* h = harness("identity", "sink", "src", "application/x-rtp");
    identity = std::min(identity, run(h, rtp_buffers(n)));
    gst_harness_teardown(h);
    h = srtpenc(4, 0, 44);  // AES-256-GCM: 32-byte key + 12-byte salt
    gcm = std::min(gcm, run(h, rtp_buffers(n)));
    gst_harness_teardown(h);
    h = srtpenc(1, 1, 30);  // AES-128-ICM + HMAC-SHA1-80 (srtpenc's default)
    icm = std::min(icm, run(h, rtp_buffers(n)));
    gst_harness_teardown(h);

    // otpencrypt/otpdecrypt on a fresh pad file each round (pad is never reused).
    const fs::path pad = dir / ("pad" + std::to_string(round) + ".bin");
    {
      Bytes bytes(n * (kPayload + 64) + (8u << 20));
      RAND_bytes(bytes.data(), static_cast<int>(bytes.size()));
      std::ofstream(pad, std::ios::binary)
          .write(reinterpret_cast<char*>(bytes.data()), static_cast<long>(bytes.size()));
    }
    GstHarness* e =
        harness("otpencrypt pad-file=" + pad.string(), "sink", "src", "application/x-rtp");
    wait_for_key(e->element);
    std::vector<GstBuffer*> wire;
    enc = std::min(enc, run(e, rtp_buffers(n), &wire));
    pad_used = stat(e->element, "pad-bytes-used");
    pad_skipped = stat(e->element, "pad-bytes-skipped");
    gst_harness_teardown(e);
    GstHarness* d =
        harness("otpdecrypt pad-file=" + pad.string(), "sink", "src", "application/x-otp");
    // Announcements first, then let the keys load, so the timing is the decrypt path.
    std::vector<GstBuffer*> packets, announcements;
    for (GstBuffer* b : wire) {
      guint8 first = 0;
      gst_buffer_extract(b, 0, &first, 1);
      (first == 'O' ? announcements : packets).push_back(b);
    }
    run(d, announcements);
    g_usleep(300000);
    wire_out = 0;
    for (GstBuffer* b : packets) wire_out += gst_buffer_get_size(b);
    out_packets = packets.size();
    wire_in = out_packets * (12 + kPayload);
    const double dec_round = run(d, packets) * double(packets.size()) / double(n);
    if (getenv("BENCH_VERBOSE"))
      std::fprintf(stderr, "round %d: otpdecrypt %.0f ns, identity %.0f\n", round, dec_round,
                   identity);
    dec = std::min(dec, dec_round);
    if (stat(d->element, "packets-out") != out_packets) {
      std::fprintf(stderr, "bench: otpdecrypt delivered %llu of %llu packets\n",
                   static_cast<unsigned long long>(stat(d->element, "packets-out")),
                   static_cast<unsigned long long>(out_packets));
    }
    gst_harness_teardown(d);
    fs::remove(pad);
  }
  fs::remove_all(dir);

  std::printf("== element cost per 1200-byte RTP packet (best of %d rounds of %zu packets) ==\n",
              rounds, n);
  std::printf("%-34s %10s %16s\n", "element", "ns/packet", "above identity");
  auto row = [&](const char* name, double ns) {
    std::printf("%-34s %10.0f %16.0f\n", name, ns, ns - identity);
  };
  row("identity (baseline)", identity);
  row("srtpenc AES-256-GCM", gcm);
  row("srtpenc AES-128-ICM + HMAC-SHA1-80", icm);
  row("otpencrypt", enc);
  row("otpdecrypt", dec);
  std::printf("ratio otpencrypt / srtpenc AES-256-GCM (above identity): %.2f (target <= 0.25)\n",
              (enc - identity) / (gcm - identity));
  std::printf("ratio otpdecrypt / srtpenc AES-256-GCM (above identity): %.2f\n",
              (dec - identity) / (gcm - identity));

  std::printf("\n== key and wire overhead ==\n");
  std::printf(
      "pad bytes per payload byte: %.4f (target <= 1.02; 16-byte mask per packet, r per 256 KiB "
      "epoch, "
      "epoch tails, announcement masks)\n",
      double(pad_used + pad_skipped) / double(out_packets * kPayload));
  std::printf("wire bytes added per packet: %.1f (SRTP AES-GCM adds 16; target <= 32)\n",
              double(wire_out - wire_in) / double(out_packets));

  std::printf("\n== announcement bytes per pad byte, by KME key size ==\n");
  for (std::uint32_t key_bits : {256u, 1024u, 8192u}) {
    otpgate::testing::MemoryPad tx(0, 64u << 20, key_bits / 8);
    tx.fill_for_sending();
    otpgate::otp::Encoder encoder(tx, 1, 0);
    Bytes buf(otpgate::otp::kMaxAnnouncementBytes), out(2000);
    std::size_t written = 0;
    for (int i = 0; i < 20000; ++i) {
      while (encoder.next_announcement(buf, false)) {
      }
      encoder.protect_datagram(rtp_packet(static_cast<std::uint16_t>(i)), out, written);
    }
    const auto& s = encoder.stats();
    std::printf(
        "%5u-bit keys: %.4f announcement bytes per pad byte (%llu key_IDs for %.1f MB of pad; "
        "x3 with the two default repeats in datagram mode)\n",
        key_bits, double(s.announcement_bytes) / double(s.pad_bytes_used),
        static_cast<unsigned long long>(s.keys_announced), double(s.pad_bytes_used) / 1e6);
  }
  return 0;
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// Key path under faults: one direction of a call (KeySupply master -> Encoder ->
// Decoder -> KeySupply slave) over qkd-kme-sim with mutual TLS, in one process, packets
// paced like a call. Prints:
//   - start-up announcement bytes on the wire (target < 64 KiB) against the media bytes;
//   - key wiped at stop, in seconds of the stream's media (target <= 2 s);
//   - time from the KME answering again (after a restart with an empty store) to the
//     first packet delivered (target <= 1 s);
//   - genuine delivery and p99 decode latency with 1000 forged datagrams/s mixed in,
//     against the same run without them (targets >= 99%, p99 within 50 us).
//   bench_keypath --pki DIR [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kme_simulator.hpp"
#include "otpgate/keyclient.hpp"
#include "otpgate/otp_codec.hpp"

namespace keys = otpgate::keys;
namespace otp = otpgate::otp;
using Clock = std::chrono::steady_clock;
using Bytes = std::vector<std::uint8_t>;

namespace {

struct Setup {
  std::string pki;
  std::string dir;
  otpgate::kmesim::SimulatorConfig sim_config() const {
    otpgate::kmesim::SimulatorConfig c;
    c.certificate = pki + "/kme.crt";
    c.private_key = pki + "/kme.key";
    c.client_ca = pki + "/ca.crt";
    c.sae_ids = {"sae-a", "sae-b"};
    c.log = keys::stderr_log_sink(keys::LogLevel::error);
    return c;
  }
  keys::KmeClientConfig client(const std::string& sae, const std::string& url) const {
    keys::KmeClientConfig c;
    c.base_url = url;
    c.tls = {pki + "/" + sae + ".crt", pki + "/" + sae + ".key", pki + "/ca.crt"};
    c.log = keys::stderr_log_sink(keys::LogLevel::error);
    return c;
  }
  // As otpencrypt/otpdecrypt configure a KME supply.
  keys::KeySupplyConfig master(const std::string& journal) const {
    keys::KeySupplyConfig c;
    c.role = keys::SaeRole::master;
    c.peer_sae_id = "sae-b";
    c.journal = dir + "/" + journal;
    c.ring_bytes = 4u << 20;
    c.ring_seconds = 2.0;
    c.ring_min_bytes = 128u << 10;
    c.announce_lead_seconds = 1.5;
    c.announce_min_bytes = 128u << 10;
    c.resync_interval = std::chrono::milliseconds(2000);
    c.log = keys::stderr_log_sink(keys::LogLevel::error);
    return c;
  }
  keys::KeySupplyConfig slave() const {
    keys::KeySupplyConfig c;
    c.role = keys::SaeRole::slave;
    c.peer_sae_id = "sae-a";
    c.ring_bytes = 12u << 20;
    c.log = keys::stderr_log_sink(keys::LogLevel::error);
    return c;
  }
};

Bytes rtp(std::uint16_t seq, std::size_t payload) {
  Bytes p{0x80,
          96,
          static_cast<std::uint8_t>(seq >> 8),
          static_cast<std::uint8_t>(seq),
          0,
          0,
          0,
          0,
          0,
          0,
          0x12,
          0x34};
  for (std::size_t i = 0; i < payload; ++i) p.push_back(static_cast<std::uint8_t>(seq + i));
  return p;
}

// One direction of a call: what the sender puts on the wire for one packet.
struct Call {
  keys::KeySupply& tx;
  keys::KeySupply& rx;
  otp::Encoder encoder{tx, 7};
  otp::Decoder decoder{rx};
  std::uint64_t announcement_bytes = 0, media_bytes = 0;
  Bytes scratch = Bytes(otp::kMaxAnnouncementBytes + 2000);

  std::vector<Bytes> send(const Bytes& packet) {
    std::vector<Bytes> wire;
    while (std::size_t n = encoder.next_announcement(scratch, true)) {
      wire.emplace_back(scratch.begin(), scratch.begin() + n);
      announcement_bytes += n;
    }
    std::size_t written = 0;
    if (encoder.protect_datagram(packet, scratch, written) == otp::Encoder::Status::ok) {
      wire.emplace_back(scratch.begin(), scratch.begin() + written);
      media_bytes += written;
    }
    return wire;
  }
  // Decodes; a packet whose key is on its way is retried for up to 500 ms (key-wait).
  bool receive(const Bytes& d, double* micros = nullptr) {
    Bytes out(d.size());
    std::size_t written = 0;
    const auto start = Clock::now();
    auto v = decoder.open_datagram(d, out, written);
    if (micros) *micros = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    const auto deadline = Clock::now() + std::chrono::milliseconds(500);
    while (v == otp::Decoder::Verdict::key_pending && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      v = decoder.open_datagram(d, out, written);
    }
    return v == otp::Decoder::Verdict::plaintext;
  }
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * double(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  Setup setup;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--pki" && i + 1 < argc) setup.pki = argv[++i];
    if (arg == "--quick") quick = true;
  }
  if (setup.pki.empty()) {
    std::fprintf(stderr,
                 "usage: bench_keypath --pki DIR [--quick]   (DIR from make-test-pki.sh)\n");
    return 2;
  }
  char templ[] = "/tmp/bench-keypath-XXXXXX";
  setup.dir = mkdtemp(templ);
  const double call_seconds = quick ? 1.0 : 4.0;
  const auto gap = std::chrono::milliseconds(8);  // 125 packets/s of 1200 bytes: 1.2 Mbit/s

  auto sim = std::make_unique<otpgate::kmesim::KmeSimulator>(setup.sim_config());
  sim->start();
  const int port = sim->port();

  // 1 and 2: start-up announcements, key wiped at stop.
  {
    keys::KeySupply tx(setup.client("sae-a", sim->url()), setup.master("a1.journal"));
    keys::KeySupply rx(setup.client("sae-b", sim->url()), setup.slave());
    tx.start();
    rx.start();
    Call call{tx, rx};
    std::uint64_t startup_announcements = 0;
    std::size_t delivered = 0, sent = 0;
    const auto start = Clock::now();
    for (std::uint16_t seq = 0; Clock::now() - start < std::chrono::duration<double>(call_seconds);
         ++seq) {
      for (const auto& d : call.send(rtp(seq, 1200))) {
        const bool media = otp::classify(d) != otp::DatagramType::announcement;
        sent += media;
        delivered += call.receive(d) && media;
      }
      if (seq == 49) startup_announcements = call.announcement_bytes;
      std::this_thread::sleep_for(gap);
    }
    const double media_rate = double(call.media_bytes) / call_seconds;
    tx.stop();
    rx.stop();
    const double wiped = double(tx.stats().bytes_wiped_at_stop);
    std::printf(
        "start-up announcements (first 50 packets): %llu bytes on the wire (target < 65536)\n",
        static_cast<unsigned long long>(startup_announcements));
    std::printf(
        "announcement bytes per media byte over the call: %.4f\n",
        double(call.announcement_bytes) / double(std::max<std::uint64_t>(1, call.media_bytes)));
    std::printf(
        "key wiped at the sender's stop: %.0f bytes = %.2f s of this stream's media "
        "(target <= 2 s)\n",
        wiped, wiped / std::max(1.0, media_rate));
    std::printf("delivered %zu of %zu packets\n", delivered, sent);
  }

  // 3: KME restart with an empty store mid-call.
  {
    keys::KeySupply tx(setup.client("sae-a", sim->url()), setup.master("a3.journal"));
    keys::KeySupply rx(setup.client("sae-b", sim->url()), setup.slave());
    tx.start();
    rx.start();
    Call call{tx, rx};
    std::uint16_t seq = 0;
    auto run_for = [&](double seconds, Clock::time_point* first_delivery) {
      const auto start = Clock::now();
      while (Clock::now() - start < std::chrono::duration<double>(seconds)) {
        for (const auto& d : call.send(rtp(seq, 1200))) {
          const bool media = otp::classify(d) != otp::DatagramType::announcement;
          if (call.receive(d) && media && first_delivery && *first_delivery == Clock::time_point{})
            *first_delivery = Clock::now();
        }
        ++seq;
        std::this_thread::sleep_for(gap);
      }
    };
    run_for(1.0, nullptr);
    sim.reset();  // the KME dies: the slave's KME loses every key not fetched yet
    run_for(quick ? 1.0 : 3.0, nullptr);
    auto config = setup.sim_config();
    config.port = port;
    config.start_full = true;
    sim = std::make_unique<otpgate::kmesim::KmeSimulator>(config);
    sim->start();
    const auto back = Clock::now();
    // From now on, the first packet sent with fresh key that arrives.
    const std::uint64_t flushed_before = tx.stats().kme_outages;
    Clock::time_point first{};
    const auto limit = Clock::now() + std::chrono::seconds(20);
    while (Clock::now() < limit &&
           (first == Clock::time_point{} || tx.stats().kme_outages == flushed_before)) {
      first = {};
      run_for(0.05, &first);
      if (tx.stats().kme_outages == flushed_before) first = {};
    }
    const double recovery =
        first == Clock::time_point{} ? -1 : std::chrono::duration<double>(first - back).count();
    std::printf(
        "KME restarted empty: first packet on fresh key delivered %.3f s after the KME "
        "answered again (target <= 1 s); sender flushed %llu bytes\n",
        recovery, static_cast<unsigned long long>(tx.stats().bytes_flushed));
  }

  // 4: a flood of 1000 forged datagrams a second.
  {
    auto measure = [&](bool flood, const char* journal) {
      keys::KeySupply tx(setup.client("sae-a", sim->url()), setup.master(journal));
      keys::KeySupply rx(setup.client("sae-b", sim->url()), setup.slave());
      tx.start();
      rx.start();
      Call call{tx, rx};
      std::mt19937_64 rng(3);
      std::vector<double> latency;
      std::size_t sent = 0, delivered = 0;
      Bytes forged_announcement;
      const auto start = Clock::now();
      for (std::uint16_t seq = 0;
           Clock::now() - start < std::chrono::duration<double>(call_seconds); ++seq) {
        for (const auto& d : call.send(rtp(seq, 1200))) {
          const bool media = otp::classify(d) != otp::DatagramType::announcement;
          if (!media && forged_announcement.empty()) forged_announcement = d;
          double us = 0;
          const bool ok = call.receive(d, &us);
          if (media) {
            ++sent;
            delivered += ok;
            if (seq > 50) latency.push_back(us);
          }
        }
        if (flood) {  // 8 per 8 ms: 1000/s, half announcements, half packets
          for (int f = 0; f < 4 && !forged_announcement.empty(); ++f) {
            Bytes a = forged_announcement;
            for (std::size_t k = 8; k + 16 < a.size(); ++k) a[k] = static_cast<std::uint8_t>(rng());
            call.receive(a);
            Bytes p = rtp(seq, 1200);
            for (int k = 0; k < 24; ++k) p.push_back(static_cast<std::uint8_t>(rng()));
            call.receive(p);
          }
        }
        std::this_thread::sleep_for(gap);
      }
      return std::tuple{double(delivered) / double(std::max<std::size_t>(1, sent)),
                        percentile(latency, 0.99)};
    };
    const auto [base_ratio, base_p99] = measure(false, "a4.journal");
    const auto [flood_ratio, flood_p99] = measure(true, "a5.journal");
    std::printf(
        "genuine delivery: %.4f without forgeries, %.4f with 1000 forged datagrams/s "
        "(target >= 0.99)\n",
        base_ratio, flood_ratio);
    std::printf(
        "p99 decode time per genuine packet: %.1f us without, %.1f us with the flood "
        "(difference %.1f us, target within 50 us)\n",
        base_p99, flood_p99, flood_p99 - base_p99);
  }
  return 0;
}

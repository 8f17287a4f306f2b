// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-keys-demo: one direction of a link (site A -> site B) fed by a KME.
//
// A "media" thread at site A takes pad bytes at a conference-like bit rate from the
// master key supply and forwards its key announcements to site B; a "receiver" thread
// at site B finds the same offsets in the slave key supply (dec_keys) and checks that
// both sites hold identical pad. Every second it prints key levels at both sites.
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cmath>
#include <cstdio>
#include <deque>
#include <thread>

#include "otpgate/keyclient.hpp"

namespace keys = otpgate::keys;
using Clock = std::chrono::steady_clock;

namespace {

using Digest = std::array<std::uint8_t, 32>;

Digest sha256(std::span<const std::uint8_t> bytes) {
  Digest d{};
  unsigned int n = 0;
  EVP_Digest(bytes.data(), bytes.size(), d.data(), &n, EVP_sha256(), nullptr);
  return d;
}

// What the media thread tells the receiver about each chunk it protected.
struct ChunkRecord {
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  Digest pad_digest{};
};

std::string mib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f MiB", bytes / 1048576.0);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  std::string kme_url, pki;
  std::string sae_a = "sae-a", sae_b = "sae-b";
  double media_mbps = 2.9;
  double seconds = 10;
  std::uint32_t chunk = 1200;
  std::string state_dir = "/tmp/otpgate-demo";

  CLI::App app{"otp-keys-demo: key supply for one direction of a link, from a real KME"};
  app.add_option("--kme-url", kme_url, "KME base URL, e.g. https://localhost:8443")->required();
  app.add_option("--pki", pki, "Folder made by scripts/make-test-pki.sh")->required();
  app.add_option("--sae-a", sae_a, "SAE ID of site A (master)")->capture_default_str();
  app.add_option("--sae-b", sae_b, "SAE ID of site B (slave)")->capture_default_str();
  app.add_option("--media-mbps", media_mbps, "Simulated media rate (Mbit/s)")
      ->capture_default_str();
  app.add_option("--seconds", seconds, "How long to run")->capture_default_str();
  app.add_option("--chunk", chunk, "Pad bytes per simulated packet")->capture_default_str();
  app.add_option("--state-dir", state_dir, "Where the offset journal lives")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const auto log = keys::stderr_log_sink(keys::LogLevel::warning);
  auto kme_for = [&](const std::string& sae) {
    keys::KmeClientConfig c;
    c.base_url = kme_url;
    c.tls = {pki + "/" + sae + ".crt", pki + "/" + sae + ".key", pki + "/ca.crt"};
    c.log = log;
    return c;
  };

  try {
    keys::KeySupplyConfig master_cfg;
    master_cfg.role = keys::SaeRole::master;
    master_cfg.peer_sae_id = sae_b;
    master_cfg.journal = state_dir + "/" + sae_a + "-to-" + sae_b + ".journal";
    master_cfg.log = log;
    keys::KeySupplyConfig slave_cfg;
    slave_cfg.role = keys::SaeRole::slave;
    slave_cfg.peer_sae_id = sae_a;
    slave_cfg.log = log;

    keys::KeySupply master(kme_for(sae_a), master_cfg);
    keys::KeySupply slave(kme_for(sae_b), slave_cfg);
    master.start();
    slave.start();
    // A call starts once site A holds key, as the gateway does.
    const auto ready_by = Clock::now() + std::chrono::seconds(15);
    while (master.stats().bytes_available == 0 && Clock::now() < ready_by) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (master.stats().bytes_available == 0) {
      std::fprintf(stderr, "otp-keys-demo: no key from the KME within 15 s: %s\n",
                   master.stats().last_error.c_str());
      return 1;
    }

    boost::lockfree::spsc_queue<ChunkRecord> records(65536);
    std::atomic<bool> media_done{false};
    std::atomic<std::uint64_t> sent{0}, no_key{0}, verified{0}, mismatched{0}, missing{0};

    // Site A: take pad at the media rate, announce keys to site B.
    std::thread media([&] {
      std::vector<std::uint8_t> pad(chunk);
      const double per_second = media_mbps * 1e6 / 8 / chunk;
      const auto start = Clock::now();
      std::uint64_t due_total = 0;
      while (std::chrono::duration<double>(Clock::now() - start).count() < seconds) {
        while (auto a = master.next_announcement()) slave.request(*a);  // in band, in the product
        const auto due = static_cast<std::uint64_t>(
            std::chrono::duration<double>(Clock::now() - start).count() * per_second);
        for (; due_total < due; ++due_total) {
          if (auto offset = master.take(pad)) {
            records.push(ChunkRecord{*offset, chunk, sha256(pad)});
            ++sent;
          } else {
            ++no_key;  // a real sender drops the packet (never sends it in the clear)
          }
          OPENSSL_cleanse(pad.data(), pad.size());
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      while (auto a = master.next_announcement()) slave.request(*a);
      media_done = true;
    });

    // Site B: find each chunk's offsets among the fetched keys and compare.
    std::thread receiver([&] {
      std::deque<keys::PadSegment> window;
      std::vector<std::uint8_t> pad;
      ChunkRecord record;
      auto deadline = Clock::now();
      while (true) {
        if (!records.pop(record)) {
          if (media_done && records.empty()) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
          continue;
        }
        pad.assign(record.length, 0);
        std::uint32_t filled = 0;
        deadline = Clock::now() + std::chrono::seconds(5);
        while (filled < record.length && Clock::now() < deadline) {
          const std::uint64_t want = record.offset + filled;
          auto it = std::find_if(window.begin(), window.end(), [&](const keys::PadSegment& s) {
            return s.offset <= want && want < s.offset + s.bytes.size();
          });
          if (it == window.end()) {
            if (auto segment = slave.pop_segment()) {
              window.push_back(*segment);
            } else {
              std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
            continue;
          }
          const std::size_t from = want - it->offset;
          const std::size_t n =
              std::min<std::size_t>(record.length - filled, it->bytes.size() - from);
          std::copy_n(it->bytes.begin() + from, n, pad.begin() + filled);
          filled += static_cast<std::uint32_t>(n);
        }
        if (filled < record.length) {
          ++missing;
        } else if (sha256(pad) == record.pad_digest) {
          ++verified;
        } else {
          ++mismatched;
        }
        OPENSSL_cleanse(pad.data(), pad.size());
        // Keys wholly below this chunk's end are used up at site B too: wipe them.
        while (!window.empty() && window.front().offset + window.front().bytes.size() <=
                                      record.offset + record.length) {
          slave.release(window.front());
          window.pop_front();
        }
      }
      for (auto& s : window) slave.release(s);
    });

    std::printf(
        "otp-keys-demo: %s -> %s, media %.2f Mbit/s in %u-byte packets, for %.0f s (KME %s)\n",
        sae_a.c_str(), sae_b.c_str(), media_mbps, chunk, seconds, kme_url.c_str());
    const auto start = Clock::now();
    while (!media_done) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      const auto a = master.stats();
      const auto b = slave.stats();
      const double left = a.seconds_to_exhaustion;
      std::printf(
          "t=%4.1fs  site A (master): ring %s, %s consumed, %s fetched, %s left, KME %s | "
          "site B (slave): %llu keys fetched, %llu lost | pad verified %llu, mismatched %llu\n",
          std::chrono::duration<double>(Clock::now() - start).count(),
          mib(double(a.bytes_available)).c_str(), mib(double(a.bytes_consumed)).c_str(),
          mib(double(a.bytes_fetched)).c_str(),
          std::isinf(left) ? "inf s" : (std::to_string(static_cast<long>(left)) + " s").c_str(),
          a.kme_healthy ? "ok" : ("DOWN: " + a.last_error).c_str(),
          static_cast<unsigned long long>(b.keys_fetched),
          static_cast<unsigned long long>(b.keys_lost),
          static_cast<unsigned long long>(verified.load()),
          static_cast<unsigned long long>(mismatched.load()));
      std::fflush(stdout);
    }
    media.join();
    receiver.join();
    const auto a = master.stats();
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    std::printf(
        "summary: %llu packets protected, %llu without key (dropped), pad consumed %s "
        "(%.2f Mbit/s) with key size %u bits; site B verified %llu identical pad ranges, "
        "%llu mismatched, %llu missing; next pad offset %llu (journal reserved up to %llu)\n",
        static_cast<unsigned long long>(sent.load()),
        static_cast<unsigned long long>(no_key.load()), mib(double(a.bytes_consumed)).c_str(),
        double(a.bytes_consumed) * 8 / elapsed / 1e6, a.key_size_bits,
        static_cast<unsigned long long>(verified.load()),
        static_cast<unsigned long long>(mismatched.load()),
        static_cast<unsigned long long>(missing.load()),
        static_cast<unsigned long long>(a.next_offset),
        static_cast<unsigned long long>(a.reserved_offset));
    if (verified == 0 || mismatched != 0 || missing != 0) {
      std::fprintf(stderr, "otp-keys-demo: FAILED: the two sites do not hold the same pad\n");
      return 1;
    }
    std::printf("otp-keys-demo: OK, both sites hold identical pad for every packet\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "otp-keys-demo: %s\n", e.what());
    return 1;
  }
  return 0;
}

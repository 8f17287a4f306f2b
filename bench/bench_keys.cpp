// SPDX-License-Identifier: LGPL-2.1-or-later
// Key supply benchmarks, each beside its baseline in the same run:
//  1. KeyRing::take throughput (GB/s) against memcpy of the same sizes, with a producer
//     thread refilling the ring concurrently, as in the product.
//  2. Key delivery from qkd-kme-sim over HTTPS/mTLS at the largest key size (MB/s of
//     key), master (enc_keys) and slave (dec_keys).
//   bench_keys --pki DIR [--quick]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kme_simulator.hpp"
#include "otpgate/keyclient.hpp"

namespace keys = otpgate::keys;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double ring_take_gbps(std::size_t chunk, std::uint64_t total) {
  keys::KeyRing ring(4096, 1024);
  std::atomic<bool> stop{false};
  std::thread producer([&] {
    std::vector<std::uint8_t> key(1024, 0x5a);
    std::uint64_t offset = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      if (ring.push(offset, keys::KeyId(), key)) {
        offset += key.size();
      } else {
        std::this_thread::yield();
      }
    }
  });
  while (ring.bytes_available() < (2u << 20)) std::this_thread::yield();
  std::vector<std::uint8_t> out(chunk);
  std::uint64_t done = 0;
  const auto start = Clock::now();
  while (done < total) {
    if (ring.take(out)) done += chunk;
  }
  const double s = seconds_since(start);
  stop = true;
  producer.join();
  return double(done) / s / 1e9;
}

// Consumer cost alone: fill the ring (untimed), then time the takes that empty it.
double ring_take_prefilled_gbps(std::size_t chunk, std::uint64_t total) {
  keys::KeyRing ring(4096, 1024);
  std::vector<std::uint8_t> key(1024, 0x5a);
  std::vector<std::uint8_t> out(chunk);
  std::uint64_t offset = 0, done = 0;
  double timed = 0;
  while (done < total) {
    while (ring.push(offset, keys::KeyId(), key)) offset += key.size();
    const auto start = Clock::now();
    while (ring.take(out)) done += chunk;
    timed += seconds_since(start);
  }
  return double(done) / timed / 1e9;
}

double memcpy_gbps(std::size_t chunk, std::uint64_t total) {
  // Same working-set shape as the ring: a 4 MiB source walked in order.
  std::vector<std::uint8_t> source(4u << 20, 0x5a);
  std::vector<std::uint8_t> out(chunk);
  std::uint64_t done = 0;
  std::size_t at = 0;
  const auto start = Clock::now();
  while (done < total) {
    if (at + chunk > source.size()) at = 0;
    std::memcpy(out.data(), source.data() + at, chunk);
    asm volatile("" : : "r"(out.data()) : "memory");  // keep the copy
    at += chunk;
    done += chunk;
  }
  return double(done) / seconds_since(start) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::string pki;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") quick = true;
    if (arg == "--pki" && i + 1 < argc) pki = argv[++i];
  }
  if (pki.empty()) {
    std::fprintf(stderr,
                 "usage: bench_keys --pki DIR [--quick]   (DIR from scripts/make-test-pki.sh)\n");
    return 2;
  }
  const std::uint64_t total = quick ? (8u << 20) : (2ull << 30);

  std::printf("== key ring take vs memcpy (producer refilling concurrently) ==\n");
  std::printf("%8s %14s %16s %12s %8s %10s\n", "bytes", "take GB/s", "take-only GB/s",
              "memcpy GB/s", "ratio", "ns/take");
  for (std::size_t chunk : {64u, 1200u, 16384u}) {
    const double take = ring_take_gbps(chunk, total);
    const double take_only = ring_take_prefilled_gbps(chunk, total);
    const double copy = memcpy_gbps(chunk, total);
    std::printf("%8zu %14.2f %16.2f %12.2f %8.2f %10.0f\n", chunk, take, take_only, copy,
                take_only / copy, double(chunk) / take_only);
  }
  std::printf(
      "(take: with a producer thread refilling on the other core; take-only: the\n"
      " consumer's own cost, which includes wiping the bytes it hands out)\n");

  otpgate::kmesim::SimulatorConfig config;
  config.certificate = pki + "/kme.crt";
  config.private_key = pki + "/kme.key";
  config.client_ca = pki + "/ca.crt";
  config.sae_ids = {"sae-a", "sae-b"};
  config.key_rate_bps = 0;
  config.store_bits = 8ull << 30;  // 1 GiB
  otpgate::kmesim::KmeSimulator sim(config);
  sim.start();
  auto client_config = [&](const std::string& sae) {
    keys::KmeClientConfig c;
    c.base_url = sim.url();
    c.tls = {pki + "/" + sae + ".crt", pki + "/" + sae + ".key", pki + "/ca.crt"};
    return c;
  };
  keys::KmeClient master(client_config("sae-a"));
  keys::KmeClient slave(client_config("sae-b"));
  const auto status = master.status("sae-b");
  const std::uint32_t bits = keys::choose_key_size(status, 0);
  const std::uint32_t per_request = std::min<std::uint32_t>(status.max_key_per_request, 512);
  const int requests = quick ? 2 : 40;

  double enc_seconds = 0, dec_seconds = 0;
  std::uint64_t bytes = 0;
  for (int r = 0; r < requests; ++r) {
    auto t = Clock::now();
    auto got = master.enc_keys("sae-b", per_request, bits);
    enc_seconds += seconds_since(t);
    std::vector<keys::KeyId> ids;
    for (const auto& k : got) {
      ids.push_back(k.id);
      bytes += k.bytes.size();
    }
    t = Clock::now();
    slave.dec_keys("sae-a", ids);
    dec_seconds += seconds_since(t);
  }
  std::printf(
      "\n== key delivery from qkd-kme-sim over HTTPS/mTLS, %u-bit keys, %u per request ==\n", bits,
      per_request);
  std::printf("enc_keys (master): %8.1f MB/s of key\n", double(bytes) / enc_seconds / 1e6);
  std::printf("dec_keys (slave):  %8.1f MB/s of key\n", double(bytes) / dec_seconds / 1e6);
  std::printf("a 10 Mbit/s QKD link delivers 1.25 MB/s: the client is %.0fx faster than the link\n",
              double(bytes) / std::max(enc_seconds, dec_seconds) / 1.25e6);
  return 0;
}

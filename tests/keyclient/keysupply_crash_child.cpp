// SPDX-License-Identifier: LGPL-2.1-or-later
// Test helper: a master key supply that takes pad as fast as it can and records every
// offset range it was handed, one line each, until it is killed.
//   keysupply_crash_child KME_URL PKI_DIR JOURNAL LOG
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "otpgate/keyclient.hpp"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s KME_URL PKI_DIR JOURNAL LOG\n", argv[0]);
    return 2;
  }
  namespace keys = otpgate::keys;
  const std::string pki = argv[2];
  keys::KmeClientConfig kme;
  kme.base_url = argv[1];
  kme.tls = {pki + "/sae-a.crt", pki + "/sae-a.key", pki + "/ca.crt"};
  keys::KeySupplyConfig config;
  config.role = keys::SaeRole::master;
  config.peer_sae_id = "sae-b";
  config.journal = argv[3];
  config.ring_bytes = 128u << 10;
  config.reserve_chunk = 32u << 10;  // many reservations per run
  config.publish_announcements = false;
  keys::KeySupply supply(kme, config);
  supply.start();
  const int log = ::open(argv[4], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log < 0) return 3;
  std::vector<std::uint8_t> pad(1000);
  while (true) {
    if (auto offset = supply.take(pad)) {
      // Recorded after the take and before any use; the page cache survives SIGKILL.
      const std::string line = std::to_string(*offset) + " " + std::to_string(pad.size()) + "\n";
      if (::write(log, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return 4;
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

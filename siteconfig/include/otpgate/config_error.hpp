// SPDX-License-Identifier: LGPL-2.1-or-later
// Types shared by every otpgate config (kept apart from toml++ so they are cheap to include):
// the error, endpoints, and the site part every daemon's config starts with.
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace otpgate::config {

// A configuration problem: one line naming the key, the value and what is expected.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Endpoint {
  std::string host;
  std::uint16_t port = 0;
};

// What every site daemon needs: who it is, its KME, its peer's SAE ID, key ring size.
// [site], [kme], [peer] sae_id, [keys]; read by config::read_site.
struct SiteConfig {
  std::string site_name;
  std::string sae_id;
  std::filesystem::path state_dir;  // offset journals (and the transfer's job database)
  std::string kme_url;
  std::filesystem::path tls_cert, tls_key, tls_ca;
  std::string peer_sae_id;
  std::uint64_t key_ring_bytes = 4u << 20;  // key held ready per stream, at most
  // Media senders hold this much of their stream's measured key consumption (at least
  // 256 KiB, at most key_ring_bytes) and announce keys this far ahead of use; 0 holds
  // the whole ring and announces keys as they arrive (bulk transfers).
  std::uint32_t key_ring_ms = 2000;
  std::uint32_t announce_lead_ms = 1500;
  // Media senders move to a fresh, self-verifying epoch this often, so a receiver that
  // lost an announcement and all its repeats catches up; 0 never.
  std::uint32_t resync_ms = 2000;
};

}  // namespace otpgate::config

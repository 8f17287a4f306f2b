// SPDX-License-Identifier: LGPL-2.1-or-later
// What a daemon can verify about its config before it runs, without the network beyond
// name resolution: the TLS files (parse, key matches certificate, CA is a CA and issued
// the certificate, validity dates), URLs, that peers' names resolve, that the state
// directory is writable and that listening ports are free. `--check-config` and start-up
// run the same checks, so a config that passes does not fail at run time for these.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "otpgate/config_error.hpp"

namespace otpgate::config {

class OfflineChecks {
 public:
  // [kme] tls_cert/tls_key/tls_ca, [kme] url, [site] state_dir and sae_id.
  void site(const SiteConfig& c);
  // `key` names the config key in messages ("peer.address").
  void resolves(const std::string& key, const std::string& host);
  void udp_port_free(const std::string& key, const std::string& host, std::uint16_t port);
  void tcp_port_free(const std::string& key, const std::string& host, std::uint16_t port);
  void writable_directory(const std::string& key, const std::filesystem::path& dir);
  // A PEM certificate with its private key (e.g. an HTTPS listener's), checked alike.
  void certificate_and_key(const std::string& cert_key, const std::filesystem::path& cert,
                           const std::string& key_key, const std::filesystem::path& key);

  // Each one readable line naming the key, the value, what is wrong and the fix.
  const std::vector<std::string>& problems() const { return problems_; }
  // Likely mistakes that can be right in some deployments (e.g. the KME's CA is not the
  // issuer of this SAE's certificate): reported, not fatal.
  const std::vector<std::string>& warnings() const { return warnings_; }
  // Throws a ConfigError with the first problem (and how many more there are).
  void throw_if_any() const;

 private:
  void problem(std::string line) { problems_.push_back(std::move(line)); }
  void warning(std::string line) { warnings_.push_back(std::move(line)); }
  void port_free(const std::string& key, const std::string& host, std::uint16_t port, int type);
  std::vector<std::string> problems_, warnings_;
};

}  // namespace otpgate::config

// SPDX-License-Identifier: LGPL-2.1-or-later
// See key_settings.hpp.
#include "key_settings.hpp"

#include "otpgate/site_config.hpp"

namespace otpgate::transfer::detail {

keys::KmeClientConfig kme_client_config(const TransferConfig& config) {
  keys::KmeClientConfig k;
  k.base_url = config.kme_url;
  k.tls = {config.tls_cert, config.tls_key, config.tls_ca};
  k.log = keys::stderr_log_sink(keys::LogLevel::warning);
  return k;
}

std::filesystem::path journal_path(const TransferConfig& config, const std::string& job_id) {
  // Job IDs come from the peer too: file_in keeps the journal inside its folder.
  return config::file_in(config.state_dir / "transfer-journals", job_id + ".journal");
}

}  // namespace otpgate::transfer::detail

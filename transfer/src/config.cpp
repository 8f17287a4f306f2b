// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-transfer's config: the shared [site]/[kme]/[peer]/[keys] sections of the one
// config loader (otpgate/site_config.hpp) plus [transfer] and [api].
#include "otpgate/site_config.hpp"
#include "otpgate/transfer.hpp"

namespace otpgate::transfer {

TransferConfig parse_config(std::string_view text, const std::string& source) {
  const toml::table root = config::parse_toml(text, source);
  config::reject_unknown(
      root,
      {{"site", config::kSiteKeys},
       {"kme", config::kKmeKeys},
       {"keys", config::kKeysKeys},
       {"peer", {"sae_id", "transfer", "address", "transport"}},
       {"transfer",
        {"listen", "incoming_dir", "data_root", "method", "completion_markers", "record_size",
         "commit_bytes", "aes_rekey_records", "max_attempts", "follow_symlinks"}},
       {"api", {"listen", "tls_cert", "tls_key", "user", "password_sha256", "server_names"}},
       // otp-gateway's, when one file serves both
       {"policy", {}, false, true},
       {"media", {}, false, true},
       {"status", {}, false, true},
       {"ice", {}, false, true},
       {"stream", {}, true, true}},
      source);
  const config::Reader r(root, source);
  TransferConfig c;
  config::read_site(r, c);

  const toml::table& peer = r.table("peer");
  if (peer.get("transfer")) c.peer_transfer = r.endpoint(peer, "peer.", "transfer");

  const toml::table& t = r.table("transfer");
  if (t.get("listen")) c.listen = r.endpoint(t, "transfer.", "listen", true);
  c.incoming_dir =
      r.string(t, "transfer.", "incoming_dir", "a writable folder for received specimens");
  if (t.get("data_root")) {
    c.data_root = r.string(t, "transfer.", "data_root", "the folder holding specimen folders");
    if (!std::filesystem::is_directory(c.data_root)) {
      r.fail("transfer.data_root", '"' + c.data_root.string() + '"',
             "an existing folder (the sequencer's output root)");
    }
  }
  if (t.get("method")) {
    const std::string method = r.string(t, "transfer.", "method", "\"otp\" or \"aes\"");
    const auto named = from_string<Method>(method);
    if (!named) r.fail("transfer.method", '"' + method + '"', "\"otp\" or \"aes\"");
    c.method = *named;
  }
  if (const toml::node* markers = t.get("completion_markers")) {
    const toml::array* list = markers->as_array();
    if (!list || list->empty()) {
      r.fail("transfer.completion_markers", config::Reader::shown(markers),
             "a list of file names such as [\"CopyComplete.txt\"]");
    }
    c.completion_markers.clear();
    for (const auto& m : *list) {
      const auto* name = m.as_string();
      if (!name || name->get().empty() || name->get().find('/') != std::string::npos) {
        r.fail("transfer.completion_markers", config::Reader::shown(markers),
               "a list of plain file names such as [\"CopyComplete.txt\"]");
      }
      c.completion_markers.push_back(name->get());
    }
  }
  c.record_size =
      static_cast<std::uint32_t>(r.integer(t, "transfer.", "record_size", 4096, 65536,
                                           "bytes per record, 4096 to 65536", c.record_size));
  c.commit_bytes = static_cast<std::uint64_t>(
      r.integer(t, "transfer.", "commit_bytes", 1 << 20, std::int64_t(1) << 34,
                "bytes between receiver commits, 1 MiB to 16 GiB",
                static_cast<std::int64_t>(c.commit_bytes)));
  c.aes_rekey_records = static_cast<std::uint32_t>(
      r.integer(t, "transfer.", "aes_rekey_records", 1, 1 << 24,
                "records per AES key, 1 to 16777216", c.aes_rekey_records));
  c.max_attempts = static_cast<int>(r.integer(t, "transfer.", "max_attempts", 1, 1000,
                                              "connection attempts, 1 to 1000", c.max_attempts));
  c.follow_symlinks = r.boolean(t, "transfer.", "follow_symlinks", false);

  if (const toml::table* api = r.optional_table("api")) {
    if (api->get("listen")) c.api_listen = r.endpoint(*api, "api.", "listen", true);
    if (const toml::node* names = api->get("server_names")) {
      const toml::array* list = names->as_array();
      if (!list) r.fail("api.server_names", config::Reader::shown(names), "a list of host names");
      for (const auto& n : *list) {
        const auto* name = n.as_string();
        if (!name || !config::Reader::is_host(name->get()))
          r.fail("api.server_names", config::Reader::shown(&n),
                 "host names such as \"lab.example\"");
        c.api_server_names.push_back(name->get());
      }
    }
    if (api->get("tls_cert") || api->get("tls_key")) {
      c.api_tls_cert = r.file(*api, "api.", "tls_cert");
      c.api_tls_key = r.file(*api, "api.", "tls_key");
    }
    if (api->get("user") || api->get("password_sha256")) {
      c.api_user = r.string(*api, "api.", "user", "a user name for the web page and API");
      c.api_password_sha256 = r.string(*api, "api.", "password_sha256",
                                       "the hex SHA-256 of the password (echo -n PW | sha256sum)");
      if (c.api_password_sha256.size() != 64 ||
          c.api_password_sha256.find_first_not_of("0123456789abcdef") != std::string::npos) {
        r.fail("api.password_sha256", "(hidden)",
               "64 lower-case hex digits (echo -n PW | sha256sum)");
      }
    }
  }
  const std::string& host = c.api_listen.host;
  const bool local = host == "127.0.0.1" || host == "localhost" || host == "::1";
  if (!local && (c.api_tls_cert.empty() || c.api_user.empty())) {
    r.fail("api.listen", '"' + host + ":" + std::to_string(c.api_listen.port) + '"',
           "a localhost address, or api.tls_cert/tls_key and api.user/password_sha256 so the "
           "page and API are served over HTTPS with a login");
  }
  return c;
}

TransferConfig load_config(const std::filesystem::path& path) {
  return parse_config(config::read_config_file(path), path.string());
}

config::OfflineChecks check_offline(const TransferConfig& c, bool serving) {
  config::OfflineChecks checks;
  checks.site(c);
  checks.writable_directory("transfer.incoming_dir", c.incoming_dir);
  if (c.peer_transfer) checks.resolves("peer.address", c.peer_transfer->host);
  if (!c.api_tls_cert.empty())
    checks.certificate_and_key("api.tls_cert", c.api_tls_cert, "api.tls_key", c.api_tls_key);
  if (serving) {  // the CLI's other commands run beside a running service
    checks.tcp_port_free("transfer.listen", c.listen.host, c.listen.port);
    checks.tcp_port_free("api.listen", c.api_listen.host, c.api_listen.port);
  }
  return checks;
}

std::filesystem::path database_path(const TransferConfig& config) {
  return config.state_dir / "transfer-jobs.sqlite";
}

}  // namespace otpgate::transfer

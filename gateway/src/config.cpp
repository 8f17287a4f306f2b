// The gateway's one config loader (toml++). Every error names the key, the value and
// what is expected, in one line.
#include <toml++/toml.h>

#include <fstream>
#include <set>
#include <sstream>

#include "otpgate/gateway.hpp"

namespace otpgate::gateway {

namespace {

class Reader {
 public:
  Reader(const toml::table& root, std::string source) : root_(root), source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& value,
                         const std::string& expected) const {
    throw ConfigError(source_ + ": " + key + (value.empty() ? " is missing" : " = " + value) +
                      ": expected " + expected);
  }

  static std::string shown(const toml::node* node) {
    if (!node) return "";
    std::ostringstream out;
    node->visit([&out](auto&& value) { out << value; });
    return out.str();
  }

  std::string string(const toml::table& table, const std::string& prefix, const char* key,
                     const char* expected,
                     std::optional<std::string> fallback = std::nullopt) const {
    const toml::node* node = table.get(key);
    if (!node) {
      if (fallback) return *fallback;
      fail(prefix + key, "", expected);
    }
    const auto* value = node->as_string();
    if (!value || value->get().empty()) fail(prefix + key, shown(node), expected);
    return value->get();
  }

  std::int64_t integer(const toml::table& table, const std::string& prefix, const char* key,
                       std::int64_t min, std::int64_t max, const char* expected,
                       std::optional<std::int64_t> fallback = std::nullopt) const {
    const toml::node* node = table.get(key);
    if (!node) {
      if (fallback) return *fallback;
      fail(prefix + key, "", expected);
    }
    const auto* value = node->as_integer();
    if (!value || value->get() < min || value->get() > max)
      fail(prefix + key, shown(node), expected);
    return value->get();
  }

  std::uint16_t port(const toml::table& table, const std::string& prefix, const char* key,
                     bool required) const {
    if (!required && !table.get(key)) return 0;
    return static_cast<std::uint16_t>(
        integer(table, prefix, key, 1, 65535, "a UDP port number from 1 to 65535"));
  }

  Endpoint endpoint(const toml::table& table, const std::string& prefix, const char* key,
                    bool any_port_allowed = false) const {
    const std::string text = string(table, prefix, key, "\"host:port\"");
    const auto colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0)
      fail(prefix + key, '"' + text + '"', "\"host:port\"");
    int port = 0;
    try {
      std::size_t used = 0;
      port = std::stoi(text.substr(colon + 1), &used);
      if (used != text.size() - colon - 1) port = 0;
    } catch (const std::exception&) {
      port = 0;
    }
    if (port < (any_port_allowed ? 0 : 1) || port > 65535 ||
        (port == 0 && text.substr(colon + 1) != "0")) {
      fail(prefix + key, '"' + text + '"', "\"host:port\" with a port from 1 to 65535");
    }
    return Endpoint{text.substr(0, colon), static_cast<std::uint16_t>(port)};
  }

  const toml::table& table(const char* key) const {
    const toml::node* node = root_.get(key);
    if (!node || !node->is_table()) fail(std::string("[") + key + "]", shown(node), "a table");
    return *node->as_table();
  }

  std::filesystem::path file(const toml::table& table, const std::string& prefix,
                             const char* key) const {
    const std::string path = string(table, prefix, key, "the path of a readable PEM file");
    if (!std::filesystem::is_regular_file(path)) {
      fail(prefix + key, '"' + path + '"', "the path of a readable PEM file (no such file)");
    }
    return path;
  }

  const toml::table& root() const { return root_; }

 private:
  const toml::table& root_;
  std::string source_;
};

}  // namespace

GatewayConfig parse_config(std::string_view text, const std::string& source) {
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    throw ConfigError(source + ":" + std::to_string(where.line) + ":" +
                      std::to_string(where.column) +
                      ": not valid TOML: " + std::string(e.description()));
  }
  const Reader r(root, source);
  GatewayConfig c;

  const toml::table& site = r.table("site");
  c.site_name = r.string(site, "site.", "name", "a site name such as \"hospital-a\"");
  c.sae_id = r.string(site, "site.", "sae_id",
                      "this site's SAE ID (the CN of its KME client certificate)");
  c.state_dir = r.string(site, "site.", "state_dir", "a writable folder for offset journals",
                         std::string("/var/lib/otpgate"));

  const toml::table& kme = r.table("kme");
  c.kme_url = r.string(kme, "kme.", "url", "the KME base URL, https://host:port");
  if (c.kme_url.rfind("https://", 0) != 0) {
    r.fail("kme.url", '"' + c.kme_url + '"', "an https:// URL (ETSI GS QKD 014 requires TLS)");
  }
  c.tls_cert = r.file(kme, "kme.", "tls_cert");
  c.tls_key = r.file(kme, "kme.", "tls_key");
  c.tls_ca = r.file(kme, "kme.", "tls_ca");

  const toml::table& peer = r.table("peer");
  c.peer_sae_id = r.string(peer, "peer.", "sae_id", "the remote site's SAE ID");
  c.peer_address =
      r.string(peer, "peer.", "address", "the remote gateway's IP address or host name");
  if (c.peer_sae_id == c.sae_id)
    r.fail("peer.sae_id", '"' + c.peer_sae_id + '"', "an SAE ID other than site.sae_id");
  c.transport = r.string(peer, "peer.", "transport", "\"udp\" or \"ice\"", c.transport);
  if (c.transport != "udp" && c.transport != "ice") {
    r.fail("peer.transport", '"' + c.transport + '"', "\"udp\" or \"ice\"");
  }
  if (c.transport == "ice") {
    const toml::table& ice = r.table("ice");
    c.ice_signalling_listen = r.endpoint(ice, "ice.", "signalling_listen", true);
    c.ice_peer_signalling = r.endpoint(ice, "ice.", "peer_signalling");
    if (ice.get("stun")) c.ice_stun = r.endpoint(ice, "ice.", "stun");
  }
  const bool udp = c.transport == "udp";

  if (const toml::node* policy_node = root.get("policy")) {
    if (!policy_node->is_table()) r.fail("[policy]", Reader::shown(policy_node), "a table");
    const toml::table& policy = *policy_node->as_table();
    c.cipher = r.string(policy, "policy.", "cipher", "\"otp\" or \"aes-256-gcm\"", c.cipher);
    if (c.cipher != "otp" && c.cipher != "aes-256-gcm") {
      r.fail("policy.cipher", '"' + c.cipher + '"', "\"otp\" or \"aes-256-gcm\"");
    }
    c.on_key_exhausted = r.string(policy, "policy.", "on_key_exhausted",
                                  "\"drop\", \"block\" or \"fallback-aes\"", c.on_key_exhausted);
    if (c.on_key_exhausted != "drop" && c.on_key_exhausted != "block" &&
        c.on_key_exhausted != "fallback-aes") {
      r.fail("policy.on_key_exhausted", '"' + c.on_key_exhausted + '"',
             "\"drop\", \"block\" or \"fallback-aes\"");
    }
    c.rekey_interval =
        static_cast<std::uint32_t>(r.integer(policy, "policy.", "rekey_interval", 1, INT32_MAX,
                                             "packets per AES key, at least 1", c.rekey_interval));
  }

  if (const toml::node* keys_node = root.get("keys")) {
    if (!keys_node->is_table()) r.fail("[keys]", Reader::shown(keys_node), "a table");
    c.key_ring_bytes = static_cast<std::uint64_t>(
        r.integer(*keys_node->as_table(), "keys.", "ring_bytes", 65536, std::int64_t(1) << 32,
                  "bytes of key held ready per stream and direction, 65536 to 4294967296",
                  static_cast<std::int64_t>(c.key_ring_bytes)));
  }

  if (const toml::node* status_node = root.get("status")) {
    if (!status_node->is_table()) r.fail("[status]", Reader::shown(status_node), "a table");
    c.status_listen = r.endpoint(*status_node->as_table(), "status.", "listen", true);  // :0 = any
  }

  const toml::node* streams_node = root.get("stream");
  const toml::array* streams = streams_node ? streams_node->as_array() : nullptr;
  if (!streams || streams->empty()) {
    r.fail("[[stream]]", Reader::shown(streams_node), "at least one [[stream]] table");
  }
  std::set<std::string> names;
  std::set<std::uint16_t> local_ports, listen_ports;
  for (std::size_t i = 0; i < streams->size(); ++i) {
    const toml::table* t = (*streams)[i].as_table();
    const std::string prefix = "stream[" + std::to_string(i) + "].";
    if (!t) r.fail(prefix.substr(0, prefix.size() - 1), Reader::shown(&(*streams)[i]), "a table");
    StreamConfig s;
    s.name = r.string(*t, prefix, "name", "a stream name such as \"video-1\"");
    if (!names.insert(s.name).second)
      r.fail(prefix + "name", '"' + s.name + '"', "a name no other stream has");
    s.direction =
        r.string(*t, prefix, "direction", "\"both\", \"send\" or \"receive\"", s.direction);
    if (s.direction != "both" && s.direction != "send" && s.direction != "receive") {
      r.fail(prefix + "direction", '"' + s.direction + '"', "\"both\", \"send\" or \"receive\"");
    }
    if (s.sends()) {
      s.local_rtp_port = r.port(*t, prefix, "local_rtp_port", true);
      s.local_rtcp_port = r.port(*t, prefix, "local_rtcp_port", false);
      s.peer_port = r.port(*t, prefix, "peer_port", udp);  // ICE finds its own path
    }
    if (s.receives()) {
      s.listen_port = r.port(*t, prefix, "listen_port", udp);
      s.deliver_rtp = r.endpoint(*t, prefix, "deliver_rtp");
    }
    if (s.receives() && t->get("deliver_rtcp"))
      s.deliver_rtcp = r.endpoint(*t, prefix, "deliver_rtcp");
    for (std::uint16_t port : {s.local_rtp_port, s.local_rtcp_port, s.listen_port}) {
      if (port != 0 && !local_ports.insert(port).second) {
        r.fail(prefix + "*_port", std::to_string(port),
               "a local port no other stream or direction uses");
      }
    }
    c.streams.push_back(std::move(s));
  }
  return c;
}

GatewayConfig load_config(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path.string() + ": cannot be read (does it exist? check --config)");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path.string());
}

}  // namespace otpgate::gateway

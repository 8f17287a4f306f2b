// SPDX-License-Identifier: LGPL-2.1-or-later
// The gateway's one config loader (toml++). Every error names the key, the value and
// what is expected, in one line.
#include <arpa/inet.h>

#include <set>

#include "otpgate/gateway.hpp"
#include "otpgate/sip.hpp"
#include "otpgate/site_config.hpp"

namespace otpgate::gateway {

using config::Reader;

GatewayConfig parse_config(std::string_view text, const std::string& source) {
  const toml::table root = config::parse_toml(text, source);
  config::reject_unknown(
      root,
      {{"site", config::kSiteKeys},
       {"kme", config::kKmeKeys},
       {"keys", config::kKeysKeys},
       {"peer", {"sae_id", "address", "transport", "transfer"}},
       {"policy", {"cipher", "on_key_exhausted", "rekey_interval"}},
       {"media",
        {"realtime_priority", "cpu_wakeup_latency_us", "key_wait_ms", "pin_threads",
         "batch_window_us"}},
       {"status", {"listen", "server_names", "unhealthy_after_s"}},
       {"ice", {"signalling_listen", "peer_signalling", "stun"}},
       {"sip",
        {"ng_listen", "ng_clients", "delete_delay_s", "media_address", "port_min", "port_max",
         "max_media", "media_timeout_s", "key_rate_bits_per_s", "admission_horizon_s",
         "over_budget"}},
       {"stream",
        {"name", "direction", "local_rtp_port", "local_rtcp_port", "peer_port", "listen_port",
         "deliver_rtp", "deliver_rtcp"},
        true},
       {"transfer", {}, false, true},  // otp-transfer's, when one file serves both
       {"api", {}, false, true}},
      source);
  const Reader r(root, source);
  GatewayConfig c;
  config::read_site(r, c);

  const toml::table& peer = r.table("peer");
  c.peer_address = r.host(peer, "peer.", "address", "the remote gateway's IP address or host name");
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

  if (const toml::node* media_node = root.get("media")) {
    if (!media_node->is_table()) r.fail("[media]", Reader::shown(media_node), "a table");
    c.realtime_priority = static_cast<int>(
        r.integer(*media_node->as_table(), "media.", "realtime_priority", 0, 99,
                  "0 (time-sharing) or a SCHED_FIFO priority from 1 to 99", c.realtime_priority));
    if (media_node->as_table()->contains("cpu_wakeup_latency_us")) {
      c.cpu_wakeup_latency_us = static_cast<int>(
          r.integer(*media_node->as_table(), "media.", "cpu_wakeup_latency_us", 0, 1000000,
                    "microseconds from 0 (CPUs never sleep) to 1000000", std::nullopt));
    }
    c.receive_key_wait_ms = static_cast<std::uint32_t>(
        r.integer(*media_node->as_table(), "media.", "key_wait_ms", 0, 5000,
                  "milliseconds a received packet may wait for its key, 0 to 5000",
                  std::int64_t{c.receive_key_wait_ms}));
    c.pin_media_threads =
        r.boolean(*media_node->as_table(), "media.", "pin_threads", c.pin_media_threads);
    c.media_batch_window_us = static_cast<std::uint32_t>(
        r.integer(*media_node->as_table(), "media.", "batch_window_us", 0, 20000,
                  "microseconds from 0 (off) to 20000", std::int64_t{c.media_batch_window_us}));
  }

  if (const toml::node* status_node = root.get("status")) {
    if (!status_node->is_table()) r.fail("[status]", Reader::shown(status_node), "a table");
    const toml::table& status = *status_node->as_table();
    if (status.contains("listen"))
      c.status_listen = r.endpoint(status, "status.", "listen", true);  // :0 = any
    c.status_server_names = r.hosts(status, "status.", "server_names");
    c.unhealthy_after_s =
        static_cast<std::uint32_t>(r.integer(status, "status.", "unhealthy_after_s", 1, 3600,
                                             "seconds from 1 to 3600", std::int64_t{15}));
  }

  if (const toml::table* sip = r.optional_table("sip")) {
    SipConfig s;
    if (sip->contains("ng_listen")) s.ng_listen = r.endpoint(*sip, "sip.", "ng_listen", true);
    s.media_address =
        r.host(*sip, "sip.", "media_address",
               "this gateway's IP address, as the conference systems and the peer reach it");
    in6_addr numeric{};
    if (inet_pton(AF_INET, s.media_address.c_str(), &numeric) != 1 &&
        inet_pton(AF_INET6, s.media_address.c_str(), &numeric) != 1) {
      r.fail("sip.media_address", '"' + s.media_address + '"',
             "a numeric IPv4 or IPv6 address (it is written into SDP)");
    }
    s.port_min = r.port(*sip, "sip.", "port_min", true);
    s.port_max = r.port(*sip, "sip.", "port_max", true);
    s.max_media = static_cast<std::uint32_t>(r.integer(*sip, "sip.", "max_media", 1, 256,
                                                       "call media at once, from 1 to 256",
                                                       std::int64_t{s.max_media}));
    s.media_timeout_s = static_cast<std::uint32_t>(r.integer(*sip, "sip.", "media_timeout_s", 5,
                                                             86400, "seconds from 5 to 86400",
                                                             std::int64_t{s.media_timeout_s}));
    s.key_rate_bits_per_s = static_cast<std::uint64_t>(
        r.integer(*sip, "sip.", "key_rate_bits_per_s", 0, std::int64_t{1} << 40,
                  "bit/s of key on the link to the peer (0: no admission check)", std::int64_t{0}));
    s.admission_horizon_s = static_cast<std::uint32_t>(r.integer(
        *sip, "sip.", "admission_horizon_s", 0, 86400,
        "seconds from 0 (key in store not counted) to 86400", std::int64_t{s.admission_horizon_s}));
    s.over_budget =
        r.string(*sip, "sip.", "over_budget", "\"refuse\", \"cap\" or \"aes\"", s.over_budget);
    if (s.over_budget != "refuse" && s.over_budget != "cap" && s.over_budget != "aes") {
      r.fail("sip.over_budget", '"' + s.over_budget + '"', "\"refuse\", \"cap\" or \"aes\"");
    }
    s.ng_clients_set = sip->contains("ng_clients");
    s.ng_clients = r.hosts(*sip, "sip.", "ng_clients");
    if (s.ng_clients_set && s.ng_clients.empty()) {
      r.fail("sip.ng_clients", "[]",
             "the SIP proxies' addresses or host names, e.g. [\"10.1.0.2\"] (no client could "
             "drive the gateway)");
    }
    {
      std::string host = s.ng_listen.host;
      if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
      if (!ng::is_loopback_address(host) && !s.ng_clients_set) {
        r.fail(
            "sip.ng_clients", "",
            "the SIP proxies' addresses, e.g. ng_clients = [\"10.1.0.2\"], when sip.ng_listen (" +
                host +
                ") is not a loopback address: anyone who can reach the ng socket "
                "could open calls and end others'");
      }
    }
    s.delete_delay_s = static_cast<std::uint32_t>(r.integer(*sip, "sip.", "delete_delay_s", 0, 3600,
                                                            "seconds from 0 to 3600",
                                                            std::int64_t{s.delete_delay_s}));
    const std::uint32_t units = s.port_max >= s.port_min ? (s.port_max - s.port_min + 1u) / 4u : 0u;
    if (units < s.max_media) {
      r.fail("sip.port_max", std::to_string(s.port_max),
             "a port range from sip.port_min holding 4 ports per call media (sip.max_media = " +
                 std::to_string(s.max_media) + " needs " + std::to_string(4 * s.max_media) + ")");
    }
    if (c.transport != "udp") {
      r.fail("peer.transport", '"' + c.transport + '"',
             "\"udp\" with [sip] (calls over ICE are not supported yet)");
    }
    c.sip = s;
  }

  const toml::node* streams_node = root.get("stream");
  const toml::array* streams = streams_node ? streams_node->as_array() : nullptr;
  if (streams_node && !streams) {
    r.fail("[[stream]]", Reader::shown(streams_node), "an array of [[stream]] tables");
  }
  if ((!streams || streams->empty()) && !c.sip) {
    r.fail("[[stream]]", Reader::shown(streams_node),
           "at least one [[stream]] table (or a [sip] section for calls)");
  }
  if (!streams) return c;
  std::set<std::string> names;
  std::set<std::uint16_t> local_ports, listen_ports;
  for (std::size_t i = 0; i < streams->size(); ++i) {
    const toml::table* t = (*streams)[i].as_table();
    const std::string prefix = "stream[" + std::to_string(i) + "].";
    if (!t) r.fail(prefix.substr(0, prefix.size() - 1), Reader::shown(&(*streams)[i]), "a table");
    StreamConfig s;
    s.name = r.string(*t, prefix, "name", "a stream name such as \"video-1\"");
    // The name becomes part of file names (its offset journal): letters, digits, '.',
    // '_' and '-' only, so no name can reach outside state_dir.
    const bool safe = s.name.size() <= 64 && s.name != "." && s.name != ".." &&
                      s.name.find_first_not_of(
                          "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                          "0123456789._-") == std::string::npos;
    if (!safe) {
      r.fail(prefix + "name", '"' + s.name + '"',
             "1 to 64 letters, digits, '.', '_' or '-' (it names the stream's journal file)");
    }
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
      if (port != 0 && c.sip && port >= c.sip->port_min && port <= c.sip->port_max) {
        r.fail(prefix + "*_port", std::to_string(port),
               "a port outside sip.port_min-sip.port_max (the calls' media ports)");
      }
    }
    c.streams.push_back(std::move(s));
  }
  return c;
}

GatewayConfig load_config(const std::filesystem::path& path) {
  return parse_config(config::read_config_file(path), path.string());
}

config::OfflineChecks check_offline(const GatewayConfig& c) {
  config::OfflineChecks checks;
  checks.site(c);
  if (c.transport == "ice") {
    checks.resolves("ice.peer_signalling", c.ice_peer_signalling.host);
    if (c.ice_stun) checks.resolves("ice.stun", c.ice_stun->host);
    checks.tcp_port_free("ice.signalling_listen", c.ice_signalling_listen.host,
                         c.ice_signalling_listen.port);
  } else {
    checks.resolves("peer.address", c.peer_address);
  }
  checks.tcp_port_free("status.listen", c.status_listen.host, c.status_listen.port);
  for (std::size_t i = 0; i < c.streams.size(); ++i) {
    const StreamConfig& s = c.streams[i];
    const std::string prefix = "stream[" + std::to_string(i) + "] (" + s.name + ").";
    // udpsrc listens on every address, as the pipelines bind.
    if (s.sends()) {
      checks.udp_port_free(prefix + "local_rtp_port", "0.0.0.0", s.local_rtp_port);
      checks.udp_port_free(prefix + "local_rtcp_port", "0.0.0.0", s.local_rtcp_port);
    }
    if (s.receives() && c.transport != "ice")
      checks.udp_port_free(prefix + "listen_port", "0.0.0.0", s.listen_port);
  }
  if (c.sip) checks.udp_port_free("sip.ng_listen", c.sip->ng_listen.host, c.sip->ng_listen.port);
  return checks;
}

}  // namespace otpgate::gateway

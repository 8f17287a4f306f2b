// SPDX-License-Identifier: LGPL-2.1-or-later
// libFuzzer target for the one config loader: both daemons' parse-from-text functions
// (otp-gateway's and otp-transfer's, over siteconfig's shared part) read every input as
// TOML text. A ConfigError is the expected answer to a bad config; any other exception
// escaping, a crash, a hang or undefined behaviour is a finding, and so is a config that
// loads although it breaks a rule the loader promises (checked below).
//
// The first byte says how the rest is used, so that short inputs reach each key's checks
// behind an otherwise valid file (FUZZ_CONFIG_BASES holds gateway.toml and transfer.toml:
// the examples, with paths that exist here; bit 5 picks which):
// - below 0x40: the rest is the whole file;
// - 0x40-0x7f: the rest steers changes to a valid config: each key kept, dropped, or given
//   a value of any TOML type (strings of every shape, edge integers, arrays, tables, ...);
// - from 0x80: the rest is added to one section (the low 5 bits), whose own lines for the
//   keys it sets are dropped: `completion_markers = [1]` behind a valid file.
// FUZZ_SEED_DIR, when set, receives one seed per section and a few steered ones.
#include <fuzzer/FuzzedDataProvider.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "otpgate/gateway.hpp"
#include "otpgate/site_config.hpp"
#include "otpgate/transfer.hpp"

using namespace otpgate;

namespace {

[[noreturn]] void broken(const char* rule, const std::string& value) {
  std::fprintf(stderr, "config loaded although it breaks a rule: %s (%s)\n", rule, value.c_str());
  std::abort();
}

void check(bool ok, const char* rule, const std::string& value = "") {
  if (!ok) broken(rule, value);
}

void check_endpoint(const config::Endpoint& e, bool any_port, const char* rule) {
  check(config::Reader::is_host(e.host), rule, e.host);
  check(any_port || e.port != 0, rule, e.host + ":0");
}

void check_site(const config::SiteConfig& c) {
  check(!c.site_name.empty() && !c.sae_id.empty() && !c.peer_sae_id.empty(), "site names set");
  check(c.peer_sae_id != c.sae_id, "peer.sae_id differs from site.sae_id", c.sae_id);
  check(c.kme_url.rfind("https://", 0) == 0, "kme.url is https", c.kme_url);
  check(c.key_ring_bytes >= 65536 && c.key_ring_bytes <= (std::uint64_t(1) << 32),
        "keys.ring_bytes in range");
  check(c.key_ring_ms <= 600000 && c.announce_lead_ms <= 600000 && c.resync_ms <= 600000,
        "keys.*_ms in range");
}

bool stream_name_ok(const std::string& name) {
  return !name.empty() && name.size() <= 64 && name != "." && name != ".." &&
         name.find_first_not_of(
             "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") ==
             std::string::npos;
}

void check_gateway(const gateway::GatewayConfig& c) {
  check_site(c);
  check(c.transport == "udp" || c.transport == "ice", "peer.transport udp|ice", c.transport);
  check(c.cipher == "otp" || c.cipher == "aes-256-gcm", "policy.cipher", c.cipher);
  check(c.on_key_exhausted == "drop" || c.on_key_exhausted == "block" ||
            c.on_key_exhausted == "fallback-aes",
        "policy.on_key_exhausted", c.on_key_exhausted);
  check(c.rekey_interval >= 1, "policy.rekey_interval >= 1");
  check(config::Reader::is_host(c.peer_address), "peer.address is a host", c.peer_address);
  check_endpoint(c.status_listen, true, "status.listen");
  check(!c.streams.empty(), "at least one stream");
  for (const auto& s : c.streams) {
    check(stream_name_ok(s.name), "stream names [A-Za-z0-9._-]{1,64}", s.name);
    check(s.direction == "both" || s.direction == "send" || s.direction == "receive",
          "stream direction", s.direction);
    if (s.sends()) check(s.local_rtp_port != 0, "a sending stream has local_rtp_port", s.name);
    if (s.sends() && c.transport == "udp") check(s.peer_port != 0, "udp: peer_port", s.name);
    if (s.receives()) check_endpoint(s.deliver_rtp, false, "stream deliver_rtp");
    if (s.receives() && c.transport == "udp") check(s.listen_port != 0, "udp: listen_port", s.name);
  }
}

void check_transfer(const transfer::TransferConfig& c) {
  check_site(c);
  check(!c.incoming_dir.empty(), "transfer.incoming_dir set");
  check(c.method == transfer::Method::otp || c.method == transfer::Method::aes, "method");
  check(c.record_size >= 4096 && c.record_size <= 65536, "transfer.record_size in range");
  check(c.aes_rekey_records >= 1, "transfer.aes_rekey_records >= 1");
  check(c.max_attempts >= 1 && c.max_attempts <= 1000, "transfer.max_attempts in range");
  check(!c.completion_markers.empty(), "completion markers");
  for (const auto& m : c.completion_markers)
    check(!m.empty() && m.find('/') == std::string::npos, "markers are plain names", m);
  check_endpoint(c.listen, true, "transfer.listen");
  check_endpoint(c.api_listen, true, "api.listen");
  if (c.peer_transfer) check_endpoint(*c.peer_transfer, false, "peer.transfer");
  for (const auto& n : c.api_server_names)
    check(config::Reader::is_host(n), "api.server_names are hosts", n);
  const std::string& host = c.api_listen.host;
  if (host != "127.0.0.1" && host != "localhost" && host != "::1")
    check(!c.api_tls_cert.empty() && !c.api_user.empty(), "an exposed API has TLS and a login",
          host);
  if (!c.api_user.empty())
    check(c.api_password_sha256.size() == 64 &&
              c.api_password_sha256.find_first_not_of("0123456789abcdef") == std::string::npos,
          "api.password_sha256 is 64 lower-case hex digits");
}

// The key a line sets ("name" of `  name = ...`), or "" for other lines.
std::string_view key_of(std::string_view line) {
  const auto start = line.find_first_not_of(" \t");
  if (start == std::string_view::npos || line[start] == '#' || line[start] == '[') return "";
  const auto end = line.find_first_of(" \t=", start);
  return line.substr(start, end == std::string_view::npos ? end : end - start);
}

std::vector<std::string_view> lines_of(std::string_view text) {
  std::vector<std::string_view> lines;
  for (std::size_t at = 0; at < text.size();) {
    const auto end = std::min(text.find('\n', at), text.size());
    lines.push_back(text.substr(at, end - at));
    at = end + 1;
  }
  return lines;
}

// A valid config cut into its sections: "[name]" or "[[name]]" lines and what follows.
struct Base {
  std::string preamble;
  std::vector<std::pair<std::string, std::string>> sections;  // header line, body
  // The config with `added` at the end of one section, which drops its own lines for the
  // keys `added` sets.
  std::string with(std::size_t section, std::string_view added) const {
    std::vector<std::string_view> overridden;
    for (const auto line : lines_of(added))
      if (!key_of(line).empty()) overridden.push_back(key_of(line));
    std::string text = preamble;
    for (std::size_t i = 0; i < sections.size(); ++i) {
      text += sections[i].first;
      for (const auto line : lines_of(sections[i].second)) {
        if (i == section &&
            std::find(overridden.begin(), overridden.end(), key_of(line)) != overridden.end())
          continue;
        text.append(line).append("\n");
      }
      if (i == section) text.append(added).append("\n");
    }
    return text;
  }
};

Base load_base(const std::string& file) {
  std::ifstream in(file);
  if (!in) {
    std::fprintf(stderr, "fuzz_config: cannot read %s (set FUZZ_CONFIG_BASES)\n", file.c_str());
    std::abort();
  }
  Base base;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] == '[')
      base.sections.emplace_back(line + "\n", "");
    else
      (base.sections.empty() ? base.preamble : base.sections.back().second) += line + "\n";
  }
  return base;
}

const std::vector<Base>& bases() {
  static const std::vector<Base> loaded = [] {
    const char* dir = std::getenv("FUZZ_CONFIG_BASES");
    const std::string where = dir ? dir : "config-bases";
    std::vector<Base> b{load_base(where + "/gateway.toml"), load_base(where + "/transfer.toml")};
    if (const char* seeds = std::getenv("FUZZ_SEED_DIR")) {
      for (std::size_t which = 0; which < b.size(); ++which) {
        for (std::size_t i = 0; i < b[which].sections.size() && i < 32; ++i) {
          std::ofstream(std::string(seeds) + "/section-" + std::to_string(which) + "-" +
                        std::to_string(i))
              << static_cast<char>(0x80 | (which << 5) | i);
        }
        for (const char* steer : {"", "\x01\x02\x03\x04\x05\x06\x07", "\xff\xfe\xfd\xfc"})
          std::ofstream(std::string(seeds) + "/steered-" + std::to_string(which) + "-" +
                        std::to_string(std::string_view(steer).size()))
              << static_cast<char>(0x40 | (which << 5)) << steer;
      }
    }
    return b;
  }();
  return loaded;
}

// A TOML value of any type, steered by the input; strings of the shapes the loader must
// judge (empty, paths, "host:port", URLs, names, words of every enum).
std::string any_value(FuzzedDataProvider& in, int depth = 0) {
  static const char* const kWords[] = {"",
                                       "/",
                                       "..",
                                       "a/b",
                                       "otp",
                                       "aes",
                                       "OTP",
                                       "udp",
                                       "ice",
                                       "send",
                                       "receive",
                                       "both",
                                       "drop",
                                       "block",
                                       "fallback-aes",
                                       "aes-256-gcm",
                                       "x:1",
                                       "127.0.0.1:0",
                                       "[::1]:7",
                                       "host:+80",
                                       "host: 80",
                                       "host:65536",
                                       ":80",
                                       "https://",
                                       "https://kme:443",
                                       "http://kme",
                                       "sae-a",
                                       "sae-b",
                                       "v",
                                       "0.0.0.0:7400",
                                       "localhost:7480"};
  switch (in.ConsumeIntegralInRange(0, depth < 2 ? 9 : 5)) {
    case 0:
      return std::to_string(
          in.PickValueInArray<std::int64_t>({0, 1, -1, 255, 4096, 65535, 65536, INT32_MAX,
                                             std::int64_t(1) << 34, INT64_MAX, INT64_MIN}));
    case 1:
      return std::to_string(in.ConsumeIntegral<std::int64_t>());
    case 2:
      return '"' + std::string(in.PickValueInArray(kWords)) + '"';
    case 3: {
      std::string text;
      for (std::size_t n = in.ConsumeIntegralInRange(0, 80); n > 0; --n) {
        const char c = in.ConsumeIntegralInRange<char>(0x20, 0x7e);
        if (c == '"' || c == '\\') text += '\\';
        text += c;
      }
      return '"' + text + '"';
    }
    case 4:
      return in.ConsumeBool() ? "true" : "false";
    case 5:
      return in.PickValueInArray(
          {"inf", "nan", "-0.0", "1.5", "1979-05-27T07:32:00Z", "07:32:00", "'/literal'"});
    case 6:
    case 7: {
      std::string array = "[";
      for (std::size_t n = in.ConsumeIntegralInRange(0, 3); n > 0; --n)
        array += any_value(in, depth + 1) + (n > 1 ? ", " : "");
      return array + "]";
    }
    default:
      return "{ a = " + any_value(in, depth + 1) + " }";
  }
}

// The valid config with each key kept (mostly), dropped, or given another value.
std::string steered(const Base& base, FuzzedDataProvider& in) {
  std::string text = base.preamble;
  for (const auto& [header, body] : base.sections) {
    text += header;
    for (const auto line : lines_of(body)) {
      const auto key = key_of(line);
      const int action = key.empty() ? 0 : in.ConsumeIntegralInRange(0, 7);
      if (action <= 4)
        text.append(line).append("\n");
      else if (action == 6 || action == 7)
        text.append(key).append(" = ").append(any_value(in)).append("\n");
    }
  }
  return text;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  bases();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  const Base& base = bases()[(data[0] >> 5) & 1];
  std::string composed;
  if (data[0] & 0x80) {
    composed = base.with((data[0] & 0x1f) % base.sections.size(), rest);
  } else if (data[0] & 0x40) {
    FuzzedDataProvider in(data + 1, size - 1);
    composed = steered(base, in);
  }
  const std::string_view text = data[0] >= 0x40 ? std::string_view(composed) : rest;
  try {
    check_gateway(gateway::parse_config(text, "fuzz.toml"));
  } catch (const config::ConfigError&) {
    // the expected answer to a bad config
  }
  try {
    check_transfer(transfer::parse_config(text, "fuzz.toml"));
  } catch (const config::ConfigError&) {
  }
  return 0;
}

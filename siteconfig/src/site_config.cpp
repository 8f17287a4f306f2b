// SPDX-License-Identifier: LGPL-2.1-or-later
// The shared part of the one config loader: see otpgate/site_config.hpp.
#include "otpgate/site_config.hpp"

#include <cctype>
#include <cmath>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <vector>

namespace otpgate::config {

const std::initializer_list<std::string_view> kSiteKeys = {"name", "sae_id", "state_dir"};
const std::initializer_list<std::string_view> kKmeKeys = {"url", "tls_cert", "tls_key", "tls_ca"};
const std::initializer_list<std::string_view> kKeysKeys = {"ring_bytes", "ring_ms",
                                                           "announce_lead_ms", "resync_ms"};

namespace {

// Levenshtein distance, for "did you mean".
std::size_t distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

template <typename Names>
std::string suggestion(std::string_view unknown, const Names& known) {
  std::string_view best;
  std::size_t best_distance = SIZE_MAX;
  for (std::string_view k : known) {
    const std::size_t d = distance(unknown, k);
    if (d < best_distance) {
      best_distance = d;
      best = k;
    }
  }
  // Near enough to be a typo: a couple of letters, or a third of the word.
  if (best.empty() || best_distance > std::max<std::size_t>(2, unknown.size() / 3)) return "";
  return "; did you mean \"" + std::string(best) + "\"?";
}

}  // namespace

void reject_unknown(const toml::table& root, std::initializer_list<SectionKeys> sections,
                    const std::string& source) {
  std::vector<std::string_view> section_names;
  for (const auto& s : sections) section_names.push_back(s.name);
  for (const auto& [name, node] : root) {
    const SectionKeys* section = nullptr;
    for (const auto& s : sections)
      if (s.name == name.str()) section = &s;
    if (!section) {
      throw ConfigError(source + ": unknown section [" + std::string(name.str()) + "]" +
                        suggestion(name.str(), section_names) + " (remove it, or fix its name)");
    }
    if (section->foreign) continue;
    auto check = [&](const toml::table& table, const std::string& where) {
      for (const auto& [key, value] : table) {
        bool known = false;
        for (std::string_view k : section->keys) known = known || k == key.str();
        if (!known) {
          throw ConfigError(source + ": unknown key " + where + "." + std::string(key.str()) +
                            suggestion(key.str(), section->keys) + " (remove it, or fix its name)");
        }
      }
    };
    if (section->array) {
      if (const toml::array* list = node.as_array()) {
        for (std::size_t i = 0; i < list->size(); ++i)
          if (const toml::table* t = (*list)[i].as_table())
            check(*t, std::string(name.str()) + "[" + std::to_string(i) + "]");
      }
    } else if (const toml::table* t = node.as_table()) {
      check(*t, std::string(name.str()));
    }
  }
}

void Reader::fail(const std::string& key, const std::string& value,
                  const std::string& expected) const {
  throw ConfigError(source_ + ": " + key + (value.empty() ? " is missing" : " = " + value) +
                    ": expected " + expected);
}

std::string Reader::shown(const toml::node* node) {
  if (!node) return "";
  // Numbers, arrays and tables are written here: toml++ 3.3.0's formatter overflows on
  // -2^63, nan, inf and tiny floats inside arrays (found by fuzzing the loader).
  if (const auto* i = node->as_integer()) return std::to_string(i->get());
  if (const auto* f = node->as_floating_point()) {
    const double d = f->get();
    if (std::isnan(d)) return "nan";
    if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
    std::ostringstream out;
    out << d;
    return out.str();
  }
  if (const auto* a = node->as_array()) {
    std::string out = "[";
    std::size_t n = 0;
    for (const auto& element : *a) {
      if (n > 0) out += ", ";
      if (n++ == 8) {
        out += "...";
        break;
      }
      out += shown(&element);
    }
    return out + "]";
  }
  if (node->is_table()) return "{...}";  // its keys are named by their own errors
  std::ostringstream out;
  node->visit([&out](auto&& value) { out << value; });
  return out.str();
}

std::string Reader::string(const toml::table& table, const std::string& prefix, const char* key,
                           const char* expected, std::optional<std::string> fallback) const {
  const toml::node* node = table.get(key);
  if (!node) {
    if (fallback) return *fallback;
    fail(prefix + key, "", expected);
  }
  const auto* value = node->as_string();
  if (!value || value->get().empty()) fail(prefix + key, shown(node), expected);
  return value->get();
}

std::int64_t Reader::integer(const toml::table& table, const std::string& prefix, const char* key,
                             std::int64_t min, std::int64_t max, const char* expected,
                             std::optional<std::int64_t> fallback) const {
  const toml::node* node = table.get(key);
  if (!node) {
    if (fallback) return *fallback;
    fail(prefix + key, "", expected);
  }
  const auto* value = node->as_integer();
  if (!value || value->get() < min || value->get() > max) fail(prefix + key, shown(node), expected);
  return value->get();
}

bool Reader::boolean(const toml::table& table, const std::string& prefix, const char* key,
                     bool fallback) const {
  const toml::node* node = table.get(key);
  if (!node) return fallback;
  const auto* value = node->as_boolean();
  if (!value) fail(prefix + key, shown(node), "true or false");
  return value->get();
}

std::uint16_t Reader::port(const toml::table& table, const std::string& prefix, const char* key,
                           bool required) const {
  if (!required && !table.get(key)) return 0;
  return static_cast<std::uint16_t>(
      integer(table, prefix, key, 1, 65535, "a UDP port number from 1 to 65535"));
}

Endpoint Reader::endpoint(const toml::table& table, const std::string& prefix, const char* key,
                          bool any_port_allowed) const {
  const std::string text = string(table, prefix, key, "\"host:port\"");
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0)
    fail(prefix + key, '"' + text + '"', "\"host:port\"");
  // Digits only: std::stoi would also take "+80" and " 80".
  const std::string digits = text.substr(colon + 1);
  int port = -1;
  if (!digits.empty() && digits.size() <= 5 &&
      digits.find_first_not_of("0123456789") == std::string::npos)
    port = std::stoi(digits);
  if (port < (any_port_allowed ? 0 : 1) || port > 65535 || (port == 0 && digits != "0")) {
    fail(prefix + key, '"' + text + '"', "\"host:port\" with a port from 1 to 65535");
  }
  if (!is_host(text.substr(0, colon)))
    fail(prefix + key, '"' + text + '"', "\"host:port\" with an IP address or host name");
  return Endpoint{text.substr(0, colon), static_cast<std::uint16_t>(port)};
}

bool Reader::is_host(const std::string& text) {
  return !text.empty() && text.size() <= 253 &&
         text.find_first_not_of(
             "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
             ".-:[]") == std::string::npos;
}

std::vector<std::string> Reader::hosts(const toml::table& table, const std::string& prefix,
                                       const char* key) const {
  std::vector<std::string> out;
  const toml::node* node = table.get(key);
  if (!node) return out;
  const toml::array* list = node->as_array();
  if (!list) fail(prefix + key, shown(node), "a list of host names such as [\"gw.example\"]");
  for (const auto& n : *list) {
    const auto* name = n.as_string();
    if (!name || !is_host(name->get()))
      fail(prefix + key, shown(&n), "host names such as \"gw.example\"");
    out.push_back(name->get());
  }
  return out;
}

std::string Reader::host(const toml::table& table, const std::string& prefix, const char* key,
                         const char* expected) const {
  const std::string text = string(table, prefix, key, expected);
  if (!is_host(text)) fail(prefix + key, '"' + text + '"', expected);
  return text;
}

const toml::table& Reader::table(const char* key) const {
  const toml::node* node = root_.get(key);
  if (!node || !node->is_table()) fail(std::string("[") + key + "]", shown(node), "a table");
  return *node->as_table();
}

const toml::table* Reader::optional_table(const char* key) const {
  const toml::node* node = root_.get(key);
  if (!node) return nullptr;
  if (!node->is_table()) fail(std::string("[") + key + "]", shown(node), "a table");
  return node->as_table();
}

std::filesystem::path Reader::file(const toml::table& table, const std::string& prefix,
                                   const char* key) const {
  const std::string path = string(table, prefix, key, "the path of a readable PEM file");
  if (!std::filesystem::is_regular_file(path)) {
    fail(prefix + key, '"' + path + '"', "the path of a readable PEM file (no such file)");
  }
  return path;
}

toml::table parse_toml(std::string_view text, const std::string& source) {
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    throw ConfigError(source + ":" + std::to_string(where.line) + ":" +
                      std::to_string(where.column) +
                      ": not valid TOML: " + std::string(e.description()));
  }
}

std::filesystem::path file_in(const std::filesystem::path& dir, std::string_view name) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string safe;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    const bool plain = std::isalnum(c) || c == '-' || c == '_' || (c == '.' && i > 0);
    if (plain) {
      safe.push_back(static_cast<char>(c));
    } else {
      safe += {'%', kHex[c >> 4], kHex[c & 15]};
    }
  }
  if (safe.empty()) safe = "%00";
  return dir / safe;
}

std::string read_config_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path.string() + ": cannot be read (does it exist? check --config)");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

void read_site(const Reader& r, SiteConfig& c) {
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
  if (c.peer_sae_id == c.sae_id)
    r.fail("peer.sae_id", '"' + c.peer_sae_id + '"', "an SAE ID other than site.sae_id");

  if (const toml::table* keys = r.optional_table("keys")) {
    c.key_ring_bytes = static_cast<std::uint64_t>(
        r.integer(*keys, "keys.", "ring_bytes", 65536, std::int64_t(1) << 32,
                  "bytes of key held ready per key supply, 65536 to 4294967296",
                  static_cast<std::int64_t>(c.key_ring_bytes)));
    c.key_ring_ms = static_cast<std::uint32_t>(
        r.integer(*keys, "keys.", "ring_ms", 0, 600000,
                  "milliseconds of measured key consumption a sender holds ready, 0 to 600000 "
                  "(0: the whole ring_bytes)",
                  c.key_ring_ms));
    c.announce_lead_ms = static_cast<std::uint32_t>(
        r.integer(*keys, "keys.", "announce_lead_ms", 0, 600000,
                  "milliseconds of key a sender announces ahead of use, 0 to 600000 (0: as "
                  "keys arrive)",
                  c.announce_lead_ms));
    c.resync_ms = static_cast<std::uint32_t>(
        r.integer(*keys, "keys.", "resync_ms", 0, 600000,
                  "milliseconds between a sender's self-verifying announcements, 0 to 600000 "
                  "(0: never)",
                  c.resync_ms));
  }
}

}  // namespace otpgate::config

// SPDX-License-Identifier: LGPL-2.1-or-later
// The one config loader's shared part (toml++): reading values with errors that name
// the key, the value and what is expected, and the sections every otpgate daemon has
// ([site], [kme], [peer] sae_id, [keys]). otp-gateway and otp-transfer build on it.
#pragma once

#include <toml++/toml.h>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "otpgate/config_error.hpp"

namespace otpgate::config {

class Reader {
 public:
  Reader(const toml::table& root, std::string source) : root_(root), source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& value,
                         const std::string& expected) const;
  static std::string shown(const toml::node* node);

  std::string string(const toml::table& table, const std::string& prefix, const char* key,
                     const char* expected,
                     std::optional<std::string> fallback = std::nullopt) const;
  std::int64_t integer(const toml::table& table, const std::string& prefix, const char* key,
                       std::int64_t min, std::int64_t max, const char* expected,
                       std::optional<std::int64_t> fallback = std::nullopt) const;
  bool boolean(const toml::table& table, const std::string& prefix, const char* key,
               bool fallback) const;
  std::uint16_t port(const toml::table& table, const std::string& prefix, const char* key,
                     bool required) const;
  // "host:port"; port 0 only when `any_port_allowed` (listen addresses).
  Endpoint endpoint(const toml::table& table, const std::string& prefix, const char* key,
                    bool any_port_allowed = false) const;
  // A host name or IP address (letters, digits, '.', '-', ':', '[', ']' only).
  std::string host(const toml::table& table, const std::string& prefix, const char* key,
                   const char* expected) const;
  static bool is_host(const std::string& text);
  // An optional list of host names (absent: empty).
  std::vector<std::string> hosts(const toml::table& table, const std::string& prefix,
                                 const char* key) const;
  const toml::table& table(const char* key) const;           // required
  const toml::table* optional_table(const char* key) const;  // absent: nullptr
  std::filesystem::path file(const toml::table& table, const std::string& prefix,
                             const char* key) const;  // an existing PEM file
  const toml::table& root() const { return root_; }

 private:
  const toml::table& root_;
  std::string source_;
};

// `dir / name` for a file whose name comes from config or peers (SAE IDs, stream names):
// every byte outside [A-Za-z0-9._-] and a leading '.' are %XX-encoded, so the result is a
// single file name inside `dir` whatever the text ("../x" becomes "%2E.%2Fx").
std::filesystem::path file_in(const std::filesystem::path& dir, std::string_view name);

// Parses TOML text; a syntax error becomes "source:line:column: not valid TOML: ...".
toml::table parse_toml(std::string_view text, const std::string& source);
// Reads a config file's text; a missing file is a ConfigError naming it.
std::string read_config_file(const std::filesystem::path& path);
// Reads [site], [kme], [peer].sae_id and [keys] into `c` (defaults kept when absent).
void read_site(const Reader& r, SiteConfig& c);

// The keys a daemon knows, per section. `foreign` sections belong to the other daemon
// (one file may serve both): allowed, not read. `array`: [[section]] tables.
struct SectionKeys {
  std::string_view name;
  std::initializer_list<std::string_view> keys;
  bool array = false;
  bool foreign = false;
};
// The sections every daemon reads (read_site): [site], [kme], [peer] sae_id, [keys].
extern const std::initializer_list<std::string_view> kSiteKeys, kKmeKeys, kKeysKeys;
// Throws a ConfigError naming the first unknown section or key, with the closest known
// name when one is near ("did you mean ..."): a typo must not silently leave a default.
void reject_unknown(const toml::table& root, std::initializer_list<SectionKeys> sections,
                    const std::string& source);

}  // namespace otpgate::config

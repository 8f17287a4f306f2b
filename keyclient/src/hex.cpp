// SPDX-License-Identifier: LGPL-2.1-or-later
// See otpgate/hex.hpp.
#include "otpgate/hex.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>

#include <algorithm>
#include <stdexcept>

namespace otpgate {

std::string to_hex(std::span<const std::uint8_t> bytes) {
  if (bytes.empty()) return {};
  std::string text(2 * bytes.size() + 1, '\0');  // OpenSSL writes a terminating NUL
  std::size_t length = 0;
  ERR_set_mark();
  const int ok =
      OPENSSL_buf2hexstr_ex(text.data(), text.size(), &length, bytes.data(), bytes.size(), '\0');
  ERR_pop_to_mark();
  if (ok != 1) throw std::runtime_error("hex encoding failed");  // buffer too small: never
  text.resize(2 * bytes.size());
  // OpenSSL writes upper case; peers compare these strings, which are lower-case.
  std::transform(text.begin(), text.end(), text.begin(), [](char c) {
    return c >= 'A' && c <= 'F' ? static_cast<char>(c - 'A' + 'a') : c;
  });
  return text;
}

std::optional<std::vector<std::uint8_t>> from_hex(std::string_view text) {
  if (text.size() % 2 != 0 || text.find('\0') != std::string_view::npos) return std::nullopt;
  std::vector<std::uint8_t> bytes(text.size() / 2);
  if (text.empty()) return bytes;
  std::string terminated(text);  // OpenSSL reads a NUL-terminated string
  std::size_t length = 0;
  ERR_set_mark();
  const int ok =
      OPENSSL_hexstr2buf_ex(bytes.data(), bytes.size(), &length, terminated.c_str(), '\0');
  ERR_pop_to_mark();  // a bad digit is our answer, not an error for the next TLS call
  OPENSSL_cleanse(terminated.data(), terminated.size());
  if (ok != 1 || length != bytes.size()) {
    OPENSSL_cleanse(bytes.data(), bytes.size());
    return std::nullopt;
  }
  return bytes;
}

}  // namespace otpgate

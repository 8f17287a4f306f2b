// SPDX-License-Identifier: LGPL-2.1-or-later
// Small text helpers the SDP code shares (ASCII only: SDP and codec names are ASCII).
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace otpgate::sdp::detail {

inline std::string lower(std::string_view text) {
  std::string out(text);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) {
    return static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
  });
  return out;
}

// A decimal number of digits only (no sign, no spaces), in range.
inline std::optional<std::uint64_t> number(std::string_view text) {
  std::uint64_t n = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (text.empty() || ec != std::errc() || ptr != text.data() + text.size()) return std::nullopt;
  return n;
}

}  // namespace otpgate::sdp::detail

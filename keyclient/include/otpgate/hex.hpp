// SPDX-License-Identifier: LGPL-2.1-or-later
// The project's one hex helper (OpenSSL's OPENSSL_buf2hexstr_ex / OPENSSL_hexstr2buf_ex):
// digests, acknowledgement keys, sealed signalling messages. Output is lower-case, as
// peers compare these strings (SHA-256 of files, api.password_sha256); input may be
// either case.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace otpgate {

// Two lower-case hex digits per byte, no separators ("" for no bytes).
std::string to_hex(std::span<const std::uint8_t> bytes);

// The bytes of an even number of hex digits (either case, no separators); nullopt for
// anything else (odd length, another character, an embedded NUL). Leaves nothing on
// OpenSSL's error queue, and wipes its working copy of the text (it may be a key).
std::optional<std::vector<std::uint8_t>> from_hex(std::string_view text);

}  // namespace otpgate

// SPDX-License-Identifier: LGPL-2.1-or-later
// The project's one hex helper (otpgate/hex.hpp): lower-case out, either case in, and
// nothing but an even number of hex digits accepted.
#include <gtest/gtest.h>
#include <openssl/err.h>

#include <cstdint>
#include <string>
#include <vector>

#include "otpgate/hex.hpp"

using otpgate::from_hex;
using otpgate::to_hex;

TEST(Hex, EncodesLowerCaseAndRoundTripsEveryByte) {
  std::vector<std::uint8_t> all(256);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint8_t>(i);
  const std::string text = to_hex(all);
  ASSERT_EQ(text.size(), 512u);
  EXPECT_EQ(text.substr(0, 8), "00010203");
  EXPECT_EQ(text.substr(text.size() - 8), "fcfdfeff");  // peers compare digests as text
  EXPECT_EQ(text.find_first_not_of("0123456789abcdef"), std::string::npos) << text;
  EXPECT_EQ(from_hex(text), all);
  EXPECT_EQ(to_hex(std::vector<std::uint8_t>{0xab, 0x01}), "ab01");
  EXPECT_EQ(to_hex({}), "");
  EXPECT_EQ(from_hex(""), std::vector<std::uint8_t>{});
}

TEST(Hex, DecodesEitherCase) {
  EXPECT_EQ(from_hex("ABcd0F"), (std::vector<std::uint8_t>{0xab, 0xcd, 0x0f}));
}

TEST(Hex, RefusesOddLengthsAndAnythingButHexDigits) {
  EXPECT_FALSE(from_hex("abc"));
  EXPECT_FALSE(from_hex("0"));
  EXPECT_FALSE(from_hex("zz"));
  EXPECT_FALSE(from_hex("ab:cd"));
  EXPECT_FALSE(from_hex(" abc"));
  EXPECT_FALSE(from_hex("0x12"));
  EXPECT_FALSE(from_hex(std::string("ab\0\0", 4)));    // not "ab" read up to the NUL
  EXPECT_FALSE(from_hex(std::string("abcd\0\0", 6)));  // nor "abcd"
  // A refusal leaves nothing on OpenSSL's error queue for the next TLS call to trip on.
  EXPECT_EQ(ERR_peek_error(), 0u);
}

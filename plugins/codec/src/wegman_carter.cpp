// SPDX-License-Identifier: LGPL-2.1-or-later
// The Wegman-Carter MAC (Poly1305 with a one-time mask), and the one-time sealed messages
// of otp_codec.hpp built from it.
#include "wegman_carter.hpp"

#include <openssl/crypto.h>

#include <cstring>
#include <stdexcept>

#include "otpgate/otp_codec.hpp"

namespace otpgate::otp {

WegmanCarter::WegmanCarter() {
  mac_.reset(EVP_MAC_fetch(nullptr, "POLY1305", nullptr));
  if (mac_) ctx_.reset(EVP_MAC_CTX_new(mac_.get()));
  if (!ctx_) throw std::runtime_error("OpenSSL has no Poly1305 MAC");
}

void WegmanCarter::tag(const std::uint8_t* r, const std::uint8_t* s,
                       std::initializer_list<std::span<const std::uint8_t>> parts,
                       std::uint8_t* out) {
  std::uint8_t key[kAuthKeyBytes + kMaskBytes];
  std::memcpy(key, r, kAuthKeyBytes);
  std::memcpy(key + kAuthKeyBytes, s, kMaskBytes);
  const int ok = EVP_MAC_init(ctx_.get(), key, sizeof key, nullptr);
  OPENSSL_cleanse(key, sizeof key);
  if (ok != 1) throw std::runtime_error("Poly1305 initialisation failed");
  for (auto part : parts) EVP_MAC_update(ctx_.get(), part.data(), part.size());
  std::size_t length = 0;
  EVP_MAC_final(ctx_.get(), out, &length, kTagBytes);
}

std::vector<std::uint8_t> seal_message(std::span<const std::uint8_t> key,
                                       std::span<const std::uint8_t> plaintext) {
  constexpr std::size_t kMacKey = kAuthKeyBytes + kMaskBytes;
  if (key.size() < kMacKey + plaintext.size())
    throw std::invalid_argument("seal_message: key too short");
  std::vector<std::uint8_t> sealed(plaintext.size() + kTagBytes);
  xor_into(sealed.data(), plaintext.data(), key.data() + kMacKey, plaintext.size());
  WegmanCarter().tag(key.data(), key.data() + kAuthKeyBytes,
                     {std::span(sealed).first(plaintext.size())}, sealed.data() + plaintext.size());
  return sealed;
}

std::optional<std::vector<std::uint8_t>> open_message(std::span<const std::uint8_t> key,
                                                      std::span<const std::uint8_t> sealed) {
  constexpr std::size_t kMacKey = kAuthKeyBytes + kMaskBytes;
  if (sealed.size() < kTagBytes || key.size() < kMacKey + sealed.size() - kTagBytes)
    return std::nullopt;
  const std::size_t n = sealed.size() - kTagBytes;
  std::uint8_t tag[kTagBytes];
  WegmanCarter().tag(key.data(), key.data() + kAuthKeyBytes, {sealed.first(n)}, tag);
  if (CRYPTO_memcmp(tag, sealed.data() + n, kTagBytes) != 0) return std::nullopt;
  std::vector<std::uint8_t> plain(n);
  xor_into(plain.data(), sealed.data(), key.data() + kMacKey, n);
  return plain;
}

}  // namespace otpgate::otp

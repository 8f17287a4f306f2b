// SPDX-License-Identifier: LGPL-2.1-or-later
// The Wegman-Carter MAC of every unit: Poly1305 (OpenSSL EVP_MAC) keyed with r || s,
// where r is the epoch's hash key and s a fresh one-time mask, so that
// tag = (h_r(m) + s) mod 2^128. And the XOR that applies the pad.
#pragma once

#include <openssl/evp.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>

namespace otpgate::otp {

class WegmanCarter {
 public:
  WegmanCarter();
  // Writes the kTagBytes tag of the concatenated `parts` under r (kAuthKeyBytes) and
  // s (kMaskBytes) to `out`.
  void tag(const std::uint8_t* r, const std::uint8_t* s,
           std::initializer_list<std::span<const std::uint8_t>> parts, std::uint8_t* out);

 private:
  struct Free {
    void operator()(EVP_MAC* m) const { EVP_MAC_free(m); }
    void operator()(EVP_MAC_CTX* c) const { EVP_MAC_CTX_free(c); }
  };
  std::unique_ptr<EVP_MAC, Free> mac_;
  std::unique_ptr<EVP_MAC_CTX, Free> ctx_;
};

// out[i] = in[i] ^ pad[i] for n bytes (the one-time pad itself).
inline void xor_into(std::uint8_t* out, const std::uint8_t* in, const std::uint8_t* pad,
                     std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = in[i] ^ pad[i];
}

}  // namespace otpgate::otp

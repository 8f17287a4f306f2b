// SPDX-License-Identifier: LGPL-2.1-or-later
// SHA-256 of the files a job carries (OpenSSL EVP), as lower-case hex: both sites hash
// every file and compare the digests.
#pragma once

#include <openssl/evp.h>

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

namespace otpgate::transfer::detail {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(std::span<const std::uint8_t> bytes);
  std::string hex_digest();  // finalises; reset() to reuse
  void reset();

 private:
  EVP_MD_CTX* ctx_;
};

// Hashes the first `bytes` of a file into `hash`; throws naming the file on a short read.
void hash_prefix(const std::filesystem::path& file, std::uint64_t bytes, Sha256& hash);

}  // namespace otpgate::transfer::detail

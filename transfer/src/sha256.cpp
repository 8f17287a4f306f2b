// SPDX-License-Identifier: LGPL-2.1-or-later
// See sha256.hpp.
#include "sha256.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

#include "otpgate/hex.hpp"
#include "tcp_socket.hpp"

namespace otpgate::transfer::detail {

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (!ctx_) throw std::bad_alloc();
  reset();
}
Sha256::~Sha256() {
  EVP_MD_CTX_free(ctx_);
}
void Sha256::reset() {
  EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr);
}
void Sha256::update(std::span<const std::uint8_t> bytes) {
  EVP_DigestUpdate(ctx_, bytes.data(), bytes.size());
}
std::string Sha256::hex_digest() {
  unsigned char digest[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx_, digest, &n);
  return to_hex({digest, n});
}

void hash_prefix(const std::filesystem::path& file, std::uint64_t bytes, Sha256& hash) {
  Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw std::runtime_error(file.string() + ": cannot be read: " + std::strerror(errno));
  std::vector<std::uint8_t> buffer(1u << 20);
  while (bytes > 0) {
    const ssize_t n = ::read(fd.fd, buffer.data(), std::min<std::uint64_t>(bytes, buffer.size()));
    if (n <= 0) throw std::runtime_error(file.string() + ": shorter than the part already sent");
    hash.update({buffer.data(), static_cast<std::size_t>(n)});
    bytes -= static_cast<std::uint64_t>(n);
  }
}

}  // namespace otpgate::transfer::detail

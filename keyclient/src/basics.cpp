// SPDX-License-Identifier: LGPL-2.1-or-later
// KeyId, SecretBytes and the default log sink.
#include <sys/mman.h>

#include <openssl/crypto.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <utility>

#include "otpgate/hex.hpp"
#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

// 8-4-4-4-12: the dashes stand at these places, hex digits everywhere else.
std::optional<KeyId> KeyId::parse(std::string_view text) {
  if (text.size() != 36) return std::nullopt;
  std::string digits;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash != (text[i] == '-')) return std::nullopt;
    if (!dash) digits.push_back(text[i]);
  }
  const auto bytes = from_hex(digits);
  if (!bytes) return std::nullopt;
  std::array<std::uint8_t, 16> id{};
  std::copy(bytes->begin(), bytes->end(), id.begin());
  return KeyId(id);
}

std::string KeyId::to_string() const {
  std::string s = to_hex(bytes_);
  for (const std::size_t at : {20u, 16u, 12u, 8u}) s.insert(at, 1, '-');
  return s;
}

SecretBytes::SecretBytes(std::size_t size)
    : data_(std::make_unique_for_overwrite<std::uint8_t[]>(size)), size_(size), capacity_(size) {
  // Keep key material out of swap where the OS lets us; failing is not fatal.
  locked_ = size > 0 && ::mlock(data_.get(), size) == 0;
}

SecretBytes::~SecretBytes() {
  release();
}

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::move(other.data_)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)),
      locked_(std::exchange(other.locked_, false)) {}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    locked_ = std::exchange(other.locked_, false);
  }
  return *this;
}

void SecretBytes::truncate(std::size_t new_size) {
  if (new_size >= size_) return;
  OPENSSL_cleanse(data_.get() + new_size, size_ - new_size);
  size_ = new_size;
}

void SecretBytes::release() noexcept {
  if (!data_) return;
  OPENSSL_cleanse(data_.get(), capacity_);
  if (locked_) ::munlock(data_.get(), capacity_);
  data_.reset();
  size_ = capacity_ = 0;
  locked_ = false;
}

LogSink stderr_log_sink(LogLevel min_level) {
  return [min_level](LogLevel level, std::string_view message) {
    if (level < min_level) return;
    static constexpr const char* kNames[] = {"debug", "info", "warning", "error"};
    std::fprintf(stderr, "otpgate[%s]: %.*s\n", kNames[static_cast<int>(level)],
                 static_cast<int>(message.size()), message.data());
  };
}

}  // namespace otpgate::keys

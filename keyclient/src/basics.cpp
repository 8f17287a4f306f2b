// SPDX-License-Identifier: LGPL-2.1-or-later
// KeyId, SecretBytes and the default log sink.
#include <sys/mman.h>

#include <openssl/crypto.h>

#include <cstdio>
#include <cstring>
#include <utility>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

namespace {
int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace

std::optional<KeyId> KeyId::parse(std::string_view text) {
  if (text.size() != 36) return std::nullopt;
  std::array<std::uint8_t, 16> bytes{};
  std::size_t out = 0;
  for (std::size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return std::nullopt;
      ++i;
      continue;
    }
    const int hi = hex_value(text[i]);
    const int lo = hex_value(text[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    bytes[out++] = static_cast<std::uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return KeyId(bytes);
}

std::string KeyId::to_string() const {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(36);
  for (std::size_t i = 0; i < bytes_.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s.push_back('-');
    s.push_back(kHex[bytes_[i] >> 4]);
    s.push_back(kHex[bytes_[i] & 0xf]);
  }
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

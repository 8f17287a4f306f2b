// SPDX-License-Identifier: LGPL-2.1-or-later
// See ack_codec.hpp.
#include "ack_codec.hpp"

#include <openssl/crypto.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <string>

#include "tcp_socket.hpp"

namespace otpgate::transfer::detail {

AckCodec::AckCodec(std::span<const std::uint8_t> key) : key_(kAckKeyBytes) {
  if (key.size() != kAckKeyBytes) throw std::runtime_error("acknowledgement key has a bad size");
  std::copy(key.begin(), key.end(), key_.span().begin());
}
AckCodec::~AckCodec() = default;

namespace {
std::array<std::uint8_t, 32> hmac(std::span<const std::uint8_t> key,
                                  std::span<const std::uint8_t> data) {
  std::array<std::uint8_t, 32> mac{};
  unsigned int length = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data.data(), data.size(), mac.data(),
       &length);
  return mac;
}
}  // namespace

std::vector<std::uint8_t> AckCodec::seal(json message) {
  message["seq"] = next_out_++;
  const std::string text = message.dump();
  const auto n = static_cast<std::uint32_t>(text.size() + 32);
  std::vector<std::uint8_t> frame(4 + n);
  for (int i = 0; i < 4; ++i) frame[i] = static_cast<std::uint8_t>(n >> (8 * (3 - i)));
  std::memcpy(frame.data() + 4, text.data(), text.size());
  const auto mac = hmac(key_.span(), {frame.data() + 4, text.size()});
  std::memcpy(frame.data() + 4 + text.size(), mac.data(), mac.size());
  return frame;
}

std::optional<json> AckCodec::open(std::span<const std::uint8_t> frame) {
  if (frame.size() < 32) return std::nullopt;
  const auto body = frame.first(frame.size() - 32);
  const auto mac = hmac(key_.span(), body);
  if (CRYPTO_memcmp(mac.data(), frame.data() + body.size(), 32) != 0) return std::nullopt;
  try {
    json message = json::parse(body.begin(), body.end());
    if (!message.is_object() || message.value("seq", UINT64_MAX) != next_in_) return std::nullopt;
    ++next_in_;
    return message;
  } catch (const json::exception&) {
    return std::nullopt;
  }
}

std::optional<std::vector<std::uint8_t>> read_ack_frame(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::uint8_t head[4];
  if (!read_exact(fd, head, 4, deadline)) return std::nullopt;
  const std::uint32_t n = (std::uint32_t(head[0]) << 24) | (std::uint32_t(head[1]) << 16) |
                          (std::uint32_t(head[2]) << 8) | head[3];
  if (n < 32 || n > (1u << 20)) return std::nullopt;
  std::vector<std::uint8_t> frame(n);
  // Once a frame has started, its rest follows promptly.
  if (!read_exact(fd, frame.data(), n, Clock::now() + std::chrono::seconds(30)))
    return std::nullopt;
  return frame;
}

}  // namespace otpgate::transfer::detail

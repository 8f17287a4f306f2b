// SPDX-License-Identifier: LGPL-2.1-or-later
// Acknowledgements (receiver -> sender, plain TCP): length (4) | JSON | HMAC-SHA256 (32)
// under a random key the sender sent inside the protected stream, so only the receiver
// that decrypted the stream can acknowledge it. Each carries a sequence number.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::transfer::detail {

using json = nlohmann::json;

inline constexpr std::size_t kAckKeyBytes = 32;

class AckCodec {
 public:
  explicit AckCodec(std::span<const std::uint8_t> key);
  ~AckCodec();
  std::vector<std::uint8_t> seal(json message);  // adds "seq"
  // Verifies one frame body (without the length); nullopt when forged or out of order.
  std::optional<json> open(std::span<const std::uint8_t> frame);

 private:
  keys::SecretBytes key_;
  std::uint64_t next_out_ = 0;
  std::uint64_t next_in_ = 0;
};

// Reads one acknowledgement frame's body from a socket; nullopt on EOF/error/timeout or a
// length out of bounds. Blocks up to `timeout`.
std::optional<std::vector<std::uint8_t>> read_ack_frame(int fd, std::chrono::milliseconds timeout);

}  // namespace otpgate::transfer::detail

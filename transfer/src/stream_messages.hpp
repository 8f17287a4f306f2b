// SPDX-License-Identifier: LGPL-2.1-or-later
// The messages carried inside the protected stream (sender -> receiver), framed as
// type (1) | length (4, big-endian) | body, and the parser that splits the decrypted
// stream into them. See docs/transfer.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <vector>

namespace otpgate::transfer::detail {

using json = nlohmann::json;

enum class MessageType : std::uint8_t {
  hello = 'H',     // JSON: job description and the acknowledgement key
  file = 'F',      // JSON: index, path, size known so far
  data = 'D',      // index (4) | offset (8) | bytes
  end = 'E',       // JSON: index, size, sha256
  manifest = 'M',  // text: "sha256  path" lines (the seed's "hash" data type)
  status = 'S',    // JSON: analysis state/size/time while a run is sequenced
  bye = 'B',       // JSON: the job is complete on the sender's side
  abort = 'X',     // JSON: the sender aborted the job
};
inline constexpr std::size_t kMessageHeaderBytes = 5;
inline constexpr std::size_t kDataHeaderBytes = 12;
inline constexpr std::size_t kMaxMessageBytes = 16u << 20;

// A message as parsed: `body` points into the parser's buffer and stays valid until the
// next feed() (no copy of file data on the receiving path).
struct Message {
  MessageType type{};
  std::span<const std::uint8_t> body;
  json as_json() const;  // throws std::runtime_error on a malformed body
};

void append_message(std::vector<std::uint8_t>& out, MessageType type,
                    std::span<const std::uint8_t> body);
void append_json_message(std::vector<std::uint8_t>& out, MessageType type, const json& body);
void append_data_header(std::vector<std::uint8_t>& out, std::uint32_t index, std::uint64_t offset,
                        std::size_t bytes);

// Splits the decrypted byte stream into messages; throws on a malformed frame.
class MessageParser {
 public:
  void feed(std::span<const std::uint8_t> bytes);
  std::optional<Message> next();

 private:
  std::vector<std::uint8_t> buffer_;
  std::size_t read_ = 0;
};

}  // namespace otpgate::transfer::detail

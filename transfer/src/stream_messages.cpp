// SPDX-License-Identifier: LGPL-2.1-or-later
// See stream_messages.hpp.
#include "stream_messages.hpp"

#include <stdexcept>
#include <string>
#include <string_view>

namespace otpgate::transfer::detail {

json Message::as_json() const {
  try {
    return json::parse(body.begin(), body.end());
  } catch (const json::exception&) {
    throw std::runtime_error(std::string("malformed '") + static_cast<char>(type) +
                             "' message in the protected stream");
  }
}

void append_message(std::vector<std::uint8_t>& out, MessageType type,
                    std::span<const std::uint8_t> body) {
  const auto n = static_cast<std::uint32_t>(body.size());
  out.push_back(static_cast<std::uint8_t>(type));
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  out.insert(out.end(), body.begin(), body.end());
}

void append_json_message(std::vector<std::uint8_t>& out, MessageType type, const json& body) {
  const std::string text = body.dump();
  append_message(out, type, {reinterpret_cast<const std::uint8_t*>(text.data()), text.size()});
}

void append_data_header(std::vector<std::uint8_t>& out, std::uint32_t index, std::uint64_t offset,
                        std::size_t bytes) {
  const auto n = static_cast<std::uint32_t>(kDataHeaderBytes + bytes);
  out.push_back(static_cast<std::uint8_t>(MessageType::data));
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(index >> (8 * i)));
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(offset >> (8 * i)));
}

void MessageParser::feed(std::span<const std::uint8_t> bytes) {
  if (read_ > 0 && read_ == buffer_.size()) {
    buffer_.clear();
    read_ = 0;
  } else if (read_ > (1u << 20)) {
    buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<long>(read_));
    read_ = 0;
  }
  buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
}

std::optional<Message> MessageParser::next() {
  const std::size_t left = buffer_.size() - read_;
  if (left < kMessageHeaderBytes) return std::nullopt;
  const std::uint8_t* p = buffer_.data() + read_;
  const std::uint8_t type = p[0];
  static constexpr std::string_view kTypes = "HFDEMSBX";
  if (kTypes.find(static_cast<char>(type)) == std::string_view::npos) {
    throw std::runtime_error("unknown message type in the protected stream (sender version?)");
  }
  std::uint32_t n = 0;
  for (int i = 1; i <= 4; ++i) n = (n << 8) | p[i];
  if (n > kMaxMessageBytes) throw std::runtime_error("oversized message in the protected stream");
  if (left < kMessageHeaderBytes + n) return std::nullopt;
  Message m{static_cast<MessageType>(type), {p + kMessageHeaderBytes, n}};
  read_ += kMessageHeaderBytes + n;
  return m;
}

}  // namespace otpgate::transfer::detail

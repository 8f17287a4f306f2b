// SPDX-License-Identifier: LGPL-2.1-or-later
// An in-memory PadSource over a fixed pad, for codec tests and test vectors.
// Sender: every key of the pad is in the ring and announced from the start.
// Receiver: request() "fetches" the announced key by its ID, once, as a KME would.
#pragma once

#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::testing {

// Pad byte at offset i of the test pad (docs/wire-format.md uses the same rule).
inline std::uint8_t test_pad_byte(std::uint64_t i) {
  return static_cast<std::uint8_t>((i * 131 + 7) & 0xff);
}

inline keys::KeyId test_key_id(std::uint64_t index) {
  std::array<std::uint8_t, 16> b{0x7e, 0x57};
  for (int i = 0; i < 8; ++i) b[15 - i] = static_cast<std::uint8_t>(index >> (8 * i));
  return keys::KeyId(b);
}

class MemoryPad final : public keys::PadSource {
 public:
  MemoryPad(std::uint64_t start, std::uint64_t bytes, std::uint32_t key_length)
      : start_(start),
        key_length_(key_length),
        ring_(static_cast<std::size_t>((bytes + key_length - 1) / key_length) + 1, key_length) {
    for (std::uint64_t off = start; off < start + bytes; off += key_length) {
      const std::uint32_t len =
          static_cast<std::uint32_t>(std::min<std::uint64_t>(key_length, start + bytes - off));
      const keys::KeyId id = test_key_id((off - start) / key_length);
      keys_[id] = {off, len};
    }
  }
  // Sender role: keys enter the ring (announced first) as a refill thread would put
  // them, keeping at most `ahead` bytes ready.
  void fill_for_sending(std::uint64_t ahead = 4u << 20) {
    sending_ = true;
    ahead_ = ahead;
    next_ = start_;
    top_up();
  }
  void top_up() {
    // Like KeySupply: nothing until below the low-water mark (half), then a whole batch.
    if (!sending_ || ring_.bytes_available() >= ahead_ / 2) return;
    while (keys_.count(id_at(next_)) && ring_.bytes_available() < ahead_) {
      const auto [o, len] = keys_[id_at(next_)];
      announcements_.push_back({o, id_at(next_), len});
      ring_.push(o, id_at(next_), pad_bytes(o, len));
      next_ += len;
    }
  }
  static std::vector<std::uint8_t> pad_bytes(std::uint64_t off, std::size_t n) {
    std::vector<std::uint8_t> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = test_pad_byte(off + i);
    return v;
  }

  std::optional<std::uint64_t> peek_offset() override {
    top_up();
    return ring_.peek_offset();
  }
  std::uint64_t available() const override { return ring_.bytes_available(); }
  std::optional<std::uint64_t> take(std::span<std::uint8_t> out) override {
    top_up();
    return ring_.take(out);
  }
  std::optional<keys::KeyAnnouncement> next_announcement() override {
    top_up();
    if (announcements_.empty()) return std::nullopt;
    auto a = announcements_.front();
    announcements_.pop_front();
    return a;
  }
  bool request(const keys::KeyAnnouncement& a) override {
    ++requests;
    auto it = keys_.find(a.key_id);
    // As a KME: by key_ID alone, once, whatever length the announcement claimed.
    if (it == keys_.end() || delivered_.count(a.key_id)) return true;
    delivered_[a.key_id] = true;
    // Delivered as the KME would: the bytes of that key, placed where asked.
    if (hold_deliveries) {
      held_.push_back({a.offset, a.key_id, it->second});
    } else {
      ring_.push(a.offset, a.key_id, pad_bytes(it->second.first, it->second.second));
    }
    return true;
  }
  void release_held() {
    for (const auto& h : held_) ring_.push(h.offset, h.id, pad_bytes(h.key.first, h.key.second));
    held_.clear();
  }
  std::optional<keys::PadSegment> pop_segment() override { return ring_.pop_segment(); }
  void release(const keys::PadSegment& s) override { ring_.release(s); }

  bool hold_deliveries = false;  // receiver: keep fetched keys back until release_held()
  std::uint64_t requests = 0;

 private:
  keys::KeyId id_at(std::uint64_t off) const { return test_key_id((off - start_) / key_length_); }
  struct Held {
    std::uint64_t offset;
    keys::KeyId id;
    std::pair<std::uint64_t, std::uint32_t> key;
  };
  bool sending_ = false;
  std::uint64_t ahead_ = 0, next_ = 0;
  std::uint64_t start_;
  std::uint32_t key_length_;
  keys::KeyRing ring_;
  std::map<keys::KeyId, std::pair<std::uint64_t, std::uint32_t>> keys_;
  std::map<keys::KeyId, bool> delivered_;
  std::deque<keys::KeyAnnouncement> announcements_;
  std::vector<Held> held_;
};

}  // namespace otpgate::testing

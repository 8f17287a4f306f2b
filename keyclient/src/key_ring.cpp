// SPDX-License-Identifier: LGPL-2.1-or-later
// Lock-free SPSC key ring: slots of key material in one locked arena, handed from the
// refill thread to the media thread and back through two Boost.Lockfree queues of slot
// indices. Only indices travel through the queues, so key bytes are never copied into
// memory we cannot wipe.
#include <openssl/crypto.h>

#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cstring>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

struct KeyRing::Impl {
  struct SlotInfo {
    std::uint64_t offset = 0;
    KeyId id;
    std::uint32_t length = 0;
  };

  Impl(std::size_t count, std::size_t bytes)
      : slot_count(count),
        slot_bytes(bytes),
        arena(count * bytes),
        info(count),
        filled(count),
        free(count) {
    for (std::uint32_t i = 0; i < count; ++i) free.push(i);
  }

  std::uint8_t* slot_data(std::uint32_t slot) { return arena.span().data() + slot * slot_bytes; }

  // Consumer only: wipe the slot and give it back to the producer.
  void recycle(std::uint32_t slot, std::uint32_t length) {
    OPENSSL_cleanse(slot_data(slot), length);
    free.push(slot);  // never fails: there are exactly slot_count indices
  }

  const std::size_t slot_count;
  const std::size_t slot_bytes;
  SecretBytes arena;
  std::vector<SlotInfo> info;  // written by the producer before the index is published
  boost::lockfree::spsc_queue<std::uint32_t> filled;  // producer -> consumer
  boost::lockfree::spsc_queue<std::uint32_t> free;    // consumer -> producer

  std::atomic<std::uint64_t> pushed{0};
  std::atomic<std::uint64_t> consumed{0};
  std::atomic<std::uint64_t> discarded{0};

  // Stream-mode cursor, touched by the consumer thread only.
  bool has_current = false;
  std::uint32_t current = 0;
  std::uint32_t position = 0;  // bytes of `current` already taken
  bool has_expected = false;
  std::uint64_t expected_next = 0;  // offset that continues the stream
};

KeyRing::KeyRing(std::size_t slot_count, std::size_t slot_bytes) {
  if (slot_count == 0 || slot_bytes == 0 || slot_count > UINT32_MAX) {
    throw std::invalid_argument("key ring needs at least one slot of at least one byte");
  }
  impl_ = std::make_unique<Impl>(slot_count, slot_bytes);
}

KeyRing::~KeyRing() = default;  // the arena wipes itself

bool KeyRing::push(std::uint64_t offset, const KeyId& id, std::span<const std::uint8_t> key) {
  if (key.empty() || key.size() > impl_->slot_bytes) return false;
  std::uint32_t slot = 0;
  if (!impl_->free.pop(slot)) return false;
  std::memcpy(impl_->slot_data(slot), key.data(), key.size());
  impl_->info[slot] = {offset, id, static_cast<std::uint32_t>(key.size())};
  impl_->filled.push(slot);  // release: the consumer sees the bytes and info above
  impl_->pushed.fetch_add(key.size(), std::memory_order_release);
  return true;
}

std::size_t KeyRing::free_slots() const {
  return impl_->free.read_available();
}

std::optional<std::uint64_t> KeyRing::take(std::span<std::uint8_t> out) {
  Impl& r = *impl_;
  const std::size_t want = out.size();
  if (want == 0 || bytes_available() < want) return std::nullopt;

  std::size_t copied = 0;
  std::uint64_t start = 0;
  while (copied < want) {
    if (!r.has_current) {
      std::uint32_t next = 0;
      if (!r.filled.pop(next)) {
        // Only reachable after a discontinuity consumed what the counters promised.
        OPENSSL_cleanse(out.data(), copied);
        r.consumed.fetch_sub(copied, std::memory_order_relaxed);
        r.discarded.fetch_add(copied, std::memory_order_relaxed);
        return std::nullopt;
      }
      const bool continues = r.has_expected && r.info[next].offset == r.expected_next;
      r.has_current = true;
      r.current = next;
      r.position = 0;
      if (copied != 0 && !continues) {
        // The pad stream jumps here: what we copied cannot be used with what follows.
        OPENSSL_cleanse(out.data(), copied);
        r.consumed.fetch_sub(copied, std::memory_order_relaxed);
        r.discarded.fetch_add(copied, std::memory_order_relaxed);
        copied = 0;
        if (bytes_available() < want) return std::nullopt;
      }
    }
    const auto& slot = r.info[r.current];
    if (copied == 0) start = slot.offset + r.position;
    const std::size_t n = std::min<std::size_t>(want - copied, slot.length - r.position);
    std::uint8_t* src = r.slot_data(r.current) + r.position;
    std::memcpy(out.data() + copied, src, n);
    OPENSSL_cleanse(src, n);  // consumed bytes are wiped at once
    r.position += static_cast<std::uint32_t>(n);
    copied += n;
    r.consumed.fetch_add(n, std::memory_order_relaxed);
    r.expected_next = slot.offset + r.position;
    r.has_expected = true;
    if (r.position == slot.length) {
      r.free.push(r.current);  // already wiped; the producer may refill it now
      r.has_current = false;
    }
  }
  return start;
}

std::optional<std::uint64_t> KeyRing::peek_offset() const {
  const Impl& r = *impl_;
  if (r.has_current) return r.info[r.current].offset + r.position;
  if (r.filled.read_available() == 0) return std::nullopt;
  return r.info[r.filled.front()].offset;
}

std::uint64_t KeyRing::discard_below(std::uint64_t offset) {
  Impl& r = *impl_;
  std::uint64_t wiped = 0;
  while (true) {
    if (!r.has_current) {
      if (r.filled.read_available() == 0 || r.info[r.filled.front()].offset >= offset) break;
      r.filled.pop(r.current);
      r.has_current = true;
      r.position = 0;
    }
    const auto& slot = r.info[r.current];
    if (slot.offset + r.position >= offset) break;
    const std::uint32_t n = slot.length - r.position;  // whole slots: keys never straddle
    OPENSSL_cleanse(r.slot_data(r.current) + r.position, n);
    wiped += n;
    r.has_current = false;
    r.free.push(r.current);
  }
  r.discarded.fetch_add(wiped, std::memory_order_relaxed);
  return wiped;
}

std::optional<PadSegment> KeyRing::pop_segment() {
  std::uint32_t slot = 0;
  if (!impl_->filled.pop(slot)) return std::nullopt;
  const auto& info = impl_->info[slot];
  return PadSegment{info.offset, info.id, {impl_->slot_data(slot), info.length}, slot};
}

void KeyRing::release(const PadSegment& segment) {
  const auto length = impl_->info[segment.slot].length;
  impl_->recycle(segment.slot, length);
  impl_->consumed.fetch_add(length, std::memory_order_relaxed);
}

std::uint64_t KeyRing::bytes_available() const {
  const auto pushed = impl_->pushed.load(std::memory_order_acquire);
  const auto gone = impl_->consumed.load(std::memory_order_relaxed) +
                    impl_->discarded.load(std::memory_order_relaxed);
  return pushed > gone ? pushed - gone : 0;
}
std::uint64_t KeyRing::bytes_pushed() const {
  return impl_->pushed.load();
}
std::uint64_t KeyRing::bytes_consumed() const {
  return impl_->consumed.load();
}
std::uint64_t KeyRing::bytes_discarded() const {
  return impl_->discarded.load();
}
std::size_t KeyRing::slot_bytes() const {
  return impl_->slot_bytes;
}
std::size_t KeyRing::slot_count() const {
  return impl_->slot_count;
}
bool KeyRing::memory_locked() const {
  return impl_->arena.locked();
}

}  // namespace otpgate::keys

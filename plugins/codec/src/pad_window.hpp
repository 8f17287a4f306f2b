// SPDX-License-Identifier: LGPL-2.1-or-later
// The receiver's pad window: pad held by offset for reordering and look-ahead, each byte
// marked present when its key is placed and used (and wiped) when a unit consumes it, so
// that no pad byte serves twice and pad below the window counts as destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "otpgate/keyclient.hpp"

namespace otpgate::otp {

// Zero-filled 64-bit words on pages of their own, faulted in as they are written and
// returned to zero at once by clear() (not secret: the window's bitmaps).
class ZeroedWords {
 public:
  explicit ZeroedWords(std::size_t count);
  ~ZeroedWords();
  ZeroedWords(const ZeroedWords&) = delete;
  ZeroedWords& operator=(const ZeroedWords&) = delete;
  std::uint64_t& operator[](std::size_t i) { return words_[i]; }
  std::uint64_t operator[](std::size_t i) const { return words_[i]; }
  void clear();

 private:
  std::uint64_t* words_ = nullptr;
  std::size_t bytes_ = 0;
};

// A circular arena of `size` bytes covering pad offsets [base, base + size), with bitmaps
// of the bytes present and the bytes used. It costs what its pad uses: the arena's 4 KiB
// blocks are locked as pad is first placed in them and only those are ever wiped again
// (keys::SecretArena), so a window of 16 MiB that a short call fills with a few hundred
// KiB takes that much RAM, locked memory (RLIMIT_MEMLOCK) and wiping, not 16 MiB; and as
// pad is consumed and the window moves on, blocks left with no pad to serve are wiped,
// unlocked and dropped, so a long call cycling through it holds about its live pad. Pad
// whose block cannot be locked is not held at all: it stays absent (units on it have no
// key) and place() says so.
class PadWindow {
 public:
  explicit PadWindow(std::size_t size);  // a multiple of kEpochBytes

  std::uint64_t base() const { return base_; }
  bool in_range(std::uint64_t off, std::size_t n) const {
    return off >= base_ && off - base_ <= size_ && n <= size_ - (off - base_);
  }
  bool all_present(std::uint64_t off, std::size_t n) const;
  bool any_used(std::uint64_t off, std::size_t n) const;

  void copy_out(std::uint64_t off, std::size_t n, std::uint8_t* out) const;
  // Marks used and wipes: the pad can never be used again.
  void consume(std::uint64_t off, std::size_t n);
  // Places key bytes; moves the window forward if they reach past its end. Bytes already
  // used stay used (and wiped) until the window moves past them: pad serves once. False
  // when some of the key could not be held because its memory could not be locked
  // (RLIMIT_MEMLOCK): those bytes are dropped, never written, and stay absent.
  [[nodiscard]] bool place(std::uint64_t off, std::span<const std::uint8_t> key);
  // Bytes of the arena's blocks locked now, those holding pad still to serve (and blocks
  // partly so): what its locked memory and wipes cost.
  std::size_t touched_bytes() const { return bytes_.written_bytes(); }

 private:
  void advance(std::uint64_t new_base);
  void give_back_idle_blocks(std::size_t at, std::size_t len);
  template <typename F>
  void pieces(std::uint64_t off, std::size_t n, F f) const;
  bool all(const ZeroedWords& bits, std::uint64_t off, std::size_t n, bool value) const;

  std::size_t size_;
  keys::SecretArena bytes_;
  ZeroedWords present_, used_;
  std::uint64_t base_ = 0;
};

}  // namespace otpgate::otp

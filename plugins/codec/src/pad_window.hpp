// SPDX-License-Identifier: LGPL-2.1-or-later
// The receiver's pad window: pad held by offset for reordering and look-ahead, each byte
// marked present when its key is placed and used (and wiped) when a unit consumes it, so
// that no pad byte serves twice and pad below the window counts as destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::otp {

// A circular arena of `size` bytes covering pad offsets [base, base + size), with bitmaps
// of the bytes present and the bytes used.
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
  // Places key bytes; moves the window forward if they reach past its end.
  void place(std::uint64_t off, std::span<const std::uint8_t> key);

 private:
  void advance(std::uint64_t new_base);
  template <typename F>
  void pieces(std::uint64_t off, std::size_t n, F f) const;
  bool all(const std::vector<std::uint64_t>& bits, std::uint64_t off, std::size_t n,
           bool value) const;

  std::size_t size_;
  keys::SecretBytes bytes_;
  std::vector<std::uint64_t> present_, used_;
  std::uint64_t base_ = 0;
};

}  // namespace otpgate::otp

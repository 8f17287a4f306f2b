// SPDX-License-Identifier: LGPL-2.1-or-later
#include "pad_window.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "otpgate/checked_cast.hpp"
#include "otpgate/otp_wire.hpp"

namespace otpgate::otp {

namespace {

// Calls f(word, mask) for the 64-bit bitmap words that bits [at, at + n) touch, with the
// mask of those bits in each; stops early when f returns false.
template <typename F>
bool each_word(std::size_t at, std::size_t n, F f) {
  for (std::size_t i = at, end = at + n; i < end;) {
    const std::size_t b = i % 64;
    const std::size_t take = std::min<std::size_t>(64 - b, end - i);
    const std::uint64_t mask = (take == 64 ? ~0ull : ((1ull << take) - 1)) << b;
    if (!f(i / 64, mask)) return false;
    i += take;
  }
  return true;
}

void set(std::vector<std::uint64_t>& bits, std::size_t at, std::size_t n, bool value) {
  each_word(at, n, [&](std::size_t word, std::uint64_t mask) {
    if (value) {
      bits[word] |= mask;
    } else {
      bits[word] &= ~mask;
    }
    return true;
  });
}

}  // namespace

PadWindow::PadWindow(std::size_t size)
    : size_(size), bytes_(size), present_(size / 64), used_(size / 64) {
  if (size == 0 || size % kEpochBytes != 0)
    throw std::invalid_argument("window must be a multiple of 256 KiB");
}

// Calls f(at, len, done) for the runs of the arena that pad [off, off + n) occupies.
template <typename F>
void PadWindow::pieces(std::uint64_t off, std::size_t n, F f) const {
  std::size_t done = 0;
  while (done < n) {
    const auto at = checked_cast<std::size_t>((off + done) % size_);
    const std::size_t len = std::min(n - done, size_ - at);
    f(at, len, done);
    done += len;
  }
}

bool PadWindow::all(const std::vector<std::uint64_t>& bits, std::uint64_t off, std::size_t n,
                    bool value) const {
  bool result = true;
  pieces(off, n, [&](std::size_t at, std::size_t len, std::size_t) {
    if (!result) return;
    result = each_word(at, len, [&](std::size_t word, std::uint64_t mask) {
      const std::uint64_t got = bits[word] & mask;
      return value ? got == mask : got == 0;
    });
  });
  return result;
}

bool PadWindow::all_present(std::uint64_t off, std::size_t n) const {
  return all(present_, off, n, true);
}
bool PadWindow::any_used(std::uint64_t off, std::size_t n) const {
  return !all(used_, off, n, false);
}

void PadWindow::copy_out(std::uint64_t off, std::size_t n, std::uint8_t* out) const {
  pieces(off, n, [&](std::size_t at, std::size_t len, std::size_t done) {
    std::memcpy(out + done, bytes_.span().data() + at, len);
  });
}

void PadWindow::consume(std::uint64_t off, std::size_t n) {
  pieces(off, n, [&](std::size_t at, std::size_t len, std::size_t) {
    OPENSSL_cleanse(bytes_.span().data() + at, len);
    set(used_, at, len, true);
  });
}

void PadWindow::place(std::uint64_t off, std::span<const std::uint8_t> key) {
  const std::uint64_t end = off + key.size();
  if (end <= base_) return;
  if (end > base_ + size_) advance(end - size_);
  const std::size_t skip = off < base_ ? checked_cast<std::size_t>(base_ - off) : 0;
  pieces(off + skip, key.size() - skip, [&](std::size_t at, std::size_t len, std::size_t done) {
    std::memcpy(bytes_.span().data() + at, key.data() + skip + done, len);
    set(present_, at, len, true);
    set(used_, at, len, false);
  });
}

void PadWindow::advance(std::uint64_t new_base) {
  const std::uint64_t drop = new_base - base_;
  if (drop >= size_) {
    OPENSSL_cleanse(bytes_.span().data(), size_);
    std::fill(present_.begin(), present_.end(), 0);
    std::fill(used_.begin(), used_.end(), 0);
  } else {
    pieces(base_, checked_cast<std::size_t>(drop),
           [&](std::size_t at, std::size_t len, std::size_t) {
             OPENSSL_cleanse(bytes_.span().data() + at, len);
             set(present_, at, len, false);
             set(used_, at, len, false);
           });
  }
  base_ = new_base;
}

}  // namespace otpgate::otp

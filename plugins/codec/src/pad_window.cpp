// SPDX-License-Identifier: LGPL-2.1-or-later
#include "pad_window.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <new>
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

void set(ZeroedWords& bits, std::size_t at, std::size_t n, bool value) {
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

ZeroedWords::ZeroedWords(std::size_t count) : bytes_(count * sizeof(std::uint64_t)) {
  if (bytes_ == 0) return;
  void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  words_ = static_cast<std::uint64_t*>(p);
}

ZeroedWords::~ZeroedWords() {
  if (words_) ::munmap(words_, bytes_);
}

void ZeroedWords::clear() {
  // Private anonymous pages read as zero again once dropped.
  if (words_ && ::madvise(words_, bytes_, MADV_DONTNEED) != 0) {
    std::fill(words_, words_ + bytes_ / sizeof(std::uint64_t), 0);
  }
}

namespace {
std::size_t checked_window(std::size_t size) {
  if (size == 0 || size % kEpochBytes != 0)
    throw std::invalid_argument("window must be a multiple of 256 KiB");
  return size;
}
}  // namespace

PadWindow::PadWindow(std::size_t size)
    : size_(checked_window(size)), bytes_(size), present_(size / 64), used_(size / 64) {}

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

bool PadWindow::all(const ZeroedWords& bits, std::uint64_t off, std::size_t n, bool value) const {
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
    bytes_.read(at, {out + done, len});
  });
}

void PadWindow::consume(std::uint64_t off, std::size_t n) {
  pieces(off, n, [&](std::size_t at, std::size_t len, std::size_t) {
    bytes_.wipe(at, len);
    set(used_, at, len, true);
    give_back_idle_blocks(at, len);
  });
}

bool PadWindow::place(std::uint64_t off, std::span<const std::uint8_t> key) {
  const std::uint64_t end = off + key.size();
  if (end <= base_) return true;
  if (end > base_ + size_) advance(end - size_);
  const std::size_t skip = off < base_ ? checked_cast<std::size_t>(base_ - off) : 0;
  bool held = true;
  pieces(off + skip, key.size() - skip, [&](std::size_t at, std::size_t len, std::size_t done) {
    const std::uint8_t* from = key.data() + skip + done;
    // Written in runs of bytes not used yet; used bytes keep their wiped state. A run is
    // present only once written: one the arena cannot lock stays absent (fail closed).
    std::size_t run_at = 0, run_length = 0;
    auto flush = [&] {
      if (run_length == 0) return;
      if (bytes_.write(run_at, {from + (run_at - at), run_length})) {
        set(present_, run_at, run_length, true);
      } else {
        held = false;
      }
      run_length = 0;
    };
    auto add = [&](std::size_t b, std::size_t n) {
      if (run_length > 0 && run_at + run_length == b) {
        run_length += n;
        return;
      }
      flush();
      run_at = b;
      run_length = n;
    };
    each_word(at, len, [&](std::size_t word, std::uint64_t mask) {
      const std::uint64_t fresh = mask & ~used_[word];
      if (fresh == mask) {
        add(word * 64 + std::countr_zero(mask), std::popcount(mask));
      } else {
        for (std::uint64_t bits = fresh; bits != 0; bits &= bits - 1)
          add(word * 64 + std::countr_zero(bits), 1);
      }
      return true;
    });
    flush();
  });
  return held;
}

void PadWindow::advance(std::uint64_t new_base) {
  const std::uint64_t drop = new_base - base_;
  if (drop >= size_) {
    bytes_.discard(0, size_);
    present_.clear();
    used_.clear();
  } else {
    pieces(base_, checked_cast<std::size_t>(drop),
           [&](std::size_t at, std::size_t len, std::size_t) {
             bytes_.wipe(at, len);
             set(present_, at, len, false);
             set(used_, at, len, false);
             give_back_idle_blocks(at, len);
           });
  }
  base_ = new_base;
}

// Pad in [at, at + len) of the arena was consumed or the window moved past it: each block
// it reaches that now holds no pad still to be served (every byte absent, or used and so
// wiped) is given back, so the window's locked memory stays about the pad it holds live,
// however long the stream cycles through it. A block left in part keeps its lock while
// pad in the rest of it is live; the consume or advance that leaves it idle gives it
// back. The used bitmap is untouched (a used byte stays used, and wiped, whatever its
// block), and a block given back is locked again before pad is next placed in it.
void PadWindow::give_back_idle_blocks(std::size_t at, std::size_t len) {
  if (len == 0) return;
  constexpr std::size_t kBlock = keys::SecretArena::kBlockBytes;
  static_assert(kBlock % 64 == 0);
  for (std::size_t b = at / kBlock, last = (at + len - 1) / kBlock; b <= last; ++b) {
    bool idle = true;
    for (std::size_t w = b * kBlock / 64, end = (b + 1) * kBlock / 64; w < end && idle; ++w) {
      idle = (present_[w] & ~used_[w]) == 0;
    }
    if (idle) bytes_.discard(b * kBlock, kBlock);
  }
}

}  // namespace otpgate::otp

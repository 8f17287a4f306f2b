// SPDX-License-Identifier: LGPL-2.1-or-later
// KeyId, SecretBytes and the default log sink.
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include "locked_pool.hpp"
#include "otpgate/hex.hpp"
#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

// 8-4-4-4-12: the dashes stand at these places, hex digits everywhere else.
std::optional<KeyId> KeyId::parse(std::string_view text) {
  if (text.size() != 36) return std::nullopt;
  std::string digits;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash != (text[i] == '-')) return std::nullopt;
    if (!dash) digits.push_back(text[i]);
  }
  const auto bytes = from_hex(digits);
  if (!bytes) return std::nullopt;
  std::array<std::uint8_t, 16> id{};
  std::copy(bytes->begin(), bytes->end(), id.begin());
  return KeyId(id);
}

std::string KeyId::to_string() const {
  std::string s = to_hex(bytes_);
  for (const std::size_t at : {20u, 16u, 12u, 8u}) s.insert(at, 1, '-');
  return s;
}

namespace {

// mlock is per page and not counted: one munlock unlocks a page for everything on it. Small
// secrets share heap pages (two keys, a key and a scratch buffer), so freeing one must not
// unlock the page under the other: locks are counted per page, for the whole process as
// the kernel keeps them, and a page is unlocked when the last secret on it goes.
class PageLocks {
 public:
  static PageLocks& of_process() {
    // Never destroyed: threads still running at exit (GStreamer's, a refill thread being
    // joined) may free secrets after static destructors ran.
    static PageLocks& locks = *new PageLocks();
    return locks;
  }

  // True when every page of the range is locked (and counted); false: none was counted.
  bool lock(const std::uint8_t* at, std::size_t size) {
    const std::lock_guard guard(mutex_);
    // Pages another secret holds are locked already: no system call for a key among keys.
    bool all_held = true;
    for (std::uintptr_t page = first(at); page < end(at, size) && all_held; page += page_)
      all_held = counts_.contains(page);
    if (!all_held && ::mlock(at, size) != 0) return false;
    for (std::uintptr_t page = first(at); page < end(at, size); page += page_) ++counts_[page];
    return true;
  }

  void unlock(const std::uint8_t* at, std::size_t size) {
    const std::lock_guard guard(mutex_);
    // Runs of pages no other secret holds are unlocked with one call each.
    std::uintptr_t run = 0, run_end = 0;
    const auto flush = [&] {
      if (run_end > run) ::munlock(reinterpret_cast<const void*>(run), run_end - run);
      run = run_end = 0;
    };
    for (std::uintptr_t page = first(at); page < end(at, size); page += page_) {
      const auto it = counts_.find(page);
      if (it != counts_.end() && --it->second != 0) {
        flush();
        continue;
      }
      if (it != counts_.end()) counts_.erase(it);
      if (run_end != page) flush();
      if (run_end == 0) run = page;
      run_end = page + page_;
    }
    flush();
  }

 private:
  PageLocks() = default;
  std::uintptr_t first(const std::uint8_t* at) const {
    return reinterpret_cast<std::uintptr_t>(at) / page_ * page_;
  }
  std::uintptr_t end(const std::uint8_t* at, std::size_t size) const {
    return (reinterpret_cast<std::uintptr_t>(at) + size + page_ - 1) / page_ * page_;
  }

  const std::uintptr_t page_ = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  std::mutex mutex_;
  std::unordered_map<std::uintptr_t, std::uint32_t> counts_;  // page address -> secrets on it
};

}  // namespace

SecretBytes::SecretBytes(std::size_t size) : size_(size), capacity_(size) {
  if (size == 0) return;
  if ((data_ = detail::LockedPool::of_process().take(size, capacity_))) {
    pooled_ = locked_ = true;
    return;
  }
  capacity_ = size;
  heap_ = std::make_unique_for_overwrite<std::uint8_t[]>(size);
  data_ = heap_.get();
  // Keep key material out of swap where the OS lets us; failing is not fatal.
  locked_ = PageLocks::of_process().lock(data_, size);
}

SecretBytes::~SecretBytes() {
  release();
}

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      heap_(std::move(other.heap_)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)),
      locked_(std::exchange(other.locked_, false)),
      pooled_(std::exchange(other.pooled_, false)) {}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    heap_ = std::move(other.heap_);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    locked_ = std::exchange(other.locked_, false);
    pooled_ = std::exchange(other.pooled_, false);
  }
  return *this;
}

void SecretBytes::truncate(std::size_t new_size) {
  if (new_size >= size_) return;
  OPENSSL_cleanse(data_ + new_size, size_ - new_size);
  size_ = new_size;
}

void SecretBytes::release() noexcept {
  if (!data_) return;
  OPENSSL_cleanse(data_, capacity_);
  if (pooled_) {
    detail::LockedPool::of_process().give_back(data_);
  } else if (locked_) {
    PageLocks::of_process().unlock(data_, capacity_);
  }
  data_ = nullptr;
  heap_.reset();
  size_ = capacity_ = 0;
  locked_ = pooled_ = false;
}

SecretPoolStats secret_pool_stats() {
  return detail::LockedPool::of_process().stats();
}

SecretArena::SecretArena(std::size_t size) : size_(size) {
  if (size == 0) return;
  page_ = std::max(static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)), kBlockBytes);
  mapped_ = (size + page_ - 1) / page_ * page_;
  void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<std::uint8_t*>(p);
  // Nothing is locked yet: write() locks each block before the first byte goes into it
  // (an mlock of the whole range, even MLOCK_ONFAULT, would count all of it against
  // RLIMIT_MEMLOCK at once and fail for large windows without CAP_IPC_LOCK).
  ::madvise(data_, mapped_, MADV_DONTDUMP);
  written_.assign((size + kBlockBytes * 64 - 1) / (kBlockBytes * 64), 0);
}

SecretArena::~SecretArena() {
  release();
}

SecretArena::SecretArena(SecretArena&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)),
      page_(std::exchange(other.page_, 0)),
      written_(std::move(other.written_)),
      written_blocks_(std::exchange(other.written_blocks_, 0)),
      lock_failures_(std::exchange(other.lock_failures_, 0)) {}

SecretArena& SecretArena::operator=(SecretArena&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
    page_ = std::exchange(other.page_, 0);
    written_ = std::move(other.written_);
    written_blocks_ = std::exchange(other.written_blocks_, 0);
    lock_failures_ = std::exchange(other.lock_failures_, 0);
  }
  return *this;
}

void SecretArena::check(std::size_t at, std::size_t n) const {
  if (at > size_ || n > size_ - at) throw std::out_of_range("SecretArena: range outside");
}

// Calls f(at, n) for the runs of [at, at + n) that lie in blocks ever written.
template <typename F>
void SecretArena::written_runs(std::size_t at, std::size_t n, F f) const {
  std::size_t run = 0, run_length = 0;
  for (std::size_t i = at, end = at + n; i < end;) {
    const std::size_t block = i / kBlockBytes;
    const std::size_t take = std::min(end, (block + 1) * kBlockBytes) - i;
    if ((written_[block / 64] >> (block % 64)) & 1) {
      if (run_length == 0) run = i;
      run_length += take;
    } else if (run_length > 0) {
      f(run, run_length);
      run_length = 0;
    }
    i += take;
  }
  if (run_length > 0) f(run, run_length);
}

bool SecretArena::write(std::size_t at, std::span<const std::uint8_t> bytes) {
  check(at, bytes.size());
  if (bytes.empty()) return true;
  // Every block the bytes reach is locked before any byte is written (fail closed).
  bool locked = true;
  for (std::size_t b = at / kBlockBytes, last = (at + bytes.size() - 1) / kBlockBytes; b <= last;
       ++b) {
    std::uint64_t& word = written_[b / 64];
    const std::uint64_t bit = 1ull << (b % 64);
    if (word & bit) continue;
    const std::size_t from = b * kBlockBytes;
    if (::mlock(data_ + from, std::min(kBlockBytes, mapped_ - from)) != 0) {
      locked = false;
      break;
    }
    word |= bit;
    ++written_blocks_;
  }
  if (!locked) {
    ++lock_failures_;
    return false;
  }
  std::memcpy(data_ + at, bytes.data(), bytes.size());
  return true;
}

void SecretArena::read(std::size_t at, std::span<std::uint8_t> out) const {
  check(at, out.size());
  if (!out.empty()) std::memcpy(out.data(), data_ + at, out.size());
}

void SecretArena::wipe(std::size_t at, std::size_t n) {
  check(at, n);
  written_runs(
      at, n, [&](std::size_t from, std::size_t length) { OPENSSL_cleanse(data_ + from, length); });
}

void SecretArena::wipe_all() {
  if (written_blocks_ > 0) wipe(0, size_);
}

void SecretArena::discard(std::size_t at, std::size_t n) {
  wipe(at, n);
  if (n == 0) return;
  const std::size_t blocks = (size_ + kBlockBytes - 1) / kBlockBytes;
  const std::size_t first = (at + kBlockBytes - 1) / kBlockBytes;
  const std::size_t end = at + n == size_ ? blocks : (at + n) / kBlockBytes;
  if (first >= end) return;
  auto is_set = [&](std::size_t b) { return (written_[b / 64] >> (b % 64)) & 1; };
  // mlock works on pages: a page (of several blocks where pages are larger than a block)
  // is unlocked and dropped once none of its blocks is locked for writing any more.
  const std::size_t per_page = page_ / kBlockBytes;
  for (std::size_t b0 = first / per_page * per_page; b0 < end; b0 += per_page) {
    const std::size_t b1 = std::min(blocks, b0 + per_page);
    bool cleared = false, idle = true;
    for (std::size_t b = b0; b < b1; ++b) {
      if (!is_set(b)) continue;
      if (b < first || b >= end) {
        idle = false;
        continue;
      }
      // Zeroed whole (the range wiped only what was asked) before it leaves locked memory.
      const std::size_t from = b * kBlockBytes;
      OPENSSL_cleanse(data_ + from, std::min(kBlockBytes, mapped_ - from));
      written_[b / 64] &= ~(1ull << (b % 64));
      --written_blocks_;
      cleared = true;
    }
    if (!cleared || !idle) continue;
    std::uint8_t* p = data_ + b0 * kBlockBytes;
    ::munlock(p, page_);
    ::madvise(p, page_, MADV_DONTNEED);  // private anonymous: reads as zero again
  }
}

void SecretArena::release() noexcept {
  if (!data_) return;
  wipe_all();
  ::munmap(data_, mapped_);  // unlocks
  data_ = nullptr;
  size_ = mapped_ = written_blocks_ = 0;
  written_.clear();
}

LogSink stderr_log_sink(LogLevel min_level) {
  return [min_level](LogLevel level, std::string_view message) {
    if (level < min_level) return;
    static constexpr const char* kNames[] = {"debug", "info", "warning", "error"};
    std::fprintf(stderr, "otpgate[%s]: %.*s\n", kNames[static_cast<int>(level)],
                 static_cast<int>(message.size()), message.data());
  };
}

}  // namespace otpgate::keys

// SPDX-License-Identifier: LGPL-2.1-or-later
#include "locked_pool.hpp"

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <optional>

namespace otpgate::keys::detail {

LockedPool& LockedPool::of_process() {
  static LockedPool& pool = *new LockedPool();
  return pool;
}

LockedPool::LockedPool() {
  // The pool's lock is held across fork() so that the child finds its lists whole, and
  // the child locks again what it inherited unlocked (memory locks are not inherited).
  ::pthread_atfork([] { of_process().mutex_.lock(); }, [] { of_process().mutex_.unlock(); },
                   [] {
                     LockedPool& pool = of_process();
                     pool.relock_in_child();
                     pool.mutex_.unlock();
                   });
}

void LockedPool::relock_in_child() {
  if (!base_) return;
  std::array<bool, kSlabs> unused{};
  for (const std::uint32_t s : unused_) unused[s] = true;
  for (std::uint32_t s = 0; s < kSlabs; ++s) {
    // At fork the child has the parent's limit, under which these were all locked.
    if (!unused[s]) ::mlock(base_ + std::size_t{s} * kSlabBytes, kSlabBytes);
  }
}

bool LockedPool::reserve() {
  if (base_) return true;
  if (reserve_failed_) return false;
  // Address space only: slabs get pages (and locks) as they are put to use.
  void* p = ::mmap(nullptr, kSlabs * kSlabBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    reserve_failed_ = true;
    return false;
  }
  // Room for every list's longest, so that give_back() never allocates (it runs in
  // SecretBytes' noexcept release).
  try {
    unused_.reserve(kSlabs);
    empty_.reserve(kKeptEmpty);
    for (auto& partial : partial_) partial.reserve(kSlabs);
  } catch (const std::bad_alloc&) {
    ::munmap(p, kSlabs * kSlabBytes);
    reserve_failed_ = true;
    return false;
  }
  base_ = static_cast<std::uint8_t*>(p);
  ::madvise(base_, kSlabs * kSlabBytes, MADV_DONTDUMP);  // secrets stay out of core dumps
  for (std::uint32_t i = kSlabs; i-- > 0;) unused_.push_back(i);
  return true;
}

std::optional<std::uint32_t> LockedPool::fresh_slab() {
  if (!empty_.empty()) {
    const std::uint32_t s = empty_.back();
    empty_.pop_back();
    return s;
  }
  if (unused_.empty()) return std::nullopt;
  const auto now = std::chrono::steady_clock::now();
  if (refused_at_ && now - *refused_at_ < kRetryAfterRefusal) return std::nullopt;
  const std::uint32_t s = unused_.back();
  if (::mlock(base_ + std::size_t{s} * kSlabBytes, kSlabBytes) != 0) {
    ++stats_.lock_refusals;  // RLIMIT_MEMLOCK: the caller locks (or not) on its own
    refused_at_ = now;
    return std::nullopt;
  }
  refused_at_.reset();
  unused_.pop_back();
  ++stats_.slab_locks;
  stats_.locked_bytes += kSlabBytes;
  return s;
}

std::uint8_t* LockedPool::take(std::size_t size, std::size_t& capacity) {
  if (size == 0 || size > kLargest) return nullptr;
  const std::size_t block = std::bit_ceil(std::max(size, kSmallest));
  const std::size_t cls = static_cast<std::size_t>(std::countr_zero(block / kSmallest));
  const std::lock_guard lock(mutex_);
  if (!reserve()) return nullptr;
  auto& partial = partial_[cls];
  if (partial.empty()) {
    const auto s = fresh_slab();
    if (!s) return nullptr;
    Slab& slab = slabs_[*s];
    const auto blocks = static_cast<std::uint16_t>(kSlabBytes / block);
    try {
      slab.free.resize(blocks);
    } catch (const std::bad_alloc&) {
      if (empty_.size() < kKeptEmpty) {
        empty_.push_back(*s);
      } else {
        release_slab(*s);
      }
      throw;
    }
    slab.block = block;
    // Handed out from the slab's start (the back of the list) onwards.
    for (std::uint16_t i = 0; i < blocks; ++i)
      slab.free[i] = static_cast<std::uint16_t>(blocks - 1 - i);
    partial.push_back(*s);
  }
  const std::uint32_t s = partial.back();
  Slab& slab = slabs_[s];
  const std::uint16_t index = slab.free.back();
  slab.free.pop_back();
  ++slab.used;
  if (slab.free.empty()) partial.pop_back();
  stats_.bytes_in_use += block;
  capacity = block;
  return base_ + std::size_t{s} * kSlabBytes + std::size_t{index} * block;
}

void LockedPool::give_back(std::uint8_t* block) {
  const std::lock_guard lock(mutex_);
  const auto at = static_cast<std::size_t>(block - base_);
  const auto s = static_cast<std::uint32_t>(at / kSlabBytes);
  Slab& slab = slabs_[s];
  const std::size_t cls = static_cast<std::size_t>(std::countr_zero(slab.block / kSmallest));
  auto& partial = partial_[cls];
  if (slab.free.empty()) partial.push_back(s);
  slab.free.push_back(static_cast<std::uint16_t>((at % kSlabBytes) / slab.block));
  --slab.used;
  stats_.bytes_in_use -= slab.block;
  if (slab.used != 0) return;
  partial.erase(std::find(partial.begin(), partial.end(), s));
  slab.block = 0;
  slab.free.clear();
  if (empty_.size() < kKeptEmpty) {
    empty_.push_back(s);
    return;
  }
  release_slab(s);
}

void LockedPool::release_slab(std::uint32_t s) {
  std::uint8_t* start = base_ + std::size_t{s} * kSlabBytes;
  ::munlock(start, kSlabBytes);
  ::madvise(start, kSlabBytes, MADV_DONTNEED);  // the pages go; they read as zero if reused
  unused_.push_back(s);
  stats_.locked_bytes -= kSlabBytes;
  refused_at_.reset();  // room under the limit again
}

SecretPoolStats LockedPool::stats() const {
  const std::lock_guard lock(mutex_);
  return stats_;
}

}  // namespace otpgate::keys::detail

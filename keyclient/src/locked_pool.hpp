// SPDX-License-Identifier: LGPL-2.1-or-later
// Locked memory for small secrets (SecretBytes up to 16 KiB: keys as a KME hands them out,
// scratch buffers), locked a 64 KiB slab at a time and reused, so that a refill thread
// fetching hundreds of keys a second does not mlock and munlock heap pages key by key
// (each call splits or merges the process's memory map under its write lock).
//
// Why not OpenSSL's secure heap (CRYPTO_secure_malloc): it is one arena of a size fixed at
// its first initialisation, locked whole at once, for the whole process (and OpenSSL's
// own private keys). Slabs here are locked as they are needed, so RLIMIT_MEMLOCK counts
// what is in use, and a process over its limit gets unlocked secrets exactly as before
// (SecretBytes::locked() false), never an error.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys::detail {

class LockedPool {
 public:
  static constexpr std::size_t kSlabBytes = 64u << 10;
  static constexpr std::size_t kSmallest = 64;        // the smallest block
  static constexpr std::size_t kLargest = 16u << 10;  // larger secrets lock their own pages
  static constexpr std::size_t kClasses = 9;          // 64 B, 128 B, ... 16 KiB
  static constexpr std::size_t kSlabs = 256;          // 16 MiB of address space, at most
  // Slabs kept locked while nothing is in them, so that a batch of keys freed and the
  // next one fetched reuse them; past this many an empty slab is unlocked and dropped.
  // What the pool locks beyond its secrets is so at most (classes in use + kKeptEmpty)
  // slabs: under 1 MiB (docs/gateway.md, "Sizing LimitMEMLOCK").
  static constexpr std::size_t kKeptEmpty = 4;
  // After the kernel refused to lock a slab, none is tried again for this long unless
  // the pool has unlocked one meanwhile (each try is an mlock call under the pool's lock).
  static constexpr std::chrono::seconds kRetryAfterRefusal{1};

  // The process's pool, never destroyed (threads still running at exit may free secrets
  // after static destructors ran).
  static LockedPool& of_process();

  // A locked block of at least `size` bytes (its size in `capacity`), or nullptr: larger
  // than kLargest, the pool full, or the slab it needed could not be locked.
  std::uint8_t* take(std::size_t size, std::size_t& capacity);
  // A block take() gave, wiped by the caller.
  void give_back(std::uint8_t* block);

  SecretPoolStats stats() const;

 private:
  struct Slab {
    std::size_t block = 0;            // block size; 0: no class (empty or unused)
    std::uint32_t used = 0;           // blocks handed out
    std::vector<std::uint16_t> free;  // indices of blocks not handed out (room for all)
  };

  LockedPool();
  bool reserve();
  // fork(): the child inherits the pool but not its memory locks.
  void relock_in_child();
  // A locked slab with no class: a kept empty one, else an unused one locked now.
  std::optional<std::uint32_t> fresh_slab();
  void release_slab(std::uint32_t slab);  // unlocked, its pages dropped, unused

  mutable std::mutex mutex_;
  std::uint8_t* base_ = nullptr;  // kSlabs * kSlabBytes reserved on first use
  bool reserve_failed_ = false;
  std::optional<std::chrono::steady_clock::time_point> refused_at_;
  std::array<Slab, kSlabs> slabs_{};
  std::array<std::vector<std::uint32_t>, kClasses> partial_{};  // slabs with a free block
  std::vector<std::uint32_t> empty_;                            // locked, nothing in them
  std::vector<std::uint32_t> unused_;                           // not locked, no pages
  SecretPoolStats stats_;
};

}  // namespace otpgate::keys::detail

// SPDX-License-Identifier: LGPL-2.1-or-later
// SecretBytes keeps key material out of swap. Small secrets (keys) come from a pool of
// locked slabs that are reused, so fetching keys by the hundred costs no mlock per key, and
// what the pool keeps locked follows what is in use. Larger secrets lock their own heap
// pages: what they lock stays locked while any secret on the page lives, and is all given
// back when the last one goes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "memlock_limit.hpp"
#include "otpgate/keyclient.hpp"

using otpgate::keys::secret_pool_stats;
using otpgate::keys::SecretBytes;
using otpgate::test::vm_locked_kib;

namespace {

// Whether the page holding `at` is locked: its mapping carries VM_LOCKED ("lo" in smaps).
bool page_locked(const void* at) {
  std::ifstream smaps("/proc/self/smaps");
  const auto address = reinterpret_cast<std::uintptr_t>(at);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long from = 0, to = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &from, &to) == 2) {
      inside = from <= address && address < to;
    } else if (inside && line.starts_with("VmFlags:")) {
      return (line + ' ').find(" lo ") != std::string::npos;
    }
  }
  return false;
}

std::size_t page_bytes() {
  return static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

std::uintptr_t first_page(const SecretBytes& s) {
  return reinterpret_cast<std::uintptr_t>(s.span().data()) / page_bytes();
}
std::uintptr_t last_page(const SecretBytes& s) {
  return (reinterpret_cast<std::uintptr_t>(s.span().data()) + s.size() - 1) / page_bytes();
}

// Above the pool's largest block: these lock their own heap pages.
constexpr std::size_t kHeapSecret = 20u << 10;

// A KME answer's worth of 1 KiB keys (8192-bit keys, 130 to a request).
std::vector<SecretBytes> batch_of_keys() {
  std::vector<SecretBytes> keys;
  for (int i = 0; i < 130; ++i) {
    keys.emplace_back(1024);
    std::memset(keys.back().span().data(), 0xA5, 1024);
  }
  return keys;
}

}  // namespace

// mlock is not counted: one munlock unlocks a page for every secret on it. Two secrets
// sharing a heap page at their edges: freeing the first must leave the second locked.
// Without the per-page count it is swappable from then on.
TEST(SecretBytes, FreeingOneSecretLeavesTheOthersOnItsPageLocked) {
  const std::size_t locked_before = vm_locked_kib();
  std::vector<SecretBytes> secrets;
  for (int i = 0; i < 16; ++i) secrets.emplace_back(kHeapSecret);
  if (!secrets.front().locked()) GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  std::size_t first = 0, second = 0;
  for (std::size_t i = 0; i < secrets.size() && second == 0; ++i) {
    for (std::size_t j = 0; j < secrets.size(); ++j) {
      if (i != j && last_page(secrets[i]) == first_page(secrets[j])) {
        first = i;
        second = j;
        break;
      }
    }
  }
  ASSERT_NE(first, second) << "no two heap secrets share a page";
  const void* survivor = secrets[second].span().data();
  ASSERT_TRUE(page_locked(survivor));
  secrets[first] = SecretBytes();  // freed: wiped, its page locks given back
  EXPECT_TRUE(page_locked(survivor)) << "freeing one secret unlocked another on its page";
  EXPECT_TRUE(secrets[second].locked());
  secrets.clear();
  EXPECT_EQ(vm_locked_kib(), locked_before) << "locked pages left behind by freed secrets";
}

// A large secret spanning many pages, and heap secrets at its edges: the large one's
// pages are unlocked when it goes, the others' stay.
TEST(SecretBytes, ALargeSecretGivesBackItsPagesButNotThoseItShares) {
  const std::size_t locked_before = vm_locked_kib();
  std::vector<SecretBytes> small;
  for (int i = 0; i < 4; ++i) small.emplace_back(kHeapSecret);
  const std::size_t large_kib = 16 * page_bytes() / 1024;
  auto large = std::make_unique<SecretBytes>(large_kib * 1024);
  for (int i = 0; i < 4; ++i) small.emplace_back(kHeapSecret);
  if (!large->locked()) GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  const std::size_t with_large = vm_locked_kib();
  EXPECT_GE(with_large - locked_before, large_kib);
  large.reset();
  for (const SecretBytes& s : small) {
    EXPECT_TRUE(page_locked(s.span().data())) << "a small secret's page was unlocked";
  }
  // At most the two edge pages it shared stay locked.
  EXPECT_LE(vm_locked_kib(), with_large - large_kib + 2 * page_bytes() / 1024)
      << "the large secret's pages stayed locked";
  small.clear();
  EXPECT_EQ(vm_locked_kib(), locked_before);
}

// A refill thread fetches keys by the hundred, copies them into its ring and frees them.
// Each batch reuses the pool's locked slabs: no mlock per key, nor per batch. Without the
// pool each key locked (and unlocked) heap pages of its own.
TEST(SecretBytes, KeysFetchedByTheHundredReuseLockedMemory) {
  {
    auto warm = batch_of_keys();
    if (!std::all_of(warm.begin(), warm.end(), [](const SecretBytes& k) { return k.locked(); }))
      GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  }
  const auto before = secret_pool_stats();
  for (int round = 0; round < 200; ++round) {
    auto keys = batch_of_keys();
    ASSERT_GE(secret_pool_stats().bytes_in_use, before.bytes_in_use + 130 * 1024)
        << "keys not served from the pool";
    for (const SecretBytes& k : keys) ASSERT_TRUE(k.locked());
    ASSERT_TRUE(page_locked(keys.front().span().data()));
    ASSERT_TRUE(page_locked(keys.back().span().data()));
  }
  const auto after = secret_pool_stats();
  EXPECT_EQ(after.slab_locks, before.slab_locks) << "200 batches of 130 keys locked memory again";
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use) << "blocks not given back";
}

// A pool block is wiped when its secret goes, whole (its slack too), before anyone else
// can be handed it: the next secret of its size class gets the same block, all zero.
TEST(SecretBytes, APooledSecretIsWipedWhenItGoes) {
  auto secret = std::make_unique<SecretBytes>(1000);
  if (!secret->locked()) GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  const std::uint8_t* at = secret->span().data();
  std::memset(secret->span().data(), 0x5A, 1000);
  secret->truncate(10);
  EXPECT_TRUE(std::all_of(at + 10, at + 1000, [](std::uint8_t b) { return b == 0; }))
      << "truncate left the dropped tail";
  std::memset(secret->span().data(), 0x5A, 10);
  secret.reset();
  const SecretBytes next(1024);  // the same size class (1 KiB blocks)
  ASSERT_EQ(next.span().data(), at) << "the freed block was not the next one handed out";
  EXPECT_TRUE(std::all_of(at, at + 1024, [](std::uint8_t b) { return b == 0; }))
      << "a freed secret left bytes behind in the pool";
  EXPECT_TRUE(page_locked(next.span().data()));
}

// What the pool keeps locked follows what is in use: 4 MiB of keys freed leave at most
// the few slabs it keeps for the next batch.
TEST(SecretBytes, ThePoolGivesBackWhatIsNoLongerUsed) {
  const std::size_t locked_before = vm_locked_kib();
  const auto before = secret_pool_stats();
  std::vector<SecretBytes> keys;
  for (int i = 0; i < 1024; ++i) keys.emplace_back(4096);
  if (!std::all_of(keys.begin(), keys.end(), [](const SecretBytes& k) { return k.locked(); }))
    GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  EXPECT_GE(secret_pool_stats().bytes_in_use, before.bytes_in_use + 4096u * 1024);
  EXPECT_GE(secret_pool_stats().locked_bytes, 4096u * 1024);
  keys.clear();
  const auto after = secret_pool_stats();
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use);
  // The 4 KiB class's partly used slab (if any) and the kept empty ones.
  EXPECT_LE(after.locked_bytes, before.locked_bytes + 5 * (64u << 10));
  EXPECT_LE(vm_locked_kib(), locked_before + 5 * 64) << "freed keys' slabs stayed locked";
}

// Held to RLIMIT_MEMLOCK with nothing left to lock, secrets still work: unlocked (and
// say so), as before the pool, and the refusal is counted. A forked child does not
// inherit memory locks: the pool locks its slabs again, so that a key made before the
// fork is still locked in the child, as it says.
TEST(SecretBytes, AtTheMemoryLockLimitSecretsAreUnlockedNotRefused) {
  const SecretBytes made_before_fork(1024);
  if (!made_before_fork.locked()) GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  const std::uint8_t* inherited = made_before_fork.span().data();
  RUN_WITH_MEMLOCK_LIMIT(0, [inherited] {
    std::string problems;
    if (!page_locked(inherited))
      problems += "a key made before the fork is unlocked in the child; ";
    const auto refusals = secret_pool_stats().lock_refusals;
    std::vector<SecretBytes> keys;
    // Past what slabs the pool may hold already (kept ones are reused first).
    for (int i = 0; i < 600; ++i) keys.emplace_back(16u << 10);
    std::memset(keys.back().span().data(), 1, keys.back().size());
    if (keys.back().locked()) problems += "a secret says it is locked past the limit; ";
    // Every secret says the truth, those from slabs locked before the fork included.
    for (const SecretBytes& k : keys) {
      if (page_locked(k.span().data()) != k.locked()) {
        problems += "a secret's locked() disagrees with its page; ";
        break;
      }
    }
    if (secret_pool_stats().lock_refusals == refusals) problems += "no refusal counted; ";
    return problems;
  });
}

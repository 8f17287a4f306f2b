// SPDX-License-Identifier: LGPL-2.1-or-later
// SecretBytes keeps key material out of swap: what it locks stays locked while any secret
// on the page lives, and is all given back when the last one goes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "otpgate/keyclient.hpp"

using otpgate::keys::SecretBytes;

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

std::size_t vm_locked_kib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with("VmLck:")) return std::stoul(line.substr(6));
  }
  return 0;
}

std::size_t page_bytes() {
  return static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

std::uintptr_t page_of(const SecretBytes& s) {
  return reinterpret_cast<std::uintptr_t>(s.span().data()) / page_bytes();
}

}  // namespace

// mlock is not counted: one munlock unlocks a page for every secret on it. Two keys on one
// heap page: freeing the first must leave the second locked. Without the per-page count it
// is swappable from then on.
TEST(SecretBytes, FreeingOneSecretLeavesTheOthersOnItsPageLocked) {
  const std::size_t locked_before = vm_locked_kib();
  std::vector<SecretBytes> secrets;
  for (int i = 0; i < 64; ++i) secrets.emplace_back(48);
  if (!secrets.front().locked()) GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  std::size_t first = 0, second = 0;
  for (std::size_t i = 0; i < secrets.size() && second == 0; ++i) {
    for (std::size_t j = i + 1; j < secrets.size(); ++j) {
      if (page_of(secrets[i]) == page_of(secrets[j])) {
        first = i;
        second = j;
        break;
      }
    }
  }
  ASSERT_NE(second, 0u) << "no two 48-byte secrets on one page";
  const void* survivor = secrets[second].span().data();
  ASSERT_TRUE(page_locked(survivor));
  secrets[first] = SecretBytes();  // freed: wiped, its page lock given back
  EXPECT_TRUE(page_locked(survivor)) << "freeing one secret unlocked another on its page";
  EXPECT_TRUE(secrets[second].locked());
  secrets.clear();
  EXPECT_EQ(vm_locked_kib(), locked_before) << "locked pages left behind by freed secrets";
}

// A large secret spanning many pages, and small ones at its edges: the large one's pages
// are unlocked when it goes, the small ones' stay.
TEST(SecretBytes, ALargeSecretGivesBackItsPagesButNotThoseItShares) {
  const std::size_t locked_before = vm_locked_kib();
  std::vector<SecretBytes> small;
  for (int i = 0; i < 16; ++i) small.emplace_back(32);
  // 16 pages (64 KiB with 4 KiB pages: from the heap, beside the small ones).
  const std::size_t large_kib = 16 * page_bytes() / 1024;
  auto large = std::make_unique<SecretBytes>(large_kib * 1024);
  for (int i = 0; i < 16; ++i) small.emplace_back(32);
  if (!large->locked()) GTEST_SKIP() << "mlock is not allowed here (RLIMIT_MEMLOCK)";
  EXPECT_GE(vm_locked_kib() - locked_before, large_kib);
  large.reset();
  for (const SecretBytes& s : small) {
    EXPECT_TRUE(page_locked(s.span().data())) << "a small secret's page was unlocked";
  }
  EXPECT_LT(vm_locked_kib() - locked_before, large_kib) << "the large secret's pages stayed locked";
  small.clear();
  EXPECT_EQ(vm_locked_kib(), locked_before);
}

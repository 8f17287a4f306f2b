// SPDX-License-Identifier: LGPL-2.1-or-later
// The receiver's pad window and the secret arena under it: a window costs the pad placed
// in it (RAM, locking, wiping), every byte that ever held pad is wiped, and no pad byte
// is handed out twice.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "otpgate/keyclient.hpp"
#include "otpgate/otp_wire.hpp"
#include "pad_window.hpp"

using namespace otpgate;
using Bytes = std::vector<std::uint8_t>;

namespace {

// Anonymous resident memory of this process, in KiB (/proc/self/status RssAnon).
std::size_t rss_anon_kib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("RssAnon:", 0) == 0) return std::stoul(line.substr(8));
  }
  return 0;
}

Bytes pattern(std::size_t n, std::uint8_t seed) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>(seed + i * 7 + 1) | 1;
  return b;
}

Bytes read(const keys::SecretArena& arena, std::size_t at, std::size_t n) {
  Bytes b(n);
  arena.read(at, b);
  return b;
}

bool all_zero(const Bytes& b) {
  return std::all_of(b.begin(), b.end(), [](std::uint8_t x) { return x == 0; });
}

}  // namespace

TEST(SecretArena, WipeAllZeroesEveryWrittenByteWhereverItWas) {
  keys::SecretArena arena(1u << 20);
  EXPECT_TRUE(all_zero(read(arena, 0, arena.size())));
  // Within one block, across a block boundary, at both ends, and overlapping writes.
  const std::vector<std::pair<std::size_t, std::size_t>> writes = {
      {100, 50}, {4090, 20}, {0, 1}, {(1u << 20) - 7, 7}, {70000, 9000}, {70500, 100}};
  for (auto [at, n] : writes) arena.write(at, pattern(n, static_cast<std::uint8_t>(at)));
  for (auto [at, n] : writes) EXPECT_FALSE(all_zero(read(arena, at, n))) << at;
  arena.wipe_all();
  EXPECT_TRUE(all_zero(read(arena, 0, arena.size())));
}

TEST(SecretArena, CountsTheBlocksWrittenAndWipesOnlyTheRangeAsked) {
  keys::SecretArena arena(1u << 20);
  arena.write(4090, pattern(20, 3));  // blocks 0 and 1
  arena.write(8192 * 10, pattern(1, 4));
  arena.write(8192 * 10 + 5, pattern(1, 5));  // the same block again
  EXPECT_EQ(arena.written_bytes(), 3 * keys::SecretArena::kBlockBytes);
  arena.wipe(4095, 10);  // the middle of the first write, straddling blocks 0 and 1
  const Bytes got = read(arena, 4090, 20);
  const Bytes want = pattern(20, 3);
  for (std::size_t i = 0; i < 20; ++i) {
    EXPECT_EQ(got[i], i >= 5 && i < 15 ? 0 : want[i]) << i;
  }
  arena.wipe(0, arena.size());  // unwritten blocks in between are skipped, not faulted in
  EXPECT_TRUE(all_zero(read(arena, 0, arena.size())));
  EXPECT_EQ(arena.written_bytes(), 3 * keys::SecretArena::kBlockBytes);
}

TEST(SecretArena, RefusesRangesOutsideAndMovesOwnership) {
  keys::SecretArena arena(10000);
  EXPECT_THROW(arena.write(9999, pattern(2, 0)), std::out_of_range);
  EXPECT_THROW(arena.wipe(10001, 0), std::out_of_range);
  Bytes out(1);
  EXPECT_THROW(arena.read(SIZE_MAX, out), std::out_of_range);
  arena.write(9000, pattern(1000, 9));
  keys::SecretArena moved(std::move(arena));
  EXPECT_EQ(arena.size(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(arena.written_bytes(), 0u);
  EXPECT_EQ(read(moved, 9000, 1000), pattern(1000, 9));
  EXPECT_EQ(moved.written_bytes(), keys::SecretArena::kBlockBytes);  // 9000-9999: block 2
}

TEST(SecretArena, AnUnwrittenArenaTakesNoMemory) {
  // Locked on fault: 256 MiB reserved, a few KiB written; mlock() of the whole would have
  // made all of it resident.
  const std::size_t before = rss_anon_kib();
  keys::SecretArena arena(256u << 20);
  arena.write(123456789, pattern(5000, 1));
  const std::size_t after = rss_anon_kib();
  EXPECT_LT(after, before + 4096) << "RssAnon " << before << " -> " << after << " KiB";
  EXPECT_EQ(read(arena, 123456789, 5000), pattern(5000, 1));
}

TEST(PadWindow, ASixteenMebibyteWindowCostsThePadPlacedInIt) {
  const std::size_t before = rss_anon_kib();
  otp::PadWindow window(16u << 20);
  // A lane's pad stream far along (the window jumps there, wiping nothing it never held).
  const std::uint64_t at = 5'000'000'000ull;
  window.place(at, pattern(32768, 2));
  window.place(at + 32768, pattern(32768, 3));
  EXPECT_EQ(window.touched_bytes(), 65536u + keys::SecretArena::kBlockBytes);  // not aligned
  EXPECT_TRUE(window.all_present(at, 65536));
  EXPECT_LT(rss_anon_kib(), before + 4096);
}

TEST(PadWindow, ConsumedPadIsWipedAndNeverServesAgainEvenIfPlacedAgain) {
  otp::PadWindow window(otp::kEpochBytes);
  const Bytes key = pattern(1000, 7);
  window.place(1000, key);
  window.consume(1100, 200);
  Bytes out(1000);
  window.copy_out(1000, 1000, out.data());
  for (std::size_t i = 0; i < 1000; ++i) {
    EXPECT_EQ(out[i], i >= 100 && i < 300 ? 0 : key[i]) << i;
  }
  EXPECT_TRUE(window.any_used(1100, 1));
  EXPECT_TRUE(window.any_used(1299, 1));
  EXPECT_FALSE(window.any_used(1000, 100));
  EXPECT_FALSE(window.any_used(1300, 700));
  // The same key delivered and placed again (a repeated announcement, a resent key):
  // the used bytes stay used and wiped, the others are simply present.
  window.place(1000, key);
  EXPECT_TRUE(window.any_used(1100, 200));
  window.copy_out(1000, 1000, out.data());
  for (std::size_t i = 100; i < 300; ++i) EXPECT_EQ(out[i], 0) << i;
  EXPECT_EQ(out[99], key[99]);
  EXPECT_EQ(out[300], key[300]);
}

TEST(PadWindow, MovingOnWipesWhatItLeavesAndASlotServesItsNewPadOnly) {
  const std::size_t size = otp::kEpochBytes;
  otp::PadWindow window(size);
  window.place(0, pattern(size, 1));
  window.consume(0, 16);
  // Pad at [size, size + 4096) lands in the slots of [0, 4096): the window moves on.
  window.place(size, pattern(4096, 2));
  EXPECT_EQ(window.base(), 4096u);
  EXPECT_FALSE(window.in_range(0, 16));  // below the window: its key is gone
  EXPECT_TRUE(window.all_present(size, 4096));
  EXPECT_FALSE(window.any_used(size, 4096));  // the slot's old "used" does not carry over
  Bytes out(4096);
  window.copy_out(size, 4096, out.data());
  EXPECT_EQ(out, pattern(4096, 2));
  // Far ahead: everything held is wiped, the bitmaps start empty.
  window.place(100 * size, pattern(100, 3));
  EXPECT_EQ(window.base(), 100 * size + 100 - size);
  EXPECT_FALSE(window.all_present(99 * size + 200, 1));
  Bytes rest(size - 100);
  window.copy_out(100 * size + 100 - size, size - 100, rest.data());
  EXPECT_TRUE(all_zero(rest));  // the old pad in every other slot was wiped
  EXPECT_EQ(window.touched_bytes(), size);
}

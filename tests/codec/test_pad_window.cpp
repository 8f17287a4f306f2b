// SPDX-License-Identifier: LGPL-2.1-or-later
// The receiver's pad window and the secret arena under it: a window costs the pad placed
// in it (RAM, locking, wiping), every byte that ever held pad is wiped, no pad byte is
// handed out twice, and pad is never held in memory that is not locked: at the memory
// lock limit it is dropped and the drop is counted.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "memlock_limit.hpp"
#include "memory_pad.hpp"
#include "otpgate/keyclient.hpp"
#include "otpgate/otp_codec.hpp"
#include "otpgate/otp_wire.hpp"
#include "pad_window.hpp"

using namespace otpgate;
using Bytes = std::vector<std::uint8_t>;
using otpgate::test::vm_locked_kib;

namespace {

// Anonymous resident memory of this process, in KiB (/proc/self/status RssAnon).
std::size_t rss_anon_kib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("RssAnon:", 0) == 0) return std::stoul(line.substr(8));
  }
  // Without the field every check on it would pass whatever the arena did.
  throw std::runtime_error("/proc/self/status has no RssAnon line");
}

// "" when `ok`, else `what` (for the child's report).
std::string expect(bool ok, const std::string& what) {
  return ok ? "" : what + "; ";
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
  for (auto [at, n] : writes)
    EXPECT_TRUE(arena.write(at, pattern(n, static_cast<std::uint8_t>(at))));
  for (auto [at, n] : writes) EXPECT_FALSE(all_zero(read(arena, at, n))) << at;
  arena.wipe_all();
  EXPECT_TRUE(all_zero(read(arena, 0, arena.size())));
}

TEST(SecretArena, CountsTheBlocksWrittenAndWipesOnlyTheRangeAsked) {
  keys::SecretArena arena(1u << 20);
  EXPECT_TRUE(arena.write(4090, pattern(20, 3)));  // blocks 0 and 1
  EXPECT_TRUE(arena.write(8192 * 10, pattern(1, 4)));
  EXPECT_TRUE(arena.write(8192 * 10 + 5, pattern(1, 5)));  // the same block again
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
  EXPECT_THROW((void)arena.write(9999, pattern(2, 0)), std::out_of_range);
  EXPECT_THROW(arena.wipe(10001, 0), std::out_of_range);
  Bytes out(1);
  EXPECT_THROW(arena.read(SIZE_MAX, out), std::out_of_range);
  EXPECT_TRUE(arena.write(9000, pattern(1000, 9)));
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
  EXPECT_TRUE(arena.write(123456789, pattern(5000, 1)));
  const std::size_t after = rss_anon_kib();
  EXPECT_LT(after, before + 4096) << "RssAnon " << before << " -> " << after << " KiB";
  EXPECT_EQ(read(arena, 123456789, 5000), pattern(5000, 1));
}

TEST(PadWindow, ASixteenMebibyteWindowCostsThePadPlacedInIt) {
  const std::size_t before = rss_anon_kib();
  otp::PadWindow window(16u << 20);
  // A lane's pad stream far along (the window jumps there, wiping nothing it never held).
  const std::uint64_t at = 5'000'000'000ull;
  EXPECT_TRUE(window.place(at, pattern(32768, 2)));
  EXPECT_TRUE(window.place(at + 32768, pattern(32768, 3)));
  EXPECT_EQ(window.touched_bytes(), 65536u + keys::SecretArena::kBlockBytes);  // not aligned
  EXPECT_TRUE(window.all_present(at, 65536));
  EXPECT_LT(rss_anon_kib(), before + 4096);
}

TEST(PadWindow, ConsumedPadIsWipedAndNeverServesAgainEvenIfPlacedAgain) {
  otp::PadWindow window(otp::kEpochBytes);
  const Bytes key = pattern(1000, 7);
  EXPECT_TRUE(window.place(1000, key));
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
  EXPECT_TRUE(window.place(1000, key));
  EXPECT_TRUE(window.any_used(1100, 200));
  window.copy_out(1000, 1000, out.data());
  for (std::size_t i = 100; i < 300; ++i) EXPECT_EQ(out[i], 0) << i;
  EXPECT_EQ(out[99], key[99]);
  EXPECT_EQ(out[300], key[300]);
}

TEST(PadWindow, MovingOnWipesWhatItLeavesAndASlotServesItsNewPadOnly) {
  const std::size_t size = otp::kEpochBytes;
  otp::PadWindow window(size);
  EXPECT_TRUE(window.place(0, pattern(size, 1)));
  window.consume(0, 16);
  // Pad at [size, size + 4096) lands in the slots of [0, 4096): the window moves on.
  EXPECT_TRUE(window.place(size, pattern(4096, 2)));
  EXPECT_EQ(window.base(), 4096u);
  EXPECT_FALSE(window.in_range(0, 16));  // below the window: its key is gone
  EXPECT_TRUE(window.all_present(size, 4096));
  EXPECT_FALSE(window.any_used(size, 4096));  // the slot's old "used" does not carry over
  Bytes out(4096);
  window.copy_out(size, 4096, out.data());
  EXPECT_EQ(out, pattern(4096, 2));
  // Far ahead: everything held is wiped, the bitmaps start empty.
  EXPECT_TRUE(window.place(100 * size, pattern(100, 3)));
  EXPECT_EQ(window.base(), 100 * size + 100 - size);
  EXPECT_FALSE(window.all_present(99 * size + 200, 1));
  Bytes rest(size - 100);
  window.copy_out(100 * size + 100 - size, size - 100, rest.data());
  EXPECT_TRUE(all_zero(rest));  // the old pad in every other slot was wiped
  // ... and given back: only the block of the 100 bytes just placed is locked.
  EXPECT_EQ(window.touched_bytes(), keys::SecretArena::kBlockBytes);
}

// At the memory lock limit an arena refuses to write rather than put secret bytes in
// memory that is not locked; locked blocks keep taking writes. Without the fix (one
// mlock2 of the whole range, failing quietly) the 16 MiB arena locks nothing yet takes
// every write: VmLck stays 0 and the write past the limit lands.
TEST(SecretArenaMemoryLock, WritesOnlyIntoBlocksItLockedAndRefusesPastTheLimit) {
  RUN_WITH_MEMLOCK_LIMIT(256u << 10, [] {
    std::string problems;
    const std::size_t locked_before = vm_locked_kib();
    keys::SecretArena arena(16u << 20);
    const std::size_t block = keys::SecretArena::kBlockBytes;
    std::size_t blocks = 0;
    for (; blocks < 4000; ++blocks) {
      if (!arena.write(blocks * block, pattern(block, static_cast<std::uint8_t>(blocks)))) break;
    }
    problems += expect(blocks == 64, "blocks written " + std::to_string(blocks) + ", not 64");
    problems += expect(vm_locked_kib() - locked_before == blocks * 4,
                       "VmLck grew by " + std::to_string(vm_locked_kib() - locked_before) +
                           " KiB for " + std::to_string(blocks) + " blocks");
    problems += expect(arena.lock_failures() == 1, "lock_failures not 1");
    problems += expect(arena.written_bytes() == blocks * block, "written_bytes");
    // The refused write left its block untouched (and unlocked).
    problems += expect(all_zero(read(arena, blocks * block, block)), "refused bytes written");
    // A write reaching from a locked block into an unlockable one writes nothing at all.
    problems += expect(!arena.write(blocks * block - 10, pattern(20, 9)), "straddling write");
    const Bytes last = pattern(block, static_cast<std::uint8_t>(blocks - 1));
    problems += expect(read(arena, blocks * block - 10, 10) == Bytes(last.end() - 10, last.end()),
                       "a refused write changed a locked block");
    // Locked blocks take writes still.
    problems += expect(arena.write(5, pattern(100, 4)) && read(arena, 5, 100) == pattern(100, 4),
                       "a locked block refused a write");
    arena.wipe_all();
    problems += expect(all_zero(read(arena, 0, blocks * block)), "wipe_all");
    return problems;
  });
}

// Locked memory is given back at destruction: a window that is gone frees the limit for
// the next (a call ending makes room for the next call). Without the fix nothing is
// locked at all (VmLck does not grow).
TEST(SecretArenaMemoryLock, DestructionUnlocksForTheNextArena) {
  RUN_WITH_MEMLOCK_LIMIT(256u << 10, [] {
    std::string problems;
    const std::size_t locked_before = vm_locked_kib();
    for (int round = 0; round < 3; ++round) {
      keys::SecretArena arena(16u << 20);
      problems += expect(arena.write(0, pattern(200u << 10, 1)), "round " + std::to_string(round));
      problems += expect(vm_locked_kib() - locked_before == 200,
                         "round " + std::to_string(round) + ": VmLck grew by " +
                             std::to_string(vm_locked_kib() - locked_before) + " KiB, not 200");
    }
    problems += expect(vm_locked_kib() == locked_before, "VmLck not back after destruction");
    return problems;
  });
}

// The case the packaged unit meets: several 16 MiB windows, each with little pad, within
// a limit far below their size. Without the fix each window's mlock2 of 16 MiB fails
// against the 8 MiB limit and its pad sits in memory that can be swapped (VmLck 0).
TEST(PadWindowMemoryLock, ThreeSixteenMebibyteWindowsWithLittlePadFitAnEightMebibyteLimit) {
  RUN_WITH_MEMLOCK_LIMIT(8u << 20, [] {
    std::string problems;
    const std::size_t locked_before = vm_locked_kib();
    std::vector<std::unique_ptr<otp::PadWindow>> windows;
    for (int i = 0; i < 3; ++i) {
      windows.push_back(std::make_unique<otp::PadWindow>(16u << 20));
      const std::uint64_t at = 1'000'000'000ull * std::uint64_t(i + 1);
      problems += expect(windows.back()->place(at, pattern(65536, std::uint8_t(i))),
                         "window " + std::to_string(i) + " refused its pad");
      problems += expect(windows.back()->all_present(at, 65536), "pad not present");
    }
    const std::size_t grew = vm_locked_kib() - locked_before;
    // 64 KiB at an unaligned offset: 17 blocks each.
    problems += expect(grew == 3 * 17 * 4, "VmLck grew by " + std::to_string(grew) + " KiB");
    return problems;
  });
}

// Pad whose block cannot be locked is not held: place() says so, the bytes stay absent
// (so no unit can use them) and were never written; the pad it could lock is all there.
TEST(PadWindowMemoryLock, PadItCannotLockIsDroppedNotHeld) {
  RUN_WITH_MEMLOCK_LIMIT(256u << 10, [] {
    std::string problems;
    otp::PadWindow window(16u << 20);
    const std::uint64_t at = 7 * otp::kEpochBytes;
    problems += expect(window.place(at, pattern(192u << 10, 1)), "the first 192 KiB refused");
    problems += expect(!window.place(at + (192u << 10), pattern(128u << 10, 2)),
                       "pad past the limit was reported held");
    problems += expect(window.all_present(at, 192u << 10), "the held pad is not present");
    // The run that reached past the limit is absent as a whole: its first 64 KiB could be
    // locked, but place() writes in runs and refuses a run it cannot lock entirely.
    problems += expect(!window.all_present(at + (256u << 10), 1), "unlocked pad present");
    problems += expect(window.touched_bytes() <= (256u << 10),
                       "touched " + std::to_string(window.touched_bytes()));
    Bytes out(64u << 10);
    window.copy_out(at + (256u << 10), out.size(), out.data());
    problems += expect(all_zero(out), "bytes past the limit were written");
    return problems;
  });
}

// End to end: a receiver at its memory lock limit counts the keys it could not hold and
// refuses the units on them (no_key), never decrypting from unlocked memory; the units
// on pad it could lock decrypt. Without the fix every unit decrypts and nothing is
// counted, the pad living in memory that can be swapped.
TEST(DecoderMemoryLock, KeysItCannotLockAreCountedAndTheirUnitsRefused) {
  RUN_WITH_MEMLOCK_LIMIT(128u << 10, [] {
    std::string problems;
    otpgate::testing::MemoryPad tx(0, 4u << 20, 1024), rx(0, 4u << 20, 1024);
    tx.fill_for_sending();
    otp::Encoder encoder(tx, 42);
    otp::Decoder decoder(rx);
    std::size_t opened = 0, refused = 0, opened_after_refusal = 0;
    Bytes buf(otp::kMaxAnnouncementBytes), out(2048), plain(2048);
    for (std::uint16_t seq = 0; seq < 400; ++seq) {
      while (std::size_t n = encoder.next_announcement(buf, true)) {
        std::size_t written = 0;
        decoder.open_datagram({buf.data(), n}, plain, written);
      }
      Bytes packet(12 + 1000, static_cast<std::uint8_t>(seq));
      packet[0] = 0x80;
      packet[1] = 96;
      packet[2] = static_cast<std::uint8_t>(seq >> 8);
      packet[3] = static_cast<std::uint8_t>(seq);
      std::size_t written = 0;
      if (encoder.protect_datagram(packet, out, written) != otp::Encoder::Status::ok) {
        return problems + "the encoder ran out of pad";
      }
      std::size_t opened_bytes = 0;
      const auto v = decoder.open_datagram({out.data(), written}, plain, opened_bytes);
      if (v == otp::Decoder::Verdict::plaintext) {
        ++opened;
        if (refused > 0) ++opened_after_refusal;
        problems +=
            expect(Bytes(plain.begin(), plain.begin() + opened_bytes) == packet, "wrong plaintext");
      } else {
        problems += expect(v == otp::Decoder::Verdict::no_key, "a verdict other than no_key");
        ++refused;
      }
    }
    const auto& s = decoder.stats();
    // 128 KiB of headroom, less what the decoder's scratch and the small secrets' locked
    // pool (a 64 KiB slab) take: a few dozen units.
    problems += expect(opened >= 32 && opened <= 128, "opened " + std::to_string(opened));
    problems += expect(refused == 400 - opened, "refused " + std::to_string(refused));
    problems += expect(opened_after_refusal == 0, "a unit decrypted after the limit");
    problems += expect(s.memory_lock_failures >= refused * 1000 / 1024,
                       "memory_lock_failures " + std::to_string(s.memory_lock_failures));
    return problems;
  });
}

// discard() gives blocks back: wiped whole, unlocked (VmLck falls, the limit has room
// again), reading as zero, and locked again by the next write. A block the range covers
// only in part is wiped there but stays locked with the rest of its bytes. Without it
// (a wipe that keeps the blocks locked) VmLck stays at 64 blocks and the writes into
// other blocks are refused at the limit.
TEST(SecretArenaMemoryLock, DiscardedBlocksAreWipedUnlockedAndLockedAgainWhenWritten) {
  RUN_WITH_MEMLOCK_LIMIT(256u << 10, [] {
    std::string problems;
    const std::size_t locked_before = vm_locked_kib();
    const std::size_t block = keys::SecretArena::kBlockBytes;
    keys::SecretArena arena(16u << 20);
    for (std::size_t b = 0; b < 64; ++b) {
      problems += expect(arena.write(b * block, pattern(block, std::uint8_t(b))), "first writes");
    }
    problems += expect(!arena.write(64 * block, pattern(1, 1)), "the limit is not reached");
    // [100, 100 + 32 blocks): blocks 1..31 wholly, blocks 0 and 32 in part.
    arena.discard(100, 32 * block);
    problems += expect(arena.written_bytes() == 33 * block,
                       "written_bytes " + std::to_string(arena.written_bytes()));
    problems += expect(
        vm_locked_kib() - locked_before == 33 * 4,
        "VmLck grew by " + std::to_string(vm_locked_kib() - locked_before) + " KiB, not 132");
    problems += expect(all_zero(read(arena, 100, 32 * block)), "the range not wiped");
    const Bytes first = pattern(block, 0), last = pattern(block, 32);
    problems += expect(read(arena, 0, 100) == Bytes(first.begin(), first.begin() + 100),
                       "block 0 lost what lay before the range");
    problems +=
        expect(read(arena, 32 * block + 100, block - 100) == Bytes(last.begin() + 100, last.end()),
               "block 32 lost what lay after the range");
    // The limit has room for 31 blocks again, anywhere (a discarded block included).
    for (std::size_t b = 64; b < 94; ++b) {
      problems += expect(arena.write(b * block, pattern(block, 7)), "block " + std::to_string(b));
    }
    problems += expect(arena.write(5 * block + 1, pattern(10, 8)), "a discarded block refused");
    problems += expect(read(arena, 5 * block + 1, 10) == pattern(10, 8), "rewritten bytes");
    problems += expect(!arena.write(94 * block, pattern(1, 1)), "past the limit taken");
    problems += expect(vm_locked_kib() - locked_before == 64 * 4, "VmLck not back at 64 blocks");
    // The whole arena: every block given back.
    arena.discard(0, arena.size());
    problems += expect(arena.written_bytes() == 0 && vm_locked_kib() == locked_before,
                       "VmLck " + std::to_string(vm_locked_kib() - locked_before) +
                           " KiB above the start after discarding all");
    return problems;
  });
}

namespace {

// Locked KiB above `base`, and the most seen (for the child's report).
struct LockWatch {
  std::size_t base = vm_locked_kib(), most = 0;
  std::size_t now() {
    const std::size_t grown = vm_locked_kib() - base;
    most = std::max(most, grown);
    return grown;
  }
};

}  // namespace

// A long call: the receiver's pad stream runs through its 16 MiB window four times, pad
// placed 256 KiB ahead of the units that consume it, one unit in 500 lost (its pad never
// consumed, so given back only when the window moves past it). Under a 1 MiB limit every
// key is held and every unit finds its pad, and locked memory stays about the live pad.
// Without giving blocks back the window's locked memory only grows: place() fails once
// 1 MiB of the stream has gone through (and every unit after that has no key).
TEST(PadWindowMemoryLock, ALongStreamCyclesThroughItsWindowWithinALimitFarBelowIt) {
  RUN_WITH_MEMLOCK_LIMIT(1u << 20, [] {
    std::string problems;
    LockWatch locked;
    const std::size_t size = 16u << 20, key = 32u << 10, unit = 1000, ahead = 256u << 10;
    otp::PadWindow window(size);
    const std::uint64_t start = 3'000'000'000ull;  // a lane far along its stream
    std::uint64_t placed = start, used = start;
    std::size_t refused = 0, missing = 0, units = 0;
    while (used < start + 4 * size) {
      while (placed < used + ahead) {
        if (!window.place(placed, pattern(key, std::uint8_t(placed / key)))) ++refused;
        placed += key;
      }
      if (units++ % 500 != 499) {
        if (!window.all_present(used, unit) || window.any_used(used, unit)) {
          ++missing;
        } else {
          window.consume(used, unit);
        }
      }
      used += unit;
      locked.now();
    }
    problems += expect(refused == 0, std::to_string(refused) + " keys refused");
    problems += expect(missing == 0, std::to_string(missing) + " units without pad");
    // Live: 256 KiB ahead, plus a block per lost unit the window has not moved past yet
    // (some 34 in 16 MiB), plus the blocks at either edge.
    problems += expect(locked.most <= 512, "VmLck grew by up to " + std::to_string(locked.most) +
                                               " KiB, not the live pad's ~400");
    problems += expect(window.touched_bytes() <= (512u << 10),
                       "touched " + std::to_string(window.touched_bytes()));
    // Jumping far ahead moves past everything: back at the baseline but the new block.
    problems += expect(window.place(placed + 2 * size, pattern(100, 1)), "the jump refused");
    problems += expect(locked.now() == 4, "VmLck " + std::to_string(locked.now()) +
                                              " KiB above the start after the jump, not 4");
    return problems;
  });
}

// Pad that is never consumed (a sender whose units are lost, a lane's look-ahead) is
// given back when the window moves past it: a 4 KiB key every 260 KiB (so each lap puts
// pad in other blocks), four laps of the window, stays at the 63 blocks one window's
// worth holds. Without giving blocks back the 512 KiB limit runs out in the third lap
// and place() fails.
TEST(PadWindowMemoryLock, PadTheWindowMovesPastIsGivenBackUnconsumed) {
  RUN_WITH_MEMLOCK_LIMIT(512u << 10, [] {
    std::string problems;
    LockWatch locked;
    const std::size_t size = 16u << 20, stride = 260u << 10, block = 4096;
    otp::PadWindow window(size);
    std::size_t refused = 0;
    std::uint64_t last = 0;
    for (std::uint64_t at = 0; at < 4 * size; at += stride) {
      if (!window.place(at, pattern(block, std::uint8_t(at / stride)))) ++refused;
      last = at;
      locked.now();
    }
    problems += expect(refused == 0, std::to_string(refused) + " keys refused");
    problems += expect(locked.most <= 64 * 4,
                       "VmLck grew by up to " + std::to_string(locked.most) + " KiB");
    problems += expect(window.all_present(last, block), "the last key");
    problems += expect(!window.in_range(last - size, block), "not moved past");
    return problems;
  });
}

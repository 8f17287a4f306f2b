// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "otpgate/keyclient.hpp"

using otpgate::keys::KeyId;
using otpgate::keys::KeyRing;

namespace {

// Deterministic "key" byte for a pad offset, so the consumer can check every byte.
std::uint8_t byte_at(std::uint64_t offset) {
  return static_cast<std::uint8_t>((offset * 2654435761u) >> 13);
}

std::vector<std::uint8_t> key_bytes(std::uint64_t offset, std::size_t length) {
  std::vector<std::uint8_t> bytes(length);
  for (std::size_t i = 0; i < length; ++i) bytes[i] = byte_at(offset + i);
  return bytes;
}

KeyId id_for(std::uint32_t n) {
  std::array<std::uint8_t, 16> b{};
  std::memcpy(b.data(), &n, sizeof n);
  return KeyId(b);
}

}  // namespace

TEST(KeyId, ParsesAndPrintsCanonicalUuids) {
  const auto id = KeyId::parse("BC490419-7D60-487F-ADC1-4DDCC177C139");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->to_string(), "bc490419-7d60-487f-adc1-4ddcc177c139");
  EXPECT_EQ(id->bytes()[0], 0xbc);
  EXPECT_EQ(id->bytes()[15], 0x39);
  EXPECT_FALSE(KeyId::parse("bc490419-7d60-487f-adc1-4ddcc177c13"));
  EXPECT_FALSE(KeyId::parse("bc490419x7d60-487f-adc1-4ddcc177c139"));
  EXPECT_FALSE(KeyId::parse("zc490419-7d60-487f-adc1-4ddcc177c139"));
  EXPECT_FALSE(KeyId::parse(""));
}

TEST(KeyRing, TakeSpansSegmentsAndReportsTheFirstOffset) {
  KeyRing ring(4, 32);
  ASSERT_TRUE(ring.push(1000, id_for(1), key_bytes(1000, 32)));
  ASSERT_TRUE(ring.push(1032, id_for(2), key_bytes(1032, 20)));
  EXPECT_EQ(ring.bytes_available(), 52u);

  std::vector<std::uint8_t> out(40);
  const auto offset = ring.take(out);
  ASSERT_TRUE(offset);
  EXPECT_EQ(*offset, 1000u);
  EXPECT_EQ(out, key_bytes(1000, 40));
  EXPECT_EQ(ring.bytes_available(), 12u);
  EXPECT_EQ(ring.bytes_consumed(), 40u);

  std::vector<std::uint8_t> rest(12);
  ASSERT_EQ(ring.take(rest), std::optional<std::uint64_t>(1040));
  EXPECT_EQ(rest, key_bytes(1040, 12));
  EXPECT_EQ(ring.bytes_available(), 0u);
}

TEST(KeyRing, TakeOfMoreThanAvailableConsumesNothing) {
  KeyRing ring(2, 16);
  ASSERT_TRUE(ring.push(0, id_for(1), key_bytes(0, 16)));
  std::vector<std::uint8_t> out(17);
  EXPECT_FALSE(ring.take(out));
  EXPECT_EQ(ring.bytes_available(), 16u);
  std::vector<std::uint8_t> exact(16);
  EXPECT_EQ(ring.take(exact), std::optional<std::uint64_t>(0));
  EXPECT_EQ(exact, key_bytes(0, 16));
}

TEST(KeyRing, RefusesWhenFullOrKeyTooLarge) {
  KeyRing ring(2, 16);
  EXPECT_FALSE(ring.push(0, id_for(1), key_bytes(0, 17)));
  EXPECT_TRUE(ring.push(0, id_for(1), key_bytes(0, 16)));
  EXPECT_TRUE(ring.push(16, id_for(2), key_bytes(16, 16)));
  EXPECT_EQ(ring.free_slots(), 0u);
  EXPECT_FALSE(ring.push(32, id_for(3), key_bytes(32, 16)));
  std::vector<std::uint8_t> out(16);
  ASSERT_TRUE(ring.take(out));
  // The slot comes back once the consumer moves past it.
  ASSERT_TRUE(ring.take(std::span(out).first(1)));
  EXPECT_EQ(ring.free_slots(), 1u);
  EXPECT_TRUE(ring.push(32, id_for(3), key_bytes(32, 16)));
}

TEST(KeyRing, ReleasedSegmentsAreWipedInPlace) {
  KeyRing ring(2, 64);
  ASSERT_TRUE(ring.push(64, id_for(7), key_bytes(64, 48)));
  auto segment = ring.pop_segment();
  ASSERT_TRUE(segment);
  EXPECT_EQ(segment->offset, 64u);
  EXPECT_EQ(segment->key_id, id_for(7));
  ASSERT_EQ(segment->bytes.size(), 48u);
  EXPECT_TRUE(std::equal(segment->bytes.begin(), segment->bytes.end(), key_bytes(64, 48).begin()));
  const std::span<std::uint8_t> memory = segment->bytes;  // still points into the ring's arena
  ring.release(*segment);
  EXPECT_TRUE(std::all_of(memory.begin(), memory.end(), [](std::uint8_t b) { return b == 0; }));
  EXPECT_EQ(ring.bytes_consumed(), 48u);
  EXPECT_EQ(ring.free_slots(), 2u);
}

TEST(KeyRing, TakenBytesAreWipedInTheRing) {
  KeyRing ring(1, 32);
  ASSERT_TRUE(ring.push(0, id_for(1), key_bytes(0, 32)));
  std::vector<std::uint8_t> out(10);
  ASSERT_TRUE(ring.take(out));
  std::vector<std::uint8_t> rest(22);
  ASSERT_TRUE(ring.take(rest));
  EXPECT_EQ(ring.free_slots(), 1u) << "an exhausted slot goes straight back to the producer";
  ASSERT_TRUE(ring.push(32, id_for(2), std::vector<std::uint8_t>(5, 0xAA)));
  auto segment = ring.pop_segment();
  ASSERT_TRUE(segment);
  // The slot was reused: beyond the 5 new bytes the old key must have been wiped.
  const std::span<const std::uint8_t> slot(segment->bytes.data(), 32);
  EXPECT_TRUE(std::all_of(slot.begin() + 5, slot.end(), [](std::uint8_t b) { return b == 0; }));
  ring.release(*segment);
}

TEST(KeyRing, ADiscontinuityDiscardsRatherThanMixingStreams) {
  KeyRing ring(3, 16);
  ASSERT_TRUE(ring.push(0, id_for(1), key_bytes(0, 16)));
  ASSERT_TRUE(ring.push(5000, id_for(2), key_bytes(5000, 16)));
  std::vector<std::uint8_t> out(20);
  // 16 bytes at 0 then a jump: the copied 16 are wiped, and 16 remain (< 20).
  EXPECT_FALSE(ring.take(out));
  EXPECT_EQ(ring.bytes_discarded(), 16u);
  std::vector<std::uint8_t> next(10);
  ASSERT_EQ(ring.take(next), std::optional<std::uint64_t>(5000));
  EXPECT_EQ(next, key_bytes(5000, 10));
}

TEST(KeyRing, ConcurrentProducerAndConsumerAccountForEveryByteOnce) {
  constexpr std::uint64_t kTotal = 24u << 20;  // 24 MiB of pad
  KeyRing ring(64, 1024);
  std::thread producer([&] {
    std::mt19937 rng(1);
    std::uint64_t offset = 0;
    std::uint32_t n = 0;
    while (offset < kTotal) {
      const std::size_t len = std::min<std::uint64_t>(1 + rng() % 1024, kTotal - offset);
      const auto bytes = key_bytes(offset, len);
      while (!ring.push(offset, id_for(n), bytes)) std::this_thread::yield();
      offset += len;
      ++n;
    }
  });
  std::mt19937 rng(2);
  std::vector<std::uint8_t> out(1500);
  std::uint64_t expected = 0;
  std::uint64_t bad_bytes = 0;
  while (expected < kTotal) {
    const std::size_t len = std::min<std::uint64_t>(1 + rng() % 1500, kTotal - expected);
    const std::span<std::uint8_t> chunk(out.data(), len);
    const auto offset = ring.take(chunk);
    if (!offset) {
      std::this_thread::yield();
      continue;
    }
    ASSERT_EQ(*offset, expected) << "offsets must be contiguous, no byte skipped or repeated";
    for (std::size_t i = 0; i < len; ++i) bad_bytes += chunk[i] != byte_at(expected + i);
    expected += len;
  }
  producer.join();
  EXPECT_EQ(bad_bytes, 0u);
  EXPECT_EQ(ring.bytes_consumed(), kTotal);
  EXPECT_EQ(ring.bytes_pushed(), kTotal);
  EXPECT_EQ(ring.bytes_discarded(), 0u);
  EXPECT_EQ(ring.bytes_available(), 0u);
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// The wire format of docs/wire-format.md: sizes, where each field lies, the stream
// preamble, big-endian fields, and parsing and writing the headers of units. The codec
// and the elements read and write unit bytes only through this header.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "otpgate/keyclient.hpp"

namespace otpgate::otp {

inline constexpr std::uint64_t kEpochBytes = 1u << 18;  // 256 KiB
inline constexpr std::size_t kAuthKeyBytes = 16;        // r
inline constexpr std::size_t kMaskBytes = 16;           // s
inline constexpr std::size_t kTagBytes = 16;
inline constexpr std::size_t kOffsetBytes = 8;
inline constexpr std::size_t kTrailerBytes = kOffsetBytes + kTagBytes;  // datagram overhead
// AES mode: an SRTP AES-256-GCM packet (libsrtp2) whose GCM tag is preceded by the
// 8-byte pad offset of its master key with the top bit set (OTP offsets never have it).
inline constexpr std::uint64_t kAesFlag = 1ull << 63;
inline constexpr std::size_t kAesKeyBytes = 44;  // AES-256 key (32) + SRTP salt (12)
// Room a caller leaves after a datagram for either mode (libsrtp writes up to its
// maximum trailer in place before trimming).
inline constexpr std::size_t kMaxDatagramOverhead = 160;
inline constexpr std::size_t kRecordPrefixBytes = 8;                        // "OTP" kind len32
inline constexpr std::size_t kRecordHeaderBytes = kRecordPrefixBytes + 24;  // + id, index, P
inline constexpr std::size_t kRecordOverhead = kRecordHeaderBytes + kTagBytes;
inline constexpr std::size_t kMaxUnitPayload = 65536;  // largest n in one unit
inline constexpr std::size_t kMaxAnnouncedKeys = 64;   // key_IDs per announcement
inline constexpr std::size_t kAnnouncementFixedBytes = kRecordPrefixBytes + 22 + kTagBytes;
inline constexpr std::size_t kMaxAnnouncementBytes =
    kAnnouncementFixedBytes + 16 * kMaxAnnouncedKeys;

// A unit with n payload bytes at pad offset P lies inside one epoch, after its r:
// P mod E >= kAuthKeyBytes and P mod E + kMaskBytes + n <= E.
bool fits_epoch(std::uint64_t p, std::size_t n);

// Where the fields of announcements and records start, in bytes from the unit's start.
// Both begin with a prefix: "OTP" + kind (4), then the length of the rest (4).
inline constexpr std::size_t kLengthAt = 4;
inline constexpr std::size_t kAnnouncementMaskAt = 8;   // P of the announcement's own s
inline constexpr std::size_t kAnnouncementBaseAt = 16;  // pad offset of the first key
inline constexpr std::size_t kAnnouncementKeyLengthAt = 24;
inline constexpr std::size_t kAnnouncementCountAt = 28;
inline constexpr std::size_t kAnnouncementKeyIdsAt = 30;  // count x 16 bytes
inline constexpr std::size_t kRecordStreamIdAt = 8;
inline constexpr std::size_t kRecordIndexAt = 16;
inline constexpr std::size_t kRecordPadOffsetAt = 24;  // P (with kAesFlag: the AES key's)
static_assert(kAnnouncementKeyIdsAt + kTagBytes == kAnnouncementFixedBytes);
static_assert(kRecordPadOffsetAt + kOffsetBytes == kRecordHeaderBytes);

// Stream mode: sent once before the first record (not authenticated).
inline constexpr std::array<std::uint8_t, 8> kStreamPreamble = {'O', 'T', 'P', 'S',
                                                                'T', 'R', 'M', 1};
// True when `bytes` starts with the whole preamble.
bool starts_with_preamble(std::span<const std::uint8_t> bytes);

// A big-endian field of exactly sizeof(T) bytes (the span's extent says how many).
template <std::unsigned_integral T>
constexpr T load_be(std::span<const std::uint8_t, sizeof(T)> bytes) {
  std::uint64_t v = 0;
  for (const std::uint8_t b : bytes) v = v << 8 | b;
  return static_cast<T>(v);  // exactly sizeof(T) bytes were read
}
// Writing takes the value's own type: a wider value needs a checked_cast first.
template <std::unsigned_integral T>
constexpr void store_be(std::span<std::uint8_t, sizeof(T)> out, T value) {
  for (std::size_t i = sizeof(T); i-- > 0;) {
    out[i] = static_cast<std::uint8_t>(value);
    value = static_cast<T>(value >> 8);
  }
}

enum class RecordKind : char {
  announcement = 'A',  // key_IDs for pad offsets (both modes)
  stream_start = 'S',  // stream mode: index 0, no payload
  data = 'D',          // stream mode: payload
  final = 'F',         // stream mode: the last record; anything after it is refused
};
// The kind a record's fourth byte names, if any.
std::optional<RecordKind> record_kind(std::uint8_t byte);

enum class DatagramType { rtp, rtcp, announcement, unknown };
// RTP/RTCP by version 2 and RFC 5761 payload types; announcements by their prefix.
DatagramType classify(std::span<const std::uint8_t> datagram);
// Bytes left in the clear: the RTP header with CSRCs and extension, or RTCP's first 8.
std::optional<std::size_t> clear_header_length(std::span<const std::uint8_t> packet,
                                               DatagramType type);
// The byte a datagram's tag covers before its bytes: 'R' (RTP) or 'C' (RTCP).
constexpr std::uint8_t authenticated_kind(DatagramType type) {
  return type == DatagramType::rtp ? 'R' : 'C';
}
// The 8-byte field before a protected datagram's tag: P (OTP), or the AES master key's
// pad offset with kAesFlag. nullopt when the datagram is shorter than its trailer.
std::optional<std::uint64_t> datagram_pad_offset(std::span<const std::uint8_t> datagram);

// An announcement: keys key_ID[i] cover pad [base + i * key_length, + key_length).
// Points into the unit's bytes.
struct Announcement {
  std::uint64_t mask_offset = 0;  // P of its own s
  std::uint64_t base = 0;
  std::uint32_t key_length = 0;
  std::uint16_t count = 0;
  std::span<const std::uint8_t> key_ids;        // count x 16 bytes
  std::span<const std::uint8_t> authenticated;  // every byte before the tag
  std::span<const std::uint8_t> tag;

  keys::KeyId id(std::size_t i) const;
};
// A whole, well-formed announcement (its tag unchecked), or nullopt.
std::optional<Announcement> parse_announcement(std::span<const std::uint8_t> unit);
inline constexpr std::size_t announcement_size(std::size_t keys) {
  return kAnnouncementFixedBytes + 16 * keys;
}
// Writes the announcement of `keys` (consecutive, of one length; 1 to kMaxAnnouncedKeys)
// with its mask at `mask_offset`: every byte but the tag, which the caller appends in the
// last kTagBytes. Returns the unit's size (tag included).
std::size_t write_announcement(std::span<std::uint8_t> out, std::uint64_t mask_offset,
                               std::span<const keys::KeyAnnouncement> keys);

// Stream-mode records: | "OTP" kind | length | stream_id | index | P | payload | tag |.
struct RecordHeader {
  RecordKind kind = RecordKind::data;
  std::uint64_t stream_id = 0;
  std::uint64_t index = 0;
  std::uint64_t pad_offset = 0;  // P, or the AES key's pad offset with kAesFlag
};
// Total size of the record whose first kRecordPrefixBytes are given (within the limits of
// its kind), or nullopt if they are not an otpencrypt record.
std::optional<std::size_t> record_size(std::span<const std::uint8_t> prefix);
// The header fields of a record of at least kRecordHeaderBytes (its length unchecked).
std::optional<RecordHeader> parse_record_header(std::span<const std::uint8_t> record);
// Writes the kRecordHeaderBytes header of a record of `size` bytes in all.
void write_record_header(std::span<std::uint8_t> out, const RecordHeader& header, std::size_t size);

}  // namespace otpgate::otp

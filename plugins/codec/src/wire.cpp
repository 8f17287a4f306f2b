// SPDX-License-Identifier: LGPL-2.1-or-later
// Wire format (docs/wire-format.md): telling datagrams apart, RTP/RTCP clear headers,
// the datagram trailer, announcements and stream records. No key material here.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "otpgate/checked_cast.hpp"
#include "otpgate/otp_wire.hpp"

namespace otpgate::otp {

namespace {

constexpr std::array<std::uint8_t, 4> kAnnouncementMagic = {'O', 'T', 'P', 'A'};
constexpr std::array<std::uint8_t, 3> kRecordMagic = {'O', 'T', 'P'};

template <std::size_t N>
bool starts_with(std::span<const std::uint8_t> bytes, const std::array<std::uint8_t, N>& magic) {
  return bytes.size() >= N && std::equal(magic.begin(), magic.end(), bytes.begin());
}

// The big-endian field of type T at `At` (the caller has checked the unit's size).
template <std::unsigned_integral T, std::size_t At>
T field(std::span<const std::uint8_t> unit) {
  return load_be<T>(unit.subspan<At, sizeof(T)>());
}
template <std::size_t At, std::unsigned_integral T>
void put_field(std::span<std::uint8_t> unit, T value) {
  store_be(unit.subspan<At, sizeof(T)>(), value);
}

}  // namespace

bool fits_epoch(std::uint64_t p, std::size_t n) {
  const std::uint64_t in = p % kEpochBytes;
  return in >= kAuthKeyBytes && in + kMaskBytes + n <= kEpochBytes && p <= UINT64_MAX - kEpochBytes;
}

bool starts_with_preamble(std::span<const std::uint8_t> bytes) {
  return starts_with(bytes, kStreamPreamble);
}

std::optional<RecordKind> record_kind(std::uint8_t byte) {
  const auto kind = static_cast<RecordKind>(byte);
  switch (kind) {  // every kind, no default: -Wswitch flags a new one missing here
    case RecordKind::announcement:
    case RecordKind::stream_start:
    case RecordKind::data:
    case RecordKind::final:
      return kind;
  }
  return std::nullopt;
}

DatagramType classify(std::span<const std::uint8_t> d) {
  if (starts_with(d, kAnnouncementMagic)) return DatagramType::announcement;
  if (d.size() >= 8 && (d[0] >> 6) == 2) {
    if (d[1] >= 192 && d[1] <= 223) return DatagramType::rtcp;  // RFC 5761
    if (d.size() >= 12) return DatagramType::rtp;
  }
  return DatagramType::unknown;
}

std::optional<std::size_t> clear_header_length(std::span<const std::uint8_t> p, DatagramType type) {
  if (type == DatagramType::rtcp)
    return p.size() >= 8 ? std::optional<std::size_t>(8) : std::nullopt;
  if (type != DatagramType::rtp || p.size() < 12) return std::nullopt;
  std::size_t h = 12 + 4 * (p[0] & 0x0f);
  if (p[0] & 0x10) {  // header extension: profile (2), length in 32-bit words (2)
    if (p.size() < h + 4) return std::nullopt;
    h += 4 + 4 * std::size_t{load_be<std::uint16_t>(p.subspan(h + 2).first<2>())};
  }
  if (h > p.size()) return std::nullopt;
  return h;
}

std::optional<std::uint64_t> datagram_pad_offset(std::span<const std::uint8_t> datagram) {
  if (datagram.size() < kTrailerBytes) return std::nullopt;
  return load_be<std::uint64_t>(datagram.last<kTrailerBytes>().first<kOffsetBytes>());
}

keys::KeyId Announcement::id(std::size_t i) const {
  std::array<std::uint8_t, 16> b{};
  std::memcpy(b.data(), key_ids.subspan(16 * i, 16).data(), 16);
  return keys::KeyId(b);
}

std::optional<Announcement> parse_announcement(std::span<const std::uint8_t> unit) {
  if (unit.size() < kAnnouncementFixedBytes || !starts_with(unit, kAnnouncementMagic)) return {};
  if (field<std::uint32_t, kLengthAt>(unit) != unit.size() - kRecordPrefixBytes) return {};
  Announcement a{};
  a.mask_offset = field<std::uint64_t, kAnnouncementMaskAt>(unit);
  a.base = field<std::uint64_t, kAnnouncementBaseAt>(unit);
  a.key_length = field<std::uint32_t, kAnnouncementKeyLengthAt>(unit);
  a.count = field<std::uint16_t, kAnnouncementCountAt>(unit);
  if (a.count == 0 || a.count > kMaxAnnouncedKeys || a.key_length == 0) return {};
  if (unit.size() != announcement_size(a.count)) return {};
  if (a.base > UINT64_MAX - std::uint64_t(a.count) * a.key_length) return {};
  a.key_ids = unit.subspan(kAnnouncementKeyIdsAt, 16u * a.count);
  a.authenticated = unit.first(unit.size() - kTagBytes);
  a.tag = unit.last(kTagBytes);
  return a;
}

std::size_t write_announcement(std::span<std::uint8_t> out, std::uint64_t mask_offset,
                               std::span<const keys::KeyAnnouncement> keys) {
  const std::size_t size = announcement_size(keys.size());
  if (keys.empty() || keys.size() > kMaxAnnouncedKeys || out.size() < size) {
    throw std::invalid_argument("write_announcement: 1 to 64 keys and room for them");
  }
  std::copy(kAnnouncementMagic.begin(), kAnnouncementMagic.end(), out.begin());
  put_field<kLengthAt>(out, checked_cast<std::uint32_t>(size - kRecordPrefixBytes));
  put_field<kAnnouncementMaskAt>(out, mask_offset);
  put_field<kAnnouncementBaseAt>(out, keys.front().offset);
  put_field<kAnnouncementKeyLengthAt>(out, keys.front().length);
  put_field<kAnnouncementCountAt>(out, checked_cast<std::uint16_t>(keys.size()));
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const auto& id = keys[i].key_id.bytes();
    std::copy(id.begin(), id.end(), out.begin() + kAnnouncementKeyIdsAt + 16 * i);
  }
  return size;
}

std::optional<std::size_t> record_size(std::span<const std::uint8_t> prefix) {
  if (prefix.size() < kRecordPrefixBytes || !starts_with(prefix, kRecordMagic)) return {};
  const auto kind = record_kind(prefix[3]);
  if (!kind) return std::nullopt;
  const bool announcement = *kind == RecordKind::announcement;
  const std::uint64_t rest = field<std::uint32_t, kLengthAt>(prefix);
  const std::uint64_t max = announcement ? kMaxAnnouncementBytes - kRecordPrefixBytes
                                         : kRecordOverhead - kRecordPrefixBytes + kMaxUnitPayload;
  const std::uint64_t min = announcement ? kAnnouncementFixedBytes - kRecordPrefixBytes
                                         : kRecordOverhead - kRecordPrefixBytes;
  if (rest < min || rest > max) return std::nullopt;
  return checked_cast<std::size_t>(kRecordPrefixBytes + rest);
}

std::optional<RecordHeader> parse_record_header(std::span<const std::uint8_t> record) {
  if (record.size() < kRecordHeaderBytes || !starts_with(record, kRecordMagic)) return {};
  const auto kind = record_kind(record[3]);
  if (!kind) return std::nullopt;
  return RecordHeader{*kind, field<std::uint64_t, kRecordStreamIdAt>(record),
                      field<std::uint64_t, kRecordIndexAt>(record),
                      field<std::uint64_t, kRecordPadOffsetAt>(record)};
}

void write_record_header(std::span<std::uint8_t> out, const RecordHeader& header,
                         std::size_t size) {
  if (out.size() < kRecordHeaderBytes) throw std::invalid_argument("write_record_header: room");
  std::copy(kRecordMagic.begin(), kRecordMagic.end(), out.begin());
  out[3] = static_cast<std::uint8_t>(header.kind);
  put_field<kLengthAt>(out, checked_cast<std::uint32_t>(size - kRecordPrefixBytes));
  put_field<kRecordStreamIdAt>(out, header.stream_id);
  put_field<kRecordIndexAt>(out, header.index);
  put_field<kRecordPadOffsetAt>(out, header.pad_offset);
}

}  // namespace otpgate::otp

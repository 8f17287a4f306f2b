// SPDX-License-Identifier: LGPL-2.1-or-later
// The sender: draws pad for each unit within one epoch (taking each epoch's r, wiping
// tails a unit does not fit in), announces keys before any of their pad is used (with
// spread-out repeats in datagram mode), and protects RTP/RTCP packets and stream records
// with the one-time pad or, in the AES modes, with keys drawn from it.
#include <openssl/crypto.h>

#include <algorithm>
#include <cstring>

#include "aes_modes.hpp"
#include "otpgate/otp_codec.hpp"
#include "wegman_carter.hpp"

namespace otpgate::otp {

using keys::KeyAnnouncement;
using keys::SecretBytes;

namespace {

constexpr std::uint64_t E = kEpochBytes;
constexpr std::size_t kMinRecordFill = 512;  // below this, skip to the next epoch instead

}  // namespace

struct Encoder::Impl {
  struct Repeat {
    std::vector<std::uint8_t> bytes;
    std::size_t size = 0;
    unsigned remaining = 0;
    std::uint64_t due = 0;
  };

  Impl(keys::PadSource& source, std::uint64_t id, unsigned repeat_count)
      : pad(source),
        stream_id(id),
        repeats(repeat_count),
        r(kAuthKeyBytes),
        scratch(kMaskBytes + kMaxUnitPayload),
        discard(65536),
        repeat_queue(256) {  // each slot's bytes are allocated when it is first used
    batch.reserve(kMaxAnnouncedKeys);
  }

  // Draws kMaskBytes + n pad bytes into `scratch` within one epoch; returns P.
  std::optional<std::uint64_t> draw(std::size_t n) {
    const std::size_t need = kMaskBytes + n;
    while (true) {
      const auto offset = pad.peek_offset();
      if (!offset) return std::nullopt;
      const std::uint64_t in = *offset % E;
      const std::uint64_t epoch = *offset / E;
      // Only announced pad: a unit sent before the announcement of its key would make a
      // stream receiver wait for an announcement that is queued behind the unit itself.
      // (An encoder that never announced shares its source with one that does.)
      const std::uint64_t limit =
          announced_end || announcing_end ? std::max(announced_end, announcing_end) : UINT64_MAX;
      if (in == 0) {  // an epoch starts: its first 16 bytes are its hash key r
        if (*offset + kAuthKeyBytes > limit) return std::nullopt;
        if (!pad.take(r.span())) return std::nullopt;
        have_r = true;
        r_epoch = epoch;
        stats.pad_bytes_used += kAuthKeyBytes;
        continue;
      }
      if (!have_r || r_epoch != epoch || in < kAuthKeyBytes || in + need > E) {
        // Cannot use this epoch (no r, or the unit would cross its end): wipe the rest.
        const std::uint64_t step = std::min<std::uint64_t>(
            {E - in, discard.size(), pad.available(), limit - std::min(limit, *offset)});
        if (step == 0 || !pad.take(discard.span().first(step))) return std::nullopt;
        OPENSSL_cleanse(discard.span().data(), step);
        stats.pad_bytes_skipped += step;
        continue;
      }
      if (*offset + need > limit) {
        // The announced run ends before this unit fits. Key beyond it that is not announced
        // yet is a run that is announced only once the stream reaches it (a resync starts
        // at the next epoch): wipe the tail so that the stream gets there. With nothing
        // beyond, wait for key instead (it may continue the run).
        if (*offset >= limit || pad.available() <= limit - *offset) return std::nullopt;
        const std::uint64_t tail = std::min<std::uint64_t>(limit - *offset, discard.size());
        if (!pad.take(discard.span().first(tail))) return std::nullopt;
        OPENSSL_cleanse(discard.span().data(), tail);
        stats.pad_bytes_skipped += tail;
        continue;
      }
      const auto p = pad.take(scratch.span().first(need));
      if (p) stats.pad_bytes_used += need;
      return p;
    }
  }

  // Room left in the current epoch for a unit's payload, if the next draw stays in it.
  std::optional<std::size_t> room_in_epoch() {
    const auto offset = pad.peek_offset();
    if (!offset || !have_r || r_epoch != *offset / E) return std::nullopt;
    const std::uint64_t in = *offset % E;
    if (in < kAuthKeyBytes || in + kMaskBytes >= E) return std::nullopt;
    return E - in - kMaskBytes;
  }

  std::size_t build_announcement(std::span<std::uint8_t> out) {
    if (out.size() < kMaxAnnouncementBytes) return 0;
    // Keys the source wiped before they were announced (a sender's key source flushes
    // its ring after a KME outage): nothing to announce, and nothing must wait for them.
    if (const auto position = pad.peek_offset()) {
      auto gone = [&](const KeyAnnouncement& a) { return a.offset + a.length <= *position; };
      if (!batch.empty() && gone(batch.back())) batch.clear();
      if (held && gone(*held)) held.reset();
    }
    while (batch.size() < kMaxAnnouncedKeys) {
      std::optional<KeyAnnouncement> a = held ? held : pad.next_announcement();
      held.reset();
      if (!a) break;
      if (!batch.empty() && (a->resync || a->length != batch.front().length ||
                             a->offset != batch.front().offset + batch.size() * a->length)) {
        held = a;  // starts the next batch
        break;
      }
      batch.push_back(*a);
    }
    if (batch.empty()) return 0;
    // The announcement's own mask may lie in the keys it announces (bootstrap).
    announcing_end = batch.front().offset + batch.size() * batch.front().length;
    const auto p = draw(0);
    announcing_end = 0;
    if (!p) return 0;  // kept in `batch`; sent as soon as there is pad for its mask
    announced_end =
        std::max(announced_end, batch.front().offset + batch.size() * batch.front().length);
    const std::size_t size = write_announcement(out, *p, batch);
    mac.tag(r.span().data(), scratch.span().data(), {out.first(size - kTagBytes)},
            out.data() + size - kTagBytes);
    OPENSSL_cleanse(scratch.span().data(), kMaskBytes);
    stats.announcements += 1;
    stats.keys_announced += batch.size();
    stats.announcement_bytes += size;
    batch.clear();
    return size;
  }

  keys::PadSource& pad;
  const std::uint64_t stream_id;
  const unsigned repeats;
  WegmanCarter mac;
  SecretBytes r;
  bool have_r = false;
  std::uint64_t r_epoch = 0;
  SecretBytes scratch;
  SecretBytes discard;
  std::vector<KeyAnnouncement> batch;
  std::optional<KeyAnnouncement> held;
  std::uint64_t announced_end = 0;   // pad below this is covered by sent announcements
  std::uint64_t announcing_end = 0;  // ... or by the one being built
  std::vector<Repeat> repeat_queue;
  std::size_t repeats_active = 0;  // slots with repeats left
  std::uint64_t next_repeat_due = UINT64_MAX;
  std::uint64_t units_sent = 0;
  std::uint64_t record_index = 0;
  std::unique_ptr<SrtpSession> aes;
  std::uint64_t aes_key_offset = 0;
  std::uint32_t aes_packets = 0;
  std::unique_ptr<GcmKey> gcm;  // stream-mode AES key
  std::uint64_t gcm_key_offset = 0;
  std::uint32_t gcm_records = 0;
  EncoderStats stats;

  // A new AES key from the pad (drawn like a unit, so never reused): `key` is made from
  // it, `key_offset` says where it lies, `uses` starts again.
  template <typename Key>
  bool rekey(std::unique_ptr<Key>& key, std::uint64_t& key_offset, std::uint32_t& uses) {
    const auto p = draw(kAesKeyPayload);
    if (!p) return false;
    key = std::make_unique<Key>(scratch.span().data(), true);
    OPENSSL_cleanse(scratch.span().data(), kAesKeyBytes);
    key_offset = *p;
    uses = 0;
    ++stats.aes_rekeys;
    return true;
  }
  bool rekey_gcm() { return rekey(gcm, gcm_key_offset, gcm_records); }  // stream mode
  bool rekey_aes() { return rekey(aes, aes_key_offset, aes_packets); }  // datagram mode

  void write_header(std::span<std::uint8_t> out, RecordKind kind, std::size_t size,
                    std::uint64_t p) {
    write_record_header(out, {kind, stream_id, record_index, p}, size);
  }
};

Encoder::Encoder(keys::PadSource& pad, std::uint64_t stream_id, unsigned announcement_repeats)
    : impl_(std::make_unique<Impl>(pad, stream_id, announcement_repeats)) {}
Encoder::~Encoder() = default;

std::size_t Encoder::next_announcement(std::span<std::uint8_t> out, bool with_repeats) {
  Impl& e = *impl_;
  if (const std::size_t size = e.build_announcement(out)) {
    if (with_repeats && e.repeats > 0) {
      // Keep a copy to send again later, spread out, so one lost packet costs nothing.
      auto slot =
          std::min_element(e.repeat_queue.begin(), e.repeat_queue.end(),
                           [](const auto& a, const auto& b) { return a.remaining < b.remaining; });
      if (slot->bytes.size() < size) slot->bytes.resize(kMaxAnnouncementBytes);
      std::memcpy(slot->bytes.data(), out.data(), size);
      if (slot->remaining == 0) ++e.repeats_active;
      slot->size = size;
      slot->remaining = e.repeats;
      slot->due = e.units_sent + 8;
      e.next_repeat_due = std::min(e.next_repeat_due, slot->due);
    }
    return size;
  }
  if (!with_repeats || e.repeats_active == 0 || e.units_sent < e.next_repeat_due) return 0;
  e.next_repeat_due = UINT64_MAX;
  for (auto& slot : e.repeat_queue) {
    if (slot.remaining != 0) e.next_repeat_due = std::min(e.next_repeat_due, slot.due);
  }
  for (auto& slot : e.repeat_queue) {
    if (slot.remaining == 0 || slot.due > e.units_sent || out.size() < slot.size) continue;
    std::memcpy(out.data(), slot.bytes.data(), slot.size);
    --slot.remaining;
    if (slot.remaining == 0) --e.repeats_active;
    slot.due = e.units_sent + 64;
    e.next_repeat_due = std::min(e.next_repeat_due, slot.due);
    ++e.stats.announcement_repeats;
    e.stats.announcement_bytes += slot.size;
    return slot.size;
  }
  return 0;
}

Encoder::Status Encoder::protect_datagram(std::span<const std::uint8_t> in,
                                          std::span<std::uint8_t> out, std::size_t& written) {
  Impl& e = *impl_;
  const DatagramType type = classify(in);
  const auto header = clear_header_length(in, type);
  if (!header || in.size() - *header > kMaxUnitPayload || out.size() < in.size() + kTrailerBytes) {
    return Status::malformed;
  }
  const std::size_t n = in.size() - *header;
  const auto p = e.draw(n);
  if (!p) {
    ++e.stats.no_key;
    return Status::no_key;
  }
  const std::uint8_t* s = e.scratch.span().data();
  std::memcpy(out.data(), in.data(), *header);
  xor_into(out.data() + *header, in.data() + *header, s + kMaskBytes, n);
  store_be(out.subspan(in.size()).first<kOffsetBytes>(), *p);
  const std::uint8_t kind = authenticated_kind(type);
  e.mac.tag(e.r.span().data(), s, {{&kind, 1}, out.first(in.size() + kOffsetBytes)},
            out.data() + in.size() + kOffsetBytes);
  OPENSSL_cleanse(e.scratch.span().data(), kMaskBytes + n);
  written = in.size() + kTrailerBytes;
  ++e.stats.units;
  ++e.units_sent;
  e.stats.payload_bytes += n;
  return Status::ok;
}

Encoder::Status Encoder::protect_record(RecordKind kind, std::span<const std::uint8_t> payload,
                                        std::span<std::uint8_t> out, std::size_t& consumed,
                                        std::size_t& written) {
  Impl& e = *impl_;
  if (kind == RecordKind::announcement || out.size() < kRecordOverhead) return Status::malformed;
  std::size_t n = kind == RecordKind::data ? payload.size() : 0;
  n = std::min({n, kMaxUnitPayload, out.size() - kRecordOverhead});
  if (const auto room = e.room_in_epoch(); room && n > *room && *room >= kMinRecordFill) {
    n = *room;  // fill the epoch exactly instead of wasting its tail
  }
  const auto p = e.draw(n);
  if (!p) {
    ++e.stats.no_key;
    return Status::no_key;
  }
  const std::size_t size = kRecordOverhead + n;
  std::uint8_t* o = out.data();
  e.write_header(out, kind, size, *p);
  const std::uint8_t* s = e.scratch.span().data();
  xor_into(o + kRecordHeaderBytes, payload.data(), s + kMaskBytes, n);
  e.mac.tag(e.r.span().data(), s, {out.first(kRecordHeaderBytes + n)}, o + kRecordHeaderBytes + n);
  OPENSSL_cleanse(e.scratch.span().data(), kMaskBytes + n);
  ++e.record_index;
  ++e.stats.units;
  e.stats.payload_bytes += n;
  consumed = n;
  written = size;
  return Status::ok;
}

Encoder::Status Encoder::protect_record_aes(RecordKind kind, std::span<const std::uint8_t> payload,
                                            std::span<std::uint8_t> out, std::size_t& consumed,
                                            std::size_t& written, std::uint32_t rekey_interval) {
  Impl& e = *impl_;
  if (kind == RecordKind::announcement || out.size() < kRecordOverhead) return Status::malformed;
  std::size_t n = kind == RecordKind::data ? payload.size() : 0;
  n = std::min({n, kMaxUnitPayload, out.size() - kRecordOverhead});
  if ((!e.gcm || e.gcm_records >= rekey_interval) && !e.rekey_gcm() && !e.gcm) {
    ++e.stats.no_key;
    return Status::no_key;
  }
  const std::size_t size = kRecordOverhead + n;
  std::uint8_t* o = out.data();
  e.write_header(out, kind, size, e.gcm_key_offset | kAesFlag);
  if (!e.gcm->seal(e.record_index, out.first(kRecordHeaderBytes), payload.data(), n,
                   o + kRecordHeaderBytes, o + kRecordHeaderBytes + n)) {
    return Status::malformed;
  }
  ++e.gcm_records;
  ++e.record_index;
  ++e.stats.units;
  ++e.stats.aes_units;
  e.stats.payload_bytes += n;
  consumed = n;
  written = size;
  return Status::ok;
}

Encoder::Status Encoder::protect_datagram_aes(std::span<const std::uint8_t> in,
                                              std::span<std::uint8_t> out, std::size_t& written,
                                              std::uint32_t rekey_interval) {
  Impl& e = *impl_;
  const DatagramType type = classify(in);
  const auto header = clear_header_length(in, type);
  if (!header || in.size() > kMaxUnitPayload || out.size() < in.size() + kMaxDatagramOverhead) {
    return Status::malformed;
  }
  if ((!e.aes || e.aes_packets >= rekey_interval) && !e.rekey_aes() && !e.aes) {
    ++e.stats.no_key;
    return Status::no_key;
  }
  const auto size = e.aes->protect_datagram(type, in, out, e.aes_key_offset);
  if (!size) return Status::malformed;
  written = *size;
  ++e.aes_packets;
  ++e.units_sent;
  ++e.stats.units;
  ++e.stats.aes_units;
  e.stats.payload_bytes += in.size() - *header;
  return Status::ok;
}

bool Encoder::prepare_aes() {
  return impl_->aes || impl_->rekey_aes();
}
void Encoder::forget_aes_key() {
  impl_->aes.reset();  // its key material is wiped by its own destructor
  impl_->aes_packets = 0;
}
std::uint64_t Encoder::aes_rekeys() const {
  return impl_->stats.aes_rekeys;
}

bool Encoder::has_pad_for(std::size_t n) const {
  return impl_->pad.available() >= kMaskBytes + kAuthKeyBytes + n;
}
const EncoderStats& Encoder::stats() const {
  return impl_->stats;
}
std::uint64_t Encoder::stream_id() const {
  return impl_->stream_id;
}

}  // namespace otpgate::otp

#include "otpgate/otp_codec.hpp"

#include "aes_modes.hpp"
#include "otpgate/checked_cast.hpp"
#include "pad_window.hpp"
#include "wegman_carter.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <vector>

namespace otpgate::otp {

using keys::KeyAnnouncement;
using keys::PadSegment;
using keys::SecretBytes;

namespace {

constexpr std::uint64_t E = kEpochBytes;
constexpr std::size_t kMinRecordFill = 512;  // below this, skip to the next epoch instead

}  // namespace

// ---------------------------------------------------------------------------
// Encoder

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
        repeat_queue(256) {
    for (auto& q : repeat_queue) q.bytes.resize(kMaxAnnouncementBytes);
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
      if (*offset + need > limit) return std::nullopt;
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

  // Stream-mode AES: a new key from the pad (drawn like a unit, so never reused).
  bool rekey_gcm() {
    const auto p = draw(kAesKeyPayload);
    if (!p) return false;
    gcm = std::make_unique<GcmKey>(scratch.span().data(), true);
    OPENSSL_cleanse(scratch.span().data(), kAesKeyBytes);
    gcm_key_offset = *p;
    gcm_records = 0;
    ++stats.aes_rekeys;
    return true;
  }

  void write_header(std::span<std::uint8_t> out, RecordKind kind, std::size_t size,
                    std::uint64_t p) {
    write_record_header(out, {kind, stream_id, record_index, p}, size);
  }

  bool rekey_aes() {
    const auto p = draw(kAesKeyPayload);
    if (!p) return false;
    aes = std::make_unique<SrtpSession>(scratch.span().data(), true);
    OPENSSL_cleanse(scratch.span().data(), kAesKeyBytes);
    aes_key_offset = *p;
    aes_packets = 0;
    ++stats.aes_rekeys;
    return true;
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
  const std::uint8_t kind = type == DatagramType::rtp ? 'R' : 'C';
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

// ---------------------------------------------------------------------------
// Decoder

struct Decoder::Impl {
  struct EpochKey {
    std::uint64_t epoch = UINT64_MAX;
    std::array<std::uint8_t, kAuthKeyBytes> r{};
  };
  struct Pending {
    std::vector<std::uint8_t> bytes;
    std::size_t size = 0;
    bool bootstrap = false;  // its keys were asked for before it could be verified
    std::chrono::steady_clock::time_point expires;
  };
  static constexpr std::size_t kMaxAwaited = 65536;
  enum class Check { verified, missing, bad };

  Impl(keys::PadSource& source, DecoderConfig c)
      : pad(source),
        config(c),
        window(c.window_bytes),
        epoch_keys(c.window_bytes / E + 2),
        scratch(kMaskBytes + kMaxUnitPayload) {
    pool.reserve(c.max_unplaced_keys);
    pending_limit = c.max_pending_announcements;
  }
  ~Impl() {
    for (auto& k : epoch_keys) OPENSSL_cleanse(k.r.data(), k.r.size());
    for (const auto& s : pool) pad.release(s);
  }

  // r of `epoch`, read from the window once and then kept (its bytes are consumed).
  const std::uint8_t* epoch_key(std::uint64_t epoch) {
    EpochKey& k = epoch_keys[epoch % epoch_keys.size()];
    if (k.epoch == epoch) return k.r.data();
    const std::uint64_t at = epoch * E;
    if (!window.in_range(at, kAuthKeyBytes) || !window.all_present(at, kAuthKeyBytes) ||
        window.any_used(at, kAuthKeyBytes)) {
      return nullptr;
    }
    window.copy_out(at, kAuthKeyBytes, k.r.data());
    window.consume(at, kAuthKeyBytes);
    k.epoch = epoch;
    return k.r.data();
  }

  void forget_old_epoch_keys() {
    for (auto& k : epoch_keys) {
      if (k.epoch != UINT64_MAX && (k.epoch + 1) * E <= window.base()) {
        OPENSSL_cleanse(k.r.data(), k.r.size());
        k.epoch = UINT64_MAX;
      }
    }
  }

  void place(std::uint64_t offset, std::span<const std::uint8_t> key) {
    window.place(offset, key);
    forget_old_epoch_keys();
    ++stats.keys_placed;
  }

  // Where a pad byte for verifying an announcement would come from.
  enum class Source { window, own_key, awaited, nowhere };
  Source source_of(std::uint64_t o, const Announcement& a) const {
    if (window.in_range(o, 1) && window.all_present(o, 1)) {
      return window.any_used(o, 1) ? Source::nowhere : Source::window;
    }
    if (o >= a.base && (o - a.base) / a.key_length < a.count) return Source::own_key;
    if (awaited_covers(o, 1) || bootstrap_keys_end(o)) return Source::awaited;
    return Source::nowhere;
  }

  // True when the source declared one of a bootstrap candidate's keys lost.
  bool names_lost_key(const Announcement& a) const {
    for (std::size_t i = 0; i < a.count; ++i) {
      if (lost_ids.contains(a.id(i))) return true;
    }
    return false;
  }

  // Where the keys of a bootstrap candidate (being fetched) that hold `o` end, if any do.
  std::optional<std::uint64_t> bootstrap_keys_end(std::uint64_t o) const {
    for (std::size_t i = 0; i < pending_count; ++i) {
      if (!pending[i].bootstrap) continue;
      const auto a = parse_announcement(std::span(pending[i].bytes).first(pending[i].size));
      const std::uint64_t span = std::uint64_t(a ? a->count : 0) * (a ? a->key_length : 0);
      if (a && o >= a->base && o - a->base < span) return a->base + span;
    }
    return std::nullopt;
  }

  // Pool index of the fetched key `id` of `length` bytes, or -1.
  int pooled(const keys::KeyId& id, std::uint32_t length) const {
    const auto it = pool_index.find({id, length});
    return it == pool_index.end() ? -1 : static_cast<int>(it->second);
  }
  static std::pair<keys::KeyId, std::uint32_t> pool_key(const PadSegment& s) {
    return {s.key_id, static_cast<std::uint32_t>(s.bytes.size())};
  }

  // Pad for verifying an announcement: from the window, or from the announcement's own
  // keys (fetched, not yet placed) at the offsets it claims (this bootstraps a stream).
  bool gather(std::uint64_t off, std::size_t n, const Announcement& a,
              const std::array<int, kMaxAnnouncedKeys>& found, std::uint8_t* out) {
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint64_t o = off + i;
      switch (source_of(o, a)) {
        case Source::window:
          window.copy_out(o, 1, out + i);
          break;
        case Source::own_key: {
          const int at = found[(o - a.base) / a.key_length];
          if (at < 0) return false;
          out[i] = pool[static_cast<std::size_t>(at)].bytes[(o - a.base) % a.key_length];
          break;
        }
        case Source::awaited:
        case Source::nowhere:
          return false;
      }
    }
    return true;
  }

  // Verifies an announcement with pad at hand. Keys of a verified announcement that are
  // fetched are placed; the others are asked for and placed when they arrive. Nothing is
  // asked for, placed or consumed before the tag verifies.
  Check verify(std::span<const std::uint8_t> record) {
    const auto a = parse_announcement(record);
    if (!a || !fits_epoch(a->mask_offset, 0)) return Check::bad;
    std::array<int, kMaxAnnouncedKeys> found{};
    std::array<keys::KeyId, kMaxAnnouncedKeys> ids;
    for (std::size_t i = 0; i < a->count; ++i) {
      ids[i] = a->id(i);
      found[i] = pooled(ids[i], a->key_length);
    }
    std::sort(ids.begin(), ids.begin() + a->count);
    if (std::adjacent_find(ids.begin(), ids.begin() + a->count) != ids.begin() + a->count) {
      return Check::bad;  // the same key twice: never from a genuine encoder
    }
    std::uint8_t r[kAuthKeyBytes], s[kMaskBytes], tag[kTagBytes];
    const std::uint64_t epoch = a->mask_offset / E;
    const EpochKey& cached = epoch_keys[epoch % epoch_keys.size()];
    if (cached.epoch == epoch) {
      std::memcpy(r, cached.r.data(), sizeof r);
    } else if (!gather(epoch * E, kAuthKeyBytes, *a, found, r)) {
      return Check::missing;
    }
    if (!gather(a->mask_offset, kMaskBytes, *a, found, s)) {
      OPENSSL_cleanse(r, sizeof r);
      return Check::missing;
    }
    mac.tag(r, s, {a->authenticated}, tag);
    const bool ok = CRYPTO_memcmp(tag, a->tag.data(), kTagBytes) == 0;
    OPENSSL_cleanse(r, sizeof r);
    OPENSSL_cleanse(s, sizeof s);
    if (!ok) return Check::bad;

    // Authentic: place its keys where it says (or await them), then consume r and s.
    std::vector<int> placed;
    for (std::size_t i = 0; i < a->count; ++i) {
      const std::uint64_t offset = a->base + i * a->key_length;
      if (found[i] >= 0) {
        place(offset, pool[static_cast<std::size_t>(found[i])].bytes);
        placed.push_back(found[i]);
      } else if (offset + a->key_length > window.base() && awaited.size() < kMaxAwaited) {
        awaited.emplace(std::make_pair(a->id(i), a->key_length), offset);
        awaited_ranges[offset] = offset + a->key_length;
        pad.request(KeyAnnouncement{offset, a->id(i), a->key_length});
      }
    }
    std::sort(placed.begin(), placed.end(), std::greater<>());
    for (int at : placed) unpool(static_cast<std::size_t>(at));
    epoch_key(epoch);  // caches r and consumes its bytes if not done yet
    if (window.in_range(a->mask_offset, kMaskBytes)) window.consume(a->mask_offset, kMaskBytes);
    stats.pad_bytes_used += kMaskBytes;
    stats.keys_awaited = awaited.size();
    ++stats.announcements_verified;
    return Check::verified;
  }

  void unpool(std::size_t at) {
    pool_index.erase(pool_key(pool[at]));
    pad.release(pool[at]);
    if (at + 1 != pool.size()) {
      pool[at] = pool.back();
      pool_index[pool_key(pool[at])] = at;
    }
    pool.pop_back();
  }

  // True when every byte of [off, off+n) belongs to a key a verified announcement named.
  bool awaited_covers(std::uint64_t off, std::size_t n) const {
    std::uint64_t o = off;
    const std::uint64_t end = off + n;
    while (o < end) {
      auto it = awaited_ranges.upper_bound(o);
      if (it == awaited_ranges.begin()) return false;
      --it;
      if (it->second <= o) return false;
      o = it->second;
    }
    return true;
  }

  // Pad of a unit that is missing from the window but on its way: every missing byte is
  // in a key a verified announcement named (or, for the first announcement of a stream,
  // one a bootstrap candidate named, whose keys are being fetched).
  bool on_its_way(std::uint64_t off, std::size_t n) const {
    for (std::uint64_t o = off; o < off + n;) {
      if (window.in_range(o, 1) && window.all_present(o, 1)) {
        ++o;
        continue;
      }
      if (awaited_covers(o, 1)) {
        auto it = std::prev(awaited_ranges.upper_bound(o));
        o = it->second;
        continue;
      }
      const auto end = bootstrap_keys_end(o);
      if (!end) return false;
      o = *end;
    }
    return true;
  }

  bool is_repeat(const Announcement& a) const {
    return a.mask_offset < window.base() || (window.in_range(a.mask_offset, kMaskBytes) &&
                                             window.any_used(a.mask_offset, kMaskBytes));
  }

  // How an announcement that cannot be verified yet could be: `nowhere` if it names pad
  // this receiver will never hold (forged, or sent on key this receiver lost), `own_key`
  // if only its own keys can verify it (fetch them first), else `awaited`.
  Source verifiable_from(const Announcement& a) const {
    Source worst = Source::window;
    const std::uint64_t r_at = a.mask_offset / E * E;
    const bool r_cached =
        epoch_keys[(a.mask_offset / E) % epoch_keys.size()].epoch == a.mask_offset / E;
    for (const auto& [from, n] : {std::pair{r_at, r_cached ? std::size_t{0} : kAuthKeyBytes},
                                  std::pair{a.mask_offset, kMaskBytes}}) {
      for (std::size_t i = 0; i < n; ++i) {
        const Source s = source_of(from + i, a);
        if (s == Source::nowhere) return Source::nowhere;
        if (s == Source::own_key) worst = Source::own_key;
        if (s == Source::awaited && worst == Source::window) worst = Source::awaited;
      }
    }
    return worst;
  }

  Verdict on_announcement(std::span<const std::uint8_t> record) {
    const auto a = parse_announcement(record);
    if (!a) {
      ++stats.malformed;
      return Verdict::malformed;
    }
    if (is_repeat(*a)) {
      ++stats.announcement_repeats;
      return Verdict::repeat;
    }
    for (std::size_t i = 0; i < pending_count; ++i) {
      if (pending[i].size == record.size() &&
          std::memcmp(pending[i].bytes.data(), record.data(), record.size()) == 0) {
        return Verdict::announcement_pending;  // a repeat of a candidate: nothing new
      }
    }
    pull_segments();
    switch (verify(record)) {
      case Check::verified:
        pull_segments();  // keys it asked for that are already here
        retry_pending();
        return Verdict::announcement;
      case Check::bad:
        ++stats.auth_failures;
        return Verdict::auth_failure;
      case Check::missing:
        break;
    }
    const Source how = verifiable_from(*a);
    if (how == Source::nowhere) {
      ++stats.announcements_unverifiable;
      return Verdict::no_key;
    }
    const bool bootstrap = how == Source::own_key;
    std::size_t bootstraps = 0;
    for (std::size_t i = 0; i < pending_count; ++i) bootstraps += pending[i].bootstrap ? 1 : 0;
    if (pending_count >= pending_limit ||
        (bootstrap && bootstraps >= config.max_bootstrap_candidates)) {
      ++stats.announcements_refused;  // never evict: the genuine one may be among them
      return Verdict::no_key;
    }
    if (pending_count == pending.size()) pending.emplace_back().bytes.resize(kMaxAnnouncementBytes);
    Pending& p = pending[pending_count++];
    std::memcpy(p.bytes.data(), record.data(), record.size());
    p.size = record.size();
    p.bootstrap = bootstrap;
    p.expires = std::chrono::steady_clock::now() + config.candidate_ttl;
    stats.announcements_pending = pending_count;
    if (bootstrap) {
      // Only its own keys can verify it: fetch them (kept unplaced until it verifies).
      for (std::size_t i = 0; i < a->count; ++i) {
        pad.request(KeyAnnouncement{a->base + i * a->key_length, a->id(i), a->key_length});
      }
      const std::uint64_t verified = stats.announcements_verified;
      if (pull_segments()) retry_pending();
      if (stats.announcements_verified != verified) return Verdict::announcement;
    }
    return Verdict::announcement_pending;
  }

  bool pull_segments() {
    bool got = false;
    while (auto segment = pad.pop_segment()) {
      got = true;
      // A key a verified announcement named: straight to its place.
      if (auto it = awaited.find(
              std::make_pair(segment->key_id, static_cast<std::uint32_t>(segment->bytes.size())));
          it != awaited.end()) {
        place(it->second, segment->bytes);
        awaited_ranges.erase(it->second);
        awaited.erase(it);
        pad.release(*segment);
        stats.keys_awaited = awaited.size();
        continue;
      }
      if (pool_index.contains(pool_key(*segment))) {  // a second delivery of a key: wipe
        pad.release(*segment);
        continue;
      }
      if (pool.size() == config.max_unplaced_keys) unpool(0);  // never announced validly: wipe
      pool_index[pool_key(*segment)] = pool.size();
      pool.push_back(*segment);
    }
    return got;
  }

  void retry_pending() {
    const auto now = std::chrono::steady_clock::now();
    bool progress = true;
    while (progress && pending_count > 0) {
      progress = false;
      for (std::size_t i = 0; i < pending_count;) {
        const std::span<const std::uint8_t> rec(pending[i].bytes.data(), pending[i].size);
        const auto a = parse_announcement(rec);
        Check c = Check::bad;
        if (a && !is_repeat(*a)) {
          c = verify(rec);
          if (c == Check::bad) ++stats.auth_failures;
        }
        if (c == Check::missing) {
          if (pending[i].expires > now && verifiable_from(*a) != Source::nowhere &&
              !(pending[i].bootstrap && names_lost_key(*a))) {
            ++i;
            continue;
          }
          ++stats.announcements_expired;
        }
        std::swap(pending[i], pending[pending_count - 1]);
        --pending_count;
        progress = progress || c == Check::verified;
      }
    }
    stats.announcements_pending = pending_count;
  }

  // Checks the pad of a unit at P with n payload bytes; on success returns r and leaves
  // s || pad in `scratch`.
  Verdict load_pad(std::uint64_t p, std::size_t n, const std::uint8_t*& r) {
    if (!fits_epoch(p, n)) {
      ++stats.malformed;
      return Verdict::malformed;
    }
    const std::size_t need = kMaskBytes + n;
    if (p < window.base()) {
      ++stats.replays;  // its key was destroyed when the window moved past it
      return Verdict::replay;
    }
    if (!window.in_range(p, need) || !window.all_present(p, need)) {
      if (on_its_way(p, need)) {
        ++stats.key_pending;
        return Verdict::key_pending;
      }
      ++stats.no_key;
      return Verdict::no_key;
    }
    if (window.any_used(p, need)) {
      ++stats.replays;
      return Verdict::replay;
    }
    r = epoch_key(p / E);
    if (!r) {
      ++stats.no_key;
      return Verdict::no_key;
    }
    window.copy_out(p, need, scratch.span().data());
    return Verdict::plaintext;
  }

  keys::PadSource& pad;
  DecoderConfig config;
  PadWindow window;
  std::vector<EpochKey> epoch_keys;
  SecretBytes scratch;
  std::vector<PadSegment> pool;  // fetched keys not yet placed by a verified announcement
  std::map<std::pair<keys::KeyId, std::uint32_t>, std::size_t> pool_index;  // into `pool`
  // Keys named by verified announcements, asked for, not yet here: (key_ID, length) ->
  // offset, and the pad ranges they cover (offset -> end).
  std::map<std::pair<keys::KeyId, std::uint32_t>, std::uint64_t> awaited;
  std::map<std::uint64_t, std::uint64_t> awaited_ranges;
  std::set<keys::KeyId> lost_ids;  // recently declared lost by the source
  std::deque<keys::KeyId> lost_order;
  std::chrono::steady_clock::time_point next_expiry_check;
  std::vector<Pending> pending;
  std::size_t pending_count = 0;
  std::size_t pending_limit = 0;
  WegmanCarter mac;
  DecoderStats stats;
  struct AesKey {
    std::uint64_t offset = UINT64_MAX;
    std::unique_ptr<SrtpSession> session;
    std::uint64_t last_use = 0;
  };
  std::array<AesKey, 4> aes_keys;  // recent AES master keys (rekeys overlap in flight)
  std::uint64_t aes_clock = 0;

  // Reads the AES key drawn at `key_offset` (both modes) without consuming it: the caller
  // consumes it once a unit authenticates under it, so forgeries cost no pad.
  Verdict read_new_aes_key(std::uint64_t key_offset, std::uint8_t (&key)[kAesKeyBytes]) {
    if (!fits_epoch(key_offset, kAesKeyPayload)) {
      ++stats.malformed;
      return Verdict::malformed;
    }
    if (key_offset < window.base()) {
      ++stats.replays;
      return Verdict::replay;
    }
    if (!window.in_range(key_offset, kAesKeyBytes) ||
        !window.all_present(key_offset, kAesKeyBytes)) {
      if (on_its_way(key_offset, kAesKeyBytes)) {
        ++stats.key_pending;
        return Verdict::key_pending;
      }
      ++stats.no_key;
      return Verdict::no_key;
    }
    if (window.any_used(key_offset, kAesKeyBytes)) {
      ++stats.replays;
      return Verdict::replay;
    }
    window.copy_out(key_offset, kAesKeyBytes, key);
    return Verdict::plaintext;
  }

  Verdict open_aes(std::span<const std::uint8_t> in, std::uint64_t key_offset, DatagramType type,
                   std::span<std::uint8_t> out, std::size_t& written) {
    const std::size_t srtp_length = srtp_packet_of(in, out);
    std::size_t length = 0;
    auto unprotect = [&](SrtpSession& session) {
      length = srtp_length;
      switch (session.unprotect(type, out.data(), length)) {
        case SrtpSession::Unprotected::ok:
          return Verdict::plaintext;
        case SrtpSession::Unprotected::replay:
          ++stats.replays;
          return Verdict::replay;
        case SrtpSession::Unprotected::failed:
          break;
      }
      ++stats.auth_failures;
      return Verdict::auth_failure;
    };
    for (auto& k : aes_keys) {
      if (k.offset != key_offset || !k.session) continue;
      k.last_use = ++aes_clock;
      if (const Verdict v = unprotect(*k.session); v != Verdict::plaintext) return v;
      written = length;
      ++stats.units;
      ++stats.aes_units;
      return Verdict::plaintext;
    }
    // A key not seen yet: read it, and consume it only once a packet authenticates.
    std::uint8_t key[kAesKeyBytes];
    if (const Verdict v = read_new_aes_key(key_offset, key); v != Verdict::plaintext) return v;
    auto session = std::make_unique<SrtpSession>(key, false);
    OPENSSL_cleanse(key, sizeof key);
    if (const Verdict v = unprotect(*session); v != Verdict::plaintext) return v;
    window.consume(key_offset, kAesKeyBytes);
    stats.pad_bytes_used += kAesKeyBytes;
    auto oldest =
        std::min_element(aes_keys.begin(), aes_keys.end(),
                         [](const AesKey& a, const AesKey& b) { return a.last_use < b.last_use; });
    *oldest = AesKey{key_offset, std::move(session), ++aes_clock};
    written = length;
    ++stats.units;
    ++stats.aes_units;
    return Verdict::plaintext;
  }

  // Stream mode AES: the stream's current key (keys only move forward in a stream).
  std::unique_ptr<GcmKey> gcm;
  std::uint64_t gcm_key_offset = UINT64_MAX;

  // Opens a stream-mode AES record into `out`; the key is consumed only once a record
  // authenticates under it, so a forged record naming unseen pad costs no pad.
  Verdict open_record_aes(std::span<const std::uint8_t> record, std::uint64_t index,
                          std::uint64_t key_offset, std::size_t n, std::span<std::uint8_t> out) {
    const std::uint8_t* in = record.data() + kRecordHeaderBytes;
    std::uint8_t tag[kTagBytes];
    std::memcpy(tag, in + n, kTagBytes);
    if (gcm && key_offset == gcm_key_offset) {
      if (!gcm->seal(index, record.first(kRecordHeaderBytes), in, n, out.data(), tag)) {
        OPENSSL_cleanse(out.data(), n);
        ++stats.auth_failures;
        return Verdict::auth_failure;
      }
      return Verdict::plaintext;
    }
    std::uint8_t key[kAesKeyBytes];
    if (const Verdict v = read_new_aes_key(key_offset, key); v != Verdict::plaintext) return v;
    auto candidate = std::make_unique<GcmKey>(key, false);
    OPENSSL_cleanse(key, sizeof key);
    if (!candidate->seal(index, record.first(kRecordHeaderBytes), in, n, out.data(), tag)) {
      OPENSSL_cleanse(out.data(), n);
      ++stats.auth_failures;
      return Verdict::auth_failure;
    }
    window.consume(key_offset, kAesKeyBytes);
    stats.pad_bytes_used += kAesKeyBytes;
    gcm = std::move(candidate);
    gcm_key_offset = key_offset;
    return Verdict::plaintext;
  }

  // Stream mode.
  bool stream_started = false;
  bool stream_done = false;
  std::uint64_t stream_id = 0;
  std::uint64_t next_index = 0;
};

Decoder::Decoder(keys::PadSource& pad, DecoderConfig config)
    : impl_(std::make_unique<Impl>(pad, config)) {}
Decoder::~Decoder() = default;

void Decoder::poll() {
  Impl& d = *impl_;
  bool got = d.pull_segments();
  // Keys the source declared lost: nothing waits for them any more.
  while (auto lost = d.pad.next_lost()) {
    if (auto it = d.awaited.find({lost->key_id, lost->length}); it != d.awaited.end()) {
      d.awaited_ranges.erase(it->second);
      d.awaited.erase(it);
      d.stats.keys_awaited = d.awaited.size();
    }
    ++d.stats.keys_lost;
    d.lost_ids.insert(lost->key_id);
    d.lost_order.push_back(lost->key_id);
    if (d.lost_order.size() > 4096) {  // recent ones suffice: candidates expire anyway
      d.lost_ids.erase(d.lost_order.front());
      d.lost_order.pop_front();
    }
    got = true;  // candidates that needed them are dropped below
  }
  if (got || (d.pending_count > 0 && std::chrono::steady_clock::now() >= d.next_expiry_check)) {
    d.next_expiry_check = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
    d.retry_pending();
  }
}

Decoder::Verdict Decoder::open_datagram(std::span<const std::uint8_t> in,
                                        std::span<std::uint8_t> out, std::size_t& written) {
  Impl& d = *impl_;
  written = 0;
  poll();
  const DatagramType type = classify(in);
  if (type == DatagramType::announcement) return d.on_announcement(in);
  const auto header = type == DatagramType::unknown || in.size() < kTrailerBytes
                          ? std::nullopt
                          : clear_header_length(in.first(in.size() - kTrailerBytes), type);
  if (!header || out.size() < in.size()) {
    ++d.stats.malformed;
    return Verdict::malformed;
  }
  const std::uint8_t* trailer = in.data() + in.size() - kTrailerBytes;
  const std::uint64_t p = *datagram_pad_offset(in);  // in.size() >= kTrailerBytes
  if (p & kAesFlag) return d.open_aes(in, p & ~kAesFlag, type, out, written);
  const std::size_t n = in.size() - kTrailerBytes - *header;
  const std::uint8_t* r = nullptr;
  if (const Verdict v = d.load_pad(p, n, r); v != Verdict::plaintext) return v;

  std::uint8_t tag[kTagBytes];
  const std::uint8_t kind = type == DatagramType::rtp ? 'R' : 'C';
  d.mac.tag(r, d.scratch.span().data(), {{&kind, 1}, in.first(in.size() - kTagBytes)}, tag);
  if (CRYPTO_memcmp(tag, trailer + kOffsetBytes, kTagBytes) != 0) {
    OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
    ++d.stats.auth_failures;  // nothing consumed: a forgery cannot burn pad
    return Verdict::auth_failure;
  }
  std::memcpy(out.data(), in.data(), *header);
  xor_into(out.data() + *header, in.data() + *header, d.scratch.span().data() + kMaskBytes, n);
  OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
  d.window.consume(p, kMaskBytes + n);
  written = *header + n;
  ++d.stats.units;
  d.stats.payload_bytes += n;
  d.stats.pad_bytes_used += kMaskBytes + n;
  return Verdict::plaintext;
}

std::optional<std::size_t> Decoder::record_size(std::span<const std::uint8_t> prefix) {
  return otp::record_size(prefix);
}

Decoder::Verdict Decoder::open_record(std::span<const std::uint8_t> record,
                                      std::span<std::uint8_t> out, std::size_t& written,
                                      RecordKind& kind) {
  Impl& d = *impl_;
  written = 0;
  poll();
  const auto size = otp::record_size(record);
  const auto header = parse_record_header(record);
  if (!size || *size != record.size() || !header) {
    ++d.stats.malformed;
    return Verdict::malformed;
  }
  kind = header->kind;
  if (kind == RecordKind::announcement) return d.on_announcement(record);
  const std::size_t n = record.size() - kRecordOverhead;
  if (out.size() < n) {
    ++d.stats.malformed;
    return Verdict::malformed;
  }
  const std::uint64_t id = header->stream_id;
  const std::uint64_t index = header->index;
  const std::uint64_t p = header->pad_offset;
  auto in_sequence = [&] {
    return !d.stream_done && (d.stream_started ? (kind != RecordKind::stream_start &&
                                                  id == d.stream_id && index == d.next_index)
                                               : (kind == RecordKind::stream_start && index == 0));
  };
  if (p & kAesFlag) {
    // Sequence first: a record out of order must not move the stream's key forward.
    if (!in_sequence()) return Verdict::out_of_sequence;
    if (const Verdict v = d.open_record_aes(record, index, p & ~kAesFlag, n, out);
        v != Verdict::plaintext) {
      return v;
    }
    d.stream_started = true;
    d.stream_id = id;
    d.next_index = index + 1;
    d.stream_done = kind == RecordKind::final;
    written = n;
    ++d.stats.units;
    ++d.stats.aes_units;
    d.stats.payload_bytes += n;
    return Verdict::plaintext;
  }
  const std::uint8_t* r = nullptr;
  if (const Verdict v = d.load_pad(p, n, r); v != Verdict::plaintext) return v;
  std::uint8_t tag[kTagBytes];
  d.mac.tag(r, d.scratch.span().data(), {record.first(kRecordHeaderBytes + n)}, tag);
  if (CRYPTO_memcmp(tag, record.data() + kRecordHeaderBytes + n, kTagBytes) != 0) {
    OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
    ++d.stats.auth_failures;
    return Verdict::auth_failure;
  }
  d.window.consume(p, kMaskBytes + n);
  d.stats.pad_bytes_used += kMaskBytes + n;
  // Authentic; now the stream's order: start, data 1..k, final; one stream only.
  if (!in_sequence()) {
    OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
    return Verdict::out_of_sequence;
  }
  d.stream_started = true;
  d.stream_id = id;
  d.next_index = index + 1;
  d.stream_done = kind == RecordKind::final;
  xor_into(out.data(), record.data() + kRecordHeaderBytes, d.scratch.span().data() + kMaskBytes, n);
  OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
  written = n;
  ++d.stats.units;
  d.stats.payload_bytes += n;
  return Verdict::plaintext;
}

std::string Decoder::explain_no_key(std::uint64_t p, std::size_t n) const {
  const Impl& d = *impl_;
  const std::size_t need = kMaskBytes + n;
  std::uint64_t missing[4] = {};
  int shown = 0;
  for (std::uint64_t o = p; o < p + need && shown < 4; o += 1024) {
    if (d.window.in_range(o, 1) && !d.window.all_present(o, 1)) missing[shown++] = o;
  }
  const Impl::EpochKey& k = d.epoch_keys[(p / E) % d.epoch_keys.size()];
  char text[320];
  std::snprintf(text, sizeof text,
                "window base %llu, in range %d, keys fetched and unplaced %zu, announcements "
                "pending %zu, r %s, %d missing 1 KiB pieces from %llu",
                static_cast<unsigned long long>(d.window.base()), int(d.window.in_range(p, need)),
                d.pool.size(), d.pending_count, k.epoch == p / E ? "cached" : "not cached", shown,
                static_cast<unsigned long long>(missing[0]));
  return text;
}

void Decoder::use_stream_limits() {
  impl_->pending_limit = std::max(impl_->pending_limit, impl_->config.max_pending_stream);
}

bool Decoder::stream_finished() const {
  return impl_->stream_done;
}
const DecoderStats& Decoder::stats() const {
  return impl_->stats;
}

}  // namespace otpgate::otp

// SPDX-License-Identifier: LGPL-2.1-or-later
// The receiver: verifies announcements (at once, deferred until the keys they need
// arrive, or from their own keys when they start a stream) and places their keys in the
// pad window; authenticates each unit before anything is output or consumed; refuses
// replays; tells a key on its way (key_pending) from pad nobody announced (no_key).
#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <set>

#include "aes_modes.hpp"
#include "otpgate/checked_cast.hpp"
#include "otpgate/otp_codec.hpp"
#include "pad_window.hpp"
#include "wegman_carter.hpp"

namespace otpgate::otp {

using keys::KeyAnnouncement;
using keys::PadSegment;
using keys::SecretBytes;

namespace {

constexpr std::uint64_t E = kEpochBytes;

}  // namespace

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
    std::uint64_t keys_begin = 0, keys_end = 0;  // the pad its keys would hold
    std::uint64_t mask_offset = 0;
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
    first_placed = std::min(first_placed, offset);
    // A key whose memory cannot be locked is not held (fail closed): its units find no
    // key, and the count says why (the gst element reports it).
    if (!window.place(offset, key)) ++stats.memory_lock_failures;
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
    if (awaited_covers(o, 1) || candidate_keys_end(o)) return Source::awaited;
    return Source::nowhere;
  }

  // True when the source declared one of a bootstrap candidate's keys lost.
  bool names_lost_key(const Announcement& a) const {
    for (std::size_t i = 0; i < a.count; ++i) {
      if (lost_ids.contains(a.id(i))) return true;
    }
    return false;
  }

  // Where the pad that candidates' keys would hold and that holds `o` ends, if any does.
  // A candidate can be verified once the keys it depends on are placed: a bootstrap's own
  // (being fetched), those of a verified announcement (awaited) or of another candidate
  // (verified in turn). With small keys (256 bits: 2 KiB per announcement) a stream's
  // later announcements depend on earlier candidates several deep while the receiving KME
  // relays the first keys; their pad is on its way all the same. A candidate's keys count
  // only if it is a bootstrap or its mask lies below them, as a genuine sender's always
  // does (its masks come from pad it announced earlier): forged candidates can then never
  // vouch for each other in a cycle, and each falls with what it depends on. They are
  // bounded by pending_limit and refuted (or expire) when those keys arrive.
  std::optional<std::uint64_t> candidate_keys_end(std::uint64_t o) const {
    if (candidate_ranges_stale) {
      candidate_ranges.clear();
      for (std::size_t i = 0; i < pending_count; ++i) add_candidate_range(pending[i]);
      candidate_ranges_stale = false;
    }
    auto it = candidate_ranges.upper_bound(o);
    if (it == candidate_ranges.begin()) return std::nullopt;
    --it;
    if (o >= it->second) return std::nullopt;
    return it->second;
  }
  // Merges a candidate's keys into candidate_ranges (disjoint: an overlap is one range).
  void add_candidate_range(const Pending& p) const {
    if (!p.bootstrap && p.mask_offset + kMaskBytes > p.keys_begin) return;
    std::uint64_t begin = p.keys_begin, end = p.keys_end;
    if (begin >= end) return;
    auto it = candidate_ranges.upper_bound(begin);
    if (it != candidate_ranges.begin() && std::prev(it)->second >= begin) {
      --it;
      begin = it->first;
      end = std::max(end, it->second);
      it = candidate_ranges.erase(it);
    }
    while (it != candidate_ranges.end() && it->first <= end) {
      end = std::max(end, it->second);
      it = candidate_ranges.erase(it);
    }
    candidate_ranges.emplace(begin, end);
  }

  // Pool index of the fetched key `id` of `length` bytes, or -1.
  int pooled(const keys::KeyId& id, std::uint32_t length) const {
    const auto it = pool_index.find({id, length});
    return it == pool_index.end() ? -1 : checked_cast<int>(it->second);
  }
  // How fetched keys are matched (in `pool` and `awaited`): key_ID and length.
  static std::pair<keys::KeyId, std::uint32_t> pool_key(const PadSegment& s) {
    return {s.key_id, checked_cast<std::uint32_t>(s.bytes.size())};
  }

  // Pad for verifying an announcement: from the window, or from the announcement's own
  // keys (fetched, not yet placed) at the offsets it claims (this bootstraps a stream).
  bool gather(std::uint64_t off, std::size_t n, const Announcement& a,
              const std::array<int, kMaxAnnouncedKeys>& found, std::uint8_t* out,
              bool& own_keys_used) {
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint64_t o = off + i;
      switch (source_of(o, a)) {
        case Source::window:
          window.copy_out(o, 1, out + i);
          break;
        case Source::own_key: {
          const int at = found[(o - a.base) / a.key_length];
          if (at < 0) return false;
          out[i] = pool[checked_cast<std::size_t>(at)].bytes[(o - a.base) % a.key_length];
          own_keys_used = true;
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
    bool self_verifying = false;
    if (cached.epoch == epoch) {
      std::memcpy(r, cached.r.data(), sizeof r);
    } else if (!gather(epoch * E, kAuthKeyBytes, *a, found, r, self_verifying)) {
      return Check::missing;
    }
    if (!gather(a->mask_offset, kMaskBytes, *a, found, s, self_verifying)) {
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
        place(offset, pool[checked_cast<std::size_t>(found[i])].bytes);
        placed.push_back(found[i]);
      } else if (offset + a->key_length > window.base() && awaited.size() < kMaxAwaited) {
        awaited.emplace(std::make_pair(a->id(i), a->key_length), offset);
        awaited_ranges[offset] = offset + a->key_length;
        pad.request(KeyAnnouncement{offset, a->id(i), a->key_length});
      }
    }
    std::sort(placed.begin(), placed.end(), std::greater<>());
    for (int at : placed) unpool(checked_cast<std::size_t>(at));
    epoch_key(epoch);  // caches r and consumes its bytes if not done yet
    if (window.in_range(a->mask_offset, kMaskBytes)) window.consume(a->mask_offset, kMaskBytes);
    stats.pad_bytes_used += kMaskBytes;
    stats.keys_awaited = awaited.size();
    // A pad stream resuming beyond a gap from its own keys on a journal chunk boundary:
    // see DecoderStats. A running sender's periodic resync moves on to the next epoch
    // boundary (a gap below E); its flushes (a KME outage, begin_stream) land on epoch
    // boundaries, beyond pad it never announced; a lost announcement leaves a gap of its
    // own span. A restarted sender resumes at its journal's reservation (missed when the
    // old one stopped within the threshold below it).
    const std::uint64_t span = std::uint64_t{a->count} * a->key_length;
    const std::uint64_t threshold = std::max<std::uint64_t>(E, 2 * largest_span);
    const std::uint64_t alignment = std::max<std::uint64_t>(1, config.sender_restart_alignment);
    if (self_verifying && stats.announcements_verified > 0 && a->base >= announced_end &&
        a->base - announced_end >= threshold && a->base % alignment == 0) {
      ++stats.sender_restarts;
    }
    announced_end = std::max(announced_end, a->base + span);
    largest_span = std::max(largest_span, span);
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
      const auto end = candidate_keys_end(o);
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
    p.keys_begin = a->base;
    p.keys_end = a->base + std::uint64_t{a->count} * a->key_length;
    p.mask_offset = a->mask_offset;
    if (!candidate_ranges_stale) add_candidate_range(p);  // else rebuilt on the next use
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
      if (auto it = awaited.find(pool_key(*segment)); it != awaited.end()) {
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
      // Candidates' ranges are rebuilt once per pass, not per removal (thousands of
      // candidates in stream mode): within a pass they may still count one just dropped,
      // which only keeps others a pass longer.
      bool removed = false;
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
        removed = true;
        progress = progress || c == Check::verified;
      }
      if (removed) candidate_ranges_stale = true;
    }
    stats.announcements_pending = pending_count;
  }

  // Whether the pad of a unit at P with n payload bytes (kMaskBytes + n from P) can be
  // used now: `plaintext` if it is all here and unused, else why not (counted).
  Verdict check_pad(std::uint64_t p, std::size_t n) {
    if (!fits_epoch(p, n)) {
      ++stats.malformed;
      return Verdict::malformed;
    }
    const std::size_t need = kMaskBytes + n;
    if (p < window.base()) {
      // Its key was destroyed when the window moved past it: an old unit replayed, or, on
      // this session's pad beyond any unit used so far, a window smaller than the sender's
      // lead.
      if (p >= std::max(used_end, first_placed)) {
        ++stats.window_overruns;
        return Verdict::window_overrun;
      }
      ++stats.replays;
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
    return Verdict::plaintext;
  }

  // Checks the pad of a unit at P with n payload bytes; on success returns r and leaves
  // s || pad in `scratch`.
  Verdict load_pad(std::uint64_t p, std::size_t n, const std::uint8_t*& r) {
    if (const Verdict v = check_pad(p, n); v != Verdict::plaintext) return v;
    r = epoch_key(p / E);
    if (!r) {
      ++stats.no_key;
      return Verdict::no_key;
    }
    window.copy_out(p, kMaskBytes + n, scratch.span().data());
    return Verdict::plaintext;
  }

  keys::PadSource& pad;
  DecoderConfig config;
  PadWindow window;
  std::uint64_t used_end = 0;               // end of the furthest pad an authenticated unit used
  std::uint64_t first_placed = UINT64_MAX;  // lowest pad a verified key of this session covers
  void used(std::uint64_t p, std::size_t n) {
    window.consume(p, n);
    used_end = std::max(used_end, p + n);
  }
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
  std::uint64_t announced_end = 0;  // end of the furthest keys a verified announcement named
  std::uint64_t largest_span = 0;   // of the keys one verified announcement named
  // Merged pad ranges of the candidates' keys (see candidate_keys_end), rebuilt on use
  // after the candidates changed.
  mutable std::map<std::uint64_t, std::uint64_t> candidate_ranges;
  mutable bool candidate_ranges_stale = true;
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
    static_assert(kMaskBytes + kAesKeyPayload == kAesKeyBytes);
    if (const Verdict v = check_pad(key_offset, kAesKeyPayload); v != Verdict::plaintext) return v;
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
  if (p & kAesFlag) {
    if (!d.config.accept_aes) {
      ++d.stats.cipher_refused;
      return Verdict::cipher_refused;
    }
    return d.open_aes(in, p & ~kAesFlag, type, out, written);
  }
  const std::size_t n = in.size() - kTrailerBytes - *header;
  const std::uint8_t* r = nullptr;
  if (const Verdict v = d.load_pad(p, n, r); v != Verdict::plaintext) return v;

  std::uint8_t tag[kTagBytes];
  const std::uint8_t kind = authenticated_kind(type);
  d.mac.tag(r, d.scratch.span().data(), {{&kind, 1}, in.first(in.size() - kTagBytes)}, tag);
  if (CRYPTO_memcmp(tag, trailer + kOffsetBytes, kTagBytes) != 0) {
    OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
    ++d.stats.auth_failures;  // nothing consumed: a forgery cannot burn pad
    return Verdict::auth_failure;
  }
  std::memcpy(out.data(), in.data(), *header);
  xor_into(out.data() + *header, in.data() + *header, d.scratch.span().data() + kMaskBytes, n);
  OPENSSL_cleanse(d.scratch.span().data(), kMaskBytes + n);
  d.used(p, kMaskBytes + n);
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
    if (!d.config.accept_aes) {
      ++d.stats.cipher_refused;
      return Verdict::cipher_refused;
    }
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
  d.used(p, kMaskBytes + n);
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

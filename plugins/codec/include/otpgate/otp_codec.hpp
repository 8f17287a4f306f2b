// SPDX-License-Identifier: LGPL-2.1-or-later
// The one-time-pad packet codec: the one implementation of the wire format in
// docs/wire-format.md, used by otpencrypt/otpdecrypt and by the file transfer.
//
// Every protected unit (an RTP or RTCP packet, a stream record, a key announcement)
// draws 16 + n bytes of pad at pad offset P, within one epoch of kEpochBytes:
//   s = pad[P, P+16)                 one-time mask of the Wegman-Carter tag
//   pad[P+16, P+16+n)                XORed with the n payload bytes
//   r = pad[E*k, E*k+16), k = P / E  Poly1305 hash key shared by the epoch
//   tag = Poly1305(r || s, authenticated bytes) = (h_r(m) + s) mod 2^128
// No pad byte is used for two purposes: the receiver tracks every byte it used.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "otpgate/keyclient.hpp"
#include "otpgate/otp_wire.hpp"  // sizes, unit kinds, parsing and writing unit headers

namespace otpgate::otp {

// A one-time sealed message (e.g. the gateways' ICE descriptions): `key` is fresh pad of
// at least kMaskBytes + kAuthKeyBytes + plaintext size bytes, never used again. The
// first 32 bytes key Poly1305 (r || s) over the ciphertext, the rest is XORed with it.
std::vector<std::uint8_t> seal_message(std::span<const std::uint8_t> key,
                                       std::span<const std::uint8_t> plaintext);
std::optional<std::vector<std::uint8_t>> open_message(std::span<const std::uint8_t> key,
                                                      std::span<const std::uint8_t> sealed);

struct EncoderStats {
  std::uint64_t units = 0;              // packets and records protected
  std::uint64_t payload_bytes = 0;      // plaintext bytes protected
  std::uint64_t pad_bytes_used = 0;     // pad drawn for payloads, masks and r keys
  std::uint64_t pad_bytes_skipped = 0;  // pad wiped unused at epoch boundaries
  std::uint64_t announcements = 0;      // announcement units sent (first time)
  std::uint64_t announcement_repeats = 0;
  std::uint64_t announcement_bytes = 0;  // wire bytes of announcements incl. repeats
  std::uint64_t keys_announced = 0;
  std::uint64_t no_key = 0;      // units refused for lack of pad
  std::uint64_t aes_units = 0;   // of `units`, those sent in AES mode
  std::uint64_t aes_rekeys = 0;  // AES master keys drawn from the pad
};

struct DecoderStats {
  std::uint64_t units = 0;  // authenticated and decrypted
  std::uint64_t payload_bytes = 0;
  std::uint64_t pad_bytes_used = 0;
  std::uint64_t auth_failures = 0;
  std::uint64_t replays = 0;  // pad already used, or its key already destroyed
  std::uint64_t no_key = 0;   // pad not (yet) fetched
  std::uint64_t malformed = 0;
  std::uint64_t announcements_verified = 0;
  std::uint64_t announcement_repeats = 0;
  std::uint64_t announcements_pending = 0;       // now waiting for keys or for pad to verify them
  std::uint64_t announcements_unverifiable = 0;  // name pad this receiver never holds: dropped
  std::uint64_t announcements_refused = 0;       // the candidate table was full: dropped
  std::uint64_t announcements_expired = 0;       // never verified in time: dropped
  std::uint64_t keys_awaited = 0;  // keys of verified announcements still being fetched
  std::uint64_t keys_lost = 0;     // keys the source declared lost (nothing waits for them)
  std::uint64_t key_pending = 0;   // units whose key a verified announcement has on its way
  std::uint64_t keys_placed = 0;
  // Units on pad beyond any used so far that the window had already wiped, as verified
  // keys announced further ahead than it holds arrived: window_bytes is smaller than the
  // sender's lead (not an attack on its own: forgeries never move the window).
  std::uint64_t window_overruns = 0;
  std::uint64_t aes_units = 0;       // of `units`, those in AES mode
  std::uint64_t cipher_refused = 0;  // AES-mode units refused (DecoderConfig::accept_aes)
  // Keys (of keys_placed) whose pad could not all be held because the pad window could
  // not lock memory for it (RLIMIT_MEMLOCK reached): that pad was dropped unwritten, never
  // kept in memory that could be swapped out; units on it are refused as no_key.
  std::uint64_t memory_lock_failures = 0;
  // The sender's pad stream resumed beyond a gap, at a self-verifying announcement on a
  // DecoderConfig::sender_restart_alignment boundary, once this receiver had verified
  // others: the sending side restarted (a new process resumes at its journal's
  // reservation). Its own receiver is then likely new too, and knows nothing of what was
  // announced to it. (A running sender's flush lands there too about once in 64.)
  std::uint64_t sender_restarts = 0;
};

class Encoder {
 public:
  enum class Status { ok, no_key, malformed };

  // `stream_id` names a stream-mode stream (authenticated in each record).
  Encoder(keys::PadSource& pad, std::uint64_t stream_id, unsigned announcement_repeats = 2);
  ~Encoder();
  Encoder(const Encoder&) = delete;
  Encoder& operator=(const Encoder&) = delete;

  // Writes the next announcement to send into `out` (>= kMaxAnnouncementBytes) and
  // returns its size; 0 when there is none. Call until 0 before every protect call:
  // new keys first, then (datagram mode) repeats that fell due.
  std::size_t next_announcement(std::span<std::uint8_t> out, bool with_repeats);

  // RTP or RTCP: `out` >= in.size() + kTrailerBytes; `written` is the wire size.
  Status protect_datagram(std::span<const std::uint8_t> in, std::span<std::uint8_t> out,
                          std::size_t& written);

  // AES mode: SRTP AES-256-GCM (libsrtp2) with a master key drawn from the pad, a new
  // one every `rekey_interval` packets while pad lasts; when pad runs out the current
  // key carries on (that is what AES fallback is for). no_key only if there never was
  // a key. `out` >= in.size() + kMaxDatagramOverhead.
  Status protect_datagram_aes(std::span<const std::uint8_t> in, std::span<std::uint8_t> out,
                              std::size_t& written, std::uint32_t rekey_interval);
  // Draws an AES master key now if there is none (so that fallback has one ready).
  bool prepare_aes();
  // The receiver that could derive the current AES master key is gone (the partner
  // restarted): the next AES packet draws a new one from the pad, or finds no key.
  void forget_aes_key();
  std::uint64_t aes_rekeys() const;

  // Stream mode: the next record of `kind` carrying the first `consumed` bytes of
  // `payload` (fewer than offered at an epoch boundary). `out` >= payload + kRecordOverhead.
  Status protect_record(RecordKind kind, std::span<const std::uint8_t> payload,
                        std::span<std::uint8_t> out, std::size_t& consumed, std::size_t& written);

  // Stream mode, AES: like protect_record, but the payload is AES-256-GCM encrypted under
  // a key drawn from the pad (its offset, with kAesFlag, in the P field), a new key every
  // `rekey_interval` records while pad lasts. For transfers whose size the key budget
  // cannot cover; needs pad only for the keys.
  Status protect_record_aes(RecordKind kind, std::span<const std::uint8_t> payload,
                            std::span<std::uint8_t> out, std::size_t& consumed,
                            std::size_t& written, std::uint32_t rekey_interval);

  // True when `n` payload bytes could be protected now (for blocking policies).
  bool has_pad_for(std::size_t n) const;
  const EncoderStats& stats() const;
  std::uint64_t stream_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct DecoderConfig {
  std::size_t window_bytes = 16u << 20;  // pad held for reordering and look-ahead
  // Announcements that cannot be verified yet are kept as candidates, never evicted by
  // newer ones (a forgery must not push out a genuine announcement): a full table refuses
  // new candidates, which a genuine sender's repeats bring again.
  std::size_t max_pending_announcements = 256;
  // Stream mode sends each announcement once and may announce a whole key ring ahead of
  // the receiver's KME round trips, so none may be dropped: a far larger bound there.
  std::size_t max_pending_stream = 16384;
  // Of those, candidates whose keys are fetched before they can be verified (the first
  // announcement of a stream, or the first after the sender resumed on fresh key).
  std::size_t max_bootstrap_candidates = 16;
  std::chrono::milliseconds candidate_ttl{8000};  // a candidate not verified by then is dropped
  std::size_t max_unplaced_keys = 65536;
  // A restarted sender resumes at its journal's reservation, in whole chunks of this
  // (KeySupplyConfig::reserve_chunk): only a resumption on such a boundary counts as a
  // restart (sender_restarts). A running sender's flushes (a KME outage, a lane handed to
  // a new stream) and periodic resyncs land on epoch boundaries.
  std::uint64_t sender_restart_alignment = 16u << 20;
  // AES-mode units (a sender with cipher AES-256-GCM, or falling back to it) are opened;
  // false refuses them unopened (cipher_refused), where the receiver's policy allows
  // the one-time pad only: a sender cannot run such a stream in AES unnoticed.
  bool accept_aes = true;
};

class Decoder {
 public:
  enum class Verdict {
    plaintext,             // `out` holds the payload
    announcement,          // verified; its keys are placed
    announcement_pending,  // kept until its keys (or the pad it uses) arrive
    repeat,                // an announcement already verified
    auth_failure,          // tag mismatch: dropped, nothing consumed
    replay,                // pad already used, or below the window (key destroyed)
    window_overrun,        // pad the window wiped unused as keys announced ahead arrived
    no_key,                // pad not here and not announced: dropped at once
    key_pending,           // pad on its way (a verified announcement named its keys)
    malformed,             // unparsable
    out_of_sequence,       // stream mode: wrong stream, index or record after final
    cipher_refused,        // AES mode where DecoderConfig::accept_aes is false: dropped
  };

  Decoder(keys::PadSource& pad, DecoderConfig config = {});
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // RTP, RTCP (OTP or AES mode) or announcement datagram. `out` >= in.size().
  Verdict open_datagram(std::span<const std::uint8_t> in, std::span<std::uint8_t> out,
                        std::size_t& written);

  // Stream mode: total size of the record whose first kRecordPrefixBytes are given, or
  // nullopt if they are not an otpencrypt record (otp::record_size in otp_wire.hpp).
  static std::optional<std::size_t> record_size(std::span<const std::uint8_t> prefix);
  // One whole record. `kind` says what it was; payload (data records) goes to `out`.
  Verdict open_record(std::span<const std::uint8_t> record, std::span<std::uint8_t> out,
                      std::size_t& written, RecordKind& kind);
  bool stream_finished() const;  // the final record was verified
  void use_stream_limits();      // call once the input is known to be a stream
  // Why a unit at P with n payload bytes has no key (for logs; no key bytes).
  std::string explain_no_key(std::uint64_t p, std::size_t n) const;

  // Takes keys the source has fetched and retries pending announcements. Cheap when
  // there is nothing new; called by open_* as well.
  void poll();
  const DecoderStats& stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace otpgate::otp

// SPDX-License-Identifier: LGPL-2.1-or-later
// otpgate key supply: the ETSI GS QKD 014 client, the lock-free key ring and the
// refill thread that keeps it full. See docs/keys.md for the key flow and roles.
//
// Key bytes live only in SecretBytes / KeyRing memory (locked where the OS allows,
// wiped after use) and never appear in logs, exceptions or error text.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace otpgate::keys {

// ---------------------------------------------------------------------------
// Basics

// A 128-bit ETSI 014 key_ID (a UUID). Identifiers are not secret.
class KeyId {
 public:
  KeyId() = default;
  explicit KeyId(const std::array<std::uint8_t, 16>& bytes) : bytes_(bytes) {}
  // Canonical 8-4-4-4-12 hex form, any case; nullopt when malformed.
  static std::optional<KeyId> parse(std::string_view text);
  std::string to_string() const;  // lower-case canonical form
  const std::array<std::uint8_t, 16>& bytes() const { return bytes_; }
  auto operator<=>(const KeyId&) const = default;

 private:
  std::array<std::uint8_t, 16> bytes_{};
};

// Move-only owner of secret bytes: mlock'ed where allowed, OPENSSL_cleanse'd when
// destroyed, truncated or wiped. Up to 16 KiB they come from a pool of memory locked a
// 64 KiB slab at a time and reused (see secret_pool_stats), so that keys fetched by the
// hundred cost no mlock/munlock each; larger ones lock their own pages.
class SecretBytes {
 public:
  SecretBytes() = default;
  explicit SecretBytes(std::size_t size);
  ~SecretBytes();
  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;

  std::span<std::uint8_t> span() { return {data_, size_}; }
  std::span<const std::uint8_t> span() const { return {data_, size_}; }
  std::size_t size() const { return size_; }
  bool locked() const { return locked_; }
  void truncate(std::size_t new_size);  // wipes the dropped tail

 private:
  void release() noexcept;
  std::uint8_t* data_ = nullptr;          // pooled_ ? a pool block : heap_.get()
  std::unique_ptr<std::uint8_t[]> heap_;  // a secret not served by the pool
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  bool locked_ = false;
  bool pooled_ = false;
};

// The process's pool of locked memory for small secrets.
struct SecretPoolStats {
  std::uint64_t slab_locks = 0;     // mlock calls made for slabs, ever
  std::uint64_t lock_refusals = 0;  // times the kernel would not lock a slab (RLIMIT_MEMLOCK)
  std::size_t locked_bytes = 0;     // slabs locked now, in use or kept for reuse
  std::size_t bytes_in_use = 0;     // blocks handed out now
};
SecretPoolStats secret_pool_stats();

// A large secret buffer (a decoder's pad window) that costs what is used: reserved, not
// filled, kept out of core dumps, and locked (mlock) 4 KiB block by block as blocks are
// first written, so RLIMIT_MEMLOCK counts only the blocks in use. It fails closed: a write
// that needs a block the limit does not let it lock writes nothing and returns false, so
// secret bytes never sit in memory that could be swapped out. Every block locked is
// remembered and wiped again at wipe_all() and destruction (which unlocks it); discard()
// wipes blocks the owner is done with and gives them back (unlocked, pages dropped), so a
// circular window's locked memory follows what it holds, not what it ever held. Untouched
// blocks are never faulted in. Bytes go in and out only through write/read (no span
// escapes), so no write can miss the bookkeeping.
class SecretArena {
 public:
  static constexpr std::size_t kBlockBytes = 4096;  // granularity of the locked-block map

  SecretArena() = default;
  explicit SecretArena(std::size_t size);  // zero bytes to start with
  ~SecretArena();
  SecretArena(SecretArena&& other) noexcept;
  SecretArena& operator=(SecretArena&& other) noexcept;
  SecretArena(const SecretArena&) = delete;
  SecretArena& operator=(const SecretArena&) = delete;

  std::size_t size() const { return size_; }
  // [at, at + n) must lie within size() (std::out_of_range otherwise). write() locks the
  // blocks it reaches first; false (nothing written) when one of them cannot be locked
  // (RLIMIT_MEMLOCK reached; the blocks it did lock stay locked for later writes).
  [[nodiscard]] bool write(std::size_t at, std::span<const std::uint8_t> bytes);
  void read(std::size_t at, std::span<std::uint8_t> out) const;
  void wipe(std::size_t at, std::size_t n);  // zeroes what of it is in locked blocks
  void wipe_all();                           // every locked block
  // Wipes [at, at + n) like wipe(), then gives back the blocks wholly inside it (the
  // arena's last block counts as whole when the range reaches size()): each is zeroed
  // whole, unlocked and its pages dropped (MADV_DONTNEED; they read as zero and cost
  // nothing), and a later write locks it again before any byte goes in.
  void discard(std::size_t at, std::size_t n);
  // Bytes in blocks locked for writing now (resident and locked until discarded or
  // destroyed): what this arena adds to the process's locked memory.
  std::size_t written_bytes() const { return written_blocks_ * kBlockBytes; }
  // Writes refused because a block could not be locked.
  std::uint64_t lock_failures() const { return lock_failures_; }

 private:
  void check(std::size_t at, std::size_t n) const;
  template <typename F>
  void written_runs(std::size_t at, std::size_t n, F f) const;
  void release() noexcept;
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0, mapped_ = 0, page_ = 0;
  std::vector<std::uint64_t> written_;  // a bit per block: locked, may hold secret bytes
  std::size_t written_blocks_ = 0;
  std::uint64_t lock_failures_ = 0;
};

enum class LogLevel { debug, info, warning, error };
using LogSink = std::function<void(LogLevel, std::string_view)>;
// Writes "otpgate[level]: message" lines to stderr for levels >= min_level.
LogSink stderr_log_sink(LogLevel min_level = LogLevel::info);

// ---------------------------------------------------------------------------
// ETSI GS QKD 014 client

enum class KmeErrorKind {
  transport,      // connection refused/reset/closed, DNS, timeout
  tls,            // certificate or handshake rejected (ours or the KME's)
  bad_request,    // 400
  unauthorized,   // 401 or 403: wrong SAE for these keys, or certificate not accepted
  not_found,      // 404
  unavailable,    // 503: no key on the KME right now
  server,         // other 5xx
  http,           // any other unexpected status (409, 422, ...)
  protocol,       // a 2xx answer whose body is malformed or misses fields
  key_not_found,  // dec_keys: 400/404, a key is not (or no longer) on the slave's KME
  cancelled,      // the client was cancelled while waiting
};
std::string_view to_string(KmeErrorKind kind);

class KmeError : public std::runtime_error {
 public:
  KmeError(KmeErrorKind kind, int http_status, const std::string& message)
      : std::runtime_error(message), kind_(kind), http_status_(http_status) {}
  KmeErrorKind kind() const { return kind_; }
  int http_status() const { return http_status_; }  // 0 when no HTTP answer
  bool retryable() const;

 private:
  KmeErrorKind kind_;
  int http_status_;
};

struct TlsFiles {
  std::filesystem::path certificate;  // this SAE's client certificate (PEM)
  std::filesystem::path private_key;  // its private key (PEM)
  std::filesystem::path ca_bundle;    // CA that signed the KME's server certificate
};

struct RetryPolicy {
  int max_attempts = 5;  // for 503, 5xx and transport errors
  std::chrono::milliseconds initial_backoff{50};
  std::chrono::milliseconds max_backoff{2000};
  // No retry starts once this much time has passed since the first attempt, so that a
  // KME that hangs is reported within seconds rather than after every attempt's timeout.
  std::chrono::milliseconds max_total{3000};
};

struct KmeClientConfig {
  std::string base_url;  // e.g. https://kme-a.hospital.example:8443 (no /api/v1)
  TlsFiles tls;
  std::chrono::milliseconds connect_timeout{3000};
  std::chrono::milliseconds request_timeout{4000};
  RetryPolicy retry;
  LogSink log;  // empty: stderr at info level
};

// The fields of the ETSI 014 Status object (sizes in bits).
struct KmeStatus {
  std::string source_kme_id, target_kme_id, master_sae_id, slave_sae_id;
  std::uint32_t key_size = 0;
  std::uint64_t stored_key_count = 0;
  std::uint64_t max_key_count = 0;
  std::uint32_t max_key_per_request = 0;
  std::uint32_t max_key_size = 0;
  std::uint32_t min_key_size = 0;
  std::uint32_t max_sae_id_count = 0;
};

struct Key {
  KeyId id;
  SecretBytes bytes;
};

// One client per thread: it reuses one libcurl handle (and its TLS connection).
class KmeClient {
 public:
  explicit KmeClient(KmeClientConfig config);
  ~KmeClient();
  KmeClient(KmeClient&&) noexcept;
  KmeClient& operator=(KmeClient&&) noexcept;

  enum class Method { get, post };

  KmeStatus status(std::string_view slave_sae_id);
  std::vector<Key> enc_keys(std::string_view slave_sae_id, std::uint32_t number,
                            std::uint32_t size_bits, Method method = Method::post);
  std::vector<Key> dec_keys(std::string_view master_sae_id, std::span<const KeyId> ids);
  Key dec_key(std::string_view master_sae_id, const KeyId& id);  // GET ?key_ID=

  // Thread-safe: aborts a transfer or backoff in progress with KmeErrorKind::cancelled.
  void cancel();
  const std::string& base_url() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Largest key size (bits) the KME allows, capped by `cap_bits` (0: no cap), a multiple of 8.
std::uint32_t choose_key_size(const KmeStatus& status, std::uint32_t cap_bits);

// ---------------------------------------------------------------------------
// Key ring: single producer (refill thread), single consumer (media thread).
// Every byte carries its 64-bit offset in the direction's pad stream. The consumer
// side never locks, allocates or does I/O; consumed bytes are wiped.

struct PadSegment {
  std::uint64_t offset = 0;
  KeyId key_id;
  std::span<std::uint8_t> bytes;
  std::uint32_t slot = 0;
};

class KeyRing {
 public:
  KeyRing(std::size_t slot_count, std::size_t slot_bytes);
  ~KeyRing();  // wipes all key memory
  KeyRing(const KeyRing&) = delete;
  KeyRing& operator=(const KeyRing&) = delete;

  // Producer. Copies `key` into a free slot; false when full or the key exceeds a slot.
  bool push(std::uint64_t offset, const KeyId& id, std::span<const std::uint8_t> key);
  std::size_t free_slots() const;

  // Consumer, stream mode: fills `out` with the next out.size() pad bytes, which are
  // contiguous in the pad stream, and returns the offset of the first one; nullopt (and
  // nothing consumed) when fewer are available. Should the stream jump between two
  // segments, bytes already copied for this call are wiped and counted as discarded.
  std::optional<std::uint64_t> take(std::span<std::uint8_t> out);
  // Consumer: offset of the byte take() would hand out next, if any is available.
  std::optional<std::uint64_t> peek_offset() const;
  // Consumer: wipes every byte below `offset` (counted as discarded); returns how many.
  std::uint64_t discard_below(std::uint64_t offset);

  // Consumer, segment mode (random access for the decrypting side): a whole key, owned
  // by the caller until release(), which wipes it and returns the slot to the producer.
  std::optional<PadSegment> pop_segment();
  void release(const PadSegment& segment);

  // Any thread.
  std::uint64_t bytes_available() const;
  std::uint64_t bytes_pushed() const;
  std::uint64_t bytes_consumed() const;   // taken or released
  std::uint64_t bytes_discarded() const;  // wiped unused by take() at a discontinuity
  std::size_t slot_bytes() const;
  std::size_t slot_count() const;
  bool memory_locked() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------
// Offset journal: the durable "nothing below this offset is ever handed out again".

class OffsetJournal {
 public:
  // Opens or creates the journal; throws std::runtime_error naming the file if it is
  // unreadable or corrupt (we never guess an offset).
  explicit OffsetJournal(std::filesystem::path path);
  ~OffsetJournal();
  OffsetJournal(const OffsetJournal&) = delete;
  OffsetJournal& operator=(const OffsetJournal&) = delete;
  // Every offset below this may have been used: restart from here.
  std::uint64_t reserved() const { return reserved_; }
  // Durably records a new reservation (write temp, fsync, rename, fsync directory).
  void reserve(std::uint64_t new_reserved);
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::uint64_t reserved_ = 0;
  int lock_fd_ = -1;  // flock on PATH.lock: one pad stream, one user
};

// ---------------------------------------------------------------------------
// Key supply: one direction of one link.

enum class SaeRole {
  master,  // sending side: enc_keys, assigns pad offsets, announces key_IDs
  slave,   // receiving side: dec_keys for the key_IDs the master announced
};

struct KeyAnnouncement {
  std::uint64_t offset = 0;  // first pad byte this key covers
  KeyId key_id;
  std::uint32_t length = 0;  // bytes
  // Master: this key starts a run on a fresh epoch whose announcement is verifiable from
  // its own keys alone; it is released only once the stream has reached it.
  bool resync = false;
};

// What the one-time-pad codec needs from a key source; KeySupply implements it, and
// so can an in-memory source (tests, test vectors).
class PadSource {
 public:
  virtual ~PadSource() = default;
  // Sending side (one media thread): lock-free, no allocation, no I/O.
  virtual std::optional<std::uint64_t> peek_offset() = 0;
  virtual std::uint64_t available() const = 0;
  virtual std::optional<std::uint64_t> take(std::span<std::uint8_t> out) = 0;
  virtual std::optional<KeyAnnouncement> next_announcement() = 0;
  // Receiving side (one media thread).
  virtual bool request(const KeyAnnouncement& announcement) = 0;
  virtual std::optional<PadSegment> pop_segment() = 0;
  virtual void release(const PadSegment& segment) = 0;
  // Receiving side (one media thread): keys asked for that will never come (declared
  // lost by the source), so that nothing waits for them.
  virtual std::optional<KeyAnnouncement> next_lost() { return std::nullopt; }
  // Either side: true once the source has given up (lock-free); failure() says why.
  virtual bool failed() const { return false; }
  virtual std::string failure() const { return {}; }
  // Sending side, before a new stream's first take: the source goes on to a stream
  // whose receiver knows none of the announcements made so far (a call key lane handed to
  // the next call). KeySupply then never hands out pad it announced to an earlier stream
  // (it is wiped) and starts the new stream where its first announcement is verifiable.
  virtual void begin_stream() {}
};

// The synthetic key_ID of a pad-file chunk: "otp-pad-file" marker plus its offset.
KeyId pad_file_key_id(std::uint64_t offset);

struct PadFileConfig {
  std::filesystem::path path;         // pre-shared pad, identical at both sites
  std::uint32_t chunk_bytes = 65536;  // bytes read (and announced) at a time
};

struct KeySupplyConfig {
  SaeRole role = SaeRole::master;
  std::string peer_sae_id;                 // slave SAE (master role) or master SAE (slave role)
  std::filesystem::path journal;           // master: offset journal (required)
  std::size_t ring_bytes = 4u << 20;       // key kept ready in memory
  double low_water = 0.5;                  // refill when the ring is below this fraction
  double high_water = 0.9;                 // ... up to this fraction
  std::uint32_t key_size_cap_bits = 0;     // 0: the largest the KME allows
  std::uint32_t fallback_key_bits = 8192;  // slave: slot size if status is refused
  // Journal granularity (bytes of pad); reservations are whole multiples of it, so keep
  // it a multiple of the codec's epoch (256 KiB) for restarts without skipped pad.
  std::uint64_t reserve_chunk = 16u << 20;
  // How often the refill thread looks at the rings while it has work in sight (a restart,
  // demand, an outage, a slave's requests). A master whose rings are above their low-water
  // marks naps instead (busy_nap); while nothing uses key (rings full, no keys asked
  // for), it sleeps until a stream takes or asks for key again, or until the KME is due
  // to be asked whether it is there (health_interval).
  std::chrono::milliseconds poll_interval{10};
  // Master: the KME's status is asked for this often when no other call was made (a KME
  // restart loses keys it issued); slave: whether it answers, four times as seldom.
  std::chrono::milliseconds health_interval{500};
  // Master: while key is used and every ring is above its low-water mark, the refill
  // thread sleeps until a take() leaves a ring below it or uses a quarter of it, or this
  // long at most (so the consumption it measures, which sizes the rings, stays fresh),
  // instead of looking every poll_interval.
  std::chrono::milliseconds busy_nap{250};
  bool publish_announcements = true;  // master: queue a KeyAnnouncement per key
  // Slave: a key the KME does not have yet may still be on its way between the KMEs;
  // it is asked for again until this long after its first request, then declared lost.
  std::chrono::milliseconds relay_grace{3000};
  // Master: key held ready, in seconds of the measured consumption (bounded by
  // ring_bytes, at least ring_min_bytes per lane); 0 keeps the whole ring
  // full (bulk transfers).
  double ring_seconds = 0;
  std::size_t ring_min_bytes = 64u << 10;
  // Master: announcements are released this far ahead of use, in seconds of the measured
  // consumption (at least announce_min_bytes); 0 announces every key as it arrives.
  double announce_lead_seconds = 0;
  std::size_t announce_min_bytes = 16u << 10;
  // Master: after the KME was unreachable, the keys it issued before may be gone at the
  // slave's KME (a restart loses unfetched keys): the ring is flushed and the stream
  // resumes at a multiple of this (the codec's epoch), so the receiver can verify anew.
  std::uint64_t restart_alignment = 1u << 18;
  // Master: every so often the stream moves on to a fresh epoch whose announcement the
  // receiver can verify from its own keys, so that a receiver that lost an announcement
  // (and every repeat of it) catches up within this time; 0 never (a pad file, whose
  // offsets are file positions, must not skip any).
  std::chrono::milliseconds resync_interval{0};
  // Either role: a KME that refuses us (401/403, TLS) is given up on at once; one that
  // never answered is given up on after this long. A supply that once worked never gives
  // up (it reports the outage and recovers when the KME does).
  std::chrono::milliseconds give_up_after{7000};
  // One supply can serve several streams of the same peer and direction, one lane each:
  // one KME client, one refill thread and (for a KME that replaces unfetched batches) one
  // batch in flight for all of them, while each lane is a pad stream of its own (offsets,
  // ring, announcements; as master its own journal, lane_journals[i]). With one lane the
  // journal is `journal`. KME keys only: a pad file is a single pad stream.
  std::size_t lanes = 1;
  std::vector<std::filesystem::path> lane_journals;
  LogSink log;
};

struct KeySupplyStats {
  std::uint64_t bytes_available = 0;
  std::uint64_t bytes_consumed = 0;
  std::uint64_t bytes_fetched = 0;
  std::uint64_t keys_fetched = 0;
  std::uint64_t keys_lost = 0;      // slave: announced keys the KME never delivered
  std::uint64_t keys_refused = 0;   // slave: not fetched (below the journal, table full, ...)
  std::uint64_t keys_replayed = 0;  // slave: of those, below the journal (an earlier run's pad)
  std::uint64_t keys_waiting = 0;   // slave: asked for, not yet fetched or declared lost
  std::uint64_t bytes_flushed = 0;  // master: wiped unused after a KME outage
  std::uint64_t kme_outages = 0;    // master: outages after which the ring was flushed
  std::uint64_t bytes_wiped_at_stop = 0;  // fetched key wiped unused when stopped
  std::uint64_t kme_errors = 0;
  std::uint64_t next_offset = 0;      // master: offset the next fetched key gets
  std::uint64_t reserved_offset = 0;  // master: journal value
  std::uint32_t key_size_bits = 0;
  std::size_t ring_capacity_bytes = 0;
  double consumption_bytes_per_s = 0;
  double refill_latency_ms_last = 0;
  double refill_latency_ms_avg = 0;
  std::uint64_t refill_rounds = 0;   // passes of the refill thread (a few a second when idle)
  double seconds_to_exhaustion = 0;  // +inf when nothing is being consumed
  bool kme_healthy = false;
  bool memory_locked = false;
  bool kme_replaces_batches = false;  // master: KME drops unfetched batches; one in flight
  bool failed = false;                // gave up: the KME refuses us or never answered (see failure)
  std::string failure;                // why, with the KME's own words
  std::string last_error;             // never contains key bytes
  // Master: the KME's last ETSI 014 status for the pair (the link's key forecast,
  // otpgate/forecast.hpp, checks it for sense); nullopt when none was read.
  std::optional<KmeStatus> kme_status;
  // Key delivered to the supply over the last two minutes (fetched, plus what the KME's
  // store grew by), bytes/s; 0 until a second has been measured.
  double refill_bytes_per_s = 0;
};

class KeySupply final : public PadSource {
 public:
  KeySupply(KmeClientConfig kme, KeySupplyConfig config);     // keys from a KME
  KeySupply(PadFileConfig pad_file, KeySupplyConfig config);  // keys from a pad file
  ~KeySupply();  // stops the refill thread; unused key is wiped
  KeySupply(const KeySupply&) = delete;
  KeySupply& operator=(const KeySupply&) = delete;

  void start();
  void stop();
  SaeRole role() const;

  // Lane `index` (< lane_count(), see KeySupplyConfig::lanes) as a key source for one
  // stream; the supply's own PadSource functions are lane 0's.
  PadSource& lane(std::size_t index);
  std::size_t lane_count() const;

  // Master, media thread: next out.size() pad bytes and their offset, or nullopt.
  std::optional<std::uint64_t> take(std::span<std::uint8_t> out) override;
  std::optional<std::uint64_t> peek_offset() override;
  std::uint64_t available() const override;
  // Master, media thread: key_IDs to announce, in pad order. A key's announcement is
  // queued before the key enters the ring, so nothing is taken unannounced.
  std::optional<KeyAnnouncement> next_announcement() override;

  // Slave, media thread: ask for an announced key (repeats are ignored). Lock-free;
  // false when the request queue is full (the announcement will come again).
  bool request(const KeyAnnouncement& announcement) override;
  // Slave, media thread: fetched keys in arrival order; release() wipes one.
  std::optional<PadSegment> pop_segment() override;
  void release(const PadSegment& segment) override;
  std::optional<KeyAnnouncement> next_lost() override;
  bool failed() const override;
  std::string failure() const override;
  // Master: see PadSource::begin_stream. Until the refill thread has wiped what earlier
  // streams were told about (within its poll interval), the lane hands out no pad.
  void begin_stream() override;

  // Every lane together (next_offset and reserved_offset: lane 0's).
  KeySupplyStats stats() const;
  // One lane's key and offsets, with the supply-wide KME state.
  KeySupplyStats lane_stats(std::size_t index) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace otpgate::keys

// SPDX-License-Identifier: LGPL-2.1-or-later
// Key supply: a refill thread that keeps one direction's key ring between its low-
// and high-water marks. As master it calls enc_keys and assigns pad offsets (after
// reserving them in the journal); as slave it calls dec_keys for announced key_IDs.
#include <pthread.h>

#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string_view>
#include <thread>
#include <unordered_map>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "otpgate/forecast.hpp"
#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

namespace {
constexpr std::size_t kQueueCapacity = 65536;
constexpr std::size_t kRecentIds = 65536;
constexpr std::size_t kMaxWanted = 16384;       // keys asked for, not yet fetched or lost
constexpr std::size_t kAnnouncementBatch = 64;  // keys one announcement carries at most
constexpr auto kTlsRefusalPersists = std::chrono::seconds(3);  // see judge()
constexpr std::size_t kLocateRequests = 24;  // slave: per round, for keys past their grace
constexpr auto kBatchPatience = std::chrono::seconds(6);  // master: see replaces_batches
constexpr std::uint32_t kDefaultMaxKeysPerRequest = 128;
constexpr auto kErrorLogInterval = std::chrono::seconds(5);  // see record_error
using Clock = std::chrono::steady_clock;

// A key_ID as a slave saw it announced (with its length where fetching is not
// destructive), hashed over all of its bytes: a KME may number its keys in any way.
using SeenKey = std::pair<KeyId, std::uint32_t>;
struct SeenKeyHash {
  std::size_t operator()(const SeenKey& k) const noexcept {
    const auto& b = k.first.bytes();
    const std::size_t id = std::hash<std::string_view>{}(
        std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
    return id ^ (std::size_t{k.second} * 0x9e3779b97f4a7c15ull);
  }
};

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// A source that will never deliver again (a used-up pad file): the supply gives up.
struct SourceUsedUp : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Where keys come from: a KME (ETSI 014) or a pre-shared pad file.
class Backend {
 public:
  virtual ~Backend() = default;
  struct Geometry {
    std::uint32_t key_bits;     // size asked for (master) / largest expected (slave)
    std::uint32_t per_request;  // keys per call
  };
  virtual Geometry geometry(SaeRole role, const KeySupplyConfig& config, const LogSink& log) = 0;
  // Master: `number` keys of `key_bits`, to be placed from `next_offset` on.
  virtual std::vector<Key> deliver(std::uint64_t next_offset, std::size_t number,
                                   std::uint32_t key_bits) = 0;
  // Slave: the announced keys. Each comes back with its key, or `missing` when the
  // source said it does not hold that key (not yet relayed, or lost), or neither when the
  // source was not asked about it this time (ask again). A source refuses a whole batch
  // when one key is missing, so the batch is halved to find the keys it holds: `locate`
  // (keys past their relay grace) may spend more requests on that than a fresh batch.
  struct Fetched {
    std::optional<Key> key;
    bool missing = false;
  };
  virtual std::vector<Fetched> fetch(std::span<const KeyAnnouncement> wanted, bool locate) = 0;
  // Slave: true when fetching a key removes it at the source (a KME hands a key out
  // once), false when it can be read again (a pad file).
  virtual bool fetch_is_destructive() const = 0;
  // Why the last key the source did not hold was missing, in its own words.
  virtual std::string missing_reason() const { return {}; }
  // Master: the KME's status for this pair (stored_key_count ...), if the source has one.
  virtual std::optional<KmeStatus> kme_status() { return std::nullopt; }
  // Slave, idle: whether the source answers at all (throws what a request would throw);
  // an HTTP refusal of the status call is an answer.
  virtual void probe() {}
  virtual void cancel() = 0;
};

class KmeBackend final : public Backend {
 public:
  KmeBackend(KmeClientConfig kme, std::string peer)
      : client_(std::move(kme)), peer_(std::move(peer)) {}

  Geometry geometry(SaeRole role, const KeySupplyConfig& config, const LogSink& log) override {
    try {
      const KmeStatus status = client_.status(peer_);
      const std::uint32_t bits = choose_key_size(status, config.key_size_cap_bits);
      return {role == SaeRole::master ? bits : status.max_key_size, status.max_key_per_request};
    } catch (const KmeError& e) {
      // Many KMEs only answer status to the master; a slave can do without it.
      if (role == SaeRole::master || e.http_status() < 400 || e.http_status() >= 500) throw;
      log(LogLevel::info, std::string("status refused to the slave (") + e.what() +
                              "); assuming keys of at most " +
                              std::to_string(config.fallback_key_bits) + " bits");
      return {config.fallback_key_bits, kDefaultMaxKeysPerRequest};
    }
  }

  std::vector<Key> deliver(std::uint64_t, std::size_t number, std::uint32_t key_bits) override {
    return client_.enc_keys(peer_, static_cast<std::uint32_t>(number), key_bits);
  }

  std::vector<Fetched> fetch(std::span<const KeyAnnouncement> wanted, bool locate) override {
    std::vector<KeyId> ids;
    for (const auto& a : wanted) ids.push_back(a.key_id);
    std::vector<Fetched> fetched(wanted.size());
    // Fresh keys: the batch, then both halves on the way down to one missing key, so one
    // missing key does not hold up the others. Keys past their grace: a few more, per
    // round, so that locating lost keys never keeps fresh ones waiting for long.
    std::size_t budget = 1;
    for (std::size_t n = 1; n < ids.size(); n *= 2) budget += 2;
    if (locate) budget = std::max<std::size_t>(budget, kLocateRequests);
    fetch_range(ids, 0, ids.size(), budget, fetched);
    return fetched;
  }

  bool fetch_is_destructive() const override { return true; }
  std::string missing_reason() const override { return missing_reason_; }
  std::optional<KmeStatus> kme_status() override { return client_.status(peer_); }
  void probe() override {
    try {
      client_.status(peer_);
    } catch (const KmeError& e) {
      if (e.http_status() < 400 || e.http_status() >= 500) throw;
    }
  }

  void cancel() override { client_.cancel(); }

 private:
  // dec_keys for ids[lo, hi). The KME answers 400/404 for the whole request when one key
  // is missing, so a refused range is halved until every key is found or missing, or the
  // `budget` of requests is spent (keys not reached are neither: they are asked again).
  // A key is `missing` only when the KME refused it alone: nothing is inferred.
  void fetch_range(const std::vector<KeyId>& ids, std::size_t lo, std::size_t hi,
                   std::size_t& budget, std::vector<Fetched>& out) {
    if (budget == 0) return;
    --budget;
    try {
      auto keys = client_.dec_keys(peer_, std::span(ids).subspan(lo, hi - lo));
      for (std::size_t i = 0; i < keys.size(); ++i) out[lo + i].key = std::move(keys[i]);
    } catch (const KmeError& e) {
      if (e.kind() != KmeErrorKind::key_not_found) throw;
      missing_reason_ = e.what();
      if (hi - lo == 1) {
        out[lo].missing = true;
        return;
      }
      const std::size_t mid = lo + (hi - lo) / 2;
      fetch_range(ids, lo, mid, budget, out);
      fetch_range(ids, mid, hi, budget, out);
    }
  }

  KmeClient client_;
  std::string peer_;
  std::string missing_reason_;
};

class PadFileBackend final : public Backend {
 public:
  explicit PadFileBackend(PadFileConfig config) : config_(std::move(config)) {
    if (config_.chunk_bytes == 0) throw std::invalid_argument("pad-file chunk size must not be 0");
    fd_ = ::open(config_.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      throw std::invalid_argument("pad-file \"" + config_.path.string() +
                                  "\" cannot be opened: " + std::strerror(errno));
    }
    struct stat st {};
    ::fstat(fd_, &st);
    size_ = static_cast<std::uint64_t>(st.st_size);
  }
  ~PadFileBackend() override { ::close(fd_); }

  Geometry geometry(SaeRole, const KeySupplyConfig&, const LogSink&) override {
    return {config_.chunk_bytes * 8, 64};
  }

  std::vector<Key> deliver(std::uint64_t next_offset, std::size_t number, std::uint32_t) override {
    std::vector<Key> keys;
    for (std::size_t i = 0; i < number && next_offset < size_; ++i) {
      const std::uint64_t length =
          std::min<std::uint64_t>(config_.chunk_bytes, size_ - next_offset);
      keys.push_back(read(next_offset, length));
      next_offset += length;
    }
    if (keys.empty()) {
      throw SourceUsedUp("pad file " + config_.path.string() + " is used up (" +
                         std::to_string(size_) + " bytes); provide a new pre-shared pad");
    }
    return keys;
  }

  std::vector<Fetched> fetch(std::span<const KeyAnnouncement> wanted, bool) override {
    std::vector<Fetched> fetched(wanted.size());
    for (std::size_t i = 0; i < wanted.size(); ++i) {
      const auto& a = wanted[i];
      if (a.key_id == pad_file_key_id(a.offset) && a.length != 0 && a.offset <= size_ &&
          a.length <= size_ - a.offset) {
        fetched[i].key = read(a.offset, a.length);
      } else {
        fetched[i].missing = true;
      }
    }
    return fetched;
  }

  bool fetch_is_destructive() const override { return false; }
  std::string missing_reason() const override {
    return "the pad file " + config_.path.string() + " holds " + std::to_string(size_) +
           " bytes; the key_ID or range is not one of its chunks";
  }
  void cancel() override {}

 private:
  Key read(std::uint64_t offset, std::uint64_t length) {
    SecretBytes bytes(length);
    std::size_t done = 0;
    while (done < length) {
      const ssize_t n = ::pread(fd_, bytes.span().data() + done, length - done,
                                static_cast<off_t>(offset + done));
      if (n <= 0) {
        throw std::runtime_error("pad file " + config_.path.string() + ": read failed at offset " +
                                 std::to_string(offset + done));
      }
      done += static_cast<std::size_t>(n);
    }
    return Key{pad_file_key_id(offset), std::move(bytes)};
  }

  PadFileConfig config_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

}  // namespace

KeyId pad_file_key_id(std::uint64_t offset) {
  std::array<std::uint8_t, 16> bytes{'o', 't', 'p', '-', 'p', 'a', 'd', '-'};
  for (int i = 0; i < 8; ++i) bytes[15 - i] = static_cast<std::uint8_t>(offset >> (8 * i));
  return KeyId(bytes);
}

struct KeySupply::Impl {
  // One stream's pad stream inside the supply (KeySupplyConfig::lanes): its own offsets,
  // ring, announcements and requests; the KME client and refill thread are the supply's.
  struct Lane final : PadSource {
    Lane(Impl& owner, std::size_t lane_index) : impl(owner), index(lane_index) {}

    std::optional<std::uint64_t> take(std::span<std::uint8_t> out) override {
      KeyRing* r = consumer_ring();
      const auto taken = asked(r ? r->take(out) : std::nullopt);
      impl.note_take(*this, r);
      return taken;
    }
    std::optional<std::uint64_t> peek_offset() override {
      KeyRing* r = consumer_ring();
      return asked(r ? r->peek_offset() : std::nullopt);
    }
    // Media thread: notes that the stream wanted key and found none (see hungry()).
    std::optional<std::uint64_t> asked(std::optional<std::uint64_t> offset) {
      if (!offset && !demand.load(std::memory_order_relaxed)) {
        demand.store(true, std::memory_order_relaxed);
        impl.note_use();  // peek_offset() finds the ring empty before any take()
      }
      return offset;
    }
    std::uint64_t available() const override {
      if (restarting.load(std::memory_order_acquire)) return 0;
      const KeyRing* r = ring.load(std::memory_order_acquire);
      return r ? r->bytes_available() : 0;
    }
    std::optional<KeyAnnouncement> next_announcement() override;
    bool request(const KeyAnnouncement& announcement) override {
      const bool queued = requests.push(announcement);
      impl.note_use();
      return queued;
    }
    std::optional<PadSegment> pop_segment() override {
      KeyRing* r = ring.load(std::memory_order_acquire);
      return r ? r->pop_segment() : std::nullopt;
    }
    void release(const PadSegment& segment) override {
      const std::uint64_t end = segment.offset + segment.bytes.size();
      ring.load(std::memory_order_acquire)->release(segment);
      // Single consumer: a plain load/store pair is enough to keep the maximum.
      if (end > released_end.load(std::memory_order_relaxed)) {
        released_end.store(end, std::memory_order_relaxed);
      }
    }
    std::optional<KeyAnnouncement> next_lost() override {
      KeyAnnouncement a;
      if (!lost_keys.pop(a)) return std::nullopt;
      return a;
    }
    bool failed() const override { return impl.failed_flag.load(std::memory_order_acquire); }
    std::string failure() const override {
      std::lock_guard lock(impl.error_mutex);
      return impl.failure_text;
    }
    // Master: the refill thread restarts the lane (see restart_stream) before the new
    // stream takes anything; a slave needs nothing (a receiver learns from what it gets).
    void begin_stream() override {
      if (impl.config.role == SaeRole::master && announced_end.load(std::memory_order_acquire) >
                                                     flush_floor.load(std::memory_order_acquire)) {
        restarting.store(true, std::memory_order_release);
        impl.note_use();  // the stream takes nothing until the refill thread has restarted it
      }
    }

    // Media thread: the ring, after wiping what a flush after a KME outage left below
    // the floor.
    KeyRing* consumer_ring() {
      if (restarting.load(std::memory_order_acquire)) return nullptr;  // not before the wipe
      KeyRing* r = ring.load(std::memory_order_acquire);
      const std::uint64_t floor = flush_floor.load(std::memory_order_acquire);
      if (r && floor > flush_seen) {
        flush_seen = floor;
        bytes_flushed.fetch_add(r->discard_below(floor), std::memory_order_relaxed);
      }
      return r;
    }

    // Refill thread: key held ready for this lane (what came after a flush, see
    // resume_after_outage, while the media thread has not wiped the flushed key yet).
    double held() const {
      const KeyRing& r = *ring_owner;
      return double(flushed_pending ? r.bytes_pushed() - pushed_at_flush : r.bytes_available());
    }

    // Moves the lane on to the next epoch boundary (offsets only, no key is skipped),
    // where an announcement can be verified from its own keys.
    void align_next_offset() {
      const std::uint64_t align = std::max<std::uint64_t>(1, impl.config.restart_alignment);
      next_offset = (next_offset + align - 1) / align * align;
    }

    // Makes sure the journal covers offsets below `end` before they can be used.
    void reserve_up_to(std::uint64_t end) {
      if (end <= journal->reserved()) return;
      // Whole chunks: after a restart the stream resumes on a chunk boundary, which the
      // codec's authentication epochs are aligned to, so no pad is skipped.
      const std::uint64_t chunk = std::max<std::uint64_t>(1, impl.config.reserve_chunk);
      journal->reserve((end + chunk - 1) / chunk * chunk);
      published_reserved = journal->reserved();
    }

    void sample_rate() {
      // Every 50 ms, so that a stream starting at video rates is measured before its
      // first ring (ring_min_bytes) runs out; smoothed over about half a second.
      const auto now = Clock::now();
      const double seconds = std::chrono::duration<double>(now - last_sample).count();
      if (seconds < 0.05) return;
      KeyRing* r = ring.load(std::memory_order_acquire);
      const std::uint64_t consumed = r ? r->bytes_consumed() : 0;
      const double instant = double(consumed - last_consumed) / seconds;
      if (consumed != last_consumed) last_used = now;
      const double weight = std::min(1.0, seconds / 0.6);
      consumption = consumption == 0 ? instant : (1 - weight) * consumption + weight * instant;
      last_sample = now;
      last_consumed = consumed;
    }

    Impl& impl;
    const std::size_t index;
    std::optional<OffsetJournal> journal;
    // Refill thread.
    std::unique_ptr<KeyRing> ring_owner;
    std::uint64_t next_offset = 0;
    std::uint64_t restart_floor = 0;  // slave: nothing below the journal at start is fetched
    bool pending_resync = false;      // master: the next key starts a resync run
    Clock::time_point last_resync = Clock::now();
    std::optional<std::uint64_t> last_resync_offset;  // master: where the last resync run starts
    bool flushed_pending = false;  // master: a flush the media thread may not have done
    std::uint64_t pushed_at_flush = 0;
    Clock::time_point last_sample = Clock::now();
    std::uint64_t last_consumed = 0;
    Clock::time_point last_used{};  // last time the media thread was seen taking key
    // Master: a take() that leaves the ring below this wakes a refill thread napping
    // while key is used (Doze::busy); the low-water mark when the nap began.
    std::atomic<std::uint64_t> wake_below{0};
    // Shared with the media thread (lock-free) and with stats() readers.
    std::atomic<KeyRing*> ring{nullptr};
    boost::lockfree::spsc_queue<KeyAnnouncement> announcements{kQueueCapacity};
    boost::lockfree::spsc_queue<KeyAnnouncement> requests{kQueueCapacity};
    boost::lockfree::spsc_queue<KeyAnnouncement> lost_keys{kQueueCapacity};
    std::atomic<std::uint64_t> keys_replayed{0};
    std::atomic<std::uint64_t> bytes_fetched{0}, keys_fetched{0}, keys_lost{0}, keys_refused{0},
        waiting_count{0};
    std::atomic<std::uint64_t> published_next_offset{0}, published_reserved{0};
    std::atomic<std::uint64_t> released_end{0};   // slave: end of the furthest key released
    std::atomic<std::uint64_t> flush_floor{0};    // master: pad below this is wiped unused
    std::atomic<std::uint64_t> announced_end{0};  // master: end of the keys announced so far
    std::atomic<bool> demand{
        false};  // master: the stream found no key since it was last given some
    std::atomic<bool> restarting{false};  // master: a new stream waits for restart_stream
    std::atomic<std::uint64_t> bytes_flushed{0}, wiped_at_stop{0};
    std::atomic<double> consumption{0};
    // Media thread only.
    std::uint64_t flush_seen = 0;
    std::size_t release_budget = 0;  // announcements still to release in the current batch
  };

  Impl(std::unique_ptr<Backend> source, KeySupplyConfig cfg, bool journal_required)
      : config(std::move(cfg)), backend(std::move(source)) {
    if (!(config.low_water > 0 && config.low_water < config.high_water &&
          config.high_water <= 1.0)) {
      throw std::invalid_argument("key ring water marks must satisfy 0 < low < high <= 1");
    }
    if (config.lanes == 0) throw std::invalid_argument("a key supply needs at least one lane");
    if (config.lanes > 1 && !backend->fetch_is_destructive()) {
      throw std::invalid_argument(
          "a pad file is one pad stream and serves one stream: give each stream its own pad "
          "file (lanes = 1)");
    }
    if (config.lanes > 1 && journal_required && config.lane_journals.size() != config.lanes) {
      throw std::invalid_argument("a key supply with " + std::to_string(config.lanes) +
                                  " lanes needs one offset journal per lane (lane_journals)");
    }
    for (std::size_t i = 0; i < config.lanes; ++i) {
      auto& lane = *lanes.emplace_back(std::make_unique<Lane>(*this, i));
      const std::filesystem::path path = config.lanes > 1 && i < config.lane_journals.size()
                                             ? config.lane_journals[i]
                                             : config.journal;
      if (journal_required && path.empty()) {
        throw std::invalid_argument(
            "this key supply needs an offset journal path (it guarantees no pad offset is "
            "reused after a restart)");
      }
      if (path.empty()) continue;
      lane.journal.emplace(path);
      lane.next_offset = lane.journal->reserved();
      lane.restart_floor = lane.journal->reserved();
      lane.released_end = lane.restart_floor;
      lane.published_next_offset = lane.next_offset;
      lane.published_reserved = lane.journal->reserved();
    }
  }

  static KeySupplyConfig checked(KeySupplyConfig config) {
    if (!config.log) config.log = stderr_log_sink();
    if (config.peer_sae_id.empty()) {
      throw std::invalid_argument("peer SAE ID is not set: name the SAE at the other site");
    }
    return config;
  }

  void log(LogLevel level, const std::string& message) const { config.log(level, message); }

  void record_error(const std::string& message) {
    ++kme_errors;
    healthy = false;
    {
      std::lock_guard lock(error_mutex);
      last_error = message;
    }
    // A KME that is down fails every retry: one line, then at most one per interval
    // saying how many were held back, so the log stays readable through an outage.
    const auto now = Clock::now();
    if (now - last_error_logged < kErrorLogInterval) {
      ++errors_not_logged;
      return;
    }
    std::string line = "key supply (peer " + config.peer_sae_id + "): " + message;
    if (errors_not_logged != 0) {
      line +=
          " (" + std::to_string(errors_not_logged) + " more error" +
          (errors_not_logged == 1 ? "" : "s") + " in the last " +
          std::to_string(
              std::chrono::duration_cast<std::chrono::seconds>(now - last_error_logged).count()) +
          " s)";
    }
    errors_not_logged = 0;
    last_error_logged = now;
    log(LogLevel::warning, line);
  }
  Clock::time_point last_error_logged{};
  std::uint64_t errors_not_logged = 0;

  // Creates the lanes' rings once the key size is known. Refill thread only.
  void ensure_ring() {
    if (ring_ready) return;
    const Backend::Geometry g = backend->geometry(config.role, config, config.log);
    key_bits = g.key_bits;
    max_keys_per_request = std::max<std::uint32_t>(1, g.per_request);
    const std::size_t key_bytes = key_bits / 8;
    if (key_bytes == 0) throw KmeError(KmeErrorKind::protocol, 200, "KME advertises 0-bit keys");
    const std::size_t slots = std::max<std::size_t>(2, config.ring_bytes / key_bytes);
    for (auto& lane : lanes) {
      lane->ring_owner = std::make_unique<KeyRing>(slots, key_bytes);
      // Every lane's ring on its own (a call lane's ring failing must not go unsaid).
      if (!lane->ring_owner->memory_locked()) {
        log(LogLevel::warning,
            "could not mlock the key ring of lane " + std::to_string(lane->index) + " (" +
                std::to_string(slots * key_bytes) + " bytes, peer " + config.peer_sae_id +
                "): key memory may be swapped out; raise RLIMIT_MEMLOCK (LimitMEMLOCK= in "
                "systemd) to cover every lane's ring and the pad windows' used blocks, or "
                "lower sip.max_media or keys.ring_bytes");
      }
    }
    published_key_bits = key_bits;
    kme_answered();
    healthy = true;  // the KME answered (an idle slave is not an unhealthy one)
    for (auto& lane : lanes) lane->ring.store(lane->ring_owner.get(), std::memory_order_release);
    ring_ready = true;
    log(LogLevel::debug, "key rings ready: " + std::to_string(lanes.size()) + " x " +
                             std::to_string(slots) + " keys of " + std::to_string(key_bits) +
                             " bits for peer " + config.peer_sae_id);
  }

  // Key the master keeps ready for a lane: seconds of its measured consumption, within
  // bounds.
  double ring_target(const Lane& lane) const {
    const KeyRing& r = *lane.ring_owner;
    const double capacity = double(r.slot_count() * r.slot_bytes());
    if (config.ring_seconds <= 0) return capacity;
    const double held =
        std::max(double(config.ring_min_bytes),
                 lane.consumption.load(std::memory_order_relaxed) * config.ring_seconds);
    return std::min(capacity, held);
  }

  // Master: the KME's stored_key_count for this pair, if the source has one; its whole
  // status is kept for the stats (the link's key forecast).
  std::optional<std::uint64_t> stored_count() {
    auto status = backend->kme_status();
    if (!status) return std::nullopt;
    std::lock_guard lock(error_mutex);
    last_kme_status = *status;
    return status->stored_key_count;
  }
  // After keys were issued: a status the KME fails to give costs the probe, never the keys
  // in hand (the next call reports a KME that is really down).
  std::optional<std::uint64_t> stored_count_if_answered() {
    try {
      return stored_count();
    } catch (const KmeError& e) {
      log(LogLevel::info, "key supply (peer " + config.peer_sae_id +
                              "): no KME status after a batch (" + e.what() + ")");
      return std::nullopt;
    }
  }

  // Key delivered to this supply (fetched, plus what the KME's trusted store grew by),
  // sampled once a second for the refill rate over the last two minutes.
  void sample_refill() {
    const auto now = Clock::now();
    if (now - last_refill_sample < std::chrono::seconds(1)) return;
    last_refill_sample = now;
    std::uint64_t fetched = 0;
    for (const auto& lane : lanes) fetched += lane->bytes_fetched;
    std::lock_guard lock(error_mutex);
    const std::uint64_t kme = last_kme_status ? kme_held(*last_kme_status).bytes : 0;
    // Another SAE of the pair drawing on the KME is no negative refill.
    if (refill_seen) {
      const double grown = double(fetched - refill_fetched) + double(kme) - double(refill_kme);
      delivered_total += std::max(0.0, grown);
    }
    refill_seen = true;
    refill_fetched = fetched;
    refill_kme = kme;
    refill_rate.add(std::chrono::duration<double>(now.time_since_epoch()).count(), delivered_total);
  }

  // Watches the first calls for a KME that drops a pair's unfetched keys when the master
  // asks again (its stored_key_count then counts the pair's pending keys and does not grow
  // across calls). Such a KME gets one batch in flight: the next call waits until the
  // slave has fetched everything (stored_key_count 0).
  void note_stored_counts(std::uint64_t before, std::uint64_t after, std::size_t delivered) {
    // ETSI 014's stored_key_count is what the KME can still deliver: it falls by what it
    // just issued (and rises as its link makes key). One that grows by exactly it counts the keys
    // pending for this pair instead; a KME that does so may drop them when asked again (some
    // vendors' do), which would cost the slave a batch to find out: one batch in flight from the
    // first sign. One that falls back to exactly the keys just issued has replaced the earlier
    // batch. Exactly: a pool that refills between the two calls can grow too.
    const bool counts_pending = after == before + delivered;
    const bool replaced = before > 0 && after == delivered;
    if (!(counts_pending || replaced) || replaces_batches) return;
    // A store that moves on its own (a link delivering key, another SAE drawing on it) can
    // land on either sign by chance: a sign counts only if the count stands still when read
    // again (a pair's pending keys do until the slave is told of them). Read only on a
    // sign, so a normal KME is asked nothing more.
    if (stored_count_if_answered() != after) return;
    replaces_batches = true;
    replaces_batches_flag = true;
    log(LogLevel::warning,
        "key supply (peer " + config.peer_sae_id + "): the KME's stored_key_count went from " +
            std::to_string(before) + " to " + std::to_string(after) + " as it issued " +
            std::to_string(delivered) + " keys: it counts keys pending for this pair (and may " +
            "drop them when asked again); keeping one batch in flight");
  }

  // Whether a lane is given key. With a KME that replaces unfetched batches, only a lane
  // in use (or whose stream found none): an idle stream announces nothing, so keys given
  // to it would stay unfetched and hold up every other lane's next batch.
  bool hungry(const Lane& lane) const { return !replaces_batches || in_use(lane); }
  static bool in_use(const Lane& lane) {
    return lane.demand.load(std::memory_order_relaxed) ||
           lane.ring_owner->bytes_consumed() != lane.last_consumed ||
           Clock::now() - lane.last_used < std::chrono::seconds(1);
  }

  // How many keys each lane should get from the next batch: `want` to bring it to its
  // high-water mark, `room` at most (free ring slots, announcement queue space).
  struct Share {
    std::size_t want = 0, room = 0;
  };

  void refill_master() {
    for (auto& lane : lanes) {
      if (lane->restarting.load(std::memory_order_acquire)) restart_stream(*lane);
    }
    // A master with full rings makes no KME calls, and would miss a KME restart that
    // lost the keys it issued before: ask for the status now and then.
    if (Clock::now() - last_kme_call >= config.health_interval) {
      stored_count();
      last_kme_call = Clock::now();
      kme_answered();
      if (outage) resume_after_outage();
    }
    bool low = false;
    for (auto& lane : lanes) {
      const KeyRing& r = *lane->ring_owner;
      if (lane->flushed_pending &&
          r.bytes_discarded() + r.bytes_consumed() >= lane->pushed_at_flush) {
        lane->flushed_pending = false;  // the media thread has wiped (or used) all of it
      }
      if (hungry(*lane) && lane->held() < config.low_water * ring_target(*lane)) low = true;
    }
    if (!low) return;
    while (!stopping_flag) {
      std::vector<Share> shares(lanes.size());
      bool any_in_use = false;
      for (auto& lane : lanes) {
        const KeyRing& r = *lane->ring_owner;
        Share& share = shares[lane->index];
        share.room = r.free_slots();
        if (config.publish_announcements)
          share.room = std::min(share.room, lane->announcements.write_available());
        if (!hungry(*lane)) share.room = 0;
        const double missing = config.high_water * ring_target(*lane) - lane->held();
        if (missing > 0)
          share.want = std::min(share.room, std::size_t(std::ceil(missing / r.slot_bytes())));
        any_in_use = any_in_use || (share.want > 0 && in_use(*lane));
      }
      // Streams in use first; idle ones get their key by the next call (this one may show
      // that the KME replaces batches, and then they get none until they are used).
      std::size_t short_by = 0, room = 0;
      for (auto& lane : lanes) {
        Share& share = shares[lane->index];
        if (any_in_use && !in_use(*lane)) share = {};
        short_by += share.want;
        room += share.room;
      }
      if (short_by == 0) return;
      // A KME that replaces unfetched batches gets few, large ones.
      std::size_t number = replaces_batches ? room : short_by;
      number = std::min({number, std::size_t(max_keys_per_request), keys_per_request_cap});
      if (number == 0) return;
      std::optional<std::uint64_t> before;
      const bool probe = replaces_batches || probes < 8;
      if (probe) before = stored_count();
      // One batch in flight: the next call waits until the slave has fetched ours (the
      // count is back to what it was without them; keys left pending by an earlier run
      // nobody will fetch are not waited for), or for kBatchPatience at most.
      if (replaces_batches && before && *before > pending_floor) {
        if (Clock::now() - batch_issued < kBatchPatience) return;
        flush_unannounced();  // the next call replaces what is still pending
      }
      const auto started = Clock::now();
      std::vector<Key> keys;
      try {
        keys = backend->deliver(lanes[0]->next_offset, number, key_bits);
      } catch (const KmeError& e) {
        // A KME short of key (a QKD link slower than the traffic, or a store smaller than
        // the ring) refuses the whole request: ask for less at once rather than wait for
        // all of it, which a small store would never hold.
        if (e.kind() != KmeErrorKind::unavailable || number == 1) throw;
        keys_per_request_cap = number / 2;
        continue;
      }
      kme_answered();
      last_kme_call = Clock::now();
      // The patience for this batch runs from now even if the status below fails: these
      // keys are placed and announced whatever it says.
      batch_issued = Clock::now();
      if (probe && before) {
        if (!replaces_batches) ++probes;
        if (const auto after = stored_count_if_answered()) {
          if (!replaces_batches) note_stored_counts(*before, *after, keys.size());
          pending_floor = *after >= keys.size() ? *after - keys.size() : 0;
        }
      }
      if (keys_per_request_cap < max_keys_per_request)
        keys_per_request_cap =
            std::min<std::size_t>(2 * keys_per_request_cap, max_keys_per_request);
      note_latency(ms_since(started));
      if (outage) resume_after_outage();
      const std::size_t slot_bytes = lanes[0]->ring_owner->slot_bytes();
      for (const Key& k : keys) {
        if (k.bytes.size() > slot_bytes) {
          throw KmeError(KmeErrorKind::protocol, 200,
                         "KME delivered a " + std::to_string(k.bytes.size() * 8) +
                             "-bit key where " + std::to_string(key_bits) + " bits were asked; " +
                             std::to_string(keys.size()) + " keys wiped unused");
        }
      }
      // Lanes take turns, a key at a time, while they want key, then while they have room:
      // a batch smaller than what they want is shared fairly. Lanes in use come first (the
      // KME may have just shown that it replaces batches). Keys keep their order in a lane.
      std::vector<std::vector<const Key*>> given(lanes.size());
      std::size_t next_key = 0;
      for (const bool any_lane : {false, true}) {
        for (const bool fill_room : {false, true}) {
          for (bool turn = true; turn && next_key < keys.size();) {
            turn = false;
            for (std::size_t i = 0; i < lanes.size() && next_key < keys.size(); ++i) {
              if ((any_lane || hungry(*lanes[i])) &&
                  given[i].size() < (fill_room ? shares[i].room : shares[i].want)) {
                given[i].push_back(&keys[next_key++]);
                turn = true;
              }
            }
          }
        }
      }
      for (auto& lane : lanes) place_keys(*lane, given[lane->index]);
      healthy = true;
    }
  }

  // Master: assigns offsets to a lane's new keys, reserves them in its journal, announces
  // them and puts them in its ring.
  void place_keys(Lane& lane, const std::vector<const Key*>& keys) {
    if (keys.empty()) return;
    std::uint64_t total = 0;
    for (const Key* k : keys) total += k->bytes.size();
    // Now and then the stream moves to a fresh epoch (see resync_interval).
    bool resync = lane.pending_resync;
    if (config.resync_interval.count() > 0 && lane.keys_fetched > 0 &&
        Clock::now() - lane.last_resync >= config.resync_interval) {
      lane.align_next_offset();
      resync = true;
    }
    if (resync) {
      lane.last_resync = Clock::now();
      lane.last_resync_offset = lane.next_offset;
    }
    lane.pending_resync = false;
    // Reserve before any byte above the old reservation can be handed out.
    lane.reserve_up_to(lane.next_offset + total);
    for (const Key* k : keys) {
      // Announce first: the consumer must never take a byte it could not announce.
      if (config.publish_announcements) {
        lane.announcements.push(KeyAnnouncement{
            lane.next_offset, k->id, static_cast<std::uint32_t>(k->bytes.size()), resync});
        resync = false;
      }
      // Cannot fail: free slots were counted.
      lane.ring_owner->push(lane.next_offset, k->id, k->bytes.span());
      lane.next_offset += k->bytes.size();
    }
    lane.published_next_offset = lane.next_offset;
    lane.demand.store(false, std::memory_order_relaxed);
    lane.keys_fetched += keys.size();
    lane.bytes_fetched += total;
    delivered_once = true;
  }

  // A new stream on the lane (PadSource::begin_stream; the media thread takes nothing
  // meanwhile). A sender announces ahead of use (announce_lead_seconds, at least a ring),
  // so most of what the lane holds was announced to the earlier stream's receiver, which
  // is gone: the next one never sees those announcements, and cannot verify any
  // announcement whose epoch key or mask lies in that pad, so a stream going on from it
  // would have no media until it reached a resync run (a ring's worth of use: 25 s of an
  // audio call). Wipe everything announced so far; the stream goes on at the first
  // resync run not announced yet, or else at a fresh epoch (a flush), where its first
  // announcement is verifiable from its own keys.
  void restart_stream(Lane& lane) {
    const std::uint64_t announced = lane.announced_end.load(std::memory_order_acquire);
    if (announced > lane.flush_floor.load(std::memory_order_acquire)) {
      if (lane.last_resync_offset && *lane.last_resync_offset >= announced) {
        lane.flush_floor.store(*lane.last_resync_offset, std::memory_order_release);
      } else {
        flush(lane);
      }
    }
    lane.restarting.store(false, std::memory_order_release);
  }

  // The KME answers again after an outage. Keys it issued before may be gone at the
  // slave's KME (a restart loses what was not fetched), and the receiver could then never
  // verify announcements drawn from them: wipe them, and resume each lane at an epoch
  // boundary so its next announcement is verifiable from its own keys.
  void resume_after_outage() {
    outage = false;
    std::string offsets;
    for (auto& lane : lanes) {
      flush(*lane);
      offsets += (offsets.empty() ? "" : ", ") + std::to_string(lane->next_offset);
    }
    ++kme_outages;
    log(LogLevel::warning, "key supply (peer " + config.peer_sae_id +
                               "): the KME answers again after an outage; key issued before "
                               "it is wiped unused and the stream resumes at pad offset " +
                               offsets);
  }

  // Wipes the key a lane holds (the media thread does, see consumer_ring) and moves it on
  // to a fresh epoch whose first announcement is self-verifying.
  void flush(Lane& lane) {
    lane.pending_resync = true;
    lane.flushed_pending = true;
    lane.pushed_at_flush = lane.ring_owner->bytes_pushed();
    lane.align_next_offset();
    lane.published_next_offset = lane.next_offset;
    lane.flush_floor.store(lane.next_offset, std::memory_order_release);
  }

  // A KME that replaces unfetched batches is about to be asked again while keys of ours
  // are still pending there. Keys no stream has announced yet (an idle stream's) will be
  // gone before any receiver asks for them: wipe them now and move their lanes on, rather
  // than send announcements of keys nobody can fetch.
  void flush_unannounced() {
    if (!config.publish_announcements) return;
    std::uint64_t wiped = 0;
    for (auto& lane : lanes) {
      const std::uint64_t announced = lane->announced_end.load(std::memory_order_acquire);
      if (lane->next_offset <= std::max(announced, lane->flush_floor.load())) continue;
      wiped += lane->next_offset - std::max(announced, lane->flush_floor.load());
      flush(*lane);
    }
    if (wiped != 0) {
      log(LogLevel::info, "key supply (peer " + config.peer_sae_id + "): " + std::to_string(wiped) +
                              " bytes of key no stream announced within " +
                              std::to_string(kBatchPatience.count()) +
                              " s wiped (the KME replaces unfetched batches)");
    }
  }

  void kme_answered() {
    ever_answered = true;
    refusals = 0;
    if (failed_flag.load(std::memory_order_relaxed) && !used_up) {
      failed_flag.store(false, std::memory_order_release);
    }
  }

  // Called with every KME error: decides whether to give up (see give_up_after).
  void judge(const KmeError& e) {
    const auto now = Clock::now();
    // An HTTP 401/403 is the KME's answer: refused. A TLS failure may be a refusal (our
    // certificate not accepted) or a KME restarting mid-handshake: refused only when it
    // persists with no answer in between.
    const bool http_refusal = e.kind() == KmeErrorKind::unauthorized;
    const bool tls = e.kind() == KmeErrorKind::tls;
    if (e.kind() == KmeErrorKind::transport || e.kind() == KmeErrorKind::server || tls) {
      if (delivered_once && config.role == SaeRole::master) outage = true;
    }
    if (http_refusal || tls) {
      if (refusals++ == 0) first_refusal = now;
    } else {
      refusals = 0;
    }
    const bool refused = (http_refusal && refusals >= 2) ||
                         (tls && refusals >= 3 && now - first_refusal >= kTlsRefusalPersists);
    const bool silent = !ever_answered && now - started_at >= config.give_up_after;
    if (!(refused || silent) || failed_flag.load(std::memory_order_relaxed)) return;
    {
      std::lock_guard lock(error_mutex);
      failure_text =
          std::string(refused ? "the KME refuses this SAE: " : "the KME never answered: ") +
          e.what();
    }
    failed_flag.store(true, std::memory_order_release);
    log(LogLevel::error, "key supply (peer " + config.peer_sae_id + "): giving up: " + e.what());
  }

  // A key asked for by an announcement, until it is fetched or declared lost.
  struct Wanted {
    KeyAnnouncement announcement;
    std::size_t lane;
    Clock::time_point first_asked;  // the relay grace runs from here, never restarts
    Clock::time_point next_try;
    int tries = 0;
  };

  // Remembers a request so that repeats of it are not fetched again. A KME hands a key
  // out once, so its key_ID alone identifies it (across lanes: the first stream to ask
  // for a key gets it); a pad file can be read again, so there a forged length must not
  // shadow the genuine request for the same chunk.
  bool first_sight(const KeyAnnouncement& a, Lane& lane) {
    const auto seen =
        std::make_pair(a.key_id, backend->fetch_is_destructive() ? std::uint32_t{0} : a.length);
    if (const auto it = recent.find(seen); it != recent.end()) {
      if (it->second != lane.index) {
        // Another stream asked for this key first: a copy of its announcement (a forgery
        // replayed from another stream's traffic) or a misconfigured peer. The key stays
        // with the first stream; one stream's pad never serves two.
        ++lane.keys_refused;
        if (!told_contested) {
          told_contested = true;
          log(LogLevel::warning,
              "key supply (peer " + config.peer_sae_id + "): key_ID " + a.key_id.to_string() +
                  " was announced on two streams (lanes " + std::to_string(it->second) + " and " +
                  std::to_string(lane.index) +
                  "); it stays with the first: a copied announcement, or streams crossed "
                  "between the sites' configurations");
        }
      }
      return false;
    }
    recent.emplace(seen, lane.index);
    recent_order.push_back(seen);
    if (recent_order.size() > kRecentIds) {
      recent.erase(recent_order.front());
      recent_order.pop_front();
    }
    return true;
  }

  void take_requests(Lane& lane, Clock::time_point now) {
    KeyAnnouncement a;
    while (lane.requests.pop(a)) {
      // A journalled (pad-file) receiver reads and reserves the offsets it is asked for
      // before the announcement is verified: only so far beyond what verified traffic
      // has used, so forged announcements cannot push its journal ahead without bound.
      if (lane.journal &&
          a.offset > lane.released_end.load(std::memory_order_relaxed) + 8 * config.ring_bytes) {
        ++lane.keys_refused;  // not remembered: a genuine repeat is taken once in range
        continue;
      }
      if (!first_sight(a, lane)) continue;
      if (lane.journal && a.offset < lane.restart_floor) {
        // Pad below the journal was (or may have been) used by an earlier run: refused, and
        // nothing waits for it (the decoder is told at once, as for a lost key).
        ++lane.keys_refused;
        ++lane.keys_replayed;
        lane.lost_keys.push(a);
        continue;
      }
      if (wanted.size() >= kMaxWanted) {
        ++lane.keys_refused;  // far more than any genuine sender has in flight
        continue;
      }
      wanted.push_back(Wanted{a, lane.index, now, now});
    }
  }

  void refill_slave() {
    const auto now = Clock::now();
    for (auto& lane : lanes) take_requests(*lane, now);
    // An idle slave makes no requests, so it would not notice a KME going away (or coming
    // back): ask now and then whether it answers.
    if (wanted.empty() && now - last_kme_call >= slave_probe_interval()) {
      backend->probe();
      last_kme_call = now;
      healthy = true;
    }
    // Batches of keys that are due, oldest first, for lanes with room. Keys still inside
    // their relay grace are asked for as a batch (if the KME refuses it as a whole, a few
    // requests find the keys it holds, so that one missing key does not hold up the rest);
    // keys past it are located one by one (halving) and the missing ones declared lost.
    // Keys waiting for a retry never hold up later ones.
    while (!stopping_flag) {
      const auto round = Clock::now();
      std::vector<std::size_t> room(lanes.size());
      for (auto& lane : lanes) room[lane->index] = lane->ring_owner->free_slots();
      std::vector<std::size_t> batch;
      bool old = false;
      // Keys inside their grace first: they are the ones media needs now, while keys
      // past it are most likely lost and their packets gone.
      for (const bool past : {false, true}) {
        for (std::size_t i = 0; i < wanted.size() && batch.size() < max_keys_per_request; ++i) {
          const Wanted& w = wanted[i];
          if (room[w.lane] > 0 && w.next_try <= round &&
              (round - w.first_asked >= config.relay_grace) == past) {
            batch.push_back(i);
            --room[w.lane];
          }
        }
        if (!batch.empty()) {
          old = past;
          break;
        }
      }
      if (batch.empty()) break;
      std::vector<KeyAnnouncement> asked;
      for (std::size_t i : batch) asked.push_back(wanted[i].announcement);
      for (auto& lane : lanes) {
        if (!lane->journal) continue;
        std::uint64_t end = 0;
        for (std::size_t i : batch)
          if (wanted[i].lane == lane->index)
            end = std::max(end, wanted[i].announcement.offset + wanted[i].announcement.length);
        lane->reserve_up_to(end);
      }
      const auto started = Clock::now();
      auto fetched = backend->fetch(asked, old);
      last_kme_call = Clock::now();
      note_latency(ms_since(started));
      std::uint64_t lost = 0;
      std::optional<KeyAnnouncement> first_lost;
      std::uint64_t lost_last_offset = 0;
      std::vector<bool> done(batch.size(), false);
      for (std::size_t k = 0; k < batch.size(); ++k) {
        Wanted& w = wanted[batch[k]];
        Lane& lane = *lanes[w.lane];
        if (fetched[k].key) {
          done[k] = true;
          KeyRing& r = *lane.ring_owner;
          if (!r.push(w.announcement.offset, w.announcement.key_id, fetched[k].key->bytes.span())) {
            ++lane.keys_lost;
            record_error("key_ID " + w.announcement.key_id.to_string() + " has " +
                         std::to_string(fetched[k].key->bytes.size()) +
                         " bytes, more than a key ring slot (" + std::to_string(r.slot_bytes()) +
                         "); wiped unused");
            continue;
          }
          ++lane.keys_fetched;
          lane.bytes_fetched += fetched[k].key->bytes.size();
          healthy = true;
        } else if (old && fetched[k].missing) {
          done[k] = true;
          ++lost;
          ++lane.keys_lost;
          lane.lost_keys.push(w.announcement);  // full: the decoder's own expiry catches it
          if (!first_lost) first_lost = w.announcement;
          lost_last_offset = w.announcement.offset + w.announcement.length;
        } else if (old) {
          // Not reached within this round's requests: the next round goes on locating.
        } else {
          // Not at the KME yet: the KMEs may still be relaying it. Ask again soon.
          ++w.tries;
          w.next_try =
              Clock::now() + std::min(std::chrono::milliseconds(50 << std::min(w.tries, 3)),
                                      std::chrono::milliseconds(400));
          healthy = true;  // the KME answered
        }
      }
      if (lost != 0) {
        record_error(std::to_string(lost) + " announced key" + (lost == 1 ? "" : "s") +
                     " (first key_ID " + first_lost->key_id.to_string() + ", pad offsets " +
                     std::to_string(first_lost->offset) + " to " +
                     std::to_string(lost_last_offset) +
                     ") not delivered within the relay grace of " +
                     std::to_string(config.relay_grace.count()) +
                     " ms; declared lost, packets using them are dropped. Last answer: " +
                     backend->missing_reason());
      }
      for (std::size_t k = batch.size(); k-- > 0;) {
        if (done[k]) wanted.erase(wanted.begin() + static_cast<std::ptrdiff_t>(batch[k]));
      }
      kme_answered();
      if (old) break;  // one locating round at a time: fresh requests are served first
    }
    std::vector<std::uint64_t> waiting(lanes.size(), 0);
    for (const Wanted& w : wanted) ++waiting[w.lane];
    for (auto& lane : lanes) lane->waiting_count = waiting[lane->index];
  }

  void note_latency(double ms) {
    latency_last = ms;
    ++latency_samples;
    latency_avg = latency_avg + (ms - latency_avg) / double(latency_samples);
  }

  // Media threads, after asking for key (or starting a stream): wakes a dozing refill
  // thread (see doze()). The fence pairs with doze()'s: either this sees `dozing`, or
  // doze() sees what was just asked for; a wake-up is never lost. Costs a fence per call.
  void note_use() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (dozing.load(std::memory_order_acquire) != Doze::awake) wake();
  }
  // Media thread, after a take(): wakes a thread dozing while idle (this is the first use)
  // and one napping while key is used once the ring is below its low-water mark.
  void note_take(const Lane& lane, const KeyRing* ring) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const Doze d = dozing.load(std::memory_order_acquire);
    if (d == Doze::awake) return;
    if (d == Doze::busy && ring &&
        ring->bytes_available() >= lane.wake_below.load(std::memory_order_relaxed)) {
      return;
    }
    wake();
  }
  void wake() {
    if (dozing.exchange(Doze::awake) == Doze::awake) return;
    {
      std::lock_guard lock(mutex);
      woken = true;
    }
    cv.notify_one();
  }

  // Refill thread: nothing for it to do until a stream takes or asks for key: no lane
  // took key in the last second or wants any it could not get, none is restarting, no
  // key is asked for or awaited, and (master) every ring a stream may use is above its
  // low-water mark.
  bool nothing_to_do(Clock::time_point now) const {
    if (outage || !ring_ready || !wanted.empty()) return false;
    for (const auto& lane : lanes) {
      const KeyRing& r = *lane->ring_owner;
      if (lane->restarting.load(std::memory_order_acquire) ||
          lane->demand.load(std::memory_order_relaxed) || lane->requests.read_available() != 0 ||
          r.bytes_consumed() != lane->last_consumed ||
          now - lane->last_used < std::chrono::seconds(1)) {
        return false;
      }
      if (config.role == SaeRole::master && hungry(*lane) &&
          lane->held() < config.low_water * ring_target(*lane)) {
        return false;
      }
    }
    return true;
  }

  // Master, refill thread: key is being used, but there is nothing to do until some ring
  // falls below its low-water mark, which the take() that puts it there reports
  // (note_take): no restart, demand, flush or outage under way, and a KME that keeps
  // unfetched batches (one that replaces them is waited on, see kBatchPatience). Sets
  // each lane's wake_below.
  bool may_nap() {
    if (config.role != SaeRole::master || replaces_batches || outage || !ring_ready ||
        !wanted.empty()) {
      return false;
    }
    for (auto& lane : lanes) {
      if (lane->restarting.load(std::memory_order_acquire) ||
          lane->demand.load(std::memory_order_relaxed)) {
        return false;
      }
      // held() leaves out key a flush left that the media thread has not wiped yet; its
      // next take() wipes it before note_take() looks at the ring.
      const double target = ring_target(*lane);
      const double held = lane->held();
      const double mark = config.low_water * target;
      if (held < mark) return false;
      // A quarter of the ring used wakes the thread too, at the mark at the latest: a
      // stream whose rate jumps (video starting) is measured, and its ring grown, before
      // it drains the ring sized for the old rate. A steady stream uses a quarter of a
      // ring_seconds ring in longer than busy_nap.
      lane->wake_below.store(
          static_cast<std::uint64_t>(std::ceil(std::max(mark, held - target / 4))),
          std::memory_order_relaxed);
    }
    return true;
  }

  std::chrono::milliseconds slave_probe_interval() const { return 4 * config.health_interval; }

  // Refill thread, `lock` held: sleeps while nothing uses key, until the next KME health
  // check is due, a media thread notes a use (note_use, note_take), or the supply stops.
  // An idle gateway's refill threads then wake a few times a second instead of every
  // poll_interval. A master whose key is used naps too, while its rings are above their
  // low-water marks: until a take() leaves one below (note_take), busy_nap at most,
  // where it would otherwise look every poll_interval (with 20 calls, 100 passes a second
  // over every lane: about half of its CPU). Returns false (without sleeping) when there
  // is something to do.
  bool doze(std::unique_lock<std::mutex>& lock) {
    const auto now = Clock::now();
    const bool idle = nothing_to_do(now);
    if (!idle && !may_nap()) return false;
    auto due = last_kme_call +
               (config.role == SaeRole::master ? config.health_interval : slave_probe_interval());
    if (!idle) due = std::min(due, now + config.busy_nap);
    if (due <= now + config.poll_interval) return false;
    dozing.store(idle ? Doze::idle : Doze::busy, std::memory_order_release);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (idle ? nothing_to_do(now) : may_nap()) {
      cv.wait_until(lock, due, [&] { return stopping || woken; });
    }
    dozing.store(Doze::awake, std::memory_order_relaxed);
    woken = false;
    return true;
  }

  void run() {
    // As top -H names it: a sender's supply or a receiver's.
    ::pthread_setname_np(::pthread_self(),
                         config.role == SaeRole::master ? "otp-keys-send" : "otp-keys-recv");
    // Refills are bulk work (HTTPS, JSON, base64 of up to megabytes) at the process's
    // normal priority. Media threads win the CPU because they are raised above it
    // (SCHED_FIFO or nice -10, see the gateway's [media]). A refill below normal would let
    // any busy process on the host starve the key supply, and the media waiting for it:
    // a receiver dropped its first packets when its key fetch sat behind two CPU hogs.
    auto backoff = std::chrono::milliseconds(100);
    started_at = Clock::now();
    std::unique_lock lock(mutex);
    while (!stopping) {
      lock.unlock();
      auto wait = config.poll_interval;
      bool errored = true;
      // Before the refill: a pass a take() woke sizes the rings by the rate up to now.
      for (auto& lane : lanes) lane->sample_rate();
      try {
        ensure_ring();
        if (config.role == SaeRole::master) {
          refill_master();
        } else {
          refill_slave();
        }
        backoff = std::chrono::milliseconds(100);
        errored = false;
      } catch (const SourceUsedUp& e) {
        // Unlike a KME short of key, a used-up pad never refills. A run that starts on one
        // can send nothing: give up and say so. A run that used it up goes on as its policy
        // says (dropping, or AES keyed from what it had), with the error in its stats.
        if (!used_up && !delivered_once) {
          used_up = true;
          record_error(e.what());
          {
            std::lock_guard guard(error_mutex);
            failure_text = e.what();
          }
          failed_flag.store(true, std::memory_order_release);
        } else if (!used_up) {
          record_error(e.what());
        }
        wait = std::chrono::milliseconds(1000);
      } catch (const KmeError& e) {
        if (e.kind() == KmeErrorKind::cancelled) break;
        record_error(e.what());
        judge(e);
        wait = backoff;
        // A slave waits for keys media is about to need, and a KME short of key has more
        // within a fraction of a second: retry those sooner than a KME that is down.
        const bool soon = config.role == SaeRole::slave || e.kind() == KmeErrorKind::unavailable;
        backoff = std::min(backoff * 2, std::chrono::milliseconds(soon ? 250 : 2000));
      } catch (const std::exception& e) {
        record_error(e.what());
        wait = std::chrono::milliseconds(1000);
      }
      sample_refill();
      refill_rounds.fetch_add(1, std::memory_order_relaxed);
      const bool quiet = !errored;  // nothing to back off from
      lock.lock();
      if (stopping || (quiet && doze(lock))) continue;
      cv.wait_for(lock, wait, [&] { return stopping; });
    }
  }

  // Stats of some lanes (one, or all of them), with the supply-wide state.
  KeySupplyStats stats_of(std::span<const std::unique_ptr<Lane>> of) const {
    KeySupplyStats s;
    s.memory_locked = true;
    for (const auto& lane : of) {
      if (const KeyRing* r = lane->ring.load(std::memory_order_acquire)) {
        s.bytes_available += r->bytes_available();
        s.bytes_consumed += r->bytes_consumed();
        s.ring_capacity_bytes += r->slot_count() * r->slot_bytes();
        s.memory_locked = s.memory_locked && r->memory_locked();
      } else {
        s.memory_locked = false;
      }
      s.bytes_fetched += lane->bytes_fetched;
      s.keys_fetched += lane->keys_fetched;
      s.keys_lost += lane->keys_lost;
      s.keys_refused += lane->keys_refused;
      s.keys_replayed += lane->keys_replayed;
      s.keys_waiting += lane->waiting_count;
      s.bytes_flushed += lane->bytes_flushed;
      s.bytes_wiped_at_stop += lane->wiped_at_stop;
      s.consumption_bytes_per_s += lane->consumption;
    }
    // Offsets are a lane's own: the first one's when several are summed.
    s.next_offset = of.front()->published_next_offset;
    s.reserved_offset = of.front()->published_reserved;
    s.kme_outages = kme_outages;
    s.kme_replaces_batches = replaces_batches_flag;
    s.failed = failed_flag;
    s.kme_errors = kme_errors;
    s.key_size_bits = published_key_bits;
    s.refill_latency_ms_last = latency_last;
    s.refill_latency_ms_avg = latency_avg;
    s.refill_rounds = refill_rounds.load(std::memory_order_relaxed);
    s.seconds_to_exhaustion = s.consumption_bytes_per_s >= 1
                                  ? double(s.bytes_available) / s.consumption_bytes_per_s
                                  : std::numeric_limits<double>::infinity();
    s.kme_healthy = healthy;
    std::lock_guard lock(error_mutex);
    s.last_error = last_error;
    s.failure = failure_text;
    s.kme_status = last_kme_status;
    s.refill_bytes_per_s = refill_rate.per_second().value_or(0);
    return s;
  }

  std::size_t keys_per_request_cap = SIZE_MAX;  // master: shrinks while the KME is short
  int probes = 0;  // master: stored-count probes made (see note_stored_counts)
  bool replaces_batches = false;
  std::uint64_t pending_floor = 0;  // master: pending count once our last batch is fetched
  Clock::time_point batch_issued{};
  bool outage = false;                // master: the KME was unreachable since keys were last issued
  Clock::time_point last_kme_call{};  // master: last successful KME exchange
  bool delivered_once = false;        // master: keys were issued since start
  bool ever_answered = false;
  bool used_up = false;  // the source will never deliver again (SourceUsedUp)
  int refusals = 0;
  Clock::time_point first_refusal{};
  Clock::time_point started_at = Clock::now();

  KeySupplyConfig config;
  std::unique_ptr<Backend> backend;
  std::vector<std::unique_ptr<Lane>> lanes;

  // Refill-thread state.
  bool ring_ready = false;
  std::uint32_t key_bits = 0;
  std::uint32_t max_keys_per_request = kDefaultMaxKeysPerRequest;
  std::deque<Wanted> wanted;
  // -> the lane that asked. A hash map: at 65536 keys (about five minutes of 20 calls) a
  // tree cost a slave's refill thread more each minute, up to about 8 % of its time.
  std::unordered_map<SeenKey, std::size_t, SeenKeyHash> recent;
  bool told_contested = false;
  std::deque<SeenKey> recent_order;
  std::uint64_t latency_samples = 0;

  // Shared with the media threads (lock-free) and with stats() readers.
  std::atomic<std::uint64_t> kme_errors{0}, kme_outages{0};
  std::atomic<std::uint32_t> published_key_bits{0};
  std::atomic<double> latency_last{0}, latency_avg{0};
  std::atomic<bool> healthy{false};
  std::atomic<bool> stopping_flag{false};
  std::atomic<bool> replaces_batches_flag{false};
  std::atomic<bool> failed_flag{false};
  mutable std::mutex error_mutex;
  // Under error_mutex: the KME's last status and the refill rate (see sample_refill).
  std::optional<KmeStatus> last_kme_status;
  RateWindow refill_rate{120};
  double delivered_total = 0;
  std::uint64_t refill_fetched = 0, refill_kme = 0;
  bool refill_seen = false;
  Clock::time_point last_refill_sample{};
  std::string last_error;
  std::string failure_text;

  std::atomic<std::uint64_t> refill_rounds{0};
  // How the refill thread sleeps (see doze()): not at all, until a use wakes it, or until
  // a ring falls below its low-water mark.
  enum class Doze { awake, idle, busy };
  std::atomic<Doze> dozing{Doze::awake};

  std::thread thread;
  std::mutex mutex;
  std::condition_variable cv;
  bool stopping = false;
  bool woken = false;  // under mutex: note_use() ended a doze
};

std::optional<KeyAnnouncement> KeySupply::Impl::Lane::next_announcement() {
  if (!consumer_ring()) return std::nullopt;  // no ring yet, or a restart under way
  while (true) {
    if (!announcements.read_available()) return std::nullopt;
    const KeyAnnouncement& front = announcements.front();
    const std::uint64_t floor = flush_floor.load(std::memory_order_acquire);
    if (front.offset < floor) {  // its key was flushed: never announce it
      announcements.pop();
      continue;
    }
    KeyRing* r = ring.load(std::memory_order_acquire);
    const std::uint64_t position = r && r->peek_offset() ? *r->peek_offset() : front.offset;
    if (front.resync && position < front.offset) {
      release_budget = 0;  // a resync run is announced once the stream reaches it
      return std::nullopt;
    }
    if (release_budget == 0 && impl.config.announce_lead_seconds > 0) {
      // Announce a bounded lead ahead of use, a whole announcement's worth at a time.
      const double lead =
          std::max(double(impl.config.announce_min_bytes),
                   consumption.load(std::memory_order_relaxed) * impl.config.announce_lead_seconds);
      if (double(front.offset) >= double(position) + lead) return std::nullopt;
      release_budget = kAnnouncementBatch;
    }
    KeyAnnouncement a = front;
    announcements.pop();
    announced_end.store(a.offset + a.length, std::memory_order_release);
    if (release_budget > 0) --release_budget;
    return a;
  }
}

KeySupply::KeySupply(KmeClientConfig kme, KeySupplyConfig config) {
  config = Impl::checked(std::move(config));
  if (!kme.log) kme.log = config.log;
  const bool master = config.role == SaeRole::master;
  auto backend = std::make_unique<KmeBackend>(std::move(kme), config.peer_sae_id);
  impl_ = std::make_unique<Impl>(std::move(backend), std::move(config), master);
}

KeySupply::KeySupply(PadFileConfig pad_file, KeySupplyConfig config) {
  config = Impl::checked(std::move(config));
  auto backend = std::make_unique<PadFileBackend>(std::move(pad_file));
  // Both sides read offsets straight from the file: both need the journal.
  impl_ = std::make_unique<Impl>(std::move(backend), std::move(config), true);
}

KeySupply::~KeySupply() {
  stop();
  std::uint64_t left = 0;
  for (const auto& lane : impl_->lanes) {
    if (const KeyRing* r = lane->ring.load()) left += r->bytes_available();
  }
  if (left != 0) {
    impl_->log(LogLevel::info, "key supply (peer " + impl_->config.peer_sae_id + "): " +
                                   std::to_string(left) + " bytes of fetched key wiped unused");
  }
}

void KeySupply::start() {
  if (impl_->thread.joinable()) return;
  impl_->thread = std::thread([this] { impl_->run(); });
}

void KeySupply::stop() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->stopping_flag = true;
  impl_->cv.notify_all();
  impl_->backend->cancel();
  if (impl_->thread.joinable()) impl_->thread.join();
  for (const auto& lane : impl_->lanes) {
    if (const KeyRing* r = lane->ring.load()) lane->wiped_at_stop = r->bytes_available();
  }
}

SaeRole KeySupply::role() const {
  return impl_->config.role;
}

std::size_t KeySupply::lane_count() const {
  return impl_->lanes.size();
}

PadSource& KeySupply::lane(std::size_t index) {
  if (index >= impl_->lanes.size()) {
    throw std::out_of_range("key supply lane " + std::to_string(index) + " of " +
                            std::to_string(impl_->lanes.size()));
  }
  return *impl_->lanes[index];
}

std::optional<std::uint64_t> KeySupply::take(std::span<std::uint8_t> out) {
  return impl_->lanes[0]->take(out);
}

std::optional<std::uint64_t> KeySupply::peek_offset() {
  return impl_->lanes[0]->peek_offset();
}

std::uint64_t KeySupply::available() const {
  return impl_->lanes[0]->available();
}

std::optional<KeyAnnouncement> KeySupply::next_announcement() {
  return impl_->lanes[0]->next_announcement();
}

bool KeySupply::request(const KeyAnnouncement& announcement) {
  return impl_->lanes[0]->request(announcement);
}

std::optional<KeyAnnouncement> KeySupply::next_lost() {
  return impl_->lanes[0]->next_lost();
}

bool KeySupply::failed() const {
  return impl_->failed_flag.load(std::memory_order_acquire);
}

void KeySupply::begin_stream() {
  impl_->lanes[0]->begin_stream();
}

std::string KeySupply::failure() const {
  std::lock_guard lock(impl_->error_mutex);
  return impl_->failure_text;
}

std::optional<PadSegment> KeySupply::pop_segment() {
  return impl_->lanes[0]->pop_segment();
}

void KeySupply::release(const PadSegment& segment) {
  impl_->lanes[0]->release(segment);
}

KeySupplyStats KeySupply::stats() const {
  return impl_->stats_of(impl_->lanes);
}

KeySupplyStats KeySupply::lane_stats(std::size_t index) const {
  if (index >= impl_->lanes.size()) {
    throw std::out_of_range("key supply lane " + std::to_string(index) + " of " +
                            std::to_string(impl_->lanes.size()));
  }
  return impl_->stats_of(std::span(impl_->lanes).subspan(index, 1));
}

}  // namespace otpgate::keys

// Key supply: a refill thread that keeps one direction's key ring between its low-
// and high-water marks. As master it calls enc_keys and assigns pad offsets (after
// reserving them in the journal); as slave it calls dec_keys for announced key_IDs.
#include <atomic>
#include <boost/lockfree/spsc_queue.hpp>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <limits>
#include <mutex>
#include <set>
#include <thread>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

namespace {
constexpr std::size_t kQueueCapacity = 65536;
constexpr std::size_t kRecentIds = 65536;
constexpr std::uint32_t kDefaultMaxKeysPerRequest = 128;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

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
  // Slave: the announced keys; an empty optional is a key that will never come.
  virtual std::vector<std::optional<Key>> fetch(std::span<const KeyAnnouncement> wanted) = 0;
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

  std::vector<std::optional<Key>> fetch(std::span<const KeyAnnouncement> wanted) override {
    std::vector<KeyId> ids;
    for (const auto& a : wanted) ids.push_back(a.key_id);
    std::vector<std::optional<Key>> fetched(wanted.size());
    try {
      auto keys = client_.dec_keys(peer_, ids);
      for (std::size_t i = 0; i < keys.size(); ++i) fetched[i] = std::move(keys[i]);
    } catch (const KmeError& e) {
      if (e.kind() != KmeErrorKind::key_not_found) throw;
      // One missing key fails the whole batch: find out which, one by one.
      for (std::size_t i = 0; i < ids.size(); ++i) {
        try {
          fetched[i] = client_.dec_key(peer_, ids[i]);
        } catch (const KmeError& single) {
          if (single.kind() != KmeErrorKind::key_not_found) throw;
        }
      }
    }
    return fetched;
  }

  void cancel() override { client_.cancel(); }

 private:
  KmeClient client_;
  std::string peer_;
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
      throw KmeError(KmeErrorKind::unavailable, 0,
                     "pad file " + config_.path.string() + " is used up (" + std::to_string(size_) +
                         " bytes); provide a new pre-shared pad");
    }
    return keys;
  }

  std::vector<std::optional<Key>> fetch(std::span<const KeyAnnouncement> wanted) override {
    std::vector<std::optional<Key>> fetched(wanted.size());
    for (std::size_t i = 0; i < wanted.size(); ++i) {
      const auto& a = wanted[i];
      if (a.key_id == pad_file_key_id(a.offset) && a.length != 0 && a.offset <= size_ &&
          a.length <= size_ - a.offset) {
        fetched[i] = read(a.offset, a.length);
      }
    }
    return fetched;
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
  Impl(std::unique_ptr<Backend> source, KeySupplyConfig cfg, bool journal_required)
      : config(std::move(cfg)), backend(std::move(source)) {
    if (!(config.low_water > 0 && config.low_water < config.high_water &&
          config.high_water <= 1.0)) {
      throw std::invalid_argument("key ring water marks must satisfy 0 < low < high <= 1");
    }
    if (journal_required && config.journal.empty()) {
      throw std::invalid_argument(
          "this key supply needs an offset journal path (it guarantees no pad offset is "
          "reused after a restart)");
    }
    if (!config.journal.empty()) {
      journal.emplace(config.journal);
      next_offset = journal->reserved();
      restart_floor = journal->reserved();
      released_end = restart_floor;
      published_next_offset = next_offset;
      published_reserved = journal->reserved();
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
    log(LogLevel::warning, "key supply (peer " + config.peer_sae_id + "): " + message);
  }

  // Makes sure the journal covers offsets below `end` before they can be used.
  void reserve_up_to(std::uint64_t end) {
    if (end <= journal->reserved()) return;
    // Whole chunks: after a restart the stream resumes on a chunk boundary, which the
    // codec's authentication epochs are aligned to, so no pad is skipped.
    const std::uint64_t chunk = std::max<std::uint64_t>(1, config.reserve_chunk);
    journal->reserve((end + chunk - 1) / chunk * chunk);
    published_reserved = journal->reserved();
  }

  // Creates the ring once the key size is known. Refill thread only.
  void ensure_ring() {
    if (ring_owner) return;
    const Backend::Geometry g = backend->geometry(config.role, config, config.log);
    key_bits = g.key_bits;
    max_keys_per_request = std::max<std::uint32_t>(1, g.per_request);
    const std::size_t key_bytes = key_bits / 8;
    if (key_bytes == 0) throw KmeError(KmeErrorKind::protocol, 200, "KME advertises 0-bit keys");
    const std::size_t slots = std::max<std::size_t>(2, config.ring_bytes / key_bytes);
    ring_owner = std::make_unique<KeyRing>(slots, key_bytes);
    if (!ring_owner->memory_locked()) {
      log(LogLevel::warning, "could not mlock the key ring (" + std::to_string(slots * key_bytes) +
                                 " bytes): key memory may be swapped out; raise RLIMIT_MEMLOCK "
                                 "(LimitMEMLOCK= in systemd)");
    }
    published_key_bits = key_bits;
    ring.store(ring_owner.get(), std::memory_order_release);
    log(LogLevel::debug, "key ring ready: " + std::to_string(slots) + " keys of " +
                             std::to_string(key_bits) + " bits for peer " + config.peer_sae_id);
  }

  void refill_master() {
    KeyRing& r = *ring_owner;
    const double capacity = double(r.slot_count() * r.slot_bytes());
    if (double(r.bytes_available()) >= config.low_water * capacity) return;
    while (!stopping_flag && double(r.bytes_available()) < config.high_water * capacity) {
      const double missing = config.high_water * capacity - double(r.bytes_available());
      std::size_t number = static_cast<std::size_t>(std::ceil(missing / r.slot_bytes()));
      number = std::min(
          {number, r.free_slots(), std::size_t(max_keys_per_request), keys_per_request_cap});
      if (config.publish_announcements) number = std::min(number, announcements.write_available());
      if (number == 0) return;
      const auto started = Clock::now();
      std::vector<Key> keys;
      try {
        keys = backend->deliver(next_offset, number, key_bits);
      } catch (const KmeError& e) {
        // A KME short of key (a QKD link slower than the traffic, or a store smaller than
        // the ring) refuses the whole request: ask for less at once rather than wait for
        // all of it, which a small store would never hold.
        if (e.kind() != KmeErrorKind::unavailable || number == 1) throw;
        keys_per_request_cap = number / 2;
        continue;
      }
      if (keys_per_request_cap < max_keys_per_request)
        keys_per_request_cap =
            std::min<std::size_t>(2 * keys_per_request_cap, max_keys_per_request);
      note_latency(ms_since(started));
      std::uint64_t total = 0;
      for (const Key& k : keys) {
        if (k.bytes.size() > r.slot_bytes()) {
          throw KmeError(KmeErrorKind::protocol, 200,
                         "KME delivered a " + std::to_string(k.bytes.size() * 8) +
                             "-bit key where " + std::to_string(key_bits) + " bits were asked; " +
                             std::to_string(keys.size()) + " keys wiped unused");
        }
        total += k.bytes.size();
      }
      // Reserve before any byte above the old reservation can be handed out.
      reserve_up_to(next_offset + total);
      for (const Key& k : keys) {
        // Announce first: the consumer must never take a byte it could not announce.
        if (config.publish_announcements) {
          announcements.push(
              KeyAnnouncement{next_offset, k.id, static_cast<std::uint32_t>(k.bytes.size())});
        }
        r.push(next_offset, k.id, k.bytes.span());  // cannot fail: free slots were counted
        next_offset += k.bytes.size();
      }
      published_next_offset = next_offset;
      keys_fetched += keys.size();
      bytes_fetched += total;
      healthy = true;
    }
  }

  void refill_slave() {
    KeyRing& r = *ring_owner;
    KeyAnnouncement a;
    while (requests.pop(a)) {
      if (recent.contains(a.key_id)) continue;
      // A journalled (pad-file) receiver reads and reserves the offsets it is asked for
      // before the announcement is verified: only so far beyond what verified traffic
      // has used, so forged announcements cannot push its journal ahead without bound.
      if (journal &&
          a.offset > released_end.load(std::memory_order_relaxed) + 8 * config.ring_bytes) {
        ++keys_refused;  // not remembered: a genuine repeat is taken once in range
        continue;
      }
      recent.insert(a.key_id);
      recent_order.push_back(a.key_id);
      if (recent_order.size() > kRecentIds) {
        recent.erase(recent_order.front());
        recent_order.pop_front();
      }
      if (journal && a.offset < restart_floor) {
        ++keys_refused;  // pad below the journal was (or may have been) used by an earlier run
        continue;
      }
      pending.push_back(a);
    }
    while (!stopping_flag && !pending.empty() && r.free_slots() > 0) {
      const std::size_t number =
          std::min({pending.size(), r.free_slots(), std::size_t(max_keys_per_request)});
      const std::vector<KeyAnnouncement> wanted(pending.begin(), pending.begin() + number);
      if (journal) {
        std::uint64_t end = 0;
        for (const auto& w : wanted) end = std::max(end, w.offset + w.length);
        reserve_up_to(end);
      }
      const auto started = Clock::now();
      auto fetched = backend->fetch(wanted);
      note_latency(ms_since(started));
      for (std::size_t i = 0; i < number; ++i) {
        const KeyAnnouncement& w = wanted[i];
        if (!fetched[i]) {
          ++keys_lost;
          record_error("key_ID " + w.key_id.to_string() + " announced for pad offset " +
                       std::to_string(w.offset) +
                       " was never delivered; packets using it will be dropped");
        } else if (fetched[i]->bytes.size() != w.length) {
          ++keys_lost;
          record_error("key_ID " + w.key_id.to_string() + " has " +
                       std::to_string(fetched[i]->bytes.size()) + " bytes but was announced with " +
                       std::to_string(w.length) + "; wiped unused");
        } else if (!r.push(w.offset, w.key_id, fetched[i]->bytes.span())) {
          ++keys_lost;
          record_error("key_ID " + w.key_id.to_string() + " does not fit the key ring (" +
                       std::to_string(w.length) + " bytes > slot of " +
                       std::to_string(r.slot_bytes()) + "); wiped unused");
        } else {
          ++keys_fetched;
          bytes_fetched += w.length;
          healthy = true;
        }
        pending.pop_front();
      }
    }
  }

  void note_latency(double ms) {
    latency_last = ms;
    ++latency_samples;
    latency_avg = latency_avg + (ms - latency_avg) / double(latency_samples);
  }

  void sample_rate(Clock::time_point& last_time, std::uint64_t& last_consumed) {
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - last_time).count();
    if (seconds < 0.25) return;
    KeyRing* r = ring.load(std::memory_order_acquire);
    const std::uint64_t consumed = r ? r->bytes_consumed() : 0;
    const double instant = double(consumed - last_consumed) / seconds;
    consumption = consumption == 0 ? instant : 0.6 * consumption + 0.4 * instant;
    last_time = now;
    last_consumed = consumed;
  }

  void run() {
    // Refills are bulk work (HTTPS, JSON, base64 of up to megabytes) at the process's
    // normal priority. Media threads win the CPU because they are raised above it
    // (SCHED_FIFO or nice -10, see the gateway's [media]). A refill below normal would let
    // any busy process on the host starve the key supply, and the media waiting for it:
    // a receiver dropped its first packets when its key fetch sat behind two CPU hogs.
    auto backoff = std::chrono::milliseconds(100);
    auto last_time = Clock::now();
    std::uint64_t last_consumed = 0;
    std::unique_lock lock(mutex);
    while (!stopping) {
      lock.unlock();
      auto wait = config.poll_interval;
      try {
        ensure_ring();
        if (config.role == SaeRole::master) {
          refill_master();
        } else {
          refill_slave();
        }
        backoff = std::chrono::milliseconds(100);
      } catch (const KmeError& e) {
        if (e.kind() == KmeErrorKind::cancelled) break;
        record_error(e.what());
        wait = backoff;
        // A slave waits for keys media is about to need, and a KME short of key has more
        // within a fraction of a second: retry those sooner than a KME that is down.
        const bool soon = config.role == SaeRole::slave || e.kind() == KmeErrorKind::unavailable;
        backoff = std::min(backoff * 2, std::chrono::milliseconds(soon ? 250 : 2000));
      } catch (const std::exception& e) {
        record_error(e.what());
        wait = std::chrono::milliseconds(1000);
      }
      sample_rate(last_time, last_consumed);
      lock.lock();
      cv.wait_for(lock, wait, [&] { return stopping; });
    }
  }

  std::size_t keys_per_request_cap = SIZE_MAX;  // master: shrinks while the KME is short

  KeySupplyConfig config;
  std::unique_ptr<Backend> backend;
  std::optional<OffsetJournal> journal;

  // Refill-thread state.
  std::unique_ptr<KeyRing> ring_owner;
  std::uint32_t key_bits = 0;
  std::uint32_t max_keys_per_request = kDefaultMaxKeysPerRequest;
  std::uint64_t next_offset = 0;
  std::uint64_t restart_floor = 0;  // slave: nothing below the journal at start is fetched
  std::deque<KeyAnnouncement> pending;
  std::set<KeyId> recent;
  std::deque<KeyId> recent_order;
  std::uint64_t latency_samples = 0;

  // Shared with the media thread (lock-free) and with stats() readers.
  std::atomic<KeyRing*> ring{nullptr};
  boost::lockfree::spsc_queue<KeyAnnouncement> announcements{kQueueCapacity};
  boost::lockfree::spsc_queue<KeyAnnouncement> requests{kQueueCapacity};
  std::atomic<std::uint64_t> bytes_fetched{0}, keys_fetched{0}, keys_lost{0}, keys_refused{0},
      kme_errors{0};
  std::atomic<std::uint64_t> published_next_offset{0}, published_reserved{0};
  std::atomic<std::uint32_t> published_key_bits{0};
  std::atomic<double> latency_last{0}, latency_avg{0}, consumption{0};
  std::atomic<bool> healthy{false};
  std::atomic<std::uint64_t> released_end{0};  // slave: end of the furthest key released
  std::atomic<bool> stopping_flag{false};
  mutable std::mutex error_mutex;
  std::string last_error;

  std::thread thread;
  std::mutex mutex;
  std::condition_variable cv;
  bool stopping = false;
};

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
  if (KeyRing* r = impl_->ring.load()) {
    const std::uint64_t left = r->bytes_available();
    if (left != 0) {
      impl_->log(LogLevel::info, "key supply (peer " + impl_->config.peer_sae_id + "): " +
                                     std::to_string(left) + " bytes of fetched key wiped unused");
    }
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
}

SaeRole KeySupply::role() const {
  return impl_->config.role;
}

std::optional<std::uint64_t> KeySupply::take(std::span<std::uint8_t> out) {
  KeyRing* r = impl_->ring.load(std::memory_order_acquire);
  return r ? r->take(out) : std::nullopt;
}

std::optional<std::uint64_t> KeySupply::peek_offset() {
  KeyRing* r = impl_->ring.load(std::memory_order_acquire);
  return r ? r->peek_offset() : std::nullopt;
}

std::uint64_t KeySupply::available() const {
  const KeyRing* r = impl_->ring.load(std::memory_order_acquire);
  return r ? r->bytes_available() : 0;
}

std::optional<KeyAnnouncement> KeySupply::next_announcement() {
  KeyAnnouncement a;
  if (!impl_->announcements.pop(a)) return std::nullopt;
  return a;
}

bool KeySupply::request(const KeyAnnouncement& announcement) {
  return impl_->requests.push(announcement);
}

std::optional<PadSegment> KeySupply::pop_segment() {
  KeyRing* r = impl_->ring.load(std::memory_order_acquire);
  return r ? r->pop_segment() : std::nullopt;
}

void KeySupply::release(const PadSegment& segment) {
  const std::uint64_t end = segment.offset + segment.bytes.size();
  impl_->ring.load(std::memory_order_acquire)->release(segment);
  // Single consumer: a plain load/store pair is enough to keep the maximum.
  if (end > impl_->released_end.load(std::memory_order_relaxed)) {
    impl_->released_end.store(end, std::memory_order_relaxed);
  }
}

KeySupplyStats KeySupply::stats() const {
  const Impl& i = *impl_;
  KeySupplyStats s;
  if (const KeyRing* r = i.ring.load(std::memory_order_acquire)) {
    s.bytes_available = r->bytes_available();
    s.bytes_consumed = r->bytes_consumed();
    s.ring_capacity_bytes = r->slot_count() * r->slot_bytes();
    s.memory_locked = r->memory_locked();
  }
  s.bytes_fetched = i.bytes_fetched;
  s.keys_fetched = i.keys_fetched;
  s.keys_lost = i.keys_lost;
  s.keys_refused = i.keys_refused;
  s.kme_errors = i.kme_errors;
  s.next_offset = i.published_next_offset;
  s.reserved_offset = i.published_reserved;
  s.key_size_bits = i.published_key_bits;
  s.consumption_bytes_per_s = i.consumption;
  s.refill_latency_ms_last = i.latency_last;
  s.refill_latency_ms_avg = i.latency_avg;
  s.seconds_to_exhaustion = s.consumption_bytes_per_s >= 1
                                ? double(s.bytes_available) / s.consumption_bytes_per_s
                                : std::numeric_limits<double>::infinity();
  s.kme_healthy = i.healthy;
  std::lock_guard lock(i.error_mutex);
  s.last_error = i.last_error;
  return s;
}

}  // namespace otpgate::keys

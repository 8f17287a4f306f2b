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
}  // namespace

struct KeySupply::Impl {
  Impl(KmeClientConfig kme, KeySupplyConfig cfg) : config(std::move(cfg)) {
    if (!config.log) config.log = stderr_log_sink();
    if (!kme.log) kme.log = config.log;
    if (config.peer_sae_id.empty()) {
      throw std::invalid_argument("peer SAE ID is not set: name the SAE at the other site");
    }
    if (!(config.low_water > 0 && config.low_water < config.high_water &&
          config.high_water <= 1.0)) {
      throw std::invalid_argument("key ring water marks must satisfy 0 < low < high <= 1");
    }
    client = std::make_unique<KmeClient>(std::move(kme));
    if (config.role == SaeRole::master) {
      if (config.journal.empty()) {
        throw std::invalid_argument(
            "a master key supply needs an offset journal path (it guarantees no pad offset "
            "is reused after a restart)");
      }
      journal.emplace(config.journal);
      next_offset = journal->reserved();
      published_next_offset = next_offset;
      published_reserved = journal->reserved();
    }
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

  // Creates the ring once the key size is known. Refill thread only.
  void ensure_ring() {
    if (ring_owner) return;
    std::size_t key_bytes = 0;
    try {
      status = client->status(config.peer_sae_id);
      key_bits = choose_key_size(status, config.key_size_cap_bits);
      key_bytes = config.role == SaeRole::master ? key_bits / 8 : status.max_key_size / 8;
      max_keys_per_request = status.max_key_per_request;
    } catch (const KmeError& e) {
      // Many KMEs only answer status to the master; a slave can do without it.
      if (config.role == SaeRole::master || e.http_status() < 400 || e.http_status() >= 500) throw;
      log(LogLevel::info, std::string("status refused to the slave (") + e.what() +
                              "); assuming keys of at most " +
                              std::to_string(config.fallback_key_bits) + " bits");
      key_bytes = config.fallback_key_bits / 8;
      key_bits = config.fallback_key_bits;
      max_keys_per_request = kDefaultMaxKeysPerRequest;
    }
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
    log(LogLevel::info, "key ring ready: " + std::to_string(slots) + " keys of " +
                            std::to_string(key_bits) + " bits for peer " + config.peer_sae_id);
  }

  void refill_master() {
    KeyRing& r = *ring_owner;
    const double capacity = double(r.slot_count() * r.slot_bytes());
    if (double(r.bytes_available()) >= config.low_water * capacity) return;
    while (!stopping_flag && double(r.bytes_available()) < config.high_water * capacity) {
      const double missing = config.high_water * capacity - double(r.bytes_available());
      std::size_t number = static_cast<std::size_t>(std::ceil(missing / r.slot_bytes()));
      number = std::min({number, r.free_slots(), std::size_t(max_keys_per_request)});
      if (config.publish_announcements) number = std::min(number, announcements.write_available());
      if (number == 0) return;
      const auto started = Clock::now();
      std::vector<Key> keys =
          client->enc_keys(config.peer_sae_id, static_cast<std::uint32_t>(number), key_bits);
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
      if (next_offset + total > journal->reserved()) {
        journal->reserve(std::max(next_offset + total, journal->reserved() + config.reserve_chunk));
        published_reserved = journal->reserved();
      }
      for (const Key& k : keys) {
        r.push(next_offset, k.id, k.bytes.span());  // cannot fail: free slots were counted
        if (config.publish_announcements) {
          announcements.push(
              KeyAnnouncement{next_offset, k.id, static_cast<std::uint32_t>(k.bytes.size())});
        }
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
      recent.insert(a.key_id);
      recent_order.push_back(a.key_id);
      if (recent_order.size() > kRecentIds) {
        recent.erase(recent_order.front());
        recent_order.pop_front();
      }
      pending.push_back(a);
    }
    while (!stopping_flag && !pending.empty() && r.free_slots() > 0) {
      const std::size_t number =
          std::min({pending.size(), r.free_slots(), std::size_t(max_keys_per_request)});
      std::vector<KeyId> ids;
      for (std::size_t i = 0; i < number; ++i) ids.push_back(pending[i].key_id);
      const auto started = Clock::now();
      std::vector<std::optional<Key>> fetched(number);
      try {
        auto keys = client->dec_keys(config.peer_sae_id, ids);
        for (std::size_t i = 0; i < number; ++i) fetched[i] = std::move(keys[i]);
      } catch (const KmeError& e) {
        if (e.kind() != KmeErrorKind::key_not_found) throw;
        // One missing key fails the whole batch: find out which, one by one.
        for (std::size_t i = 0; i < number; ++i) {
          try {
            fetched[i] = client->dec_key(config.peer_sae_id, ids[i]);
          } catch (const KmeError& single) {
            if (single.kind() != KmeErrorKind::key_not_found) throw;
          }
        }
      }
      note_latency(ms_since(started));
      for (std::size_t i = 0; i < number; ++i) {
        const KeyAnnouncement& wanted = pending.front();
        if (!fetched[i]) {
          ++keys_lost;
          record_error("key_ID " + wanted.key_id.to_string() + " announced for pad offset " +
                       std::to_string(wanted.offset) +
                       " was never delivered by the KME; packets using it will be dropped");
        } else if (fetched[i]->bytes.size() != wanted.length) {
          ++keys_lost;
          record_error("key_ID " + wanted.key_id.to_string() + " has " +
                       std::to_string(fetched[i]->bytes.size()) + " bytes but was announced with " +
                       std::to_string(wanted.length) + "; wiped unused");
        } else if (!r.push(wanted.offset, wanted.key_id, fetched[i]->bytes.span())) {
          ++keys_lost;
          record_error("key_ID " + wanted.key_id.to_string() + " does not fit the key ring (" +
                       std::to_string(wanted.length) + " bytes > slot of " +
                       std::to_string(r.slot_bytes()) + "); wiped unused");
        } else {
          ++keys_fetched;
          bytes_fetched += wanted.length;
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
        backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
      } catch (const std::exception& e) {
        record_error(e.what());
        wait = std::chrono::milliseconds(1000);
      }
      sample_rate(last_time, last_consumed);
      lock.lock();
      cv.wait_for(lock, wait, [&] { return stopping; });
    }
  }

  KeySupplyConfig config;
  std::unique_ptr<KmeClient> client;
  std::optional<OffsetJournal> journal;

  // Refill-thread state.
  std::unique_ptr<KeyRing> ring_owner;
  KmeStatus status;
  std::uint32_t key_bits = 0;
  std::uint32_t max_keys_per_request = kDefaultMaxKeysPerRequest;
  std::uint64_t next_offset = 0;
  std::deque<KeyAnnouncement> pending;
  std::set<KeyId> recent;
  std::deque<KeyId> recent_order;
  std::uint64_t latency_samples = 0;

  // Shared with the media thread (lock-free) and with stats() readers.
  std::atomic<KeyRing*> ring{nullptr};
  boost::lockfree::spsc_queue<KeyAnnouncement> announcements{kQueueCapacity};
  boost::lockfree::spsc_queue<KeyAnnouncement> requests{kQueueCapacity};
  std::atomic<std::uint64_t> bytes_fetched{0}, keys_fetched{0}, keys_lost{0}, kme_errors{0};
  std::atomic<std::uint64_t> published_next_offset{0}, published_reserved{0};
  std::atomic<std::uint32_t> published_key_bits{0};
  std::atomic<double> latency_last{0}, latency_avg{0}, consumption{0};
  std::atomic<bool> healthy{false};
  std::atomic<bool> stopping_flag{false};
  mutable std::mutex error_mutex;
  std::string last_error;

  std::thread thread;
  std::mutex mutex;
  std::condition_variable cv;
  bool stopping = false;
};

KeySupply::KeySupply(KmeClientConfig kme, KeySupplyConfig config)
    : impl_(std::make_unique<Impl>(std::move(kme), std::move(config))) {}

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
  impl_->client->cancel();
  if (impl_->thread.joinable()) impl_->thread.join();
}

SaeRole KeySupply::role() const {
  return impl_->config.role;
}

std::optional<std::uint64_t> KeySupply::take(std::span<std::uint8_t> out) {
  KeyRing* r = impl_->ring.load(std::memory_order_acquire);
  return r ? r->take(out) : std::nullopt;
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
  impl_->ring.load(std::memory_order_acquire)->release(segment);
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

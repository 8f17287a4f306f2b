// SPDX-License-Identifier: LGPL-2.1-or-later
#include "kme_simulator.hpp"

#include <httplib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

namespace otpgate::kmesim {

using keys::KeyId;
using keys::LogLevel;
using keys::SecretBytes;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// An error the handlers answer with: the standard's message (and details), and what a
// vendor KME says instead (empty: its words for the status code).
struct Refusal {
  int status;
  std::string message;
  json details = nullptr;
  std::string vendor = {};
};

// What KMEs of one vendor answer for keys that are unknown, gone or dropped unfetched.
constexpr const char* kKeysDoNotExist = "Some of the requested keys do not exist in this KME.";

std::string reason_phrase(int status) {
  switch (status) {
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 413:
      return "Payload Too Large";
    case 414:
      return "URI Too Long";
    case 500:
      return "Internal Server Error";
    case 503:
      return "Service Unavailable";
    default:
      return status >= 500 ? "Server Error" : "Client Error";
  }
}

std::string vendor_wording(int status) {
  switch (status) {
    case 401:
    case 403:
      return "Client certificate not accepted";
    case 404:
      return "Resource not found";
    case 503:
      return "Insufficient key material";
    default:
      return status >= 500 ? "Internal server error" : "Invalid request";
  }
}

std::string html_escape(std::string_view text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Writes an error answer in `style`; the status code is the same in every style.
void set_error(httplib::Response& res, ErrorStyle style, const Refusal& r) {
  res.status = r.status;
  switch (style) {
    case ErrorStyle::etsi: {
      json error{{"message", r.message}};
      if (!r.details.is_null()) error["details"] = r.details;
      res.set_content(error.dump(), "application/json");
      break;
    }
    case ErrorStyle::vendor:
      res.set_content(
          json{{"detail", r.vendor.empty() ? vendor_wording(r.status) : r.vendor}}.dump(),
          "application/json");
      break;
    case ErrorStyle::html: {
      const std::string reason = reason_phrase(r.status);
      res.set_content("<html><head><title>" + std::to_string(r.status) + " " + reason +
                          "</title></head><body><h1>" + reason + "</h1><p>" +
                          html_escape(r.message) + "</p></body></html>",
                      "text/html");
      break;
    }
  }
}

struct X509Deleter {
  void operator()(X509* cert) const { X509_free(cert); }
};

std::string peer_common_name(const httplib::Request& req) {
  if (!req.ssl) return {};
  std::unique_ptr<X509, X509Deleter> cert(SSL_get1_peer_certificate(req.ssl));
  if (!cert) return {};
  X509_NAME* subject = X509_get_subject_name(cert.get());
  const int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (index < 0) return {};
  const ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index));
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(data)),
                     static_cast<std::size_t>(ASN1_STRING_length(data)));
}

// A key as the simulator keeps it: its base64 text, made once when the key is generated
// and sent to the master, then to the slave, straight from this memory (locked, wiped when
// the last holder lets go).
struct StoredText {
  SecretBytes base64;
  std::uint64_t bits = 0;
};
using SharedKey = std::shared_ptr<const StoredText>;

SharedKey make_key_text(std::span<const std::uint8_t> key) {
  auto text = std::make_shared<StoredText>();
  // EVP_EncodeBlock writes a terminating NUL after the text: room for it, then cut.
  text->base64 = SecretBytes(4 * ((key.size() + 2) / 3) + 1);
  const int n =
      EVP_EncodeBlock(text->base64.span().data(), key.data(), static_cast<int>(key.size()));
  text->base64.truncate(static_cast<std::size_t>(n));
  text->bits = key.size() * 8;
  return text;
}

// An ETSI 014 Key container, streamed to the client key by key: the JSON framing from a
// small buffer, each key's text from the key's own memory. (Building the whole document,
// then httplib copying it again, cost most of the simulator's CPU at file-transfer
// rates.) UUIDs and base64 never need JSON escaping.
struct KeyContainer {
  std::vector<std::pair<std::string, SharedKey>> keys;  // key_ID, key
};

class KeyContainerWriter {
 public:
  explicit KeyContainerWriter(KeyContainer c) : container_(std::move(c)) {}

  std::size_t content_length() const {
    std::size_t n = 0;
    for (std::size_t i = 0; i <= container_.keys.size(); ++i) n += framing(i).size();
    for (const auto& [id, key] : container_.keys) n += key->base64.size();
    return n;
  }

  // The next piece of the body, up to kChunk bytes: framing before key i (or the
  // container's end after the last), then key i's text, for as many keys as fit. Staged in
  // a locked buffer, wiped after each write, and written in one go: a write per key gave a
  // TLS record per key, and the client two reads (and a wake-up) per record.
  bool write(httplib::DataSink& sink) {
    const auto& keys = container_.keys;
    if (next_ > keys.size()) return true;
    std::span<std::uint8_t> out = chunk_.span();
    std::size_t used = 0;
    auto put = [&](const std::uint8_t* data, std::size_t size) {
      if (used + size <= out.size()) {
        std::memcpy(out.data() + used, data, size);
        used += size;
        return true;
      }
      return false;
    };
    while (next_ <= keys.size()) {
      const std::string head = framing(next_);
      const auto* head_bytes = reinterpret_cast<const std::uint8_t*>(head.data());
      const std::size_t before = used;
      bool fits = put(head_bytes, head.size());
      if (fits && next_ < keys.size()) {
        const SecretBytes& text = keys[next_].second->base64;
        fits = put(text.span().data(), text.size());
      }
      if (!fits) {
        used = before;
        if (used > 0) break;  // this key starts the next piece
        // Larger than a piece on its own: written directly.
        if (!sink.write(head.data(), head.size())) return false;
        if (next_ < keys.size()) {
          const SecretBytes& text = keys[next_].second->base64;
          if (!sink.write(reinterpret_cast<const char*>(text.span().data()), text.size()))
            return false;
        }
        ++next_;
        return true;
      }
      ++next_;
    }
    const bool written = sink.write(reinterpret_cast<const char*>(out.data()), used);
    OPENSSL_cleanse(out.data(), used);
    return written;
  }

 private:
  static constexpr std::size_t kChunk = 16384;  // one full TLS record
  SecretBytes chunk_{kChunk};
  std::string framing(std::size_t i) const {
    const auto& keys = container_.keys;
    std::string out = i == 0 ? "{\"keys\":[" : "\"}";
    if (i == keys.size()) return out + "]}";
    if (i > 0) out += ',';
    return out + "{\"key_ID\":\"" + keys[i].first + "\",\"key\":\"";
  }

  KeyContainer container_;
  std::size_t next_ = 0;
};

void set_body(httplib::Response& res, const json& doc) {
  res.set_content(doc.dump(), "application/json");
}

void set_body(httplib::Response& res, KeyContainer container) {
  auto writer = std::make_shared<KeyContainerWriter>(std::move(container));
  res.set_content_provider(
      writer->content_length(), "application/json",
      [writer](std::size_t, std::size_t, httplib::DataSink& sink) { return writer->write(sink); });
}

KeyId random_uuid() {
  std::array<std::uint8_t, 16> b{};
  if (RAND_bytes(b.data(), static_cast<int>(b.size())) != 1)
    throw std::runtime_error("RAND_bytes failed");
  b[6] = static_cast<std::uint8_t>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<std::uint8_t>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return KeyId(b);
}

std::uint64_t positive_integer(const json& value, const char* name) {
  if (!value.is_number_integer() || value.get<std::int64_t>() <= 0) {
    throw Refusal{400, std::string(name) + " shall be a positive integer", nullptr,
                  std::string("Invalid value for ") + name};
  }
  return value.get<std::uint64_t>();
}

std::uint64_t positive_integer(const std::string& text, const char* name) {
  try {
    std::size_t used = 0;
    const long long v = std::stoll(text, &used);
    if (used == text.size() && v > 0) return static_cast<std::uint64_t>(v);
  } catch (const std::exception&) {
  }
  throw Refusal{400, std::string(name) + " shall be a positive integer", nullptr,
                std::string("Invalid value for ") + name};
}

}  // namespace

struct KmeSimulator::Impl {
  struct StoredKey {
    std::string master, slave;
    SharedKey bytes;  // shared with responses still being written
    Clock::time_point relayed_at;
  };

  explicit Impl(SimulatorConfig c)
      : config(std::move(c)), faults(std::make_shared<const SimulatorFaults>(config.faults)) {
    if (!config.log) config.log = keys::stderr_log_sink(LogLevel::warning);
    if (config.key_size % 8 || config.min_key_size % 8 || config.max_key_size % 8 ||
        config.min_key_size == 0 || config.min_key_size > config.key_size ||
        config.key_size > config.max_key_size) {
      throw std::invalid_argument(
          "key sizes must be multiples of 8 with 0 < min-key-size <= key-size <= max-key-size");
    }
    for (const auto& [name, path] :
         {std::pair{"certificate", config.certificate},
          std::pair{"private key", config.private_key}, std::pair{"client CA", config.client_ca}}) {
      if (!std::filesystem::is_regular_file(path)) {
        throw std::invalid_argument(
            std::string("KME ") + name + " \"" + path.string() +
            "\" is not a readable file (make one with scripts/make-test-pki.sh)");
      }
    }
    ready_bits = config.start_full ? config.store_bits : 0;
    last_refill = Clock::now();
    if (config.start_full && config.premade_bits != 0) {
      const std::uint64_t count = std::min(config.premade_bits, ready_bits) / config.max_key_size;
      SecretBytes key(config.max_key_size / 8);
      try {
        for (std::uint64_t i = 0; i < count; ++i) premade.push_back(make_random_key(key.span()));
      } catch (const Refusal& r) {
        throw std::runtime_error("KME simulator: " + r.message);
      }
    }
  }

  // A fresh key from the OS CSPRNG, as its text; `scratch` holds the raw bytes briefly.
  static SharedKey make_random_key(std::span<std::uint8_t> scratch) {
    if (RAND_bytes(scratch.data(), static_cast<int>(scratch.size())) != 1) {
      throw Refusal{500, "the KME's random generator failed"};
    }
    return make_key_text(scratch);
  }

  // Caller holds `mutex`. Accrues key at the configured rate up to the store size.
  void refill() {
    const auto now = Clock::now();
    // Keys a master took but its slave never asked for (a sender that stopped with key
    // in its ring) expire, as on real KMEs, instead of filling the store for good.
    if (now - last_expiry > std::chrono::seconds(1)) {
      last_expiry = now;
      for (auto it = store.begin(); it != store.end();) {
        if (it->second.relayed_at + config.unclaimed_ttl < now) {
          pending_bits -= std::min<std::uint64_t>(pending_bits, it->second.bytes->bits);
          it = store.erase(it);
        } else {
          ++it;
        }
      }
      std::erase_if(replaced,
                    [&](const auto& entry) { return entry.second + config.unclaimed_ttl < now; });
    }
    const std::uint64_t room = free_bits();
    if (config.key_rate_bps <= 0) {
      ready_bits = std::max(ready_bits, room);
    } else {
      const double seconds = std::chrono::duration<double>(now - last_refill).count();
      carry += seconds * config.key_rate_bps;
      const auto whole = static_cast<std::uint64_t>(carry);
      carry -= double(whole);
      ready_bits = std::min(room, ready_bits + whole);
    }
    last_refill = now;
  }

  // Caller holds `mutex`. What the store can still take besides keys issued, not fetched.
  std::uint64_t free_bits() const {
    return config.store_bits - std::min(config.store_bits, pending_bits);
  }

  // grow_bits_per_request: key that arrived over the link since the previous request.
  void grow(std::uint64_t bits) {
    std::lock_guard lock(mutex);
    refill();
    ready_bits = std::min(free_bits(), ready_bits + bits);
  }

  std::string authenticate(const httplib::Request& req, const SimulatorFaults& f) const {
    const std::string caller = peer_common_name(req);
    if (caller.empty()) throw Refusal{401, "client certificate carries no SAE ID (common name)"};
    if (std::find(f.refuse_sae.begin(), f.refuse_sae.end(), caller) != f.refuse_sae.end()) {
      throw Refusal{401, "the client certificate of SAE \"" + caller + "\" is not accepted"};
    }
    if (!known(caller)) throw Refusal{401, "SAE \"" + caller + "\" is not registered on this KME"};
    return caller;
  }

  bool known(const std::string& sae) const {
    return config.sae_ids.empty() ||
           std::find(config.sae_ids.begin(), config.sae_ids.end(), sae) != config.sae_ids.end();
  }

  void require_peer(const std::string& caller, const std::string& other) const {
    if (!known(other)) {
      throw Refusal{400, "SAE ID \"" + other + "\" is unknown to this KME", nullptr,
                    "Unknown SAE ID"};
    }
    if (other == caller) {
      throw Refusal{400, "master and slave SAE IDs must differ", nullptr, "Invalid SAE ID"};
    }
  }

  // Caller holds `mutex`. Keys given to `master` for `slave` that `slave` has not fetched.
  std::uint64_t unfetched_keys(const std::string& master, const std::string& slave) const {
    return static_cast<std::uint64_t>(std::count_if(store.begin(), store.end(), [&](const auto& e) {
      return e.second.master == master && e.second.slave == slave;
    }));
  }

  // Caller holds `mutex`. replace_unfetched_batch: the pair's unfetched keys are lost.
  void drop_unfetched(const std::string& master, const std::string& slave) {
    const auto now = Clock::now();
    std::uint64_t dropped = 0;
    for (auto it = store.begin(); it != store.end();) {
      if (it->second.master == master && it->second.slave == slave) {
        pending_bits -= std::min<std::uint64_t>(pending_bits, it->second.bytes->bits);
        replaced.insert_or_assign(it->first, now);
        it = store.erase(it);
        ++dropped;
      } else {
        ++it;
      }
    }
    if (dropped == 0) return;
    keys_replaced += dropped;
    config.log(LogLevel::debug, "enc_keys from \"" + master + "\" for \"" + slave + "\" dropped " +
                                    std::to_string(dropped) + " keys not fetched yet");
  }

  json status(const std::string& caller, const std::string& slave, const SimulatorFaults& f) {
    require_peer(caller, slave);
    std::lock_guard lock(mutex);
    if (status_refusals_left > 0 && f.refuse_status_after_enc_keys > 0) {
      --status_refusals_left;
      throw Refusal{503, "the KME is busy; try again later", nullptr,
                    "Service temporarily unavailable"};
    }
    refill();
    const std::uint64_t stored =
        f.stored_count_of_pair ? unfetched_keys(caller, slave) : ready_bits / config.key_size;
    return json{{"source_KME_ID", config.kme_id + "-A"},
                {"target_KME_ID", config.kme_id + "-B"},
                {"master_SAE_ID", caller},
                {"slave_SAE_ID", slave},
                {"key_size", config.key_size},
                {"stored_key_count", stored},
                {"max_key_count", config.store_bits / config.key_size},
                {"max_key_per_request", config.max_keys_per_request},
                {"max_key_size", config.max_key_size},
                {"min_key_size", config.min_key_size},
                {"max_SAE_ID_count", 0}};
  }

  KeyContainer enc_keys(const std::string& caller, const std::string& slave, std::uint64_t number,
                        std::uint64_t size, const json& request, const SimulatorFaults& f) {
    require_peer(caller, slave);
    if (auto it = request.find("extension_mandatory"); it != request.end() && !it->empty()) {
      throw Refusal{400, "not all extension_mandatory parameters are supported",
                    json::array({{{"extension_mandatory_unsupported", *it}}}),
                    "Unsupported mandatory extension"};
    }
    if (auto it = request.find("additional_slave_SAE_IDs"); it != request.end() && !it->empty()) {
      throw Refusal{400, "requested parameters do not adhere to KME rules",
                    json::array({{{"message",
                                   "additional_slave_SAE_IDs are not supported "
                                   "(max_SAE_ID_count is 0)"}}}),
                    "Multicast keys are not supported"};
    }
    if (size % 8 != 0) {
      throw Refusal{400, "size shall be a multiple of 8", nullptr,
                    "Key size must be a multiple of 8 bits"};
    }
    if (f.cap_instead_of_refuse) {  // some vendors deliver what they allow, and say nothing
      number = std::min<std::uint64_t>(number, config.max_keys_per_request);
      size = std::min<std::uint64_t>(size, config.max_key_size);
    }
    if (size < config.min_key_size || size > config.max_key_size ||
        number > config.max_keys_per_request) {
      throw Refusal{
          400, "requested parameters do not adhere to KME rules",
          json::array(
              {{{"message", "size must be within [" + std::to_string(config.min_key_size) + ", " +
                                std::to_string(config.max_key_size) + "] bits and number at most " +
                                std::to_string(config.max_keys_per_request)}}}),
          "Requested key size or number of keys is not supported"};
    }
    std::lock_guard lock(mutex);
    refill();
    const std::uint64_t bits = number * size;
    if (bits > ready_bits) {
      throw Refusal{503, "keys are exhausted: the key store holds " + std::to_string(ready_bits) +
                             " bits, " + std::to_string(bits) + " requested; try again later"};
    }
    if (f.replace_unfetched_batch) drop_unfetched(caller, slave);
    ready_bits -= bits;
    pending_bits += bits;
    KeyContainer list;
    const auto relayed_at = Clock::now() + config.relay_delay;
    SecretBytes key(size / 8);  // each key's raw bytes, briefly; only its text is kept
    for (std::uint64_t i = 0; i < number; ++i) {
      SharedKey text;
      if (size == config.max_key_size && !premade.empty()) {
        text = std::move(premade.front());
        premade.pop_front();
      } else {
        text = make_random_key(key.span());
      }
      const KeyId id = random_uuid();
      if (config.record_served_keys) {
        served.emplace_back(reinterpret_cast<const char*>(text->base64.span().data()),
                            text->base64.size());
        served_index.emplace(id, served_ids.size());
        served_ids.push_back({id.to_string(), caller, slave});
      }
      list.keys.emplace_back(id.to_string(), text);
      store.emplace(id, StoredKey{caller, slave, std::move(text), relayed_at});
    }
    keys_to_masters += number;
    status_refusals_left = f.refuse_status_after_enc_keys;
    return list;
  }

  KeyContainer dec_keys(const std::string& caller, const std::string& master,
                        const std::vector<std::string>& ids) {
    if (ids.empty()) {
      throw Refusal{400, "key_IDs shall name at least one key", nullptr, "No key IDs given"};
    }
    if (ids.size() > config.max_keys_per_request) {
      throw Refusal{
          400, "requested parameters do not adhere to KME rules",
          json::array({{{"message", "at most " + std::to_string(config.max_keys_per_request) +
                                        " key_IDs per request"}}}),
          "Too many key IDs requested"};
    }
    std::lock_guard lock(mutex);
    const auto now = Clock::now();
    std::vector<std::map<KeyId, StoredKey>::iterator> found;
    for (const std::string& text : ids) {
      auto id = KeyId::parse(text);
      auto it = id ? store.find(*id) : store.end();
      if (it == store.end() && id && replaced.contains(*id)) {
        // Dropped by replace_unfetched_batch: that vendor's words in every style.
        throw Refusal{400, kKeysDoNotExist, nullptr, kKeysDoNotExist};
      }
      if (it == store.end() || it->second.relayed_at > now) {
        throw Refusal{400, "one or more keys specified are not found on KME", nullptr,
                      kKeysDoNotExist};
      }
      if (it->second.slave != caller || it->second.master != master) {
        throw Refusal{401, "SAE \"" + caller + "\" is not authorized to get key_ID " + text,
                      nullptr, "Not authorized to access the requested keys"};
      }
      if (std::find(found.begin(), found.end(), it) != found.end()) {
        throw Refusal{400, "key_ID " + text + " is requested twice", nullptr,
                      "Duplicate key IDs in request"};
      }
      found.push_back(it);
    }
    KeyContainer list;
    for (auto it : found) {
      list.keys.emplace_back(it->first.to_string(), it->second.bytes);
      pending_bits -= it->second.bytes->bits;
      if (auto served_at = served_index.find(it->first); served_at != served_index.end()) {
        served_ids[served_at->second].fetched_by_slave = true;
      }
      store.erase(it);  // delivered once, then gone (wiped once its response is written)
    }
    keys_to_slaves += found.size();
    return list;
  }

  std::shared_ptr<const SimulatorFaults> current_faults() const {
    std::lock_guard lock(faults_mutex);
    return faults;
  }

  // hang (or hold_dec_keys, for dec_keys): holds a request until the fault is cleared
  // (then it is served) or the simulator stops (503).
  void hold(const httplib::Request& req, bool SimulatorFaults::*fault) {
    std::unique_lock lock(faults_mutex);
    if (!((*faults).*fault)) return;
    ++requests_hung;
    config.log(LogLevel::debug, req.method + " " + req.path + " held");
    faults_changed.wait(lock, [&] { return !((*faults).*fault) || stopping; });
    if (stopping) {
      throw Refusal{503, "the KME is shutting down", nullptr, "Service temporarily unavailable"};
    }
  }

  // answer_delay: the request waits `by` before it is served, or 503 once the simulator
  // stops (a stop does not wait for slow answers).
  void delay(std::chrono::milliseconds by) {
    std::unique_lock lock(faults_mutex);
    ++requests_delayed;
    if (faults_changed.wait_for(lock, by, [&] { return stopping; })) {
      throw Refusal{503, "the KME is shutting down", nullptr, "Service temporarily unavailable"};
    }
  }

  // Wraps a handler: faults, authentication, errors in the configured style, counters,
  // a debug log line.
  template <typename Body>
  httplib::Server::Handler handler(Body body) {
    return [this, body](const httplib::Request& req, httplib::Response& res) {
      ++requests;
      std::shared_ptr<const SimulatorFaults> f = current_faults();
      try {
        if (f->hang) {
          hold(req, &SimulatorFaults::hang);
          f = current_faults();
        }
        if (f->hold_dec_keys && req.path.ends_with("/dec_keys")) {
          hold(req, &SimulatorFaults::hold_dec_keys);
          f = current_faults();
        }
        if (f->answer_delay.count() > 0) delay(f->answer_delay);
        const std::string caller = authenticate(req, *f);
        if (f->grow_bits_per_request != 0) grow(f->grow_bits_per_request);
        set_body(res, body(caller, req, *f));
        res.status = 200;
      } catch (const Refusal& r) {
        ++refused;
        set_error(res, f->error_style, r);
      } catch (const std::exception& e) {
        ++refused;
        set_error(res, f->error_style, Refusal{500, std::string("internal error: ") + e.what()});
      }
      config.log(LogLevel::debug,
                 req.method + " " + req.path + " -> " + std::to_string(res.status));
    };
  }

  static json parse_body(const httplib::Request& req) {
    if (req.body.empty()) return json::object();
    json doc = json::parse(req.body, nullptr, false);
    if (doc.is_discarded() || !doc.is_object())
      throw Refusal{400, "request body is not a JSON object", nullptr, "Malformed request body"};
    return doc;
  }

  void routes() {
    const std::string base = R"(/api/v1/keys/([^/]+)/)";
    server->Get(
        base + "status",
        handler([this](const std::string& caller, const httplib::Request& req,
                       const SimulatorFaults& f) { return status(caller, req.matches[1], f); }));
    server->Get(
        base + "enc_keys", handler([this](const std::string& caller, const httplib::Request& req,
                                          const SimulatorFaults& f) {
          const std::uint64_t number =
              req.has_param("number") ? positive_integer(req.get_param_value("number"), "number")
                                      : 1;
          const std::uint64_t size = req.has_param("size")
                                         ? positive_integer(req.get_param_value("size"), "size")
                                         : config.key_size;
          return enc_keys(caller, req.matches[1], number, size, json::object(), f);
        }));
    server->Post(
        base + "enc_keys", handler([this](const std::string& caller, const httplib::Request& req,
                                          const SimulatorFaults& f) {
          const json doc = parse_body(req);
          const std::uint64_t number =
              doc.contains("number") ? positive_integer(doc["number"], "number") : 1;
          const std::uint64_t size =
              doc.contains("size") ? positive_integer(doc["size"], "size") : config.key_size;
          return enc_keys(caller, req.matches[1], number, size, doc, f);
        }));
    server->Get(
        base + "dec_keys", handler([this](const std::string& caller, const httplib::Request& req,
                                          const SimulatorFaults&) {
          if (!req.has_param("key_ID")) {
            throw Refusal{400, "key_ID query parameter is missing", nullptr, "No key IDs given"};
          }
          return dec_keys(caller, req.matches[1], {req.get_param_value("key_ID")});
        }));
    server->Post(
        base + "dec_keys", handler([this](const std::string& caller, const httplib::Request& req,
                                          const SimulatorFaults&) {
          const json doc = parse_body(req);
          auto it = doc.find("key_IDs");
          if (it == doc.end() || !it->is_array()) {
            throw Refusal{400, "key_IDs shall be an array", nullptr, "Malformed request body"};
          }
          std::vector<std::string> ids;
          for (const json& entry : *it) {
            if (!entry.is_object() || !entry.contains("key_ID") || !entry["key_ID"].is_string()) {
              throw Refusal{400, "each key_IDs entry shall be an object with a string key_ID",
                            nullptr, "Malformed request body"};
            }
            ids.push_back(entry["key_ID"].get<std::string>());
          }
          return dec_keys(caller, req.matches[1], ids);
        }));
    // Answers cpp-httplib makes itself (unknown path, malformed request) in the error style
    // too; ETSI style keeps its plain answers.
    server->set_error_handler(httplib::Server::HandlerWithResponse(
        [this](const httplib::Request& req, httplib::Response& res) {
          const ErrorStyle style = current_faults()->error_style;
          if (style == ErrorStyle::etsi || !res.body.empty()) {
            return httplib::Server::HandlerResponse::Unhandled;
          }
          set_error(res, style,
                    Refusal{res.status, "no such resource: " + req.method + " " + req.path});
          return httplib::Server::HandlerResponse::Handled;
        }));
  }

  SimulatorConfig config;
  std::unique_ptr<httplib::SSLServer> server;
  std::thread thread;
  int bound_port = 0;

  mutable std::mutex mutex;
  std::map<KeyId, StoredKey> store;
  std::deque<SharedKey> premade;  // generated ahead; counted in ready_bits
  std::uint64_t ready_bits = 0;
  std::uint64_t pending_bits = 0;
  std::uint32_t status_refusals_left = 0;  // refuse_status_after_enc_keys
  double carry = 0;
  Clock::time_point last_refill;
  Clock::time_point last_expiry{};
  std::map<KeyId, Clock::time_point> replaced;  // dropped by replace_unfetched_batch, and when
  std::vector<std::string> served;              // record_served_keys (tests), under `mutex`
  std::vector<ServedKeyId> served_ids;          // the same keys' IDs, under `mutex`
  std::map<KeyId, std::size_t> served_index;    // key_ID -> its entry in served_ids
  std::atomic<std::uint64_t> keys_to_masters{0}, keys_to_slaves{0}, requests{0}, refused{0},
      keys_replaced{0}, requests_hung{0}, requests_delayed{0};

  mutable std::mutex faults_mutex;  // guards faults and stopping
  std::shared_ptr<const SimulatorFaults> faults;
  std::condition_variable faults_changed;  // wakes held (hang) requests
  bool stopping = false;
};

KmeSimulator::KmeSimulator(SimulatorConfig config)
    : impl_(std::make_unique<Impl>(std::move(config))) {}

KmeSimulator::~KmeSimulator() {
  stop();
}

void KmeSimulator::start() {
  Impl& i = *impl_;
  if (i.thread.joinable()) return;
  {
    std::lock_guard lock(i.faults_mutex);
    i.stopping = false;
  }
  i.server = std::make_unique<httplib::SSLServer>(
      i.config.certificate.c_str(), i.config.private_key.c_str(), i.config.client_ca.c_str());
  if (!i.server->is_valid()) {
    throw std::runtime_error("KME simulator: cannot load the TLS certificate, key or client CA (" +
                             i.config.certificate.string() + ")");
  }
  // Required for TLS session resumption when client certificates are verified; without
  // it OpenSSL aborts resumed handshakes with an internal-error alert.
  static constexpr unsigned char kSessionContext[] = "qkd-kme-sim";
  SSL_CTX_set_session_id_context(i.server->ssl_context(), kSessionContext,
                                 sizeof kSessionContext - 1);
  // Each SAE keeps a connection open (a gateway has one per stream and direction), and
  // cpp-httplib serves a kept-alive connection on one worker: size the pool for that.
  // (cpp-httplib takes ownership of the queue it is given.)
  i.server->new_task_queue = [] { return new httplib::ThreadPool(96); };
  // cpp-httplib closes a kept-alive connection after 5 requests by default; a key supply
  // asks every few milliseconds at transfer rates, and a new mTLS handshake each time is
  // pure overhead. Real KMEs keep SAE connections open too.
  i.server->set_keep_alive_max_count(100000);
  // An idle kept-alive connection holds a worker until this timeout, and stop() waits for
  // every worker: 1 s rather than the default 5 s, so a simulator stops within a second
  // (tests stop and restart it mid-call). A client then reconnects, as with real KMEs.
  i.server->set_keep_alive_timeout(1);
  // cpp-httplib sets only SO_REUSEPORT on Linux, which lets a second simulator listen on a
  // port already in use. SO_REUSEADDR instead: a restart (after stop() or a crash) binds
  // its port again at once despite connections in TIME_WAIT, but never beside a listener.
  // TCP_NODELAY as well (accepted sockets inherit it): without it Nagle holds each
  // answer back until the client's delayed ACK, about 40 ms per request.
  i.server->set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);
  });
  i.routes();
  if (i.config.port == 0) {
    i.bound_port = i.server->bind_to_any_port(i.config.host);
  } else {
    i.bound_port = i.server->bind_to_port(i.config.host, i.config.port) ? i.config.port : -1;
  }
  if (i.bound_port <= 0) {
    throw std::runtime_error("KME simulator: cannot listen on " + i.config.host + ":" +
                             std::to_string(i.config.port) + " (in use? choose another --port)");
  }
  // The socket already listens, so clients may connect before the accept loop runs.
  i.thread = std::thread([&i] { i.server->listen_after_bind(); });
  // stop() is a no-op until the accept loop runs, so do not return before it does.
  while (!i.server->is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void KmeSimulator::stop() {
  if (!impl_->thread.joinable()) return;
  {  // held (hang) requests answer 503 at once: the server waits for its workers
    std::lock_guard lock(impl_->faults_mutex);
    impl_->stopping = true;
  }
  impl_->faults_changed.notify_all();
  impl_->server->stop();
  impl_->thread.join();
}

int KmeSimulator::port() const {
  return impl_->bound_port;
}
std::string KmeSimulator::url() const {
  return "https://localhost:" + std::to_string(port());
}

SimulatorStats KmeSimulator::stats() const {
  std::lock_guard lock(impl_->mutex);
  impl_->refill();
  SimulatorStats s;
  s.stored_bits = impl_->ready_bits;
  s.pending_bits = impl_->pending_bits;
  s.premade_bits = impl_->premade.size() * std::uint64_t{impl_->config.max_key_size};
  s.keys_to_masters = impl_->keys_to_masters;
  s.keys_to_slaves = impl_->keys_to_slaves;
  s.requests = impl_->requests;
  s.refused = impl_->refused;
  s.keys_replaced = impl_->keys_replaced;
  s.requests_hung = impl_->requests_hung;
  s.requests_delayed = impl_->requests_delayed;
  return s;
}

void KmeSimulator::set_key_rate(double bits_per_second) {
  std::lock_guard lock(impl_->mutex);
  impl_->refill();
  impl_->config.key_rate_bps = bits_per_second;
}

void KmeSimulator::drain() {
  std::lock_guard lock(impl_->mutex);
  impl_->refill();
  impl_->ready_bits = 0;
  impl_->carry = 0;
  impl_->premade.clear();  // each wiped as its last holder lets go
}

void KmeSimulator::set_faults(const SimulatorFaults& faults) {
  {
    std::lock_guard lock(impl_->faults_mutex);
    impl_->faults = std::make_shared<const SimulatorFaults>(faults);
  }
  impl_->faults_changed.notify_all();
}

SimulatorFaults KmeSimulator::faults() const {
  return *impl_->current_faults();
}

std::vector<std::string> KmeSimulator::served_keys() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->served;
}

std::vector<ServedKeyId> KmeSimulator::served_key_ids() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->served_ids;
}

}  // namespace otpgate::kmesim

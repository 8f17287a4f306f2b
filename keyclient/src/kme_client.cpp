// SPDX-License-Identifier: LGPL-2.1-or-later
// ETSI GS QKD 014 REST client over HTTPS with mutual TLS (libcurl).
//
// Response bodies of successful key calls hold base64 key material: they are read
// into wiped memory, never quoted in errors, and parsed in place with simdjson (the key
// strings are decoded straight from that buffer, so no other copy of them is made).
// Error bodies are quoted briefly, since they carry no keys.
#include <curl/curl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <simdjson.h>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

using nlohmann::json;

std::string_view to_string(KmeErrorKind kind) {
  switch (kind) {
    case KmeErrorKind::transport:
      return "transport";
    case KmeErrorKind::tls:
      return "tls";
    case KmeErrorKind::bad_request:
      return "bad_request";
    case KmeErrorKind::unauthorized:
      return "unauthorized";
    case KmeErrorKind::not_found:
      return "not_found";
    case KmeErrorKind::unavailable:
      return "unavailable";
    case KmeErrorKind::server:
      return "server";
    case KmeErrorKind::http:
      return "http";
    case KmeErrorKind::protocol:
      return "protocol";
    case KmeErrorKind::key_not_found:
      return "key_not_found";
    case KmeErrorKind::cancelled:
      return "cancelled";
  }
  return "unknown";
}

bool KmeError::retryable() const {
  return kind_ == KmeErrorKind::transport || kind_ == KmeErrorKind::unavailable ||
         kind_ == KmeErrorKind::server;
}

std::uint32_t choose_key_size(const KmeStatus& status, std::uint32_t cap_bits) {
  std::uint32_t bits = status.max_key_size != 0 ? status.max_key_size : status.key_size;
  if (cap_bits != 0) bits = std::min(bits, cap_bits);
  bits -= bits % 8;
  if (status.min_key_size != 0 && bits < status.min_key_size) {
    bits = status.min_key_size + (8 - status.min_key_size % 8) % 8;
  }
  return bits;
}

namespace {

constexpr std::size_t kMaxResponseBytes = 64u << 20;

struct CurlDeleter {
  void operator()(CURL* handle) const { curl_easy_cleanup(handle); }
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
  void operator()(char* text) const { curl_free(text); }
};

// Growable response buffer that wipes every byte it lets go of.
class WipedBuffer {
 public:
  bool append(const char* data, std::size_t n) {
    if (used_ + n > kMaxResponseBytes) return false;
    if (used_ + n > memory_.size()) {
      SecretBytes bigger(std::max<std::size_t>({memory_.size() * 2, used_ + n, 16384}));
      std::copy_n(memory_.span().data(), used_, bigger.span().data());
      memory_ = std::move(bigger);  // the old block is wiped by its destructor
    }
    std::memcpy(memory_.span().data() + used_, data, n);
    used_ += n;
    return true;
  }
  void clear() {
    if (used_ != 0) OPENSSL_cleanse(memory_.span().data(), used_);
    used_ = 0;
  }
  std::string_view view() const {
    return {reinterpret_cast<const char*>(memory_.span().data()), used_};
  }
  // The body with the zeroed slack simdjson reads past the end.
  simdjson::padded_string_view padded() {
    if (memory_.size() < used_ + simdjson::SIMDJSON_PADDING) {
      SecretBytes bigger(used_ + simdjson::SIMDJSON_PADDING);
      std::copy_n(memory_.span().data(), used_, bigger.span().data());
      memory_ = std::move(bigger);
    }
    std::memset(memory_.span().data() + used_, 0, simdjson::SIMDJSON_PADDING);
    return simdjson::padded_string_view(reinterpret_cast<const char*>(memory_.span().data()), used_,
                                        memory_.size());
  }

 private:
  SecretBytes memory_;
  std::size_t used_ = 0;
};

// The character an HTML entity at the start of `text` stands for, and the entity's length.
std::optional<std::pair<char, std::size_t>> html_entity(std::string_view text) {
  static constexpr std::pair<std::string_view, char> kEntities[] = {
      {"&amp;", '&'},  {"&lt;", '<'},    {"&gt;", '>'},  {"&quot;", '"'},
      {"&#39;", '\''}, {"&apos;", '\''}, {"&nbsp;", ' '}};
  for (const auto& [name, c] : kEntities) {
    if (text.starts_with(name)) return std::pair{c, name.size()};
  }
  return std::nullopt;
}

// One line, printable, at most `limit` characters: safe to put in an error message.
std::string brief(std::string_view text, std::size_t limit = 160) {
  std::string out;
  bool in_tag = false;
  bool html = false;
  bool last_space = true;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '<') in_tag = html = true;  // HTML error pages: keep the words, drop the tags
    if (in_tag) {
      if (c == '>') in_tag = false;
      c = ' ';
    } else if (html && c == '&') {  // ... as the page shows them
      if (const auto entity = html_entity(text.substr(i))) {
        c = entity->first;
        i += entity->second - 1;
      }
    }
    const bool space =
        std::isspace(static_cast<unsigned char>(c)) || !std::isprint(static_cast<unsigned char>(c));
    if (space && last_space) continue;
    out.push_back(space ? ' ' : c);
    last_space = space;
    if (out.size() >= limit) {
      out += "...";
      break;
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// What an error body says, whichever convention the KME follows.
std::string error_text(std::string_view body) {
  if (body.empty()) return "(empty body)";
  const json doc = json::parse(body.begin(), body.end(), nullptr, false);
  if (doc.is_object()) {
    for (const char* field : {"message", "detail", "error", "details"}) {
      auto it = doc.find(field);
      if (it == doc.end()) continue;
      std::string text = it->is_string() ? it->get<std::string>() : it->dump();
      if (field == std::string_view("message")) {
        if (auto details = doc.find("details"); details != doc.end()) {
          text += " " + details->dump();
        }
      }
      return brief(text);
    }
  }
  return brief(body);
}

KmeErrorKind kind_for_status(long status) {
  switch (status) {
    case 400:
      return KmeErrorKind::bad_request;
    case 401:
    case 403:
      return KmeErrorKind::unauthorized;
    case 404:
      return KmeErrorKind::not_found;
    case 503:
      return KmeErrorKind::unavailable;
    default:
      return status >= 500 ? KmeErrorKind::server : KmeErrorKind::http;
  }
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

KmeError protocol_error(const std::string& where, const std::string& what) {
  return KmeError(KmeErrorKind::protocol, 200, "KME answer to " + where + " is malformed: " + what);
}

std::uint64_t require_uint(const json& doc, const char* field, const std::string& where,
                           bool required) {
  auto it = doc.find(field);
  if (it == doc.end() || it->is_null()) {
    if (required) throw protocol_error(where, std::string("field \"") + field + "\" is missing");
    return 0;
  }
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<std::int64_t>() >= 0)) {
    throw protocol_error(where, std::string("field \"") + field + "\" is " + brief(it->dump(), 40) +
                                    ", expected a non-negative integer");
  }
  return it->get<std::uint64_t>();
}

std::string optional_string(const json& doc, const char* field) {
  auto it = doc.find(field);
  if (it == doc.end() || !it->is_string()) return {};
  return it->get<std::string>();
}

std::uint32_t to_u32(std::uint64_t value, const char* field, const std::string& where) {
  if (value > UINT32_MAX)
    throw protocol_error(where, std::string("field \"") + field + "\" is too large");
  return static_cast<std::uint32_t>(value);
}

// Standard base64 (RFC 4648, with padding), as ETSI GS QKD 014 uses; empty if invalid.
SecretBytes decode_base64(std::string_view text) {
  if (text.empty() || text.size() % 4 != 0) return SecretBytes();
  SecretBytes out(text.size() / 4 * 3);
  const int n =
      EVP_DecodeBlock(out.span().data(), reinterpret_cast<const unsigned char*>(text.data()),
                      static_cast<int>(text.size()));
  if (n < 0) return SecretBytes();
  std::size_t pad = 0;
  if (text.back() == '=') ++pad;
  if (text.size() > 1 && text[text.size() - 2] == '=') ++pad;
  out.truncate(static_cast<std::size_t>(n) - pad);
  return out;
}

}  // namespace

struct KmeClient::Impl {
  KmeClientConfig config;
  std::unique_ptr<CURL, CurlDeleter> curl;
  WipedBuffer body;
  std::array<char, CURL_ERROR_SIZE> curl_error{};
  std::atomic<bool> cancelled{false};

  void log(LogLevel level, const std::string& message) const {
    if (config.log) config.log(level, message);
  }

  std::string url_for(std::string_view sae_id, std::string_view operation) {
    std::unique_ptr<char, CurlDeleter> escaped(
        curl_easy_escape(curl.get(), sae_id.data(), static_cast<int>(sae_id.size())));
    std::string url = config.base_url;
    while (!url.empty() && url.back() == '/') url.pop_back();
    return url + "/api/v1/keys/" + escaped.get() + "/" + std::string(operation);
  }

  static std::size_t on_body(char* data, std::size_t size, std::size_t count, void* user) {
    auto* self = static_cast<Impl*>(user);
    return self->body.append(data, size * count) ? size * count : 0;
  }
  static int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
    return static_cast<Impl*>(user)->cancelled.load() ? 1 : 0;
  }

  // One HTTP exchange. Returns the status; throws KmeError for transport/TLS failures.
  long perform(const std::string& what, const std::string& url, const std::string* post_body) {
    if (cancelled) throw KmeError(KmeErrorKind::cancelled, 0, what + " cancelled");
    CURL* h = curl.get();
    body.clear();
    curl_error[0] = '\0';
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    std::unique_ptr<curl_slist, CurlDeleter> headers(
        curl_slist_append(nullptr, "Accept: application/json"));
    if (post_body) {
      headers.reset(curl_slist_append(headers.release(), "Content-Type: application/json"));
      headers.reset(curl_slist_append(headers.release(), "Expect:"));
      curl_easy_setopt(h, CURLOPT_POST, 1L);
      curl_easy_setopt(h, CURLOPT_POSTFIELDS, post_body->c_str());
      curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, static_cast<long>(post_body->size()));
    } else {
      curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    }
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers.get());
    const CURLcode rc = curl_easy_perform(h);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, nullptr);
    if (rc != CURLE_OK) throw transport_error(what, rc);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    return status;
  }

  KmeError transport_error(const std::string& what, CURLcode rc) {
    body.clear();  // a partial body may hold key material
    const std::string detail = curl_error[0] ? curl_error.data() : curl_easy_strerror(rc);
    const std::string lowered = lower(detail);
    switch (rc) {
      case CURLE_ABORTED_BY_CALLBACK:
        return KmeError(KmeErrorKind::cancelled, 0, what + " cancelled");
      case CURLE_OPERATION_TIMEDOUT:
        return KmeError(KmeErrorKind::transport, 0,
                        what + " timed out (" + detail + "); is the KME at " + config.base_url +
                            " up and answering?");
      case CURLE_PEER_FAILED_VERIFICATION:
      case CURLE_SSL_CACERT_BADFILE:
      case CURLE_SSL_CERTPROBLEM:
      case CURLE_SSL_CONNECT_ERROR:
      case CURLE_SSL_ENGINE_INITFAILED:
      case CURLE_SSL_ISSUER_ERROR:
        break;
      case CURLE_SEND_ERROR:
      case CURLE_RECV_ERROR:
        if (lowered.find("alert") == std::string::npos) {
          // With TLS 1.3 a KME that rejects our certificate often just closes the
          // connection after the handshake, which looks like this.
          return KmeError(KmeErrorKind::transport, 0,
                          what + " failed: " + detail + " (KME " + config.base_url +
                              "; if this persists, the KME may be rejecting this SAE's "
                              "certificate: check tls-cert/tls-key)");
        }
        break;
      default:
        if (lowered.find("alert") == std::string::npos &&
            lowered.find("certificate") == std::string::npos) {
          return KmeError(KmeErrorKind::transport, 0,
                          what + " failed: " + detail + " (KME " + config.base_url + ")");
        }
    }
    return KmeError(KmeErrorKind::tls, 0,
                    what + ": TLS with " + config.base_url + " failed: " + detail +
                        "; check tls-ca (CA of the KME certificate), tls-cert/tls-key (this "
                        "SAE's client certificate) and that the URL host matches the KME "
                        "certificate");
  }

  void sleep_cancellable(std::chrono::milliseconds delay, const std::string& what) {
    const auto until = std::chrono::steady_clock::now() + delay;
    while (std::chrono::steady_clock::now() < until) {
      if (cancelled) throw KmeError(KmeErrorKind::cancelled, 0, what + " cancelled");
      std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(
          std::chrono::milliseconds(10), std::chrono::duration_cast<std::chrono::milliseconds>(
                                             until - std::chrono::steady_clock::now()) +
                                             std::chrono::milliseconds(1)));
    }
  }

  // Calls until a 2xx, retrying what is worth retrying; returns the parsed JSON body.
  json call(const std::string& what, const std::string& url, const std::string* post_body) {
    return parse_body(what, call_raw(what, url, post_body, false));
  }

  // Calls until a 2xx and leaves its body in `body`; returns the status. Decisions are
  // made on the status code alone: KMEs word their errors in their own ways.
  // `asks_for_keys` (dec_keys): 400 and 404 mean "not (or no longer) on this KME" in
  // ETSI GS QKD 014; they come back at once as key_not_found, and the caller decides
  // whether to wait for the KMEs' relay or to declare the keys lost.
  long call_raw(const std::string& what, const std::string& url, const std::string* post_body,
                bool asks_for_keys) {
    auto backoff = config.retry.initial_backoff;
    const auto give_up = std::chrono::steady_clock::now() + config.retry.max_total;
    for (int attempt = 1;; ++attempt) {
      std::optional<KmeError> failure;
      try {
        const long status = perform(what, url, post_body);
        if (status >= 200 && status < 300) return status;
        const std::string text = error_text(body.view());
        body.clear();
        const KmeErrorKind kind = asks_for_keys && (status == 400 || status == 404)
                                      ? KmeErrorKind::key_not_found
                                      : kind_for_status(status);
        failure.emplace(kind, static_cast<int>(status),
                        what + ": KME answered HTTP " + std::to_string(status) + ": " + text);
      } catch (const KmeError& e) {
        if (e.kind() == KmeErrorKind::cancelled) throw;
        failure.emplace(e);
      }
      if (!failure->retryable() || attempt >= config.retry.max_attempts ||
          std::chrono::steady_clock::now() + backoff >= give_up) {
        throw *failure;
      }
      log(LogLevel::debug, std::string(failure->what()) + "; retrying in " +
                               std::to_string(backoff.count()) + " ms");
      sleep_cancellable(backoff, what);
      backoff = std::min(backoff * 2, config.retry.max_backoff);
    }
  }

  json parse_body(const std::string& what, long status) {
    json doc = json::parse(body.view().begin(), body.view().end(), nullptr, false);
    const std::size_t size = body.view().size();
    body.clear();
    if (doc.is_discarded() || !doc.is_object()) {
      // Never quote it: a broken key answer may still contain key material.
      throw KmeError(KmeErrorKind::protocol, static_cast<int>(status),
                     what + ": KME answered HTTP " + std::to_string(status) + " with " +
                         std::to_string(size) + " bytes that are not a JSON object");
    }
    return doc;
  }

  // Parses a key container ({"keys": [{"key_ID": ..., "key": ...}, ...]}) from `body`
  // and wipes it. Strict: one bad entry fails the whole answer.
  std::vector<Key> parse_keys(const std::string& what, long status) {
    struct WipeBody {
      WipedBuffer& b;
      ~WipeBody() { b.clear(); }
    } wipe{body};
    const std::size_t size = body.view().size();
    auto not_an_object = [&] {
      return KmeError(KmeErrorKind::protocol, static_cast<int>(status),
                      what + ": KME answered HTTP " + std::to_string(status) + " with " +
                          std::to_string(size) + " bytes that are not a JSON object");
    };
    namespace od = simdjson::ondemand;
    od::document doc;
    od::object root;
    if (json_parser.iterate(body.padded()).get(doc) || doc.get_object().get(root))
      throw not_an_object();
    std::vector<Key> keys;
    std::string first_error;
    bool found_container = false;
    try {
      for (auto field : root) {
        std::string_view name;
        if (field.unescaped_key().get(name)) throw not_an_object();
        if (name != "keys" && name != "Keys") continue;  // some KMEs spell it "Keys"
        od::array list;
        if (field.value().get_array().get(list)) throw protocol_error(what, "no \"keys\" array");
        found_container = true;
        for (auto element : list) {
          od::object item;
          if (element.get_object().get(item)) {
            if (first_error.empty()) first_error = "an entry has no string \"key\"";
            continue;
          }
          std::optional<std::string> id_text;
          SecretBytes bytes;
          bool has_key = false;
          for (auto entry : item) {
            std::string_view key_name;
            if (entry.unescaped_key().get(key_name)) throw not_an_object();
            if (key_name == "key_ID") {
              std::string_view text;
              if (!entry.value().get_string().get(text)) id_text = std::string(text);
            } else if (key_name == "key") {
              // The raw token, straight from the wiped body: base64 needs no unescaping.
              std::string_view token;
              if (entry.value().raw_json_token().get(token)) throw not_an_object();
              while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back())))
                token.remove_suffix(1);
              if (token.size() >= 2 && token.front() == '"' && token.back() == '"') {
                has_key = true;
                bytes = decode_base64(token.substr(1, token.size() - 2));
              }
            }
          }
          if (!has_key) {
            if (first_error.empty()) first_error = "an entry has no string \"key\"";
          } else if (!id_text) {
            if (first_error.empty()) first_error = "a key has no string \"key_ID\"";
          } else if (auto id = KeyId::parse(*id_text); !id) {
            if (first_error.empty())
              first_error = "key_ID \"" + brief(*id_text, 60) + "\" is not a UUID";
          } else if (bytes.size() == 0) {
            if (first_error.empty())
              first_error = "key for key_ID " + *id_text + " is not valid base64";
          } else {
            keys.push_back(Key{*id, std::move(bytes)});
          }
        }
      }
    } catch (const simdjson::simdjson_error&) {
      throw not_an_object();
    }
    if (!found_container) throw protocol_error(what, "no \"keys\" array");
    if (!first_error.empty()) throw protocol_error(what, first_error);
    if (keys.empty()) throw protocol_error(what, "the \"keys\" array is empty");
    return keys;
  }

  simdjson::ondemand::parser json_parser;
};

KmeClient::KmeClient(KmeClientConfig config) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  auto& c = impl_->config;
  if (!c.log) c.log = stderr_log_sink();
  if (c.base_url.rfind("https://", 0) != 0) {
    throw std::invalid_argument("kme-url \"" + c.base_url +
                                "\" must start with https:// (ETSI GS QKD 014 requires TLS)");
  }
  for (const auto& [name, path] :
       {std::pair{"tls-cert", c.tls.certificate}, std::pair{"tls-key", c.tls.private_key},
        std::pair{"tls-ca", c.tls.ca_bundle}}) {
    if (path.empty()) {
      throw std::invalid_argument(std::string(name) +
                                  " is not set; mutual TLS with the KME is mandatory");
    }
    if (!std::filesystem::is_regular_file(path)) {
      throw std::invalid_argument(std::string(name) + " \"" + path.string() +
                                  "\" is not a readable file");
    }
  }
  impl_->curl.reset(curl_easy_init());
  if (!impl_->curl) throw std::runtime_error("libcurl could not create a handle");
  CURL* h = impl_->curl.get();
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "https");
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, impl_->curl_error.data());
  curl_easy_setopt(h, CURLOPT_SSLCERT, c.tls.certificate.c_str());
  curl_easy_setopt(h, CURLOPT_SSLKEY, c.tls.private_key.c_str());
  curl_easy_setopt(h, CURLOPT_CAINFO, c.tls.ca_bundle.c_str());
  curl_easy_setopt(h, CURLOPT_CAPATH, nullptr);
  curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
  curl_easy_setopt(h, CURLOPT_SSLVERSION, CURL_SSLVERSION_TLSv1_2);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(c.connect_timeout.count()));
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, static_cast<long>(c.request_timeout.count()));
  curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &Impl::on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, impl_.get());
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, &Impl::on_progress);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, impl_.get());
}

KmeClient::~KmeClient() = default;
KmeClient::KmeClient(KmeClient&&) noexcept = default;
KmeClient& KmeClient::operator=(KmeClient&&) noexcept = default;

void KmeClient::cancel() {
  impl_->cancelled = true;
}
const std::string& KmeClient::base_url() const {
  return impl_->config.base_url;
}

KmeStatus KmeClient::status(std::string_view slave_sae_id) {
  const std::string what = "status for SAE \"" + std::string(slave_sae_id) + "\"";
  const json doc = impl_->call(what, impl_->url_for(slave_sae_id, "status"), nullptr);
  KmeStatus s;
  s.source_kme_id = optional_string(doc, "source_KME_ID");
  s.target_kme_id = optional_string(doc, "target_KME_ID");
  s.master_sae_id = optional_string(doc, "master_SAE_ID");
  s.slave_sae_id = optional_string(doc, "slave_SAE_ID");
  // The sizes drive every request we make: they must be there and sane.
  s.key_size = to_u32(require_uint(doc, "key_size", what, true), "key_size", what);
  s.max_key_per_request =
      to_u32(require_uint(doc, "max_key_per_request", what, true), "max_key_per_request", what);
  s.max_key_size = to_u32(require_uint(doc, "max_key_size", what, true), "max_key_size", what);
  s.min_key_size = to_u32(require_uint(doc, "min_key_size", what, true), "min_key_size", what);
  s.stored_key_count = require_uint(doc, "stored_key_count", what, false);
  s.max_key_count = require_uint(doc, "max_key_count", what, false);
  s.max_sae_id_count =
      to_u32(require_uint(doc, "max_SAE_ID_count", what, false), "max_SAE_ID_count", what);
  if (s.key_size == 0 || s.max_key_per_request == 0 || s.max_key_size < s.min_key_size) {
    throw protocol_error(what, "key_size " + std::to_string(s.key_size) + ", max_key_per_request " +
                                   std::to_string(s.max_key_per_request) + ", min/max_key_size " +
                                   std::to_string(s.min_key_size) + "/" +
                                   std::to_string(s.max_key_size) + " are inconsistent");
  }
  return s;
}

std::vector<Key> KmeClient::enc_keys(std::string_view slave_sae_id, std::uint32_t number,
                                     std::uint32_t size_bits, Method method) {
  const std::string what = "enc_keys for SAE \"" + std::string(slave_sae_id) + "\" (" +
                           std::to_string(number) + " x " + std::to_string(size_bits) + " bits)";
  std::string url = impl_->url_for(slave_sae_id, "enc_keys");
  long status = 0;
  if (method == Method::post) {
    const std::string request = json{{"number", number}, {"size", size_bits}}.dump();
    status = impl_->call_raw(what, url, &request, false);
  } else {
    url += "?number=" + std::to_string(number) + "&size=" + std::to_string(size_bits);
    status = impl_->call_raw(what, url, nullptr, false);
  }
  auto keys = impl_->parse_keys(what, status);
  if (keys.size() != number) {
    impl_->log(LogLevel::warning, what + ": KME delivered " + std::to_string(keys.size()) +
                                      " keys instead of " + std::to_string(number));
  }
  return keys;
}

std::vector<Key> KmeClient::dec_keys(std::string_view master_sae_id, std::span<const KeyId> ids) {
  const std::string what = "dec_keys from SAE \"" + std::string(master_sae_id) + "\" (" +
                           std::to_string(ids.size()) + " key_IDs, first " +
                           (ids.empty() ? std::string("none") : ids.front().to_string()) + ")";
  json list = json::array();
  for (const KeyId& id : ids) list.push_back({{"key_ID", id.to_string()}});
  const std::string request = json{{"key_IDs", list}}.dump();
  const long status =
      impl_->call_raw(what, impl_->url_for(master_sae_id, "dec_keys"), &request, true);
  auto keys = impl_->parse_keys(what, status);
  // Hand them back in the order asked; anything else is a KME bug we must not paper over.
  std::vector<Key> ordered;
  ordered.reserve(ids.size());
  for (const KeyId& id : ids) {
    auto it = std::find_if(keys.begin(), keys.end(), [&](const Key& k) { return k.id == id; });
    if (it == keys.end()) {
      throw protocol_error(what, "key_ID " + id.to_string() + " was asked for but not delivered");
    }
    ordered.push_back(std::move(*it));
  }
  return ordered;
}

Key KmeClient::dec_key(std::string_view master_sae_id, const KeyId& id) {
  const std::string what =
      "dec_keys from SAE \"" + std::string(master_sae_id) + "\" (key_ID " + id.to_string() + ")";
  const long status = impl_->call_raw(
      what, impl_->url_for(master_sae_id, "dec_keys") + "?key_ID=" + id.to_string(), nullptr, true);
  auto keys = impl_->parse_keys(what, status);
  if (keys.size() != 1 || keys.front().id != id) {
    throw protocol_error(what, "the KME did not deliver exactly the key_ID asked for");
  }
  return std::move(keys.front());
}

}  // namespace otpgate::keys

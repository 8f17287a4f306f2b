// SPDX-License-Identifier: LGPL-2.1-or-later
// See session.hpp.
#include "session.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>

namespace otpgate::transfer::detail {

// ---------------------------------------------------------------------------
// Messages

json Message::as_json() const {
  try {
    return json::parse(body.begin(), body.end());
  } catch (const json::exception&) {
    throw std::runtime_error(std::string("malformed '") + static_cast<char>(type) +
                             "' message in the protected stream");
  }
}

void append_message(std::vector<std::uint8_t>& out, MessageType type,
                    std::span<const std::uint8_t> body) {
  const auto n = static_cast<std::uint32_t>(body.size());
  out.push_back(static_cast<std::uint8_t>(type));
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  out.insert(out.end(), body.begin(), body.end());
}

void append_json_message(std::vector<std::uint8_t>& out, MessageType type, const json& body) {
  const std::string text = body.dump();
  append_message(out, type, {reinterpret_cast<const std::uint8_t*>(text.data()), text.size()});
}

void append_data_header(std::vector<std::uint8_t>& out, std::uint32_t index, std::uint64_t offset,
                        std::size_t bytes) {
  const auto n = static_cast<std::uint32_t>(kDataHeaderBytes + bytes);
  out.push_back(static_cast<std::uint8_t>(MessageType::data));
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(index >> (8 * i)));
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(offset >> (8 * i)));
}

void MessageParser::feed(std::span<const std::uint8_t> bytes) {
  if (read_ > 0 && read_ == buffer_.size()) {
    buffer_.clear();
    read_ = 0;
  } else if (read_ > (1u << 20)) {
    buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<long>(read_));
    read_ = 0;
  }
  buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
}

std::optional<Message> MessageParser::next() {
  const std::size_t left = buffer_.size() - read_;
  if (left < kMessageHeaderBytes) return std::nullopt;
  const std::uint8_t* p = buffer_.data() + read_;
  const std::uint8_t type = p[0];
  static constexpr std::string_view kTypes = "HFDEMSBX";
  if (kTypes.find(static_cast<char>(type)) == std::string_view::npos) {
    throw std::runtime_error("unknown message type in the protected stream (sender version?)");
  }
  std::uint32_t n = 0;
  for (int i = 1; i <= 4; ++i) n = (n << 8) | p[i];
  if (n > kMaxMessageBytes) throw std::runtime_error("oversized message in the protected stream");
  if (left < kMessageHeaderBytes + n) return std::nullopt;
  Message m{static_cast<MessageType>(type), {p + kMessageHeaderBytes, n}};
  read_ += kMessageHeaderBytes + n;
  return m;
}

// ---------------------------------------------------------------------------
// Acknowledgements

AckCodec::AckCodec(std::span<const std::uint8_t> key) : key_(kAckKeyBytes) {
  if (key.size() != kAckKeyBytes) throw std::runtime_error("acknowledgement key has a bad size");
  std::copy(key.begin(), key.end(), key_.span().begin());
}
AckCodec::~AckCodec() = default;

namespace {
std::array<std::uint8_t, 32> hmac(std::span<const std::uint8_t> key,
                                  std::span<const std::uint8_t> data) {
  std::array<std::uint8_t, 32> mac{};
  unsigned int length = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data.data(), data.size(), mac.data(),
       &length);
  return mac;
}
}  // namespace

std::vector<std::uint8_t> AckCodec::seal(json message) {
  message["seq"] = next_out_++;
  const std::string text = message.dump();
  const auto n = static_cast<std::uint32_t>(text.size() + 32);
  std::vector<std::uint8_t> frame(4 + n);
  for (int i = 0; i < 4; ++i) frame[i] = static_cast<std::uint8_t>(n >> (8 * (3 - i)));
  std::memcpy(frame.data() + 4, text.data(), text.size());
  const auto mac = hmac(key_.span(), {frame.data() + 4, text.size()});
  std::memcpy(frame.data() + 4 + text.size(), mac.data(), mac.size());
  return frame;
}

std::optional<json> AckCodec::open(std::span<const std::uint8_t> frame) {
  if (frame.size() < 32) return std::nullopt;
  const auto body = frame.first(frame.size() - 32);
  const auto mac = hmac(key_.span(), body);
  if (CRYPTO_memcmp(mac.data(), frame.data() + body.size(), 32) != 0) return std::nullopt;
  try {
    json message = json::parse(body.begin(), body.end());
    if (!message.is_object() || message.value("seq", UINT64_MAX) != next_in_) return std::nullopt;
    ++next_in_;
    return message;
  } catch (const json::exception&) {
    return std::nullopt;
  }
}

// ---------------------------------------------------------------------------
// Sockets

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd >= 0) ::close(fd);
    fd = o.fd;
    o.fd = -1;
  }
  return *this;
}
Fd::~Fd() {
  if (fd >= 0) ::close(fd);
}

Fd connect_tcp(const Endpoint& peer, std::chrono::milliseconds timeout) {
  const std::string where = peer.host + ":" + std::to_string(peer.port);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc =
          getaddrinfo(peer.host.c_str(), std::to_string(peer.port).c_str(), &hints, &found);
      rc != 0) {
    throw std::runtime_error("cannot resolve the receiving site " + where + ": " +
                             gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(found, freeaddrinfo);
  std::string reason = "no address";
  for (addrinfo* a = found; a; a = a->ai_next) {
    Fd s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol));
    if (!s) continue;
    if (::connect(s.fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      reason = std::strerror(errno);
      continue;
    }
    pollfd p{s.fd, POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) {
      reason = "timed out";
      continue;
    }
    int error = 0;
    socklen_t len = sizeof error;
    getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &error, &len);
    if (error != 0) {
      reason = std::strerror(error);
      continue;
    }
    const int flags = fcntl(s.fd, F_GETFL);
    fcntl(s.fd, F_SETFL, flags & ~O_NONBLOCK);
    const int one = 1;
    setsockopt(s.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
  }
  throw std::runtime_error("cannot connect to the receiving site " + where + ": " + reason +
                           " (is `otp-transfer serve` running there? check peer.transfer)");
}

Fd listen_tcp(const Endpoint& where) {
  const std::string text = where.host + ":" + std::to_string(where.port);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (getaddrinfo(where.host.c_str(), std::to_string(where.port).c_str(), &hints, &found) != 0)
    throw std::runtime_error("cannot resolve listen address " + text);
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(found, freeaddrinfo);
  Fd s(::socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC, found->ai_protocol));
  const int one = 1;
  setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (!s || ::bind(s.fd, found->ai_addr, found->ai_addrlen) != 0 || ::listen(s.fd, 16) != 0) {
    throw std::runtime_error("cannot listen on " + text + ": " + std::strerror(errno) +
                             " (is another otp-transfer serve running? change transfer.listen)");
  }
  return s;
}

std::uint16_t local_port(int fd) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

bool write_all(int fd, std::span<const std::uint8_t> bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes = bytes.subspan(static_cast<std::size_t>(n));
  }
  return true;
}

namespace {
bool read_exact(int fd, std::uint8_t* out, std::size_t n, Clock::time_point deadline) {
  while (n > 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) != 1) return false;
    const ssize_t got = ::recv(fd, out, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    out += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}
}  // namespace

std::optional<std::vector<std::uint8_t>> read_ack_frame(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::uint8_t head[4];
  if (!read_exact(fd, head, 4, deadline)) return std::nullopt;
  const std::uint32_t n = (std::uint32_t(head[0]) << 24) | (std::uint32_t(head[1]) << 16) |
                          (std::uint32_t(head[2]) << 8) | head[3];
  if (n < 32 || n > (1u << 20)) return std::nullopt;
  std::vector<std::uint8_t> frame(n);
  // Once a frame has started, its rest follows promptly.
  if (!read_exact(fd, frame.data(), n, Clock::now() + std::chrono::seconds(30)))
    return std::nullopt;
  return frame;
}

// ---------------------------------------------------------------------------
// Pipelines

void ensure_gstreamer() {
  if (!gst_is_initialized()) gst_init(nullptr, nullptr);
  for (const char* name : {"otpencrypt", "otpdecrypt", "appsrc", "appsink", "fdsrc", "fdsink"}) {
    GstElementFactory* f = gst_element_factory_find(name);
    if (!f) {
      throw std::runtime_error(std::string("GStreamer element ") + name +
                               " is missing (is the otp plugin on GST_PLUGIN_PATH? are "
                               "gstreamer1.0-plugins-base/good installed?)");
    }
    gst_object_unref(f);
  }
}

namespace {
std::string take_error(GstElement* pipeline, std::string& error) {
  if (!error.empty()) return error;
  std::unique_ptr<GstBus, GstObjectUnref> bus(gst_element_get_bus(pipeline));
  while (GstMessage* m = gst_bus_pop_filtered(bus.get(), GST_MESSAGE_ERROR)) {
    GError* e = nullptr;
    gst_message_parse_error(m, &e, nullptr);
    if (error.empty() && e) error = e->message;
    if (e) g_error_free(e);
    gst_message_unref(m);
  }
  return error;
}

GstElement* make(const char* factory) {
  GstElement* e = gst_element_factory_make(factory, nullptr);
  if (!e) throw std::runtime_error(std::string("cannot create GStreamer element ") + factory);
  return e;
}
}  // namespace

EncryptPipeline::EncryptPipeline(keys::PadSource& keys, int socket_fd, bool aes,
                                 std::uint32_t record_size, std::uint32_t aes_rekey_records) {
  ensure_gstreamer();
  pipeline_.reset(GST_ELEMENT(gst_object_ref_sink(gst_pipeline_new("otp-transfer-send"))));
  src_ = make("appsrc");
  encrypt_ = make("otpencrypt");
  GstElement* sink = make("fdsink");
  gst_bin_add_many(GST_BIN(pipeline_.get()), src_, encrypt_, sink, nullptr);
  if (!gst_element_link_many(src_, encrypt_, sink, nullptr))
    throw std::runtime_error("cannot link the sending pipeline");
  g_object_set(src_, "format", GST_FORMAT_BYTES, "block", FALSE, "max-bytes",
               static_cast<guint64>(2 * kQueueBytes), "is-live", FALSE, nullptr);
  gst_util_set_object_arg(G_OBJECT(encrypt_), "mode", "stream");
  gst_util_set_object_arg(G_OBJECT(encrypt_), "cipher", aes ? "aes-256-gcm" : "otp");
  g_object_set(encrypt_, "key-supply", &keys, "record-size", record_size, "rekey-interval",
               aes_rekey_records, nullptr);
  g_object_set(sink, "fd", socket_fd, "sync", FALSE, nullptr);
  if (gst_element_set_state(pipeline_.get(), GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
    throw std::runtime_error("the sending pipeline did not start: " +
                             take_error(pipeline_.get(), error_));
}

EncryptPipeline::~EncryptPipeline() {
  gst_element_set_state(pipeline_.get(), GST_STATE_NULL);
}

bool EncryptPipeline::check_bus() {
  return take_error(pipeline_.get(), error_).empty();
}

bool EncryptPipeline::push(std::span<const std::uint8_t> bytes,
                           const std::function<bool()>& keep_waiting) {
  // appsrc does not block (a blocked push would never see the pipeline fail): wait here
  // while the queue is full, which is how the transfer slows to the key rate.
  while (gst_app_src_get_current_level_bytes(GST_APP_SRC(src_)) >= kQueueBytes) {
    if (!check_bus() || (keep_waiting && !keep_waiting())) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!check_bus()) return false;
  GstBuffer* buffer = gst_buffer_new_memdup(bytes.data(), bytes.size());
  return gst_app_src_push_buffer(GST_APP_SRC(src_), buffer) == GST_FLOW_OK && check_bus();
}

bool EncryptPipeline::flush() {
  GstStructure* s = gst_structure_new_empty("otp-flush");
  return gst_element_send_event(src_, gst_event_new_custom(GST_EVENT_CUSTOM_DOWNSTREAM, s)) &&
         check_bus();
}

bool EncryptPipeline::finish(std::chrono::milliseconds timeout) {
  if (!check_bus()) return false;
  gst_app_src_end_of_stream(GST_APP_SRC(src_));
  std::unique_ptr<GstBus, GstObjectUnref> bus(gst_element_get_bus(pipeline_.get()));
  GstMessage* m = gst_bus_timed_pop_filtered(
      bus.get(), static_cast<GstClockTime>(timeout.count()) * GST_MSECOND,
      static_cast<GstMessageType>(GST_MESSAGE_EOS | GST_MESSAGE_ERROR));
  if (!m) {
    error_ = "the protected stream did not finish in time";
    return false;
  }
  const bool eos = GST_MESSAGE_TYPE(m) == GST_MESSAGE_EOS;
  if (!eos) {
    GError* e = nullptr;
    gst_message_parse_error(m, &e, nullptr);
    error_ = e ? e->message : "error";
    if (e) g_error_free(e);
  }
  gst_message_unref(m);
  return eos;
}

std::string EncryptPipeline::error() {
  return take_error(pipeline_.get(), error_);
}

bool EncryptPipeline::waiting_for_key() const {
  GstStructure* stats = nullptr;
  g_object_get(encrypt_, "stats", &stats, nullptr);
  gboolean exhausted = FALSE;
  if (stats) {
    gst_structure_get_boolean(stats, "key-exhausted", &exhausted);
    gst_structure_free(stats);
  }
  return exhausted;
}

std::uint64_t EncryptPipeline::queued_bytes() const {
  return gst_app_src_get_current_level_bytes(GST_APP_SRC(src_));
}

DecryptPipeline::DecryptPipeline(keys::PadSource& keys, int socket_fd, std::size_t window_bytes) {
  ensure_gstreamer();
  pipeline_.reset(GST_ELEMENT(gst_object_ref_sink(gst_pipeline_new("otp-transfer-receive"))));
  GstElement* src = make("fdsrc");
  decrypt_ = make("otpdecrypt");
  sink_ = make("appsink");
  gst_bin_add_many(GST_BIN(pipeline_.get()), src, decrypt_, sink_, nullptr);
  if (!gst_element_link_many(src, decrypt_, sink_, nullptr))
    throw std::runtime_error("cannot link the receiving pipeline");
  g_object_set(src, "fd", socket_fd, "blocksize", 262144u, nullptr);
  gst_util_set_object_arg(G_OBJECT(decrypt_), "mode", "stream");
  g_object_set(decrypt_, "key-supply", &keys, "window-size", static_cast<guint64>(window_bytes),
               nullptr);
  g_object_set(sink_, "sync", FALSE, "max-buffers", 64u, "drop", FALSE, nullptr);
  if (gst_element_set_state(pipeline_.get(), GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
    throw std::runtime_error("the receiving pipeline did not start: " +
                             take_error(pipeline_.get(), error_));
}

DecryptPipeline::~DecryptPipeline() {
  gst_element_set_state(pipeline_.get(), GST_STATE_NULL);
}

bool DecryptPipeline::pull(std::chrono::milliseconds timeout, bool& ended,
                           const std::function<void(std::span<const std::uint8_t>)>& sink) {
  ended = false;
  GstSample* sample = gst_app_sink_try_pull_sample(
      GST_APP_SINK(sink_), static_cast<GstClockTime>(timeout.count()) * GST_MSECOND);
  if (!sample) {
    ended =
        gst_app_sink_is_eos(GST_APP_SINK(sink_)) || !take_error(pipeline_.get(), error_).empty();
    return false;
  }
  GstBuffer* buffer = gst_sample_get_buffer(sample);
  GstMapInfo map;
  if (buffer && gst_buffer_map(buffer, &map, GST_MAP_READ)) {
    try {
      sink({map.data, map.size});
    } catch (...) {
      gst_buffer_unmap(buffer, &map);
      gst_sample_unref(sample);
      throw;
    }
    gst_buffer_unmap(buffer, &map);
  }
  gst_sample_unref(sample);
  return true;
}

std::string DecryptPipeline::error() {
  return take_error(pipeline_.get(), error_);
}

std::string DecryptPipeline::stats_text() {
  GstStructure* stats = nullptr;
  g_object_get(decrypt_, "stats", &stats, nullptr);
  if (!stats) return "";
  gchar* text = gst_structure_to_string(stats);
  std::string out = text;
  g_free(text);
  gst_structure_free(stats);
  return out;
}

std::uint64_t DecryptPipeline::auth_failures() {
  GstStructure* stats = nullptr;
  g_object_get(decrypt_, "stats", &stats, nullptr);
  guint64 failures = 0;
  if (stats) {
    gst_structure_get_uint64(stats, "auth-failures", &failures);
    gst_structure_free(stats);
  }
  return failures;
}

// ---------------------------------------------------------------------------
// Hashing, names

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (!ctx_) throw std::bad_alloc();
  reset();
}
Sha256::~Sha256() {
  EVP_MD_CTX_free(ctx_);
}
void Sha256::reset() {
  EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr);
}
void Sha256::update(std::span<const std::uint8_t> bytes) {
  EVP_DigestUpdate(ctx_, bytes.data(), bytes.size());
}
std::string Sha256::hex_digest() {
  unsigned char digest[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx_, digest, &n);
  return to_hex({digest, n});
}

std::string to_hex(std::span<const std::uint8_t> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  text.reserve(2 * bytes.size());
  for (const std::uint8_t b : bytes) {
    text += kDigits[b >> 4];
    text += kDigits[b & 15];
  }
  return text;
}

std::optional<std::vector<std::uint8_t>> from_hex(std::string_view text) {
  std::vector<std::uint8_t> out(text.size() / 2);
  std::size_t length = 0;
  const std::string copy(text);  // OpenSSL wants a NUL-terminated string
  if (text.size() % 2 != 0 ||
      OPENSSL_hexstr2buf_ex(out.data(), out.size(), &length, copy.c_str(), '\0') != 1) {
    return std::nullopt;
  }
  out.resize(length);
  return out;
}

void hash_prefix(const std::filesystem::path& file, std::uint64_t bytes, Sha256& hash) {
  Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw std::runtime_error(file.string() + ": cannot be read: " + std::strerror(errno));
  std::vector<std::uint8_t> buffer(1u << 20);
  while (bytes > 0) {
    const ssize_t n = ::read(fd.fd, buffer.data(), std::min<std::uint64_t>(bytes, buffer.size()));
    if (n <= 0) throw std::runtime_error(file.string() + ": shorter than the part already sent");
    hash.update({buffer.data(), static_cast<std::size_t>(n)});
    bytes -= static_cast<std::uint64_t>(n);
  }
}

bool valid_identifier(const std::string& text) {
  if (text.empty() || text.size() > 64 || text == "." || text == "..") return false;
  return std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

bool valid_relative_path(const std::string& text) {
  if (text.empty() || text.size() > 4096 || text.front() == '/') return false;
  if (text.find('\0') != std::string::npos || text.find('\\') != std::string::npos) return false;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find('/', start), text.size());
    const std::string part = text.substr(start, end - start);
    if (part.empty() || part == "." || part == ".." || part.size() > 255) return false;
    start = end + 1;
  }
  return true;
}

std::string data_type_of(const std::vector<std::string>& paths) {
  std::string type;
  for (const auto& p : paths) {
    std::string name = p;
    std::transform(name.begin(), name.end(), name.begin(), ::tolower);
    auto ends = [&](const char* s) {
      const std::string suffix(s);
      return name.size() >= suffix.size() &&
             name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    std::string t;
    if (ends(".fastq") || ends(".fastq.gz") || ends(".fq") || ends(".fq.gz"))
      t = "FASTQ";
    else if (ends(".bam") || ends(".cram") || ends(".sam"))
      t = "BAM";
    else if (ends(".vcf") || ends(".vcf.gz") || ends(".bcf"))
      t = "VCF";
    else
      continue;  // indexes, markers, run metadata do not decide the type
    if (type.empty())
      type = t;
    else if (type != t)
      return "mixed";
  }
  return type.empty() ? "other" : type;
}

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

keys::KmeClientConfig kme_client_config(const TransferConfig& config) {
  keys::KmeClientConfig k;
  k.base_url = config.kme_url;
  k.tls = {config.tls_cert, config.tls_key, config.tls_ca};
  k.log = keys::stderr_log_sink(keys::LogLevel::warning);
  return k;
}

std::filesystem::path journal_path(const TransferConfig& config, const std::string& job_id) {
  return config.state_dir / "transfer-journals" / (job_id + ".journal");
}

std::filesystem::path SendJobLock::path(const TransferConfig& config, const std::string& job_id) {
  return journal_path(config, job_id).replace_extension(".sender.lock");
}

SendJobLock::SendJobLock(const TransferConfig& config, const std::string& job_id) {
  const auto file = path(config, job_id);
  std::error_code ec;
  std::filesystem::create_directories(file.parent_path(), ec);
  fd_ = Fd(::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd_) {
    throw std::runtime_error("cannot create " + file.string() + ": " + std::strerror(errno) +
                             " (check site.state_dir)");
  }
  // held() probes with a shared lock it lets go of at once: a few tries tell such a
  // probe from another sender.
  for (int attempt = 0; ::flock(fd_.fd, LOCK_EX | LOCK_NB) != 0; ++attempt) {
    if (errno != EWOULDBLOCK || attempt == 20) {
      throw std::runtime_error("job " + job_id +
                               " is already being sent by another otp-transfer process");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

bool SendJobLock::held(const TransferConfig& config, const std::string& job_id) {
  const Fd probe(::open(path(config, job_id).c_str(), O_RDONLY | O_CLOEXEC));
  if (!probe) return false;  // never started here
  // A shared lock is refused exactly while a sender holds its exclusive one; the probe
  // lets go at once.
  return ::flock(probe.fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
}

}  // namespace otpgate::transfer::detail

// SPDX-License-Identifier: LGPL-2.1-or-later
// Internals shared by the sending and receiving ends of otp-transfer: the messages
// carried inside the protected stream, the authenticated acknowledgements that travel
// back, the GStreamer pipelines around otpencrypt/otpdecrypt, hashing and paths.
#pragma once

#include <gst/gst.h>
#include <openssl/evp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "otpgate/keyclient.hpp"
#include "otpgate/transfer.hpp"

namespace otpgate::transfer::detail {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// Messages inside the protected stream (sender -> receiver): type (1) | length (4, BE) | body.

enum class MessageType : std::uint8_t {
  hello = 'H',     // JSON: job description and the acknowledgement key
  file = 'F',      // JSON: index, path, size known so far
  data = 'D',      // index (4) | offset (8) | bytes
  end = 'E',       // JSON: index, size, sha256
  manifest = 'M',  // text: "sha256  path" lines (the seed's "hash" data type)
  status = 'S',    // JSON: analysis state/size/time while a run is sequenced
  bye = 'B',       // JSON: the job is complete on the sender's side
  abort = 'X',     // JSON: the sender aborted the job
};
inline constexpr std::size_t kMessageHeaderBytes = 5;
inline constexpr std::size_t kDataHeaderBytes = 12;
inline constexpr std::size_t kMaxMessageBytes = 16u << 20;

// A message as parsed: `body` points into the parser's buffer and stays valid until the
// next feed() (no copy of file data on the receiving path).
struct Message {
  MessageType type{};
  std::span<const std::uint8_t> body;
  json as_json() const;  // throws std::runtime_error on a malformed body
};

void append_message(std::vector<std::uint8_t>& out, MessageType type,
                    std::span<const std::uint8_t> body);
void append_json_message(std::vector<std::uint8_t>& out, MessageType type, const json& body);
void append_data_header(std::vector<std::uint8_t>& out, std::uint32_t index, std::uint64_t offset,
                        std::size_t bytes);

// Splits the decrypted byte stream into messages; throws on a malformed frame.
class MessageParser {
 public:
  void feed(std::span<const std::uint8_t> bytes);
  std::optional<Message> next();

 private:
  std::vector<std::uint8_t> buffer_;
  std::size_t read_ = 0;
};

// ---------------------------------------------------------------------------
// Acknowledgements (receiver -> sender, plain TCP): length (4) | JSON | HMAC-SHA256 (32)
// under a random key the sender sent inside the protected stream, so only the receiver
// that decrypted the stream can acknowledge it. Each carries a sequence number.

inline constexpr std::size_t kAckKeyBytes = 32;

class AckCodec {
 public:
  explicit AckCodec(std::span<const std::uint8_t> key);
  ~AckCodec();
  std::vector<std::uint8_t> seal(json message);  // adds "seq"
  // Verifies one frame body (without the length); nullopt when forged or out of order.
  std::optional<json> open(std::span<const std::uint8_t> frame);

 private:
  keys::SecretBytes key_;
  std::uint64_t next_out_ = 0;
  std::uint64_t next_in_ = 0;
};

// ---------------------------------------------------------------------------
// Sockets

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept;
  ~Fd();
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  explicit operator bool() const { return fd >= 0; }
};

// TCP connection to host:port; throws std::runtime_error naming the peer and the reason.
Fd connect_tcp(const Endpoint& peer, std::chrono::milliseconds timeout);
Fd listen_tcp(const Endpoint& where);  // throws naming the address
std::uint16_t local_port(int fd);
bool write_all(int fd, std::span<const std::uint8_t> bytes);  // false on error/closed
// Reads one acknowledgement frame; nullopt on EOF/error/timeout. Blocks up to `timeout`.
std::optional<std::vector<std::uint8_t>> read_ack_frame(int fd, std::chrono::milliseconds timeout);

// ---------------------------------------------------------------------------
// GStreamer pipelines around the elements

struct GstObjectUnref {
  void operator()(GstElement* e) const { gst_object_unref(e); }
  void operator()(GstBus* b) const { gst_object_unref(b); }
};

// appsrc ! otpencrypt mode=stream ! fdsink fd=SOCKET
class EncryptPipeline {
 public:
  EncryptPipeline(keys::PadSource& keys, int socket_fd, bool aes, std::uint32_t record_size,
                  std::uint32_t aes_rekey_records);
  ~EncryptPipeline();  // to NULL
  // Copies bytes in; blocks while the element waits for key (the transfer slows to the
  // key rate). False when the pipeline failed (see error()).
  bool push(std::span<const std::uint8_t> bytes, const std::function<bool()>& keep_waiting = {});
  bool flush();  // emits pending bytes as a record now (control messages)
  bool finish(std::chrono::milliseconds timeout);  // final record, all written
  std::string error();                             // first error posted, "" if none
  std::uint64_t queued_bytes() const;
  bool waiting_for_key() const;  // the element waits for pad right now

 private:
  bool check_bus();
  static constexpr std::uint64_t kQueueBytes = 8u << 20;
  std::unique_ptr<GstElement, GstObjectUnref> pipeline_;
  GstElement* src_ = nullptr;
  GstElement* encrypt_ = nullptr;
  std::string error_;
};

// fdsrc fd=SOCKET ! otpdecrypt mode=stream ! appsink
class DecryptPipeline {
 public:
  DecryptPipeline(keys::PadSource& keys, int socket_fd, std::size_t window_bytes);
  ~DecryptPipeline();
  // Hands the next decrypted bytes to `sink` (no copy); false with `ended` set at the end
  // of the stream or on error, false alone on a timeout.
  bool pull(std::chrono::milliseconds timeout, bool& ended,
            const std::function<void(std::span<const std::uint8_t>)>& sink);
  std::string error();
  std::uint64_t auth_failures();
  std::string stats_text();  // the element's stats structure, for logs

 private:
  std::unique_ptr<GstElement, GstObjectUnref> pipeline_;
  GstElement* sink_ = nullptr;
  GstElement* decrypt_ = nullptr;
  std::string error_;
};

// Loads the otp plugin (from GST_PLUGIN_PATH or next to the program); throws if absent.
void ensure_gstreamer();

// ---------------------------------------------------------------------------
// Hashing, names, keys

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(std::span<const std::uint8_t> bytes);
  std::string hex_digest();  // finalises; reset() to reuse
  void reset();

 private:
  EVP_MD_CTX* ctx_;
};

// Lower-case hex (digests, the acknowledgement key) and back; nullopt when not hex.
std::string to_hex(std::span<const std::uint8_t> bytes);
std::optional<std::vector<std::uint8_t>> from_hex(std::string_view text);

// Hashes the first `bytes` of a file into `hash`; throws naming the file on a short read.
void hash_prefix(const std::filesystem::path& file, std::uint64_t bytes, Sha256& hash);

// Names that arrive from the network: a specimen or job ID, a relative file path.
bool valid_identifier(const std::string& text);
bool valid_relative_path(const std::string& text);

std::string data_type_of(const std::vector<std::string>& paths);
std::int64_t now_ms();

keys::KmeClientConfig kme_client_config(const TransferConfig& config);
std::filesystem::path journal_path(const TransferConfig& config, const std::string& job_id);

// Held (flock) by the process that runs a send job for as long as it runs it, retries
// included: tells a live job from one whose sender died, and refuses a second sender.
class SendJobLock {
 public:
  // Throws std::runtime_error when another process runs the job.
  SendJobLock(const TransferConfig& config, const std::string& job_id);
  // True while some process runs the job.
  static bool held(const TransferConfig& config, const std::string& job_id);

 private:
  static std::filesystem::path path(const TransferConfig& config, const std::string& job_id);
  Fd fd_;
};

}  // namespace otpgate::transfer::detail

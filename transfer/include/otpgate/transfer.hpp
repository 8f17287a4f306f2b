// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-transfer: specimen files (FASTQ/BAM/VCF) sent between two sites with the one-time
// pad, as they are sequenced. The sender runs `otpencrypt` in stream mode, the receiver
// `otpdecrypt`, over one TCP connection per job attempt; files are hashed (SHA-256) at
// both ends, committed by the receiver as they arrive, and resumed from the last
// committed byte with fresh pad. Jobs live in a SQLite database. See docs/transfer.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "otpgate/config_error.hpp"
#include "otpgate/offline_checks.hpp"

namespace otpgate::transfer {

using config::ConfigError;
using config::Endpoint;

// A job's transfer state. The job database, the job API's JSON, the web page and
// `otp-transfer jobs` all show the same words: to_string().
enum class TransferState {
  queued,           // "queued": made, not started
  running,          // "running"
  waiting_for_key,  // "waiting-for-key": running at the key rate
  completed,        // "completed": every file verified at both ends
  failed,           // "failed": with the reason in the job's error
  interrupted,      // "interrupted": its sender or the service stopped; `start` resumes it
  aborted,          // "aborted": stopped on request; `start` resumes it
};
// How a job's bytes are protected: "OTP" (one-time pad) or "AES" (AES-256-GCM keyed from
// the pad). Configs, the CLI and requests spell them "otp" and "aes"; either case is read.
enum class Method { otp, aes };

std::string_view to_string(TransferState state);
std::string_view to_string(Method method);
// The value a word names (as to_string() writes it); nullopt for any other text.
template <typename Enum>
std::optional<Enum> from_string(std::string_view text);
template <>
std::optional<TransferState> from_string<TransferState>(std::string_view text);
template <>
std::optional<Method> from_string<Method>(std::string_view text);

// Running or waiting for key: a sender is moving the job's bytes (or was, if it died).
bool active(TransferState state);

struct TransferConfig : config::SiteConfig {        // [site], [kme], [peer] sae_id, [keys]
  TransferConfig() { key_ring_bytes = 16u << 20; }  // files: a larger ring than media
  // [peer] address: the receiving site's `otp-transfer serve` (sending side only).
  std::optional<Endpoint> peer_transfer;
  // [transfer]
  Endpoint listen{"0.0.0.0", 7400};    // serve: where senders connect
  std::filesystem::path incoming_dir;  // serve: received specimens land here
  std::filesystem::path data_root;     // sending side: folders the job API may send
  Method method = Method::otp;         // transfer.method: "otp" | "aes"
  std::vector<std::string> completion_markers{"CopyComplete.txt", "RTAComplete.txt"};
  std::uint32_t record_size = 65536;       // otpencrypt record size
  std::uint64_t commit_bytes = 32u << 20;  // receiver commits (fsync) at least this often
  std::uint32_t aes_rekey_records = 1024;  // AES method: records per key
  int max_attempts = 5;                    // connection attempts per run before giving up
  // A symbolic link in a specimen folder refuses the job, unless this is set: then a link
  // to a regular file inside data_root (or the folder, without one) is sent as that file.
  bool follow_symlinks = false;
  // [api]
  Endpoint api_listen{"127.0.0.1", 7480};  // job API (JSON) and web page of `serve`
  // [api] access when exposed beyond localhost: HTTPS with this certificate, and HTTP
  // Basic authentication of one user whose password's SHA-256 is configured.
  std::filesystem::path api_tls_cert, api_tls_key;
  std::string api_user, api_password_sha256;
  // Names this service is reached by besides localhost and the api.listen address (e.g.
  // "transfer.lab.hospital.example"): a request naming any other host is refused, so a
  // DNS-rebinding page cannot reach the API through a name it controls.
  std::vector<std::string> api_server_names;
};

// Reads and validates a config file; throws ConfigError with one readable line.
TransferConfig load_config(const std::filesystem::path& path);
TransferConfig parse_config(std::string_view toml_text, const std::string& source_name);
// What can be verified before running (TLS files, KME URL, state_dir and incoming_dir,
// that the peer resolves; with `serving`, that transfer.listen and api.listen are free):
// --check-config and `serve` run them; the other commands skip the ports.
config::OfflineChecks check_offline(const TransferConfig& config, bool serving);

// ---------------------------------------------------------------------------
// Job database (SQLite, WAL): one row per job, one per file. Shared by the CLI and the
// service of a site, which may run at the same time.

struct FileRecord {
  int index = 0;
  std::string path;  // relative to the job's folder (as sent)
  std::uint64_t size = 0;
  std::uint64_t committed = 0;  // receiver: bytes durably written; sender: acknowledged
  std::string sha256;           // hex, once known
  std::string state;            // pending | sending | done | failed
};

struct Job {
  std::string job_id;
  std::string direction;  // send | receive
  std::string specimen_id;
  std::string folder;           // the specimen folder (sender's path; receiver's destination)
  std::string data_type;        // FASTQ | BAM | VCF | mixed | hash ...
  std::int64_t created_at = 0;  // unix milliseconds
  std::string analysis_state;   // sequencing | complete
  std::uint64_t analysis_size = 0;
  std::int64_t analysis_time = 0;
  TransferState transfer_state = TransferState::queued;
  std::uint64_t transfer_size = 0;  // bytes to transfer (grows while sequencing)
  std::uint64_t transferred = 0;    // bytes committed by the receiver
  std::int64_t completed_at = 0;
  Method method = Method::otp;
  std::string peer;
  std::string error;
  bool watch = false;                // follows a growing run folder
  std::vector<std::string> sources;  // sender: paths given to send/watch
  std::vector<FileRecord> files;     // filled by JobStore::get
};

class JobStore {
 public:
  // Reading a row whose transfer_state or method is not one of the words above (a newer
  // version's, or an edited database) throws std::runtime_error naming the job and text.
  explicit JobStore(const std::filesystem::path& database);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  void insert(const Job& job);
  std::optional<Job> get(const std::string& job_id) const;  // with files
  std::vector<Job> list() const;                            // newest first, without files
  void update(const Job& job);                              // job columns, not files
  void set_state(const std::string& job_id, TransferState state, const std::string& error);
  void upsert_file(const std::string& job_id, const FileRecord& file);
  bool remove(const std::string& job_id);
  // Abort requests cross processes through the database (the API, `otp-transfer abort`).
  void request_abort(const std::string& job_id);
  bool abort_requested(const std::string& job_id) const;
  void clear_abort(const std::string& job_id);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Deletes a job and what this site wrote for it (received files, partial and failed
// copies; never a sender's source data). Throws if it is running; false if unknown.
bool delete_job(JobStore& store, const TransferConfig& config, const std::string& job_id);

// Send jobs left "running" or "waiting-for-key" by a sender that no longer runs them
// (killed, crashed, the machine rebooted) become "interrupted", with how to resume.
// Listings call this, so a job table never shows a dead transfer as running.
void mark_interrupted_send_jobs(JobStore& store, const TransferConfig& config);

std::string new_job_id();  // "J" + date + random, unique per site
std::filesystem::path database_path(const TransferConfig& config);

// ---------------------------------------------------------------------------
// Sending

struct Progress {
  std::uint64_t bytes_done = 0;   // committed by the receiver
  std::uint64_t bytes_total = 0;  // known so far
  double rate_bytes_per_s = 0;
  std::uint64_t key_available = 0;  // pad bytes ready in the key ring
  double key_rate_bytes_per_s = 0;  // current consumption
  bool waiting_for_key = false;     // the transfer runs at the key rate right now
  bool sequencing = false;          // watch: the run is not complete yet
  std::string file;                 // the file being sent
};

struct SendOptions {
  std::function<void(const Progress&)> on_progress;  // called about 4 times a second
  const std::atomic<bool>* cancel = nullptr;         // e.g. SIGINT: stops, job stays resumable
};

// Creates a send job (not started). `paths` are files or folders; relative names on the
// receiver keep the folder's own name. Throws std::runtime_error naming a bad path.
Job create_send_job(JobStore& store, const TransferConfig& config, const std::string& specimen_id,
                    const std::vector<std::filesystem::path>& paths, Method method, bool watch);

// Runs (or resumes) a send job to completion. Returns the final job; its transfer_state
// says completed, failed (with error) or aborted.
Job run_send_job(JobStore& store, const TransferConfig& config, const std::string& job_id,
                 const SendOptions& options = {});

// ---------------------------------------------------------------------------
// The site service: receives jobs from the peer, serves the job API, and runs send
// jobs started through the API.

class Service {
 public:
  explicit Service(TransferConfig config);
  ~Service();
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  void start();  // binds both ports; throws with a readable reason
  void stop();   // closes connections (jobs stay resumable)
  std::uint16_t transfer_port() const;
  std::uint16_t api_port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Formats sizes for people ("1.4 GiB").
std::string human_bytes(double bytes);

}  // namespace otpgate::transfer

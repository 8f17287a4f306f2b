// SPDX-License-Identifier: LGPL-2.1-or-later
// The receiving end of one connection: otpdecrypt's output parsed into messages, files
// written under temporary names, committed (fdatasync + database) as they arrive, and
// renamed into place only when their SHA-256 matches the sender's.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "ack_codec.hpp"
#include "clock.hpp"
#include "key_settings.hpp"
#include "names.hpp"
#include "otpgate/hex.hpp"
#include "parts.hpp"
#include "sha256.hpp"
#include "stream_messages.hpp"
#include "tcp_socket.hpp"
#include "transfer_pipeline.hpp"

namespace otpgate::transfer::detail {

namespace {

namespace fs = std::filesystem;

// A failure the sender must hear about; `resumable` says whether `start` can continue.
struct ReceiveError : std::runtime_error {
  ReceiveError(const std::string& what, bool can_resume, bool link_lost = false)
      : std::runtime_error(what), resumable(can_resume), interrupted(link_lost) {}
  bool resumable;
  bool interrupted;  // the link went away: nothing is wrong with the data
};

struct OpenFile {
  FileRecord record;
  Fd fd;
  fs::path part;
  std::uint64_t written = 0;
  std::unique_ptr<Sha256> hash = std::make_unique<Sha256>();
  Clock::time_point last_commit = Clock::now();
};

class ReceiveSession {
 public:
  ReceiveSession(JobStore& store, const TransferConfig& config, Fd socket,
                 const std::atomic<bool>& stopping)
      : store_(store), config_(config), socket_(std::move(socket)), stopping_(stopping) {}

  void run() {
    keys::KeySupplyConfig k;
    k.role = keys::SaeRole::slave;
    k.peer_sae_id = config_.peer_sae_id;
    k.ring_bytes = config_.key_ring_bytes;
    k.log = keys::stderr_log_sink(keys::LogLevel::warning);
    keys::KeySupply supply(kme_client_config(config_), k);
    supply.start();
    DecryptPipeline pipeline(supply, socket_.fd, 4 * config_.key_ring_bytes + (8u << 20));
    MessageParser parser;
    std::string failure;
    bool resumable = true, interrupted = false;
    try {
      while (!done_) {
        if (stopping_) throw ReceiveError("the receiving service is stopping", true);
        bool ended = false;
        pipeline.pull(std::chrono::milliseconds(250), ended,
                      [&](std::span<const std::uint8_t> bytes) {
                        parser.feed(bytes);
                        while (auto m = parser.next()) handle(*m);
                      });
        commit_due(false);
        check_abort();
        if (ended) {
          const std::string error = pipeline.error();
          if (!error.empty()) {
            const bool tampered = pipeline.auth_failures() > 0;
            if (tampered) {
              throw ReceiveError(
                  "a record failed authentication (corrupted or tampered on the wire): " + error,
                  true);
            }
            const bool cut = error.find("ended before its final record") != std::string::npos ||
                             error.find("read") != std::string::npos;
            throw ReceiveError(error, true, cut);
          }
          if (!done_)
            throw ReceiveError("the connection ended before the job was complete", true, true);
        }
      }
    } catch (const ReceiveError& e) {
      failure = e.what();
      resumable = e.resumable;
      interrupted = e.interrupted;
    } catch (const std::exception& e) {
      failure = e.what();
    }
    commit_all();
    if (!failure.empty()) {
      const auto ks = supply.stats();
      std::fprintf(stderr,
                   "otp-transfer: incoming job %s: %s (keys fetched %llu, lost %llu, KME errors "
                   "%llu%s%s)\n",
                   job_ ? job_->job_id.c_str() : "?", failure.c_str(),
                   static_cast<unsigned long long>(ks.keys_fetched),
                   static_cast<unsigned long long>(ks.keys_lost),
                   static_cast<unsigned long long>(ks.kme_errors),
                   ks.last_error.empty() ? "" : ", last: ", ks.last_error.c_str());
      std::fprintf(stderr, "otp-transfer: decrypt stats: %s\n", pipeline.stats_text().c_str());
      finish_with_error(failure, resumable, interrupted);
    } else {
      // Done: the sender closes the stream with its final record; take it so that the
      // end is clean (it proves nothing was cut, though everything is already verified).
      const auto until = Clock::now() + std::chrono::seconds(5);
      for (bool ended = false; !ended && Clock::now() < until && !stopping_;)
        pipeline.pull(std::chrono::milliseconds(100), ended, [](std::span<const std::uint8_t>) {});
    }
    ::shutdown(socket_.fd, SHUT_RDWR);
  }

 private:
  void send_ack(json message) {
    if (!acks_) return;
    const auto frame = acks_->seal(std::move(message));
    write_all(socket_.fd, frame);  // a lost acknowledgement only costs a resend
  }

  void handle(const Message& m) {
    if (!job_ && m.type != MessageType::hello)
      throw ReceiveError("stream did not start with a job", false);
    switch (m.type) {
      case MessageType::hello:
        on_hello(m.as_json());
        break;
      case MessageType::file:
        on_file(m.as_json());
        break;
      case MessageType::data:
        on_data(m.body);
        break;
      case MessageType::end:
        on_end(m.as_json());
        break;
      case MessageType::manifest:
        on_manifest(m.body);
        break;
      case MessageType::status:
        on_status(m.as_json());
        break;
      case MessageType::bye:
        on_bye();
        break;
      case MessageType::abort:
        job_->transfer_state = TransferState::aborted;
        job_->error = "aborted by the sending site";
        store_.update(*job_);
        done_ = true;
        break;
    }
  }

  void on_hello(const json& hello) {
    if (job_) throw ReceiveError("a second job description in one stream", false);
    const json& j = hello.at("job");
    const std::string job_id = j.at("job_id").get<std::string>();
    const std::string specimen = j.at("specimen_id").get<std::string>();
    if (!valid_identifier(job_id) || !valid_identifier(specimen))
      throw ReceiveError("the sender named an invalid job or specimen ID", false);
    auto key = from_hex(hello.at("ack_key").get<std::string>());
    if (!key || key->size() != kAckKeyBytes)
      throw ReceiveError("the job description has a malformed acknowledgement key", false);
    acks_ = std::make_unique<AckCodec>(*key);
    OPENSSL_cleanse(key->data(), key->size());

    auto existing = store_.get(job_id);
    if (existing && existing->direction != "receive")
      throw ReceiveError("job " + job_id + " exists here as a send job", false);
    job_dir_ = config_.incoming_dir / specimen / job_id;
    partial_dir_ = config_.incoming_dir / ".partial" / job_id;
    if (!existing) {
      Job fresh;
      fresh.job_id = job_id;
      fresh.direction = "receive";
      fresh.specimen_id = specimen;
      fresh.folder = job_dir_.string();
      fresh.data_type = j.value("data_type", "other");
      fresh.created_at = now_ms();
      fresh.analysis_state = j.value("analysis_state", "complete");
      const auto method = from_string<Method>(j.value("method", "OTP"));
      if (!method) throw ReceiveError("the sender named an unknown method (not OTP or AES)", false);
      fresh.method = *method;
      fresh.peer = config_.peer_sae_id;
      fresh.transfer_state = TransferState::running;
      store_.insert(fresh);
      existing = store_.get(job_id);
    }
    job_ = std::move(*existing);
    if (job_->transfer_state == TransferState::completed) {
      send_ack({{"type", "job_ok"}, {"already", true}});
      done_ = true;
      return;
    }
    store_.clear_abort(job_->job_id);
    job_->analysis_state = j.value("analysis_state", job_->analysis_state);
    job_->analysis_size = j.value("analysis_size", job_->analysis_size);
    job_->analysis_time = j.value("analysis_time", job_->analysis_time);
    job_->transfer_size = j.value("transfer_size", job_->transfer_size);
    job_->transfer_state = TransferState::running;
    job_->error.clear();
    store_.update(*job_);
    fs::create_directories(partial_dir_);
    send_ack({{"type", "hello"}, {"site", config_.site_name}});
  }

  void on_file(const json& f) {
    const int index = f.at("index").get<int>();
    const std::string path = f.at("path").get<std::string>();
    if (index < 0 || !valid_relative_path(path))
      throw ReceiveError("the sender named an invalid file path", false);
    FileRecord record{index, path, f.value("size", std::uint64_t(0)), 0, "", "sending"};
    for (const auto& known : job_->files) {
      if (known.index != index) continue;
      if (known.path != path)
        throw ReceiveError("file " + std::to_string(index) + " changed its name", false);
      record = known;
    }
    if (record.state == "done") {
      send_ack({{"type", "resume"},
                {"index", index},
                {"offset", record.size},
                {"done", true},
                {"sha256", record.sha256}});
      return;
    }
    OpenFile file;
    file.part = partial_dir_ / (std::to_string(index) + ".part");
    file.fd = Fd(::open(file.part.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640));
    if (!file.fd) throw ReceiveError(io_problem("open", file.part), true);
    // Bytes past the last commit may be incomplete: resume from the commit.
    const std::uint64_t committed = std::min<std::uint64_t>(
        record.committed, fs::exists(file.part) ? fs::file_size(file.part) : 0);
    if (::ftruncate(file.fd.fd, static_cast<off_t>(committed)) != 0 ||
        ::lseek(file.fd.fd, static_cast<off_t>(committed), SEEK_SET) < 0) {
      throw ReceiveError(io_problem("truncate", file.part), true);
    }
    hash_prefix(file.part, committed, *file.hash);
    record.committed = committed;
    record.state = "sending";
    file.written = committed;
    file.record = record;
    store_.upsert_file(job_->job_id, record);
    remember(record);
    open_[index] = std::move(file);
    send_ack({{"type", "resume"}, {"index", index}, {"offset", committed}, {"done", false}});
  }

  void on_data(std::span<const std::uint8_t> body) {
    if (body.size() < kDataHeaderBytes) throw ReceiveError("malformed data message", false);
    std::uint32_t index = 0;
    std::uint64_t offset = 0;
    for (int i = 0; i < 4; ++i) index = (index << 8) | body[i];
    for (int i = 4; i < 12; ++i) offset = (offset << 8) | body[i];
    auto it = open_.find(static_cast<int>(index));
    if (it == open_.end()) throw ReceiveError("data for a file that is not open", false);
    OpenFile& f = it->second;
    if (offset != f.written) throw ReceiveError("data out of place for " + f.record.path, false);
    const auto bytes = body.subspan(kDataHeaderBytes);
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(f.fd.fd, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw ReceiveError(io_problem("write", final_path(f.record.path)), true);
      done += static_cast<std::size_t>(n);
    }
    f.hash->update(bytes);
    f.written += bytes.size();
    if (f.written - f.record.committed >= config_.commit_bytes) commit(f);
  }

  void on_end(const json& e) {
    const int index = e.at("index").get<int>();
    auto it = open_.find(index);
    if (it == open_.end()) throw ReceiveError("end of a file that is not open", false);
    OpenFile& f = it->second;
    commit(f);
    const std::uint64_t size = e.at("size").get<std::uint64_t>();
    const std::string expected = e.at("sha256").get<std::string>();
    const std::string got = f.hash->hex_digest();
    f.record.size = f.written;
    f.record.sha256 = got;
    if (size != f.written || got != expected) {
      const fs::path aside = config_.incoming_dir / ".failed" / job_->job_id / f.record.path;
      fs::create_directories(aside.parent_path());
      std::error_code ec;
      fs::rename(f.part, aside, ec);
      f.record.state = "failed";
      store_.upsert_file(job_->job_id, f.record);
      remember(f.record);
      open_.erase(it);
      throw ReceiveError("SHA-256 mismatch for " + f.record.path + ": the sender has " + expected +
                             " (" + std::to_string(size) + " bytes), received " + got + " (" +
                             std::to_string(f.record.size) +
                             " bytes); the received copy "
                             "is kept at " +
                             aside.string(),
                         false);
    }
    const fs::path target = final_path(f.record.path);
    fs::create_directories(target.parent_path());
    fs::rename(f.part, target);
    sync_directory(target.parent_path());
    f.record.state = "done";
    f.record.committed = f.written;
    store_.upsert_file(job_->job_id, f.record);
    remember(f.record);
    open_.erase(it);
    send_ack({{"type", "file_ok"}, {"index", index}, {"sha256", got}});
  }

  void on_manifest(std::span<const std::uint8_t> body) {
    const std::string text(body.begin(), body.end());
    std::istringstream lines(text);
    std::string line;
    std::size_t count = 0;
    while (std::getline(lines, line)) {
      if (line.empty()) continue;
      const auto gap = line.find("  ");
      if (gap != 64) throw ReceiveError("malformed hash manifest line", false);
      const std::string hash = line.substr(0, 64), path = line.substr(66);
      bool matched = false;
      for (const auto& f : job_->files)
        matched |= f.path == path && f.sha256 == hash && f.state == "done";
      if (!matched) throw ReceiveError("hash manifest does not match the received " + path, false);
      ++count;
    }
    const fs::path manifest = config_.incoming_dir / job_->specimen_id / (job_->job_id + ".sha256");
    {
      std::ofstream out(manifest, std::ios::binary | std::ios::trunc);
      out << text;
      if (!out.flush()) throw ReceiveError(io_problem("write", manifest), true);
    }
    FileRecord record{-1, manifest.filename().string(), text.size(), text.size(), "", "done"};
    record.state = "done";
    store_.upsert_file(job_->job_id, record);
    send_ack({{"type", "manifest_ok"}, {"files", count}});
  }

  void on_status(const json& s) {
    job_->analysis_state = s.value("analysis_state", job_->analysis_state);
    job_->analysis_size = s.value("analysis_size", job_->analysis_size);
    job_->analysis_time = s.value("analysis_time", job_->analysis_time);
    job_->transfer_size = s.value("transfer_size", job_->transfer_size);
    job_->data_type = s.value("data_type", job_->data_type);
    store_.update(*job_);
  }

  void on_bye() {
    if (!open_.empty()) throw ReceiveError("the sender finished with files still open", false);
    for (const auto& f : job_->files) {
      if (f.state != "done") throw ReceiveError("the sender finished before " + f.path, false);
    }
    job_->transfer_state = TransferState::completed;
    job_->completed_at = now_ms();
    job_->transferred = 0;
    for (const auto& f : job_->files) job_->transferred += f.size;
    job_->error.clear();
    store_.update(*job_);
    send_ack({{"type", "job_ok"}});
    done_ = true;
  }

  void commit(OpenFile& f) {
    if (f.written == f.record.committed) return;
    if (::fdatasync(f.fd.fd) != 0) throw ReceiveError(io_problem("sync", f.part), true);
    job_->transferred += f.written - f.record.committed;
    f.record.committed = f.written;
    f.last_commit = Clock::now();
    store_.upsert_file(job_->job_id, f.record);
    store_.update(*job_);
    remember(f.record);
    send_ack({{"type", "committed"}, {"index", f.record.index}, {"bytes", f.written}});
  }

  void commit_due(bool all) {
    for (auto& [index, f] : open_) {
      if (all || Clock::now() - f.last_commit > std::chrono::seconds(1)) commit(f);
    }
  }

  void commit_all() {
    if (!job_) return;
    try {
      commit_due(true);
    } catch (const std::exception&) {
      // The failure that follows says what went wrong; committed data stays committed.
    }
  }

  void check_abort() {
    if (!job_ || Clock::now() - last_abort_check_ < std::chrono::milliseconds(500)) return;
    last_abort_check_ = Clock::now();
    if (!store_.abort_requested(job_->job_id)) return;
    commit_all();
    send_ack({{"type", "abort"}, {"message", "aborted at the receiving site"}});
    job_->transfer_state = TransferState::aborted;
    job_->error = "aborted at the receiving site";
    store_.update(*job_);
    store_.clear_abort(job_->job_id);
    done_ = true;
  }

  void finish_with_error(const std::string& failure, bool resumable, bool interrupted) {
    const std::string message =
        "receiver: " + failure +
        (resumable && job_ ? "; committed data is kept, resume with `otp-transfer start " +
                                 job_->job_id + "` on the sending site"
                           : "");
    send_ack({{"type", "error"}, {"message", message}, {"resumable", resumable}});
    if (!job_ || job_->transfer_state == TransferState::aborted) return;
    job_->transfer_state = interrupted ? TransferState::interrupted : TransferState::failed;
    job_->error = message;
    store_.update(*job_);
  }

  void remember(const FileRecord& record) {
    for (auto& known : job_->files) {
      if (known.index == record.index) {
        known = record;
        return;
      }
    }
    job_->files.push_back(record);
  }

  fs::path final_path(const std::string& relative) const { return job_dir_ / relative; }

  static std::string io_problem(const char* what, const fs::path& path) {
    const int error = errno;
    std::string text =
        std::string("cannot ") + what + " " + path.string() + ": " + std::strerror(error);
    if (error == ENOSPC || error == EFBIG || error == EDQUOT)
      text += " (the receiving disk is full or a file size limit was hit; free space)";
    return text;
  }

  static void sync_directory(const fs::path& dir) {
    Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (d) ::fsync(d.fd);
  }

  JobStore& store_;
  const TransferConfig& config_;
  Fd socket_;
  const std::atomic<bool>& stopping_;
  std::unique_ptr<AckCodec> acks_;
  std::optional<Job> job_;
  fs::path job_dir_, partial_dir_;
  std::map<int, OpenFile> open_;
  bool done_ = false;
  Clock::time_point last_abort_check_ = Clock::now();
};

}  // namespace

void receive_connection(JobStore& store, const TransferConfig& config, Fd socket,
                        const std::atomic<bool>& stopping) {
  ReceiveSession(store, config, std::move(socket), stopping).run();
}

}  // namespace otpgate::transfer::detail

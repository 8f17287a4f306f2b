// SPDX-License-Identifier: LGPL-2.1-or-later
// The sending end: a job's files (or a run folder that is still being written) read,
// hashed and pushed through otpencrypt to the receiving site, resumed from whatever the
// receiver has committed, with a new key stream (fresh pad) on every attempt.
#include <fcntl.h>
#include <openssl/rand.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <poll.h>
#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "ack_codec.hpp"
#include "clock.hpp"
#include "job_lock.hpp"
#include "key_settings.hpp"
#include "names.hpp"
#include "otpgate/hex.hpp"
#include "parts.hpp"
#include "sha256.hpp"
#include "stream_messages.hpp"
#include "tcp_socket.hpp"
#include "transfer_pipeline.hpp"

namespace otpgate::transfer {

namespace fs = std::filesystem;
using namespace detail;

void detail::ignore_io_signals() {
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGXFSZ, SIG_IGN);
}

namespace {

// What a symbolic link inside a specimen folder may be: by default nothing (a link could
// reach any file this service can read); with transfer.follow_symlinks, a link to a
// regular file inside `inside` (data_root, or the specimen folder without one).
struct LinkPolicy {
  bool follow = false;
  fs::path inside;
};

LinkPolicy link_policy(const TransferConfig& config, const fs::path& root) {
  return {config.follow_symlinks, config.data_root.empty() ? root : config.data_root};
}

// Throws unless `link` (shown as `name`) may be sent under `policy`.
void check_link(const fs::path& link, const std::string& name, const LinkPolicy& policy) {
  if (!policy.follow) {
    throw std::runtime_error(
        name +
        " is a symbolic link: only regular files inside the specimen folder are sent (copy "
        "the file in, remove the link, or set transfer.follow_symlinks = true for links that "
        "stay inside data_root)");
  }
  std::error_code ec;
  const fs::path target = fs::canonical(link, ec);
  const fs::path inside = fs::canonical(policy.inside, ec);
  const fs::path relative = target.lexically_relative(inside);
  if (target.empty() || inside.empty() || relative.empty() || *relative.begin() == "..") {
    throw std::runtime_error(name + " is a symbolic link to " +
                             (target.empty() ? link.string() + " (dangling)" : target.string()) +
                             ", outside " + policy.inside.string() + ": refused");
  }
  if (!fs::is_regular_file(target)) {
    throw std::runtime_error(name + " is a symbolic link to " + target.string() +
                             ", which is not a regular file: only links to files are followed");
  }
}

// Relative names on the receiver keep each source's own name: /runs/S1/a.fq -> S1/a.fq.
std::vector<std::pair<fs::path, std::string>> enumerate(const std::vector<std::string>& sources,
                                                        const TransferConfig& config) {
  std::vector<std::pair<fs::path, std::string>> files;
  for (const auto& source : sources) {
    const fs::path root(source);
    if (fs::is_regular_file(root)) {
      files.emplace_back(root, root.filename().string());
      continue;
    }
    const LinkPolicy policy = link_policy(config, root);
    std::vector<fs::path> found;
    for (const auto& entry : fs::recursive_directory_iterator(root)) {
      if (entry.is_symlink()) {
        check_link(entry.path(),
                   (root.filename() / entry.path().lexically_relative(root)).generic_string(),
                   policy);
        found.push_back(entry.path());  // the iterator does not descend into links
        continue;
      }
      if (entry.is_regular_file()) found.push_back(entry.path());
    }
    std::sort(found.begin(), found.end());
    for (const auto& p : found) {
      files.emplace_back(p, (root.filename() / p.lexically_relative(root)).generic_string());
    }
  }
  return files;
}

// The job source (a specimen folder or file) that `relative` lies in.
fs::path root_of(const std::vector<std::string>& sources, const std::string& relative) {
  for (const auto& source : sources) {
    const fs::path root(source);
    const std::string name = root.filename().string();
    if (relative == name || relative.rfind(name + "/", 0) == 0) return root;
  }
  throw std::runtime_error("file " + relative + " is in none of the job's sources");
}

fs::path source_of(const std::vector<std::string>& sources, const std::string& relative) {
  return root_of(sources, relative).parent_path() / relative;
}

struct SourceFile {
  FileRecord record;
  fs::path path;
  Fd fd;
  std::uint64_t sent = 0;  // bytes pushed into the protected stream
  bool open = false;       // announced and resumed in this attempt
  bool ended = false;      // end sent in this attempt
  std::unique_ptr<Sha256> hash;
};

enum class Outcome { completed, aborted, cancelled, receiver_error, link_error };

class SendSession {
 public:
  SendSession(JobStore& store, const TransferConfig& config, Job job, const SendOptions& options)
      : store_(store), config_(config), job_(std::move(job)), options_(options) {
    for (const auto& f : job_.files) {
      if (f.index < 0) continue;
      SourceFile s;
      s.record = f;
      s.path = source_of(job_.sources, f.path);
      files_.push_back(std::move(s));
    }
  }

  Job run() {
    if (!config_.peer_transfer) {
      return finish(TransferState::failed,
                    "peer.transfer is not set in the config (the receiving site's "
                    "otp-transfer serve address, \"host:port\")");
    }
    job_.transfer_state = TransferState::running;
    job_.error.clear();
    store_.update(job_);
    store_.clear_abort(job_.job_id);
    std::string last_error;
    for (int attempt = 1; attempt <= config_.max_attempts; ++attempt) {
      std::string error;
      Outcome outcome;
      try {
        outcome = attempt_once(error);
      } catch (const std::exception& e) {
        outcome = Outcome::link_error;
        error = e.what();
      }
      switch (outcome) {
        case Outcome::completed:
          job_.completed_at = now_ms();
          return finish(TransferState::completed, "");
        case Outcome::aborted:
          return finish(TransferState::aborted, error.empty() ? "aborted" : error);
        case Outcome::cancelled:
          return finish(TransferState::interrupted,
                        "stopped before completion; resume with `otp-transfer "
                        "start " +
                            job_.job_id + "`");
        case Outcome::receiver_error:
          return finish(TransferState::failed, error);
        case Outcome::link_error:
          break;
      }
      last_error = error;
      std::fprintf(stderr, "otp-transfer: job %s, attempt %d: %s\n", job_.job_id.c_str(), attempt,
                   error.c_str());
      if (stop_requested()) break;
      job_.error = "attempt " + std::to_string(attempt) + " of " +
                   std::to_string(config_.max_attempts) + ": " + error;
      store_.update(job_);
      if (attempt < config_.max_attempts) {
        const auto pause = std::chrono::seconds(std::min(1 << (attempt - 1), 16));
        for (auto until = Clock::now() + pause; Clock::now() < until && !stop_requested();)
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    if (options_.cancel && *options_.cancel) {
      return finish(
          TransferState::interrupted,
          "stopped before completion; resume with `otp-transfer start " + job_.job_id + "`");
    }
    return finish(TransferState::failed,
                  last_error + "; gave up after " + std::to_string(config_.max_attempts) +
                      " attempts, resume with `otp-transfer start " + job_.job_id + "`");
  }

 private:
  Job finish(TransferState state, const std::string& error) {
    report(true);  // first: it may still note a change of the key-wait state
    job_.transfer_state = state;
    job_.error = error;
    if (state == TransferState::aborted || stop_requested()) store_.clear_abort(job_.job_id);
    store_.update(job_);
    return *store_.get(job_.job_id);
  }

  bool stop_requested() {
    if (options_.cancel && *options_.cancel) return true;
    if (Clock::now() - last_abort_check_ > std::chrono::milliseconds(300)) {
      last_abort_check_ = Clock::now();
      abort_seen_ = abort_seen_ || store_.abort_requested(job_.job_id);
    }
    return abort_seen_;
  }

  Outcome attempt_once(std::string& error) {
    struct Teardown {
      SendSession& s;
      ~Teardown() { s.teardown(); }
    } teardown{*this};
    socket_ = connect_tcp(*config_.peer_transfer, std::chrono::seconds(5));
    // A key supply per attempt, never kept across attempts or jobs: the receiver is new
    // (a new session, maybe a restarted process) and has seen none of the announcements
    // an earlier supply made, so a supply going on would send pad it cannot verify until
    // a resync (the call key lanes' bug; a shared supply would need begin_stream()).
    // This one starts at the journal, on an epoch boundary: its first announcement is
    // verifiable from its own keys.
    keys::KeySupplyConfig k;
    k.role = keys::SaeRole::master;
    k.peer_sae_id = config_.peer_sae_id;
    k.journal = journal_path(config_, job_.job_id);
    fs::create_directories(k.journal.parent_path());
    k.ring_bytes = config_.key_ring_bytes;
    k.log = keys::stderr_log_sink(keys::LogLevel::warning);
    supply_ = std::make_unique<keys::KeySupply>(kme_client_config(config_), k);
    supply_->start();
    pipeline_ = std::make_unique<EncryptPipeline>(*supply_, socket_.fd, job_.method == Method::aes,
                                                  config_.record_size, config_.aes_rekey_records);

    std::array<std::uint8_t, kAckKeyBytes> ack_key{};
    if (RAND_bytes(ack_key.data(), ack_key.size()) != 1) throw std::runtime_error("no randomness");
    acks_ = std::make_unique<AckCodec>(ack_key);
    start_ack_reader();
    std::string key_hex = to_hex(ack_key);
    OPENSSL_cleanse(ack_key.data(), ack_key.size());
    std::vector<std::uint8_t> out;
    append_json_message(
        out, MessageType::hello,
        {{"protocol", 1}, {"site", config_.site_name}, {"ack_key", key_hex}, {"job", job_json()}});
    OPENSSL_cleanse(key_hex.data(), key_hex.size());
    if (!send(out)) return link_failure(error);

    // The receiver answers once it holds keys for the stream (first KME round trips).
    json hello;
    if (auto o = await("hello", -1, std::chrono::seconds(120), hello, error)) return *o;
    if (hello.value("type", "") == "job_ok") return Outcome::completed;

    for (auto& f : files_) {
      f.open = f.ended = false;
      f.fd = Fd();
    }
    if (job_.watch) {
      if (auto o = follow_run(error)) return *o;
    } else {
      for (auto& f : files_) {
        if (auto o = send_whole_file(f, error)) return *o;
      }
    }
    // The hash manifest: a record of its own, checked by the receiver against its hashes.
    std::string manifest;
    for (const auto& f : files_) manifest += f.record.sha256 + "  " + f.record.path + "\n";
    out.clear();
    append_message(out, MessageType::manifest,
                   {reinterpret_cast<const std::uint8_t*>(manifest.data()), manifest.size()});
    append_json_message(out, MessageType::bye, {{"files", files_.size()}});
    if (!send(out)) return link_failure(error);
    json done;
    if (auto o = await("job_ok", -1, std::chrono::seconds(600), done, error)) return *o;
    pipeline_->finish(std::chrono::seconds(30));
    return Outcome::completed;
  }

  // Announces a file, learns how much the receiver already holds, hashes that part here.
  std::optional<Outcome> open_file(SourceFile& f, std::string& error) {
    // Checked again as it is opened: a file may have become a link since the job began.
    if (fs::is_symlink(f.path)) {
      try {
        check_link(f.path, f.record.path,
                   link_policy(config_, root_of(job_.sources, f.record.path)));
      } catch (const std::exception& e) {
        error = e.what();
        return Outcome::receiver_error;
      }
    }
    f.fd = Fd(::open(f.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!f.fd) {
      error = f.path.string() + ": cannot be read: " + std::strerror(errno);
      return Outcome::receiver_error;
    }
    std::vector<std::uint8_t> out;
    append_json_message(
        out, MessageType::file,
        {{"index", f.record.index}, {"path", f.record.path}, {"size", f.record.size}});
    if (!send(out)) return link_failure(error);
    json resume;
    if (auto o = await("resume", f.record.index, std::chrono::seconds(120), resume, error))
      return o;
    const std::uint64_t offset = resume.value("offset", std::uint64_t(0));
    f.hash = std::make_unique<Sha256>();
    if (resume.value("done", false)) {
      hash_prefix(f.path, offset, *f.hash);
      const std::string ours = f.hash->hex_digest();
      if (ours != resume.value("sha256", "")) {
        error = "the receiver holds " + f.record.path + " with SHA-256 " +
                resume.value("sha256", "") + " but it is " + ours + " here";
        return Outcome::receiver_error;
      }
      f.record.sha256 = ours;
      f.record.committed = f.record.size = offset;
      f.record.state = "done";
      f.ended = true;
      store_.upsert_file(job_.job_id, f.record);
      return std::nullopt;
    }
    const std::uint64_t size_now = file_size(f);
    if (offset > size_now) {
      error = f.path.string() + " is shorter than the " + std::to_string(offset) +
              " bytes the receiver already holds (was it replaced?)";
      return Outcome::receiver_error;
    }
    hash_prefix(f.path, offset, *f.hash);
    if (::lseek(f.fd.fd, static_cast<off_t>(offset), SEEK_SET) < 0) {
      error = f.path.string() + ": cannot seek: " + std::strerror(errno);
      return Outcome::receiver_error;
    }
    f.sent = offset;
    f.record.committed = offset;
    f.record.state = "sending";
    f.open = true;
    store_.upsert_file(job_.job_id, f.record);
    return std::nullopt;
  }

  std::uint64_t file_size(const SourceFile& f) const {
    struct stat st {};
    if (::fstat(f.fd.fd, &st) != 0) return 0;
    return static_cast<std::uint64_t>(st.st_size);
  }

  // Pushes the file's bytes from `sent` up to `limit` (what exists now).
  std::optional<Outcome> stream_bytes(SourceFile& f, std::uint64_t limit, std::string& error) {
    constexpr std::size_t kChunk = 1u << 20;
    std::vector<std::uint8_t> buffer(kMessageHeaderBytes + kDataHeaderBytes + kChunk);
    std::uint8_t* data = buffer.data() + kMessageHeaderBytes + kDataHeaderBytes;
    while (f.sent < limit) {
      const std::size_t want =
          static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, limit - f.sent));
      const ssize_t n = ::read(f.fd.fd, data, want);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        error = f.path.string() + ": read error: " + std::strerror(errno);
        return Outcome::receiver_error;
      }
      if (n == 0) break;  // shorter than it was a moment ago: checked at the end
      std::vector<std::uint8_t> head;
      append_data_header(head, static_cast<std::uint32_t>(f.record.index), f.sent,
                         static_cast<std::size_t>(n));
      std::copy(head.begin(), head.end(), buffer.begin());
      f.hash->update({data, static_cast<std::size_t>(n)});
      if (!send_raw({buffer.data(), head.size() + static_cast<std::size_t>(n)}))
        return link_failure(error);
      f.sent += static_cast<std::uint64_t>(n);
      if (auto o = poll_acks(error)) return o;
      if (stop_requested()) return stop_outcome();
      report(false);
    }
    return std::nullopt;
  }

  std::optional<Outcome> end_file(SourceFile& f, std::string& error) {
    f.record.size = f.sent;
    f.record.sha256 = f.hash->hex_digest();
    std::vector<std::uint8_t> out;
    append_json_message(out, MessageType::end,
                        {{"index", f.record.index}, {"size", f.sent}, {"sha256", f.record.sha256}});
    if (!send(out)) return link_failure(error);
    f.ended = true;
    f.fd = Fd();
    store_.upsert_file(job_.job_id, f.record);
    return std::nullopt;
  }

  std::optional<Outcome> send_whole_file(SourceFile& f, std::string& error) {
    if (f.record.state == "done") {
      f.ended = true;
      return std::nullopt;
    }
    if (auto o = open_file(f, error)) return o;
    if (f.ended) return std::nullopt;  // the receiver already had all of it
    if (auto o = stream_bytes(f, f.record.size, error)) return o;
    if (f.sent != f.record.size || file_size(f) != f.record.size) {
      error = f.path.string() + " changed size while being sent (" + std::to_string(f.record.size) +
              " bytes when the job was made, now " + std::to_string(file_size(f)) +
              "); use `otp-transfer watch` for files that grow";
      return Outcome::receiver_error;
    }
    return end_file(f, error);
  }

  // watch: new files are announced as they appear and their bytes sent as they grow; a
  // completion marker ends the run: one last pass, then every file is ended.
  std::optional<Outcome> follow_run(std::string& error) {
    const fs::path root(job_.sources.at(0));
    Fd inotify(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
    std::set<fs::path> watched;
    auto watch_tree = [&] {
      if (!inotify) return;
      std::error_code ec;
      std::vector<fs::path> dirs{root};
      for (auto it = fs::recursive_directory_iterator(root, ec);
           !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (it->is_directory()) dirs.push_back(it->path());
      }
      for (const auto& d : dirs) {
        if (watched.insert(d).second) {
          ::inotify_add_watch(inotify.fd, d.c_str(),
                              IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO);
        }
      }
    };
    while (true) {
      watch_tree();
      const bool complete = marker_present(root);  // before the scan: nothing is missed
      if (auto o = discover(root, error)) return o;
      for (auto& f : files_) {
        if (f.ended) continue;
        if (!f.open) {
          if (auto o = open_file(f, error)) return o;
          if (f.ended) continue;
        }
        const std::uint64_t size = file_size(f);
        if (size < f.sent) {
          error = f.path.string() + " shrank while the run was being written (" +
                  std::to_string(f.sent) + " bytes sent, now " + std::to_string(size) + ")";
          return Outcome::receiver_error;
        }
        if (auto o = stream_bytes(f, size, error)) return o;
      }
      update_analysis(complete);
      if (complete) {
        for (auto& f : files_) {
          if (f.ended) continue;
          if (auto o = stream_bytes(f, file_size(f), error)) return o;
          if (auto o = end_file(f, error)) return o;
        }
        return std::nullopt;
      }
      if (!pipeline_->flush()) return link_failure(error);
      if (auto o = poll_acks(error)) return o;
      if (stop_requested()) return stop_outcome();
      report(false);
      // Wake on close-after-write / new files, or every half second regardless.
      pollfd p{inotify.fd, POLLIN, 0};
      ::poll(&p, inotify ? 1 : 0, 500);
      if (p.revents & POLLIN) {
        std::array<char, 8192> events;
        while (::read(inotify.fd, events.data(), events.size()) > 0) {
        }
      }
    }
  }

  bool marker_present(const fs::path& root) const {
    for (const auto& m : config_.completion_markers) {
      if (fs::exists(root / m)) return true;
    }
    return false;
  }

  std::optional<Outcome> discover(const fs::path& root, std::string&) {
    std::set<std::string> known;
    for (const auto& f : files_) known.insert(f.record.path);
    int next = 0;
    for (const auto& f : files_) next = std::max(next, f.record.index + 1);
    for (auto& [path, relative] : enumerate({root.string()}, config_)) {
      if (known.contains(relative)) continue;
      SourceFile s;
      s.record = FileRecord{next++, relative, 0, 0, "", "pending"};
      s.path = path;
      store_.upsert_file(job_.job_id, s.record);
      files_.push_back(std::move(s));
    }
    return std::nullopt;
  }

  void update_analysis(bool complete) {
    std::uint64_t total = 0;
    std::vector<std::string> names;
    for (auto& f : files_) {
      std::error_code ec;
      const auto size = fs::file_size(f.path, ec);
      total += ec ? f.sent : size;
      names.push_back(f.record.path);
    }
    const std::string state = complete ? "complete" : "sequencing";
    if (state == job_.analysis_state && total == job_.analysis_size) return;
    job_.analysis_state = state;
    job_.analysis_size = total;
    job_.transfer_size = total;
    job_.data_type = data_type_of(names);
    if (complete) job_.analysis_time = now_ms();
    store_.update(job_);
    std::vector<std::uint8_t> out;
    append_json_message(out, MessageType::status,
                        {{"analysis_state", job_.analysis_state},
                         {"analysis_size", job_.analysis_size},
                         {"analysis_time", job_.analysis_time},
                         {"transfer_size", job_.transfer_size},
                         {"data_type", job_.data_type}});
    send(out);
  }

  json job_json() const {
    return {{"job_id", job_.job_id},
            {"specimen_id", job_.specimen_id},
            {"data_type", job_.data_type},
            {"method", to_string(job_.method)},
            {"analysis_state", job_.analysis_state},
            {"analysis_size", job_.analysis_size},
            {"analysis_time", job_.analysis_time},
            {"transfer_size", job_.transfer_size}};
  }

  // ---- the stream

  // Pushing waits while the element waits for key; it gives up when the receiver has
  // closed the connection or the job is stopped.
  bool send_raw(std::span<const std::uint8_t> bytes) {
    return pipeline_->push(bytes, [this] {
      {
        std::lock_guard lock(ack_mutex_);
        if (ack_closed_) return false;
      }
      report(false);
      return !stop_requested();
    });
  }
  bool send(std::span<const std::uint8_t> bytes) { return send_raw(bytes) && pipeline_->flush(); }

  // The stream broke: if the receiver said why before closing, that is the outcome.
  Outcome link_failure(std::string& error) {
    if (stop_requested() && !(options_.cancel && *options_.cancel) && socket_) {
      return stop_outcome();  // the push gave up because of the abort
    }
    {
      std::unique_lock lock(ack_mutex_);
      ack_cv_.wait_for(lock, std::chrono::seconds(2), [&] { return ack_closed_; });
    }
    if (auto o = poll_acks(error); o && *o != Outcome::link_error) return *o;
    std::string why = pipeline_ ? pipeline_->error() : "";
    if (why.empty()) why = "connection lost";
    error = "link to " + config_.peer_transfer->host + ":" +
            std::to_string(config_.peer_transfer->port) + " failed: " + why;
    return Outcome::link_error;
  }

  Outcome stop_outcome() {
    if (options_.cancel && *options_.cancel) return Outcome::cancelled;
    std::vector<std::uint8_t> out;
    append_json_message(out, MessageType::abort, {{"message", "aborted at the sending site"}});
    // The abort follows the data already queued (at most a queue's worth).
    const auto until = Clock::now() + std::chrono::seconds(10);
    if (pipeline_->push(out, [until] { return Clock::now() < until; })) pipeline_->flush();
    pipeline_->finish(std::chrono::seconds(10));
    return Outcome::aborted;
  }

  // ---- acknowledgements

  void start_ack_reader() {
    ack_closed_ = false;
    ack_thread_ = std::thread([this, fd = socket_.fd] {
      while (true) {
        auto frame = read_ack_frame(fd, std::chrono::hours(24));
        std::lock_guard lock(ack_mutex_);
        if (!frame) {
          ack_closed_ = true;
          ack_cv_.notify_all();
          return;
        }
        auto message = acks_->open(*frame);
        if (!message) {
          ack_forged_ = true;  // not from the receiver that holds the stream: stop
          ack_closed_ = true;
          ack_cv_.notify_all();
          return;
        }
        ack_queue_.push_back(std::move(*message));
        ack_cv_.notify_all();
      }
    });
  }

  void teardown() {
    if (socket_) {
      // Close our side gently (FIN after everything written) and keep reading until the
      // receiver closes: closing with unread acknowledgements would send a reset, and a
      // reset makes the receiver drop stream bytes it has not read yet (an abort, the
      // final record).
      pipeline_.reset();
      ::shutdown(socket_.fd, SHUT_WR);
      std::unique_lock lock(ack_mutex_);
      ack_cv_.wait_for(lock, std::chrono::seconds(5), [&] { return ack_closed_; });
      lock.unlock();
      ::shutdown(socket_.fd, SHUT_RDWR);
    }
    if (ack_thread_.joinable()) ack_thread_.join();
    pipeline_.reset();
    if (supply_) {
      last_key_available_ = supply_->stats().bytes_available;
      supply_.reset();
    }
    socket_ = Fd();
    ack_queue_.clear();
  }

  // Handles one acknowledgement; an outcome when it ends the attempt.
  std::optional<Outcome> handle_ack(const json& a, std::string& error) {
    const std::string type = a.value("type", "");
    if (type == "committed") {
      for (auto& f : files_) {
        if (f.record.index == a.value("index", -1)) {
          f.record.committed = a.value("bytes", f.record.committed);
          store_.upsert_file(job_.job_id, f.record);
        }
      }
      refresh_transferred();
    } else if (type == "file_ok") {
      for (auto& f : files_) {
        if (f.record.index != a.value("index", -1)) continue;
        if (a.value("sha256", "") != f.record.sha256) {
          error = "the receiver's SHA-256 of " + f.record.path + " differs from ours";
          return Outcome::receiver_error;
        }
        f.record.state = "done";
        f.record.committed = f.record.size;
        store_.upsert_file(job_.job_id, f.record);
      }
      refresh_transferred();
    } else if (type == "error") {
      error = a.value("message", "the receiver failed");
      return Outcome::receiver_error;  // not retried blindly; the message says what to do
    } else if (type == "abort") {
      error = a.value("message", "aborted at the receiving site");
      return Outcome::aborted;
    }
    return std::nullopt;
  }

  std::optional<Outcome> poll_acks(std::string& error) {
    std::deque<json> ready;
    bool closed = false;
    {
      std::lock_guard lock(ack_mutex_);
      ready.swap(ack_queue_);
      closed = ack_closed_;
    }
    for (const auto& a : ready) {
      if (auto o = handle_ack(a, error)) return o;
    }
    if (closed) return closed_outcome(error);
    return std::nullopt;
  }

  Outcome closed_outcome(std::string& error) {
    if (ack_forged_) {
      error = "an acknowledgement failed authentication (not from the receiving site)";
      return Outcome::link_error;
    }
    error = "the receiving site closed the connection";
    return Outcome::link_error;
  }

  // Waits for an acknowledgement of `type` (for file `index`, or any when -1).
  std::optional<Outcome> await(const std::string& type, int index, std::chrono::seconds timeout,
                               json& found, std::string& error) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      std::deque<json> ready;
      bool closed = false;
      {
        std::unique_lock lock(ack_mutex_);
        ack_cv_.wait_for(lock, std::chrono::milliseconds(250),
                         [&] { return !ack_queue_.empty() || ack_closed_; });
        ready.swap(ack_queue_);
        closed = ack_closed_;
      }
      for (std::size_t i = 0; i < ready.size(); ++i) {
        const json& a = ready[i];
        const std::string t = a.value("type", "");
        if ((t == type || (type == "hello" && t == "job_ok")) &&
            (index < 0 || a.value("index", -2) == index)) {
          found = a;
          std::lock_guard lock(ack_mutex_);  // keep what came after it, in order
          for (std::size_t j = ready.size(); j > i + 1; --j) ack_queue_.push_front(ready[j - 1]);
          return std::nullopt;
        }
        if (auto o = handle_ack(a, error)) return o;
      }
      if (closed) return closed_outcome(error);
      const std::string stream_error = pipeline_->error();
      if (!stream_error.empty()) return link_failure(error);
      if (stop_requested()) return stop_outcome();
      report(false);
    }
    error = "the receiving site did not answer (" + type + ") within " +
            std::to_string(timeout.count()) + " s";
    return Outcome::link_error;
  }

  void refresh_transferred() {
    std::uint64_t total = 0;
    for (const auto& f : files_) total += f.record.committed;
    job_.transferred = total;
    if (Clock::now() - last_job_write_ > std::chrono::milliseconds(500)) {
      store_.update(job_);
      last_job_write_ = Clock::now();
    }
  }

  void report(bool force) {
    if (!options_.on_progress) return;
    const auto now = Clock::now();
    if (!force && now - last_report_ < std::chrono::milliseconds(250)) return;
    Progress p;
    for (const auto& f : files_) {
      p.bytes_done += f.record.committed;
      p.bytes_total += std::max(f.record.size, f.sent);
      if (f.open && !f.ended) p.file = f.record.path;
    }
    p.bytes_total = std::max(p.bytes_total, job_.transfer_size);
    const double dt = std::chrono::duration<double>(now - last_report_).count();
    if (last_report_ != Clock::time_point{} && dt > 0) {
      const double rate = double(p.bytes_done - std::min(p.bytes_done, last_done_)) / dt;
      rate_ = rate_ == 0 ? rate : 0.7 * rate_ + 0.3 * rate;
    }
    p.rate_bytes_per_s = rate_;
    if (supply_) {
      const auto s = supply_->stats();
      p.key_available = s.bytes_available;
      p.key_rate_bytes_per_s = s.consumption_bytes_per_s;
      p.waiting_for_key = pipeline_ && pipeline_->waiting_for_key();  // the element says so
    } else {
      p.key_available = last_key_available_;
    }
    p.sequencing = job_.watch && job_.analysis_state != "complete";
    if (p.waiting_for_key != waiting_for_key_) {
      waiting_for_key_ = p.waiting_for_key;
      job_.transfer_state =
          waiting_for_key_ ? TransferState::waiting_for_key : TransferState::running;
      store_.update(job_);
    }
    last_report_ = now;
    last_done_ = p.bytes_done;
    options_.on_progress(p);
  }

  JobStore& store_;
  const TransferConfig& config_;
  Job job_;
  const SendOptions& options_;
  std::vector<SourceFile> files_;
  Fd socket_;
  std::unique_ptr<keys::KeySupply> supply_;
  std::unique_ptr<EncryptPipeline> pipeline_;
  std::unique_ptr<AckCodec> acks_;
  std::thread ack_thread_;
  std::mutex ack_mutex_;
  std::condition_variable ack_cv_;
  std::deque<json> ack_queue_;
  bool ack_closed_ = false;
  bool ack_forged_ = false;
  bool abort_seen_ = false;
  bool waiting_for_key_ = false;
  Clock::time_point last_abort_check_{};
  Clock::time_point last_report_{};
  Clock::time_point last_job_write_{};
  std::uint64_t last_done_ = 0;
  std::uint64_t last_key_available_ = 0;
  double rate_ = 0;
};

}  // namespace

Job create_send_job(JobStore& store, const TransferConfig& config, const std::string& specimen_id,
                    const std::vector<fs::path>& paths, Method method, bool watch) {
  if (!valid_identifier(specimen_id)) throw std::runtime_error(specimen_id_problem(specimen_id));
  if (paths.empty()) throw std::runtime_error("nothing to send: give at least one file or folder");
  if (watch && paths.size() != 1) throw std::runtime_error("watch follows exactly one run folder");
  Job job;
  std::set<std::string> names;
  for (const auto& p : paths) {
    std::error_code ec;
    const fs::path absolute = fs::canonical(p, ec);
    if (ec) throw std::runtime_error(p.string() + ": no such file or folder");
    if (watch ? !fs::is_directory(absolute)
              : !fs::is_regular_file(absolute) && !fs::is_directory(absolute)) {
      throw std::runtime_error(p.string() + (watch ? ": not a folder (watch follows a run folder)"
                                                   : ": not a regular file or folder"));
    }
    if (::access(absolute.c_str(), R_OK) != 0)
      throw std::runtime_error(p.string() + ": not readable by this user");
    if (!names.insert(absolute.filename().string()).second) {
      throw std::runtime_error(p.string() + ": another source has the same name " +
                               absolute.filename().string() + " (send them in separate jobs)");
    }
    job.sources.push_back(absolute.string());
  }
  job.job_id = new_job_id();
  job.direction = "send";
  job.specimen_id = specimen_id;
  job.folder =
      job.sources.size() == 1 ? job.sources[0] : fs::path(job.sources[0]).parent_path().string();
  job.created_at = now_ms();
  job.method = method;
  job.peer = config.peer_sae_id;
  job.watch = watch;
  job.transfer_state = TransferState::queued;
  std::vector<std::string> relative;
  std::vector<FileRecord> files;
  if (!watch) {
    std::int64_t newest = 0;
    for (const auto& [path, rel] : enumerate(job.sources, config)) {
      const auto size = fs::file_size(path);
      files.push_back(FileRecord{static_cast<int>(files.size()), rel, size, 0, "", "pending"});
      relative.push_back(rel);
      job.transfer_size += size;
      struct stat st {};
      if (::stat(path.c_str(), &st) == 0) {
        newest = std::max<std::int64_t>(
            newest, std::int64_t(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1000000);
      }
    }
    if (files.empty()) throw std::runtime_error("nothing to send: the folder holds no files");
    job.analysis_state = "complete";
    job.analysis_size = job.transfer_size;
    job.analysis_time = newest;
  } else {
    job.analysis_state = "sequencing";
  }
  job.data_type = watch ? "run" : data_type_of(relative);
  store.insert(job);
  for (const auto& f : files) store.upsert_file(job.job_id, f);
  return *store.get(job.job_id);
}

Job run_send_job(JobStore& store, const TransferConfig& config, const std::string& job_id,
                 const SendOptions& options) {
  ignore_io_signals();
  auto job = store.get(job_id);
  if (!job) throw std::runtime_error("no job " + job_id + " here (see `otp-transfer jobs`)");
  if (job->direction != "send") {
    throw std::runtime_error("job " + job_id +
                             " was received here; it can only be started on the sending site");
  }
  if (job->transfer_state == TransferState::completed) return *job;
  const SendJobLock running(config, job_id);
  return SendSession(store, config, std::move(*job), options).run();
}

}  // namespace otpgate::transfer

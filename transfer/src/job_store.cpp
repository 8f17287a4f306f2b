// SPDX-License-Identifier: LGPL-2.1-or-later
// The job database: SQLite in WAL mode so the service and a CLI run can share it.
#include <openssl/rand.h>
#include <sqlite3.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "otpgate/transfer.hpp"

namespace otpgate::transfer {

namespace {

struct DbClose {
  void operator()(sqlite3* db) const { sqlite3_close(db); }
};
struct StmtFinalize {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY,
  direction TEXT NOT NULL,
  specimen_id TEXT NOT NULL,
  folder TEXT NOT NULL,
  data_type TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  analysis_state TEXT NOT NULL,
  analysis_size INTEGER NOT NULL DEFAULT 0,
  analysis_time INTEGER NOT NULL DEFAULT 0,
  transfer_state TEXT NOT NULL,
  transfer_size INTEGER NOT NULL DEFAULT 0,
  transferred INTEGER NOT NULL DEFAULT 0,
  completed_at INTEGER NOT NULL DEFAULT 0,
  method TEXT NOT NULL,
  peer TEXT NOT NULL,
  error TEXT NOT NULL DEFAULT '',
  watch INTEGER NOT NULL DEFAULT 0,
  sources TEXT NOT NULL DEFAULT '[]',
  abort_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS files (
  job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  path TEXT NOT NULL,
  size INTEGER NOT NULL DEFAULT 0,
  committed INTEGER NOT NULL DEFAULT 0,
  sha256 TEXT NOT NULL DEFAULT '',
  state TEXT NOT NULL,
  PRIMARY KEY (job_id, idx)
);
)sql";

constexpr const char* kJobColumns =
    "job_id, direction, specimen_id, folder, data_type, created_at, analysis_state, "
    "analysis_size, analysis_time, transfer_state, transfer_size, transferred, completed_at, "
    "method, peer, error, watch, sources";

}  // namespace

struct JobStore::Impl {
  std::unique_ptr<sqlite3, DbClose> db;
  std::string path;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("job database " + path + ": " + what + ": " +
                             sqlite3_errmsg(db.get()));
  }

  void exec(const char* sql) const {
    char* message = nullptr;
    if (sqlite3_exec(db.get(), sql, nullptr, nullptr, &message) != SQLITE_OK) {
      std::string text = message ? message : "error";
      sqlite3_free(message);
      throw std::runtime_error("job database " + path + ": " + text);
    }
  }

  // A prepared statement with positional binds; text, integers.
  class Statement {
   public:
    Statement(const Impl& owner, const std::string& sql) : owner_(owner) {
      sqlite3_stmt* s = nullptr;
      if (sqlite3_prepare_v2(owner.db.get(), sql.c_str(), -1, &s, nullptr) != SQLITE_OK)
        owner.fail("preparing a query");
      stmt_.reset(s);
    }
    Statement& text(std::string_view v) {
      // A null pointer would bind NULL, not "" (the columns are NOT NULL).
      sqlite3_bind_text(stmt_.get(), ++at_, v.empty() ? "" : v.data(), static_cast<int>(v.size()),
                        SQLITE_TRANSIENT);
      return *this;
    }
    Statement& integer(std::int64_t v) {
      sqlite3_bind_int64(stmt_.get(), ++at_, v);
      return *this;
    }
    bool step() {
      const int rc = sqlite3_step(stmt_.get());
      if (rc == SQLITE_ROW) return true;
      if (rc != SQLITE_DONE) owner_.fail("running a query");
      return false;
    }
    std::string column_text(int i) const {
      const auto* t = sqlite3_column_text(stmt_.get(), i);
      return t ? reinterpret_cast<const char*>(t) : "";
    }
    std::int64_t column_int(int i) const { return sqlite3_column_int64(stmt_.get(), i); }
    int changes() const { return sqlite3_changes(owner_.db.get()); }

   private:
    const Impl& owner_;
    std::unique_ptr<sqlite3_stmt, StmtFinalize> stmt_;
    int at_ = 0;
  };

  // A column's word as the enum it names; any other text is an error naming the job.
  template <typename Enum>
  Enum word(const Job& j, const char* column, const std::string& text) const {
    if (const auto value = from_string<Enum>(text)) return *value;
    throw std::runtime_error("job database " + path + ": job " + j.job_id + " has an unknown " +
                             column + " \"" + text.substr(0, 100) +
                             "\" (written by a newer otp-transfer, or edited by hand?)");
  }

  Job job_from(const Statement& s) const {
    Job j;
    j.job_id = s.column_text(0);
    j.direction = s.column_text(1);
    j.specimen_id = s.column_text(2);
    j.folder = s.column_text(3);
    j.data_type = s.column_text(4);
    j.created_at = s.column_int(5);
    j.analysis_state = s.column_text(6);
    j.analysis_size = static_cast<std::uint64_t>(s.column_int(7));
    j.analysis_time = s.column_int(8);
    j.transfer_state = word<TransferState>(j, "transfer_state", s.column_text(9));
    j.transfer_size = static_cast<std::uint64_t>(s.column_int(10));
    j.transferred = static_cast<std::uint64_t>(s.column_int(11));
    j.completed_at = s.column_int(12);
    j.method = word<Method>(j, "method", s.column_text(13));
    j.peer = s.column_text(14);
    j.error = s.column_text(15);
    j.watch = s.column_int(16) != 0;
    try {
      j.sources = nlohmann::json::parse(s.column_text(17)).get<std::vector<std::string>>();
    } catch (const std::exception&) {
      j.sources.clear();
    }
    return j;
  }
};

JobStore::JobStore(const std::filesystem::path& database) : impl_(std::make_unique<Impl>()) {
  impl_->path = database.string();
  std::error_code ec;
  std::filesystem::create_directories(database.parent_path(), ec);
  sqlite3* db = nullptr;
  const int rc =
      sqlite3_open_v2(impl_->path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  impl_->db.reset(db);
  if (rc != SQLITE_OK) {
    throw std::runtime_error("job database " + impl_->path + " cannot be opened (" +
                             (db ? sqlite3_errmsg(db) : "out of memory") +
                             "); check site.state_dir is writable");
  }
  sqlite3_busy_timeout(db, 10000);  // the service and a CLI run share the file
  impl_->exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;");
  impl_->exec(kSchema);
}

JobStore::~JobStore() = default;

void JobStore::insert(const Job& j) {
  Impl::Statement s(*impl_, std::string("INSERT INTO jobs (") + kJobColumns +
                                ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
  s.text(j.job_id)
      .text(j.direction)
      .text(j.specimen_id)
      .text(j.folder)
      .text(j.data_type)
      .integer(j.created_at)
      .text(j.analysis_state)
      .integer(static_cast<std::int64_t>(j.analysis_size))
      .integer(j.analysis_time)
      .text(to_string(j.transfer_state))
      .integer(static_cast<std::int64_t>(j.transfer_size))
      .integer(static_cast<std::int64_t>(j.transferred))
      .integer(j.completed_at)
      .text(to_string(j.method))
      .text(j.peer)
      .text(j.error)
      .integer(j.watch ? 1 : 0)
      .text(nlohmann::json(j.sources).dump());
  s.step();
}

std::optional<Job> JobStore::get(const std::string& job_id) const {
  Impl::Statement s(*impl_, std::string("SELECT ") + kJobColumns + " FROM jobs WHERE job_id = ?");
  s.text(job_id);
  if (!s.step()) return std::nullopt;
  Job j = impl_->job_from(s);
  Impl::Statement f(*impl_,
                    "SELECT idx, path, size, committed, sha256, state FROM files WHERE job_id = ? "
                    "ORDER BY idx");
  f.text(job_id);
  while (f.step()) {
    j.files.push_back(FileRecord{static_cast<int>(f.column_int(0)), f.column_text(1),
                                 static_cast<std::uint64_t>(f.column_int(2)),
                                 static_cast<std::uint64_t>(f.column_int(3)), f.column_text(4),
                                 f.column_text(5)});
  }
  return j;
}

std::vector<Job> JobStore::list() const {
  Impl::Statement s(*impl_, std::string("SELECT ") + kJobColumns +
                                " FROM jobs ORDER BY created_at DESC, job_id DESC");
  std::vector<Job> jobs;
  while (s.step()) jobs.push_back(impl_->job_from(s));
  return jobs;
}

void JobStore::update(const Job& j) {
  Impl::Statement s(*impl_,
                    "UPDATE jobs SET data_type=?, analysis_state=?, analysis_size=?, "
                    "analysis_time=?, transfer_state=?, transfer_size=?, transferred=?, "
                    "completed_at=?, error=?, folder=? WHERE job_id=?");
  s.text(j.data_type)
      .text(j.analysis_state)
      .integer(static_cast<std::int64_t>(j.analysis_size))
      .integer(j.analysis_time)
      .text(to_string(j.transfer_state))
      .integer(static_cast<std::int64_t>(j.transfer_size))
      .integer(static_cast<std::int64_t>(j.transferred))
      .integer(j.completed_at)
      .text(j.error)
      .text(j.folder)
      .text(j.job_id);
  s.step();
}

void JobStore::set_state(const std::string& job_id, TransferState state, const std::string& error) {
  Impl::Statement s(*impl_, "UPDATE jobs SET transfer_state=?, error=? WHERE job_id=?");
  s.text(to_string(state)).text(error).text(job_id);
  s.step();
}

void JobStore::upsert_file(const std::string& job_id, const FileRecord& f) {
  Impl::Statement s(*impl_,
                    "INSERT INTO files (job_id, idx, path, size, committed, sha256, state) "
                    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(job_id, idx) DO UPDATE SET "
                    "path=excluded.path, size=excluded.size, committed=excluded.committed, "
                    "sha256=excluded.sha256, state=excluded.state");
  s.text(job_id)
      .integer(f.index)
      .text(f.path)
      .integer(static_cast<std::int64_t>(f.size))
      .integer(static_cast<std::int64_t>(f.committed))
      .text(f.sha256)
      .text(f.state);
  s.step();
}

bool JobStore::remove(const std::string& job_id) {
  Impl::Statement f(*impl_, "DELETE FROM files WHERE job_id=?");
  f.text(job_id);
  f.step();
  Impl::Statement s(*impl_, "DELETE FROM jobs WHERE job_id=?");
  s.text(job_id);
  s.step();
  return s.changes() > 0;
}

void JobStore::request_abort(const std::string& job_id) {
  Impl::Statement s(*impl_, "UPDATE jobs SET abort_requested=1 WHERE job_id=?");
  s.text(job_id);
  s.step();
}

bool JobStore::abort_requested(const std::string& job_id) const {
  Impl::Statement s(*impl_, "SELECT abort_requested FROM jobs WHERE job_id=?");
  s.text(job_id);
  return s.step() && s.column_int(0) != 0;
}

void JobStore::clear_abort(const std::string& job_id) {
  Impl::Statement s(*impl_, "UPDATE jobs SET abort_requested=0 WHERE job_id=?");
  s.text(job_id);
  s.step();
}

std::string new_job_id() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char date[16];
  std::strftime(date, sizeof date, "%Y%m%d", &tm);
  unsigned char random[4];
  if (RAND_bytes(random, sizeof random) != 1)
    throw std::runtime_error("no randomness for a job id");
  char id[32];
  std::snprintf(id, sizeof id, "J%s-%02x%02x%02x%02x", date, random[0], random[1], random[2],
                random[3]);
  return id;
}

std::string human_bytes(double bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char text[32];
  std::snprintf(text, sizeof text, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return text;
}

}  // namespace otpgate::transfer

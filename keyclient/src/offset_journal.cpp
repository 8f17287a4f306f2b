// SPDX-License-Identifier: LGPL-2.1-or-later
// The offset journal: one small file, replaced atomically, that says which pad
// offsets may already have been handed out. It is written before the keys above the
// old value enter the ring, so a crash can lose pad, never repeat it.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

namespace {
constexpr std::string_view kMagic = "otpgate-offset-journal 1 reserved ";

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw std::runtime_error("offset journal " + path.string() + ": " + what);
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

void fsync_path(const std::filesystem::path& path, int flags) {
  Fd f{::open(path.c_str(), flags | O_CLOEXEC)};
  if (f.fd < 0 || ::fsync(f.fd) != 0)
    fail(path, std::string("fsync failed: ") + std::strerror(errno));
}
}  // namespace

OffsetJournal::OffsetJournal(std::filesystem::path path) : path_(std::move(path)) {
  std::error_code ec;
  if (path_.has_parent_path()) std::filesystem::create_directories(path_.parent_path(), ec);
  // Two users of one journal would hand out the same offsets: refuse the second.
  const std::filesystem::path lock = path_.string() + ".lock";
  lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd_ < 0) fail(lock, std::string("cannot be created: ") + std::strerror(errno));
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd_);
    lock_fd_ = -1;
    fail(path_, "is in use by another running stream; give each stream its own journal");
  }
  if (!std::filesystem::exists(path_)) {
    reserve(0);
    return;
  }
  std::ifstream in(path_);
  std::string line;
  if (!in || !std::getline(in, line)) fail(path_, "cannot be read; check its permissions");
  if (line.rfind(kMagic, 0) != 0) {
    fail(path_,
         "is corrupt (unexpected content); refusing to guess which pad offsets were used. "
         "Restore it from backup or retire this pad stream");
  }
  const std::string_view number = std::string_view(line).substr(kMagic.size());
  std::uint64_t value = 0;
  auto [end, err] = std::from_chars(number.data(), number.data() + number.size(), value);
  if (err != std::errc() || end != number.data() + number.size()) {
    fail(path_, "is corrupt (bad offset); refusing to guess which pad offsets were used");
  }
  reserved_ = value;
}

OffsetJournal::~OffsetJournal() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

void OffsetJournal::reserve(std::uint64_t new_reserved) {
  if (new_reserved < reserved_) fail(path_, "a reservation may never move backwards");
  const std::filesystem::path temp = path_.string() + ".tmp";
  {
    Fd f{::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)};
    if (f.fd < 0) fail(temp, std::string("cannot be written: ") + std::strerror(errno));
    const std::string text = std::string(kMagic) + std::to_string(new_reserved) + "\n";
    if (::write(f.fd, text.data(), text.size()) != static_cast<ssize_t>(text.size()) ||
        ::fsync(f.fd) != 0) {
      fail(temp, std::string("write failed: ") + std::strerror(errno));
    }
  }
  if (::rename(temp.c_str(), path_.c_str()) != 0) {
    fail(path_, std::string("rename failed: ") + std::strerror(errno));
  }
  fsync_path(path_.has_parent_path() ? path_.parent_path() : std::filesystem::path("."),
             O_RDONLY | O_DIRECTORY);
  reserved_ = new_reserved;
}

}  // namespace otpgate::keys

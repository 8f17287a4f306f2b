// SPDX-License-Identifier: LGPL-2.1-or-later
// See job_lock.hpp.
#include "job_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "key_settings.hpp"

namespace otpgate::transfer::detail {

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

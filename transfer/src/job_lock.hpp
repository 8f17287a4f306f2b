// SPDX-License-Identifier: LGPL-2.1-or-later
// The lock (flock on state_dir/transfer-journals/JOB.sender.lock) held by the process
// that runs a send job for as long as it runs it, retries included: it tells a live job
// from one whose sender died, and refuses a second sender.
#pragma once

#include <filesystem>
#include <string>

#include "otpgate/transfer.hpp"
#include "tcp_socket.hpp"

namespace otpgate::transfer::detail {

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

// SPDX-License-Identifier: LGPL-2.1-or-later
// The body of a job-creation request (POST /api/v1/jobs), parsed and checked without a
// server: what the service then hands to create_send_job. Fuzzed by
// tests/fuzz/fuzz_job_request.cpp.
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

#include "otpgate/transfer.hpp"

namespace otpgate::transfer::detail {

// {"specimen_id": "S-1", "folder": "S-1", "method": "otp", "watch": false, "start": true}
struct JobRequest {
  std::string specimen_id;       // a valid identifier
  std::filesystem::path folder;  // canonical, strictly inside transfer.data_root
  Method method = Method::otp;   // "method", or transfer.method when absent
  bool watch = false;            // follow a run folder that is still being written
  bool start = true;             // start the job at once
};

// A request the API refuses: its HTTP status and one line for {"error": ...}.
class RequestError : public std::runtime_error {
 public:
  RequestError(int status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  int status() const { return status_; }

 private:
  int status_;
};

// Throws RequestError and nothing else: 400 for a body that is not a JSON object with
// those fields and types, an invalid specimen ID or method, or a folder that is not a
// folder inside the data root; 409 when this site has no transfer.data_root.
JobRequest parse_job_request(std::string_view body, const TransferConfig& config);

}  // namespace otpgate::transfer::detail

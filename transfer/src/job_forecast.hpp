// SPDX-License-Identifier: LGPL-2.1-or-later
// The key forecast of specimen jobs, as the job API publishes it (otpgate/forecast.hpp
// does the arithmetic): for a job under way, when it finishes at its measured pace; for a
// folder before it is sent, the key it needs against what the KME holds and how long the
// link's key rate takes to make the rest.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "otpgate/forecast.hpp"

namespace otpgate::transfer {

class JobForecasts {
 public:
  // The service's transfer.record_size and transfer.aes_rekey_records.
  JobForecasts(std::uint64_t record_size, std::uint64_t aes_rekey_records)
      : record_size_(record_size), aes_rekey_records_(aes_rekey_records) {}
  // Adds "forecast" to a job as the job API shows it (job_id, direction, transfer_state,
  // transfer_size, transferred, method): key_needed_bytes (what the rest still needs),
  // throughput_bytes_per_s (measured over the last two minutes, null until known),
  // seconds_left and finishes_at (Unix ms), null until known. Completed jobs get none.
  void annotate(nlohmann::json& job, double now_s, std::int64_t now_ms);
  // The KME's store for this site's sends, read when folders are listed (null: unknown);
  // with the pad the send jobs used meanwhile, it measures the link's key rate.
  void observe_kme(const nlohmann::json& held_bytes, double now_s);
  // Adds key_needed_otp and key_needed_aes to a folder {bytes, files}, and "forecast":
  // key_rate_bits_per_s (null until measured), covered (the KME holds it now) and
  // seconds_otp (at the key rate, beyond what is held; null when unknown).
  void annotate_folder(nlohmann::json& folder) const;

 private:
  const std::uint64_t record_size_, aes_rekey_records_;
  mutable std::mutex mutex_;
  std::map<std::string, keys::RateWindow> pace_;  // per job: bytes transferred
  std::map<std::string, double> sent_;            // per send job: bytes transferred
  double sent_total_ = 0, delivered_ = 0;
  std::optional<double> last_sent_, last_held_, held_;
  keys::RateWindow key_rate_{300};
};

}  // namespace otpgate::transfer

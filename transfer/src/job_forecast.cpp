// SPDX-License-Identifier: LGPL-2.1-or-later
// See job_forecast.hpp.
#include "job_forecast.hpp"

#include <algorithm>

namespace otpgate::transfer {

using nlohmann::json;

void JobForecasts::annotate(json& job, double now_s, std::int64_t now_ms) {
  const std::string id = job.value("job_id", "");
  const std::string state = job.value("transfer_state", "");
  const double size = job.value("transfer_size", 0.0);
  const double done = job.value("transferred", 0.0);
  std::lock_guard lock(mutex_);
  if (job.value("direction", "") == "send") {
    double& sent = sent_[id];
    sent_total_ += std::max(0.0, done - sent);
    sent = done;
  }
  if (state == "completed") {
    pace_.erase(id);
    return;
  }
  const bool moving = state == "running" || state == "waiting-for-key";
  auto& pace = pace_.try_emplace(id, 120).first->second;
  if (moving) pace.add(now_s, done);
  const double rest = std::max(0.0, size - done);
  const bool otp = job.value("method", "OTP") != "AES";
  const auto key_needed =
      otp ? keys::otp_transfer_key_bytes(std::uint64_t(rest), 0, record_size_)
          : keys::aes_transfer_key_bytes(std::uint64_t(rest), 0, record_size_, aes_rekey_records_);
  json f = {{"key_needed_bytes", key_needed},
            {"throughput_bytes_per_s", nullptr},
            {"seconds_left", nullptr},
            {"finishes_at", nullptr}};
  const auto throughput = moving ? pace.per_second() : std::nullopt;
  if (throughput && *throughput > 0) {
    f["throughput_bytes_per_s"] = *throughput;
    // Its measured pace already includes any wait for key: the rest goes at that pace.
    if (const auto seconds = keys::seconds_to_use(rest, rest, 0, *throughput)) {
      f["seconds_left"] = *seconds;
      f["finishes_at"] = now_ms + std::int64_t(*seconds * 1000);
    }
  }
  job["forecast"] = std::move(f);
}

void JobForecasts::observe_kme(const json& held_bytes, double now_s) {
  std::lock_guard lock(mutex_);
  if (!held_bytes.is_number()) {
    held_.reset();
    return;
  }
  const double held = held_bytes.get<double>();
  // Key made for the link: what the KME's store grew by, plus what our sends drew from it.
  if (last_held_ && last_sent_) {
    delivered_ += std::max(0.0, held - *last_held_ + (sent_total_ - *last_sent_));
  }
  last_held_ = held;
  last_sent_ = sent_total_;
  held_ = held;
  key_rate_.add(now_s, delivered_);
}

void JobForecasts::annotate_folder(json& folder) const {
  const auto bytes = folder.value("bytes", std::uint64_t{0});
  const auto files = folder.value("files", std::uint64_t{0});
  const auto otp = keys::otp_transfer_key_bytes(bytes, files, record_size_);
  folder["key_needed_otp"] = otp;
  folder["key_needed_aes"] =
      keys::aes_transfer_key_bytes(bytes, files, record_size_, aes_rekey_records_);
  std::lock_guard lock(mutex_);
  const auto rate = key_rate_.per_second();
  json f = {{"key_rate_bits_per_s", rate ? json(*rate * 8) : json(nullptr)},
            {"covered", held_ ? json(*held_ >= double(otp)) : json(nullptr)},
            {"seconds_otp", nullptr}};
  if (rate && *rate > 0) {
    if (const auto s = keys::seconds_to_use(double(otp), held_.value_or(0), *rate))
      f["seconds_otp"] = *s;
  }
  folder["forecast"] = std::move(f);
}

}  // namespace otpgate::transfer

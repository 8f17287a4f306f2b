// SPDX-License-Identifier: LGPL-2.1-or-later
// See otpgate/forecast.hpp.
#include "otpgate/forecast.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace otpgate::keys {

namespace {
// No KME stores a petabyte of key for one pair (a 10 Mbit/s link makes about 100 GB a day).
constexpr std::uint64_t kPlausibleStoreBytes = std::uint64_t(1) << 50;
}  // namespace

KmeHeld kme_held(const KmeStatus& s) {
  KmeHeld held;
  const auto refuse = [&](std::string why) {
    held.reason = "the KME's status is not used: " + std::move(why);
    return held;
  };
  if (s.key_size == 0 || s.key_size % 8 != 0) {
    return refuse("key_size " + std::to_string(s.key_size) + " is not a whole number of bytes");
  }
  if ((s.max_key_size != 0 && s.key_size > s.max_key_size) || s.key_size < s.min_key_size) {
    return refuse("key_size " + std::to_string(s.key_size) + " is outside its own limits " +
                  std::to_string(s.min_key_size) + "-" + std::to_string(s.max_key_size));
  }
  if (s.max_key_count != 0 && s.stored_key_count > s.max_key_count) {
    return refuse("stored_key_count " + std::to_string(s.stored_key_count) +
                  " is above its max_key_count " + std::to_string(s.max_key_count));
  }
  const std::uint64_t key_bytes = s.key_size / 8;
  if (s.stored_key_count > kPlausibleStoreBytes / key_bytes) {
    return refuse("stored_key_count " + std::to_string(s.stored_key_count) +
                  " is more key than any store holds");
  }
  held.bytes = s.stored_key_count * key_bytes;
  held.trusted = true;
  return held;
}

void RateWindow::add(double at_seconds, double total) {
  if (!std::isfinite(at_seconds) || !std::isfinite(total)) return;
  if (!samples_.empty() && (total < samples_.back().second || at_seconds < samples_.back().first)) {
    samples_.clear();  // the counter (or the clock) went back: start over
  }
  samples_.emplace_back(at_seconds, total);
  while (samples_.size() > 2 && samples_.front().first < at_seconds - window_) {
    samples_.pop_front();
  }
}

std::optional<double> RateWindow::per_second() const {
  if (samples_.size() < 2) return std::nullopt;
  const double span = samples_.back().first - samples_.front().first;
  if (span < 1) return std::nullopt;
  return (samples_.back().second - samples_.front().second) / span;
}

LinkForecast forecast_link(const LinkKeyState& state) {
  LinkForecast f;
  f.ring_bytes = state.ring_bytes;
  f.refill_bytes_per_s = std::max(0.0, state.refill_bytes_per_s);
  f.consumption_bytes_per_s = std::max(0.0, state.consumption_bytes_per_s);
  if (state.kme) {
    f.kme_reported = true;
    const KmeHeld held = kme_held(*state.kme);
    if (held.trusted && state.kme_counts_pending) {
      f.kme_note =
          "the KME's status is not used: its stored_key_count counts keys pending for this pair";
    } else {
      f.kme_trusted = held.trusted;
      f.kme_bytes = held.bytes;
      f.kme_note = held.reason;
    }
  }
  f.held_bytes = f.ring_bytes + f.kme_bytes;
  const double net = f.consumption_bytes_per_s - f.refill_bytes_per_s;
  // Below a byte a second nothing runs out within any session that matters.
  if (net >= 1) f.seconds_left = double(f.held_bytes) / net;
  return f;
}

SessionForecast forecast_session(const LinkForecast& link, double seconds, double bytes_per_s) {
  SessionForecast s;
  s.seconds = std::max(0.0, seconds);
  s.needed_bytes = s.seconds * std::max(0.0, bytes_per_s);
  s.available_bytes = double(link.held_bytes) + link.refill_bytes_per_s * s.seconds;
  s.covered = s.available_bytes >= s.needed_bytes;
  s.short_bytes = s.covered ? 0 : s.needed_bytes - s.available_bytes;
  return s;
}

std::uint64_t otp_transfer_key_bytes(std::uint64_t bytes, std::uint64_t files,
                                     std::uint64_t record_size) {
  const std::uint64_t records = bytes / std::max<std::uint64_t>(record_size, 1) + files + 2;
  return bytes + 16 * records + bytes / 262144 * 16 + 4096;
}

std::uint64_t aes_transfer_key_bytes(std::uint64_t bytes, std::uint64_t files,
                                     std::uint64_t record_size, std::uint64_t rekey_records) {
  const std::uint64_t records = bytes / std::max<std::uint64_t>(record_size, 1) + files + 2;
  return 44 * (records / std::max<std::uint64_t>(rekey_records, 1) + 1);
}

std::optional<double> seconds_to_use(double key_bytes, double held_bytes, double refill_bytes_per_s,
                                     double throughput_bytes_per_s) {
  key_bytes = std::max(0.0, key_bytes);
  const double beyond_held = std::max(0.0, key_bytes - std::max(0.0, held_bytes));
  double at_key_rate = 0;
  if (beyond_held > 0) {
    if (refill_bytes_per_s <= 0) return std::nullopt;
    at_key_rate = beyond_held / refill_bytes_per_s;
  }
  const double at_own_pace = throughput_bytes_per_s > 0 ? key_bytes / throughput_bytes_per_s : 0;
  return std::max(at_key_rate, at_own_pace);
}

}  // namespace otpgate::keys

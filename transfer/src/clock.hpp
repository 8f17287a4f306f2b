// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-transfer's clocks: a steady one for timeouts and pauses, Unix milliseconds for the
// times a job records (created, analysis, completed).
#pragma once

#include <chrono>
#include <cstdint>

namespace otpgate::transfer::detail {

using Clock = std::chrono::steady_clock;

inline std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace otpgate::transfer::detail

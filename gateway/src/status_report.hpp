// SPDX-License-Identifier: LGPL-2.1-or-later
// What otp-gateway tells monitoring: counters as JSON, the Prometheus rendering of the
// status, and a health verdict with reasons that a person can act on (served as
// /api/v1/status "health", /metrics otpgate_healthy and /healthz).
#pragma once

#include <gst/gst.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::gateway {

// An element's "stats" GstStructure as JSON (numbers, booleans, strings).
nlohmann::json element_stats(GstElement* element);
// A key supply's (or lane's) counters as the status API shows them.
nlohmann::json supply_json(const keys::KeySupplyStats& stats);
// The status's "links": per direction, the key supply of all its streams with the key
// forecast (otpgate/forecast.hpp; a panel of kPanelSeconds at the current rate), and how
// many of `streams` (the status's stream list) run on AES fallback. Null supplies are left out.
inline constexpr double kPanelSeconds = 65 * 60;
nlohmann::json links_json(const nlohmann::json& streams, const std::string& peer_sae_id,
                          const std::optional<keys::KeySupplyStats>& send,
                          const std::optional<keys::KeySupplyStats>& receive);
// /metrics (Prometheus text format 0.0.4) from the status JSON, so the two never disagree.
std::string metrics_text(const nlohmann::json& status);

// Health from what the gateway observes over time. Unhealthy (HTTP 503 on /healthz) when,
// for at least `unhealthy_after`: the KME is unreachable or refuses us; a stream that
// takes in media has no key to send it with; or media goes to the peer gateway and
// nothing comes back on any stream. Also at once when a key source has failed for good
// (a used-up pad file), and, from when it counts them until `unhealthy_after` later, when
// a stream's receiver drops key it cannot lock in memory (RLIMIT_MEMLOCK used up: its
// media is dropped). Degraded (still 200) while AES fallback carries a stream.
class HealthMonitor {
 public:
  using Clock = std::chrono::steady_clock;
  struct StreamSample {
    std::string name;
    bool sends = false, receives = false;
    std::uint64_t packets_in = 0;            // from the local conference system (otpencrypt)
    std::uint64_t packets_to_peer = 0;       // sent to the peer gateway (otpencrypt)
    std::uint64_t packets_from_peer = 0;     // from the peer gateway (otpdecrypt)
    std::uint64_t memory_lock_failures = 0;  // keys dropped, not lockable (otpdecrypt)
    bool aes_fallback = false;
  };
  struct SupplySample {
    const char* role;  // "send" | "receive"
    keys::KeySupplyStats stats;
  };
  struct Sample {
    Clock::time_point now;
    std::vector<StreamSample> streams;
    std::vector<SupplySample> supplies;
  };

  HealthMonitor(std::chrono::seconds unhealthy_after, std::string kme_url, std::string peer,
                std::string on_key_exhausted);
  void observe(const Sample& sample);
  // {"status": "healthy"|"degraded"|"unhealthy", "reasons": [...], "warnings": [...]}
  nlohmann::json report() const;

 private:
  struct StreamTrack {
    std::uint64_t packets_in = 0, packets_to_peer = 0, packets_from_peer = 0;
    std::uint64_t memory_lock_failures = 0;
    Clock::time_point key_ok;  // last seen with key for its media (or none to send)
    std::optional<Clock::time_point> lock_failed;  // last seen counting new lock failures
  };
  static long seconds(Clock::duration d);

  const std::chrono::seconds unhealthy_after_;
  const std::string kme_url_, peer_, on_key_exhausted_;
  mutable std::mutex mutex_;
  std::map<std::string, StreamTrack> streams_;
  std::map<std::string, Clock::time_point> kme_healthy_at_;  // per supply role
  Clock::time_point started_, last_to_peer_, last_from_peer_;
  bool observed_ = false;
  std::vector<std::string> reasons_, warnings_;
};

}  // namespace otpgate::gateway

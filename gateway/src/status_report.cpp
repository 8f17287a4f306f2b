// SPDX-License-Identifier: LGPL-2.1-or-later
#include "status_report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "otpgate/forecast.hpp"

namespace otpgate::gateway {

using nlohmann::json;

// A GstStructure of counters as JSON (numbers, booleans, strings).
namespace {

json structure_json(const GstStructure* s) {
  json out = json::object();
  if (!s) return out;
  for (int i = 0; i < gst_structure_n_fields(s); ++i) {
    const char* name = gst_structure_nth_field_name(s, static_cast<guint>(i));
    const GValue* v = gst_structure_get_value(s, name);
    if (G_VALUE_HOLDS_UINT64(v)) {
      out[name] = g_value_get_uint64(v);
    } else if (G_VALUE_HOLDS_UINT(v)) {
      out[name] = g_value_get_uint(v);
    } else if (G_VALUE_HOLDS_BOOLEAN(v)) {
      out[name] = static_cast<bool>(g_value_get_boolean(v));
    } else if (G_VALUE_HOLDS_DOUBLE(v)) {
      out[name] = g_value_get_double(v);
    } else if (G_VALUE_HOLDS_STRING(v)) {
      const char* text = g_value_get_string(v);
      out[name] = text ? text : "";
    }
  }
  return out;
}

}  // namespace

json element_stats(GstElement* element) {
  GstStructure* s = nullptr;
  g_object_get(element, "stats", &s, nullptr);
  json out = structure_json(s);
  if (s) gst_structure_free(s);
  return out;
}

json supply_json(const keys::KeySupplyStats& s) {
  return json{{"bytes_available", s.bytes_available},
              {"bytes_consumed", s.bytes_consumed},
              {"bytes_fetched", s.bytes_fetched},
              {"keys_fetched", s.keys_fetched},
              {"keys_lost", s.keys_lost},
              {"kme_errors", s.kme_errors},
              {"kme_healthy", s.kme_healthy},
              {"kme_last_error", s.last_error},
              {"key_size_bits", s.key_size_bits},
              {"ring_capacity_bytes", s.ring_capacity_bytes},
              {"consumption_bits_per_s", s.consumption_bytes_per_s * 8},
              {"seconds_to_exhaustion",
               std::isinf(s.seconds_to_exhaustion) ? json(nullptr) : json(s.seconds_to_exhaustion)},
              {"refill_latency_ms", s.refill_latency_ms_avg},
              {"memory_locked", s.memory_locked},
              {"keys_waiting", s.keys_waiting},
              {"bytes_flushed", s.bytes_flushed},
              {"kme_outages", s.kme_outages},
              {"kme_replaces_batches", s.kme_replaces_batches},
              {"failed", s.failed},
              {"failure", s.failure}};
}

json links_json(const json& streams, const std::string& peer_sae_id,
                const std::optional<keys::KeySupplyStats>& send,
                const std::optional<keys::KeySupplyStats>& receive) {
  json links = json::array();
  for (const auto& [direction, stats] :
       {std::pair{"send", &send}, std::pair{"receive", &receive}}) {
    if (!*stats) continue;
    const keys::KeySupplyStats& s = **stats;
    keys::LinkKeyState state;
    state.ring_bytes = s.bytes_available;
    state.kme = s.kme_status;
    state.kme_counts_pending = s.kme_replaces_batches;
    state.refill_bytes_per_s = s.refill_bytes_per_s;
    state.consumption_bytes_per_s = s.consumption_bytes_per_s;
    const keys::LinkForecast f = keys::forecast_link(state);
    const keys::SessionForecast panel =
        keys::forecast_session(f, kPanelSeconds, f.consumption_bytes_per_s);
    int count = 0, aes = 0;
    for (const auto& stream : streams) {
      if (!stream["key_supply"][direction].is_object()) continue;
      ++count;
      const json& element = stream[direction];
      if (element.is_object() && element.value("aes-fallback", false)) ++aes;
    }
    links.push_back({{"peer_sae_id", peer_sae_id},
                     {"direction", direction},
                     {"streams", count},
                     {"aes_fallback_streams", aes},
                     {"ring_bytes", f.ring_bytes},
                     {"kme_bytes", f.kme_bytes},
                     {"held_bytes", f.held_bytes},
                     {"kme_reported", f.kme_reported},
                     {"kme_trusted", f.kme_trusted},
                     {"kme_note", f.kme_note},
                     {"refill_bits_per_s", f.refill_bytes_per_s * 8},
                     {"consumption_bits_per_s", f.consumption_bytes_per_s * 8},
                     {"seconds_left", f.seconds_left ? json(*f.seconds_left) : json(nullptr)},
                     {"kme_healthy", s.kme_healthy},
                     {"kme_last_error", s.last_error},
                     {"panel",
                      {{"seconds", panel.seconds},
                       {"needed_bytes", panel.needed_bytes},
                       {"available_bytes", panel.available_bytes},
                       {"covered", panel.covered},
                       {"short_bytes", panel.short_bytes}}}});
  }
  return links;
}

namespace {

// A Prometheus label value: backslash, double quote and newline escaped.
std::string label_value(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

// A refused client certificate reaches us in TLS terms; name the config keys to look at.
std::string tls_hint(const std::string& error) {
  for (const char* word : {"SSL", "TLS", "certificate"}) {
    if (error.find(word) != std::string::npos)
      return " (check [kme] tls_cert, tls_key and tls_ca against what the KME trusts)";
  }
  return "";
}

}  // namespace

std::string metrics_text(const json& st) {
  std::string out;
  std::set<std::string> typed;
  auto metric = [&](const std::string& name, const char* type, const std::string& labels,
                    double value) {
    if (typed.insert(name).second) out += "# TYPE " + name + " " + type + "\n";
    char number[64];
    std::snprintf(number, sizeof number, "%.17g", value);
    out += name + "{" + labels + "} " + number + "\n";
  };
  const std::string site = "site=\"" + label_value(st["site"].get<std::string>()) + "\"";
  metric("otpgate_healthy", "gauge", site, st["health"]["status"] == "unhealthy" ? 0 : 1);
  const json& m = st["media_threads"];
  for (const char* scheduling : {"realtime", "raised", "unraised"}) {
    metric("otpgate_media_threads", "gauge", site + ",scheduling=\"" + scheduling + "\"",
           m[std::string(scheduling) + "_threads"].get<double>());
  }
  if (m.contains("call_media_wakeups")) {
    for (std::size_t i = 0; i < m["call_media_wakeups"].size(); ++i) {
      const std::string thread = site + ",thread=\"" + std::to_string(i) + "\"";
      metric("otpgate_call_media_wakeups_total", "counter", thread,
             m["call_media_wakeups"][i].get<double>());
      metric("otpgate_call_media_datagrams_total", "counter", thread,
             m["call_media_datagrams"][i].get<double>());
    }
  }
  if (!m["cpu_wakeup_latency_us"].is_null()) {
    metric("otpgate_cpu_wakeup_latency_held", "gauge", site,
           m["cpu_wakeup_latency_held"].get<bool>() ? 1 : 0);
  }
  for (const auto& s : st["streams"]) {
    for (const char* direction : {"send", "receive"}) {
      if (s[direction].is_null()) continue;
      const std::string labels = site + ",stream=\"" + label_value(s["name"].get<std::string>()) +
                                 "\",direction=\"" + direction + "\"";
      for (const auto& [field, value] : s[direction].items()) {
        if (!value.is_number_unsigned() || field.rfind("key-", 0) == 0) continue;
        std::string name = "otpgate_" + field;
        std::replace(name.begin(), name.end(), '-', '_');
        const bool gauge =
            field == "packets-held" || field == "announcements-pending" || field == "keys-awaited";
        metric(gauge ? name : name + "_total", gauge ? "gauge" : "counter", labels,
               value.get<double>());
      }
      const json& k = s["key_supply"][direction];
      metric("otpgate_key_available_bytes", "gauge", labels, k["bytes_available"].get<double>());
      metric("otpgate_key_consumed_bytes_total", "counter", labels,
             k["bytes_consumed"].get<double>());
      metric("otpgate_key_fetched_bytes_total", "counter", labels,
             k["bytes_fetched"].get<double>());
      metric("otpgate_kme_errors_total", "counter", labels, k["kme_errors"].get<double>());
      metric("otpgate_kme_healthy", "gauge", labels, k["kme_healthy"].get<bool>() ? 1 : 0);
      metric("otpgate_keys_lost_total", "counter", labels, k["keys_lost"].get<double>());
      metric("otpgate_key_flushed_bytes_total", "counter", labels,
             k["bytes_flushed"].get<double>());
      metric("otpgate_kme_outages_total", "counter", labels, k["kme_outages"].get<double>());
      metric("otpgate_key_source_failed", "gauge", labels, k["failed"].get<bool>() ? 1 : 0);
    }
  }
  if (st.contains("calls")) {
    metric("otpgate_calls", "gauge", site, static_cast<double>(st["calls"].size()));
    for (const auto& call : st["calls"]) {
      for (const auto& media : call["media"]) {
        const std::string labels = site + ",call_id=\"" +
                                   label_value(call["call_id"].get<std::string>()) + "\",media=\"" +
                                   std::to_string(media["index"].get<int>()) + "\"";
        for (const auto& [way, count] : media["packets"].items()) {
          metric("otpgate_call_packets_total", "counter", labels + ",path=\"" + way + "\"",
                 count.get<double>());
        }
        for (const auto& [direction, bytes] : media["key_used_bytes"].items()) {
          metric("otpgate_call_key_used_bytes_total", "counter",
                 labels + ",direction=\"" + direction + "\"", bytes.get<double>());
        }
      }
    }
  }
  if (st.contains("sip")) {  // the ng side's counters: otpgate_sip_<name>_total
    const json& sip = st["sip"];
    for (const auto& [name, value] : sip.items()) {
      if (value.is_number_unsigned() && name != "ng_port" && name != "max_media" &&
          name.rfind("free_", 0) != 0)
        metric("otpgate_sip_" + name + "_total", "counter", site, value.get<double>());
    }
    if (sip.contains("ng")) {
      for (const auto& [name, value] : sip["ng"].items())
        metric("otpgate_sip_ng_" + name + "_total", "counter", site, value.get<double>());
    }
  }
  for (const auto& l : st["links"]) {
    const std::string labels = site + ",peer=\"" +
                               label_value(l["peer_sae_id"].get<std::string>()) +
                               "\",direction=\"" + l["direction"].get<std::string>() + "\"";
    metric("otpgate_link_key_held_bytes", "gauge", labels, l["held_bytes"].get<double>());
    metric("otpgate_link_key_refill_bits_per_second", "gauge", labels,
           l["refill_bits_per_s"].get<double>());
    metric("otpgate_link_key_consumption_bits_per_second", "gauge", labels,
           l["consumption_bits_per_s"].get<double>());
    if (!l["seconds_left"].is_null())
      metric("otpgate_link_key_seconds_left", "gauge", labels, l["seconds_left"].get<double>());
    metric("otpgate_link_panel_short_bytes", "gauge", labels,
           l["panel"]["short_bytes"].get<double>());
  }
  metric("otpgate_key_wiped_at_stop_bytes_total", "counter", site,
         st["key_wiped_at_stop_bytes"].get<double>());
  return out;
}

HealthMonitor::HealthMonitor(std::chrono::seconds unhealthy_after, std::string kme_url,
                             std::string peer, std::string on_key_exhausted)
    : unhealthy_after_(unhealthy_after),
      kme_url_(std::move(kme_url)),
      peer_(std::move(peer)),
      on_key_exhausted_(std::move(on_key_exhausted)),
      started_(Clock::now()) {}

long HealthMonitor::seconds(Clock::duration d) {
  return static_cast<long>(std::chrono::duration_cast<std::chrono::seconds>(d).count());
}

void HealthMonitor::observe(const Sample& sample) {
  const auto now = sample.now;
  std::vector<std::string> reasons, warnings;
  for (const auto& supply : sample.supplies) {
    const keys::KeySupplyStats& k = supply.stats;
    if (k.failed) {
      reasons.push_back(std::string(supply.role) + " key source failed: " + k.failure +
                        tls_hint(k.failure));
      continue;
    }
    auto [healthy_at, inserted] = kme_healthy_at_.try_emplace(supply.role, now);
    if (k.kme_healthy || inserted) healthy_at->second = now;
    if (now - healthy_at->second >= unhealthy_after_) {
      std::string reason = "KME " + kme_url_ + " has not served " + supply.role + " key for " +
                           std::to_string(seconds(now - healthy_at->second)) +
                           " s: " + (k.last_error.empty() ? "no answer" : k.last_error) +
                           tls_hint(k.last_error);
      reasons.push_back(std::move(reason));
    }
  }
  bool sent_any = false, received_any = false;
  // Call streams come and go: forget the ones no longer running (a track per ended call
  // would pile up for as long as the gateway runs).
  std::erase_if(streams_, [&](const auto& entry) {
    return std::none_of(sample.streams.begin(), sample.streams.end(),
                        [&](const StreamSample& s) { return s.name == entry.first; });
  });
  for (const auto& s : sample.streams) {
    auto [it, inserted] = streams_.try_emplace(s.name);
    StreamTrack& t = it->second;
    if (inserted) t.key_ok = now;  // first seen now (call streams start at any time)
    // Key: fine unless media came in and nothing went out (dropped or held for key).
    const bool media_in = s.packets_in > t.packets_in;
    const bool sent = s.packets_to_peer > t.packets_to_peer;
    if (!s.sends || sent || !media_in) t.key_ok = now;
    sent_any = sent_any || sent;
    received_any = received_any || s.packets_from_peer > t.packets_from_peer;
    t.packets_in = s.packets_in;
    t.packets_to_peer = s.packets_to_peer;
    t.packets_from_peer = s.packets_from_peer;
    // Key the receiver could not lock was dropped, and the media on it with it: at once,
    // and until `unhealthy_after` passes without another (a counter a new stream starts
    // with counts as new: it is that stream's).
    if (s.memory_lock_failures > t.memory_lock_failures) t.lock_failed = now;
    t.memory_lock_failures = s.memory_lock_failures;
    if (t.lock_failed && now - *t.lock_failed < unhealthy_after_) {
      reasons.push_back(
          "stream " + s.name + ": " + std::to_string(s.memory_lock_failures) +
          " received keys dropped, their memory could not be locked (RLIMIT_MEMLOCK used "
          "up), so media on them is dropped; raise LimitMEMLOCK in the otp-gateway unit "
          "(see docs/gateway.md for its size) or hold less pad: lower sip.max_media or "
          "keys.ring_bytes");
    }
    if (now - t.key_ok >= unhealthy_after_) {
      reasons.push_back("stream " + s.name + ": no key for " +
                        std::to_string(seconds(now - t.key_ok)) + " s; its media " +
                        (on_key_exhausted_ == "block" ? "waits" : "is dropped") +
                        " (is the KME delivering key? see kme_last_error)");
    }
    if (s.aes_fallback) {
      warnings.push_back("stream " + s.name +
                         ": AES-256-GCM fallback carries the media (one-time pad key is short)");
    }
  }
  // The peer: media goes to it and nothing comes back on any stream. A conference system
  // that receives media answers with RTCP at least, so a live call always has some.
  if (!observed_) last_to_peer_ = last_from_peer_ = started_;
  if (sent_any) last_to_peer_ = now;
  if (received_any) last_from_peer_ = now;
  const bool receives_any = std::any_of(sample.streams.begin(), sample.streams.end(),
                                        [](const StreamSample& s) { return s.receives; });
  if (receives_any && now - last_to_peer_ < unhealthy_after_ &&
      now - last_from_peer_ >= unhealthy_after_) {
    reasons.push_back("nothing from the peer gateway " + peer_ + " on any stream for " +
                      std::to_string(seconds(now - last_from_peer_)) +
                      " s while sending to it (peer gateway down, or a firewall in between?)");
  }
  std::lock_guard lock(mutex_);
  reasons_ = std::move(reasons);
  warnings_ = std::move(warnings);
  observed_ = true;
}

json HealthMonitor::report() const {
  std::lock_guard lock(mutex_);
  const char* status = !reasons_.empty()    ? "unhealthy"
                       : !warnings_.empty() ? "degraded"
                                            : "healthy";
  return json{{"status", status}, {"reasons", reasons_}, {"warnings", warnings_}};
}

}  // namespace otpgate::gateway

// SPDX-License-Identifier: LGPL-2.1-or-later
// See admission.hpp and docs/sip.md ("Admission").
#include "admission.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

namespace otpgate::gateway::admission {

namespace {

constexpr double kPacketsPerSecond = 50;  // 20 ms frames
constexpr double kPacketBytes = 1200;     // video packets
constexpr double kTagKeyBytes = 16;       // one-time tag key per packet
constexpr double kAesKeyBytes = 44;       // AES-256 key + SRTP salt per rekey
constexpr double kVideoFloor = 128'000;

struct Floor {
  std::string_view encoding;  // lower case
  double bits_per_s;
};
// Codecs whose rate an endpoint can lower (their lowest mode); other audio codecs are
// fixed-rate, their floor is their rate (sdp::codec_bitrate).
constexpr std::array<Floor, 6> kAudioFloors{{{"opus", 6'000},
                                             {"amr", 4'750},
                                             {"amr-wb", 6'600},
                                             {"speex", 2'150},
                                             {"g7221", 24'000},
                                             {"ilbc", 13'330}}};

std::string kbit(double bytes_per_s) {
  return std::to_string(std::lround(std::max(0.0, bytes_per_s) * 8 / 1000)) + " kbit/s";
}

std::string mib(double bytes) {
  return std::to_string(std::lround(bytes / (1 << 20))) + " MiB";
}

// "... of a budget of B: the key rate R (sip.key_rate_bits_per_s) + H held over T s
// (sip.admission_horizon_s)".
std::string budget_text(const Input& in, const Decision& d) {
  std::string s = std::to_string(in.calls_running) + " call media running take " +
                  kbit(in.calls_bytes_per_s) + " and " + std::to_string(in.static_streams) +
                  " static streams " + kbit(in.static_bytes_per_s) +
                  " (measured), of a budget of " + kbit(d.budget_bytes_per_s) + ": the key rate " +
                  kbit(in.key_rate_bytes_per_s) + " (sip.key_rate_bits_per_s)";
  if (in.horizon_s > 0) {
    s += " + " + mib(in.held_bytes) + " of key held over " +
         std::to_string(std::lround(in.horizon_s)) + " s (sip.admission_horizon_s)";
  } else {
    s += "; key in store not counted (sip.admission_horizon_s = 0)";
  }
  return s;
}

std::string media_text(const Want& w) {
  return "media " + std::to_string(w.index) + " (" + w.type + ")";
}

}  // namespace

std::optional<OverBudget> over_budget_from(std::string_view name) {
  if (name == "refuse") return OverBudget::refuse;
  if (name == "cap") return OverBudget::cap;
  if (name == "aes") return OverBudget::aes;
  return std::nullopt;
}

const char* name_of(OverBudget policy) {
  switch (policy) {
    case OverBudget::cap:
      return "cap";
    case OverBudget::aes:
      return "aes";
    case OverBudget::refuse:
      break;
  }
  return "refuse";
}

double packets_per_s(double payload_bits_per_s) {
  return std::max(kPacketsPerSecond, payload_bits_per_s / 8 / kPacketBytes);
}

double pad_bytes_per_s(double payload_bits_per_s) {
  if (payload_bits_per_s <= 0) return 0;
  return payload_bits_per_s / 8 + kTagKeyBytes * packets_per_s(payload_bits_per_s);
}

double payload_bits_per_s(double pad) {
  // Up to 50 packets/s of 1200 bytes the tag keys are a constant 800 B/s; above, they are
  // 16 bytes per 1200 of payload.
  constexpr double knee_payload = kPacketsPerSecond * kPacketBytes;  // bytes/s
  constexpr double knee_pad = knee_payload + kTagKeyBytes * kPacketsPerSecond;
  if (pad <= kTagKeyBytes * kPacketsPerSecond) return 0;
  if (pad <= knee_pad) return (pad - kTagKeyBytes * kPacketsPerSecond) * 8;
  return pad / (1 + kTagKeyBytes / kPacketBytes) * 8;
}

double aes_pad_bytes_per_s(double payload_bits_per_s, std::uint32_t rekey_interval) {
  if (payload_bits_per_s <= 0) return 0;
  return kAesKeyBytes * packets_per_s(payload_bits_per_s) /
         std::max<std::uint32_t>(1, rekey_interval);
}

double floor_bits_per_s(const sdp::Media& media) {
  const double expected = static_cast<double>(sdp::expected_bitrate(media).bits_per_second);
  if (media.type == "video") return std::min(expected, kVideoFloor);
  if (media.type != "audio") return expected;
  std::optional<double> lowest;
  for (const auto& pt : media.formats) {
    const std::string encoding = sdp::encoding_of(media, pt);
    std::optional<double> floor;
    for (const auto& f : kAudioFloors) {
      if (f.encoding == encoding) floor = f.bits_per_s;
    }
    if (!floor) {
      const auto fixed = sdp::codec_bitrate("audio", encoding);
      if (fixed && *fixed == 0) continue;  // telephone-event, CN: no media of their own
      if (encoding == "red" || encoding == "ulpfec" || encoding == "rtx" || encoding == "fec" ||
          encoding == "flexfec") {
        continue;
      }
      floor = fixed ? static_cast<double>(*fixed) : 64'000.0;  // unknown: as its default
    }
    if (!lowest || *floor < *lowest) lowest = floor;
  }
  return std::min(expected, lowest.value_or(expected));
}

Decision decide(const Input& in) {
  Decision d;
  d.budget_bytes_per_s = in.key_rate_bytes_per_s +
                         (in.horizon_s > 0 ? std::max(0.0, in.held_bytes) / in.horizon_s : 0);
  d.free_bytes_per_s = d.budget_bytes_per_s - in.calls_bytes_per_s - in.static_bytes_per_s;
  d.media.resize(in.wanted.size());
  for (std::size_t i = 0; i < in.wanted.size(); ++i) {
    d.media[i].pad_bytes_per_s = pad_bytes_per_s(in.wanted[i].bits_per_s);
    d.wanted_bytes_per_s += d.media[i].pad_bytes_per_s;
  }
  if (d.wanted_bytes_per_s == 0 || d.wanted_bytes_per_s <= d.free_bytes_per_s) {
    d.admitted = true;
    return d;
  }
  const std::string over = "key budget: this call's media need " + kbit(d.wanted_bytes_per_s) +
                           " of pad, " + kbit(d.free_bytes_per_s) + " are free; " +
                           budget_text(in, d);
  // Audio first (a call without its sound is no call), then the rest, in SDP order.
  std::vector<std::size_t> order(in.wanted.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return (in.wanted[a].type == "audio") > (in.wanted[b].type == "audio");
  });
  double left = d.free_bytes_per_s;
  switch (in.policy) {
    case OverBudget::refuse:
      d.reason = over + " (sip.over_budget = \"refuse\")";
      return d;
    case OverBudget::aes:
      for (const std::size_t i : order) {
        Decision::Media& m = d.media[i];
        if (m.pad_bytes_per_s > 0 && m.pad_bytes_per_s <= left) {
          left -= m.pad_bytes_per_s;
          continue;
        }
        m.aes = m.pad_bytes_per_s > 0;
        m.pad_bytes_per_s = aes_pad_bytes_per_s(in.wanted[i].bits_per_s, in.rekey_interval);
      }
      d.admitted = true;
      d.reason = over + "; the media that do not fit run in AES-256-GCM keyed from QKD";
      return d;
    case OverBudget::cap:
      break;
  }
  // Water-filling per class: the smallest want first; each gets its want or an equal share
  // of what is left, whichever is less.
  for (const bool audio : {true, false}) {
    std::vector<std::size_t> members;
    for (const std::size_t i : order) {
      if ((in.wanted[i].type == "audio") == audio && d.media[i].pad_bytes_per_s > 0)
        members.push_back(i);
    }
    std::stable_sort(members.begin(), members.end(), [&](std::size_t a, std::size_t b) {
      return in.wanted[a].bits_per_s < in.wanted[b].bits_per_s;
    });
    for (std::size_t k = 0; k < members.size(); ++k) {
      const std::size_t i = members[k];
      const Want& w = in.wanted[i];
      Decision::Media& m = d.media[i];
      const double share = std::max(0.0, left) / static_cast<double>(members.size() - k);
      if (m.pad_bytes_per_s > share) {
        const double capped = std::floor(payload_bits_per_s(share));
        if (capped < w.floor_bits_per_s || capped <= 0) {
          d.reason = over + "; capped to fit, " + media_text(w) + " would get " +
                     std::to_string(std::lround(capped / 1000)) + " kbit/s, below its floor of " +
                     std::to_string(std::lround(w.floor_bits_per_s / 1000)) +
                     " kbit/s (sip.over_budget = \"cap\")";
          d.media.assign(in.wanted.size(), {});
          return d;
        }
        m.tias = static_cast<std::uint64_t>(capped);
        m.pad_bytes_per_s = pad_bytes_per_s(capped);
      }
      left -= m.pad_bytes_per_s;
    }
  }
  d.admitted = true;
  d.reason = over + "; capped with b=TIAS to fit";
  return d;
}

}  // namespace otpgate::gateway::admission

// SPDX-License-Identifier: LGPL-2.1-or-later
// Key-aware admission of call media ([sip], docs/sip.md "Admission"): pure arithmetic,
// with every input in one struct, so the numbers a refusal or a cap gives can be checked
// by hand. The gateway gathers the inputs (calls running, static streams' measured pad,
// key held in the send supply and the KME's store) and applies the decision.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "otpgate/sip.hpp"

namespace otpgate::gateway::admission {

// What happens to an offer whose new media do not fit the key budget (sip.over_budget).
enum class OverBudget {
  refuse,  // error-reason, the proxy answers 488
  cap,     // b=TIAS/b=AS towards the local endpoint, at what fits; refused below the floor
  aes,     // the media that do not fit run in AES-256-GCM keyed from QKD (both ways)
};
std::optional<OverBudget> over_budget_from(std::string_view name);  // "refuse", "cap", "aes"
const char* name_of(OverBudget policy);

// Packets per second a media of this payload rate is expected to send: 50 (20 ms audio
// frames), or 1200-byte packets when that is more.
double packets_per_s(double payload_bits_per_s);
// One-time pad a media uses per second: its payload plus 16 bytes of tag key per packet.
double pad_bytes_per_s(double payload_bits_per_s);
// The payload rate whose pad is `pad_bytes_per_s` (the inverse of pad_bytes_per_s; 0 when
// the pad does not even cover the tag keys of 50 packets/s).
double payload_bits_per_s(double pad_bytes_per_s);
// AES-256-GCM from QKD: one 44-byte master key per `rekey_interval` packets.
double aes_pad_bytes_per_s(double payload_bits_per_s, std::uint32_t rekey_interval);

// The lowest rate a cap may give a media section: audio, the lowest floor among its
// codecs (Opus 6 kbit/s, AMR 4.75, AMR-WB 6.6, Speex 2.15, G.722.1 24, iLBC 13.33; a
// fixed-rate codec such as PCMU or G.729 its own rate); video, 128 kbit/s; any other RTP
// media cannot be cut (its expected rate). Never above the expected rate.
double floor_bits_per_s(const sdp::Media& media);

struct Want {
  std::size_t index = 0;  // the media's place in the SDP (for messages)
  std::string type;       // audio, video, ...
  double bits_per_s = 0;  // expected payload rate (sdp::expected_bitrate)
  double floor_bits_per_s = 0;
};

struct Input {
  double key_rate_bytes_per_s = 0;  // sip.key_rate_bits_per_s / 8
  double calls_bytes_per_s = 0;     // expected pad of the call media running (OTP ones)
  std::size_t calls_running = 0;
  double static_bytes_per_s = 0;  // the static streams' pad, measured
  std::size_t static_streams = 0;
  double held_bytes = 0;  // key held: the send supply's rings + the KME's store for the link
  double horizon_s = 0;   // sip.admission_horizon_s; 0: the store is not counted
  OverBudget policy = OverBudget::refuse;
  std::uint32_t rekey_interval = 1024;  // policy.rekey_interval, for AES media's pad
  std::vector<Want> wanted;             // the offer's new media, in SDP order
};

struct Decision {
  bool admitted = false;
  std::string reason;  // why not (an error-reason), or what was done (a note)
  struct Media {
    bool aes = false;
    std::optional<std::uint64_t> tias;  // a cap (bit/s) when below the expected rate
    double pad_bytes_per_s = 0;         // what the media is then expected to take
  };
  std::vector<Media> media;       // per Input::wanted
  double budget_bytes_per_s = 0;  // key rate + held / horizon
  double free_bytes_per_s = 0;    // budget - calls - static streams
  double wanted_bytes_per_s = 0;  // the new media at their expected rates, in OTP
};

// budget = key rate + held / horizon (the store spread over the horizon: running the link
// above its rate for `horizon_s` empties the store no sooner); free = budget - calls -
// static streams. The new media fit when their pad is at most free; otherwise per policy:
// refuse; cap (audio first at their full rate, then the rest, each class sharing what is
// left equally, water-filling from the smallest want; refused when a media's share falls
// below its floor); aes (audio first, each media that still fits stays OTP, the others run
// in AES).
Decision decide(const Input& input);

}  // namespace otpgate::gateway::admission

// SPDX-License-Identifier: LGPL-2.1-or-later
// The bit rate a media section is expected to carry (for key-budget admission): what the
// SDP says (b=TIAS, b=AS), else a default per codec. The table is in docs/sip.md.
#include <algorithm>
#include <array>

#include "otpgate/sip.hpp"
#include "text.hpp"

namespace otpgate::sdp {

namespace {

using detail::lower;
using detail::number;

struct CodecRate {
  std::string_view media;     // "audio", "video"
  std::string_view encoding;  // lower case, as in a=rtpmap
  std::uint64_t bits_per_second;
};

// Payload bit rates a call of this codec typically uses; 0: carries no media of its own.
constexpr std::array<CodecRate, 21> kCodecs{{
    {"audio", "pcmu", 64'000},
    {"audio", "pcma", 64'000},
    {"audio", "g722", 64'000},
    {"audio", "opus", 64'000},
    {"audio", "g729", 8'000},
    {"audio", "ilbc", 15'200},
    {"audio", "gsm", 13'200},
    {"audio", "speex", 24'600},
    {"audio", "amr", 12'200},
    {"audio", "amr-wb", 23'850},
    {"audio", "g7221", 32'000},
    {"audio", "telephone-event", 0},
    {"audio", "cn", 0},
    {"video", "vp8", 1'500'000},
    {"video", "vp9", 1'500'000},
    {"video", "h264", 1'500'000},
    {"video", "h265", 1'500'000},
    {"video", "av1", 1'500'000},
    {"video", "h263-1998", 1'500'000},
    {"video", "h263", 1'500'000},
    {"video", "mp4v-es", 1'500'000},
}};

// Formats that repeat or protect another codec's packets, not a codec of their own.
constexpr std::array<std::string_view, 5> kNotCodecs{"red", "ulpfec", "flexfec", "rtx", "fec"};

// RFC 3551's static payload types a section may use without a=rtpmap.
std::string_view static_encoding(std::string_view pt) {
  if (pt == "0") return "pcmu";
  if (pt == "3") return "gsm";
  if (pt == "8") return "pcma";
  if (pt == "9") return "g722";
  if (pt == "13") return "cn";
  if (pt == "18") return "g729";
  if (pt == "34") return "h263";
  return {};
}

// Opus's a=fmtp maxaveragebitrate, when the endpoint states one.
std::optional<std::uint64_t> opus_max_average(const Media& media, std::string_view pt) {
  for (const auto& fmtp : attributes(media, "fmtp")) {
    const auto space = fmtp.find(' ');
    if (space == std::string::npos || std::string_view(fmtp).substr(0, space) != pt) continue;
    std::string_view params = std::string_view(fmtp).substr(space + 1);
    while (!params.empty()) {
      std::string_view p = params.substr(0, params.find(';'));
      params.remove_prefix(std::min(params.size(), p.size() + 1));
      while (!p.empty() && p.front() == ' ') p.remove_prefix(1);
      constexpr std::string_view kKey = "maxaveragebitrate=";
      if (p.starts_with(kKey)) return number(p.substr(kKey.size()));
    }
  }
  return std::nullopt;
}

}  // namespace

std::string encoding_of(const Media& media, std::string_view pt) {
  for (const auto& map : attributes(media, "rtpmap")) {
    const auto space = map.find(' ');
    if (space == std::string::npos || std::string_view(map).substr(0, space) != pt) continue;
    const std::string_view rest = std::string_view(map).substr(space + 1);
    return lower(rest.substr(0, rest.find('/')));
  }
  return std::string(static_encoding(pt));
}

std::optional<std::uint64_t> codec_bitrate(std::string_view media_type, std::string_view encoding) {
  const std::string name = lower(encoding);
  for (const auto& c : kCodecs) {
    if (c.media == media_type && c.encoding == name) return c.bits_per_second;
  }
  return std::nullopt;
}

Bitrate expected_bitrate(const Media& media) {
  if (media.rejected() || !media.rtp()) return {};
  std::optional<std::uint64_t> as;
  for (const auto& l : media.lines) {
    if (l.type != 'b') continue;
    const std::string_view v = l.value;
    if (v.starts_with("TIAS:")) {
      if (auto n = number(v.substr(5))) return {*n, Bitrate::Source::tias, {}};
    } else if (v.starts_with("AS:")) {
      if (auto n = number(v.substr(3)); n && *n <= UINT64_MAX / 1000) as = *n * 1000;
    }
  }
  if (as) return {*as, Bitrate::Source::as, {}};
  // The highest default among the offered codecs: the answer may pick any of them.
  Bitrate best{0, Bitrate::Source::none, {}};
  for (const auto& pt : media.formats) {
    const std::string encoding = encoding_of(media, pt);
    if (encoding.empty() ||
        std::find(kNotCodecs.begin(), kNotCodecs.end(), encoding) != kNotCodecs.end()) {
      continue;
    }
    std::optional<std::uint64_t> rate = codec_bitrate(media.type, encoding);
    if (encoding == "opus") {
      if (auto max = opus_max_average(media, pt)) rate = max;
    }
    if (!rate) {
      // Unknown codec: the class default (an audio codec at 64 kbit/s, video at 1.5 Mbit/s).
      if (media.type == "audio") rate = 64'000;
      if (media.type == "video") rate = 1'500'000;
    }
    if (rate && (best.source == Bitrate::Source::none || *rate > best.bits_per_second)) {
      best = {*rate, Bitrate::Source::codec, encoding};
    }
  }
  return best;
}

}  // namespace otpgate::sdp

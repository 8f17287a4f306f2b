// SPDX-License-Identifier: LGPL-2.1-or-later
// Key forecasts for one link (a peer and a direction): what key it holds (rings plus what
// the KME says it stores, sanity-checked), how long that lasts at the current rates,
// whether a session of a given length is covered, and when a transfer of so much pad
// finishes. Pure arithmetic, computed here once: the gateway's status API and the
// transfer service's job API publish these numbers, and the console and the web page
// show them. See docs/keys.md (Forecasts).
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <utility>

#include "otpgate/keyclient.hpp"

namespace otpgate::keys {

// What a KME's ETSI 014 status says it holds for a link (stored_key_count x key_size),
// checked for sense. Some KMEs count keys still pending for the pair, report a key size
// of 0, more keys than their own maximum, or counts no store could hold: such a report is
// not trusted and adds nothing (`reason` says why, for the operator).
struct KmeHeld {
  std::uint64_t bytes = 0;  // 0 when not trusted
  bool trusted = false;
  std::string reason;  // empty when trusted
};
KmeHeld kme_held(const KmeStatus& status);

// The rate of a counter that only grows (bytes fetched, bytes sent), over a sliding window
// of samples. A counter that goes back (a restarted service) starts the window over.
class RateWindow {
 public:
  explicit RateWindow(double window_seconds = 120) : window_(window_seconds) {}
  void add(double at_seconds, double total);
  // Per second over the samples in the window; nullopt with less than a second of them.
  std::optional<double> per_second() const;

 private:
  double window_;
  std::deque<std::pair<double, double>> samples_;
};

// One link's key as its supply and its KME report it.
struct LinkKeyState {
  std::uint64_t ring_bytes = 0;        // held ready in the key supply's rings
  std::optional<KmeStatus> kme;        // the KME's status for the pair (sending side), if known
  bool kme_counts_pending = false;     // the supply saw the KME count keys pending for the pair
  double refill_bytes_per_s = 0;       // key delivered to the link, measured (see RateWindow)
  double consumption_bytes_per_s = 0;  // pad used by every stream or transfer on the link
};

struct LinkForecast {
  std::uint64_t ring_bytes = 0, kme_bytes = 0, held_bytes = 0;  // held = ring + trusted KME
  bool kme_reported = false, kme_trusted = false;
  std::string kme_note;  // why the KME's count was set aside
  double refill_bytes_per_s = 0, consumption_bytes_per_s = 0;
  // Seconds until the held key is used up at the current rates (consumption above
  // refill); nullopt when it does not run out (refill keeps up, or nothing is used).
  std::optional<double> seconds_left;
};
LinkForecast forecast_link(const LinkKeyState& state);

// A session of `seconds` using `bytes_per_s` of pad on a link: the key it needs, against
// what the link holds plus what it refills meanwhile.
struct SessionForecast {
  double seconds = 0, needed_bytes = 0, available_bytes = 0, short_bytes = 0;
  bool covered = true;
};
SessionForecast forecast_session(const LinkForecast& link, double seconds, double bytes_per_s);

// Pad an OTP specimen transfer of `bytes` in `files` files uses: a byte per byte, 16 per
// record of `record_size` bytes and per 256 KiB epoch, and announcements (4 KiB).
std::uint64_t otp_transfer_key_bytes(std::uint64_t bytes, std::uint64_t files,
                                     std::uint64_t record_size);
// Pad an AES transfer uses: one 44-byte key per `rekey_records` records.
std::uint64_t aes_transfer_key_bytes(std::uint64_t bytes, std::uint64_t files,
                                     std::uint64_t record_size, std::uint64_t rekey_records);

// Seconds to use `key_bytes` more pad: what is held goes at `throughput_bytes_per_s` (the
// transfer's own pace, 0 when unknown), the rest as fast as the link refills. nullopt
// when the held key is short and nothing refills.
std::optional<double> seconds_to_use(double key_bytes, double held_bytes, double refill_bytes_per_s,
                                     double throughput_bytes_per_s = 0);

}  // namespace otpgate::keys

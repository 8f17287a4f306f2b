// SPDX-License-Identifier: LGPL-2.1-or-later
// Calls through the site's SIP proxy ([sip], issue 15): the gateway's ng::Handler. Each
// accepted RTP media of a call becomes a StreamConfig at run time (local RTP in ->
// otpencrypt -> partner gateway; partner -> otpdecrypt -> local endpoint), with four media
// ports of [sip] port_min-port_max and one call key lane per direction. See docs/sip.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "admission.hpp"
#include "otpgate/gateway.hpp"
#include "otpgate/sip.hpp"

namespace otpgate::gateway {

// What the call handler needs from the gateway's media side. Lanes are call lanes,
// 0 to max_media - 1, in the send and the receive key supply.
class CallMediaPlane {
 public:
  virtual ~CallMediaPlane() = default;
  // Builds and starts a stream; throws std::runtime_error when it cannot.
  virtual void add_stream(const StreamConfig& stream, std::size_t send_lane,
                          std::size_t receive_lane) = 0;
  // Points a running stream's peer_port, deliver_rtp and deliver_rtcp where `stream` says.
  virtual void retarget_stream(const StreamConfig& stream) = 0;
  virtual void remove_stream(const std::string& name) = 0;
  struct Counters {
    std::uint64_t packets_from_local = 0, packets_to_peer = 0;  // otpencrypt in, out
    std::uint64_t packets_from_peer = 0, packets_to_local = 0;  // otpdecrypt in, out
    std::uint64_t pad_bytes_send = 0, pad_bytes_receive = 0;    // key used
  };
  virtual std::optional<Counters> counters(const std::string& name) const = 0;
  // The send direction's key besides the calls, for admission (docs/sip.md, "Admission").
  struct LinkBudget {
    double held_bytes = 0;              // the send supply's rings + the KME's trusted store
    double static_pad_bytes_per_s = 0;  // the static streams' pad, measured (last 30 s)
    std::size_t static_streams = 0;     // static streams that send
  };
  virtual LinkBudget link_budget() const = 0;
};

class Calls final : public ng::Handler {
 public:
  using Clock = std::chrono::steady_clock;
  Calls(const GatewayConfig& config, CallMediaPlane& plane);
  ~Calls() override = default;
  Calls(const Calls&) = delete;
  Calls& operator=(const Calls&) = delete;

  std::string offer(const ng::Request& request) override;
  std::string answer(const ng::Request& request) override;
  std::optional<std::string> remove(const ng::Request& request) override;
  ng::QueryResult query(const ng::Request& request) override;
  std::vector<std::string> list(std::size_t limit) override;

  // Ends calls whose delete-delay is over, and calls that had no signal for
  // media_timeout_s while one of their sides (the local endpoint, the partner gateway)
  // sent nothing that long.
  void expire(Clock::time_point now);
  nlohmann::json status() const;    // the status API's "calls"
  nlohmann::json counters() const;  // for the status API's "sip"
  std::size_t free_send_lanes() const;
  std::size_t free_port_units() const;
  // The ng listener's clients (sip.ng_clients, resolved now; loopback only when absent)
  // and its log line for datagrams from others.
  ng::ListenerOptions listener_options() const;

 private:
  struct Media {
    std::string type, proto;
    bool active = false;                      // ports and a send lane held
    std::uint16_t base = 0;                   // base: OTP from the peer; base+2/+3: local RTP/RTCP
    std::size_t send_lane = 0;                // ours; named to the peer by a=x-otp-lane
    std::optional<std::size_t> receive_lane;  // the peer's send lane for this media
    std::optional<Endpoint> endpoint_rtp, endpoint_rtcp;  // the local conference system
    std::uint16_t peer_port = 0;
    std::string stream;          // non-empty once its pipelines run
    double pad_bytes_per_s = 0;  // expected, for admission (sip.key_rate_bits_per_s)
    std::string cipher = "otp";  // or "aes-256-gcm": both ways, agreed by a=x-otp-cipher
    std::optional<std::uint64_t> cap_bits_per_s;  // b=TIAS towards the local endpoint
    StreamConfig built;                           // what they run with
  };
  // An offer or answer as it came and the SDP it was answered with, so that the same
  // request again (a resent INVITE the proxy ran through rtpengine_offer again, a
  // retransmitted 200 OK) gets the same SDP and changes nothing.
  struct Exchange {
    std::string tag;  // from-tag of an offer, to-tag of an answer
    bool from_partner = false;
    std::string sdp, reply;
  };
  struct Call {
    std::string call_id, from_tag, to_tag;
    std::uint64_t number = 0;
    bool offer_from_partner = false;  // the latest offer's leg
    bool answered = false;
    std::int64_t created = 0, last_signal = 0;  // UNIX seconds
    Clock::time_point last_activity;            // the last signal
    // Each side's last sign of life: packets from the local endpoint, packets decrypted
    // from the partner gateway (garbage sent to the OTP port does not count).
    Clock::time_point local_alive, peer_alive;
    std::uint64_t last_from_local = 0, last_from_peer = 0;
    // The latest offer or answer holds a media (sendonly, recvonly, inactive, c=0.0.0.0):
    // media one way only (music on hold) is then what the call should carry.
    bool on_hold = false;
    std::optional<Exchange> last_offer, last_answer;
    std::set<std::string> answer_tags;           // to-tags answered: the branches of a forked call
    std::set<std::string> via_branches;          // via-branches offered
    std::string via_branch;                      // the latest offer's
    std::optional<Clock::time_point> delete_at;  // deleted with a delete-delay
    std::vector<Media> media;
  };
  struct Stats {
    std::uint64_t repeated_offers = 0, repeated_answers = 0, refused_full = 0, branch_deletes = 0,
                  delayed_deletes = 0, revived = 0, timed_out = 0, timed_out_one_way = 0;
  };
  // What one SDP says about each of its media, checked before anything is allocated.
  struct Leg {
    bool accepted = false;  // RTP, port != 0
    std::string type, proto;
    double bits_per_s = 0, floor_bits_per_s = 0;  // expected payload rate, lowest cap
    std::optional<std::string> partner_cipher;    // a=x-otp-cipher on a partner leg
    std::optional<Endpoint> rtp, rtcp;
    std::optional<std::size_t> peer_lane;
  };

  std::vector<Leg> read_leg(const sdp::Session& session, bool from_partner, const Call* call) const;
  // The cipher and cap of each of an offer's new media (per sip.over_budget); admit()
  // throws ng::Refused when they do not fit. apply() derives the expected pad from them.
  struct Admitted {
    std::string cipher = "otp";
    std::optional<std::uint64_t> cap_bits_per_s;
  };
  // `new_call`: an initial offer, refused as ng::Overloaded when no lane or port is free
  // (the proxy may try another instance); a re-INVITE's new media is refused plainly.
  void apply(Call& call, const std::vector<Leg>& legs,
             const std::vector<std::optional<Admitted>>& admitted, bool from_partner, bool new_call,
             std::vector<Media*>& allocated);
  std::string rewritten(sdp::Session session, const Call& call, bool towards_partner,
                        const ng::Request& request) const;
  std::vector<std::optional<Admitted>> admit(const std::vector<Leg>& legs, const Call* call) const;
  bool aes_allowed() const;
  void start_media(Call& call);
  void release(Media& media);
  void end(Call& call);
  std::optional<std::uint16_t> take_port_unit();
  CallMediaPlane::Counters totals(const Call& call) const;

  const GatewayConfig& config_;
  const SipConfig& sip_;
  CallMediaPlane& plane_;
  admission::OverBudget over_budget_;
  std::set<std::string> peer_addresses_;  // peer.address, resolved
  mutable std::mutex mutex_;
  std::map<std::string, Call> calls_;  // by call-id
  std::uint64_t next_number_ = 1;
  std::vector<bool> unit_used_;
  std::size_t next_unit_ = 0;
  std::deque<std::size_t> free_send_lanes_;  // least recently used first
  std::vector<bool> receive_lane_used_;
  Stats stats_;
  std::atomic<bool> told_osrtp_{false};  // the OSRTP-offer warning, once per process
};

}  // namespace otpgate::gateway

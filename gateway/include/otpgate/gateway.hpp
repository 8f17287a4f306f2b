// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-gateway: the site daemon between a conference system's RTP and the remote site.
// Config (TOML) -> per stream, two GStreamer pipelines (local RTP/RTCP in -> otpencrypt
// -> peer; peer -> otpdecrypt -> conference system), one key supply per stream and
// direction, and a status API (JSON and Prometheus). See docs/gateway.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "otpgate/config_error.hpp"
#include "otpgate/offline_checks.hpp"

namespace otpgate::gateway {

using config::ConfigError;
using config::Endpoint;

struct StreamConfig {
  std::string name;                      // "video-1", "audio-1", "content"
  std::uint16_t local_rtp_port = 0;      // the conference system sends RTP here
  std::uint16_t local_rtcp_port = 0;     // ... and RTCP here (0: none)
  std::uint16_t peer_port = 0;           // the peer gateway listens here for this stream
  std::uint16_t listen_port = 0;         // we listen here for this stream from the peer
  Endpoint deliver_rtp;                  // decrypted RTP from the remote site goes here
  std::optional<Endpoint> deliver_rtcp;  // ... and RTCP here
  std::string direction = "both";        // both | send | receive
  std::string cipher;                    // empty: policy.cipher (calls: per media, docs/sip.md)
  bool sends() const { return direction != "receive"; }
  bool receives() const { return direction != "send"; }
};

// [sip]: calls placed through the site's SIP proxy, which drives this gateway as its media
// relay over rtpengine's ng protocol (docs/sip.md). Each call media becomes a stream at run
// time, with ports from [port_min, port_max] and a key lane of its own in each direction.
struct SipConfig {
  Endpoint ng_listen{"127.0.0.1", 22222};            // the ng control socket (UDP; port 0: any)
  std::string media_address;                         // this gateway's address written into SDP
  std::uint16_t port_min = 30000, port_max = 30999;  // media ports, 4 per call media
  std::uint32_t max_media = 8;         // call media at once: key lanes reserved per direction
  std::uint32_t media_timeout_s = 60;  // a call with no packet and no signal this long ends
  // The key rate of the link towards the peer (bit/s, as the QKD operator states it); an
  // offer whose media would take the calls' expected pad use above it is refused. 0: off.
  std::uint64_t key_rate_bits_per_s = 0;
  // Key in store (the send supply's rings + the KME's store for the link) counts as this
  // much more rate: held / admission_horizon_s (a call may run above the key rate as long
  // as the store lasts that long). 0: the store is not counted.
  std::uint32_t admission_horizon_s = 3900;  // a 65-minute panel
  // An offer that does not fit: "refuse" (488), "cap" (b=TIAS towards the local endpoint)
  // or "aes" (the media that do not fit run in AES-256-GCM keyed from QKD).
  std::string over_budget = "refuse";
  // Who may send ng commands (the site's SIP proxies): host names or addresses, resolved at
  // start. Absent: loopback sources only, which needs ng_listen on loopback.
  std::vector<std::string> ng_clients;
  bool ng_clients_set = false;
  // Seconds a deleted call's media keep running when the delete names no delete-delay
  // (an ng delete-delay wins; 0: ended at once). rtpengine's own default is 30.
  std::uint32_t delete_delay_s = 0;
};

struct GatewayConfig : config::SiteConfig {  // [site], [kme], [peer] sae_id, [keys]
  std::string peer_address;
  std::string transport = "udp";          // udp | ice
  Endpoint ice_signalling_listen;         // ice: where the peer gateway reaches us
  Endpoint ice_peer_signalling;           // ice: where we reach the peer gateway
  std::optional<Endpoint> ice_stun;       // ice: STUN server for server-reflexive candidates
  std::string cipher = "otp";             // otp | aes-256-gcm
  std::string on_key_exhausted = "drop";  // drop | block | fallback-aes
  std::uint32_t rekey_interval = 1024;
  // [media] realtime_priority: 1-99 runs the media streaming threads SCHED_FIFO at that
  // priority (needs CAP_SYS_NICE or RLIMIT_RTPRIO, e.g. LimitRTPRIO= in systemd); 0 keeps
  // them time-shared at nice -10. Either falls back quietly to what the process may do.
  int realtime_priority = 0;
  // [media] cpu_wakeup_latency_us: while running, ask the kernel (PM QoS, by holding
  // /dev/cpu_dma_latency open) to keep idle CPUs where they wake within this many
  // microseconds; 0 keeps them out of sleep states altogether. Unset: no request. Needs
  // write access to the device; without it the gateway runs with one warning.
  std::optional<int> cpu_wakeup_latency_us;
  // [media] pin_threads: each of the call media threads (one per CPU the process may run
  // on, at most 4) stays on a CPU of its own, so that a datagram's wake-up neither moves
  // the thread nor, mostly, crosses CPUs. false: the kernel places them.
  bool pin_media_threads = true;
  // [media] batch_window_us: a call media thread busy enough to expect at least 3
  // datagrams within this window reads its sockets at most once per window, so that one
  // wake-up serves several datagrams (docs/gateway.md): less CPU per call for up to this
  // much latency per gateway. 0 (the default): every datagram wakes its thread.
  std::uint32_t media_batch_window_us = 0;
  std::filesystem::path cpu_latency_device = "/dev/cpu_dma_latency";  // tests point elsewhere
  // [media] key_wait_ms: how long a packet from the partner may wait for its key (this
  // site's KME still relaying it, typically at a stream's or call's start) before it is
  // dropped and counted (drops-no-key); later packets wait behind it, in order.
  std::uint32_t receive_key_wait_ms = 500;
  Endpoint status_listen{"127.0.0.1", 8080};
  // [status] server_names: names monitoring and the console reach the status API by,
  // besides loopback and the listen address (any other Host is refused: DNS rebinding).
  std::vector<std::string> status_server_names;
  // [status] unhealthy_after_s: how long a fault (KME down or refusing us, no key for
  // media, nothing back from the peer) lasts before health says unhealthy (/healthz 503).
  std::uint32_t unhealthy_after_s = 15;
  std::vector<StreamConfig> streams;  // static streams (may be empty with [sip])
  std::optional<SipConfig> sip;
};

// Reads and validates a config file; throws ConfigError with one readable line.
GatewayConfig load_config(const std::filesystem::path& path);
GatewayConfig parse_config(std::string_view toml_text, const std::string& source_name);
// What can be verified before running (TLS files, KME URL, state_dir, that the peer's
// names resolve, that every port to listen on is free); --check-config and start-up.
config::OfflineChecks check_offline(const GatewayConfig& config);

class Gateway {
 public:
  explicit Gateway(GatewayConfig config);
  ~Gateway();  // stops
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  void start();  // key supplies, pipelines, status API; throws with a readable reason
  void stop();   // pipelines to NULL, key supplies stopped (journals are already durable)

  std::string status_json() const;   // what /api/v1/status serves
  std::string metrics_text() const;  // what /metrics serves (Prometheus text format)
  std::uint16_t status_port() const;
  std::uint16_t ng_port() const;  // the ng control socket's port ([sip]; 0 without)
  // Fetched key wiped unused by stop() so far (QKD key spent for nothing), per direction.
  struct KeyWiped {
    std::uint64_t send_bytes = 0, receive_bytes = 0;
  };
  KeyWiped key_wiped_at_stop() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace otpgate::gateway

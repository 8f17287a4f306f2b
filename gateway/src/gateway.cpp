// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gst/gst.h>
#include <httplib.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "call_media_pump.hpp"
#include "calls.hpp"
#include "ice_session.hpp"
#include "media_threads.hpp"
#include "otpgate/forecast.hpp"
#include "otpgate/gateway.hpp"
#include "otpgate/hex.hpp"
#include "otpgate/http_edge.hpp"
#include "otpgate/keyclient.hpp"
#include "otpgate/otp_codec.hpp"
#include "otpgate/site_config.hpp"
#include "status_report.hpp"

namespace otpgate::gateway {

using nlohmann::json;

namespace {

struct PipelineDeleter {
  void operator()(GstElement* pipeline) const {
    gst_element_set_state(pipeline, GST_STATE_NULL);
    gst_object_unref(pipeline);
  }
};
using PipelinePtr = std::unique_ptr<GstElement, PipelineDeleter>;

struct ObjectUnref {
  void operator()(GstElement* e) const { gst_object_unref(e); }
};
using ElementPtr = std::unique_ptr<GstElement, ObjectUnref>;
struct CapsUnref {
  void operator()(GstCaps* c) const { gst_caps_unref(c); }
};
using CapsPtr = std::unique_ptr<GstCaps, CapsUnref>;
struct SocketUnref {
  void operator()(GSocket* s) const { g_object_unref(s); }
};
using SocketPtr = std::unique_ptr<GSocket, SocketUnref>;

// The family of the address udpsink will send to: the literal's, else the first address
// the name resolves to (as udpsink picks it); IPv4 when it does not resolve.
GSocketFamily address_family(const std::string& host) {
  in6_addr v6{};
  if (::inet_pton(AF_INET6, host.c_str(), &v6) == 1) return G_SOCKET_FAMILY_IPV6;
  in_addr v4{};
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return G_SOCKET_FAMILY_IPV4;
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr)
    return G_SOCKET_FAMILY_IPV4;
  const int first = found->ai_family;
  ::freeaddrinfo(found);
  return first == AF_INET6 ? G_SOCKET_FAMILY_IPV6 : G_SOCKET_FAMILY_IPV4;
}

// `host` as an address literal: itself when it is one, else the first address it resolves
// to; throws naming it when it does not resolve. For names looked up once, at start.
std::string numeric_host(const std::string& host) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
      rc != 0 || found == nullptr) {
    throw std::runtime_error("peer.address \"" + host + "\" does not resolve (" +
                             ::gai_strerror(rc) + "): fix the name or give an IP address");
  }
  // getnameinfo keeps an IPv6 zone (fe80::1%eth0), which inet_ntop would drop.
  char text[NI_MAXHOST] = {};
  const bool written = ::getnameinfo(found->ai_addr, found->ai_addrlen, text, sizeof text, nullptr,
                                     0, NI_NUMERICHOST) == 0;
  ::freeaddrinfo(found);
  return written ? std::string(text) : host;
}

std::string endpoint_text(const Endpoint& e) {
  return e.host + ":" + std::to_string(e.port);
}

// Starts call media pipelines (to PLAYING) off the ng request path: the answer returns
// once a media's sockets are bound and its pipelines built; starting them (the streaming
// threads, the codec sessions) is about half the build and runs here right after, while
// what arrives meanwhile waits in the bound sockets. One thread, in order. settle() is
// the only way a pipeline leaves: a start still queued is dropped, one under way is
// waited for, so no start ever runs on a pipeline being torn down.
class PipelineStarter {
 public:
  PipelineStarter() : thread_([this] { run(); }) {}
  ~PipelineStarter() {
    {
      const std::lock_guard lock(mutex_);
      stopping_ = true;
      for (auto& job : queue_) gst_object_unref(job.pipeline);
      queue_.clear();
    }
    changed_.notify_all();
    thread_.join();
  }
  PipelineStarter(const PipelineStarter&) = delete;
  PipelineStarter& operator=(const PipelineStarter&) = delete;

  // `started` runs on the starter's thread once the pipeline is PLAYING.
  void start(GstElement* pipeline, std::string name, std::function<void()> started = {}) {
    {
      const std::lock_guard lock(mutex_);
      queue_.push_back(
          {GST_ELEMENT(gst_object_ref(pipeline)), std::move(name), std::move(started)});
    }
    changed_.notify_all();
  }
  // Returns once `pipeline` has no start queued or under way.
  void settle(GstElement* pipeline) {
    std::unique_lock lock(mutex_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->pipeline == pipeline) {
        gst_object_unref(it->pipeline);
        queue_.erase(it);
        break;
      }
    }
    changed_.wait(lock, [&] { return starting_ != pipeline; });
  }

 private:
  struct Job {
    GstElement* pipeline;  // a reference of its own
    std::string name;
    std::function<void()> started;
  };
  void run() {
    std::unique_lock lock(mutex_);
    while (true) {
      changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      Job job = std::move(queue_.front());
      queue_.pop_front();
      starting_ = job.pipeline;
      lock.unlock();
      if (gst_element_set_state(job.pipeline, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE) {
        std::fprintf(stderr, "otp-gateway[error]: stream %s: its pipeline did not start\n",
                     job.name.c_str());
      } else if (job.started) {
        job.started();
      }
      gst_object_unref(job.pipeline);
      lock.lock();
      starting_ = nullptr;
      changed_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Job> queue_;
  GstElement* starting_ = nullptr;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once the rest is ready
};

}  // namespace

struct Gateway::Impl final : CallMediaPlane {
  struct Stream {
    StreamConfig config;
    std::optional<std::size_t> send_lane;     // in send_keys
    std::optional<std::size_t> receive_lane;  // in receive_keys
    // Call media: what moves their datagrams on the shared media loops
    // (call_media_pump.hpp). Declared before the pipeline so that the pipeline stops first
    // (what reaches it meanwhile is refused as FLUSHING), then its sockets are let go.
    std::unique_ptr<CallMediaPump> pump;
    PipelinePtr pipeline;
    ElementPtr encrypt, decrypt;
  };

  GatewayConfig config;
  std::unique_ptr<MediaScheduling> media;        // outlives the pipelines whose threads it counts
  std::unique_ptr<CpuWakeupLatency> cpu_wakeup;  // held while the gateway runs
  std::unique_ptr<HealthMonitor> health;
  std::unique_ptr<IceSession> ice_session;
  httplib::Server signalling_server;
  std::thread signalling_thread;
  std::mutex ice_mutex;
  std::condition_variable ice_changed;
  bool ice_remote_set = false;
  // [sip]: the threads that feed every call media's elements (before `streams`: the
  // call media's pumps use them until they end).
  std::unique_ptr<MediaLoops> media_loops;
  // [sip]: peer.address resolved once at start, so that no call's setup (on the ng
  // thread, under the calls' lock) waits for a name lookup.
  std::string call_peer_host;
  // Send lanes restarted because the partner restarted, and when (on_sender_restarted;
  // before `streams`, whose elements call it); those whose encryptors are still to be
  // told to draw a fresh AES key (by the bus thread, which walks the streams anyway).
  std::mutex partner_restart_mutex;
  std::map<std::size_t, std::chrono::steady_clock::time_point> partner_restart_at;
  std::set<std::size_t> lanes_to_rekey;
  // Static streams, then call streams as calls come and go (guarded by streams_mutex:
  // the ng listener adds and removes them while the status API and the bus thread read).
  std::list<Stream> streams;
  mutable std::mutex streams_mutex;
  std::size_t call_send_lane_base = 0, call_receive_lane_base = 0;  // first call lanes
  std::atomic<std::uint64_t> removed_receive_pad_used{0};           // of call streams ended
  // [sip] admission: the static streams' pad, measured (sampled with the health).
  mutable std::mutex static_pad_mutex;
  keys::RateWindow static_pad{30};
  const std::chrono::steady_clock::time_point created = std::chrono::steady_clock::now();
  std::unique_ptr<Calls> calls;               // [sip]
  std::unique_ptr<ng::Listener> ng_listener;  // [sip] ng_listen
  std::unique_ptr<PipelineStarter> starter;   // [sip] call media
  // One key supply per direction of the link, shared by the streams (a lane each): one
  // KME client and one batch in flight per SAE pair, and one ring's worth of key at stake
  // per direction rather than one per stream.
  std::unique_ptr<keys::KeySupply> send_keys;     // this site is master SAE
  std::unique_ptr<keys::KeySupply> receive_keys;  // this site is slave SAE
  httplib::Server status_server;
  std::thread status_thread;
  int status_port = 0;
  std::thread bus_thread;
  std::atomic<bool> running{false};
  std::atomic<std::uint64_t> key_wiped_at_stop{0};       // by every stop() of this gateway
  std::atomic<std::uint64_t> send_key_wiped_at_stop{0};  // of which, sending

  keys::KmeClientConfig kme_config() const {
    keys::KmeClientConfig k;
    k.base_url = config.kme_url;
    k.tls = {config.tls_cert, config.tls_key, config.tls_ca};
    return k;
  }

  // The two supplies, a lane for each stream that sends (receives).
  void make_key_supplies() {
    keys::KeySupplyConfig send;
    send.role = keys::SaeRole::master;
    send.peer_sae_id = config.peer_sae_id;
    send.ring_bytes = config.key_ring_bytes;
    send.ring_seconds = config.key_ring_ms / 1000.0;
    send.ring_min_bytes = std::min<std::size_t>(256u << 10, config.key_ring_bytes);
    send.announce_lead_seconds = config.announce_lead_ms / 1000.0;
    send.announce_min_bytes = send.ring_min_bytes;
    send.resync_interval = std::chrono::milliseconds(config.resync_ms);
    keys::KeySupplyConfig receive;
    receive.role = keys::SaeRole::slave;
    receive.peer_sae_id = config.peer_sae_id;
    receive.ring_bytes = 3 * config.key_ring_bytes;  // what the sender holds, plus reordering
    send.lanes = receive.lanes = 0;
    for (auto& s : streams) {
      if (s.config.sends()) {
        s.send_lane = send.lanes++;
        // Each stream keeps its own pad stream and journal (as when each had a supply).
        // SAE IDs are the KME's names and may hold any character: file_in keeps the
        // journal inside state_dir whatever they say.
        send.lane_journals.push_back(config::file_in(
            config.state_dir,
            config.sae_id + "-to-" + config.peer_sae_id + "-" + s.config.name + ".journal"));
      }
      if (s.config.receives()) s.receive_lane = receive.lanes++;
    }
    // [sip]: max_media lanes each way for calls, handed from call to call (a lane's pad
    // stream goes on with the next call, so no pad is ever used twice). The sender's lane
    // i is the receiver's lane i (a=x-otp-lane), so a receive lane always follows the
    // same pad stream.
    call_send_lane_base = send.lanes;
    call_receive_lane_base = receive.lanes;
    const std::size_t call_lanes = config.sip ? config.sip->max_media : 0;
    for (std::size_t i = 0; i < call_lanes; ++i) {
      send.lane_journals.push_back(
          config::file_in(config.state_dir, config.sae_id + "-to-" + config.peer_sae_id +
                                                "-call-lane-" + std::to_string(i) + ".journal"));
      ++send.lanes;
      ++receive.lanes;
    }
    if (send.lanes == 1) send.journal = send.lane_journals.front();
    if (send.lanes > 0) send_keys = std::make_unique<keys::KeySupply>(kme_config(), send);
    if (receive.lanes > 0) receive_keys = std::make_unique<keys::KeySupply>(kme_config(), receive);
  }

  // `pumped`: a call media, whose datagrams a CallMediaPump moves (no udpsrc/udpsink).
  void build(Stream& s, bool pumped = false) {
    const StreamConfig& c = s.config;
    const bool ice = ice_session != nullptr && !pumped;
    // Elements from their factories with typed properties: no config value is ever parsed
    // as pipeline text (a host name such as "10.0.0.2 ! fakesink" stays a host name).
    GstElement* bin = gst_pipeline_new(c.name.c_str());
    s.pipeline.reset(bin);
    auto make = [&](const char* factory, const char* name = nullptr) {
      GstElement* e = gst_element_factory_make(factory, name);
      if (!e) {
        throw std::runtime_error("stream " + c.name + ": cannot build its pipeline: no element \"" +
                                 factory + "\" (is the otp plugin on GST_PLUGIN_PATH, and " +
                                 "gstreamer1.0-plugins-good/-nice installed?)");
      }
      gst_bin_add(GST_BIN(bin), e);
      return e;
    };
    auto link = [&](GstElement* from, GstElement* to, const char* from_pad = nullptr) {
      if (!gst_element_link_pads(from, from_pad, to, nullptr)) {
        throw std::runtime_error("stream " + c.name + ": cannot link " + GST_ELEMENT_NAME(from) +
                                 " to " + GST_ELEMENT_NAME(to));
      }
    };
    auto caps = [](const char* media_type) {
      return CapsPtr(gst_caps_new_empty_simple(media_type));
    };
    // Symmetric RTP, as rtpengine does it: what leaves towards a party leaves from the port
    // that party sends to (decrypted RTP from the local RTP port, OTP from the port the
    // peer gateway sends to), so stateful firewalls and endpoints that latch onto the
    // source address accept it. One socket per port, shared by its udpsrc and udpsink;
    // the elements hold it, and it closes with the last of them.
    // A port that sends to an IPv6 party gets an IPv6 socket that takes IPv4 too (on ::,
    // IPV6_V6ONLY off); any other an IPv4 socket, as udpsrc binds by default.
    std::map<std::uint16_t, GSocketFamily> family;
    if (c.sends() && c.receives()) {
      family[c.local_rtp_port] = address_family(c.deliver_rtp.host);
      if (c.deliver_rtcp && c.local_rtcp_port && c.deliver_rtcp->port != c.deliver_rtp.port)
        family[c.local_rtcp_port] = address_family(c.deliver_rtcp->host);
      // Calls: the partner's address as resolved at start (no name lookup per call).
      if (!ice)
        family[c.listen_port] = address_family(pumped ? call_peer_host : config.peer_address);
    }
    std::map<std::uint16_t, SocketPtr> sockets;
    auto socket_on = [&](std::uint16_t port) -> GSocket* {
      if (auto found = sockets.find(port); found != sockets.end()) return found->second.get();
      const auto wanted = family.find(port);
      const GSocketFamily f = wanted == family.end() ? G_SOCKET_FAMILY_IPV4 : wanted->second;
      GError* error = nullptr;
      SocketPtr socket(g_socket_new(f, G_SOCKET_TYPE_DATAGRAM, G_SOCKET_PROTOCOL_UDP, &error));
      if (socket && f == G_SOCKET_FAMILY_IPV6 &&
          !g_socket_set_option(socket.get(), IPPROTO_IPV6, IPV6_V6ONLY, 0, &error)) {
        socket.reset();
      }
      if (socket) {
        GInetAddress* any = g_inet_address_new_any(f);
        GSocketAddress* address = g_inet_socket_address_new(any, port);
        g_object_unref(any);
        const bool bound = g_socket_bind(socket.get(), address, FALSE, &error);
        g_object_unref(address);
        if (!bound) socket.reset();
      }
      if (!socket) {
        const std::string why = error ? error->message : "unknown error";
        if (error) g_error_free(error);
        throw std::runtime_error("stream " + c.name + ": cannot bind UDP port " +
                                 std::to_string(port) + " (" + why +
                                 "): another program or stream uses it; choose another port");
      }
      return sockets.emplace(port, std::move(socket)).first->second.get();
    };
    auto udp_in = [&](std::uint16_t port, const char* media_type) {
      GstElement* e = make("udpsrc");
      g_object_set(e, "socket", socket_on(port), "close-socket", FALSE, "caps",
                   caps(media_type).get(), "buffer-size", 4194304, "retrieve-sender-address", FALSE,
                   nullptr);
      return e;
    };
    // `from`: the local port to send from (0: any, the kernel's choice).
    auto udp_out = [&](const std::string& host, std::uint16_t port, const char* name,
                       std::uint16_t from) {
      GstElement* e = make("udpsink", name);
      g_object_set(e, "host", host.c_str(), "port", gint{port}, "sync", FALSE, "async", FALSE,
                   nullptr);
      if (from != 0) {
        GSocket* socket = socket_on(from);
        const bool v6 = g_socket_get_family(socket) == G_SOCKET_FAMILY_IPV6;
        g_object_set(e, v6 ? "socket-v6" : "socket", socket, "close-socket", FALSE, nullptr);
      }
      return e;
    };
    if (pumped) {
      if (c.sends()) make("otpencrypt", "enc");
      if (c.receives()) make("otpdecrypt", "dec");
    }
    if (c.sends() && !pumped) {
      // Local RTP (and RTCP, muxed as in RFC 5761) -> otpencrypt -> the peer gateway.
      GstElement* mux = make("funnel", "mux");
      link(udp_in(c.local_rtp_port, "application/x-rtp"), mux);
      if (c.local_rtcp_port) link(udp_in(c.local_rtcp_port, "application/x-rtcp"), mux);
      GstElement* enc = make("otpencrypt", "enc");
      link(mux, enc);
      GstElement* out = nullptr;
      if (ice) {
        out = make("nicesink", "net_out");
        g_object_set(out, "sync", FALSE, "async", FALSE, nullptr);
      } else {
        out =
            udp_out(config.peer_address, c.peer_port, "net_out", c.receives() ? c.listen_port : 0);
      }
      link(enc, out);
    }
    if (c.receives() && !pumped) {
      // The peer gateway -> otpdecrypt -> the conference system.
      GstElement* in = nullptr;
      if (ice) {
        GstElement* source = make("nicesrc", "net_in");
        in = make("capsfilter");
        g_object_set(in, "caps", caps("application/x-otp").get(), nullptr);
        link(source, in);
      } else {
        in = udp_in(c.listen_port, "application/x-otp");
      }
      GstElement* dec = make("otpdecrypt", "dec");
      link(in, dec);
      link(dec, udp_out(c.deliver_rtp.host, c.deliver_rtp.port, "deliver_rtp",
                        c.sends() ? c.local_rtp_port : 0));
      GstElement* rtcp = nullptr;
      if (c.deliver_rtcp) {
        // With rtcp-mux (the endpoint's RTCP port is its RTP port) from the RTP port too.
        const bool muxed = c.deliver_rtcp->port == c.deliver_rtp.port;
        rtcp = udp_out(c.deliver_rtcp->host, c.deliver_rtcp->port, "deliver_rtcp",
                       !c.sends() ? 0
                       : muxed    ? c.local_rtp_port
                                  : c.local_rtcp_port);
      } else {
        rtcp = make("fakesink");
        g_object_set(rtcp, "sync", FALSE, "async", FALSE, nullptr);
      }
      link(dec, rtcp, "rtcp_src");
    }
    // Media threads ahead of everything else on the host (key refills included, which run
    // at normal priority): a streaming thread sets its own scheduling as it starts.
    GstBus* bus = gst_element_get_bus(bin);
    gst_bus_set_sync_handler(
        bus,
        [](GstBus*, GstMessage* message, gpointer data) -> GstBusSyncReply {
          if (GST_MESSAGE_TYPE(message) == GST_MESSAGE_STREAM_STATUS) {
            GstStreamStatusType type;
            gst_message_parse_stream_status(message, &type, nullptr);
            auto* media_scheduling = static_cast<MediaScheduling*>(data);
            if (type == GST_STREAM_STATUS_TYPE_ENTER) media_scheduling->enter();
            if (type == GST_STREAM_STATUS_TYPE_LEAVE) media_scheduling->leave();
          }
          return GST_BUS_PASS;
        },
        media.get(), nullptr);
    gst_object_unref(bus);
    if (c.sends()) {
      s.encrypt.reset(gst_bin_get_by_name(GST_BIN(bin), "enc"));
      g_object_set(s.encrypt.get(), "key-supply", &send_keys->lane(*s.send_lane), "rekey-interval",
                   config.rekey_interval, nullptr);
      gst_util_set_object_arg(G_OBJECT(s.encrypt.get()), "cipher", cipher_of(c).c_str());
      gst_util_set_object_arg(G_OBJECT(s.encrypt.get()), "on-key-exhausted",
                              config.on_key_exhausted.c_str());
      // A call's encryptor shares its thread with other calls: a packet waiting for key
      // (the call's first, or `block`) is held by the element instead.
      if (pumped) g_object_set(s.encrypt.get(), "non-blocking", TRUE, nullptr);
    }
    if (ice) {
      for (const char* name : {"net_out", "net_in"}) {
        if (GstElement* e = gst_bin_get_by_name(GST_BIN(bin), name)) {
          g_object_set(e, "agent", ice_session->agent(), "stream", ice_session->stream_id(c.name),
                       "component", 1u, nullptr);
          gst_object_unref(e);
        }
      }
    }
    if (c.receives()) {
      s.decrypt.reset(gst_bin_get_by_name(GST_BIN(bin), "dec"));
      // The window holds what the peer announces ahead (at most its key ring, which the
      // sites configure alike) twice over, for reordering: never smaller than that.
      const std::uint64_t epoch = otp::kEpochBytes;
      const std::uint64_t window = std::max<std::uint64_t>(
          16u << 20, (2 * config.key_ring_bytes + epoch - 1) / epoch * epoch);
      // AES only where this site runs the stream in AES or falls back to it: a stream this
      // site runs as one-time pad only (both ways: a call's media agree on one cipher) is
      // never run in AES by the partner unnoticed.
      const bool accept_aes =
          cipher_of(c) == "aes-256-gcm" || config.on_key_exhausted == "fallback-aes";
      g_object_set(s.decrypt.get(), "key-supply", &receive_keys->lane(*s.receive_lane),
                   "window-size", static_cast<guint64>(window), "key-wait",
                   guint{config.receive_key_wait_ms}, "accept-aes", gboolean{accept_aes}, nullptr);
      // The partner restarted: its new receivers follow this side's streams anew (a
      // static stream's signal restarts every static sending lane, receive-only or not; a
      // call's, its own lane).
      if (!pumped || s.send_lane) {
        if (pumped) {
          g_object_set_data(G_OBJECT(s.decrypt.get()), kSendLaneKey,
                            GUINT_TO_POINTER(static_cast<guint>(*s.send_lane + 1)));
        }
        g_signal_connect(s.decrypt.get(), "sender-restarted", G_CALLBACK(on_sender_restarted),
                         this);
      }
    }
    if (pumped) {
      CallMediaPump::Sockets bound;
      bound.local_rtp = socket_on(c.local_rtp_port);
      if (c.local_rtcp_port) bound.local_rtcp = socket_on(c.local_rtcp_port);
      bound.peer = socket_on(c.listen_port);
      s.pump = std::make_unique<CallMediaPump>(c.name, s.encrypt.get(), s.decrypt.get(), bound,
                                               pump_targets(c), *media_loops);
    }
  }

  // The partner gateway restarted (its sender of a stream resumed at a journal chunk
  // boundary): its new receivers know none of this side's announcements, and the keys
  // its old process fetched are gone from its KME, so they could follow only once this
  // side had used up the pad announced so far (a ring: half a minute of audio). The
  // sending lanes restart at pad never announced instead, as a call lane does for its
  // next call: every static one for a static stream's signal (the partner restarted as a
  // whole), the call's own for a call's. At most once per lane in kPartnerRestartHoldOff,
  // so that a lane restart the partner happens to read as a restart (its flush landing
  // on a chunk boundary, about once in 64) cannot start a ping-pong of wiped rings.
  static constexpr const char* kSendLaneKey = "otpgate-send-lane";
  static constexpr auto kPartnerRestartHoldOff = std::chrono::seconds(5);
  static void on_sender_restarted(GstElement* decrypt, gpointer data) {
    auto* impl = static_cast<Impl*>(data);
    if (!impl->send_keys) return;
    const guint call_lane = GPOINTER_TO_UINT(g_object_get_data(G_OBJECT(decrypt), kSendLaneKey));
    std::vector<std::size_t> lanes;
    if (call_lane != 0) {
      lanes.push_back(call_lane - 1);
    } else {
      for (std::size_t i = 0; i < impl->call_send_lane_base; ++i) lanes.push_back(i);
    }
    std::vector<std::size_t> restarted;
    for (const std::size_t lane : lanes) {
      {
        const std::lock_guard lock(impl->partner_restart_mutex);
        const auto now = std::chrono::steady_clock::now();
        auto [at, fresh] = impl->partner_restart_at.try_emplace(lane, now);
        if (!fresh && now - at->second < kPartnerRestartHoldOff) continue;
        at->second = now;
      }
      impl->send_keys->lane(lane).begin_stream();
      restarted.push_back(lane);
    }
    if (restarted.empty()) return;
    {  // AES master keys drawn from pad the partner's old process fetched are gone with it
      const std::lock_guard lock(impl->partner_restart_mutex);
      impl->lanes_to_rekey.insert(restarted.begin(), restarted.end());
    }
    const GstObject* pipeline = GST_OBJECT_PARENT(decrypt);
    std::fprintf(stderr,
                 "otp-gateway[info]: stream %s: the partner's sender restarted; %zu sending key "
                 "lane%s go%s on at pad never announced, so that its new receivers can "
                 "follow\n",
                 pipeline ? GST_OBJECT_NAME(pipeline) : "?", restarted.size(),
                 restarted.size() == 1 ? "" : "s", restarted.size() == 1 ? "es" : "");
  }

  CallMediaPump::Targets pump_targets(const StreamConfig& c) const {
    return {Endpoint{call_peer_host, c.peer_port}, c.deliver_rtp, c.deliver_rtcp};
  }

  const std::string& cipher_of(const StreamConfig& c) const {
    return c.cipher.empty() ? config.cipher : c.cipher;
  }

  // Starts a stream's pipelines (PLAYING); throws naming what failed.
  void play(Stream& s) {
    if (gst_element_set_state(s.pipeline.get(), GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE) {
      throw std::runtime_error("stream " + s.config.name +
                               ": its pipeline did not start (the element's error is in the "
                               "log above; a host that does not resolve, or an address family "
                               "this machine lacks?)");
    }
  }

  // CallMediaPlane: call streams, built and ended at run time.
  void add_stream(const StreamConfig& config_of_call, std::size_t send_lane,
                  std::size_t receive_lane) override {
    Stream s{config_of_call,
             call_send_lane_base + send_lane,
             call_receive_lane_base + receive_lane,
             nullptr,
             nullptr,
             nullptr,
             nullptr};
    build(s, true);  // throws naming the port it could not bind, the element it could not make
    keys::PadSource* lane = s.send_lane ? &send_keys->lane(*s.send_lane) : nullptr;
    starter->start(s.pipeline.get(), s.config.name, [pump = s.pump.get(), lane] {
      try {
        // The lane's pad stream goes on, but not from pad announced to the last call's
        // receiver. Here, before the first packet can reach the encryptor, and off the ng
        // request path: the refill thread wakes for it and fetches the call's first keys.
        if (lane) lane->begin_stream();
        pump->start();
      } catch (const std::exception& e) {  // the call ends at its media timeout
        std::fprintf(stderr, "otp-gateway[error]: %s\n", e.what());
      }
    });
    const std::lock_guard lock(streams_mutex);
    streams.push_back(std::move(s));
  }

  void retarget_stream(const StreamConfig& c) override {
    const std::lock_guard lock(streams_mutex);
    for (auto& s : streams) {
      if (s.config.name != c.name) continue;
      auto point = [&](const char* element, const std::string& host, std::uint16_t port) {
        if (GstElement* e = gst_bin_get_by_name(GST_BIN(s.pipeline.get()), element)) {
          g_object_set(e, "host", host.c_str(), "port", gint{port}, nullptr);
          gst_object_unref(e);
        }
      };
      if (s.pump) s.pump->retarget(pump_targets(c));
      point("net_out", config.peer_address, c.peer_port);
      point("deliver_rtp", c.deliver_rtp.host, c.deliver_rtp.port);
      if (c.deliver_rtcp) point("deliver_rtcp", c.deliver_rtcp->host, c.deliver_rtcp->port);
      s.config = c;
    }
  }

  void remove_stream(const std::string& name) override {
    std::list<Stream> ended;
    {
      const std::lock_guard lock(streams_mutex);
      for (auto it = streams.begin(); it != streams.end(); ++it) {
        if (it->config.name == name) {
          ended.splice(ended.end(), streams, it);
          break;
        }
      }
    }
    for (auto& s : ended) {
      starter->settle(s.pipeline.get());
      // What its decryptor fetched and used counts at stop (key wiped unused).
      if (s.decrypt) {
        removed_receive_pad_used +=
            element_stats(s.decrypt.get()).value("pad-bytes-used", std::uint64_t{0});
      }
    }
  }  // pipelines to NULL here, outside the lock

  LinkBudget link_budget() const override {
    LinkBudget b;
    if (send_keys) {
      const keys::KeySupplyStats st = send_keys->stats();
      keys::LinkKeyState state;
      state.ring_bytes = st.bytes_available;
      state.kme = st.kme_status;
      state.kme_counts_pending = st.kme_replaces_batches;
      b.held_bytes = static_cast<double>(keys::forecast_link(state).held_bytes);
    }
    for (const auto& s : config.streams) b.static_streams += s.sends() ? 1 : 0;
    const std::lock_guard lock(static_pad_mutex);
    b.static_pad_bytes_per_s = static_pad.per_second().value_or(0);
    return b;
  }

  std::optional<Counters> counters(const std::string& name) const override {
    const std::lock_guard lock(streams_mutex);
    for (const auto& s : streams) {
      if (s.config.name != name) continue;
      Counters c;
      if (s.encrypt) {
        const json st = element_stats(s.encrypt.get());
        c.packets_from_local = st.value("packets-in", std::uint64_t{0});
        c.packets_to_peer = st.value("packets-out", std::uint64_t{0});
        c.pad_bytes_send = st.value("pad-bytes-used", std::uint64_t{0});
      }
      if (s.decrypt) {
        const json st = element_stats(s.decrypt.get());
        c.packets_from_peer = st.value("packets-in", std::uint64_t{0});
        c.packets_to_local = st.value("packets-out", std::uint64_t{0});
        c.pad_bytes_receive = st.value("pad-bytes-used", std::uint64_t{0});
      }
      return c;
    }
    return std::nullopt;
  }

  // ICE descriptions travel sealed with QKD key (encrypted and Wegman-Carter
  // authenticated): this site fetches fresh keys as master SAE, the peer fetches the same
  // ones as slave SAE by their key_IDs. No other credentials are needed.
  std::string seal(const std::string& text) {
    keys::KmeClient kme(kme_config());
    const auto status = kme.status(config.peer_sae_id);
    const std::uint32_t bits = keys::choose_key_size(status, 0);
    const std::size_t need = otp::kAuthKeyBytes + otp::kMaskBytes + text.size();
    const auto count = static_cast<std::uint32_t>((need + bits / 8 - 1) / (bits / 8));
    auto fetched = kme.enc_keys(config.peer_sae_id, count, bits);
    std::vector<std::uint8_t> pad;
    json ids = json::array();
    for (const auto& k : fetched) {
      pad.insert(pad.end(), k.bytes.span().begin(), k.bytes.span().end());
      ids.push_back(k.id.to_string());
    }
    const auto sealed =
        otp::seal_message(pad, {reinterpret_cast<const std::uint8_t*>(text.data()), text.size()});
    OPENSSL_cleanse(pad.data(), pad.size());
    return json{{"from", config.sae_id}, {"key_IDs", ids}, {"sealed", to_hex(sealed)}}.dump();
  }

  std::string open(const std::string& message) {
    const json m = json::parse(message, nullptr, false);
    if (!m.is_object() || !m.contains("key_IDs") || !m.contains("sealed") ||
        m.value("from", "") != config.peer_sae_id) {
      throw std::runtime_error("ICE: a signalling message that is not from " + config.peer_sae_id);
    }
    // Checked before any key is fetched for it.
    const auto sealed =
        m["sealed"].is_string() ? from_hex(m["sealed"].get<std::string>()) : std::nullopt;
    if (!sealed) throw std::runtime_error("ICE: a signalling message whose \"sealed\" is not hex");
    std::vector<keys::KeyId> ids;
    for (const auto& id : m["key_IDs"]) {
      auto parsed = keys::KeyId::parse(id.is_string() ? id.get<std::string>() : "");
      if (!parsed) throw std::runtime_error("ICE: malformed key_ID in a signalling message");
      ids.push_back(*parsed);
    }
    keys::KmeClient kme(kme_config());
    auto fetched = kme.dec_keys(config.peer_sae_id, ids);
    std::vector<std::uint8_t> pad;
    for (const auto& k : fetched)
      pad.insert(pad.end(), k.bytes.span().begin(), k.bytes.span().end());
    const auto plain = otp::open_message(pad, *sealed);
    OPENSSL_cleanse(pad.data(), pad.size());
    if (!plain) throw std::runtime_error("ICE: a signalling message failed authentication");
    return std::string(plain->begin(), plain->end());
  }

  // Gathers candidates, exchanges descriptions with the peer, waits for connectivity.
  void connect_ice() {
    std::vector<std::string> names;
    for (const auto& c : config.streams) names.push_back(c.name);
    const bool controlling = config.sae_id < config.peer_sae_id;
    ice_session = std::make_unique<IceSession>(controlling, names,
                                               config.ice_stun ? config.ice_stun->host : "",
                                               config.ice_stun ? config.ice_stun->port : 0u);
    if (!ice_session->gather(std::chrono::seconds(10))) {
      throw std::runtime_error("ICE: candidate gathering timed out");
    }
    const std::string local = ice_session->local_description();
    signalling_server.Post(
        "/api/v1/ice", [this, local](const httplib::Request& req, httplib::Response& res) {
          try {
            const std::string remote = open(req.body);
            std::lock_guard lock(ice_mutex);
            if (!ice_remote_set) ice_session->set_remote_description(remote);
            ice_remote_set = true;
            ice_changed.notify_all();
            res.set_content(seal(local), "application/json");
          } catch (const std::exception& e) {
            res.status = 403;
            res.set_content(json{{"message", e.what()}}.dump(), "application/json");
          }
        });
    // Messages are sealed with QKD key, so any Host may carry them; limits still apply.
    const Endpoint& listen = config.ice_signalling_listen;
    const bool bound = http_edge::bind(signalling_server, listen.host, listen.port,
                                       http_edge::Limits{.max_connections = 16}) > 0;
    if (!bound) {
      throw std::runtime_error("ice.signalling_listen " + endpoint_text(listen) +
                               ": cannot listen (in use?)");
    }
    signalling_thread = std::thread([this] {
      ::pthread_setname_np(::pthread_self(), "otp-signalling");
      signalling_server.listen_after_bind();
    });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    if (controlling) {
      httplib::Client peer(config.ice_peer_signalling.host, config.ice_peer_signalling.port);
      peer.set_read_timeout(20, 0);
      std::string last = "no answer";
      bool done = false;
      while (!done && std::chrono::steady_clock::now() < deadline) {
        auto res = peer.Post("/api/v1/ice", seal(local), "application/json");
        if (res && res->status == 200) {
          ice_session->set_remote_description(open(res->body));
          done = true;
        } else {
          last = res ? "HTTP " + std::to_string(res->status) + ": " + res->body
                     : httplib::to_string(res.error());
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
        }
      }
      if (!done) {
        throw std::runtime_error("ICE: the peer gateway at " +
                                 endpoint_text(config.ice_peer_signalling) + " did not answer (" +
                                 last + ")");
      }
    } else {
      std::unique_lock lock(ice_mutex);
      if (!ice_changed.wait_until(lock, deadline, [this] { return ice_remote_set; })) {
        throw std::runtime_error("ICE: the peer gateway never sent its description to " +
                                 endpoint_text(listen));
      }
    }
    if (!ice_session->wait_connected(std::chrono::seconds(20))) {
      throw std::runtime_error(
          "ICE: the streams did not connect (blocked UDP? set ice.stun behind NAT)");
    }
  }

  void watch_buses() {
    ::pthread_setname_np(::pthread_self(), "otp-bus");
    auto last_expiry = std::chrono::steady_clock::now();
    auto last_health = std::chrono::steady_clock::time_point{};
    const auto health_every = std::clamp<std::chrono::milliseconds>(
        std::chrono::milliseconds(config.unhealthy_after_s * 1000 / 4),
        std::chrono::milliseconds(100), std::chrono::seconds(1));
    while (running) {
      if (calls && std::chrono::steady_clock::now() - last_expiry >= std::chrono::seconds(1)) {
        last_expiry = std::chrono::steady_clock::now();
        calls->expire(last_expiry);
      }
      std::unique_lock lock(streams_mutex);
      rekey_restarted_lanes();
      for (auto& s : streams) {
        GstBus* bus = gst_element_get_bus(s.pipeline.get());
        while (GstMessage* m = gst_bus_pop_filtered(
                   bus, static_cast<GstMessageType>(GST_MESSAGE_ERROR | GST_MESSAGE_WARNING))) {
          GError* err = nullptr;
          gchar* debug = nullptr;
          const bool is_error = GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR;
          if (is_error) {
            gst_message_parse_error(m, &err, &debug);
          } else {
            gst_message_parse_warning(m, &err, &debug);
          }
          std::fprintf(stderr, "otp-gateway[%s]: stream %s: %s\n", is_error ? "error" : "warning",
                       s.config.name.c_str(), err->message);
          g_error_free(err);
          g_free(debug);
          gst_message_unref(m);
        }
        gst_object_unref(bus);
      }
      lock.unlock();
      // Once a second (four times per unhealthy_after_s when that is shorter, so that no
      // single sample decides a verdict): a sample reads every stream's stats (a
      // GstStructure each way), about 0.35 ms of CPU per second per call at ten a second,
      // which the media path had to beat rtpengine's SRTP relaying with.
      if (std::chrono::steady_clock::now() - last_health >= health_every) {
        last_health = std::chrono::steady_clock::now();
        observe_health();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  // With streams_mutex held: the encryptors of lanes restarted for a partner restart draw
  // a fresh AES master key for their next AES packet (otpencrypt's "rekey"). Here, not in
  // on_sender_restarted: a streaming thread never waits for streams_mutex.
  void rekey_restarted_lanes() {
    std::set<std::size_t> lanes;
    {
      const std::lock_guard lock(partner_restart_mutex);
      lanes.swap(lanes_to_rekey);
    }
    for (const auto& s : streams) {
      if (s.encrypt && s.send_lane && lanes.contains(*s.send_lane))
        g_signal_emit_by_name(s.encrypt.get(), "rekey");
    }
  }

  void observe_health() {
    HealthMonitor::Sample sample{HealthMonitor::Clock::now(), {}, {}};
    std::uint64_t static_pad_used = 0;
    std::size_t index = 0;
    std::unique_lock lock(streams_mutex);
    for (const auto& s : streams) {
      const bool is_static = index++ < config.streams.size();  // they come first
      HealthMonitor::StreamSample t;
      t.name = s.config.name;
      t.sends = s.encrypt != nullptr;
      t.receives = s.decrypt != nullptr;
      if (s.encrypt) {
        const json st = element_stats(s.encrypt.get());
        t.packets_in = st.value("packets-in", std::uint64_t{0});
        t.packets_to_peer = st.value("packets-out", std::uint64_t{0});
        t.aes_fallback = st.value("aes-fallback", false);
        if (is_static) static_pad_used += st.value("pad-bytes-used", std::uint64_t{0});
      }
      if (s.decrypt) {
        const json st = element_stats(s.decrypt.get());
        t.packets_from_peer = st.value("packets-in", std::uint64_t{0});
        t.memory_lock_failures = st.value("memory-lock-failures", std::uint64_t{0});
      }
      sample.streams.push_back(std::move(t));
    }
    lock.unlock();
    {
      const std::lock_guard pad_lock(static_pad_mutex);
      static_pad.add(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - created).count(),
          static_cast<double>(static_pad_used));
    }
    if (send_keys) sample.supplies.push_back({"send", send_keys->stats()});
    if (receive_keys) sample.supplies.push_back({"receive", receive_keys->stats()});
    health->observe(sample);
  }

  json media_status() const {
    json m = media->status();
    cpu_wakeup->describe(m);
    if (media_loops) {
      json cpus = json::array(), wakeups = json::array(), datagrams = json::array(),
           paced = json::array();
      for (const auto& t : media_loops->thread_stats()) {
        cpus.push_back(t.cpu ? json(*t.cpu) : json());
        wakeups.push_back(t.wakeups);
        datagrams.push_back(t.datagrams);
        paced.push_back(t.paced);
      }
      m["call_media_threads"] = cpus.size();
      m["call_media_thread_cpus"] = std::move(cpus);
      m["call_media_batch_window_us"] = media_loops->batch_window().count();
      m["call_media_wakeups"] = std::move(wakeups);
      m["call_media_datagrams"] = std::move(datagrams);
      m["call_media_paced_wakeups"] = std::move(paced);
    }
    return m;
  }

  json status() const {
    json out{{"site", config.site_name},
             {"sae_id", config.sae_id},
             {"peer", {{"sae_id", config.peer_sae_id}, {"address", config.peer_address}}},
             {"policy",
              {{"cipher", config.cipher},
               {"on_key_exhausted", config.on_key_exhausted},
               {"rekey_interval", config.rekey_interval}}},
             {"kme", {{"url", config.kme_url}}},
             {"media_threads", media_status()},
             {"key_wiped_at_stop_bytes", key_wiped_at_stop.load()},
             {"running", running.load()},
             {"health", health->report()}};
    // Before the streams' lock: the calls read their streams' counters through it.
    out["calls"] = calls ? calls->status() : json::array();
    if (calls) {
      out["sip"] = {{"ng_port", ng_listener ? ng_listener->port() : 0},
                    {"max_media", config.sip->max_media},
                    {"free_media", calls->free_send_lanes()},
                    {"free_port_units", calls->free_port_units()}};
      out["sip"].update(calls->counters());
      if (ng_listener) {
        const ng::Counters& c = ng_listener->counters();
        out["sip"]["ng"] = {{"datagrams", c.datagrams.load()},
                            {"retransmissions", c.retransmissions.load()},
                            {"errors", c.errors.load()},
                            {"overloaded", c.overloaded.load()},
                            {"cookie_reused", c.cookie_reused.load()},
                            {"unlisted", c.unlisted.load()}};
      }
    }
    bool healthy = true;
    json list = json::array();
    std::unique_lock lock(streams_mutex);
    for (const auto& s : streams) {
      json stream{
          {"name", s.config.name},
          {"local_rtp_port", s.config.local_rtp_port},
          {"peer_port", s.config.peer_port},
          {"listen_port", s.config.listen_port},
          {"deliver_rtp", endpoint_text(s.config.deliver_rtp)},
          {"direction", s.config.direction},
          {"cipher", cipher_of(s.config)},
          {"send", s.encrypt ? element_stats(s.encrypt.get()) : json(nullptr)},
          {"receive", s.decrypt ? element_stats(s.decrypt.get()) : json(nullptr)},
          {"key_supply",
           {{"send",
             s.send_lane ? supply_json(send_keys->lane_stats(*s.send_lane)) : json(nullptr)},
            {"receive", s.receive_lane ? supply_json(receive_keys->lane_stats(*s.receive_lane))
                                       : json(nullptr)}}}};
      list.push_back(std::move(stream));
    }
    lock.unlock();
    if (send_keys) healthy = send_keys->stats().kme_healthy;
    out["kme"]["healthy"] = healthy;
    out["links"] = links_json(list, config.peer_sae_id,
                              send_keys ? std::optional(send_keys->stats()) : std::nullopt,
                              receive_keys ? std::optional(receive_keys->stats()) : std::nullopt);
    out["streams"] = std::move(list);
    return out;
  }
};

Gateway::Gateway(GatewayConfig config) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->media = std::make_unique<MediaScheduling>(impl_->config.realtime_priority);
  impl_->cpu_wakeup = std::make_unique<CpuWakeupLatency>(impl_->config.cpu_wakeup_latency_us,
                                                         impl_->config.cpu_latency_device);
  impl_->health = std::make_unique<HealthMonitor>(
      std::chrono::seconds(impl_->config.unhealthy_after_s), impl_->config.kme_url,
      impl_->config.peer_address, impl_->config.on_key_exhausted);
  if (!gst_is_initialized()) gst_init(nullptr, nullptr);
}

Gateway::~Gateway() {
  stop();
}

void Gateway::start() {
  Impl& g = *impl_;
  if (g.running) return;
  if (g.config.sip) g.call_peer_host = numeric_host(g.config.peer_address);
  std::filesystem::create_directories(g.config.state_dir);
  g.cpu_wakeup->hold();
  if (g.config.transport == "ice") g.connect_ice();
  for (const auto& c : g.config.streams)
    g.streams.push_back(
        Impl::Stream{c, std::nullopt, std::nullopt, nullptr, nullptr, nullptr, nullptr});
  g.make_key_supplies();
  for (auto& s : g.streams) g.build(s);
  for (auto* supply : {g.send_keys.get(), g.receive_keys.get()}) {
    if (supply) supply->start();
  }
  for (auto& s : g.streams) g.play(s);
  if (g.config.sip) {
    g.starter = std::make_unique<PipelineStarter>();
    // A thread per CPU the process may use (not per CPU the machine has: a gateway given
    // two of sixteen by taskset or CPUAffinity= runs two), at most four.
    const std::vector<int> cpus = allowed_cpus();
    const std::size_t threads = std::clamp<std::size_t>(cpus.size(), 1, 4);
    std::vector<int> pins;
    if (g.config.pin_media_threads) pins.assign(cpus.begin(), cpus.begin() + threads);
    g.media_loops =
        std::make_unique<MediaLoops>(threads, std::move(pins), g.media.get(),
                                     std::chrono::microseconds(g.config.media_batch_window_us));
    g.calls = std::make_unique<Calls>(g.config, g);
    const Endpoint& at = g.config.sip->ng_listen;
    try {
      g.ng_listener =
          std::make_unique<ng::Listener>(*g.calls, at.host, at.port, g.calls->listener_options());
    } catch (const std::exception& e) {
      throw std::runtime_error("sip.ng_listen " + endpoint_text(at) + ": cannot listen (" +
                               e.what() + ")");
    }
  }
  g.running = true;
  g.bus_thread = std::thread([&g] { g.watch_buses(); });
  // Ready when every stream holds key to send with; a KME that is down at start is
  // reported and survived (media flows as soon as keys come).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (auto& s : g.streams) {
    if (!s.send_lane) continue;
    const keys::PadSource& lane = g.send_keys->lane(*s.send_lane);
    // A KME that replaces unfetched batches gives a stream key once it is used.
    auto waiting = [&] {
      return lane.available() == 0 && !g.send_keys->stats().kme_replaces_batches;
    };
    while (waiting() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (waiting()) {
      // Without any key yet there is no AES key either: only block holds packets back.
      const char* meanwhile = g.config.on_key_exhausted == "block"
                                  ? "its packets wait for it"
                                  : "its packets are dropped until it comes";
      std::fprintf(stderr, "otp-gateway[warning]: stream %s has no key yet (%s); %s\n",
                   s.config.name.c_str(), g.send_keys->stats().last_error.c_str(), meanwhile);
    }
  }

  // Read-only, but a rebound page must not read it either: only this service's names.
  auto names = std::make_shared<http_edge::ServiceNames>(g.config.status_listen.host,
                                                         g.config.status_server_names, false);
  g.status_server.set_pre_routing_handler(
      [names](const httplib::Request& req, httplib::Response& res) {
        const std::string host = req.get_header_value("Host");
        if (names->names_this_service(host)) return httplib::Server::HandlerResponse::Unhandled;
        res.status = 403;
        res.set_content(json{{"error", "request for host \"" + http_edge::clipped(host) +
                                           "\" refused: not a name of this service (add it to "
                                           "status.server_names)"}}
                                .dump() +
                            "\n",
                        "application/json");
        return httplib::Server::HandlerResponse::Handled;
      });
  g.status_server.Get("/api/v1/status", [&g](const httplib::Request&, httplib::Response& res) {
    res.set_content(g.status().dump(2), "application/json");
  });
  g.status_server.Get("/metrics", [&g](const httplib::Request&, httplib::Response& res) {
    res.set_content(gateway::metrics_text(g.status()), "text/plain; version=0.0.4");
  });
  // For systemd, load balancers and monitoring: 503 while unhealthy, with the reasons.
  g.status_server.Get("/healthz", [&g](const httplib::Request&, httplib::Response& res) {
    const json health = g.health->report();
    if (health["status"] == "unhealthy") res.status = 503;
    res.set_content(health.dump() + "\n", "application/json");
  });
  const Endpoint& listen = g.config.status_listen;
  g.status_port = http_edge::bind(g.status_server, listen.host, listen.port,
                                  http_edge::Limits{.max_body_bytes = 64u << 10});
  if (g.status_port <= 0) {
    throw std::runtime_error("status.listen " + endpoint_text(listen) +
                             ": cannot listen (in use?)");
  }
  names->set_port(static_cast<std::uint16_t>(g.status_port));
  g.status_thread = std::thread([&g] {
    ::pthread_setname_np(::pthread_self(), "otp-status");
    g.status_server.listen_after_bind();
  });
  while (!g.status_server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void Gateway::stop() {
  Impl& g = *impl_;
  if (g.status_thread.joinable()) {
    g.status_server.stop();
    g.status_thread.join();
  }
  g.ng_listener.reset();  // no call starts or ends from here on
  g.running = false;
  if (g.bus_thread.joinable()) g.bus_thread.join();
  g.calls.reset();
  g.starter.reset();  // after the calls (their streams settle with it), before the pipelines
  // Pipelines first (they use the key supplies), then the supplies. A receiver's fetched
  // key sits in its decryptor's pad window, which is wiped with it: what was fetched and
  // not used.
  std::uint64_t receive_pad_used = g.removed_receive_pad_used.exchange(0);
  for (auto& s : g.streams) {
    if (s.decrypt) {
      const json st = element_stats(s.decrypt.get());
      receive_pad_used += st.value("pad-bytes-used", std::uint64_t{0});
    }
    s.encrypt.reset();
    s.decrypt.reset();
    s.pipeline.reset();
    s.pump.reset();  // after its pipeline stopped
  }
  for (auto* supply : {g.send_keys.get(), g.receive_keys.get()}) {
    if (!supply) continue;
    supply->stop();  // the key it held is wiped with it: QKD key spent for nothing
    const auto stats = supply->stats();
    std::uint64_t wiped = stats.bytes_wiped_at_stop;
    if (supply == g.receive_keys.get())
      wiped = stats.bytes_fetched - std::min(stats.bytes_fetched, receive_pad_used);
    g.key_wiped_at_stop += wiped;
    if (supply == g.send_keys.get()) g.send_key_wiped_at_stop += wiped;
  }
  g.streams.clear();
  g.send_keys.reset();
  g.receive_keys.reset();
  g.cpu_wakeup->release();
  if (g.signalling_thread.joinable()) {
    g.signalling_server.stop();
    g.signalling_thread.join();
  }
  g.ice_session.reset();
}

std::string Gateway::status_json() const {
  return impl_->status().dump(2);
}
std::string Gateway::metrics_text() const {
  return gateway::metrics_text(impl_->status());
}
Gateway::KeyWiped Gateway::key_wiped_at_stop() const {
  const std::uint64_t send = impl_->send_key_wiped_at_stop;
  return {send, impl_->key_wiped_at_stop - send};
}
std::uint16_t Gateway::ng_port() const {
  return impl_->ng_listener ? impl_->ng_listener->port() : 0;
}
std::uint16_t Gateway::status_port() const {
  return static_cast<std::uint16_t>(impl_->status_port);
}

}  // namespace otpgate::gateway

// SPDX-License-Identifier: LGPL-2.1-or-later
// Call media without a GStreamer streaming thread per socket (docs/sip.md, "Media path").
// A call media is two elements, otpencrypt and otpdecrypt, in a pipeline of their own (for
// its bus and its state). Instead of udpsrc/funnel/udpsink around them, a few threads
// (MediaLoops, one per core) wait on every call media's sockets with epoll and hand each
// datagram to the element through a pad of their own, as GstHarness does in the tests;
// what the elements push out leaves from the socket the other party sends to (symmetric
// RTP). Every byte of protection is the elements' own work, exactly as in a pipeline: the
// pump only moves datagrams. The encryptor runs non-blocking (a packet waiting for key is
// held by the element, not by the thread), so no call holds up another. It exists because
// the source threads of a pipeline per media, their poll() per packet and the per-buffer
// work of five more elements cost a call about half again the CPU of rtpengine's SRTP
// relaying (bench/bench_sip.cpp), and a thread per socket or per media costs more than a
// thread per core.
#pragma once

#include <gio/gio.h>
#include <gst/gst.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "otpgate/gateway.hpp"

namespace otpgate::gateway {

class MediaScheduling;

// The threads that move every call media's datagrams into its elements: a few (one per
// core), each with its own epoll. A media's sockets all go on one thread (pick()), so its
// datagrams keep their order and its elements are never pushed into from two threads at
// once. Outlives every pump that uses it.
class MediaLoops {
 public:
  // With `pin_cpus` (one per thread, or empty), thread i stays on CPU pin_cpus[i]. A busy
  // thread reads its sockets at most once per `batch_window` (0: at every datagram).
  // Returns once every thread runs.
  MediaLoops(std::size_t threads, std::vector<int> pin_cpus, MediaScheduling* scheduling,
             std::chrono::microseconds batch_window = std::chrono::microseconds{0});
  ~MediaLoops();
  MediaLoops(const MediaLoops&) = delete;
  MediaLoops& operator=(const MediaLoops&) = delete;
  // The loop for a new media's sockets, in turn.
  std::size_t pick();
  // Datagrams on `fd` go into `feed` (a reference is kept) from loop `loop` on; returns
  // the id remove() takes.
  std::uint64_t add(std::size_t loop, int fd, GstPad* feed);
  // Once it returns, nothing is pushed into that feed again.
  void remove(std::uint64_t id);
  struct ThreadStats {
    std::optional<int> cpu;       // the CPU it is bound to (nullopt: not pinned, or refused)
    std::uint64_t wakeups = 0;    // returns from epoll_wait
    std::uint64_t datagrams = 0;  // datagrams read
    std::uint64_t paced = 0;      // wake-ups after which it waited out the batch window
  };
  std::vector<ThreadStats> thread_stats() const;  // one per thread
  std::chrono::microseconds batch_window() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class CallMediaPump {
 public:
  // Bound sockets of the media, shared with nobody else (the pump holds a reference of
  // its own). Each direction reads from its party's socket and sends from the other's
  // (symmetric RTP), so a media that sends or receives needs both; local_rtcp may be
  // null (no RTCP port: RTCP comes muxed, and leaves from local_rtp).
  struct Sockets {
    GSocket* local_rtp = nullptr;   // RTP from (and decrypted RTP and muxed RTCP to) the endpoint
    GSocket* local_rtcp = nullptr;  // RTCP from (and, not muxed, to) the endpoint
    GSocket* peer = nullptr;        // OTP from and to the partner gateway
  };
  struct Targets {
    Endpoint peer;  // the partner gateway's port for this media
    Endpoint deliver_rtp;
    std::optional<Endpoint> deliver_rtcp;  // none: decrypted RTCP is dropped
  };
  // `encrypt` takes what the endpoint sends (RTP and RTCP) and its output goes to the
  // partner; `decrypt` takes what the partner sends. Either may be null (a media that only
  // sends or only receives). Throws std::runtime_error naming a target that does not
  // resolve. `encrypt` must be non-blocking (it shares its thread with other calls). The
  // sockets are read from start() on.
  CallMediaPump(std::string name, GstElement* encrypt, GstElement* decrypt, const Sockets& sockets,
                const Targets& targets, MediaLoops& loops);
  ~CallMediaPump();  // stop()s
  CallMediaPump(const CallMediaPump&) = delete;
  CallMediaPump& operator=(const CallMediaPump&) = delete;

  // Once the elements are PLAYING: what arrived meanwhile waited in the sockets. Throws
  // std::runtime_error when a socket cannot be watched.
  void start();
  // The sockets are no longer read and nothing is pushed into the elements once it returns
  // (idempotent).
  void stop();
  // A re-INVITE's new addresses. Throws std::runtime_error as the constructor does.
  void retarget(const Targets& targets);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace otpgate::gateway

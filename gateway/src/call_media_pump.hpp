// SPDX-License-Identifier: LGPL-2.1-or-later
// Call media without a GStreamer streaming thread per socket (docs/sip.md, "Media path").
// A call media is two elements, otpencrypt and otpdecrypt, in a pipeline of their own (for
// its bus and its state). Instead of udpsrc/funnel/udpsink around them, threads wait on
// the media's sockets with epoll and hand each datagram to the element through a pad of
// their own, as GstHarness does in the tests; what the elements push out leaves from the
// socket the other party sends to (symmetric RTP). Every byte of protection is the
// elements' own work, exactly as in a pipeline: the pump only moves datagrams. What the
// endpoint sends goes in on a thread of the media's own (an encryptor may wait for key);
// what the partner sends, on a few threads all call media share (a decryptor never
// waits). It exists because the source threads of a pipeline per media, their poll() per
// packet and the per-buffer work of five more elements cost a call about half again the
// CPU of rtpengine's SRTP relaying (bench/bench_sip.cpp), and a thread per socket costs
// more than a thread per core.
#pragma once

#include <gio/gio.h>
#include <gst/gst.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "otpgate/gateway.hpp"

namespace otpgate::gateway {

class MediaScheduling;

// The threads that take what partner gateways send into the call media's decryptors: a
// few (one per core), each with its own epoll; a socket stays on one thread, so its
// datagrams keep their order. Outlives every pump that uses it.
class ReceiveLoops {
 public:
  ReceiveLoops(std::size_t threads, MediaScheduling* scheduling);
  ~ReceiveLoops();
  ReceiveLoops(const ReceiveLoops&) = delete;
  ReceiveLoops& operator=(const ReceiveLoops&) = delete;
  // Datagrams on `fd` go into `feed` (a reference is kept) from now on; returns the id
  // remove() takes.
  std::uint64_t add(int fd, GstPad* feed);
  // Once it returns, nothing is pushed into that feed again.
  void remove(std::uint64_t id);

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
  // resolve. The threads start with start().
  CallMediaPump(std::string name, GstElement* encrypt, GstElement* decrypt, const Sockets& sockets,
                const Targets& targets, ReceiveLoops& receive_loops, MediaScheduling* scheduling);
  ~CallMediaPump();  // stops the threads; the elements should be stopped first (see stop())
  CallMediaPump(const CallMediaPump&) = delete;
  CallMediaPump& operator=(const CallMediaPump&) = delete;

  // Once the elements are PLAYING: what arrived meanwhile waited in the sockets. Throws
  // std::runtime_error when a thread cannot be started.
  void start();
  // Stops and joins the threads (idempotent). An encryptor waiting for key holds the
  // sending thread until the element stops (its state change releases the wait), so the
  // pipeline goes to NULL before this.
  void stop();
  // A re-INVITE's new addresses. Throws std::runtime_error as the constructor does.
  void retarget(const Targets& targets);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace otpgate::gateway

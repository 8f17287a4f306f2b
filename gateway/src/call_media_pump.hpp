// SPDX-License-Identifier: LGPL-2.1-or-later
// Call media without a GStreamer streaming thread per socket (docs/sip.md, "Media path").
// A call media is two elements, otpencrypt and otpdecrypt, in a pipeline of their own (for
// its bus and its state). Instead of udpsrc/funnel/udpsink around them, a thread per
// direction waits on that direction's sockets with epoll and hands each datagram to the
// element through a pad of its own, as GstHarness does in the tests; what the elements
// push out leaves from the socket the other party sends to (symmetric RTP). Every byte of
// protection is the elements' own work, exactly as in a pipeline: the pump only moves
// datagrams. It exists because the source threads of a pipeline per media, their poll()
// per packet and the per-buffer work of five more elements cost a call about half again
// the CPU of rtpengine's SRTP relaying (bench/bench_sip.cpp).
#pragma once

#include <gio/gio.h>
#include <gst/gst.h>

#include <memory>
#include <optional>
#include <string>

#include "otpgate/gateway.hpp"

namespace otpgate::gateway {

class MediaScheduling;

class CallMediaPump {
 public:
  // Bound sockets of the media, shared with nobody else (the pump holds a reference of
  // its own). Either may be null where the media does not use it.
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
                const Targets& targets, MediaScheduling* scheduling);
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

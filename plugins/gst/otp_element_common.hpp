// SPDX-License-Identifier: LGPL-2.1-or-later
// What otpencrypt and otpdecrypt share: the key-source properties and how they become
// a key supply, the mode enum, RAII for GLib/GStreamer handles, stats publishing, and
// element errors for failures (so that gst-launch says why it stopped).
#pragma once

#include <gst/base/gstadapter.h>
#include <gst/gst.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>

#include "otpgate/keyclient.hpp"

namespace otpgate::gst {

// RAII for GStreamer/GLib references.
struct GstUnref {
  void operator()(GstBuffer* b) const { gst_buffer_unref(b); }
  void operator()(GstCaps* c) const { gst_caps_unref(c); }
  void operator()(GstStructure* s) const { gst_structure_free(s); }
  void operator()(GstAdapter* a) const { g_object_unref(a); }
};
template <typename T>
using GstPtr = std::unique_ptr<T, GstUnref>;

// A buffer mapped for a scope: unmapped on every way out, exceptions included.
class MappedBuffer {
 public:
  MappedBuffer(GstBuffer* buffer, GstMapFlags flags)
      : buffer_(buffer), mapped_(gst_buffer_map(buffer, &map_, flags)) {}
  ~MappedBuffer() {
    if (mapped_) gst_buffer_unmap(buffer_, &map_);
  }
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;
  explicit operator bool() const { return mapped_; }
  std::span<std::uint8_t> bytes() const { return {map_.data, map_.size}; }

 private:
  GstBuffer* buffer_;
  GstMapInfo map_{};
  bool mapped_;
};

enum OtpMode { OTP_MODE_AUTO = 0, OTP_MODE_DATAGRAM = 1, OTP_MODE_STREAM = 2 };
GType otp_mode_get_type();

// Property ids shared by both elements (each adds its own after PROP_COMMON_LAST).
enum {
  PROP_0,
  PROP_MODE,
  PROP_KME_URL,
  PROP_SAE_ID,
  PROP_PEER_SAE_ID,
  PROP_TLS_CERT,
  PROP_TLS_KEY,
  PROP_TLS_CA,
  PROP_PAD_FILE,
  PROP_JOURNAL,
  PROP_KEY_SUPPLY,
  PROP_KEY_LOW_THRESHOLD,
  PROP_STATS,
  PROP_COMMON_LAST
};

struct KeySourceSettings {
  int mode = OTP_MODE_AUTO;
  std::string kme_url, sae_id, peer_sae_id, tls_cert, tls_key, tls_ca, pad_file, journal;
  keys::PadSource* external = nullptr;  // key-supply property: owned by the application
  guint64 key_low_threshold = 1u << 20;
};

// Installs the shared properties; `role` words the blurbs (master or slave SAE).
void install_common_properties(GObjectClass* klass, keys::SaeRole role);
// Handles a shared property; false if `id` is not one of them.
bool set_common_property(KeySourceSettings& s, guint id, const GValue* value);
bool get_common_property(const KeySourceSettings& s, guint id, GValue* value);

// The key source these settings describe, started. On a configuration problem returns
// nullptr and sets `error` to one line naming the property and the fix.
struct KeySource {
  std::unique_ptr<keys::KeySupply> owned;  // null when the application provides one
  keys::PadSource* pad = nullptr;
  keys::KeySupply* supply() const { return owned.get(); }
};
KeySource open_key_source(const KeySourceSettings& s, keys::SaeRole role, const char* element,
                          GstDebugCategory* category, GstObject* object, std::string& error);

// Counters written by the streaming thread, read by the "stats" property.
template <std::size_t N>
struct PublishedCounters {
  std::array<std::atomic<guint64>, N> values{};
  void set(std::size_t i, guint64 v) { values[i].store(v, std::memory_order_relaxed); }
  guint64 get(std::size_t i) const { return values[i].load(std::memory_order_relaxed); }
};

// A stats structure holding every counter under its name; `name_of` is a switch over the
// element's Counter enum (no default, so -Wswitch catches a counter without a name).
template <typename Counter, std::size_t N>
GstPtr<GstStructure> counters_structure(const char* name, const PublishedCounters<N>& counters,
                                        const char* (*name_of)(Counter)) {
  GstPtr<GstStructure> s(gst_structure_new_empty(name));
  for (std::size_t i = 0; i < N; ++i) {
    gst_structure_set(s.get(), name_of(static_cast<Counter>(i)), G_TYPE_UINT64, counters.get(i),
                      nullptr);
  }
  return s;
}

// Adds the key supply's figures (level, rate, KME health) to a stats structure.
void add_supply_stats(GstStructure* s, const KeySource& source);

// The buffer an element sends one packet in, used again for the next packet once whoever
// it went to has let go of it (a downstream that sends it at once, as the gateway's call
// media do, or drops it): no allocation and free per packet. A downstream that keeps
// buffers (a queue, a jitter buffer) gets a new one each time, as from
// gst_buffer_new_allocate. One per source pad, used by the streaming thread only.
class OutputBuffers {
 public:
  OutputBuffers() = default;
  ~OutputBuffers() {
    if (sent_) gst_buffer_unref(sent_);
  }
  OutputBuffers(const OutputBuffers&) = delete;
  OutputBuffers& operator=(const OutputBuffers&) = delete;
  // A writable buffer of `size` bytes, with no flags, timestamps or metas: the caller's
  // reference.
  GstBuffer* take(gsize size);
  // `out`, filled, is about to be pushed: a reference is kept for take() to reuse.
  void sending(GstBuffer* out);

 private:
  static constexpr gsize kAtLeast = 2048;  // room for an MTU-sized packet and its header
  GstBuffer* sent_ = nullptr;
};

// A one-shot timer on GStreamer's system clock for an element that holds packets without
// blocking its streaming thread: a few ms after schedule(), `release(element)` runs from
// the clock's thread with `sinkpad`'s stream lock held, unless cancel() came first. When
// the streaming thread holds that lock (it is in chain() and releases them itself) the
// timer is armed again instead: it never waits for it. Armed once at a time (schedule()
// while armed does nothing); the element is kept alive until the callback has run.
// cancel() is final until the next schedule(): a callback already under way does not
// arm it again.
class ReleaseTimer {
 public:
  // Held packets one release handles at most before it arms the timer for the rest: a
  // backlog that key has just freed (thousands of packets) goes out in slices, never
  // holding up the clock's thread, whose callbacks every element of the process shares,
  // or the streaming thread for long.
  static constexpr std::size_t kPacketsPerRelease = 64;
  using Release = void (*)(GstElement* element);
  static constexpr GstClockTime kInterval = 2 * GST_MSECOND;
  ReleaseTimer() = default;
  ~ReleaseTimer() { cancel(); }
  ReleaseTimer(const ReleaseTimer&) = delete;
  ReleaseTimer& operator=(const ReleaseTimer&) = delete;
  void schedule(GstElement* element, GstPad* sinkpad, Release release);
  void cancel();

 private:
  static gboolean on_fire(GstClock*, GstClockTime, GstClockID id, gpointer user);
  void arm(GstElement* element, GstPad* sinkpad, Release release);  // with mutex_ held
  std::mutex mutex_;
  GstClockID id_ = nullptr;
  bool cancelled_ = false;
};

// Datagrams held while their key is on its way, in arrival order, each until its
// key-wait deadline (both elements in datagram mode). Bounded in packets and in bytes, so
// that a peer or endpoint sending 64 KiB datagrams cannot make one stream hold 256 MiB:
// the oldest give way.
class HeldPackets {
 public:
  static constexpr std::size_t kMaxPackets = 4096;
  static constexpr std::size_t kMaxBytes = 4u << 20;  // of memory held, not payload alone
  using Clock = std::chrono::steady_clock;

  // Holds `buffer` for at most `wait`; returns how many older packets gave way for it.
  std::size_t hold(GstPtr<GstBuffer> buffer, std::chrono::milliseconds wait);
  bool empty() const { return held_.empty(); }
  std::size_t size() const { return held_.size(); }
  GstBuffer* front() const { return held_.front().buffer.get(); }
  bool front_expired(Clock::time_point now) const { return now >= held_.front().deadline; }
  void pop_front();
  // Drops every held packet; returns how many.
  std::size_t clear();

 private:
  struct Held {
    GstPtr<GstBuffer> buffer;
    Clock::time_point deadline;
  };
  std::deque<Held> held_;
  std::size_t bytes_ = 0;
};

// Posts an element error quoting the key source's reason once it has given up (the KME
// refuses us or never answered); true then, and the caller returns GST_FLOW_ERROR.
bool key_source_failed(GstElement* element, const KeySource& source);

// Posts an element error for an exception that reached the element (an OpenSSL or
// libsrtp2 failure, a broken invariant); returns GST_FLOW_ERROR.
GstFlowReturn internal_error(GstElement* element, const std::exception& e);

// Runs a streaming-thread step that may throw: an exception becomes an element error and
// GST_FLOW_ERROR instead of unwinding through GStreamer's C frames.
template <typename F>
GstFlowReturn guarded(GstElement* element, F&& step) noexcept {
  try {
    return std::forward<F>(step)();
  } catch (const std::exception& e) {
    return internal_error(element, e);
  }
}

}  // namespace otpgate::gst

// SPDX-License-Identifier: LGPL-2.1-or-later
/**
 * otpencrypt: protects RTP/RTCP packets or a byte stream with a one-time pad from QKD.
 *
 * Datagram mode (RTP/RTCP over UDP): the RTP header (CSRCs, extensions) or the first
 * 8 bytes of an RTCP compound packet stay in the clear, the rest is XORed with pad, and
 * a 24-byte trailer carries the pad offset and a Wegman-Carter (Poly1305) tag. Stream
 * mode (files over TCP): self-delimiting authenticated records with a final record.
 * Key announcements (key_IDs for pad offsets) are sent in band ahead of use.
 *
 *   gst-launch-1.0 audiotestsrc ! opusenc ! rtpopuspay ! otpencrypt pad-file=pad.bin ! \
 *       udpsink host=127.0.0.1 port=5004
 *
 * Never sends plaintext: without pad, packets are dropped (on-key-exhausted=drop) or
 * the stream waits (block; always in stream mode). See docs/wire-format.md. With
 * non-blocking=true a datagram stream never waits in its streaming thread: packets that
 * would wait are held in arrival order, for at most key-wait, and leave when key arrives
 * (for applications that drive many streams from one thread, as otp-gateway's calls do).
 * Stream mode emits a record per record-size bytes; a custom downstream event named
 * "otp-flush" emits what is pending at once (for control messages and growing files).
 */
#include <gst/base/gstadapter.h>
#include <openssl/rand.h>

#include <deque>
#include <thread>

#include "otp_element_common.hpp"
#include "otpgate/checked_cast.hpp"
#include "otpgate/otp_codec.hpp"

using namespace otpgate;
using namespace otpgate::gst;

GST_DEBUG_CATEGORY_STATIC(otp_encrypt_debug);
#define GST_CAT_DEFAULT otp_encrypt_debug

namespace {

constexpr auto kStartupWait = std::chrono::seconds(10);

enum OnKeyExhausted {
  KEY_EXHAUSTED_DROP = 0,
  KEY_EXHAUSTED_BLOCK = 1,
  KEY_EXHAUSTED_FALLBACK_AES = 2
};
enum Cipher { CIPHER_OTP = 0, CIPHER_AES_256_GCM = 1 };

GType cipher_get_type() {
  static GType type = 0;
  static const GEnumValue values[] = {
      {CIPHER_OTP, "One-time pad with a Wegman-Carter MAC (information-theoretic)", "otp"},
      {CIPHER_AES_256_GCM,
       "AES-256-GCM with keys from the pad, rekeyed every rekey-interval packets or records "
       "(SRTP via libsrtp2 for RTP/RTCP)",
       "aes-256-gcm"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type))
    g_once_init_leave(&type, g_enum_register_static("OtpCipher", values));
  return type;
}

GType on_key_exhausted_get_type() {
  static GType type = 0;
  static const GEnumValue values[] = {
      {KEY_EXHAUSTED_DROP, "Drop the packet and count it (never send it in the clear)", "drop"},
      {KEY_EXHAUSTED_BLOCK, "Wait until key arrives", "block"},
      {KEY_EXHAUSTED_FALLBACK_AES,
       "Carry on with SRTP AES-256-GCM under the last master key drawn from the pad, back to "
       "the one-time pad as soon as pad returns",
       "fallback-aes"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type))
    g_once_init_leave(&type, g_enum_register_static("OtpOnKeyExhausted", values));
  return type;
}

enum {
  PROP_ON_KEY_EXHAUSTED = PROP_COMMON_LAST,
  PROP_ANNOUNCE_REPEATS,
  PROP_RECORD_SIZE,
  PROP_CIPHER,
  PROP_REKEY_INTERVAL,
  PROP_KEY_TIMEOUT,
  PROP_NON_BLOCKING,
  PROP_KEY_WAIT
};
enum { SIGNAL_KEY_LOW, SIGNAL_KEY_EXHAUSTED, N_SIGNALS };
guint signals[N_SIGNALS];

enum Counter {
  C_PACKETS_IN,
  C_BYTES_IN,
  C_PACKETS_OUT,
  C_BYTES_OUT,
  C_PAD_USED,
  C_PAD_SKIPPED,
  C_ANNOUNCEMENTS,
  C_ANNOUNCEMENT_REPEATS,
  C_ANNOUNCEMENT_BYTES,
  C_KEYS_ANNOUNCED,
  C_DROPS_NO_KEY,
  C_DROPS_MALFORMED,
  C_AES_PACKETS,
  C_AES_REKEYS,
  C_KEY_WAITS,
  C_PACKETS_HELD,
  C_COUNT
};
// The name of a counter in the stats structure.
const char* counter_name(Counter c) {
  switch (c) {
    case C_PACKETS_IN:
      return "packets-in";
    case C_BYTES_IN:
      return "bytes-in";
    case C_PACKETS_OUT:
      return "packets-out";
    case C_BYTES_OUT:
      return "bytes-out";
    case C_PAD_USED:
      return "pad-bytes-used";
    case C_PAD_SKIPPED:
      return "pad-bytes-skipped";
    case C_ANNOUNCEMENTS:
      return "announcements";
    case C_ANNOUNCEMENT_REPEATS:
      return "announcement-repeats";
    case C_ANNOUNCEMENT_BYTES:
      return "announcement-bytes";
    case C_KEYS_ANNOUNCED:
      return "keys-announced";
    case C_DROPS_NO_KEY:
      return "drops-no-key";
    case C_DROPS_MALFORMED:
      return "drops-malformed";
    case C_AES_PACKETS:
      return "aes-packets";
    case C_AES_REKEYS:
      return "aes-rekeys";
    case C_KEY_WAITS:
      return "key-waits";
    case C_PACKETS_HELD:
      return "packets-held";
    case C_COUNT:
      break;
  }
  return "unknown-counter";
}

// Everything that exists between READY->PAUSED and PAUSED->READY.
struct Session {
  KeySource source;
  std::unique_ptr<otp::Encoder> encoder;
  GstPtr<GstAdapter> adapter{gst_adapter_new()};
  bool mode_known = false;
  bool stream = false;
  bool stream_started = false;
  bool key_low = false;
  bool exhausted = false;
  bool had_key = false;
  bool in_fallback = false;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::vector<std::uint8_t> announcement = std::vector<std::uint8_t>(otp::kMaxAnnouncementBytes);
  // Non-blocking datagram mode: packets waiting for key (the stream's first, or `block`).
  HeldPackets held;
  OutputBuffers output;  // what leaves by the source pad
};

struct Private {
  KeySourceSettings settings;
  int on_key_exhausted = KEY_EXHAUSTED_DROP;
  int cipher = CIPHER_OTP;
  guint rekey_interval = 1024;
  guint announce_repeats = 2;
  guint record_size = 32768;
  guint key_timeout_ms = 30000;
  bool non_blocking = false;
  guint key_wait_ms = 10000;
  GstPtr<GstCaps> sink_caps;
  std::unique_ptr<Session> session;
  std::atomic<bool> flushing{false};
  std::atomic<bool> forget_aes_key{false};  // the "rekey" action signal, for the next packet
  bool caps_pushed = false;
  PublishedCounters<C_COUNT> counters;
  // Non-blocking mode: releases held packets when no new packet arrives to do it.
  ReleaseTimer release_timer;
};

}  // namespace

struct GstOtpEncrypt {
  GstElement parent;
  GstPad* sinkpad;
  GstPad* srcpad;
  Private* priv;
};
struct GstOtpEncryptClass {
  GstElementClass parent_class;
};

G_DEFINE_TYPE(GstOtpEncrypt, gst_otp_encrypt, GST_TYPE_ELEMENT)
#define GST_OTP_ENCRYPT(obj) (reinterpret_cast<GstOtpEncrypt*>(obj))

static GstStaticPadTemplate sink_template = GST_STATIC_PAD_TEMPLATE(
    "sink", GST_PAD_SINK, GST_PAD_ALWAYS,
    GST_STATIC_CAPS("application/x-rtp; application/x-rtcp; application/octet-stream"));
static GstStaticPadTemplate src_template = GST_STATIC_PAD_TEMPLATE(
    "src", GST_PAD_SRC, GST_PAD_ALWAYS, GST_STATIC_CAPS("application/x-otp"));

namespace {

void publish(GstOtpEncrypt* self) {
  Private& p = *self->priv;
  const auto& s = p.session->encoder->stats();
  auto& c = p.counters;
  c.set(C_PAD_USED, s.pad_bytes_used);
  c.set(C_PAD_SKIPPED, s.pad_bytes_skipped);
  c.set(C_ANNOUNCEMENTS, s.announcements);
  c.set(C_ANNOUNCEMENT_REPEATS, s.announcement_repeats);
  c.set(C_ANNOUNCEMENT_BYTES, s.announcement_bytes);
  c.set(C_KEYS_ANNOUNCED, s.keys_announced);
  c.set(C_AES_PACKETS, s.aes_units);
  c.set(C_AES_REKEYS, s.aes_rekeys);
}

void bump(Private& p, Counter c, guint64 by = 1) {
  p.counters.set(c, p.counters.get(c) + by);
}

GstFlowReturn push_bytes(GstOtpEncrypt* self, const std::uint8_t* data, std::size_t size,
                         GstBuffer* timing) {
  OutputBuffers& output = self->priv->session->output;
  GstBuffer* out = output.take(size);
  gst_buffer_fill(out, 0, data, size);
  if (timing) gst_buffer_copy_into(out, timing, GST_BUFFER_COPY_METADATA, 0, -1);
  bump(*self->priv, C_PACKETS_OUT);
  bump(*self->priv, C_BYTES_OUT, size);
  output.sending(out);
  return gst_pad_push(self->srcpad, out);
}

void push_caps_once(GstOtpEncrypt* self) {
  if (self->priv->caps_pushed) return;
  self->priv->caps_pushed = true;
  GstPtr<GstCaps> caps(gst_static_pad_template_get_caps(&src_template));
  gst_pad_push_event(self->srcpad, gst_event_new_caps(caps.get()));
}

// Announcements due now: new keys first, then (datagram mode) repeats.
GstFlowReturn push_announcements(GstOtpEncrypt* self, GstBuffer* timing) {
  Session& s = *self->priv->session;
  while (std::size_t n = s.encoder->next_announcement(s.announcement, !s.stream)) {
    if (const auto a = otp::parse_announcement(std::span(s.announcement).first(n))) {
      GST_DEBUG_OBJECT(self,
                       "announcement at pad offset %" G_GUINT64_FORMAT
                       ": %u keys of %u bytes "
                       "from %" G_GUINT64_FORMAT,
                       a->mask_offset, unsigned{a->count}, unsigned{a->key_length}, a->base);
    }
    const GstFlowReturn ret = push_bytes(self, s.announcement.data(), n, timing);
    if (ret != GST_FLOW_OK && ret != GST_FLOW_NOT_LINKED) return ret;
  }
  return GST_FLOW_OK;
}

void check_key_level(GstOtpEncrypt* self) {
  Private& p = *self->priv;
  Session& s = *p.session;
  const guint64 level = s.source.pad->available();
  const bool low = level < p.settings.key_low_threshold;
  if (low && !s.key_low) {
    GST_WARNING_OBJECT(self, "key low: %" G_GUINT64_FORMAT " bytes ready", level);
    g_signal_emit(self, signals[SIGNAL_KEY_LOW], 0, level);
  }
  s.key_low = low;
}

void note_exhausted(GstOtpEncrypt* self, bool exhausted) {
  Session& s = *self->priv->session;
  if (exhausted && !s.exhausted) {
    GST_WARNING_OBJECT(self, "key exhausted: %s",
                       self->priv->on_key_exhausted == KEY_EXHAUSTED_DROP && !s.stream
                           ? "dropping packets until key returns"
                           : "waiting for key");
    g_signal_emit(self, signals[SIGNAL_KEY_EXHAUSTED], 0);
  } else if (!exhausted && s.exhausted) {
    GST_INFO_OBJECT(self, "key available again");
  }
  s.exhausted = exhausted;
}

// Waits for pad in blocking modes; false when the element is shutting down or the key
// source has given up (the caller then reports it).
bool wait_for_key(GstOtpEncrypt* self) {
  if (self->priv->flushing) return false;
  if (const auto& source = self->priv->session->source; source.pad && source.pad->failed())
    return false;
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  return !self->priv->flushing;
}

// Protects the packet in `in` into `out`, drawing pad (or waiting for it) as the key
// policy says; `status` and `written` say what came of it. In non-blocking mode a packet
// that would wait sets `would_wait` instead (status no_key). Both buffers are mapped only
// here.
GstFlowReturn protect_into(GstOtpEncrypt* self, GstBuffer* in, GstBuffer* out,
                           otp::Encoder::Status& status, std::size_t& written, bool& would_wait) {
  Private& p = *self->priv;
  Session& s = *p.session;
  const MappedBuffer in_map(in, GST_MAP_READ);
  const MappedBuffer out_map(out, GST_MAP_WRITE);
  if (!in_map || !out_map) {
    GST_ELEMENT_ERROR(self, RESOURCE, READ, ("could not map a buffer"),
                      ("%s", in_map ? "the output buffer, for writing" : "an input buffer"));
    return GST_FLOW_ERROR;
  }
  const std::span<const std::uint8_t> packet = in_map.bytes();
  const std::span<std::uint8_t> out_span = out_map.bytes();
  bool retried = false;
  while (true) {
    // Keys that arrived while we waited must be announced before their first use.
    if (const GstFlowReturn pushed = push_announcements(self, in); pushed != GST_FLOW_OK) {
      return pushed;
    }
    if (p.forget_aes_key.exchange(false)) s.encoder->forget_aes_key();
    if (p.cipher == CIPHER_AES_256_GCM) {
      status = s.encoder->protect_datagram_aes(packet, out_span, written, p.rekey_interval);
    } else {
      status = s.encoder->protect_datagram(packet, out_span, written);
      // Key is there but not usable yet: the encoder has just moved past the end of a run,
      // and the next run (a resync) is announced once the stream has reached it. Once more.
      if (status == otp::Encoder::Status::no_key && !retried && s.source.pad->available() > 0) {
        retried = true;
        continue;
      }
      if (status == otp::Encoder::Status::ok && p.on_key_exhausted == KEY_EXHAUSTED_FALLBACK_AES) {
        s.encoder->prepare_aes();  // a master key in reserve for when pad runs out
      }
      if (status == otp::Encoder::Status::no_key &&
          p.on_key_exhausted == KEY_EXHAUSTED_FALLBACK_AES) {
        status = s.encoder->protect_datagram_aes(packet, out_span, written, p.rekey_interval);
        if (status == otp::Encoder::Status::ok && !s.in_fallback) {
          GST_WARNING_OBJECT(self,
                             "pad exhausted: falling back to SRTP AES-256-GCM keyed from QKD");
          g_signal_emit(self, signals[SIGNAL_KEY_EXHAUSTED], 0);
          s.in_fallback = true;
        }
      } else if (status == otp::Encoder::Status::ok && s.in_fallback) {
        GST_INFO_OBJECT(self, "pad available again: back to the one-time pad");
        s.in_fallback = false;
      }
    }
    if (status != otp::Encoder::Status::no_key) return GST_FLOW_OK;
    // Until the first key has arrived we are starting, not exhausted: wait (bounded)
    // so that a call does not lose its first frames to the first KME round trip.
    const bool starting = !s.had_key && std::chrono::steady_clock::now() < s.started + kStartupWait;
    if (!starting) note_exhausted(self, true);
    if (p.on_key_exhausted == KEY_EXHAUSTED_DROP && !starting) return GST_FLOW_OK;
    if (p.non_blocking) {
      would_wait = true;
      return GST_FLOW_OK;
    }
    if (!wait_for_key(self)) return GST_FLOW_OK;
  }
}

// One packet protected and pushed, or dropped and counted; in non-blocking mode a packet
// that has to wait for key sets `would_wait` and is left to the caller.
GstFlowReturn protect_datagram(GstOtpEncrypt* self, GstBuffer* in, bool& would_wait) {
  Private& p = *self->priv;
  Session& s = *p.session;
  GstPtr<GstBuffer> out(s.output.take(gst_buffer_get_size(in) + otp::kMaxDatagramOverhead));
  otp::Encoder::Status status = otp::Encoder::Status::no_key;
  std::size_t written = 0;
  if (const GstFlowReturn ret = protect_into(self, in, out.get(), status, written, would_wait);
      ret != GST_FLOW_OK) {
    return ret;
  }
  if (status == otp::Encoder::Status::ok) s.had_key = true;
  publish(self);
  if (would_wait) return GST_FLOW_OK;
  if (status != otp::Encoder::Status::ok) {
    if (status == otp::Encoder::Status::malformed) {
      bump(p, C_DROPS_MALFORMED);
      GST_DEBUG_OBJECT(self, "dropping a buffer that is not an RTP/RTCP packet");
      return GST_FLOW_OK;
    }
    if (p.flushing) return GST_FLOW_FLUSHING;  // shutting down while waiting: not a drop
    bump(p, C_DROPS_NO_KEY);
    return GST_FLOW_OK;
  }
  note_exhausted(self, false);
  check_key_level(self);
  gst_buffer_set_size(out.get(), checked_cast<gssize>(written));
  gst_buffer_copy_into(out.get(), in, GST_BUFFER_COPY_METADATA, 0, -1);
  bump(p, C_PACKETS_OUT);
  bump(p, C_BYTES_OUT, written);
  s.output.sending(out.get());
  return gst_pad_push(self->srcpad, out.release());
}

void schedule_release(GstOtpEncrypt* self);

// Non-blocking mode: sends held packets in arrival order as their key arrives; drops
// (and counts) those whose key-wait has passed, and all of them when flushing; a slice
// at a time.
GstFlowReturn release_held(GstOtpEncrypt* self) {
  Private& p = *self->priv;
  Session& s = *p.session;
  const auto now = std::chrono::steady_clock::now();
  GstFlowReturn ret = GST_FLOW_OK;
  for (std::size_t n = 0;
       !s.held.empty() && ret == GST_FLOW_OK && n < ReleaseTimer::kPacketsPerRelease; ++n) {
    bool wait = p.flushing.load();
    if (!wait) ret = protect_datagram(self, s.held.front(), wait);
    if (wait) {
      if (!p.flushing && !s.held.front_expired(now)) break;  // keeps the order
      bump(p, C_DROPS_NO_KEY);
    }
    s.held.pop_front();
  }
  p.counters.set(C_PACKETS_HELD, s.held.size());
  if (!s.held.empty()) schedule_release(self);
  return ret;
}

void hold(GstOtpEncrypt* self, GstPtr<GstBuffer> in) {
  Private& p = *self->priv;
  Session& s = *p.session;
  if (p.key_wait_ms == 0) {
    bump(p, C_DROPS_NO_KEY);
    return;
  }
  bump(p, C_DROPS_NO_KEY, s.held.hold(std::move(in), std::chrono::milliseconds(p.key_wait_ms)));
  bump(p, C_KEY_WAITS);
  p.counters.set(C_PACKETS_HELD, s.held.size());
  schedule_release(self);
}

// From the release timer, with the sink pad's stream lock held.
void on_release_timer(GstElement* element) {
  auto* self = GST_OTP_ENCRYPT(element);
  if (!self->priv->session || self->priv->session->held.empty()) return;
  const GstFlowReturn ret = guarded(element, [self] { return release_held(self); });
  if (ret != GST_FLOW_OK && ret != GST_FLOW_FLUSHING && ret != GST_FLOW_NOT_LINKED) {
    GST_DEBUG_OBJECT(self, "releasing held packets: %s", gst_flow_get_name(ret));
  }
}

// Arms the timer that releases held packets in a few ms.
void schedule_release(GstOtpEncrypt* self) {
  if (self->priv->flushing) return;
  self->priv->release_timer.schedule(GST_ELEMENT(self), self->sinkpad, on_release_timer);
}

// A datagram in non-blocking mode: behind those already waiting, or protected now, or
// held while its key is on its way.
GstFlowReturn protect_or_hold(GstOtpEncrypt* self, GstPtr<GstBuffer> in) {
  Session& s = *self->priv->session;
  if (!s.held.empty()) {
    hold(self, std::move(in));
    return release_held(self);
  }
  bool wait = false;
  const GstFlowReturn ret = protect_datagram(self, in.get(), wait);
  if (ret == GST_FLOW_OK && wait) hold(self, std::move(in));
  return ret;
}

// Stream mode: one record of `kind` with up to `payload` bytes; returns bytes consumed.
GstFlowReturn emit_record(GstOtpEncrypt* self, otp::RecordKind kind,
                          std::span<const std::uint8_t> payload, std::size_t& consumed) {
  Private& p = *self->priv;
  Session& s = *p.session;
  std::vector<std::uint8_t> out(payload.size() + otp::kRecordOverhead);
  std::size_t written = 0;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(p.key_timeout_ms);
  while (true) {
    GstFlowReturn ret = push_announcements(self, nullptr);
    if (ret != GST_FLOW_OK) return ret;
    const auto status =
        p.cipher == CIPHER_AES_256_GCM
            ? s.encoder->protect_record_aes(kind, payload, out, consumed, written, p.rekey_interval)
            : s.encoder->protect_record(kind, payload, out, consumed, written);
    if (status == otp::Encoder::Status::ok) break;
    note_exhausted(self, true);  // a stream cannot drop: it slows to the key rate
    if (key_source_failed(GST_ELEMENT(self), s.source)) return GST_FLOW_ERROR;
    if (p.key_timeout_ms != 0 && std::chrono::steady_clock::now() >= deadline) {
      const std::string why = s.source.supply() ? s.source.supply()->stats().last_error : "";
      GST_ELEMENT_ERROR(
          self, RESOURCE, OPEN_READ,
          ("no key for %u ms%s%s", p.key_timeout_ms, why.empty() ? "" : ": ", why.c_str()),
          ("check the KME and the key rate; key-timeout sets how long to wait"));
      return GST_FLOW_ERROR;
    }
    if (!wait_for_key(self)) {
      return key_source_failed(GST_ELEMENT(self), s.source) ? GST_FLOW_ERROR : GST_FLOW_FLUSHING;
    }
  }
  note_exhausted(self, false);
  check_key_level(self);
  publish(self);
  return push_bytes(self, out.data(), written, nullptr);
}

GstFlowReturn drain_stream(GstOtpEncrypt* self, bool all) {
  Private& p = *self->priv;
  Session& s = *p.session;
  if (!s.stream_started) {
    GstFlowReturn ret =
        push_bytes(self, otp::kStreamPreamble.data(), otp::kStreamPreamble.size(), nullptr);
    std::size_t consumed = 0;
    if (ret == GST_FLOW_OK) ret = emit_record(self, otp::RecordKind::stream_start, {}, consumed);
    if (ret != GST_FLOW_OK) return ret;
    s.stream_started = true;
  }
  while (true) {
    const std::size_t available = gst_adapter_available(s.adapter.get());
    if (available == 0 || (!all && available < p.record_size)) return GST_FLOW_OK;
    const std::size_t n = std::min<std::size_t>(available, p.record_size);
    const auto* data = static_cast<const std::uint8_t*>(gst_adapter_map(s.adapter.get(), n));
    std::size_t consumed = 0;
    const GstFlowReturn ret = emit_record(self, otp::RecordKind::data, {data, n}, consumed);
    gst_adapter_unmap(s.adapter.get());
    gst_adapter_flush(s.adapter.get(), consumed);
    if (ret != GST_FLOW_OK) return ret;
  }
}

GstFlowReturn process(GstOtpEncrypt* self, GstPtr<GstBuffer> in) {
  Private& p = *self->priv;
  GstBuffer* buffer = in.get();
  if (!p.session) return GST_FLOW_FLUSHING;
  Session& s = *p.session;
  if (key_source_failed(GST_ELEMENT(self), s.source)) return GST_FLOW_ERROR;
  bump(p, C_PACKETS_IN);
  bump(p, C_BYTES_IN, gst_buffer_get_size(buffer));
  if (!s.mode_known) {
    s.mode_known = true;
    if (p.settings.mode != OTP_MODE_AUTO) {
      s.stream = p.settings.mode == OTP_MODE_STREAM;
    } else {
      // From caps only: guessing from content would misread a file that happens to
      // start like an RTP header. No caps (filesrc, tcpserversrc) means a byte stream;
      // udpsrc users set caps=application/x-rtp or mode=datagram.
      GstCaps* caps = p.sink_caps.get();
      const char* name = caps && !gst_caps_is_empty(caps) && !gst_caps_is_any(caps)
                             ? gst_structure_get_name(gst_caps_get_structure(caps, 0))
                             : "";
      s.stream =
          !g_str_equal(name, "application/x-rtp") && !g_str_equal(name, "application/x-rtcp");
    }
    GST_INFO_OBJECT(self, "%s mode (mode property %d, caps %" GST_PTR_FORMAT ")",
                    s.stream ? "stream" : "datagram", p.settings.mode,
                    static_cast<void*>(p.sink_caps.get()));
  }
  push_caps_once(self);
  if (s.stream) {
    gst_adapter_push(s.adapter.get(), in.release());
    return drain_stream(self, false);
  }
  if (p.non_blocking) return protect_or_hold(self, std::move(in));
  bool wait = false;
  return protect_datagram(self, buffer, wait);
}

GstFlowReturn chain(GstPad*, GstObject* parent, GstBuffer* buffer) {
  GstOtpEncrypt* self = GST_OTP_ENCRYPT(parent);
  GstPtr<GstBuffer> in(buffer);
  return guarded(GST_ELEMENT(self), [&] { return process(self, std::move(in)); });
}

gboolean sink_event(GstPad* pad, GstObject* parent, GstEvent* event) {
  GstOtpEncrypt* self = GST_OTP_ENCRYPT(parent);
  Private& p = *self->priv;
  switch (GST_EVENT_TYPE(event)) {
    case GST_EVENT_CAPS: {
      GstCaps* caps = nullptr;
      gst_event_parse_caps(event, &caps);
      p.sink_caps.reset(gst_caps_ref(caps));
      gst_event_unref(event);
      push_caps_once(self);
      return TRUE;
    }
    case GST_EVENT_SEGMENT:
      push_caps_once(self);
      break;
    case GST_EVENT_FLUSH_START:
      p.flushing = true;
      p.release_timer.cancel();
      break;
    case GST_EVENT_FLUSH_STOP:
      if (p.session) p.session->held.clear();  // flushed, never sent
      p.counters.set(C_PACKETS_HELD, 0);
      p.flushing = false;
      break;
    case GST_EVENT_CUSTOM_DOWNSTREAM:
      // "otp-flush": emit what is pending now instead of waiting for a full record (the
      // file transfer sends it after control messages and at the end of a growing file).
      if (gst_event_has_name(event, "otp-flush") && p.session && p.session->stream) {
        gst_event_unref(event);
        const GstFlowReturn ret =
            guarded(GST_ELEMENT(self), [self] { return drain_stream(self, true); });
        return ret == GST_FLOW_OK || ret == GST_FLOW_FLUSHING;
      }
      break;
    case GST_EVENT_EOS:
      // Non-blocking even at the end: what key has freed leaves, the rest is dropped
      // (counted) rather than waited for.
      while (p.session && !p.session->held.empty() && !p.flushing) {
        const std::size_t before = p.session->held.size();
        const GstFlowReturn ret = guarded(GST_ELEMENT(self), [self] { return release_held(self); });
        if (ret != GST_FLOW_OK || p.session->held.size() == before) {
          bump(p, C_DROPS_NO_KEY, p.session->held.clear());
          p.counters.set(C_PACKETS_HELD, 0);
        }
      }
      if (p.session && p.session->stream) {
        // The final record proves to the receiver that nothing was cut off.
        const GstFlowReturn ret = guarded(GST_ELEMENT(self), [self] {
          std::size_t consumed = 0;
          const GstFlowReturn drained = drain_stream(self, true);
          return drained == GST_FLOW_OK ? emit_record(self, otp::RecordKind::final, {}, consumed)
                                        : drained;
        });
        if (ret != GST_FLOW_OK && ret != GST_FLOW_FLUSHING) {
          GST_ELEMENT_ERROR(self, STREAM, FAILED, ("could not finish the protected stream"),
                            ("flow: %s", gst_flow_get_name(ret)));
        }
      }
      break;
    default:
      break;
  }
  return gst_pad_event_default(pad, parent, event);
}

}  // namespace

static void gst_otp_encrypt_set_property(GObject* object, guint id, const GValue* value,
                                         GParamSpec* pspec) {
  Private& p = *GST_OTP_ENCRYPT(object)->priv;
  GST_OBJECT_LOCK(object);
  if (!set_common_property(p.settings, id, value)) {
    switch (id) {
      case PROP_ON_KEY_EXHAUSTED:
        p.on_key_exhausted = g_value_get_enum(value);
        break;
      case PROP_ANNOUNCE_REPEATS:
        p.announce_repeats = g_value_get_uint(value);
        break;
      case PROP_RECORD_SIZE:
        p.record_size = g_value_get_uint(value);
        break;
      case PROP_CIPHER:
        p.cipher = g_value_get_enum(value);
        break;
      case PROP_REKEY_INTERVAL:
        p.rekey_interval = g_value_get_uint(value);
        break;
      case PROP_KEY_TIMEOUT:
        p.key_timeout_ms = g_value_get_uint(value);
        break;
      case PROP_NON_BLOCKING:
        p.non_blocking = g_value_get_boolean(value);
        break;
      case PROP_KEY_WAIT:
        p.key_wait_ms = g_value_get_uint(value);
        break;
      default:
        G_OBJECT_WARN_INVALID_PROPERTY_ID(object, id, pspec);
    }
  }
  GST_OBJECT_UNLOCK(object);
}

static void gst_otp_encrypt_get_property(GObject* object, guint id, GValue* value,
                                         GParamSpec* pspec) {
  GstOtpEncrypt* self = GST_OTP_ENCRYPT(object);
  Private& p = *self->priv;
  if (id == PROP_STATS) {
    GstPtr<GstStructure> s =
        counters_structure("application/x-otp-encrypt-stats", p.counters, counter_name);
    gst_structure_set(s.get(), "cipher", G_TYPE_STRING,
                      p.cipher == CIPHER_AES_256_GCM ? "aes-256-gcm" : "otp", nullptr);
    GST_OBJECT_LOCK(object);
    if (p.session) {
      gst_structure_set(s.get(), "mode", G_TYPE_STRING,
                        !p.session->mode_known ? "unknown"
                        : p.session->stream    ? "stream"
                                               : "datagram",
                        "key-exhausted", G_TYPE_BOOLEAN, p.session->exhausted, "aes-fallback",
                        G_TYPE_BOOLEAN, p.session->in_fallback, nullptr);
      add_supply_stats(s.get(), p.session->source);
    }
    GST_OBJECT_UNLOCK(object);
    g_value_take_boxed(value, s.release());
    return;
  }
  GST_OBJECT_LOCK(object);
  if (!get_common_property(p.settings, id, value)) {
    switch (id) {
      case PROP_ON_KEY_EXHAUSTED:
        g_value_set_enum(value, p.on_key_exhausted);
        break;
      case PROP_ANNOUNCE_REPEATS:
        g_value_set_uint(value, p.announce_repeats);
        break;
      case PROP_RECORD_SIZE:
        g_value_set_uint(value, p.record_size);
        break;
      case PROP_CIPHER:
        g_value_set_enum(value, p.cipher);
        break;
      case PROP_REKEY_INTERVAL:
        g_value_set_uint(value, p.rekey_interval);
        break;
      case PROP_KEY_TIMEOUT:
        g_value_set_uint(value, p.key_timeout_ms);
        break;
      case PROP_NON_BLOCKING:
        g_value_set_boolean(value, p.non_blocking);
        break;
      case PROP_KEY_WAIT:
        g_value_set_uint(value, p.key_wait_ms);
        break;
      default:
        G_OBJECT_WARN_INVALID_PROPERTY_ID(object, id, pspec);
    }
  }
  GST_OBJECT_UNLOCK(object);
}

static GstStateChangeReturn gst_otp_encrypt_change_state(GstElement* element,
                                                         GstStateChange transition) {
  GstOtpEncrypt* self = GST_OTP_ENCRYPT(element);
  Private& p = *self->priv;
  if (transition == GST_STATE_CHANGE_READY_TO_PAUSED) {
    std::string error;
    KeySource source = open_key_source(p.settings, keys::SaeRole::master, "otpencrypt",
                                       GST_CAT_DEFAULT, GST_OBJECT(self), error);
    if (!source.pad) {
      GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("%s", error.c_str()), (nullptr));
      return GST_STATE_CHANGE_FAILURE;
    }
    auto session = std::make_unique<Session>();
    session->source = std::move(source);
    std::uint64_t stream_id = 0;
    RAND_bytes(reinterpret_cast<unsigned char*>(&stream_id), sizeof stream_id);
    try {
      session->encoder =
          std::make_unique<otp::Encoder>(*session->source.pad, stream_id, p.announce_repeats);
    } catch (const std::exception& e) {
      internal_error(element, e);
      return GST_STATE_CHANGE_FAILURE;
    }
    p.flushing = false;
    p.caps_pushed = false;
    GST_OBJECT_LOCK(self);
    p.session = std::move(session);
    GST_OBJECT_UNLOCK(self);
  } else if (transition == GST_STATE_CHANGE_PAUSED_TO_READY) {
    p.flushing = true;  // releases a chain function waiting for key
  }
  const GstStateChangeReturn ret =
      GST_ELEMENT_CLASS(gst_otp_encrypt_parent_class)->change_state(element, transition);
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY) {
    p.release_timer.cancel();
    std::unique_ptr<Session> old;
    GST_PAD_STREAM_LOCK(self->sinkpad);  // a release timer in progress holds it
    GST_OBJECT_LOCK(self);
    old = std::move(p.session);
    GST_OBJECT_UNLOCK(self);
    GST_PAD_STREAM_UNLOCK(self->sinkpad);
    p.counters.set(C_PACKETS_HELD, 0);
    p.sink_caps.reset();
  }
  return ret;
}

static void gst_otp_encrypt_finalize(GObject* object) {
  std::unique_ptr<Private> owned(GST_OTP_ENCRYPT(object)->priv);
  G_OBJECT_CLASS(gst_otp_encrypt_parent_class)->finalize(object);
}

static void gst_otp_encrypt_class_init(GstOtpEncryptClass* klass) {
  GObjectClass* gobject = G_OBJECT_CLASS(klass);
  GstElementClass* element = GST_ELEMENT_CLASS(klass);
  gobject->set_property = gst_otp_encrypt_set_property;
  gobject->get_property = gst_otp_encrypt_get_property;
  gobject->finalize = gst_otp_encrypt_finalize;
  element->change_state = gst_otp_encrypt_change_state;

  install_common_properties(gobject, keys::SaeRole::master);
  const auto rw = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS |
                                           GST_PARAM_MUTABLE_READY);
  g_object_class_install_property(
      gobject, PROP_ON_KEY_EXHAUSTED,
      g_param_spec_enum("on-key-exhausted", "On key exhausted",
                        "What datagram mode does without pad (stream mode always waits); never "
                        "sends plaintext",
                        on_key_exhausted_get_type(), KEY_EXHAUSTED_DROP, rw));
  g_object_class_install_property(
      gobject, PROP_ANNOUNCE_REPEATS,
      g_param_spec_uint("announce-repeats", "Announcement repeats",
                        "Datagram mode: times each key announcement is sent again, spread out, "
                        "so a lost packet does not lose keys",
                        0, 16, 2, rw));
  g_object_class_install_property(
      gobject, PROP_RECORD_SIZE,
      g_param_spec_uint("record-size", "Record size", "Stream mode: payload bytes per record", 256,
                        otp::kMaxUnitPayload, 32768, rw));

  g_object_class_install_property(
      gobject, PROP_CIPHER,
      g_param_spec_enum("cipher", "Cipher",
                        "The one-time pad, or AES-256-GCM with keys drawn from the same QKD key "
                        "stream (SRTP in datagram mode, AES-GCM records in stream mode)",
                        cipher_get_type(), CIPHER_OTP, rw));
  g_object_class_install_property(
      gobject, PROP_REKEY_INTERVAL,
      g_param_spec_uint("rekey-interval", "Rekey interval",
                        "AES mode and AES fallback: packets (datagram) or records (stream) per "
                        "key; a new key is drawn from the pad after this many, while pad lasts",
                        1, G_MAXINT32, 1024, rw));
  g_object_class_install_property(
      gobject, PROP_KEY_TIMEOUT,
      g_param_spec_uint("key-timeout", "Key timeout",
                        "Stream mode: milliseconds to wait for key before failing with an error "
                        "that quotes the key source (a stream cannot drop data); 0 waits forever",
                        0, G_MAXUINT, 30000, rw));
  g_object_class_install_property(
      gobject, PROP_NON_BLOCKING,
      g_param_spec_boolean(
          "non-blocking", "Non-blocking",
          "Datagram mode: never wait in the streaming thread. Packets that would wait for key "
          "(the stream's first key, on-key-exhausted=block or fallback-aes before its first "
          "master key) are held in arrival order, for at most key-wait, and sent when key "
          "arrives; for applications that drive many streams from one thread",
          FALSE, rw));
  g_object_class_install_property(
      gobject, PROP_KEY_WAIT,
      g_param_spec_uint("key-wait", "Key wait",
                        "Datagram mode with non-blocking: milliseconds a packet may be held "
                        "waiting for key before it is dropped (counted in drops-no-key); at "
                        "most 4096 packets or 4 MiB are held, the oldest give way; at EOS what "
                        "still waits is dropped",
                        0, 60000, 10000, rw));
  signals[SIGNAL_KEY_LOW] = g_signal_new("key-low", G_TYPE_FROM_CLASS(klass), G_SIGNAL_RUN_LAST, 0,
                                         nullptr, nullptr, nullptr, G_TYPE_NONE, 1, G_TYPE_UINT64);
  signals[SIGNAL_KEY_EXHAUSTED] =
      g_signal_new("key-exhausted", G_TYPE_FROM_CLASS(klass), G_SIGNAL_RUN_LAST, 0, nullptr,
                   nullptr, nullptr, G_TYPE_NONE, 0);
  // Action: the next AES packet (cipher aes-256-gcm, or fallback-aes) draws a fresh master
  // key from the pad, because the receiver that could derive the current one is gone
  // (the partner restarted; otp-gateway emits it when it restarts a key lane).
  g_signal_new_class_handler(
      "rekey", G_TYPE_FROM_CLASS(klass),
      static_cast<GSignalFlags>(G_SIGNAL_RUN_LAST | G_SIGNAL_ACTION),
      G_CALLBACK(+[](GstOtpEncrypt* self) { self->priv->forget_aes_key = true; }), nullptr, nullptr,
      nullptr, G_TYPE_NONE, 0);

  gst_element_class_add_static_pad_template(element, &sink_template);
  gst_element_class_add_static_pad_template(element, &src_template);
  gst_element_class_set_static_metadata(
      element, "One-time pad encoder", "Filter/Network/Crypto",
      "Protects RTP, RTCP or a byte stream with a one-time pad from QKD (ETSI GS QKD 014) and "
      "an information-theoretically secure Wegman-Carter MAC",
      "otpgate <otpgate@localhost>");
  GST_DEBUG_CATEGORY_INIT(otp_encrypt_debug, "otpencrypt", 0, "One-time pad encoder");
  gst_type_mark_as_plugin_api(otp_mode_get_type(), static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(on_key_exhausted_get_type(), static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(cipher_get_type(), static_cast<GstPluginAPIFlags>(0));
}

static void gst_otp_encrypt_init(GstOtpEncrypt* self) {
  self->priv = std::make_unique<Private>().release();  // owned; freed in finalize
  self->sinkpad = gst_pad_new_from_static_template(&sink_template, "sink");
  gst_pad_set_chain_function(self->sinkpad, chain);
  gst_pad_set_event_function(self->sinkpad, sink_event);
  gst_element_add_pad(GST_ELEMENT(self), self->sinkpad);
  self->srcpad = gst_pad_new_from_static_template(&src_template, "src");
  gst_pad_use_fixed_caps(self->srcpad);
  gst_element_add_pad(GST_ELEMENT(self), self->srcpad);
}

GType otpgate_encrypt_get_type() {
  return gst_otp_encrypt_get_type();
}

// SPDX-License-Identifier: LGPL-2.1-or-later
/**
 * otpdecrypt: authenticates and decrypts what otpencrypt sent.
 *
 * Datagram mode: every packet's Wegman-Carter tag is checked before anything is
 * output; failures, replays (pad already used, or its key already destroyed), packets
 * whose key has not arrived and malformed input are dropped and counted, never passed
 * on. Loss, reordering and duplication never desynchronise: each packet carries its pad
 * offset. RTP leaves on "src", RTCP on "rtcp_src".
 *
 *   gst-launch-1.0 udpsrc port=5004 caps=application/x-otp ! otpdecrypt pad-file=pad.bin ! \
 *       application/x-rtp,media=audio,clock-rate=48000,encoding-name=OPUS,payload=96 ! \
 *       rtpopusdepay ! opusdec ! autoaudiosink
 *
 * Stream mode: records in order, ending with the final record; any failure, or a stream
 * that ends early, is an error (no partial success). See docs/wire-format.md.
 *
 * Signal "sender-restarted" (datagram mode): the sender's pad stream resumed beyond a gap
 * at a self-verifying announcement on a journal chunk boundary, i.e. the sending side
 * restarted. Its receiver is then
 * likely new as well and cannot follow pad announced to the old one: an application that
 * sends the other way restarts its own sending stream's pad (otp-gateway does).
 */
#include <gst/base/gstadapter.h>

#include <array>
#include <chrono>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "otp_element_common.hpp"
#include "otpgate/otp_codec.hpp"

using namespace otpgate;
using namespace otpgate::gst;

GST_DEBUG_CATEGORY_STATIC(otp_decrypt_debug);
#define GST_CAT_DEFAULT otp_decrypt_debug

namespace {

enum { PROP_KEY_TIMEOUT = PROP_COMMON_LAST, PROP_WINDOW_SIZE, PROP_KEY_WAIT, PROP_ACCEPT_AES };

enum Counter {
  C_PACKETS_IN,
  C_BYTES_IN,
  C_PACKETS_OUT,
  C_BYTES_OUT,
  C_RTCP_OUT,
  C_PAD_USED,
  C_AUTH_FAILURES,
  C_REPLAYS,
  C_DROPS_NO_KEY,
  C_DROPS_MALFORMED,
  C_ANNOUNCEMENTS,
  C_ANNOUNCEMENT_REPEATS,
  C_ANNOUNCEMENTS_PENDING,
  C_AES_PACKETS,
  C_KEY_WAITS,
  C_PACKETS_HELD,
  C_ANNOUNCEMENTS_UNVERIFIABLE,
  C_ANNOUNCEMENTS_REFUSED,
  C_ANNOUNCEMENTS_EXPIRED,
  C_KEYS_AWAITED,
  C_KEYS_LOST,
  C_WINDOW_OVERRUNS,
  C_MEMORY_LOCK_FAILURES,
  C_SENDER_RESTARTS,
  C_DROPS_CIPHER,
  C_COUNT
};
enum { SIGNAL_SENDER_RESTARTED, N_SIGNALS };
guint signals[N_SIGNALS];
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
    case C_RTCP_OUT:
      return "rtcp-packets-out";
    case C_PAD_USED:
      return "pad-bytes-used";
    case C_AUTH_FAILURES:
      return "auth-failures";
    case C_REPLAYS:
      return "replays";
    case C_DROPS_NO_KEY:
      return "drops-no-key";
    case C_DROPS_MALFORMED:
      return "drops-malformed";
    case C_ANNOUNCEMENTS:
      return "announcements-verified";
    case C_ANNOUNCEMENT_REPEATS:
      return "announcement-repeats";
    case C_ANNOUNCEMENTS_PENDING:
      return "announcements-pending";
    case C_AES_PACKETS:
      return "aes-packets";
    case C_KEY_WAITS:
      return "key-waits";
    case C_PACKETS_HELD:
      return "packets-held";
    case C_ANNOUNCEMENTS_UNVERIFIABLE:
      return "announcements-unverifiable";
    case C_ANNOUNCEMENTS_REFUSED:
      return "announcements-refused";
    case C_ANNOUNCEMENTS_EXPIRED:
      return "announcements-expired";
    case C_KEYS_AWAITED:
      return "keys-awaited";
    case C_KEYS_LOST:
      return "keys-lost";
    case C_WINDOW_OVERRUNS:
      return "window-overruns";
    case C_MEMORY_LOCK_FAILURES:
      return "memory-lock-failures";
    case C_SENDER_RESTARTS:
      return "sender-restarts";
    case C_DROPS_CIPHER:
      return "drops-cipher";
    case C_COUNT:
      break;
  }
  return "unknown-counter";
}

// The counter a unit that was refused adds to; nullopt for what is not a refusal.
std::optional<Counter> refusal_counter(otp::Decoder::Verdict verdict, bool announcement) {
  using V = otp::Decoder::Verdict;
  // An announcement refused for pad nobody holds is counted by the decoder
  // (announcements-unverifiable or -refused): drops-no-key counts packets only.
  if (announcement && verdict == V::no_key) return std::nullopt;
  switch (verdict) {
    case V::auth_failure:
      return C_AUTH_FAILURES;
    case V::replay:
      return C_REPLAYS;
    case V::window_overrun:
      return C_WINDOW_OVERRUNS;
    case V::no_key:
    case V::key_pending:
      return C_DROPS_NO_KEY;
    case V::malformed:
    case V::out_of_sequence:
      return C_DROPS_MALFORMED;
    case V::cipher_refused:
      return C_DROPS_CIPHER;
    case V::plaintext:
    case V::announcement:
    case V::announcement_pending:
    case V::repeat:
      break;
  }
  return std::nullopt;
}

struct Session {
  KeySource source;
  std::unique_ptr<otp::Decoder> decoder;
  GstPtr<GstAdapter> adapter{gst_adapter_new()};
  bool mode_known = false;
  bool stream = false;
  bool preamble_seen = false;
  bool told_window_overrun = false;
  bool told_memory_lock = false;
  bool told_cipher_refused = false;
  std::uint64_t sender_restarts_signalled = 0;  // of the decoder's sender_restarts
  std::vector<std::uint8_t> out = std::vector<std::uint8_t>(otp::kMaxUnitPayload);
  // Datagram mode: packets whose key a verified announcement has on its way. The
  // streaming thread never waits for them.
  HeldPackets held;
  OutputBuffers output, rtcp_output;  // what leaves by the source pads
};

struct Private {
  KeySourceSettings settings;
  guint key_timeout_ms = 30000;
  guint key_wait_ms = 500;
  guint64 window_size = 16u << 20;
  bool accept_aes = true;
  std::unique_ptr<Session> session;
  std::atomic<bool> flushing{false};
  GstEvent* pending_segment = nullptr;  // held until the src caps are known
  bool src_caps_sent = false;
  bool rtcp_caps_sent = false;
  PublishedCounters<C_COUNT> counters;
  // Releases held packets when no new packet arrives to do it (see schedule_release).
  ReleaseTimer release_timer;
};

}  // namespace

struct GstOtpDecrypt {
  GstElement parent;
  GstPad* sinkpad;
  GstPad* srcpad;
  GstPad* rtcp_srcpad;
  Private* priv;
};
struct GstOtpDecryptClass {
  GstElementClass parent_class;
};

G_DEFINE_TYPE(GstOtpDecrypt, gst_otp_decrypt, GST_TYPE_ELEMENT)
#define GST_OTP_DECRYPT(obj) (reinterpret_cast<GstOtpDecrypt*>(obj))

static GstStaticPadTemplate sink_template = GST_STATIC_PAD_TEMPLATE(
    "sink", GST_PAD_SINK, GST_PAD_ALWAYS, GST_STATIC_CAPS("application/x-otp"));
static GstStaticPadTemplate src_template =
    GST_STATIC_PAD_TEMPLATE("src", GST_PAD_SRC, GST_PAD_ALWAYS,
                            GST_STATIC_CAPS("application/x-rtp; application/octet-stream"));
static GstStaticPadTemplate rtcp_src_template = GST_STATIC_PAD_TEMPLATE(
    "rtcp_src", GST_PAD_SRC, GST_PAD_ALWAYS, GST_STATIC_CAPS("application/x-rtcp"));

namespace {

void bump(Private& p, Counter c, guint64 by = 1) {
  p.counters.set(c, p.counters.get(c) + by);
}

// Why pad was dropped when the window could not lock memory for it, and the fix.
constexpr const char* kMemoryLockProblem =
    "could not lock memory for received pad: the memory lock limit (RLIMIT_MEMLOCK; "
    "LimitMEMLOCK= in systemd, ulimit -l) is used up, so that pad was dropped unused rather "
    "than kept where it could be swapped out, and units on it are dropped "
    "(memory-lock-failures)";
constexpr const char* kMemoryLockFix =
    "raise LimitMEMLOCK (each lane's key rings plus the 4 KiB blocks of pad each receiving "
    "stream holds), or hold less pad: fewer streams (otp-gateway: lower sip.max_media or "
    "keys.ring_bytes), a smaller window-size";

void publish(GstOtpDecrypt* self) {
  Private& p = *self->priv;
  const auto& s = p.session->decoder->stats();
  auto& c = p.counters;
  if (s.memory_lock_failures > 0 && !p.session->told_memory_lock) {
    p.session->told_memory_lock = true;  // once per session: counted from then on
    GST_ELEMENT_WARNING(self, RESOURCE, NO_SPACE_LEFT, ("%s", kMemoryLockProblem),
                        ("%s", kMemoryLockFix));
  }
  c.set(C_MEMORY_LOCK_FAILURES, s.memory_lock_failures);
  c.set(C_PAD_USED, s.pad_bytes_used);
  c.set(C_ANNOUNCEMENTS, s.announcements_verified);
  c.set(C_AES_PACKETS, s.aes_units);
  c.set(C_ANNOUNCEMENT_REPEATS, s.announcement_repeats);
  c.set(C_ANNOUNCEMENTS_PENDING, s.announcements_pending);
  c.set(C_PACKETS_HELD, p.session->held.size());
  c.set(C_ANNOUNCEMENTS_UNVERIFIABLE, s.announcements_unverifiable);
  c.set(C_ANNOUNCEMENTS_REFUSED, s.announcements_refused);
  c.set(C_ANNOUNCEMENTS_EXPIRED, s.announcements_expired);
  c.set(C_KEYS_AWAITED, s.keys_awaited);
  c.set(C_KEYS_LOST, s.keys_lost);
  c.set(C_SENDER_RESTARTS, s.sender_restarts);
  if (s.sender_restarts > p.session->sender_restarts_signalled) {
    p.session->sender_restarts_signalled = s.sender_restarts;
    GST_INFO_OBJECT(self, "the sender's pad stream resumed after a gap: the sender restarted");
    g_signal_emit(self, signals[SIGNAL_SENDER_RESTARTED], 0);
  }
}

// Output caps: what downstream asks for (e.g. a capsfilter with clock-rate), else plain.
void send_caps(GstOtpDecrypt* self, GstPad* pad, const char* media_type) {
  GstPtr<GstCaps> filter(gst_caps_new_empty_simple(media_type));
  GstPtr<GstCaps> wanted(gst_pad_peer_query_caps(pad, filter.get()));
  const bool fixed = wanted && !gst_caps_is_empty(wanted.get()) && !gst_caps_is_any(wanted.get());
  const GstPtr<GstCaps> caps(fixed ? gst_caps_fixate(gst_caps_copy(wanted.get()))
                                   : gst_caps_new_empty_simple(media_type));
  gst_pad_push_event(pad, gst_event_new_caps(caps.get()));
  if (self->priv->pending_segment)
    gst_pad_push_event(pad, gst_event_ref(self->priv->pending_segment));
}

GstFlowReturn push_out(GstOtpDecrypt* self, GstPad* pad, const std::uint8_t* data, std::size_t n,
                       GstBuffer* timing) {
  Private& p = *self->priv;
  const bool rtcp = pad == self->rtcp_srcpad;
  bool& sent = rtcp ? p.rtcp_caps_sent : p.src_caps_sent;
  if (!sent) {
    sent = true;
    send_caps(self, pad,
              rtcp                ? "application/x-rtcp"
              : p.session->stream ? "application/octet-stream"
                                  : "application/x-rtp");
  }
  OutputBuffers& output = rtcp ? p.session->rtcp_output : p.session->output;
  GstBuffer* out = output.take(n);
  gst_buffer_fill(out, 0, data, n);
  if (timing) gst_buffer_copy_into(out, timing, GST_BUFFER_COPY_METADATA, 0, -1);
  bump(p, rtcp ? C_RTCP_OUT : C_PACKETS_OUT);
  bump(p, C_BYTES_OUT, n);
  output.sending(out);
  const GstFlowReturn ret = gst_pad_push(pad, out);
  return rtcp && ret == GST_FLOW_NOT_LINKED ? GST_FLOW_OK : ret;  // RTCP is optional
}

// Decodes one datagram and pushes what it yields; `verdict` says what happened. A packet
// whose key is on its way (key_pending) is left to the caller, untouched.
GstFlowReturn decode_datagram(GstOtpDecrypt* self, GstBuffer* in, otp::Decoder::Verdict& verdict) {
  Private& p = *self->priv;
  Session& s = *p.session;
  const MappedBuffer map(in, GST_MAP_READ);
  if (!map) {
    GST_ELEMENT_ERROR(self, RESOURCE, READ, ("could not map an input buffer for reading"),
                      (nullptr));
    return GST_FLOW_ERROR;
  }
  std::size_t written = 0;
  const std::span<const std::uint8_t> datagram = map.bytes();
  verdict = s.decoder->open_datagram(datagram, s.out, written);
  GstFlowReturn ret = GST_FLOW_OK;
  if (verdict == otp::Decoder::Verdict::plaintext) {
    GstPad* pad =
        otp::classify(datagram) == otp::DatagramType::rtcp ? self->rtcp_srcpad : self->srcpad;
    ret = push_out(self, pad, s.out.data(), written, in);
  } else if (verdict != otp::Decoder::Verdict::key_pending) {  // key_pending: see the caller
    const bool announcement = otp::classify(datagram) == otp::DatagramType::announcement;
    if (const auto counter = refusal_counter(verdict, announcement)) bump(p, *counter);
    if (verdict == otp::Decoder::Verdict::auth_failure) {
      GST_DEBUG_OBJECT(self, "dropped a packet that failed authentication");
    }
    if (verdict == otp::Decoder::Verdict::window_overrun && !s.told_window_overrun) {
      s.told_window_overrun = true;  // once per session: the fix is the same every time
      GST_ELEMENT_WARNING(
          self, RESOURCE, SETTINGS,
          ("window-size %" G_GUINT64_FORMAT
           " bytes is smaller than the pad the sender announces ahead: packets on pad the "
           "window already wiped are dropped (window-overruns)",
           p.window_size),
          ("raise window-size to at least twice the sender's key ring"));
    }
    if (verdict == otp::Decoder::Verdict::cipher_refused && !s.told_cipher_refused) {
      // Once per session. Refused before authentication (nothing is opened), so a forger
      // can cause it too: the text names both causes.
      s.told_cipher_refused = true;
      GST_ELEMENT_WARNING(self, STREAM, DECRYPT,
                          ("packets marked AES-256-GCM arrive, which this receiver does not "
                           "accept (accept-aes=false): they are dropped (drops-cipher); the "
                           "sender runs AES, or someone sends forged packets"),
                          ("run the sender with cipher=otp and no AES fallback, or allow AES "
                           "here"));
    }
  }
  publish(self);
  return ret;
}

void schedule_release(GstOtpDecrypt* self);

// Releases held packets in arrival order: decrypted as soon as their keys are placed,
// dropped (counted) once their key-wait has passed or when flushing; a slice at a time.
GstFlowReturn release_held(GstOtpDecrypt* self) {
  Private& p = *self->priv;
  Session& s = *p.session;
  const auto now = std::chrono::steady_clock::now();
  for (std::size_t n = 0; !s.held.empty() && n < ReleaseTimer::kPacketsPerRelease; ++n) {
    otp::Decoder::Verdict verdict = otp::Decoder::Verdict::key_pending;
    GstFlowReturn ret = GST_FLOW_OK;
    if (!p.flushing) ret = decode_datagram(self, s.held.front(), verdict);
    if (verdict == otp::Decoder::Verdict::key_pending) {
      if (!p.flushing && !s.held.front_expired(now)) break;  // on its way: keep the order
      bump(p, C_DROPS_NO_KEY);
    }
    s.held.pop_front();
    if (ret != GST_FLOW_OK) return ret;
  }
  if (!s.held.empty()) schedule_release(self);
  publish(self);
  return GST_FLOW_OK;
}

// From the release timer, with the sink pad's stream lock held.
void on_release_timer(GstElement* element) {
  auto* self = GST_OTP_DECRYPT(element);
  if (!self->priv->session || self->priv->session->held.empty()) return;
  const GstFlowReturn ret = guarded(element, [self] { return release_held(self); });
  if (ret != GST_FLOW_OK && ret != GST_FLOW_FLUSHING && ret != GST_FLOW_NOT_LINKED) {
    GST_DEBUG_OBJECT(self, "releasing held packets: %s", gst_flow_get_name(ret));
  }
}

// Arms the timer that releases held packets in a few ms.
void schedule_release(GstOtpDecrypt* self) {
  if (self->priv->flushing) return;
  self->priv->release_timer.schedule(GST_ELEMENT(self), self->sinkpad, on_release_timer);
}

GstFlowReturn open_datagram(GstOtpDecrypt* self, GstPtr<GstBuffer> in) {
  Private& p = *self->priv;
  Session& s = *p.session;
  // Right after an announcement (call start, or a KME relaying late) a packet's key may
  // be on its way: it is held, not dropped, but only when a verified announcement (or a
  // stream's first, whose keys are being fetched) covers its pad, and only for key-wait.
  // A packet naming pad nobody announced is dropped at once: forgeries cost no waiting.
  // Held packets leave in arrival order (RTP receivers expect the sender's order); only
  // pad a verified announcement named can hold the queue, for at most key-wait. The
  // streaming thread never blocks for them.
  std::uint8_t head[4] = {};
  gst_buffer_extract(in.get(), 0, head, sizeof head);
  if (!s.held.empty() && otp::classify(head) != otp::DatagramType::announcement) {
    // Behind packets still waiting: in order (announcements go first, they bring keys).
    bump(p, C_DROPS_NO_KEY, s.held.hold(std::move(in), std::chrono::milliseconds(p.key_wait_ms)));
    return release_held(self);
  }
  otp::Decoder::Verdict verdict{};
  const GstFlowReturn ret = decode_datagram(self, in.get(), verdict);
  if (ret != GST_FLOW_OK) return ret;
  if (verdict == otp::Decoder::Verdict::key_pending) {
    if (p.key_wait_ms == 0) {
      bump(p, C_DROPS_NO_KEY);
      return GST_FLOW_OK;
    }
    bump(p, C_DROPS_NO_KEY, s.held.hold(std::move(in), std::chrono::milliseconds(p.key_wait_ms)));
    bump(p, C_KEY_WAITS);
    publish(self);
    schedule_release(self);
    return GST_FLOW_OK;
  }
  return s.held.empty() ? GST_FLOW_OK : release_held(self);
}

// Why a record stopped the stream, for the element error (no key bytes, no guessing:
// a key that did not arrive is a key problem, never reported as an attack).
const char* why_refused(otp::Decoder::Verdict verdict) {
  using V = otp::Decoder::Verdict;
  switch (verdict) {
    case V::auth_failure:
      return "failed authentication: the data was corrupted or tampered with on the way";
    case V::replay:
      return "replays pad that was already used (an old or duplicated stream)";
    case V::window_overrun:
      return "uses pad the window had already wiped: window-size is smaller than what the "
             "sender announces ahead; raise window-size";
    case V::no_key:
    case V::key_pending:
      return "has no key: its key was not delivered in time (see the key source's state in "
             "the stats property and the log)";
    case V::malformed:
      return "is not a valid otpencrypt record";
    case V::out_of_sequence:
      return "is out of sequence: records were reordered, removed or spliced from another "
             "stream";
    case V::cipher_refused:
      return "is marked AES-256-GCM, which accept-aes=false refuses";
    case V::plaintext:
    case V::announcement:
    case V::announcement_pending:
    case V::repeat:
      break;
  }
  return "was refused";
}

GstFlowReturn fail(GstOtpDecrypt* self, const char* what, otp::Decoder::Verdict verdict) {
  using V = otp::Decoder::Verdict;
  Private& p = *self->priv;
  bump(p, refusal_counter(verdict, false).value_or(C_DROPS_MALFORMED));  // a record
  if ((verdict == V::no_key || verdict == V::key_pending) &&
      key_source_failed(GST_ELEMENT(self), p.session->source)) {
    return GST_FLOW_ERROR;
  }
  if ((verdict == V::no_key || verdict == V::key_pending) &&
      p.session->decoder->stats().memory_lock_failures > 0) {
    GST_ELEMENT_ERROR(self, STREAM, DECRYPT, ("%s has no key: %s", what, kMemoryLockProblem),
                      ("%s", kMemoryLockFix));
    return GST_FLOW_ERROR;
  }
  // Keys the source refused because an earlier run used their pad: a replayed stream.
  const keys::KeySupply* supply = p.session->source.supply();
  if ((verdict == V::no_key || verdict == V::key_pending) && supply &&
      supply->stats().keys_replayed > 0) {
    GST_ELEMENT_ERROR(self, STREAM, DECRYPT,
                      ("%s uses pad that an earlier run already used (below this receiver's "
                       "journal): a replayed or re-sent old stream",
                       what),
                      ("%" G_GUINT64_FORMAT " announced keys refused as below the journal",
                       supply->stats().keys_replayed));
    return GST_FLOW_ERROR;
  }
  GST_ELEMENT_ERROR(self, STREAM, DECRYPT, ("%s %s", what, why_refused(verdict)), (nullptr));
  return GST_FLOW_ERROR;
}

GstFlowReturn drain_stream(GstOtpDecrypt* self) {
  Private& p = *self->priv;
  Session& s = *p.session;
  GstAdapter* adapter = s.adapter.get();
  if (!s.preamble_seen) {
    constexpr std::size_t kPreambleBytes = otp::kStreamPreamble.size();
    if (gst_adapter_available(adapter) < kPreambleBytes) return GST_FLOW_OK;
    const auto* head = static_cast<const std::uint8_t*>(gst_adapter_map(adapter, kPreambleBytes));
    const bool ok = otp::starts_with_preamble({head, kPreambleBytes});
    gst_adapter_unmap(adapter);
    if (!ok) {
      GST_ELEMENT_ERROR(self, STREAM, WRONG_TYPE,
                        ("input is not an otpencrypt stream (wrong preamble); is the sender "
                         "otpencrypt in stream mode?"),
                        (nullptr));
      return GST_FLOW_ERROR;
    }
    gst_adapter_flush(adapter, kPreambleBytes);
    s.preamble_seen = true;
  }
  while (gst_adapter_available(adapter) >= otp::kRecordPrefixBytes) {
    const auto* prefix =
        static_cast<const std::uint8_t*>(gst_adapter_map(adapter, otp::kRecordPrefixBytes));
    const auto size = otp::record_size({prefix, otp::kRecordPrefixBytes});
    gst_adapter_unmap(adapter);
    if (!size) return fail(self, "a record", otp::Decoder::Verdict::malformed);
    if (gst_adapter_available(adapter) < *size) return GST_FLOW_OK;
    const auto* record = static_cast<const std::uint8_t*>(gst_adapter_map(adapter, *size));
    std::size_t written = 0;
    otp::RecordKind kind{};
    otp::Decoder::Verdict verdict;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(p.key_timeout_ms);
    // Only pad a verified (or self-verifying, being fetched) announcement covers is worth
    // waiting for: records follow their announcements, so pad nothing covers never comes
    // (keys refused or declared lost), and the stream fails at once saying why.
    auto waiting = [](otp::Decoder::Verdict v) { return v == otp::Decoder::Verdict::key_pending; };
    while (waiting(verdict = s.decoder->open_record({record, *size}, s.out, written, kind)) &&
           std::chrono::steady_clock::now() < deadline && !p.flushing && !s.source.pad->failed()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // keys are being fetched
    }
    // An announcement that can be verified only once keys named before it arrive: wait
    // for it here. Records are in order, so nothing later can be opened without it, and a
    // sender short of key sends nothing more until our KME hands its keys out (a KME that
    // replaces unfetched batches waits for us to fetch them): no later record would come
    // to retry it.
    while (verdict == otp::Decoder::Verdict::announcement_pending &&
           s.decoder->stats().announcements_pending > 0 &&
           std::chrono::steady_clock::now() < deadline && !p.flushing && !s.source.pad->failed()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      s.decoder->poll();
    }
    const auto header = waiting(verdict) ? otp::parse_record_header({record, *size}) : std::nullopt;
    if (header) {
      GST_WARNING_OBJECT(
          self,
          "record %c of %zu bytes at pad offset %" G_GUINT64_FORMAT " has no key after %u ms: %s",
          static_cast<char>(header->kind), *size, header->pad_offset, p.key_timeout_ms,
          s.decoder->explain_no_key(header->pad_offset, *size - otp::kRecordOverhead).c_str());
    }
    gst_adapter_unmap(adapter);
    gst_adapter_flush(adapter, *size);
    publish(self);
    using V = otp::Decoder::Verdict;
    if (verdict == V::plaintext) {
      if (written > 0) {
        const GstFlowReturn ret = push_out(self, self->srcpad, s.out.data(), written, nullptr);
        if (ret != GST_FLOW_OK) return ret;
      }
    } else if (waiting(verdict) && p.flushing) {
      return GST_FLOW_FLUSHING;
    } else if (verdict != V::announcement && verdict != V::announcement_pending &&
               verdict != V::repeat) {
      return fail(self, "a record", verdict);
    }
  }
  return GST_FLOW_OK;
}

GstFlowReturn process(GstOtpDecrypt* self, GstPtr<GstBuffer> in) {
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
      std::array<std::uint8_t, otp::kStreamPreamble.size()> head{};
      const gsize n = gst_buffer_extract(buffer, 0, head.data(), head.size());
      s.stream = otp::starts_with_preamble(std::span(head).first(n));
    }
    GST_INFO_OBJECT(self, "%s mode", s.stream ? "stream" : "datagram");
    if (s.stream) s.decoder->use_stream_limits();
  }
  if (!s.stream) return open_datagram(self, std::move(in));
  gst_adapter_push(s.adapter.get(), in.release());
  return drain_stream(self);
}

GstFlowReturn chain(GstPad*, GstObject* parent, GstBuffer* buffer) {
  GstOtpDecrypt* self = GST_OTP_DECRYPT(parent);
  GstPtr<GstBuffer> in(buffer);
  return guarded(GST_ELEMENT(self), [&] { return process(self, std::move(in)); });
}

gboolean sink_event(GstPad* pad, GstObject* parent, GstEvent* event) {
  GstOtpDecrypt* self = GST_OTP_DECRYPT(parent);
  Private& p = *self->priv;
  switch (GST_EVENT_TYPE(event)) {
    case GST_EVENT_CAPS:
      gst_event_unref(event);  // ours are decided on the first output
      return TRUE;
    case GST_EVENT_SEGMENT:
      if (!p.src_caps_sent || !p.rtcp_caps_sent) {
        gst_event_replace(&p.pending_segment, event);
        if (!p.src_caps_sent && !p.rtcp_caps_sent) {
          gst_event_unref(event);
          return TRUE;
        }
        // One pad is running: forward to it; the other gets it with its caps.
        GstPad* running = p.src_caps_sent ? self->srcpad : self->rtcp_srcpad;
        return gst_pad_push_event(running, event);
      }
      break;
    case GST_EVENT_FLUSH_START:
      p.flushing = true;
      self->priv->release_timer.cancel();
      break;
    case GST_EVENT_FLUSH_STOP:
      if (p.session) p.session->held.clear();  // flushed, never decrypted
      p.flushing = false;
      break;
    case GST_EVENT_EOS:
      // Held packets get their key-wait before the end goes downstream.
      while (p.session && !p.session->held.empty() && !p.flushing) {
        if (guarded(GST_ELEMENT(self), [self] { return release_held(self); }) != GST_FLOW_OK) break;
        if (!p.session->held.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (p.session && p.session->stream && !p.session->decoder->stream_finished()) {
        GST_ELEMENT_ERROR(self, STREAM, DECRYPT,
                          ("the stream ended before its final record: the received data is "
                           "incomplete (connection cut or truncated by an attacker)"),
                          (nullptr));
        gst_event_unref(event);
        return FALSE;
      }
      if (!p.src_caps_sent) send_caps(self, self->srcpad, "application/octet-stream");
      p.src_caps_sent = true;
      break;
    default:
      break;
  }
  return gst_pad_event_default(pad, parent, event);
}

}  // namespace

static void gst_otp_decrypt_set_property(GObject* object, guint id, const GValue* value,
                                         GParamSpec* pspec) {
  Private& p = *GST_OTP_DECRYPT(object)->priv;
  GST_OBJECT_LOCK(object);
  if (!set_common_property(p.settings, id, value)) {
    switch (id) {
      case PROP_KEY_TIMEOUT:
        p.key_timeout_ms = g_value_get_uint(value);
        break;
      case PROP_WINDOW_SIZE:
        p.window_size = g_value_get_uint64(value);
        break;
      case PROP_KEY_WAIT:
        p.key_wait_ms = g_value_get_uint(value);
        break;
      case PROP_ACCEPT_AES:
        p.accept_aes = g_value_get_boolean(value);
        break;
      default:
        G_OBJECT_WARN_INVALID_PROPERTY_ID(object, id, pspec);
    }
  }
  GST_OBJECT_UNLOCK(object);
}

static void gst_otp_decrypt_get_property(GObject* object, guint id, GValue* value,
                                         GParamSpec* pspec) {
  Private& p = *GST_OTP_DECRYPT(object)->priv;
  if (id == PROP_STATS) {
    GstPtr<GstStructure> s =
        counters_structure("application/x-otp-decrypt-stats", p.counters, counter_name);
    GST_OBJECT_LOCK(object);
    if (p.session) {
      gst_structure_set(s.get(), "mode", G_TYPE_STRING,
                        !p.session->mode_known ? "unknown"
                        : p.session->stream    ? "stream"
                                               : "datagram",
                        nullptr);
      add_supply_stats(s.get(), p.session->source);
    }
    GST_OBJECT_UNLOCK(object);
    g_value_take_boxed(value, s.release());
    return;
  }
  GST_OBJECT_LOCK(object);
  if (!get_common_property(p.settings, id, value)) {
    switch (id) {
      case PROP_KEY_TIMEOUT:
        g_value_set_uint(value, p.key_timeout_ms);
        break;
      case PROP_WINDOW_SIZE:
        g_value_set_uint64(value, p.window_size);
        break;
      case PROP_KEY_WAIT:
        g_value_set_uint(value, p.key_wait_ms);
        break;
      case PROP_ACCEPT_AES:
        g_value_set_boolean(value, p.accept_aes);
        break;
      default:
        G_OBJECT_WARN_INVALID_PROPERTY_ID(object, id, pspec);
    }
  }
  GST_OBJECT_UNLOCK(object);
}

static GstStateChangeReturn gst_otp_decrypt_change_state(GstElement* element,
                                                         GstStateChange transition) {
  GstOtpDecrypt* self = GST_OTP_DECRYPT(element);
  Private& p = *self->priv;
  if (transition == GST_STATE_CHANGE_READY_TO_PAUSED) {
    if (p.window_size % otp::kEpochBytes != 0) {
      GST_ELEMENT_ERROR(
          self, RESOURCE, SETTINGS,
          ("otpdecrypt: window-size %" G_GUINT64_FORMAT " must be a multiple of 262144",
           p.window_size),
          (nullptr));
      return GST_STATE_CHANGE_FAILURE;
    }
    std::string error;
    KeySource source = open_key_source(p.settings, keys::SaeRole::slave, "otpdecrypt",
                                       GST_CAT_DEFAULT, GST_OBJECT(self), error);
    if (!source.pad) {
      GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("%s", error.c_str()), (nullptr));
      return GST_STATE_CHANGE_FAILURE;
    }
    auto session = std::make_unique<Session>();
    session->source = std::move(source);
    otp::DecoderConfig config;
    config.window_bytes = p.window_size;
    config.accept_aes = p.accept_aes;
    try {
      session->decoder = std::make_unique<otp::Decoder>(*session->source.pad, config);
    } catch (const std::exception& e) {
      internal_error(element, e);
      return GST_STATE_CHANGE_FAILURE;
    }
    p.flushing = false;
    p.src_caps_sent = p.rtcp_caps_sent = false;
    GST_OBJECT_LOCK(self);
    p.session = std::move(session);
    GST_OBJECT_UNLOCK(self);
  } else if (transition == GST_STATE_CHANGE_PAUSED_TO_READY) {
    p.flushing = true;
  }
  const GstStateChangeReturn ret =
      GST_ELEMENT_CLASS(gst_otp_decrypt_parent_class)->change_state(element, transition);
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY) {
    self->priv->release_timer.cancel();
    std::unique_ptr<Session> old;
    GST_PAD_STREAM_LOCK(self->sinkpad);  // a release timer in progress holds it
    GST_OBJECT_LOCK(self);
    old = std::move(p.session);
    GST_OBJECT_UNLOCK(self);
    GST_PAD_STREAM_UNLOCK(self->sinkpad);
    gst_event_replace(&p.pending_segment, nullptr);
  }
  return ret;
}

static void gst_otp_decrypt_finalize(GObject* object) {
  std::unique_ptr<Private> owned(GST_OTP_DECRYPT(object)->priv);
  gst_event_replace(&owned->pending_segment, nullptr);
  G_OBJECT_CLASS(gst_otp_decrypt_parent_class)->finalize(object);
}

static void gst_otp_decrypt_class_init(GstOtpDecryptClass* klass) {
  GObjectClass* gobject = G_OBJECT_CLASS(klass);
  GstElementClass* element = GST_ELEMENT_CLASS(klass);
  gobject->set_property = gst_otp_decrypt_set_property;
  gobject->get_property = gst_otp_decrypt_get_property;
  gobject->finalize = gst_otp_decrypt_finalize;
  element->change_state = gst_otp_decrypt_change_state;

  install_common_properties(gobject, keys::SaeRole::slave);
  const auto rw = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS |
                                           GST_PARAM_MUTABLE_READY);
  // Emitted from the streaming thread when the sender's pad stream resumes beyond a gap at
  // a self-verifying announcement: the sending side restarted (see the file comment).
  signals[SIGNAL_SENDER_RESTARTED] =
      g_signal_new("sender-restarted", G_TYPE_FROM_CLASS(klass), G_SIGNAL_RUN_LAST, 0, nullptr,
                   nullptr, nullptr, G_TYPE_NONE, 0);
  g_object_class_install_property(
      gobject, PROP_KEY_TIMEOUT,
      g_param_spec_uint("key-timeout", "Key timeout",
                        "Stream mode: milliseconds to wait for a record's key before failing", 0,
                        G_MAXUINT, 30000, rw));
  g_object_class_install_property(
      gobject, PROP_KEY_WAIT,
      g_param_spec_uint("key-wait", "Key wait",
                        "Datagram mode: milliseconds a packet may be held (in arrival order, "
                        "without blocking the stream) while keys that announcements named are "
                        "being fetched (at most 4096 packets or 4 MiB; the oldest give "
                        "way, counted in drops-no-key); packets on pad nobody announced are "
                        "dropped at once",
                        0, 5000, 500, rw));
  g_object_class_install_property(
      gobject, PROP_ACCEPT_AES,
      g_param_spec_boolean("accept-aes", "Accept AES",
                           "Whether units in AES-256-GCM (an otpencrypt with cipher=aes-256-gcm, "
                           "or falling back to it) are opened; FALSE drops them unopened "
                           "(drops-cipher, one warning), for a stream agreed as one-time pad "
                           "only, so that no sender can run it in AES unnoticed",
                           TRUE, rw));
  g_object_class_install_property(
      gobject, PROP_WINDOW_SIZE,
      g_param_spec_uint64("window-size", "Window size",
                          "Bytes of pad held for reordering and look-ahead (multiple of 256 KiB); "
                          "pad that falls out of it is destroyed, so late packets count as replays",
                          otp::kEpochBytes, G_MAXUINT32, 16u << 20, rw));

  gst_element_class_add_static_pad_template(element, &sink_template);
  gst_element_class_add_static_pad_template(element, &src_template);
  gst_element_class_add_static_pad_template(element, &rtcp_src_template);
  gst_element_class_set_static_metadata(
      element, "One-time pad decoder", "Filter/Network/Crypto",
      "Authenticates and decrypts RTP, RTCP or a byte stream protected by otpencrypt, with pad "
      "from QKD (ETSI GS QKD 014) or a pre-shared pad file",
      "otpgate <otpgate@localhost>");
  GST_DEBUG_CATEGORY_INIT(otp_decrypt_debug, "otpdecrypt", 0, "One-time pad decoder");
}

static void gst_otp_decrypt_init(GstOtpDecrypt* self) {
  self->priv = std::make_unique<Private>().release();  // owned; freed in finalize
  self->sinkpad = gst_pad_new_from_static_template(&sink_template, "sink");
  gst_pad_set_chain_function(self->sinkpad, chain);
  gst_pad_set_event_function(self->sinkpad, sink_event);
  gst_element_add_pad(GST_ELEMENT(self), self->sinkpad);
  self->srcpad = gst_pad_new_from_static_template(&src_template, "src");
  gst_pad_use_fixed_caps(self->srcpad);
  gst_element_add_pad(GST_ELEMENT(self), self->srcpad);
  self->rtcp_srcpad = gst_pad_new_from_static_template(&rtcp_src_template, "rtcp_src");
  gst_pad_use_fixed_caps(self->rtcp_srcpad);
  gst_element_add_pad(GST_ELEMENT(self), self->rtcp_srcpad);
}

GType otpgate_decrypt_get_type() {
  return gst_otp_decrypt_get_type();
}

// SPDX-License-Identifier: LGPL-2.1-or-later
#include "otp_element_common.hpp"

#include <algorithm>
#include <filesystem>
#include <utility>

namespace otpgate::gst {

GType otp_mode_get_type() {
  static GType type = 0;
  static const GEnumValue values[] = {
      {OTP_MODE_AUTO,
       "otpencrypt: datagram for application/x-rtp or x-rtcp caps, else stream; otpdecrypt: "
       "stream if the input starts with the stream preamble, else datagram",
       "auto"},
      {OTP_MODE_DATAGRAM, "One RTP/RTCP packet per buffer (UDP)", "datagram"},
      {OTP_MODE_STREAM, "A byte stream of self-delimiting records (TCP, files)", "stream"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type)) g_once_init_leave(&type, g_enum_register_static("OtpMode", values));
  return type;
}

void install_common_properties(GObjectClass* k, keys::SaeRole role) {
  const bool master = role == keys::SaeRole::master;
  const auto flags = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS |
                                              GST_PARAM_MUTABLE_READY);
  g_object_class_install_property(
      k, PROP_MODE,
      g_param_spec_enum("mode", "Mode",
                        "datagram: RTP/RTCP packets (header in the clear); stream: records over "
                        "a byte stream; auto: see the values",
                        otp_mode_get_type(), OTP_MODE_AUTO, flags));
  g_object_class_install_property(
      k, PROP_KME_URL,
      g_param_spec_string("kme-url", "KME URL",
                          "ETSI GS QKD 014 KME base URL (https://host:port); keys come from it",
                          nullptr, flags));
  g_object_class_install_property(
      k, PROP_SAE_ID,
      g_param_spec_string("sae-id", "SAE ID", "This side's SAE ID (the common name of tls-cert)",
                          nullptr, flags));
  g_object_class_install_property(
      k, PROP_PEER_SAE_ID,
      g_param_spec_string("peer-sae-id", "Peer SAE ID",
                          master ? "SAE ID of the decrypting side (slave SAE for enc_keys)"
                                 : "SAE ID of the encrypting side (master SAE for dec_keys)",
                          nullptr, flags));
  g_object_class_install_property(
      k, PROP_TLS_CERT,
      g_param_spec_string("tls-cert", "TLS certificate", "Client certificate (PEM) for mutual TLS",
                          nullptr, flags));
  g_object_class_install_property(
      k, PROP_TLS_KEY,
      g_param_spec_string("tls-key", "TLS key", "Private key (PEM) of tls-cert", nullptr, flags));
  g_object_class_install_property(
      k, PROP_TLS_CA,
      g_param_spec_string("tls-ca", "TLS CA",
                          "CA certificate (PEM) that signed the KME's certificate", nullptr,
                          flags));
  g_object_class_install_property(
      k, PROP_PAD_FILE,
      g_param_spec_string("pad-file", "Pad file",
                          "Pre-shared pad file, identical at both ends (instead of a KME); the "
                          "consumed offset is journalled beside it so no run reuses it",
                          nullptr, flags));
  g_object_class_install_property(
      k, PROP_JOURNAL,
      g_param_spec_string("journal", "Offset journal",
                          "File recording which pad offsets may have been used (default: beside "
                          "pad-file, or ~/.local/state/otpgate/SAE-to-PEER.journal for a KME)",
                          nullptr, flags));
  g_object_class_install_property(
      k, PROP_KEY_SUPPLY,
      g_param_spec_pointer("key-supply", "Key supply",
                           "An otpgate::keys::PadSource* shared inside the process (the gateway "
                           "passes one per direction); overrides kme-url and pad-file",
                           static_cast<GParamFlags>(G_PARAM_WRITABLE | G_PARAM_STATIC_STRINGS |
                                                    GST_PARAM_MUTABLE_READY)));
  // Only the sender holds key ready ahead of use (the receiver fetches what is announced),
  // so only otpencrypt has a key-low signal and its threshold.
  if (master) {
    g_object_class_install_property(
        k, PROP_KEY_LOW_THRESHOLD,
        g_param_spec_uint64("key-low-threshold", "Key low threshold",
                            "Emit key-low when the key ready in memory falls below this many bytes",
                            0, G_MAXUINT64, 1u << 20,
                            static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS)));
  }
  g_object_class_install_property(
      k, PROP_STATS,
      g_param_spec_boxed("stats", "Statistics",
                         "Packets and bytes in/out, pad used, key level, drops by cause, mode",
                         GST_TYPE_STRUCTURE,
                         static_cast<GParamFlags>(G_PARAM_READABLE | G_PARAM_STATIC_STRINGS)));
}

bool set_common_property(KeySourceSettings& s, guint id, const GValue* v) {
  auto str = [v] {
    const char* t = g_value_get_string(v);
    return std::string(t ? t : "");
  };
  switch (id) {
    case PROP_MODE:
      s.mode = g_value_get_enum(v);
      return true;
    case PROP_KME_URL:
      s.kme_url = str();
      return true;
    case PROP_SAE_ID:
      s.sae_id = str();
      return true;
    case PROP_PEER_SAE_ID:
      s.peer_sae_id = str();
      return true;
    case PROP_TLS_CERT:
      s.tls_cert = str();
      return true;
    case PROP_TLS_KEY:
      s.tls_key = str();
      return true;
    case PROP_TLS_CA:
      s.tls_ca = str();
      return true;
    case PROP_PAD_FILE:
      s.pad_file = str();
      return true;
    case PROP_JOURNAL:
      s.journal = str();
      return true;
    case PROP_KEY_SUPPLY:
      s.external = static_cast<keys::PadSource*>(g_value_get_pointer(v));
      return true;
    case PROP_KEY_LOW_THRESHOLD:
      s.key_low_threshold = g_value_get_uint64(v);
      return true;
    default:
      return false;
  }
}

bool get_common_property(const KeySourceSettings& s, guint id, GValue* v) {
  auto set = [v](const std::string& t) { g_value_set_string(v, t.empty() ? nullptr : t.c_str()); };
  switch (id) {
    case PROP_MODE:
      g_value_set_enum(v, s.mode);
      return true;
    case PROP_KME_URL:
      set(s.kme_url);
      return true;
    case PROP_SAE_ID:
      set(s.sae_id);
      return true;
    case PROP_PEER_SAE_ID:
      set(s.peer_sae_id);
      return true;
    case PROP_TLS_CERT:
      set(s.tls_cert);
      return true;
    case PROP_TLS_KEY:
      set(s.tls_key);
      return true;
    case PROP_TLS_CA:
      set(s.tls_ca);
      return true;
    case PROP_PAD_FILE:
      set(s.pad_file);
      return true;
    case PROP_JOURNAL:
      set(s.journal);
      return true;
    case PROP_KEY_LOW_THRESHOLD:
      g_value_set_uint64(v, s.key_low_threshold);
      return true;
    default:
      return false;
  }
}

KeySource open_key_source(const KeySourceSettings& s, keys::SaeRole role, const char* element,
                          GstDebugCategory* category, GstObject* object, std::string& error) {
  KeySource source;
  if (s.external) {
    source.pad = s.external;
    return source;
  }
  const bool master = role == keys::SaeRole::master;
  const bool kme = !s.kme_url.empty();
  const bool pad_file = !s.pad_file.empty();
  if (kme == pad_file) {
    error = std::string(element) + (kme ? ": set kme-url or pad-file, not both"
                                        : ": no key source: set kme-url (with sae-id, peer-sae-id, "
                                          "tls-cert, tls-key, tls-ca) or pad-file");
    return source;
  }
  keys::KeySupplyConfig config;
  config.role = role;
  config.peer_sae_id = s.peer_sae_id;
  config.journal = s.journal;
  // Key for the receiving side to hold: what the sender keeps ready plus reordering room.
  config.ring_bytes = master ? (4u << 20) : (12u << 20);
  // From a KME, the sender holds a couple of seconds of its stream's key (at least
  // ring_min_bytes) and announces about a second and a half ahead: QKD key is scarce, and
  // what is held is wiped when the element stops. (A pad file is read as needed.)
  config.ring_seconds = 2.0;
  config.ring_min_bytes = 128u << 10;
  config.announce_lead_seconds = 1.5;
  config.announce_min_bytes = config.ring_min_bytes;
  // Now and then a self-verifying announcement, so that a receiver that lost one (and
  // every repeat of it) catches up within two seconds.
  config.resync_interval = std::chrono::milliseconds(2000);
  config.log = [category, object](keys::LogLevel level, std::string_view message) {
    const GstDebugLevel gst_level = level == keys::LogLevel::error     ? GST_LEVEL_ERROR
                                    : level == keys::LogLevel::warning ? GST_LEVEL_WARNING
                                    : level == keys::LogLevel::info    ? GST_LEVEL_INFO
                                                                       : GST_LEVEL_DEBUG;
    GST_CAT_LEVEL_LOG(category, gst_level, object, "%.*s", static_cast<int>(message.size()),
                      message.data());
  };
  try {
    if (pad_file) {
      if (config.peer_sae_id.empty()) config.peer_sae_id = "pad-file";
      if (config.journal.empty()) config.journal = s.pad_file + (master ? ".sent" : ".received");
      // A pre-shared pad is precious and its offsets are file positions: a run wastes what
      // its ring holds at stop plus at most one reserve chunk, so keep both small (local
      // reads refill a ring in microseconds): 1.25 MiB per run at most.
      config.reserve_chunk = 256u << 10;
      config.ring_bytes = master ? 1u << 20 : 4u << 20;  // the receiver reads what is announced
      config.ring_seconds = 0;
      config.announce_lead_seconds = 0;
      config.resync_interval = std::chrono::milliseconds(0);  // offsets are file positions
      source.owned = std::make_unique<keys::KeySupply>(keys::PadFileConfig{s.pad_file}, config);
    } else {
      for (const auto& [name, value] :
           {std::pair{"sae-id", s.sae_id}, std::pair{"peer-sae-id", s.peer_sae_id},
            std::pair{"tls-cert", s.tls_cert}, std::pair{"tls-key", s.tls_key},
            std::pair{"tls-ca", s.tls_ca}}) {
        if (value.empty()) {
          error = std::string(element) + ": kme-url is set but " + name + " is not";
          return source;
        }
      }
      if (config.journal.empty() && master) {
        const char* state = g_getenv("XDG_STATE_HOME");
        const std::filesystem::path dir =
            state ? std::filesystem::path(state) / "otpgate"
                  : std::filesystem::path(g_get_home_dir()) / ".local/state/otpgate";
        config.journal = dir / (s.sae_id + "-to-" + s.peer_sae_id + ".journal");
      }
      keys::KmeClientConfig kme_config;
      kme_config.base_url = s.kme_url;
      kme_config.tls = {s.tls_cert, s.tls_key, s.tls_ca};
      kme_config.log = config.log;
      source.owned = std::make_unique<keys::KeySupply>(kme_config, config);
    }
  } catch (const std::exception& e) {
    error = std::string(element) + ": " + e.what();
    return source;
  }
  source.owned->start();
  source.pad = source.owned.get();
  return source;
}

void add_supply_stats(GstStructure* s, const KeySource& source) {
  if (source.pad)
    gst_structure_set(s, "key-available", G_TYPE_UINT64, source.pad->available(), nullptr);
  if (const keys::KeySupply* supply = source.supply()) {
    const auto st = supply->stats();
    gst_structure_set(s, "key-fetched", G_TYPE_UINT64, st.bytes_fetched, "keys-lost", G_TYPE_UINT64,
                      st.keys_lost, "kme-errors", G_TYPE_UINT64, st.kme_errors, "kme-healthy",
                      G_TYPE_BOOLEAN, st.kme_healthy, "key-size-bits", G_TYPE_UINT,
                      st.key_size_bits, "key-consumption-bps", G_TYPE_DOUBLE,
                      st.consumption_bytes_per_s * 8, "kme-last-error", G_TYPE_STRING,
                      st.last_error.c_str(), nullptr);
    gst_structure_set(s, "keys-waiting", G_TYPE_UINT64, st.keys_waiting, "key-flushed",
                      G_TYPE_UINT64, st.bytes_flushed, "kme-outages", G_TYPE_UINT64, st.kme_outages,
                      "key-wiped-at-stop", G_TYPE_UINT64, st.bytes_wiped_at_stop,
                      "kme-replaces-batches", G_TYPE_BOOLEAN, st.kme_replaces_batches,
                      "key-source-failed", G_TYPE_BOOLEAN, st.failed, nullptr);
  }
}

namespace {
bool has_metas(GstBuffer* buffer) {
  gpointer state = nullptr;
  return gst_buffer_iterate_meta(buffer, &state) != nullptr;
}
}  // namespace

GstBuffer* OutputBuffers::take(gsize size) {
  if (GstBuffer* last = std::exchange(sent_, nullptr)) {
    gsize offset = 0, room = 0;
    gst_buffer_get_sizes(last, &offset, &room);
    // Only as it was handed out: nobody else holds it, nothing was added to it.
    if (gst_buffer_is_writable(last) && !has_metas(last) && gst_buffer_n_memory(last) == 1 &&
        offset == 0 && room >= size) {
      GST_BUFFER_FLAGS(last) = 0;
      GST_BUFFER_PTS(last) = GST_BUFFER_DTS(last) = GST_BUFFER_DURATION(last) = GST_CLOCK_TIME_NONE;
      GST_BUFFER_OFFSET(last) = GST_BUFFER_OFFSET_END(last) = GST_BUFFER_OFFSET_NONE;
      gst_buffer_set_size(last, static_cast<gssize>(size));
      return last;
    }
    gst_buffer_unref(last);
  }
  GstBuffer* fresh = gst_buffer_new_allocate(nullptr, std::max(size, kAtLeast), nullptr);
  gst_buffer_set_size(fresh, static_cast<gssize>(size));
  return fresh;
}

void OutputBuffers::sending(GstBuffer* out) {
  if (sent_) gst_buffer_unref(sent_);
  sent_ = gst_buffer_ref(out);
}

bool key_source_failed(GstElement* element, const KeySource& source) {
  if (!source.pad || !source.pad->failed()) return false;
  const std::string why = source.pad->failure();
  GST_ELEMENT_ERROR(element, RESOURCE, OPEN_READ, ("key source failed: %s", why.c_str()),
                    ("the KME refuses this SAE or does not answer; check kme-url, tls-cert, "
                     "tls-key, tls-ca and sae-id"));
  return true;
}

GstFlowReturn internal_error(GstElement* element, const std::exception& e) {
  GST_ELEMENT_ERROR(element, STREAM, FAILED, ("internal error: %s", e.what()),
                    ("an exception reached the streaming thread"));
  return GST_FLOW_ERROR;
}

namespace {
// What a scheduled timer's callback needs; freed (with its element reference) by the
// clock once the callback has run or the timer is unscheduled.
struct ArmedTimer {
  ReleaseTimer* timer;
  GstElement* element;
  GstPad* sinkpad;
  ReleaseTimer::Release release;
};
}  // namespace

void ReleaseTimer::schedule(GstElement* element, GstPad* sinkpad, Release release) {
  const std::lock_guard lock(mutex_);
  cancelled_ = false;
  arm(element, sinkpad, release);
}

void ReleaseTimer::arm(GstElement* element, GstPad* sinkpad, Release release) {
  if (id_) return;
  GstClock* clock = gst_system_clock_obtain();
  id_ = gst_clock_new_single_shot_id(clock, gst_clock_get_time(clock) + kInterval);
  gst_object_unref(clock);
  auto armed = std::make_unique<ArmedTimer>(
      ArmedTimer{this, GST_ELEMENT(gst_object_ref(element)), sinkpad, release});
  gst_clock_id_wait_async(id_, on_fire, armed.release(), [](gpointer user) {
    std::unique_ptr<ArmedTimer> owned(static_cast<ArmedTimer*>(user));
    gst_object_unref(owned->element);
  });
}

void ReleaseTimer::cancel() {
  const std::lock_guard lock(mutex_);
  cancelled_ = true;
  if (!id_) return;
  gst_clock_id_unschedule(id_);
  gst_clock_id_unref(id_);
  id_ = nullptr;
}

gboolean ReleaseTimer::on_fire(GstClock*, GstClockTime, GstClockID id, gpointer user) {
  const auto* armed = static_cast<const ArmedTimer*>(user);
  {
    const std::lock_guard lock(armed->timer->mutex_);
    if (armed->timer->id_ != id) return TRUE;  // cancelled (and maybe armed again) meanwhile
    gst_clock_id_unref(armed->timer->id_);
    armed->timer->id_ = nullptr;
  }
  if (!GST_PAD_STREAM_TRYLOCK(armed->sinkpad)) {
    const std::lock_guard lock(armed->timer->mutex_);
    if (!armed->timer->cancelled_)
      armed->timer->arm(armed->element, armed->sinkpad, armed->release);
    return TRUE;
  }
  armed->release(armed->element);
  GST_PAD_STREAM_UNLOCK(armed->sinkpad);
  return TRUE;
}

namespace {
// What a held packet keeps from being freed: its buffer's memory, not only its bytes (a
// small datagram the gateway received into a 2 KiB buffer holds all of it).
std::size_t memory_held(GstBuffer* buffer) {
  gsize room = 0;
  gst_buffer_get_sizes(buffer, nullptr, &room);
  return std::max(room, gst_buffer_get_size(buffer));
}
}  // namespace

std::size_t HeldPackets::hold(GstPtr<GstBuffer> buffer, std::chrono::milliseconds wait) {
  const std::size_t size = memory_held(buffer.get());
  std::size_t gave_way = 0;
  while (!held_.empty() && (held_.size() >= kMaxPackets || bytes_ + size > kMaxBytes)) {
    pop_front();
    ++gave_way;
  }
  bytes_ += size;
  held_.push_back({std::move(buffer), Clock::now() + wait});
  return gave_way;
}

void HeldPackets::pop_front() {
  bytes_ -= memory_held(held_.front().buffer.get());
  held_.pop_front();
}

std::size_t HeldPackets::clear() {
  const std::size_t dropped = held_.size();
  held_.clear();
  bytes_ = 0;
  return dropped;
}

}  // namespace otpgate::gst

// SPDX-License-Identifier: LGPL-2.1-or-later
// See transfer_pipeline.hpp.
#include "transfer_pipeline.hpp"

#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>

#include <stdexcept>
#include <thread>

namespace otpgate::transfer::detail {

void ensure_gstreamer() {
  if (!gst_is_initialized()) gst_init(nullptr, nullptr);
  for (const char* name : {"otpencrypt", "otpdecrypt", "appsrc", "appsink", "fdsrc", "fdsink"}) {
    GstElementFactory* f = gst_element_factory_find(name);
    if (!f) {
      throw std::runtime_error(std::string("GStreamer element ") + name +
                               " is missing (is the otp plugin on GST_PLUGIN_PATH? are "
                               "gstreamer1.0-plugins-base/good installed?)");
    }
    gst_object_unref(f);
  }
}

namespace {
std::string take_error(GstElement* pipeline, std::string& error) {
  if (!error.empty()) return error;
  std::unique_ptr<GstBus, GstObjectUnref> bus(gst_element_get_bus(pipeline));
  while (GstMessage* m = gst_bus_pop_filtered(bus.get(), GST_MESSAGE_ERROR)) {
    GError* e = nullptr;
    gst_message_parse_error(m, &e, nullptr);
    if (error.empty() && e) error = e->message;
    if (e) g_error_free(e);
    gst_message_unref(m);
  }
  return error;
}

GstElement* make(const char* factory) {
  GstElement* e = gst_element_factory_make(factory, nullptr);
  if (!e) throw std::runtime_error(std::string("cannot create GStreamer element ") + factory);
  return e;
}
}  // namespace

EncryptPipeline::EncryptPipeline(keys::PadSource& keys, int socket_fd, bool aes,
                                 std::uint32_t record_size, std::uint32_t aes_rekey_records) {
  ensure_gstreamer();
  pipeline_.reset(GST_ELEMENT(gst_object_ref_sink(gst_pipeline_new("otp-transfer-send"))));
  src_ = make("appsrc");
  encrypt_ = make("otpencrypt");
  GstElement* sink = make("fdsink");
  gst_bin_add_many(GST_BIN(pipeline_.get()), src_, encrypt_, sink, nullptr);
  if (!gst_element_link_many(src_, encrypt_, sink, nullptr))
    throw std::runtime_error("cannot link the sending pipeline");
  g_object_set(src_, "format", GST_FORMAT_BYTES, "block", FALSE, "max-bytes",
               static_cast<guint64>(2 * kQueueBytes), "is-live", FALSE, nullptr);
  gst_util_set_object_arg(G_OBJECT(encrypt_), "mode", "stream");
  gst_util_set_object_arg(G_OBJECT(encrypt_), "cipher", aes ? "aes-256-gcm" : "otp");
  g_object_set(encrypt_, "key-supply", &keys, "record-size", record_size, "rekey-interval",
               aes_rekey_records, nullptr);
  g_object_set(sink, "fd", socket_fd, "sync", FALSE, nullptr);
  if (gst_element_set_state(pipeline_.get(), GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
    throw std::runtime_error("the sending pipeline did not start: " +
                             take_error(pipeline_.get(), error_));
}

EncryptPipeline::~EncryptPipeline() {
  gst_element_set_state(pipeline_.get(), GST_STATE_NULL);
}

bool EncryptPipeline::check_bus() {
  return take_error(pipeline_.get(), error_).empty();
}

bool EncryptPipeline::push(std::span<const std::uint8_t> bytes,
                           const std::function<bool()>& keep_waiting) {
  // appsrc does not block (a blocked push would never see the pipeline fail): wait here
  // while the queue is full, which is how the transfer slows to the key rate.
  while (gst_app_src_get_current_level_bytes(GST_APP_SRC(src_)) >= kQueueBytes) {
    if (!check_bus() || (keep_waiting && !keep_waiting())) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!check_bus()) return false;
  GstBuffer* buffer = gst_buffer_new_memdup(bytes.data(), bytes.size());
  return gst_app_src_push_buffer(GST_APP_SRC(src_), buffer) == GST_FLOW_OK && check_bus();
}

bool EncryptPipeline::flush() {
  GstStructure* s = gst_structure_new_empty("otp-flush");
  return gst_element_send_event(src_, gst_event_new_custom(GST_EVENT_CUSTOM_DOWNSTREAM, s)) &&
         check_bus();
}

bool EncryptPipeline::finish(std::chrono::milliseconds timeout) {
  if (!check_bus()) return false;
  gst_app_src_end_of_stream(GST_APP_SRC(src_));
  std::unique_ptr<GstBus, GstObjectUnref> bus(gst_element_get_bus(pipeline_.get()));
  GstMessage* m = gst_bus_timed_pop_filtered(
      bus.get(), static_cast<GstClockTime>(timeout.count()) * GST_MSECOND,
      static_cast<GstMessageType>(GST_MESSAGE_EOS | GST_MESSAGE_ERROR));
  if (!m) {
    error_ = "the protected stream did not finish in time";
    return false;
  }
  const bool eos = GST_MESSAGE_TYPE(m) == GST_MESSAGE_EOS;
  if (!eos) {
    GError* e = nullptr;
    gst_message_parse_error(m, &e, nullptr);
    error_ = e ? e->message : "error";
    if (e) g_error_free(e);
  }
  gst_message_unref(m);
  return eos;
}

std::string EncryptPipeline::error() {
  return take_error(pipeline_.get(), error_);
}

bool EncryptPipeline::waiting_for_key() const {
  GstStructure* stats = nullptr;
  g_object_get(encrypt_, "stats", &stats, nullptr);
  gboolean exhausted = FALSE;
  if (stats) {
    gst_structure_get_boolean(stats, "key-exhausted", &exhausted);
    gst_structure_free(stats);
  }
  return exhausted;
}

std::uint64_t EncryptPipeline::queued_bytes() const {
  return gst_app_src_get_current_level_bytes(GST_APP_SRC(src_));
}

DecryptPipeline::DecryptPipeline(keys::PadSource& keys, int socket_fd, std::size_t window_bytes) {
  ensure_gstreamer();
  pipeline_.reset(GST_ELEMENT(gst_object_ref_sink(gst_pipeline_new("otp-transfer-receive"))));
  GstElement* src = make("fdsrc");
  decrypt_ = make("otpdecrypt");
  sink_ = make("appsink");
  gst_bin_add_many(GST_BIN(pipeline_.get()), src, decrypt_, sink_, nullptr);
  if (!gst_element_link_many(src, decrypt_, sink_, nullptr))
    throw std::runtime_error("cannot link the receiving pipeline");
  g_object_set(src, "fd", socket_fd, "blocksize", 262144u, nullptr);
  gst_util_set_object_arg(G_OBJECT(decrypt_), "mode", "stream");
  g_object_set(decrypt_, "key-supply", &keys, "window-size", static_cast<guint64>(window_bytes),
               nullptr);
  g_object_set(sink_, "sync", FALSE, "max-buffers", 64u, "drop", FALSE, nullptr);
  if (gst_element_set_state(pipeline_.get(), GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE)
    throw std::runtime_error("the receiving pipeline did not start: " +
                             take_error(pipeline_.get(), error_));
}

DecryptPipeline::~DecryptPipeline() {
  gst_element_set_state(pipeline_.get(), GST_STATE_NULL);
}

bool DecryptPipeline::pull(std::chrono::milliseconds timeout, bool& ended,
                           const std::function<void(std::span<const std::uint8_t>)>& sink) {
  ended = false;
  GstSample* sample = gst_app_sink_try_pull_sample(
      GST_APP_SINK(sink_), static_cast<GstClockTime>(timeout.count()) * GST_MSECOND);
  if (!sample) {
    ended =
        gst_app_sink_is_eos(GST_APP_SINK(sink_)) || !take_error(pipeline_.get(), error_).empty();
    return false;
  }
  GstBuffer* buffer = gst_sample_get_buffer(sample);
  GstMapInfo map;
  if (buffer && gst_buffer_map(buffer, &map, GST_MAP_READ)) {
    try {
      sink({map.data, map.size});
    } catch (...) {
      gst_buffer_unmap(buffer, &map);
      gst_sample_unref(sample);
      throw;
    }
    gst_buffer_unmap(buffer, &map);
  }
  gst_sample_unref(sample);
  return true;
}

std::string DecryptPipeline::error() {
  return take_error(pipeline_.get(), error_);
}

std::string DecryptPipeline::stats_text() {
  GstStructure* stats = nullptr;
  g_object_get(decrypt_, "stats", &stats, nullptr);
  if (!stats) return "";
  gchar* text = gst_structure_to_string(stats);
  std::string out = text;
  g_free(text);
  gst_structure_free(stats);
  return out;
}

std::uint64_t DecryptPipeline::auth_failures() {
  GstStructure* stats = nullptr;
  g_object_get(decrypt_, "stats", &stats, nullptr);
  guint64 failures = 0;
  if (stats) {
    gst_structure_get_uint64(stats, "auth-failures", &failures);
    gst_structure_free(stats);
  }
  return failures;
}

}  // namespace otpgate::transfer::detail

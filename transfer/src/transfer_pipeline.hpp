// SPDX-License-Identifier: LGPL-2.1-or-later
// The GStreamer pipelines around otpencrypt and otpdecrypt (stream mode) that carry a
// job's protected stream over its TCP socket.
#pragma once

#include <gst/gst.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "otpgate/keyclient.hpp"

namespace otpgate::transfer::detail {

struct GstObjectUnref {
  void operator()(GstElement* e) const { gst_object_unref(e); }
  void operator()(GstBus* b) const { gst_object_unref(b); }
};

// appsrc ! otpencrypt mode=stream ! fdsink fd=SOCKET
class EncryptPipeline {
 public:
  EncryptPipeline(keys::PadSource& keys, int socket_fd, bool aes, std::uint32_t record_size,
                  std::uint32_t aes_rekey_records);
  ~EncryptPipeline();  // to NULL
  // Copies bytes in; blocks while the element waits for key (the transfer slows to the
  // key rate). False when the pipeline failed (see error()).
  bool push(std::span<const std::uint8_t> bytes, const std::function<bool()>& keep_waiting = {});
  bool flush();  // emits pending bytes as a record now (control messages)
  bool finish(std::chrono::milliseconds timeout);  // final record, all written
  std::string error();                             // first error posted, "" if none
  std::uint64_t queued_bytes() const;
  bool waiting_for_key() const;  // the element waits for pad right now

 private:
  bool check_bus();
  static constexpr std::uint64_t kQueueBytes = 8u << 20;
  std::unique_ptr<GstElement, GstObjectUnref> pipeline_;
  GstElement* src_ = nullptr;
  GstElement* encrypt_ = nullptr;
  std::string error_;
};

// fdsrc fd=SOCKET ! otpdecrypt mode=stream ! appsink
class DecryptPipeline {
 public:
  DecryptPipeline(keys::PadSource& keys, int socket_fd, std::size_t window_bytes);
  ~DecryptPipeline();
  // Hands the next decrypted bytes to `sink` (no copy); false with `ended` set at the end
  // of the stream or on error, false alone on a timeout.
  bool pull(std::chrono::milliseconds timeout, bool& ended,
            const std::function<void(std::span<const std::uint8_t>)>& sink);
  std::string error();
  std::uint64_t auth_failures();
  std::string stats_text();  // the element's stats structure, for logs

 private:
  std::unique_ptr<GstElement, GstObjectUnref> pipeline_;
  GstElement* sink_ = nullptr;
  GstElement* decrypt_ = nullptr;
  std::string error_;
};

// Loads the otp plugin (from GST_PLUGIN_PATH or next to the program); throws if absent.
void ensure_gstreamer();

}  // namespace otpgate::transfer::detail

// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-conference-sim: the conference system at one site of the demo. Local participants
// send VP8 video and Opus audio as RTP to the site's gateway; remote participants'
// media, decrypted by the gateway, is received and counted (packets, frames, bytes).
// At the end it prints what it sent and received (and the longest gap in a received
// stream) and, from the gateway's status API sampled during the call, what happened to
// key: drawn, used, dropped packets and their longest stretch, AES share and when.
#include <gst/gst.h>
#include <httplib.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Counter {
  std::atomic<std::uint64_t> packets{0}, frames{0}, bytes{0};
  // Streaming thread only (one per stream), read after the pipeline stopped.
  gint64 last_us = 0, longest_gap_us = 0;
};

void count_buffer(Counter& c, GstBuffer* buffer) {
  guint8 header[2] = {};
  if (gst_buffer_extract(buffer, 0, header, 2) == 2) {
    ++c.packets;
    c.bytes += gst_buffer_get_size(buffer);
    if (header[1] & 0x80) ++c.frames;  // the marker bit ends a video frame
    const gint64 now = g_get_monotonic_time();
    if (c.last_us != 0) c.longest_gap_us = std::max(c.longest_gap_us, now - c.last_us);
    c.last_us = now;
  }
}

GstPadProbeReturn count_rtp(GstPad*, GstPadProbeInfo* info, gpointer user) {
  auto* c = static_cast<Counter*>(user);
  if (info->type & GST_PAD_PROBE_TYPE_BUFFER_LIST) {
    GstBufferList* list = GST_PAD_PROBE_INFO_BUFFER_LIST(info);
    for (guint i = 0; i < gst_buffer_list_length(list); ++i)
      count_buffer(*c, gst_buffer_list_get(list, i));
  } else {
    count_buffer(*c, GST_PAD_PROBE_INFO_BUFFER(info));
  }
  return GST_PAD_PROBE_OK;
}

void probe(GstElement* pipeline, const std::string& name, Counter& counter) {
  GstElement* e = gst_bin_get_by_name(GST_BIN(pipeline), name.c_str());
  GstPad* pad = gst_element_get_static_pad(e, "sink");
  gst_pad_add_probe(
      pad, static_cast<GstPadProbeType>(GST_PAD_PROBE_TYPE_BUFFER | GST_PAD_PROBE_TYPE_BUFFER_LIST),
      count_rtp, &counter, nullptr);
  gst_object_unref(pad);
  gst_object_unref(e);
}

// What the gateway's sending side has done so far, summed over its streams.
struct SendingTotals {
  std::uint64_t packets_in = 0, packets_out = 0, aes_packets = 0, drops = 0, malformed = 0;
  std::uint64_t pad_used = 0, key_fetched = 0, key_ready = 0;
};

SendingTotals sending_totals(const nlohmann::json& status) {
  SendingTotals t;
  for (const auto& s : status["streams"]) {
    if (s["send"].is_null() || s["key_supply"]["send"].is_null()) continue;
    t.packets_in += s["send"]["packets-in"].get<std::uint64_t>();
    // Announcements leave as datagrams of their own: not media.
    t.packets_out += s["send"]["packets-out"].get<std::uint64_t>() -
                     s["send"]["announcements"].get<std::uint64_t>() -
                     s["send"]["announcement-repeats"].get<std::uint64_t>();
    t.malformed += s["send"]["drops-malformed"].get<std::uint64_t>();
    t.aes_packets += s["send"]["aes-packets"].get<std::uint64_t>();
    t.drops += s["send"]["drops-no-key"].get<std::uint64_t>();
    t.pad_used += s["key_supply"]["send"]["bytes_consumed"].get<std::uint64_t>();
    t.key_fetched += s["key_supply"]["send"]["bytes_fetched"].get<std::uint64_t>();
    t.key_ready += s["key_supply"]["send"]["bytes_available"].get<std::uint64_t>();
  }
  return t;
}

// Samples of SendingTotals over the call (every 100 ms): when drops and AES happened.
struct KeyTimeline {
  std::optional<SendingTotals> last;
  double last_time = 0;
  double drops_since = -1;  // start of the current stretch of drops, -1 when none
  double longest_drop_stretch = 0;
  double aes_from = -1, aes_last = -1;

  void sample(double now, const SendingTotals& t) {
    if (last) {
      if (t.drops > last->drops) {
        if (drops_since < 0) drops_since = last_time;
        longest_drop_stretch = std::max(longest_drop_stretch, now - drops_since);
      } else {
        drops_since = -1;
      }
      if (t.aes_packets > last->aes_packets) {
        if (aes_from < 0) aes_from = last_time;
        aes_last = now;
      }
    }
    last = t;
    last_time = now;
  }
  std::string aes_story(std::uint64_t aes_packets) const {
    if (aes_packets == 0) return "";
    char text[160];
    if (aes_from < 0) return ", from the start";
    const bool back = last && aes_last >= 0 && last_time - aes_last > 0.5;
    if (back) {
      std::snprintf(text, sizeof text, ", from %.1f s; back on the one-time pad from %.1f s",
                    aes_from, aes_last);
    } else {
      std::snprintf(text, sizeof text, ", from %.1f s to the end", aes_from);
    }
    return text;
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string site = "site";
  int senders = 5, receivers = 5, send_base = 0, receive_base = 0, first_participant = 1;
  double seconds = 20;
  std::string profile = "panel";
  int status_port = 0;
  CLI::App app{"otp-conference-sim: simulated conference system at one site of the otpgate demo"};
  app.add_option("--site", site, "Site name for the summary");
  app.add_option("--senders", senders, "Local participants (each sends video and audio)");
  app.add_option("--first-participant", first_participant, "Number of the first local participant");
  app.add_option("--send-base", send_base,
                 "Gateway port of the first local stream (video; audio is +1)")
      ->required();
  app.add_option("--receivers", receivers, "Remote participants whose media arrives here");
  app.add_option("--receive-base", receive_base,
                 "Port the gateway delivers the first remote stream to")
      ->required();
  app.add_option("--seconds", seconds, "How long to run");
  app.add_option("--profile", profile,
                 "panel: ~280 kbit/s per participant (the seed's 1.4 GB in 65 min); "
                 "full: ~1.5 Mbit/s 720p video per participant")
      ->check(CLI::IsMember({"panel", "full"}));
  app.add_option("--gateway-status-port", status_port, "Gateway status API port (for key figures)");
  double lead_in = 1.0, tail = 1.5;
  app.add_option("--lead-in", lead_in,
                 "Seconds between starting to receive and starting to send (the other site's "
                 "receivers come up meanwhile)");
  app.add_option("--tail", tail, "Seconds to go on receiving after sending stopped");
  CLI11_PARSE(app, argc, argv);
  gst_init(nullptr, nullptr);

  const bool full = profile == "full";
  const std::string video = full ? "video/x-raw,width=1280,height=720,framerate=30/1"
                                 : "video/x-raw,width=320,height=180,framerate=15/1";
  const int video_kbps = full ? 1500 : 250;
  std::string send_description, receive_description;
  for (int k = 0; k < senders; ++k) {
    const int video_port = send_base + 2 * k, audio_port = video_port + 1;
    const std::string n = std::to_string(k);
    send_description += "videotestsrc is-live=true pattern=" + std::to_string(k % 20) + " ! " +
                        video + " ! vp8enc deadline=1 cpu-used=16 end-usage=cbr target-bitrate=" +
                        std::to_string(video_kbps * 1000) +
                        " keyframe-max-dist=60 ! rtpvp8pay pt=96 mtu=1200 ! udpsink name=vtx" + n +
                        " host=127.0.0.1 port=" + std::to_string(video_port) +
                        " sync=false async=false ";
    send_description += "audiotestsrc is-live=true freq=" + std::to_string(300 + 60 * k) +
                        " ! opusenc bitrate=32000 ! rtpopuspay pt=111 ! udpsink name=atx" + n +
                        " host=127.0.0.1 port=" + std::to_string(audio_port) +
                        " sync=false async=false ";
  }
  for (int k = 0; k < receivers; ++k) {
    const std::string n = std::to_string(k);
    receive_description += "udpsrc port=" + std::to_string(receive_base + 2 * k) +
                           " buffer-size=4194304 reuse=false ! fakesink name=vrx" + n +
                           " sync=false async=false ";
    receive_description += "udpsrc port=" + std::to_string(receive_base + 2 * k + 1) +
                           " buffer-size=4194304 reuse=false ! fakesink name=arx" + n +
                           " sync=false async=false ";
  }
  GError* error = nullptr;
  GstElement* receiving = gst_parse_launch(receive_description.c_str(), &error);
  GstElement* sending = error ? nullptr : gst_parse_launch(send_description.c_str(), &error);
  if (error) {
    std::fprintf(stderr, "otp-conference-sim: %s\n", error->message);
    return 1;
  }
  std::vector<Counter> sent(2 * senders), received(2 * receivers);
  for (int k = 0; k < senders; ++k) {
    probe(sending, "vtx" + std::to_string(k), sent[2 * k]);
    probe(sending, "atx" + std::to_string(k), sent[2 * k + 1]);
  }
  for (int k = 0; k < receivers; ++k) {
    probe(receiving, "vrx" + std::to_string(k), received[2 * k]);
    probe(receiving, "arx" + std::to_string(k), received[2 * k + 1]);
  }
  // Receivers first and last: the other site's conference system starts sending a little
  // after both are up and stops a little before they stop, so no packet is sent to a
  // receiver that is not there (the demo proves nothing is lost: edge losses would blur it).
  gst_element_set_state(receiving, GST_STATE_PLAYING);
  std::this_thread::sleep_for(std::chrono::duration<double>(lead_in));
  gst_element_set_state(sending, GST_STATE_PLAYING);
  const auto started = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  };
  // The gateway's sending side, sampled while the call runs: when AES took over (and
  // gave back), and the longest stretch during which packets were dropped for lack of key.
  KeyTimeline timeline;
  std::optional<httplib::Client> client;
  if (status_port > 0) {
    client.emplace("127.0.0.1", status_port);
    client->set_read_timeout(1, 0);
  }
  while (elapsed() < seconds) {
    if (client) {
      if (auto res = client->Get("/api/v1/status"); res && res->status == 200) {
        const auto st = nlohmann::json::parse(res->body, nullptr, false);
        if (st.is_object()) timeline.sample(elapsed(), sending_totals(st));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  gst_element_set_state(sending, GST_STATE_NULL);
  std::this_thread::sleep_for(
      std::chrono::duration<double>(tail));  // the other site's last packets
  gst_element_set_state(receiving, GST_STATE_NULL);
  gst_object_unref(sending);
  gst_object_unref(receiving);

  auto total = [](const std::vector<Counter>& v, int media) {
    std::uint64_t p = 0, f = 0, b = 0;
    for (std::size_t i = static_cast<std::size_t>(media); i < v.size(); i += 2) {
      p += v[i].packets;
      f += v[i].frames;
      b += v[i].bytes;
    }
    return std::array<std::uint64_t, 3>{p, f, b};
  };
  auto longest_gap_ms = [](const std::vector<Counter>& v, int media) {
    gint64 gap = 0;
    for (std::size_t i = static_cast<std::size_t>(media); i < v.size(); i += 2)
      gap = std::max(gap, v[i].longest_gap_us);
    return double(gap) / 1000;
  };
  const auto sv = total(sent, 0), sa = total(sent, 1), rv = total(received, 0),
             ra = total(received, 1);
  std::printf(
      "%s: sent from %d local participants: video %llu frames / %llu packets, audio %llu packets, "
      "%.2f Mbit/s\n",
      site.c_str(), senders, (unsigned long long)sv[1], (unsigned long long)sv[0],
      (unsigned long long)sa[0], double(sv[2] + sa[2]) * 8 / seconds / 1e6);
  std::printf(
      "%s: received from %d remote participants: video %llu frames / %llu packets, audio %llu "
      "packets (decrypted by the gateway); longest gap between packets of one stream: video %.0f "
      "ms, audio %.0f ms (at 15 frames/s and 20 ms Opus frames: 67 and 20 ms without loss or "
      "waiting)\n",
      site.c_str(), receivers, (unsigned long long)rv[1], (unsigned long long)rv[0],
      (unsigned long long)ra[0], longest_gap_ms(received, 0), longest_gap_ms(received, 1));
  if (client) {
    auto res = client->Get("/api/v1/status");
    if (res && res->status == 200) {
      const auto st = nlohmann::json::parse(res->body);
      const SendingTotals t = sending_totals(st);
      std::uint64_t auth = 0, replays = 0, receive_fetched = 0, receive_pad = 0;
      for (const auto& s : st["streams"]) {
        if (!s["receive"].is_null()) {
          auth += s["receive"]["auth-failures"].get<std::uint64_t>();
          replays += s["receive"]["replays"].get<std::uint64_t>();
          receive_pad += s["receive"]["pad-bytes-used"].get<std::uint64_t>();
          receive_fetched += s["key_supply"]["receive"]["bytes_fetched"].get<std::uint64_t>();
        }
      }
      const double per_minute = double(t.pad_used) / seconds * 60;
      std::printf(
          "%s gateway: pad consumed %.2f MB (%.2f MB/min, %.2f Mbit/s), key ready %.2f MB, "
          "auth failures %llu, replays %llu, packets dropped for lack of key %llu; a 65-minute "
          "panel at this rate needs %.0f MB of key from this site\n",
          site.c_str(), double(t.pad_used) / 1e6, per_minute / 1e6,
          double(t.pad_used) * 8 / seconds / 1e6, double(t.key_ready) / 1e6,
          (unsigned long long)auth, (unsigned long long)replays, (unsigned long long)t.drops,
          per_minute * 65 / 1e6);
      const double media_sent = double(sv[2] + sa[2]), media_received = double(rv[2] + ra[2]);
      std::printf(
          "%s key economy: sending: key drawn from the KME %.2f MB, pad used %.2f MB, %.3f bytes "
          "of key drawn per byte of media sent; receiving: key drawn %.2f MB, pad used %.2f MB, "
          "%.3f per byte of media received\n",
          site.c_str(), double(t.key_fetched) / 1e6, double(t.pad_used) / 1e6,
          double(t.key_fetched) / std::max(1.0, media_sent), double(receive_fetched) / 1e6,
          double(receive_pad) / 1e6, double(receive_fetched) / std::max(1.0, media_received));
      std::printf(
          "%s key shortage: packets dropped for lack of key %llu, longest stretch of "
          "drops %.1f s; sent with AES %llu of %llu packets (%.1f%%)%s\n",
          site.c_str(), (unsigned long long)t.drops, timeline.longest_drop_stretch,
          (unsigned long long)t.aes_packets, (unsigned long long)t.packets_out,
          t.packets_out ? 100.0 * double(t.aes_packets) / double(t.packets_out) : 0.0,
          timeline.aes_story(t.aes_packets).c_str());
      // Every packet the gateway took in left encrypted or was dropped: the element has no
      // other way out, and the counters show it.
      const std::uint64_t accounted = t.packets_out + t.drops + t.malformed;
      const std::uint64_t sent_here = sv[0] + sa[0];
      std::string fate =
          accounted == t.packets_in
              ? std::string("none in the clear")
              : std::to_string((long long)t.packets_in - (long long)accounted) +
                    " still inside it when sampled (waiting for key), none in the clear";
      if (sent_here > t.packets_in) {
        fate += "; " + std::to_string(sent_here - t.packets_in) + " of the " +
                std::to_string(sent_here) +
                " sent here never reached its encryptor (its input socket overflowed while it "
                "waited for key)";
      }
      std::printf("%s gateway took in %llu packets: %llu sent encrypted, %llu dropped, %s\n",
                  site.c_str(), (unsigned long long)t.packets_in, (unsigned long long)t.packets_out,
                  (unsigned long long)(t.drops + t.malformed), fate.c_str());
    }
  }
  return 0;
}

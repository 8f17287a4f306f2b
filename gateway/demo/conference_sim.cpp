// otp-conference-sim: the conference system at one site of the demo. Local participants
// send VP8 video and Opus audio as RTP to the site's gateway; remote participants'
// media, decrypted by the gateway, is received and counted (packets, frames, bytes).
// At the end it prints what it sent and received and, from the gateway's status API,
// the key consumed.
#include <gst/gst.h>
#include <httplib.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Counter {
  std::atomic<std::uint64_t> packets{0}, frames{0}, bytes{0};
};

void count_buffer(Counter& c, GstBuffer* buffer) {
  guint8 header[2] = {};
  if (gst_buffer_extract(buffer, 0, header, 2) == 2) {
    ++c.packets;
    c.bytes += gst_buffer_get_size(buffer);
    if (header[1] & 0x80) ++c.frames;  // the marker bit ends a video frame
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
  CLI11_PARSE(app, argc, argv);
  gst_init(nullptr, nullptr);

  const bool full = profile == "full";
  const std::string video = full ? "video/x-raw,width=1280,height=720,framerate=30/1"
                                 : "video/x-raw,width=320,height=180,framerate=15/1";
  const int video_kbps = full ? 1500 : 250;
  std::string d;
  for (int k = 0; k < senders; ++k) {
    const int video_port = send_base + 2 * k, audio_port = video_port + 1;
    const std::string n = std::to_string(k);
    d += "videotestsrc is-live=true pattern=" + std::to_string(k % 20) + " ! " + video +
         " ! vp8enc deadline=1 cpu-used=16 end-usage=cbr target-bitrate=" +
         std::to_string(video_kbps * 1000) +
         " keyframe-max-dist=60 ! rtpvp8pay pt=96 mtu=1200 ! udpsink name=vtx" + n +
         " host=127.0.0.1 port=" + std::to_string(video_port) + " sync=false async=false ";
    d += "audiotestsrc is-live=true freq=" + std::to_string(300 + 60 * k) +
         " ! opusenc bitrate=32000 ! rtpopuspay pt=111 ! udpsink name=atx" + n +
         " host=127.0.0.1 port=" + std::to_string(audio_port) + " sync=false async=false ";
  }
  for (int k = 0; k < receivers; ++k) {
    const std::string n = std::to_string(k);
    d += "udpsrc port=" + std::to_string(receive_base + 2 * k) +
         " buffer-size=4194304 ! fakesink name=vrx" + n + " sync=false async=false ";
    d += "udpsrc port=" + std::to_string(receive_base + 2 * k + 1) +
         " buffer-size=4194304 ! fakesink name=arx" + n + " sync=false async=false ";
  }
  GError* error = nullptr;
  GstElement* pipeline = gst_parse_launch(d.c_str(), &error);
  if (error) {
    std::fprintf(stderr, "otp-conference-sim: %s\n", error->message);
    return 1;
  }
  std::vector<Counter> sent(2 * senders), received(2 * receivers);
  for (int k = 0; k < senders; ++k) {
    probe(pipeline, "vtx" + std::to_string(k), sent[2 * k]);
    probe(pipeline, "atx" + std::to_string(k), sent[2 * k + 1]);
  }
  for (int k = 0; k < receivers; ++k) {
    probe(pipeline, "vrx" + std::to_string(k), received[2 * k]);
    probe(pipeline, "arx" + std::to_string(k), received[2 * k + 1]);
  }
  gst_element_set_state(pipeline, GST_STATE_PLAYING);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  gst_element_set_state(pipeline, GST_STATE_NULL);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // in-flight packets land
  gst_object_unref(pipeline);

  auto total = [](const std::vector<Counter>& v, int media) {
    std::uint64_t p = 0, f = 0, b = 0;
    for (std::size_t i = static_cast<std::size_t>(media); i < v.size(); i += 2) {
      p += v[i].packets;
      f += v[i].frames;
      b += v[i].bytes;
    }
    return std::array<std::uint64_t, 3>{p, f, b};
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
      "packets (decrypted by the gateway)\n",
      site.c_str(), receivers, (unsigned long long)rv[1], (unsigned long long)rv[0],
      (unsigned long long)ra[0]);
  if (status_port > 0) {
    httplib::Client client("127.0.0.1", status_port);
    auto res = client.Get("/api/v1/status");
    if (res && res->status == 200) {
      const auto st = nlohmann::json::parse(res->body);
      std::uint64_t consumed = 0, left = 0, auth = 0, replays = 0, drops = 0;
      for (const auto& s : st["streams"]) {
        if (!s["key_supply"]["send"].is_null()) {
          consumed += s["key_supply"]["send"]["bytes_consumed"].get<std::uint64_t>();
          left += s["key_supply"]["send"]["bytes_available"].get<std::uint64_t>();
          drops += s["send"]["drops-no-key"].get<std::uint64_t>();
        }
        if (!s["receive"].is_null()) {
          auth += s["receive"]["auth-failures"].get<std::uint64_t>();
          replays += s["receive"]["replays"].get<std::uint64_t>();
        }
      }
      const double per_minute = double(consumed) / seconds * 60;
      std::printf(
          "%s gateway: pad consumed %.2f MB (%.2f MB/min, %.2f Mbit/s), key ready %.2f MB, "
          "auth failures %llu, replays %llu, packets dropped for lack of key %llu; a 65-minute "
          "panel at this rate needs %.0f MB of key from this site\n",
          site.c_str(), double(consumed) / 1e6, per_minute / 1e6,
          double(consumed) * 8 / seconds / 1e6, double(left) / 1e6, (unsigned long long)auth,
          (unsigned long long)replays, (unsigned long long)drops, per_minute * 65 / 1e6);
    }
  }
  return 0;
}

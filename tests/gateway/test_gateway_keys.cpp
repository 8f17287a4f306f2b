// SPDX-License-Identifier: LGPL-2.1-or-later
// One gateway's streams and directions never share a key: each stream and direction (a
// lane) runs its own pad stream, so a key_ID the KME served belongs to exactly one lane.
// Seen from outside: every lane's protected media crosses a hop that records the key_IDs
// its announcements name, and the KME simulator records which key_IDs it handed to which
// master and which the slave fetched.
#include <algorithm>
#include <atomic>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gateway_fixture.hpp"
#include "otpgate/otp_wire.hpp"

namespace {

// Forwards datagrams from `listen` to `forward` as they come, and records the key_IDs
// named by the announcements among them.
class AnnouncementRecorder {
 public:
  AnnouncementRecorder(std::uint16_t listen, std::uint16_t forward)
      : hop_(listen, [this, forward](const Bytes& d, const UdpHop& hop) {
          hop.send(forward, d);
          if (otpgate::otp::classify(d) != otpgate::otp::DatagramType::announcement) return;
          if (const auto a = otpgate::otp::parse_announcement(d)) {
            std::lock_guard lock(mutex_);
            for (std::size_t i = 0; i < a->count; ++i) ids_.insert(a->id(i).to_string());
          }
        }) {}
  std::set<std::string> key_ids() {
    std::lock_guard lock(mutex_);
    return ids_;
  }

 private:
  std::mutex mutex_;
  std::set<std::string> ids_;
  UdpHop hop_;  // last: its thread uses the members above
};

// One stream in one direction, with the ports of the fixture's layout
// (gateway_fixture.hpp) and of a third stream added here.
struct Lane {
  std::string name;  // "video-1 a->b"
  bool from_a;
  std::uint16_t local;    // the sending site's conference system sends RTP here
  std::uint16_t listen;   // the receiving gateway's listen_port
  std::uint16_t deliver;  // the receiving site's conference system gets it here
  std::uint16_t hop;      // the recorder between the two
};

// The two-gateway fixture, as a suite of its own (GatewayTest is another class in every
// file that includes the fixture).
class GatewayKeysTest : public GatewayTest {};

}  // namespace

TEST_F(GatewayKeysTest, NoKeyIdIsSharedBetweenStreamsOrDirections) {
  const auto port = [&](int offset) { return static_cast<std::uint16_t>(base_ + offset); };
  std::vector<Lane> lanes;
  const char* names[] = {"audio-1", "video-1", "screen-1"};
  for (int s = 0; s < 3; ++s) {
    const bool extra = s == 2;  // screen-1: ports base+20..29, added to both configs below
    lanes.push_back({std::string(names[s]) + " a->b", true, port(extra ? 20 : 2 * s),
                     port(extra ? 25 : 15 + s), port(extra ? 28 : 105 + 2 * s), 0});
    lanes.push_back({std::string(names[s]) + " b->a", false, port(extra ? 22 : 5 + 2 * s),
                     port(extra ? 24 : 10 + s), port(extra ? 26 : 100 + 2 * s), 0});
  }
  for (std::size_t i = 0; i < lanes.size(); ++i) lanes[i].hop = port(30 + static_cast<int>(i));

  auto kme = otpgate::testing::simulator_config();
  kme.record_served_keys = true;
  start(
      [&](std::string& a, std::string& b) {
        // Every stream's protected media goes through its lane's recorder.
        for (const Lane& lane : lanes) {
          std::string& text = lane.from_a ? a : b;
          const std::string direct = "peer_port = " + std::to_string(lane.listen) + "\n";
          const auto at = text.find(direct);
          if (at != std::string::npos)
            text.replace(at, direct.size(), "peer_port = " + std::to_string(lane.hop) + "\n");
        }
        for (const bool site_a : {true, false}) {
          const Lane& out = lanes[site_a ? 4 : 5];
          const Lane& in = lanes[site_a ? 5 : 4];
          (site_a ? a : b) +=
              "[[stream]]\nname = \"screen-1\"\nlocal_rtp_port = " + std::to_string(out.local) +
              "\npeer_port = " + std::to_string(out.hop) +
              "\nlisten_port = " + std::to_string(in.listen) +
              "\ndeliver_rtp = \"127.0.0.1:" + std::to_string(in.deliver) + "\"\n";
        }
      },
      kme);
  std::vector<std::unique_ptr<AnnouncementRecorder>> recorders;
  std::vector<std::unique_ptr<UdpSocket>> sinks;
  for (const Lane& lane : lanes) {
    recorders.push_back(std::make_unique<AnnouncementRecorder>(lane.hop, lane.listen));
    sinks.push_back(std::make_unique<UdpSocket>(lane.deliver));
  }

  // Media on every lane at once: first until each lane delivers (the call's first keys
  // are fetched meanwhile), then 200 packets per lane, each of which must arrive.
  UdpSocket conference;
  // Warm-up packets and counted ones differ by SSRC.
  constexpr std::uint32_t kWarmUp = 0xd0, kCounted = 0xc0;
  auto packet = [&](std::size_t lane, std::uint32_t ssrc, int seq) {
    return rtp(static_cast<std::uint16_t>(seq), ssrc + static_cast<std::uint32_t>(lane), 96, 1100);
  };
  std::vector<bool> flowing(lanes.size(), false);
  int warm_up = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::count(flowing.begin(), flowing.end(), true) < std::ssize(lanes) &&
         std::chrono::steady_clock::now() < deadline) {
    for (std::size_t i = 0; i < lanes.size(); ++i) {
      conference.send_to(lanes[i].local, packet(i, kWarmUp, warm_up));
      if (sinks[i]->receive(0)) flowing[i] = true;
    }
    ++warm_up;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (std::size_t i = 0; i < lanes.size(); ++i)
    EXPECT_TRUE(flowing[i]) << lanes[i].name << ": no media delivered within 30 s";
  constexpr int kCount = 200;
  std::vector<std::vector<Bytes>> sent(lanes.size()), received(lanes.size());
  for (int n = 0; n < kCount; ++n) {
    for (std::size_t i = 0; i < lanes.size(); ++i) {
      sent[i].push_back(packet(i, kCounted, n));
      conference.send_to(lanes[i].local, sent[i].back());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (std::size_t i = 0; i < lanes.size(); ++i) {
    // Warm-up packets still on their way come first; the hang bound is the only timer.
    while (received[i].size() < sent[i].size()) {
      auto p = sinks[i]->receive(10000);
      if (!p) break;
      if ((*p)[11] == kCounted + i) received[i].push_back(*p);
    }
    EXPECT_TRUE(received[i] == sent[i])
        << lanes[i].name << ": " << received[i].size() << " of " << sent[i].size() << " arrived";
  }
  for (auto* gateway : {a_.get(), b_.get()}) {
    const auto status = get_json(gateway->status_port(), "/api/v1/status");
    ASSERT_EQ(status["streams"].size(), 3u);
    for (const auto& stream : status["streams"]) {
      EXPECT_EQ(stream["receive"]["auth-failures"], 0) << stream["name"];
      EXPECT_EQ(stream["key_supply"]["receive"]["keys_lost"], 0) << stream["name"];
    }
  }
  a_->stop();
  b_->stop();

  // Which lane named which key_ID on the wire; a key_ID on two lanes is reported with both.
  std::map<std::string, std::size_t> lane_of;
  std::vector<std::string> shared;
  for (std::size_t i = 0; i < lanes.size(); ++i) {
    const auto ids = recorders[i]->key_ids();
    EXPECT_FALSE(ids.empty()) << lanes[i].name << " announced no key";
    for (const auto& id : ids) {
      if (const auto [at, first] = lane_of.emplace(id, i); !first)
        shared.push_back(id + " (" + lanes[at->second].name + " and " + lanes[i].name + ")");
    }
  }
  EXPECT_TRUE(shared.empty()) << shared.size() << " key_IDs used by two lanes, the first: "
                              << (shared.empty() ? "" : shared.front());
  // Every key the KME served to these gateways' masters: named by a lane of that master
  // if its slave fetched it, and by one lane only (above).
  std::size_t fetched = 0;
  for (const auto& key : sim_->served_key_ids()) {
    const auto at = lane_of.find(key.key_id);
    if (at != lane_of.end()) {
      EXPECT_EQ(key.master_sae_id, lanes[at->second].from_a ? "sae-a" : "sae-b")
          << key.key_id << " named on " << lanes[at->second].name;
    }
    if (!key.fetched_by_slave) continue;
    ++fetched;
    EXPECT_NE(at, lane_of.end()) << key.key_id << " reached the slave but no lane announced it";
  }
  EXPECT_GT(fetched, lanes.size()) << "too few keys fetched to tell anything";
  // Every key_ID on the wire is one the KME really issued.
  std::set<std::string> issued;
  for (const auto& key : sim_->served_key_ids()) issued.insert(key.key_id);
  for (const auto& [id, lane] : lane_of)
    EXPECT_TRUE(issued.contains(id)) << id << " on " << lanes[lane].name << " was never issued";
  std::cout << lane_of.size() << " key_IDs on " << lanes.size() << " lanes, " << fetched
            << " fetched by the slaves, none shared\n";
}

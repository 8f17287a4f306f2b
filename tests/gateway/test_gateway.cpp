// SPDX-License-Identifier: LGPL-2.1-or-later
// Two otp-gateways and qkd-kme-sim on loopback: media from each site's conference system
// arrives at the other decrypted and byte-identical, both directions, audio and video at
// once; the status API and /metrics count what was sent; config errors are readable.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gst/gst.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <poll.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <tuple>
#include <unordered_set>

#include "gateway_fixture.hpp"
#include "otpgate/gateway.hpp"
#include "test_pki.hpp"

TEST_F(GatewayTest, AudioAndVideoArriveByteIdenticalInBothDirections) {
  start();
  for (bool from_a : {true, false}) {
    std::map<int, std::vector<Bytes>> sent;
    // The first packets of a call wait for the receiver's first dec_keys (key-wait);
    // on a loaded machine that can take longer, so the call is warmed up first.
    exchange(from_a, 5, sent);
    sent.clear();
    auto received = exchange(from_a, 300, sent);
    for (int s = 0; s < 2; ++s) {
      EXPECT_EQ(received[s], sent[s]) << (from_a ? "A->B" : "B->A") << " stream " << s;
    }
  }
  for (auto* g : {a_.get(), b_.get()}) {
    const auto status = get_json(g->status_port(), "/api/v1/status");
    for (const auto& stream : status["streams"]) {
      EXPECT_EQ(stream["receive"]["auth-failures"], 0);
      EXPECT_EQ(stream["receive"]["replays"], 0);
    }
  }
}

// Symmetric RTP: the gateway sends from the port it receives on. OTP to the peer gateway
// leaves from the port the peer sends its OTP to (A's audio listen port, base+10), and
// decrypted RTP and RTCP reach the conference system from the gateway's local RTP and
// RTCP ports (B's video: base+7 and base+8), so a stateful firewall or an endpoint that
// latches onto the source lets them in. Without it they come from ephemeral ports.
TEST_F(GatewayTest, MediaLeavesFromThePortItIsSentTo) {
  const auto tap_port = static_cast<std::uint16_t>(base_ + 30);
  start([&](std::string& a, std::string&) {
    // A's audio goes to the test's socket instead of gateway B.
    const std::string to_b = "peer_port = " + std::to_string(base_ + 15) + "\n";
    a.replace(a.find(to_b), to_b.size(), "peer_port = " + std::to_string(tap_port) + "\n");
  });
  UdpSocket tap(tap_port);
  UdpSocket conference;
  UdpSocket video_sink(static_cast<std::uint16_t>(base_ + 107));
  UdpSocket video_rtcp_sink(static_cast<std::uint16_t>(base_ + 108));
  std::uint16_t otp_from = 0, rtp_from = 0, rtcp_from = 0;
  std::optional<Bytes> otp, rtp_out, rtcp_out;
  const Bytes rtcp_rr{0x80, 201, 0x00, 0x01, 0x00, 0x00, 0x00, 0xa1};  // an empty receiver report
  // Until each arrived: the first packets wait for the receiver's first keys.
  for (int i = 0; i < 200 && !(otp && rtp_out && rtcp_out); ++i) {
    conference.send_to(static_cast<std::uint16_t>(base_),
                       rtp(static_cast<std::uint16_t>(i), 0xa0, 111, 160));
    conference.send_to(static_cast<std::uint16_t>(base_ + 2),
                       rtp(static_cast<std::uint16_t>(i), 0xa1, 96, 1100));
    conference.send_to(static_cast<std::uint16_t>(base_ + 3), rtcp_rr);
    if (!otp) otp = tap.receive(20, &otp_from);
    if (!rtp_out) rtp_out = video_sink.receive(20, &rtp_from);
    if (!rtcp_out) rtcp_out = video_rtcp_sink.receive(20, &rtcp_from);
  }
  ASSERT_TRUE(otp && rtp_out && rtcp_out)
      << "OTP " << bool(otp) << ", RTP " << bool(rtp_out) << ", RTCP " << bool(rtcp_out);
  EXPECT_EQ(otp_from, base_ + 10) << "OTP to the peer leaves from A's audio listen port";
  EXPECT_EQ(rtp_from, base_ + 7) << "decrypted RTP leaves from B's local video RTP port";
  EXPECT_EQ(rtcp_from, base_ + 8) << "decrypted RTCP leaves from B's local video RTCP port";
  EXPECT_EQ(*rtcp_out, rtcp_rr);
}

// A conference system on IPv6 (deliver_rtp names an IPv6 address): decrypted RTP reaches
// it, from the local RTP port (whose socket is then IPv6 and takes IPv4 too). With an
// IPv4-only socket shared for symmetric RTP, udpsink could not send to it at all.
TEST_F(GatewayTest, DecryptedMediaReachesAnIpv6ConferenceSystem) {
  const int sink = ::socket(AF_INET6, SOCK_DGRAM, 0);
  sockaddr_in6 at{};
  at.sin6_family = AF_INET6;
  at.sin6_addr = in6addr_loopback;
  ASSERT_EQ(::bind(sink, reinterpret_cast<sockaddr*>(&at), sizeof at), 0) << "no IPv6 loopback";
  socklen_t length = sizeof at;
  ::getsockname(sink, reinterpret_cast<sockaddr*>(&at), &length);
  const std::uint16_t sink_port = ntohs(at.sin6_port);
  start([&](std::string&, std::string& b) {
    // B's video goes to [::1]:sink_port.
    const std::string to = "deliver_rtp = \"127.0.0.1:" + std::to_string(base_ + 107) + "\"";
    b.replace(b.find(to), to.size(), "deliver_rtp = \"::1:" + std::to_string(sink_port) + "\"");
  });
  UdpSocket conference;
  bool arrived = false;
  sockaddr_in6 from{};
  for (int i = 0; i < 200 && !arrived; ++i) {
    conference.send_to(static_cast<std::uint16_t>(base_ + 2),
                       rtp(static_cast<std::uint16_t>(i), 0xa1, 96, 1100));
    pollfd p{sink, POLLIN, 0};
    if (::poll(&p, 1, 20) > 0) {
      std::array<std::uint8_t, 2048> packet{};
      socklen_t from_size = sizeof from;
      arrived = ::recvfrom(sink, packet.data(), packet.size(), 0,
                           reinterpret_cast<sockaddr*>(&from), &from_size) > 0;
    }
  }
  ::close(sink);
  ASSERT_TRUE(arrived) << "no decrypted RTP at [::1]:" << sink_port;
  // Symmetric over IPv6 too: from B's local video RTP port.
  EXPECT_EQ(ntohs(from.sin6_port), base_ + 7);
}

// A KME that relays keys to the slave site late: the first packets wait for their keys
// instead of being dropped (up to the element's key-wait, 500 ms), and the wait is counted.
// The KME holds the receiver's dec_keys until B reports a packet waiting (no guessed
// delay that a loaded machine may stretch past the key-wait, or that may run out before
// the first packet arrives), then answers them at once.
TEST_F(GatewayTest, PacketsWaitingForALateKeyAreDeliveredAndCounted) {
  auto kme = otpgate::testing::simulator_config();
  kme.faults.hold_dec_keys = true;
  start({}, kme);
  auto b_total = [&](const char* counter) {
    const auto status = get_json(b_->status_port(), "/api/v1/status");
    std::uint64_t total = 0;
    for (const auto& stream : status["streams"])
      total += stream["receive"][counter].get<std::uint64_t>();
    return total;
  };
  std::thread relay([&] {  // once a packet waits and B's dec_keys is held at the KME
    EXPECT_TRUE(otpgate::testing::eventually([&] {
      return sim_->stats().requests_hung > 0 && b_total("key-waits") > 0;
    })) << "no packet waited for its key, or B never asked for it";
    release_dec_keys();
  });
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 20, sent);
  relay.join();
  EXPECT_EQ(received[0], sent[0]);
  EXPECT_EQ(received[1], sent[1]);
  EXPECT_GE(b_total("key-waits"), 1u);
  EXPECT_EQ(b_total("drops-no-key"), 0u);
}

// [media] key_wait_ms: a site whose KME relays keys about a second late keeps every packet
// with a longer key-wait; with the default (500 ms) the first ones are dropped, counted.
TEST_F(GatewayTest, AKeyWaitLongerThanTheKmesDelayKeepsEveryPacket) {
  auto kme = otpgate::testing::simulator_config();
  kme.faults.hold_dec_keys = true;
  start([](std::string&, std::string& b) { b += "[media]\nkey_wait_ms = 4000\n"; }, kme);
  std::thread relay([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(1200));
    release_dec_keys();
  });
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 20, sent);
  relay.join();
  EXPECT_GT(sim_->stats().requests_hung, 0u) << "B never waited for its keys";
  const auto status = get_json(b_->status_port(), "/api/v1/status");
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(received[s], sent[s]) << "stream " << s;
    EXPECT_EQ(status["streams"][s]["receive"]["drops-no-key"], 0) << "stream " << s;
  }
}

TEST(GatewayConfigMedia, AKeyWaitOutOfRangeIsOneReadableError) {
  const std::string text =
      site_config("sae-a", "sae-b", "https://127.0.0.1:1", "/tmp", 20000, true) +
      "[media]\nkey_wait_ms = 60000\n";
  try {
    otpgate::gateway::parse_config(text, "a.toml");
    ADD_FAILURE() << "a key_wait_ms of 60000 was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("media.key_wait_ms"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("0 to 5000"), std::string::npos) << e.what();
  }
}

TEST_F(GatewayTest, StatusApiAndMetricsCountWhatWasSent) {
  start();
  std::map<int, std::vector<Bytes>> sent;
  exchange(true, 120, sent);
  const auto a = get_json(a_->status_port(), "/api/v1/status");
  const auto b = get_json(b_->status_port(), "/api/v1/status");
  ASSERT_TRUE(a.is_object());
  EXPECT_EQ(a["site"], "sae-a-site");
  EXPECT_EQ(a["streams"][0]["name"], "audio-1");
  EXPECT_EQ(a["streams"][0]["send"]["packets-in"], 120);
  EXPECT_EQ(a["streams"][1]["send"]["packets-in"], 120);
  EXPECT_EQ(b["streams"][0]["receive"]["packets-out"], 120);
  EXPECT_TRUE(a["kme"]["healthy"].get<bool>());
  EXPECT_GT(a["streams"][0]["key_supply"]["send"]["bytes_consumed"].get<std::uint64_t>(),
            120u * 160u);

  httplib::Client client("127.0.0.1", a_->status_port());
  auto metrics = client.Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("otpgate_packets_in_total{site=\"sae-a-site\",stream=\"video-1\","
                               "direction=\"send\"} 120"),
            std::string::npos)
      << metrics->body;
  EXPECT_NE(metrics->body.find("# TYPE otpgate_key_available_bytes gauge"), std::string::npos);
}

// Every media streaming thread takes the scheduling [media] asks for (SCHED_FIFO where
// the process may; CI runs as root) and reports it; key refill threads never do.
TEST_F(GatewayTest, MediaThreadsRunRealtimeWhereConfiguredAndReportIt) {
  start([](std::string& a, std::string& b) {
    a += "[media]\nrealtime_priority = 15\n";
    b += "[media]\nrealtime_priority = 0\n";
  });
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 20, sent);
  EXPECT_EQ(received[1], sent[1]);  // media flows through the realtime threads
  const auto a = get_json(a_->status_port(), "/api/v1/status")["media_threads"];
  const auto b = get_json(b_->status_port(), "/api/v1/status")["media_threads"];
  EXPECT_EQ(a["realtime_priority"], 15);
  const int a_threads = a["realtime_threads"].get<int>() + a["raised_threads"].get<int>() +
                        a["unraised_threads"].get<int>();
  EXPECT_GE(a_threads, 4);  // two streams: RTP and RTCP sources, both directions
  EXPECT_EQ(b["realtime_threads"], 0);
  const sched_param probe{15};
  const bool may_realtime = ::sched_setscheduler(0, SCHED_FIFO, &probe) == 0;
  if (may_realtime) {
    const sched_param other{};
    ::sched_setscheduler(0, SCHED_OTHER, &other);
    EXPECT_EQ(a["realtime_threads"].get<int>(), a_threads);
    // Key refill threads (and the rest of the process) stay time-shared.
    int realtime_elsewhere = 0;
    for (const auto& task : fs::directory_iterator("/proc/self/task")) {
      const pid_t tid = std::stoi(task.path().filename().string());
      if (::sched_getscheduler(tid) == SCHED_FIFO) ++realtime_elsewhere;
    }
    EXPECT_EQ(realtime_elsewhere, a_threads);
  }
  // Key refill threads run at normal priority, not below: on a busy host a niced refill
  // starved behind other processes while the receiver dropped packets waiting for key.
  for (const auto& task : fs::directory_iterator("/proc/self/task")) {
    const auto tid = static_cast<id_t>(std::stoi(task.path().filename().string()));
    errno = 0;
    const int nice = ::getpriority(PRIO_PROCESS, tid);
    if (errno == 0) {
      EXPECT_LE(nice, 0) << "thread " << tid << " runs below normal priority";
    }
  }
  httplib::Client client("127.0.0.1", a_->status_port());
  auto metrics = client.Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(
      metrics->body.find("otpgate_media_threads{site=\"sae-a-site\",scheduling=\"realtime\"} " +
                         std::to_string(a["realtime_threads"].get<int>())),
      std::string::npos)
      << metrics->body;
}

// [media] cpu_wakeup_latency_us is a PM QoS request held for as long as the gateway runs
// (the kernel's current value reads back from /dev/cpu_dma_latency); a gateway that may
// not make it still carries media and reports why.
TEST_F(GatewayTest, CpuWakeupLatencyIsHeldWhileRunningAndReported) {
  a_.reset();
  b_.reset();
  const fs::path device = "/dev/cpu_dma_latency";
  auto current = [&]() -> std::optional<std::int32_t> {
    std::ifstream in(device, std::ios::binary);
    std::int32_t value = 0;
    if (!in.read(reinterpret_cast<char*>(&value), sizeof value)) return std::nullopt;
    return value;
  };
  const auto before = current();
  const bool may_request = ::access(device.c_str(), W_OK) == 0;
  start(
      [](std::string& a, std::string& b) {
        a += "[media]\ncpu_wakeup_latency_us = 7\n";
        b += "[media]\ncpu_wakeup_latency_us = 9\n";
      },
      otpgate::testing::simulator_config(),
      [&](otpgate::gateway::GatewayConfig&, otpgate::gateway::GatewayConfig& b) {
        b.cpu_latency_device = dir_.path / "no-such-device";
      });
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 10, sent);
  EXPECT_EQ(received[0], sent[0]);  // media flows, B without its request too

  const auto a = get_json(a_->status_port(), "/api/v1/status")["media_threads"];
  const auto b = get_json(b_->status_port(), "/api/v1/status")["media_threads"];
  EXPECT_EQ(a["cpu_wakeup_latency_us"], 7);
  EXPECT_EQ(a["cpu_wakeup_latency_held"], may_request);
  EXPECT_EQ(b["cpu_wakeup_latency_us"], 9);
  EXPECT_EQ(b["cpu_wakeup_latency_held"], false);
  EXPECT_NE(b["cpu_wakeup_latency_error"].get<std::string>().find(
                "no-such-device: No such file or directory"),
            std::string::npos);
  httplib::Client client("127.0.0.1", b_->status_port());
  auto metrics = client.Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("otpgate_cpu_wakeup_latency_held{site=\"sae-b-site\"} 0"),
            std::string::npos)
      << metrics->body;
  if (!may_request) GTEST_SKIP() << device << " is not writable here: the request is untested";
  EXPECT_EQ(current(), std::optional<std::int32_t>(7));
  a_->stop();
  EXPECT_EQ(current(), before) << "stopping withdraws the request";
  EXPECT_EQ(nlohmann::json::parse(a_->status_json())["media_threads"]["cpu_wakeup_latency_held"],
            false);
  EXPECT_EQ(get_json(b_->status_port(), "/api/v1/status")["media_threads"]["cpu_wakeup_latency_us"],
            9);
}

TEST(GatewayConfig, ErrorsNameTheKeyTheValueAndWhatIsExpected) {
  const std::string pki = otpgate::testing::pki_dir().string();
  const std::string good =
      "[site]\nname = \"a\"\nsae_id = \"sae-a\"\n[kme]\nurl = \"https://kme:443\"\ntls_cert = \"" +
      pki + "/sae-a.crt\"\ntls_key = \"" + pki + "/sae-a.key\"\ntls_ca = \"" + pki +
      "/ca.crt\"\n[peer]\nsae_id = \"sae-b\"\naddress = \"10.0.0.2\"\n"
      "[[stream]]\nname = \"audio\"\nlocal_rtp_port = 5004\npeer_port = 6004\n"
      "listen_port = 6004\ndeliver_rtp = \"127.0.0.1:7004\"\n";
  EXPECT_NO_THROW(otpgate::gateway::parse_config(good, "site.toml"));
  auto error_for = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    const auto at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    text.replace(at, from.size(), to);
    try {
      otpgate::gateway::parse_config(text, "site.toml");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(error_for("https://kme:443", "http://kme:443"),
            "site.toml: kme.url = \"http://kme:443\": expected an https:// URL (ETSI GS QKD 014 "
            "requires TLS)");
  EXPECT_EQ(
      error_for("local_rtp_port = 5004", "local_rtp_port = 70000"),
      "site.toml: stream[0].local_rtp_port = 70000: expected a UDP port number from 1 to 65535");
  EXPECT_EQ(error_for("sae_id = \"sae-b\"", "sae_id = \"sae-a\""),
            "site.toml: peer.sae_id = \"sae-a\": expected an SAE ID other than site.sae_id");
  EXPECT_EQ(error_for("deliver_rtp = \"127.0.0.1:7004\"", "deliver_rtp = \"nowhere\""),
            "site.toml: stream[0].deliver_rtp = \"nowhere\": expected \"host:port\"");
  // Values are quoted by the loader itself (toml++ 3.3.0's formatter overflows on these).
  EXPECT_EQ(error_for("name = \"audio\"", "name = [-9223372036854775808, nan, -inf, 1e-10]"),
            "site.toml: stream[0].name = [-9223372036854775808, nan, -inf, 1e-10]: expected a "
            "stream name such as \"video-1\"");
  for (const char* port : {"+7004", " 7004", "7004 ", "0x1b5c", "070040"}) {
    EXPECT_EQ(error_for("deliver_rtp = \"127.0.0.1:7004\"",
                        std::string("deliver_rtp = \"127.0.0.1:") + port + "\""),
              std::string("site.toml: stream[0].deliver_rtp = \"127.0.0.1:") + port +
                  "\": expected \"host:port\" with a port from 1 to 65535")
        << port;
  }
  EXPECT_NE(error_for("/sae-a.key", "/missing.key").find("kme.tls_key"), std::string::npos);
  // Unknown sections and keys are errors (a typo must not silently keep the default), with
  // the closest known name when one is near.
  EXPECT_EQ(error_for("[peer]", "[pear]"),
            "site.toml: unknown section [pear]; did you mean \"peer\"? (remove it, or fix its "
            "name)");
  EXPECT_EQ(error_for("[[stream]]", "[polcy]\non_key_exhausted = \"block\"\n[[stream]]"),
            "site.toml: unknown section [polcy]; did you mean \"policy\"? (remove it, or fix its "
            "name)");
  EXPECT_EQ(error_for("[[stream]]", "[policy]\non_key_exhuasted = \"block\"\n[[stream]]"),
            "site.toml: unknown key policy.on_key_exhuasted; did you mean \"on_key_exhausted\"? "
            "(remove it, or fix its name)");
  EXPECT_EQ(error_for("local_rtp_port = 5004", "local_rtp_port = 5004\nbitrate = 9000"),
            "site.toml: unknown key stream[0].bitrate (remove it, or fix its name)");
  // Config values are values, never pipeline text.
  EXPECT_EQ(error_for("address = \"10.0.0.2\"", "address = \"127.0.0.1 ! fakesink\""),
            "site.toml: peer.address = \"127.0.0.1 ! fakesink\": expected the remote gateway's IP "
            "address or host name");
  EXPECT_EQ(error_for("deliver_rtp = \"127.0.0.1:7004\"", "deliver_rtp = \"a b:7004\""),
            "site.toml: stream[0].deliver_rtp = \"a b:7004\": expected \"host:port\" with an IP "
            "address or host name");
  // A stream's name becomes its journal's file name: nothing that could leave state_dir.
  EXPECT_EQ(error_for("name = \"audio\"", "name = \"../../../tmp/x\""),
            "site.toml: stream[0].name = \"../../../tmp/x\": expected 1 to 64 letters, digits, "
            "'.', '_' or '-' (it names the stream's journal file)");
  EXPECT_NE(error_for("name = \"audio\"", "name = \"..\"").find("stream[0].name"),
            std::string::npos);
  // A section of otp-transfer's is allowed: one file may serve both daemons.
  EXPECT_EQ(error_for("[[stream]]", "[transfer]\nincoming_dir = \"/srv/in\"\n[[stream]]"),
            "no error");
  EXPECT_NE(error_for("name = \"audio\"", "name = \"audio\"\n[bad").find("not valid TOML"),
            std::string::npos);
  EXPECT_EQ(error_for("[[stream]]", "[media]\nrealtime_priority = 120\n[[stream]]"),
            "site.toml: media.realtime_priority = 120: expected 0 (time-sharing) or a SCHED_FIFO "
            "priority from 1 to 99");
  EXPECT_EQ(otpgate::gateway::parse_config(
                std::string(good).replace(good.find("[[stream]]"), 10,
                                          "[media]\nrealtime_priority = 20\n[[stream]]"),
                "site.toml")
                .realtime_priority,
            20);
  EXPECT_EQ(error_for("[[stream]]", "[media]\ncpu_wakeup_latency_us = -1\n[[stream]]"),
            "site.toml: media.cpu_wakeup_latency_us = -1: expected microseconds from 0 (CPUs "
            "never sleep) to 1000000");
  EXPECT_FALSE(otpgate::gateway::parse_config(good, "site.toml").cpu_wakeup_latency_us);
  EXPECT_EQ(error_for("[[stream]]", "[media]\npin_threads = \"yes\"\n[[stream]]"),
            "site.toml: media.pin_threads = 'yes': expected true or false");
  EXPECT_TRUE(otpgate::gateway::parse_config(good, "site.toml").pin_media_threads);
  EXPECT_EQ(error_for("[[stream]]", "[media]\nbatch_window_us = 50000\n[[stream]]"),
            "site.toml: media.batch_window_us = 50000: expected microseconds from 0 (off) to "
            "20000");
  EXPECT_EQ(otpgate::gateway::parse_config(good, "site.toml").media_batch_window_us, 0u);
  EXPECT_EQ(error_for("listen_port = 6004", "listen_port = 5004"),
            "site.toml: stream[0].*_port = 5004: expected a local port no other stream or "
            "direction uses");
}

TEST(GatewayCli, CheckConfigExitsNonZeroWithOneReadableLine) {
  const fs::path bad =
      fs::temp_directory_path() / ("otpgate-bad-" + std::to_string(::getpid()) + ".toml");
  std::ofstream(bad) << "[site]\nname = 3\n";
  const std::string command =
      std::string(OTPGATE_GATEWAY_BIN) + " --check-config --config " + bad.string() + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  char line[512] = {};
  std::string output;
  while (std::fgets(line, sizeof line, pipe)) output += line;
  const int status = ::pclose(pipe);
  fs::remove(bad);
  EXPECT_EQ(WEXITSTATUS(status), 2);
  EXPECT_EQ(output, "otp-gateway: " + bad.string() +
                        ": site.name = 3: expected a site name such as \"hospital-a\"\n");
}

namespace {

// A UDP hop that loses, duplicates and reorders packets, with one burst outage.
class ImpairedLink {
 public:
  ImpairedLink(std::uint16_t listen, std::uint16_t forward) : in_(listen), forward_(forward) {
    thread_ = std::thread([this] { run(); });
  }
  ~ImpairedLink() {
    stop_ = true;
    thread_.join();
  }
  std::set<std::uint16_t> delivered_rtp_seqs() {
    std::lock_guard lock(mutex_);
    return seqs_;
  }

 private:
  void forward(const Bytes& p) {
    out_.send_to(forward_, p);
    if ((p[0] >> 6) == 2 && p[1] < 192) {  // an RTP packet (announcements start with 'O')
      std::lock_guard lock(mutex_);
      seqs_.insert(static_cast<std::uint16_t>(p[2] << 8 | p[3]));
    }
  }
  void run() {
    std::mt19937 rng(5);
    std::vector<Bytes> held;
    int n = 0;
    while (!stop_) {
      auto p = in_.receive(10);
      if (!p) {
        for (auto& h : held) forward(h);
        held.clear();
        continue;
      }
      ++n;
      if (n >= 200 && n < 230) continue;  // burst outage
      if (rng() % 10 == 0) continue;      // 10% loss
      if (rng() % 20 == 0) forward(*p);   // duplicate
      held.push_back(*p);
      if (held.size() == 4) {  // reorder within groups of four
        std::shuffle(held.begin(), held.end(), rng);
        for (auto& h : held) forward(h);
        held.clear();
      }
    }
  }
  UdpSocket in_, out_;
  std::uint16_t forward_;
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::set<std::uint16_t> seqs_;
  std::thread thread_;
};

std::uint16_t seq_of(const Bytes& p) {
  return static_cast<std::uint16_t>(p[2] << 8 | p[3]);
}

}  // namespace

TEST_F(GatewayTest, AnImpairedLinkLosesOnlyWhatTheNetworkLost) {
  const std::uint16_t relay = static_cast<std::uint16_t>(base_ + 19);
  start([&](std::string& a, std::string&) {
    // Stream 0 of site A goes through the impaired hop instead of straight to B.
    const std::string direct = "peer_port = " + std::to_string(base_ + 15);
    a.replace(a.find(direct), direct.size(), "peer_port = " + std::to_string(relay));
  });
  ImpairedLink link(relay, static_cast<std::uint16_t>(base_ + 15));
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 600, sent);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const auto forwarded = link.delivered_rtp_seqs();
  std::set<std::uint16_t> got;
  std::map<std::uint16_t, Bytes> by_seq;
  for (const auto& p : sent[0]) by_seq[seq_of(p)] = p;
  for (const auto& p : received[0]) {
    EXPECT_TRUE(got.insert(seq_of(p)).second) << "delivered twice: " << seq_of(p);
    EXPECT_EQ(p, by_seq[seq_of(p)]);
  }
  EXPECT_LT(forwarded.size(), 560u) << "the link did lose packets";
  EXPECT_EQ(got, forwarded) << "every packet the network delivered, and only those";
  const auto b = get_json(b_->status_port(), "/api/v1/status");
  EXPECT_EQ(b["streams"][0]["receive"]["auth-failures"], 0);
}

TEST_F(GatewayTest, AKmeOutageMidCallIsSurvivedWithoutARestart) {
  start([&](std::string& a, std::string& b) {
    a += "[keys]\nring_bytes = 262144\n";  // small: an outage shows within the test
    b += "[keys]\nring_bytes = 262144\n";
  });
  std::map<int, std::vector<Bytes>> sent;
  auto before = exchange(true, 50, sent);
  EXPECT_EQ(before[0].size(), 50u);
  const int port = sim_->port();
  sim_->stop();  // the KME dies mid-call
  sent.clear();
  exchange(true, 800, sent);  // ~900 KB of video: more than its ring holds
  const auto during = get_json(a_->status_port(), "/api/v1/status");
  EXPECT_FALSE(during["kme"]["healthy"].get<bool>());
  EXPECT_GT(during["streams"][1]["key_supply"]["send"]["kme_errors"].get<int>(), 0);
  EXPECT_GT(during["streams"][1]["send"]["drops-no-key"].get<int>(), 0)
      << "dropped, never sent in the clear";

  auto config = otpgate::testing::simulator_config();
  config.port = port;
  sim_ = std::make_unique<otpgate::kmesim::KmeSimulator>(config);
  sim_->start();  // ... and comes back
  ASSERT_TRUE(otpgate::testing::eventually(
      [&] { return get_json(a_->status_port(), "/api/v1/status")["kme"]["healthy"].get<bool>(); }));
  sent.clear();
  exchange(true, 100, sent);  // the first packets may meet keys still on their way
  sent.clear();
  auto after = exchange(true, 100, sent);
  EXPECT_EQ(after[0], sent[0]) << "media flows again without a restart";
  EXPECT_EQ(after[1], sent[1]);
}

TEST_F(GatewayTest, AesFallbackCarriesMediaWhenTheKeyRateIsTooLow) {
  auto kme = otpgate::testing::simulator_config();
  kme.start_full = false;
  kme.key_rate_bps = 400000;  // 50 KB/s of key, far below the media rate
  start(
      [&](std::string& a, std::string& b) {
        for (std::string* t : {&a, &b})
          *t += "[keys]\nring_bytes = 65536\n[policy]\non_key_exhausted = \"fallback-aes\"\n";
      },
      kme);
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 400, sent);
  EXPECT_EQ(received[1], sent[1]) << "every video packet arrived";
  const auto a = get_json(a_->status_port(), "/api/v1/status");
  EXPECT_GT(a["streams"][1]["send"]["aes-packets"].get<int>(), 0);
  EXPECT_EQ(a["streams"][1]["send"]["drops-no-key"].get<int>(), 0);
  const auto b = get_json(b_->status_port(), "/api/v1/status");
  EXPECT_GT(b["streams"][1]["receive"]["aes-packets"].get<int>(), 0);
}

// A site that allows AES nowhere (policy.cipher = otp, no fallback-aes) refuses a partner
// that sends its streams in AES: nothing reaches the conference system, every packet is
// counted in drops-cipher, and the other way (one-time pad) carries on.
TEST_F(GatewayTest, ASiteThatAllowsNoAesRefusesAPartnerSendingAes) {
  start({}, otpgate::testing::simulator_config(),
        [](otpgate::gateway::GatewayConfig& a, otpgate::gateway::GatewayConfig&) {
          a.cipher = "aes-256-gcm";
        });
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 100, sent);
  EXPECT_TRUE(received[0].empty() && received[1].empty()) << "AES packets reached site B";
  const auto a = get_json(a_->status_port(), "/api/v1/status");
  const auto b = get_json(b_->status_port(), "/api/v1/status");
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(a["streams"][s]["send"]["aes-packets"].get<int>(), 100);
    EXPECT_EQ(b["streams"][s]["receive"]["drops-cipher"].get<int>(), 100) << "stream " << s;
    EXPECT_EQ(b["streams"][s]["receive"]["auth-failures"].get<int>(), 0);
  }
  sent.clear();
  received = exchange(false, 100, sent);  // B -> A: one-time pad, which A accepts
  EXPECT_EQ(received[0], sent[0]);
  EXPECT_EQ(received[1], sent[1]);
}

TEST_F(GatewayTest, IceConnectsTheGatewaysAndMediaFlowsBothWays) {
  start([&](std::string& a, std::string& b) {
    const std::string sa = std::to_string(base_ + 17), sb = std::to_string(base_ + 18);
    for (auto [text, listen, peer] : {std::tuple{&a, sa, sb}, std::tuple{&b, sb, sa}}) {
      text->replace(text->find("address = \"127.0.0.1\""), 21,
                    "address = \"127.0.0.1\"\ntransport = \"ice\"");
      *text += "[ice]\nsignalling_listen = \"127.0.0.1:" + listen +
               "\"\npeer_signalling = \"127.0.0.1:" + peer + "\"\n";
    }
  });
  for (bool from_a : {true, false}) {
    std::map<int, std::vector<Bytes>> sent;
    // Warm-up: over ICE the receiving socket has the kernel's default buffer, which
    // overflows while the first keys of a call are being fetched.
    exchange(from_a, 30, sent);
    sent.clear();
    auto received = exchange(from_a, 200, sent);
    for (int s = 0; s < 2; ++s) {
      EXPECT_EQ(received[s].size(), sent[s].size())
          << (from_a ? "A->B" : "B->A") << " stream " << s;
      EXPECT_EQ(received[s], sent[s]) << (from_a ? "A->B" : "B->A") << " stream " << s;
    }
  }
  EXPECT_GE(sim_->stats().keys_to_slaves, 2u) << "the ICE descriptions were sealed with QKD keys";
}

namespace {

// Forwards datagrams from `listen` to `to`; every announcement is preceded by an altered
// copy (another key_length, base or mask offset, in turn), as an attacker on the path
// would race it. Counts what it forged.
class ForgingProxy {
 public:
  ForgingProxy(std::uint16_t listen, std::uint16_t to)
      : hop_(listen, [this, to](const Bytes& d, const UdpHop& hop) {
          if (d.size() > 30 && std::equal(d.begin(), d.begin() + 4, "OTPA")) {
            Bytes copy = d;
            switch (forged_++ % 3) {
              case 0:
                copy[27] ^= 0x04;  // key_length
                break;
              case 1:
                copy[20] ^= 0x10;  // base
                break;
              default:
                copy[13] ^= 0x40;  // mask offset
            }
            hop.send(to, copy);
          }
          hop.send(to, d);
        }) {}
  int forged() const { return forged_; }

 private:
  std::atomic<int> forged_{0};
  UdpHop hop_;  // last: its thread uses forged_
};

}  // namespace

TEST_F(GatewayTest, ForgedAnnouncementsRacingGenuineOnesAndABlindFloodChangeNothing) {
  // A's media goes to B through a proxy that races an altered copy ahead of every
  // announcement; meanwhile ~1000 blind forgeries a second (announcements with random
  // key_IDs and fields, packets at random pad offsets) arrive at B's ports.
  const std::uint16_t proxy = static_cast<std::uint16_t>(base_port() + 1000 % 20);
  start([&](std::string& a, std::string&) {
    for (int s = 0; s < 2; ++s) {
      const std::string from = "peer_port = " + std::to_string(base_ + 15 + s);
      a.replace(a.find(from), from.size(), "peer_port = " + std::to_string(proxy + s));
    }
  });
  std::vector<std::unique_ptr<ForgingProxy>> proxies;
  for (int s = 0; s < 2; ++s) {
    proxies.push_back(std::make_unique<ForgingProxy>(static_cast<std::uint16_t>(proxy + s),
                                                     static_cast<std::uint16_t>(base_ + 15 + s)));
  }
  std::atomic<bool> flooding{true};
  std::thread flood([&] {
    UdpSocket attacker;
    std::mt19937_64 rng(42);
    while (flooding) {
      for (int s = 0; s < 2; ++s) {
        Bytes announcement{'O', 'T', 'P', 'A', 0, 0, 0, 0x76};  // one key_ID
        for (int i = 0; i < 22 + 16 + 16; ++i)
          announcement.push_back(static_cast<std::uint8_t>(rng()));
        announcement[28] = 0;
        announcement[29] = 1;  // count
        attacker.send_to(static_cast<std::uint16_t>(base_ + 15 + s), announcement);
        Bytes packet = rtp(1, 0xa0 + s, 96, 200);
        for (int i = 0; i < 24; ++i) packet.push_back(static_cast<std::uint8_t>(rng()));
        attacker.send_to(static_cast<std::uint16_t>(base_ + 15 + s), packet);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(4));
    }
  });
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 300, sent);
  flooding = false;
  flood.join();
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(received[s].size(), sent[s].size()) << "stream " << s;
    EXPECT_TRUE(received[s] == sent[s]) << "stream " << s << ": not every genuine packet, once";
  }
  EXPECT_GT(proxies[0]->forged() + proxies[1]->forged(), 0);
  const auto b = get_json(b_->status_port(), "/api/v1/status");
  for (int s = 0; s < 2; ++s) {
    const auto& k = b["streams"][s]["key_supply"]["receive"];
    EXPECT_EQ(k["keys_lost"].get<int>(), 0) << "a forgery made B fetch and lose a genuine key";
    EXPECT_GT(b["streams"][s]["receive"]["drops-no-key"].get<int>() +
                  b["streams"][s]["receive"]["auth-failures"].get<int>(),
              0)
        << "the forgeries were counted";
  }
}

// A gateway restarted while its partner runs on: its new receivers know none of the
// partner's announcements, and its journal refuses the pad its old process fetched. The
// partner learns of the restart from the restarted gateway's own sending streams (a pad
// stream resuming, after a gap, at a self-verifying announcement) and restarts its sending
// lane of that stream at pad never announced, so the new receiver follows within a second
// or so (a loaded machine: up to the third round). Before, it dropped everything until
// the partner's sender had used up the pad announced to the old process (38 s of sending,
// measured; never within six rounds here).
class GatewayRestartTest : public GatewayTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(GatewayRestartTest, AGatewayRestartedWhileItsPartnerRunsOnReceivesWithinSeconds) {
  // The cipher: otp, or aes-256-gcm (whose master keys, drawn from pad the restarted
  // side's old process fetched, are dropped with the lane restart: "rekey").
  const std::string policy = std::string("[policy]\ncipher = \"") + GetParam() + "\"\n";
  start([&](std::string& a, std::string& b) {
    a += policy;
    b += policy;
  });
  constexpr auto kGap = std::chrono::milliseconds(20);
  // Both ways for 3 s each, past a periodic resync (every 2 s: a self-verifying
  // announcement beyond a gap below one epoch), which must not read as a restart.
  for (const bool from_a : {true, false}) {
    std::map<int, std::vector<Bytes>> sent;
    const auto got = exchange(from_a, 150, sent, kGap);
    for (int s = 0; s < 2; ++s) ASSERT_TRUE(got.count(s) && got.at(s) == sent[s]);
  }
  auto restarts_seen = [](otpgate::gateway::Gateway& g) {
    std::vector<std::uint64_t> seen;
    const auto status = get_json(g.status_port(), "/api/v1/status");
    for (const auto& stream : status["streams"])
      seen.push_back(stream["receive"]["sender-restarts"].get<std::uint64_t>());
    return seen;
  };
  EXPECT_EQ(restarts_seen(*a_), (std::vector<std::uint64_t>{0, 0}));
  EXPECT_EQ(restarts_seen(*b_), (std::vector<std::uint64_t>{0, 0}));
  b_.reset();
  b_ = std::make_unique<otpgate::gateway::Gateway>(otpgate::gateway::parse_config(
      site_config("sae-b", "sae-a", sim_->url(), dir_.path / "b", base_, false) + policy,
      "site-b.toml"));
  b_->start();
  // Both rooms talk again, in rounds of a second each way.
  int complete_from = -1;
  for (int round = 0; round < 6 && complete_from < 0; ++round) {
    std::map<int, std::vector<Bytes>> from_b, from_a;
    exchange(false, 50, from_b, kGap);
    const auto got = exchange(true, 50, from_a, kGap);
    bool complete = true;
    for (int s = 0; s < 2; ++s) complete = complete && got.count(s) && got.at(s) == from_a[s];
    if (complete) complete_from = round;
  }
  EXPECT_GE(complete_from, 0) << "B's receivers never followed A's streams";
  EXPECT_LE(complete_from, 2) << "B's receivers followed A's streams only in round "
                              << complete_from;
  EXPECT_EQ(restarts_seen(*a_), (std::vector<std::uint64_t>{1, 1}));
  EXPECT_EQ(restarts_seen(*b_), (std::vector<std::uint64_t>{0, 0})) << "A's lane restart "
                                                                       "read as a restart";
}

INSTANTIATE_TEST_SUITE_P(Ciphers, GatewayRestartTest, ::testing::Values("otp", "aes-256-gcm"));

TEST_F(GatewayTest, AKmeRestartedEmptyMidCallLosesOnlyWhatItsOutageCost) {
  start();
  std::map<int, std::vector<Bytes>> sent;
  auto received = exchange(true, 100, sent);
  ASSERT_EQ(received[1].size(), 100u);
  // The KME dies (every key it held for the slave is gone) and comes back empty-ish on
  // the same port two seconds later; the call goes on meanwhile.
  const int port = sim_->port();
  sim_.reset();
  sent.clear();
  exchange(true, 100, sent);  // during the outage: whatever arrives, arrives
  std::this_thread::sleep_for(std::chrono::seconds(2));
  auto kme = otpgate::testing::simulator_config();
  kme.port = port;
  sim_ = std::make_unique<otpgate::kmesim::KmeSimulator>(kme);
  sim_->start();
  // Delivery resumes: within a few rounds every packet of a round arrives again.
  bool resumed = false;
  for (int round = 0; round < 6 && !resumed; ++round) {
    sent.clear();
    received = exchange(true, 50, sent);
    resumed = received[0] == sent[0] && received[1] == sent[1];
  }
  EXPECT_TRUE(resumed) << "media never came back after the KME restart";
  // Media may resume on key the receiver fetched before the outage, before the sender's
  // next status poll (every 500 ms with a full ring) sees the KME answer again.
  EXPECT_TRUE(otpgate::testing::eventually([&] {
    const auto a = get_json(a_->status_port(), "/api/v1/status");
    return a["streams"][1]["key_supply"]["send"]["kme_outages"].get<int>() >= 1;
  })) << "the sender did not notice the outage and flush the key it issued before";
}

TEST_F(GatewayTest, TwoStreamsShareOneKeySupplyPerDirectionOnAKmeWithEveryQuirk) {
  // A third-party KME pair's ways: a second enc_keys for a pair before the slave fetched the
  // first batch replaces it, keys capped at 1024 bits and 128 per request, HTML errors,
  // stored_key_count counting the pair's pending keys. Audio and video of one SAE pair
  // share a supply (a lane each), so neither stream's batch replaces the other's.
  auto kme = otpgate::testing::simulator_config();
  kme.max_key_size = 1024;
  kme.max_keys_per_request = 128;
  kme.faults.replace_unfetched_batch = true;
  kme.faults.cap_instead_of_refuse = true;
  kme.faults.error_style = otpgate::kmesim::ErrorStyle::html;
  kme.faults.stored_count_of_pair = true;
  // Such a KME holds one batch at a time (here 128 keys of 1024 bits, 16 KiB): the next
  // waits until the partner has fetched it, so a stream gets a batch per few KME round
  // trips, which on a loaded machine is less than this video's 275 kB/s, and with
  // on_key_exhausted = "drop" the sender dropped what found no key (up to 39 of 150
  // packets, counted as drops-no-key at the sender). What is tested here is that no key
  // is replaced or lost and every packet arrives, not the rate such a KME allows: the
  // senders wait for key ("block") rather than drop.
  const std::string block = "[policy]\non_key_exhausted = \"block\"\n";
  start(
      [&](std::string& a, std::string& b) {
        a += block;
        b += block;
      },
      kme);
  for (const bool from_a : {true, false}) {
    std::map<int, std::vector<Bytes>> sent;
    const auto received = exchange(from_a, 150, sent, std::chrono::milliseconds(4));
    for (int s = 0; s < 2; ++s) {
      const auto got = received.count(s) ? received.at(s) : std::vector<Bytes>{};
      const auto& sender = from_a ? *a_ : *b_;
      const auto& receiver = from_a ? *b_ : *a_;
      EXPECT_TRUE(got == sent[s])
          << (from_a ? "a to b" : "b to a") << ", stream " << s << ": " << got.size() << " of "
          << sent[s].size() << " arrived; sender's counters: "
          << get_json(sender.status_port(), "/api/v1/status")["streams"][s]["send"].dump()
          << "; receiver's: "
          << get_json(receiver.status_port(), "/api/v1/status")["streams"][s]["receive"].dump();
    }
  }
  EXPECT_EQ(sim_->stats().keys_replaced, 0u) << "one stream's batch replaced another's";
  const auto a = get_json(a_->status_port(), "/api/v1/status");
  for (int s = 0; s < 2; ++s) {
    const auto& k = a["streams"][s]["key_supply"];
    EXPECT_TRUE(k["send"]["kme_replaces_batches"].get<bool>()) << "stream " << s;
    EXPECT_GT(k["send"]["bytes_consumed"].get<std::uint64_t>(), 0u) << "stream " << s;
    EXPECT_EQ(k["receive"]["keys_lost"].get<std::uint64_t>(), 0u) << "stream " << s;
  }
  // Two lanes, two journals: each stream keeps its own pad stream across restarts.
  EXPECT_TRUE(fs::exists(dir_.path / "a" / "sae-a-to-sae-b-audio-1.journal"));
  EXPECT_TRUE(fs::exists(dir_.path / "a" / "sae-a-to-sae-b-video-1.journal"));
  // What stopping costs, per direction: the sender's ring, and what the receiver fetched
  // ahead of use (wiped with its pad windows).
  a_->stop();
  const auto wiped = a_->key_wiped_at_stop();
  EXPECT_GT(wiped.send_bytes, 0u);
  EXPECT_GT(wiped.receive_bytes, 0u);
  EXPECT_LT(wiped.receive_bytes, 8u << 20);
}

namespace {
// Every key the simulator served, as 16-byte windows every 8 bytes (raw, and hex), and as
// 16-character windows of its base64 text every 4 characters: any leak of 24 or more
// contiguous key bytes, raw, in hex or base64 (as ETSI 014 carries it), contains one.
struct KeyWindows {
  std::unordered_set<std::string> raw, hex, base64;
  explicit KeyWindows(const std::vector<std::string>& served) {
    static const char* digits = "0123456789abcdef";
    for (const auto& text : served) {
      std::string key(text.size(), '\0');
      const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(key.data()),
                                    reinterpret_cast<const unsigned char*>(text.data()),
                                    static_cast<int>(text.size()));
      key.resize(static_cast<std::size_t>(n) - std::count(text.begin(), text.end(), '='));
      for (std::size_t i = 0; i + 16 <= key.size(); i += 8) {
        raw.insert(key.substr(i, 16));
        std::string h;
        for (std::size_t j = i; j < i + 16; ++j) {
          h += digits[static_cast<unsigned char>(key[j]) >> 4];
          h += digits[static_cast<unsigned char>(key[j]) & 15];
        }
        hex.insert(h);
      }
      for (std::size_t i = 0; i + 16 <= text.size(); i += 4) base64.insert(text.substr(i, 16));
    }
  }
  // Where in `haystack` key material appears, if anywhere ("" when nowhere).
  std::string find_in(const std::string& haystack) const {
    std::string lower = haystack;
    std::transform(lower.begin(), lower.end(), lower.begin(), ::tolower);
    for (std::size_t i = 0; i + 16 <= haystack.size(); ++i) {
      if (raw.contains(haystack.substr(i, 16))) return "raw key bytes at " + std::to_string(i);
      if (base64.contains(haystack.substr(i, 16))) return "base64 key text at " + std::to_string(i);
      if (i + 32 <= lower.size() && hex.contains(lower.substr(i, 32)))
        return "hex key bytes at " + std::to_string(i);
    }
    return "";
  }
};

std::string file_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
}  // namespace

TEST_F(GatewayTest, KeyMaterialAppearsInNoLogStatusMetricsOrJournal) {
  // Everything a gateway writes while it runs, with every GStreamer debug category at
  // LOG level (GST_DEBUG=*:6), is searched for the keys the KME served.
  auto kme = otpgate::testing::simulator_config();
  kme.record_served_keys = true;
  const fs::path log_file = dir_.path / "stderr.log";
  fflush(stderr);
  const int saved_stderr = ::dup(2);
  const int log_fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  ::dup2(log_fd, 2);
  gst_debug_set_active(TRUE);
  gst_debug_set_threshold_from_string("*:6", TRUE);
  std::string status_text, metrics_text;
  {
    start({}, kme);
    std::map<int, std::vector<Bytes>> sent;
    const auto received = exchange(true, 40, sent, std::chrono::milliseconds(2));
    EXPECT_EQ(received.count(0) ? received.at(0).size() : 0u, 40u);
    status_text = a_->status_json() + b_->status_json();
    metrics_text = a_->metrics_text() + b_->metrics_text();
    const auto a = nlohmann::json::parse(a_->status_json());
    for (const auto& s : a["streams"]) {
      for (const char* direction : {"send", "receive"}) {
        if (!s["key_supply"][direction].is_null()) {
          EXPECT_TRUE(s["key_supply"][direction]["memory_locked"].get<bool>())
              << "key memory not locked (" << direction << "): it may be swapped to disk";
        }
      }
    }
    a_.reset();
    b_.reset();
  }
  gst_debug_set_threshold_from_string("*:1", TRUE);
  fflush(stderr);
  ::dup2(saved_stderr, 2);
  ::close(saved_stderr);
  ::close(log_fd);
  const KeyWindows keys(sim_->served_keys());
  ASSERT_GT(keys.raw.size(), 1000u) << "the simulator served too little key to search for";
  const std::string log = file_text(log_file);
  EXPECT_GT(log.size(), 100000u) << "the debug log is suspiciously short";
  EXPECT_EQ(keys.find_in(log), "") << "key material in the log";
  EXPECT_EQ(keys.find_in(status_text), "") << "key material in the status API";
  EXPECT_EQ(keys.find_in(metrics_text), "") << "key material in /metrics";
  for (const auto& e : fs::recursive_directory_iterator(dir_.path)) {
    if (!e.is_regular_file() || e.path() == log_file) continue;
    EXPECT_EQ(keys.find_in(file_text(e.path())), "") << "key material in " << e.path();
  }
}

// Test processes that ctest runs side by side claim their port blocks (PortClaims): a
// block another process holds is not taken, neither by the C++ fixture nor by the Python
// script tests (tests/support/script_support.py), however free its ports look; a process
// takes its own claim again. Ports 9000-9919: no test uses them.
TEST(GatewayFixture, APortBlockAnotherTestProcessClaimedIsNotTaken) {
  // A block of its own each time the test runs in this process (--gtest_repeat): a child
  // inherits the claims its parent holds.
  static int run = 0;
  const int block = 9000 + 200 * (run++ % 4);
  int ready[2], done[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(done), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Another test process: claims the block, says so, and holds it until told (or until
    // the parent is gone: its end of the pipe closes).
    ::close(ready[0]);
    ::close(done[1]);
    const char claimed = PortClaims::of_this_process().claim(block, 120) ? 'y' : 'n';
    (void)!::write(ready[1], &claimed, 1);
    char go = 0;
    (void)!::read(done[0], &go, 1);
    ::_exit(0);
  }
  ::close(ready[1]);
  ::close(done[0]);
  char claimed = 0;
  const bool told = ::read(ready[0], &claimed, 1) == 1;
  ::close(ready[0]);
  EXPECT_TRUE(told);
  EXPECT_EQ(claimed, 'y');
  if (told) {
    EXPECT_FALSE(PortClaims::of_this_process().claim(block, 120));
    EXPECT_FALSE(PortClaims::of_this_process().claim(block + 110, 10));  // any ten of it
  }
  const std::string python =
      "python3 -c 'import sys; sys.path.insert(0, \"" + std::string(OTPGATE_SOURCE_DIR) +
      "/tests/support\"); import script_support; sys.exit(0 if script_support.claim_ports(" +
      std::to_string(block + 55) + ") else 3)'";
  EXPECT_EQ(WEXITSTATUS(std::system(python.c_str())), 3) << "the Python tests took it";
  EXPECT_TRUE(PortClaims::of_this_process().claim(block + 120, 10)) << "the next ten is free";
  ::close(done[1]);  // the child's read returns: it exits
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  // Released when its holder exits: now this process takes it, and keeps it.
  EXPECT_TRUE(PortClaims::of_this_process().claim(block, 120));
  EXPECT_TRUE(PortClaims::of_this_process().claim(block, 120));
  EXPECT_EQ(WEXITSTATUS(std::system(python.c_str())), 3);
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// The two-gateway fixture the gateway tests share: qkd-kme-sim and two otp-gateways on
// loopback (site A and site B, audio and video streams), a conference system's UDP
// sockets, RTP packets, and a status API reader.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <gst/gst.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "otpgate/gateway.hpp"
#include "test_pki.hpp"

namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;
using otpgate::gateway::ConfigError;

namespace otpgate::gateway_testing {

class UdpSocket {
 public:
  explicit UdpSocket(std::uint16_t port = 0) : fd_(::socket(AF_INET, SOCK_DGRAM, 0)) {
    int size = 8 << 20;
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      throw std::runtime_error("bind failed");
  }
  ~UdpSocket() { ::close(fd_); }
  void send_to(std::uint16_t port, const Bytes& data) const {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::sendto(fd_, data.data(), data.size(), 0, reinterpret_cast<sockaddr*>(&a), sizeof a);
  }
  // The next datagram within `timeout_ms`; `from_port` (if given) gets its source port.
  std::optional<Bytes> receive(int timeout_ms, std::uint16_t* from_port = nullptr) const {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return std::nullopt;
    Bytes b(65536);
    sockaddr_in from{};
    socklen_t from_size = sizeof from;
    const ssize_t n =
        ::recvfrom(fd_, b.data(), b.size(), 0, reinterpret_cast<sockaddr*>(&from), &from_size);
    if (n < 0) return std::nullopt;
    if (from_port) *from_port = ntohs(from.sin_port);
    b.resize(static_cast<std::size_t>(n));
    return b;
  }

 private:
  int fd_;
};

// A hop on loopback between two test parties: each datagram that arrives on `listen` is
// handed to `on_datagram` on the hop's own thread, which forwards what it wants with send()
// (a recorder, a tap, an attacker on the path).
class UdpHop {
 public:
  using Handler = std::function<void(const Bytes& datagram, const UdpHop& hop)>;
  UdpHop(std::uint16_t listen, Handler on_datagram)
      : in_(listen), on_datagram_(std::move(on_datagram)), thread_([this] { run(); }) {}
  ~UdpHop() {
    stop_ = true;
    thread_.join();
  }
  UdpHop(const UdpHop&) = delete;
  UdpHop& operator=(const UdpHop&) = delete;
  void send(std::uint16_t port, const Bytes& datagram) const { out_.send_to(port, datagram); }

 private:
  void run() {
    while (!stop_) {
      if (auto d = in_.receive(50)) on_datagram_(*d, *this);
    }
  }
  UdpSocket in_, out_;
  Handler on_datagram_;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: it starts once the rest exists
};

inline Bytes rtp(std::uint16_t seq, std::uint32_t ssrc, std::uint8_t pt, std::size_t payload) {
  Bytes p{0x80, pt, static_cast<std::uint8_t>(seq >> 8), static_cast<std::uint8_t>(seq), 0, 0,
          0,    0};
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<std::uint8_t>(ssrc >> (24 - 8 * i)));
  for (std::size_t i = 0; i < payload; ++i)
    p.push_back(static_cast<std::uint8_t>(seq * 13 + i + pt));
  return p;
}

// Whether every UDP port in [first, first + count) can be bound right now.
inline bool udp_ports_free(int first, int count) {
  bool free = true;
  for (int i = 0; i < count && free; ++i) {
    const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<std::uint16_t>(first + i));
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    free = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
  }
  return free;
}

// Ports a test process has claimed, in tens, against every other test process: tests
// that ctest runs side by side (and the Python script tests, tests/support/
// script_support.py, with the same files) each take an exclusive flock on
// $TMPDIR/otpgate-test-ports/udp-<first port of the ten>.lock (/tmp without TMPDIR) and
// hold it until they exit.
// Checking that ports are free is not enough: two tests can both find a block free before
// either binds it (one failed with "Address already in use" on its first port). This
// process's own claims are kept here, so that its next test may use them again.
class PortClaims {
 public:
  static PortClaims& of_this_process() {
    static PortClaims claims;
    return claims;
  }
  // Whether every ten of [first, first + count) is ours now (claimed before, or now).
  bool claim(int first, int count) {
    const std::lock_guard lock(mutex_);
    std::vector<int> taken;
    for (int ten = first / 10; ten <= (first + count - 1) / 10; ++ten) {
      if (held_.contains(ten)) continue;
      const fs::path dir = fs::temp_directory_path() / "otpgate-test-ports";
      std::error_code ignored;
      fs::create_directories(dir, ignored);
      fs::permissions(dir, fs::perms::all | fs::perms::sticky_bit, ignored);
      const fs::path file = dir / ("udp-" + std::to_string(ten * 10) + ".lock");
      const int fd = ::open(file.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
      if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0) {
        held_.emplace(ten, fd);
        taken.push_back(ten);
        continue;
      }
      if (fd >= 0) ::close(fd);
      for (const int t : taken) {  // all or nothing
        ::close(held_[t]);
        held_.erase(t);
      }
      return false;
    }
    return true;
  }

 private:
  std::mutex mutex_;
  std::map<int, int> held_;  // ten -> its lock file, open (and locked) until exit
};

// The first of `blocks` blocks of `size` UDP ports from `low`, tried from block `next` on
// (wrapping), claimed by this process and all free now.
inline std::uint16_t free_udp_block(int low, int size, int blocks, int& next) {
  for (int tries = 0; tries < blocks; ++tries) {
    const int first = low + (next++ % blocks) * size;
    if (PortClaims::of_this_process().claim(first, size) && udp_ports_free(first, size)) {
      return static_cast<std::uint16_t>(first);
    }
  }
  throw std::runtime_error("no free block of " + std::to_string(size) + " UDP ports in " +
                           std::to_string(low) + "-" + std::to_string(low + blocks * size));
}

// A block of 120 UDP ports for one test (it uses base+0..19 and base+100..119), below
// the kernel's ephemeral range (32768-60999) so a sending socket never takes one. Blocks
// start from the process ID, so tests that ctest runs side by side (consecutive PIDs) get
// different blocks, and a block with a port in use is skipped. (Blocks used to be 20 ports
// apart while a test used 120: two tests five PIDs apart shared ports.)
inline std::uint16_t base_port() {
  constexpr int kBlock = 120, kBlocks = (32700 - 20000) / kBlock;
  static int next = ::getpid() % kBlocks;
  return free_udp_block(20000, kBlock, kBlocks, next);
}

// A block of 160 UDP ports for a test's SIP calls (both gateways' media, the endpoints) in
// 10000-19919, starting from the test's base block and skipping one with a port in use:
// the SIP scripts that ctest runs alongside pick their ports in 12000-18999, and another
// call test's block may map to the same one.
inline std::uint16_t sip_block_port(std::uint16_t base) {
  int next = (base - 20000) / 120;
  return free_udp_block(10000, 160, 62, next);
}

inline std::string site_config(const std::string& me, const std::string& peer,
                               const std::string& kme_url, const fs::path& state,
                               std::uint16_t base, bool site_a) {
  const std::string pki = otpgate::testing::pki_dir().string();
  // Ports: base+0.. A local, base+5.. B local; A listens base+10.., B listens base+15..
  auto port = [&](int offset) { return std::to_string(base + offset); };
  const int local = site_a ? 0 : 5, listen = site_a ? 10 : 15, peer_listen = site_a ? 15 : 10;
  const int deliver = site_a ? 100 : 105;
  std::string t = "[site]\nname = \"" + me + "-site\"\nsae_id = \"" + me + "\"\nstate_dir = \"" +
                  state.string() + "\"\n[kme]\nurl = \"" + kme_url + "\"\ntls_cert = \"" + pki +
                  "/" + me + ".crt\"\ntls_key = \"" + pki + "/" + me + ".key\"\ntls_ca = \"" + pki +
                  "/ca.crt\"\n[peer]\nsae_id = \"" + peer +
                  "\"\naddress = \"127.0.0.1\"\n[status]\nlisten = \"127.0.0.1:0\"\n";
  const char* names[] = {"audio-1", "video-1"};
  for (int s = 0; s < 2; ++s) {
    t += "[[stream]]\nname = \"" + std::string(names[s]) +
         "\"\nlocal_rtp_port = " + port(local + 2 * s) +
         "\nlocal_rtcp_port = " + port(local + 2 * s + 1) +
         "\npeer_port = " + port(peer_listen + s) + "\nlisten_port = " + port(listen + s) +
         "\ndeliver_rtp = \"127.0.0.1:" + port(deliver + 2 * s) +
         "\"\ndeliver_rtcp = \"127.0.0.1:" + port(deliver + 2 * s + 1) + "\"\n";
  }
  return t;
}

class GatewayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_setenv("GST_PLUGIN_PATH", OTPGATE_PLUGIN_DIR, TRUE);
    if (!gst_is_initialized()) gst_init(nullptr, nullptr);
    base_ = base_port();
  }
  // Starts the simulator and both gateways; `tweak` may edit the two config texts.
  using ConfigAdjustment =
      std::function<void(otpgate::gateway::GatewayConfig& a, otpgate::gateway::GatewayConfig& b)>;
  void start(const std::function<void(std::string& a, std::string& b)>& tweak = {},
             otpgate::kmesim::SimulatorConfig kme = otpgate::testing::simulator_config(),
             const ConfigAdjustment& adjust = {}) {
    sim_ = std::make_unique<otpgate::kmesim::KmeSimulator>(kme);
    sim_->start();
    std::string a = site_config("sae-a", "sae-b", sim_->url(), dir_.path / "a", base_, true);
    std::string b = site_config("sae-b", "sae-a", sim_->url(), dir_.path / "b", base_, false);
    if (tweak) tweak(a, b);
    auto a_config = otpgate::gateway::parse_config(a, "site-a.toml");
    auto b_config = otpgate::gateway::parse_config(b, "site-b.toml");
    if (adjust) adjust(a_config, b_config);
    a_ = std::make_unique<otpgate::gateway::Gateway>(std::move(a_config));
    b_ = std::make_unique<otpgate::gateway::Gateway>(std::move(b_config));
    // Side by side: with ICE each start waits for the other gateway's description.
    std::exception_ptr b_failed;
    std::thread other([&] {
      try {
        b_->start();
      } catch (...) {
        b_failed = std::current_exception();
      }
    });
    std::exception_ptr a_failed;
    try {
      a_->start();
    } catch (...) {
      a_failed = std::current_exception();
    }
    other.join();
    for (auto failed : {a_failed, b_failed}) {
      if (failed) std::rethrow_exception(failed);
    }
  }
  void TearDown() override {
    a_.reset();
    b_.reset();
  }

  // The simulator answers the dec_keys it holds (SimulatorFaults::hold_dec_keys) from now
  // on: the keys reach the receiving site.
  void release_dec_keys() {
    auto faults = sim_->faults();
    faults.hold_dec_keys = false;
    sim_->set_faults(faults);
  }

  // Sends `count` packets per stream from one site's conference system; returns what
  // the other site's conference system received, per stream.
  std::map<int, std::vector<Bytes>> exchange(
      bool from_a, int count, std::map<int, std::vector<Bytes>>& sent,
      std::chrono::microseconds gap = std::chrono::microseconds(500)) {
    const int local = from_a ? 0 : 5, deliver = from_a ? 105 : 100;
    UdpSocket conference;
    std::vector<std::unique_ptr<UdpSocket>> sinks;
    for (int s = 0; s < 2; ++s)
      sinks.push_back(std::make_unique<UdpSocket>(base_ + deliver + 2 * s));
    for (int i = 0; i < count; ++i) {
      for (int s = 0; s < 2; ++s) {
        const Bytes p = rtp(static_cast<std::uint16_t>(i), from_a ? 0xa0 + s : 0xb0 + s,
                            s == 0 ? 111 : 96, s == 0 ? 160 : 1100);
        sent[s].push_back(p);
        conference.send_to(static_cast<std::uint16_t>(base_ + local + 2 * s), p);
      }
      std::this_thread::sleep_for(gap);
    }
    std::map<int, std::vector<Bytes>> received;
    for (int s = 0; s < 2; ++s) {
      while (auto p = sinks[s]->receive(3000)) {
        received[s].push_back(*p);
        if (received[s].size() == static_cast<std::size_t>(count)) break;
      }
    }
    return received;
  }

  otpgate::testing::TestDir dir_;
  std::unique_ptr<otpgate::kmesim::KmeSimulator> sim_;
  std::uint16_t base_ = 0;
  std::unique_ptr<otpgate::gateway::Gateway> a_, b_;
};

inline nlohmann::json get_json(std::uint16_t port, const char* path) {
  httplib::Client client("127.0.0.1", port);
  auto res = client.Get(path);
  if (!res || res->status != 200) return nullptr;
  return nlohmann::json::parse(res->body);
}

}  // namespace otpgate::gateway_testing

// The test files use these unqualified.
using namespace otpgate::gateway_testing;  // NOLINT(google-build-using-namespace)

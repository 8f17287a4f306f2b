// SPDX-License-Identifier: LGPL-2.1-or-later
// Calls through otp-gateway ([sip], docs/sip.md) side by side with Debian's rtpengine
// (rtpengine-daemon, userspace: --table=-1) relaying the same calls, in one run:
//
//   setup time   the ng offer+answer a proxy sends per call, one call at a time (each
//                deleted before the next; the relays take turns call by call), over
//                loopback UDP, in Kamailio 5.6's shape:
//                otpgate: the four steps of one INVITE through two sites (offer at A,
//                offer at B with A's SDP, answer at B, answer at A), also per gateway
//                (offer+answer at one site); rtpengine: offer+answer of a plain RTP call,
//                and of one it transcodes RTP/AVP (caller) <-> RTP/SAVP (callee, SDES
//                AES_CM_128_HMAC_SHA1_80).
//   media CPU    K concurrent calls, each 50 packets/s of 160-byte audio RTP both ways
//                (caller -> relay -> callee and back; for SRTP the callee really sends
//                and checks SRTP with libsrtp2), CPU seconds of each relay process
//                (/proc/PID/stat utime+stime) over a fixed interval, less its idle rate
//                measured before, per call. Every packet received is checked (SSRC,
//                sequence, payload) and delivery below --min-delivery fails the run.
//                otpgate runs side by side with rtpengine (K calls on each, CPU over the
//                same window): beside its SRTP calls, then beside its plain ones. --rounds
//                R repeats that R times and judges the median of the rounds' ratios: on a
//                shared VM the CPU one packet costs drifts by 2x within minutes, and a
//                ratio of two figures taken over the same window drifts much less.
//   transit      in the same windows, each packet's time from its sender's sendto() to
//                the receiving endpoint's recv(), p50/p99 per relay (otpgate: through
//                both gateways).
//
//   bench_sip [--quick] [--pki DIR] [--calls N] [--concurrent K] [--seconds S]
//             [--rounds R] [--rtpengine PATH] [--min-delivery F] [--batch-window-us U]
//             [--rtpengine-priority NICE]
// --batch-window-us sets the gateways' [media] batch_window_us (docs/gateway.md).
// --rtpengine-priority sets rtpengine's --priority (its media threads' nice): -10 unless
// given, as the gateways' media threads run; 0 leaves rtpengine at its default.
// Exit 77 when rtpengine is not installed (scripts/install-deps.sh installs it).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <srtp2/srtp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "otpgate/sip.hpp"

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
namespace bencode = otpgate::bencode;

namespace {

// What ends a run: caught in main, after the relays, the KME and the endpoints have been
// stopped on the way out (an exit() here once left them running).
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& why) {
  throw Failure(why);
}

// ---- processes -------------------------------------------------------------------------

// A child process, its output in `log`; SIGTERM and reaped when destroyed.
class Child {
 public:
  Child(std::vector<std::string> args, const fs::path& log) : log_(log) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    ::posix_spawn_file_actions_init(&files);
    ::posix_spawn_file_actions_addopen(&files, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::posix_spawn_file_actions_adddup2(&files, 1, 2);
    const int spawned = ::posix_spawn(&pid_, argv[0], &files, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&files);
    if (spawned != 0) fail("cannot start " + args[0] + ": " + std::strerror(spawned));
  }
  ~Child() {
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  pid_t pid() const { return pid_; }
  bool running() const { return ::waitpid(pid_, nullptr, WNOHANG) == 0; }
  std::string tail() const {
    std::ifstream in(log_);
    std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    return text.size() > 3000 ? text.substr(text.size() - 3000) : text;
  }

 private:
  fs::path log_;
  pid_t pid_ = -1;
};

// CPU seconds (user + system, all threads, ended ones included) of a process, in clock
// ticks (10 ms).
double cpu_seconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  const auto close = text.rfind(')');  // the command name may hold spaces
  if (close == std::string::npos) fail("cannot read /proc/" + std::to_string(pid) + "/stat");
  std::istringstream fields(text.substr(close + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  // Field 3 (state) is the first after the name; utime and stime are fields 14 and 15.
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  return double(utime + stime) / double(::sysconf(_SC_CLK_TCK));
}

// What a process has run so far: in all (its CPU-time clock, in nanoseconds, ended
// threads included) and per thread, with the thread's name (/proc/PID/task/TID/schedstat).
struct CpuReading {
  struct Thread {
    std::string name;
    std::uint64_t ns = 0;
    std::uint64_t sleeps = 0;  // voluntary context switches: each a wait that ended in a wake-up
    int nice = 0;
  };
  double process_s = 0;
  std::map<std::string, Thread> threads;  // by thread ID
};

CpuReading read_cpu(pid_t pid) {
  CpuReading r;
  // Another process's CPU-time clock may be read: nanoseconds, where /proc/PID/stat
  // counts 10 ms clock ticks (which left a 5 s idle rate uncertain by 2 ms/s, a few
  // percent of a call's figure once divided among the calls).
  clockid_t clock{};
  timespec t{};
  if (::clock_getcpuclockid(pid, &clock) == 0 && ::clock_gettime(clock, &t) == 0) {
    r.process_s = double(t.tv_sec) + double(t.tv_nsec) / 1e9;
  } else {
    r.process_s = cpu_seconds(pid);
  }
  const fs::path tasks = "/proc/" + std::to_string(pid) + "/task";
  std::error_code error;
  for (const auto& task : fs::directory_iterator(tasks, error)) {
    std::ifstream stat(task.path() / "schedstat"), comm(task.path() / "comm");
    CpuReading::Thread thread;
    if (!(stat >> thread.ns) || !std::getline(comm, thread.name)) continue;  // ended meanwhile
    std::ifstream status(task.path() / "status");
    bool counted = false;
    for (std::string line; std::getline(status, line);) {
      if (line.starts_with("voluntary_ctxt_switches:")) {
        thread.sleeps = std::stoull(line.substr(24));
        counted = true;
      }
    }
    // Its nice: field 19 of stat, the 17th after the name's closing parenthesis (a name
    // may hold spaces: "poller timer").
    std::ifstream fields_file(task.path() / "stat");
    std::string fields((std::istreambuf_iterator<char>(fields_file)), {});
    std::istringstream after(fields.substr(std::min(fields.size(), fields.rfind(')') + 1)));
    std::string field;
    int read = 0;
    while (read < 17 && after >> field) ++read;
    if (!counted || read < 17) continue;  // ended meanwhile
    thread.nice = std::stoi(field);
    r.threads[task.path().filename().string()] = thread;
  }
  return r;
}

double cpu_between(const CpuReading& from, const CpuReading& to) {
  return to.process_s - from.process_s;
}

std::string format_ms(double ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", ms);
  return text;
}

// CPU seconds per thread name between two readings, of the threads in both (the same
// thread: same name, its count not gone down, so a reused thread ID is not mistaken for it).
struct ThreadUse {
  double cpu_s = 0;
  std::uint64_t sleeps = 0;
  int nice = 0;  // at the second reading
};
std::map<std::string, ThreadUse> use_by_thread_name(const CpuReading& from, const CpuReading& to) {
  std::map<std::string, ThreadUse> by_name;
  for (const auto& [tid, t] : to.threads) {
    const auto was = from.threads.find(tid);
    if (was == from.threads.end() || was->second.name != t.name || t.ns < was->second.ns) continue;
    by_name[t.name].cpu_s += double(t.ns - was->second.ns) / 1e9;
    by_name[t.name].sleeps += t.sleeps - std::min(t.sleeps, was->second.sleeps);
    by_name[t.name].nice = t.nice;
  }
  return by_name;
}

// ---- UDP --------------------------------------------------------------------------------

sockaddr_in loopback(std::uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

class Udp {
 public:
  Udp() : fd_(::socket(AF_INET, SOCK_DGRAM, 0)) {
    int size = 4 << 20;
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    sockaddr_in a = loopback(0);
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      fail("cannot bind a UDP socket on 127.0.0.1");
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  ~Udp() { ::close(fd_); }
  Udp(const Udp&) = delete;
  Udp& operator=(const Udp&) = delete;
  int fd() const { return fd_; }
  std::uint16_t port() const { return port_; }
  void send_to(std::uint16_t port, const void* data, std::size_t size) const {
    const sockaddr_in a = loopback(port);
    ::sendto(fd_, data, size, 0, reinterpret_cast<const sockaddr*>(&a), sizeof a);
  }
  std::optional<std::string> receive(int timeout_ms) const {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return std::nullopt;
    std::string buffer(65536, '\0');
    const ssize_t n = ::recv(fd_, buffer.data(), buffer.size(), 0);
    if (n < 0) return std::nullopt;
    buffer.resize(static_cast<std::size_t>(n));
    return buffer;
  }

 private:
  int fd_;
  std::uint16_t port_ = 0;
};

// A port nobody listens on right now (for the ng sockets: the relays bind them at start).
std::uint16_t free_port() {
  const Udp probe;
  return probe.port();
}

// ---- ng ---------------------------------------------------------------------------------

std::string bstr(std::string_view s) {
  return std::to_string(s.size()) + ":" + std::string(s);
}

struct CallKeys {
  std::string call_id, from_tag, to_tag;
};

// An ng datagram as Kamailio 5.6.3's rtpengine module builds it (keys in the order it
// adds them): rtpengine_offer("replace-origin replace-session-connection trust-address
// ICE=remove <transport>"), rtpengine_answer("replace-origin replace-session-connection
// ICE=remove"), rtpengine_delete() (the shape tests/gateway/test_gateway_calls.cpp checks
// against a capture).
std::string kamailio(std::string_view cookie, std::string_view command, const CallKeys& k,
                     std::string_view body_sdp = {}, std::string_view transport = "RTP/AVP") {
  std::string d = std::string(cookie) + " d8:supportsl10:load limite";
  if (command == "offer" || command == "answer") {
    d += "3:sdp" + bstr(body_sdp) + "3:ICE6:remove";
    if (command == "offer") d += "5:flagsl13:trust-addresse";
    d += "7:replacel6:origin18:session-connectione";
    if (command == "offer") d += "18:transport-protocol" + bstr(transport);
  }
  d += "7:call-id" + bstr(k.call_id) + "13:received-froml3:IP49:127.0.0.1e";
  d += "8:from-tag" + bstr(k.from_tag);
  if (command != "offer" && !k.to_tag.empty()) d += "6:to-tag" + bstr(k.to_tag);
  d += "7:command" + bstr(command) + "e";
  return d;
}

// The proxy's side of ng towards one relay.
class NgClient {
 public:
  NgClient(std::string name, std::uint16_t port) : name_(std::move(name)), port_(port) {}
  // The reply to one command; fails the run on no reply or a reply that is not ok.
  bencode::Dict call(const std::string& command, const CallKeys& k, std::string_view sdp = {},
                     std::string_view transport = "RTP/AVP") {
    const std::string cookie = std::to_string(::getpid()) + "_" + std::to_string(++sequence_);
    const std::string datagram = kamailio(cookie, command, k, sdp, transport);
    return send(datagram, cookie, command);
  }
  bool ping(int timeout_ms) {
    const std::string cookie = "ping_" + std::to_string(++sequence_);
    const std::string datagram = cookie + " d7:command4:pinge";
    socket_.send_to(port_, datagram.data(), datagram.size());
    const auto reply = socket_.receive(timeout_ms);
    return reply && reply->find("pong") != std::string::npos;
  }
  static std::string text(const bencode::Dict& d, const char* key) {
    const auto it = d.find(key);
    return it != d.end() && it->second.string() ? *it->second.string() : "";
  }

 private:
  bencode::Dict send(const std::string& datagram, const std::string& cookie,
                     const std::string& command) {
    socket_.send_to(port_, datagram.data(), datagram.size());
    for (;;) {
      const auto reply = socket_.receive(5000);
      if (!reply) fail(name_ + ": no reply to " + command + " within 5 s");
      const auto parts = otpgate::ng::split_datagram(*reply);
      if (!parts || parts->cookie != cookie) continue;  // a late reply to an earlier one
      const bencode::Value value = bencode::decode(parts->body);
      if (!value.dict()) fail(name_ + ": a reply that is not a dictionary");
      if (text(*value.dict(), "result") != "ok")
        fail(name_ + ": " + command + " answered " + text(*value.dict(), "result") + ": " +
             text(*value.dict(), "error-reason"));
      return *value.dict();
    }
  }

  std::string name_;
  std::uint16_t port_;
  Udp socket_;
  std::uint64_t sequence_ = 0;
};

// ---- SDP --------------------------------------------------------------------------------

// An endpoint's SDP: Opus and telephone-event, as a softphone or room system offers audio.
std::string endpoint_sdp(std::uint16_t port, std::string_view proto = "RTP/AVP",
                         const std::string& crypto = {}) {
  std::string s = "v=0\r\no=- 4711 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n";
  s += "m=audio " + std::to_string(port) + " " + std::string(proto) + " 96 101\r\n";
  s += "a=rtpmap:96 opus/48000/2\r\na=fmtp:96 useinbandfec=1\r\n";
  s += "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n";
  if (!crypto.empty()) s += crypto;
  return s;
}

std::uint16_t media_port(const std::string& text) {
  const auto session = otpgate::sdp::parse(text);
  if (session.media.empty()) fail("an SDP without media:\n" + text);
  return session.media.front().port;
}

// ---- SRTP (the callee of a transcoded call) --------------------------------------------

constexpr const char* kSuite = "AES_CM_128_HMAC_SHA1_80";
constexpr std::size_t kKeySalt = 30;  // 16-byte key + 14-byte salt

std::string base64(const std::array<unsigned char, kKeySalt>& key) {
  std::string out(4 * ((kKeySalt + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), key.data(),
                                static_cast<int>(key.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

// The key of `suite` in rtpengine's offer (a=crypto:TAG SUITE inline:KEY[|...]) and its tag.
std::pair<std::string, std::array<unsigned char, kKeySalt>> offered_key(const std::string& sdp) {
  std::istringstream lines(sdp);
  std::string line;
  while (std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("a=crypto:", 0) != 0) continue;
    std::istringstream f(line.substr(9));
    std::string tag, suite, params;
    f >> tag >> suite >> params;
    if (suite != kSuite || params.rfind("inline:", 0) != 0) continue;
    std::string b64 = params.substr(
        7, params.find('|') == std::string::npos ? std::string::npos : params.find('|') - 7);
    while (b64.size() % 4) b64 += '=';
    std::array<unsigned char, 48> raw{};
    if (b64.size() > 64) break;
    const int n = EVP_DecodeBlock(raw.data(), reinterpret_cast<const unsigned char*>(b64.data()),
                                  static_cast<int>(b64.size()));
    if (n < static_cast<int>(kKeySalt)) break;
    std::array<unsigned char, kKeySalt> key{};
    std::copy_n(raw.begin(), kKeySalt, key.begin());
    return {tag, key};
  }
  fail(std::string("rtpengine offered no ") + kSuite + " key:\n" + sdp);
}

class SrtpSession {
 public:
  SrtpSession(const std::array<unsigned char, kKeySalt>& key, bool outbound) : key_(key) {
    srtp_policy_t policy{};
    srtp_crypto_policy_set_rtp_default(&policy.rtp);
    srtp_crypto_policy_set_rtcp_default(&policy.rtcp);
    policy.ssrc.type = outbound ? ssrc_any_outbound : ssrc_any_inbound;
    policy.key = key_.data();
    policy.window_size = 1024;
    if (srtp_create(&session_, &policy) != srtp_err_status_ok) fail("srtp_create failed");
  }
  ~SrtpSession() { srtp_dealloc(session_); }
  SrtpSession(const SrtpSession&) = delete;
  SrtpSession& operator=(const SrtpSession&) = delete;
  // In place; `buffer` has room for the tag. The new length, or -1.
  int protect(unsigned char* buffer, int length) {
    return srtp_protect(session_, buffer, &length) == srtp_err_status_ok ? length : -1;
  }
  int unprotect(unsigned char* buffer, int length) {
    return srtp_unprotect(session_, buffer, &length) == srtp_err_status_ok ? length : -1;
  }

 private:
  std::array<unsigned char, kKeySalt> key_;
  srtp_t session_ = nullptr;
};

// ---- media ------------------------------------------------------------------------------

constexpr std::size_t kHeader = 12, kPayload = 160, kPacket = kHeader + kPayload;
constexpr auto kPacketInterval = std::chrono::milliseconds(20);  // 50 packets/s

unsigned char payload_byte(std::uint32_t ssrc, std::uint16_t seq, std::size_t i) {
  return static_cast<unsigned char>(ssrc * 7 + seq * 13 + i);
}

void make_rtp(unsigned char* p, std::uint32_t ssrc, std::uint16_t seq) {
  p[0] = 0x80;
  p[1] = 96;
  p[2] = static_cast<unsigned char>(seq >> 8);
  p[3] = static_cast<unsigned char>(seq);
  const std::uint32_t ts = std::uint32_t{seq} * 960;
  for (int i = 0; i < 4; ++i) p[4 + i] = static_cast<unsigned char>(ts >> (24 - 8 * i));
  for (int i = 0; i < 4; ++i) p[8 + i] = static_cast<unsigned char>(ssrc >> (24 - 8 * i));
  for (std::size_t i = 0; i < kPayload; ++i) p[kHeader + i] = payload_byte(ssrc, seq, i);
}

// The packet as sent, with this SSRC? (Sequence in range and payload intact.)
bool genuine(const unsigned char* p, std::size_t n, std::uint32_t ssrc) {
  if (n != kPacket || (p[0] & 0xc0) != 0x80) return false;
  std::uint32_t got = 0;
  for (int i = 0; i < 4; ++i) got = got << 8 | p[8 + i];
  if (got != ssrc) return false;
  const auto seq = static_cast<std::uint16_t>(p[2] << 8 | p[3]);
  for (std::size_t i = 0; i < kPayload; ++i)
    if (p[kHeader + i] != payload_byte(ssrc, seq, i)) return false;
  return true;
}

// One call's two endpoints: the caller and the callee, each with its own RTP socket.
struct CallEnds {
  Udp caller, callee;
  std::uint16_t to_caller_side = 0;                          // the relay's port the caller sends to
  std::uint16_t to_callee_side = 0;                          // the relay's port the callee sends to
  std::unique_ptr<SrtpSession> callee_send, callee_receive;  // SRTP calls only
  std::uint32_t ssrc_up = 0, ssrc_down = 0;                  // caller -> callee, back
  // When each way's packet of a sequence number (mod 64: 1.28 s) left its sender, in ns of
  // the steady clock: the receiver measures transit through the relay(s) from it.
  std::array<std::atomic<std::int64_t>, 64> sent_up_ns{}, sent_down_ns{};
};

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Counts {
  std::uint64_t sent = 0, received = 0, bad = 0;
};

// Sends every call's audio both ways at 50 packets/s (calls spread over the 20 ms) and
// counts what arrives, until stopped.
class Traffic {
 public:
  explicit Traffic(std::vector<std::unique_ptr<CallEnds>>& calls) : calls_(calls) {
    sender_ = std::thread([this] { guarded([this] { send_loop(); }); });
    receiver_ = std::thread([this] { guarded([this] { receive_loop(); }); });
  }
  ~Traffic() {
    stop_sending();
    stop_ = true;
    receiver_.join();
  }
  Traffic(const Traffic&) = delete;
  Traffic& operator=(const Traffic&) = delete;
  // The sequence number the sender is at: every call sent it both ways, or is about to.
  std::uint16_t sequence() const { return sequence_.load(); }
  void stop_sending() {
    stop_sending_ = true;
    if (sender_.joinable()) sender_.join();
  }
  // What arrived of the packets with sequence numbers first..last-1 (each was sent once
  // each way in every call), and the wrong packets so far.
  Counts delivered(std::uint16_t first, std::uint16_t last) const {
    {
      const std::lock_guard lock(failure_mutex_);
      if (!failure_.empty()) fail(failure_);  // on the main thread, from a traffic thread
    }
    Counts c;
    for (std::uint16_t seq = first; seq != last; ++seq) {
      c.sent += 2 * calls_.size();
      c.received += by_sequence_[seq].load();
    }
    c.bad = bad_.load();
    return c;
  }
  // Transit (us) of the packets with sequence numbers first..last-1 that arrived, from
  // sender to receiver through the relay(s).
  std::vector<double> transit_us(std::uint16_t first, std::uint16_t last) const {
    const std::lock_guard lock(transit_mutex_);
    std::vector<double> v;
    for (const auto& [seq, us] : transit_) {
      if (static_cast<std::uint16_t>(seq - first) < static_cast<std::uint16_t>(last - first))
        v.push_back(us);
    }
    return v;
  }

 private:
  // A failure on a traffic thread stops the traffic; delivered() reports it.
  template <typename Loop>
  void guarded(Loop loop) {
    try {
      loop();
    } catch (const Failure& f) {
      const std::lock_guard lock(failure_mutex_);
      failure_ = f.what();
      stop_sending_ = true;
      stop_ = true;
    }
  }
  void send_loop() {
    const auto start = Clock::now();
    const auto spread = kPacketInterval / static_cast<int>(calls_.size());
    std::array<unsigned char, kPacket + 64> buffer{};
    for (std::uint16_t seq = 0; !stop_sending_; ++seq) {
      sequence_ = seq;
      if (seq == 65535) fail("--seconds is too long: the sequence numbers wrapped");
      for (std::size_t i = 0; i < calls_.size() && !stop_sending_; ++i) {
        std::this_thread::sleep_until(start + kPacketInterval * static_cast<int>(seq) +
                                      spread * static_cast<int>(i));
        CallEnds& c = *calls_[i];
        make_rtp(buffer.data(), c.ssrc_up, seq);
        c.sent_up_ns[seq % 64] = now_ns();
        c.caller.send_to(c.to_caller_side, buffer.data(), kPacket);
        make_rtp(buffer.data(), c.ssrc_down, seq);
        int length = static_cast<int>(kPacket);
        if (c.callee_send) length = c.callee_send->protect(buffer.data(), length);
        if (length < 0) fail("srtp_protect failed");
        c.sent_down_ns[seq % 64] = now_ns();
        c.callee.send_to(c.to_callee_side, buffer.data(), static_cast<std::size_t>(length));
      }
    }
  }
  void receive_loop() {
    std::vector<pollfd> fds;
    std::vector<std::pair<CallEnds*, bool>> owner;  // call, at the callee?
    for (auto& c : calls_) {
      fds.push_back({c->caller.fd(), POLLIN, 0});
      owner.emplace_back(c.get(), false);
      fds.push_back({c->callee.fd(), POLLIN, 0});
      owner.emplace_back(c.get(), true);
    }
    std::array<unsigned char, 2048> buffer{};
    while (!stop_) {
      if (::poll(fds.data(), fds.size(), 20) <= 0) continue;
      for (std::size_t i = 0; i < fds.size(); ++i) {
        if (!(fds[i].revents & POLLIN)) continue;
        for (;;) {
          const ssize_t n = ::recv(fds[i].fd, buffer.data(), buffer.size(), MSG_DONTWAIT);
          if (n < 0) break;
          auto [call, at_callee] = owner[i];
          int length = static_cast<int>(n);
          if (length >= 2 && buffer[1] >= 200 && buffer[1] <= 206) continue;  // RTCP
          if (at_callee && call->callee_receive)
            length = call->callee_receive->unprotect(buffer.data(), length);
          if (length > 0 && genuine(buffer.data(), static_cast<std::size_t>(length),
                                    at_callee ? call->ssrc_up : call->ssrc_down)) {
            const auto seq = static_cast<std::uint16_t>(buffer[2] << 8 | buffer[3]);
            ++by_sequence_[seq];
            const std::int64_t sent = (at_callee ? call->sent_up_ns : call->sent_down_ns)[seq % 64];
            // Later than 64 packets (1.28 s), its slot holds a newer send time: not timed.
            if (const std::int64_t took = now_ns() - sent; took >= 0) {
              const std::lock_guard lock(transit_mutex_);
              transit_.push_back({seq, static_cast<double>(took) / 1000.0});
            }
          } else {
            ++bad_;
          }
        }
      }
    }
  }

  std::vector<std::unique_ptr<CallEnds>>& calls_;
  std::atomic<bool> stop_{false}, stop_sending_{false};
  mutable std::mutex failure_mutex_;
  std::string failure_;
  std::atomic<std::uint16_t> sequence_{0};
  std::vector<std::atomic<std::uint32_t>> by_sequence_ =
      std::vector<std::atomic<std::uint32_t>>(65536);
  std::atomic<std::uint64_t> bad_{0};
  mutable std::mutex transit_mutex_;
  std::vector<std::pair<std::uint16_t, double>> transit_;
  std::thread sender_, receiver_;
};

// ---- the relays -------------------------------------------------------------------------

enum class Mode { otpgate, plain, srtp };

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::otpgate:
      return "otpgate A+B (OTP)";
    case Mode::plain:
      return "rtpengine RTP<->RTP";
    case Mode::srtp:
      return "rtpengine RTP<->SRTP";
  }
  return "";
}

struct Options {
  bool quick = false;
  std::string pki = OTPGATE_TEST_PKI;
  std::string rtpengine = "/usr/bin/rtpengine";
  int calls = 500;      // setup-time samples per relay
  int concurrent = 20;  // calls carrying media at once
  double seconds = 10;  // media CPU interval
  int rounds = 3;       // media CPU runs of each relay, in turn
  double min_delivery = 0.95;
  std::optional<int> batch_window_us;  // the gateways' [media] batch_window_us; unset: default
  // rtpengine's --priority (its media threads' nice); 0: its default. As the gateways'
  // media threads (nice -10) by default: side by side on shared CPUs, the relay whose
  // threads run at the lower priority measured cheaper per datagram (docs/sip.md,
  // "At equal priority").
  int rtpengine_priority = -10;
};

struct Setup {
  std::vector<double> total_us, a_us, b_us;    // otpgate: four steps, per gateway
  std::array<std::vector<double>, 4> step_us;  // otpgate: offer A, offer B, answer B, answer A;
                                               // rtpengine: offer, answer
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * double(v.size())))];
}

double since_us(Clock::time_point t) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t).count();
}

class Bench {
 public:
  explicit Bench(const Options& o) : o_(o) {
    work_ = fs::temp_directory_path() / ("otpgate-bench-sip-" + std::to_string(::getpid()));
    fs::create_directories(work_);
    // Media ports: per relay a block of 4 per call media (otpgate) or per call
    // (rtpengine), above the kernel's ephemeral range (32768-60999).
    span_ = 4 * (o.concurrent + 8);
    base_ = static_cast<std::uint16_t>(61000 + (::getpid() % 4) * 3 * span_);
    if (base_ + 3 * span_ > 65535) fail("--concurrent is too large for the port ranges");
    start_kme();
    start_gateways();
    start_rtpengine();
  }
  ~Bench() {
    rtpengine_.reset();
    gateway_b_.reset();
    gateway_a_.reset();
    kme_.reset();
    std::error_code ignored;
    fs::remove_all(work_, ignored);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  // One call's offer+answer (all four steps for otpgate); `ends` given: the SDPs name
  // its sockets and the relay ports are stored in it.
  void place(Mode mode, const CallKeys& k, Setup* timing, CallEnds* ends) {
    const std::uint16_t caller_port = ends ? ends->caller.port() : 9;
    const std::uint16_t callee_port = ends ? ends->callee.port() : 11;
    if (mode == Mode::otpgate) {
      auto t = Clock::now();
      const std::string to_b = sdp_of(ng_a_->call("offer", k, endpoint_sdp(caller_port)));
      const double a1 = since_us(t);
      t = Clock::now();
      const std::string to_callee = sdp_of(ng_b_->call("offer", k, to_b));
      const double b1 = since_us(t);
      t = Clock::now();
      const std::string to_a = sdp_of(ng_b_->call("answer", k, endpoint_sdp(callee_port)));
      const double b2 = since_us(t);
      t = Clock::now();
      const std::string to_caller = sdp_of(ng_a_->call("answer", k, to_a));
      const double a2 = since_us(t);
      if (timing) {
        timing->total_us.push_back(a1 + b1 + b2 + a2);
        timing->a_us.push_back(a1 + a2);
        timing->b_us.push_back(b1 + b2);
        for (int i = 0; const double step : {a1, b1, b2, a2}) timing->step_us[i++].push_back(step);
      }
      if (ends) {
        ends->to_caller_side = media_port(to_caller);
        ends->to_callee_side = media_port(to_callee);
      }
      return;
    }
    const bool srtp = mode == Mode::srtp;
    auto t = Clock::now();
    const std::string to_callee =
        sdp_of(rtpe_->call("offer", k, endpoint_sdp(caller_port), srtp ? "RTP/SAVP" : "RTP/AVP"));
    const double offer = since_us(t);
    std::string crypto;
    std::array<unsigned char, kKeySalt> callee_key{};
    std::string tag;
    std::array<unsigned char, kKeySalt> relay_key{};
    if (srtp) {
      std::tie(tag, relay_key) = offered_key(to_callee);
      if (RAND_bytes(callee_key.data(), static_cast<int>(callee_key.size())) != 1)
        fail("RAND_bytes failed");
      crypto = "a=crypto:" + tag + " " + kSuite + " inline:" + base64(callee_key) + "\r\n";
    }
    t = Clock::now();
    const std::string to_caller = sdp_of(
        rtpe_->call("answer", k, endpoint_sdp(callee_port, srtp ? "RTP/SAVP" : "RTP/AVP", crypto)));
    const double answer = since_us(t);
    if (timing) {
      timing->total_us.push_back(offer + answer);
      timing->step_us[0].push_back(offer);
      timing->step_us[1].push_back(answer);
    }
    if (ends) {
      ends->to_caller_side = media_port(to_caller);
      ends->to_callee_side = media_port(to_callee);
      if (srtp) {
        ends->callee_send = std::make_unique<SrtpSession>(callee_key, true);
        ends->callee_receive = std::make_unique<SrtpSession>(relay_key, false);
      }
    }
  }

  void hang_up(Mode mode, const CallKeys& k) {
    if (mode == Mode::otpgate) {
      ng_a_->call("delete", k);
      ng_b_->call("delete", k);
    } else {
      rtpe_->call("delete", k);
    }
  }

  // Setup time of each relay, one call at a time, the relays taking turns call by call: a
  // slow stretch of this shared VM falls on all of them alike, not on whichever ran then
  // (run one after the other, a relay's p99 moved by 2-6x between runs of the same code).
  std::map<Mode, Setup> setup_times() {
    std::map<Mode, Setup> timing;
    const int warm = o_.quick ? 3 : 20;
    for (int i = 0; i < warm + o_.calls; ++i) {
      for (Mode mode : {Mode::otpgate, Mode::plain, Mode::srtp}) {
        const CallKeys k{
            "setup-" + std::to_string(static_cast<int>(mode)) + "-" + std::to_string(i),
            "ft" + std::to_string(i), "tt" + std::to_string(i)};
        place(mode, k, i < warm ? nullptr : &timing[mode], nullptr);
        hang_up(mode, k);
      }
    }
    return timing;
  }

  struct MediaResult {
    double cpu_a = 0, cpu_b = 0;                 // busy interval, CPU s (rtpengine: in cpu_a)
    double idle_a = 0, idle_b = 0;               // idle rate, CPU s per s
    std::map<std::string, ThreadUse> threads_a;  // busy interval, per thread name
    double seconds = 0;
    Counts window;
    std::vector<double> transit_us;  // per packet delivered in the window
  };

  // K calls on each relay of `modes` at once (otpgate beside one rtpengine mode), each
  // relay's CPU over the same window: whatever else the shared VM does then costs every
  // relay alike, so the ratio of two figures taken side by side holds still where figures
  // taken one after the other drift (measured: single rounds 0.59x-1.70x in turns).
  std::map<Mode, MediaResult> media_cpu(const std::vector<Mode>& modes) {
    std::map<Mode, MediaResult> results;
    auto pids = [&](Mode mode) {
      return mode == Mode::otpgate ? std::pair{gateway_a_->pid(), gateway_b_->pid()}
                                   : std::pair{rtpengine_->pid(), pid_t{0}};
    };
    auto cpu = [&](Mode mode) {
      const auto [a, b] = pids(mode);
      return std::pair{read_cpu(a), b ? read_cpu(b) : CpuReading{}};
    };
    const double idle_s = o_.quick ? 0.5 : 5;
    // The last window's calls have just hung up: the gateways' refill threads stay awake for
    // a second after the last use and refill the rings those calls drained. Not idle yet.
    std::this_thread::sleep_for(std::chrono::duration<double>(o_.quick ? 0.2 : 3.0));
    {
      std::map<Mode, std::pair<CpuReading, CpuReading>> before;
      for (Mode m : modes) before[m] = cpu(m);
      const auto t0 = Clock::now();
      std::this_thread::sleep_for(std::chrono::duration<double>(idle_s));
      const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
      for (Mode m : modes) {
        const auto now = cpu(m);
        results[m].idle_a = cpu_between(before[m].first, now.first) / dt;
        results[m].idle_b = cpu_between(before[m].second, now.second) / dt;
      }
    }
    std::map<Mode, std::vector<std::unique_ptr<CallEnds>>> calls;
    std::map<Mode, std::vector<CallKeys>> keys;
    for (Mode mode : modes) {
      for (int i = 0; i < o_.concurrent; ++i) {
        auto ends = std::make_unique<CallEnds>();
        ends->ssrc_up = 0x10000000u + 0x100000u * static_cast<std::uint32_t>(mode) +
                        static_cast<std::uint32_t>(i) * 2;
        ends->ssrc_down = ends->ssrc_up + 1;
        keys[mode].push_back(
            {"media-" + std::to_string(static_cast<int>(mode)) + "-" + std::to_string(i),
             "mf" + std::to_string(i), "mt" + std::to_string(i)});
        place(mode, keys[mode].back(), nullptr, ends.get());
        calls[mode].push_back(std::move(ends));
      }
    }
    {
      std::map<Mode, std::unique_ptr<Traffic>> traffic;
      for (Mode m : modes) traffic[m] = std::make_unique<Traffic>(calls[m]);
      // Warm-up, not counted: the first announcements and key fetches of a call.
      std::this_thread::sleep_for(std::chrono::duration<double>(o_.quick ? 0.5 : 2.0));
      std::map<Mode, std::uint16_t> first;
      std::map<Mode, std::uint64_t> bad0;
      std::map<Mode, std::pair<CpuReading, CpuReading>> before;
      for (Mode m : modes) {
        first[m] = static_cast<std::uint16_t>(traffic[m]->sequence() + 1);
        bad0[m] = traffic[m]->delivered(0, 0).bad;
        before[m] = cpu(m);
      }
      const auto t0 = Clock::now();
      std::this_thread::sleep_for(std::chrono::duration<double>(o_.seconds));
      std::map<Mode, std::uint16_t> last;
      for (Mode m : modes) {
        const auto now = cpu(m);
        last[m] = traffic[m]->sequence();
        results[m].cpu_a = cpu_between(before[m].first, now.first);
        results[m].cpu_b = cpu_between(before[m].second, now.second);
        results[m].threads_a = use_by_thread_name(before[m].first, now.first);
      }
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      // The packets sent in the interval, counted once the last of them had time to arrive
      // (a loaded machine may hold some in a queue for a while: late is not lost).
      for (Mode m : modes) traffic[m]->stop_sending();
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      for (Mode m : modes) {
        results[m].seconds = seconds;
        results[m].window = traffic[m]->delivered(first[m], last[m]);
        results[m].transit_us = traffic[m]->transit_us(first[m], last[m]);
        results[m].window.bad -= bad0[m];
      }
    }
    for (Mode m : modes)
      for (const auto& k : keys[m]) hang_up(m, k);
    for (auto* child : {gateway_a_.get(), gateway_b_.get(), rtpengine_.get()})
      if (!child->running()) fail("a relay ended during the run:\n" + child->tail());
    return results;
  }

 private:
  static std::string sdp_of(const bencode::Dict& reply) {
    const std::string s = NgClient::text(reply, "sdp");
    if (s.empty()) fail("an ok reply without sdp");
    return s;
  }

  void start_kme() {
    const fs::path port_file = work_ / "kme.port";
    kme_ = std::make_unique<Child>(
        std::vector<std::string>{OTPGATE_KME_SIM, "--cert", o_.pki + "/kme.crt", "--key",
                                 o_.pki + "/kme.key", "--ca", o_.pki + "/ca.crt", "--port", "0",
                                 "--port-file", port_file.string(), "--key-rate", "0",
                                 "--store-bytes", std::to_string(1ull << 30)},
        work_ / "kme.log");
    for (int i = 0; i < 400 && kme_port_.empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
      std::ifstream in(port_file);
      std::getline(in, kme_port_);
    }
    if (kme_port_.empty()) fail("qkd-kme-sim did not start:\n" + kme_->tail());
  }

  std::string gateway_config(const std::string& me, const std::string& peer, std::uint16_t ng,
                             std::uint16_t low) const {
    return "[site]\nname = \"" + me + "-site\"\nsae_id = \"" + me + "\"\nstate_dir = \"" +
           (work_ / (me + "-state")).string() +
           "\"\n[kme]\nurl = \"https://127.0.0.1:" + kme_port_ + "\"\ntls_cert = \"" + o_.pki +
           "/" + me + ".crt\"\ntls_key = \"" + o_.pki + "/" + me + ".key\"\ntls_ca = \"" + o_.pki +
           "/ca.crt\"\n[peer]\nsae_id = \"" + peer +
           "\"\naddress = \"127.0.0.1\"\n[status]\nlisten = \"127.0.0.1:0\"\n[sip]\n" +
           "ng_listen = \"127.0.0.1:" + std::to_string(ng) +
           "\"\nmedia_address = \"127.0.0.1\"\nport_min = " + std::to_string(low) +
           "\nport_max = " + std::to_string(low + span_ - 1) +
           "\nmax_media = " + std::to_string(o_.concurrent + 2) + "\n" +
           (o_.batch_window_us
                ? "[media]\nbatch_window_us = " + std::to_string(*o_.batch_window_us) + "\n"
                : "");
  }

  void wait_ng(NgClient& ng, Child& child, const char* name) {
    for (int i = 0; i < 100; ++i) {
      if (ng.ping(100)) return;
      if (!child.running()) break;
    }
    fail(std::string(name) + " did not answer ping on its ng socket:\n" + child.tail());
  }

  void start_gateways() {
    const std::uint16_t ng_a = free_port(), ng_b = free_port();
    for (const auto& [me, peer, ng, low] :
         {std::tuple{"sae-a", "sae-b", ng_a, base_},
          std::tuple{"sae-b", "sae-a", ng_b, static_cast<std::uint16_t>(base_ + span_)}}) {
      const fs::path config = work_ / (std::string(me) + ".toml");
      std::ofstream(config) << gateway_config(me, peer, ng, low);
      auto child = std::make_unique<Child>(
          std::vector<std::string>{OTPGATE_GATEWAY, "--config", config.string()},
          work_ / (std::string(me) + ".log"));
      (std::string(me) == "sae-a" ? gateway_a_ : gateway_b_) = std::move(child);
    }
    ng_a_ = std::make_unique<NgClient>("otp-gateway A", ng_a);
    ng_b_ = std::make_unique<NgClient>("otp-gateway B", ng_b);
    wait_ng(*ng_a_, *gateway_a_, "otp-gateway A");
    wait_ng(*ng_b_, *gateway_b_, "otp-gateway B");
  }

  void start_rtpengine() {
    const std::uint16_t ng = free_port();
    const int low = base_ + 2 * span_;
    // Userspace only (no kernel table, no iptables), no config file, calls freed at
    // delete; otherwise rtpengine's defaults (worker threads: one per CPU).
    std::vector<std::string> args{o_.rtpengine,
                                  "--config-file=none",
                                  "--foreground",
                                  "--table=-1",
                                  "--interface=127.0.0.1",
                                  "--listen-ng=127.0.0.1:" + std::to_string(ng),
                                  "--port-min=" + std::to_string(low),
                                  "--port-max=" + std::to_string(low + span_ - 1),
                                  "--delete-delay=0",
                                  "--log-stderr",
                                  "--no-log-timestamps",
                                  "--pidfile=" + (work_ / "rtpengine.pid").string()};
    // rtpengine's own option for its media threads' nice (rtpengine.conf: priority).
    if (o_.rtpengine_priority != 0)
      args.push_back("--priority=" + std::to_string(o_.rtpengine_priority));
    rtpengine_ = std::make_unique<Child>(args, work_ / "rtpengine.log");
    rtpe_ = std::make_unique<NgClient>("rtpengine", ng);
    wait_ng(*rtpe_, *rtpengine_, "rtpengine");
  }

  Options o_;
  fs::path work_;
  int span_ = 0;
  std::uint16_t base_ = 0;
  std::string kme_port_;
  std::unique_ptr<Child> kme_, gateway_a_, gateway_b_, rtpengine_;
  std::unique_ptr<NgClient> ng_a_, ng_b_, rtpe_;
};

std::string rtpengine_version(const std::string& path) {
  std::string out;
  if (FILE* p = ::popen((path + " --version 2>&1").c_str(), "r")) {
    char line[256];
    if (std::fgets(line, sizeof line, p)) out = line;
    ::pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  if (out.rfind("Version: ", 0) == 0) out = "rtpengine " + out.substr(9);
  return out;
}

}  // namespace

int run(int argc, char** argv);

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Failure& f) {
    std::fprintf(stderr, "bench_sip: %s\n", f.what());
    return 1;
  }
}

int run(int argc, char** argv) {
  Options o;
  bool calls_set = false, concurrent_set = false, seconds_set = false, rounds_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--pki" && has_value) {
      o.pki = argv[++i];
    } else if (a == "--rtpengine" && has_value) {
      o.rtpengine = argv[++i];
    } else if (a == "--calls" && has_value) {
      o.calls = std::stoi(argv[++i]);
      calls_set = true;
    } else if (a == "--concurrent" && has_value) {
      o.concurrent = std::stoi(argv[++i]);
      concurrent_set = true;
    } else if (a == "--seconds" && has_value) {
      o.seconds = std::stod(argv[++i]);
      seconds_set = true;
    } else if (a == "--rounds" && has_value) {
      o.rounds = std::stoi(argv[++i]);
      rounds_set = true;
    } else if (a == "--min-delivery" && has_value) {
      o.min_delivery = std::stod(argv[++i]);
    } else if (a == "--batch-window-us" && has_value) {
      o.batch_window_us = std::stoi(argv[++i]);
    } else if (a == "--rtpengine-priority" && has_value) {
      o.rtpengine_priority = std::stoi(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: bench_sip [--quick] [--pki DIR] [--calls N] [--concurrent K] "
                   "[--seconds S] [--rounds R] [--rtpengine PATH] [--min-delivery F] "
                   "[--batch-window-us U] [--rtpengine-priority NICE]\n");
      return 2;
    }
  }
  if (o.quick) {
    if (!calls_set) o.calls = 30;
    if (!concurrent_set) o.concurrent = 4;
    if (!seconds_set) o.seconds = 1;
    if (!rounds_set) o.rounds = 1;
  }
  if (o.calls < 1 || o.concurrent < 1 || o.concurrent > 200 || !(o.seconds > 0) || o.rounds < 1 ||
      o.rounds > 20 || !(o.min_delivery >= 0 && o.min_delivery <= 1) ||
      (o.batch_window_us && (*o.batch_window_us < 0 || *o.batch_window_us > 20000)) ||
      o.rtpengine_priority < -20 || o.rtpengine_priority > 19) {
    std::fprintf(stderr,
                 "bench_sip: --calls >= 1, --concurrent 1-200, --seconds > 0, --rounds 1-20, "
                 "--min-delivery 0-1, --batch-window-us 0-20000, --rtpengine-priority -20 to 19\n");
    return 2;
  }
  if (::access(o.rtpengine.c_str(), X_OK) != 0) {
    std::printf("SKIP: %s is not installed (scripts/install-deps.sh installs rtpengine-daemon)\n",
                o.rtpengine.c_str());
    return 77;
  }
  if (!fs::exists(o.pki + "/sae-a.crt"))
    fail("no test PKI in " + o.pki + " (--pki DIR; scripts/make-test-pki.sh makes one)");
  ::setenv("GST_PLUGIN_PATH", OTPGATE_PLUGIN_DIR, 1);
  if (srtp_init() != srtp_err_status_ok) fail("srtp_init failed");

  Bench bench(o);
  std::printf("== SIP relay: otp-gateway x2 (two sites) vs %s (userspace), one run ==\n",
              rtpengine_version(o.rtpengine).c_str());

  // Setup time, one call at a time.
  std::map<Mode, Setup> setup = bench.setup_times();
  std::printf(
      "\n-- ng offer+answer per call, %d calls each, one at a time, the relays in turn (us) --\n",
      o.calls);
  std::printf("%-44s %10s %10s\n", "", "p50", "p99");
  auto row = [](const char* name, const std::vector<double>& v) {
    std::printf("%-44s %10.0f %10.0f\n", name, percentile(v, 0.5), percentile(v, 0.99));
  };
  const Setup& otp = setup[Mode::otpgate];
  row("otpgate: four steps (offer A, B; answer B, A)", otp.total_us);
  row("otpgate: gateway A (offer + answer)", otp.a_us);
  row("otpgate: gateway B (offer + answer)", otp.b_us);
  row("rtpengine: offer + answer, RTP<->RTP", setup[Mode::plain].total_us);
  row("rtpengine: offer + answer, RTP<->SRTP", setup[Mode::srtp].total_us);
  std::printf("each step:\n");
  const char* steps[] = {"otpgate: 1 offer at A (caller's SDP)", "otpgate: 2 offer at B (A's SDP)",
                         "otpgate: 3 answer at B (callee's SDP)",
                         "otpgate: 4 answer at A (B's SDP)"};
  for (int i = 0; i < 4; ++i) row(steps[i], otp.step_us[i]);
  row("rtpengine RTP<->RTP: offer", setup[Mode::plain].step_us[0]);
  row("rtpengine RTP<->RTP: answer", setup[Mode::plain].step_us[1]);
  row("rtpengine RTP<->SRTP: offer", setup[Mode::srtp].step_us[0]);
  row("rtpengine RTP<->SRTP: answer", setup[Mode::srtp].step_us[1]);
  std::vector<double> per_gateway = otp.a_us;
  per_gateway.insert(per_gateway.end(), otp.b_us.begin(), otp.b_us.end());
  const double gw50 = percentile(per_gateway, 0.5), gw99 = percentile(per_gateway, 0.99);
  for (Mode m : {Mode::plain, Mode::srtp}) {
    const auto& v = setup[m].total_us;
    std::printf("ratio otpgate per gateway / %-22s p50 %.2fx, p99 %.2fx\n", mode_name(m),
                gw50 / percentile(v, 0.5), gw99 / percentile(v, 0.99));
  }
  for (Mode m : {Mode::plain, Mode::srtp}) {
    const auto& v = setup[m].total_us;
    const bool met = gw50 <= 2 * percentile(v, 0.5) && gw99 <= 2 * percentile(v, 0.99);
    std::printf("target (per gateway within 2x %s, p50 and p99): %s\n", mode_name(m),
                met ? "met" : "NOT met");
  }

  // Media CPU with K calls at once.
  std::printf(
      "\n-- media CPU, %d concurrent calls, 50 packets/s of %zu-byte RTP each way, %.1f s --\n",
      o.concurrent, kPacket, o.seconds);
  std::printf(
      "%d round(s), each: otpgate beside rtpengine RTP<->SRTP, then beside RTP<->RTP (K calls "
      "on each, one window)\n",
      o.rounds);
  // The nice each relay's threads really ran at is printed per round (a relay without
  // CAP_SYS_NICE stays at 0 and says so only in its log).
  if (o.rtpengine_priority != 0) {
    std::printf(
        "rtpengine started with --priority=%d (the gateways ask for nice -10 for their media "
        "threads); --rtpengine-priority 0 leaves it at its default\n",
        o.rtpengine_priority);
  } else {
    std::printf("rtpengine at its default priority (the gateways ask for nice -10)\n");
  }
  bool delivered = true;
  // ms of CPU per second of one call (1000 = a whole core for one call).
  auto per_call = [&](double cpu, double idle, const Bench::MediaResult& r) {
    return 1000 * (cpu - idle * r.seconds) / r.seconds / o.concurrent;
  };
  std::vector<double> a_ms, b_ms, gateway_ms, plain_ms, srtp_ms, to_plain, to_srtp;
  std::map<Mode, std::vector<double>> transit;  // us, every round's packets
  for (int round = 1; round <= o.rounds; ++round) {
    // Side by side: otpgate beside rtpengine's SRTP calls, then beside its plain ones.
    for (Mode other : {Mode::srtp, Mode::plain}) {
      auto media = bench.media_cpu({Mode::otpgate, other});
      for (Mode m : {Mode::otpgate, other}) {
        const auto& w = media[m].window;
        const double share = w.sent ? double(w.received) / double(w.sent) : 0;
        std::printf("round %d: %-24s sent %llu, received %llu (%.1f%%), wrong %llu\n", round,
                    mode_name(m), static_cast<unsigned long long>(w.sent),
                    static_cast<unsigned long long>(w.received), 100 * share,
                    static_cast<unsigned long long>(w.bad));
        if (share < o.min_delivery || w.bad) delivered = false;
        const auto& t = media[m].transit_us;
        std::printf("round %d: %-24s transit p50 %.0f us, p99 %.0f us\n", round, mode_name(m),
                    percentile(t, 0.5), percentile(t, 0.99));
        transit[m].insert(transit[m].end(), t.begin(), t.end());
      }
      const auto& g = media[Mode::otpgate];
      a_ms.push_back(per_call(g.cpu_a, g.idle_a, g));
      b_ms.push_back(per_call(g.cpu_b, g.idle_b, g));
      gateway_ms.push_back((a_ms.back() + b_ms.back()) / 2);
      const auto& r = media[other];
      const double theirs = per_call(r.cpu_a, r.idle_a, r);
      (other == Mode::srtp ? srtp_ms : plain_ms).push_back(theirs);
      (other == Mode::srtp ? to_srtp : to_plain).push_back(gateway_ms.back() / theirs);
      std::printf(
          "round %d: ms/s per call, side by side: otpgate per gateway %.3f (A %.3f, idle %.1f "
          "ms/s; B %.3f, idle %.1f ms/s), %s %.3f; ratio %.2fx\n",
          round, gateway_ms.back(), a_ms.back(), 1000 * g.idle_a, b_ms.back(), 1000 * g.idle_b,
          mode_name(other), theirs, gateway_ms.back() / theirs);
      // Where it went, thread by thread (idle rate not taken off): the media threads
      // against rtpengine's, the rest (key refills, bus, ng) on top.
      const auto per_s = [&](const std::map<std::string, ThreadUse>& threads,
                             const Bench::MediaResult& m) {
        std::string text;
        for (const auto& [name, use] : threads) {
          if (1000 * use.cpu_s / m.seconds < 0.05) continue;
          text += " " + name + " " + format_ms(1000 * use.cpu_s / m.seconds);
        }
        return text;
      };
      std::printf("round %d: ms/s by thread: gateway A%s; %s%s\n", round,
                  per_s(g.threads_a, g).c_str(), mode_name(other), per_s(r.threads_a, r).c_str());
      // How often each relay's media threads slept and were woken, per datagram it received
      // (each relay receives every packet of both directions once), and the nice they ran
      // at (what was asked may have been refused): a wake-up costs most of what a datagram
      // does.
      const auto sleeps = [](const Bench::MediaResult& m, const char* name) {
        const auto it = m.threads_a.find(name);
        const auto sent = static_cast<double>(m.window.sent);
        char text[48] = "-";
        if (it != m.threads_a.end() && sent > 0) {
          std::snprintf(text, sizeof text, "%.2f (nice %d)", double(it->second.sleeps) / sent,
                        it->second.nice);
        }
        return std::string(text);
      };
      std::printf("round %d: sleeps per datagram received: gateway A otp-media %s, %s poller %s\n",
                  round, sleeps(g, "otp-media").c_str(), mode_name(other),
                  sleeps(r, "poller").c_str());
    }
  }
  auto median = [](std::vector<double> v) { return percentile(v, 0.5); };
  std::printf(
      "\nCPU ms per second of call, median of %d round(s) (less each process's idle "
      "rate)\n",
      o.rounds);
  std::printf("%-44s %8.3f\n", "otpgate gateway A (caller's site)", median(a_ms));
  std::printf("%-44s %8.3f\n", "otpgate gateway B (callee's site)", median(b_ms));
  std::printf("%-44s %8.3f\n", "otpgate per gateway (mean of A and B)", median(gateway_ms));
  std::printf("%-44s %8.3f\n", "rtpengine RTP<->RTP", median(plain_ms));
  std::printf("%-44s %8.3f\n", "rtpengine RTP<->SRTP", median(srtp_ms));
  const double ratio_srtp = median(to_srtp);
  std::printf(
      "ratio otpgate per gateway / rtpengine (median of the rounds' ratios): RTP<->RTP "
      "%.2fx, RTP<->SRTP %.2fx\n",
      median(to_plain), ratio_srtp);
  std::printf("ratio otpgate both gateways / rtpengine RTP<->SRTP: %.2fx\n", 2 * ratio_srtp);
  // The spread says how far one run's median can be trusted: on a small VM one round's
  // ratio moves by about a tenth either way.
  if (to_srtp.size() > 1) {
    const auto [low, high] = std::minmax_element(to_srtp.begin(), to_srtp.end());
    std::printf("rounds' ratios to rtpengine RTP<->SRTP: %.2fx to %.2fx\n", *low, *high);
  }
  std::printf("\nTransit sender -> receiver, us, every round's packets     p50        p99\n");
  for (Mode m : {Mode::otpgate, Mode::plain, Mode::srtp}) {
    std::printf("%-44s %10.0f %10.0f\n",
                m == Mode::otpgate ? "otpgate A+B (two relays)" : mode_name(m),
                percentile(transit[m], 0.5), percentile(transit[m], 0.99));
  }
  std::printf("target (per gateway no more CPU per call than rtpengine RTP<->SRTP): %s\n",
              ratio_srtp <= 1 ? "met" : "NOT met");
  if (!delivered) {
    std::fprintf(stderr,
                 "bench_sip: FAIL: a relay delivered less than %.0f%% of the packets "
                 "or delivered wrong ones (see above)\n",
                 100 * o.min_delivery);
    return 1;
  }
  return 0;
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// A gateway hop against a plain UDP relay of the same traffic, on loopback, in one run:
// ten participants' streams (about 50 Mbit/s of 1200-byte RTP in all) go
//   sender -> relay -> relay -> receiver                 (baseline: two plain UDP hops)
//   sender -> gateway A (encrypt) -> gateway B (decrypt) -> receiver
// Each packet carries its send time; the receiver records one-way latency. Prints
// p50/p99 of both, the added latency, loss, and process CPU per Mbit/s.
// The gateways run their media threads SCHED_FIFO at --realtime-priority (as a deployment
// does with [media] realtime_priority; 0: time-shared). The harness threads (the
// conference systems' sender and receiver, and the baseline relays) run SCHED_FIFO above
// that, so that neither path is measured waiting behind the other's threads.
//   bench_gateway --pki DIR [--seconds N] [--mbps M] [--kme-url URL] [--realtime-priority P]
//                 [--slice-ms S] [--cpu-idle poll|halt]
// Without --kme-url the benchmark starts qkd-kme-sim in its own process. The traffic never
// stops; it goes to one path, then the other, switching every S ms (default 1000), for N
// seconds per path. --cpu-idle poll (the default) keeps idle CPUs from halting, as a
// latency-tuned host does (see IdleSpinners); halt measures the host as it is.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gst/gst.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "otpgate/gateway.hpp"

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

constexpr int kStreams = 10;
constexpr std::size_t kPacket = 1212;  // 12-byte RTP header + 1200 bytes

int udp_socket(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  int size = 16 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    std::fprintf(stderr, "bench_gateway: cannot bind UDP port %u\n", port);
    std::exit(1);
  }
  return fd;
}

sockaddr_in loopback(std::uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

// The harness's own threads: above the gateways' media threads when allowed.
struct HarnessScheduling {
  int priority = 0;  // SCHED_FIFO priority; 0: time-shared
  bool apply() const {
    if (priority == 0) return false;
    sched_param p{};
    p.sched_priority = priority;
    return ::pthread_setschedparam(::pthread_self(), SCHED_FIFO, &p) == 0;
  }
  static void reset() {
    const sched_param other{};
    ::pthread_setschedparam(::pthread_self(), SCHED_OTHER, &other);
  }
};

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// A plain UDP relay: what arrives on `in` goes to `out`, per stream.
struct Relay {
  Relay(std::uint16_t in_base, std::uint16_t out_base, HarnessScheduling scheduling) {
    for (int s = 0; s < kStreams; ++s) {
      fds.push_back(udp_socket(static_cast<std::uint16_t>(in_base + s)));
      targets.push_back(loopback(static_cast<std::uint16_t>(out_base + s)));
    }
    thread = std::thread([this, scheduling] {
      scheduling.apply();
      std::vector<pollfd> p;
      for (int fd : fds) p.push_back({fd, POLLIN, 0});
      char buf[2048];
      while (!stop) {
        if (::poll(p.data(), p.size(), 20) <= 0) continue;
        for (std::size_t i = 0; i < p.size(); ++i) {
          if (!(p[i].revents & POLLIN)) continue;
          const ssize_t n = ::recv(fds[i], buf, sizeof buf, 0);
          if (n > 0)
            ::sendto(fds[i], buf, static_cast<std::size_t>(n), 0,
                     reinterpret_cast<sockaddr*>(&targets[i]), sizeof targets[i]);
        }
      }
    });
  }
  ~Relay() {
    stop = true;
    thread.join();
    for (int fd : fds) ::close(fd);
  }
  std::vector<int> fds;
  std::vector<sockaddr_in> targets;
  std::atomic<bool> stop{false};
  std::thread thread;
};

struct Result {
  std::vector<double> latency_us;
  std::uint64_t sent = 0;
  double cpu = 0;
  double seconds = 0;

  double mbps() const { return seconds > 0 ? double(sent) * kPacket * 8 / seconds / 1e6 : 0; }
  void finish() { std::sort(latency_us.begin(), latency_us.end()); }
};

// One way through, from the conference sender's ports to the receiver's.
struct Path {
  std::uint16_t send_base, receive_base;
  Result result;
};

// Sends paced traffic without a pause for 2 x `seconds`, to one path at a time, switching
// every `slice` seconds, and receives both paths all along: both paths see the same host
// (a shared VM's stolen time comes and goes over seconds), and the host never sits idle
// between slices. A path waiting out the other's slice sends its first packets after it
// a little slower; at one-second slices those are 10 in 5000, outside the p99 (at 100 ms
// they are 10 in 500, and the gateway's p99 grows by a few hundred microseconds).
void measure(Path& first, Path& second, double seconds, double slice, double mbps,
             HarnessScheduling scheduling) {
  std::array<Path*, 2> paths{&first, &second};
  std::vector<int> rx;
  std::vector<Result*> owner;  // per receive socket
  for (Path* path : paths) {
    for (int s = 0; s < kStreams; ++s) {
      rx.push_back(udp_socket(static_cast<std::uint16_t>(path->receive_base + s)));
      owner.push_back(&path->result);
    }
  }
  std::atomic<bool> done{false};
  std::thread receiver([&] {
    scheduling.apply();
    std::vector<pollfd> p;
    for (int fd : rx) p.push_back({fd, POLLIN, 0});
    char buf[2048];
    while (!done) {
      if (::poll(p.data(), p.size(), 50) <= 0) continue;
      const auto now = Clock::now().time_since_epoch().count();
      for (std::size_t i = 0; i < p.size(); ++i) {
        if (!(p[i].revents & POLLIN)) continue;
        while (true) {
          const ssize_t n = ::recv(rx[i], buf, sizeof buf, MSG_DONTWAIT);
          if (n < static_cast<ssize_t>(12 + sizeof(std::int64_t))) break;
          std::int64_t sent_at = 0;
          std::memcpy(&sent_at, buf + 12, sizeof sent_at);
          owner[i]->latency_us.push_back(double(now - sent_at) / 1000.0);
        }
      }
    }
  });
  const int tx = udp_socket(0);
  const double packets_per_second = mbps * 1e6 / 8 / kPacket;
  std::vector<char> packet(kPacket, 0x55);
  packet[0] = char(0x80);
  packet[1] = 96;
  scheduling.apply();  // the sender is this thread
  const auto start = Clock::now();
  std::uint64_t n = 0;
  std::size_t current = 0;
  double cpu_at_switch = cpu_seconds();
  double time_at_switch = 0;
  auto close_slice = [&](double t) {
    const double cpu = cpu_seconds();
    paths[current]->result.cpu += cpu - cpu_at_switch;
    paths[current]->result.seconds += t - time_at_switch;
    cpu_at_switch = cpu;
    time_at_switch = t;
  };
  while (true) {
    const double t = std::chrono::duration<double>(Clock::now() - start).count();
    if (t >= 2 * seconds) {
      close_slice(t);
      break;
    }
    const std::size_t due = static_cast<std::size_t>(t / slice) % 2;
    if (due != current) {
      close_slice(t);
      current = due;
    }
    Path& path = *paths[current];
    for (; n < static_cast<std::uint64_t>(t * packets_per_second); ++n) {
      const int s = static_cast<int>(n % kStreams);
      packet[2] = char(n >> 8);
      packet[3] = char(n);
      packet[11] = char(s);
      const sockaddr_in target = loopback(static_cast<std::uint16_t>(path.send_base + s));
      const std::int64_t now = Clock::now().time_since_epoch().count();
      std::memcpy(packet.data() + 12, &now, sizeof now);
      ::sendto(tx, packet.data(), packet.size(), 0, reinterpret_cast<const sockaddr*>(&target),
               sizeof target);
      ++path.result.sent;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the last packets in flight
  HarnessScheduling::reset();  // threads made from here on must not inherit SCHED_FIFO
  done = true;
  receiver.join();
  ::close(tx);
  for (int fd : rx) ::close(fd);
}

// qkd-kme-sim as a child process (unthrottled, 1 Mbit keys as bench_transfer.sh uses:
// this measures the gateway, not per-key KME overhead).
class SimulatorProcess {
 public:
  SimulatorProcess(const std::string& pki, const fs::path& dir) {
    const std::string port_file = (dir / "kme.port").string();
    std::vector<std::string> args = {OTPGATE_KME_SIM,
                                     "--cert",
                                     pki + "/kme.crt",
                                     "--key",
                                     pki + "/kme.key",
                                     "--ca",
                                     pki + "/ca.crt",
                                     "--port",
                                     "0",
                                     "--port-file",
                                     port_file,
                                     "--key-rate",
                                     "0",
                                     "--store-bytes",
                                     std::to_string(4ull << 30),
                                     "--max-key-size",
                                     std::to_string(1u << 20)};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    ::posix_spawn_file_actions_init(&files);
    const std::string log = (dir / "kme.log").string();
    ::posix_spawn_file_actions_addopen(&files, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::posix_spawn_file_actions_adddup2(&files, 1, 2);
    const int spawned = ::posix_spawn(&pid_, argv[0], &files, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&files);
    if (spawned != 0) {
      std::fprintf(stderr, "bench_gateway: cannot start %s\n", OTPGATE_KME_SIM);
      std::exit(1);
    }
    for (int i = 0; i < 200 && port_.empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
      std::ifstream in(port_file);
      std::getline(in, port_);
    }
    if (port_.empty()) {
      std::fprintf(stderr, "bench_gateway: qkd-kme-sim did not start\n");
      std::exit(1);
    }
  }
  ~SimulatorProcess() {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  SimulatorProcess(const SimulatorProcess&) = delete;
  SimulatorProcess& operator=(const SimulatorProcess&) = delete;
  std::string url() const { return "https://localhost:" + port_; }

 private:
  pid_t pid_ = -1;
  std::string port_;
};

// Keeps every CPU from idling, as a host booted with idle=poll does: one process per CPU
// spinning at SCHED_IDLE, which any other thread preempts at once. Waking a halted vCPU
// (or a CPU in a deep C-state) costs tens of microseconds to milliseconds, which lands in
// whichever packet arrives at an idle CPU. The gateways' own PM QoS request
// ([media] cpu_wakeup_latency_us) does this where the kernel has a cpuidle driver; a VM
// without one (current_driver "none") only halts, so the benchmark polls for it. The
// spinners are children, so their CPU time is not counted as either path's.
class IdleSpinners {
 public:
  IdleSpinners() {
    const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    const pid_t parent = ::getpid();
    for (long cpu = 0; cpu < cpus; ++cpu) {
      const pid_t pid = ::fork();
      if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the benchmark, however it ends
        if (::getppid() != parent) ::_exit(0);
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(static_cast<int>(cpu), &one);
        ::sched_setaffinity(0, sizeof one, &one);
        const sched_param idle{};
        ::sched_setscheduler(0, SCHED_IDLE, &idle);
        for (;;) {
#if defined(__x86_64__) || defined(__i386__)
          __builtin_ia32_pause();
#else
          asm volatile("" ::: "memory");
#endif
        }
      }
      if (pid > 0) pids_.push_back(pid);
    }
  }
  ~IdleSpinners() {
    for (pid_t pid : pids_) ::kill(pid, SIGKILL);
    for (pid_t pid : pids_) ::waitpid(pid, nullptr, 0);
  }
  IdleSpinners(const IdleSpinners&) = delete;
  IdleSpinners& operator=(const IdleSpinners&) = delete;
  std::size_t count() const {
    return pids_.size();
  }

 private:
  std::vector<pid_t> pids_;
};

std::string cpuidle_driver() {
  std::ifstream in("/sys/devices/system/cpu/cpuidle/current_driver");
  std::string driver;
  std::getline(in, driver);
  return driver.empty() ? "none" : driver;
}

double percentile(const std::vector<double>& v, double p) {
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<std::size_t>(p * double(v.size())))];
}

std::string site(const std::string& me, const std::string& peer, const std::string& url,
                 const std::string& pki, const fs::path& state, std::uint16_t local,
                 std::uint16_t peer_listen, std::uint16_t listen, std::uint16_t deliver, bool sends,
                 int realtime_priority) {
  std::string t =
      "[site]\nname=\"" + me + "\"\nsae_id=\"" + me + "\"\nstate_dir=\"" + state.string() +
      "\"\n[kme]\nurl=\"" + url + "\"\ntls_cert=\"" + pki + "/" + me + ".crt\"\ntls_key=\"" + pki +
      "/" + me + ".key\"\ntls_ca=\"" + pki + "/ca.crt\"\n[peer]\nsae_id=\"" + peer +
      "\"\naddress=\"127.0.0.1\"\n[status]\nlisten=\"127.0.0.1:0\"\n[media]\n" +
      "realtime_priority=" + std::to_string(realtime_priority) + "\ncpu_wakeup_latency_us=0\n";
  for (int s = 0; s < kStreams; ++s) {
    t += "[[stream]]\nname=\"p" + std::to_string(s) + "\"\n";
    if (sends) {
      t += "direction=\"send\"\nlocal_rtp_port=" + std::to_string(local + s) +
           "\npeer_port=" + std::to_string(peer_listen + s) + "\n";
    } else {
      t += "direction=\"receive\"\nlisten_port=" + std::to_string(listen + s) +
           "\ndeliver_rtp=\"127.0.0.1:" + std::to_string(deliver + s) + "\"\n";
    }
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string pki, kme_url;
  double seconds = 5, mbps = 50, slice_ms = 1000;
  std::string cpu_idle = "poll";
  int realtime_priority = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--pki" && i + 1 < argc) pki = argv[++i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::stod(argv[++i]);
    if (a == "--mbps" && i + 1 < argc) mbps = std::stod(argv[++i]);
    if (a == "--kme-url" && i + 1 < argc) kme_url = argv[++i];  // a KME in another process
    if (a == "--realtime-priority" && i + 1 < argc) realtime_priority = std::stoi(argv[++i]);
    if (a == "--slice-ms" && i + 1 < argc) slice_ms = std::stod(argv[++i]);
    if (a == "--cpu-idle" && i + 1 < argc) cpu_idle = argv[++i];
  }
  if (pki.empty()) {
    std::fprintf(stderr, "usage: bench_gateway --pki DIR [--seconds N] [--mbps M]\n");
    return 2;
  }
  if (cpu_idle != "poll" && cpu_idle != "halt") {
    std::fprintf(stderr, "bench_gateway: --cpu-idle takes poll or halt\n");
    return 2;
  }
  if (!(slice_ms >= 10)) {
    std::fprintf(stderr, "bench_gateway: --slice-ms takes 10 or more\n");
    return 2;
  }
  if (realtime_priority < 0 || realtime_priority > 89) {
    std::fprintf(stderr, "bench_gateway: --realtime-priority takes 0 to 89\n");
    return 2;
  }
  // Before any thread exists: the spinners are forked children.
  std::optional<IdleSpinners> spinners;
  if (cpu_idle == "poll") spinners.emplace();
  gst_init(nullptr, nullptr);
  HarnessScheduling harness{realtime_priority ? realtime_priority + 10 : 0};
  if (harness.priority && !harness.apply()) {
    std::fprintf(stderr,
                 "bench_gateway: SCHED_FIFO is not permitted here (run as root or raise "
                 "RLIMIT_RTPRIO); measuring with time-shared threads\n");
    harness.priority = 0;
  }
  HarnessScheduling::reset();
  const std::uint16_t base =
      static_cast<std::uint16_t>(61000 + (::getpid() % 40) * 100);  // apart from the tests' ports

  const fs::path state =
      fs::temp_directory_path() / ("otpgate-bench-gw-" + std::to_string(::getpid()));
  fs::create_directories(state);
  // The KME in its own process, as in a deployment (a KME shares neither the gateway's
  // CPU time accounting nor its address space).
  std::optional<SimulatorProcess> sim;
  if (kme_url.empty()) {
    sim.emplace(pki, state);
    kme_url = sim->url();
  }
  Relay first(base, static_cast<std::uint16_t>(base + 20), harness);
  Relay second(static_cast<std::uint16_t>(base + 20), static_cast<std::uint16_t>(base + 40),
               harness);
  Path plain{base, static_cast<std::uint16_t>(base + 40), {}};
  Path otp{static_cast<std::uint16_t>(base + 60), static_cast<std::uint16_t>(base + 100), {}};
  std::string media_threads;
  {
    otpgate::gateway::Gateway a(otpgate::gateway::parse_config(
        site("sae-a", "sae-b", kme_url, pki, state / "a", otp.send_base,
             static_cast<std::uint16_t>(base + 80), 0, 0, true, realtime_priority),
        "bench-a"));
    otpgate::gateway::Gateway b(otpgate::gateway::parse_config(
        site("sae-b", "sae-a", kme_url, pki, state / "b", 0, 0,
             static_cast<std::uint16_t>(base + 80), otp.receive_base, false, realtime_priority),
        "bench-b"));
    a.start();
    b.start();
    // Warm-up, not counted: the first announcements and key fetches of a call are not the
    // steady state.
    {
      Path warm_plain = plain, warm_otp = otp;
      measure(warm_plain, warm_otp, 1, slice_ms / 1000, mbps, harness);
    }
    measure(plain, otp, std::ceil(seconds), slice_ms / 1000, mbps, harness);
    plain.result.finish();
    otp.result.finish();
    int fifo = 0, shared = 0;
    for (const auto* g : {&a, &b}) {
      const auto media = nlohmann::json::parse(g->status_json())["media_threads"];
      fifo += media["realtime_threads"].get<int>();
      shared += media["raised_threads"].get<int>() + media["unraised_threads"].get<int>();
    }
    media_threads = "gateway media threads: " + std::to_string(fifo) + " SCHED_FIFO (priority " +
                    std::to_string(realtime_priority) + "), " + std::to_string(shared) +
                    " time-shared; harness threads: " +
                    (harness.priority ? "SCHED_FIFO " + std::to_string(harness.priority)
                                      : std::string("time-shared"));
  }
  sim.reset();
  fs::remove_all(state);
  const std::string idle_mode =
      spinners ? "idle CPUs poll (" + std::to_string(spinners->count()) +
                     " SCHED_IDLE spinners, as idle=poll; cpuidle driver: " + cpuidle_driver() + ")"
               : "idle CPUs halt (cpuidle driver: " + cpuidle_driver() + ")";
  spinners.reset();
  seconds = std::ceil(seconds);

  std::printf(
      "== gateway hop vs plain UDP relay, %d streams, %.1f Mbit/s of 1200-byte RTP, %.0f s each, "
      "alternating every %.0f ms ==\n",
      kStreams, plain.result.mbps(), seconds, slice_ms);
  std::printf("%-34s %10s %10s %10s %10s %12s\n", "path", "p50 us", "p99 us", "p99.9 us", "lost",
              "CPU s/Mbit");
  auto row = [&](const char* name, const Result& r) {
    std::printf("%-34s %10.1f %10.1f %10.1f %10lld %12.4f\n", name, percentile(r.latency_us, 0.5),
                percentile(r.latency_us, 0.99), percentile(r.latency_us, 0.999),
                static_cast<long long>(r.sent) - static_cast<long long>(r.latency_us.size()),
                r.cpu / (r.mbps() * r.seconds));
  };
  std::printf("%s; %s\n", media_threads.c_str(), idle_mode.c_str());
  const Result& p = plain.result;
  const Result& o = otp.result;
  row("two plain UDP relays (baseline)", p);
  row("gateway A (encrypt) -> B (decrypt)", o);
  std::printf(
      "added by the gateways: p50 %.1f us, p99 %.1f us (target: p99 < 200 us), packets lost by the "
      "gateways: %lld\n",
      percentile(o.latency_us, 0.5) - percentile(p.latency_us, 0.5),
      percentile(o.latency_us, 0.99) - percentile(p.latency_us, 0.99),
      static_cast<long long>(o.sent - o.latency_us.size()) -
          static_cast<long long>(p.sent - p.latency_us.size()));
  return 0;
}

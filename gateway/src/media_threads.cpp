// SPDX-License-Identifier: LGPL-2.1-or-later
#include "media_threads.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

namespace otpgate::gateway {

using nlohmann::json;

bool MediaScheduling::enter() {
  if (realtime_priority_ > 0) {
    sched_param p{};
    p.sched_priority = realtime_priority_;
    if (::pthread_setschedparam(::pthread_self(), SCHED_FIFO, &p) == 0) {
      ++realtime_;
      return true;
    }
    if (!warned_.exchange(true)) {
      std::fprintf(stderr,
                   "otp-gateway[warning]: media threads cannot run SCHED_FIFO at priority %d "
                   "(needs CAP_SYS_NICE or LimitRTPRIO=%d in the systemd unit); they stay "
                   "time-shared\n",
                   realtime_priority_, realtime_priority_);
    }
  }
  // Fails quietly without CAP_SYS_NICE or RLIMIT_NICE.
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), kRaisedNice) == 0) {
    ++raised_;
    return true;
  }
  ++unraised_;
  return false;
}

void MediaScheduling::leave() {
  int policy = SCHED_OTHER;
  sched_param p{};
  ::pthread_getschedparam(::pthread_self(), &policy, &p);
  if (policy == SCHED_FIFO) {
    --realtime_;
    const sched_param other{};
    ::pthread_setschedparam(::pthread_self(), SCHED_OTHER, &other);
  } else if (::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid())) == kRaisedNice) {
    --raised_;
  } else {
    --unraised_;
  }
  ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 0);
}

json MediaScheduling::status() const {
  return json{{"realtime_priority", realtime_priority_},
              {"realtime_threads", realtime_.load()},
              {"raised_threads", raised_.load()},
              {"unraised_threads", unraised_.load()}};
}

namespace {
// A CPU set for `cpus` CPUs, freed with it (glibc's fixed cpu_set_t ends at 1024).
struct CpuSet {
  explicit CpuSet(int cpus) : count(cpus), set(CPU_ALLOC(cpus)), size(CPU_ALLOC_SIZE(cpus)) {
    if (!set) throw std::bad_alloc();
    CPU_ZERO_S(size, set);
  }
  ~CpuSet() { CPU_FREE(set); }
  CpuSet(const CpuSet&) = delete;
  CpuSet& operator=(const CpuSet&) = delete;
  int count;
  cpu_set_t* set;
  std::size_t size;
};
}  // namespace

std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
  // The main thread's: the caller may be a thread that has bound itself.
  for (int room = 1024; room <= (1 << 16) && cpus.empty(); room *= 4) {
    CpuSet s(room);
    if (::sched_getaffinity(::getpid(), s.size, s.set) != 0) {
      if (errno == EINVAL) continue;  // more CPUs than `room`
      break;
    }
    for (int cpu = 0; cpu < s.count; ++cpu) {
      if (CPU_ISSET_S(cpu, s.size, s.set)) cpus.push_back(cpu);
    }
  }
  if (cpus.empty()) cpus.push_back(std::max(::sched_getcpu(), 0));
  return cpus;
}

bool pin_current_thread(int cpu) {
  if (cpu < 0) return false;
  CpuSet s(cpu + 1);
  CPU_SET_S(cpu, s.size, s.set);
  return ::pthread_setaffinity_np(::pthread_self(), s.size, s.set) == 0;
}

void CpuWakeupLatency::hold() {
  if (!wanted_ || fd_ >= 0) return;
  fd_ = ::open(device_.c_str(), O_WRONLY | O_CLOEXEC);
  const std::int32_t value = *wanted_;
  if (fd_ >= 0 && ::write(fd_, &value, sizeof value) == static_cast<ssize_t>(sizeof value)) {
    error_.clear();
    return;
  }
  error_ = device_.string() + ": " + std::strerror(errno);
  release();
  std::fprintf(stderr,
               "otp-gateway[warning]: cannot hold a CPU wake-up latency of %d us (%s); idle "
               "CPUs may sleep deeply between packets (run as root, or give the otpgate group "
               "write access to it, see docs/gateway.md)\n",
               *wanted_, error_.c_str());
}

void CpuWakeupLatency::release() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void CpuWakeupLatency::describe(json& status) const {
  status["cpu_wakeup_latency_us"] = wanted_ ? json(*wanted_) : json(nullptr);
  status["cpu_wakeup_latency_held"] = fd_ >= 0;
  if (!error_.empty()) status["cpu_wakeup_latency_error"] = error_;
}

}  // namespace otpgate::gateway

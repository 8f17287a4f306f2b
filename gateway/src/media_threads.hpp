// SPDX-License-Identifier: LGPL-2.1-or-later
// How otp-gateway's media threads run: their scheduling (SCHED_FIFO or nice -10) and the
// CPU wake-up latency request held while the gateway runs. Both report into the status.
#pragma once

#include <atomic>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace otpgate::gateway {

// A packet's wait for a CPU is most of a gateway hop's tail latency on a busy host:
// SCHED_FIFO (where configured and allowed) lets a packet preempt key refills, the status
// API and everything else time-shared; otherwise nice -10. GStreamer posts ENTER/LEAVE
// from the streaming thread itself, so the thread changes its own scheduling; pool
// threads are handed back as they came.
class MediaScheduling {
 public:
  explicit MediaScheduling(int realtime_priority) : realtime_priority_(realtime_priority) {}
  // On the streaming thread, as it starts; whether it now runs above time-shared work
  // (SCHED_FIFO or nice -10).
  bool enter();
  void leave();  // ... and as it is handed back
  nlohmann::json status() const;

 private:
  static constexpr int kRaisedNice = -10;
  const int realtime_priority_;
  std::atomic<int> realtime_{0}, raised_{0}, unraised_{0};
  std::atomic<bool> warned_{false};
};

// A PM QoS request that keeps idle CPUs from sleeping deeper than the media can wait for:
// waking a CPU from a deep C-state (or a VM's halted vCPU) takes tens to hundreds of
// microseconds, which lands straight in a packet's latency. The kernel honours the
// request for as long as /dev/cpu_dma_latency stays open, as tuned's latency-performance
// profile and cyclictest do it.
class CpuWakeupLatency {
 public:
  CpuWakeupLatency(std::optional<int> microseconds, std::filesystem::path device)
      : wanted_(microseconds), device_(std::move(device)) {}
  ~CpuWakeupLatency() { release(); }
  CpuWakeupLatency(const CpuWakeupLatency&) = delete;
  CpuWakeupLatency& operator=(const CpuWakeupLatency&) = delete;

  void hold();     // warns once when the device cannot be held
  void release();  // closing the device withdraws the request
  void describe(nlohmann::json& status) const;

 private:
  const std::optional<int> wanted_;
  const std::filesystem::path device_;
  int fd_ = -1;
  std::string error_;
};

// The CPUs this process may run on (its main thread's affinity: taskset, systemd's
// CPUAffinity=, a cpuset), in ascending order; at least one.
std::vector<int> allowed_cpus();

// Binds the calling thread to `cpu` alone; false when the kernel refuses (the CPU left
// the process's cpuset meanwhile).
bool pin_current_thread(int cpu);

}  // namespace otpgate::gateway

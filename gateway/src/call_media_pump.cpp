// SPDX-License-Identifier: LGPL-2.1-or-later
#include "call_media_pump.hpp"

#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <latch>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <vector>

#include "media_threads.hpp"

namespace otpgate::gateway {

namespace {

// An address datagrams go to, in the form its socket's family takes.
struct Destination {
  sockaddr_storage address{};
  socklen_t length = 0;
};

// `to` for a socket of `family`: an IPv4 target of an IPv6 (dual-stack) socket becomes
// its v4-mapped address. Numeric only: a call's targets are IP addresses (the local c=
// must be one, the partner's was resolved at start), so no call setup waits for DNS.
Destination resolve(const Endpoint& to, int family, const std::string& media) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_NUMERICHOST;
  hints.ai_family = family == AF_INET ? AF_INET : AF_UNSPEC;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(to.port);
  if (const int rc = ::getaddrinfo(to.host.c_str(), port.c_str(), &hints, &found);
      rc != 0 || found == nullptr) {
    throw std::runtime_error("call media " + media + ": cannot send to " + to.host + ":" + port +
                             " (" + ::gai_strerror(rc) + "): the address in its SDP is wrong");
  }
  Destination d;
  const addrinfo* pick = found;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    if (a->ai_family == family) {
      pick = a;
      break;
    }
  }
  if (family == AF_INET6 && pick->ai_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(pick->ai_addr);
    sockaddr_in6 mapped{};
    mapped.sin6_family = AF_INET6;
    mapped.sin6_port = v4->sin_port;
    mapped.sin6_addr.s6_addr[10] = 0xff;
    mapped.sin6_addr.s6_addr[11] = 0xff;
    std::memcpy(&mapped.sin6_addr.s6_addr[12], &v4->sin_addr, 4);
    std::memcpy(&d.address, &mapped, sizeof mapped);
    d.length = sizeof mapped;
  } else {
    std::memcpy(&d.address, pick->ai_addr, pick->ai_addrlen);
    d.length = pick->ai_addrlen;
  }
  ::freeaddrinfo(found);
  return d;
}

struct PadUnref {
  void operator()(GstPad* pad) const { gst_object_unref(pad); }
};
using PadPtr = std::unique_ptr<GstPad, PadUnref>;

void set_receive_room(int fd) {
  // Room for bursts (a video key frame) while the thread waits for a CPU, as udpsrc's
  // buffer-size gave it; the kernel caps it at net.core.rmem_max.
  const int room = 4 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &room, sizeof room);
}

bool has_metas(GstBuffer* buffer) {
  gpointer state = nullptr;
  return gst_buffer_iterate_meta(buffer, &state) != nullptr;
}

// Datagrams read by one recvmmsg() call: a socket with one datagram waiting (the usual
// case: 50 packets a second per media) costs one call, without a second that says EAGAIN.
// Each datagram lands straight in the GstBuffer that goes into the element, and that
// buffer is used again once the element has let go of it (it has, when its chain
// returns, unless it holds the packet while its key is on its way): no allocation, fill
// and free per datagram. A datagram larger than a slot (a jumbo frame, a reassembled
// fragment) spills into a second area and gets a buffer of its own.
class ReceiveBatch {
 public:
  static constexpr std::size_t kDatagrams = 8;
  static constexpr std::size_t kSlot = 2048;   // an MTU-sized datagram and more
  static constexpr std::size_t kRoom = 65536;  // the largest UDP datagram
  static constexpr std::size_t kSpill = kRoom - kSlot;

  ReceiveBatch() : spill_(kDatagrams * kSpill) {
    for (std::size_t i = 0; i < kDatagrams; ++i) {
      headers_[i].msg_hdr.msg_iov = vectors_[i].data();
      headers_[i].msg_hdr.msg_iovlen = vectors_[i].size();
      vectors_[i][1] = {spill_.data() + i * kSpill, kSpill};
    }
  }
  ~ReceiveBatch() {
    for (Slot& slot : slots_) {
      if (slot.mapped) gst_buffer_unmap(slot.buffer, &slot.map);
      if (slot.buffer) gst_buffer_unref(slot.buffer);
    }
  }
  ReceiveBatch(const ReceiveBatch&) = delete;
  ReceiveBatch& operator=(const ReceiveBatch&) = delete;

  // Everything waiting on one socket into `feed`, bounded (64 datagrams) so that no
  // socket starves the others on its thread. Adds what it reads to `read` before pushing
  // it on (what a counter reports is never behind what was delivered); false when it
  // stopped at its bound with more possibly waiting.
  bool drain(int fd, GstPad* feed, const std::atomic<bool>& stopping,
             std::atomic<std::uint64_t>& read) {
    for (int round = 0; round < 8 && !stopping.load(std::memory_order_relaxed); ++round) {
      prepare();
      const int n = ::recvmmsg(fd, headers_.data(), kDatagrams, MSG_DONTWAIT, nullptr);
      if (n < 0) {
        if (errno == EINTR) continue;
        return true;  // EAGAIN: all read; other errors (ICMP reports) concern no datagram
      }
      read.store(read.load(std::memory_order_relaxed) + static_cast<std::uint64_t>(n),
                 std::memory_order_relaxed);
      for (std::size_t i = 0; i < static_cast<std::size_t>(n); ++i) {
        if (headers_[i].msg_hdr.msg_flags & MSG_TRUNC) continue;  // larger than UDP allows
        // FLUSHING while the elements stop; a refused datagram is counted by the element.
        (void)gst_pad_push(feed, take(i, headers_[i].msg_len));
      }
      if (static_cast<std::size_t>(n) < kDatagrams) return true;  // nothing more waiting
    }
    return stopping.load(std::memory_order_relaxed);
  }

 private:
  struct Slot {
    GstBuffer* buffer = nullptr;  // our reference
    GstMapInfo map{};
    bool mapped = false;
  };

  // Every slot mapped for writing, each in a buffer only we hold.
  void prepare() {
    for (std::size_t i = 0; i < kDatagrams; ++i) {
      Slot& slot = slots_[i];
      if (slot.mapped) continue;
      // Reused only as it was handed out: nobody else holds it, nothing was added to it.
      if (slot.buffer && (!gst_buffer_is_writable(slot.buffer) || has_metas(slot.buffer))) {
        gst_buffer_unref(slot.buffer);
        slot.buffer = nullptr;
      }
      if (slot.buffer) {
        GST_BUFFER_FLAGS(slot.buffer) = 0;
        gst_buffer_set_size(slot.buffer, kSlot);
      } else {
        slot.buffer = gst_buffer_new_allocate(nullptr, kSlot, nullptr);
      }
      slot.mapped = gst_buffer_map(slot.buffer, &slot.map, GST_MAP_WRITE);
      // Not mappable (no memory left): this slot takes nothing this round.
      vectors_[i][0] = {slot.mapped ? slot.map.data : nullptr, slot.mapped ? kSlot : 0};
    }
  }

  // The buffer for datagram `i` of `size` bytes, a reference for the element.
  GstBuffer* take(std::size_t i, std::size_t size) {
    Slot& slot = slots_[i];
    if (size <= kSlot && slot.mapped) {
      gst_buffer_unmap(slot.buffer, &slot.map);
      slot.mapped = false;
      gst_buffer_set_size(slot.buffer, static_cast<gssize>(size));
      return gst_buffer_ref(slot.buffer);
    }
    // Spilled: the slot's part, then the rest (the slot stays mapped for the next round).
    GstBuffer* own = gst_buffer_new_allocate(nullptr, size, nullptr);
    const std::size_t head = std::min(size, static_cast<std::size_t>(vectors_[i][0].iov_len));
    if (head > 0) gst_buffer_fill(own, 0, vectors_[i][0].iov_base, head);
    gst_buffer_fill(own, head, vectors_[i][1].iov_base, size - head);
    return own;
  }

  std::vector<std::uint8_t> spill_;
  std::array<Slot, kDatagrams> slots_{};
  std::array<std::array<iovec, 2>, kDatagrams> vectors_{};
  std::array<mmsghdr, kDatagrams> headers_{};
};

// Interrupt moderation for a busy media thread ([media] batch_window_us). Idle, a thread
// sleeps in epoll_wait and wakes for each datagram: about one datagram per wake-up at 20
// calls, and the sleep and wake-up (a context switch each way; on a VM, a halt and an
// interrupt through the hypervisor) cost more than the datagram's own work. A thread that
// can expect at least 3 datagrams within the window waits out the rest of the window
// after each wake-up instead, so that one wake-up reads what arrived meanwhile. A
// datagram waits at most one window (half on average); a quiet thread never waits. Why 3:
// the wait is a timer (armed, then fired: on a VM, two exits), which cost about what two
// datagram wake-ups do; measured with bench_sip, 2 per window saved nothing, 4 saved a
// fifth of the CPU.
class WakePacer {
 public:
  using Clock = std::chrono::steady_clock;
  explicit WakePacer(std::chrono::microseconds window) : window_(window) {}

  // After a wake-up at `woke` that read `datagrams`: returns when the next epoll_wait may
  // run (at once, or at the end of the window); true when it waited.
  bool pace(Clock::time_point woke, std::size_t datagrams) {
    if (window_.count() == 0) return false;
    counted_ += datagrams;
    // The rate over the last 100 ms or so decides, not one wake-up's luck.
    if (const auto elapsed = woke - period_start_; elapsed >= kPeriod) {
      const double per_window = static_cast<double>(counted_) *
                                std::chrono::duration<double>(window_).count() /
                                std::chrono::duration<double>(elapsed).count();
      busy_ = per_window >= kWorthWaitingFor;
      period_start_ = woke;
      counted_ = 0;
    }
    if (!busy_) return false;
    std::this_thread::sleep_until(woke + window_);
    return true;
  }

 private:
  static constexpr auto kPeriod = std::chrono::milliseconds(100);
  static constexpr double kWorthWaitingFor = 3;  // datagrams expected within the window
  std::chrono::microseconds window_;
  Clock::time_point period_start_ = Clock::now();
  std::uint64_t counted_ = 0;
  bool busy_ = false;
};

}  // namespace

struct MediaLoops::Impl {
  struct Inlet {
    int fd;
    GstPad* feed;  // a reference of our own; null once removed
  };
  struct Loop {
    int epoll_fd = -1;
    // The inlets vs. remove(): held while a batch of events is handled. An inlet removed
    // meanwhile is skipped and freed after the batch (its events may be in it).
    std::mutex mutex;
    std::unordered_map<std::uint64_t, std::unique_ptr<Inlet>> inlets;
    std::vector<std::unique_ptr<Inlet>> removed;
    int pin_cpu = -1;           // the CPU asked for, or -1
    std::optional<int> on_cpu;  // the CPU the thread is bound to; set before it runs
    // What thread_stats() reports: written by the thread only.
    std::atomic<std::uint64_t> wakeups{0}, datagrams{0}, paced{0};
    std::thread thread;
  };
  MediaScheduling* scheduling = nullptr;
  std::chrono::microseconds batch_window{0};
  std::vector<std::unique_ptr<Loop>> loops;
  int wake_fd = -1;  // readable once stopping: wakes every loop
  std::atomic<bool> stopping{false};
  std::atomic<std::uint64_t> next_id{0};
  std::atomic<std::size_t> next_loop{0};
  std::atomic<bool> warned_unpinned{false};

  ~Impl() {
    stopping = true;
    const std::uint64_t one = 1;
    if (wake_fd >= 0) (void)::write(wake_fd, &one, sizeof one);
    for (auto& loop : loops) {
      if (loop->thread.joinable()) loop->thread.join();
      for (auto& [id, inlet] : loop->inlets) gst_object_unref(inlet->feed);
      if (loop->epoll_fd >= 0) ::close(loop->epoll_fd);
    }
    if (wake_fd >= 0) ::close(wake_fd);
  }

  // Named (as top -H shows it) and scheduled as media threads are. A thread on a CPU of
  // its own is woken where it last ran: no migration, and a datagram sent from that CPU
  // wakes it without an inter-processor interrupt (on a VM, an exit to the hypervisor).
  // Only a thread raised above time-shared work is bound: one that is not would share
  // its CPU with whatever keeps it busy, with nowhere else to go.
  void run(Loop& loop, std::latch& running) {
    ::pthread_setname_np(::pthread_self(), "otp-media");
    const bool raised = !scheduling || scheduling->enter();
    if (loop.pin_cpu >= 0 && !raised) {
      if (!warned_unpinned.exchange(true)) {
        std::fprintf(stderr,
                     "otp-gateway[warning]: call media threads are not bound to CPUs of "
                     "their own ([media] pin_threads): they run time-shared (nice -10 needs "
                     "CAP_SYS_NICE or LimitNICE=-10 in the systemd unit), and a bound "
                     "time-shared thread could not leave a busy CPU\n");
      }
    } else if (loop.pin_cpu >= 0) {
      if (pin_current_thread(loop.pin_cpu)) {
        loop.on_cpu = loop.pin_cpu;
      } else {
        std::fprintf(stderr,
                     "otp-gateway[warning]: a call media thread cannot be bound to CPU %d "
                     "(not in the process's CPU set any more?); it runs wherever the kernel "
                     "puts it\n",
                     loop.pin_cpu);
      }
    }
    running.count_down();
    ReceiveBatch batch;
    WakePacer pacer(batch_window);
    std::array<epoll_event, 32> events{};
    const auto add = [](std::atomic<std::uint64_t>& counter, std::uint64_t n) {
      counter.store(counter.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    };
    while (!stopping.load()) {
      const int n = ::epoll_wait(loop.epoll_fd, events.data(), static_cast<int>(events.size()), -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        break;
      }
      // Only a pacer needs the time (a clock read per wake-up is measurable at 0).
      const auto woke =
          batch_window.count() != 0 ? WakePacer::Clock::now() : WakePacer::Clock::time_point{};
      add(loop.wakeups, 1);
      const std::uint64_t before = loop.datagrams.load(std::memory_order_relaxed);
      // A wake-up that hit a bound (32 ready sockets, 64 datagrams on one) may leave some
      // waiting: those are read at once, never a window later.
      bool all_read = static_cast<std::size_t>(n) < events.size();
      {
        const std::lock_guard lock(loop.mutex);
        for (std::size_t i = 0; i < static_cast<std::size_t>(n); ++i) {
          const auto* inlet = static_cast<const Inlet*>(events[i].data.ptr);
          if (inlet && inlet->feed) {
            all_read = batch.drain(inlet->fd, inlet->feed, stopping, loop.datagrams) && all_read;
          }
        }
        loop.removed.clear();
      }
      const std::uint64_t read = loop.datagrams.load(std::memory_order_relaxed) - before;
      if (all_read && !stopping.load() && pacer.pace(woke, read)) add(loop.paced, 1);
    }
    if (scheduling) scheduling->leave();
  }
};

MediaLoops::MediaLoops(std::size_t threads, std::vector<int> pin_cpus, MediaScheduling* scheduling,
                       std::chrono::microseconds batch_window)
    : impl_(std::make_unique<Impl>()) {
  Impl& r = *impl_;
  r.scheduling = scheduling;
  r.batch_window = batch_window;
  r.wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (r.wake_fd < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  for (std::size_t i = 0; i < std::max<std::size_t>(threads, 1); ++i) {
    auto& loop = *r.loops.emplace_back(std::make_unique<Impl::Loop>());  // ~Impl closes it
    loop.epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
    epoll_event wake{};
    wake.events = EPOLLIN;
    wake.data.ptr = nullptr;  // no inlet
    if (loop.epoll_fd < 0 || ::epoll_ctl(loop.epoll_fd, EPOLL_CTL_ADD, r.wake_fd, &wake) != 0) {
      throw std::runtime_error(std::string("epoll: ") + std::strerror(errno));
    }
    if (i < pin_cpus.size()) loop.pin_cpu = pin_cpus[i];
  }
  const auto count = static_cast<std::ptrdiff_t>(r.loops.size());
  std::latch running(count);
  std::ptrdiff_t started = 0;
  try {
    for (auto& loop : r.loops) {
      Impl::Loop* l = loop.get();
      l->thread = std::thread([&r, l, &running] { r.run(*l, running); });
      ++started;
    }
  } catch (...) {
    // The threads that run count down on `running`: it must outlive that. ~Impl stops
    // and joins them.
    running.count_down(count - started);
    running.wait();
    throw;
  }
  running.wait();
}

std::vector<MediaLoops::ThreadStats> MediaLoops::thread_stats() const {
  std::vector<ThreadStats> stats;
  for (const auto& loop : impl_->loops) {
    stats.push_back({loop->on_cpu, loop->wakeups.load(std::memory_order_relaxed),
                     loop->datagrams.load(std::memory_order_relaxed),
                     loop->paced.load(std::memory_order_relaxed)});
  }
  return stats;
}

std::chrono::microseconds MediaLoops::batch_window() const {
  return impl_->batch_window;
}

MediaLoops::~MediaLoops() = default;  // ~Impl stops and joins the threads

std::size_t MediaLoops::pick() {
  return impl_->next_loop++ % impl_->loops.size();
}

std::uint64_t MediaLoops::add(std::size_t loop_index, int fd, GstPad* feed) {
  Impl& r = *impl_;
  // The id names its loop: remove() finds it without a lookup table.
  const std::uint64_t id = r.next_id++ * r.loops.size() + loop_index % r.loops.size();
  Impl::Loop& loop = *r.loops[id % r.loops.size()];
  set_receive_room(fd);
  auto inlet = std::make_unique<Impl::Inlet>(Impl::Inlet{fd, GST_PAD(gst_object_ref(feed))});
  const std::lock_guard lock(loop.mutex);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = inlet.get();
  if (::epoll_ctl(loop.epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
    gst_object_unref(inlet->feed);
    throw std::runtime_error(std::string("epoll: ") + std::strerror(errno));
  }
  loop.inlets.emplace(id, std::move(inlet));
  return id;
}

void MediaLoops::remove(std::uint64_t id) {
  Impl& r = *impl_;
  Impl::Loop& loop = *r.loops[id % r.loops.size()];
  const std::lock_guard lock(loop.mutex);  // waits for a batch under way
  const auto found = loop.inlets.find(id);
  if (found == loop.inlets.end()) return;
  Impl::Inlet& inlet = *found->second;
  ::epoll_ctl(loop.epoll_fd, EPOLL_CTL_DEL, inlet.fd, nullptr);
  gst_object_unref(inlet.feed);
  inlet.feed = nullptr;
  loop.removed.push_back(std::move(found->second));
  loop.inlets.erase(found);
}

struct CallMediaPump::Impl {
  // Where one of the elements' output pads sends: its socket and its target.
  struct Outlet {
    int fd = -1;
    int family = AF_INET;
    Destination to;
    bool enabled = false;
  };
  // A socket the pump reads and the pad its datagrams go into.
  struct Inlet {
    int fd = -1;
    GstPad* feed = nullptr;  // one of the pads below
  };

  std::string name;
  std::vector<GstElement*> elements;  // references of our own
  std::vector<GSocket*> sockets;      // references of our own
  PadPtr to_encrypt, from_encrypt, to_decrypt, from_decrypt, from_decrypt_rtcp;
  MediaLoops* loops = nullptr;
  std::size_t loop = 0;                  // the one all of this media's sockets go on
  std::vector<Inlet> inlets;             // the endpoint's sockets, then the partner's
  std::vector<std::uint64_t> inlet_ids;  // in `loops`, once started
  std::mutex outlets_mutex;              // retarget() vs. the elements' pushes
  Outlet peer, deliver_rtp, deliver_rtcp;
  bool stopped = false;

  ~Impl() {
    for (GstPad* pad : {to_encrypt.get(), from_encrypt.get(), to_decrypt.get(), from_decrypt.get(),
                        from_decrypt_rtcp.get()}) {
      if (!pad) continue;
      if (GstPad* other = gst_pad_get_peer(pad)) {
        if (GST_PAD_IS_SRC(pad)) {
          gst_pad_unlink(pad, other);
        } else {
          gst_pad_unlink(other, pad);
        }
        gst_object_unref(other);
      }
      gst_pad_set_active(pad, FALSE);
    }
    for (GSocket* s : sockets) g_object_unref(s);
    for (GstElement* e : elements) gst_object_unref(e);
  }
  // What an element pushes out through `pad` leaves by the outlet the pad names.
  static GstFlowReturn chain(GstPad* pad, GstObject*, GstBuffer* buffer) {
    auto* self = static_cast<Impl*>(gst_pad_get_element_private(pad));
    Outlet* outlet = pad == self->from_encrypt.get()   ? &self->peer
                     : pad == self->from_decrypt.get() ? &self->deliver_rtp
                                                       : &self->deliver_rtcp;
    GstMapInfo map;
    if (gst_buffer_map(buffer, &map, GST_MAP_READ)) {
      Destination to;
      int fd = -1;
      {
        const std::lock_guard lock(self->outlets_mutex);
        if (outlet->enabled) {
          to = outlet->to;
          fd = outlet->fd;
        }
      }
      // A full socket buffer or an unreachable party loses this datagram only, as with
      // udpsink; the media goes on.
      if (fd >= 0) {
        (void)::sendto(fd, map.data, map.size, MSG_DONTWAIT,
                       reinterpret_cast<const sockaddr*>(&to.address), to.length);
      }
      gst_buffer_unmap(buffer, &map);
    }
    gst_buffer_unref(buffer);
    return GST_FLOW_OK;
  }

  static gboolean sink_event(GstPad*, GstObject*, GstEvent* event) {
    gst_event_unref(event);
    return TRUE;
  }

  // A pad of ours linked to `element`'s pad `element_pad`, active, with its events sent
  // (feeding pads: stream-start, caps, segment, as a source element would).
  GstPad* attach(GstElement* element, const char* element_pad, GstPadDirection direction,
                 const char* caps_name, PadPtr& slot) {
    GstPad* theirs = gst_element_get_static_pad(element, element_pad);
    if (!theirs) {
      throw std::runtime_error("call media " + name + ": element " + GST_ELEMENT_NAME(element) +
                               " has no pad " + element_pad);
    }
    const std::string pad_name = std::string("pump_") + element_pad;
    slot.reset(GST_PAD(gst_object_ref_sink(gst_pad_new(pad_name.c_str(), direction))));
    GstPad* ours = slot.get();
    gst_pad_set_element_private(ours, this);
    if (direction == GST_PAD_SINK) {
      gst_pad_set_chain_function(ours, chain);
      gst_pad_set_event_function(ours, sink_event);
    }
    const GstPadLinkReturn linked =
        direction == GST_PAD_SRC ? gst_pad_link_full(ours, theirs, GST_PAD_LINK_CHECK_NOTHING)
                                 : gst_pad_link_full(theirs, ours, GST_PAD_LINK_CHECK_NOTHING);
    gst_object_unref(theirs);
    if (linked != GST_PAD_LINK_OK) {
      throw std::runtime_error("call media " + name + ": cannot link to " +
                               GST_ELEMENT_NAME(element) + "'s pad " + element_pad);
    }
    gst_pad_set_active(ours, TRUE);
    if (direction == GST_PAD_SRC) {
      gst_pad_push_event(ours, gst_event_new_stream_start(pad_name.c_str()));
      GstCaps* caps = gst_caps_new_empty_simple(caps_name);
      gst_pad_push_event(ours, gst_event_new_caps(caps));
      gst_caps_unref(caps);
      GstSegment segment;
      gst_segment_init(&segment, GST_FORMAT_TIME);
      gst_pad_push_event(ours, gst_event_new_segment(&segment));
    }
    return ours;
  }

  int fd_of(GSocket* socket) {
    g_object_ref(socket);
    sockets.push_back(socket);
    return g_socket_get_fd(socket);
  }

  // An outlet sending from `socket` (symmetric RTP: the one that party sends to) to `to`.
  void open_outlet(Outlet& outlet, GSocket* socket, const Endpoint& to) {
    if (!socket) {
      throw std::runtime_error("call media " + name + ": no local socket to send to " + to.host +
                               ":" + std::to_string(to.port) + " from");
    }
    outlet.fd = fd_of(socket);
    outlet.family = g_socket_get_family(socket) == G_SOCKET_FAMILY_IPV6 ? AF_INET6 : AF_INET;
    outlet.to = resolve(to, outlet.family, name);
    outlet.enabled = true;
  }
};

CallMediaPump::CallMediaPump(std::string name, GstElement* encrypt, GstElement* decrypt,
                             const Sockets& sockets, const Targets& targets, MediaLoops& loops)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.name = std::move(name);
  m.loops = &loops;
  m.loop = loops.pick();
  if (encrypt) {
    m.elements.push_back(GST_ELEMENT(gst_object_ref(encrypt)));
    GstPad* feed = m.attach(encrypt, "sink", GST_PAD_SRC, "application/x-rtp", m.to_encrypt);
    m.attach(encrypt, "src", GST_PAD_SINK, nullptr, m.from_encrypt);
    // RTP and RTCP from the endpoint both go in: the element tells them apart.
    if (sockets.local_rtp) m.inlets.push_back({m.fd_of(sockets.local_rtp), feed});
    if (sockets.local_rtcp) m.inlets.push_back({m.fd_of(sockets.local_rtcp), feed});
    m.open_outlet(m.peer, sockets.peer, targets.peer);
  }
  if (decrypt) {
    m.elements.push_back(GST_ELEMENT(gst_object_ref(decrypt)));
    GstPad* feed = m.attach(decrypt, "sink", GST_PAD_SRC, "application/x-otp", m.to_decrypt);
    m.attach(decrypt, "src", GST_PAD_SINK, nullptr, m.from_decrypt);
    m.attach(decrypt, "rtcp_src", GST_PAD_SINK, nullptr, m.from_decrypt_rtcp);
    if (sockets.peer) m.inlets.push_back({m.fd_of(sockets.peer), feed});
    m.open_outlet(m.deliver_rtp, sockets.local_rtp, targets.deliver_rtp);
    if (targets.deliver_rtcp) {
      // With rtcp-mux (the endpoint's RTCP port is its RTP port) from the RTP port too.
      const bool muxed = targets.deliver_rtcp->port == targets.deliver_rtp.port;
      m.open_outlet(m.deliver_rtcp, muxed ? sockets.local_rtp : sockets.local_rtcp,
                    *targets.deliver_rtcp);
    }
  }
}

CallMediaPump::~CallMediaPump() {
  stop();
}

void CallMediaPump::start() {
  Impl& m = *impl_;
  if (m.stopped || !m.inlet_ids.empty()) return;
  try {
    for (const auto& inlet : m.inlets) {
      m.inlet_ids.push_back(m.loops->add(m.loop, inlet.fd, inlet.feed));
    }
  } catch (const std::runtime_error& e) {
    stop();
    throw std::runtime_error("call media " + m.name + ": cannot watch its sockets (" + e.what() +
                             ")");
  }
}

void CallMediaPump::stop() {
  Impl& m = *impl_;
  m.stopped = true;
  for (const std::uint64_t id : m.inlet_ids) m.loops->remove(id);  // never pushed into again
  m.inlet_ids.clear();
}

void CallMediaPump::retarget(const Targets& targets) {
  Impl& m = *impl_;
  // Resolved before the lock: a name lookup never holds up the media.
  std::optional<Destination> peer, rtp, rtcp;
  if (m.peer.fd >= 0) peer = resolve(targets.peer, m.peer.family, m.name);
  if (m.deliver_rtp.fd >= 0) rtp = resolve(targets.deliver_rtp, m.deliver_rtp.family, m.name);
  if (m.deliver_rtcp.fd >= 0 && targets.deliver_rtcp) {
    rtcp = resolve(*targets.deliver_rtcp, m.deliver_rtcp.family, m.name);
  }
  const std::lock_guard lock(m.outlets_mutex);
  if (peer) m.peer.to = *peer;
  if (rtp) m.deliver_rtp.to = *rtp;
  if (m.deliver_rtcp.fd >= 0) {
    m.deliver_rtcp.enabled = rtcp.has_value();
    if (rtcp) m.deliver_rtcp.to = *rtcp;
  }
}

}  // namespace otpgate::gateway

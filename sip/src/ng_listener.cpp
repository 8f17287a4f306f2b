// SPDX-License-Identifier: LGPL-2.1-or-later
// The ng control socket: one UDP socket, one thread polling it and an eventfd that stops
// it. Datagrams are answered in arrival order, so a retransmission that arrives while its
// original is being handled finds the reply in the cache.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <system_error>
#include <thread>

#include "otpgate/sip.hpp"

namespace otpgate::ng {

namespace {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

[[noreturn]] void fail(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

std::string sender_host(const sockaddr_storage& from) {
  std::array<char, INET6_ADDRSTRLEN> host{};
  if (from.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in&>(from).sin_addr, host.data(),
              host.size());
  } else if (from.ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6&>(from).sin6_addr, host.data(),
              host.size());
  }
  return plain_address(host.data());
}

std::string sender_name(const sockaddr_storage& from) {
  std::array<char, INET6_ADDRSTRLEN> host{};
  std::uint16_t port = 0;
  if (from.ss_family == AF_INET) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(from);
    inet_ntop(AF_INET, &a.sin_addr, host.data(), host.size());
    port = ntohs(a.sin_port);
  } else if (from.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(from);
    inet_ntop(AF_INET6, &a.sin6_addr, host.data(), host.size());
    port = ntohs(a.sin6_port);
  }
  return std::string(host.data()) + '/' + std::to_string(port);
}

int bound_socket(const std::string& address, std::uint16_t port) {
  sockaddr_storage where{};
  socklen_t length = 0;
  auto& v4 = reinterpret_cast<sockaddr_in&>(where);
  auto& v6 = reinterpret_cast<sockaddr_in6&>(where);
  if (inet_pton(AF_INET, address.c_str(), &v4.sin_addr) == 1) {
    v4.sin_family = AF_INET;
    v4.sin_port = htons(port);
    length = sizeof v4;
  } else if (inet_pton(AF_INET6, address.c_str(), &v6.sin6_addr) == 1) {
    v6.sin6_family = AF_INET6;
    v6.sin6_port = htons(port);
    length = sizeof v6;
  } else {
    throw std::invalid_argument("ng listener: \"" + address +
                                "\" is not a numeric IPv4 or IPv6 address");
  }
  const int fd = ::socket(where.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("ng listener: socket");
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&where), length) != 0) {
    const int error = errno;
    ::close(fd);
    errno = error;
    fail("ng listener: cannot bind UDP " + address + " port " + std::to_string(port));
  }
  return fd;
}

}  // namespace

std::string plain_address(std::string_view address) {
  constexpr std::string_view mapped = "::ffff:";
  if (address.size() > mapped.size() && address.substr(0, mapped.size()) == mapped &&
      address.find('.') != std::string_view::npos) {
    return std::string(address.substr(mapped.size()));
  }
  return std::string(address);
}

bool is_loopback_address(std::string_view address) {
  const std::string plain = plain_address(address);
  in_addr v4{};
  in6_addr v6{};
  return (inet_pton(AF_INET, plain.c_str(), &v4) == 1 && (ntohl(v4.s_addr) >> 24) == 127) ||
         (inet_pton(AF_INET6, plain.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6));
}

bool Clients::allows(std::string_view address) const {
  if (loopback && is_loopback_address(address)) return true;
  return std::find(addresses.begin(), addresses.end(), plain_address(address)) != addresses.end();
}

// Lines about unlisted sources: once per source every 10 minutes, at most 10 a minute.
class UnlistedLog {
 public:
  using Clock = std::chrono::steady_clock;
  bool should_log(const std::string& source, Clock::time_point now) {
    if (now - minute_start_ >= std::chrono::minutes(1)) {
      minute_start_ = now;
      lines_this_minute_ = 0;
    }
    const auto it = last_.find(source);
    if (it != last_.end() && now - it->second < std::chrono::minutes(10)) return false;
    if (lines_this_minute_ >= 10) return false;
    if (last_.size() >= 4096)
      std::erase_if(last_,
                    [&](const auto& e) { return now - e.second >= std::chrono::minutes(10); });
    if (last_.size() >= 4096) return false;
    last_[source] = now;
    ++lines_this_minute_;
    return true;
  }

 private:
  std::map<std::string, Clock::time_point> last_;
  Clock::time_point minute_start_{};
  int lines_this_minute_ = 0;
};

struct Listener::Impl {
  Impl(Handler& handler, const std::string& address, std::uint16_t port, ListenerOptions opts)
      : socket(bound_socket(address, port)),
        wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
        options(std::move(opts)),
        processor(handler) {
    if (wake.get() < 0) fail("ng listener: eventfd");
    if (options.log) processor.set_refusal_log(options.log);
    thread = std::jthread([this] { run(); });
  }

  ~Impl() {
    const std::uint64_t one = 1;
    if (::write(wake.get(), &one, sizeof one) < 0) {
      // The eventfd cannot be full; nothing else to do in a destructor.
    }
    if (thread.joinable()) thread.join();
  }

  void run() {
    ::pthread_setname_np(::pthread_self(), "otp-ng");
    std::vector<char> buffer(65536);
    std::array<pollfd, 2> fds{pollfd{socket.get(), POLLIN, 0}, pollfd{wake.get(), POLLIN, 0}};
    for (;;) {
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents != 0) return;
      if ((fds[0].revents & POLLIN) == 0) continue;
      sockaddr_storage from{};
      socklen_t from_length = sizeof from;
      const ssize_t n = ::recvfrom(socket.get(), buffer.data(), buffer.size(), MSG_DONTWAIT,
                                   reinterpret_cast<sockaddr*>(&from), &from_length);
      if (n < 0) continue;  // EAGAIN, or an ICMP error from an earlier reply
      if (const std::string host = sender_host(from); !options.clients.allows(host)) {
        // Not the proxy: no reply (a reply would confirm the socket to a scanner, and
        // could be aimed at a third party with a forged source), counted, logged.
        ++processor.unlisted();
        if (options.log && unlisted_log.should_log(host, UnlistedLog::Clock::now())) {
          options.log("ng datagram from " + host +
                      ", which is not among sip.ng_clients: ignored (further ones from it are "
                      "counted, not logged, for 10 minutes)");
        }
        continue;
      }
      const auto reply =
          processor.process(std::string_view(buffer.data(), static_cast<std::size_t>(n)),
                            sender_name(from), ReplyCache::Clock::now());
      if (reply) {
        // A reply that cannot be sent (the proxy went away) is lost like a datagram; the
        // proxy retransmits and gets it from the cache.
        (void)::sendto(socket.get(), reply->data(), reply->size(), MSG_DONTWAIT,
                       reinterpret_cast<const sockaddr*>(&from), from_length);
      }
    }
  }

  Fd socket;
  Fd wake;
  ListenerOptions options;
  UnlistedLog unlisted_log;
  Processor processor;
  std::jthread thread;  // last: stops before the members it uses go
};

Listener::Listener(Handler& handler, const std::string& address, std::uint16_t port,
                   ListenerOptions options)
    : impl_(std::make_unique<Impl>(handler, address, port, std::move(options))) {}

Listener::~Listener() = default;

std::uint16_t Listener::port() const {
  sockaddr_storage where{};
  socklen_t length = sizeof where;
  if (::getsockname(impl_->socket.get(), reinterpret_cast<sockaddr*>(&where), &length) != 0)
    return 0;
  if (where.ss_family == AF_INET)
    return ntohs(reinterpret_cast<const sockaddr_in&>(where).sin_port);
  return ntohs(reinterpret_cast<const sockaddr_in6&>(where).sin6_port);
}

const Counters& Listener::counters() const {
  return impl_->processor.counters();
}

}  // namespace otpgate::ng

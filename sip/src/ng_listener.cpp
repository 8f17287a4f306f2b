// SPDX-License-Identifier: LGPL-2.1-or-later
// The ng control socket: one UDP socket, one thread polling it and an eventfd that stops
// it. Datagrams are answered in arrival order, so a retransmission that arrives while its
// original is being handled finds the reply in the cache.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
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

struct Listener::Impl {
  Impl(Handler& handler, const std::string& address, std::uint16_t port)
      : socket(bound_socket(address, port)),
        wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
        processor(handler) {
    if (wake.get() < 0) fail("ng listener: eventfd");
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
  Processor processor;
  std::jthread thread;  // last: stops before the members it uses go
};

Listener::Listener(Handler& handler, const std::string& address, std::uint16_t port)
    : impl_(std::make_unique<Impl>(handler, address, port)) {}

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

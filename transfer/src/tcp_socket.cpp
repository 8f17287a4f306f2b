// SPDX-License-Identifier: LGPL-2.1-or-later
// See tcp_socket.hpp.
#include "tcp_socket.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

namespace otpgate::transfer::detail {

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd >= 0) ::close(fd);
    fd = o.fd;
    o.fd = -1;
  }
  return *this;
}
Fd::~Fd() {
  if (fd >= 0) ::close(fd);
}

Fd connect_tcp(const Endpoint& peer, std::chrono::milliseconds timeout) {
  const std::string where = peer.host + ":" + std::to_string(peer.port);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc =
          getaddrinfo(peer.host.c_str(), std::to_string(peer.port).c_str(), &hints, &found);
      rc != 0) {
    throw std::runtime_error("cannot resolve the receiving site " + where + ": " +
                             gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(found, freeaddrinfo);
  std::string reason = "no address";
  for (addrinfo* a = found; a; a = a->ai_next) {
    Fd s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol));
    if (!s) continue;
    if (::connect(s.fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      reason = std::strerror(errno);
      continue;
    }
    pollfd p{s.fd, POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) {
      reason = "timed out";
      continue;
    }
    int error = 0;
    socklen_t len = sizeof error;
    getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &error, &len);
    if (error != 0) {
      reason = std::strerror(error);
      continue;
    }
    const int flags = fcntl(s.fd, F_GETFL);
    fcntl(s.fd, F_SETFL, flags & ~O_NONBLOCK);
    const int one = 1;
    setsockopt(s.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
  }
  throw std::runtime_error("cannot connect to the receiving site " + where + ": " + reason +
                           " (is `otp-transfer serve` running there? check peer.transfer)");
}

Fd listen_tcp(const Endpoint& where) {
  const std::string text = where.host + ":" + std::to_string(where.port);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (getaddrinfo(where.host.c_str(), std::to_string(where.port).c_str(), &hints, &found) != 0)
    throw std::runtime_error("cannot resolve listen address " + text);
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(found, freeaddrinfo);
  Fd s(::socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC, found->ai_protocol));
  const int one = 1;
  setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (!s || ::bind(s.fd, found->ai_addr, found->ai_addrlen) != 0 || ::listen(s.fd, 16) != 0) {
    throw std::runtime_error("cannot listen on " + text + ": " + std::strerror(errno) +
                             " (is another otp-transfer serve running? change transfer.listen)");
  }
  return s;
}

std::uint16_t local_port(int fd) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

bool write_all(int fd, std::span<const std::uint8_t> bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes = bytes.subspan(static_cast<std::size_t>(n));
  }
  return true;
}

bool read_exact(int fd, std::uint8_t* out, std::size_t n, Clock::time_point deadline) {
  while (n > 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) != 1) return false;
    const ssize_t got = ::recv(fd, out, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    out += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}

}  // namespace otpgate::transfer::detail

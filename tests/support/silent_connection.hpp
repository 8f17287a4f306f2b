// SPDX-License-Identifier: LGPL-2.1-or-later
// A client that connects to a local TCP service, sends `bytes` (or nothing) and then
// stays silent: the idle or slow clients an HTTP edge must not be starved by.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <string>

namespace otpgate::testing {

// The connected socket (close it when done), or -1.
inline int silent_connection(std::uint16_t port, const std::string& bytes = {}) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  if (!bytes.empty()) (void)::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  return fd;
}

}  // namespace otpgate::testing

// SPDX-License-Identifier: LGPL-2.1-or-later
// TCP sockets between the sites: an owned descriptor, connecting and listening with
// errors that say what to check, and whole reads and writes.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>

#include "clock.hpp"
#include "otpgate/transfer.hpp"

namespace otpgate::transfer::detail {

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept;
  ~Fd();
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  explicit operator bool() const { return fd >= 0; }
};

// TCP connection to host:port; throws std::runtime_error naming the peer and the reason.
Fd connect_tcp(const Endpoint& peer, std::chrono::milliseconds timeout);
Fd listen_tcp(const Endpoint& where);  // throws naming the address
std::uint16_t local_port(int fd);
bool write_all(int fd, std::span<const std::uint8_t> bytes);  // false on error/closed
// Reads exactly `n` bytes by `deadline`; false on EOF, error or timeout.
bool read_exact(int fd, std::uint8_t* out, std::size_t n, Clock::time_point deadline);

}  // namespace otpgate::transfer::detail

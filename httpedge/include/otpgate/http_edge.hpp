// SPDX-License-Identifier: LGPL-2.1-or-later
// The edge every otpgate HTTP server shares (cpp-httplib): which host names a request
// may use, cross-site checks, timeouts, body limits and a connection gate.
#pragma once

#include <httplib.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace otpgate::http_edge {

// The names a service answers to: loopback, the address it listens on (unless that is
// every address) and configured server names, each with the service's own port. A page
// on a name an attacker controls (DNS rebinding) sends that name as Host, whatever
// address it resolves to, and is refused.
class ServiceNames {
 public:
  ServiceNames(std::string listen_host, std::vector<std::string> server_names, bool tls);
  void set_port(std::uint16_t port) { port_ = port; }  // once bound
  // "name[:port]" (a Host header) names this service.
  bool names_this_service(std::string_view host_port) const;
  // An Origin header of this service: the same scheme, a name of it and its port.
  bool is_own_origin(std::string_view origin) const;

 private:
  std::string listen_host_;
  std::vector<std::string> server_names_;  // lower case
  bool tls_;
  std::uint16_t port_ = 0;
};

struct Limits {
  // Connections served at once, one thread each; more wait for a free one. Idle and slow
  // clients hold a thread at most `idle_timeout` (before a request) or `read_timeout`
  // (per read within one).
  std::size_t max_connections = 256;
  std::chrono::seconds idle_timeout{2};
  std::chrono::seconds read_timeout{5};
  std::chrono::seconds write_timeout{5};
  std::size_t max_body_bytes = 1u << 20;
};

// Applies `limits` to `server` and binds it to host:port (0: any free port): timeouts,
// the body limit, a connection gate in place of httplib's fixed pool (8 threads here,
// each held 5 s by one idle connection: 64 idle clients kept an API unanswered for 40 s),
// and a listen backlog of SOMAXCONN instead of httplib's 5 (a burst of connections made
// every further client wait for SYN retries, a second or more each). Returns the bound
// port, or -1 when the address cannot be bound. Then call listen_after_bind().
int bind(httplib::Server& server, const std::string& host, int port, const Limits& limits);

// Client-supplied text quoted back in an error, at most `max` bytes (and "...").
std::string clipped(std::string_view text, std::size_t max = 100);

}  // namespace otpgate::http_edge

// SPDX-License-Identifier: LGPL-2.1-or-later
// The status API's edge: 64 idle and 64 half-sent connections do not keep it from
// answering, and a request naming a host that is not this service (DNS rebinding) is
// refused with a line that says what to configure.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <string>
#include <vector>

#include "gateway_fixture.hpp"
#include "silent_connection.hpp"

namespace {

using otpgate::testing::silent_connection;

httplib::Result get_with_host(std::uint16_t port, const std::string& host, const char* path) {
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(3, 0);
  client.set_read_timeout(3, 0);
  return client.Get(path, {{"Host", host}});
}

}  // namespace

TEST_F(GatewayTest, IdleAndHalfSentConnectionsDoNotStarveTheStatusApi) {
  start();
  const std::uint16_t port = a_->status_port();
  std::vector<int> held;
  for (int i = 0; i < 64; ++i) held.push_back(silent_connection(port, ""));
  for (int i = 0; i < 64; ++i)
    held.push_back(silent_connection(port, "GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1"));
  ASSERT_EQ(std::count(held.begin(), held.end(), -1), 0);
  // With httplib's defaults (a backlog of 5, 8 threads each held 5 s by one idle
  // connection) connecting alone took 16 s and the answer came after about 40 s; the 3 s
  // client timeout turns that into a failure.
  auto res = get_with_host(port, "127.0.0.1:" + std::to_string(port), "/api/v1/status");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  for (int fd : held) ::close(fd);
}

TEST_F(GatewayTest, TheStatusApiAnswersOnlyToItsOwnNames) {
  start([](std::string& a, std::string&) {
    a.replace(a.find("[status]\n"), 9, "[status]\nserver_names = [\"gw-a.example\"]\n");
  });
  const std::uint16_t port = a_->status_port();
  const std::string p = ":" + std::to_string(port);
  for (const std::string& host : std::vector<std::string>{"127.0.0.1" + p, "localhost" + p,
                                                          "gw-a.example" + p, "GW-A.example" + p}) {
    auto res = get_with_host(port, host, "/metrics");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << host;
  }
  for (const std::string& host : std::vector<std::string>{"attacker.example" + p, "gw-a.example:1",
                                                          "gw-a.example", "127.0.0.1" + p + "0"}) {
    auto res = get_with_host(port, host, "/api/v1/status");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 403) << host;
    EXPECT_NE(res->body.find("not a name of this service (add it to status.server_names)"),
              std::string::npos)
        << res->body;
  }
}

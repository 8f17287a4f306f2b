// SPDX-License-Identifier: LGPL-2.1-or-later
// The ng listener over a real UDP socket on loopback: ping, an offer and its
// retransmission (one execution, identical replies), garbage, a flood of junk, IPv6.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <ifaddrs.h>
#include <array>
#include <mutex>
#include <optional>
#include <string>

#include "ng_test_handler.hpp"
#include "otpgate/sip.hpp"

namespace ng = otpgate::ng;
using otpgate::test::RecordingHandler;

namespace {

// A proxy's end of the control socket (as Kamailio's rtpengine module holds one per process).
class Proxy {
 public:
  Proxy(int family, std::uint16_t port) : family_(family) {
    fd_ = ::socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (family == AF_INET) {
      auto& a = reinterpret_cast<sockaddr_in&>(to_);
      a.sin_family = AF_INET;
      a.sin_port = htons(port);
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      length_ = sizeof a;
    } else {
      auto& a = reinterpret_cast<sockaddr_in6&>(to_);
      a.sin6_family = AF_INET6;
      a.sin6_port = htons(port);
      a.sin6_addr = in6addr_loopback;
      length_ = sizeof a;
    }
  }
  ~Proxy() { ::close(fd_); }
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // Sends from this IPv4 address instead of the one the kernel picks.
  bool bind_to(const char* address) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    ::inet_pton(AF_INET, address, &a.sin_addr);
    return ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  void send(std::string_view datagram) {
    ASSERT_EQ(::sendto(fd_, datagram.data(), datagram.size(), 0, reinterpret_cast<sockaddr*>(&to_),
                       length_),
              static_cast<ssize_t>(datagram.size()));
  }
  // The next reply within a generous bound (nullopt: none came).
  std::optional<std::string> receive(int timeout_ms = 5000) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return std::nullopt;
    std::array<char, 65536> buffer{};
    const ssize_t n = ::recv(fd_, buffer.data(), buffer.size(), 0);
    if (n < 0) return std::nullopt;
    return std::string(buffer.data(), static_cast<std::size_t>(n));
  }
  std::optional<std::string> call(std::string_view datagram) {
    send(datagram);
    return receive();
  }

 private:
  int family_;
  int fd_ = -1;
  sockaddr_storage to_{};
  socklen_t length_ = 0;
};

std::string bstr(std::string_view s) {
  return std::to_string(s.size()) + ":" + std::string(s);
}

const std::string kSdp =
    "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
    "m=audio 10000 RTP/AVP 96\r\na=rtpmap:96 opus/48000/2\r\na=sendrecv\r\n";

std::string offer(std::string_view cookie) {
  return std::string(cookie) + " d3:sdp" + bstr(kSdp) +
         "13:received-froml3:IP49:127.0.0.1e7:call-id6:call-18:from-tag2:ft7:command5:offere";
}

}  // namespace

TEST(NgListener, AnswersPingAndOfferOverUdp) {
  RecordingHandler handler;
  ng::Listener listener(handler, "127.0.0.1", 0);
  ASSERT_NE(listener.port(), 0);
  Proxy proxy(AF_INET, listener.port());
  EXPECT_EQ(proxy.call("5323_1 d7:command4:pinge"), "5323_1 d6:result4:ponge");
  const auto reply = proxy.call(offer("4711_1"));
  ASSERT_TRUE(reply);
  EXPECT_TRUE(reply->starts_with("4711_1 d6:result2:ok3:sdp")) << *reply;
  EXPECT_NE(reply->find("m=audio 30000 RTP/AVP 96\r\n"), std::string::npos);
  EXPECT_EQ(handler.offers.size(), 1u);
}

TEST(NgListener, RetransmittedCookieGetsTheIdenticalReplyAndRunsOnce) {
  RecordingHandler handler;
  ng::Listener listener(handler, "127.0.0.1", 0);
  Proxy proxy(AF_INET, listener.port());
  // Kamailio sends, hears nothing in time, sends the same bytes again; both replies reach it.
  proxy.send(offer("4711_2"));
  proxy.send(offer("4711_2"));
  const auto first = proxy.receive();
  const auto second = proxy.receive();
  ASSERT_TRUE(first && second);
  EXPECT_EQ(*first, *second);
  {
    const std::lock_guard lock(handler.mutex);
    EXPECT_EQ(handler.offers.size(), 1u);
  }
  EXPECT_EQ(listener.counters().retransmissions, 1u);
  // The next offer is a new command with new ports.
  const auto third = proxy.call(offer("4711_3"));
  ASSERT_TRUE(third);
  EXPECT_NE(third->find("m=audio 30002 "), std::string::npos);
}

TEST(NgListener, GarbageGetsAnErrorOrNothingAndTheListenerGoesOn) {
  RecordingHandler handler;
  ng::Listener listener(handler, "127.0.0.1", 0);
  Proxy proxy(AF_INET, listener.port());
  EXPECT_EQ(proxy.call("9_1 this is not bencode"),
            "9_1 d12:error-reason" +
                bstr("malformed message: bencode: unexpected 't' where a value starts at byte 0") +
                "6:result5:errore");
  EXPECT_EQ(proxy.call("9_2 d7:command6:launche"),
            "9_2 d12:error-reason" + bstr("unknown command \"launch\"") + "6:result5:errore");
  // No cookie: nothing to answer, nothing sent.
  proxy.send("garbage-without-a-space");
  EXPECT_EQ(proxy.receive(300), std::nullopt);
  // Random bytes and deep nesting, then a ping still answers.
  std::string junk;
  for (int i = 0; i < 2000; ++i) junk += static_cast<char>((i * 7919) & 0xff);
  proxy.send("9_3 " + junk);
  proxy.send("9_4 " + std::string(60000, 'l'));
  proxy.send(std::string(1, '\0'));
  EXPECT_TRUE(proxy.receive());
  EXPECT_TRUE(proxy.receive());
  EXPECT_EQ(proxy.call("9_5 d7:command4:pinge"), "9_5 d6:result4:ponge");
  EXPECT_EQ(listener.counters().dropped, 2u);
  EXPECT_EQ(listener.counters().errors, 4u);
}

TEST(NgListener, ListensOnIpv6) {
  RecordingHandler handler;
  std::optional<ng::Listener> v6;
  try {
    v6.emplace(handler, "::1", 0);
  } catch (const std::system_error& e) {
    GTEST_SKIP() << "no IPv6 loopback here: " << e.what();
  }
  Proxy proxy(AF_INET6, v6->port());
  EXPECT_EQ(proxy.call("1 d7:command4:pinge"), "1 d6:result4:ponge");
}

TEST(NgListener, RefusesAHostName) {
  RecordingHandler handler;
  EXPECT_THROW(ng::Listener(handler, "localhost", 0), std::invalid_argument);
}

TEST(NgListener, BindFailureNamesTheAddress) {
  RecordingHandler handler;
  ng::Listener first(handler, "127.0.0.1", 0);
  try {
    ng::Listener second(handler, "127.0.0.1", first.port());
    FAIL() << "bound the same port twice";
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot bind UDP 127.0.0.1 port " +
                                         std::to_string(first.port())),
              std::string::npos)
        << e.what();
  }
}

// Only the proxy may drive the gateway: a datagram from a source that is not a client gets
// no reply, runs nothing, is counted, and is logged once per source.
TEST(NgListener, DatagramsFromSourcesThatAreNotClientsAreIgnored) {
  RecordingHandler handler;
  std::mutex log_mutex;
  std::vector<std::string> lines;
  ng::ListenerOptions options;
  options.clients.loopback = false;
  options.clients.addresses = {"127.0.0.1"};
  options.log = [&](const std::string& line) {
    const std::lock_guard lock(log_mutex);
    lines.push_back(line);
  };
  ng::Listener listener(handler, "127.0.0.1", 0, options);
  Proxy stranger(AF_INET, listener.port());
  ASSERT_TRUE(stranger.bind_to("127.0.0.2"));
  stranger.send(offer("66_1"));
  stranger.send("66_2 d7:command4:pinge");
  EXPECT_EQ(stranger.receive(500), std::nullopt);
  Proxy proxy(AF_INET, listener.port());
  ASSERT_TRUE(proxy.bind_to("127.0.0.1"));
  EXPECT_EQ(proxy.call("1_1 d7:command4:pinge"), "1_1 d6:result4:ponge");
  {
    const std::lock_guard lock(handler.mutex);
    EXPECT_TRUE(handler.offers.empty());
  }
  EXPECT_EQ(listener.counters().unlisted, 2u);
  EXPECT_EQ(listener.counters().datagrams, 1u);  // the proxy's ping only
  const std::lock_guard lock(log_mutex);
  ASSERT_EQ(lines.size(), 1u);  // once per source
  EXPECT_EQ(lines[0],
            "ng datagram from 127.0.0.2, which is not among sip.ng_clients: ignored (further ones "
            "from it are counted, not logged, for 10 minutes)");
}

TEST(NgClients, LoopbackAndListedAddressesIncludingMappedOnes) {
  ng::Clients loopback;  // the default
  EXPECT_TRUE(loopback.allows("127.0.0.1"));
  EXPECT_TRUE(loopback.allows("127.8.9.10"));
  EXPECT_TRUE(loopback.allows("::1"));
  EXPECT_TRUE(loopback.allows("::ffff:127.0.0.1"));
  EXPECT_FALSE(loopback.allows("10.0.0.2"));
  EXPECT_FALSE(loopback.allows("::ffff:10.0.0.2"));
  EXPECT_FALSE(loopback.allows("128.0.0.1"));
  const ng::Clients listed{false, {"10.0.0.2", "2001:db8::5"}};
  EXPECT_TRUE(listed.allows("10.0.0.2"));
  EXPECT_TRUE(listed.allows("::ffff:10.0.0.2"));
  EXPECT_TRUE(listed.allows("2001:db8::5"));
  EXPECT_FALSE(listed.allows("127.0.0.1"));
  EXPECT_FALSE(listed.allows("10.0.0.20"));
}

// The default (loopback only) refuses a source on another interface of the same host.
TEST(NgListener, ByDefaultOnlyLoopbackSourcesAreClients) {
  std::string own;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) == 0) {
    for (const ifaddrs* i = list; i && own.empty(); i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
      std::array<char, INET_ADDRSTRLEN> text{};
      ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr,
                  text.data(), text.size());
      if (!std::string_view(text.data()).starts_with("127.")) own = text.data();
    }
    ::freeifaddrs(list);
  }
  if (own.empty()) GTEST_SKIP() << "no IPv4 address besides loopback here";
  RecordingHandler handler;
  ng::Listener listener(handler, "127.0.0.1", 0);
  Proxy outside(AF_INET, listener.port());
  ASSERT_TRUE(outside.bind_to(own.c_str()));
  outside.send("1_1 d7:command4:pinge");
  EXPECT_EQ(outside.receive(500), std::nullopt) << "from " << own;
  EXPECT_EQ(listener.counters().unlisted, 1u);
  Proxy inside(AF_INET, listener.port());
  EXPECT_EQ(inside.call("1_2 d7:command4:pinge"), "1_2 d6:result4:ponge");
}

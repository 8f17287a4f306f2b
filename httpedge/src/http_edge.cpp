// SPDX-License-Identifier: LGPL-2.1-or-later
#include "otpgate/http_edge.hpp"

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include <sys/socket.h>

namespace otpgate::http_edge {

namespace {

std::string lower(std::string_view text) {
  std::string out(text);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

// httplib hands every accepted connection to a TaskQueue. This one runs each on its own
// thread, up to `max_threads` at once (threads are made as needed and kept for reuse);
// beyond that connections wait in order. Shutdown finishes what runs and joins.
class ConnectionGate final : public httplib::TaskQueue {
 public:
  explicit ConnectionGate(std::size_t max_threads) : max_threads_(max_threads) {}
  ~ConnectionGate() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::lock_guard lock(mutex_);
    jobs_.push_back(std::move(fn));
    if (idle_ == 0 && threads_.size() < max_threads_) {
      threads_.emplace_back([this] { work(); });
    } else {
      changed_.notify_one();
    }
  }

  void shutdown() override {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    changed_.notify_all();
    for (auto& t : threads_) t.join();  // enqueue is no longer called once shut down
  }

 private:
  void work() {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (jobs_.empty()) {
        ++idle_;
        changed_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        --idle_;
        if (jobs_.empty()) return;  // stopping
      }
      auto fn = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
    }
  }

  const std::size_t max_threads_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  std::size_t idle_ = 0;
  bool stopping_ = false;
};

}  // namespace

ServiceNames::ServiceNames(std::string listen_host, std::vector<std::string> server_names, bool tls)
    : listen_host_(lower(listen_host)), tls_(tls) {
  for (auto& n : server_names) server_names_.push_back(lower(n));
}

bool ServiceNames::names_this_service(std::string_view host_port) const {
  std::string name(host_port), port;
  if (!name.empty() && name.front() == '[') {  // [v6]:port
    const auto close = name.find(']');
    if (close == std::string::npos) return false;
    port = close + 1 < name.size() && name[close + 1] == ':' ? name.substr(close + 2) : "";
    if (close + 1 < name.size() && name[close + 1] != ':') return false;
    name = name.substr(0, close + 1);
  } else if (const auto colon = name.rfind(':'); colon != std::string::npos) {
    port = name.substr(colon + 1);
    name = name.substr(0, colon);
  }
  const std::string default_port = tls_ ? "443" : "80";
  if ((port.empty() ? default_port : port) != std::to_string(port_)) return false;
  name = lower(name);
  if (name == "localhost" || name == "127.0.0.1" || name == "[::1]") return true;
  const bool every_address = listen_host_ == "0.0.0.0" || listen_host_ == "::";
  if (!every_address && (name == listen_host_ || name == "[" + listen_host_ + "]")) return true;
  return std::find(server_names_.begin(), server_names_.end(), name) != server_names_.end();
}

bool ServiceNames::is_own_origin(std::string_view origin) const {
  const std::string_view scheme = tls_ ? "https://" : "http://";
  return origin.substr(0, scheme.size()) == scheme &&
         names_this_service(origin.substr(scheme.size()));
}

int bind(httplib::Server& server, const std::string& host, int port, const Limits& limits) {
  server.set_keep_alive_timeout(static_cast<time_t>(limits.idle_timeout.count()));
  server.set_read_timeout(static_cast<time_t>(limits.read_timeout.count()), 0);
  server.set_write_timeout(static_cast<time_t>(limits.write_timeout.count()), 0);
  server.set_payload_max_length(limits.max_body_bytes);
  const std::size_t max = limits.max_connections;
  // httplib owns the queue it is given (a unique_ptr inside listen).
  server.new_task_queue = [max] { return new ConnectionGate(max); };
  // SO_REUSEADDR as httplib does by default, but not SO_REUSEPORT: a second daemon on
  // the same port must fail to start, not share its connections.
  auto listening = std::make_shared<int>(-1);
  server.set_socket_options([listening](socket_t sock) {
    const int one = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    *listening = sock;
  });
  const int bound =
      port == 0 ? server.bind_to_any_port(host) : (server.bind_to_port(host, port) ? port : -1);
  if (bound <= 0) return -1;
  ::listen(*listening, SOMAXCONN);  // again, on the bound socket: only the backlog changes
  return bound;
}

std::string clipped(std::string_view text, std::size_t max) {
  if (text.size() <= max) return std::string(text);
  return std::string(text.substr(0, max)) + "...";
}

}  // namespace otpgate::http_edge

// SPDX-License-Identifier: LGPL-2.1-or-later
// `otp-transfer serve`: accepts protected streams from the peer site (one thread per
// connection), serves the job API, and runs send jobs started through the API.
#include <httplib.h>
#include <poll.h>
#include <sys/socket.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <list>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "job_forecast.hpp"
#include "job_lock.hpp"
#include "job_request.hpp"
#include "key_settings.hpp"
#include "names.hpp"
#include "otpgate/http_edge.hpp"
#include "parts.hpp"
#include "sha256.hpp"
#include "tcp_socket.hpp"
#include "transfer_pipeline.hpp"
#include "web_page.hpp"

namespace otpgate::transfer {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace detail;

namespace {

json job_to_json(const Job& j) {
  json out = {{"job_id", j.job_id},
              {"direction", j.direction},
              {"specimen_id", j.specimen_id},
              {"folder", j.folder},
              {"data_type", j.data_type},
              {"created_at", j.created_at},
              {"analysis_state", j.analysis_state},
              {"analysis_size", j.analysis_size},
              {"analysis_time", j.analysis_time},
              {"transfer_state", to_string(j.transfer_state)},
              {"transfer_size", j.transfer_size},
              {"transferred", j.transferred},
              {"completed_at", j.completed_at},
              {"method", to_string(j.method)},
              {"peer", j.peer},
              {"error", j.error},
              {"watch", j.watch}};
  if (!j.files.empty()) {
    json files = json::array();
    for (const auto& f : j.files) {
      files.push_back({{"index", f.index},
                       {"path", f.path},
                       {"size", f.size},
                       {"committed", f.committed},
                       {"sha256", f.sha256},
                       {"state", f.state}});
    }
    out["files"] = files;
  }
  return out;
}

void reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  // Text from a request may be invalid UTF-8: replaced (U+FFFD), never a failed answer.
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

// Errors may quote what the client sent: at most 300 bytes of it, whatever it sent.
void reply_error(httplib::Response& res, int status, const std::string& message) {
  constexpr std::size_t kMaxMessage = 300;
  reply(res, status,
        {{"error",
          message.size() <= kMaxMessage ? message : message.substr(0, kMaxMessage) + "..."}});
}

}  // namespace

bool delete_job(JobStore& store, const TransferConfig& config, const std::string& job_id) {
  const auto job = store.get(job_id);
  if (!job) return false;
  // A receive job is active while its sender is connected; a send job while a sender
  // process holds it (one that was killed left the state behind, not the lock). A sender
  // that has just recorded its abort lets go within moments.
  bool sending = job->direction == "send" && SendJobLock::held(config, job_id);
  for (int i = 0; sending && !active(job->transfer_state) && i < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    sending = SendJobLock::held(config, job_id);
  }
  if (sending || (job->direction == "receive" && active(job->transfer_state))) {
    throw std::runtime_error("job " + job_id + " is running: abort it first");
  }
  if (job->direction == "receive") {
    std::error_code ec;
    fs::remove_all(config.incoming_dir / job->specimen_id / job->job_id, ec);
    fs::remove(config.incoming_dir / job->specimen_id / (job->job_id + ".sha256"), ec);
    fs::remove_all(config.incoming_dir / ".partial" / job->job_id, ec);
    fs::remove_all(config.incoming_dir / ".failed" / job->job_id, ec);
    fs::remove(config.incoming_dir / job->specimen_id, ec);  // only if now empty
  }
  return store.remove(job_id);
}

void mark_interrupted_send_jobs(JobStore& store, const TransferConfig& config) {
  for (const auto& j : store.list()) {
    if (j.direction == "send" && active(j.transfer_state) && !SendJobLock::held(config, j.job_id)) {
      store.set_state(j.job_id, TransferState::interrupted,
                      "its sender stopped before finishing (killed or crashed); `otp-transfer "
                      "start " +
                          j.job_id + "` resumes it with fresh pad");
    }
  }
}

struct Service::Impl {
  TransferConfig config;
  std::unique_ptr<JobForecasts> forecasts;
  std::unique_ptr<JobStore> store;
  Fd listener;
  std::uint16_t bound_transfer_port = 0;
  int bound_api_port = 0;
  std::atomic<bool> stopping{false};
  std::thread accept_thread, api_thread;
  std::unique_ptr<httplib::Server> api_server;     // SSLServer when api.tls_cert is set
  std::unique_ptr<http_edge::ServiceNames> names;  // which Host/Origin is this service
  httplib::Server& api() { return *api_server; }

  std::mutex mutex;  // guards the two lists below
  struct Connection {
    std::thread thread;
    int fd = -1;
    std::atomic<bool> finished{false};
  };
  std::list<Connection> connections;
  struct Runner {
    std::thread thread;
    std::string job_id;
    std::atomic<bool> finished{false};
  };
  std::list<Runner> runners;
  std::atomic<bool> cancel_runners{false};
  SendOptions runner_options;

  void reap() {
    std::lock_guard lock(mutex);
    for (auto it = connections.begin(); it != connections.end();) {
      if (it->finished) {
        it->thread.join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = runners.begin(); it != runners.end();) {
      if (it->finished) {
        it->thread.join();
        it = runners.erase(it);
      } else {
        ++it;
      }
    }
  }

  void accept_loop() {
    while (!stopping) {
      pollfd p{listener.fd, POLLIN, 0};
      if (::poll(&p, 1, 200) != 1) {
        reap();
        continue;
      }
      Fd socket(::accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC));
      if (!socket) continue;
      reap();
      std::lock_guard lock(mutex);
      Connection& c = connections.emplace_back();
      c.fd = socket.fd;
      c.thread = std::thread([this, &c, s = std::move(socket)]() mutable {
        try {
          receive_connection(*store, config, std::move(s), stopping);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "otp-transfer: incoming transfer failed: %s\n", e.what());
        }
        c.finished = true;
      });
    }
  }

  bool running(const std::string& job_id) {
    std::lock_guard lock(mutex);
    for (const auto& r : runners)
      if (r.job_id == job_id && !r.finished) return true;
    return false;
  }

  void wait_stopped(const std::string& job_id, std::chrono::milliseconds timeout) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (running(job_id) && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  void start_runner(const std::string& job_id) {
    std::lock_guard lock(mutex);
    Runner& r = runners.emplace_back();
    r.job_id = job_id;
    r.thread = std::thread([this, &r, job_id] {
      try {
        run_send_job(*store, config, job_id, runner_options);
      } catch (const std::exception& e) {
        store->set_state(job_id, TransferState::failed, e.what());
      }
      r.finished = true;
    });
  }

  // Requests that change state must be JSON: a browser cannot send that cross-site
  // without a CORS preflight, which this API never grants.
  static bool json_request(const httplib::Request& req, httplib::Response& res) {
    const std::string type = req.get_header_value("Content-Type");
    if (type.rfind("application/json", 0) == 0) return true;
    reply_error(res, 415, "send Content-Type: application/json");
    return false;
  }

  // Every request: the login when one is configured; for requests that change state, an
  // Origin (when the browser sends one) that is this service itself.
  httplib::Server::HandlerResponse check_access(const httplib::Request& req,
                                                httplib::Response& res) const {
    if (!config.api_user.empty() && !authorised(req.get_header_value("Authorization"))) {
      res.set_header("WWW-Authenticate", "Basic realm=\"otp-transfer\", charset=\"UTF-8\"");
      reply_error(res, 401, "log in with the user and password configured in [api]");
      return httplib::Server::HandlerResponse::Handled;
    }
    // The Host must be this service under a name it is known by: a page on a name an
    // attacker controls (DNS rebinding) names that name, whatever address it resolves to.
    const std::string host = req.get_header_value("Host");
    if (!names->names_this_service(host)) {
      reply_error(res, 403,
                  "request for host \"" + http_edge::clipped(host) +
                      "\" refused: not a name of this service (add it to api.server_names)");
      return httplib::Server::HandlerResponse::Handled;
    }
    if (req.method != "GET" && req.has_header("Origin")) {
      const std::string origin = req.get_header_value("Origin");
      if (!names->is_own_origin(origin)) {
        reply_error(res, 403,
                    "cross-site request refused (Origin " + http_edge::clipped(origin) + ")");
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    return httplib::Server::HandlerResponse::Unhandled;
  }

  bool authorised(const std::string& header) const {
    if (header.rfind("Basic ", 0) != 0) return false;
    const std::string encoded = header.substr(6);
    std::string decoded(encoded.size(), '\0');
    const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(decoded.data()),
                                  reinterpret_cast<const unsigned char*>(encoded.data()),
                                  static_cast<int>(encoded.size()));
    if (n < 0) return false;
    decoded.resize(static_cast<std::size_t>(n));
    while (!decoded.empty() && decoded.back() == '\0') decoded.pop_back();  // base64 padding
    const auto colon = decoded.find(':');
    if (colon == std::string::npos) return false;
    Sha256 hash;
    const std::string password = decoded.substr(colon + 1);
    hash.update({reinterpret_cast<const std::uint8_t*>(password.data()), password.size()});
    const std::string digest = hash.hex_digest();
    const bool user_ok = decoded.substr(0, colon) == config.api_user;
    return user_ok && digest.size() == config.api_password_sha256.size() &&
           CRYPTO_memcmp(digest.data(), config.api_password_sha256.data(), digest.size()) == 0;
  }

  // The specimen folders under data_root, with what each would need of key.
  json folders() const {
    json list = json::array();
    if (config.data_root.empty()) return list;
    std::error_code ec;
    std::vector<fs::path> dirs;
    for (const auto& e : fs::directory_iterator(config.data_root, ec))
      if (e.is_directory()) dirs.push_back(e.path());
    std::sort(dirs.begin(), dirs.end());
    for (const auto& d : dirs) {
      std::uint64_t bytes = 0, files = 0;
      for (const auto& f : fs::recursive_directory_iterator(d, ec)) {
        if (!f.is_regular_file()) continue;
        bytes += f.file_size(ec);
        ++files;
      }
      // The key it needs and how long the link takes to make it (otpgate/forecast.hpp).
      json folder = {{"folder", d.filename().string()}, {"bytes", bytes}, {"files", files}};
      forecasts->annotate_folder(folder);
      list.push_back(std::move(folder));
    }
    return list;
  }

  // Key the KME holds for this site's sends to the peer right now (ETSI 014 status).
  json key_available() const {
    try {
      auto kme = kme_client_config(config);
      kme.retry.max_attempts = 1;
      kme.request_timeout = std::chrono::milliseconds(3000);
      keys::KmeClient client(kme);
      const auto st = client.status(config.peer_sae_id);
      return {{"bytes", st.stored_key_count * st.key_size / 8}, {"error", ""}};
    } catch (const std::exception& e) {
      return {{"bytes", nullptr}, {"error", e.what()}};
    }
  }

  // A job's JSON with its forecast (job_forecast.hpp).
  json with_forecast(json job) {
    forecasts->annotate(job, seconds_now(), now_ms());
    return job;
  }
  static double seconds_now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  void routes() {
    // A handler that throws (e.g. a job row this version cannot read) answers one JSON
    // line with the reason, not an empty 500.
    api().set_exception_handler(
        [](const httplib::Request&, httplib::Response& res, std::exception_ptr failure) {
          try {
            std::rethrow_exception(failure);
          } catch (const std::exception& e) {
            reply_error(res, 500, e.what());
          } catch (...) {
            reply_error(res, 500, "internal error");
          }
        });
    api().set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      return check_access(req, res);
    });
    api().Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_header("Content-Security-Policy",
                     "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' "
                     "'unsafe-inline'; frame-ancestors 'none'");
      res.set_header("X-Frame-Options", "DENY");
      res.set_content(web_page(), "text/html; charset=utf-8");
    });
    api().Get("/api/v1/folders", [this](const httplib::Request&, httplib::Response& res) {
      const json available = key_available();
      forecasts->observe_kme(available["bytes"], seconds_now());
      reply(res, 200,
            {{"site", config.site_name},
             {"data_root", config.data_root.string()},
             // the form's option values: "otp", "aes"
             {"default_method", config.method == Method::aes ? "aes" : "otp"},
             {"folders", folders()},
             {"key_available", available}});
    });
    api().Get("/api/v1/jobs", [this](const httplib::Request&, httplib::Response& res) {
      mark_interrupted_send_jobs(*store, config);
      json list = json::array();
      for (const auto& j : store->list()) list.push_back(with_forecast(job_to_json(j)));
      reply(res, 200, {{"site", config.site_name}, {"jobs", list}});
    });
    api().Get(R"(/api/v1/jobs/([A-Za-z0-9._-]+))",
              [this](const httplib::Request& req, httplib::Response& res) {
                const auto job = store->get(req.matches[1]);
                if (!job) return reply_error(res, 404, "no job " + std::string(req.matches[1]));
                reply(res, 200, with_forecast(job_to_json(*job)));
              });
    api().Post("/api/v1/jobs", [this](const httplib::Request& req, httplib::Response& res) {
      if (!json_request(req, res)) return;
      try {
        const JobRequest request = parse_job_request(req.body, config);
        Job job = create_send_job(*store, config, request.specimen_id, {request.folder},
                                  request.method, request.watch);
        if (request.start) start_runner(job.job_id);
        reply(res, 201, job_to_json(job));
      } catch (const RequestError& e) {
        reply_error(res, e.status(), e.what());
      } catch (const std::exception& e) {
        reply_error(res, 400, e.what());
      }
    });
    api().Post(R"(/api/v1/jobs/([A-Za-z0-9._-]+)/(start|abort))",
               [this](const httplib::Request& req, httplib::Response& res) {
                 if (!json_request(req, res)) return;
                 const std::string id = req.matches[1];
                 const auto job = store->get(id);
                 if (!job) return reply_error(res, 404, "no job " + id);
                 if (req.matches[2] == "abort") {
                   if (job->transfer_state == TransferState::completed)
                     return reply_error(res, 409, "job " + id + " is already complete");
                   store->request_abort(id);
                   return reply(res, 202, {{"job_id", id}, {"abort", "requested"}});
                 }
                 if (job->direction != "send")
                   return reply_error(res, 409, "job " + id + " is started by the sending site");
                 if (job->transfer_state == TransferState::completed)
                   return reply_error(res, 409, "job " + id + " is already complete");
                 if (running(id)) return reply_error(res, 409, "job " + id + " is running");
                 start_runner(id);
                 reply(res, 202, {{"job_id", id}, {"start", "requested"}});
               });
    api().Delete(R"(/api/v1/jobs/([A-Za-z0-9._-]+))",
                 [this](const httplib::Request& req, httplib::Response& res) {
                   const std::string id = req.matches[1];
                   const auto job = store->get(id);
                   if (!job) return reply_error(res, 404, "no job " + id);
                   // An aborted job's runner may still be winding down (closing its
                   // connection and key supply) after the job shows "aborted": give it a
                   // moment rather than refuse what the job table says is stopped.
                   if (job->transfer_state == TransferState::aborted)
                     wait_stopped(id, std::chrono::seconds(5));
                   if (running(id))
                     return reply_error(res, 409, "job " + id + " is running: abort it first");
                   try {
                     delete_job(*store, config, id);
                   } catch (const std::exception& e) {
                     return reply_error(res, 409, e.what());
                   }
                   reply(res, 200, {{"job_id", id}, {"deleted", true}});
                 });
    api().Get("/api/v1/status", [this](const httplib::Request&, httplib::Response& res) {
      std::size_t incoming = 0, outgoing = 0;
      {
        std::lock_guard lock(mutex);
        for (const auto& c : connections) incoming += c.finished ? 0 : 1;
        for (const auto& r : runners) outgoing += r.finished ? 0 : 1;
      }
      reply(res, 200,
            {{"site", config.site_name},
             {"sae_id", config.sae_id},
             {"peer_sae_id", config.peer_sae_id},
             {"transfer_port", bound_transfer_port},
             {"incoming_connections", incoming},
             {"running_send_jobs", outgoing},
             {"kme_url", config.kme_url}});
    });
  }
};

Service::Service(TransferConfig config) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->runner_options.cancel = &impl_->cancel_runners;
  impl_->forecasts =
      std::make_unique<JobForecasts>(impl_->config.record_size, impl_->config.aes_rekey_records);
}

Service::~Service() {
  stop();
}

void Service::start() {
  Impl& s = *impl_;
  ignore_io_signals();
  ensure_gstreamer();
  std::error_code ec;
  fs::create_directories(s.config.incoming_dir, ec);
  if (ec || !fs::is_directory(s.config.incoming_dir)) {
    throw std::runtime_error("transfer.incoming_dir " + s.config.incoming_dir.string() +
                             " cannot be created: " + ec.message());
  }
  s.store = std::make_unique<JobStore>(database_path(s.config));
  // Jobs that were receiving when the service last stopped wait for their sender.
  for (const auto& j : s.store->list()) {
    if (j.direction == "receive" && active(j.transfer_state)) {
      s.store->set_state(j.job_id, TransferState::interrupted,
                         "the service stopped; the sender will resume");
    }
  }
  s.listener = listen_tcp(s.config.listen);
  s.bound_transfer_port = local_port(s.listener.fd);
  if (!s.config.api_tls_cert.empty()) {
    auto tls = std::make_unique<httplib::SSLServer>(s.config.api_tls_cert.c_str(),
                                                    s.config.api_tls_key.c_str());
    if (!tls->is_valid()) {
      throw std::runtime_error("api.tls_cert/tls_key cannot be used (" +
                               s.config.api_tls_cert.string() + "): check the PEM files");
    }
    s.api_server = std::move(tls);
  } else {
    s.api_server = std::make_unique<httplib::Server>();
  }
  s.names = std::make_unique<http_edge::ServiceNames>(
      s.config.api_listen.host, s.config.api_server_names, !s.config.api_tls_cert.empty());
  s.routes();
  const auto& a = s.config.api_listen;
  // Timeouts, a body limit and a connection gate: idle or slow clients cannot take every
  // worker (64 idle connections kept the API unanswered for over 30 s).
  s.bound_api_port = http_edge::bind(s.api(), a.host, a.port, http_edge::Limits{});
  if (s.bound_api_port <= 0) {
    throw std::runtime_error("cannot listen on api.listen " + a.host + ":" +
                             std::to_string(a.port) + " (in use? change [api] listen)");
  }
  s.names->set_port(static_cast<std::uint16_t>(s.bound_api_port));
  s.api_thread = std::thread([&s] { s.api().listen_after_bind(); });
  s.accept_thread = std::thread([&s] { s.accept_loop(); });
}

void Service::stop() {
  Impl& s = *impl_;
  if (s.stopping.exchange(true)) return;
  s.cancel_runners = true;
  if (s.accept_thread.joinable()) s.accept_thread.join();
  {
    std::lock_guard lock(s.mutex);
    for (auto& c : s.connections)
      if (!c.finished) ::shutdown(c.fd, SHUT_RDWR);
  }
  for (auto& c : s.connections) c.thread.join();
  for (auto& r : s.runners) r.thread.join();
  s.connections.clear();
  s.runners.clear();
  if (s.api_server) s.api().stop();
  if (s.api_thread.joinable()) s.api_thread.join();
}

std::uint16_t Service::transfer_port() const {
  return impl_->bound_transfer_port;
}
std::uint16_t Service::api_port() const {
  return static_cast<std::uint16_t>(impl_->bound_api_port);
}

}  // namespace otpgate::transfer

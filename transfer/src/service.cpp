// `otp-transfer serve`: accepts protected streams from the peer site (one thread per
// connection), serves the job API, and runs send jobs started through the API.
#include <httplib.h>
#include <poll.h>
#include <sys/socket.h>

#include <list>
#include <map>
#include <thread>

#include "parts.hpp"
#include "session.hpp"

namespace otpgate::transfer {

namespace fs = std::filesystem;
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
              {"transfer_state", j.transfer_state},
              {"transfer_size", j.transfer_size},
              {"transferred", j.transferred},
              {"completed_at", j.completed_at},
              {"method", j.method},
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
  res.set_content(body.dump(), "application/json");
}

void reply_error(httplib::Response& res, int status, const std::string& message) {
  reply(res, status, {{"error", message}});
}

}  // namespace

bool delete_job(JobStore& store, const TransferConfig& config, const std::string& job_id) {
  const auto job = store.get(job_id);
  if (!job) return false;
  if (job->transfer_state == "running" || job->transfer_state == "waiting-for-key") {
    // A send job's journal is locked while a sender runs it; a sender that was killed
    // left the state behind but not the lock.
    bool running = true;
    if (job->direction == "send") {
      try {
        std::error_code ec;
        fs::create_directories(journal_path(config, job_id).parent_path(), ec);
        const keys::OffsetJournal probe(journal_path(config, job_id));
        running = false;
      } catch (const std::exception&) {
        running = true;
      }
    }
    if (running) throw std::runtime_error("job " + job_id + " is running: abort it first");
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

struct Service::Impl {
  TransferConfig config;
  std::unique_ptr<JobStore> store;
  Fd listener;
  std::uint16_t bound_transfer_port = 0;
  int bound_api_port = 0;
  std::atomic<bool> stopping{false};
  std::thread accept_thread, api_thread;
  httplib::Server api;

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

  void start_runner(const std::string& job_id) {
    std::lock_guard lock(mutex);
    Runner& r = runners.emplace_back();
    r.job_id = job_id;
    r.thread = std::thread([this, &r, job_id] {
      try {
        run_send_job(*store, config, job_id, runner_options);
      } catch (const std::exception& e) {
        store->set_state(job_id, "failed", e.what());
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

  void routes() {
    api.Get("/api/v1/jobs", [this](const httplib::Request&, httplib::Response& res) {
      json list = json::array();
      for (const auto& j : store->list()) list.push_back(job_to_json(j));
      reply(res, 200, {{"site", config.site_name}, {"jobs", list}});
    });
    api.Get(R"(/api/v1/jobs/([A-Za-z0-9._-]+))",
            [this](const httplib::Request& req, httplib::Response& res) {
              const auto job = store->get(req.matches[1]);
              if (!job) return reply_error(res, 404, "no job " + std::string(req.matches[1]));
              reply(res, 200, job_to_json(*job));
            });
    api.Post("/api/v1/jobs", [this](const httplib::Request& req, httplib::Response& res) {
      if (!json_request(req, res)) return;
      try {
        const json body = json::parse(req.body);
        if (config.data_root.empty())
          return reply_error(res, 409, "this site has no transfer.data_root to send from");
        const std::string folder = body.at("folder").get<std::string>();
        if (!valid_relative_path(folder))
          return reply_error(res, 400, "folder must be a path inside the data root");
        const fs::path root = fs::canonical(config.data_root);
        std::error_code ec;
        const fs::path target = fs::canonical(root / folder, ec);
        const auto [end, _] = std::mismatch(root.begin(), root.end(), target.begin(), target.end());
        if (ec || end != root.end() || target == root)
          return reply_error(res, 400, "folder " + folder + " is not inside the data root");
        const bool watch = body.value("watch", false);
        Job job = create_send_job(*store, config, body.at("specimen_id").get<std::string>(),
                                  {target}, body.value("method", config.method), watch);
        if (body.value("start", true)) start_runner(job.job_id);
        reply(res, 201, job_to_json(job));
      } catch (const json::exception& e) {
        reply_error(res, 400, std::string("bad request body: ") + e.what());
      } catch (const std::exception& e) {
        reply_error(res, 400, e.what());
      }
    });
    api.Post(R"(/api/v1/jobs/([A-Za-z0-9._-]+)/(start|abort))",
             [this](const httplib::Request& req, httplib::Response& res) {
               if (!json_request(req, res)) return;
               const std::string id = req.matches[1];
               const auto job = store->get(id);
               if (!job) return reply_error(res, 404, "no job " + id);
               if (req.matches[2] == "abort") {
                 if (job->transfer_state == "completed")
                   return reply_error(res, 409, "job " + id + " is already complete");
                 store->request_abort(id);
                 return reply(res, 202, {{"job_id", id}, {"abort", "requested"}});
               }
               if (job->direction != "send")
                 return reply_error(res, 409, "job " + id + " is started by the sending site");
               if (job->transfer_state == "completed")
                 return reply_error(res, 409, "job " + id + " is already complete");
               if (running(id)) return reply_error(res, 409, "job " + id + " is running");
               start_runner(id);
               reply(res, 202, {{"job_id", id}, {"start", "requested"}});
             });
    api.Delete(R"(/api/v1/jobs/([A-Za-z0-9._-]+))",
               [this](const httplib::Request& req, httplib::Response& res) {
                 const std::string id = req.matches[1];
                 const auto job = store->get(id);
                 if (!job) return reply_error(res, 404, "no job " + id);
                 if (running(id))
                   return reply_error(res, 409, "job " + id + " is running: abort it first");
                 try {
                   delete_job(*store, config, id);
                 } catch (const std::exception& e) {
                   return reply_error(res, 409, e.what());
                 }
                 reply(res, 200, {{"job_id", id}, {"deleted", true}});
               });
    api.Get("/api/v1/status", [this](const httplib::Request&, httplib::Response& res) {
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
    if (j.direction == "receive" &&
        (j.transfer_state == "running" || j.transfer_state == "waiting-for-key")) {
      s.store->set_state(j.job_id, "interrupted", "the service stopped; the sender will resume");
    }
  }
  s.listener = listen_tcp(s.config.listen);
  s.bound_transfer_port = local_port(s.listener.fd);
  s.routes();
  const auto& a = s.config.api_listen;
  s.bound_api_port = a.port == 0 ? s.api.bind_to_any_port(a.host)
                                 : (s.api.bind_to_port(a.host, a.port) ? a.port : -1);
  if (s.bound_api_port <= 0) {
    throw std::runtime_error("cannot listen on api.listen " + a.host + ":" +
                             std::to_string(a.port) + " (in use? change [api] listen)");
  }
  s.api_thread = std::thread([&s] { s.api.listen_after_bind(); });
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
  s.api.stop();
  if (s.api_thread.joinable()) s.api_thread.join();
}

std::uint16_t Service::transfer_port() const {
  return impl_->bound_transfer_port;
}
std::uint16_t Service::api_port() const {
  return static_cast<std::uint16_t>(impl_->bound_api_port);
}

}  // namespace otpgate::transfer

// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-transfer: the command line. serve | send | watch | jobs | start | abort | delete.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <thread>

#include <nlohmann/json.hpp>

#include "otpgate/transfer.hpp"

using namespace otpgate::transfer;

namespace {

std::atomic<bool> interrupted{false};

void on_interrupt(int) {
  interrupted = true;
}

// A state's or method's word, for printf.
template <typename Enum>
const char* word(Enum value) {
  return to_string(value).data();  // the words are string literals
}

std::string local_time(std::int64_t ms) {
  if (ms == 0) return "-";
  const std::time_t t = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%d %H:%M", &tm);
  return text;
}

std::string duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const long s = std::lround(seconds);
  char text[32];
  if (s >= 3600)
    std::snprintf(text, sizeof text, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else
    std::snprintf(text, sizeof text, "%ld:%02ld", s / 60, s % 60);
  return text;
}

// A bar on a terminal, a plain line every few seconds otherwise (logs, CI).
class ProgressPrinter {
 public:
  ProgressPrinter() : tty_(::isatty(STDERR_FILENO) != 0) {}
  void operator()(const Progress& p) {
    const auto now = std::chrono::steady_clock::now();
    if (!tty_ && now - last_ < std::chrono::seconds(5)) return;
    last_ = now;
    const double fraction = p.bytes_total ? double(p.bytes_done) / double(p.bytes_total) : 0;
    const double eta =
        p.rate_bytes_per_s > 1
            ? double(p.bytes_total - std::min(p.bytes_total, p.bytes_done)) / p.rate_bytes_per_s
            : NAN;
    std::string state = p.waiting_for_key ? "  waiting for key: running at the key rate"
                        : p.sequencing    ? "  run still sequencing"
                                          : "";
    if (tty_) {
      const int width = 24;
      const int filled = static_cast<int>(fraction * width);
      std::string bar(static_cast<std::size_t>(filled), '#');
      bar.resize(width, '.');
      std::fprintf(stderr, "\r[%s] %3.0f%% %s / %s  %s/s  ETA %s  key %s%s\033[K", bar.c_str(),
                   fraction * 100, human_bytes(double(p.bytes_done)).c_str(),
                   human_bytes(double(p.bytes_total)).c_str(),
                   human_bytes(p.rate_bytes_per_s).c_str(), duration(eta).c_str(),
                   human_bytes(double(p.key_available)).c_str(), state.c_str());
    } else {
      std::fprintf(stderr, "progress: %.0f%% %s of %s, %s/s, ETA %s, key ready %s%s\n",
                   fraction * 100, human_bytes(double(p.bytes_done)).c_str(),
                   human_bytes(double(p.bytes_total)).c_str(),
                   human_bytes(p.rate_bytes_per_s).c_str(), duration(eta).c_str(),
                   human_bytes(double(p.key_available)).c_str(), state.c_str());
    }
    std::fflush(stderr);
  }
  void done() {
    if (tty_) std::fprintf(stderr, "\n");
  }

 private:
  bool tty_;
  std::chrono::steady_clock::time_point last_{};
};

int run_job(JobStore& store, const TransferConfig& config, const std::string& job_id) {
  ::signal(SIGINT, on_interrupt);
  ::signal(SIGTERM, on_interrupt);
  ProgressPrinter printer;
  SendOptions options;
  options.cancel = &interrupted;
  options.on_progress = [&printer](const Progress& p) { printer(p); };
  const Job job = run_send_job(store, config, job_id, options);
  printer.done();
  if (job.transfer_state == TransferState::completed) {
    std::printf("job %s completed: %zu files, %s, SHA-256 verified at both ends (%s)\n",
                job.job_id.c_str(), job.files.size(), human_bytes(double(job.transferred)).c_str(),
                word(job.method));
    return 0;
  }
  std::fprintf(stderr, "otp-transfer: job %s %s: %s\n", job.job_id.c_str(),
               word(job.transfer_state), job.error.c_str());
  return job.transfer_state == TransferState::interrupted ? 130 : 1;
}

void print_jobs(const std::vector<Job>& jobs) {
  std::printf("%-22s %-7s %-12s %-6s %-16s %-10s %9s %-16s %-15s %9s %-16s %-4s\n", "JOB", "DIR",
              "SPECIMEN", "TYPE", "CREATED", "ANALYSIS", "A.SIZE", "A.TIME", "TRANSFER", "T.SIZE",
              "COMPLETED", "METHOD");
  for (const auto& j : jobs) {
    std::printf("%-22s %-7s %-12s %-6s %-16s %-10s %9s %-16s %-15s %9s %-16s %-4s\n",
                j.job_id.c_str(), j.direction.c_str(), j.specimen_id.c_str(), j.data_type.c_str(),
                local_time(j.created_at).c_str(), j.analysis_state.c_str(),
                human_bytes(double(j.analysis_size)).c_str(), local_time(j.analysis_time).c_str(),
                word(j.transfer_state), human_bytes(double(j.transfer_size)).c_str(),
                local_time(j.completed_at).c_str(), word(j.method));
    if (!j.error.empty() && j.transfer_state != TransferState::completed)
      std::printf("    %s\n", j.error.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "otp-transfer: sends specimen files (FASTQ, BAM, VCF) to the analysis site encrypted with "
      "a one-time pad\nfrom QKD keys (ETSI GS QKD 014), hashed with SHA-256 at both ends, "
      "resumable, with a job database.\nThe receiving site runs `serve`; the sending site runs "
      "`send`, `watch` or the service's job API.\nSee docs/transfer.md."};
  app.require_subcommand(0, 1);  // none with --check-config
  std::string config_path;
  app.add_option("-c,--config", config_path,
                 "Site config file (TOML), e.g. /etc/otpgate/transfer.toml")
      ->required();

  auto* serve = app.add_subcommand(
      "serve",
      "Run the site service: receive specimens from the peer site into "
      "transfer.incoming_dir, serve the job API on api.listen, run jobs started there");
  std::string specimen, method;
  std::vector<std::string> paths;
  auto* send = app.add_subcommand(
      "send",
      "Send files or folders as one job for a specimen; waits until the receiver "
      "has verified every file (exit 0), or says why not");
  send->add_option("SPECIMEN_ID", specimen, "Specimen ID (letters, digits, - _ .)")->required();
  send->add_option("PATH", paths, "Files or folders to send")->required();
  send->add_option("-m,--method", method,
                   "otp (one-time pad, default from transfer.method) or aes (AES-256-GCM keyed "
                   "from QKD, when the key budget cannot cover the data)");
  std::string run_folder;
  auto* watch = app.add_subcommand(
      "watch",
      "Follow a sequencer's run folder: send files while they grow, finish when a "
      "completion marker (transfer.completion_markers) appears");
  watch->add_option("RUN_FOLDER", run_folder, "The run's output folder")->required();
  watch->add_option("-s,--specimen", specimen, "Specimen ID")->required();
  watch->add_option("-m,--method", method, "otp or aes");
  bool as_json = false;
  auto* jobs = app.add_subcommand("jobs", "List this site's jobs as a table");
  jobs->add_flag("--json", as_json, "JSON instead of a table");
  std::string job_id;
  auto* start =
      app.add_subcommand("start", "Start or resume a send job (from what the receiver committed)");
  start->add_option("JOB_ID", job_id)->required();
  auto* abort = app.add_subcommand("abort", "Abort a running job (it stays resumable with start)");
  abort->add_option("JOB_ID", job_id)->required();
  auto* remove = app.add_subcommand(
      "delete",
      "Delete a job from the database with what this site wrote for it (received "
      "files; never the sender's source data)");
  remove->add_option("JOB_ID", job_id)->required();
  bool check_only = false;
  app.add_flag("--check-config", check_only, "Validate the config and exit (0: valid)");
  CLI11_PARSE(app, argc, argv);
  if (!check_only && app.get_subcommands().empty()) {
    std::fprintf(stderr,
                 "otp-transfer: name a command (serve, send, watch, jobs, start, abort, delete) "
                 "or --check-config; see --help\n");
    return 2;
  }

  TransferConfig config;
  try {
    config = load_config(config_path);
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "otp-transfer: %s\n", e.what());
    return 2;
  }
  const auto checks = check_offline(config, check_only || serve->parsed());
  for (const auto& w : checks.warnings())
    std::fprintf(stderr, "otp-transfer[warning]: %s\n", w.c_str());
  for (const auto& p : checks.problems())
    std::fprintf(stderr, "otp-transfer: %s: %s\n", config_path.c_str(), p.c_str());
  if (!checks.problems().empty()) return 2;
  if (check_only) {
    std::printf("%s: valid: site %s (SAE %s), peer %s\n", config_path.c_str(),
                config.site_name.c_str(), config.sae_id.c_str(), config.peer_sae_id.c_str());
    return 0;
  }
  try {
    if (serve->parsed()) {
      sigset_t stop_signals;
      sigemptyset(&stop_signals);
      sigaddset(&stop_signals, SIGINT);
      sigaddset(&stop_signals, SIGTERM);
      pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
      Service service(config);
      service.start();
      std::printf(
          "otp-transfer: site %s receiving on %s:%u into %s; job API on http://%s:%u/api/v1/jobs\n",
          config.site_name.c_str(), config.listen.host.c_str(), service.transfer_port(),
          config.incoming_dir.c_str(), config.api_listen.host.c_str(), service.api_port());
      std::fflush(stdout);
      int signal = 0;
      sigwait(&stop_signals, &signal);
      std::printf("otp-transfer: stopping on signal %d\n", signal);
      service.stop();
      return 0;
    }
    JobStore store(database_path(config));
    if (send->parsed() || watch->parsed()) {
      std::vector<std::filesystem::path> sources;
      if (watch->parsed()) sources.emplace_back(run_folder);
      for (const auto& p : paths) sources.emplace_back(p);
      const auto chosen = method.empty() ? config.method : from_string<Method>(method);
      if (!chosen) {
        std::fprintf(stderr, "otp-transfer: method \"%s\" is not valid: use otp or aes\n",
                     method.c_str());
        return 1;
      }
      const Job job = create_send_job(store, config, specimen, sources, *chosen, watch->parsed());
      std::printf(
          "job %s: specimen %s, %zu files, %s, method %s\n", job.job_id.c_str(),
          job.specimen_id.c_str(), job.files.size(),
          watch->parsed() ? "following the run" : human_bytes(double(job.transfer_size)).c_str(),
          word(job.method));
      std::fflush(stdout);
      return run_job(store, config, job.job_id);
    }
    if (jobs->parsed()) {
      mark_interrupted_send_jobs(store, config);
      const auto list = store.list();
      if (as_json) {
        nlohmann::json out = nlohmann::json::array();
        for (const auto& j : list) {
          out.push_back({{"job_id", j.job_id},
                         {"direction", j.direction},
                         {"specimen_id", j.specimen_id},
                         {"transfer_state", to_string(j.transfer_state)},
                         {"method", to_string(j.method)},
                         {"transferred", j.transferred},
                         {"transfer_size", j.transfer_size},
                         {"error", j.error}});
        }
        std::printf("%s\n", out.dump(2).c_str());
      } else {
        print_jobs(list);
      }
      return 0;
    }
    const auto job = store.get(job_id);
    if (!job) {
      std::fprintf(stderr, "otp-transfer: no job %s here (see `otp-transfer jobs`)\n",
                   job_id.c_str());
      return 1;
    }
    if (start->parsed()) return run_job(store, config, job_id);
    if (abort->parsed()) {
      if (job->transfer_state == TransferState::completed) {
        std::fprintf(stderr, "otp-transfer: job %s is already complete\n", job_id.c_str());
        return 1;
      }
      store.request_abort(job_id);
      std::printf("job %s: abort requested\n", job_id.c_str());
      return 0;
    }
    if (remove->parsed()) {
      delete_job(store, config, job_id);
      std::printf("job %s deleted\n", job_id.c_str());
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "otp-transfer: %s\n", e.what());
    return 1;
  }
  return 0;
}

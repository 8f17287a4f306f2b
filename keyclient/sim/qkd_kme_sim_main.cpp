// SPDX-License-Identifier: LGPL-2.1-or-later
// qkd-kme-sim: the embedded ETSI GS QKD 014 KME for one-machine use.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <thread>

#include "kme_simulator.hpp"

int main(int argc, char** argv) {
  using otpgate::kmesim::ErrorStyle;
  using otpgate::kmesim::SimulatorConfig;
  SimulatorConfig config;
  std::string port_file;
  double stats_interval = 0;
  bool verbose = false;
  std::uint64_t store_bytes = config.store_bits / 8;
  long relay_delay_ms = 0;

  CLI::App app{
      "qkd-kme-sim: an ETSI GS QKD 014 key management entity (KME) for one machine.\n"
      "Serves enc_keys/dec_keys/status over HTTPS with mutual TLS; the SAE ID of a caller is\n"
      "the common name of its client certificate. Keys come from the OS CSPRNG at a QKD-like\n"
      "rate into a bounded store, so key shortage is reproducible."};
  app.add_option("--host", config.host, "Address to listen on")->capture_default_str();
  app.add_option("--port", config.port, "TCP port (0: any free port, see --port-file)")
      ->capture_default_str();
  app.add_option("--port-file", port_file, "Write the bound port to this file once listening");
  app.add_option("--cert", config.certificate, "KME server certificate (PEM)")->required();
  app.add_option("--key", config.private_key, "KME server private key (PEM)")->required();
  app.add_option("--ca", config.client_ca, "CA that signs the SAE client certificates (PEM)")
      ->required();
  app.add_option("--sae", config.sae_ids,
                 "SAE ID allowed to connect (repeat; empty: any certificate from --ca)");
  app.add_option("--kme-id", config.kme_id, "KME ID reported in status")->capture_default_str();
  app.add_option("--key-rate", config.key_rate_bps,
                 "Key generation rate in bits/s (0: unlimited); real QKD links give ~1-10 Mbit/s")
      ->capture_default_str();
  app.add_option("--store-bytes", store_bytes, "Key store capacity in bytes")
      ->capture_default_str();
  app.add_flag("!--start-empty", config.start_full, "Start with an empty key store");
  std::uint64_t premade_bytes = 0;
  app.add_option("--premade-bytes", premade_bytes,
                 "Generate this much of the full store at start, in keys of --max-key-size, so "
                 "that serving them generates nothing (benchmarks: measure the SAEs, not the "
                 "simulator's random generator)")
      ->capture_default_str();
  app.add_option("--key-size", config.key_size, "Default key size (bits)")->capture_default_str();
  app.add_option("--min-key-size", config.min_key_size, "Minimum key size (bits)")
      ->capture_default_str();
  app.add_option("--max-key-size", config.max_key_size,
                 "Maximum key size (bits); vendor KMEs often cap at 256 or 1024")
      ->capture_default_str();
  app.add_option("--max-keys-per-request", config.max_keys_per_request,
                 "max_key_per_request advertised and enforced")
      ->capture_default_str();
  int unclaimed_ttl_s = 300;
  app.add_option("--unclaimed-ttl-s", unclaimed_ttl_s,
                 "Seconds after which keys given to a master but never fetched by its slave "
                 "expire")
      ->check(CLI::PositiveNumber);
  app.add_option("--relay-delay-ms", relay_delay_ms,
                 "Delay before a key given to a master can be fetched by its slave")
      ->capture_default_str();
  // Fault modes: the quirks of real third-party KMEs (see docs/keys.md).
  app.add_flag("--replace-unfetched", config.faults.replace_unfetched_batch,
               "Fault: a new enc_keys drops the pair's keys its slave has not fetched yet");
  app.add_flag("--cap-requests", config.faults.cap_instead_of_refuse,
               "Fault: deliver fewer/smaller keys instead of refusing too many/too large ones");
  std::string error_style = "etsi";
  app.add_option("--error-style", error_style,
                 "Fault: errors as ETSI JSON (etsi), HTML pages (html) or vendor JSON (vendor)")
      ->check(CLI::IsMember({"etsi", "html", "vendor"}))
      ->capture_default_str();
  app.add_flag("--stored-count-of-pair", config.faults.stored_count_of_pair,
               "Fault: status' stored_key_count counts the pair's unfetched keys, not the store");
  app.add_flag("--hang", config.faults.hang,
               "Fault: accept requests but never answer them (SIGUSR1 toggles this at run time)");
  long answer_delay_ms = 0;
  app.add_option("--answer-delay-ms", answer_delay_ms,
                 "Fault: answer every request this many ms late, as a KME far away or "
                 "overloaded does")
      ->check(CLI::Range(0L, 3600000L))
      ->capture_default_str();
  app.add_option("--grow-bits-per-request", config.faults.grow_bits_per_request,
                 "Fault: every request finds the store grown by this many bits, as from a "
                 "link delivering key between an SAE's calls")
      ->check(CLI::Range(std::uint64_t{0}, std::uint64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--refuse-status-after-enc-keys", config.faults.refuse_status_after_enc_keys,
                 "Fault: answer 503 to the next N status requests after each enc_keys, as a KME "
                 "whose status endpoint is busy right after it issued keys")
      ->check(CLI::Range(0u, 1000u))
      ->capture_default_str();
  app.add_option("--refuse-sae", config.faults.refuse_sae,
                 "Fault: answer 401 to this SAE, as to a certificate not accepted (repeat)")
      ->type_name("ID")
      ->allow_extra_args(false);
  app.add_option("--stats-interval", stats_interval, "Print key store levels every N seconds");
  app.add_flag("-v,--verbose", verbose, "Log every request (never key material)");
  CLI11_PARSE(app, argc, argv);

  config.store_bits = store_bytes * 8;
  config.faults.error_style = error_style == "html"     ? ErrorStyle::html
                              : error_style == "vendor" ? ErrorStyle::vendor
                                                        : ErrorStyle::etsi;
  config.premade_bits = premade_bytes * 8;
  if (premade_bytes != 0 && (!config.start_full || premade_bytes > store_bytes)) {
    std::fprintf(stderr,
                 "qkd-kme-sim: --premade-bytes %llu needs a store that starts full and holds "
                 "it: drop --start-empty or raise --store-bytes\n",
                 static_cast<unsigned long long>(premade_bytes));
    return 2;
  }
  config.relay_delay = std::chrono::milliseconds(relay_delay_ms);
  config.faults.answer_delay = std::chrono::milliseconds(answer_delay_ms);
  config.unclaimed_ttl = std::chrono::seconds(unclaimed_ttl_s);
  config.log = otpgate::keys::stderr_log_sink(verbose ? otpgate::keys::LogLevel::debug
                                                      : otpgate::keys::LogLevel::warning);

  // Block the stop signals before any thread starts, then wait for them here.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGUSR1);  // toggles --hang
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  try {
    otpgate::kmesim::KmeSimulator sim(config);
    sim.start();
    std::printf("qkd-kme-sim: listening on %s:%d, key rate %.3g bit/s, store %llu bytes\n",
                config.host.c_str(), sim.port(), config.key_rate_bps,
                static_cast<unsigned long long>(store_bytes));
    std::fflush(stdout);
    if (!port_file.empty()) {
      const std::string temp = port_file + ".tmp";
      std::ofstream(temp) << sim.port() << "\n";
      std::filesystem::rename(temp, port_file);
    }
    std::mutex reporter_mutex;
    std::condition_variable_any reporter_wake;
    std::jthread reporter;  // declared after `sim`: joined before it is destroyed
    if (stats_interval > 0) {
      reporter = std::jthread([&](std::stop_token stop) {
        std::unique_lock lock(reporter_mutex);
        while (!stop.stop_requested()) {
          reporter_wake.wait_for(lock, stop, std::chrono::duration<double>(stats_interval),
                                 [] { return false; });
          if (stop.stop_requested()) break;
          const auto s = sim.stats();
          std::printf(
              "qkd-kme-sim: store %llu bytes ready (%llu made ahead), %llu in relay, keys to "
              "masters %llu, to slaves %llu\n",
              static_cast<unsigned long long>(s.stored_bits / 8),
              static_cast<unsigned long long>(s.premade_bits / 8),
              static_cast<unsigned long long>(s.pending_bits / 8),
              static_cast<unsigned long long>(s.keys_to_masters),
              static_cast<unsigned long long>(s.keys_to_slaves));
          std::fflush(stdout);
        }
      });
    }
    int signal = 0;
    while (sigwait(&stop_signals, &signal) == 0 && signal == SIGUSR1) {
      auto faults = sim.faults();
      faults.hang = !faults.hang;
      sim.set_faults(faults);
      std::printf("qkd-kme-sim: %s\n",
                  faults.hang ? "hanging (SIGUSR1)" : "answering again (SIGUSR1)");
      std::fflush(stdout);
    }
    std::printf("qkd-kme-sim: stopping on signal %d\n", signal);
    if (reporter.joinable()) {
      reporter.request_stop();
      reporter.join();
    }
    sim.stop();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qkd-kme-sim: %s\n", e.what());
    return 1;
  }
  return 0;
}

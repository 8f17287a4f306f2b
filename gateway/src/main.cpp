// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-gateway: the site daemon. Runs until SIGTERM or SIGINT, then stops cleanly.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "otpgate/gateway.hpp"

int main(int argc, char** argv) {
  std::string config_path;
  bool check_only = false;
  CLI::App app{
      "otp-gateway: protects a site's conference RTP/RTCP with a one-time pad from QKD.\n"
      "For every [[stream]] in the config it takes RTP (and RTCP) from the local conference\n"
      "system, encrypts it with keys fetched as master SAE from the KME (ETSI GS QKD 014) and\n"
      "sends it to the peer gateway; what the peer sends back is decrypted with keys fetched\n"
      "as slave SAE and delivered to the conference system. Status: GET /api/v1/status (JSON)\n"
      "and /metrics (Prometheus) on status.listen. See docs/gateway.md for the config."};
  app.add_option("-c,--config", config_path,
                 "Site config file (TOML), e.g. /etc/otpgate/gateway.toml")
      ->required();
  app.add_flag("--check-config", check_only,
               "Validate the config, print a summary and exit (0: valid)");
  CLI11_PARSE(app, argc, argv);

  otpgate::gateway::GatewayConfig config;
  try {
    config = otpgate::gateway::load_config(config_path);
  } catch (const otpgate::gateway::ConfigError& e) {
    std::fprintf(stderr, "otp-gateway: %s\n", e.what());
    return 2;
  }
  // Offline checks at every start, not only with --check-config: a config that passes
  // does not fail later for any of these.
  const auto checks = otpgate::gateway::check_offline(config);
  for (const auto& w : checks.warnings())
    std::fprintf(stderr, "otp-gateway[warning]: %s\n", w.c_str());
  for (const auto& p : checks.problems())
    std::fprintf(stderr, "otp-gateway: %s: %s\n", config_path.c_str(), p.c_str());
  if (!checks.problems().empty()) return 2;
  if (check_only) {
    std::printf(
        "%s: valid (TLS files, KME URL, state_dir, peer address and ports checked): site %s (SAE "
        "%s), peer %s at %s, %zu streams, cipher %s, on key exhausted: "
        "%s\n",
        config_path.c_str(), config.site_name.c_str(), config.sae_id.c_str(),
        config.peer_sae_id.c_str(), config.peer_address.c_str(), config.streams.size(),
        config.cipher.c_str(), config.on_key_exhausted.c_str());
    if (config.sip) {
      std::printf(
          "%s: calls: ng control on %s:%u, media address %s, ports %u-%u, up to %u "
          "call media\n",
          config_path.c_str(), config.sip->ng_listen.host.c_str(),
          unsigned{config.sip->ng_listen.port}, config.sip->media_address.c_str(),
          unsigned{config.sip->port_min}, unsigned{config.sip->port_max}, config.sip->max_media);
    }
    return 0;
  }

  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  try {
    otpgate::gateway::Gateway gateway(config);
    gateway.start();
    std::printf(
        "otp-gateway: site %s running %zu streams to %s; status on http://%s:%u/api/v1/status\n",
        config.site_name.c_str(), config.streams.size(), config.peer_address.c_str(),
        config.status_listen.host.c_str(), gateway.status_port());
    if (config.sip) {
      std::printf("otp-gateway: calls: ng control on %s:%u, media address %s, ports %u-%u\n",
                  config.sip->ng_listen.host.c_str(), unsigned{gateway.ng_port()},
                  config.sip->media_address.c_str(), unsigned{config.sip->port_min},
                  unsigned{config.sip->port_max});
    }
    std::fflush(stdout);
    int signal = 0;
    sigwait(&stop_signals, &signal);
    std::printf("otp-gateway: stopping on signal %d\n", signal);
    gateway.stop();
    const auto wiped = gateway.key_wiped_at_stop();
    std::printf(
        "otp-gateway: stopped; fetched key wiped unused: sending %llu bytes, receiving %llu "
        "bytes\n",
        static_cast<unsigned long long>(wiped.send_bytes),
        static_cast<unsigned long long>(wiped.receive_bytes));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "otp-gateway: %s\n", e.what());
    return 1;
  }
  return 0;
}

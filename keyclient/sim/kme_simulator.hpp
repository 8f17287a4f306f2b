// SPDX-License-Identifier: LGPL-2.1-or-later
// qkd-kme-sim: an ETSI GS QKD 014 key management entity for one machine.
//
// Real HTTPS with mutual TLS (cpp-httplib + OpenSSL). The calling SAE is the common
// name of its client certificate. Keys come from the OS CSPRNG into one key store
// shared by all SAE pairs (one QKD link), which fills at a configurable QKD-like rate
// up to a configurable size, so shortage and recovery are reproducible. Fault modes
// (SimulatorFaults) reproduce the quirks of real third-party KMEs.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "otpgate/keyclient.hpp"

namespace otpgate::kmesim {

// How error answers (every 4xx/5xx) are written. Status codes are the same in every style.
enum class ErrorStyle {
  etsi,    // JSON {"message": ..., "details": ...} as ETSI GS QKD 014 defines it
  html,    // a text/html error page, as from a servlet container or reverse proxy
  vendor,  // JSON {"detail": ...} in a vendor's own wording
};

// Departures from the standard that real KMEs show, so CI can reproduce them. All take
// effect for the next request when changed with KmeSimulator::set_faults().
struct SimulatorFaults {
  // A new enc_keys for a (master, slave) pair drops that pair's earlier keys the slave has
  // not fetched yet: they are lost, and dec_keys for them answers 400.
  bool replace_unfetched_batch = false;
  // enc_keys beyond max_keys_per_request / max_key_size delivers fewer / smaller keys
  // (capped silently) instead of answering 400.
  bool cap_instead_of_refuse = false;
  ErrorStyle error_style = ErrorStyle::etsi;
  // status' stored_key_count counts the pair's keys not yet fetched by the slave,
  // instead of the keys ready for enc_keys.
  bool stored_count_of_pair = false;
  // Connections and requests are accepted but never answered, until hang is cleared
  // (then they are served) or the simulator stops.
  bool hang = false;
  // dec_keys requests are held unanswered until this is cleared (then served) or the
  // simulator stops: keys on their way between the KMEs, for as long as a test needs to
  // see the receiver waiting for them. Other requests are served.
  bool hold_dec_keys = false;
  // Every request is answered this late (as by a KME far away or overloaded), or 503 if
  // the simulator stops meanwhile. Zero: at once.
  std::chrono::milliseconds answer_delay{0};
  // Every request (any kind) finds the store grown by this many bits (up to its size), on
  // top of key_rate_bps: a link whose key arrives between an SAE's calls, by an amount a
  // test chooses, e.g. exactly what the SAE's next batch takes.
  std::uint64_t grow_bits_per_request = 0;
  // The next this many status requests after each enc_keys get 503, as from a KME whose
  // status endpoint is overloaded right after it issued keys (a client's retries included).
  std::uint32_t refuse_status_after_enc_keys = 0;
  // Requests from these SAEs get 401, as from a certificate the KME does not accept.
  std::vector<std::string> refuse_sae;
};

struct SimulatorConfig {
  std::string host = "127.0.0.1";
  int port = 0;  // 0: any free port (see KmeSimulator::port())
  std::filesystem::path certificate, private_key, client_ca;
  std::string kme_id = "KME-SIM";
  std::vector<std::string> sae_ids;       // SAEs allowed to connect
  double key_rate_bps = 10e6;             // key generation rate; 0 = unlimited
  std::uint64_t store_bits = 1ull << 30;  // key store capacity (128 MiB of key)
  bool start_full = true;                 // store full at start (else empty)
  // Key made ahead at construction (needs start_full), in keys of max_key_size: as a
  // QKD link's KME holds key it distilled earlier, so serving it generates nothing. For
  // benchmarks, which then measure the SAEs rather than the simulator's random generator.
  std::uint64_t premade_bits = 0;
  std::uint32_t key_size = 256;  // default size (bits)
  std::uint32_t min_key_size = 64;
  std::uint32_t max_key_size = 8192;
  std::uint32_t max_keys_per_request = 1024;
  std::chrono::milliseconds relay_delay{0};  // keys reach the slave's KME this late
  std::chrono::seconds unclaimed_ttl{300};   // keys the slave never fetched expire after this
  SimulatorFaults faults;                    // none by default; see KmeSimulator::set_faults()
  // Tests only: keep a copy of every key handed to a master, so a test can search logs,
  // status and files for key material (served_keys()). Never in a real deployment.
  bool record_served_keys = false;
  keys::LogSink log;
};

// With record_served_keys: a key_ID handed to a master, to whom, and whether its slave
// has fetched it (tests: which streams and directions a key served).
struct ServedKeyId {
  std::string key_id;
  std::string master_sae_id, slave_sae_id;
  bool fetched_by_slave = false;
};

struct SimulatorStats {
  std::uint64_t stored_bits = 0;   // ready for enc_keys
  std::uint64_t pending_bits = 0;  // delivered to a master, not yet to its slave
  std::uint64_t premade_bits = 0;  // part of stored_bits already generated (see premade_bits)
  std::uint64_t keys_to_masters = 0;
  std::uint64_t keys_to_slaves = 0;
  std::uint64_t requests = 0;
  std::uint64_t refused = 0;           // 4xx/5xx answers
  std::uint64_t keys_replaced = 0;     // dropped unfetched by replace_unfetched_batch
  std::uint64_t requests_hung = 0;     // held unanswered by hang or hold_dec_keys
  std::uint64_t requests_delayed = 0;  // answered late by answer_delay
};

class KmeSimulator {
 public:
  explicit KmeSimulator(SimulatorConfig config);
  ~KmeSimulator();
  KmeSimulator(const KmeSimulator&) = delete;
  KmeSimulator& operator=(const KmeSimulator&) = delete;

  void start();  // binds and serves on a thread; throws with a readable reason
  void stop();
  int port() const;
  std::string url() const;  // https://localhost:PORT

  SimulatorStats stats() const;
  void set_key_rate(double bits_per_second);
  void drain();  // empties the ready store (for shortage tests and demos)
  // Replaces the fault modes at run time; clearing `hang` releases the held requests.
  void set_faults(const SimulatorFaults& faults);
  SimulatorFaults faults() const;
  // With record_served_keys: the base64 text of every key handed to a master so far.
  std::vector<std::string> served_keys() const;
  // With record_served_keys: every key_ID handed to a master so far, in order.
  std::vector<ServedKeyId> served_key_ids() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace otpgate::kmesim

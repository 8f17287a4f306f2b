// SPDX-License-Identifier: LGPL-2.1-or-later
// Shared test helpers: the test PKI made by ctest's make_test_pki fixture, an
// in-process qkd-kme-sim on a free loopback port, and client configs per SAE.
#pragma once

#include <gtest/gtest.h>

#include <unistd.h>
#include <filesystem>
#include <string>
#include <thread>

#include "kme_simulator.hpp"
#include "otpgate/keyclient.hpp"

namespace otpgate::testing {

inline std::filesystem::path pki_dir(const std::string& which = "good") {
  return std::filesystem::path(OTPGATE_TEST_PKI) / which;
}

inline kmesim::SimulatorConfig simulator_config() {
  kmesim::SimulatorConfig c;
  c.certificate = pki_dir() / "kme.crt";
  c.private_key = pki_dir() / "kme.key";
  c.client_ca = pki_dir() / "ca.crt";
  c.sae_ids = {"sae-a", "sae-b", "sae-c", "ward 7+icu%"};
  c.key_rate_bps = 0;          // unlimited unless a test throttles it
  c.store_bits = 64ull << 23;  // 64 MiB
  c.log = keys::stderr_log_sink(keys::LogLevel::error);
  return c;
}

inline keys::KmeClientConfig client_config(const std::string& url, const std::string& sae,
                                           const std::string& which_pki = "good",
                                           const std::string& trusted_ca = "good") {
  keys::KmeClientConfig c;
  c.base_url = url;
  c.tls = {pki_dir(which_pki) / (sae + ".crt"), pki_dir(which_pki) / (sae + ".key"),
           pki_dir(trusted_ca) / "ca.crt"};
  c.retry.initial_backoff = std::chrono::milliseconds(5);
  c.retry.max_backoff = std::chrono::milliseconds(50);
  c.retry.max_attempts = 3;
  c.request_timeout = std::chrono::milliseconds(5000);
  c.log = keys::stderr_log_sink(keys::LogLevel::error);
  return c;
}

// Key supplies for one direction sae-a -> sae-b, as the key-supply tests use them.
inline keys::KeySupplyConfig master_supply_config(const std::filesystem::path& dir,
                                                  std::size_t ring_bytes = 256u << 10) {
  keys::KeySupplyConfig c;
  c.role = keys::SaeRole::master;
  c.peer_sae_id = "sae-b";
  c.journal = dir / "a-to-b.journal";
  c.ring_bytes = ring_bytes;
  c.reserve_chunk = 64u << 10;
  c.log = keys::stderr_log_sink(keys::LogLevel::error);
  return c;
}
inline keys::KeySupplyConfig slave_supply_config() {
  keys::KeySupplyConfig c;
  c.role = keys::SaeRole::slave;
  c.peer_sae_id = "sae-a";
  c.ring_bytes = 1u << 20;
  c.log = keys::stderr_log_sink(keys::LogLevel::error);
  return c;
}

// The KmeError a call throws (a test failure if it throws nothing).
template <typename F>
keys::KmeError kme_error_of(F call) {
  try {
    call();
  } catch (const keys::KmeError& e) {
    return e;
  }
  ADD_FAILURE() << "expected a KmeError";
  return keys::KmeError(keys::KmeErrorKind::http, 0, "none");
}

// A fresh folder under /tmp named after the running test, removed when done.
struct TestDir {
  TestDir()
      : path(std::filesystem::temp_directory_path() /
             ("otpgate-" + std::to_string(::getpid()) + "-" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name())) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TestDir() { std::filesystem::remove_all(path); }
  TestDir(const TestDir&) = delete;
  TestDir& operator=(const TestDir&) = delete;
  std::filesystem::path path;
};

// Runs `check` until it holds or `limit` passes; for waiting on background threads.
template <typename Check>
bool eventually(Check check, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (check()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return check();
}

}  // namespace otpgate::testing

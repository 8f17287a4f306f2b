// SPDX-License-Identifier: LGPL-2.1-or-later
// The ETSI 014 client against qkd-kme-sim over real HTTPS with mutual TLS.
#include <gtest/gtest.h>
#include <httplib.h>

#include "test_pki.hpp"

using namespace otpgate;
using keys::KmeClient;
using keys::KmeError;
using keys::KmeErrorKind;
using otpgate::testing::client_config;

namespace {

class KmeClientTest : public ::testing::Test {
 protected:
  void start(kmesim::SimulatorConfig config = otpgate::testing::simulator_config()) {
    sim_ = std::make_unique<kmesim::KmeSimulator>(std::move(config));
    sim_->start();
  }
  void SetUp() override { start(); }
  KmeClient client(const std::string& sae) { return KmeClient(client_config(sim_->url(), sae)); }

  std::unique_ptr<kmesim::KmeSimulator> sim_;
};

bool same_bytes(const keys::SecretBytes& a, const keys::SecretBytes& b) {
  return a.size() == b.size() && std::equal(a.span().begin(), a.span().end(), b.span().begin());
}

}  // namespace

TEST_F(KmeClientTest, StatusCarriesEveryStandardField) {
  auto a = client("sae-a");
  const auto s = a.status("sae-b");
  EXPECT_EQ(s.master_sae_id, "sae-a");
  EXPECT_EQ(s.slave_sae_id, "sae-b");
  EXPECT_FALSE(s.source_kme_id.empty());
  EXPECT_FALSE(s.target_kme_id.empty());
  EXPECT_EQ(s.key_size, 256u);
  EXPECT_EQ(s.min_key_size, 64u);
  EXPECT_EQ(s.max_key_size, 8192u);
  EXPECT_EQ(s.max_key_per_request, 1024u);
  EXPECT_EQ(s.max_key_count, (64ull << 23) / 256);
  EXPECT_EQ(s.stored_key_count, s.max_key_count);
  EXPECT_EQ(keys::choose_key_size(s, 0), 8192u);
  EXPECT_EQ(keys::choose_key_size(s, 1024), 1024u);
}

TEST_F(KmeClientTest, MasterAndSlaveReceiveIdenticalBytesByPostAndGet) {
  auto a = client("sae-a");
  auto b = client("sae-b");
  auto by_post = a.enc_keys("sae-b", 3, 1024);
  auto by_get = a.enc_keys("sae-b", 2, 512, KmeClient::Method::get);
  ASSERT_EQ(by_post.size(), 3u);
  ASSERT_EQ(by_get.size(), 2u);
  EXPECT_EQ(by_post[0].bytes.size(), 128u);
  EXPECT_EQ(by_get[0].bytes.size(), 64u);

  std::vector<keys::KeyId> ids;
  for (const auto& k : by_post) ids.push_back(k.id);
  auto fetched = b.dec_keys("sae-a", ids);
  ASSERT_EQ(fetched.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(fetched[i].id, by_post[i].id);
    EXPECT_TRUE(same_bytes(fetched[i].bytes, by_post[i].bytes));
  }
  for (const auto& k : by_get) EXPECT_TRUE(same_bytes(b.dec_key("sae-a", k.id).bytes, k.bytes));
  EXPECT_FALSE(same_bytes(by_post[0].bytes, by_post[1].bytes));
}

TEST_F(KmeClientTest, ASlaveGetsAKeyExactlyOnce) {
  auto a = client("sae-a");
  auto b = client("sae-b");
  const auto keys = a.enc_keys("sae-b", 1, 256);
  b.dec_key("sae-a", keys[0].id);
  const KmeError e = otpgate::testing::kme_error_of([&] { b.dec_key("sae-a", keys[0].id); });
  EXPECT_EQ(e.kind(), KmeErrorKind::key_not_found);
  EXPECT_EQ(e.http_status(), 400);
  EXPECT_NE(std::string(e.what()).find("one or more keys specified are not found on KME"),
            std::string::npos)
      << e.what();
}

TEST_F(KmeClientTest, AKeyForAnotherSlaveGets401) {
  auto a = client("sae-a");
  auto c = client("sae-c");
  const auto keys = a.enc_keys("sae-b", 1, 256);
  const KmeError e = otpgate::testing::kme_error_of([&] { c.dec_key("sae-a", keys[0].id); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unauthorized);
  EXPECT_EQ(e.http_status(), 401);
  // ... and the key is still there for its real slave.
  EXPECT_EQ(client("sae-b").dec_key("sae-a", keys[0].id).bytes.size(), 32u);
}

TEST_F(KmeClientTest, AnUnregisteredSaeGets401) {
  auto x = client("sae-unregistered");
  const KmeError e = otpgate::testing::kme_error_of([&] { x.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unauthorized);
  EXPECT_NE(std::string(e.what()).find("not registered"), std::string::npos) << e.what();
}

TEST_F(KmeClientTest, ACertificateFromAnotherCaIsRefused) {
  KmeClient rogue(client_config(sim_->url(), "sae-a", "rogue", "good"));
  const KmeError e = otpgate::testing::kme_error_of([&] { rogue.status("sae-b"); });
  // TLS 1.3: the KME's rejection arrives as an alert or, if our request was already on
  // its way, as a closed connection; either way the call fails and names the setting.
  EXPECT_TRUE(e.kind() == KmeErrorKind::tls || e.kind() == KmeErrorKind::transport) << e.what();
  EXPECT_NE(std::string(e.what()).find("tls-cert"), std::string::npos) << e.what();
}

TEST_F(KmeClientTest, AKmeCertificateFromAnotherCaIsRefused) {
  KmeClient doubting(client_config(sim_->url(), "sae-a", "good", "rogue"));
  const KmeError e = otpgate::testing::kme_error_of([&] { doubting.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::tls) << e.what();
}

TEST_F(KmeClientTest, TheKmeHostNameIsChecked) {
  // The KME certificate names localhost, 127.0.0.1 and ::1. A KME listening on 127.0.0.2
  // (loopback too, so the connection is made) presents that certificate under another
  // name: the TLS handshake must refuse it, whatever the CA says.
  auto config = otpgate::testing::simulator_config();
  config.host = "127.0.0.2";
  kmesim::KmeSimulator elsewhere(config);
  elsewhere.start();
  KmeClient wrong_host(
      client_config("https://127.0.0.2:" + std::to_string(elsewhere.port()), "sae-a"));
  const KmeError e = otpgate::testing::kme_error_of([&] { wrong_host.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::tls) << e.what();
  EXPECT_EQ(elsewhere.stats().requests, 0u) << "a request reached a KME of the wrong name";
}

TEST_F(KmeClientTest, SizesMustBeMultiplesOfEightAndWithinLimits) {
  auto a = client("sae-a");
  KmeError e = otpgate::testing::kme_error_of([&] { a.enc_keys("sae-b", 1, 260); });
  EXPECT_EQ(e.kind(), KmeErrorKind::bad_request);
  EXPECT_NE(std::string(e.what()).find("size shall be a multiple of 8"), std::string::npos);
  e = otpgate::testing::kme_error_of([&] { a.enc_keys("sae-b", 1, 16384); });
  EXPECT_EQ(e.kind(), KmeErrorKind::bad_request);
  e = otpgate::testing::kme_error_of([&] { a.enc_keys("sae-b", 2000, 256); });
  EXPECT_NE(std::string(e.what()).find("do not adhere to KME rules"), std::string::npos);
}

TEST_F(KmeClientTest, UnsupportedMandatoryExtensionsAreRefused) {
  httplib::SSLClient raw("localhost", sim_->port(),
                         (otpgate::testing::pki_dir() / "sae-a.crt").string(),
                         (otpgate::testing::pki_dir() / "sae-a.key").string());
  raw.set_ca_cert_path((otpgate::testing::pki_dir() / "ca.crt").c_str());
  raw.enable_server_certificate_verification(true);
  auto res =
      raw.Post("/api/v1/keys/sae-b/enc_keys",
               R"({"number":1,"size":256,"extension_mandatory":[{"abc_route_type":"direct"}]})",
               "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(res->body.find("not all extension_mandatory parameters are supported"),
            std::string::npos);
}

TEST_F(KmeClientTest, SaeIdsAreUrlEncodedInThePath) {
  auto a = client("sae-a");
  const auto s = a.status("ward 7+icu%");
  EXPECT_EQ(s.slave_sae_id, "ward 7+icu%");
  const auto keys = a.enc_keys("ward 7+icu%", 1, 256);
  auto ward = client("ward 7+icu%");
  EXPECT_TRUE(same_bytes(ward.dec_key("sae-a", keys[0].id).bytes, keys[0].bytes));
}

TEST_F(KmeClientTest, AnEmptyStoreAnswers503AndRecovers) {
  sim_.reset();
  auto config = otpgate::testing::simulator_config();
  config.start_full = false;
  config.key_rate_bps = 8;  // one byte a second: empty for the test's purposes
  start(config);
  auto a = client("sae-a");
  const KmeError e = otpgate::testing::kme_error_of([&] { a.enc_keys("sae-b", 1, 8192); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unavailable);
  EXPECT_EQ(e.http_status(), 503);
  EXPECT_TRUE(e.retryable());
  EXPECT_GE(sim_->stats().refused, 3u) << "503 is retried max_attempts times";
  sim_->set_key_rate(0);  // key returns
  EXPECT_EQ(a.enc_keys("sae-b", 1, 8192).size(), 1u);
}

TEST_F(KmeClientTest, AKeyNotYetRelayedIsReportedAtOnceAndFetchedLater) {
  sim_.reset();
  auto config = otpgate::testing::simulator_config();
  config.relay_delay = std::chrono::milliseconds(150);
  start(config);
  auto a = client("sae-a");
  auto b = client("sae-b");
  const auto keys = a.enc_keys("sae-b", 2, 256);
  const std::vector<keys::KeyId> ids{keys[0].id, keys[1].id};
  // The client decides nothing about relaying: one request, key_not_found (the key
  // supply waits for the relay, see KeySupplyTest).
  const KmeError e = otpgate::testing::kme_error_of([&] { b.dec_keys("sae-a", ids); });
  EXPECT_EQ(e.kind(), KmeErrorKind::key_not_found);
  EXPECT_EQ(sim_->stats().refused, 1u);
  std::vector<keys::Key> fetched;
  ASSERT_TRUE(otpgate::testing::eventually([&] {
    try {
      fetched = b.dec_keys("sae-a", ids);
      return true;
    } catch (const KmeError& again) {
      return again.kind() != KmeErrorKind::key_not_found;  // anything else fails below
    }
  }));
  ASSERT_EQ(fetched.size(), 2u);
  EXPECT_TRUE(same_bytes(fetched[1].bytes, keys[1].bytes));
}

TEST_F(KmeClientTest, PremadeKeysAreServedOnceEachAndOnlyAtTheirSize) {
  sim_.reset();
  auto config = otpgate::testing::simulator_config();
  config.premade_bits = 4 * std::uint64_t{config.max_key_size};
  start(config);
  {  // the clients close their kept-alive connections before the simulator restarts
    EXPECT_EQ(sim_->stats().premade_bits, 4u * config.max_key_size);
    auto a = client("sae-a");
    auto b = client("sae-b");

    const auto other_size = a.enc_keys("sae-b", 2, 256);  // generated on demand
    EXPECT_EQ(sim_->stats().premade_bits, 4u * config.max_key_size);
    const auto premade = a.enc_keys("sae-b", 3, config.max_key_size);
    ASSERT_EQ(premade.size(), 3u);
    EXPECT_EQ(sim_->stats().premade_bits, 1u * config.max_key_size);
    EXPECT_EQ(premade[0].bytes.size(), config.max_key_size / 8);
    EXPECT_FALSE(same_bytes(premade[0].bytes, premade[1].bytes));
    EXPECT_FALSE(same_bytes(premade[1].bytes, premade[2].bytes));

    // The slave gets the very bytes its master got, once.
    std::vector<keys::KeyId> ids;
    for (const auto& k : premade) ids.push_back(k.id);
    const auto fetched = b.dec_keys("sae-a", ids);
    for (std::size_t i = 0; i < premade.size(); ++i)
      EXPECT_TRUE(same_bytes(fetched[i].bytes, premade[i].bytes));
    EXPECT_EQ(otpgate::testing::kme_error_of([&] { b.dec_key("sae-a", ids[0]); }).kind(),
              KmeErrorKind::key_not_found);

    // The last premade key, then one generated: the store serves past them.
    EXPECT_EQ(a.enc_keys("sae-b", 2, config.max_key_size).size(), 2u);
    EXPECT_EQ(sim_->stats().premade_bits, 0u);
    EXPECT_EQ(other_size.size(), 2u);
  }

  // A drain empties the store, premade keys included.
  sim_.reset();
  config.key_rate_bps = 8;  // one byte a second: empty for the test's purposes
  start(config);
  EXPECT_EQ(sim_->stats().premade_bits, 4u * config.max_key_size);
  sim_->drain();
  EXPECT_EQ(sim_->stats().premade_bits, 0u);
  auto a2 = client("sae-a");
  EXPECT_EQ(
      otpgate::testing::kme_error_of([&] { a2.enc_keys("sae-b", 1, config.max_key_size); }).kind(),
      KmeErrorKind::unavailable);
}

TEST_F(KmeClientTest, ConfigurationErrorsNameTheSetting) {
  auto config = client_config(sim_->url(), "sae-a");
  config.base_url = "http://localhost:1";
  try {
    KmeClient plain(config);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("https://"), std::string::npos);
  }
  config = client_config(sim_->url(), "sae-a");
  config.tls.private_key = "/nonexistent/sae-a.key";
  try {
    KmeClient missing(config);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("tls-key"), std::string::npos);
  }
}

TEST_F(KmeClientTest, ADeadKmeIsATransportError) {
  const std::string url = sim_->url();
  sim_.reset();
  auto a = KmeClient(client_config(url, "sae-a"));
  const KmeError e = otpgate::testing::kme_error_of([&] { a.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::transport) << e.what();
  EXPECT_TRUE(e.retryable());
}

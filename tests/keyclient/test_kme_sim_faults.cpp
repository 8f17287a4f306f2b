// SPDX-License-Identifier: LGPL-2.1-or-later
// qkd-kme-sim's fault modes, which reproduce the quirks of real third-party KMEs, against
// the ETSI 014 client over real HTTPS with mutual TLS. Assertions are on status codes,
// error kinds, bodies and counts; no key material is ever printed.
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <fstream>
#include <future>
#include <thread>

#include "test_pki.hpp"

extern char** environ;

using namespace otpgate;
using keys::KmeClient;
using keys::KmeError;
using keys::KmeErrorKind;
using kmesim::ErrorStyle;
using otpgate::testing::client_config;
using otpgate::testing::eventually;
using otpgate::testing::kme_error_of;

namespace {

constexpr const char* kKeysDoNotExist = "Some of the requested keys do not exist in this KME.";
constexpr const char* kUnknownKeyId = "bc490419-7d60-487f-adc1-4ddcc177c139";

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// 400 for a key the KME does not have; the client may call it either kind (it decides on
// the status code, not on the wording).
void expect_missing_key(const KmeError& e) {
  EXPECT_EQ(e.http_status(), 400) << e.what();
  EXPECT_TRUE(e.kind() == KmeErrorKind::bad_request || e.kind() == KmeErrorKind::key_not_found)
      << e.what();
}

class KmeSimFaults : public ::testing::Test {
 protected:
  void start(kmesim::SimulatorConfig config) {
    sim_.reset();
    sim_ = std::make_unique<kmesim::KmeSimulator>(std::move(config));
    sim_->start();
  }
  void start(const kmesim::SimulatorFaults& faults) {
    auto config = otpgate::testing::simulator_config();
    config.faults = faults;
    start(std::move(config));
  }
  KmeClient client(const std::string& sae) { return KmeClient(client_config(sim_->url(), sae)); }

  // A plain HTTPS client with the SAE's certificate, to look at bodies and headers.
  std::unique_ptr<httplib::SSLClient> raw(const std::string& sae) {
    const auto pki = otpgate::testing::pki_dir();
    auto c = std::make_unique<httplib::SSLClient>("localhost", sim_->port(),
                                                  (pki / (sae + ".crt")).string(),
                                                  (pki / (sae + ".key")).string());
    c->set_ca_cert_path((pki / "ca.crt").c_str());
    c->enable_server_certificate_verification(true);
    c->set_read_timeout(std::chrono::seconds(10));
    return c;
  }

  std::unique_ptr<kmesim::KmeSimulator> sim_;
};

// One answer of each error situation, asked for with a plain client: status, type, body.
struct Answer {
  int status = 0;
  std::string content_type, body;
};

Answer answer_of(const httplib::Result& res) {
  if (!res) {
    ADD_FAILURE() << "no HTTP answer: " << httplib::to_string(res.error());
    return {};
  }
  return {res->status, res->get_header_value("Content-Type"), res->body};
}

}  // namespace

TEST_F(KmeSimFaults, ReplaceUnfetchedBatchDropsThePairsUnfetchedKeys) {
  kmesim::SimulatorFaults faults;
  faults.replace_unfetched_batch = true;
  start(faults);
  auto a = client("sae-a");
  auto b = client("sae-b");
  auto c = client("sae-c");

  const auto first = a.enc_keys("sae-b", 3, 256);
  ASSERT_EQ(first.size(), 3u);
  EXPECT_EQ(b.dec_key("sae-a", first[0].id).bytes.size(), 32u);  // fetched before the next batch
  const auto to_c = a.enc_keys("sae-c", 1, 256);                 // another pair: untouched
  EXPECT_EQ(sim_->stats().keys_replaced, 0u);
  EXPECT_EQ(sim_->stats().pending_bits, 3u * 256);

  const auto second = a.enc_keys("sae-b", 2, 512);
  ASSERT_EQ(second.size(), 2u);
  auto s = sim_->stats();
  EXPECT_EQ(s.keys_replaced, 2u);
  EXPECT_EQ(s.pending_bits, 2u * 512 + 256) << "dropped keys no longer count as pending";

  for (int dropped : {1, 2}) {
    const KmeError e = kme_error_of([&] { b.dec_key("sae-a", first[dropped].id); });
    expect_missing_key(e);
    EXPECT_TRUE(contains(e.what(), kKeysDoNotExist)) << e.what();
  }
  const Answer dropped =
      answer_of(raw("sae-b")->Get("/api/v1/keys/sae-a/dec_keys?key_ID=" + first[1].id.to_string()));
  EXPECT_EQ(dropped.status, 400);
  EXPECT_TRUE(contains(dropped.body, kKeysDoNotExist)) << dropped.body;

  const std::vector<keys::KeyId> ids{second[0].id, second[1].id};
  EXPECT_EQ(b.dec_keys("sae-a", ids).size(), 2u);
  EXPECT_EQ(c.dec_key("sae-a", to_c[0].id).bytes.size(), 32u);
  s = sim_->stats();
  EXPECT_EQ(s.pending_bits, 0u);
  EXPECT_EQ(s.keys_to_slaves, 4u);

  // Off at run time: batches accumulate again.
  faults.replace_unfetched_batch = false;
  sim_->set_faults(faults);
  const auto third = a.enc_keys("sae-b", 1, 256);
  const auto fourth = a.enc_keys("sae-b", 1, 256);
  EXPECT_EQ(b.dec_key("sae-a", third[0].id).bytes.size(), 32u);
  EXPECT_EQ(b.dec_key("sae-a", fourth[0].id).bytes.size(), 32u);
  EXPECT_EQ(sim_->stats().keys_replaced, 2u);
}

TEST_F(KmeSimFaults, ReplacedKeysAreLostWhenKeyIsGeneratedAtARate) {
  auto config = otpgate::testing::simulator_config();
  config.faults.replace_unfetched_batch = true;
  config.key_rate_bps = 1;  // practically nothing comes back
  config.store_bits = 4096;
  start(config);
  auto a = client("sae-a");
  a.enc_keys("sae-b", 4, 512);  // 2048 bits pending, 2048 ready
  EXPECT_LE(sim_->stats().stored_bits, 2048u + 64);
  a.enc_keys("sae-b", 1, 512);  // drops 4 keys: their 2048 bits are gone, not ready again
  const auto s = sim_->stats();
  EXPECT_EQ(s.keys_replaced, 4u);
  EXPECT_EQ(s.pending_bits, 512u);
  EXPECT_LE(s.stored_bits, 1536u + 64);
}

// The key container is written in pieces of up to 16 KiB (a TLS record each), a key too
// large for one on its own: many small keys span many pieces, a 1 Mbit key is written
// directly, and every key reaches master and slave whole and the same.
TEST_F(KmeSimFaults, KeyContainersOfManySmallOrFewLargeKeysArriveWhole) {
  auto config = otpgate::testing::simulator_config();
  config.max_key_size = 1u << 20;
  start(config);
  auto a = client("sae-a");
  auto b = client("sae-b");
  for (const auto& [number, bits] : {std::pair{300u, 8192u}, std::pair{2u, 1u << 20}}) {
    const auto keys = a.enc_keys("sae-b", number, bits);
    ASSERT_EQ(keys.size(), number);
    std::vector<keys::KeyId> ids;
    for (const auto& k : keys) {
      EXPECT_EQ(k.bytes.size(), bits / 8);
      ids.push_back(k.id);
    }
    const auto fetched = b.dec_keys("sae-a", ids);
    ASSERT_EQ(fetched.size(), number);
    for (std::size_t i = 0; i < number; ++i) {
      const auto theirs = fetched[i].bytes.span(), ours = keys[i].bytes.span();
      ASSERT_EQ(fetched[i].id, keys[i].id);
      EXPECT_TRUE(std::equal(theirs.begin(), theirs.end(), ours.begin(), ours.end()))
          << "key " << i << " of " << number << " differs";
    }
  }
}

TEST_F(KmeSimFaults, CapsDeliverFewerAndSmallerKeysInsteadOfRefusing) {
  auto config = otpgate::testing::simulator_config();
  config.max_key_size = 1024;
  config.max_keys_per_request = 4;
  config.faults.cap_instead_of_refuse = true;
  start(config);
  auto a = client("sae-a");
  auto b = client("sae-b");

  for (auto method : {KmeClient::Method::post, KmeClient::Method::get}) {
    const auto keys = a.enc_keys("sae-b", 10, 8192, method);
    ASSERT_EQ(keys.size(), 4u) << "number capped at max_keys_per_request";
    for (const auto& k : keys) EXPECT_EQ(k.bytes.size(), 128u) << "size capped at max_key_size";
    std::vector<keys::KeyId> ids;
    for (const auto& k : keys) ids.push_back(k.id);
    const auto fetched = b.dec_keys("sae-a", ids);
    ASSERT_EQ(fetched.size(), 4u);
    EXPECT_EQ(fetched[3].bytes.size(), 128u);
  }
  EXPECT_EQ(a.enc_keys("sae-b", 10, 512).front().bytes.size(), 64u) << "only what is too large";
  EXPECT_EQ(a.enc_keys("sae-b", 2, 4096).size(), 2u) << "only what is too many";
  EXPECT_EQ(sim_->stats().keys_to_masters, 4u + 4 + 4 + 2);
  EXPECT_EQ(sim_->stats().refused, 0u);

  // Below the minimum or not whole bytes is still refused.
  EXPECT_EQ(kme_error_of([&] { a.enc_keys("sae-b", 1, 32); }).http_status(), 400);
  EXPECT_EQ(kme_error_of([&] { a.enc_keys("sae-b", 1, 260); }).http_status(), 400);

  // Without the fault the same requests are refused with 400.
  auto faults = sim_->faults();
  faults.cap_instead_of_refuse = false;
  sim_->set_faults(faults);
  KmeError e = kme_error_of([&] { a.enc_keys("sae-b", 10, 1024); });
  EXPECT_EQ(e.kind(), KmeErrorKind::bad_request) << e.what();
  EXPECT_EQ(e.http_status(), 400);
  e = kme_error_of([&] { a.enc_keys("sae-b", 1, 8192); });
  EXPECT_EQ(e.http_status(), 400);
}

TEST_F(KmeSimFaults, HtmlStyleAnswersEveryErrorWithAPageAndNoJson) {
  kmesim::SimulatorFaults faults;
  faults.error_style = ErrorStyle::html;
  start(faults);
  sim_->set_key_rate(1);
  sim_->drain();

  const std::vector<std::pair<int, Answer>> answers{
      {401, answer_of(raw("sae-unregistered")->Get("/api/v1/keys/sae-b/status"))},
      {400, answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/enc_keys?size=260"))},
      {400, answer_of(raw("sae-a")->Post("/api/v1/keys/sae-b/enc_keys", "{not json",
                                         "application/json"))},
      {400, answer_of(raw("sae-b")->Get(std::string("/api/v1/keys/sae-a/dec_keys?key_ID=") +
                                        kUnknownKeyId))},
      {503, answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/enc_keys?size=8192"))},
      {404, answer_of(raw("sae-a")->Get("/api/v1/no-such-thing"))},
  };
  for (const auto& [status, answer] : answers) {
    EXPECT_EQ(answer.status, status) << answer.body;
    EXPECT_TRUE(contains(answer.content_type, "text/html")) << answer.content_type;
    EXPECT_TRUE(contains(answer.body, "<html><head><title>" + std::to_string(status) + " "))
        << answer.body;
    EXPECT_TRUE(contains(answer.body, "</p></body></html>")) << answer.body;
    EXPECT_FALSE(contains(answer.body, "{")) << "no JSON in an HTML page: " << answer.body;
    EXPECT_FALSE(contains(answer.body, "\"message\"")) << answer.body;
  }
  EXPECT_TRUE(contains(answers[0].second.body,
                       "<title>401 Unauthorized</title></head><body><h1>Unauthorized</h1><p>"))
      << answers[0].second.body;
  EXPECT_TRUE(contains(answers[0].second.body, "&quot;sae-unregistered&quot;"))
      << "the message is escaped: " << answers[0].second.body;
  EXPECT_TRUE(contains(answers[4].second.body, "<h1>Service Unavailable</h1>"));

  // The client decides on the status code.
  auto x = client("sae-unregistered");
  KmeError e = kme_error_of([&] { x.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unauthorized) << e.what();
  EXPECT_EQ(e.http_status(), 401);
  EXPECT_FALSE(contains(e.what(), "<")) << e.what();
  auto a = client("sae-a");
  e = kme_error_of([&] { a.enc_keys("sae-b", 1, 8192); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unavailable) << e.what();
  EXPECT_EQ(e.http_status(), 503);
}

TEST_F(KmeSimFaults, VendorStyleUsesItsOwnWordingInADetailField) {
  kmesim::SimulatorFaults faults;
  faults.error_style = ErrorStyle::vendor;
  start(faults);
  auto a = client("sae-a");
  auto b = client("sae-b");

  const Answer unknown = answer_of(
      raw("sae-b")->Get(std::string("/api/v1/keys/sae-a/dec_keys?key_ID=") + kUnknownKeyId));
  EXPECT_EQ(unknown.status, 400);
  EXPECT_TRUE(contains(unknown.content_type, "application/json"));
  EXPECT_EQ(unknown.body, std::string(R"({"detail":")") + kKeysDoNotExist + "\"}");

  const Answer stranger = answer_of(raw("sae-unregistered")->Get("/api/v1/keys/sae-b/status"));
  EXPECT_EQ(stranger.status, 401);
  EXPECT_EQ(stranger.body, R"({"detail":"Client certificate not accepted"})");
  EXPECT_FALSE(contains(stranger.body, "not registered")) << "that is the ETSI style's wording";

  const Answer no_route = answer_of(raw("sae-a")->Get("/api/v1/no-such-thing"));
  EXPECT_EQ(no_route.status, 404);
  EXPECT_TRUE(contains(no_route.body, R"("detail")")) << no_route.body;

  KmeError e = kme_error_of([&] { b.dec_key("sae-a", *keys::KeyId::parse(kUnknownKeyId)); });
  expect_missing_key(e);
  EXPECT_TRUE(contains(e.what(), kKeysDoNotExist)) << e.what();
  EXPECT_FALSE(contains(e.what(), "not found on KME")) << e.what();

  sim_->set_key_rate(1);
  sim_->drain();
  e = kme_error_of([&] { a.enc_keys("sae-b", 1, 8192); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unavailable) << e.what();
  EXPECT_EQ(e.http_status(), 503);
  EXPECT_TRUE(contains(e.what(), "Insufficient key material")) << e.what();
  EXPECT_FALSE(contains(e.what(), "exhausted")) << e.what();

  auto x = client("sae-unregistered");
  e = kme_error_of([&] { x.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unauthorized) << e.what();
  EXPECT_TRUE(contains(e.what(), "Client certificate not accepted")) << e.what();
}

TEST_F(KmeSimFaults, StatusCodesAreTheSameInEveryErrorStyle) {
  start(kmesim::SimulatorFaults{});
  const auto key = client("sae-a").enc_keys("sae-b", 1, 256);
  auto situations = [&] {
    return std::vector<int>{
        answer_of(raw("sae-unregistered")->Get("/api/v1/keys/sae-b/status")).status,
        answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/enc_keys?size=260")).status,
        answer_of(raw("sae-a")->Get("/api/v1/keys/sae-nobody/status")).status,
        answer_of(raw("sae-c")->Get("/api/v1/keys/sae-a/dec_keys?key_ID=" + key[0].id.to_string()))
            .status,
        answer_of(
            raw("sae-b")->Get(std::string("/api/v1/keys/sae-a/dec_keys?key_ID=") + kUnknownKeyId))
            .status,
        answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/enc_keys?number=100000")).status,
    };
  };
  const std::vector<int> expected{401, 400, 400, 401, 400, 400};
  for (ErrorStyle style : {ErrorStyle::etsi, ErrorStyle::html, ErrorStyle::vendor}) {
    kmesim::SimulatorFaults faults;
    faults.error_style = style;
    sim_->set_faults(faults);
    EXPECT_EQ(situations(), expected) << "style " << static_cast<int>(style);
  }
  const Answer etsi = answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/enc_keys?size=260"));
  EXPECT_EQ(etsi.status, 400);  // the last style set is vendor
  EXPECT_EQ(etsi.body, R"({"detail":"Key size must be a multiple of 8 bits"})");
  sim_->set_faults({});
  EXPECT_EQ(answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/enc_keys?size=260")).body,
            R"({"message":"size shall be a multiple of 8"})");
}

TEST_F(KmeSimFaults, StoredCountOfPairCountsKeysTheSlaveHasNotFetched) {
  kmesim::SimulatorFaults faults;
  faults.stored_count_of_pair = true;
  start(faults);
  auto a = client("sae-a");
  auto b = client("sae-b");
  EXPECT_EQ(a.status("sae-b").stored_key_count, 0u) << "a full store, but nothing pending";
  const auto keys = a.enc_keys("sae-b", 5, 256);
  a.enc_keys("sae-c", 2, 1024);
  EXPECT_EQ(a.status("sae-b").stored_key_count, 5u);
  EXPECT_EQ(a.status("sae-c").stored_key_count, 2u);
  EXPECT_EQ(b.status("sae-a").stored_key_count, 0u) << "the pair in the other direction";
  const std::vector<keys::KeyId> ids{keys[0].id, keys[1].id};
  b.dec_keys("sae-a", ids);
  EXPECT_EQ(a.status("sae-b").stored_key_count, 3u);

  sim_->set_faults({});
  const auto ready = a.status("sae-b");
  EXPECT_EQ(ready.stored_key_count, sim_->stats().stored_bits / ready.key_size);
  EXPECT_GT(ready.stored_key_count, 1000u);
}

TEST_F(KmeSimFaults, HangHoldsRequestsUntilClearedAndTheClientTimesOut) {
  start(kmesim::SimulatorFaults{});
  auto config = client_config(sim_->url(), "sae-a");
  config.request_timeout = std::chrono::seconds(1);
  config.retry.max_attempts = 2;
  KmeClient a(config);
  EXPECT_EQ(a.status("sae-b").slave_sae_id, "sae-b");

  kmesim::SimulatorFaults faults;
  faults.hang = true;
  sim_->set_faults(faults);
  const KmeError e = kme_error_of([&] { a.enc_keys("sae-b", 1, 256); });
  EXPECT_EQ(e.kind(), KmeErrorKind::transport) << e.what();
  EXPECT_EQ(e.http_status(), 0);
  const auto hung = sim_->stats().requests_hung;
  EXPECT_GE(hung, 1u);
  EXPECT_LE(hung, 2u);
  EXPECT_EQ(sim_->stats().keys_to_masters, 0u) << "nothing was answered";

  sim_->set_faults({});
  const auto keys = a.enc_keys("sae-b", 1, 256);
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(client("sae-b").dec_key("sae-a", keys[0].id).bytes.size(), 32u);
  EXPECT_EQ(sim_->stats().requests_hung, hung);
}

// answer_delay: every request is answered late (a KME far away or overloaded), whole; a
// client that waits less than that gives up with a transport error, one that waits
// longer gets its keys, and the slave gets the same key.
TEST_F(KmeSimFaults, SlowAnswersComeLateButWholeAndAnImpatientClientTimesOut) {
  kmesim::SimulatorFaults faults;
  faults.answer_delay = std::chrono::milliseconds(600);
  start(faults);
  auto impatient = client_config(sim_->url(), "sae-a");
  impatient.request_timeout = std::chrono::milliseconds(150);
  impatient.retry.max_attempts = 1;
  const KmeError e = kme_error_of([&] { KmeClient(impatient).enc_keys("sae-b", 1, 256); });
  EXPECT_EQ(e.kind(), KmeErrorKind::transport) << e.what();
  EXPECT_EQ(e.http_status(), 0);

  auto patient = client_config(sim_->url(), "sae-a");
  patient.request_timeout = std::chrono::seconds(10);
  KmeClient a(patient);
  const auto keys = a.enc_keys("sae-b", 2, 256);
  ASSERT_EQ(keys.size(), 2u);
  auto slave_config = client_config(sim_->url(), "sae-b");
  slave_config.request_timeout = std::chrono::seconds(10);
  KmeClient b(slave_config);
  for (const auto& key : keys) {
    const auto got = b.dec_key("sae-a", key.id);
    const auto theirs = got.bytes.span(), ours = key.bytes.span();
    EXPECT_TRUE(std::equal(theirs.begin(), theirs.end(), ours.begin(), ours.end()))
        << "master and slave keys differ";
  }
  EXPECT_GE(sim_->stats().requests_delayed, 4u);  // the impatient one, enc_keys, 2 dec_keys
  EXPECT_EQ(sim_->stats().requests_hung, 0u);
}

// grow_bits_per_request: each request, of any kind, finds exactly that much more key,
// and never more than the store holds.
TEST_F(KmeSimFaults, EveryRequestFindsTheStoreGrownByTheBitsAsked) {
  auto config = otpgate::testing::simulator_config();
  config.start_full = false;
  config.key_rate_bps = 1e-3;
  config.key_size = 256;
  config.store_bits = 100 * 256;
  config.faults.grow_bits_per_request = 10 * 256;
  start(std::move(config));
  KmeClient a = client("sae-a");
  EXPECT_EQ(a.status("sae-b").stored_key_count, 10u);
  EXPECT_EQ(a.status("sae-b").stored_key_count, 20u);
  ASSERT_EQ(a.enc_keys("sae-b", 4, 256).size(), 4u);   // grown to 30, 4 taken
  EXPECT_EQ(a.status("sae-b").stored_key_count, 36u);  // the 4 keys are pending: room 96
  for (int i = 0; i < 10; ++i) a.status("sae-b");
  EXPECT_EQ(a.status("sae-b").stored_key_count, 96u) << "grew beyond the store's size";
}

TEST_F(KmeSimFaults, StopReturnsWhileRequestsHang) {
  kmesim::SimulatorFaults faults;
  faults.hang = true;
  start(faults);
  std::vector<std::thread> callers;
  std::atomic<int> failed{0};
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&] {
      auto config = client_config(sim_->url(), "sae-a");
      config.request_timeout = std::chrono::seconds(60);
      config.retry.max_attempts = 1;
      KmeClient a(config);
      try {
        a.status("sae-b");
      } catch (const KmeError&) {
        ++failed;
      }
    });
  }
  ASSERT_TRUE(eventually([&] { return sim_->stats().requests_hung >= 4; }));
  auto stopped = std::async(std::launch::async, [&] { sim_->stop(); });
  const bool prompt = stopped.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  EXPECT_TRUE(prompt) << "stop() is wedged by held requests";
  if (!prompt) sim_->set_faults({});  // let it finish, to fail here rather than time out
  stopped.get();
  for (auto& t : callers) t.join();
  EXPECT_EQ(failed, 4) << "held requests are never answered with keys or a status";
}

TEST_F(KmeSimFaults, RefusedSaesGet401InTheConfiguredStyle) {
  kmesim::SimulatorFaults faults;
  faults.refuse_sae = {"sae-c"};
  faults.error_style = ErrorStyle::vendor;
  start(faults);
  auto a = client("sae-a");
  auto c = client("sae-c");
  KmeError e = kme_error_of([&] { c.status("sae-a"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unauthorized) << e.what();
  EXPECT_EQ(e.http_status(), 401);
  EXPECT_TRUE(contains(e.what(), "Client certificate not accepted")) << e.what();
  const auto keys = a.enc_keys("sae-c", 1, 256);  // others are served, keys for sae-c too
  e = kme_error_of([&] { c.dec_key("sae-a", keys[0].id); });
  EXPECT_EQ(e.http_status(), 401);

  // At run time, in the ETSI style: sae-a refused now, sae-c served again.
  faults.refuse_sae = {"sae-a"};
  faults.error_style = ErrorStyle::etsi;
  sim_->set_faults(faults);
  EXPECT_EQ(c.dec_key("sae-a", keys[0].id).bytes.size(), 32u);
  e = kme_error_of([&] { a.enc_keys("sae-b", 1, 256); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unauthorized) << e.what();
  const Answer refused = answer_of(raw("sae-a")->Get("/api/v1/keys/sae-b/status"));
  EXPECT_EQ(refused.status, 401);
  EXPECT_TRUE(contains(refused.body, R"({"message":)")) << refused.body;
  EXPECT_TRUE(contains(refused.body, "not accepted")) << refused.body;
}

TEST_F(KmeSimFaults, AStoppedSimulatorsPortIsBoundAgainAtOnceWithAnEmptyStore) {
  start(kmesim::SimulatorFaults{});
  const int port = sim_->port();
  KmeClient a = client("sae-a");  // its kept-alive connection outlives the simulator
  const auto before = a.enc_keys("sae-b", 1, 256);
  sim_->stop();
  sim_.reset();

  auto config = otpgate::testing::simulator_config();
  config.port = port;
  config.start_full = false;
  config.key_rate_bps = 4096;
  start(config);  // throws if the port cannot be bound again
  EXPECT_EQ(sim_->port(), port);
  KmeError e = kme_error_of([&] { a.enc_keys("sae-b", 1, 8192); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unavailable) << e.what();
  e = kme_error_of([&] { client("sae-b").dec_key("sae-a", before[0].id); });
  expect_missing_key(e);
}

TEST_F(KmeSimFaults, ASecondSimulatorCannotListenOnAPortInUse) {
  // Re-binding at once after a stop must not mean sharing a port with a running KME.
  start(kmesim::SimulatorFaults{});
  auto config = otpgate::testing::simulator_config();
  config.port = sim_->port();
  kmesim::KmeSimulator second(config);
  EXPECT_THROW(second.start(), std::runtime_error);
  EXPECT_EQ(client("sae-a").enc_keys("sae-b", 1, 256).size(), 1u);
}

namespace {

// A qkd-kme-sim child process, killed (SIGKILL) if the test ends early.
class SimProcess {
 public:
  explicit SimProcess(const std::vector<std::string>& extra_args) {
    const auto pki = otpgate::testing::pki_dir();
    port_file_ =
        std::filesystem::temp_directory_path() / ("otpgate-kme-sim-" + std::to_string(::getpid()) +
                                                  "-" + std::to_string(++serial_) + ".port");
    std::filesystem::remove(port_file_);
    std::vector<std::string> args{OTPGATE_KME_SIM,
                                  "--cert",
                                  (pki / "kme.crt").string(),
                                  "--key",
                                  (pki / "kme.key").string(),
                                  "--ca",
                                  (pki / "ca.crt").string(),
                                  "--sae",
                                  "sae-a",
                                  "--sae",
                                  "sae-b",
                                  "--port-file",
                                  port_file_.string()};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ) != 0) pid_ = 0;
  }
  ~SimProcess() {
    if (pid_ > 0) kill();
    std::filesystem::remove(port_file_);
  }
  SimProcess(const SimProcess&) = delete;
  SimProcess& operator=(const SimProcess&) = delete;

  bool spawned() const { return pid_ > 0; }
  // The port once it listens; 0 if it exited or did not listen in time.
  int wait_listening() {
    int port = 0;
    eventually([&] {
      std::ifstream in(port_file_);
      if (in >> port) return true;
      port = 0;
      int status = 0;
      return ::waitpid(pid_, &status, WNOHANG) == pid_ && (pid_ = 0, true);
    });
    return port;
  }
  // SIGKILL, reaped; true if it died of it.
  bool kill() {
    if (::kill(pid_, SIGKILL) != 0) return false;
    int status = 0;
    const bool reaped = ::waitpid(pid_, &status, 0) == pid_;
    pid_ = 0;
    return reaped && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  }

 private:
  static inline int serial_ = 0;
  pid_t pid_ = 0;
  std::filesystem::path port_file_;
};

}  // namespace

TEST(KmeSimRestart, SigkilledSimulatorRestartsEmptyOnTheSamePort) {
  SimProcess first({"--port", "0", "--key-rate", "4096", "--store-bytes", "65536"});
  ASSERT_TRUE(first.spawned());
  const int port = first.wait_listening();
  ASSERT_GT(port, 0) << "qkd-kme-sim did not start";
  const std::string url = "https://localhost:" + std::to_string(port);
  KmeClient a(client_config(url, "sae-a"));
  KmeClient b(client_config(url, "sae-b"));
  const auto before = a.enc_keys("sae-b", 2, 256);
  EXPECT_EQ(b.dec_key("sae-a", before[0].id).bytes.size(), 32u);  // both hold connections

  ASSERT_TRUE(first.kill());
  const auto killed_at = std::chrono::steady_clock::now();
  SimProcess second({"--port", std::to_string(port), "--start-empty", "--key-rate", "4096",
                     "--store-bytes", "65536"});
  ASSERT_TRUE(second.spawned());
  ASSERT_EQ(second.wait_listening(), port) << "the port could not be bound again";
  const auto restart_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::steady_clock::now() - killed_at)
                              .count();
  RecordProperty("restart_ms", static_cast<int>(restart_ms));

  // Empty: 503 first (8192 bits take two seconds at 4096 bit/s) ...
  const KmeError e = kme_error_of([&] { a.enc_keys("sae-b", 1, 8192); });
  EXPECT_EQ(e.kind(), KmeErrorKind::unavailable) << e.what();
  EXPECT_EQ(e.http_status(), 503);
  // ... then keys once the rate has refilled the store.
  std::vector<keys::Key> after;
  EXPECT_TRUE(eventually([&] {
    try {
      after = a.enc_keys("sae-b", 1, 8192);
      return true;
    } catch (const KmeError& retry) {
      EXPECT_EQ(retry.kind(), KmeErrorKind::unavailable) << retry.what();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      return false;
    }
  }));
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].bytes.size(), 1024u);
  EXPECT_EQ(b.dec_key("sae-a", after[0].id).bytes.size(), 1024u);

  // A key issued before the crash is gone with the store.
  expect_missing_key(kme_error_of([&] { b.dec_key("sae-a", before[1].id); }));
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// The client against a misbehaving KME: the departures from ETSI GS QKD 014 that real
// KMEs show, garbage, hangs and broken connections. A real HTTPS server with mTLS.
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <thread>

#include "test_pki.hpp"

using namespace otpgate;
using keys::KmeClient;
using keys::KmeError;
using keys::KmeErrorKind;

namespace {

constexpr const char* kSecretLooking = "U0VDUkVULUtFWS1NQVRFUklBTC0wMTIzNDU2Nzg5";
constexpr const char* kKeyId = "bc490419-7d60-487f-adc1-4ddcc177c139";

class FakeKme {
 public:
  explicit FakeKme(std::function<void(const httplib::Request&, httplib::Response&, int hit)> answer)
      : server_((otpgate::testing::pki_dir() / "kme.crt").c_str(),
                (otpgate::testing::pki_dir() / "kme.key").c_str(),
                (otpgate::testing::pki_dir() / "ca.crt").c_str()) {
    static constexpr unsigned char kContext[] = "fake-kme";
    SSL_CTX_set_session_id_context(server_.ssl_context(), kContext, sizeof kContext - 1);
    auto handler = [this, answer](const httplib::Request& req, httplib::Response& res) {
      answer(req, res, ++hits_);
    };
    server_.Get(R"(/api/v1/keys/.*)", handler);
    server_.Post(R"(/api/v1/keys/.*)", handler);
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~FakeKme() {
    server_.stop();
    thread_.join();
  }
  std::string url() const { return "https://localhost:" + std::to_string(port_); }
  int hits() const { return hits_; }

 private:
  httplib::SSLServer server_;
  int port_ = 0;
  std::atomic<int> hits_{0};
  std::thread thread_;
};

KmeClient client_for(const FakeKme& kme) {
  return KmeClient(otpgate::testing::client_config(kme.url(), "sae-a"));
}

std::string keys_json(const char* container) {
  return std::string(R"({")") + container + R"(":[{"key_ID":")" + kKeyId +
         R"(","key":"AAECAwQFBgcICQoLDA0ODw==","key_ID_extension":{"vendor":1}}],"vendor_extra":true})";
}

}  // namespace

TEST(KmeQuirks, HtmlErrorPagesAreQuotedBrieflyAndRetried) {
  FakeKme kme([](const auto&, httplib::Response& res, int) {
    res.status = 500;
    res.set_content("<html><body><h1>Internal Server Error</h1><p>upstream gone</p></body></html>",
                    "text/html");
  });
  auto client = client_for(kme);
  const KmeError e = otpgate::testing::kme_error_of([&] { client.enc_keys("sae-b", 1, 256); });
  EXPECT_EQ(e.kind(), KmeErrorKind::server);
  EXPECT_EQ(e.http_status(), 500);
  EXPECT_NE(std::string(e.what()).find("Internal Server Error upstream gone"), std::string::npos)
      << e.what();
  EXPECT_EQ(std::string(e.what()).find("<h1>"), std::string::npos);
  EXPECT_EQ(kme.hits(), 3);  // max_attempts
}

TEST(KmeQuirks, DetailBodiesAndOtherCodesAreReadNotRetried) {
  FakeKme kme([](const auto&, httplib::Response& res, int) {
    res.status = 422;
    res.set_content(R"({"detail":"size: value is not a valid integer"})", "application/json");
  });
  auto client = client_for(kme);
  const KmeError e = otpgate::testing::kme_error_of([&] { client.enc_keys("sae-b", 1, 256); });
  EXPECT_EQ(e.kind(), KmeErrorKind::http);
  EXPECT_EQ(e.http_status(), 422);
  EXPECT_NE(std::string(e.what()).find("size: value is not a valid integer"), std::string::npos);
  EXPECT_EQ(kme.hits(), 1);
}

TEST(KmeQuirks, EmptyErrorBodiesAreSaidToBeEmpty) {
  FakeKme kme([](const auto&, httplib::Response& res, int) { res.status = 404; });
  auto client = client_for(kme);
  const KmeError e = otpgate::testing::kme_error_of([&] { client.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::not_found);
  EXPECT_NE(std::string(e.what()).find("HTTP 404: (empty body)"), std::string::npos) << e.what();
}

TEST(KmeQuirks, CapitalisedKeysAndUnknownFieldsAreAccepted) {
  FakeKme kme([](const auto&, httplib::Response& res, int) {
    res.set_content(keys_json("Keys"), "application/json");
  });
  auto client = client_for(kme);
  const auto keys = client.enc_keys("sae-b", 1, 128);
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(keys[0].id.to_string(), kKeyId);
  ASSERT_EQ(keys[0].bytes.size(), 16u);
  EXPECT_EQ(keys[0].bytes.span()[15], 15);
}

TEST(KmeQuirks, MalformedKeyAnswersAreNeverQuoted) {
  FakeKme kme([](const auto&, httplib::Response& res, int) {
    res.set_content(
        std::string(R"({"keys":[{"key_ID":")") + kKeyId + R"(","key":")" + kSecretLooking,
        "application/json");
  });
  auto client = client_for(kme);
  const KmeError e = otpgate::testing::kme_error_of([&] { client.enc_keys("sae-b", 1, 256); });
  EXPECT_EQ(e.kind(), KmeErrorKind::protocol);
  EXPECT_NE(std::string(e.what()).find("not a JSON object"), std::string::npos) << e.what();
  EXPECT_EQ(std::string(e.what()).find(kSecretLooking), std::string::npos);
  EXPECT_EQ(std::string(e.what()).find("U0VD"), std::string::npos);
}

TEST(KmeQuirks, MissingOrMalformedFieldsAreNamed) {
  int which = 0;
  FakeKme kme([&which](const auto&, httplib::Response& res, int) {
    const char* bodies[] = {
        R"({"keys":[{"key":"AAECAwQFBgcICQoLDA0ODw=="}]})",
        R"({"keys":[{"key_ID":"not-a-uuid","key":"AAECAwQFBgcICQoLDA0ODw=="}]})",
        R"({"keys":[{"key_ID":"bc490419-7d60-487f-adc1-4ddcc177c139","key":"@@@@"}]})",
        R"({"key_container":[]})",
        R"({"key_size":"256","max_key_per_request":1,"max_key_size":256,"min_key_size":64})",
        R"({"max_key_per_request":1,"max_key_size":256,"min_key_size":64})",
    };
    res.set_content(bodies[which], "application/json");
  });
  auto client = client_for(kme);
  const char* expected[] = {"no string \"key_ID\"",    "is not a UUID",
                            "is not valid base64",     "no \"keys\" array",
                            "\"key_size\" is \"256\"", "\"key_size\" is missing"};
  for (which = 0; which < 6; ++which) {
    const KmeError e = otpgate::testing::kme_error_of([&] {
      if (which < 4) {
        client.enc_keys("sae-b", 1, 128);
      } else {
        client.status("sae-b");
      }
    });
    EXPECT_EQ(e.kind(), KmeErrorKind::protocol) << e.what();
    EXPECT_NE(std::string(e.what()).find(expected[which]), std::string::npos) << e.what();
  }
}

TEST(KmeQuirks, A503IsRetriedUntilKeyArrives) {
  FakeKme kme([](const auto&, httplib::Response& res, int hit) {
    if (hit < 3) {
      res.status = 503;
      res.set_content(R"({"message":"keys exhausted"})", "application/json");
    } else {
      res.set_content(keys_json("keys"), "application/json");
    }
  });
  auto client = client_for(kme);
  EXPECT_EQ(client.enc_keys("sae-b", 1, 128).size(), 1u);
  EXPECT_EQ(kme.hits(), 3);
}

TEST(KmeQuirks, AHangingKmeTimesOut) {
  FakeKme kme([](const auto&, httplib::Response& res, int) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    res.status = 503;
  });
  auto config = otpgate::testing::client_config(kme.url(), "sae-a");
  config.request_timeout = std::chrono::milliseconds(300);
  config.retry.max_attempts = 1;
  KmeClient client(config);
  const KmeError e = otpgate::testing::kme_error_of([&] { client.status("sae-b"); });
  EXPECT_EQ(e.kind(), KmeErrorKind::transport);
  EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
}

TEST(KmeQuirks, AConnectionClosedMidAnswerIsATransportError) {
  FakeKme kme([](const auto&, httplib::Response& res, int) {
    res.set_content_provider(
        4096, "application/json", [](std::size_t offset, std::size_t, httplib::DataSink& sink) {
          if (offset != 0) return false;  // drop the connection after the first bytes
          const std::string start =
              std::string(R"({"keys":[{"key_ID":")") + kKeyId + R"(","key":")" + kSecretLooking;
          sink.write(start.data(), start.size());
          return true;
        });
  });
  auto config = otpgate::testing::client_config(kme.url(), "sae-a");
  config.retry.max_attempts = 1;
  KmeClient client(config);
  const KmeError e = otpgate::testing::kme_error_of([&] { client.enc_keys("sae-b", 1, 256); });
  EXPECT_TRUE(e.kind() == KmeErrorKind::transport || e.kind() == KmeErrorKind::tls) << e.what();
  EXPECT_EQ(std::string(e.what()).find(kSecretLooking), std::string::npos);
}

TEST(KmeQuirks, MissingKeysAreJudgedByStatusCodeWhateverTheWording) {
  // Three KMEs' ways of saying "no such key": none says "not found", one is HTML.
  int which = 0;
  FakeKme kme([&which](const httplib::Request&, httplib::Response& res, int) {
    switch (which) {
      case 0:
        res.status = 400;
        res.set_content(R"({"message":"Some of the requested keys do not exist in this KME."})",
                        "application/json");
        break;
      case 1:
        res.status = 404;
        res.set_content("<html><body><h1>Gone</h1></body></html>", "text/html");
        break;
      default:
        res.status = 400;
        res.set_content(R"({"detail":"invalid key identifiers"})", "application/json");
    }
  });
  auto client = client_for(kme);
  const auto id = *keys::KeyId::parse(kKeyId);
  for (which = 0; which < 3; ++which) {
    const int before = kme.hits();
    const KmeError e =
        otpgate::testing::kme_error_of([&] { client.dec_keys("sae-b", std::vector{id}); });
    EXPECT_EQ(e.kind(), KmeErrorKind::key_not_found) << e.what();
    EXPECT_EQ(kme.hits() - before, 1) << "a missing key is reported at once, not retried";
  }
  // The same codes on enc_keys are plain refusals (nothing to wait for).
  which = 0;
  EXPECT_EQ(otpgate::testing::kme_error_of([&] { client.enc_keys("sae-b", 1, 256); }).kind(),
            KmeErrorKind::bad_request);
}

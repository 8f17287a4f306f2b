// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-gateway --check-config (and start-up) refuses what would fail at run time: TLS
// files that do not parse or do not belong together, a tls_ca that is no CA, expired
// certificates, a KME URL without a host, a peer that does not resolve, ports in use, a
// state_dir that cannot be. Each with one line naming the key and the fix, exit 2.
#include <gtest/gtest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "gateway_fixture.hpp"
#include "otpgate/site_config.hpp"

namespace {

struct GatewayRun {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

GatewayRun run_gateway(const std::string& config_text, const fs::path& dir,
                       bool check_only = true) {
  const fs::path file = dir / "site.toml";
  std::ofstream(file) << config_text;
  // Without --check-config the gateway would run; `timeout` bounds that (exit 124).
  const std::string command = std::string(check_only ? "" : "timeout 20 ") + OTPGATE_GATEWAY_BIN +
                              (check_only ? " --check-config" : "") + " --config " + file.string() +
                              " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  GatewayRun run;
  if (!pipe) return run;
  char line[1024];
  while (std::fgets(line, sizeof line, pipe)) run.output += line;
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

class CheckConfig : public ::testing::Test {
 protected:
  std::string config() const {
    return site_config("sae-a", "sae-b", "https://localhost:4433", dir_.path / "state", base_,
                       true);
  }
  // `config()` with the value of `key` (as written there) replaced.
  std::string with(const std::string& key, const std::string& value) const {
    std::string t = config();
    const auto at = t.find("\n" + key + " = ");
    EXPECT_NE(at, std::string::npos) << key;
    const auto start = at + key.size() + 4, end = t.find('\n', start);
    return t.replace(start, end - start, value);
  }
  std::string pki(const std::string& file, const std::string& which = "good") const {
    return '"' + (otpgate::testing::pki_dir(which) / file).string() + '"';
  }
  // Exit 2 and exactly one output line, containing `expected`.
  void expect_refused(const std::string& text, const std::string& expected) {
    const GatewayRun run = run_gateway(text, dir_.path);
    EXPECT_EQ(run.exit_code, 2) << run.output;
    EXPECT_NE(run.output.find(expected), std::string::npos) << run.output;
    EXPECT_EQ(std::count(run.output.begin(), run.output.end(), '\n'), 1) << run.output;
  }

  otpgate::testing::TestDir dir_;
  std::uint16_t base_ = base_port();
};

// A certificate for sae-a signed by nobody, valid until an hour ago.
void write_expired_certificate(const fs::path& cert, const fs::path& key) {
  EVP_PKEY* pkey = EVP_EC_gen("P-256");
  X509* x = X509_new();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 7);
  X509_gmtime_adj(X509_getm_notBefore(x), -7200);
  X509_gmtime_adj(X509_getm_notAfter(x), -3600);
  X509_NAME* name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("sae-a"), -1, -1, 0);
  X509_set_issuer_name(x, name);
  X509_set_pubkey(x, pkey);
  X509_sign(x, pkey, EVP_sha256());
  FILE* f = std::fopen(cert.c_str(), "w");
  PEM_write_X509(f, x);
  std::fclose(f);
  f = std::fopen(key.c_str(), "w");
  PEM_write_PrivateKey(f, pkey, nullptr, nullptr, 0, nullptr, nullptr);
  std::fclose(f);
  X509_free(x);
  EVP_PKEY_free(pkey);
}

}  // namespace

TEST_F(CheckConfig, AGoodConfigPassesAndSaysWhatWasChecked) {
  const GatewayRun run = run_gateway(config(), dir_.path);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(
      run.output.find("valid (TLS files, KME URL, state_dir, peer address and ports checked)"),
      std::string::npos)
      << run.output;
  EXPECT_EQ(run.output.find("warning"), std::string::npos) << run.output;
}

TEST_F(CheckConfig, AKeyThatIsNotPemIsRefused) {
  std::ofstream(dir_.path / "garbage.key") << "not a key\n";
  expect_refused(with("tls_key", '"' + (dir_.path / "garbage.key").string() + '"'),
                 "kme.tls_key = \"" + (dir_.path / "garbage.key").string() +
                     "\": not a readable PEM private key");
}

TEST_F(CheckConfig, AKeyFromAnotherPairIsRefused) {
  expect_refused(with("tls_key", pki("sae-b.key")),
                 "does not match the certificate in kme.tls_cert");
}

TEST_F(CheckConfig, ATlsCaThatIsNoCaIsRefused) {
  expect_refused(with("tls_ca", pki("sae-b.crt")),
                 "kme.tls_ca = " + pki("sae-b.crt") + ": holds no CA certificate");
}

TEST_F(CheckConfig, AnExpiredCertificateIsRefused) {
  write_expired_certificate(dir_.path / "old.crt", dir_.path / "old.key");
  std::string text = with("tls_cert", '"' + (dir_.path / "old.crt").string() + '"');
  const auto at = text.find("/sae-a.key\"");
  text.replace(text.rfind('"', at), at + 11 - text.rfind('"', at),
               '"' + (dir_.path / "old.key").string() + '"');
  const GatewayRun run = run_gateway(text, dir_.path);
  EXPECT_EQ(run.exit_code, 2) << run.output;
  EXPECT_NE(run.output.find("kme.tls_cert = \"" + (dir_.path / "old.crt").string() + "\": expired"),
            std::string::npos)
      << run.output;
}

TEST_F(CheckConfig, AKmeUrlWithoutAHostIsRefused) {
  expect_refused(with("url", "\"https://\""), "kme.url = \"https://\": not a URL with a host");
}

TEST_F(CheckConfig, APeerThatDoesNotResolveIsRefused) {
  expect_refused(with("address", "\"no-such-gateway.invalid\""),
                 "peer.address \"no-such-gateway.invalid\": does not resolve");
  expect_refused(with("address", "\"127.0.0.1:9999\""),
                 "peer.address \"127.0.0.1:9999\": a host name or address without a port");
}

TEST_F(CheckConfig, APortInUseIsRefusedNamingTheStream) {
  UdpSocket taken(static_cast<std::uint16_t>(base_ + 2));  // video-1's local_rtp_port
  const GatewayRun run = run_gateway(config(), dir_.path);
  EXPECT_EQ(run.exit_code, 2) << run.output;
  // The socket above is bound to loopback; the gateway binds every address.
  EXPECT_NE(run.output.find("stream[1] (video-1).local_rtp_port 0.0.0.0:" +
                            std::to_string(base_ + 2) + " (UDP): in use"),
            std::string::npos)
      << run.output;
}

TEST_F(CheckConfig, AStateDirThatCannotBeIsRefused) {
  std::ofstream(dir_.path / "a-file") << "x";
  expect_refused(with("state_dir", '"' + (dir_.path / "a-file" / "state").string() + '"'),
                 "site.state_dir = \"" + (dir_.path / "a-file" / "state").string() + "\": \"" +
                     (dir_.path / "a-file").string() + "\" is not a directory");
}

TEST_F(CheckConfig, AKmeCaThatDidNotIssueOurCertificateIsAWarningNotAnError) {
  const GatewayRun run = run_gateway(with("tls_ca", pki("ca.crt", "rogue")), dir_.path);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("otp-gateway[warning]: kme.tls_cert = " + pki("sae-a.crt") +
                            " is not issued by a CA in kme.tls_ca"),
            std::string::npos)
      << run.output;
}

TEST_F(CheckConfig, StartUpRunsTheSameChecksAndExitsAtOnce) {
  const GatewayRun run = run_gateway(with("tls_key", pki("sae-b.key")), dir_.path, false);
  EXPECT_EQ(run.exit_code, 2) << run.output;  // not 124: it did not run on
  EXPECT_NE(run.output.find("does not match the certificate in kme.tls_cert"), std::string::npos)
      << run.output;
}

TEST(SiteConfig, FileNamesFromConfigStayInsideTheirDirectory) {
  using otpgate::config::file_in;
  const fs::path dir = "/var/lib/otpgate";
  EXPECT_EQ(file_in(dir, "sae-a-to-sae-b-video-1.journal"),
            dir / "sae-a-to-sae-b-video-1.journal");  // journals of plain names keep their name
  for (const char* hostile : {"../../etc/passwd", "..", ".", "/etc/shadow", "a/../../b", "",
                              ".hidden", "ward 7+icu%", "x\n/y"}) {
    const fs::path p = file_in(dir, hostile);
    EXPECT_EQ(p.parent_path(), dir) << hostile;
    EXPECT_EQ(p.lexically_normal().parent_path(), dir) << hostile;
    EXPECT_EQ(p.filename().string().find('/'), std::string::npos) << hostile;
    EXPECT_NE(p.filename().string().front(), '.') << hostile;
  }
  EXPECT_EQ(file_in(dir, "../x"), dir / "%2E.%2Fx");
  EXPECT_NE(file_in(dir, "a b"), file_in(dir, "a_b"));  // distinct names stay distinct
}

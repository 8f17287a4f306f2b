// SPDX-License-Identifier: LGPL-2.1-or-later
#include "otpgate/offline_checks.hpp"

#include <curl/curl.h>
#include <netdb.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <system_error>

namespace otpgate::config {

namespace {

template <auto Free>
struct Deleter {
  template <typename T>
  void operator()(T* p) const {
    Free(p);
  }
};
using BioPtr = std::unique_ptr<BIO, Deleter<BIO_free_all>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509_free>>;
using KeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using StorePtr = std::unique_ptr<X509_STORE, Deleter<X509_STORE_free>>;
using StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX_free>>;
struct X509StackFree {  // sk_X509_free is a macro
  void operator()(STACK_OF(X509) * s) const { sk_X509_free(s); }
};
using StackPtr = std::unique_ptr<STACK_OF(X509), X509StackFree>;
using UrlPtr = std::unique_ptr<CURLU, Deleter<curl_url_cleanup>>;
struct AddrInfoFree {
  void operator()(addrinfo* a) const { ::freeaddrinfo(a); }
};

std::string quoted(const std::filesystem::path& p) {
  return '"' + p.string() + '"';
}

// OpenSSL's reason for the last failure, and an empty error queue after.
std::string openssl_reason() {
  const unsigned long code = ERR_peek_last_error();
  std::string reason =
      code ? ERR_reason_error_string(code) ? ERR_reason_error_string(code) : "" : "";
  ERR_clear_error();
  return reason.empty() ? "not PEM" : reason;
}

// Every certificate in a PEM file, in order (a certificate and its chain, or CAs).
std::vector<X509Ptr> read_certificates(const std::filesystem::path& path) {
  std::vector<X509Ptr> out;
  BioPtr bio(BIO_new_file(path.c_str(), "r"));
  if (!bio) return out;
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) out.emplace_back(x);
  ERR_clear_error();  // the end of the file reads as an error
  return out;
}

std::string time_text(const ASN1_TIME* t) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(bio.get(), t);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

std::string common_name(X509* x) {
  char cn[256] = {};
  if (X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn) < 0)
    return "";
  return cn;
}

}  // namespace

void OfflineChecks::certificate_and_key(const std::string& cert_key,
                                        const std::filesystem::path& cert,
                                        const std::string& key_key,
                                        const std::filesystem::path& key) {
  const auto certs = read_certificates(cert);
  if (certs.empty()) {
    problem(cert_key + " = " + quoted(cert) +
            ": no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)");
  } else {
    X509* leaf = certs.front().get();
    if (X509_cmp_current_time(X509_get0_notBefore(leaf)) > 0) {
      problem(cert_key + " = " + quoted(cert) + ": not valid before " +
              time_text(X509_get0_notBefore(leaf)) + " (check the clock, or the certificate)");
    }
    if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
      problem(cert_key + " = " + quoted(cert) + ": expired " + time_text(X509_get0_notAfter(leaf)) +
              "; install a renewed certificate");
    } else if (X509_cmp_time(X509_get0_notAfter(leaf), nullptr) >= 0) {
      time_t in_30_days = ::time(nullptr) + 30 * 24 * 3600;
      if (X509_cmp_time(X509_get0_notAfter(leaf), &in_30_days) < 0) {
        warning(cert_key + " = " + quoted(cert) + ": expires " +
                time_text(X509_get0_notAfter(leaf)) + "; renew it soon");
      }
    }
  }
  BioPtr bio(BIO_new_file(key.c_str(), "r"));
  // No passphrase prompt: a daemon has nobody to type one.
  KeyPtr pkey(bio ? PEM_read_bio_PrivateKey(
                        bio.get(), nullptr, [](char*, int, int, void*) { return 0; }, nullptr)
                  : nullptr);
  if (!pkey) {
    const std::string reason = openssl_reason();
    problem(key_key + " = " + quoted(key) + ": not a readable PEM private key (" + reason +
            (reason.find("bad decrypt") != std::string::npos ||
                     reason.find("password") != std::string::npos
                 ? "; it is encrypted: the daemon needs it unencrypted, readable only by its "
                   "user)"
                 : ")"));
    return;
  }
  if (!certs.empty() && X509_check_private_key(certs.front().get(), pkey.get()) != 1) {
    ERR_clear_error();
    problem(key_key + " = " + quoted(key) + ": does not match the certificate in " + cert_key +
            " = " + quoted(cert) + " (a key and certificate from different pairs)");
  }
}

void OfflineChecks::site(const SiteConfig& c) {
  certificate_and_key("kme.tls_cert", c.tls_cert, "kme.tls_key", c.tls_key);
  const auto cas = read_certificates(c.tls_ca);
  std::vector<X509*> authorities;
  for (const auto& x : cas)
    if (X509_check_ca(x.get()) > 0) authorities.push_back(x.get());
  if (cas.empty()) {
    problem("kme.tls_ca = " + quoted(c.tls_ca) +
            ": no PEM certificate in it; give the CA certificate that issued the KME's "
            "certificate");
  } else if (authorities.empty()) {
    problem("kme.tls_ca = " + quoted(c.tls_ca) +
            ": holds no CA certificate (basicConstraints CA:TRUE); give the CA that issued the "
            "KME's certificate, not a server or client certificate");
  } else {
    for (X509* ca : authorities) {
      if (X509_cmp_current_time(X509_get0_notAfter(ca)) < 0) {
        problem("kme.tls_ca = " + quoted(c.tls_ca) + ": the CA \"" + common_name(ca) +
                "\" expired " + time_text(X509_get0_notAfter(ca)));
      }
    }
    // The QKD operator's CA usually issues both the KME's and the SAEs' certificates;
    // when it did not, the KME must trust this certificate's issuer some other way.
    const auto chain = read_certificates(c.tls_cert);
    if (!chain.empty()) {
      StorePtr store(X509_STORE_new());
      for (X509* ca : authorities) X509_STORE_add_cert(store.get(), ca);
      StackPtr untrusted(sk_X509_new_null());
      for (std::size_t i = 1; i < chain.size(); ++i) sk_X509_push(untrusted.get(), chain[i].get());
      StoreCtxPtr ctx(X509_STORE_CTX_new());
      X509_STORE_CTX_init(ctx.get(), store.get(), chain.front().get(), untrusted.get());
      if (X509_verify_cert(ctx.get()) != 1) {
        warning("kme.tls_cert = " + quoted(c.tls_cert) + " is not issued by a CA in kme.tls_ca (" +
                X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())) +
                "); right only if the KME trusts this certificate's issuer separately");
      }
      ERR_clear_error();
      const std::string cn = common_name(chain.front().get());
      if (cn != c.sae_id) {
        warning("kme.tls_cert = " + quoted(c.tls_cert) + " names \"" + cn +
                "\" (CN), site.sae_id is \"" + c.sae_id +
                "\": most KMEs know an SAE by its certificate's CN");
      }
    }
  }
  UrlPtr url(curl_url());
  char* host = nullptr;
  if (curl_url_set(url.get(), CURLUPART_URL, c.kme_url.c_str(), 0) != CURLUE_OK ||
      curl_url_get(url.get(), CURLUPART_HOST, &host, 0) != CURLUE_OK || !host || !*host) {
    problem("kme.url = \"" + c.kme_url +
            "\": not a URL with a host; write https://kme.example:443 (the KME's base URL)");
  } else {
    resolves("kme.url", host);
  }
  curl_free(host);
  writable_directory("site.state_dir", c.state_dir);
}

void OfflineChecks::resolves(const std::string& key, const std::string& host) {
  std::string name = host;
  if (name.size() > 2 && name.front() == '[' && name.back() == ']')
    name = name.substr(1, name.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(name.c_str(), nullptr, &hints, &found);
  std::unique_ptr<addrinfo, AddrInfoFree> owned(found);
  if (rc == 0) return;
  const auto colon = host.find(':');
  if (colon != std::string::npos && host.find(':', colon + 1) == std::string::npos) {
    problem(key + " \"" + host + "\": a host name or address without a port is expected here (" +
            "ports are configured separately)");
    return;
  }
  problem(key + " \"" + host + "\": does not resolve (" + ::gai_strerror(rc) +
          "); use an IP address, or a name in DNS or /etc/hosts");
}

void OfflineChecks::port_free(const std::string& key, const std::string& host, std::uint16_t port,
                              int type) {
  if (port == 0) return;  // any free port
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = type;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  const std::string name = host.empty() ? "0.0.0.0" : host;
  if (::getaddrinfo(name.c_str(), service.c_str(), &hints, &found) != 0) {
    std::unique_ptr<addrinfo, AddrInfoFree> owned(found);
    problem(key + ": \"" + name + "\" is not an address of this host");
    return;
  }
  std::unique_ptr<addrinfo, AddrInfoFree> owned(found);
  const char* proto = type == SOCK_STREAM ? "TCP" : "UDP";
  const int fd = ::socket(found->ai_family, found->ai_socktype, 0);
  if (fd < 0) return;
  // As the daemon binds: TCP listeners reuse TIME_WAIT addresses.
  const int one = 1;
  if (type == SOCK_STREAM) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const int rc = ::bind(fd, found->ai_addr, found->ai_addrlen);
  const int err = errno;
  ::close(fd);
  if (rc == 0) return;
  const std::string where = key + " " + name + ":" + service + " (" + proto + ")";
  if (err == EADDRINUSE) {
    problem(where +
            ": in use by another program (is this daemon already running? `ss -lunp` "
            "or `ss -ltnp` names it)");
  } else if (err == EADDRNOTAVAIL) {
    problem(where + ": " + name + " is not an address of this host");
  } else if (err == EACCES) {
    problem(where + ": a privileged port; use one above 1023");
  } else {
    problem(where + ": cannot bind (" + std::strerror(err) + ")");
  }
}

void OfflineChecks::udp_port_free(const std::string& key, const std::string& host,
                                  std::uint16_t port) {
  port_free(key, host, port, SOCK_DGRAM);
}
void OfflineChecks::tcp_port_free(const std::string& key, const std::string& host,
                                  std::uint16_t port) {
  port_free(key, host, port, SOCK_STREAM);
}

void OfflineChecks::writable_directory(const std::string& key, const std::filesystem::path& dir) {
  std::error_code ec;
  // A directory the daemon will create: its nearest existing parent must take it.
  std::filesystem::path existing = dir;
  while (!existing.empty() && !std::filesystem::exists(existing, ec)) {
    if (existing == existing.parent_path()) break;
    existing = existing.parent_path();
  }
  if (existing.empty()) existing = ".";
  if (!std::filesystem::is_directory(existing, ec)) {
    problem(key + " = " + quoted(dir) + ": " + quoted(existing) + " is not a directory");
  } else if (::access(existing.c_str(), W_OK | X_OK) != 0) {
    problem(key + " = " + quoted(dir) + ": " + quoted(existing) +
            " is not writable by this user (" + std::strerror(errno) +
            "); give the service user write access");
  }
}

void OfflineChecks::throw_if_any() const {
  if (problems_.empty()) return;
  std::string line = problems_.front();
  if (problems_.size() > 1)
    line += " (and " + std::to_string(problems_.size() - 1) + " more: run --check-config)";
  throw ConfigError(line);
}

}  // namespace otpgate::config

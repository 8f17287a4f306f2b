// SPDX-License-Identifier: LGPL-2.1-or-later
#include "aes_modes.hpp"

#include <openssl/crypto.h>
#include <srtp2/srtp.h>

#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>

#include "otpgate/checked_cast.hpp"

namespace otpgate::otp {

SrtpSession::SrtpSession(const std::uint8_t* key, bool outbound) {
  static std::once_flag once;
  std::call_once(once, [] { srtp_init(); });
  srtp_policy_t policy{};
  srtp_crypto_policy_set_aes_gcm_256_16_auth(&policy.rtp);
  srtp_crypto_policy_set_aes_gcm_256_16_auth(&policy.rtcp);
  policy.ssrc.type = outbound ? ssrc_any_outbound : ssrc_any_inbound;
  policy.key = const_cast<std::uint8_t*>(key);
  policy.window_size = 1024;
  if (srtp_create(&session_, &policy) != srtp_err_status_ok) {
    session_ = nullptr;
    throw std::runtime_error("libsrtp2 could not create an AES-256-GCM session");
  }
}

SrtpSession::~SrtpSession() {
  if (session_) srtp_dealloc(session_);
}

std::optional<std::size_t> SrtpSession::protect_datagram(DatagramType type,
                                                         std::span<const std::uint8_t> in,
                                                         std::span<std::uint8_t> out,
                                                         std::uint64_t key_offset) {
  std::memcpy(out.data(), in.data(), in.size());
  int length = checked_cast<int>(in.size());
  const srtp_err_status_t err = type == DatagramType::rtcp
                                    ? srtp_protect_rtcp(session_, out.data(), &length)
                                    : srtp_protect(session_, out.data(), &length);
  if (err != srtp_err_status_ok || length < static_cast<int>(kTagBytes)) return std::nullopt;
  // Move the GCM tag back 8 bytes and put the key's offset in front of it.
  const auto srtp_length = checked_cast<std::size_t>(length);
  std::uint8_t* tag = out.data() + srtp_length - kTagBytes;
  std::memmove(tag + kOffsetBytes, tag, kTagBytes);
  store_be(out.subspan(srtp_length - kTagBytes).first<kOffsetBytes>(), key_offset | kAesFlag);
  return srtp_length + kOffsetBytes;
}

SrtpSession::Unprotected SrtpSession::unprotect(DatagramType type, std::uint8_t* packet,
                                                std::size_t& length) {
  int n = checked_cast<int>(length);
  const srtp_err_status_t err = type == DatagramType::rtcp
                                    ? srtp_unprotect_rtcp(session_, packet, &n)
                                    : srtp_unprotect(session_, packet, &n);
  if (err == srtp_err_status_ok) {
    length = checked_cast<std::size_t>(n);
    return Unprotected::ok;
  }
  if (err == srtp_err_status_replay_fail || err == srtp_err_status_replay_old) {
    return Unprotected::replay;
  }
  return Unprotected::failed;
}

std::size_t srtp_packet_of(std::span<const std::uint8_t> datagram, std::span<std::uint8_t> out) {
  const std::size_t body = datagram.size() - kTrailerBytes;
  std::memcpy(out.data(), datagram.data(), body);
  std::memcpy(out.data() + body, datagram.data() + datagram.size() - kTagBytes, kTagBytes);
  return body + kTagBytes;
}

GcmKey::GcmKey(const std::uint8_t* key_and_salt, bool encrypt)
    : ctx_(EVP_CIPHER_CTX_new()), encrypt_(encrypt) {
  if (!ctx_) throw std::bad_alloc();
  std::memcpy(salt_.data(), key_and_salt + 32, salt_.size());
  const int ok =
      encrypt ? EVP_EncryptInit_ex(ctx_.get(), EVP_aes_256_gcm(), nullptr, key_and_salt, nullptr)
              : EVP_DecryptInit_ex(ctx_.get(), EVP_aes_256_gcm(), nullptr, key_and_salt, nullptr);
  if (ok != 1) throw std::runtime_error("AES-256-GCM initialisation failed");
}

GcmKey::~GcmKey() {
  OPENSSL_cleanse(salt_.data(), salt_.size());
}

bool GcmKey::seal(std::uint64_t index, std::span<const std::uint8_t> aad, const std::uint8_t* in,
                  std::size_t n, std::uint8_t* out, std::uint8_t* tag) {
  std::array<std::uint8_t, 12> nonce = salt_;
  for (int i = 0; i < 8; ++i) nonce[4 + i] ^= static_cast<std::uint8_t>(index >> (56 - 8 * i));
  EVP_CIPHER_CTX* c = ctx_.get();
  const int aad_length = checked_cast<int>(aad.size());
  const int length = checked_cast<int>(n);
  int len = 0;
  const int init = encrypt_ ? EVP_EncryptInit_ex(c, nullptr, nullptr, nullptr, nonce.data())
                            : EVP_DecryptInit_ex(c, nullptr, nullptr, nullptr, nonce.data());
  if (init != 1) return false;
  if (encrypt_) {
    if (EVP_EncryptUpdate(c, nullptr, &len, aad.data(), aad_length) != 1 ||
        (n && EVP_EncryptUpdate(c, out, &len, in, length) != 1) ||
        EVP_EncryptFinal_ex(c, out + n, &len) != 1) {
      return false;
    }
    return EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, kTagBytes, tag) == 1;
  }
  return EVP_DecryptUpdate(c, nullptr, &len, aad.data(), aad_length) == 1 &&
         (!n || EVP_DecryptUpdate(c, out, &len, in, length) == 1) &&
         EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, kTagBytes, tag) == 1 &&
         EVP_DecryptFinal_ex(c, out + n, &len) == 1;
}

}  // namespace otpgate::otp

// SPDX-License-Identifier: LGPL-2.1-or-later
// The AES modes, for when the key rate cannot cover the one-time pad: SRTP AES-256-GCM
// datagrams (libsrtp2) and AES-256-GCM stream records (OpenSSL). Each key is one draw of
// kAesKeyBytes from the pad, made like a unit's (so never reused).
#pragma once

#include <openssl/evp.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "otpgate/otp_wire.hpp"

struct srtp_ctx_t_;  // libsrtp2's session (srtp_t)

namespace otpgate::otp {

// An AES key draw is a unit with this many payload bytes: its s and payload are the key.
inline constexpr std::size_t kAesKeyPayload = kAesKeyBytes - kMaskBytes;

// One libsrtp2 AES-256-GCM session for one master key (kAesKeyBytes) drawn from the pad.
class SrtpSession {
 public:
  SrtpSession(const std::uint8_t* key, bool outbound);
  ~SrtpSession();
  SrtpSession(const SrtpSession&) = delete;
  SrtpSession& operator=(const SrtpSession&) = delete;

  // Protects an RTP or RTCP packet into `out` (>= in.size() + kMaxDatagramOverhead) as an
  // AES datagram: the SRTP packet with the key's pad offset (with kAesFlag) in front of
  // its GCM tag. Returns the datagram's size; nullopt if libsrtp refuses the packet.
  std::optional<std::size_t> protect_datagram(DatagramType type, std::span<const std::uint8_t> in,
                                              std::span<std::uint8_t> out,
                                              std::uint64_t key_offset);
  enum class Unprotected { ok, replay, failed };
  // Checks and decrypts an SRTP packet of `length` bytes in place (see srtp_packet_of);
  // `length` becomes the plaintext's.
  Unprotected unprotect(DatagramType type, std::uint8_t* packet, std::size_t& length);

 private:
  srtp_ctx_t_* session_ = nullptr;
};

// The SRTP packet inside an AES datagram (all but the key offset field) written to `out`
// (>= datagram.size()); returns its size. The datagram is at least kTrailerBytes long.
std::size_t srtp_packet_of(std::span<const std::uint8_t> datagram, std::span<std::uint8_t> out);

// Stream-mode AES: AES-256-GCM (OpenSSL) over a record's payload with its 32-byte
// header as associated data. Key and 12-byte salt come from one pad draw; the nonce is
// salt XOR the record index, unique because a key serves one stream's increasing indices.
class GcmKey {
 public:
  GcmKey(const std::uint8_t* key_and_salt, bool encrypt);
  ~GcmKey();
  GcmKey(const GcmKey&) = delete;
  GcmKey& operator=(const GcmKey&) = delete;

  // Encrypts (or decrypts and verifies) `n` bytes; the tag is written to / read from `tag`.
  bool seal(std::uint64_t index, std::span<const std::uint8_t> aad, const std::uint8_t* in,
            std::size_t n, std::uint8_t* out, std::uint8_t* tag);

 private:
  struct Free {
    void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
  };
  std::unique_ptr<EVP_CIPHER_CTX, Free> ctx_;
  std::array<std::uint8_t, 12> salt_{};
  bool encrypt_;
};

}  // namespace otpgate::otp

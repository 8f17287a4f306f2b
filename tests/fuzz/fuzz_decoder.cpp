// SPDX-License-Identifier: LGPL-2.1-or-later
// libFuzzer target for otpdecrypt's parser: every input is offered to the decoder as a
// datagram and as a stream record, after a genuine announcement so that real pad is
// in the window. Nothing may crash, hang or read out of bounds (ASan), and nothing
// that is not a genuine unit may come out as plaintext.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "memory_pad.hpp"
#include "otpgate/otp_codec.hpp"

using namespace otpgate;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static otpgate::testing::MemoryPad* tx = [] {
    static otpgate::testing::MemoryPad pad(0, 256u << 10, 1024);
    pad.fill_for_sending();
    return &pad;
  }();
  static std::vector<std::uint8_t> announcement = [] {
    otp::Encoder encoder(*tx, 7, 0);
    std::vector<std::uint8_t> out(otp::kMaxAnnouncementBytes);
    out.resize(encoder.next_announcement(out, false));
    return out;
  }();
  // One receiver across runs (stateful, and cheap): it holds the announced pad.
  static otpgate::testing::MemoryPad rx(0, 256u << 10, 1024);
  static otp::Decoder decoder = [] {
    otp::DecoderConfig config;
    config.window_bytes = otp::kEpochBytes;
    config.max_pending_announcements = 8;
    config.max_unplaced_keys = 512;
    return otp::Decoder(rx, config);
  }();
  static bool primed = false;
  std::vector<std::uint8_t> out(size + 64);
  std::size_t written = 0;
  if (!primed) {
    primed =
        decoder.open_datagram(announcement, out, written) == otp::Decoder::Verdict::announcement;
  }
  const std::span<const std::uint8_t> input(data, size);
  if (decoder.open_datagram(input, out, written) == otp::Decoder::Verdict::plaintext) {
    std::abort();  // a forged packet got through: the MAC or the parser is broken
  }
  if (const auto record_size = otp::Decoder::record_size(input);
      record_size && *record_size == size) {
    otp::RecordKind kind{};
    if (decoder.open_record(input, out, written, kind) == otp::Decoder::Verdict::plaintext)
      std::abort();
  }
  return 0;
}

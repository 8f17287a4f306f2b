// SPDX-License-Identifier: LGPL-2.1-or-later
// The key forecast arithmetic (otpgate/forecast.hpp) that the gateway's status API, the
// transfer job API, the console and the web page all show.
#include <gtest/gtest.h>

#include "otpgate/forecast.hpp"

using namespace otpgate::keys;

namespace {

// A KME's status as qkd-kme-sim and most vendors report it: 8192-bit keys.
KmeStatus kme_status(std::uint64_t stored, std::uint64_t max = 100000) {
  KmeStatus s;
  s.key_size = 8192;
  s.stored_key_count = stored;
  s.max_key_count = max;
  s.max_key_size = 65536;
  s.min_key_size = 64;
  return s;
}

LinkKeyState link(std::uint64_t ring, double refill, double consumption,
                  std::optional<KmeStatus> kme = std::nullopt, bool pending = false) {
  LinkKeyState state;
  state.ring_bytes = ring;
  state.refill_bytes_per_s = refill;
  state.consumption_bytes_per_s = consumption;
  state.kme = kme;
  state.kme_counts_pending = pending;
  return state;
}

}  // namespace

TEST(Forecast, KmeStoreIsStoredKeysTimesKeySize) {
  const KmeHeld held = kme_held(kme_status(1000));
  EXPECT_TRUE(held.trusted);
  EXPECT_EQ(held.bytes, 1024000u);
  EXPECT_EQ(held.reason, "");
}

TEST(Forecast, NonsenseKmeCountsAreSetAsideWithAReason) {
  KmeStatus zero_size = kme_status(1000);
  zero_size.key_size = 0;
  KmeStatus odd_size = kme_status(1000);
  odd_size.key_size = 8191;
  KmeStatus above_max = kme_status(200000, 100000);
  KmeStatus absurd = kme_status(std::uint64_t(1) << 62, 0);  // overflows x 1024 bytes
  KmeStatus too_large_keys = kme_status(10);
  too_large_keys.key_size = 131072;  // above its own max_key_size
  for (const auto& [status, words] :
       std::vector<std::pair<KmeStatus, std::string>>{{zero_size, "key_size 0"},
                                                      {odd_size, "key_size 8191"},
                                                      {above_max, "above its max_key_count"},
                                                      {absurd, "more key than any store holds"},
                                                      {too_large_keys, "outside its own limits"}}) {
    const KmeHeld held = kme_held(status);
    EXPECT_FALSE(held.trusted) << words;
    EXPECT_EQ(held.bytes, 0u) << words;
    EXPECT_NE(held.reason.find(words), std::string::npos) << held.reason;
    // The link's forecast rests on its rings alone, and says why.
    const LinkForecast f = forecast_link(link(5000, 0, 1000, status));
    EXPECT_EQ(f.held_bytes, 5000u) << words;
    EXPECT_TRUE(f.kme_reported);
    EXPECT_FALSE(f.kme_trusted);
    EXPECT_NE(f.kme_note.find(words), std::string::npos);
    ASSERT_TRUE(f.seconds_left);
    EXPECT_DOUBLE_EQ(*f.seconds_left, 5.0);
  }
}

TEST(Forecast, AKmeThatCountsPendingKeysIsNotAddedIn) {
  const LinkForecast f = forecast_link(link(1000, 0, 100, kme_status(1000), true));
  EXPECT_EQ(f.held_bytes, 1000u);
  EXPECT_FALSE(f.kme_trusted);
  EXPECT_NE(f.kme_note.find("pending"), std::string::npos);
}

TEST(Forecast, KeyLastsHeldOverNetConsumption) {
  // Rings 1 MB, KME 10 MB; consumption 1.25 MB/s (10 Mbit/s), refill 0.25 MB/s.
  const LinkForecast f = forecast_link(link(1000000, 250000, 1250000, kme_status(10000000 / 1024)));
  EXPECT_TRUE(f.kme_trusted);
  EXPECT_EQ(f.kme_bytes, 10000000u / 1024 * 1024);
  EXPECT_EQ(f.held_bytes, f.ring_bytes + f.kme_bytes);
  ASSERT_TRUE(f.seconds_left);
  EXPECT_NEAR(*f.seconds_left, double(f.held_bytes) / 1000000, 1e-9);
}

TEST(Forecast, KeyDoesNotRunOutWhenRefillKeepsUpOrNothingIsUsed) {
  EXPECT_FALSE(forecast_link(link(10, 1250000, 1250000)).seconds_left);
  EXPECT_FALSE(forecast_link(link(10, 0, 0)).seconds_left);
  // Negative rates (a counter that went back) count as none.
  const LinkForecast f = forecast_link(link(10, -5, 0));
  EXPECT_EQ(f.refill_bytes_per_s, 0);
}

TEST(Forecast, APanelIsCoveredOrShortBySoMuch) {
  // A 65-minute panel at 1.3 Mbit/s (162500 B/s) needs 633.75 MB.
  LinkForecast panel_link = forecast_link(link(100000000, 100000, 162500));
  SessionForecast panel = forecast_session(panel_link, 65 * 60, 162500);
  EXPECT_DOUBLE_EQ(panel.needed_bytes, 633750000);
  EXPECT_DOUBLE_EQ(panel.available_bytes, 100000000 + 100000.0 * 3900);
  EXPECT_FALSE(panel.covered);
  EXPECT_DOUBLE_EQ(panel.short_bytes, 633750000 - 490000000);
  panel_link.refill_bytes_per_s = 1250000;  // a 10 Mbit/s QKD link covers it
  panel = forecast_session(panel_link, 65 * 60, 162500);
  EXPECT_TRUE(panel.covered);
  EXPECT_EQ(panel.short_bytes, 0);
}

TEST(Forecast, TransferKeyNeedsMatchTheWireFormat) {
  // 64 MiB in one file at 64 KiB records: 1024 + 1 + 2 records of 16 bytes, 256 epochs.
  EXPECT_EQ(otp_transfer_key_bytes(64u << 20, 1, 65536), (64u << 20) + 16 * 1027 + 256 * 16 + 4096);
  EXPECT_EQ(aes_transfer_key_bytes(64u << 20, 1, 65536, 1024), 44u * 2);
  EXPECT_EQ(otp_transfer_key_bytes(0, 0, 0), 16u * 2 + 4096);  // no division by zero
}

TEST(Forecast, TransferTimeAtTheKeyRate) {
  // "needs 3.1 GB of key; at 10 Mbit/s about 41 min": nothing held.
  const auto t = seconds_to_use(3.1e9, 0, 10e6 / 8);
  ASSERT_TRUE(t);
  EXPECT_NEAR(*t / 60, 41.33, 0.01);
  // Held key goes at the transfer's own pace, the rest at the key rate.
  EXPECT_DOUBLE_EQ(*seconds_to_use(1000, 600, 100, 50), 20);  // own pace: 1000/50
  EXPECT_DOUBLE_EQ(*seconds_to_use(1000, 0, 10, 50), 100);    // key rate: 1000/10
  EXPECT_DOUBLE_EQ(*seconds_to_use(1000, 2000, 0, 0), 0);     // all held, pace unknown
  EXPECT_FALSE(seconds_to_use(1000, 10, 0, 50));              // short, nothing refills
}

TEST(Forecast, RateWindowMeasuresOverTheLastMinutesAndRestartsWhenACounterGoesBack) {
  RateWindow rate(120);
  EXPECT_FALSE(rate.per_second());
  rate.add(0, 0);
  rate.add(0.5, 500);
  EXPECT_FALSE(rate.per_second());  // under a second of samples
  for (int t = 1; t <= 300; ++t) rate.add(t, t < 200 ? t * 1000.0 : 199000 + (t - 199) * 10.0);
  ASSERT_TRUE(rate.per_second());
  // Only the last 120 s count: 10 B/s since t=199 (101 s) and 1000 B/s before (19 s).
  EXPECT_NEAR(*rate.per_second(), (101 * 10.0 + 19 * 1000.0) / 120, 1e-9);
  rate.add(301, 5);  // restarted
  EXPECT_FALSE(rate.per_second());
  rate.add(303, 25);
  EXPECT_DOUBLE_EQ(*rate.per_second(), 10);
}

// SPDX-License-Identifier: LGPL-2.1-or-later
// The job API's forecasts (transfer/src/job_forecast): a running job's pace, time left
// and finish time; a folder's key need against what the KME holds and the link's key rate
// measured from the KME's store and what this site's sends drew from it.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "job_forecast.hpp"
#include "otpgate/forecast.hpp"

namespace {

using nlohmann::json;
constexpr std::uint64_t kRecord = 65536, kRekey = 1024;

json send_job(const char* id, double size, double done, const char* state = "running") {
  return json{{"job_id", id},          {"direction", "send"}, {"transfer_state", state},
              {"transfer_size", size}, {"transferred", done}, {"method", "OTP"}};
}

}  // namespace

TEST(JobForecast, ARunningJobFinishesAtItsMeasuredPace) {
  otpgate::transfer::JobForecasts forecasts(kRecord, kRekey);
  json job;
  for (int t = 0; t <= 4; ++t) {  // 10 MB/s for four seconds
    job = send_job("j1", 1e9, 10e6 * t);
    forecasts.annotate(job, t, 1'000'000 + 1000 * t);
  }
  const json& f = job["forecast"];
  EXPECT_NEAR(f["throughput_bytes_per_s"].get<double>(), 10e6, 1);
  EXPECT_NEAR(f["seconds_left"].get<double>(), (1e9 - 40e6) / 10e6, 0.01);
  EXPECT_EQ(f["finishes_at"].get<std::int64_t>(),
            1'004'000 + std::int64_t(f["seconds_left"].get<double>() * 1000));
  EXPECT_EQ(f["key_needed_bytes"].get<std::uint64_t>(),
            otpgate::keys::otp_transfer_key_bytes(std::uint64_t(1e9 - 40e6), 0, kRecord));
}

TEST(JobForecast, AJobThatIsNotMovingHasNoFinishTimeAndACompletedOneNoForecast) {
  otpgate::transfer::JobForecasts forecasts(kRecord, kRekey);
  json job;
  for (int t = 0; t <= 4; ++t) {
    job = send_job("j2", 1e9, 5e6, "interrupted");
    forecasts.annotate(job, t, 1000 * t);
  }
  EXPECT_TRUE(job["forecast"]["seconds_left"].is_null()) << job.dump();
  EXPECT_TRUE(job["forecast"]["throughput_bytes_per_s"].is_null()) << job.dump();
  json done = send_job("j2", 1e9, 1e9, "completed");
  forecasts.annotate(done, 5, 5000);
  EXPECT_FALSE(done.contains("forecast")) << done.dump();
}

TEST(JobForecast, AFoldersKeyIsCoveredByTheKmesStoreOrTakesTheLinksRate) {
  otpgate::transfer::JobForecasts forecasts(kRecord, kRekey);
  json folder = {{"bytes", 50'000'000}, {"files", 3}};
  forecasts.annotate_folder(folder);
  const auto need = otpgate::keys::otp_transfer_key_bytes(50'000'000, 3, kRecord);
  EXPECT_EQ(folder["key_needed_otp"].get<std::uint64_t>(), need);
  EXPECT_TRUE(folder["forecast"]["covered"].is_null()) << "nothing known about the KME yet";
  EXPECT_TRUE(folder["forecast"]["key_rate_bits_per_s"].is_null());
  // The store grows 1 MB in 10 s while a send draws 4 MB from it: 5 MB made, 500 kB/s.
  forecasts.observe_kme(10'000'000, 0);
  json job = send_job("j3", 1e9, 0);
  forecasts.annotate(job, 0, 0);
  job = send_job("j3", 1e9, 4'000'000);
  forecasts.annotate(job, 10, 10'000);
  forecasts.observe_kme(11'000'000, 10);
  forecasts.annotate_folder(folder);
  const json& f = folder["forecast"];
  EXPECT_NEAR(f["key_rate_bits_per_s"].get<double>(), 500e3 * 8, 1) << f.dump();
  EXPECT_EQ(f["covered"].get<bool>(), 11'000'000 >= need) << f.dump();
  const auto expected = otpgate::keys::seconds_to_use(double(need), 11e6, 500e3);
  ASSERT_TRUE(expected.has_value());
  EXPECT_NEAR(f["seconds_otp"].get<double>(), *expected, 1e-6);
  // A KME whose store cannot be read makes "covered" unknown again, not stale.
  forecasts.observe_kme(nullptr, 11);
  forecasts.annotate_folder(folder);
  EXPECT_TRUE(folder["forecast"]["covered"].is_null()) << folder.dump();
}

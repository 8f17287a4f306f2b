// SPDX-License-Identifier: LGPL-2.1-or-later
// Key supplies (refill threads) against qkd-kme-sim: both roles, shortage, restarts.
#include <gtest/gtest.h>

#include <fstream>
#include <map>

#include "otpgate/forecast.hpp"
#include "test_pki.hpp"

using namespace otpgate;
using otpgate::testing::client_config;
using otpgate::testing::eventually;
namespace fs = std::filesystem;

namespace {

class KeySupplyTest : public ::testing::Test {
 protected:
  void SetUp() override { start_sim(otpgate::testing::simulator_config()); }
  void start_sim(kmesim::SimulatorConfig config) {
    sim_.reset();
    sim_ = std::make_unique<kmesim::KmeSimulator>(std::move(config));
    sim_->start();
  }

  keys::KeySupplyConfig master_config(std::size_t ring_bytes = 256u << 10) {
    return otpgate::testing::master_supply_config(dir_, ring_bytes);
  }
  keys::KeySupplyConfig slave_config() { return otpgate::testing::slave_supply_config(); }
  // A master whose naps and KME health checks are a minute long: within a test, only a
  // take() (or demand) wakes its refill thread.
  keys::KeySupplyConfig napping_master_config(std::size_t ring_bytes = 256u << 10) {
    auto cfg = master_config(ring_bytes);
    cfg.health_interval = std::chrono::seconds(60);
    cfg.busy_nap = std::chrono::seconds(60);
    return cfg;
  }

  otpgate::testing::TestDir test_dir_;
  const fs::path dir_ = test_dir_.path;
  std::unique_ptr<kmesim::KmeSimulator> sim_;
};

}  // namespace

TEST_F(KeySupplyTest, MasterAndSlaveHoldIdenticalPadAtEveryOffset) {
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_config());
  master.start();
  slave.start();

  std::map<std::uint64_t, std::vector<std::uint8_t>> sent;  // offset -> pad, test only
  std::vector<std::uint8_t> chunk(1200);
  while (sent.size() < 800) {
    while (auto a = master.next_announcement()) ASSERT_TRUE(slave.request(*a));
    if (auto offset = master.take(chunk)) {
      sent.emplace(*offset, chunk);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  while (auto a = master.next_announcement()) ASSERT_TRUE(slave.request(*a));

  // Collect the slave's keys by offset and compare every byte the master used.
  std::map<std::uint64_t, std::vector<std::uint8_t>> received;
  const std::uint64_t end = sent.rbegin()->first + chunk.size();
  ASSERT_TRUE(eventually([&] {
    while (auto s = slave.pop_segment()) {
      received.emplace(s->offset, std::vector<std::uint8_t>(s->bytes.begin(), s->bytes.end()));
      slave.release(*s);
    }
    return !received.empty() && received.rbegin()->first + received.rbegin()->second.size() >= end;
  }));
  std::uint64_t compared = 0;
  for (const auto& [offset, pad] : sent) {
    for (std::size_t i = 0; i < pad.size(); ++i) {
      auto it = std::prev(received.upper_bound(offset + i));
      ASSERT_EQ(it->second.at(offset + i - it->first), pad[i]) << "offset " << offset + i;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 800u * 1200u);
  EXPECT_EQ(master.stats().key_size_bits, 8192u) << "asks for the largest keys the KME allows";
  EXPECT_EQ(slave.stats().keys_lost, 0u);
  EXPECT_EQ(master.stats().kme_errors, 0u);
}

TEST_F(KeySupplyTest, ExhaustionIsReportedAndTheSupplyRecovers) {
  auto config = otpgate::testing::simulator_config();
  config.start_full = false;
  config.key_rate_bps = 8;
  start_sim(config);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  master.start();
  std::vector<std::uint8_t> chunk(1200);
  ASSERT_TRUE(eventually([&] { return master.stats().kme_errors > 0; }));
  EXPECT_FALSE(master.take(chunk)) << "no key: nothing to hand out";
  const auto down = master.stats();
  EXPECT_FALSE(down.kme_healthy);
  EXPECT_NE(down.last_error.find("HTTP 503"), std::string::npos) << down.last_error;

  sim_->set_key_rate(0);  // the QKD link delivers again
  ASSERT_TRUE(eventually([&] { return master.take(chunk).has_value(); }));
  EXPECT_TRUE(master.stats().kme_healthy);
}

// A KME whose store is smaller than what the ring asks for at once (64 keys here, against
// a ring that wants over 200) refuses every full-size request: the master asks for less
// instead of waiting for a store level that can never come.
TEST_F(KeySupplyTest, AMasterAsksForLessWhenTheKmeHoldsLessThanItWants) {
  auto config = otpgate::testing::simulator_config();
  config.store_bits = 64 * 8192;
  start_sim(config);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  master.start();
  std::vector<std::uint8_t> chunk(1000);
  int taken = 0;
  ASSERT_TRUE(eventually([&] {
    while (master.take(chunk)) ++taken;
    return taken >= 50;  // 50 kB of pad from a 64 kB store
  })) << master.stats().last_error;
  EXPECT_LE(master.stats().keys_fetched, 64u);  // all the store could give
}

TEST_F(KeySupplyTest, ARestartNeverHandsOutAnOffsetAgain) {
  std::uint64_t highest_end = 0;
  std::uint64_t reserved = 0;
  {
    keys::KeySupply first(client_config(sim_->url(), "sae-a"), master_config());
    first.start();
    std::vector<std::uint8_t> chunk(1000);
    for (int taken = 0; taken < 300;) {
      if (auto offset = first.take(chunk)) {
        highest_end = std::max(highest_end, *offset + chunk.size());
        ++taken;
      }
    }
    reserved = first.stats().reserved_offset;
    EXPECT_GE(reserved, highest_end) << "reserved before handed out";
  }
  keys::KeySupply second(client_config(sim_->url(), "sae-a"), master_config());
  second.start();
  std::vector<std::uint8_t> chunk(1000);
  std::optional<std::uint64_t> offset;
  ASSERT_TRUE(eventually([&] { return (offset = second.take(chunk)).has_value(); }));
  EXPECT_GE(*offset, reserved);
  EXPECT_GE(*offset, highest_end);
}

TEST_F(KeySupplyTest, AKeyTheKmeNeverDeliversIsCountedAsLost) {
  auto config = slave_config();
  config.relay_grace = std::chrono::milliseconds(100);
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), config);
  slave.start();
  const auto ghost = *keys::KeyId::parse("0f0f0f0f-0000-4000-8000-000000000001");
  ASSERT_TRUE(slave.request({4096, ghost, 1024}));
  ASSERT_TRUE(eventually([&] { return slave.stats().keys_lost == 1; }));
  EXPECT_NE(slave.stats().last_error.find(ghost.to_string()), std::string::npos);
  EXPECT_FALSE(slave.pop_segment());
}

// Announcements come again and again (repeats, resends): a key is fetched once, before and
// after it has been handed out. Nothing is inferred from a pause: a key announced after the
// repeats arrives, and by then every repeat has been dealt with.
TEST_F(KeySupplyTest, RepeatedAnnouncementsFetchAKeyOnce) {
  keys::KmeClient a(client_config(sim_->url(), "sae-a"));
  const auto issued = a.enc_keys("sae-b", 2, 1024);
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_config());
  slave.start();
  const keys::KeyAnnouncement first{0, issued[0].id, 128}, second{128, issued[1].id, 128};
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(slave.request(first));
  std::optional<keys::PadSegment> segment;
  ASSERT_TRUE(eventually([&] { return (segment = slave.pop_segment()).has_value(); }));
  EXPECT_TRUE(
      std::equal(segment->bytes.begin(), segment->bytes.end(), issued[0].bytes.span().begin()));
  slave.release(*segment);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(slave.request(first));  // after it was used, too
  ASSERT_TRUE(slave.request(second));
  ASSERT_TRUE(eventually([&] { return (segment = slave.pop_segment()).has_value(); }));
  EXPECT_EQ(segment->key_id, issued[1].id) << "a repeat came out again";
  slave.release(*segment);
  EXPECT_FALSE(slave.pop_segment());
  EXPECT_EQ(sim_->stats().keys_to_slaves, 2u);
  EXPECT_EQ(sim_->stats().refused, 0u) << "a repeat was asked for again (and refused)";
  EXPECT_EQ(slave.stats().keys_lost, 0u);
}

TEST_F(KeySupplyTest, AMasterWithoutJournalIsAConfigurationError) {
  auto config = master_config();
  config.journal.clear();
  EXPECT_THROW(keys::KeySupply(client_config(sim_->url(), "sae-a"), config), std::invalid_argument);
}

TEST_F(KeySupplyTest, APadFileReceiverFetchesOnlySoFarAheadOfVerifiedTraffic) {
  const auto pad = dir_ / "pad.bin";
  {
    std::vector<char> bytes(64u << 20, 7);
    std::ofstream(pad, std::ios::binary).write(bytes.data(), static_cast<long>(bytes.size()));
  }
  keys::KeySupplyConfig config = slave_config();
  config.peer_sae_id = "pad-file";
  config.journal = dir_ / "pad.received";
  config.ring_bytes = 1u << 20;
  config.reserve_chunk = 1u << 20;
  keys::KeySupply slave(keys::PadFileConfig{pad}, config);
  slave.start();
  // A forged announcement 60 MiB ahead: refused, and the journal does not move.
  const std::uint64_t far = 60u << 20;
  ASSERT_TRUE(slave.request({far, keys::pad_file_key_id(far), 65536}));
  ASSERT_TRUE(otpgate::testing::eventually([&] { return slave.stats().keys_refused == 1; }));
  EXPECT_LT(slave.stats().reserved_offset, far);
  // What a genuine sender announces (near the start) is fetched.
  ASSERT_TRUE(slave.request({0, keys::pad_file_key_id(0), 65536}));
  std::optional<keys::PadSegment> segment;
  ASSERT_TRUE(
      otpgate::testing::eventually([&] { return (segment = slave.pop_segment()).has_value(); }));
  EXPECT_EQ(segment->offset, 0u);
  slave.release(*segment);
}

// The link's key forecast rests on what the supply reports: the KME's own status (its
// store for the pair) and the key delivered over the last minutes, which counts the
// KME's store growing while the ring is full, not only what was fetched.
TEST_F(KeySupplyTest, AMasterReportsTheKmesStoreAndTheKeyRateItDelivers) {
  auto config = otpgate::testing::simulator_config();
  config.start_full = false;
  config.key_rate_bps = 8e6;  // 1 MB/s
  start_sim(config);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  master.start();
  ASSERT_TRUE(eventually([&] {
    const auto s = master.stats();
    return s.kme_status && s.refill_bytes_per_s > 0 && s.kme_status->stored_key_count > 0 &&
           s.bytes_available * 2 >
               s.ring_capacity_bytes;  // the ring is full: the KME's store grows
  })) << master.stats().last_error
      << " available " << master.stats().bytes_available << " of "
      << master.stats().ring_capacity_bytes << ", refill " << master.stats().refill_bytes_per_s
      << ", KME status " << bool(master.stats().kme_status) << ", KME taken for one that replaces "
      << "unfetched batches " << master.stats().kme_replaces_batches << ", keys fetched "
      << master.stats().keys_fetched << ", KME errors " << master.stats().kme_errors;
  const auto s = master.stats();
  EXPECT_GT(s.kme_status->key_size, 0u);
  EXPECT_TRUE(keys::kme_held(*s.kme_status).trusted);
  // With the ring full nothing is fetched: the rate measured is the KME's store growing.
  const double fetched = double(s.bytes_fetched);
  ASSERT_TRUE(eventually([&] {
    const auto later = master.stats();
    return double(later.bytes_fetched) == fetched && later.refill_bytes_per_s > 0 &&
           later.kme_status->stored_key_count > s.kme_status->stored_key_count;
  }));
}

// A lane handed to a new stream (a call key lane's next call): pad announced to the earlier
// stream's receiver is never handed out again, not even once; the new stream starts with
// a resync run on a fresh epoch (its first announcement verifiable from its own keys), and
// every byte it takes was announced to it first. A first stream loses nothing.
TEST_F(KeySupplyTest, ANewStreamNeverGetsPadAnnouncedToTheStreamBefore) {
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  master.start();
  std::vector<std::uint8_t> chunk(1000);
  // Nothing announced yet: begin_stream changes nothing.
  ASSERT_TRUE(eventually([&] { return master.available() >= 100 * chunk.size(); }));
  master.begin_stream();
  std::optional<std::uint64_t> first;
  ASSERT_TRUE(eventually([&] { return (first = master.take(chunk)).has_value(); }));
  EXPECT_EQ(*first, 0u);
  EXPECT_EQ(master.stats().bytes_flushed, 0u);
  // Stream 1 is told about everything the ring holds and uses a little of it.
  std::uint64_t announced_end = 0;
  while (auto a = master.next_announcement()) announced_end = a->offset + a->length;
  ASSERT_GT(announced_end, 100u * chunk.size());
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(master.take(chunk));
  // Stream 2.
  master.begin_stream();
  std::vector<keys::KeyAnnouncement> told;
  std::uint64_t taken = 0;
  ASSERT_TRUE(eventually([&] {
    while (auto a = master.next_announcement()) told.push_back(*a);
    const auto offset = master.take(chunk);
    if (!offset) return false;
    EXPECT_GE(*offset, announced_end) << "pad announced to the stream before";
    auto announced = [&](std::uint64_t o) {
      return std::any_of(told.begin(), told.end(), [&](const keys::KeyAnnouncement& a) {
        return a.offset <= o && o < a.offset + a.length;
      });
    };
    EXPECT_TRUE(announced(*offset) && announced(*offset + chunk.size() - 1))
        << "pad taken before it was announced: " << *offset;
    return ++taken == 300;
  }));
  ASSERT_FALSE(told.empty());
  EXPECT_TRUE(told.front().resync);
  EXPECT_EQ(told.front().offset % (256u << 10), 0u) << "a fresh epoch";
  EXPECT_GE(master.stats().bytes_flushed, announced_end - 11 * chunk.size());
}

// A master whose key is in use naps between refills instead of looking at its ring every
// poll_interval, and the take() that leaves the ring below its low-water mark wakes it.
// With naps and KME health checks a minute long, a stream drawing key steadily through
// three ring-fulls never finds its ring empty only because those takes woke the thread,
// in a few passes where polling makes a hundred a second.
TEST_F(KeySupplyTest, AMasterInUseNapsUntilATakeLeavesItsRingLow) {
  auto cfg = napping_master_config();
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), cfg);
  master.start();
  const std::size_t capacity = 256u << 10;
  ASSERT_TRUE(eventually([&] { return master.available() >= capacity * 8 / 10; }));
  const auto before = master.stats();
  std::vector<std::uint8_t> chunk(1000);
  std::size_t taken = 0, empty = 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (taken < 3 * capacity && std::chrono::steady_clock::now() < give_up) {
    if (master.take(chunk)) {
      taken += chunk.size();
    } else {
      ++empty;
    }
    while (master.next_announcement()) {
    }
    // About 0.4 MB/s: the ring's low-water half lasts over 300 ms, against a refill of a
    // few milliseconds from the simulator.
    std::this_thread::sleep_for(std::chrono::microseconds(2600));
  }
  const auto after = master.stats();
  ASSERT_GE(taken, 3 * capacity) << "the master slept while its ring ran dry";
  // A take() finding the ring empty wakes the thread too (demand): the low-water wake
  // is what keeps it from running dry.
  EXPECT_EQ(empty, 0u) << "the ring ran dry before the refill thread woke";
  EXPECT_GE(after.keys_fetched - before.keys_fetched, 2 * capacity / 1024);
  // Two seconds of use: a pass per refill or two, not one every 10 ms.
  EXPECT_LE(after.refill_rounds - before.refill_rounds, 40u)
      << "the refill thread polled while key was used";
}

// The same with rings sized by the measured rate (as the gateway runs them: ring_seconds):
// a stream that jumps from audio to video rates while the thread naps wakes it (at a
// quarter of its ring used, at the low-water mark at the latest), so the ring is measured
// and grown before the video drains it. With naps a minute long, no take finds the ring
// empty; without the wake-up 16 did. (The simulator answers within milliseconds, so the
// low-water mark alone keeps this ring fed: the earlier, quarter-ring wake-up is for a
// slower KME; ANappingMasterWakesOnceAQuarterOfItsRingIsUsedNotBefore tests it alone.)
TEST_F(KeySupplyTest, AStreamJumpingToVideoRatesWakesANappingMasterBeforeItsRingRunsDry) {
  auto cfg = napping_master_config(1u << 20);
  cfg.ring_seconds = 2;
  cfg.ring_min_bytes = 64u << 10;
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), cfg);
  master.start();
  ASSERT_TRUE(eventually([&] { return master.available() >= (64u << 10) * 8 / 10; }));
  std::size_t empty = 0;
  auto stream = [&](std::size_t bytes_per_take, std::chrono::microseconds every,
                    std::size_t total) {
    std::vector<std::uint8_t> chunk(bytes_per_take);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    for (std::size_t taken = 0; taken < total && std::chrono::steady_clock::now() < give_up;) {
      if (master.take(chunk)) {
        taken += chunk.size();
      } else {
        ++empty;
      }
      while (master.next_announcement()) {
      }
      std::this_thread::sleep_for(every);
    }
  };
  stream(100, std::chrono::microseconds(5000), 30000);  // audio: 20 kB/s for 1.5 s
  const auto rounds = master.stats().refill_rounds;
  stream(1000, std::chrono::microseconds(2500), 600000);  // video: 400 kB/s for 1.5 s
  EXPECT_EQ(empty, 0u) << "the ring ran dry before the napping refill thread grew it";
  EXPECT_GT(master.stats().refill_rounds, rounds);
  EXPECT_GT(master.stats().bytes_consumed, 600000u);
}

// The quarter-ring wake-up, alone: a master napping while its key is used (naps and KME
// health checks a minute long) wakes when a quarter of its ring has been used, though the
// ring is still well above its low-water mark (half), and not before. That pass measures
// the stream's rate, so a ring sized by it (ring_seconds) grows before a stream whose rate
// jumped drains it; waking at the mark alone would leave only the low half for that
// against a slow KME. (AStreamJumpingToVideoRates... shows the growth; this ring is fixed,
// so the pass only looks.)
TEST_F(KeySupplyTest, ANappingMasterWakesOnceAQuarterOfItsRingIsUsedNotBefore) {
  auto cfg = napping_master_config();
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), cfg);
  master.start();
  const std::size_t capacity = 256u << 10;
  std::vector<std::uint8_t> chunk(1000);
  const auto take = [&] {
    const bool took = master.take(chunk).has_value();
    while (master.next_announcement()) {
    }
    return took;
  };
  // Full (the level stops growing), then in use: the take wakes the idle thread, which
  // naps again with its wake-up a quarter of the ring below.
  std::size_t full = 0;
  ASSERT_TRUE(eventually([&] {
    const std::size_t was = master.available();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    full = master.available();
    return full >= capacity * 3 / 4 && full == was;
  }));
  ASSERT_TRUE(take());
  // Napping: no pass for 300 ms (the one that take woke has ended).
  std::uint64_t rounds = 0;
  ASSERT_TRUE(eventually([&] {
    const auto was = master.stats().refill_rounds;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    rounds = master.stats().refill_rounds;
    return rounds == was;
  }));
  // 20 % of the ring used, within a second of the last use: the thread naps on.
  while (master.available() + capacity * 20 / 100 > full) ASSERT_TRUE(take());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_EQ(master.stats().refill_rounds, rounds) << "woke before a quarter was used";
  // 30 %: past the quarter, still above the low-water half. It wakes.
  rounds = master.stats().refill_rounds;
  while (master.available() + capacity * 30 / 100 > full) ASSERT_TRUE(take());
  ASSERT_GT(master.available(), capacity / 2) << "below the low-water mark: shows nothing";
  EXPECT_TRUE(eventually([&] { return master.stats().refill_rounds > rounds; }))
      << "the thread napped on at " << master.available() << " of " << full << " bytes";
}

// An idle supply's refill thread sleeps instead of looking at its rings every
// poll_interval (what an idle gateway spends its CPU on), and the first key taken or asked
// for wakes it at once. With the KME health checks a minute away, the master refills its
// ring and the slave fetches an announced key within the test's patience only because a
// use woke them.
TEST_F(KeySupplyTest, AnIdleSupplySleepsAndTheFirstUseWakesIt) {
  auto master_cfg = master_config();
  auto slave_cfg = slave_config();
  master_cfg.health_interval = slave_cfg.health_interval = std::chrono::seconds(60);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_cfg);
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_cfg);
  master.start();
  slave.start();
  const std::size_t capacity = 256u << 10;
  ASSERT_TRUE(eventually([&] { return master.available() >= capacity * 8 / 10; }));
  // Settled: a second with nothing to do costs a pass or two, not a hundred.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const auto master_rounds = master.stats().refill_rounds;
  const auto slave_rounds = slave.stats().refill_rounds;
  std::this_thread::sleep_for(std::chrono::seconds(1));
  EXPECT_LE(master.stats().refill_rounds - master_rounds, 2u);
  EXPECT_LE(slave.stats().refill_rounds - slave_rounds, 2u);

  // Below the low-water mark in one go: the master refills.
  std::vector<std::uint8_t> chunk(1000);
  std::vector<keys::KeyAnnouncement> told;
  while (master.available() >= capacity * 4 / 10) {
    ASSERT_TRUE(master.take(chunk));
    while (auto a = master.next_announcement()) told.push_back(*a);
  }
  const auto fetched = master.stats().keys_fetched;
  EXPECT_TRUE(
      eventually([&] { return master.stats().keys_fetched > fetched; }, std::chrono::seconds(10)))
      << "the master slept through its ring running low";
  // The slave, asleep since it started, fetches what it is asked for.
  ASSERT_FALSE(told.empty());
  ASSERT_TRUE(slave.request(told.front()));
  std::optional<keys::PadSegment> got;
  EXPECT_TRUE(
      eventually([&] { return (got = slave.pop_segment()).has_value(); }, std::chrono::seconds(10)))
      << "the slave slept through a key asked for";
  if (got) {
    EXPECT_EQ(got->offset, told.front().offset);
    slave.release(*got);
  }
}

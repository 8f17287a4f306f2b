// SPDX-License-Identifier: LGPL-2.1-or-later
// Key supplies (refill threads) against qkd-kme-sim in the situations real KMEs put them
// in: keys that never come, keys late from the relay, forged lengths, KMEs that refuse us
// or never answer, a KME restarted empty, KMEs that drop unfetched batches; and how much
// key a master holds and announces. Real HTTPS with mutual TLS; key bytes are compared,
// never printed.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "test_pki.hpp"

using namespace otpgate;
using otpgate::testing::client_config;
using otpgate::testing::eventually;
using namespace std::chrono_literals;

namespace {

using Pad = std::map<std::uint64_t, std::vector<std::uint8_t>>;  // offset -> bytes, test only

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// A key_ID no KME issued.
keys::KeyId ghost_id(unsigned n) {
  char text[40];
  std::snprintf(text, sizeof text, "0badc0de-0000-4000-8000-%012x", n);
  return *keys::KeyId::parse(text);
}

bool same_bytes(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

// Every byte the master handed out (`sent`) equals the slave's key byte at the same pad
// offset (`received`); failures name offsets only.
void expect_same_pad(const Pad& sent, const Pad& received) {
  std::uint64_t compared = 0;
  for (const auto& [offset, pad] : sent) {
    for (std::size_t i = 0; i < pad.size(); ++i) {
      const std::uint64_t at = offset + i;
      auto it = received.upper_bound(at);
      if (it == received.begin() || at - std::prev(it)->first >= std::prev(it)->second.size()) {
        ADD_FAILURE() << "the slave has no key for pad offset " << at;
        return;
      }
      --it;
      if (it->second[at - it->first] != pad[i]) {
        ADD_FAILURE() << "master and slave pad differ at offset " << at;
        return;
      }
      ++compared;
    }
  }
  EXPECT_GT(compared, 0u);
}

class KeySupplyFaults : public ::testing::Test {
 protected:
  void SetUp() override { start_sim(otpgate::testing::simulator_config()); }
  void start_sim(kmesim::SimulatorConfig config) {
    sim_.reset();
    sim_ = std::make_unique<kmesim::KmeSimulator>(std::move(config));
    sim_->start();
  }
  void start_sim(const kmesim::SimulatorFaults& faults) {
    auto config = otpgate::testing::simulator_config();
    config.faults = faults;
    start_sim(std::move(config));
  }

  keys::KeySupplyConfig master_config(std::size_t ring_bytes = 256u << 10) {
    return otpgate::testing::master_supply_config(dir_, ring_bytes);
  }
  keys::KeySupplyConfig slave_config() { return otpgate::testing::slave_supply_config(); }

  // Keys the master SAE gets straight from the KME (the slave is then asked for them).
  std::vector<keys::Key> issue(std::uint32_t number) {
    keys::KmeClient a(client_config(sim_->url(), "sae-a"));
    return a.enc_keys("sae-b", number, 8192);
  }

  otpgate::testing::TestDir test_dir_;
  const std::filesystem::path dir_ = test_dir_.path;
  std::unique_ptr<kmesim::KmeSimulator> sim_;
};

}  // namespace

// A key the KME never issued (a forged or lost announcement) must not hold up a genuine
// key asked for with it: the genuine one arrives while the ghost still waits out its grace.
TEST_F(KeySupplyFaults, NoHeadOfLineBlocking) {
  const auto issued = issue(1);
  auto config = slave_config();
  config.relay_grace = 1000ms;
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), config);
  const keys::KeyId ghost = ghost_id(1);
  // Both asked for before the refill thread runs: they are in its first batch, which the
  // KME refuses as a whole because of the ghost.
  ASSERT_TRUE(slave.request({0, ghost, 1024}));
  ASSERT_TRUE(slave.request({1024, issued[0].id, 1024}));
  slave.start();

  std::optional<keys::PadSegment> segment;
  ASSERT_TRUE(eventually([&] { return (segment = slave.pop_segment()).has_value(); }));
  keys::KeySupplyStats s;
  ASSERT_TRUE(eventually([&] {
    s = slave.stats();
    return s.keys_waiting == 1 || s.keys_lost != 0;
  }));
  EXPECT_EQ(s.keys_waiting, 1u) << "the ghost is still within its relay grace";
  EXPECT_EQ(s.keys_lost, 0u) << "the genuine key waited until the ghost was declared lost";
  EXPECT_EQ(segment->key_id.to_string(), issued[0].id.to_string());
  EXPECT_EQ(segment->offset, 1024u);
  EXPECT_TRUE(same_bytes(segment->bytes, issued[0].bytes.span()));
  slave.release(*segment);

  ASSERT_TRUE(eventually([&] { return slave.stats().keys_lost == 1; }));
  s = slave.stats();
  EXPECT_EQ(s.keys_waiting, 0u);
  EXPECT_TRUE(contains(s.last_error, ghost.to_string())) << s.last_error;
  EXPECT_FALSE(slave.pop_segment());
  EXPECT_EQ(sim_->stats().keys_to_slaves, 1u);
}

// 100 key_IDs the KME never issued among 28 genuine ones: every genuine key is delivered
// with its bytes, the ghosts are declared lost together, not one error per key.
TEST_F(KeySupplyFaults, LostKeysAreDeclaredInBulkAndTheRestDelivered) {
  constexpr std::uint32_t kGenuine = 28, kGhosts = 100, kAll = kGenuine + kGhosts;
  const auto issued = issue(kGenuine);
  std::map<std::string, const keys::Key*> genuine;  // key_ID -> what the master got
  for (const auto& k : issued) genuine.emplace(k.id.to_string(), &k);
  ASSERT_EQ(genuine.size(), kGenuine);

  auto config = slave_config();
  config.relay_grace = 300ms;
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), config);
  std::uint32_t next_genuine = 0, ghosts = 0;
  for (std::uint32_t i = 0; i < kAll; ++i) {
    // Genuine keys spread evenly through the ghosts.
    const bool is_genuine = (i + 1) * kGenuine / kAll != i * kGenuine / kAll;
    const keys::KeyId id = is_genuine ? issued[next_genuine++].id : ghost_id(ghosts++);
    ASSERT_TRUE(slave.request({std::uint64_t{i} * 1024, id, 1024}));
  }
  ASSERT_EQ(next_genuine, kGenuine);
  ASSERT_EQ(ghosts, kGhosts);
  slave.start();

  std::map<std::string, bool> delivered;  // key_ID -> bytes as the master got them
  ASSERT_TRUE(eventually([&] {
    while (auto segment = slave.pop_segment()) {
      const std::string id = segment->key_id.to_string();
      auto it = genuine.find(id);
      delivered.emplace(
          id, it != genuine.end() && same_bytes(segment->bytes, it->second->bytes.span()));
      slave.release(*segment);
    }
    return delivered.size() >= kGenuine && slave.stats().keys_lost >= kGhosts;
  })) << delivered.size()
      << " keys delivered, " << slave.stats().keys_lost << " lost";
  EXPECT_EQ(delivered.size(), kGenuine);
  for (const auto& [id, right] : delivered) EXPECT_TRUE(right) << "key_ID " << id;
  const auto s = slave.stats();
  EXPECT_EQ(s.keys_lost, kGhosts);
  EXPECT_EQ(s.keys_waiting, 0u);
  // One line per locating round (a few dozen requests each), never one per key.
  EXPECT_LE(s.kme_errors, 25u) << "lost keys are declared in bulk: " << s.last_error;
  EXPECT_GE(s.kme_errors, 1u);
  EXPECT_EQ(sim_->stats().keys_to_slaves, kGenuine);
}

// Keys that reach the slave's KME later than the slave asks are waited for, not lost.
TEST_F(KeySupplyFaults, RelayDelayIsWaitedOutWithinTheGrace) {
  auto sim_config = otpgate::testing::simulator_config();
  sim_config.relay_delay = 300ms;
  start_sim(sim_config);
  auto config = slave_config();
  config.relay_grace = 3000ms;
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), config);
  slave.start();
  const auto issued = issue(8);
  for (std::size_t i = 0; i < issued.size(); ++i) {
    ASSERT_TRUE(slave.request({i * 1024, issued[i].id, 1024}));
  }
  std::map<std::uint64_t, bool> delivered;  // offset -> bytes as the master got them
  ASSERT_TRUE(eventually([&] {
    while (auto segment = slave.pop_segment()) {
      const std::size_t i = segment->offset / 1024;
      delivered.emplace(segment->offset, i < issued.size() && segment->key_id == issued[i].id &&
                                             same_bytes(segment->bytes, issued[i].bytes.span()));
      slave.release(*segment);
    }
    return delivered.size() >= issued.size() || slave.stats().keys_lost != 0;
  })) << slave.stats().last_error;
  EXPECT_EQ(delivered.size(), issued.size());
  for (const auto& [offset, right] : delivered) EXPECT_TRUE(right) << "offset " << offset;
  EXPECT_EQ(slave.stats().keys_lost, 0u) << slave.stats().last_error;
  EXPECT_GT(sim_->stats().refused, 0u) << "the slave asked before the relay (else this proves "
                                          "nothing)";
}

// An announcement with the genuine key_ID but a forged length, seen first, must neither
// cost the genuine key nor change what is delivered for it.
TEST_F(KeySupplyFaults, AForgedLengthNeverWipesTheGenuineKey) {
  const auto issued = issue(1);
  const std::size_t length = issued[0].bytes.size();
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_config());
  ASSERT_TRUE(slave.request({0, issued[0].id, 16}));  // forged
  ASSERT_TRUE(slave.request({0, issued[0].id, static_cast<std::uint32_t>(length)}));
  slave.start();
  std::optional<keys::PadSegment> segment;
  ASSERT_TRUE(eventually([&] { return (segment = slave.pop_segment()).has_value(); }));
  EXPECT_EQ(segment->key_id.to_string(), issued[0].id.to_string());
  EXPECT_EQ(segment->offset, 0u);
  EXPECT_EQ(segment->bytes.size(), length);
  EXPECT_TRUE(same_bytes(segment->bytes, issued[0].bytes.span()));
  slave.release(*segment);
  // Nothing is left to fetch: no second segment can come.
  ASSERT_TRUE(eventually([&] { return slave.stats().keys_waiting == 0; }));
  EXPECT_FALSE(slave.pop_segment());
  const auto s = slave.stats();
  EXPECT_EQ(s.keys_lost, 0u) << s.last_error;
  EXPECT_EQ(s.keys_fetched, 1u);
  EXPECT_EQ(sim_->stats().keys_to_slaves, 1u);
}

// A KME that does not accept our certificate is given up on at once, and the failure
// quotes its status and its own words, whatever format it answers in.
TEST_F(KeySupplyFaults, RefusedCertificateFailsFastWithTheKmesWords) {
  for (const auto style : {kmesim::ErrorStyle::etsi, kmesim::ErrorStyle::html}) {
    SCOPED_TRACE(style == kmesim::ErrorStyle::etsi ? "etsi" : "html");
    kmesim::SimulatorFaults faults;
    faults.refuse_sae = {"sae-a"};
    faults.error_style = style;
    start_sim(faults);
    keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
    master.start();
    ASSERT_TRUE(eventually([&] { return master.failed(); })) << master.stats().last_error;
    const auto s = master.stats();
    EXPECT_TRUE(s.failed);
    EXPECT_EQ(s.failure, master.failure());
    EXPECT_TRUE(contains(s.failure, "401")) << s.failure;
    EXPECT_TRUE(contains(s.failure, "the client certificate of SAE \"sae-a\" is not accepted"))
        << s.failure;
    EXPECT_FALSE(contains(s.failure, "<")) << "no HTML tags: " << s.failure;
    EXPECT_FALSE(contains(s.failure, "&quot;")) << "no HTML entities: " << s.failure;
    EXPECT_EQ(s.keys_fetched, 0u);
  }
}

TEST_F(KeySupplyFaults, ARefusedSlaveFailsOnceAskedForAKey) {
  kmesim::SimulatorFaults faults;
  faults.refuse_sae = {"sae-b"};
  start_sim(faults);
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_config());
  slave.start();
  // Many KMEs refuse status to a slave: that alone is no reason to give up.
  ASSERT_TRUE(eventually([&] { return slave.stats().ring_capacity_bytes != 0; }));
  EXPECT_FALSE(slave.failed()) << slave.failure();
  ASSERT_TRUE(slave.request({0, ghost_id(7), 1024}));
  ASSERT_TRUE(eventually([&] { return slave.failed(); })) << slave.stats().last_error;
  const std::string failure = slave.failure();
  EXPECT_TRUE(contains(failure, "401")) << failure;
  EXPECT_TRUE(contains(failure, "the client certificate of SAE \"sae-b\" is not accepted"))
      << failure;
  EXPECT_EQ(slave.stats().keys_lost, 0u) << "a refusal is not a lost key";
}

// A KME that answers every request 300 ms late (far away, or overloaded) is slow, not
// down: the master's ring, refilled at its low-water mark, covers the wait, so a stream
// of 120 kB/s never finds it empty; the slave fetches every announced key, late, and the
// pad is the same at both ends; neither supply calls the KME unhealthy or fails, and
// each reports the latency it sees.
TEST_F(KeySupplyFaults, ASlowKmeIsNotADownKmeAndTheRingCoversItsAnswers) {
  kmesim::SimulatorFaults faults;
  faults.answer_delay = 300ms;
  sim_->set_faults(faults);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_config());
  master.start();
  slave.start();
  ASSERT_TRUE(eventually([&] { return master.stats().bytes_available >= (200u << 10); }, 20s));

  Pad sent, received;
  std::vector<std::uint8_t> chunk(1200);
  std::size_t empty = 0;
  const auto end = std::chrono::steady_clock::now() + 2500ms;
  while (std::chrono::steady_clock::now() < end) {
    while (auto a = master.next_announcement()) ASSERT_TRUE(slave.request(*a));
    if (const auto offset = master.take(chunk)) {
      sent.emplace(*offset, chunk);
    } else {
      ++empty;
    }
    while (auto seg = slave.pop_segment()) {
      received.emplace(seg->offset,
                       std::vector<std::uint8_t>(seg->bytes.begin(), seg->bytes.end()));
      slave.release(*seg);
    }
    std::this_thread::sleep_for(10ms);  // 1200 bytes each 10 ms: 120 kB/s at most
  }
  while (auto a = master.next_announcement()) ASSERT_TRUE(slave.request(*a));
  EXPECT_EQ(empty, 0u) << "the ring ran dry while the KME took 300 ms per answer";
  ASSERT_FALSE(sent.empty());
  const std::uint64_t sent_end = sent.rbegin()->first + chunk.size();
  EXPECT_TRUE(eventually(
      [&] {
        while (auto seg = slave.pop_segment()) {
          received.emplace(seg->offset,
                           std::vector<std::uint8_t>(seg->bytes.begin(), seg->bytes.end()));
          slave.release(*seg);
        }
        return !received.empty() &&
               received.rbegin()->first + received.rbegin()->second.size() >= sent_end;
      },
      20s))
      << "the slave never got keys up to pad offset " << sent_end;
  expect_same_pad(sent, received);
  for (const keys::KeySupplyStats& s : {master.stats(), slave.stats()}) {
    EXPECT_FALSE(s.failed) << s.failure;
    EXPECT_TRUE(s.kme_healthy) << s.last_error;
    EXPECT_EQ(s.keys_lost, 0u) << s.last_error;
    EXPECT_GE(s.refill_latency_ms_avg, 300.0) << "the latency it saw is not reported";
  }
  EXPECT_GT(sim_->stats().requests_delayed, 0u);
}

// A KME that accepts connections and never answers: given up on after give_up_after.
TEST_F(KeySupplyFaults, ASilentKmeIsGivenUpOnWhenItNeverAnswered) {
  kmesim::SimulatorFaults faults;
  faults.hang = true;
  sim_->set_faults(faults);
  auto kme = client_config(sim_->url(), "sae-a");
  kme.request_timeout = 500ms;
  auto config = master_config();
  config.give_up_after = 1500ms;
  keys::KeySupply master(kme, config);
  master.start();
  ASSERT_TRUE(eventually([&] { return master.failed(); })) << master.stats().last_error;
  const auto s = master.stats();
  EXPECT_TRUE(s.failed);
  EXPECT_TRUE(contains(s.failure, "never answered")) << s.failure;
  EXPECT_FALSE(s.kme_healthy);
  EXPECT_EQ(s.keys_fetched, 0u);
  EXPECT_GT(sim_->stats().requests_hung, 0u);
  master.stop();
  faults.hang = false;
  sim_->set_faults(faults);
}

// After an outage the KME may have lost the keys it issued but the slave never fetched:
// the master wipes what it holds and resumes on an epoch boundary above every offset it
// ever handed out, and announces nothing below it.
TEST_F(KeySupplyFaults, AMasterFlushesItsRingAfterAKmeOutageAndResumesOnAnEpochBoundary) {
  constexpr std::uint64_t kEpoch = 1u << 18;
  auto config = master_config(256u << 10);
  config.restart_alignment = kEpoch;
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), config);
  master.start();
  ASSERT_TRUE(eventually([&] { return master.stats().bytes_available >= (200u << 10); }));

  std::vector<std::uint8_t> chunk(1200);
  std::uint64_t taken_end = 0;  // above every offset handed out
  auto take = [&] {
    const auto offset = master.take(chunk);
    if (offset) taken_end = std::max(taken_end, *offset + chunk.size());
    return offset.has_value();
  };
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(take());
  // Announce what was used, as a sender does; later announcements stay queued.
  for (std::uint64_t announced = 0; announced < taken_end;) {
    const auto a = master.next_announcement();
    ASSERT_TRUE(a);
    announced = a->offset + a->length;
  }

  const int port = sim_->port();
  sim_.reset();  // the KME goes away
  // Use pad until the ring is below its low-water mark: the refill now fails.
  while (master.stats().bytes_available > (100u << 10)) ASSERT_TRUE(take());
  ASSERT_TRUE(eventually([&] {
    const auto s = master.stats();
    return s.kme_errors > 0 && !s.kme_healthy;
  }));
  EXPECT_FALSE(master.failed()) << "a supply that once worked never gives up";
  EXPECT_EQ(master.stats().kme_outages, 0u);

  auto sim_config = otpgate::testing::simulator_config();
  sim_config.port = port;
  sim_config.start_full = true;
  start_sim(sim_config);
  ASSERT_TRUE(eventually([&] { return master.stats().kme_outages == 1; }))
      << master.stats().last_error;
  std::optional<std::uint64_t> resumed;
  ASSERT_TRUE(eventually([&] { return (resumed = master.take(chunk)).has_value(); }));
  EXPECT_EQ(*resumed % kEpoch, 0u) << *resumed;
  EXPECT_GE(*resumed, taken_end);
  const auto s = master.stats();
  EXPECT_GT(s.bytes_flushed, 0u);
  EXPECT_EQ(s.kme_outages, 1u);
  EXPECT_TRUE(s.kme_healthy);
  EXPECT_FALSE(master.failed());

  std::optional<keys::KeyAnnouncement> first;
  std::size_t count = 0;
  while (auto a = master.next_announcement()) {
    if (!first) first = a;
    ++count;
    EXPECT_GE(a->offset, *resumed) << "announced a flushed key";
  }
  ASSERT_TRUE(first);
  EXPECT_EQ(first->offset, *resumed) << "the stream resumes with the first new key";
  EXPECT_GT(count, 1u);
}

// A KME that drops a pair's unfetched keys on the next enc_keys costs keys until the master
// notices; from then on one batch is in flight at a time and nothing more is lost.
TEST_F(KeySupplyFaults, AKmeThatReplacesUnfetchedBatchesGetsOneBatchInFlight) {
  kmesim::SimulatorFaults faults;
  faults.replace_unfetched_batch = true;
  faults.stored_count_of_pair = true;
  sim_->set_faults(faults);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config());
  auto slave_cfg = slave_config();
  slave_cfg.poll_interval = 200ms;  // a slave slower than the master asks: batches overlap
  slave_cfg.relay_grace = 500ms;
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_cfg);
  master.start();
  slave.start();

  Pad sent, received;
  std::vector<std::uint8_t> chunk(1200);
  std::uint64_t moved = 0;
  std::uint64_t keep_from = UINT64_MAX;  // pad at or above this offset is compared
  // Announcements to the slave, pad used at the master (if `use_pad`), keys from the slave.
  auto step = [&](bool use_pad) {
    for (int i = 0; i < 64; ++i) {
      while (auto a = master.next_announcement()) {
        if (!slave.request(*a)) return false;
      }
      if (auto offset = use_pad ? master.take(chunk) : std::nullopt) {
        moved += chunk.size();
        if (*offset >= keep_from) sent.emplace(*offset, chunk);
      } else {
        std::this_thread::sleep_for(1ms);
      }
      while (auto s = slave.pop_segment()) {
        received.emplace(s->offset, std::vector<std::uint8_t>(s->bytes.begin(), s->bytes.end()));
        slave.release(*s);
      }
    }
    return true;
  };

  bool queue_ok = true;
  ASSERT_TRUE(eventually(
      [&] {
        queue_ok = queue_ok && step(true);
        return !queue_ok || (moved >= (512u << 10) && master.stats().kme_replaces_batches);
      },
      60s))
      << moved << " bytes moved; " << sim_->stats().keys_replaced << " keys replaced";
  ASSERT_TRUE(queue_ok) << "the slave's request queue is full";
  // The KME's stored_key_count grows by exactly what it issued from the first call: one
  // batch in flight from then on, before it could drop any.
  const std::uint64_t replaced = sim_->stats().keys_replaced;
  EXPECT_EQ(replaced, 0u) << "keys were replaced before the master noticed";
  keep_from = master.stats().next_offset;  // keys issued from here on are one batch at a time

  // Keys dropped before detection (none expected) are declared lost; no others.
  ASSERT_TRUE(eventually(
      [&] {
        queue_ok = queue_ok && step(false);
        return !queue_ok || slave.stats().keys_lost >= replaced;
      },
      60s))
      << slave.stats().keys_lost << " lost of " << replaced << " replaced";
  ASSERT_TRUE(queue_ok) << "the slave's request queue is full";
  const std::uint64_t lost = slave.stats().keys_lost;
  EXPECT_EQ(lost, replaced);

  // Another 256 KiB, and 8 s at least: nothing more is replaced or lost, and the pad is
  // identical. Meanwhile the KME refuses the status after each batch (503, the client's 3
  // attempts): the master keeps one batch in flight all the same, its patience running
  // from each batch (it ran from the last status answered, so a batch could be replaced
  // under its announcement once that was 6 s old).
  faults.refuse_status_after_enc_keys = 3;
  sim_->set_faults(faults);
  const std::uint64_t target = moved + (256u << 10);
  const auto at_least_until = std::chrono::steady_clock::now() + 8s;
  ASSERT_TRUE(eventually(
      [&] {
        queue_ok = queue_ok && step(true);
        return !queue_ok || (moved >= target && std::chrono::steady_clock::now() >= at_least_until);
      },
      60s))
      << moved << " of " << target << " bytes moved; " << master.stats().last_error;
  ASSERT_TRUE(queue_ok) << "the slave's request queue is full";
  EXPECT_EQ(sim_->stats().keys_replaced, replaced) << "a batch was dropped after detection";
  while (auto a = master.next_announcement()) ASSERT_TRUE(slave.request(*a));
  ASSERT_FALSE(sent.empty());
  const std::uint64_t end = sent.rbegin()->first + chunk.size();
  EXPECT_TRUE(eventually([&] {
    while (auto s = slave.pop_segment()) {
      received.emplace(s->offset, std::vector<std::uint8_t>(s->bytes.begin(), s->bytes.end()));
      slave.release(*s);
    }
    return !received.empty() && received.rbegin()->first + received.rbegin()->second.size() >= end;
  })) << "the slave never got keys up to pad offset "
      << end;
  EXPECT_EQ(sim_->stats().keys_replaced, replaced) << "a batch was dropped after detection";
  EXPECT_EQ(slave.stats().keys_lost, lost) << slave.stats().last_error;
  expect_same_pad(sent, received);
  EXPECT_TRUE(master.stats().kme_replaces_batches);
}

// A KME whose store moves between the master's calls (its link delivers key) can land on
// the sign of one that replaces unfetched batches by chance: here every request finds
// exactly so much new key that the count after a batch is the count before plus the batch.
// Taken for such a KME, the master would give an idle lane no key (it stopped at its first
// 8 keys in a CI run); the count moving between two reads shows that it proves nothing.
TEST_F(KeySupplyFaults, AStoreThatMovesBetweenCallsIsNotTakenForOneThatReplacesBatches) {
  auto config = otpgate::testing::simulator_config();
  config.start_full = false;
  config.key_rate_bps = 1e-3;  // (0 would fill the store at once)
  config.key_size = 256;       // status counts 256-bit keys; the master asks for 8192-bit ones
  config.max_key_size = 8192;
  config.max_keys_per_request = 8;
  // A batch of 8 takes 8 * 32 counted keys; two requests bring 8 * 33: after = before + 8.
  config.faults.grow_bits_per_request = 8 * 33 * 256 / 2;
  start_sim(std::move(config));
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config(64u << 10));
  master.start();
  ASSERT_TRUE(eventually([&] {
    const auto s = master.stats();
    return s.bytes_available * 2 > s.ring_capacity_bytes;
  })) << master.stats().bytes_available
      << " of " << master.stats().ring_capacity_bytes << " bytes held; KME taken for one that "
      << "replaces unfetched batches " << master.stats().kme_replaces_batches << "; "
      << master.stats().last_error;
  EXPECT_FALSE(master.stats().kme_replaces_batches);
  EXPECT_EQ(sim_->stats().keys_replaced, 0u);
}

// A KME that refuses the status call right after a batch (503: busy) costs the master its
// probe of that batch, never the keys in hand: every key the KME issued is placed. Without
// the guard the batch was dropped with the failed call (8 batches, one per probe).
TEST_F(KeySupplyFaults, AStatusRefusedRightAfterABatchCostsNoKeys) {
  kmesim::SimulatorFaults faults;
  faults.refuse_status_after_enc_keys = 3;  // the client's 3 attempts (test_pki.hpp)
  sim_->set_faults(faults);
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_config(512u << 10));
  master.start();
  ASSERT_TRUE(eventually([&] {
    const auto s = master.stats();
    return s.bytes_available * 2 > s.ring_capacity_bytes;
  })) << master.stats().last_error;
  ASSERT_TRUE(eventually([&] { return master.stats().kme_healthy; }));
  const auto s = master.stats();
  EXPECT_EQ(sim_->stats().keys_to_masters, s.keys_fetched)
      << "keys the KME issued that the master dropped";
  EXPECT_FALSE(s.failed) << s.failure;
  EXPECT_FALSE(s.kme_replaces_batches);
}

// Sized in seconds of consumption, an idle master holds only ring_min_bytes of key, not
// its whole ring, and what it held is wiped when stopped.
TEST_F(KeySupplyFaults, RingSizedInSecondsHoldsLittleKeyWhenIdle) {
  constexpr std::size_t kMin = 64u << 10;
  auto config = master_config(4u << 20);
  config.ring_seconds = 2;
  config.ring_min_bytes = kMin;
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), config);
  master.start();
  ASSERT_TRUE(eventually([&] {
    return master.stats().bytes_available >= config.high_water * kMin;
  })) << master.stats().last_error;
  const auto s = master.stats();
  const std::uint64_t key_bytes = s.key_size_bits / 8;
  ASSERT_GT(key_bytes, 0u);
  EXPECT_LE(double(s.bytes_available), config.high_water * kMin + double(key_bytes));
  EXPECT_EQ(s.ring_capacity_bytes, 4u << 20) << "the ring itself has its full size";
  EXPECT_LT(s.bytes_available, s.ring_capacity_bytes / 16);
  EXPECT_EQ(s.bytes_fetched, s.bytes_available) << "fetched no more than it holds";
  master.stop();
  EXPECT_EQ(master.stats().bytes_wiped_at_stop, s.bytes_available);
}

// With an announcement lead, a full ring is not announced at once: only about
// announce_min_bytes ahead of use, and more as pad is used.
TEST_F(KeySupplyFaults, AnnouncementsGoOnlyABoundedLeadAhead) {
  constexpr std::uint64_t kLead = 64u << 10;
  auto config = master_config(1u << 20);
  config.announce_lead_seconds = 1.5;
  config.announce_min_bytes = kLead;
  config.key_size_cap_bits = 8192;
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), config);
  master.start();
  ASSERT_TRUE(eventually([&] {
    return master.stats().bytes_available >= config.high_water * double(1u << 20);
  })) << master.stats().last_error;
  const std::uint64_t key_bytes = master.stats().key_size_bits / 8;
  ASSERT_EQ(key_bytes, 1024u);

  std::uint64_t announced = 0;  // end of the announced pad, announcements are contiguous
  auto drain = [&] {
    std::uint64_t bytes = 0;
    while (auto a = master.next_announcement()) {
      EXPECT_EQ(a->offset, announced) << "announcements in pad order, no gaps";
      announced = a->offset + a->length;
      bytes += a->length;
    }
    return bytes;
  };
  const std::uint64_t first = drain();
  EXPECT_GT(first, 0u);
  EXPECT_LE(first, kLead + 64 * key_bytes) << "announced far ahead of use";
  EXPECT_LT(first, master.stats().bytes_available);

  // Use most of it (only announced pad): more is announced.
  std::vector<std::uint8_t> chunk(1000);
  std::uint64_t used = 0;
  while (used + chunk.size() <= announced - 4096) {
    const auto offset = master.take(chunk);
    ASSERT_TRUE(offset);
    ASSERT_LE(*offset + chunk.size(), announced) << "pad used before it was announced";
    used = *offset + chunk.size();
  }
  const std::uint64_t second = drain();
  EXPECT_GT(second, 0u) << "nothing more announced after " << used << " bytes were used";
  EXPECT_LT(announced, master.stats().next_offset) << "still not the whole ring";
}

// Three streams on one SAE pair share one supply per direction (one lane each): on a KME
// that replaces unfetched batches, their batches no longer replace one another, each lane
// is a pad stream of its own (offsets from its own journal), and no key serves two lanes.
TEST_F(KeySupplyFaults, StreamsShareOneSupplyPerDirectionWithALaneEach) {
  kmesim::SimulatorFaults faults;
  faults.replace_unfetched_batch = true;
  faults.stored_count_of_pair = true;
  sim_->set_faults(faults);
  constexpr std::size_t kLanes = 3;
  auto master_cfg = master_config();
  master_cfg.lanes = kLanes;
  for (std::size_t i = 0; i < kLanes; ++i)
    master_cfg.lane_journals.push_back(dir_ / ("lane-" + std::to_string(i) + ".journal"));
  {
    keys::OffsetJournal earlier(master_cfg.lane_journals[1]);  // lane 1 ran before
    earlier.reserve(1u << 20);
  }
  auto slave_cfg = slave_config();
  slave_cfg.lanes = kLanes;
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_cfg);
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_cfg);
  ASSERT_EQ(master.lane_count(), kLanes);
  master.start();
  slave.start();

  std::array<Pad, kLanes> sent, received;
  std::array<std::uint64_t, kLanes> moved{};
  std::map<keys::KeyId, std::size_t> lane_of_key;
  bool same_key_twice = false;
  std::vector<std::uint8_t> chunk(1000);
  auto step = [&] {
    for (std::size_t i = 0; i < kLanes; ++i) {
      keys::PadSource& out = master.lane(i);
      keys::PadSource& in = slave.lane(i);
      while (auto a = out.next_announcement()) {
        const auto [it, fresh] = lane_of_key.emplace(a->key_id, i);
        same_key_twice = same_key_twice || !fresh;
        EXPECT_TRUE(in.request(*a));
      }
      // Lanes at different rates, as a video and an audio stream.
      for (std::size_t n = 0; n < kLanes - i; ++n) {
        if (auto offset = out.take(chunk)) {
          sent[i].emplace(*offset, chunk);
          moved[i] += chunk.size();
        }
      }
      while (auto s = in.pop_segment()) {
        received[i].emplace(s->offset, std::vector<std::uint8_t>(s->bytes.begin(), s->bytes.end()));
        in.release(*s);
      }
    }
    std::this_thread::sleep_for(1ms);
  };
  ASSERT_TRUE(eventually(
      [&] {
        step();
        return moved[kLanes - 1] >= (128u << 10);
      },
      60s))
      << "lanes moved " << moved[0] << "/" << moved[1] << "/" << moved[2] << " bytes; "
      << master.stats().last_error;
  // Let the slave catch up with what was announced.
  ASSERT_TRUE(eventually([&] {
    step();
    return slave.stats().keys_waiting == 0;
  }));
  step();
  EXPECT_FALSE(same_key_twice) << "a key was announced on two lanes";
  EXPECT_EQ(sim_->stats().keys_replaced, 0u) << "one lane's batch replaced another's";
  EXPECT_TRUE(master.stats().kme_replaces_batches);
  EXPECT_EQ(slave.stats().keys_lost, 0u);
  EXPECT_GE(sent[1].begin()->first, 1u << 20) << "lane 1 resumes from its own journal";
  EXPECT_LT(sent[0].begin()->first, 1u << 20);
  // Every chunk a lane's sender used is the same pad at that lane's receiver.
  for (std::size_t i = 0; i < kLanes; ++i) {
    std::size_t compared = 0;
    for (const auto& [offset, bytes] : sent[i]) {
      auto seg = received[i].upper_bound(offset);
      ASSERT_NE(seg, received[i].begin()) << "lane " << i << " offset " << offset;
      --seg;
      std::vector<std::uint8_t> got;
      for (std::uint64_t o = offset; o < offset + bytes.size();) {
        ASSERT_TRUE(seg != received[i].end() && o >= seg->first &&
                    o < seg->first + seg->second.size())
            << "lane " << i << ": pad at " << o << " never reached the receiver";
        const std::size_t at = o - seg->first;
        const std::size_t n =
            std::min<std::uint64_t>(seg->second.size() - at, offset + bytes.size() - o);
        got.insert(got.end(), seg->second.begin() + at, seg->second.begin() + at + n);
        o += n;
        ++seg;
      }
      EXPECT_EQ(got, bytes) << "lane " << i << " offset " << offset;
      ++compared;
    }
    EXPECT_GT(compared, 0u) << "lane " << i;
    const auto ls = master.lane_stats(i);
    EXPECT_EQ(ls.bytes_consumed, moved[i]) << "lane " << i;
  }
  EXPECT_EQ(master.stats().bytes_consumed, moved[0] + moved[1] + moved[2]);
}

TEST_F(KeySupplyFaults, LanesNeedAJournalEachAndAKme) {
  auto master_cfg = master_config();
  master_cfg.lanes = 2;
  try {
    keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_cfg);
    ADD_FAILURE() << "two lanes with one journal were accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("one offset journal per lane"), std::string::npos)
        << e.what();
  }
  const auto pad = dir_ / "pad.bin";
  std::ofstream(pad) << std::string(4096, 'x');
  master_cfg.lane_journals = {dir_ / "l0.journal", dir_ / "l1.journal"};
  try {
    keys::KeySupply from_file(keys::PadFileConfig{pad, 1024}, master_cfg);
    ADD_FAILURE() << "a pad file was shared by two lanes";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("give each stream its own pad file"), std::string::npos)
        << e.what();
  }
}

// On a KME that replaces unfetched batches, an idle stream (video muted) must not hold
// up the one in use: it is given no key until its stream asks, so nothing it holds stays
// unfetched at the KME, and once it asks it gets key like any other lane.
TEST_F(KeySupplyFaults, AnIdleLaneNeverHoldsUpTheLaneInUse) {
  kmesim::SimulatorFaults faults;
  faults.replace_unfetched_batch = true;
  faults.stored_count_of_pair = true;
  sim_->set_faults(faults);
  auto master_cfg = master_config();
  master_cfg.lanes = 2;
  master_cfg.lane_journals = {dir_ / "audio.journal", dir_ / "video.journal"};
  auto slave_cfg = slave_config();
  slave_cfg.lanes = 2;
  keys::KeySupply master(client_config(sim_->url(), "sae-a"), master_cfg);
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_cfg);
  std::vector<std::uint8_t> chunk(1000);
  std::array<std::uint64_t, 2> moved{};
  // Lane 0 asks from the start; lane 1 only once `video` is set.
  bool video = false;
  auto step = [&] {
    for (std::size_t i = 0; i < 2; ++i) {
      if (i == 1 && !video) continue;
      while (auto a = master.lane(i).next_announcement()) EXPECT_TRUE(slave.lane(i).request(*a));
      if (master.lane(i).take(chunk)) moved[i] += chunk.size();
      while (auto s = slave.lane(i).pop_segment()) slave.lane(i).release(*s);
    }
    std::this_thread::sleep_for(1ms);
  };
  step();  // the audio stream asks for key before there is any
  master.start();
  slave.start();
  ASSERT_TRUE(eventually(
      [&] {
        step();
        return moved[0] >= (512u << 10);
      },
      60s))
      << moved[0] << " bytes moved; " << master.stats().last_error;
  EXPECT_TRUE(master.stats().kme_replaces_batches);
  EXPECT_EQ(master.lane_stats(1).bytes_fetched, 0u) << "the idle lane was given key";
  EXPECT_EQ(master.lane_stats(1).bytes_flushed, 0u);
  video = true;
  ASSERT_TRUE(eventually(
      [&] {
        step();
        return moved[1] >= (64u << 10);
      },
      60s))
      << moved[1] << " bytes moved on the lane that started late";
  EXPECT_EQ(sim_->stats().keys_replaced, 0u);
  EXPECT_EQ(slave.stats().keys_lost, 0u);
}

// A copy of one stream's announcement sent to another stream's port (sniffed key_IDs)
// makes the second lane ask for keys the first asked for: the key goes to the first only,
// and the second lane counts the refusal. One stream's pad never serves two.
TEST_F(KeySupplyFaults, AKeyAskedForOnTwoLanesStaysWithTheFirst) {
  const auto issued = issue(1);
  auto config = slave_config();
  config.lanes = 2;
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), config);
  ASSERT_TRUE(slave.lane(0).request({0, issued[0].id, 1024}));
  ASSERT_TRUE(slave.lane(1).request({0, issued[0].id, 1024}));
  slave.start();
  std::optional<keys::PadSegment> got;
  ASSERT_TRUE(eventually([&] { return (got = slave.lane(0).pop_segment()).has_value(); }));
  EXPECT_TRUE(std::equal(got->bytes.begin(), got->bytes.end(), issued[0].bytes.span().begin()));
  slave.lane(0).release(*got);
  EXPECT_FALSE(slave.lane(1).pop_segment()) << "the second lane got the first lane's key";
  EXPECT_EQ(slave.lane_stats(1).keys_refused, 1u);
  EXPECT_EQ(slave.lane_stats(0).keys_refused, 0u);
}

// A receiving supply with nothing to fetch is idle, not unhealthy; it still notices a KME
// that goes away (and comes back) without any request to make.
TEST_F(KeySupplyFaults, AnIdleSlaveIsHealthyAndStillNoticesTheKmeGoing) {
  keys::KeySupply slave(client_config(sim_->url(), "sae-b"), slave_config());
  slave.start();
  ASSERT_TRUE(eventually([&] { return slave.stats().kme_healthy; }))
      << "an idle slave whose KME answers reports unhealthy: " << slave.stats().last_error;
  const int port = sim_->port();
  sim_.reset();
  ASSERT_TRUE(eventually([&] { return !slave.stats().kme_healthy; }))
      << "an idle slave did not notice its KME going away";
  EXPECT_NE(slave.stats().last_error, "");
  auto config = otpgate::testing::simulator_config();
  config.port = port;
  start_sim(config);
  EXPECT_TRUE(eventually([&] { return slave.stats().kme_healthy; }))
      << "an idle slave did not notice its KME coming back";
}

// A KME that is down fails every retry; the log says so once, then once per interval with
// a count, rather than a line per attempt (176 lines in 10 s before).
TEST_F(KeySupplyFaults, AnOutageIsLoggedOnceAnIntervalWithACount) {
  std::mutex mutex;
  std::vector<std::string> lines;
  auto config = master_config();
  config.log = [&](keys::LogLevel level, std::string_view message) {
    if (level < keys::LogLevel::warning) return;
    std::lock_guard lock(mutex);
    lines.emplace_back(message);
  };
  auto client = client_config(sim_->url(), "sae-a");
  client.log = config.log;
  sim_.reset();  // nothing answers on that port any more
  keys::KeySupply master(client, config);
  master.start();
  std::this_thread::sleep_for(6500ms);
  master.stop();
  std::lock_guard lock(mutex);
  EXPECT_GE(master.stats().kme_errors, 5u);
  EXPECT_GE(lines.size(), 2u);
  EXPECT_LE(lines.size(), 4u) << lines.size() << " warning lines in 6.5 s";
  bool counted = false;
  for (const auto& l : lines) counted = counted || l.find("more error") != std::string::npos;
  EXPECT_TRUE(counted) << "no line says how many errors were held back";
}

// A used-up pad file never refills (unlike a KME short of key). The run that uses it up
// goes on as its policy says, with the error in its stats; the next run, which could send
// nothing, fails at once naming the file (it used to send nothing in silence).
TEST_F(KeySupplyFaults, ARunOnAUsedUpPadFileFailsNamingTheFile) {
  const auto pad = dir_ / "small.pad";
  std::ofstream(pad) << std::string(64u << 10, 'k');
  auto config = master_config();
  config.journal = dir_ / "small.pad.sent";
  {
    keys::KeySupply first(keys::PadFileConfig{pad, 16u << 10}, config);
    first.start();
    std::vector<std::uint8_t> chunk(4096);
    std::uint64_t taken = 0;
    ASSERT_TRUE(eventually([&] {
      while (first.take(chunk)) taken += chunk.size();
      return first.stats().last_error.find("used up") != std::string::npos;
    }));
    EXPECT_EQ(taken, 64u << 10);
    EXPECT_FALSE(first.failed()) << "the run that used the pad up was stopped";
  }
  keys::KeySupply second(keys::PadFileConfig{pad, 16u << 10}, config);
  second.start();
  ASSERT_TRUE(eventually([&] { return second.failed(); }))
      << "a run on a used-up pad file was not reported as a failure";
  EXPECT_NE(second.failure().find("small.pad is used up"), std::string::npos) << second.failure();
}

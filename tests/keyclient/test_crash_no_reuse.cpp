// SPDX-License-Identifier: LGPL-2.1-or-later
// SIGKILL a process mid-stream, restart it on the same journal, and prove that no pad
// offset it was handed before is ever handed out again.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <fstream>

#include "test_pki.hpp"

extern char** environ;
namespace fs = std::filesystem;
using otpgate::testing::eventually;

namespace {

struct Range {
  std::uint64_t offset, length;
};

std::vector<Range> read_ranges(const fs::path& log) {
  std::vector<Range> ranges;
  std::ifstream in(log);
  Range r{};
  while (in >> r.offset >> r.length) ranges.push_back(r);
  return ranges;
}

pid_t spawn_child(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  EXPECT_EQ(posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ), 0);
  return pid;
}

std::uint64_t journal_value(const fs::path& path) {
  return otpgate::keys::OffsetJournal(path).reserved();
}

}  // namespace

TEST(CrashNoReuse, SigkillMidStreamThenRestartNeverRepeatsAnOffset) {
  auto config = otpgate::testing::simulator_config();
  otpgate::kmesim::KmeSimulator sim(config);
  sim.start();
  const fs::path dir = fs::temp_directory_path() / ("otpgate-crash-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path journal = dir / "a-to-b.journal";

  std::vector<std::vector<Range>> runs;
  std::vector<std::uint64_t> journal_after;
  for (int run = 0; run < 3; ++run) {
    const fs::path log = dir / ("run" + std::to_string(run) + ".log");
    const pid_t child =
        spawn_child({OTPGATE_CRASH_CHILD, sim.url(), otpgate::testing::pki_dir().string(),
                     journal.string(), log.string()});
    // Let it run through several journal reservations, then kill it without warning.
    ASSERT_TRUE(eventually([&] { return read_ranges(log).size() >= 600; }));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status));
    runs.push_back(read_ranges(log));
    journal_after.push_back(journal_value(journal));
  }

  for (std::size_t run = 0; run < runs.size(); ++run) {
    std::uint64_t run_max_end = 0;
    std::uint64_t run_min = UINT64_MAX;
    for (const Range& r : runs[run]) {
      run_max_end = std::max(run_max_end, r.offset + r.length);
      run_min = std::min(run_min, r.offset);
    }
    EXPECT_LE(run_max_end, journal_after[run])
        << "run " << run << " used offsets its journal had not reserved";
    if (run > 0) {
      EXPECT_GE(run_min, journal_after[run - 1])
          << "run " << run << " reused offsets reserved before the previous crash";
    }
  }
  // And pairwise: every range of every run is disjoint from every other.
  std::vector<Range> all;
  for (const auto& r : runs) all.insert(all.end(), r.begin(), r.end());
  std::sort(all.begin(), all.end(),
            [](const Range& a, const Range& b) { return a.offset < b.offset; });
  for (std::size_t i = 1; i < all.size(); ++i) {
    ASSERT_GE(all[i].offset, all[i - 1].offset + all[i - 1].length) << "pad offset used twice";
  }
  EXPECT_GE(all.size(), 1800u);
  fs::remove_all(dir);
}

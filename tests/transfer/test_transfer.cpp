// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-transfer end to end on loopback: a real KME simulator over mTLS, the receiving
// service (in process or as `otp-transfer serve`), senders in process or as the CLI, a
// real SQLite database, real files. Adversarial: SIGKILL of either side, a corrupted
// byte on the wire, a full disk, bad input.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <thread>

#include "otpgate/keyclient.hpp"
#include "otpgate/transfer.hpp"
#include "silent_connection.hpp"
#include "test_pki.hpp"

using namespace otpgate;
using namespace otpgate::testing;
using transfer::Job;
using transfer::Method;
using State = transfer::TransferState;
namespace fs = std::filesystem;

// gtest prints states and methods as their words.
namespace otpgate::transfer {
void PrintTo(TransferState state, std::ostream* out) {
  *out << to_string(state);
}
void PrintTo(Method method, std::ostream* out) {
  *out << to_string(method);
}
}  // namespace otpgate::transfer

namespace {

std::string sha256_of(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    EVP_DigestUpdate(ctx, buffer.data(), static_cast<std::size_t>(in.gcount()));
  }
  unsigned char digest[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx, digest, &n);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  char two[3];
  for (unsigned i = 0; i < n; ++i) {
    std::snprintf(two, sizeof two, "%02x", digest[i]);
    hex += two;
  }
  return hex;
}

std::string sha256_text(const std::string& text) {
  unsigned char digest[32];
  unsigned int n = 0;
  EVP_Digest(text.data(), text.size(), digest, &n, EVP_sha256(), nullptr);
  std::string hex;
  char two[3];
  for (unsigned i = 0; i < n; ++i) {
    std::snprintf(two, sizeof two, "%02x", digest[i]);
    hex += two;
  }
  return hex;
}

void write_random(const fs::path& file, std::size_t bytes, unsigned seed) {
  fs::create_directories(file.parent_path());
  std::ofstream out(file, std::ios::binary);
  std::mt19937_64 rng(seed);
  std::vector<std::uint64_t> block(1 << 17);
  for (std::size_t done = 0; done < bytes;) {
    for (auto& v : block) v = rng();
    const std::size_t n = std::min(bytes - done, block.size() * 8);
    out.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(n));
    done += n;
  }
}

std::uint16_t free_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  return ntohs(a.sin_port);
}

// A child process (the CLI), killed when the test ends.
struct Child {
  pid_t pid = -1;
  Child(std::vector<std::string> args, const fs::path& output, rlim_t file_limit = RLIM_INFINITY) {
    pid = ::fork();
    if (pid == 0) {
      const int fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      if (file_limit != RLIM_INFINITY) {
        rlimit limit{file_limit, file_limit};
        ::setrlimit(RLIMIT_FSIZE, &limit);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  int wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  void kill(int signal = SIGKILL) {
    if (pid > 0) {
      ::kill(pid, signal);
      wait();
    }
  }
  ~Child() { kill(); }
};

std::string slurp(const fs::path& file) {
  std::ifstream in(file);
  return {std::istreambuf_iterator<char>(in), {}};
}

// Two sites (A sends, B receives) sharing one KME simulator.
class TransferTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = simulator_config();
    c.max_key_size = 65536;
    c.store_bits = 8ull << 30;  // 1 GiB of key: the large-file test needs 2 x 200 MiB
    sim_ = std::make_unique<kmesim::KmeSimulator>(c);
    sim_->start();
    transfer_port_ = free_port();
  }

  std::string config_text(const std::string& site, const std::string& extra = "") const {
    const bool a = site == "a";
    const fs::path pki = pki_dir();
    std::ostringstream t;
    t << "[site]\nname = \"hospital-" << site << "\"\nsae_id = \"sae-" << site
      << "\"\nstate_dir = \"" << (dir_.path / ("state-" + site)).string() << "\"\n"
      << "[kme]\nurl = \"" << sim_->url() << "\"\ntls_cert = \""
      << (pki / ("sae-" + site + ".crt")).string() << "\"\ntls_key = \""
      << (pki / ("sae-" + site + ".key")).string() << "\"\ntls_ca = \"" << (pki / "ca.crt").string()
      << "\"\n"
      << "[peer]\nsae_id = \"sae-" << (a ? "b" : "a")
      << "\"\ntransfer = \"127.0.0.1:" << transfer_port_ << "\"\n"
      << "[transfer]\nlisten = \"127.0.0.1:" << (a ? 0 : transfer_port_) << "\"\nincoming_dir = \""
      << (dir_.path / ("incoming-" + site)).string() << "\"\ndata_root = \""
      << (dir_.path / "data").string() << "\"\nmax_attempts = 20\ncommit_bytes = 4194304\n"
      << extra << "\n[api]\nlisten = \"127.0.0.1:0\"\n";
    return t.str();
  }
  transfer::TransferConfig config(const std::string& site, const std::string& extra = "") const {
    return transfer::parse_config(config_text(site, extra), "site-" + site + ".toml");
  }
  fs::path config_file(const std::string& site, const std::string& extra = "") const {
    const fs::path f = dir_.path / ("site-" + site + ".toml");
    std::ofstream(f) << config_text(site, extra);
    return f;
  }
  fs::path data(const std::string& relative) const { return dir_.path / "data" / relative; }
  // `send SPECIMEN` of a 40 MiB file from site a with the key rate throttled to 80 Mbit/s;
  // returns its job ID once the receiver has committed part of it.
  std::string start_slow_send(const std::string& specimen, unsigned seed,
                              std::optional<Child>& sender) {
    write_random(data(specimen + "/reads.bam"), 40u << 20, seed);
    sim_->set_key_rate(80e6);
    sim_->drain();  // a full store would not be throttled at all
    sender.emplace(cli("a", {"send", specimen, data(specimen).string()}), dir_.path / "send.log");
    transfer::JobStore store(transfer::database_path(config("a")));
    EXPECT_TRUE(eventually([&] {
      const auto jobs = store.list();
      return !jobs.empty() && jobs[0].transferred > 0;
    }));
    const auto jobs = store.list();
    return jobs.empty() ? std::string() : jobs[0].job_id;
  }

  fs::path received(const Job& job, const std::string& relative) const {
    return dir_.path / "incoming-b" / job.specimen_id / job.job_id / relative;
  }
  std::vector<std::string> cli(const std::string& site, std::vector<std::string> args) const {
    std::vector<std::string> all{OTPGATE_TRANSFER_BIN, "-c", config_file(site).string()};
    all.insert(all.end(), args.begin(), args.end());
    return all;
  }

  TestDir dir_;
  std::unique_ptr<kmesim::KmeSimulator> sim_;
  std::uint16_t transfer_port_ = 0;
};

bool store_empty(const fs::path& database) {
  transfer::JobStore store(database);
  return store.list().empty();
}

void expect_same_files(const fs::path& sent, const fs::path& got) {
  for (const auto& e : fs::recursive_directory_iterator(sent)) {
    if (!e.is_regular_file()) continue;
    const fs::path other = got / fs::relative(e.path(), sent);
    ASSERT_TRUE(fs::exists(other)) << other;
    EXPECT_EQ(sha256_of(e.path()), sha256_of(other)) << other;
  }
}

}  // namespace

TEST_F(TransferTest, ALargeFileAndAFolderOfSamplesArriveIdenticalWithVerifiedHashes) {
  write_random(data("S1/big.bam"), 200u << 20, 1);
  write_random(data("S1/reads_R1.fastq.gz"), 3u << 20, 2);
  write_random(data("S1/calls/S1.vcf.gz"), 100000, 3);
  std::ofstream(data("S1/empty.txt")).flush();
  transfer::Service b(config("b"));
  b.start();
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  const Job made =
      transfer::create_send_job(store, a_config, "S1", {data("S1")}, Method::otp, false);
  EXPECT_EQ(made.files.size(), 4u);
  EXPECT_EQ(made.data_type, "mixed");
  const Job done = transfer::run_send_job(store, a_config, made.job_id);
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  expect_same_files(data("S1"), received(done, "S1"));
  for (const auto& f : done.files) EXPECT_EQ(f.state, "done") << f.path;
  // The receiver's database agrees, and holds the hash manifest (the "hash" record).
  transfer::JobStore b_store(transfer::database_path(config("b")));
  const auto at_b = b_store.get(done.job_id);
  ASSERT_TRUE(at_b);
  EXPECT_EQ(at_b->transfer_state, State::completed);
  EXPECT_EQ(at_b->direction, "receive");
  EXPECT_EQ(at_b->transferred, done.transfer_size);
  const std::string manifest = slurp(dir_.path / "incoming-b" / "S1" / (done.job_id + ".sha256"));
  EXPECT_NE(manifest.find(sha256_of(data("S1/big.bam")) + "  S1/big.bam"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir_.path / "incoming-b" / ".partial" / done.job_id / "0.part"));
}

TEST_F(TransferTest, AesMethodSpendsPadOnlyOnKeys) {
  write_random(data("S2/reads.bam"), 40u << 20, 4);
  transfer::Service b(config("b"));
  b.start();
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  const Job job =
      transfer::create_send_job(store, a_config, "S2", {data("S2")}, Method::aes, false);
  const auto before = sim_->stats().keys_to_masters;
  const Job done = transfer::run_send_job(store, a_config, job.job_id);
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  EXPECT_EQ(done.method, Method::aes);
  EXPECT_EQ(sha256_of(data("S2/reads.bam")), sha256_of(received(done, "S2/reads.bam")));
  // OTP would need 40 MiB of key (5120 keys of 8 KiB); AES needs a ring's worth at most.
  EXPECT_LT(sim_->stats().keys_to_masters - before, 5120u / 2);
}

TEST_F(TransferTest, KeyShortageSlowsTheTransferToTheKeyRateAndSaysSo) {
  write_random(data("S10/reads.bam"), 6u << 20, 11);
  transfer::Service b(config("b"));
  b.start();
  sim_->set_key_rate(16e6);  // 2 MB/s of key: far below what the link could carry
  sim_->drain();
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  const Job job =
      transfer::create_send_job(store, a_config, "S10", {data("S10")}, Method::otp, false);
  std::atomic<bool> said_waiting{false};
  std::atomic<bool> state_waiting{false};
  transfer::SendOptions options;
  options.on_progress = [&](const transfer::Progress& p) {
    if (p.waiting_for_key) said_waiting = true;
  };
  std::atomic<bool> done{false};
  std::thread watch([&] {
    transfer::JobStore reader(transfer::database_path(a_config));
    while (!done) {
      if (reader.get(job.job_id)->transfer_state == State::waiting_for_key) state_waiting = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  const Job finished = transfer::run_send_job(store, a_config, job.job_id, options);
  done = true;
  watch.join();
  ASSERT_EQ(finished.transfer_state, State::completed) << finished.error;  // slowed, not failed
  EXPECT_TRUE(said_waiting);
  EXPECT_TRUE(state_waiting);
  EXPECT_EQ(sha256_of(data("S10/reads.bam")), sha256_of(received(finished, "S10/reads.bam")));
}

TEST_F(TransferTest, AKilledSendersJobIsListedAsInterruptedAndResumes) {
  fs::create_directories(data(""));  // site b's data root
  transfer::Service b(config("b"));
  b.start();
  std::optional<Child> sender;
  const std::string id = start_slow_send("S12", 13, sender);
  transfer::JobStore store(transfer::database_path(config("a")));
  // While it runs: listed as running, and a second sender for it is refused.
  transfer::mark_interrupted_send_jobs(store, config("a"));
  const State live_state = store.get(id)->transfer_state;
  EXPECT_TRUE(transfer::active(live_state)) << transfer::to_string(live_state);
  Child second(cli("a", {"start", id}), dir_.path / "second.log");
  EXPECT_EQ(second.wait(), 1);
  EXPECT_NE(slurp(dir_.path / "second.log")
                .find("job " + id + " is already being sent by another otp-transfer process"),
            std::string::npos)
      << slurp(dir_.path / "second.log");
  sender->kill(SIGKILL);
  // The job table no longer shows the dead transfer as running, and says how to resume.
  Child jobs(cli("a", {"jobs"}), dir_.path / "jobs.log");
  EXPECT_EQ(jobs.wait(), 0);
  EXPECT_NE(slurp(dir_.path / "jobs.log").find("interrupted"), std::string::npos)
      << slurp(dir_.path / "jobs.log");
  const auto interrupted = store.get(id);
  EXPECT_EQ(interrupted->transfer_state, State::interrupted);
  EXPECT_NE(interrupted->error.find("otp-transfer start " + id), std::string::npos)
      << interrupted->error;
  sim_->set_key_rate(0);
  Child resumed(cli("a", {"start", id}), dir_.path / "resume.log");
  EXPECT_EQ(resumed.wait(), 0) << slurp(dir_.path / "resume.log");
  const auto done = store.get(id);
  ASSERT_EQ(done->transfer_state, State::completed) << done->error;
  EXPECT_EQ(sha256_of(data("S12/reads.bam")), sha256_of(received(*done, "S12/reads.bam")));
}

TEST_F(TransferTest, AKilledSendersJobCanBeDeletedButARunningOneCannot) {
  fs::create_directories(data(""));  // site b's data root
  transfer::Service b(config("b"));
  b.start();
  std::optional<Child> sender;
  const std::string id = start_slow_send("S11", 12, sender);
  transfer::JobStore store(transfer::database_path(config("a")));
  EXPECT_THROW(transfer::delete_job(store, config("a"), id), std::runtime_error);
  sender->kill(SIGKILL);
  EXPECT_TRUE(transfer::delete_job(store, config("a"), id));
  EXPECT_FALSE(store.get(id));
  EXPECT_TRUE(fs::exists(data("S11/reads.bam")));
}

TEST_F(TransferTest, WatchStreamsAGrowingFileAndFinishesAtTheCompletionMarker) {
  const fs::path run = data("RUN7");
  fs::create_directories(run / "Data");
  transfer::Service b(config("b"));
  b.start();
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  const Job job = transfer::create_send_job(store, a_config, "S7", {run}, Method::otp, true);
  std::atomic<bool> writer_done{false};
  std::thread sequencer([&] {
    std::ofstream out(run / "Data" / "S7_R1.fastq", std::ios::binary);
    std::mt19937 rng(7);
    for (int i = 0; i < 40; ++i) {
      std::string chunk(64 * 1024, 'A');
      for (auto& ch : chunk) ch = "ACGT\n"[rng() % 5];
      out << chunk;
      out.flush();
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    out.close();
    std::ofstream(run / "RTAComplete.txt") << "done\n";
    writer_done = true;
  });
  // While it grows, bytes already reach the receiver (real-time, not a bulk copy).
  bool seen_partial = false;
  std::thread watcher([&] {
    seen_partial = eventually(
        [&] {
          const fs::path part = dir_.path / "incoming-b" / ".partial" / job.job_id / "0.part";
          return !writer_done && fs::exists(part) && fs::file_size(part) > 0;
        },
        std::chrono::seconds(10));
  });
  const Job done = transfer::run_send_job(store, a_config, job.job_id);
  sequencer.join();
  watcher.join();
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  EXPECT_TRUE(seen_partial);
  EXPECT_EQ(done.analysis_state, "complete");
  EXPECT_EQ(sha256_of(run / "Data" / "S7_R1.fastq"),
            sha256_of(received(done, "RUN7/Data/S7_R1.fastq")));
  EXPECT_TRUE(fs::exists(received(done, "RUN7/RTAComplete.txt")));
}

TEST_F(TransferTest, SenderKilledMidFileResumesWithFreshPad) {
  write_random(data("S3/big.bam"), 120u << 20, 5);
  // Throttled key: the first run is still sending when it is killed.
  sim_->set_key_rate(200e6);
  sim_->drain();  // a full store would not be throttled at all
  transfer::Service b(config("b"));
  b.start();
  const fs::path log = dir_.path / "send.log";
  Child sender(cli("a", {"send", "S3", data("S3").string()}), log);
  transfer::JobStore b_store(transfer::database_path(config("b")));
  ASSERT_TRUE(eventually(
      [&] {
        const auto jobs = b_store.list();
        return !jobs.empty() && jobs[0].transferred > (20u << 20);
      },
      std::chrono::seconds(60)));
  sender.kill(SIGKILL);
  const std::string job_id = b_store.list()[0].job_id;
  const fs::path journal = dir_.path / "state-a" / "transfer-journals" / (job_id + ".journal");
  std::uint64_t reserved_after_kill = 0;
  {
    const keys::OffsetJournal first_run(journal);  // the killed sender's lock is gone
    reserved_after_kill = first_run.reserved();
  }
  EXPECT_GT(reserved_after_kill, 0u);
  sim_->set_key_rate(0);
  Child again(cli("a", {"start", job_id}), dir_.path / "start.log");
  EXPECT_EQ(again.wait(), 0) << slurp(dir_.path / "start.log");
  const auto job = b_store.get(job_id);
  ASSERT_TRUE(job);
  EXPECT_EQ(job->transfer_state, State::completed);
  EXPECT_EQ(sha256_of(data("S3/big.bam")), sha256_of(received(*job, "S3/big.bam")));
  // The second run's pad started at the first run's journal: no offset used twice.
  keys::OffsetJournal after(journal);
  EXPECT_GT(after.reserved(), reserved_after_kill);
}

TEST_F(TransferTest, ReceiverKilledMidFileResumesFromItsLastCommit) {
  write_random(data("S4/big.bam"), 120u << 20, 6);
  sim_->set_key_rate(200e6);
  sim_->drain();  // a full store would not be throttled at all
  const fs::path b_config = config_file("b");
  auto serve = std::make_unique<Child>(
      std::vector<std::string>{OTPGATE_TRANSFER_BIN, "-c", b_config.string(), "serve"},
      dir_.path / "serve1.log");
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  const Job job =
      transfer::create_send_job(store, a_config, "S4", {data("S4")}, Method::otp, false);
  std::thread killer([&] {
    transfer::JobStore watch(transfer::database_path(config("b")));
    eventually(
        [&] {
          const auto j = watch.get(job.job_id);
          return j && j->transferred > (20u << 20);
        },
        std::chrono::seconds(60));
    serve->kill(SIGKILL);
    sim_->set_key_rate(0);
    serve = std::make_unique<Child>(
        std::vector<std::string>{OTPGATE_TRANSFER_BIN, "-c", b_config.string(), "serve"},
        dir_.path / "serve2.log");
  });
  const Job done = transfer::run_send_job(store, a_config, job.job_id);  // retries the link
  killer.join();
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  EXPECT_EQ(sha256_of(data("S4/big.bam")), sha256_of(received(done, "S4/big.bam")));
}

// Every run of a job (a new job, a retry after the receiver restarted, a start after an
// abort) is a new otpencrypt stream on a key supply of its own (sender.cpp attempt_once,
// receiver.cpp run): its first announcement is verifiable from its own keys, and nothing
// goes on from pad announced to an earlier receiver, which the new one never heard of
// (the bug call key lanes had: docs/sip.md, "A lane handed on starts afresh"). So each run
// has data flowing at once: back to back on one receiving service, after the receiver was
// killed and restarted, and after an abort on the same receiving process.
TEST_F(TransferTest, EveryRunIsAFreshPadStreamSoJobsAndResumesOnOneReceiverFlowAtOnce) {
  using Seconds = std::chrono::duration<double>;
  const auto since = [](std::chrono::steady_clock::time_point t) {
    return Seconds(std::chrono::steady_clock::now() - t).count();
  };
  for (int i = 1; i <= 3; ++i)
    write_random(data("R" + std::to_string(i) + "/reads.bam"), (i == 3 ? 32u : 16u) << 20, 40 + i);
  const fs::path b_config = config_file("b");
  auto serve = [&](const std::string& log) {
    return std::make_unique<Child>(
        std::vector<std::string>{OTPGATE_TRANSFER_BIN, "-c", b_config.string(), "serve"},
        dir_.path / log);
  };
  auto receiver = serve("serve1.log");
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  auto make = [&](const std::string& specimen) {
    return transfer::create_send_job(store, a_config, specimen, {data(specimen)}, Method::otp,
                                     false)
        .job_id;
  };
  auto expect_verified = [&](const Job& done, const std::string& specimen) {
    ASSERT_EQ(done.transfer_state, State::completed) << done.error;
    EXPECT_EQ(sha256_of(data(specimen + "/reads.bam")),
              sha256_of(received(done, specimen + "/reads.bam")));
  };

  // Job 1 opens the receiving service's first stream.
  const std::string job1 = make("R1");
  expect_verified(transfer::run_send_job(store, a_config, job1), "R1");
  transfer::JobStore b_store(transfer::database_path(config("b")));
  // What the receiver has committed of a job (fdatasync'd, in its database).
  auto committed = [&](const std::string& job_id) {
    const auto j = b_store.get(job_id);
    return j ? j->transferred : std::uint64_t{0};
  };

  // Job 2, straight after, on the same receiving process: bytes committed within 3 s
  // (a run that could not verify its announcements would wait 120 s for the receiver's
  // hello and then retry), the file verified.
  const std::string job2 = make("R2");
  auto started = std::chrono::steady_clock::now();
  double first_commit_2 = -1;
  std::thread watch2([&] {
    if (eventually([&] { return committed(job2) > 0; }, std::chrono::seconds(60)))
      first_commit_2 = since(started);
  });
  expect_verified(transfer::run_send_job(store, a_config, job2), "R2");
  watch2.join();
  EXPECT_GE(first_commit_2, 0);
  EXPECT_LT(first_commit_2, 3.0) << "job 2's first commit came " << first_commit_2 << " s in";
  std::fprintf(stderr, "job 2: first commit after %.2f s, done after %.2f s\n", first_commit_2,
               since(started));

  // Job 3 at the key rate (80 Mbit/s), so that it is mid-file when its receiver is killed.
  sim_->set_key_rate(80e6);
  sim_->drain();
  const std::string job3 = make("R3");
  std::optional<Job> run3;
  std::thread sender3([&] { run3 = transfer::run_send_job(store, a_config, job3); });
  struct Joined {  // a failed assertion returns early: stop the run, never leave it running
    std::thread& t;
    transfer::JobStore& s;
    const std::string& job;
    ~Joined() {
      if (!t.joinable()) return;
      s.request_abort(job);
      t.join();
    }
  } joined{sender3, store, job3};
  ASSERT_TRUE(eventually([&] { return committed(job3) > (4u << 20); }, std::chrono::seconds(30)));
  receiver->kill(SIGKILL);
  const std::uint64_t at_kill = committed(job3);
  receiver = serve("serve2.log");
  sim_->drain();  // what the store made meanwhile: the rest still goes at the key rate
  started = std::chrono::steady_clock::now();
  // The sender retries by itself (after 1 s) on a new stream; the restarted receiver
  // resumes from its last commit and commits new bytes within a few seconds.
  const bool resumed =
      eventually([&] { return committed(job3) > at_kill; }, std::chrono::seconds(60));
  const double resume_3 = since(started);
  ASSERT_TRUE(resumed);
  EXPECT_LT(resume_3, 6.0) << "job 3 committed nothing new for " << resume_3
                           << " s after the receiver restarted";
  // Abort it mid-file and start it again: the same receiving process, a new stream.
  store.request_abort(job3);
  sender3.join();
  ASSERT_TRUE(run3);
  ASSERT_EQ(run3->transfer_state, State::aborted) << run3->error;
  const std::uint64_t at_abort = committed(job3);
  ASSERT_LT(at_abort, 32u << 20) << "job 3 finished before it could be aborted";
  started = std::chrono::steady_clock::now();
  double resume_3b = -1;
  std::thread watch3([&] {
    if (eventually([&] { return committed(job3) > at_abort; }, std::chrono::seconds(60)))
      resume_3b = since(started);
  });
  expect_verified(transfer::run_send_job(store, a_config, job3), "R3");
  watch3.join();
  EXPECT_GE(resume_3b, 0);
  EXPECT_LT(resume_3b, 3.0) << "job 3's start after the abort committed nothing for " << resume_3b
                            << " s";
  std::fprintf(stderr,
               "job 3: new bytes committed %.2f s after the receiver restarted, %.2f s after "
               "the start that followed the abort\n",
               resume_3, resume_3b);
}

TEST_F(TransferTest, ACorruptedByteOnTheWireFailsTheRecordAndTheJobSaysSo) {
  write_random(data("S5/reads.bam"), 8u << 20, 8);
  transfer::Service b(config("b"));
  b.start();
  // A relay between the sites that flips one bit in the middle of the stream.
  const std::uint16_t relay_port = free_port();
  std::thread relay([&] {
    const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
    const int one = 1;
    ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(relay_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(listener, 1);
    const int in = ::accept(listener, nullptr, nullptr);
    const int out = ::socket(AF_INET, SOCK_STREAM, 0);
    a.sin_port = htons(transfer_port_);
    ::connect(out, reinterpret_cast<sockaddr*>(&a), sizeof a);
    std::thread back([&] {
      char buf[65536];
      ssize_t n;
      while ((n = ::recv(out, buf, sizeof buf, 0)) > 0)
        ::send(in, buf, std::size_t(n), MSG_NOSIGNAL);
      ::shutdown(in, SHUT_RDWR);
    });
    char buf[65536];
    std::uint64_t total = 0;
    bool flipped = false;
    ssize_t n;
    while ((n = ::recv(in, buf, sizeof buf, 0)) > 0) {
      if (!flipped && total + std::uint64_t(n) > (4u << 20)) {
        buf[(4u << 20) - total] ^= 0x10;
        flipped = true;
      }
      total += std::uint64_t(n);
      if (::send(out, buf, std::size_t(n), MSG_NOSIGNAL) < 0) break;
    }
    ::shutdown(out, SHUT_RDWR);
    back.join();
    ::close(in);
    ::close(out);
    ::close(listener);
  });
  auto a_config = config("a");
  a_config.peer_transfer = transfer::Endpoint{"127.0.0.1", relay_port};
  a_config.max_attempts = 1;
  transfer::JobStore store(transfer::database_path(a_config));
  const Job job =
      transfer::create_send_job(store, a_config, "S5", {data("S5")}, Method::otp, false);
  const Job done = transfer::run_send_job(store, a_config, job.job_id);
  relay.join();
  EXPECT_EQ(done.transfer_state, State::failed);
  EXPECT_NE(done.error.find("failed authentication"), std::string::npos) << done.error;
  transfer::JobStore b_store(transfer::database_path(config("b")));
  const auto at_b = b_store.get(job.job_id);
  ASSERT_TRUE(at_b);
  EXPECT_EQ(at_b->transfer_state, State::failed);
  EXPECT_NE(at_b->error.find("corrupted or tampered"), std::string::npos) << at_b->error;
  EXPECT_FALSE(fs::exists(received(done, "S5/reads.bam")));  // never renamed into place
}

TEST_F(TransferTest, AbortAndDeleteThroughTheJobApi) {
  write_random(data("S6/reads.bam"), 64u << 20, 9);
  transfer::Service b(config("b"));
  b.start();
  sim_->set_key_rate(80e6);  // 10 MB/s: the job is still running when aborted
  sim_->drain();             // a full store would not be throttled at all
  transfer::Service a(config("a"));
  a.start();
  httplib::Client api("127.0.0.1", a.api_port());
  // State changes need JSON (cross-site requests cannot send it).
  auto refused =
      api.Post("/api/v1/jobs", "specimen_id=S6&folder=S6", "application/x-www-form-urlencoded");
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->status, 415);
  auto outside =
      api.Post("/api/v1/jobs", R"({"specimen_id":"S6","folder":"../../etc"})", "application/json");
  ASSERT_TRUE(outside);
  EXPECT_EQ(outside->status, 400);
  EXPECT_NE(outside->body.find("inside the data root"), std::string::npos);
  auto created =
      api.Post("/api/v1/jobs", R"({"specimen_id":"S6","folder":"S6"})", "application/json");
  ASSERT_TRUE(created);
  ASSERT_EQ(created->status, 201) << created->body;
  const std::string id = nlohmann::json::parse(created->body)["job_id"];
  transfer::JobStore b_store(transfer::database_path(config("b")));
  ASSERT_TRUE(eventually(
      [&] {
        const auto j = b_store.get(id);
        return j && j->transferred > (4u << 20);
      },
      std::chrono::seconds(60)));
  auto aborted = api.Post("/api/v1/jobs/" + id + "/abort", "{}", "application/json");
  ASSERT_TRUE(aborted);
  EXPECT_EQ(aborted->status, 202);
  transfer::JobStore a_store(transfer::database_path(config("a")));
  ASSERT_TRUE(eventually([&] { return a_store.get(id)->transfer_state == State::aborted; }));
  ASSERT_TRUE(eventually([&] { return b_store.get(id)->transfer_state == State::aborted; }));
  // Delete on the receiving side removes the row and what it wrote.
  httplib::Client b_api("127.0.0.1", b.api_port());
  auto deleted = b_api.Delete("/api/v1/jobs/" + id);
  ASSERT_TRUE(deleted);
  EXPECT_EQ(deleted->status, 200) << deleted->body;
  EXPECT_FALSE(b_store.get(id));
  EXPECT_FALSE(fs::exists(dir_.path / "incoming-b" / ".partial" / id));
  auto unknown = b_api.Delete("/api/v1/jobs/J-nope");
  ASSERT_TRUE(unknown);
  EXPECT_EQ(unknown->status, 404);
  // Delete on the sending side removes the row, never the source data.
  auto deleted_a = api.Delete("/api/v1/jobs/" + id);
  ASSERT_TRUE(deleted_a);
  EXPECT_EQ(deleted_a->status, 200);
  EXPECT_TRUE(fs::exists(data("S6/reads.bam")));
}

TEST_F(TransferTest, AFullDiskGivesAClearErrorAndAResumableJob) {
  write_random(data("S8/reads.bam"), 24u << 20, 10);
  const fs::path b_config = config_file("b");
  {
    // A receiver that may write files of at most 8 MiB.
    Child serve({OTPGATE_TRANSFER_BIN, "-c", b_config.string(), "serve"}, dir_.path / "serve.log",
                8u << 20);
    const auto a_config = config("a");
    transfer::JobStore store(transfer::database_path(a_config));
    const Job job =
        transfer::create_send_job(store, a_config, "S8", {data("S8")}, Method::otp, false);
    ASSERT_TRUE(eventually([&] { return fs::exists(dir_.path / "incoming-b"); }));
    const Job failed = transfer::run_send_job(store, a_config, job.job_id);
    EXPECT_EQ(failed.transfer_state, State::failed);
    EXPECT_NE(failed.error.find("file size limit"), std::string::npos) << failed.error;
    EXPECT_NE(failed.error.find("otp-transfer start " + job.job_id), std::string::npos);
    serve.kill(SIGTERM);
  }
  // Space is freed: the same job resumes and completes.
  Child serve({OTPGATE_TRANSFER_BIN, "-c", b_config.string(), "serve"}, dir_.path / "serve2.log");
  transfer::JobStore store(transfer::database_path(config("a")));
  const std::string id = store.list()[0].job_id;
  const Job done = transfer::run_send_job(store, config("a"), id);
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  EXPECT_EQ(sha256_of(data("S8/reads.bam")), sha256_of(received(done, "S8/reads.bam")));
}

TEST_F(TransferTest, WebPageFoldersLoginAndCrossSiteChecksAreEnforcedByTheServer) {
  write_random(data("S12/reads.bam"), 300000, 13);
  fs::create_directories(data("S13"));
  auto a_config = config("a");
  a_config.api_user = "lab";
  a_config.api_password_sha256 = sha256_text("panel");  // as `echo -n panel | sha256sum`
  transfer::Service a(a_config);
  a.start();
  httplib::Client api("127.0.0.1", a.api_port());
  auto anonymous = api.Get("/api/v1/jobs");
  ASSERT_TRUE(anonymous);
  EXPECT_EQ(anonymous->status, 401);
  EXPECT_EQ(api.Get("/")->status, 401);
  api.set_basic_auth("lab", "wrong");
  EXPECT_EQ(api.Get("/api/v1/jobs")->status, 401);
  api.set_basic_auth("lab", "panel");
  auto page = api.Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_NE(page->body.find("検体転送"), std::string::npos);  // Japanese and English labels
  EXPECT_NE(page->body.find("Specimen transfers"), std::string::npos);
  auto folders = api.Get("/api/v1/folders");
  ASSERT_TRUE(folders);
  ASSERT_EQ(folders->status, 200) << folders->body;
  const auto doc = nlohmann::json::parse(folders->body);
  ASSERT_EQ(doc["folders"].size(), 2u);
  EXPECT_EQ(doc["folders"][0]["folder"], "S12");
  EXPECT_EQ(doc["folders"][0]["bytes"], 300000);
  EXPECT_GT(doc["folders"][0]["key_needed_otp"].get<double>(), 300000.0);
  EXPECT_LT(doc["folders"][0]["key_needed_aes"].get<double>(), 1000.0);
  EXPECT_GT(doc["key_available"]["bytes"].get<double>(), 0.0);  // from the KME's status
  // A request from another site's page is refused, whatever it sends.
  httplib::Headers foreign{{"Origin", "http://evil.example"}};
  auto cross = api.Post("/api/v1/jobs", foreign, R"({"specimen_id":"S12","folder":"S12"})",
                        "application/json");
  ASSERT_TRUE(cross);
  EXPECT_EQ(cross->status, 403);
  // DNS rebinding: a page on a name the attacker controls, resolving to this host, sends
  // its own name as Host and Origin. Refused for reads and writes alike.
  const std::string port = std::to_string(a.api_port());
  httplib::Headers rebound{{"Host", "attacker.example:" + port},
                           {"Origin", "http://attacker.example:" + port}};
  auto rebound_post = api.Post("/api/v1/jobs", rebound, R"({"specimen_id":"S12","folder":"S12"})",
                               "application/json");
  ASSERT_TRUE(rebound_post);
  EXPECT_EQ(rebound_post->status, 403) << rebound_post->body;
  EXPECT_NE(rebound_post->body.find("not a name of this service"), std::string::npos);
  auto rebound_get =
      api.Get("/api/v1/jobs", httplib::Headers{{"Host", "attacker.example:" + port}});
  ASSERT_TRUE(rebound_get);
  EXPECT_EQ(rebound_get->status, 403);
  // Invalid UTF-8 and huge values get a short JSON error, never a 500 or an echo of it all.
  auto bad_utf8 =
      api.Post("/api/v1/jobs", std::string("{\"specimen_id\":\"S\xff\xfe\",\"folder\":\"S12\"}"),
               "application/json");
  ASSERT_TRUE(bad_utf8);
  EXPECT_EQ(bad_utf8->status, 400) << bad_utf8->body;
  EXPECT_NO_THROW(nlohmann::json::parse(bad_utf8->body)) << bad_utf8->body;
  const std::string huge(1u << 20, 'X');
  auto huge_id = api.Post("/api/v1/jobs", "{\"specimen_id\":\"" + huge + "\",\"folder\":\"S12\"}",
                          "application/json");
  ASSERT_TRUE(huge_id);
  EXPECT_GE(huge_id->status, 400);
  EXPECT_LT(huge_id->body.size(), 1000u) << "the error echoed the whole value back";
  // An https Origin is not this http service.
  httplib::Headers other_scheme{{"Origin", "https://127.0.0.1:" + port}};
  auto scheme_post = api.Post("/api/v1/jobs", other_scheme,
                              R"({"specimen_id":"S12","folder":"S12"})", "application/json");
  ASSERT_TRUE(scheme_post);
  EXPECT_EQ(scheme_post->status, 403);
  EXPECT_TRUE(store_empty(transfer::database_path(a_config)));
}

TEST_F(TransferTest, AnExposedPageAndApiAreServedOverHttpsWithALogin) {
  fs::create_directories(data("S14"));
  // Listening beyond localhost without TLS and a login is refused by the config.
  try {
    transfer::parse_config(config_text("a") + "", "x");  // baseline is valid
    auto text = config_text("a");
    text.replace(text.find("[api]\nlisten = \"127.0.0.1:0\""), 31, "[api]\nlisten = \"0.0.0.0:0\"");
    transfer::parse_config(text, "exposed.toml");
    ADD_FAILURE() << "an exposed API without TLS and login was accepted";
  } catch (const transfer::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("api.tls_cert/tls_key and api.user/password_sha256"),
              std::string::npos)
        << e.what();
  }
  auto a_config = config("a");
  a_config.api_tls_cert = pki_dir() / "kme.crt";  // a localhost server certificate
  a_config.api_tls_key = pki_dir() / "kme.key";
  a_config.api_user = "lab";
  a_config.api_password_sha256 = sha256_text("panel");
  transfer::Service a(a_config);
  a.start();
  httplib::SSLClient tls("localhost", a.api_port());
  tls.set_ca_cert_path((pki_dir() / "ca.crt").c_str());
  tls.enable_server_certificate_verification(true);
  auto no_login = tls.Get("/api/v1/jobs");
  ASSERT_TRUE(no_login) << httplib::to_string(no_login.error());
  EXPECT_EQ(no_login->status, 401);
  tls.set_basic_auth("lab", "panel");
  auto logged_in = tls.Get("/api/v1/jobs");
  ASSERT_TRUE(logged_in) << httplib::to_string(logged_in.error());
  EXPECT_EQ(logged_in->status, 200);
  auto page = tls.Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  httplib::Client plain("127.0.0.1", a.api_port());
  plain.set_connection_timeout(2);
  auto cleartext = plain.Get("/api/v1/jobs");
  EXPECT_TRUE(!cleartext || cleartext->status != 200);  // no plain HTTP on that port
}

TEST_F(TransferTest, BadInputGetsOneClearLineAndANonZeroExit) {
  fs::create_directories(data(""));
  auto run = [&](std::vector<std::string> args, const std::string& name) {
    Child c(std::move(args), dir_.path / name);
    const int rc = c.wait();
    return std::make_pair(rc, slurp(dir_.path / name));
  };
  auto [rc1, out1] = run(cli("a", {"send", "S9", (dir_.path / "no-such-folder").string()}), "1");
  EXPECT_EQ(rc1, 1);
  EXPECT_NE(out1.find("no-such-folder: no such file or folder"), std::string::npos) << out1;
  auto [rc2, out2] = run(cli("a", {"start", "J20990101-deadbeef"}), "2");
  EXPECT_EQ(rc2, 1);
  EXPECT_NE(out2.find("no job J20990101-deadbeef"), std::string::npos) << out2;
  auto [rc3, out3] = run(cli("a", {"send", "bad/id", data("").string()}), "3");
  EXPECT_EQ(rc3, 1);
  EXPECT_NE(out3.find("specimen ID \"bad/id\" is not valid"), std::string::npos) << out3;
  const fs::path bad = dir_.path / "bad.toml";
  std::ofstream(bad) << config_text("a", "method = \"rot13\"");
  auto [rc4, out4] = run({OTPGATE_TRANSFER_BIN, "-c", bad.string(), "jobs"}, "4");
  EXPECT_EQ(rc4, 2);
  EXPECT_NE(out4.find("transfer.method = \"rot13\": expected \"otp\" or \"aes\""),
            std::string::npos)
      << out4;
  auto [rc5, out5] =
      run({OTPGATE_TRANSFER_BIN, "-c", (dir_.path / "none.toml").string(), "jobs"}, "5");
  EXPECT_EQ(rc5, 2);
  EXPECT_NE(out5.find("cannot be read"), std::string::npos) << out5;
  // --check-config as the docs write it (no command), and its failure with a bad config.
  auto [rc6, out6] = run(cli("a", {"--check-config"}), "6");
  EXPECT_EQ(rc6, 0) << out6;
  EXPECT_NE(out6.find("valid: site hospital-a"), std::string::npos) << out6;
  auto [rc7, out7] = run({OTPGATE_TRANSFER_BIN, "-c", bad.string(), "--check-config"}, "7");
  EXPECT_EQ(rc7, 2);
  EXPECT_NE(out7.find("rot13"), std::string::npos) << out7;
  // A symbolic link inside a specimen folder is refused, naming it (it could reach any
  // file the service can read; it became the job entry S15/../../outside/secret.txt).
  write_random(data("S15/reads.bam"), 1000, 15);
  write_random(dir_.path / "outside" / "secret.txt", 100, 16);
  fs::create_symlink(dir_.path / "outside" / "secret.txt", data("S15/secret.txt"));
  auto [rc10, out10] = run(cli("a", {"send", "S15", data("S15").string()}), "10");
  EXPECT_EQ(rc10, 1);
  EXPECT_NE(out10.find("S15/secret.txt is a symbolic link"), std::string::npos) << out10;
  // A typo in a key is an error with the closest known name, not a silent default.
  const fs::path typo = dir_.path / "typo.toml";
  std::ofstream(typo) << config_text("a", "max_attempt = 3");
  auto [rc9, out9] = run({OTPGATE_TRANSFER_BIN, "-c", typo.string(), "--check-config"}, "9");
  EXPECT_EQ(rc9, 2);
  EXPECT_NE(out9.find("unknown key transfer.max_attempt; did you mean \"max_attempts\"?"),
            std::string::npos)
      << out9;
  // Offline checks, as for the gateway: a key from another pair, and a port in use.
  const fs::path mismatched = dir_.path / "mismatched.toml";
  std::string text = config_text("a");
  text.replace(text.find("sae-a.key"), 9, "sae-b.key");
  std::ofstream(mismatched) << text;
  auto [rc11, out11] =
      run({OTPGATE_TRANSFER_BIN, "-c", mismatched.string(), "--check-config"}, "11");
  EXPECT_EQ(rc11, 2);
  EXPECT_NE(out11.find("kme.tls_key = \"" + (pki_dir() / "sae-b.key").string() +
                       "\": does not match the certificate in kme.tls_cert"),
            std::string::npos)
      << out11;
  transfer::Service running(config("a"));
  running.start();
  const fs::path taken = dir_.path / "taken.toml";
  text = config_text("a");
  text.replace(text.rfind("127.0.0.1:0"), 11, "127.0.0.1:" + std::to_string(running.api_port()));
  std::ofstream(taken) << text;
  auto [rc12, out12] = run({OTPGATE_TRANSFER_BIN, "-c", taken.string(), "--check-config"}, "12");
  EXPECT_EQ(rc12, 2);
  EXPECT_NE(
      out12.find("api.listen 127.0.0.1:" + std::to_string(running.api_port()) + " (TCP): in use"),
      std::string::npos)
      << out12;
  // ... while the CLI's other commands, which run beside the service, do not check ports.
  auto [rc13, out13] = run({OTPGATE_TRANSFER_BIN, "-c", taken.string(), "jobs"}, "13");
  EXPECT_EQ(rc13, 0) << out13;
  auto [rc8, out8] = run(cli("a", {}), "8");
  EXPECT_EQ(rc8, 2);
  EXPECT_NE(out8.find("name a command"), std::string::npos) << out8;
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::setenv("GST_PLUGIN_PATH", OTPGATE_PLUGIN_DIR, 1);
  ::signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}

TEST_F(TransferTest, AFileArrivesThroughAKmeWithEveryQuirkOfAnotherVendor) {
  // The third-party KME pair's ways (see the element test of the same name): unfetched
  // batches replaced by the next enc_keys, keys capped at 1024 bits and 128 per request,
  // HTML error pages, stored_key_count counting the pair's pending keys.
  sim_->stop();
  auto c = simulator_config();
  c.max_key_size = 1024;
  c.max_keys_per_request = 128;
  c.faults.replace_unfetched_batch = true;
  c.faults.cap_instead_of_refuse = true;
  c.faults.error_style = kmesim::ErrorStyle::html;
  c.faults.stored_count_of_pair = true;
  sim_ = std::make_unique<kmesim::KmeSimulator>(c);
  sim_->start();
  write_random(data("S20/reads.bam"), 8u << 20, 20);
  transfer::Service b(config("b"));
  b.start();
  const auto a_config = config("a");
  transfer::JobStore store(transfer::database_path(a_config));
  const Job job =
      transfer::create_send_job(store, a_config, "S20", {data("S20")}, Method::otp, false);
  const Job done = transfer::run_send_job(store, a_config, job.job_id);
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  EXPECT_EQ(sha256_of(data("S20/reads.bam")), sha256_of(received(done, "S20/reads.bam")));
  EXPECT_EQ(sim_->stats().keys_replaced, 0u) << "the sender let the KME replace unfetched keys";
}

TEST_F(TransferTest, AServiceAnswersToTheNamesItIsConfiguredWith) {
  fs::create_directories(data(""));
  auto text = config_text("a");
  text.replace(text.find("[api]\nlisten = \"127.0.0.1:0\""), 28,
               "[api]\nlisten = \"127.0.0.1:0\"\nserver_names = [\"Transfer.Lab.example\"]");
  const auto a_config = transfer::parse_config(text, "named.toml");
  ASSERT_EQ(a_config.api_server_names.size(), 1u);
  transfer::Service a(a_config);
  a.start();
  httplib::Client api("127.0.0.1", a.api_port());
  const std::string port = std::to_string(a.api_port());
  auto named = api.Get("/api/v1/jobs", httplib::Headers{{"Host", "transfer.lab.example:" + port}});
  ASSERT_TRUE(named);
  EXPECT_EQ(named->status, 200) << named->body;
  auto other = api.Get("/api/v1/jobs", httplib::Headers{{"Host", "lab.example:" + port}});
  ASSERT_TRUE(other);
  EXPECT_EQ(other->status, 403);
  auto wrong_port = api.Get("/api/v1/jobs", httplib::Headers{{"Host", "localhost:1"}});
  ASSERT_TRUE(wrong_port);
  EXPECT_EQ(wrong_port->status, 403);
}

TEST_F(TransferTest, FollowedSymlinksMustStayInsideTheDataRoot) {
  // A reference genome kept once under the data root, linked into each specimen folder.
  write_random(data("reference/hg38.fa"), 70000, 21);
  write_random(data("S20/reads.bam"), 50000, 22);
  fs::create_symlink(data("reference/hg38.fa"), data("S20/hg38.fa"));
  write_random(dir_.path / "outside" / "secret.txt", 100, 23);
  const auto a_config = config("a", "follow_symlinks = true");
  ASSERT_TRUE(a_config.follow_symlinks);
  transfer::Service b(config("b"));
  b.start();
  transfer::JobStore store(transfer::database_path(a_config));
  const Job made =
      transfer::create_send_job(store, a_config, "S20", {data("S20")}, Method::otp, false);
  const Job done = transfer::run_send_job(store, a_config, made.job_id);
  ASSERT_EQ(done.transfer_state, State::completed) << done.error;
  // Arrives as a regular file with the target's bytes, under the link's name.
  const fs::path got = received(done, "S20") / "hg38.fa";
  EXPECT_FALSE(fs::is_symlink(got));
  EXPECT_EQ(sha256_of(got), sha256_of(data("reference/hg38.fa")));
  // A link leaving the data root, a dangling one and a link to a folder are refused,
  // each naming the link; and without the switch every link is.
  for (const char* folder : {"S21", "S22", "S23"}) fs::create_directories(data(folder));
  fs::create_symlink(dir_.path / "outside" / "secret.txt", data("S21/secret.txt"));
  fs::create_symlink(data("nowhere"), data("S22/gone.txt"));
  fs::create_symlink(data("reference"), data("S23/reference"));
  for (const auto& [folder, expected] : std::vector<std::pair<std::string, std::string>>{
           {"S21", "S21/secret.txt is a symbolic link to " +
                       fs::canonical(dir_.path / "outside" / "secret.txt").string() + ", outside"},
           {"S22",
            "S22/gone.txt is a symbolic link to " + data("S22/gone.txt").string() + " (dangling)"},
           {"S23", "which is not a regular file: only links to files are followed"}}) {
    try {
      transfer::create_send_job(store, a_config, folder, {data(folder)}, Method::otp, false);
      ADD_FAILURE() << folder << ": accepted";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  }
  try {
    transfer::create_send_job(store, config("a"), "S20", {data("S20")}, Method::otp, false);
    ADD_FAILURE() << "a link was followed without transfer.follow_symlinks";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("S20/hg38.fa is a symbolic link: only regular files"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(TransferTest, IdleAndHalfSentConnectionsDoNotStarveTheJobApi) {
  fs::create_directories(data(""));
  transfer::Service a(config("a"));
  a.start();
  std::vector<int> held;
  for (int i = 0; i < 64; ++i) held.push_back(otpgate::testing::silent_connection(a.api_port()));
  for (int i = 0; i < 64; ++i) {
    held.push_back(otpgate::testing::silent_connection(
        a.api_port(), "POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99"));
  }
  ASSERT_EQ(std::count(held.begin(), held.end(), -1), 0);
  // httplib's defaults (a backlog of 5; 8 threads, each held 5 s by an idle connection)
  // left this unanswered for over 30 s; the 3 s client timeout turns that into a failure.
  httplib::Client api("127.0.0.1", a.api_port());
  api.set_connection_timeout(3, 0);
  api.set_read_timeout(3, 0);
  auto jobs = api.Get("/api/v1/jobs");
  ASSERT_TRUE(jobs) << httplib::to_string(jobs.error());
  EXPECT_EQ(jobs->status, 200);
  // A body over the API's 1 MiB limit is refused, not read.
  auto big = api.Post("/api/v1/jobs", std::string((1u << 20) + 1, ' '), "application/json");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  for (int fd : held) ::close(fd);
}

// The words the database, the job API and the CLI have always used, in enum order.
const std::vector<std::string> kStateWords{"queued", "running",     "waiting-for-key", "completed",
                                           "failed", "interrupted", "aborted"};

TEST(JobStates, EveryStateAndMethodHasOneWordReadBackTheSameWay) {
  const auto& words = kStateWords;
  for (std::size_t i = 0; i < words.size(); ++i) {
    const auto state = static_cast<State>(i);
    EXPECT_EQ(transfer::to_string(state), words[i]);
    EXPECT_EQ(transfer::from_string<State>(words[i]), state) << words[i];
  }
  EXPECT_EQ(transfer::from_string<State>("paused"), std::nullopt);
  EXPECT_EQ(transfer::from_string<State>("Running"), std::nullopt);  // states are exact
  EXPECT_EQ(transfer::from_string<State>("waiting_for_key"), std::nullopt);
  EXPECT_EQ(transfer::to_string(Method::otp), "OTP");
  EXPECT_EQ(transfer::to_string(Method::aes), "AES");
  EXPECT_EQ(transfer::from_string<Method>("OTP"), Method::otp);  // as stored
  EXPECT_EQ(transfer::from_string<Method>("aes"), Method::aes);  // as configs and requests say
  EXPECT_EQ(transfer::from_string<Method>("rot13"), std::nullopt);
  EXPECT_EQ(transfer::from_string<Method>(""), std::nullopt);
}

// The job database keeps the same text (databases made before the enums still open), the
// job API's JSON and `otp-transfer jobs` show the same words, and a word this version does
// not know is a clear error, not a silent default.
TEST_F(TransferTest, JobStatesAndMethodsKeepTheirWordsInTheDatabaseTheApiAndTheCli) {
  fs::create_directories(data(""));
  transfer::Service a(config("a"));
  a.start();  // before the rows: its start marks running receive jobs interrupted
  const fs::path database = transfer::database_path(config("a"));
  transfer::JobStore store(database);
  const auto& words = kStateWords;
  for (std::size_t i = 0; i < words.size(); ++i) {
    Job j;
    j.job_id = "J-" + std::to_string(i);
    j.direction = "receive";  // listings leave receive jobs' states as they are
    j.specimen_id = "S" + std::to_string(i);
    j.folder = "/nowhere";
    j.data_type = "BAM";
    j.created_at = 1000 + std::int64_t(i);
    j.analysis_state = "complete";
    j.transfer_state = static_cast<State>(i);
    j.method = i % 2 ? Method::aes : Method::otp;
    j.peer = "sae-b";
    store.insert(j);
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(database.c_str(), &db), SQLITE_OK);
  auto column = [&](const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    std::string text = "(no row)";
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &s, nullptr) == SQLITE_OK &&
        sqlite3_step(s) == SQLITE_ROW) {
      text = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
    }
    sqlite3_finalize(s);
    return text;
  };
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string id = "J-" + std::to_string(i);
    EXPECT_EQ(column("SELECT transfer_state FROM jobs WHERE job_id='" + id + "'"), words[i]);
    EXPECT_EQ(column("SELECT method FROM jobs WHERE job_id='" + id + "'"), i % 2 ? "AES" : "OTP");
  }
  httplib::Client api("127.0.0.1", a.api_port());
  auto listed = api.Get("/api/v1/jobs");
  ASSERT_TRUE(listed);
  ASSERT_EQ(listed->status, 200) << listed->body;
  std::map<std::string, std::pair<std::string, std::string>> shown;
  const auto listing = nlohmann::json::parse(listed->body);
  for (const auto& j : listing.at("jobs"))
    shown[j.at("job_id").get<std::string>()] = {j.at("transfer_state").get<std::string>(),
                                                j.at("method").get<std::string>()};
  auto one = api.Get("/api/v1/jobs/J-2");
  ASSERT_TRUE(one);
  EXPECT_EQ(nlohmann::json::parse(one->body)["transfer_state"], "waiting-for-key") << one->body;
  Child table(cli("a", {"jobs"}), dir_.path / "jobs.log");
  EXPECT_EQ(table.wait(), 0);
  const std::string printed = slurp(dir_.path / "jobs.log");
  Child as_json(cli("a", {"jobs", "--json"}), dir_.path / "jobs.json");
  EXPECT_EQ(as_json.wait(), 0);
  std::map<std::string, std::string> cli_states;
  for (const auto& j : nlohmann::json::parse(slurp(dir_.path / "jobs.json")))
    cli_states[j.at("job_id").get<std::string>()] = j.at("transfer_state").get<std::string>();
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string id = "J-" + std::to_string(i);
    EXPECT_EQ(shown[id].first, words[i]) << id;
    EXPECT_EQ(shown[id].second, i % 2 ? "AES" : "OTP") << id;
    EXPECT_EQ(cli_states[id], words[i]) << id;
    // The table's row for the job names its state and method.
    const auto row = printed.find(id + " ");
    ASSERT_NE(row, std::string::npos) << printed;
    const std::string line = printed.substr(row, printed.find('\n', row) - row);
    EXPECT_NE(line.find(" " + words[i] + " "), std::string::npos) << line;
    EXPECT_NE(line.find(i % 2 ? " AES" : " OTP"), std::string::npos) << line;
  }

  // A state this version does not know (a newer version's, or a hand edit): a clear error
  // naming the job and the text, from the store, the API and the CLI.
  char* error = nullptr;
  ASSERT_EQ(sqlite3_exec(db, "UPDATE jobs SET transfer_state='paused' WHERE job_id='J-3'", nullptr,
                         nullptr, &error),
            SQLITE_OK)
      << error;
  const std::string expected = "job J-3 has an unknown transfer_state \"paused\"";
  auto read_error = [&](const std::string& id) -> std::string {
    try {
      store.get(id);
      return "(read without an error)";
    } catch (const std::runtime_error& e) {
      return e.what();
    }
  };
  EXPECT_NE(read_error("J-3").find(expected), std::string::npos) << read_error("J-3");
  EXPECT_NE(read_error("J-3").find(database.string()), std::string::npos) << read_error("J-3");
  EXPECT_THROW(store.list(), std::runtime_error);
  auto broken = api.Get("/api/v1/jobs");
  ASSERT_TRUE(broken);
  EXPECT_EQ(broken->status, 500);
  EXPECT_NE(nlohmann::json::parse(broken->body).value("error", "").find(expected),
            std::string::npos)
      << broken->body;
  Child failing(cli("a", {"jobs"}), dir_.path / "failing.log");
  EXPECT_EQ(failing.wait(), 1);
  EXPECT_NE(slurp(dir_.path / "failing.log").find(expected), std::string::npos)
      << slurp(dir_.path / "failing.log");
  ASSERT_EQ(sqlite3_exec(db,
                         "UPDATE jobs SET transfer_state='queued', method='ROT13' "
                         "WHERE job_id='J-3'",
                         nullptr, nullptr, &error),
            SQLITE_OK)
      << error;
  EXPECT_NE(read_error("J-3").find("job J-3 has an unknown method \"ROT13\""), std::string::npos)
      << read_error("J-3");
  sqlite3_close(db);
}

// Config text the config fuzzer (tests/fuzz/fuzz_config.cpp) found tripping Debian 12's
// toml++ 3.3.0: a debug assertion on a table header like "[%site]" (marzer/tomlplusplus
// #301), and __builtin_unreachable on a non-whitespace character where whitespace may
// stand ("[site] 、", "§", #190/#305), and overflows in its formatter when an error quotes
// an array holding -2^63, nan, inf or 1e-10. With the library the daemons link each must
// be a ConfigError: were a stray character read as whitespace, those configs would load.
TEST_F(TransferTest, ConfigTextThatTrippedTheTomlLibraryGivesConfigErrors) {
  fs::create_directories(data(""));
  const std::string valid = config_text("a");
  EXPECT_NO_THROW(transfer::parse_config(valid, "valid.toml"));
  auto with = [&](const std::string& from, const std::string& to) {
    std::string text = valid;
    const auto at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return text.replace(at, from.size(), to);
  };
  const std::vector<std::string> broken{
      with("[site]\n", "[site] \xe3\x80\x81\n"),   // "[site] 、" (U+3001)
      with("[kme]\n", "[kme]\n\xc2\xa7\n"),        // a line of "§" (U+00A7)
      with("[peer]\n", "[peer]\t\xe3\x81\x81\n"),  // "ぁ" (U+3041) after a tab
      with("max_attempts = 20\n", "max_attempts = 20 \xef\xbb\xbc\n"),  // U+FEFC
      with("[site]\n", "[%site]\n"),
      "[[[1]]]\n",
      "[[=\n",
      // An error quoting an array that holds these: the formatter's width estimate
      // overflowed (negating -2^63; log10 of nan, inf or 1e-10 cast to size_t).
      config_text("a", "completion_markers = [-9223372036854775808]"),
      config_text("a", "completion_markers = [nan, inf]"),
      config_text("a", "completion_markers = [1e-10]"),
  };
  for (const auto& text : broken) {
    try {
      transfer::parse_config(text, "stray.toml");
      ADD_FAILURE() << "loaded: " << text.substr(0, 80);
    } catch (const transfer::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("stray.toml:"), std::string::npos) << e.what();
    }
  }
}

// The job API's job-creation body (parse_job_request, fuzzed by fuzz_job_request_short):
// any other shape is a 400 with one line, and a valid one creates the job it describes.
TEST_F(TransferTest, JobRequestsOfAnyOtherShapeGetOneLineAndA400) {
  write_random(data("S30/reads.bam"), 1000, 30);
  transfer::Service a(config("a"));
  a.start();
  httplib::Client api("127.0.0.1", a.api_port());
  const std::vector<std::pair<std::string, std::string>> refused{
      {R"([{"specimen_id":"S30","folder":"S30"}])", "must be a JSON object"},
      {R"({"specimen_id":30,"folder":"S30"})", "bad request body"},
      {R"({"specimen_id":"S30"})", "bad request body"},
      {R"({"specimen_id":"S/30","folder":"S30"})", "specimen ID \"S/30\" is not valid"},
      {R"({"specimen_id":"S30","folder":"S30","method":"rot13"})",
       "method \"rot13\" is not valid: use otp or aes"},
      {R"({"specimen_id":"S30","folder":"S30","watch":"yes"})", "bad request body"},
      {R"({"specimen_id":"S30","folder":"S30","start":1})", "bad request body"},
      {R"({"specimen_id":"S30","folder":"S30/reads.bam/.."})", "inside the data root"},
  };
  for (const auto& [body, says] : refused) {
    auto answer = api.Post("/api/v1/jobs", body, "application/json");
    ASSERT_TRUE(answer) << body;
    EXPECT_EQ(answer->status, 400) << body << " -> " << answer->body;
    const auto error = nlohmann::json::parse(answer->body).value("error", "");
    EXPECT_NE(error.find(says), std::string::npos) << body << " -> " << error;
  }
  EXPECT_TRUE(store_empty(transfer::database_path(config("a"))));
  auto made = api.Post("/api/v1/jobs",
                       R"({"specimen_id":"S30","folder":"S30","method":"AES","start":false})",
                       "application/json");
  ASSERT_TRUE(made);
  ASSERT_EQ(made->status, 201) << made->body;
  const auto job = nlohmann::json::parse(made->body);
  EXPECT_EQ(job["method"], "AES");
  EXPECT_EQ(job["transfer_state"], "queued");  // "start": false
}

// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include <fstream>

#include "otpgate/keyclient.hpp"
#include "test_pki.hpp"

using otpgate::keys::OffsetJournal;
namespace fs = std::filesystem;

class OffsetJournalTest : public ::testing::Test {
 protected:
  otpgate::testing::TestDir test_dir_;
  const fs::path dir_ = test_dir_.path;
};

TEST_F(OffsetJournalTest, StartsAtZeroAndPersistsReservations) {
  {
    OffsetJournal journal(dir_ / "a.journal");
    EXPECT_EQ(journal.reserved(), 0u);
    journal.reserve(1u << 20);
    journal.reserve(5u << 20);
  }
  OffsetJournal reopened(dir_ / "a.journal");
  EXPECT_EQ(reopened.reserved(), 5u << 20);
  EXPECT_FALSE(fs::exists(dir_ / "a.journal.tmp"));
}

TEST_F(OffsetJournalTest, NeverMovesBackwards) {
  {
    OffsetJournal journal(dir_ / "b.journal");
    journal.reserve(100);
    EXPECT_THROW(journal.reserve(99), std::runtime_error);
  }
  EXPECT_EQ(OffsetJournal(dir_ / "b.journal").reserved(), 100u);
}

TEST_F(OffsetJournalTest, CorruptJournalIsRefusedWithItsName) {
  fs::create_directories(dir_);
  std::ofstream(dir_ / "c.journal") << "otpgate-offset-journal 1 reserved 12x\n";
  try {
    OffsetJournal journal(dir_ / "c.journal");
    FAIL() << "a corrupt journal must not be accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find((dir_ / "c.journal").string()), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("corrupt"), std::string::npos);
  }
  std::ofstream(dir_ / "d.journal") << "hello\n";
  EXPECT_THROW(OffsetJournal(dir_ / "d.journal"), std::runtime_error);
}

TEST_F(OffsetJournalTest, OneJournalServesOneStreamAtATime) {
  OffsetJournal first(dir_ / "e.journal");
  try {
    OffsetJournal second(dir_ / "e.journal");
    FAIL() << "two users of one journal would reuse offsets";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("in use"), std::string::npos) << e.what();
  }
}

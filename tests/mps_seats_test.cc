// The tenants' places on MPS (stmux/mps_seats.h): stmuxd's side that keeps
// them, a tenant's that takes one, and the cases where none is counted.
#include "stmux/mps_seats.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "test_support.h"

namespace stmux {
namespace {

using Outcome = MpsSeat::Outcome;

// A pipe directory as a running MPS control daemon leaves it, and the
// places of a daemon in the same folder.
class MpsSeats : public ::testing::Test {
 protected:
  void SetUp() override {
    std::filesystem::create_directories(pipes());
    std::ofstream(pipes() + "/control") << "";
  }
  void TearDown() override {
    for (const MpsSeat& seat : held_)
      if (seat.fd >= 0) ::close(seat.fd);
  }
  std::string pipes() const { return dir_.path() + "/mps-pipe"; }
  std::string seats() const { return mpsSeatsDirectory(dir_.socket()); }
  MpsSeat take(std::string_view pipe_directory = {}) {
    held_.push_back(
        takeMpsSeat(seats(), pipe_directory.empty() ? pipes() : pipe_directory, ::geteuid()));
    return held_.back();
  }
  void release(const MpsSeat& seat) {
    for (MpsSeat& held : held_) {
      if (held.fd == seat.fd) {
        ::close(held.fd);
        held.fd = -1;
      }
    }
  }
  long places() const {
    long n = 0;
    for (const auto& entry : std::filesystem::directory_iterator(seats()))
      n += entry.path().filename().string().starts_with("seat-");
    return n;
  }

  testing::TempDir dir_;
  std::vector<MpsSeat> held_;
};

TEST_F(MpsSeats, EachPlaceIsTakenOnceAndTheOneBeyondFindsNoRoom) {
  ASSERT_TRUE(prepareMpsSeats(seats(), 3, pipes()).ok());
  for (int i = 0; i < 3; ++i) {
    const MpsSeat seat = take();
    EXPECT_EQ(seat.outcome, Outcome::kSeated) << i << ": " << seat.why;
    EXPECT_GE(seat.fd, 0);
  }
  const MpsSeat fourth = take();
  EXPECT_EQ(fourth.outcome, Outcome::kNoRoom);
  EXPECT_EQ(fourth.seats, 3);
  EXPECT_EQ(fourth.fd, -1);
}

// The lock ends with its holder: a place given back is taken again.
TEST_F(MpsSeats, APlaceGivenBackIsFreeAgain) {
  ASSERT_TRUE(prepareMpsSeats(seats(), 1, pipes()).ok());
  const MpsSeat first = take();
  ASSERT_EQ(first.outcome, Outcome::kSeated);
  EXPECT_EQ(take().outcome, Outcome::kNoRoom);
  release(first);
  EXPECT_EQ(take().outcome, Outcome::kSeated);
}

// Held across the process's exec of a child: the place is not the child's
// (close-on-exec), and a process that ends gives its place back.
TEST_F(MpsSeats, APlaceIsHeldByItsProcessAloneAndEndsWithIt) {
  ASSERT_TRUE(prepareMpsSeats(seats(), 1, pipes()).ok());
  const MpsSeat seat = take();
  ASSERT_EQ(seat.outcome, Outcome::kSeated);
  EXPECT_NE(::fcntl(seat.fd, F_GETFD) & FD_CLOEXEC, 0);
  const pid_t child = ::fork();
  if (child == 0) {
    const MpsSeat other = takeMpsSeat(seats(), pipes(), ::geteuid());
    ::_exit(other.outcome == Outcome::kNoRoom ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "another process took the place held";
  release(seat);
  const pid_t holder = ::fork();
  if (holder == 0) {
    const MpsSeat mine = takeMpsSeat(seats(), pipes(), ::geteuid());
    ::_exit(mine.outcome == Outcome::kSeated ? 0 : 1);  // and ends, giving it back
  }
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(take().outcome, Outcome::kSeated);
}

// Without an MPS control daemon there is no MPS to make room on; places of
// another MPS, or none kept, count nothing.
TEST_F(MpsSeats, NothingIsCountedWhereThereIsNoMpsOrNoPlacesForIt) {
  EXPECT_EQ(take().outcome, Outcome::kNotCounted) << "no places kept yet";
  ASSERT_TRUE(prepareMpsSeats(seats(), 1, pipes()).ok());
  const std::string other = dir_.path() + "/other-mps";
  std::filesystem::create_directories(other);
  const MpsSeat no_daemon = take(other);
  EXPECT_EQ(no_daemon.outcome, Outcome::kNotCounted);
  EXPECT_NE(no_daemon.why.find("no MPS control daemon"), std::string::npos) << no_daemon.why;
  std::ofstream(other + "/control") << "";
  const MpsSeat elsewhere = take(other);
  EXPECT_EQ(elsewhere.outcome, Outcome::kNotCounted);
  EXPECT_NE(elsewhere.why.find("another MPS"), std::string::npos) << elsewhere.why;
  // The same directory written with a trailing slash is the same MPS.
  EXPECT_EQ(take(pipes() + "/").outcome, Outcome::kSeated);
}

// Places others could add to or take away are not stmuxd's: counting them
// would let anybody keep every tenant off MPS.
TEST_F(MpsSeats, PlacesOthersCanWriteOrOfAnotherOwnerAreNotCounted) {
  ASSERT_TRUE(prepareMpsSeats(seats(), 1, pipes()).ok());
  ASSERT_EQ(::chmod(seats().c_str(), 0777), 0);
  const MpsSeat writable = take();
  EXPECT_EQ(writable.outcome, Outcome::kNotCounted);
  EXPECT_NE(writable.why.find("not stmuxd's"), std::string::npos) << writable.why;
  // stmuxd puts the mode right again when it starts.
  ASSERT_TRUE(prepareMpsSeats(seats(), 1, pipes()).ok());
  struct stat st {};
  ASSERT_EQ(::stat(seats().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0022, 0u);
  const MpsSeat wrong_owner = takeMpsSeat(seats(), pipes(), ::geteuid() + 1);
  EXPECT_EQ(wrong_owner.outcome, Outcome::kNotCounted);
  EXPECT_EQ(take().outcome, Outcome::kSeated);
}

// A restarted daemon keeps the places there are (a tenant holding one keeps
// it), makes those missing and takes away those beyond its count; at 0 it
// keeps none, and nothing is counted.
TEST_F(MpsSeats, ADaemonStartedAgainKeepsThePlacesHeldAndCountsAnew) {
  ASSERT_TRUE(prepareMpsSeats(seats(), 4, pipes()).ok());
  EXPECT_EQ(places(), 4);
  const MpsSeat held = take();
  ASSERT_EQ(held.outcome, Outcome::kSeated);
  ASSERT_TRUE(prepareMpsSeats(seats(), 2, pipes()).ok());
  EXPECT_EQ(places(), 2);
  EXPECT_EQ(take().outcome, Outcome::kSeated);
  EXPECT_EQ(take().outcome, Outcome::kNoRoom) << "the place held before the restart still counts";
  ASSERT_TRUE(prepareMpsSeats(seats(), 0, pipes()).ok());
  EXPECT_EQ(take().outcome, Outcome::kNoRoom) << "0 places: only stmuxd fits on MPS";
  ASSERT_TRUE(removeMpsSeats(seats()).ok());
  EXPECT_FALSE(std::filesystem::exists(seats()));
  EXPECT_EQ(take().outcome, Outcome::kNotCounted);
  EXPECT_TRUE(removeMpsSeats(seats()).ok()) << "none there is no error";
}

TEST_F(MpsSeats, ADirectoryTheDaemonCannotOwnIsAnErrorThatSaysSo) {
  std::ofstream(seats()) << "not a directory";
  const Status status = prepareMpsSeats(seats(), 1, pipes());
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(seats()), std::string::npos) << status.message();
  std::filesystem::remove(seats());
  std::filesystem::create_directories(dir_.path() + "/elsewhere");
  std::filesystem::create_directory_symlink(dir_.path() + "/elsewhere", seats());
  EXPECT_FALSE(prepareMpsSeats(seats(), 1, pipes()).ok()) << "a symlink is not followed";
}

// stmuxctl's count reads the kernel's locks and takes none: a place counted
// stays free for the tenant starting then.
TEST_F(MpsSeats, ThePlacesTakenAreCountedFromTheKernelsLocksWithoutTakingAny) {
  ASSERT_TRUE(prepareMpsSeats(seats(), 3, pipes()).ok());
  auto count = countMpsSeats(seats());
  ASSERT_TRUE(count.ok()) << count.message();
  EXPECT_EQ(count->kept, 3);
  EXPECT_EQ(count->taken, 0);
  const MpsSeat first = take();
  ASSERT_EQ(take().outcome, Outcome::kSeated);
  count = countMpsSeats(seats());
  ASSERT_TRUE(count.ok()) << count.message();
  EXPECT_EQ(count->taken, 2);
  release(first);
  count = countMpsSeats(seats());
  ASSERT_TRUE(count.ok()) << count.message();
  EXPECT_EQ(count->taken, 1);
  EXPECT_EQ(take().outcome, Outcome::kSeated);
  EXPECT_EQ(take().outcome, Outcome::kSeated) << "counting took no place";
  EXPECT_EQ(countMpsSeats(seats())->taken, 3);
  EXPECT_FALSE(countMpsSeats(dir_.path() + "/none").ok());
}

// /proc/locks as the kernel writes it: only flock locks held count, not
// POSIX, OFD or lease ones, nor a process waiting for a lock ("->").
TEST(MpsSeatLocks, OnlyFlockLocksHeldAreRead) {
  const auto held = detail::heldFlocks(
      "1: POSIX  ADVISORY  WRITE 812 00:1a:100 0 EOF\n"
      "2: FLOCK  ADVISORY  WRITE 9001 00:1a:4242 0 EOF\n"
      "2: -> FLOCK  ADVISORY  WRITE 9002 00:1a:4242 0 EOF\n"
      "3: OFDLCK ADVISORY  READ  -1 fd:01:77 0 EOF\n"
      "4: LEASE  ACTIVE    READ  33 00:1a:55 0 EOF\n"
      "5: FLOCK  ADVISORY  READ  -1 103:1f:18446744073709551 0 EOF\n"
      "garbage\n"
      "6: FLOCK  ADVISORY  WRITE 17 00:1a:9");
  ASSERT_EQ(held.size(), 3u);
  EXPECT_EQ(held[0], std::make_pair(makedev(0, 0x1a), ino_t{4242}));
  EXPECT_EQ(held[1], std::make_pair(makedev(0x103, 0x1f), ino_t{18446744073709551ull}));
  EXPECT_EQ(held[2], std::make_pair(makedev(0, 0x1a), ino_t{9}));
}

}  // namespace
}  // namespace stmux

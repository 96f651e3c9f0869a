// DeadlineWatch (parallel/deadline_watch.h), the deadline rules of the NCCL
// watchdog, on a fake clock: no GPU, no thread, no sleep.
#include "parallel/deadline_watch.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace loom {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// A clock that moves only when the test says so.
struct FakeClock {
  DeadlineWatch::TimePoint now{};
  void advance(milliseconds by) { now += by; }
  DeadlineWatch::Clock clock() {
    return [this] { return now; };
  }
};

// An operation the test finishes (or fails) by hand.
struct FakeOp {
  bool done = false;
  std::string error;
};

const std::string kAllReduce = "rank 3 (group 'tp' rank 1 of 2, world ranks [2 3]): all_reduce #7 of float32 [8]";
const std::string kWaitingForTp = "waiting for world ranks [2] (the other members of group 'tp')";

DeadlineWatch::Op op_of(const std::shared_ptr<FakeOp>& state, std::string what, milliseconds timeout,
                        std::string waiting_for = kWaitingForTp) {
  return {.what = std::move(what),
          .waiting_for = std::move(waiting_for),
          .timeout = timeout,
          .done = [state] { return state->done; },
          .error = [state] { return state->error; }};
}

bool contains(const std::string& text, const std::string& fragment) { return text.find(fragment) != std::string::npos; }

TEST(DeadlineWatch, AnOpThatCompletesBeforeItsDeadlineIsDroppedAndNeverReported) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto state = std::make_shared<FakeOp>();
  const uint64_t id = watch.add(op_of(state, kAllReduce, seconds(10)));
  fake.advance(seconds(9));
  EXPECT_FALSE(watch.poll().has_value());
  EXPECT_TRUE(watch.watching(id));
  EXPECT_FALSE(watch.failed());
  state->done = true;
  fake.advance(seconds(5));  // past the deadline, but done first
  EXPECT_FALSE(watch.poll().has_value());
  EXPECT_FALSE(watch.watching(id));
  EXPECT_EQ(watch.size(), 0u);
  // Dropped: the watch no longer holds the op's callbacks (nor what they hold).
  EXPECT_EQ(state.use_count(), 1);
}

TEST(DeadlineWatch, AnOpPastItsDeadlineIsReportedNamingTheOpItsGroupAndWhatItWaitedFor) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto state = std::make_shared<FakeOp>();
  const uint64_t id = watch.add(op_of(state, kAllReduce, seconds(2)));
  fake.advance(milliseconds(1999));
  EXPECT_FALSE(watch.poll().has_value());
  fake.advance(milliseconds(1));
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->kind, DeadlineWatch::Failure::Kind::kExpired);
  EXPECT_EQ(failure->id, id);
  EXPECT_TRUE(contains(failure->message, kAllReduce + " did not complete within 2 s; " + kWaitingForTp))
      << failure->message;
  EXPECT_TRUE(contains(failure->message, "group 'tp'")) << failure->message;
}

TEST(DeadlineWatch, AJoinThatNeverCompletesNamesTheRanksThatNeverJoined) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto state = std::make_shared<FakeOp>();
  const std::string init = "rank 0 (group 'dp' rank 0 of 4, world ranks [0 2 4 6]): NCCL communicator on cuda:0 #1";
  watch.add(op_of(state, init, seconds(30), peers_never_joined("dp", {0, 2, 4, 6}, 0, "ncclCommInitRankConfig")));
  fake.advance(seconds(29));
  EXPECT_FALSE(watch.poll().has_value());
  fake.advance(seconds(1));
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_TRUE(contains(failure->message, init + " did not complete within 30 s")) << failure->message;
  EXPECT_TRUE(contains(failure->message, "world ranks [2 4 6] (the other members of group 'dp') never all joined"))
      << failure->message;
  EXPECT_TRUE(contains(failure->message, "ncclCommInitRankConfig")) << failure->message;
  EXPECT_TRUE(contains(failure->message, "NCCL_SOCKET_IFNAME")) << failure->message;
}

TEST(DeadlineWatch, PeersNeverJoinedLeavesOutThisRankWhereverItIs) {
  EXPECT_TRUE(
      contains(peers_never_joined("tp", {4, 5, 6}, 1, "x"), "world ranks [4 6] (the other members of group 'tp')"));
  EXPECT_TRUE(contains(peers_never_joined("pp", {1, 9}, 1, "x"), "world ranks [1] (the other members of group 'pp')"));
}

TEST(DeadlineWatch, AnAsyncErrorIsReportedAtOnceBeforeTheDeadline) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto state = std::make_shared<FakeOp>();
  const uint64_t id = watch.add(op_of(state, kAllReduce, seconds(600)));
  fake.advance(seconds(1));
  EXPECT_FALSE(watch.poll().has_value());
  state->error = "ncclCommGetAsyncError: remote process exited or there was a network error";
  fake.advance(seconds(1));
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->kind, DeadlineWatch::Failure::Kind::kError);
  EXPECT_EQ(failure->id, id);
  EXPECT_EQ(failure->at, fake.now);
  EXPECT_TRUE(contains(failure->message, kAllReduce + ": ncclCommGetAsyncError: remote process exited"))
      << failure->message;
}

TEST(DeadlineWatch, WhenSeveralFailTheOneWhoseDeadlinePassedFirstIsReported) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto early = std::make_shared<FakeOp>(), late = std::make_shared<FakeOp>(), broken = std::make_shared<FakeOp>();
  // Added first but with the longer timeout: its deadline is the later one.
  watch.add(op_of(late, "send #1", seconds(10)));
  fake.advance(seconds(1));
  const uint64_t early_id = watch.add(op_of(early, "all_reduce #2", seconds(3)));  // deadline 4 s
  watch.add(op_of(broken, "all_gather #3", seconds(60)));
  fake.advance(seconds(19));  // nobody polled for a while: both deadlines passed
  broken->error = "unhandled system error";
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->id, early_id);
  EXPECT_TRUE(contains(failure->message, "all_reduce #2 did not complete within 3 s")) << failure->message;
  EXPECT_EQ(failure->at, DeadlineWatch::TimePoint{} + seconds(4));
}

TEST(DeadlineWatch, AtTheSameDeadlineTheOlderOpIsReported) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto a = std::make_shared<FakeOp>(), b = std::make_shared<FakeOp>();
  const uint64_t first = watch.add(op_of(a, "recv #1", seconds(5)));
  watch.add(op_of(b, "recv #2", seconds(5)));
  fake.advance(seconds(5));
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->id, first);
}

TEST(DeadlineWatch, TheFirstFailureSticksAndLaterPollsCallNoCallback) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  int polled = 0;
  watch.add({.what = "barrier #1", .waiting_for = "everyone", .timeout = seconds(1), .done = [&polled] {
               ++polled;
               return false;
             },
             .error = {}});
  fake.advance(seconds(2));
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(polled, 1);
  auto other = std::make_shared<FakeOp>();
  other->error = "a second error";
  watch.add(op_of(other, "all_reduce #2", seconds(1)));
  const auto again = watch.poll();
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->message, failure->message);
  EXPECT_EQ(polled, 1);
  EXPECT_EQ(watch.failure()->message, failure->message);
  EXPECT_TRUE(watch.failed());
}

TEST(DeadlineWatch, RestartMovesTheDeadlineToNowPlusTheNewTimeout) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  auto state = std::make_shared<FakeOp>();
  const uint64_t id = watch.add(op_of(state, kAllReduce, seconds(10)));
  fake.advance(seconds(8));
  ASSERT_TRUE(watch.restart(id, seconds(20)));  // deadline 28 s
  fake.advance(seconds(19));
  EXPECT_FALSE(watch.poll().has_value());
  fake.advance(seconds(1));
  const auto failure = watch.poll();
  ASSERT_TRUE(failure.has_value());
  EXPECT_TRUE(contains(failure->message, "did not complete within 20 s")) << failure->message;
  EXPECT_FALSE(watch.restart(12345, seconds(1)));
}

TEST(DeadlineWatch, AnOpWithoutAnErrorCallbackIsJudgedByItsDeadlineAlone) {
  FakeClock fake;
  DeadlineWatch watch(fake.clock());
  watch.add({.what = "ncclCommFinalize",
             .waiting_for = "peers",
             .timeout = seconds(1),
             .done = [] { return false; },
             .error = {}});
  EXPECT_FALSE(watch.poll().has_value());
  fake.advance(seconds(1));
  EXPECT_TRUE(watch.poll().has_value());
}

TEST(DeadlineWatch, SecondsTextPrintsWholeAndFractionalSeconds) {
  EXPECT_EQ(seconds_text(seconds(2)), "2 s");
  EXPECT_EQ(seconds_text(milliseconds(500)), "0.5 s");
  EXPECT_EQ(seconds_text(std::chrono::minutes(10)), "600 s");
}

}  // namespace
}  // namespace loom

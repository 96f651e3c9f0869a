// The pipeline schedules (parallel/pipeline_schedule.h) without a model:
// each is run by the simulator, which executes every rank's actions in order
// with non-blocking sends and waiting receives, and fails on a deadlock or on
// a message received out of its channel's order.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include "parallel/pipeline_schedule.h"
#include "util/error.h"

namespace loom {
namespace {

struct Shape {
  const char* kind;
  int64_t p, m, v;
};

std::string name_of(const Shape& s) {
  return std::string(s.kind) + " p" + std::to_string(s.p) + " m" + std::to_string(s.m) + " v" + std::to_string(s.v);
}

class PipeSchedules : public ::testing::TestWithParam<Shape> {};

TEST_P(PipeSchedules, EveryStageRunsEveryMicroBatchForwardThenBackwardWithoutDeadlock) {
  const Shape& shape = GetParam();
  const PipeSchedule schedule = make_pipe_schedule(shape.kind, shape.p, shape.m, shape.v);
  ASSERT_EQ(static_cast<int64_t>(schedule.ranks.size()), shape.p);
  for (int64_t r = 0; r < shape.p; ++r) {
    std::set<std::pair<int64_t, int64_t>> forwarded, backwarded;
    for (const PipeAction& a : schedule.ranks[r]) {
      const auto key = std::make_pair(a.micro_batch, a.chunk);
      if (a.op == PipeOp::kForward) {
        EXPECT_TRUE(forwarded.insert(key).second) << name_of(shape) << " rank " << r << ": forward twice";
      }
      if (a.op == PipeOp::kBackward) {
        EXPECT_TRUE(forwarded.count(key)) << name_of(shape) << " rank " << r << ": backward of "
                                          << to_string(a, shape.v) << " before its forward";
        EXPECT_TRUE(backwarded.insert(key).second) << name_of(shape) << " rank " << r << ": backward twice";
      }
    }
    EXPECT_EQ(static_cast<int64_t>(forwarded.size()), shape.m * shape.v) << name_of(shape) << " rank " << r;
    EXPECT_EQ(static_cast<int64_t>(backwarded.size()), shape.m * shape.v) << name_of(shape) << " rank " << r;
  }
  // Sends match receives in order, and nothing waits forever.
  const PipeSimulation sim = simulate_pipe_schedule(schedule, 1.0 / shape.v, 2.0 / shape.v);
  ASSERT_FALSE(sim.deadlocked) << name_of(shape) << ": " << sim.problem;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PipeSchedules,
    ::testing::Values(Shape{"afab", 1, 3, 1}, Shape{"afab", 2, 4, 1}, Shape{"afab", 4, 8, 1}, Shape{"afab", 4, 2, 1},
                      Shape{"1f1b", 2, 4, 1}, Shape{"1f1b", 4, 8, 1}, Shape{"1f1b", 4, 2, 1}, Shape{"1f1b", 3, 7, 1},
                      Shape{"interleaved", 2, 4, 2}, Shape{"interleaved", 4, 8, 2}, Shape{"interleaved", 4, 4, 3},
                      Shape{"interleaved", 3, 9, 4}),
    [](const ::testing::TestParamInfo<Shape>& info) {
      std::string n = name_of(info.param);
      for (char& c : n) c = c == ' ' ? '_' : c;
      return n;
    });

// With every stage as fast, a pipeline of p stages and m micro-batches idles
// (p-1)/(m+p-1) of the time on every stage, whatever the forward/backward
// ratio; the interleaved schedule cuts it v-fold: (p-1)/(v m + p-1).
TEST(PipeSchedules, BubbleIsTheFormulasForAfabAnd1f1bAndVFoldSmallerInterleaved) {
  for (const char* kind : {"afab", "1f1b"}) {
    const PipeSimulation sim = simulate_pipe_schedule(make_pipe_schedule(kind, 4, 8, 1), 1.0, 2.0);
    ASSERT_FALSE(sim.deadlocked) << sim.problem;
    for (double idle : sim.idle_fraction) EXPECT_NEAR(idle, 3.0 / 11.0, 1e-12) << kind;
  }
  const PipeSimulation inter = simulate_pipe_schedule(make_pipe_schedule("interleaved", 4, 8, 2), 0.5, 1.0);
  ASSERT_FALSE(inter.deadlocked) << inter.problem;
  for (double idle : inter.idle_fraction) EXPECT_NEAR(idle, 3.0 / 19.0, 1e-12);
}

// Activation memory: AFAB keeps every micro-batch's activations until the
// backwards start; 1F1B at most p - r on rank r, so at most p.
TEST(PipeSchedules, LiveActivationsAreMForAfabAndAtMostPFor1f1b) {
  const int64_t p = 4, m = 8;
  const PipeSimulation afab = simulate_pipe_schedule(make_pipe_schedule("afab", p, m, 1));
  const PipeSimulation one = simulate_pipe_schedule(make_pipe_schedule("1f1b", p, m, 1));
  for (int64_t r = 0; r < p; ++r) {
    EXPECT_EQ(afab.peak_live[r], m) << "rank " << r;
    EXPECT_EQ(one.peak_live[r], p - r) << "rank " << r;
  }
}

// Between two ranks, activations and gradients share one channel: the
// receiver takes them in the order they were sent, whatever their kind
// (Note [pipeline messages without tags]). Every schedule over a sweep of
// shapes keeps that order and finishes.
TEST(PipeSchedules, EverySchedulesMessagesArriveInOneOrderPerPairOfRanks) {
  int64_t checked = 0;
  for (int64_t p = 1; p <= 8; ++p) {
    for (int64_t m = 1; m <= 20; ++m) {
      for (const char* kind : {"afab", "1f1b"}) {
        const PipeSimulation sim = simulate_pipe_schedule(make_pipe_schedule(kind, p, m, 1));
        EXPECT_FALSE(sim.deadlocked) << kind << " p" << p << " m" << m << ": " << sim.problem;
        ++checked;
      }
      for (int64_t v = 2; v <= 5 && m % p == 0; ++v) {
        const PipeSimulation sim = simulate_pipe_schedule(make_pipe_schedule("interleaved", p, m, v));
        EXPECT_FALSE(sim.deadlocked) << "interleaved p" << p << " m" << m << " v" << v << ": " << sim.problem;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 528);
}

// A send put off past the next backward is fine for data, and MPI tags
// would still match it, but it overtakes a gradient on the channel: the
// simulator reports the receive that would take the wrong message.
TEST(PipeSchedules, AnActivationSentAfterAGradientItPrecededIsReported) {
  PipeSchedule schedule = make_pipe_schedule("interleaved", 2, 4, 2);
  ASSERT_FALSE(simulate_pipe_schedule(schedule).deadlocked);
  std::vector<PipeAction>& rank0 = schedule.ranks[0];
  const auto send = std::find(rank0.begin(), rank0.end(), PipeAction{PipeOp::kSendForward, 2, 0});
  const auto gradient = std::find(rank0.begin(), rank0.end(), PipeAction{PipeOp::kSendBackward, 0, 1});
  ASSERT_TRUE(send < gradient) << "the schedule's order changed; pick another pair of sends";
  std::rotate(send, send + 1, gradient + 1);  // sf2.0 now right after sb0.1
  const PipeSimulation sim = simulate_pipe_schedule(schedule);
  ASSERT_TRUE(sim.deadlocked);
  EXPECT_EQ(sim.problem,
            "rank 1 expects rf2.0 from rank 0 but the next message on that channel is the gradient of micro-batch 0 "
            "for model stage 1");
}

TEST(PipeSchedules, AScheduleThatCannotRunIsRefusedSayingWhatWould) {
  auto refused = [](const char* kind, int64_t p, int64_t m, int64_t v, const std::string& expected) {
    try {
      make_pipe_schedule(kind, p, m, v);
      ADD_FAILURE() << kind << " p" << p << " m" << m << " v" << v << ": no BadInput";
    } catch (const BadInput& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  refused("interleaved", 4, 6, 2, "multiple of pp, e.g. 8");
  refused("interleaved", 4, 8, 1, "virtual_stages >= 2");
  refused("1f1b", 4, 8, 2, "only interleaved");
  refused("gpipe", 4, 8, 1, "expected afab, 1f1b or interleaved");
  refused("1f1b", 0, 8, 1, "at least 1");
}

TEST(PipeSchedules, TheTimelineShowsEveryRanksActionsAndItsIdleTime) {
  const std::string drawn = draw_pipe_schedule(make_pipe_schedule("1f1b", 2, 3, 1));
  // F = 1 column, B = 2. Rank 1 starts after rank 0's first forward; rank
  // 0 waits for B0's gradient from rank 1 after its one warm-up forward.
  EXPECT_NE(drawn.find("pp0 | F0 F1 .. .. B0 B0 F2 B1 B1 .. B2 B2 | idle 25.0%"), std::string::npos) << drawn;
  EXPECT_NE(drawn.find("pp1 | .. F0 B0 B0 F1 B1 B1 F2 B2 B2 .. .. | idle 25.0%"), std::string::npos) << drawn;
  EXPECT_NE(drawn.find("bubble (p-1)/(m+p-1) = 25.0%"), std::string::npos) << drawn;
}

}  // namespace
}  // namespace loom

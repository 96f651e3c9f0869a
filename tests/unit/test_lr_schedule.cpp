// The learning-rate schedule: warmup, then each decay shape down to the floor
// (docs/configuration.md, `schedule`). The same formulas, written
// independently in Python, are checked against torch in
// tests/interop/test_optimizer_vs_torch.py.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <string>

#include "optim/lr_schedule.h"
#include "util/error.h"

namespace loom {
namespace {

constexpr double kLr = 1e-3;
constexpr double kFloor = 1e-4;  // kLr * min_lr_ratio

OptimizerConfig optimizer_config() {
  OptimizerConfig o;
  o.lr = kLr;
  return o;
}

ScheduleConfig schedule(const std::string& decay, int64_t warmup, int64_t train_steps) {
  ScheduleConfig s;
  s.decay = decay;
  s.warmup_steps = warmup;
  s.train_steps = train_steps;
  s.min_lr_ratio = 0.1;
  return s;
}

double lr_at(const ScheduleConfig& s, int64_t step) { return learning_rate(optimizer_config(), s, step); }

TEST(LrSchedule, WarmupStartsAtOneWarmupStepOfThePeakAndReachesItOnTheLastWarmupStep) {
  for (const std::string decay : {"cosine", "linear", "wsd", "constant"}) {
    auto s = schedule(decay, 10, 100);
    EXPECT_DOUBLE_EQ(lr_at(s, 0), kLr / 10) << decay;
    EXPECT_DOUBLE_EQ(lr_at(s, 4), kLr * 5 / 10) << decay;
    EXPECT_DOUBLE_EQ(lr_at(s, 9), kLr) << decay;
    EXPECT_DOUBLE_EQ(lr_at(s, 10), kLr) << decay;  // first decay step: progress 0
    for (int64_t step = 1; step < 10; ++step) EXPECT_GT(lr_at(s, step), lr_at(s, step - 1)) << decay;
  }
}

TEST(LrSchedule, WithoutWarmupTheFirstStepUsesThePeak) {
  for (const std::string decay : {"cosine", "linear", "wsd", "constant"}) {
    EXPECT_DOUBLE_EQ(lr_at(schedule(decay, 0, 100), 0), kLr) << decay;
  }
}

TEST(LrSchedule, CosineFallsFromPeakToFloorThroughTheMidpoint) {
  auto s = schedule("cosine", 10, 110);
  EXPECT_DOUBLE_EQ(lr_at(s, 10), kLr);
  EXPECT_DOUBLE_EQ(lr_at(s, 60), (kLr + kFloor) / 2);
  EXPECT_DOUBLE_EQ(lr_at(s, 35), kFloor + 0.5 * (kLr - kFloor) * (1 + std::cos(std::numbers::pi * 0.25)));
  EXPECT_DOUBLE_EQ(lr_at(s, 110), kFloor);
  for (int64_t step = 11; step <= 110; ++step) EXPECT_LT(lr_at(s, step), lr_at(s, step - 1)) << step;
}

TEST(LrSchedule, LinearFallsInEqualStepsFromPeakToFloor) {
  auto s = schedule("linear", 10, 110);
  EXPECT_DOUBLE_EQ(lr_at(s, 10), kLr);
  EXPECT_DOUBLE_EQ(lr_at(s, 35), kFloor + 0.75 * (kLr - kFloor));
  EXPECT_DOUBLE_EQ(lr_at(s, 60), (kLr + kFloor) / 2);
  EXPECT_DOUBLE_EQ(lr_at(s, 110), kFloor);
  for (int64_t step = 11; step <= 110; ++step) {
    EXPECT_NEAR(lr_at(s, step - 1) - lr_at(s, step), (kLr - kFloor) / 100, 1e-15) << step;
  }
}

TEST(LrSchedule, WsdHoldsThePeakThenDecaysLinearlyOverTheLastFifthOfTraining) {
  auto s = schedule("wsd", 10, 100);
  for (int64_t step = 9; step <= 80; ++step) EXPECT_DOUBLE_EQ(lr_at(s, step), kLr) << step;
  EXPECT_DOUBLE_EQ(lr_at(s, 90), (kLr + kFloor) / 2);
  EXPECT_DOUBLE_EQ(lr_at(s, 95), kFloor + 0.25 * (kLr - kFloor));
  EXPECT_DOUBLE_EQ(lr_at(s, 100), kFloor);
  for (int64_t step = 81; step <= 100; ++step) EXPECT_LT(lr_at(s, step), lr_at(s, step - 1)) << step;
}

TEST(LrSchedule, WsdDecayRoundsUpToWholeSteps) {
  // 20% of 7 steps is 1.4: the decay starts at step (4 * 7) / 5 = 5.
  auto s = schedule("wsd", 0, 7);
  EXPECT_DOUBLE_EQ(lr_at(s, 5), kLr);
  EXPECT_DOUBLE_EQ(lr_at(s, 6), (kLr + kFloor) / 2);
  EXPECT_DOUBLE_EQ(lr_at(s, 7), kFloor);
}

TEST(LrSchedule, WsdDecayStartsAfterWarmupWhenWarmupIsLong) {
  auto s = schedule("wsd", 90, 100);
  EXPECT_DOUBLE_EQ(lr_at(s, 89), kLr);
  EXPECT_DOUBLE_EQ(lr_at(s, 90), kLr);
  EXPECT_DOUBLE_EQ(lr_at(s, 95), (kLr + kFloor) / 2);
  EXPECT_DOUBLE_EQ(lr_at(s, 100), kFloor);
}

TEST(LrSchedule, ConstantKeepsThePeakAndIgnoresTheFloor) {
  auto s = schedule("constant", 10, 100);
  for (int64_t step : {10, 50, 99, 100, 1000}) EXPECT_DOUBLE_EQ(lr_at(s, step), kLr) << step;
}

TEST(LrSchedule, StepsPastTheEndStayAtTheFloor) {
  for (const std::string decay : {"cosine", "linear", "wsd"}) {
    auto s = schedule(decay, 10, 100);
    for (int64_t step : {100, 101, 150, 1000000}) EXPECT_DOUBLE_EQ(lr_at(s, step), kFloor) << decay << " " << step;
  }
}

TEST(LrSchedule, WarmupOverAllTrainStepsEndsAtTheFloor) {
  auto s = schedule("cosine", 10, 10);
  EXPECT_DOUBLE_EQ(lr_at(s, 9), kLr);
  EXPECT_DOUBLE_EQ(lr_at(s, 10), kFloor);
}

TEST(LrSchedule, ZeroMinLrRatioDecaysToZero) {
  auto s = schedule("cosine", 0, 100);
  s.min_lr_ratio = 0.0;
  EXPECT_DOUBLE_EQ(lr_at(s, 100), 0.0);
  EXPECT_DOUBLE_EQ(lr_at(s, 50), kLr / 2);
}

TEST(LrSchedule, RefusesAScheduleWithoutTrainStepsNamingTheKey) {
  try {
    lr_at(schedule("cosine", 0, 0), 0);
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("schedule.train_steps"), std::string::npos) << e.what();
  }
}

TEST(LrSchedule, RefusesAnUnknownDecayNamingTheKey) {
  try {
    lr_at(schedule("exponential", 0, 10), 3);
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("schedule.decay"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("exponential"), std::string::npos) << e.what();
  }
}

TEST(LrSchedule, RefusesANegativeStep) {
  EXPECT_THROW(lr_at(schedule("cosine", 0, 10), -1), std::invalid_argument);
}

}  // namespace
}  // namespace loom

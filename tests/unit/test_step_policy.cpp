// The step policy (trainer/step_policy.h) decided from a step's facts alone:
// no model, no data, no ranks.
#include <cmath>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include "trainer/step_policy.h"

namespace loom {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
using Spike = LossSpikeGuard::Action;

StepFacts facts(double loss, double norm, Spike spike = Spike::kTrain, bool rolled_back = false,
                int64_t skipped_steps = 0) {
  return StepFacts{/*step=*/7, loss, norm, rolled_back, spike, skipped_steps};
}

OptimizerConfig policy(const std::string& nonfinite, int64_t max_skipped_steps = 10) {
  OptimizerConfig optimizer;
  optimizer.nonfinite_policy = nonfinite;
  optimizer.max_skipped_steps = max_skipped_steps;
  return optimizer;
}

TEST(StepPolicy, AFiniteStepWithoutASpikeIsAnUpdate) {
  for (const std::string nonfinite : {"stop", "skip"}) {
    const StepVerdict verdict = decide_step(facts(2.5, 1.0), policy(nonfinite));
    EXPECT_EQ(verdict.action, StepAction::kUpdate);
    EXPECT_FALSE(verdict.loss_spike);
    EXPECT_TRUE(verdict.why.empty());
  }
}

TEST(StepPolicy, ANonFiniteLossOrNormStopsUnderTheStopPolicy) {
  for (const StepFacts& f : {facts(kNaN, 1.0), facts(2.0, kNaN), facts(kInf, 1.0), facts(2.0, -kInf)}) {
    EXPECT_FALSE(step_is_finite(f));
    const StepVerdict verdict = decide_step(f, policy("stop"));
    EXPECT_EQ(verdict.action, StepAction::kStop);
    EXPECT_FALSE(verdict.loss_spike);
    EXPECT_EQ(verdict.why, " (optimizer.nonfinite_policy stop)");
  }
}

TEST(StepPolicy, ANonFiniteStepIsSkippedUntilMaxSkippedStepsIsUsedUp) {
  EXPECT_EQ(decide_step(facts(kNaN, kNaN, Spike::kTrain, false, 0), policy("skip", 2)).action, StepAction::kSkip);
  EXPECT_EQ(decide_step(facts(kNaN, kNaN, Spike::kTrain, false, 1), policy("skip", 2)).action, StepAction::kSkip);
  const StepVerdict third = decide_step(facts(kNaN, kNaN, Spike::kTrain, false, 2), policy("skip", 2));
  EXPECT_EQ(third.action, StepAction::kStop);
  EXPECT_EQ(third.why, " (optimizer.nonfinite_policy: 2 steps already skipped, optimizer.max_skipped_steps 2)");
  EXPECT_EQ(decide_step(facts(kNaN, 1.0), policy("skip", 0)).action, StepAction::kStop);
}

TEST(StepPolicy, ASpikeTheGuardSkipsIsSkippedWhateverTheNonFinitePolicy) {
  const StepVerdict verdict = decide_step(facts(40.0, 1.0, Spike::kSkip), policy("stop"));
  EXPECT_EQ(verdict.action, StepAction::kSkip);
  EXPECT_TRUE(verdict.loss_spike);
  const StepVerdict over = decide_step(facts(40.0, 1.0, Spike::kSkip, false, 3), policy("stop", 3));
  EXPECT_EQ(over.action, StepAction::kStop);
  EXPECT_EQ(over.why, " (optimizer.loss_spike_policy: 3 steps already skipped, optimizer.max_skipped_steps 3)");
}

TEST(StepPolicy, ASpikeUnderTheRollbackPolicyRollsBack) {
  const StepVerdict verdict = decide_step(facts(40.0, 1.0, Spike::kRollback), policy("stop", 0));
  EXPECT_EQ(verdict.action, StepAction::kRollBack);
  EXPECT_TRUE(verdict.loss_spike);
}

TEST(StepPolicy, AStepRolledBackEarlierIsSkippedEvenWithANormalLoss) {
  const StepVerdict verdict = decide_step(facts(2.0, 1.0, Spike::kTrain, /*rolled_back=*/true), policy("stop"));
  EXPECT_EQ(verdict.action, StepAction::kSkip);
  EXPECT_TRUE(verdict.loss_spike);
  // ... and a non-finite one too, as a spike rather than under nonfinite_policy stop.
  EXPECT_EQ(decide_step(facts(kNaN, 1.0, Spike::kTrain, true), policy("stop")).action, StepAction::kSkip);
}

TEST(StepPolicy, TheStopMessageNamesTheStepItsSamplesThePolicyAndTheIntactCheckpoint) {
  const StepFacts f = facts(kNaN, 3.5, Spike::kTrain, false, 2);
  const StepVerdict verdict = decide_step(f, policy("skip", 2));
  ASSERT_EQ(verdict.action, StepAction::kStop);
  const std::string message = stopped_step_message(f, verdict, "[3, 17]", "runs/x/checkpoints");
  EXPECT_EQ(message.rfind("non-finite loss (nan) or gradient norm (3.500000) at step 7, global samples [3, 17]", 0), 0u)
      << message;
  EXPECT_NE(message.find("max_skipped_steps 2"), std::string::npos) << message;
  EXPECT_NE(message.find("the last checkpoint in runs/x/checkpoints is intact"), std::string::npos) << message;
  const StepVerdict spike = decide_step(facts(40.0, 1.0, Spike::kSkip, false, 1), policy("stop", 1));
  EXPECT_EQ(stopped_step_message(f, spike, "[]", "c").rfind("loss spike: loss (", 0), 0u);
}

}  // namespace
}  // namespace loom

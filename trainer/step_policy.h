// What becomes of a step once its loss and gradient norm are known: update,
// skip, roll back to the last checkpoint, or stop the run. A pure function of
// the step's facts and the config, so that a test decides steps without a
// model; the trainer then carries the verdict out.
//
//   non-finite loss or norm   optimizer.nonfinite_policy: stop, or skip (at
//                             most optimizer.max_skipped_steps per run)
//   a loss spike              optimizer.loss_spike_policy (trainer/loss_spike.h):
//                             skip as above, or roll back
//   a step rolled back before skipped, whatever its loss
// A stop is thrown before the update and before any checkpoint of the step,
// so the last checkpoint (and `latest`) stays the last good state.
#pragma once

#include <cstdint>
#include <string>

#include "config/config.h"
#include "trainer/loss_spike.h"

namespace loom {

struct StepFacts {
  int64_t step = 0;       // the step being decided, numbered from 1
  double loss = 0.0;      // its mean loss (after the dp and pp reductions)
  double grad_norm = 0.0;
  bool rolled_back = false;  // LossSpikeGuard::rolled_back(step)
  // LossSpikeGuard::check's answer for a finite step that was not rolled
  // back (kTrain otherwise: the guard is not asked about other steps).
  LossSpikeGuard::Action spike = LossSpikeGuard::Action::kTrain;
  int64_t skipped_steps = 0;  // skipped so far in the run, before this step
};

enum class StepAction { kUpdate, kSkip, kRollBack, kStop };

struct StepVerdict {
  StepAction action = StepAction::kUpdate;
  bool loss_spike = false;  // skip or stop because of a spike (now, or rolled back before)
  std::string why;          // kStop: what stopped the run and why the limit was reached
};

// Whether `facts.loss` and `facts.grad_norm` are both finite.
bool step_is_finite(const StepFacts& facts);

StepVerdict decide_step(const StepFacts& facts, const OptimizerConfig& optimizer);

// The message a stopped step throws (std::runtime_error, exit 1): the loss,
// the norm, the step and its samples, the policy, and that the last
// checkpoint in `checkpoints_dir` is intact.
std::string stopped_step_message(const StepFacts& facts, const StepVerdict& verdict, const std::string& samples,
                                 const std::string& checkpoints_dir);

}  // namespace loom

#include "trainer/step_policy.h"

#include <cmath>

namespace loom {

bool step_is_finite(const StepFacts& facts) { return std::isfinite(facts.loss) && std::isfinite(facts.grad_norm); }

StepVerdict decide_step(const StepFacts& facts, const OptimizerConfig& optimizer) {
  StepVerdict verdict;
  if (facts.spike == LossSpikeGuard::Action::kRollback) {
    verdict.action = StepAction::kRollBack;
    verdict.loss_spike = true;
    return verdict;
  }
  verdict.loss_spike = facts.rolled_back || facts.spike == LossSpikeGuard::Action::kSkip;
  if (step_is_finite(facts) && !verdict.loss_spike) return verdict;  // kUpdate
  const bool skip = verdict.loss_spike || optimizer.nonfinite_policy == "skip";
  if (skip && facts.skipped_steps + 1 <= optimizer.max_skipped_steps) {
    verdict.action = StepAction::kSkip;
    return verdict;
  }
  verdict.action = StepAction::kStop;
  verdict.why = skip ? " (optimizer." + std::string(verdict.loss_spike ? "loss_spike" : "nonfinite") +
                           "_policy: " + std::to_string(facts.skipped_steps) +
                           " steps already skipped, optimizer.max_skipped_steps " +
                           std::to_string(optimizer.max_skipped_steps) + ")"
                     : " (optimizer.nonfinite_policy stop)";
  return verdict;
}

std::string stopped_step_message(const StepFacts& facts, const StepVerdict& verdict, const std::string& samples,
                                 const std::string& checkpoints_dir) {
  return std::string(verdict.loss_spike ? "loss spike: loss (" : "non-finite loss (") + std::to_string(facts.loss) +
         ") or gradient norm (" + std::to_string(facts.grad_norm) + ") at step " + std::to_string(facts.step) +
         ", global samples " + samples + verdict.why + "; stopped before the update, the last checkpoint in " +
         checkpoints_dir + " is intact";
}

}  // namespace loom

// TEST-ONLY hooks into the training step. Production code (loom train) never
// makes one; tests pass one to train() to make a step fail on purpose and
// check what the policies then do.
#pragma once

#include <cstdint>
#include <functional>

namespace loom {

struct TrainHooks {
  // Called with each step's number (completed steps + 1, as in
  // metrics.jsonl's "step"); when it returns true the first micro-batch's
  // loss (a pipeline's step loss) is multiplied by NaN before backward, so
  // loss and gradients are NaN and optimizer.nonfinite_policy applies.
  std::function<bool(int64_t step)> poison_step;
  // A loss spike on demand: the first micro-batch's loss is multiplied by the
  // factor it returns (1 = unchanged), so optimizer.loss_spike_policy sees a
  // spike.
  std::function<double(int64_t step)> scale_loss;
};

}  // namespace loom

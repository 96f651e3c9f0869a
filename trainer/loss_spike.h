// Loss spikes (optimizer.loss_spike_policy): a step whose mean loss exceeds
// optimizer.loss_spike_factor x the mean of the last
// optimizer.loss_spike_window accepted steps' losses.
//
//   skip:     the step is dropped like a non-finite step under
//             optimizer.nonfinite_policy skip: gradients zeroed, no update,
//             its data not seen again; metrics.jsonl gets {"step", "skipped":
//             true, "loss_spike": true, "running_mean", "samples"}. Counts
//             toward optimizer.max_skipped_steps.
//   rollback: the run goes back to its last checkpoint (train() is thrown out
//             of with LossSpikeRollback and run again by train_with_rollbacks),
//             and when the step comes again its data is skipped, logged as
//             above with "rolled_back": true. The rolled-back steps are kept in
//             <run>/loss_spikes.json, so a later resume skips them too; at
//             most optimizer.max_loss_spike_rollbacks per run, then a spike
//             stops the run (exit 1).
//
// Every rank decides the same without communicating: the loss it looks at is
// the step's loss after the dp and pp reductions, the same bits everywhere.
// The window starts empty whenever train() starts (a start, a resume, a
// rollback): no step is checked before it holds loss_spike_window losses.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/process_group.h"
#include "config/config.h"

namespace loom {

struct TrainHooks;
struct TrainOptions;
struct TrainResult;

// Thrown out of train() on every rank when a spike under the rollback policy
// sends the run back to its last checkpoint.
class LossSpikeRollback : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class LossSpikeGuard {
 public:
  enum class Action { kTrain, kSkip, kRollback };

  // Reads <run_dir>/loss_spikes.json (the steps rolled back so far) when the
  // policy is rollback; BadInput when it is unreadable.
  LossSpikeGuard(const OptimizerConfig& config, const std::string& run_dir);

  // Whether `step` (numbered from 1) was rolled back earlier: its data is
  // skipped whatever its loss.
  bool rolled_back(int64_t step) const { return rolled_back_.count(step) != 0; }

  // What to do with `step` whose mean loss is `loss` (finite). A step that
  // is trained on joins the window. Throws std::runtime_error (exit 1) for a
  // rollback past optimizer.max_loss_spike_rollbacks.
  Action check(int64_t step, double loss);

  // The window's mean when check() last decided (NaN before it was full).
  double running_mean() const { return last_mean_; }

  // Under the rollback policy: records `step` in loss_spikes.json (the
  // writer rank only) and throws LossSpikeRollback, on every rank.
  [[noreturn]] void roll_back(int64_t step, double loss, const std::vector<uint64_t>& samples, bool writer);

  // The loss and running mean recorded for a rolled-back step (for its log line).
  double rolled_back_loss(int64_t step) const;

 private:
  OptimizerConfig config_;
  std::string path_;  // <run_dir>/loss_spikes.json
  std::deque<double> window_;
  double last_mean_;
  std::map<int64_t, double> rolled_back_;  // step -> its loss when it spiked
  std::string records_;  // loss_spikes.json's "rollbacks" array as read (JSON), to append to
};

// train(), run again from the last checkpoint after every LossSpikeRollback.
TrainResult train_with_rollbacks(Config& config, const TrainOptions& options, const TrainHooks* hooks = nullptr);

}  // namespace loom

#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>
#include <string>

#include "util/error.h"

namespace loom {

namespace {

// Fraction of the way from `begin` to `end` at `step`, clamped to [0, 1]; 1
// when the interval is empty (nothing left to decay over).
double progress_between(double begin, double end, int64_t step) {
  if (end <= begin) return 1.0;
  return std::clamp((static_cast<double>(step) - begin) / (end - begin), 0.0, 1.0);
}

}  // namespace

// Note [warmup convention]
// Warmup step s (0-based) uses lr * (s + 1) / warmup_steps, as Megatron-LM and
// nanotron do: the first step already moves the weights (lr * s / warmup
// would spend step 0 at lr 0), and the last warmup step reaches the peak.
double learning_rate(const OptimizerConfig& optimizer, const ScheduleConfig& schedule, int64_t step) {
  if (step < 0) throw std::invalid_argument("learning_rate: step must be >= 0 (got " + std::to_string(step) + ")");
  if (schedule.train_steps <= 0) {
    throw BadInput("schedule.train_steps: must be > 0 to train (got " + std::to_string(schedule.train_steps) + ")");
  }
  const double peak = optimizer.lr;
  const double floor = optimizer.lr * schedule.min_lr_ratio;
  const int64_t warmup = schedule.warmup_steps;
  const int64_t train_steps = schedule.train_steps;

  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);

  if (schedule.decay == "constant") return peak;
  if (schedule.decay == "cosine") {
    const double progress = progress_between(warmup, train_steps, step);
    return floor + 0.5 * (peak - floor) * (1.0 + std::cos(std::numbers::pi * progress));
  }
  if (schedule.decay == "linear") {
    const double progress = progress_between(warmup, train_steps, step);
    return floor + (peak - floor) * (1.0 - progress);
  }
  if (schedule.decay == "wsd") {
    const int64_t decay_start = std::max(warmup, (4 * train_steps) / 5);
    if (step < decay_start) return peak;
    const double progress = progress_between(decay_start, train_steps, step);
    return floor + (peak - floor) * (1.0 - progress);
  }
  throw BadInput("schedule.decay: not an allowed value (got " + schedule.decay +
                 "; expected one of cosine, linear, wsd, constant)");
}

}  // namespace loom

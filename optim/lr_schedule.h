// The learning rate at each optimizer step: linear warmup, then a decay shape
// down to optimizer.min_lr_ratio * optimizer.lr (docs/configuration.md,
// `schedule`).
#pragma once

#include <cstdint>

#include "config/config.h"

namespace loom {

// The learning rate for optimizer step `step` (0-based: the step about to be
// taken), with peak `optimizer.lr` and floor `optimizer.lr *
// schedule.min_lr_ratio`:
//   step < warmup_steps:  lr * (step + 1) / warmup_steps    (see Note [warmup convention])
//   then, with progress = (step - warmup_steps) / (train_steps - warmup_steps)
//   clamped to [0, 1] (1 when train_steps == warmup_steps):
//     cosine    floor + 0.5 * (lr - floor) * (1 + cos(pi * progress))
//     linear    floor + (lr - floor) * (1 - progress)
//     wsd       lr until decay_start = max(warmup_steps, (4 * train_steps) / 5)
//               (integer division: the decay covers the last 20% of
//               train_steps, rounded up to whole steps), then linear from lr
//               to floor with progress measured from decay_start
//     constant  lr (no floor)
// Steps at or past train_steps stay at the floor. Throws loom::BadInput naming
// the key when schedule.train_steps is not > 0 or schedule.decay is unknown,
// std::invalid_argument for a negative step.
double learning_rate(const OptimizerConfig& optimizer, const ScheduleConfig& schedule, int64_t step);

}  // namespace loom

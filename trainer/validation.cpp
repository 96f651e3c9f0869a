#include "trainer/validation.h"

#include <torch/types.h>

namespace loom {

bool validation_due(const Config& config, int64_t step) {
  const bool due = (config.data.valid_interval > 0 && step % config.data.valid_interval == 0) ||
                   step == config.schedule.train_steps;
  return !config.data.valid.empty() && due;
}

double validation_loss(ForwardBackward& forward_backward, const Loader& loader, const Config& config,
                       const ParallelDims& dims, ProcessGroup* dp) {
  const int64_t batches_here = (config.data.valid_batches + dims.dp - 1) / dims.dp;
  double valid_loss = forward_backward.evaluate(loader, batches_here);
  if (dp != nullptr) {
    // Every replica evaluates as many batches of its own: the mean of the means.
    torch::Tensor mean = torch::tensor(valid_loss, torch::kDouble);
    all_reduce_through_cpu(*dp, mean, ReduceOp::kAvg);
    valid_loss = mean.item<double>();
  }
  return valid_loss;
}

}  // namespace loom

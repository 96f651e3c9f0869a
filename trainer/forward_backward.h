// One interface for a step's forwards and backwards, whether this rank holds
// the whole model (or its tp shards) or pipeline chunks: run() takes the
// step's micro-batches from the loader, accumulates their gradients into
// the parameters' .grad and returns the step's loss; evaluate() is the same
// without gradients, for validation.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "data/loader.h"
#include "model/llama.h"
#include "parallel/data_parallel.h"
#include "parallel/pipeline.h"
#include "parallel/process_group.h"
#include "trainer/model_parts.h"

namespace loom {

// TEST-ONLY changes to one step's loss (TrainHooks): the first micro-batch's
// loss, or the pipeline's step loss, multiplied by NaN and by `scale`.
struct LossEdit {
  bool poison = false;
  double scale = 1.0;
};

// Called after each micro-batch with the number done so far in the step (the
// pipeline, which runs them together, calls it once with all of them).
using MicroBatchDone = std::function<void(int64_t micro_done)>;

class ForwardBackward {
 public:
  virtual ~ForwardBackward() = default;
  // The step's loss on this rank's replica: the mean over its micro-batches,
  // as a double scalar on the device (read once per step, so a GPU is not
  // made to wait after every micro-batch). Appends the micro-batches' global
  // sample ids to `samples`.
  virtual torch::Tensor run(Loader& loader, const LossEdit& edit, std::vector<uint64_t>& samples,
                            const MicroBatchDone& done) = 0;
  // Mean loss over the first `max_batches` validation micro-batches (the same
  // ones every time), without gradients; NaN when there are none. Collective
  // over pp with a pipeline.
  virtual double evaluate(const Loader& loader, int64_t max_batches) = 0;
  // The pipeline's links wait as long as pp does: loom train shortens pp's
  // timeout after the first step, and the links follow. Nothing to do on the
  // plain path.
  virtual void follow_timeout(std::chrono::milliseconds timeout) {}
  // The targets that counted in the last run()'s loss over the whole global
  // batch when its batches had a loss mask or document positions (Note
  // [masked loss] in forward_backward.cpp); -1 when every target counted.
  virtual int64_t last_loss_tokens() const = 0;
};

struct ForwardBackwardSetup {
  c10::Device device = c10::kCPU;
  bool bf16 = false;          // precision.compute bf16: the forward under autocast
  int64_t micro_batches = 1;  // per step on this replica
  int64_t micro_batch = 1;    // rows of each
  int64_t seq_len = 0;
  int64_t hidden_size = 0;
  bool sequence_parallel = false;
  std::string device_backend = "nccl";  // parallel.device_backend (parallel/device_groups.h)
  // Where a parameter's gradient is summed (Update::gradient_of); the
  // pipeline sums the tied weight's copies there.
  std::function<torch::Tensor&(const torch::Tensor& param)> gradient_of;
};

// The whole model, or its tp shards. `reducer` (dp, may be null: the bucket
// reducer or ZeRO-2's optimizer) is armed before the last micro-batch's
// backward, so gradients are reduced while that backward runs.
std::unique_ptr<ForwardBackward> make_plain_forward_backward(LlamaForCausalLM& model, const TrainGroups& groups,
                                                             GradientSync* reducer,
                                                             const ForwardBackwardSetup& setup);

// This rank's pipeline chunks, run by the schedule's executor over a group per
// link between neighbouring stages (Note [pipeline links]): MPI's on the CPU,
// their NCCL twins on CUDA. Its step loss is the last stage's, shared with
// every stage. Splits the pp group: collective over pp.
std::unique_ptr<ForwardBackward> make_pipeline_forward_backward(ModelParts& parts, const TrainGroups& groups,
                                                                const ForwardBackwardSetup& setup);

}  // namespace loom

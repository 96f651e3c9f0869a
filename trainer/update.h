// What turns a step's accumulated gradients into an update on this rank's
// layout: the dp reduction (buckets while backward runs, or ZeRO-1's
// reduce-scatter after it), the global gradient norm and clipping over every
// shard and stage, and the optimizer (the whole AdamW, or ZeRO-1's sharded
// one).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "optim/fp32_gradients.h"
#include "optim/optimizer.h"
#include "parallel/data_parallel.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "trainer/model_parts.h"

namespace loom {

class Update {
 public:
  // The whole AdamW (unless ZeRO-1) and the dp bucket reducer; ZeRO-1's
  // optimizer is made by start_zero, once the weights are final.
  Update(const Config& config, const ParallelDims& dims, const TrainGroups& groups, const ModelParts& parts);

  bool zero_1() const { return zero_1_; }
  // The whole AdamW of this rank's parameters (null under ZeRO-1).
  AdamW* optimizer() { return optimizer_ ? &*optimizer_ : nullptr; }
  const AdamW* optimizer() const { return optimizer_ ? &*optimizer_ : nullptr; }
  ShardedAdamW* zero() { return zero_ ? &*zero_ : nullptr; }
  const ShardedAdamW* zero() const { return zero_ ? &*zero_ : nullptr; }
  GradientReducer* reducer() { return reducer_.get(); }
  const AdamWOptions& options() const { return options_; }

  // ZeRO-1 (parallel.zero_stage 1): the sharded optimizer, made from the
  // weights as they are now (fresh, or loaded by a resume, which then loads
  // its state). Then the gradients the norm sees are fixed.
  void start();

  void zero_grad();
  // After the step's backwards: the dp buckets' last reductions, or ZeRO-1's
  // reduce-scatter. Every replica then holds the averaged gradients (or its
  // shard of them).
  void reduce_gradients();
  // The global gradient norm before clipping; clipped to
  // optimizer.clip_grad_norm when it is > 0.
  double clip(double max_norm);
  void step(double lr);

  // AdamW's state of this rank's unsharded parameters (exp_avg, exp_avg_sq,
  // and the fp32 masters of bf16 parameters), MiB.
  double unsharded_state_mib() const;

 private:
  const ModelParts& parts_;
  const TrainGroups groups_;
  AdamWOptions options_;
  bool zero_1_;
  std::optional<AdamW> optimizer_;
  std::optional<Fp32GradientAccumulation> fp32_grads_;  // bf16 parameters, precision.grad_accum fp32
  std::optional<ShardedAdamW> zero_;
  std::unique_ptr<GradientReducer> reducer_;
  GradNormReduction model_norm_, zero_norm_;
  std::vector<torch::Tensor> norm_params_;
  const GradNormReduction* norm_reduction_ = nullptr;
};

}  // namespace loom

// What turns a step's accumulated gradients into an update on this rank's
// layout: the dp reduction (buckets while backward runs, ZeRO-1's
// reduce-scatter after it, or ZeRO-2's per unit while backward runs), the
// global gradient norm and clipping over every shard and stage, and the
// optimizer (the whole AdamW, or ZeRO's sharded one).
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
  // The whole AdamW (unless ZeRO) and the dp bucket reducer; ZeRO's
  // optimizer is made by start(), once the weights are final.
  Update(const Config& config, const ParallelDims& dims, const TrainGroups& groups, const ModelParts& parts);
  ~Update();
  Update(const Update&) = delete;
  Update& operator=(const Update&) = delete;

  // parallel.zero_stage 1, 2 or 3 with dp > 1: the optimizer is ShardedAdamW.
  bool sharded() const { return zero_stage_ > 0; }
  // The whole AdamW of this rank's parameters (null under ZeRO).
  AdamW* optimizer() { return optimizer_ ? &*optimizer_ : nullptr; }
  const AdamW* optimizer() const { return optimizer_ ? &*optimizer_ : nullptr; }
  ShardedAdamW* zero() { return zero_ ? &*zero_ : nullptr; }
  const ShardedAdamW* zero() const { return zero_ ? &*zero_ : nullptr; }
  GradientReducer* reducer() { return reducer_.get(); }
  // What the last micro-batch's backward arms: the bucket reducer, or
  // ZeRO-2's optimizer (after start()); null when nothing overlaps backward.
  GradientSync* sync();
  const AdamWOptions& options() const { return options_; }

  // ZeRO (parallel.zero_stage 1 to 3): the sharded optimizer, made from the
  // weights as they are now (fresh, or loaded by a resume, which then loads
  // its state); under ZeRO-3 it then keeps only this rank's shards and
  // frees the decoder layers' parameters (Note [ZeRO-3]). Then the
  // gradients the norm sees are fixed.
  void start();
  // Undoes start() before it is called again (a resume that failed after
  // it and tries an older checkpoint): ZeRO's optimizer goes and under
  // ZeRO-3 every parameter has its whole memory again, its values undefined
  // until they are loaded. Local: no collective.
  void unstart();

  void zero_grad();
  // After the step's backwards: the dp buckets' last reductions, or ZeRO's
  // reduce-scatters. Every replica then holds the averaged gradients (or its
  // shard of them).
  void reduce_gradients();
  // The global gradient norm before clipping; clipped to
  // optimizer.clip_grad_norm when it is > 0.
  double clip(double max_norm);
  void step(double lr);
  // ZeRO-3: every parameter whole (for a checkpoint or the export), and the
  // decoder layers' freed again. Nothing under the other stages. Collective over dp.
  void gather_params();
  void release_params();

  // AdamW's state of this rank's unsharded parameters (exp_avg, exp_avg_sq,
  // and the fp32 masters of bf16 parameters), MiB.
  double unsharded_state_mib() const;

 private:
  const ModelParts& parts_;
  const TrainGroups groups_;
  AdamWOptions options_;
  int64_t zero_stage_;  // 0 without dp
  bool overlap_;
  std::optional<AdamW> optimizer_;
  std::optional<Fp32GradientAccumulation> fp32_grads_;  // bf16 parameters, precision.grad_accum fp32
  std::optional<ShardedAdamW> zero_;
  std::unique_ptr<GradientReducer> reducer_;
  // Expert parallelism (parallel/expert_parallel.h): the dense parameters
  // go through reducer_, the experts through expert_reducer_ (over edp;
  // null when no other rank holds this rank's experts), and then the
  // experts' gradients (their holders') are divided by ep.
  std::unique_ptr<GradientReducer> expert_reducer_;
  std::vector<torch::Tensor> expert_holders_;
  double expert_scale_ = 1.0;
  // Arms both reducers (sync()).
  struct BothReducers : GradientSync {
    GradientReducer* dense = nullptr;
    GradientReducer* experts = nullptr;
    void arm() override {
      if (dense) dense->arm();
      if (experts) experts->arm();
    }
  } both_reducers_;
  GradNormReduction model_norm_, zero_norm_;
  bool model_norm_reduced_ = false;  // model_norm_ sums over ranks
  std::vector<torch::Tensor> norm_params_;
  const GradNormReduction* norm_reduction_ = nullptr;
};

}  // namespace loom

// What turns a step's accumulated gradients into an update on this rank's
// layout: the dp reduction (buckets while backward runs, ZeRO-1's
// reduce-scatter after it, or ZeRO-2's per unit while backward runs), the
// global gradient norm and clipping over every shard and stage, and the
// optimizer (the whole AdamW, or ZeRO's sharded one).
//
// Note [ZeRO with expert parallelism]
// Under parallel.ep the dp ranks of a block hold different experts (Note
// [expert groups] in parallel/process_group.h), so ZeRO's flat layout (Note
// [ZeRO-1 layout]), which cuts the same parameters on every dp rank, cannot
// hold them. ZeRO stages 1 and 2 then run two sharded optimizers: one over
// `dp` for the dense parameters and one over `edp` for this rank's experts
// (the ranks holding the same experts, each its 1/edp of their state). The
// experts' averaged shard is divided by ep, as the bucket reducer's is (Note
// [expert all-to-all]). Where edp is this rank alone the experts' optimizer
// is a whole AdamW: no other rank holds their state. The gradient norm sums
// both shards' squares over the world: every dense element is in one dp
// shard, every expert element in one edp shard of one ep rank. A checkpoint
// stores each rank's pieces of both (trainer/run_checkpoints.cpp), so it
// resumes on any layout. Under stage 3 the layer wrapper gathers, frees and
// reduces each layer's experts over edp beside its dense parameters over dp
// (ZeroLayerWrapper); where edp is this rank alone the experts stay whole.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoints/regions.h"
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
  // ZeRO's optimizer; under ep that of the dense parameters only (Note
  // [ZeRO with expert parallelism]).
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
  // Where `param`'s gradient is summed (a slot that may be assigned): under
  // precision.params bf16 with grad_accum fp32 an fp32 sum, its master's
  // .grad (Note [fp32 gradients of bf16 parameters]) or ZeRO's (Note [ZeRO
  // with bf16 parameters]), with what the parameter's .grad still holds
  // moved in; else the parameter's .grad. The pipeline sums the tied
  // weight's copies there.
  torch::Tensor& gradient_of(const torch::Tensor& param);
  // After the step's backwards: the dp buckets' last reductions, or ZeRO's
  // reduce-scatters. Every replica then holds the averaged gradients (or its
  // shard of them).
  void reduce_gradients();
  // The global gradient norm before clipping; clipped to
  // optimizer.clip_grad_norm when it is > 0. Under fusion.clip_in_adamw
  // (without ZeRO) the clipping factor is only computed here and step()
  // applies it inside AdamW; the step that follows a clip() must then be
  // step() or zero_grad(), nothing that reads the gradients.
  double clip(double max_norm);
  void step(double lr);
  // ZeRO-3: every parameter whole (for a checkpoint or the export), and the
  // decoder layers' freed again. Nothing under the other stages. Collective over dp.
  void gather_params();
  void release_params();

  // AdamW's state of this rank's unsharded parameters (exp_avg, exp_avg_sq,
  // and the fp32 masters of bf16 parameters), MiB.
  double unsharded_state_mib() const;
  // Under ZeRO (after start()): bytes of optimizer state this rank holds,
  // and elements of its fp32 gradient shards, over every optimizer.
  int64_t zero_state_bytes() const;
  int64_t zero_shard_numel() const;

  // This rank's optimizer state as a checkpoint stores it: the whole
  // AdamW's state_dict(), or under ZeRO every optimizer's own entries (one
  // optimizer.step; a piece's entries are 1-D, state_range() says where
  // they lie). The tensors are the optimizers' own.
  NamedTensors local_state_dict() const;
  // Takes a state of local_state_dict()'s entries and shapes.
  void load_local_state_dict(const NamedTensors& state);
  // Under ZeRO, elements [first, second) of parameter `param` (row-major)
  // whose state this rank holds; none when it holds the whole parameter's
  // (no ZeRO, or an expert that no other rank holds: Note [ZeRO with
  // expert parallelism]). std::out_of_range when it holds none of it.
  std::optional<Range> state_range(const std::string& param) const;
  // Whether `param`'s fp32 master is held in ZeRO's pieces (bf16 parameters
  // under ZeRO: Note [ZeRO with bf16 parameters]), so that no rank holds it
  // whole; false where an optimizer holds it whole, or it has none.
  bool master_in_pieces(const std::string& param) const;
  int64_t step_count() const;

 private:
  // A parameter expert parallelism splits (an expert's, under ep); the
  // others are dense.
  bool is_split_expert(const std::string& param) const;

  const ModelParts& parts_;
  const TrainGroups groups_;
  AdamWOptions options_;
  int64_t zero_stage_;  // 0 without dp
  bool overlap_;
  std::optional<AdamW> optimizer_;
  std::optional<Fp32GradientAccumulation> fp32_grads_;  // bf16 parameters, precision.grad_accum fp32
  std::optional<ShardedAdamW> zero_;
  // ZeRO under ep (Note [ZeRO with expert parallelism]): the experts'
  // optimizer over edp, or whole where edp is this rank alone.
  std::optional<ShardedAdamW> expert_zero_;
  std::optional<AdamW> expert_adamw_;
  std::optional<Fp32GradientAccumulation> expert_fp32_grads_;  // of expert_adamw_'s bf16 parameters
  std::unique_ptr<GradientReducer> reducer_;
  // Expert parallelism (parallel/expert_parallel.h): the dense parameters
  // go through reducer_, the experts through expert_reducer_ (over edp;
  // null when no other rank holds this rank's experts), and then the
  // experts' gradients (their holders') are divided by ep.
  std::unique_ptr<GradientReducer> expert_reducer_;
  std::vector<torch::Tensor> expert_holders_;
  double expert_scale_ = 1.0;
  // Under ep, arms both reducers, or both ZeRO-2 optimizers (sync()).
  struct BothSyncs : GradientSync {
    GradientSync* dense = nullptr;
    GradientSync* experts = nullptr;
    void arm() override {
      if (dense) dense->arm();
      if (experts) experts->arm();
    }
  } both_syncs_;
  GradNormReduction model_norm_, zero_norm_;
  bool model_norm_reduced_ = false;  // model_norm_ sums over ranks
  std::vector<torch::Tensor> norm_params_;
  const GradNormReduction* norm_reduction_ = nullptr;
  bool clip_in_adamw_ = false;  // fusion.clip_in_adamw
  bool params_bf16_ = false;      // precision.params bf16
  bool fp32_grad_accum_ = false;  // and grad_accum fp32
  torch::Tensor grad_factor_;   // clip()'s factor, for the next step() to apply
};

}  // namespace loom

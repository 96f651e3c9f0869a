// ZeRO-1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
// Training Trillion Parameter Models", stage 1): AdamW whose state is split
// over the data-parallel group, so each dp rank keeps 1/dp of it.
//
//   ShardedAdamW optimizer(dp, to_named_tensors(model.named_parameters()), options);
//   ... backward on every micro-batch (no GradientReducer) ...
//   optimizer.reduce_gradients();                   // reduce-scatter: this rank's shard of the dp average
//   clip_grad_norm(optimizer.shard_params(), max_norm, &reduction);   // the norm of all shards
//   optimizer.step(lr);                             // AdamW on the shard, then all-gather the parameters
//
// Note [ZeRO-1 layout]
// The parameters (in the order given) are laid end to end in one flat fp32
// vector of T elements, padded with zeros to T' = dp * ceil(T / dp); dp rank
// r owns elements [r T'/dp, (r+1) T'/dp). Each parameter that overlaps the
// rank's range contributes one piece, a view of the flat parameter vector
// named after it (so weight decay follows the parameter's name), and AdamW
// (optim/optimizer.h, unchanged) steps those pieces with their own
// exp_avg and exp_avg_sq. reduce_gradients() flattens the .grad of every
// parameter and reduce-scatters it (AVG) over dp into the pieces' gradients;
// step() updates the pieces, all-gathers the flat vector and copies it back
// into the parameters, so every replica ends the step with the same weights.
// The arithmetic per element is AdamW's; only the gradients' reduction order
// differs from an all-reduce.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "parallel/process_group.h"
#include "optim/optimizer.h"

namespace loom {

class ShardedAdamW {
 public:
  // `params` (fp32, CPU for the MPI group) are updated in place by step().
  // The group and the parameters must outlive the optimizer.
  ShardedAdamW(ProcessGroup& dp, NamedTensors params, AdamWOptions options);

  // Zeroes the parameters' gradients (the model's, not the shard's).
  void zero_grad();
  // Reduce-scatters the parameters' gradients over dp (average): afterwards
  // shard_params() hold this rank's shard of the averaged gradient.
  // Collective over dp.
  void reduce_gradients();
  // This rank's pieces (Note [ZeRO-1 layout]); their .grad is valid after
  // reduce_gradients(). For clipping: scale their gradients, not the model's.
  std::vector<at::Tensor> shard_params() const { return shard_->params(); }
  const NamedTensors& shard_named_params() const { return shard_->named_params(); }
  // AdamW on the pieces, then all-gather of the parameters. Collective over dp.
  void step(double lr);

  int64_t step_count() const { return shard_->step_count(); }
  // Bytes of optimizer state this rank holds (exp_avg and exp_avg_sq of its pieces).
  int64_t state_bytes() const;

  // The whole state as AdamW::state_dict() would give it for `params` (every
  // parameter's exp_avg and exp_avg_sq, whole), gathered over dp on every
  // rank (the tests compare it with a whole AdamW; checkpoints store each
  // rank's local_state_dict() instead). Collective.
  NamedTensors state_dict() const;
  // Takes this rank's share of a whole state (AdamW::state_dict() form for
  // `params`). BadInput for a missing or misshapen entry.
  void load_state_dict(const NamedTensors& whole);

  // This rank's own state, as the AdamW over its pieces holds it
  // (optimizer.step, and optimizer.exp_avg.NAME / exp_avg_sq.NAME of the
  // piece of each parameter NAME that meets its shard, 1-D): what a sharded
  // checkpoint stores. The tensors are the optimizer's own, not copies.
  NamedTensors local_state_dict() const { return shard_->state_dict(); }
  void load_local_state_dict(const NamedTensors& state) { shard_->load_state_dict(state); }
  // Where the piece of parameter `name` lies in it: elements [first, second)
  // of the parameter, row-major. std::out_of_range when this rank holds no
  // piece of it.
  std::pair<int64_t, int64_t> piece_range(const std::string& name) const;

 private:
  struct Piece {
    size_t param;          // index into params_
    int64_t param_offset;  // first element of the parameter in this piece
    int64_t flat_offset;   // its position in the flat vector
    int64_t numel;
  };

  ProcessGroup* dp_;
  NamedTensors params_;
  std::vector<int64_t> offsets_;  // of each parameter in the flat vector
  int64_t total_ = 0;             // T' (padded)
  int64_t shard_size_ = 0;        // T' / dp
  std::vector<Piece> pieces_;
  at::Tensor flat_params_;        // [T'], the whole flat parameter vector
  at::Tensor shard_grad_;         // [T'/dp], this rank's shard of the averaged gradient
  std::unique_ptr<AdamW> shard_;  // over the pieces: views of flat_params_'s shard
};

}  // namespace loom

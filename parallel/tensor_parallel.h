// Megatron-style tensor parallelism (Shoeybi et al. 2019, "Megatron-LM";
// sequence parallelism from Korthikanti et al. 2022, "Reducing Activation
// Recomputation in Large Transformer Models"): the communication operators as
// autograd functions, and the column- and row-parallel linear layers built on
// them. See docs/parallelism.md.
//
// Note [tensor-parallel operators]
// Each operator is a collective over the tp group, in forward, in backward or
// both; the group is passed explicitly and must outlive every autograd graph
// that went through the operator (its backward uses the group too).
//   copy_to_tp      (the paper's f)  forward identity        backward all-reduce SUM
//   reduce_from_tp  (the paper's g)  forward all-reduce SUM  backward identity
//   gather_from_tp   (last dim)      forward all-gather      backward this rank's slice
//   scatter_to_tp    (last dim)      forward this rank's slice  backward all-gather
//   gather_from_sp       (dim 1, the sequence of [batch, seq, hidden])
//                                    forward all-gather      backward reduce-scatter
//   reduce_scatter_to_sp (dim 1)     forward reduce-scatter  backward all-gather
// Slices and gathers are in tp-rank order: rank r holds chunk r.
// Every rank of the group must run the same operators in the same order, in
// forward and in backward (Note [process group contract] in process_group.h):
// the tp ranks of one model replica compute the same graph, so they do. An
// output gradient that is undefined on a rank (the output did not reach the
// loss) is taken as zeros, so that the collective still happens on every rank.
// With a group of size 1 every operator returns its input and communicates
// nothing. Otherwise copy_to_tp's output is a view of its input (no copy, so
// neither may be modified in place) and the other outputs are new tensors.
// Gradients arriving in backward are never written to (autograd may share
// them with other nodes).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>

#include "parallel/process_group.h"
#include "model/layers.h"

namespace loom {

at::Tensor copy_to_tp(ProcessGroup& tp, const at::Tensor& x);
at::Tensor reduce_from_tp(ProcessGroup& tp, const at::Tensor& x);
// x [..., h/tp] -> [..., h]
at::Tensor gather_from_tp(ProcessGroup& tp, const at::Tensor& x);
// x [..., h] -> [..., h/tp]; h must be divisible by the group size.
at::Tensor scatter_to_tp(ProcessGroup& tp, const at::Tensor& x);
// x [b, s/tp, ...] -> [b, s, ...]
at::Tensor gather_from_sp(ProcessGroup& tp, const at::Tensor& x);
// x [b, s, ...] (partial sums) -> [b, s/tp, ...] (this rank's slice of the sum);
// s must be divisible by the group size.
at::Tensor reduce_scatter_to_sp(ProcessGroup& tp, const at::Tensor& x);
// The input of a column-parallel layer: f (copy_to_tp) of the whole
// activation, or with `sequence_parallel` its sequence-parallel form,
// gather_from_sp of this rank's slice [b, s/tp, ...].
at::Tensor column_input(ProcessGroup& tp, const at::Tensor& x, bool sequence_parallel);
// Shapes that do not fit (a dim not divisible by the group size, too few
// dims) throw std::invalid_argument naming the operator, the tensor and the
// group size, before anything is sent. Every rank sees the same shapes, so
// every rank throws.

// The rank's shard of a full linear parameter, as ColumnParallelLinear and
// RowParallelLinear hold it (a contiguous copy), for loading and tests:
//   weight [out, in]: kColumn -> rows [out/size, in] (chunk `rank` along dim 0),
//                     kRow -> columns [out, in/size] (chunk `rank` along dim 1),
//                     kReplicated -> all of it;
//   bias [out]:       kColumn -> chunk `rank` [out/size]; kRow, kReplicated -> all of it.
// A dim not divisible by `size` throws BadInput naming both.
at::Tensor shard_linear_weight(const at::Tensor& full_weight, LinearRole role, int64_t rank, int64_t size);
at::Tensor shard_linear_bias(const at::Tensor& full_bias, LinearRole role, int64_t rank, int64_t size);

// Implemented by every layer that holds a shard of a parameter: for each
// parameter it registers itself (by its own name: "weight", "bias"), the dim
// cut into tp equal chunks, rank r holding chunk r, or -1 when every rank
// holds all of it. Checkpoints and exports gather the full tensors with it
// (parallel/tensor_parallel_model.h).
// unpadded_size: the full tensor's size along the shard dim when the chunks
// carry padding at its end (the vocabulary's, Note [vocab padding] in
// vocab_parallel.h): the tp chunks then cover more than the tensor, which
// stops at this size. -1 (the default): no padding, tp times the chunk.
// Padding is only ever along dim 0, at its end.
class TensorParallelLayer {
 public:
  virtual ~TensorParallelLayer() = default;
  virtual int64_t shard_dim(const std::string& parameter) const = 0;
  virtual int64_t unpadded_size(const std::string& parameter) const { return -1; }
};

// The input of several column-parallel linears that read the same tensor
// (q/k/v of attention, gate/up of the MLP) made once: one f, or one sequence
// all-gather, for all of them, so that backward runs one collective on the
// sum of their input gradients instead of one per linear (Megatron fuses
// these linears into one for the same reason). Reused only for the very same
// tensor, unmodified, in the same grad mode; otherwise made afresh. Holds the
// last input and its gathered form until the next one.
class SharedColumnInput {
 public:
  at::Tensor get(ProcessGroup& tp, const at::Tensor& x, bool sequence_parallel);

 private:
  at::Tensor input_;
  at::Tensor output_;
  int64_t version_ = 0;
  bool grad_mode_ = false;
  bool sequence_parallel_ = false;
};

// y = x W^T + b with W's rows (output features) split over the tp group: this
// rank holds `weight` [out/tp, in] and `bias` [out/tp] (chunk tp_rank of the
// full ones) and computes its slice of y's last dim. The q/k/v and gate/up
// projections of a transformer layer.
//   forward(x [..., in]) -> [..., out/tp], or [..., out] with gather_output.
// Input: x is the whole activation, the same on every rank; copy_to_tp (f)
// sums its gradient over the group in backward, since each rank's slice of y
// contributes a part of it. With sequence_parallel, x is instead this rank's
// sequence slice [b, s/tp, in], gathered with gather_from_sp (whose backward
// reduce-scatters the gradient, doing f's sum and the re-slicing at once).
class ColumnParallelLinear : public Linear, public TensorParallelLayer {
 public:
  struct Options {
    bool gather_output = false;      // all-gather y's last dim (gather_from_tp) so every rank has all of y
    bool sequence_parallel = false;  // x is [b, s/tp, in]; gather the sequence first (gather_from_sp)
    std::shared_ptr<SharedColumnInput> shared_input = nullptr;  // shared with the linears that read the same x
    // x is already the whole activation, through f or gathered by the caller
    // (a mixture-of-experts block, once for all its experts): no f here.
    bool input_ready = false;
  };
  // Throws BadInput when out_features is not divisible by the group size.
  // Parameters are created empty (zeros for the bias), like the single-device
  // linear: model init or a checkpoint fills them.
  ColumnParallelLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias, Options options);
  ColumnParallelLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias)
      : ColumnParallelLinear(tp, in_features, out_features, bias, Options{}) {}

  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t shard_dim(const std::string& parameter) const override { return 0; }  // weight rows, bias

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }  // the full size, over all ranks

 private:
  ProcessGroup* tp_;
  int64_t in_features_;
  int64_t out_features_;
  Options options_;
  torch::Tensor weight_;
  torch::Tensor bias_;
};

// y = x W^T + b with W's columns (input features) split over the tp group:
// this rank holds `weight` [out, in/tp] and the whole `bias` [out]. Each rank
// multiplies its slice of x's last dim, giving a partial sum of y; the o_proj
// and down_proj of a transformer layer, after a ColumnParallelLinear whose
// output stayed split.
//   forward(x [..., in/tp]) -> [..., out], the same on every rank:
//     the partial sums are all-reduced (reduce_from_tp, the paper's g).
//   With sequence_parallel: -> [b, s/tp, out], this rank's sequence slice of
//     y: the partial sums are reduce-scattered (reduce_scatter_to_sp).
// The bias is added once, after the reduction. Under sequence parallelism
// each rank adds it to its own slice only, so its gradient is a partial sum:
// it goes through copy_to_tp, whose backward sums it over the group, and
// every rank's bias gradient is then the whole one.
class RowParallelLinear : public Linear, public TensorParallelLayer {
 public:
  struct Options {
    bool input_is_parallel = true;   // x is already split along its last dim; else scatter it (scatter_to_tp)
    bool sequence_parallel = false;  // reduce-scatter y along the sequence (dim 1) instead of all-reducing it
    // false: return this rank's partial sum [..., out], which the caller
    // reduces (a mixture-of-experts block, once for all its experts); no bias.
    bool reduce_output = true;
  };
  // Throws BadInput when in_features is not divisible by the group size,
  // std::invalid_argument for a bias without reduce_output.
  RowParallelLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias, Options options);
  RowParallelLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias)
      : RowParallelLinear(tp, in_features, out_features, bias, Options{}) {}

  torch::Tensor forward(const torch::Tensor& x) override;
  // The weight's columns; the bias is whole on every rank.
  int64_t shard_dim(const std::string& parameter) const override { return parameter == "weight" ? 1 : -1; }

  int64_t in_features() const { return in_features_; }  // the full size, over all ranks
  int64_t out_features() const { return out_features_; }

 private:
  ProcessGroup* tp_;
  int64_t in_features_;
  int64_t out_features_;
  Options options_;
  torch::Tensor weight_;
  torch::Tensor bias_;
};

}  // namespace loom

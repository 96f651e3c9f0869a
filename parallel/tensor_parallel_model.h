// A whole model cut over a tensor-parallel group: the layer factory that gives
// the model code its tensor-parallel layers, and the moves between the full
// parameters (what a single rank, a checkpoint and a Hub export hold) and
// this rank's shards of them. See docs/parallelism.md.
//
//   TensorParallelLayerFactory factory(tp, /*sequence_parallel=*/true);
//   LlamaForCausalLM model(config.model, factory);      // this rank's shards
//   load_tensor_parallel_shards(model, full_params, tp.rank(), tp.size());
//   ... train ...
//   NamedTensors full = gather_tensor_parallel(tp, to_named_tensors(model.named_parameters()),
//                                              tensor_parallel_shard_dims(model));
//
// Which layer each role gets (Megatron's layout, Shoeybi et al. 2019):
//   kColumn linears (q/k/v, gate/up)  ColumnParallelLinear: output features
//       split, so each rank holds whole heads: q rows are head-major, and
//       with tp dividing both num_heads and num_kv_heads rank r holds query
//       heads [r H/tp, (r+1) H/tp) and exactly the kv heads they attend to,
//       [r KV/tp, (r+1) KV/tp); gate and up keep matching columns.
//   kRow linears (o_proj, down_proj)  RowParallelLinear (input split; one
//       all-reduce, or a reduce-scatter under sequence parallelism)
//   embedding / lm_head               VocabParallelEmbedding / VocabParallelLmHead
//   norms                             whole on every rank
//   head_norm (per-head q/k norm)     whole on every rank, applied to this
//                                     rank's heads: its weight passes
//                                     through f, whose backward sums the
//                                     heads' parts of its gradient
//   projection_norm (q/k norm over    ShardedProjectionRMSNorm: weight split
//     the whole projection)           like the column linear's output; the
//                                     sum of squares all-reduced per token
//   kReplicated                       the single-device linear; under
//                                     sequence parallelism (it reads this
//                                     rank's slice: a router) its weight
//                                     passes through f, like a norm's
//   expert linears (expert_linear)    column and row linears with no
//                                     collective of their own: the
//                                     mixture-of-experts block gathers its
//                                     input once and reduces its output once
//                                     (expert_collectives; Note [experts
//                                     under tensor parallelism], model/moe.h)
//   attention core, mlp block,        LayerFactory's defaults: the core reads
//   layer wrapper                     this rank's head counts from q/k/v, the
//                                     Mlp takes its linears from this factory
// With sequence parallelism the residual stream between the layers is this
// rank's slice of the sequence [b, s/tp, h]: the embedding reduce-scatters,
// column linears all-gather their input, row linears reduce-scatter their
// output, the head gathers the final norm's output. Norms then see a slice of
// the sequence, so their weight's gradient is a partial sum: the norm passes
// its weight through f (copy_to_tp), whose backward sums it over the group.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "parallel/process_group.h"
#include "parallel/tensor_parallel.h"
#include "model/layers.h"
#include "optim/optimizer.h"

namespace loom {

class TensorParallelLayerFactory : public LayerFactory {
 public:
  // The group must outlive every layer made here and every autograd graph
  // through them.
  TensorParallelLayerFactory(ProcessGroup& tp, bool sequence_parallel);

  std::shared_ptr<Linear> linear(int64_t in_features, int64_t out_features, bool bias,
                                 LinearRole role) const override;
  std::shared_ptr<Embedding> embedding(int64_t vocab, int64_t hidden) const override;
  std::shared_ptr<LmHead> lm_head(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) const override;
  std::shared_ptr<RMSNorm> norm(int64_t hidden, double eps, NormWeight style) const override;
  std::shared_ptr<RMSNorm> head_norm(int64_t head_dim, double eps, NormWeight style) const override;
  std::shared_ptr<RMSNorm> projection_norm(int64_t features, double eps) const override;
  int64_t sequence_shards() const override { return sequence_parallel_ ? tp_->size() : 1; }
  std::shared_ptr<Linear> expert_linear(int64_t in_features, int64_t out_features, LinearRole role) const override;
  std::shared_ptr<ExpertCollectives> expert_collectives() const override;

 private:
  ProcessGroup* tp_;
  bool sequence_parallel_;
  LocalLayerFactory local_;
  // One for all the column linears made here: consecutive ones that read the
  // same input (q/k/v, gate/up) share its f or all-gather.
  std::shared_ptr<SharedColumnInput> shared_input_;
};

// Every parameter of `model` (by its full name, as named_parameters() gives
// it) and the dim its layer cuts it along (TensorParallelLayer::shard_dim),
// or -1 for a parameter every rank holds whole.
std::map<std::string, int64_t> tensor_parallel_shard_dims(const torch::nn::Module& model);

// The parameters of `model` whose tp chunks carry padding (the vocabulary's
// when tp does not divide it, Note [vocab padding] in vocab_parallel.h), each
// with the whole tensor's size along its shard dim without the padding
// (TensorParallelLayer::unpadded_size). The padding is always along dim 0, at
// the end; a parameter not listed is cut into equal chunks of it.
std::map<std::string, int64_t> tensor_parallel_unpadded_sizes(const torch::nn::Module& model);

// Rank `rank`'s chunk of `full` along `dim` (-1: all of it), contiguous. Throws
// BadInput naming `name` when the dim does not split into `size` equal chunks,
// unless `padded`: then `full` is padded with zeros at the end of dim 0 to a
// multiple of `size` first (Note [vocab padding]).
at::Tensor tensor_parallel_shard(const std::string& name, const at::Tensor& full, int64_t dim, int64_t rank,
                                 int64_t size, bool padded = false);

// Copies into every parameter of `local` (a model built by a
// TensorParallelLayerFactory) this rank's chunk of the parameter of the same
// name in `full` (the vocabulary's with zeros for its padding rows). Throws
// BadInput naming a parameter that `full` lacks or whose shape does not
// match, before anything is copied.
void load_tensor_parallel_shards(torch::nn::Module& local, const NamedTensors& full, int64_t rank, int64_t size);

// Fills every parameter of `local` (a model built by a
// TensorParallelLayerFactory, or by any other: then every parameter is
// whole) with rank `rank`'s shard of the initial weights of the whole model
// (model/init.h): a shard of a tensor is the box of its full tensor that
// tensor_parallel_shard cuts, drawn without drawing the rest. The same values
// as init_weights(seed) on the whole model followed by
// load_tensor_parallel_shards: padding rows of the vocabulary are zeros.
void init_tensor_parallel_shards(torch::nn::Module& local, double init_std, uint64_t seed, int64_t rank,
                                 int64_t size);

// The full tensors of `local` (this rank's shards, named), on the CPU: each
// sharded tensor is all-gathered over `tp` and its chunks joined along its
// dim; a tensor whose name `shard_dim` maps to -1 is copied as this rank holds
// it (every rank holds the same). Collective over `tp`, in `local`'s order.
// `shard_dim` names the dim of every tensor of `local`; a tensor named in
// `unpadded_size` (tensor_parallel_unpadded_sizes) is cut back to that size
// along its dim, its padding dropped.
NamedTensors gather_tensor_parallel(ProcessGroup& tp, const NamedTensors& local,
                                    const std::map<std::string, int64_t>& shard_dim,
                                    const std::map<std::string, int64_t>& unpadded_size = {});

// The gradient norm of `params` (this rank's parts of the parameters, named
// after them) together with the other ranks' parts: a part of a parameter
// that tensor parallelism shards (`shard_dim` >= 0) counts on every rank, a
// part of one every tp rank holds whole counts on tp rank 0 only, and the
// sums of squares are all-reduced over each group of `sum_over` in turn: the
// tp group (and the pp group, whose stages hold different parameters), or
// under ZeRO-1, whose pieces also split every parameter over dp, the world.
// `counted_elsewhere` names a parameter this rank holds a copy of that
// another rank counts (the last pipeline stage's tied embedding): not counted
// here. Its gradient is still clipped like the others.
GradNormReduction sharded_grad_norm(std::vector<ProcessGroup*> sum_over, int64_t tp_rank, const NamedTensors& params,
                                    const std::map<std::string, int64_t>& shard_dim,
                                    const std::string& counted_elsewhere = "");

}  // namespace loom

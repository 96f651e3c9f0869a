#include "trainer/update.h"

#include <string>

namespace loom {

Update::Update(const Config& config, const ParallelDims& dims, const TrainGroups& groups, const ModelParts& parts)
    : parts_(parts),
      groups_(groups),
      options_(AdamWOptions::from_config(config.optimizer)),
      zero_stage_(groups.dp != nullptr ? config.parallel.zero_stage : 0),
      // A pipeline interleaves the micro-batches' backwards, so the last
      // gradient of a parameter is not known in advance: reduce after them.
      overlap_(groups.pp == nullptr) {
  if (zero_stage_ == 0) optimizer_.emplace(parts.named_params, options_);
  // bf16 parameters: each micro-batch's gradient is added into an fp32 one
  // beside the master (Note [fp32 gradients of bf16 parameters]); these
  // hooks come before the reducer's, which then reduces the fp32 sums.
  if (optimizer_ && config.precision.params == "bf16" && config.precision.grad_accum == "fp32") {
    fp32_grads_.emplace(*optimizer_);
  }
  // The gradient norm of all shards and stages together: a parameter every
  // rank of the tp group holds whole (norm weights, row-parallel biases) is
  // counted once, and so is the tied embedding whose copy the last pipeline
  // stage holds (parts.tied_copy).
  std::vector<ProcessGroup*> model_groups;
  if (groups.tp != nullptr) model_groups.push_back(groups.tp);
  if (groups.pp != nullptr) model_groups.push_back(groups.pp);
  // Expert parallelism: the ep ranks hold different experts and the same
  // dense parameters, so each counts its experts and ep rank 0 the rest.
  if (groups.ep != nullptr) model_groups.push_back(groups.ep);
  // The parameters expert parallelism splits (the others: dense).
  const auto split = [&](const std::string& name) { return groups.ep != nullptr && is_expert_parameter(name); };
  model_norm_reduced_ = !parts.model_is_whole || groups.ep != nullptr;
  if (model_norm_reduced_) {
    model_norm_ = sharded_grad_norm(model_groups, groups.coords.tp, parts.named_params, parts.param_dims,
                                    parts.tied_copy);
    if (groups.ep != nullptr) {
      for (size_t i = 0; i < parts.named_params.size(); ++i) {
        if (groups.ep->rank() != 0 && !split(parts.named_params[i].first)) model_norm_.counted[i] = false;
      }
    }
  }
  // Data parallelism: each replica trains on its own samples of every global
  // batch, and the gradients are averaged over the replicas, bucket by bucket
  // while the last micro-batch's backward runs (parallel/data_parallel.h).
  // After that every replica holds the same gradients, so the norm needs no
  // dp reduction and every replica takes the same step. Under ZeRO the
  // gradients are reduce-scattered instead: after backward (ZeRO-1), or
  // unit by unit as backward completes them (ZeRO-2, parallel/zero.h).
  // Under expert parallelism the experts' gradients are averaged over the
  // ranks that hold the same experts, then divided by ep (Note [expert
  // all-to-all] in parallel/expert_parallel.h).
  if (zero_stage_ == 0 && optimizer_) {
    GradientReducer::Options reducer_options;
    reducer_options.bucket_mb = config.parallel.bucket_mb;
    reducer_options.overlap = overlap_;
    reducer_options.reduce_dtype = config.parallel.reduce_dtype == "bf16" ? at::kBFloat16 : at::kFloat;
    const std::vector<torch::Tensor> holders = optimizer_->gradient_holders();
    std::vector<torch::Tensor> dense_params, dense_holders, expert_params;
    for (size_t i = 0; i < parts.named_params.size(); ++i) {
      const bool expert = split(parts.named_params[i].first);
      (expert ? expert_params : dense_params).push_back(parts.named_params[i].second);
      (expert ? expert_holders_ : dense_holders).push_back(holders[i]);
    }
    if (groups.dp != nullptr) {
      reducer_options.grad_holders = dense_holders;
      reducer_ = std::make_unique<GradientReducer>(*groups.dp_data, dense_params, reducer_options);
    }
    if (groups.edp != nullptr && !expert_params.empty()) {
      reducer_options.grad_holders = expert_holders_;
      expert_reducer_ = std::make_unique<GradientReducer>(*groups.edp_data, expert_params, reducer_options);
    }
    if (groups.ep != nullptr) expert_scale_ = 1.0 / static_cast<double>(groups.ep->size());
  }
  both_reducers_.dense = reducer_.get();
  both_reducers_.experts = expert_reducer_.get();
}

Update::~Update() { unstart(); }

void Update::unstart() {
  if (parts_.zero_wrapper) parts_.zero_wrapper->attach(nullptr);
  zero_.reset();
}

void Update::start() {
  if (zero_stage_ > 0) {
    // ZeRO-1 keeps one unit (Note [ZeRO-1 layout]); ZeRO-2 reduces per
    // decoder layer (Note [ZeRO units]), and ZeRO-3 gathers per layer too.
    ZeroOptions zero;
    zero.stage = zero_stage_;
    zero.overlap = overlap_;
    if (zero_stage_ >= 2) zero.units = zero_units_by_layer(parts_.named_params);
    zero_.emplace(*groups_.dp_data, parts_.named_params, options_, std::move(zero));
    // ZeRO-3: the layers gather their parameters through the wrapper.
    if (parts_.zero_wrapper) parts_.zero_wrapper->attach(&*zero_);
  }
  // The gradients the norm and the clipping see: the model's, or under
  // ZeRO this rank's shard of the averaged ones, whose squares are summed
  // over every rank (each element is in one dp shard; a parameter every tp
  // rank holds whole counts on tp rank 0 only).
  norm_params_ = zero_ ? zero_->shard_params() : optimizer_->gradient_holders();
  if (zero_) {
    zero_norm_ = sharded_grad_norm({groups_.world}, groups_.coords.tp, zero_->shard_named_params(), parts_.param_dims,
                                   parts_.tied_copy);
  }
  norm_reduction_ = zero_ ? &zero_norm_ : model_norm_reduced_ ? &model_norm_ : nullptr;
}

GradientSync* Update::sync() {
  if (expert_reducer_) return &both_reducers_;
  if (reducer_) return reducer_.get();
  return zero_ && zero_->stage() == 2 && overlap_ ? &*zero_ : nullptr;
}

void Update::zero_grad() { zero_ ? zero_->zero_grad() : optimizer_->zero_grad(); }

void Update::reduce_gradients() {
  if (fp32_grads_) fp32_grads_->flush();
  if (reducer_) reducer_->finish();
  if (expert_reducer_) expert_reducer_->finish();
  if (expert_scale_ != 1.0) {
    at::NoGradGuard no_grad;
    for (torch::Tensor& holder : expert_holders_) {
      if (holder.grad().defined()) holder.mutable_grad().mul_(expert_scale_);
    }
  }
  if (zero_) zero_->reduce_gradients();
}

double Update::clip(double max_norm) {
  return max_norm > 0 ? clip_grad_norm(norm_params_, max_norm, norm_reduction_) : grad_norm(norm_params_, norm_reduction_);
}

void Update::step(double lr) { zero_ ? zero_->step(lr) : optimizer_->step(lr); }

void Update::gather_params() {
  if (zero_ && zero_->stage() == 3) zero_->gather_all();
}

void Update::release_params() {
  if (zero_ && zero_->stage() == 3) zero_->release_all();
}

double Update::unsharded_state_mib() const {
  int64_t local_elements = 0;
  for (const auto& [name, p] : parts_.named_params) {
    // exp_avg and exp_avg_sq, and for a bf16 parameter its fp32 master
    local_elements += (p.scalar_type() == torch::kFloat ? 2 : 3) * p.numel();
  }
  return 4.0 * static_cast<double>(local_elements) / (1024.0 * 1024.0);
}

}  // namespace loom

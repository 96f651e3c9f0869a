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
      overlap_(groups.pp == nullptr),
      clip_in_adamw_(config.fusion.clip_in_adamw),
      params_bf16_(config.precision.params == "bf16"),
      fp32_grad_accum_(params_bf16_ && config.precision.grad_accum == "fp32") {
  if (zero_stage_ == 0) optimizer_.emplace(parts.named_params, options_);
  // bf16 parameters: each micro-batch's gradient is added into an fp32 one
  // beside the master (Note [fp32 gradients of bf16 parameters]); these
  // hooks come before the reducer's, which then reduces the fp32 sums.
  if (optimizer_ && fp32_grad_accum_) fp32_grads_.emplace(*optimizer_);
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
  model_norm_reduced_ = !parts.model_is_whole || groups.ep != nullptr;
  if (model_norm_reduced_) {
    model_norm_ = sharded_grad_norm(model_groups, groups.coords.tp, parts.named_params, parts.param_dims,
                                    parts.tied_copy);
    if (groups.ep != nullptr) {
      for (size_t i = 0; i < parts.named_params.size(); ++i) {
        if (groups.ep->rank() != 0 && !is_split_expert(parts.named_params[i].first)) model_norm_.counted[i] = false;
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
  // all-to-all] in parallel/expert_parallel.h), by their own reducer or
  // under ZeRO their own optimizer (Note [ZeRO with expert parallelism]).
  if (zero_stage_ == 0 && optimizer_) {
    GradientReducer::Options reducer_options;
    reducer_options.bucket_mb = config.parallel.bucket_mb;
    reducer_options.overlap = overlap_;
    reducer_options.reduce_dtype = config.parallel.reduce_dtype == "bf16" ? at::kBFloat16 : at::kFloat;
    const std::vector<torch::Tensor> holders = optimizer_->gradient_holders();
    std::vector<torch::Tensor> dense_params, dense_holders, expert_params;
    for (size_t i = 0; i < parts.named_params.size(); ++i) {
      const bool expert = is_split_expert(parts.named_params[i].first);
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
  }
  if (groups.ep != nullptr) expert_scale_ = 1.0 / static_cast<double>(groups.ep->size());
  both_syncs_.dense = reducer_.get();
  both_syncs_.experts = expert_reducer_.get();
}

Update::~Update() { unstart(); }

void Update::unstart() {
  if (parts_.zero_wrapper) parts_.zero_wrapper->attach(nullptr);
  zero_.reset();
  expert_zero_.reset();
  expert_fp32_grads_.reset();
  expert_adamw_.reset();
}

bool Update::is_split_expert(const std::string& param) const {
  return groups_.ep != nullptr && is_expert_parameter(param);
}

void Update::start() {
  if (zero_stage_ > 0) {
    // ZeRO-1 keeps one unit (Note [ZeRO-1 layout]); ZeRO-2 reduces per
    // decoder layer (Note [ZeRO units]), and ZeRO-3 gathers per layer too.
    // Under ep the experts have an optimizer of their own (Note [ZeRO with
    // expert parallelism]).
    NamedTensors dense, experts;
    for (const auto& named : parts_.named_params) (is_split_expert(named.first) ? experts : dense).push_back(named);
    const auto options_of = [&](const NamedTensors& params) {
      ZeroOptions zero;
      zero.stage = zero_stage_;
      zero.overlap = overlap_;
      zero.fp32_grad_accum = fp32_grad_accum_;
      if (zero_stage_ >= 2) zero.units = zero_units_by_layer(params);
      return zero;
    };
    zero_.emplace(*groups_.dp_data, dense, options_, options_of(dense));
    if (!experts.empty() && groups_.edp_data != nullptr) {
      expert_zero_.emplace(*groups_.edp_data, experts, options_, options_of(experts));
    } else if (!experts.empty()) {
      expert_adamw_.emplace(experts, options_);
      if (fp32_grad_accum_) expert_fp32_grads_.emplace(*expert_adamw_);
    }
    // ZeRO-3: the layers gather their parameters through the wrapper.
    if (parts_.zero_wrapper) parts_.zero_wrapper->attach(&*zero_, expert_zero_ ? &*expert_zero_ : nullptr);
    if (zero_stage_ == 2 && overlap_) {
      both_syncs_.dense = &*zero_;
      both_syncs_.experts = expert_zero_ ? &*expert_zero_ : nullptr;
    }
  }
  // The gradients the norm and the clipping see: the model's, or under
  // ZeRO this rank's shard of the averaged ones, whose squares are summed
  // over every rank (each element is in one dp shard, or an expert's in
  // one edp shard of one ep rank; a parameter every tp rank holds whole
  // counts on tp rank 0 only).
  if (zero_) {
    NamedTensors shards = zero_->shard_named_params();
    if (expert_zero_) {
      const NamedTensors& pieces = expert_zero_->shard_named_params();
      shards.insert(shards.end(), pieces.begin(), pieces.end());
    }
    if (expert_adamw_) {
      const std::vector<torch::Tensor> holders = expert_adamw_->gradient_holders();
      for (size_t i = 0; i < holders.size(); ++i) {
        shards.emplace_back(expert_adamw_->named_params()[i].first, holders[i]);
      }
    }
    norm_params_.clear();
    for (const auto& [name, shard] : shards) norm_params_.push_back(shard);
    zero_norm_ = sharded_grad_norm({groups_.world}, groups_.coords.tp, shards, parts_.param_dims, parts_.tied_copy);
  } else {
    norm_params_ = optimizer_->gradient_holders();
  }
  norm_reduction_ = zero_ ? &zero_norm_ : model_norm_reduced_ ? &model_norm_ : nullptr;
}

GradientSync* Update::sync() {
  if (expert_reducer_ || (zero_ && both_syncs_.experts != nullptr)) return &both_syncs_;
  if (reducer_) return reducer_.get();
  return zero_ && zero_->stage() == 2 && overlap_ ? &*zero_ : nullptr;
}

void Update::zero_grad() {
  grad_factor_ = torch::Tensor();
  if (!zero_) {
    optimizer_->zero_grad();
    return;
  }
  zero_->zero_grad();
  if (expert_zero_) expert_zero_->zero_grad();
  if (expert_adamw_) expert_adamw_->zero_grad();
}

torch::Tensor& Update::gradient_of(const torch::Tensor& param) {
  if (zero_ && fp32_grad_accum_) return zero_->gradient_of(param);  // (the tied weight is no expert)
  if (!fp32_grads_) return param.mutable_grad();
  fp32_grads_->flush();
  const std::vector<torch::Tensor> holders = optimizer_->gradient_holders();
  for (size_t i = 0; i < parts_.named_params.size(); ++i) {
    if (parts_.named_params[i].second.is_same(param)) return holders[i].mutable_grad();
  }
  return param.mutable_grad();
}

void Update::reduce_gradients() {
  if (fp32_grads_) fp32_grads_->flush();
  if (expert_fp32_grads_) expert_fp32_grads_->flush();
  if (reducer_) reducer_->finish();
  if (expert_reducer_) expert_reducer_->finish();
  if (zero_) zero_->reduce_gradients();
  if (expert_zero_) expert_zero_->reduce_gradients();
  if (expert_scale_ != 1.0) {
    // The experts' gradients (averaged over edp, or this rank's shard of
    // that average) divided by ep: Note [expert all-to-all].
    std::vector<torch::Tensor> holders = expert_holders_;
    if (expert_zero_) holders = expert_zero_->shard_params();
    if (expert_adamw_) holders = expert_adamw_->gradient_holders();
    at::NoGradGuard no_grad;
    for (torch::Tensor& holder : holders) {
      if (holder.grad().defined()) holder.mutable_grad().mul_(expert_scale_);
    }
  }
}

double Update::clip(double max_norm) {
  grad_factor_ = torch::Tensor();
  if (!(max_norm > 0)) return grad_norm(norm_params_, norm_reduction_);
  if (!clip_in_adamw_ || zero_) return clip_grad_norm(norm_params_, max_norm, norm_reduction_);
  const GradClip clip = grad_clip(norm_params_, max_norm, norm_reduction_);
  grad_factor_ = clip.factor;
  return clip.norm.defined() ? clip.norm.item<double>() : 0.0;
}

void Update::step(double lr) {
  if (!zero_) {
    optimizer_->step(lr, grad_factor_);
    grad_factor_ = torch::Tensor();
    return;
  }
  zero_->step(lr);
  if (expert_zero_) expert_zero_->step(lr);
  if (expert_adamw_) expert_adamw_->step(lr);
}

void Update::gather_params() {
  if (!zero_ || zero_->stage() != 3) return;
  zero_->gather_all();
  if (expert_zero_) expert_zero_->gather_all();
}

void Update::release_params() {
  if (!zero_ || zero_->stage() != 3) return;
  zero_->release_all();
  if (expert_zero_) expert_zero_->release_all();
}

double Update::unsharded_state_mib() const {
  int64_t local_elements = 0;
  for (const auto& [name, p] : parts_.named_params) {
    // exp_avg and exp_avg_sq, and for a bf16 parameter its fp32 master
    local_elements += (p.scalar_type() == torch::kFloat ? 2 : 3) * p.numel();
  }
  return 4.0 * static_cast<double>(local_elements) / (1024.0 * 1024.0);
}

int64_t Update::zero_state_bytes() const {
  int64_t bytes = zero_ ? zero_->state_bytes() : 0;
  if (expert_zero_) bytes += expert_zero_->state_bytes();
  if (expert_adamw_) {
    for (const auto& [name, tensor] : expert_adamw_->state_dict()) {
      if (name != AdamW::kStepEntry) bytes += tensor.numel() * static_cast<int64_t>(tensor.element_size());
    }
  }
  return bytes;
}

int64_t Update::zero_shard_numel() const {
  int64_t numel = zero_ ? zero_->shard_numel() : 0;
  if (expert_zero_) numel += expert_zero_->shard_numel();
  return numel;
}

NamedTensors Update::local_state_dict() const {
  if (!zero_) return optimizer_->state_dict();
  NamedTensors state = zero_->local_state_dict();
  const NamedTensors experts = expert_zero_   ? expert_zero_->local_state_dict()
                               : expert_adamw_ ? expert_adamw_->state_dict()
                                               : NamedTensors{};
  for (const auto& entry : experts) {
    if (entry.first != AdamW::kStepEntry) state.push_back(entry);
  }
  return state;
}

void Update::load_local_state_dict(const NamedTensors& state) {
  if (!zero_) {
    optimizer_->load_state_dict(state);
    return;
  }
  // Each optimizer takes its parameters' entries, and every one the step.
  NamedTensors dense, experts;
  for (const auto& entry : state) {
    if (entry.first == AdamW::kStepEntry) {
      dense.push_back(entry);
      experts.push_back(entry);
    } else {
      (is_split_expert(AdamW::param_of_entry(entry.first)) ? experts : dense).push_back(entry);
    }
  }
  zero_->load_local_state_dict(dense);
  if (expert_zero_) expert_zero_->load_local_state_dict(experts);
  if (expert_adamw_) expert_adamw_->load_state_dict(experts);
}

std::optional<Range> Update::state_range(const std::string& param) const {
  if (!zero_) return std::nullopt;
  if (!is_split_expert(param)) return zero_->piece_range(param);
  if (expert_zero_) return expert_zero_->piece_range(param);
  return std::nullopt;
}

bool Update::master_in_pieces(const std::string& param) const {
  if (!zero_ || !params_bf16_) return false;
  return !is_split_expert(param) || expert_zero_;
}

int64_t Update::step_count() const { return zero_ ? zero_->step_count() : optimizer_->step_count(); }

}  // namespace loom

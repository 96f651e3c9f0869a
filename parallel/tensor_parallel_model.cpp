#include "parallel/tensor_parallel_model.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "model/init.h"
#include "parallel/vocab_parallel.h"
#include "util/error.h"

namespace loom {

namespace {

// A whole RMSNorm applied to this rank's part of its input: its slice of the
// sequence (sequence parallelism), or its heads (a per-head q/k norm). The
// weight's gradient from one part is a partial sum; f (copy_to_tp) sums it
// over the group in backward, so every rank ends with the whole gradient.
class PartialInputRMSNorm : public RMSNorm {
 public:
  PartialInputRMSNorm(ProcessGroup& tp, int64_t hidden, double eps, NormWeight style)
      : RMSNorm(hidden, eps, style), tp_(&tp) {}
  torch::Tensor forward(const torch::Tensor& x) override { return normalize(x, copy_to_tp(*tp_, weight)); }

 private:
  ProcessGroup* tp_;
};

// RMSNorm over the features of a column-parallel linear's output, which this
// rank holds a slice of (its heads): weight [features/tp], chunk tp_rank of
// the whole one. Each token's mean square is over all the features: the
// per-rank sums of squares are all-reduced. The sum goes through g then f
// (reduce_from_tp, copy_to_tp): every rank's result depends on every rank's
// inputs, so backward all-reduces the gradient too. fp32 arithmetic, as
// Hugging Face's Olmo2RMSNorm.
class ShardedProjectionRMSNorm : public RMSNorm, public TensorParallelLayer {
 public:
  ShardedProjectionRMSNorm(ProcessGroup& tp, int64_t features, double eps)
      : RMSNorm(local_features(tp, features), eps), tp_(&tp), features_(features), epsilon_(eps) {}
  torch::Tensor forward(const torch::Tensor& x) override {
    const auto x32 = x.to(torch::kFloat);
    const auto sum_of_squares = copy_to_tp(*tp_, reduce_from_tp(*tp_, x32.pow(2).sum(-1, /*keepdim=*/true)));
    const auto normed = x32 * at::rsqrt(sum_of_squares / static_cast<double>(features_) + epsilon_);
    return (weight * normed).to(x.scalar_type());
  }
  int64_t shard_dim(const std::string& /*parameter*/) const override { return 0; }

 private:
  static int64_t local_features(ProcessGroup& tp, int64_t features) {
    if (features % tp.size() != 0) {
      throw BadInput("a q/k norm of " + std::to_string(features) + " features does not split over parallel.tp " +
                     std::to_string(tp.size()));
    }
    return features / tp.size();
  }

  ProcessGroup* tp_;
  int64_t features_;
  double epsilon_;  // RMSNorm keeps its own private
};

// A linear every rank holds whole that reads this rank's slice of the
// sequence (a router under sequence parallelism, Note [experts under tensor
// parallelism] in model/moe.h): its weight's gradient from one slice is a
// partial sum, which f (copy_to_tp) sums over the group in backward, as
// PartialInputRMSNorm does for a norm's weight.
class SequenceSliceLinear : public Linear {
 public:
  SequenceSliceLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias) : tp_(&tp) {
    weight_ = register_parameter("weight", torch::empty({out_features, in_features}));
    if (bias) bias_ = register_parameter("bias", torch::zeros({out_features}));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    return at::linear(x, copy_to_tp(*tp_, weight_),
                      bias_.defined() ? std::optional<at::Tensor>(copy_to_tp(*tp_, bias_)) : std::nullopt);
  }

 private:
  ProcessGroup* tp_;
  torch::Tensor weight_;
  torch::Tensor bias_;
};

// Note [experts under tensor parallelism] (model/moe.h): one collective
// into a mixture-of-experts block and one out of it, for all its experts.
class TensorParallelExpertCollectives : public ExpertCollectives {
 public:
  TensorParallelExpertCollectives(ProcessGroup& tp, bool sequence_parallel)
      : tp_(&tp), sequence_parallel_(sequence_parallel) {}
  torch::Tensor expert_input(const torch::Tensor& x_btd) const override {
    return column_input(*tp_, x_btd, sequence_parallel_);
  }
  torch::Tensor token_values(const torch::Tensor& v_btn) const override {
    return sequence_parallel_ ? gather_from_sp(*tp_, v_btn) : copy_to_tp(*tp_, v_btn);
  }
  torch::Tensor token_ids(const torch::Tensor& ids_btn) const override {
    if (!sequence_parallel_) return ids_btn;
    at::NoGradGuard no_grad;
    return gather_from_sp(*tp_, ids_btn);
  }
  torch::Tensor output(const torch::Tensor& y_btd) const override {
    return sequence_parallel_ ? reduce_scatter_to_sp(*tp_, y_btd) : reduce_from_tp(*tp_, y_btd);
  }

 private:
  ProcessGroup* tp_;
  bool sequence_parallel_;
};

int64_t dim_of(const std::map<std::string, int64_t>& shard_dim, const std::string& name) {
  const auto it = shard_dim.find(name);
  if (it == shard_dim.end()) throw std::logic_error("no tensor-parallel shard dim for '" + name + "'");
  return it->second;
}

}  // namespace

TensorParallelLayerFactory::TensorParallelLayerFactory(ProcessGroup& tp, bool sequence_parallel)
    : tp_(&tp), sequence_parallel_(sequence_parallel), shared_input_(std::make_shared<SharedColumnInput>()) {}

std::shared_ptr<Linear> TensorParallelLayerFactory::linear(int64_t in_features, int64_t out_features, bool bias,
                                                           LinearRole role) const {
  switch (role) {
    case LinearRole::kColumn: {
      ColumnParallelLinear::Options options;
      options.sequence_parallel = sequence_parallel_;
      options.shared_input = shared_input_;
      return std::make_shared<ColumnParallelLinear>(*tp_, in_features, out_features, bias, options);
    }
    case LinearRole::kRow: {
      RowParallelLinear::Options options;
      options.sequence_parallel = sequence_parallel_;
      return std::make_shared<RowParallelLinear>(*tp_, in_features, out_features, bias, options);
    }
    case LinearRole::kReplicated:
      if (sequence_parallel_ && tp_->size() > 1) {
        return std::make_shared<SequenceSliceLinear>(*tp_, in_features, out_features, bias);
      }
      break;
  }
  return local_.linear(in_features, out_features, bias, role);
}

std::shared_ptr<Linear> TensorParallelLayerFactory::expert_linear(int64_t in_features, int64_t out_features,
                                                                  LinearRole role) const {
  switch (role) {
    case LinearRole::kColumn:
      return std::make_shared<ColumnParallelLinear>(*tp_, in_features, out_features, /*bias=*/false,
                                                    ColumnParallelLinear::Options{.input_ready = true});
    case LinearRole::kRow:
      return std::make_shared<RowParallelLinear>(*tp_, in_features, out_features, /*bias=*/false,
                                                 RowParallelLinear::Options{.reduce_output = false});
    case LinearRole::kReplicated:
      break;
  }
  return linear(in_features, out_features, /*bias=*/false, role);
}

std::shared_ptr<ExpertCollectives> TensorParallelLayerFactory::expert_collectives() const {
  return std::make_shared<TensorParallelExpertCollectives>(*tp_, sequence_parallel_);
}

std::shared_ptr<Embedding> TensorParallelLayerFactory::embedding(int64_t vocab, int64_t hidden) const {
  return std::make_shared<VocabParallelEmbedding>(*tp_, vocab, hidden,
                                                  VocabParallelEmbedding::Options{sequence_parallel_});
}

std::shared_ptr<LmHead> TensorParallelLayerFactory::lm_head(int64_t hidden, int64_t vocab,
                                                            std::shared_ptr<Embedding> tied) const {
  return std::make_shared<VocabParallelLmHead>(*tp_, hidden, vocab, std::move(tied),
                                               VocabParallelLmHead::Options{sequence_parallel_});
}

std::shared_ptr<RMSNorm> TensorParallelLayerFactory::norm(int64_t hidden, double eps, NormWeight style) const {
  if (sequence_parallel_ && tp_->size() > 1) return std::make_shared<PartialInputRMSNorm>(*tp_, hidden, eps, style);
  return local_.norm(hidden, eps, style);
}

std::shared_ptr<RMSNorm> TensorParallelLayerFactory::head_norm(int64_t head_dim, double eps, NormWeight style) const {
  // Each rank normalizes only its own heads (with or without sequence
  // parallelism: q and k hold the whole sequence).
  if (tp_->size() > 1) return std::make_shared<PartialInputRMSNorm>(*tp_, head_dim, eps, style);
  return local_.head_norm(head_dim, eps, style);
}

std::shared_ptr<RMSNorm> TensorParallelLayerFactory::projection_norm(int64_t features, double eps) const {
  if (tp_->size() > 1) return std::make_shared<ShardedProjectionRMSNorm>(*tp_, features, eps);
  return local_.projection_norm(features, eps);
}

std::map<std::string, int64_t> tensor_parallel_shard_dims(const torch::nn::Module& model) {
  std::map<std::string, int64_t> dims;
  for (const auto& named : model.named_parameters()) dims[named.key()] = -1;
  for (const auto& module : model.named_modules("", /*include_self=*/false)) {
    const auto* layer = dynamic_cast<const TensorParallelLayer*>(module.value().get());
    if (layer == nullptr) continue;
    for (const auto& param : module.value()->named_parameters(/*recurse=*/false)) {
      dims[module.key() + "." + param.key()] = layer->shard_dim(param.key());
    }
  }
  return dims;
}

std::map<std::string, int64_t> tensor_parallel_unpadded_sizes(const torch::nn::Module& model) {
  std::map<std::string, int64_t> sizes;
  for (const auto& module : model.named_modules("", /*include_self=*/false)) {
    const auto* layer = dynamic_cast<const TensorParallelLayer*>(module.value().get());
    if (layer == nullptr) continue;
    for (const auto& param : module.value()->named_parameters(/*recurse=*/false)) {
      const int64_t size = layer->unpadded_size(param.key());
      if (size < 0) continue;
      if (layer->shard_dim(param.key()) != 0) {
        throw std::logic_error("tensor-parallel padding of '" + module.key() + "." + param.key() +
                               "' along another dim than 0");
      }
      sizes[module.key() + "." + param.key()] = size;
    }
  }
  return sizes;
}

at::Tensor tensor_parallel_shard(const std::string& name, const at::Tensor& full, int64_t dim, int64_t rank,
                                 int64_t size, bool padded) {
  if (dim < 0 || size == 1) return full.clone(at::MemoryFormat::Contiguous);
  if (padded && dim == 0 && full.dim() == 2) return shard_vocab_rows(full, rank, size);
  if (dim >= full.dim() || full.size(dim) % size != 0) {
    throw BadInput(name + ": " + describe_tensor(full) + " does not split into " + std::to_string(size) +
                   " equal chunks along dim " + std::to_string(dim) + " (parallel.tp " + std::to_string(size) + ")");
  }
  const int64_t n = full.size(dim) / size;
  return full.narrow(dim, rank * n, n).clone(at::MemoryFormat::Contiguous);
}

void load_tensor_parallel_shards(torch::nn::Module& local, const NamedTensors& full, int64_t rank, int64_t size) {
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : full) by_name[name] = &tensor;
  const std::map<std::string, int64_t> dims = tensor_parallel_shard_dims(local);
  const std::map<std::string, int64_t> unpadded = tensor_parallel_unpadded_sizes(local);
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (destination, shard): checked first, copied after
  for (const auto& named : local.named_parameters()) {
    const std::string& name = named.key();
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw BadInput("tensor-parallel load: no full tensor for parameter '" + name + "'");
    const auto padded = unpadded.find(name);
    if (padded != unpadded.end() && it->second->size(0) != padded->second) {
      throw BadInput("tensor-parallel load: '" + name + "' is " + describe_tensor(*it->second) + ", expected " +
                     std::to_string(padded->second) + " rows");
    }
    at::Tensor shard = tensor_parallel_shard(name, *it->second, dims.at(name), rank, size, padded != unpadded.end());
    if (shard.sizes() != named.value().sizes()) {
      throw BadInput("tensor-parallel load: '" + name + "' is " + describe_tensor(*it->second) + ", whose shard " +
                     std::to_string(rank) + " of " + std::to_string(size) + " is " + describe_tensor(shard) +
                     ", but this rank's parameter is " + describe_tensor(named.value()));
    }
    copies.emplace_back(named.value(), std::move(shard));
  }
  at::NoGradGuard no_grad;
  for (auto& [destination, shard] : copies) destination.copy_(shard);
}

void init_tensor_parallel_shards(torch::nn::Module& local, double init_std, uint64_t seed, int64_t rank,
                                 int64_t size) {
  const std::map<std::string, int64_t> dims = tensor_parallel_shard_dims(local);
  const std::map<std::string, int64_t> unpadded = tensor_parallel_unpadded_sizes(local);
  for (const auto& named : local.named_parameters()) {
    at::Tensor shard = named.value();
    std::vector<int64_t> full_shape = shard.sizes().vec(), start(shard.dim(), 0);
    const int64_t dim = dims.at(named.key());
    if (dim >= 0 && size > 1) {  // as tensor_parallel_shard cuts it: equal chunks, rank r's the r-th
      full_shape[dim] *= size;
      start[dim] = rank * shard.size(dim);
    }
    const auto padded = unpadded.find(named.key());
    if (padded != unpadded.end()) {
      // The vocabulary's rows this rank holds draw the whole model's values
      // (they depend on the row, not on how many rows there are); its
      // padding rows are zeros (Note [vocab padding]).
      at::NoGradGuard no_grad;
      full_shape[0] = padded->second;
      const int64_t tokens = vocab_rows_of_rank(padded->second, rank, size);
      shard.narrow(0, tokens, shard.size(0) - tokens).zero_();
      if (tokens == 0) continue;
      shard = shard.narrow(0, 0, tokens);
    }
    init_parameter_box(named.key(), shard, full_shape, start, init_std, seed);
  }
}

NamedTensors gather_tensor_parallel(ProcessGroup& tp, const NamedTensors& local,
                                    const std::map<std::string, int64_t>& shard_dim,
                                    const std::map<std::string, int64_t>& unpadded_size) {
  at::NoGradGuard no_grad;
  NamedTensors full;
  full.reserve(local.size());
  const int64_t size = tp.size();
  for (const auto& [name, tensor] : local) {
    const int64_t dim = dim_of(shard_dim, name);
    const at::Tensor cpu = tensor.detach().to(at::kCPU).contiguous();
    if (dim < 0 || size == 1) {
      full.emplace_back(name, cpu.clone());
      continue;
    }
    // All-gather concatenates along dim 0; chunks of another dim are joined after.
    std::vector<int64_t> gathered_shape = cpu.sizes().vec();
    gathered_shape[0] *= size;
    at::Tensor gathered = at::empty(gathered_shape, cpu.options());
    tp.all_gather(gathered, cpu)->wait();
    const auto padded = unpadded_size.find(name);
    if (padded != unpadded_size.end()) {  // padding is along dim 0, at its end: cut off
      full.emplace_back(name, gathered.narrow(0, 0, padded->second).clone());
      continue;
    }
    full.emplace_back(name, dim == 0 ? gathered : at::cat(gathered.chunk(size, 0), dim));
  }
  return full;
}

GradNormReduction sharded_grad_norm(std::vector<ProcessGroup*> sum_over, int64_t tp_rank, const NamedTensors& params,
                                    const std::map<std::string, int64_t>& shard_dim,
                                    const std::string& counted_elsewhere) {
  GradNormReduction reduction;
  for (const auto& [name, param] : params) {
    reduction.counted.push_back(name != counted_elsewhere && (dim_of(shard_dim, name) >= 0 || tp_rank == 0));
  }
  reduction.sum_over_ranks = [groups = std::move(sum_over)](torch::Tensor& sum_of_squares) {
    for (ProcessGroup* group : groups) all_reduce_through_cpu(*group, sum_of_squares);
  };
  return reduction;
}

}  // namespace loom

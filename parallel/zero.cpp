#include "parallel/zero.h"

#include <ATen/ATen.h>

#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#include "util/error.h"

namespace loom {

namespace {
constexpr const char* kStep = "optimizer.step";
constexpr const char* kKinds[] = {"optimizer.exp_avg.", "optimizer.exp_avg_sq."};
}  // namespace

ShardedAdamW::ShardedAdamW(ProcessGroup& dp, NamedTensors params, AdamWOptions options)
    : dp_(&dp), params_(std::move(params)) {
  int64_t total = 0;
  for (const auto& [name, param] : params_) {
    if (!param.defined() || param.scalar_type() != at::kFloat) {
      throw std::invalid_argument("ShardedAdamW: parameter '" + name + "' must be a defined fp32 tensor");
    }
    offsets_.push_back(total);
    total += param.numel();
  }
  const int64_t size = dp_->size();
  shard_size_ = (total + size - 1) / size;
  total_ = shard_size_ * size;
  at::NoGradGuard no_grad;
  const auto options_fp32 = params_.empty() ? at::TensorOptions(at::kFloat) : params_[0].second.options();
  flat_params_ = at::zeros({total_}, options_fp32);
  for (size_t i = 0; i < params_.size(); ++i) {
    flat_params_.narrow(0, offsets_[i], params_[i].second.numel()).copy_(params_[i].second.reshape({-1}));
  }
  shard_grad_ = at::zeros({shard_size_}, options_fp32);
  // Note [ZeRO-1 layout]: the pieces of this rank's range, each a view of
  // the flat parameters whose gradient is a view of the shard's gradient.
  const int64_t lo = dp_->rank() * shard_size_, hi = lo + shard_size_;
  NamedTensors pieces;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t begin = std::max(lo, offsets_[i]), end = std::min(hi, offsets_[i] + params_[i].second.numel());
    if (begin >= end) continue;
    pieces_.push_back({i, begin - offsets_[i], begin, end - begin});
    at::Tensor piece = flat_params_.narrow(0, begin, end - begin);
    piece.mutable_grad() = shard_grad_.narrow(0, begin - lo, end - begin);
    pieces.emplace_back(params_[i].first, piece);
  }
  shard_ = std::make_unique<AdamW>(std::move(pieces), options);
}

void ShardedAdamW::zero_grad() {
  for (auto& [name, param] : params_) {
    if (param.grad().defined()) param.mutable_grad().zero_();
  }
}

void ShardedAdamW::reduce_gradients() {
  at::NoGradGuard no_grad;
  at::Tensor flat_grad = at::zeros({total_}, flat_params_.options());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& grad = params_[i].second.grad();
    if (grad.defined()) flat_grad.narrow(0, offsets_[i], grad.numel()).copy_(grad.reshape({-1}));
  }
  dp_->reduce_scatter(shard_grad_, flat_grad, {ReduceOp::kAvg})->wait();
}

void ShardedAdamW::step(double lr) {
  shard_->step(lr);
  at::NoGradGuard no_grad;
  const at::Tensor mine = flat_params_.narrow(0, dp_->rank() * shard_size_, shard_size_).clone();
  dp_->all_gather(flat_params_, mine)->wait();
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& param = params_[i].second;
    param.copy_(flat_params_.narrow(0, offsets_[i], param.numel()).view(param.sizes()));
  }
}

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, tensor] : shard_->state_dict()) {
    if (name != kStep) bytes += tensor.numel() * static_cast<int64_t>(tensor.element_size());
  }
  return bytes;
}

NamedTensors ShardedAdamW::state_dict() const {
  at::NoGradGuard no_grad;
  const NamedTensors mine = shard_->state_dict();
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : mine) by_name[name] = &tensor;
  const int64_t lo = dp_->rank() * shard_size_;
  std::vector<at::Tensor> whole_flat;
  for (const char* kind : kKinds) {
    at::Tensor shard = at::zeros({shard_size_}, flat_params_.options());
    for (const Piece& piece : pieces_) {
      shard.narrow(0, piece.flat_offset - lo, piece.numel)
          .copy_(by_name.at(kind + params_[piece.param].first)->reshape({-1}));
    }
    at::Tensor flat = at::empty({total_}, flat_params_.options());
    dp_->all_gather(flat, shard)->wait();
    whole_flat.push_back(flat);
  }
  NamedTensors out;
  out.emplace_back(kStep, by_name.at(kStep)->clone());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& param = params_[i].second;
    for (size_t k = 0; k < 2; ++k) {
      out.emplace_back(kKinds[k] + params_[i].first,
                       whole_flat[k].narrow(0, offsets_[i], param.numel()).view(param.sizes()).clone());
    }
  }
  return out;
}

std::pair<int64_t, int64_t> ShardedAdamW::piece_range(const std::string& name) const {
  for (const Piece& piece : pieces_) {
    if (params_[piece.param].first == name) return {piece.param_offset, piece.param_offset + piece.numel};
  }
  throw std::out_of_range("ZeRO-1: this rank holds no piece of '" + name + "'");
}

void ShardedAdamW::load_state_dict(const NamedTensors& whole) {
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : whole) by_name[name] = &tensor;
  auto take = [&](const std::string& name, at::IntArrayRef shape) -> const at::Tensor& {
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw BadInput("optimizer state: missing entry '" + name + "'");
    if (it->second->sizes() != shape) {
      throw BadInput("optimizer state: '" + name + "' is " + describe_tensor(*it->second) + ", expected shape " +
                     c10::str(shape));
    }
    return *it->second;
  };
  // Every entry is checked on every rank (each sees the whole state), so a
  // bad state is refused by all of them, not only by the owner of the piece.
  for (const auto& [name, param] : params_) {
    for (const char* kind : kKinds) take(kind + name, param.sizes());
  }
  NamedTensors mine;
  mine.emplace_back(kStep, take(kStep, {}));
  for (const Piece& piece : pieces_) {
    const auto& [name, param] = params_[piece.param];
    for (const char* kind : kKinds) {
      const at::Tensor& full = take(kind + name, param.sizes());
      mine.emplace_back(kind + name, full.reshape({-1}).narrow(0, piece.param_offset, piece.numel).clone());
    }
  }
  shard_->load_state_dict(mine);
}

}  // namespace loom

#include "optim/fp32_gradients.h"

#include <ATen/ATen.h>

namespace loom {

namespace {

void move_into(torch::Tensor& param, const torch::Tensor& holder) {
  if (!param.grad().defined()) return;
  at::NoGradGuard no_grad;
  holder.grad().add_(param.grad());
  param.mutable_grad().reset();
}

}  // namespace

Fp32GradientAccumulation::Fp32GradientAccumulation(AdamW& optimizer) {
  optimizer.keep_fp32_gradients();
  const std::vector<torch::Tensor> params = optimizer.params(), holders = optimizer.gradient_holders();
  for (size_t i = 0; i < params.size(); ++i) {
    if (holders[i].is_same(params[i])) continue;  // an fp32 parameter keeps its own .grad
    params_.push_back(params[i]);
    holders_.push_back(holders[i]);
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    hooks_.add(params_[i], [this, i] { move_into(params_[i], holders_[i]); });
  }
}

void Fp32GradientAccumulation::flush() {
  for (size_t i = 0; i < params_.size(); ++i) move_into(params_[i], holders_[i]);
}

}  // namespace loom

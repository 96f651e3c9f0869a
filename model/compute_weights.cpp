#include "model/compute_weights.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>

namespace loom {

namespace {

// The live scope, if any. One training loop runs at a time; recomputation
// reads it from the backward thread, hence atomic.
std::atomic<ComputeWeights*> active_scope{nullptr};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Forward: the cached low-precision copy (a fresh handle on its storage, so
// that each use gets its own place in the graph). Backward: the gradient is
// added into the fp32 weight's .grad here, in one kernel, and none is
// returned for the weight, so autograd does not cast it back and add it a
// second time.
class CachedCast : public torch::autograd::Function<CachedCast> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& weight, const torch::Tensor& cast) {
    ctx->saved_data["weight"] = weight;
    return cast.detach();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const torch::Tensor& grad = grad_outputs[0];
    if (grad.defined()) {
      torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      torch::NoGradGuard no_grad;
      torch::Tensor& accumulated = weight.mutable_grad();
      if (accumulated.defined()) {
        accumulated.add_(grad);
      } else {
        accumulated = grad.to(weight.scalar_type());
      }
    }
    return {torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

ComputeWeights::ComputeWeights(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  ComputeWeights* expected = nullptr;
  if (!active_scope.compare_exchange_strong(expected, this)) {
    throw std::logic_error("ComputeWeights: another scope is already alive");
  }
}

ComputeWeights::~ComputeWeights() {
  if (enabled_) active_scope.store(nullptr);
}

torch::Tensor ComputeWeights::cast(const torch::Tensor& weight, at::ScalarType dtype) {
  std::lock_guard<std::mutex> lock(mutex_);
  Entry& entry = entries_[weight.unsafeGetTensorImpl()];
  if (entry.stale || entry.cast.scalar_type() != dtype) {
    torch::NoGradGuard no_grad;
    if (entry.cast.defined() && entry.cast.scalar_type() == dtype && entry.cast.sizes() == weight.sizes()) {
      entry.cast.copy_(weight.detach());
    } else {
      entry.cast = weight.detach().to(dtype);
    }
    entry.stale = false;
    ++casts_;
  }
  return entry.cast;
}

void ComputeWeights::weights_changed() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [impl, entry] : entries_) entry.stale = true;
}

torch::Tensor compute_weight(const torch::Tensor& weight) {
  ComputeWeights* scope = active_scope.load();
  if (scope == nullptr || weight.scalar_type() != torch::kFloat) return weight;
  const at::DeviceType device = weight.device().type();
  if (!at::autocast::is_autocast_enabled(device)) return weight;
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  if (dtype == torch::kFloat) return weight;
  torch::Tensor cast = scope->cast(weight, dtype);
  if (!torch::GradMode::is_enabled() || !weight.requires_grad()) return cast;
  return CachedCast::apply(weight, cast);
}

}  // namespace loom

#include "model/compute_weights.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>

#include "model/kernels/fused_ops.h"

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

// Note [weight-gradient accumulation]. Forward: at::linear of the cached
// low-precision weight. Backward: the input's gradient as at::linear's
// (grad_out @ weight), the weight's added into its fp32 .grad here, and the
// bias's (already cast to the compute dtype by the caller, so autograd takes
// it on to the fp32 bias) as the rows' sum.
class FusedWgradLinear : public torch::autograd::Function<FusedWgradLinear> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& cast, const std::optional<torch::Tensor>& bias) {
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["cast"] = cast;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({x});
    return at::linear(x, cast, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const torch::Tensor& grad = grad_outputs[0];
    if (!grad.defined()) return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    const torch::Tensor x = ctx->get_saved_variables()[0];
    const torch::Tensor cast = ctx->saved_data["cast"].toTensor();
    torch::Tensor grad_x;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(grad, cast);
    const torch::Tensor rows_grad = grad.reshape({-1, grad.size(-1)});
    {
      torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      torch::NoGradGuard no_grad;
      torch::Tensor& accumulated = weight.mutable_grad();
      if (!accumulated.defined()) accumulated = at::zeros_like(weight, at::MemoryFormat::Contiguous);
      kernels::accumulate_weight_gradient(accumulated, rows_grad, x.reshape({-1, x.size(-1)}));
    }
    torch::Tensor grad_bias;
    if (ctx->saved_data["has_bias"].toBool()) grad_bias = rows_grad.sum(0);
    return {grad_x, torch::Tensor(), torch::Tensor(), grad_bias};
  }
};

}  // namespace

ComputeWeights::ComputeWeights(bool enabled, bool fuse_weight_gradients)
    : enabled_(enabled), fuse_weight_gradients_(enabled && fuse_weight_gradients) {
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

namespace {

// The scope's cast of `weight` when a scope is alive and autocast would cast
// it (an fp32 weight with autocast on for its device); else undefined.
torch::Tensor scoped_cast(ComputeWeights* scope, const torch::Tensor& weight) {
  if (scope == nullptr || weight.scalar_type() != torch::kFloat) return {};
  const at::DeviceType device = weight.device().type();
  if (!at::autocast::is_autocast_enabled(device)) return {};
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  if (dtype == torch::kFloat) return {};
  return scope->cast(weight, dtype);
}

bool records_weight_gradient(const torch::Tensor& weight) {
  return torch::GradMode::is_enabled() && weight.requires_grad();
}

// `cast` in the weight's place, joined to the autograd graph when the
// weight's gradient is recorded.
torch::Tensor in_place_of(const torch::Tensor& weight, const torch::Tensor& cast) {
  return records_weight_gradient(weight) ? CachedCast::apply(weight, cast) : cast;
}

}  // namespace

torch::Tensor compute_weight(const torch::Tensor& weight) {
  const torch::Tensor cast = scoped_cast(active_scope.load(), weight);
  return cast.defined() ? in_place_of(weight, cast) : weight;
}

torch::Tensor compute_linear(const torch::Tensor& x, const torch::Tensor& weight,
                             const std::optional<torch::Tensor>& bias) {
  ComputeWeights* scope = active_scope.load();
  const torch::Tensor cast = scoped_cast(scope, weight);
  if (cast.defined() && scope->fuses_weight_gradients() && records_weight_gradient(weight) && weight.dim() == 2) {
    // What autocast would give at::linear: the input and bias in the compute dtype.
    const at::ScalarType dtype = cast.scalar_type();
    std::optional<torch::Tensor> b;
    if (bias.has_value() && bias->defined()) b = bias->to(dtype);
    return FusedWgradLinear::apply(x.to(dtype), weight, cast, b);
  }
  return at::linear(x, cast.defined() ? in_place_of(weight, cast) : weight, bias);
}

}  // namespace loom

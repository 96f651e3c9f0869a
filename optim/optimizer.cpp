#include "optim/optimizer.h"

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include "util/error.h"

namespace loom {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_string(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

const std::string kStepName = "optimizer.step";
const std::string kExpAvgPrefix = "optimizer.exp_avg.";
const std::string kExpAvgSqPrefix = "optimizer.exp_avg_sq.";
const std::string kMasterPrefix = "optimizer.master.";

}  // namespace

AdamWOptions AdamWOptions::from_config(const OptimizerConfig& config) {
  if (config.betas.size() != 2) {
    throw BadInput("optimizer.betas: expected 2 values [beta1, beta2], got " +
                   std::to_string(config.betas.size()));
  }
  AdamWOptions options;
  options.beta1 = config.betas[0];
  options.beta2 = config.betas[1];
  options.eps = config.eps;
  options.weight_decay = config.weight_decay;
  options.decay_embeddings = config.decay_embeddings;
  return options;
}

bool is_decayed(const std::string& name, bool decay_embeddings) {
  if (ends_with(name, "norm.weight") || ends_with(name, ".bias")) return false;
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return decay_embeddings;
  return true;
}

AdamW::AdamW(NamedTensors params, AdamWOptions options)
    : options_(options), params_(std::move(params)) {
  std::set<std::string> seen;
  state_.reserve(params_.size());
  for (const auto& [name, param] : params_) {
    if (name.empty()) throw std::invalid_argument("AdamW: a parameter has an empty name");
    if (!seen.insert(name).second) throw std::invalid_argument("AdamW: parameter '" + name + "' given twice");
    if (!param.defined()) throw std::invalid_argument("AdamW: parameter '" + name + "' is undefined");
    auto fp32 = param.options().dtype(torch::kFloat);
    ParamState s;
    s.exp_avg = torch::zeros(param.sizes(), fp32);
    s.exp_avg_sq = torch::zeros(param.sizes(), fp32);
    if (param.scalar_type() != torch::kFloat) {
      s.master = param.detach().to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true);
    }
    s.decayed = is_decayed(name, options_.decay_embeddings);
    state_.push_back(std::move(s));
  }
}

NamedTensors to_named_tensors(const torch::OrderedDict<std::string, torch::Tensor>& named) {
  NamedTensors out;
  out.reserve(named.size());
  for (const auto& item : named) out.emplace_back(item.key(), item.value());
  return out;
}

namespace {

// Multiplies every defined gradient of `params` in place by `factor` (a
// 0-dim tensor): the clipping, by clip_grad_norm or inside AdamW::step.
void scale_gradients(const std::vector<torch::Tensor>& params, const torch::Tensor& factor) {
  at::NoGradGuard no_grad;
  for (const auto& param : params) {
    torch::Tensor grad = param.grad();
    if (grad.defined()) grad.mul_(factor.to(grad.device()));
  }
}

}  // namespace

// Note [AdamW step]
// The same ATen calls, in the same order and with the same scalar arguments,
// as torch/optim/adam.py `_single_tensor_adam` with decoupled_weight_decay
// (which is what torch.optim.AdamW runs). Python evaluates the scalar
// expressions in double and so does this code: `beta1**step` and
// `bias_correction2**0.5` are C pow() in CPython, hence std::pow here (not
// std::sqrt, which may round differently). Replacing e.g. lerp_ by
// mul_/add_ would still be AdamW but no longer bit-identical to torch.
void AdamW::step(double lr, const torch::Tensor& grad_factor) {
  at::NoGradGuard no_grad;  // in-place updates of leaves that require grad
  bool all_fused = !params_.empty();
  const std::vector<torch::Tensor> holders = gradient_holders();
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor& param = params_[i].second;
    if (!holders[i].grad().defined()) {
      throw std::runtime_error("AdamW::step: parameter '" + params_[i].first +
                               "' has no gradient (every parameter must have one)");
    }
    all_fused = all_fused && (param.is_cuda() || options_.fused_on_cpu) && param.scalar_type() == torch::kFloat;
  }
  ++step_;
  if (all_fused) {
    fused_step(lr, grad_factor);
    return;
  }
  // clip_grad_norm's multiply, on the gradients it would have scaled.
  if (grad_factor.defined()) scale_gradients(holders, grad_factor);
  const double step = static_cast<double>(step_);
  const double beta1 = options_.beta1, beta2 = options_.beta2;
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);

  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor& param = params_[i].second;
    ParamState& s = state_[i];
    // Non-fp32 parameters are updated through their fp32 master copy.
    torch::Tensor weight = s.master.defined() ? s.master : param.detach();
    torch::Tensor grad = holders[i].grad().detach();
    if (grad.scalar_type() != torch::kFloat) grad = grad.to(torch::kFloat);

    const double weight_decay = s.decayed ? options_.weight_decay : 0.0;
    if (weight_decay != 0) weight.mul_(1 - lr * weight_decay);

    s.exp_avg.lerp_(grad, 1 - beta1);
    s.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    torch::Tensor denom = (s.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(options_.eps);
    weight.addcdiv_(s.exp_avg, denom, -step_size);

    if (s.master.defined()) param.detach().copy_(s.master);
  }
}

// On CUDA, torch's fused AdamW kernel (what torch.optim.AdamW(fused=True)
// runs): one launch per group for all parameters instead of about ten per
// parameter. Same update, but not bit-identical to the single-tensor path
// (the kernel evaluates the arithmetic in its own order), which is why the
// CPU, where loom is checked bit for bit against torch, keeps Note [AdamW step].
void AdamW::fused_step(double lr, const torch::Tensor& grad_factor) {
  // The kernel reads the step count (already incremented) from a tensor per
  // parameter; one scalar on the device serves them all.
  const auto step_tensor =
      torch::full({}, static_cast<double>(step_), params_.front().second.options().dtype(torch::kFloat));
  // The kernel divides each gradient by grad_scale (AMP's unscaling) and
  // writes the quotient back: dividing by 1 / factor is the clipping.
  std::optional<torch::Tensor> grad_scale;
  if (grad_factor.defined()) grad_scale = grad_factor.to(step_tensor.device(), torch::kFloat).reciprocal();
  for (const bool decayed : {true, false}) {
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (state_[i].decayed != decayed) continue;
      params.push_back(params_[i].second.detach());
      grads.push_back(params_[i].second.grad().detach());
      exp_avgs.push_back(state_[i].exp_avg);
      exp_avg_sqs.push_back(state_[i].exp_avg_sq);
      steps.push_back(step_tensor);
    }
    if (params.empty()) continue;
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, lr, options_.beta1,
                      options_.beta2, decayed ? options_.weight_decay : 0.0, options_.eps, /*amsgrad=*/false,
                      /*maximize=*/false, grad_scale);
  }
}

void AdamW::zero_grad() {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor& param = params_[i].second;
    if (param.grad().defined()) param.mutable_grad().zero_();
    torch::Tensor& master = state_[i].master;
    if (master.defined() && master.grad().defined()) master.mutable_grad().zero_();
  }
}

void AdamW::keep_fp32_gradients() {
  for (ParamState& s : state_) {
    if (s.master.defined() && !s.master.grad().defined()) s.master.mutable_grad() = torch::zeros_like(s.master);
  }
}

std::vector<torch::Tensor> AdamW::gradient_holders() const {
  std::vector<torch::Tensor> out;
  out.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor& master = state_[i].master;
    out.push_back(master.defined() && master.grad().defined() ? master : params_[i].second);
  }
  return out;
}

bool AdamW::decays(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].first == name) return state_[i].decayed;
  }
  throw std::invalid_argument("AdamW::decays: no parameter named '" + name + "'");
}

std::vector<torch::Tensor> AdamW::params() const {
  std::vector<torch::Tensor> out;
  out.reserve(params_.size());
  for (const auto& [name, param] : params_) out.push_back(param);
  return out;
}

NamedTensors AdamW::state_dict() const {
  NamedTensors out;
  out.reserve(1 + 3 * params_.size());
  out.emplace_back(kStepName, torch::tensor(step_, torch::kLong).reshape({}));
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    out.emplace_back(kExpAvgPrefix + name, state_[i].exp_avg);
    out.emplace_back(kExpAvgSqPrefix + name, state_[i].exp_avg_sq);
    if (state_[i].master.defined()) out.emplace_back(kMasterPrefix + name, state_[i].master);
  }
  return out;
}

const std::string AdamW::kStepEntry = kStepName;

std::string AdamW::master_entry(const std::string& param) { return kMasterPrefix + param; }

std::string AdamW::param_of_entry(const std::string& entry) {
  for (const std::string* prefix : {&kExpAvgPrefix, &kExpAvgSqPrefix, &kMasterPrefix}) {
    if (entry.starts_with(*prefix)) return entry.substr(prefix->size());
  }
  return "";
}

void AdamW::load_state_dict(const NamedTensors& state) {
  std::map<std::string, const torch::Tensor*> given;
  for (const auto& [name, tensor] : state) {
    if (!given.emplace(name, &tensor).second) throw BadInput("optimizer state: entry '" + name + "' given twice");
  }
  auto take = [&](const std::string& name) -> const torch::Tensor& {
    auto it = given.find(name);
    if (it == given.end()) throw BadInput("optimizer state: missing entry '" + name + "'");
    const torch::Tensor& tensor = *it->second;
    given.erase(it);
    if (!tensor.defined()) throw BadInput("optimizer state: entry '" + name + "' is an undefined tensor");
    return tensor;
  };

  // Validate everything first, so that a refused state leaves ours intact.
  const torch::Tensor& step_tensor = take(kStepName);
  if (step_tensor.numel() != 1 || step_tensor.dim() != 0) {
    throw BadInput("optimizer state: '" + kStepName + "' has shape " + shape_string(step_tensor.sizes()) +
                   ", expected a scalar []");
  }
  const double step_value = step_tensor.item<double>();
  if (!(step_value >= 0) || step_value != std::floor(step_value) || step_value > 9.0e15) {
    throw BadInput("optimizer state: '" + kStepName + "' is " + std::to_string(step_value) +
                   ", expected a whole number >= 0");
  }

  std::vector<std::pair<torch::Tensor, const torch::Tensor*>> copies;  // (ours, theirs)
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& param_name = params_[i].first;
    std::vector<std::pair<std::string, torch::Tensor>> ours = {
        {kExpAvgPrefix + param_name, state_[i].exp_avg},
        {kExpAvgSqPrefix + param_name, state_[i].exp_avg_sq}};
    if (state_[i].master.defined()) ours.emplace_back(kMasterPrefix + param_name, state_[i].master);
    for (const auto& [name, own] : ours) {
      const torch::Tensor& theirs = take(name);
      if (theirs.sizes() != own.sizes()) {
        throw BadInput("optimizer state: entry '" + name + "' has shape " + shape_string(theirs.sizes()) +
                       ", expected " + shape_string(own.sizes()) + " (the parameter's shape)");
      }
      if (theirs.scalar_type() != torch::kFloat) {
        throw BadInput("optimizer state: entry '" + name + "' has dtype " +
                       std::string(c10::toString(theirs.scalar_type())) + ", expected Float (fp32)");
      }
      copies.emplace_back(own, &theirs);
    }
  }
  if (!given.empty()) {
    throw BadInput("optimizer state: unexpected entry '" + given.begin()->first +
                   "' (no such parameter in this optimizer)");
  }

  at::NoGradGuard no_grad;
  for (auto& [own, theirs] : copies) own.copy_(*theirs);
  step_ = static_cast<int64_t>(step_value);
  // A non-fp32 parameter is defined by its master copy: round it in again.
  for (size_t i = 0; i < params_.size(); ++i) {
    if (state_[i].master.defined()) params_[i].second.detach().copy_(state_[i].master);
  }
}

// clip_grad_norm_ as in torch/nn/utils/clip_grad.py (foreach=False):
// per-gradient vector_norm, stacked, vector_norm again; then
// `max_norm / (total + 1e-6)`, which Python evaluates as
// `(total + 1e-6).reciprocal() * max_norm` (Tensor.__rtruediv__), clamped to 1.
namespace {

// The 0-dim fp32 norm on the first gradient's device; undefined without
// gradients (on every rank, with a reduction: a rank that counts none still
// takes part in the sum).
torch::Tensor total_grad_norm(const std::vector<torch::Tensor>& params, const GradNormReduction* reduction) {
  std::vector<torch::Tensor> norms;
  torch::Device first_device = torch::kCPU;
  bool any_grad = false;
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& grad = params[i].grad();
    if (!grad.defined()) continue;
    if (!any_grad) first_device = grad.device();
    any_grad = true;
    if (reduction != nullptr && !reduction->counted.at(i)) continue;
    // fp32 gradients exactly as torch; others (bf16) accumulate in fp32.
    torch::Tensor norm = grad.scalar_type() == torch::kFloat
                             ? at::linalg_vector_norm(grad, 2)
                             : at::linalg_vector_norm(grad, 2, c10::nullopt, false, torch::kFloat);
    norms.push_back(norm.to(first_device));
  }
  if (!any_grad) return {};
  if (reduction == nullptr) return at::linalg_vector_norm(at::stack(norms), 2);
  torch::Tensor sum_of_squares = norms.empty() ? torch::zeros({}, torch::TensorOptions().device(first_device))
                                               : at::stack(norms).square().sum();
  reduction->sum_over_ranks(sum_of_squares);
  return sum_of_squares.sqrt();
}

}  // namespace

double grad_norm(const std::vector<torch::Tensor>& params, const GradNormReduction* reduction) {
  at::NoGradGuard no_grad;
  torch::Tensor total = total_grad_norm(params, reduction);
  return total.defined() ? total.item<double>() : 0.0;
}

GradClip grad_clip(const std::vector<torch::Tensor>& params, double max_norm, const GradNormReduction* reduction) {
  if (!(max_norm > 0)) {
    throw std::invalid_argument("clip_grad_norm: max_norm must be > 0 (got " + std::to_string(max_norm) + ")");
  }
  at::NoGradGuard no_grad;
  torch::Tensor total = total_grad_norm(params, reduction);
  if (!total.defined()) return {};
  // Multiplying by a factor clamped to 1 instead of branching on `norm >
  // max_norm` keeps the decision on the device (no host sync) and is exact
  // when no clipping is needed.
  torch::Tensor clip_coef = (total + 1e-6).reciprocal() * max_norm;
  return {total, at::clamp(clip_coef, c10::nullopt, 1.0)};
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm,
                      const GradNormReduction* reduction) {
  const GradClip clip = grad_clip(params, max_norm, reduction);
  if (!clip.norm.defined()) return 0.0;
  scale_gradients(params, clip.factor);
  return clip.norm.item<double>();
}

bool grads_are_finite(const std::vector<torch::Tensor>& params) {
  at::NoGradGuard no_grad;
  std::vector<torch::Tensor> all_finite;
  for (const auto& param : params) {
    const torch::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    torch::Device first_device = all_finite.empty() ? grad.device() : all_finite.front().device();
    all_finite.push_back(at::isfinite(grad).all().to(first_device));
  }
  if (all_finite.empty()) return true;
  // One host read for all gradients, not one per tensor.
  return at::stack(all_finite).all().item<bool>();
}

}  // namespace loom

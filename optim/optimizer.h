// AdamW on plain libtorch tensors, plus gradient-norm clipping.
//
// loom owns its optimizer (rather than using torch::optim::AdamW) because the
// state layout is part of the checkpoint format: one fp32 `exp_avg` and
// `exp_avg_sq` per parameter, named after the parameter, and one step counter
// shared by all of them. ZeRO-1 (parallel/zero.h) runs this same AdamW over
// the named pieces of each dp rank's share of the parameters.
//
// On the CPU the arithmetic is PyTorch's `torch.optim.AdamW` (single-tensor
// path: foreach=False, fused=False, amsgrad=False, maximize=False) operation
// for operation, so that the same inputs give bit-identical fp32 results;
// tests/interop/test_optimizer_vs_torch.py checks it. See Note [AdamW step].
// When every parameter is fp32 on CUDA, step() runs torch's fused AdamW
// kernel instead (fused=True): the same update to rounding, in two launches.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <torch/ordered_dict.h>
#include <torch/types.h>

#include "config/config.h"

namespace loom {

// A list of (name, tensor) pairs: parameters in, optimizer state out. Names
// are those of named_parameters() ("model.layers.0.mlp.up_proj.weight").
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// module.named_parameters() as NamedTensors, in the same order.
NamedTensors to_named_tensors(const torch::OrderedDict<std::string, torch::Tensor>& named);

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // decoupled; applied to the decay group only
  // Whether model.embed_tokens.weight and lm_head.weight are decayed
  // (optimizer.decay_embeddings); GPT-2/Megatron decay them, some recipes do not.
  bool decay_embeddings = true;
  // Run torch's fused AdamW kernel on the CPU too (it always runs for fp32
  // parameters on CUDA): for tests of the fused path on a machine without a
  // GPU; the CPU default is the single-tensor path of Note [AdamW step].
  bool fused_on_cpu = false;

  // optimizer.betas / eps / weight_decay / decay_embeddings (lr is passed to every step).
  static AdamWOptions from_config(const OptimizerConfig& config);
};

// Whether AdamW applies weight decay to the parameter called `name`. Never to
// norm weights (names ending in "norm.weight": input_layernorm, model.norm,
// q_norm...) or biases (ending in ".bias"); to the embedding and the output
// projection only when `decay_embeddings`.
bool is_decayed(const std::string& name, bool decay_embeddings);

class AdamW {
 public:
  // `params` are updated in place by step(). Their state starts at zero (step
  // 0), on each parameter's device. Parameters whose dtype is not fp32 (bf16)
  // get an fp32 master copy in the state, which step() updates and then
  // rounds into the parameter (precision.params bf16). Throws std::invalid_argument for an empty or
  // repeated name, or an undefined tensor.
  // From a module: AdamW(to_named_tensors(model.named_parameters()), options).
  AdamW(NamedTensors params, AdamWOptions options);

  // One update with learning rate `lr` (the schedule's value for this step).
  // Every parameter must have a gradient: they all share one step counter, so
  // skipping one (as torch does for grad None) would desynchronise its bias
  // correction. Throws std::runtime_error naming the parameter otherwise.
  //
  // With `grad_factor` (a 0-dim fp32 tensor, GradClip::factor), every
  // gradient is first multiplied by it, as clip_grad_norm would have done,
  // and left so (fusion.clip_in_adamw): the fused kernel takes 1 / factor as
  // its grad_scale, which it divides each gradient by as it reads it and
  // writes back, one pass fewer over the gradients than clipping first (the
  // product may differ from clip_grad_norm's by one rounding); the
  // single-tensor path multiplies first, exactly as clip_grad_norm does.
  void step(double lr, const torch::Tensor& grad_factor = {});

  // Zeroes every defined gradient in place rather than resetting it: a
  // gradient may be a view into a larger buffer (ZeRO-1's pieces: Note
  // [ZeRO-1 layout], parallel/zero.h), and a fresh tensor would break that.
  void zero_grad();

  // Note [fp32 gradients of bf16 parameters]
  // precision.grad_accum fp32: each non-fp32 parameter's gradient is summed
  // in fp32, in its master's .grad (a zero fp32 tensor from now on), rather
  // than in the parameter's own bf16 .grad, which would round every
  // micro-batch's sum. Something must move the parameter's gradient there
  // as it arrives (Fp32GradientAccumulation, optim/fp32_gradients.h);
  // step(), the norm and the dp reduction read gradient_holders()' .grad.
  void keep_fp32_gradients();
  // For each parameter, in order, the tensor whose .grad holds its
  // gradient: its fp32 master after keep_fp32_gradients(), else the
  // parameter itself.
  std::vector<torch::Tensor> gradient_holders() const;

  int64_t step_count() const { return step_; }
  const AdamWOptions& options() const { return options_; }
  bool decays(const std::string& name) const;
  std::vector<torch::Tensor> params() const;
  const NamedTensors& named_params() const { return params_; }

  // The whole state for a checkpoint, in a fixed order:
  //   optimizer.step                  int64 scalar
  //   optimizer.exp_avg.NAME          fp32, NAME's shape   (for each parameter, in order)
  //   optimizer.exp_avg_sq.NAME       fp32, NAME's shape
  //   optimizer.master.NAME           fp32, only for parameters that are not fp32
  // The tensors are the optimizer's own (not copies) on the parameters'
  // devices: copy them before the next step() if they must outlive it.
  NamedTensors state_dict() const;

  // Replaces the state with `state`, which must hold exactly the entries
  // state_dict() lists, each with the same shape, fp32 (step: any integer or
  // whole-valued scalar >= 0), on any device. Everything is checked before
  // anything is copied; a missing, unexpected, misshapen or mistyped entry is
  // loom::BadInput naming it, and leaves the state untouched.
  void load_state_dict(const NamedTensors& state);

  // The name of state_dict()'s step entry, and the parameter an entry
  // belongs to: NAME for optimizer.exp_avg.NAME, exp_avg_sq.NAME and
  // master.NAME; "" for the step.
  static const std::string kStepEntry;
  static std::string param_of_entry(const std::string& entry);
  // The name of the master entry of parameter `param` (optimizer.master.NAME).
  static std::string master_entry(const std::string& param);

 private:
  struct ParamState {
    torch::Tensor exp_avg;     // fp32
    torch::Tensor exp_avg_sq;  // fp32
    torch::Tensor master;      // fp32 copy of a non-fp32 parameter; undefined for fp32 ones
    bool decayed = true;
  };

  // step() when every parameter is fp32 on CUDA (or options_.fused_on_cpu).
  void fused_step(double lr, const torch::Tensor& grad_factor);

  AdamWOptions options_;
  NamedTensors params_;
  std::vector<ParamState> state_;  // parallel to params_
  int64_t step_ = 0;
};

// How the gradient norm of a model cut over ranks is put together: each rank
// holds part of the gradients, and the global norm is sqrt of the sum over
// ranks of the squares of the gradients each rank counts. A parameter held
// whole by several ranks (a replicated norm weight under tensor parallelism)
// is counted by one of them only.
struct GradNormReduction {
  std::vector<bool> counted;  // parallel to params: whether this rank's gradient enters the norm
  // Replaces a 0-dim fp32 tensor (this rank's sum of squares) by its sum over
  // the ranks. Collective: every rank calls it once per norm.
  std::function<void(torch::Tensor& sum_of_squares)> sum_over_ranks;
};

// The global L2 norm of the defined gradients of `params`, as
// torch.nn.utils.clip_grad_norm_(foreach=False) computes it: each gradient's
// norm in fp32, then the norm of those norms. Non-finite when any gradient is.
// With `reduction` the norm is that of the gradients of all ranks together
// (GradNormReduction), the same number on every rank.
double grad_norm(const std::vector<torch::Tensor>& params, const GradNormReduction* reduction = nullptr);

// Computes grad_norm(params), then scales every gradient by
// min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does
// (always multiplying, so the result is bit-identical to torch's). Returns the
// norm before clipping. `max_norm` must be > 0 (optimizer.clip_grad_norm 0
// means: call grad_norm instead); std::invalid_argument otherwise.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm,
                      const GradNormReduction* reduction = nullptr);

// clip_grad_norm without the scaling: the norm, and the factor it would
// scale every gradient by, for AdamW::step to apply; both 0-dim fp32 tensors
// on the first gradient's device (undefined without gradients), not read
// back to the host.
struct GradClip {
  torch::Tensor norm;
  torch::Tensor factor;
};
GradClip grad_clip(const std::vector<torch::Tensor>& params, double max_norm,
                   const GradNormReduction* reduction = nullptr);

// True when every defined gradient of `params` is finite (no NaN or inf).
bool grads_are_finite(const std::vector<torch::Tensor>& params);

}  // namespace loom

// precision.grad_accum fp32 for bf16 parameters (Note [fp32 gradients of
// bf16 parameters], optim/optimizer.h): as each micro-batch's gradient of a
// bf16 parameter reaches its .grad, it is added into the fp32 gradient that
// AdamW keeps with the parameter's master, and the bf16 .grad is dropped
// (Megatron's main_grad, in libtorch: a post-hook on the accumulator).
//
//   AdamW optimizer(params, options);
//   Fp32GradientAccumulation accumulation(optimizer);   // before any reducer's hooks
//   ... backwards ...
//   accumulation.flush();   // whatever reached a .grad without the hook
//   optimizer.step(lr);     // reads gradient_holders()' fp32 .grad
#pragma once

#include <vector>

#include <torch/types.h>

#include "optim/grad_ready_hooks.h"
#include "optim/optimizer.h"

namespace loom {

class Fp32GradientAccumulation {
 public:
  // Calls optimizer.keep_fp32_gradients() and hooks every non-fp32
  // parameter. Hooks added to the same parameters later (the dp bucket
  // reducer's) run after these, so they see the fp32 sum. The optimizer
  // must outlive this object.
  explicit Fp32GradientAccumulation(AdamW& optimizer);

  // Moves any gradient still in a bf16 parameter's .grad into its fp32 one.
  void flush();

 private:
  std::vector<torch::Tensor> params_, holders_;  // the bf16 parameters and their fp32 masters
  GradReadyHooks hooks_;
};

}  // namespace loom

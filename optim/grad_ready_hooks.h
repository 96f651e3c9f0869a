// Callbacks that run when a parameter's gradient has been accumulated into
// its .grad: a post-hook on the parameter's gradient accumulator (the
// AccumulateGrad node of a leaf), removed again when the object goes.
//
//   GradReadyHooks hooks;
//   hooks.add(weight, [&] { ... weight.grad() now holds the new sum ... });
//
// Hooks on one parameter run in the order they were added, on the thread
// that runs backward, with grad mode off. A gradient that reaches .grad
// without passing through the accumulator (model/compute_weights.h's
// cached casts) runs none.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch::autograd {
struct Node;
}

namespace loom {

class GradReadyHooks {
 public:
  GradReadyHooks() = default;
  ~GradReadyHooks();
  GradReadyHooks(const GradReadyHooks&) = delete;
  GradReadyHooks& operator=(const GradReadyHooks&) = delete;

  // `param` must be a leaf that requires grad; it must outlive this object.
  void add(const at::Tensor& param, std::function<void()> on_ready);

 private:
  // The accumulators are kept alive here: a parameter holds its own weakly.
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  std::vector<uintptr_t> keys_;
};

}  // namespace loom

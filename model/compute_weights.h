#pragma once
// Low-precision weights cast once per optimizer step, not once per micro-batch.
//
// Under bf16 autocast a linear layer's fp32 weight is cast to bf16 each time
// it is used, and in backward the bf16 weight gradient is cast back to fp32
// and then added to the weight's fp32 .grad: per weight and micro-batch, two
// copies and an add. On the 1B model they took 11% of a step
// (docs/performance.md, "Where the 1B step goes").
//
// While a ComputeWeights scope is alive, the linear layers and the LM head ask
// compute_weight() for their weight. It casts each weight once for as long as
// its value stands, and its backward adds the bf16 gradient into
// the fp32 .grad with one mixed-dtype add. Both are what autocast and
// autograd computed before, value for value: the cast is the same rounding,
// and fp32 + bf16 promotes the bf16 exactly. The losses and gradients are
// the uncached path's bit for bit, but for a tied weight's: its .grad
// takes the head's part before the embedding's, where autograd adds their
// sum, so the two agree within fp32 rounding (bit for bit where the sums
// are exact).
//
// Only for a run that nothing else watches the gradients of: the gradient
// reaches .grad without passing through the weight's AccumulateGrad node, so
// hooks on it (the data-parallel reducer's) never fire. Training enables it
// on a single rank.
//
// The owner says when the weights have changed: weights_changed() after each
// optimizer step. (The tensors' version counters cannot say it: torch's
// fused CUDA AdamW updates the weights without bumping them, and a cache
// keyed on them trained on the first step's weights on the H100 while every
// CPU test passed. With the owner's word as the only signal, a loop that
// forgets it fails on the CPU too.)
//
//   ComputeWeights scope(/*enabled=*/bf16 && world == 1);
//   ... micro-batches, backward, optimizer step ...
//   scope.weights_changed();
//
// Note [weight-gradient accumulation]
// With fuse_weight_gradients (fusion.wgrad_accumulation), the linear layers
// and the head go one step further through compute_linear(): the bf16
// product grad_out^T @ input that autograd would write and CachedCast then
// add into the fp32 .grad is never written; the weight-gradient GEMM adds
// into the fp32 .grad itself (kernels::accumulate_weight_gradient: cuBLAS
// with an fp32 output and beta = 1 on a GPU, as Megatron-LM's gradient-
// accumulation fusion does). One kernel and one read and write of the fp32
// gradient per weight and micro-batch instead of a GEMM writing bf16 and an
// add reading it back (the 1B step spent 3.7% in those adds on an H200).
// Not bit for bit the unfused path's: the product is not rounded to bf16
// before it is added, so it is closer to the fp32 sum; the input gradient
// and the forward are the same ops as at::linear's.

#include <torch/types.h>  // torch::Tensor, at::ScalarType, c10::TensorImpl

#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace loom {

class ComputeWeights {
 public:
  explicit ComputeWeights(bool enabled, bool fuse_weight_gradients = false);
  ~ComputeWeights();
  ComputeWeights(const ComputeWeights&) = delete;
  ComputeWeights& operator=(const ComputeWeights&) = delete;

  // The bf16 copy of `weight` (fp32, cast by autocast), made once per value.
  torch::Tensor cast(const torch::Tensor& weight, at::ScalarType dtype);
  // Every weight may have changed (an optimizer step): the next use of each
  // casts it again, into the same buffer.
  void weights_changed();
  // How many casts this scope has made (for the tests).
  int64_t casts() const { return casts_; }
  bool fuses_weight_gradients() const { return fuse_weight_gradients_; }

 private:
  struct Entry {
    bool stale = true;
    torch::Tensor cast;
  };
  bool enabled_;
  bool fuse_weight_gradients_;
  std::mutex mutex_;  // recomputation runs forward again on the backward thread
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  int64_t casts_ = 0;
};

// The weight a layer should compute with: `weight` itself, unless a
// ComputeWeights scope is alive and autocast would cast it (an fp32 weight
// with autocast on for its device), in which case the scope's cached cast,
// joined to the autograd graph so that its gradient reaches `weight.grad`.
torch::Tensor compute_weight(const torch::Tensor& weight);

// at::linear(x, compute_weight(weight), bias), or under a scope that fuses
// weight gradients, the same forward with the weight's gradient added into
// its fp32 .grad by the weight-gradient GEMM itself (Note [weight-gradient
// accumulation]). weight: [out, in]; x: [..., in].
torch::Tensor compute_linear(const torch::Tensor& x, const torch::Tensor& weight,
                             const std::optional<torch::Tensor>& bias = std::nullopt);

}  // namespace loom

// Activation recomputation, also called gradient checkpointing (Chen et al.
// 2016, "Training Deep Nets with Sublinear Memory Cost"): a block's forward
// runs without recording a graph and only its input is kept; backward runs
// the block again with grad on to rebuild the activations it needs. This is
// the "reentrant" checkpoint of torch.utils.checkpoint, written for libtorch.
#pragma once

#include <functional>
#include <vector>

#include <torch/types.h>

namespace loom {

// A block's forward as a function of its input alone. Everything else it
// reads (parameters, constant tensors such as rotary cos/sin) is captured.
using BlockForward = std::function<torch::Tensor(const torch::Tensor&)>;

// Whether running a block on `input` would record an autograd graph: grad
// mode is on and the input or one of the parameters requires grad.
bool records_graph(const torch::Tensor& input, const std::vector<torch::Tensor>& parameters);

// Returns forward(input) but keeps only `input` for backward, not the
// block's activations. Backward runs forward(input) again, with grad on and
// the autocast state of this call, and hands the gradients to `input` and
// `parameters` as if the block had run normally (parameters' .grad
// accumulates as usual). Costs one more forward of the block in backward.
//
// `parameters` must list, once each, every tensor that forward reads and
// that needs a gradient, other than `input`: a tensor left out gets none.
// Listing them (rather than only differentiating the input, as
// torch.utils.checkpoint does) also gives the parameters their gradients
// when the input itself does not require grad, as on a pipeline stage fed
// plain hidden states.
torch::Tensor recompute_in_backward(const BlockForward& forward, const torch::Tensor& input,
                                    const std::vector<torch::Tensor>& parameters);

}  // namespace loom

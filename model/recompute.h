// Activation recomputation, also called gradient checkpointing (Chen et al.
// 2016, "Training Deep Nets with Sublinear Memory Cost"): a block's forward
// runs without recording a graph and only its input is kept; backward runs
// the block again with grad on to rebuild the activations it needs. This is
// the "reentrant" checkpoint of torch.utils.checkpoint, written for libtorch.
//
// And the LayerWrapper, through which every decoder layer's forward runs:
// directly, or recomputed in backward, with hooks around the forward and the
// backward for the parallelisms that act per layer (Note [layer wrapper]).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
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

// The same for a block of several inputs (the attention core of selective
// recomputation: q, k and v): keeps `inputs` only, and backward hands each
// input that requires grad its gradient.
using InputsForward = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;
torch::Tensor recompute_in_backward(const InputsForward& forward, const std::vector<torch::Tensor>& inputs,
                                    const std::vector<torch::Tensor>& parameters);

// Note [layer wrapper]
// A decoder layer does not run its own forward: it hands the LayerWrapper
// that its LayerFactory gave it (LayerFactory::layer_wrapper) a LayerCall,
// the layer as a function of its input, and the input. This is the one place
// where per-layer work of the parallelisms goes, so the model code stays the
// single-device code:
//   - activation recomputation (model.recompute full): the plain wrapper
//     runs the layer through recompute_in_backward (selective recomputes
//     only the attention core, inside the layer: Attention in model/llama.h,
//     so the hooks below see a layer's backward the same way);
//   - ZeRO-3 (parameters sharded over dp): all-gathers a layer's parameters
//     in before_forward and frees them in after_forward, gathers them again
//     in before_backward and, in after_backward, reduce-scatters their
//     gradients and frees them. A wrapper shared by all layers can prefetch
//     the next layer's parameters (LayerCall::layer says which runs now);
//   - context parallelism: ring attention is the attention core
//     (LayerFactory::attention_core); its wrapper can tell the core when a
//     layer runs again in backward (between before_backward and
//     after_backward), should it keep the keys and values it gathered in
//     forward for then.
// Subclasses override the hooks; run() itself is not virtual, so recompute
// and the hooks nest the same way for every wrapper:
//   forward:  before_forward, the layer (recorded, or without a graph under
//             recompute), after_forward. Every forward, also without a graph
//             (inference) and while decoding: parameters are needed then too.
//   backward: only with Options::backward_hooks and only for a forward that
//             recorded a graph: before_backward when the gradient of the
//             layer's output arrives, before any of the layer's backward
//             (and before its recomputation), after_backward when its input's
//             gradient is complete, after the recomputation and after the
//             parameters' gradients have been computed and accumulated into
//             .grad. Two identity autograd nodes carry them, one at the
//             output and one at the input, as FSDP2 does. The one at the
//             input also takes a tensor of the wrapper's that requires
//             grad, so that it is in the graph (and after_backward runs)
//             when the input needs no gradient, as on a pipeline stage fed
//             plain hidden states; not the parameters, whose AccumulateGrad
//             nodes would then wait for it. The autograd engine runs a
//             device's ready nodes latest-made first, and the input node is
//             made before every node of the layer, so it runs last. Off by
//             default: the two nodes are not free, and the input then gets a
//             gradient that may be thrown away. No forward
//             hook runs around a recomputation: a wrapper that needs the
//             parameters in backward (ZeRO-3) turns backward_hooks on.
// Backward hooks run on the thread that runs backward (on a GPU the autograd
// engine's device thread), with grad mode off. A layer's forward may run
// again before the backward of its first run (pipeline schedules run several
// micro-batches' forwards first): hooks pair up per call, not per layer.

// What the hooks see of one run of a decoder layer.
struct LayerCall {
  int64_t layer = 0;  // global number: the N of model.layers.N
  // Every parameter the layer reads, once each, in named_parameters() order.
  std::vector<torch::Tensor> parameters;
  // The layer reads and extends a KV cache (decoding): it must run exactly
  // once, so it is never recomputed, and it records no graph worth saving.
  bool uses_cache = false;
};

class LayerWrapper : public std::enable_shared_from_this<LayerWrapper> {
 public:
  struct Options {
    bool recompute = false;       // model.recompute full: recompute_in_backward
    bool backward_hooks = false;  // call before_backward and after_backward
  };
  explicit LayerWrapper(Options options);
  virtual ~LayerWrapper() = default;
  LayerWrapper(const LayerWrapper&) = delete;
  LayerWrapper& operator=(const LayerWrapper&) = delete;

  // layer(x_btd) with the recomputation and hooks this wrapper adds (Note
  // [layer wrapper]). `layer` may be kept until backward (recomputation): it
  // must hold what it reads, the layer itself included. The wrapper must be
  // owned by a shared_ptr (the graph keeps it for the backward hooks).
  torch::Tensor run(const LayerCall& call, const BlockForward& layer, const torch::Tensor& x_btd);

  const Options& options() const { return options_; }

 protected:
  virtual void before_forward(const LayerCall& /*call*/) {}
  virtual void after_forward(const LayerCall& /*call*/) {}
  virtual void before_backward(const LayerCall& /*call*/) {}
  virtual void after_backward(const LayerCall& /*call*/) {}

 private:
  Options options_;
  // Joins the input's hook node to the graph (Note [layer wrapper]); no
  // gradient ever reaches it.
  torch::Tensor anchor_;
};

}  // namespace loom

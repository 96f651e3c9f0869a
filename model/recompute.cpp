#include "model/recompute.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <utility>

namespace loom {

bool records_graph(const torch::Tensor& input, const std::vector<torch::Tensor>& parameters) {
  if (!torch::GradMode::is_enabled()) return false;
  if (input.requires_grad()) return true;
  return std::any_of(parameters.begin(), parameters.end(), [](const torch::Tensor& p) { return p.requires_grad(); });
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Note [autocast and recomputation]
// The recomputation must see the autocast state of the first forward, or it
// would rebuild other activations (fp32 instead of bf16, say) than the ones
// the output came from, and the gradients would be wrong. Autocast state is
// thread-local, and backward runs after the caller may have left its
// autocast region, or on another thread (CUDA backward runs on the engine's
// device threads), so the state is saved at forward, set around the
// recomputation, and the thread's own state is put back afterwards.
//
// Autocast's cache of weight casts is off during the recomputation. A cast
// cached there would stay in the backward thread's cache, which nobody
// clears on a device thread (torch.autocast clears it on leaving its region);
// clearing the cache afterwards instead would also drop the caller's entries
// when backward runs inside its region. A block casts each weight once, so
// the cache has nothing to save here.
//
// Sets one device type's autocast state, with the cast cache off, for a scope.
class AutocastState {
 public:
  AutocastState(at::DeviceType device, bool enabled, at::ScalarType dtype)
      : device_(device),
        was_enabled_(at::autocast::is_autocast_enabled(device)),
        was_dtype_(at::autocast::get_autocast_dtype(device)),
        was_cache_enabled_(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_enabled(device_, enabled);
    at::autocast::set_autocast_dtype(device_, dtype);
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~AutocastState() {
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
    at::autocast::set_autocast_cache_enabled(was_cache_enabled_);
  }
  AutocastState(const AutocastState&) = delete;
  AutocastState& operator=(const AutocastState&) = delete;

 private:
  at::DeviceType device_;
  bool was_enabled_;
  at::ScalarType was_dtype_;
  bool was_cache_enabled_;
};

// Keeps the block's forward in the autograd context until backward
// (saved_data holds IValues; a capsule carries any C++ object).
struct SavedForward : torch::CustomClassHolder {
  explicit SavedForward(InputsForward f) : forward(std::move(f)) {}
  InputsForward forward;
};

// Forward arguments: the block (not a tensor), then the inputs followed by
// the parameters, `num_inputs` of them inputs. Backward returns one gradient
// per argument, undefined for the block.
class RecomputeBlock : public torch::autograd::Function<RecomputeBlock> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const InputsForward& block, at::TensorList tensors,
                               int64_t num_inputs) {
    const at::DeviceType device = tensors[0].device().type();
    const bool autocast = at::autocast::is_autocast_enabled(device);
    const at::ScalarType autocast_dtype = at::autocast::get_autocast_dtype(device);
    ctx->saved_data["block"] = c10::IValue::make_capsule(c10::make_intrusive<SavedForward>(block));
    ctx->saved_data["autocast"] = autocast;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(autocast_dtype);
    ctx->saved_data["num_inputs"] = num_inputs;
    // The inputs are all that stays alive of this block's activations. The
    // parameters are saved as handles (no copy) so that backward can ask for
    // their gradients; saving also makes backward refuse to run if they were
    // changed in place since this forward.
    const variable_list saved(tensors.begin(), tensors.end());
    ctx->save_for_backward(saved);
    // Function::apply has turned grad mode off: nothing of the block is recorded.
    return block(variable_list(saved.begin(), saved.begin() + num_inputs));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const auto block = c10::static_intrusive_pointer_cast<SavedForward>(ctx->saved_data["block"].toCapsule());
    const bool autocast = ctx->saved_data["autocast"].toBool();
    const auto autocast_dtype = static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt());

    const auto num_inputs = static_cast<size_t>(ctx->saved_data["num_inputs"].toInt());
    // Edges (needs_input_grad) count tensor arguments only: i is tensor i
    // (the inputs, then the parameters). The returned list counts every
    // argument: 0 is the block, 1 + i tensor i, then num_inputs (no gradient).
    variable_list grads(2 + saved.size());
    // The recomputed graph starts at detached copies of the inputs, so it
    // ends there and the inputs' gradients come back to this node, which
    // passes them on to the previous block.
    variable_list inputs;
    variable_list wrt;
    std::vector<size_t> wrt_slot;
    for (size_t i = 0; i < saved.size(); ++i) {
      const bool wanted = ctx->needs_input_grad(i);
      torch::Tensor tensor = saved[i];
      if (i < num_inputs) {
        tensor = tensor.detach().requires_grad_(wanted);
        inputs.push_back(tensor);
      }
      if (!wanted) continue;
      wrt.push_back(tensor);
      wrt_slot.push_back(1 + i);
    }
    if (wrt.empty()) return grads;

    torch::Tensor output;
    {
      torch::AutoGradMode grad_on(true);
      // Note [autocast and recomputation]
      AutocastState as_in_forward(inputs[0].device().type(), autocast, autocast_dtype);
      output = block->forward(inputs);
    }
    // grad() rather than backward(): the parameters' gradients come back
    // through this node and reach .grad by the usual accumulation, hooks
    // included, and the block also works under an outer autograd::grad().
    const variable_list computed = torch::autograd::grad({output}, wrt, {grad_outputs[0]}, /*retain_graph=*/false,
                                                         /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < wrt.size(); ++k) grads[wrt_slot[k]] = computed[k];
    return grads;
  }
};

// Keeps a hook in the autograd context until backward.
struct SavedHook : torch::CustomClassHolder {
  explicit SavedHook(std::function<void()> f) : hook(std::move(f)) {}
  std::function<void()> hook;
};

// Identity on `x` whose backward calls `hook`, then passes x's gradient on.
// `anchors` only join the node to the graph: one that requires grad puts the
// node in the graph (and the hook runs) even when x needs no gradient. They
// get no gradient from here. Arguments: the hook (not a tensor), x, the
// anchors; backward returns one gradient per argument, as RecomputeBlock does.
class CallInBackward : public torch::autograd::Function<CallInBackward> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const std::function<void()>& hook, const torch::Tensor& x,
                               at::TensorList anchors) {
    ctx->saved_data["hook"] = c10::IValue::make_capsule(c10::make_intrusive<SavedHook>(hook));
    ctx->saved_data["anchors"] = static_cast<int64_t>(anchors.size());
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    c10::static_intrusive_pointer_cast<SavedHook>(ctx->saved_data["hook"].toCapsule())->hook();
    variable_list grads(2 + ctx->saved_data["anchors"].toInt());
    if (ctx->needs_input_grad(0)) grads[1] = grad_outputs[0];
    return grads;
  }
};

}  // namespace

torch::Tensor recompute_in_backward(const BlockForward& forward, const torch::Tensor& input,
                                    const std::vector<torch::Tensor>& parameters) {
  variable_list tensors{input};
  tensors.insert(tensors.end(), parameters.begin(), parameters.end());
  const InputsForward on_inputs = [forward](const std::vector<torch::Tensor>& inputs) { return forward(inputs[0]); };
  return RecomputeBlock::apply(on_inputs, at::TensorList(tensors), int64_t{1});
}

torch::Tensor recompute_in_backward(const InputsForward& forward, const std::vector<torch::Tensor>& inputs,
                                    const std::vector<torch::Tensor>& parameters) {
  TORCH_CHECK(!inputs.empty(), "recompute_in_backward needs at least one input");
  variable_list tensors(inputs);
  tensors.insert(tensors.end(), parameters.begin(), parameters.end());
  return RecomputeBlock::apply(forward, at::TensorList(tensors), static_cast<int64_t>(inputs.size()));
}

LayerWrapper::LayerWrapper(Options options)
    : options_(options), anchor_(torch::empty({0}).requires_grad_()) {}

torch::Tensor LayerWrapper::run(const LayerCall& call, const BlockForward& layer, const torch::Tensor& x_btd) {
  const bool graph = !call.uses_cache && records_graph(x_btd, call.parameters);
  torch::Tensor x = x_btd;
  std::function<void()> before_backward_hook;
  if (graph && options_.backward_hooks) {
    // The graph may outlive the model that made it, so its nodes hold the
    // wrapper itself and a copy of the call.
    auto self = shared_from_this();
    const std::function<void()> after_backward_hook = [self, call] { self->after_backward(call); };
    x = CallInBackward::apply(after_backward_hook, x, at::TensorList(anchor_));
    before_backward_hook = [self, call] { self->before_backward(call); };
  }
  before_forward(call);
  torch::Tensor y = graph && options_.recompute ? recompute_in_backward(layer, x, call.parameters) : layer(x);
  after_forward(call);
  if (before_backward_hook) y = CallInBackward::apply(before_backward_hook, y, at::TensorList());
  return y;
}

}  // namespace loom

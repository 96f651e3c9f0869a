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
  explicit SavedForward(BlockForward f) : forward(std::move(f)) {}
  BlockForward forward;
};

// Forward arguments: the block (not a tensor), the input, the parameters.
// Backward returns one gradient per argument, undefined for the block.
class RecomputeBlock : public torch::autograd::Function<RecomputeBlock> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const BlockForward& block, const torch::Tensor& input,
                               at::TensorList parameters) {
    const at::DeviceType device = input.device().type();
    const bool autocast = at::autocast::is_autocast_enabled(device);
    const at::ScalarType autocast_dtype = at::autocast::get_autocast_dtype(device);
    ctx->saved_data["block"] = c10::IValue::make_capsule(c10::make_intrusive<SavedForward>(block));
    ctx->saved_data["autocast"] = autocast;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(autocast_dtype);
    // The input is all that stays alive of this block's activations. The
    // parameters are saved as handles (no copy) so that backward can ask for
    // their gradients; saving also makes backward refuse to run if they were
    // changed in place since this forward.
    variable_list saved{input};
    saved.insert(saved.end(), parameters.begin(), parameters.end());
    ctx->save_for_backward(std::move(saved));
    // Function::apply has turned grad mode off: nothing of the block is recorded.
    return block(input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const auto block = c10::static_intrusive_pointer_cast<SavedForward>(ctx->saved_data["block"].toCapsule());
    const bool autocast = ctx->saved_data["autocast"].toBool();
    const auto autocast_dtype = static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt());

    // Edges (needs_input_grad) count tensor arguments only: 0 is the input,
    // 1 + i parameter i. The returned list counts every argument: 0 is the
    // block, 1 the input, 2 + i parameter i.
    variable_list grads(1 + saved.size());
    // The recomputed graph starts at a detached copy of the input, so it
    // ends there and the input's gradient comes back to this node, which
    // passes it on to the previous block.
    const torch::Tensor input = saved[0].detach().requires_grad_(ctx->needs_input_grad(0));
    variable_list wrt;
    std::vector<size_t> wrt_slot;
    if (ctx->needs_input_grad(0)) {
      wrt.push_back(input);
      wrt_slot.push_back(1);
    }
    for (size_t i = 1; i < saved.size(); ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      wrt.push_back(saved[i]);
      wrt_slot.push_back(1 + i);
    }
    if (wrt.empty()) return grads;

    torch::Tensor output;
    {
      torch::AutoGradMode grad_on(true);
      // Note [autocast and recomputation]
      AutocastState as_in_forward(input.device().type(), autocast, autocast_dtype);
      output = block->forward(input);
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

}  // namespace

torch::Tensor recompute_in_backward(const BlockForward& forward, const torch::Tensor& input,
                                    const std::vector<torch::Tensor>& parameters) {
  return RecomputeBlock::apply(forward, input, at::TensorList(parameters));
}

}  // namespace loom

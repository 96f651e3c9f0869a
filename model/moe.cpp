#include "model/moe.h"

#include <ATen/ATen.h>

#include <string>

#include "model/kernels/fused_ops.h"

namespace loom {

namespace {
// A module that only groups children, so names read "experts.3.w1.weight".
class Container : public torch::nn::Module {};
}  // namespace

ExpertMlp::ExpertMlp(int64_t hidden, int64_t intermediate, const Names& names, const LayerFactory& factory) {
  gate_ = register_module(names.gate, factory.linear(hidden, intermediate, /*bias=*/false, LinearRole::kColumn));
  up_ = register_module(names.up, factory.linear(hidden, intermediate, /*bias=*/false, LinearRole::kColumn));
  down_ = register_module(names.down, factory.linear(intermediate, hidden, /*bias=*/false, LinearRole::kRow));
}

torch::Tensor ExpertMlp::forward(const torch::Tensor& x_nd) {
  const torch::Tensor gate = gate_->forward(x_nd), up = up_->forward(x_nd);
  // An expert no token chose gets zero rows: the plain ops, as a fused
  // kernel launched over nothing is not a valid launch.
  if (x_nd.size(0) == 0) return down_->forward(kernels::swiglu_unfused(gate, up));
  return down_->forward(kernels::swiglu(gate, up));
}

SparseMoeBlock::SparseMoeBlock(const ModelConfig& model, const LayerFactory& factory)
    : top_k_(model.num_experts_per_tok),
      renormalize_(model.renormalize_top_k()),
      weights_in_router_dtype_(model.architecture != "mixtral") {
  const int64_t hidden = model.hidden_size;
  // Replicated under tensor parallelism: every rank routes every token.
  gate_ = register_module("gate", factory.linear(hidden, model.num_experts, /*bias=*/false, LinearRole::kReplicated));
  const ExpertMlp::Names names = model.architecture == "mixtral" ? ExpertMlp::Names{"w1", "w3", "w2"}
                                                                 : ExpertMlp::Names{"gate_proj", "up_proj", "down_proj"};
  auto experts = register_module("experts", std::make_shared<Container>());
  for (int64_t e = 0; e < model.num_experts; ++e) {
    experts_.push_back(experts->register_module(
        std::to_string(e), std::make_shared<ExpertMlp>(hidden, model.expert_intermediate_size(), names, factory)));
  }
  if (model.architecture == "qwen2_moe") {
    shared_expert_ = register_module(
        "shared_expert", std::make_shared<ExpertMlp>(hidden, model.shared_expert_intermediate_size,
                                                     ExpertMlp::Names{"gate_proj", "up_proj", "down_proj"}, factory));
    shared_expert_gate_ =
        register_module("shared_expert_gate", factory.linear(hidden, 1, /*bias=*/false, LinearRole::kReplicated));
  }
}

torch::Tensor SparseMoeBlock::forward(const torch::Tensor& x_btd) {
  const int64_t hidden = x_btd.size(-1);
  const torch::Tensor x = x_btd.reshape({-1, hidden});  // [tokens, hidden]
  const int64_t num_experts = static_cast<int64_t>(experts_.size());

  // The router, in transformers' order (Note [mixture of experts]).
  const torch::Tensor logits = gate_->forward(x);  // [tokens, experts]
  const torch::Tensor probs = at::softmax(logits, -1, at::kFloat);
  auto [weights, chosen] = at::topk(probs, top_k_, -1);  // [tokens, k] each
  if (renormalize_) weights = weights / weights.sum(-1, /*keepdim=*/true);
  // Mixtral multiplies the experts' outputs by fp32 weights; the Qwen
  // routers cast them to the logits' dtype first.
  if (weights_in_router_dtype_) weights = weights.to(logits.scalar_type());

  // The token-expert pairs sorted by expert (stable: each expert's tokens in
  // token order), so that each expert reads one contiguous slice.
  const torch::Tensor pair_expert = chosen.reshape({-1});  // [tokens * k], pair p = token p / k
  const torch::Tensor order = at::argsort(pair_expert, /*stable=*/true);
  const torch::Tensor pair_token = at::div(order, top_k_, "floor");
  // One copy to the host: the slice sizes. (A grouped GEMM over experts
  // would take them on the device; see issue #34.)
  const torch::Tensor counts = at::bincount(pair_expert, {}, num_experts).to(torch::kCPU);
  const int64_t* count = counts.data_ptr<int64_t>();
  last_load_.tokens_per_expert.assign(count, count + num_experts);

  const torch::Tensor x_sorted = x.index_select(0, pair_token);
  std::vector<torch::Tensor> outputs;
  outputs.reserve(experts_.size());
  int64_t begin = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    // An expert no token chose still runs, on zero rows (Note [mixture of
    // experts]): its gradient is zeros, and tp ranks issue its collectives.
    outputs.push_back(experts_[e]->forward(x_sorted.narrow(0, begin, count[e])));
    begin += count[e];
  }
  const torch::Tensor pair_weight = weights.reshape({-1}).index_select(0, order).unsqueeze(1);
  const torch::Tensor y_sorted = (at::cat(outputs, 0) * pair_weight).to(x.scalar_type());
  // Each token's k weighted outputs summed, in expert order as transformers adds them.
  torch::Tensor y = at::zeros_like(x).index_add(0, pair_token, y_sorted);
  if (shared_expert_) y = y + at::sigmoid(shared_expert_gate_->forward(x)) * shared_expert_->forward(x);
  return y.view(x_btd.sizes());
}

}  // namespace loom

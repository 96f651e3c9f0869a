#include "model/moe.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <string>
#include <utility>

#include "model/kernels/fused_ops.h"

namespace loom {

namespace {
// A module that only groups children, so names read "experts.3.w1.weight".
class Container : public torch::nn::Module {};

// Note [load-balancing loss]: `output` unchanged; in backward, whatever
// gradient reaches it, `loss` (a scalar of the graph) gets `weight`, as if
// weight * loss had been added to the training loss.
class AddLossGradient : public torch::autograd::Function<AddLossGradient> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* context, const torch::Tensor& output,
                               const torch::Tensor& loss, double weight) {
    context->saved_data["weight"] = weight;
    context->saved_data["dtype"] = static_cast<int64_t>(loss.scalar_type());
    return output;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grads) {
    const auto dtype = static_cast<at::ScalarType>(context->saved_data["dtype"].toInt());
    return {grads[0], at::full({}, context->saved_data["weight"].toDouble(), grads[0].options().dtype(dtype)),
            torch::Tensor()};
  }
};

torch::Tensor accumulate(const torch::Tensor& sum, const torch::Tensor& value) {
  return sum.defined() ? sum + value : value;
}
}  // namespace

ExpertMlp::ExpertMlp(int64_t hidden, int64_t intermediate, const Names& names, const LayerFactory& factory) {
  gate_ = register_module(names.gate, factory.expert_linear(hidden, intermediate, LinearRole::kColumn));
  up_ = register_module(names.up, factory.expert_linear(hidden, intermediate, LinearRole::kColumn));
  down_ = register_module(names.down, factory.expert_linear(intermediate, hidden, LinearRole::kRow));
}

torch::Tensor ExpertMlp::forward(const torch::Tensor& x_nd) {
  const torch::Tensor gate = gate_->forward(x_nd), up = up_->forward(x_nd);
  // An expert no token chose gets zero rows: the plain ops, as a fused
  // kernel launched over nothing is not a valid launch.
  if (x_nd.size(0) == 0) return down_->forward(kernels::swiglu_unfused(gate, up));
  return down_->forward(kernels::swiglu(gate, up));
}

SparseMoeBlock::SparseMoeBlock(const ModelConfig& model, const LayerFactory& factory, int64_t layer,
                               std::shared_ptr<ExpertExchange> exchange)
    : layer_(layer),
      num_experts_(model.num_experts),
      top_k_(model.num_experts_per_tok),
      renormalize_(model.renormalize_top_k()),
      weights_in_router_dtype_(model.architecture != "mixtral"),
      exchange_(std::move(exchange)),
      collectives_(factory.expert_collectives()) {
  const int64_t hidden = model.hidden_size;
  // Whole on every tp rank (Note [experts under tensor parallelism]).
  gate_ = register_module("gate", factory.linear(hidden, model.num_experts, /*bias=*/false, LinearRole::kReplicated));
  const ExpertMlp::Names names = model.architecture == "mixtral" ? ExpertMlp::Names{"w1", "w3", "w2"}
                                                                 : ExpertMlp::Names{"gate_proj", "up_proj", "down_proj"};
  auto experts = register_module("experts", std::make_shared<Container>());
  // Note [expert exchange]: this rank's share, under their global numbers.
  const int64_t held = exchange_ ? model.num_experts / exchange_->size() : model.num_experts;
  const int64_t first = exchange_ ? exchange_->rank() * held : 0;
  for (int64_t e = first; e < first + held; ++e) {
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
  const int64_t batch = x_btd.size(0), hidden = x_btd.size(-1);
  const int64_t num_experts = num_experts_;

  // The router, in transformers' order (Note [mixture of experts]), over
  // this rank's residual stream (its slice of the sequence under sequence
  // parallelism: Note [experts under tensor parallelism]).
  const torch::Tensor x_local = x_btd.reshape({-1, hidden});  // [tokens', hidden]
  const torch::Tensor logits = gate_->forward(x_local);       // [tokens', experts]
  const torch::Tensor probs = at::softmax(logits, -1, at::kFloat);
  auto [weights, chosen] = at::topk(probs, top_k_, -1);  // [tokens', k] each
  if (renormalize_) weights = weights / weights.sum(-1, /*keepdim=*/true);
  // Mixtral multiplies the experts' outputs by fp32 weights; the Qwen
  // routers cast them to the logits' dtype first.
  if (weights_in_router_dtype_) weights = weights.to(logits.scalar_type());

  // What the experts read: every token of the block, the same on every tp rank.
  const torch::Tensor x_full_btd = collectives_->expert_input(x_btd);  // [batch, tokens / batch, hidden]
  const torch::Tensor x = x_full_btd.reshape({-1, hidden});          // [tokens, hidden]
  const torch::Tensor chosen_all = collectives_->token_ids(chosen.reshape({batch, -1, top_k_})).reshape({-1, top_k_});
  const torch::Tensor weights_all = collectives_->token_values(weights.reshape({batch, -1, top_k_})).reshape({-1});

  // The token-expert pairs sorted by expert (stable: each expert's tokens in
  // token order), so that each expert reads one contiguous slice.
  const torch::Tensor pair_expert = chosen_all.reshape({-1});  // [tokens * k], pair p = token p / k
  const torch::Tensor order = at::argsort(pair_expert, /*stable=*/true);
  const torch::Tensor pair_token = at::div(order, top_k_, "floor");
  // One copy to the host: the slice sizes. (A grouped GEMM over experts
  // would take them on the device; see issue #34.)
  const torch::Tensor counts = at::bincount(pair_expert, {}, num_experts).to(torch::kCPU);
  const int64_t* count = counts.data_ptr<int64_t>();
  last_load_.tokens_per_expert.assign(count, count + num_experts);
  {
    // Note [router metrics]: statistics of this rank's own tokens, outside the graph.
    at::NoGradGuard no_grad;
    const bool same_tokens = chosen_all.size(0) == chosen.size(0);
    const torch::Tensor routed =
        same_tokens ? counts : at::bincount(chosen.reshape({-1}), {}, num_experts).to(torch::kCPU);
    tokens_sum_e_ = accumulate(tokens_sum_e_, routed.to(torch::kDouble));
    probability_sum_e_ = accumulate(probability_sum_e_, probs.sum(0));
  }

  // Note [load-balancing loss]: this rank's part of B(row, layer), summed
  // over the micro-batch's rows.
  torch::Tensor balance;
  if (balance_weight_ > 0.0 && at::GradMode::is_enabled()) {
    const torch::Tensor chosen_rows = chosen_all.reshape({batch, -1});  // the tp group's tokens of each row
    const torch::Tensor counts_be = collectives_->row_totals(
        at::zeros({batch, num_experts}, probs.options())
            .scatter_add_(1, chosen_rows, at::ones(chosen_rows.sizes(), probs.options())));
    const torch::Tensor row_tokens_b1 = counts_be.sum(1, /*keepdim=*/true) / static_cast<double>(top_k_);
    const torch::Tensor probability_be = probs.reshape({batch, -1, num_experts}).sum(1);  // this rank's tokens
    balance = (counts_be * probability_be / row_tokens_b1.square()).sum() * static_cast<double>(num_experts);
    at::NoGradGuard no_grad;
    balance_sum_ = accumulate(balance_sum_, balance.detach());
    const double tokens_here = static_cast<double>(probs.size(0) / batch);
    row_share_sum_ = accumulate(row_share_sum_, (tokens_here / row_tokens_b1).sum());
  }

  const torch::Tensor x_sorted = x.index_select(0, pair_token);
  const std::vector<int64_t> rows_per_expert(count, count + num_experts);
  const torch::Tensor experts_out =
      exchange_ ? exchange_->exchange(x_sorted, rows_per_expert,
                                      [this](const torch::Tensor& rows, const std::vector<int64_t>& local) {
                                        return run_local_experts(rows, local);
                                      })
                : run_local_experts(x_sorted, rows_per_expert);
  const torch::Tensor pair_weight = weights_all.index_select(0, order).unsqueeze(1);
  const torch::Tensor y_sorted = (experts_out * pair_weight).to(x.scalar_type());
  // Each token's k weighted outputs summed, in expert order as transformers adds them.
  torch::Tensor y = at::zeros_like(x).index_add(0, pair_token, y_sorted);
  if (shared_expert_) {
    const torch::Tensor shared_weight = at::sigmoid(shared_expert_gate_->forward(x_local));  // [tokens', 1]
    y = y + collectives_->token_values(shared_weight.reshape({batch, -1, 1})).reshape({-1, 1}) *
                shared_expert_->forward(x);
  }
  // Under tensor parallelism y is this rank's partial sum: reduced once here.
  const torch::Tensor out = collectives_->output(y.view(x_full_btd.sizes()));
  return balance.defined() ? AddLossGradient::apply(out, balance, balance_weight_) : out;
}

torch::Tensor SparseMoeBlock::run_local_experts(const torch::Tensor& rows, const std::vector<int64_t>& rows_per_expert) {
  std::vector<torch::Tensor> outputs;
  outputs.reserve(experts_.size());
  int64_t begin = 0;
  for (size_t e = 0; e < experts_.size(); ++e) {
    // An expert no token chose still runs, on zero rows (Note [mixture of
    // experts]): its gradient is zeros.
    outputs.push_back(experts_[e]->forward(rows.narrow(0, begin, rows_per_expert[e])));
    begin += rows_per_expert[e];
  }
  return at::cat(outputs, 0);
}

torch::Tensor SparseMoeBlock::take_sums() {
  const auto on_cpu = [](const torch::Tensor& sum, int64_t size) {
    return sum.defined() ? sum.to(torch::kCPU, torch::kDouble).reshape({size}) : torch::zeros({size}, torch::kDouble);
  };
  torch::Tensor sums = at::cat({on_cpu(tokens_sum_e_, num_experts_), on_cpu(probability_sum_e_, num_experts_),
                                on_cpu(balance_sum_, 1), on_cpu(row_share_sum_, 1)});
  tokens_sum_e_ = probability_sum_e_ = balance_sum_ = row_share_sum_ = torch::Tensor();
  return sums;
}

bool is_expert_parameter(const std::string& name) { return name.find(".experts.") != std::string::npos; }

RouterStats zero_router_stats(const ModelConfig& model) {
  return {torch::zeros({model.num_layers, 2 * model.num_experts + 2}, torch::kDouble)};
}

RouterStats take_router_stats(const torch::nn::Module& module, const ModelConfig& model) {
  RouterStats stats = zero_router_stats(model);
  for (const auto& child : module.modules()) {
    auto* block = dynamic_cast<SparseMoeBlock*>(child.get());
    if (block == nullptr) continue;
    stats.sums_lc[block->layer()] += block->take_sums();
  }
  return stats;
}

void set_balance_weight(torch::nn::Module& module, double weight) {
  for (const auto& child : module.modules()) {
    if (auto* block = dynamic_cast<SparseMoeBlock*>(child.get())) block->set_balance_weight(weight);
  }
}

RouterMetrics router_metrics(const RouterStats& stats) {
  RouterMetrics metrics;
  const torch::Tensor tokens_le = stats.tokens_le(), probability_le = stats.probability_le();
  const torch::Tensor assignments_l = tokens_le.sum(1);
  const double assignments = assignments_l.sum().item<double>();
  if (assignments <= 0) return metrics;
  const int64_t num_experts = tokens_le.size(1);
  for (int64_t layer = 0; layer < tokens_le.size(0); ++layer) {
    const double layer_assignments = assignments_l[layer].item<double>();
    if (layer_assignments <= 0) continue;  // dense, or no token
    const double mean = layer_assignments / static_cast<double>(num_experts);
    metrics.load_max_over_mean =
        std::max(metrics.load_max_over_mean, tokens_le[layer].max().item<double>() / mean);
  }
  // transformers' rows are tokens over all sparse layers: each token's
  // probabilities sum to 1 in every layer, so the rows are the probabilities' total.
  const double rows = probability_le.sum().item<double>();
  const torch::Tensor share_e = tokens_le.sum(0) / rows;
  const torch::Tensor probability_e = probability_le.sum(0) / rows;
  metrics.aux_loss = static_cast<double>(num_experts) * (share_e * probability_e).sum().item<double>();
  // Note [load-balancing loss]: the ranks' parts of each row's B and their
  // shares of its tokens, so that the mean is over whole rows and layers
  // however the ranks split them (or repeat them: tp without sequence parallelism).
  const double row_layers = stats.rows_l().sum().item<double>();
  if (row_layers > 0) metrics.balance_loss = stats.balance_l().sum().item<double>() / row_layers;
  return metrics;
}

}  // namespace loom

// Mixture-of-experts feed-forward blocks (mixtral, qwen2_moe, qwen3_moe):
// what LayerFactory::mlp returns for a sparse layer.
//
// Note [mixture of experts]
// A sparse decoder layer replaces the dense MLP by a router and E experts
// (Shazeer et al. 2017; Mixtral, Jiang et al. 2024). Per token x:
//   probs = softmax(gate(x)) in fp32            gate: [E, hidden], no bias
//   w, e  = top-k(probs)                        k = num_experts_per_tok
//   w    /= sum(w)                              mixtral always; qwen with norm_topk_prob
//   y     = sum_j w_j * expert_{e_j}(x)         each expert a SwiGLU MLP
// qwen2_moe adds a shared expert every token passes through, scaled by
// sigmoid(shared_expert_gate(x)) (a [1, hidden] linear). This is
// transformers' order of operations (MixtralTopKRouter, Qwen2MoeTopKRouter,
// Qwen3MoeTopKRouter): softmax before the top-k, then the renormalization.
//
// The Hub files name the experts one by one, and so do the parameters here:
//   mixtral:  model.layers.N.block_sparse_moe.gate.weight            [E, hidden]
//             model.layers.N.block_sparse_moe.experts.J.w1.weight    [inter, hidden]  (gate)
//             model.layers.N.block_sparse_moe.experts.J.w3.weight    [inter, hidden]  (up)
//             model.layers.N.block_sparse_moe.experts.J.w2.weight    [hidden, inter]  (down)
//   qwen:     model.layers.N.mlp.gate.weight
//             model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight
//             model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight  (qwen2_moe)
//             model.layers.N.mlp.shared_expert_gate.weight                 [1, hidden]
// (transformers 5 fuses the experts into 3-D tensors in memory and converts
// from and to these names when it loads and saves.)
//
// The experts' linears come from the layer factory (expert_linear: gate/up
// column, down row), so tensor parallelism cuts every expert the way it cuts
// an MLP (Note [experts under tensor parallelism]), and pipeline and data
// parallelism need nothing new. Every expert runs on every call, on zero
// tokens when none chose it, so that each parameter has a gradient (zeros)
// on every rank and data parallelism's reduction finds the same tensors
// everywhere. Under expert parallelism a rank holds only its share of the
// experts (Note [expert exchange]). The load-balancing loss joins the
// training loss with output_router_logits (Note [load-balancing loss]).
//
// Note [experts under tensor parallelism]
// Under tensor parallelism each rank holds a column slice of every expert's
// gate and up and the matching rows of its down, as for a dense MLP, and the
// router (and qwen2_moe's shared-expert gate) whole. The block communicates
// once on the way in and once on the way out (LayerFactory::
// expert_collectives), not once per expert:
//   in:   the tokens every expert reads, f of the residual stream (with
//         sequence parallelism the gathered sequence), as a column linear's
//         input; its backward sums the experts' input gradients over tp once;
//   the router reads this rank's residual stream (its slice of the sequence
//         under sequence parallelism: a replicated linear's weight then
//         passes through f, whose backward sums its partial gradients) and
//         its weights reach the experts' tokens through f (gathered along
//         the sequence under sequence parallelism, the chosen experts too):
//         each rank weights its partial outputs, so a weight's gradient is a
//         partial sum that f's backward (or the gather's reduce-scatter) adds
//         up; the shared-expert gate's values alike;
//   out:  each expert's down projection leaves its partial sum; the weighted
//         sum of the token's experts (and the shared expert) is all-reduced
//         once, or reduce-scattered along the sequence, as a row linear's.
// The sums are the single device's, in another order of addition. Every tp
// rank routes the same tokens alike and so runs the same experts' shapes;
// under expert parallelism each tp rank exchanges over its own ep group
// (partial sums travel back as they are).
//
// Note [load-balancing loss]
// With model.output_router_logits the training loss gains
// router_aux_loss_coef times the mean, over the step's sequences (rows) and
// the model's sparse layers, of
//   B(row, layer) = E * sum_e f_e * P_e,
//   f_e = (assignments of the row's tokens to expert e) / T,
//   P_e = (expert e's router probability summed over the row's tokens) / T,
// T the row's tokens: transformers' load_balancing_loss_func taken over one
// row and one layer (k when balanced, as transformers' is), where
// transformers takes it once over the micro-batch's tokens of all layers.
// The per-row form is DeepSeek-V3's sequence-wise balance loss (and
// Megatron's seq_aux_loss). loom takes it because it keeps the step
// independent of the layout: how the step's rows are grouped into
// micro-batches depends on dp (the loader deals a step's rows to the
// replicas in turn), and a micro-batch's loss would change with it, while
// a row's does not. The per-layer form needs nothing from other layers, so
// pipeline stages add their own layers' terms.
// f_e is a count (no gradient): the loss reaches the router through P_e.
// The block adds its term where its output's gradient passes
// (AddLossGradient in moe.cpp: the output unchanged forward; in backward
// the term's gradient, `weight`), so that no loss value travels between
// pipeline stages: weight = coef * cp / (sparse layers * rows per replica
// and step), the dp x cp average of the gradients making it coef / (sparse
// layers * rows of the step). Under context parallelism (and sequence
// parallelism) a rank holds part of each row's tokens: the counts are
// totalled over the ranks that hold the rest (ExpertCollectives::row_totals:
// an all-reduce over cp of [rows, E] per sparse layer and micro-batch),
// each rank's P_e covers its own tokens, and the ranks' terms add up to the
// row's. Only a forward that records a graph adds the term: recomputation
// in backward adds it once, evaluation never.
// The step's mean B over rows and sparse layers is logged as
// router_balance_loss (the `loss` logged stays the cross-entropy).
//
// Note [router metrics]
// Each block adds up, from every forward until take_router_stats, the
// token-expert assignments routed to each expert and each expert's router
// probability summed over the tokens (detached: statistics, not a loss).
// Summed over all ranks once per step, they give two metrics:
//   router_load_max_over_mean: the most loaded expert's tokens over the mean
//     expert's, in the worst sparse layer (1 = perfectly balanced, E = every
//     token on one expert);
//   router_aux_loss: transformers' load_balancing_loss_func over all sparse
//     layers of the step's tokens, E * sum_e f_e * P_e with f_e the share of
//     assignments and P_e the mean probability of expert e (logged only).
// Both are ratios, so the tp ranks (which route the same tokens, or with
// sequence parallelism each its own slice of them) and
// recomputation in backward (which routes them again) count alike in the
// numerator and the denominator and change neither.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "config/model_config.h"
#include "model/layers.h"

namespace loom {

// Note [expert exchange]
// With an ExpertExchange (LayerFactory::use_expert_exchange) the block holds
// experts rank * E/size .. (rank + 1) * E/size - 1 of the exchange's `size`
// ranks, registered under their global numbers (experts.J keeps J), so the
// checkpoint, the export and initialization (drawn per parameter name) see
// the same tensors whichever rank holds them. Every rank still routes its own
// tokens over all E experts; the exchange sends the token rows, sorted by
// expert, to the ranks holding their experts, runs this rank's experts on
// what it receives, and sends the outputs back, in the rows' order. The
// weighting and the sum per token stay on the token's rank, so the result
// is the one the block computes with every expert at home.
class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t size() const = 0;
  // Runs this rank's experts over rows grouped by local expert
  // (rows_per_expert[j] rows for local expert j, in order) and returns their
  // outputs, row for row.
  using LocalExperts =
      std::function<torch::Tensor(const torch::Tensor& rows, const std::vector<int64_t>& rows_per_expert)>;
  // `rows` [n, hidden]: this rank's token rows sorted by global expert,
  // rows_per_expert[e] of them for each of the E experts. Returns each row's
  // output from its expert [n, hidden], in `rows`' order; differentiable.
  // Collective over the exchange's ranks: each calls it once per block call.
  virtual torch::Tensor exchange(const torch::Tensor& rows, const std::vector<int64_t>& rows_per_expert,
                                 const LocalExperts& local_experts) = 0;
};

// One SwiGLU expert: down(silu(gate(x)) * up(x)), its three linears
// registered under the family's names (w1/w3/w2 or gate/up/down_proj).
class ExpertMlp : public torch::nn::Module {
 public:
  struct Names {
    const char* gate;
    const char* up;
    const char* down;
  };
  ExpertMlp(int64_t hidden, int64_t intermediate, const Names& names, const LayerFactory& factory);
  torch::Tensor forward(const torch::Tensor& x_nd);  // [tokens, hidden] -> [tokens, hidden]

 private:
  std::shared_ptr<Linear> gate_, up_, down_;
};

// How the tokens of one forward were spread over the experts: for metrics
// and tests. tokens_per_expert counts token-expert assignments (k per token).
struct RouterLoad {
  std::vector<int64_t> tokens_per_expert;
};

class SparseMoeBlock : public FeedForward {
 public:
  // `layer`: the decoder layer's global number, for take_router_stats;
  // `exchange`: null holds every expert here (Note [expert exchange]).
  SparseMoeBlock(const ModelConfig& model, const LayerFactory& factory, int64_t layer,
                 std::shared_ptr<ExpertExchange> exchange = nullptr);
  torch::Tensor forward(const torch::Tensor& x_btd) override;
  // The spread of the last forward's tokens.
  const RouterLoad& last_load() const { return last_load_; }
  int64_t layer() const { return layer_; }
  // Note [load-balancing loss]: the weight of this block's term in the
  // gradient (0: no term).
  void set_balance_weight(double weight) { balance_weight_ = weight; }
  // The sums since the last call, as one float64 CPU row of RouterStats'
  // [2 * num_experts + 2]; the block's sums start again from zero.
  torch::Tensor take_sums();

 private:
  // This rank's experts over `rows`, grouped by local expert.
  torch::Tensor run_local_experts(const torch::Tensor& rows, const std::vector<int64_t>& rows_per_expert);

  int64_t layer_;
  int64_t num_experts_;  // all of them, on every rank
  int64_t top_k_;
  bool renormalize_;
  bool weights_in_router_dtype_;  // qwen: the kept weights cast to the logits' dtype
  std::shared_ptr<Linear> gate_;
  std::vector<std::shared_ptr<ExpertMlp>> experts_;  // this rank's
  std::shared_ptr<ExpertExchange> exchange_;
  std::shared_ptr<ExpertCollectives> collectives_;
  std::shared_ptr<ExpertMlp> shared_expert_;  // qwen2_moe, else null
  std::shared_ptr<Linear> shared_expert_gate_;
  RouterLoad last_load_;
  torch::Tensor tokens_sum_e_;       // float64 CPU [experts]; undefined: none yet
  torch::Tensor probability_sum_e_;  // float32 on the device [experts]
  double balance_weight_ = 0.0;
  torch::Tensor balance_sum_, row_share_sum_;  // float32 on the device []; undefined: none yet
};

// Whether parameter `name` belongs to one of the routed experts
// ("model.layers.N.mlp.experts.J.*", "...block_sparse_moe.experts.J.*"):
// what expert parallelism splits. The router and the shared expert are dense.
bool is_expert_parameter(const std::string& name);

// The sums of every sparse block of `module` (a rank's model or one of its
// pipeline chunks), taken and reset, as one float64 CPU tensor
// [num_layers, 2 * num_experts + 2]: per layer the token-expert assignments
// to each expert and each expert's probability summed (Note [router
// metrics]), then this rank's parts of B(row, layer) and its shares of the
// rows' tokens summed (Note [load-balancing loss]). The rows of layers the
// module does not hold, or that are dense, are zeros: summed over the
// chunks and ranks (one tensor, one reduction) they describe the whole model.
struct RouterStats {
  torch::Tensor sums_lc;
  int64_t experts() const { return (sums_lc.size(1) - 2) / 2; }
  // Views of sums_lc.
  torch::Tensor tokens_le() const { return sums_lc.narrow(1, 0, experts()); }
  torch::Tensor probability_le() const { return sums_lc.narrow(1, experts(), experts()); }
  torch::Tensor balance_l() const { return sums_lc.select(1, 2 * experts()); }
  torch::Tensor rows_l() const { return sums_lc.select(1, 2 * experts() + 1); }
};
RouterStats take_router_stats(const torch::nn::Module& module, const ModelConfig& model);
// All zeros, the shapes take_router_stats gives.
RouterStats zero_router_stats(const ModelConfig& model);

// Note [load-balancing loss]: gives every sparse block of `module` the
// weight of its term; 0 turns the loss off.
void set_balance_weight(torch::nn::Module& module, double weight);

struct RouterMetrics {
  double load_max_over_mean = 0.0;
  double aux_loss = 0.0;
  double balance_loss = 0.0;  // the mean B(row, layer); 0 when no block added a term
};
// The metrics of stats summed over all ranks; zeros when no token was routed.
RouterMetrics router_metrics(const RouterStats& stats);

}  // namespace loom

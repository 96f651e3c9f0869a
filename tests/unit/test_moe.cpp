// The mixture-of-experts block (model/moe.h) against the routing written out
// token by token, and the parameter counts against the model.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "model/llama.h"
#include "model/moe.h"

namespace loom {
namespace {

ModelConfig moe_config(const std::string& architecture) {
  ModelConfig m;
  m.architecture = architecture;
  m.hidden_size = 32;
  m.intermediate_size = 48;
  m.num_layers = 3;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 50;
  m.max_seq_len = 32;
  m.init_std = 0.3;
  m.num_experts = 4;
  m.num_experts_per_tok = 2;
  if (architecture != "mixtral") m.moe_intermediate_size = 24;
  if (architecture == "qwen2_moe") m.shared_expert_intermediate_size = 40;
  return m;
}

std::shared_ptr<LlamaForCausalLM> make_model(const ModelConfig& m) {
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(m, factory);
  model->init_weights(3);
  return model;
}

torch::Tensor param(const LlamaForCausalLM& model, const std::string& name) {
  return model.named_parameters()[name];
}

// One token's output written out as Note [mixture of experts] states it.
torch::Tensor reference_block(const LlamaForCausalLM& model, const ModelConfig& m, const std::string& block,
                              const torch::Tensor& x_d) {
  const bool mixtral = m.architecture == "mixtral";
  const auto probs = torch::softmax(torch::mv(param(model, block + ".gate.weight"), x_d), 0);
  auto [weights, chosen] = torch::topk(probs, m.num_experts_per_tok);
  if (m.renormalize_top_k()) weights = weights / weights.sum();
  const auto swiglu = [&](const std::string& prefix, const char* gate, const char* up, const char* down) {
    const auto g = torch::mv(param(model, prefix + gate + ".weight"), x_d);
    const auto u = torch::mv(param(model, prefix + up + ".weight"), x_d);
    return torch::mv(param(model, prefix + down + ".weight"), torch::silu(g) * u);
  };
  auto y = torch::zeros_like(x_d);
  for (int64_t j = 0; j < m.num_experts_per_tok; ++j) {
    const std::string prefix = block + ".experts." + std::to_string(chosen[j].item<int64_t>()) + ".";
    y += weights[j] * (mixtral ? swiglu(prefix, "w1", "w3", "w2") : swiglu(prefix, "gate_proj", "up_proj", "down_proj"));
  }
  if (m.architecture == "qwen2_moe") {
    const auto gate = torch::sigmoid(torch::mv(param(model, block + ".shared_expert_gate.weight"), x_d));
    y += gate * swiglu(block + ".shared_expert.", "gate_proj", "up_proj", "down_proj");
  }
  return y;
}

// The model's block named `block`, or null when it is not a SparseMoeBlock.
std::shared_ptr<SparseMoeBlock> sparse_block(const LlamaForCausalLM& model, const std::string& block) {
  for (const auto& named : model.named_modules()) {
    if (named.key() == block) return std::dynamic_pointer_cast<SparseMoeBlock>(named.value());
  }
  return nullptr;
}

class SparseBlock : public testing::TestWithParam<std::string> {};

TEST_P(SparseBlock, MatchesTheRoutingWrittenOutTokenByToken) {
  torch::NoGradGuard no_grad;
  ModelConfig m = moe_config(GetParam());
  auto model = make_model(m);
  const std::string block = std::string("model.layers.0.") + m.feed_forward_name();
  const std::shared_ptr<SparseMoeBlock> moe = sparse_block(*model, block);
  ASSERT_NE(moe, nullptr) << block << " is not a SparseMoeBlock";
  torch::manual_seed(5);
  const auto x_btd = torch::randn({2, 7, m.hidden_size});
  const auto y_btd = moe->forward(x_btd);
  ASSERT_EQ(y_btd.sizes(), x_btd.sizes());
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t t = 0; t < 7; ++t) {
      const auto expected = reference_block(*model, m, block, x_btd[b][t]);
      // fp32 rounding apart (values up to about 10); a wrong expert or weight is off by O(1).
      EXPECT_TRUE(torch::allclose(y_btd[b][t], expected, 1e-5, 1e-5))
          << GetParam() << " token " << b << "," << t << ": max |difference| "
          << (y_btd[b][t] - expected).abs().max().item<double>() << " of values up to "
          << expected.abs().max().item<double>();
    }
  }
  // Every token went to k experts.
  int64_t assigned = 0;
  for (int64_t count : moe->last_load().tokens_per_expert) assigned += count;
  EXPECT_EQ(assigned, 2 * 7 * m.num_experts_per_tok);
}

TEST_P(SparseBlock, EveryExpertGetsAGradientEvenWithoutTokens) {
  // One token, top 1 of 4: three experts see no token, yet each parameter
  // has a gradient (zeros), as data parallelism's reduction expects.
  ModelConfig m = moe_config(GetParam());
  m.num_experts_per_tok = 1;
  auto model = make_model(m);
  model->forward(torch::tensor({{7}}, torch::kLong)).sum().backward();
  int64_t zero_experts = 0;
  for (const auto& named : model->named_parameters()) {
    ASSERT_TRUE(named.value().grad().defined()) << named.key();
    if (named.key().find(".experts.") != std::string::npos && named.value().grad().abs().sum().item<double>() == 0) {
      ++zero_experts;
    }
  }
  // Three unchosen experts of three linears in each sparse layer (all 3 here).
  EXPECT_EQ(zero_experts, 3 * 3 * m.num_layers);
}

TEST_P(SparseBlock, ParameterCountsMatchTheModel) {
  ModelConfig m = moe_config(GetParam());
  int64_t total = 0;
  for (const auto& p : make_model(m)->parameters()) total += p.numel();
  EXPECT_EQ(count_parameters(m), total);
  // Active: k of the 4 experts in each sparse layer.
  const int64_t inter = m.expert_intermediate_size();
  int64_t sparse_layers = 0;
  for (int64_t layer = 0; layer < m.num_layers; ++layer) sparse_layers += m.sparse_layer(layer) ? 1 : 0;
  EXPECT_EQ(count_non_embedding_parameters(m) - count_active_non_embedding_parameters(m),
            sparse_layers * 2 * 3 * m.hidden_size * inter);
}

// Note [load-balancing loss] written out: for each row of x, B = E * sum_e
// f_e P_e over the row's tokens, f_e its assignments to e / T, P_e its mean
// probability of e.
torch::Tensor reference_balance(const torch::Tensor& gate_weight, const torch::Tensor& x_btd, int64_t top_k) {
  const int64_t rows = x_btd.size(0), tokens = x_btd.size(1), experts = gate_weight.size(0);
  torch::Tensor total = torch::zeros({}, torch::kDouble);
  for (int64_t b = 0; b < rows; ++b) {
    const auto probs = torch::softmax(torch::matmul(x_btd[b], gate_weight.t()), -1);  // [T, E]
    const auto chosen = std::get<1>(torch::topk(probs, top_k, -1));
    std::vector<double> count(static_cast<size_t>(experts), 0.0);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < top_k; ++j) count[static_cast<size_t>(chosen[t][j].item<int64_t>())] += 1.0;
    for (int64_t e = 0; e < experts; ++e) {
      const double f = count[static_cast<size_t>(e)] / static_cast<double>(tokens);
      total = total + static_cast<double>(experts) * f * probs.select(1, e).mean().to(torch::kDouble);
    }
  }
  return total;
}

TEST_P(SparseBlock, TheLoadBalancingTermReachesTheRouterAsIfAddedToTheLoss) {
  ModelConfig m = moe_config(GetParam());
  auto model = make_model(m);
  const std::string block = std::string("model.layers.0.") + m.feed_forward_name();
  const std::shared_ptr<SparseMoeBlock> moe = sparse_block(*model, block);
  ASSERT_NE(moe, nullptr) << block << " is not a SparseMoeBlock";
  const torch::Tensor gate = param(*model, block + ".gate.weight");
  torch::manual_seed(9);
  const auto x = torch::randn({3, 7, m.hidden_size});
  const auto r = torch::randn({3, 7, m.hidden_size});
  const double weight = 0.7;
  // The gradients of the gate and the input for loss(out), with the block's term or another added.
  const auto gradients = [&](double block_weight, bool add_reference) {
    moe->set_balance_weight(block_weight);
    model->zero_grad();
    const auto input = x.clone().requires_grad_(true);
    torch::Tensor loss = (moe->forward(input) * r).sum();
    if (add_reference) loss = loss + weight * reference_balance(gate, input, m.num_experts_per_tok);
    loss.backward();
    return std::pair{gate.grad().clone(), input.grad().clone()};
  };
  const auto [gate_block, input_block] = gradients(weight, false);
  const auto [gate_reference, input_reference] = gradients(0.0, true);
  const auto [gate_plain, input_plain] = gradients(0.0, false);
  EXPECT_LT((gate_block - gate_reference).abs().max().item<double>(), 1e-5 * gate_reference.abs().max().item<double>());
  EXPECT_LT((input_block - input_reference).abs().max().item<double>(),
            1e-5 * input_reference.abs().max().item<double>());
  // The term matters: without it the router's gradient is another.
  EXPECT_GT((gate_plain - gate_reference).abs().max().item<double>(), 1e-3 * gate_reference.abs().max().item<double>());

  // Its value, per row and layer, is what the step logs (Note [router metrics]):
  // three forwards took it above, two with a weight.
  take_router_stats(*model, m);
  moe->set_balance_weight(weight);
  moe->forward(x);
  const RouterMetrics metrics = router_metrics(take_router_stats(*model, m));
  torch::NoGradGuard no_grad;
  EXPECT_NEAR(metrics.balance_loss, reference_balance(gate, x, m.num_experts_per_tok).item<double>() / 3, 1e-6);
  // A forward that records no graph (evaluation, recomputation's first pass) adds nothing.
  moe->forward(x);
  EXPECT_EQ(router_metrics(take_router_stats(*model, m)).balance_loss, 0.0);
}

INSTANTIATE_TEST_SUITE_P(Families, SparseBlock, testing::Values("mixtral", "qwen2_moe", "qwen3_moe"),
                         [](const testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(RouterMetrics, BalancedRoutingGivesOneAndTopKAndSkewGivesMore) {
  // Two layers of 4 experts, 4 tokens of top 2. Layer 0 balanced with
  // uniform probabilities: transformers' loss is k = 2; layer 1 dense (zeros).
  ModelConfig two_layers = moe_config("mixtral");
  two_layers.num_layers = 2;
  RouterStats balanced = zero_router_stats(two_layers);
  balanced.tokens_le()[0].fill_(2.0);
  balanced.probability_le()[0].fill_(1.0);
  RouterMetrics metrics = router_metrics(balanced);
  EXPECT_DOUBLE_EQ(metrics.load_max_over_mean, 1.0);
  EXPECT_DOUBLE_EQ(metrics.aux_loss, 2.0);
  // Every token on experts 0 and 1, with most of its probability there.
  RouterStats skewed = zero_router_stats(two_layers);
  skewed.tokens_le()[0].copy_(torch::tensor({4.0, 4.0, 0.0, 0.0}, torch::kDouble));
  skewed.probability_le()[0].copy_(torch::tensor({1.6, 1.6, 0.4, 0.4}, torch::kDouble));
  metrics = router_metrics(skewed);
  EXPECT_DOUBLE_EQ(metrics.load_max_over_mean, 2.0);
  EXPECT_NEAR(metrics.aux_loss, 4 * (1.0 * 0.4 + 1.0 * 0.4), 1e-12);
  // Nothing routed: zeros, not NaN.
  metrics = router_metrics(zero_router_stats(moe_config("mixtral")));
  EXPECT_EQ(metrics.load_max_over_mean, 0.0);
  EXPECT_EQ(metrics.aux_loss, 0.0);
}

TEST(RouterMetrics, TakeRouterStatsCountsEveryForwardSinceTheLastTake) {
  torch::NoGradGuard no_grad;
  ModelConfig m = moe_config("qwen3_moe");
  m.decoder_sparse_step = 3;  // layer 2 only
  auto model = make_model(m);
  const auto ids = torch::tensor({{1, 2, 3, 4, 5}}, torch::kLong);
  model->forward(ids);
  model->forward(ids);
  const RouterStats stats = take_router_stats(*model, m);
  ASSERT_EQ(stats.tokens_le().sizes(), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(stats.tokens_le()[2].sum().item<double>(), 2 * 5 * 2);  // two forwards of 5 tokens, top 2
  EXPECT_NEAR(stats.probability_le()[2].sum().item<double>(), 2 * 5, 1e-5);
  EXPECT_EQ(stats.tokens_le().narrow(0, 0, 2).abs().sum().item<double>(), 0);  // dense layers
  // Taken: the next take starts from zero.
  EXPECT_EQ(take_router_stats(*model, m).tokens_le().sum().item<double>(), 0);
}

TEST(SparseLayers, FollowDecoderSparseStepAndMlpOnlyLayers) {
  ModelConfig m = moe_config("qwen3_moe");
  m.num_layers = 6;
  m.decoder_sparse_step = 2;
  m.mlp_only_layers = {3};
  std::vector<bool> sparse;
  for (int64_t layer = 0; layer < 6; ++layer) sparse.push_back(m.sparse_layer(layer));
  EXPECT_EQ(sparse, (std::vector<bool>{false, true, false, false, false, true}));
  auto model = make_model(m);
  const auto params = model->named_parameters();
  EXPECT_TRUE(params.contains("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_TRUE(params.contains("model.layers.1.mlp.experts.3.down_proj.weight"));
  EXPECT_TRUE(params.contains("model.layers.3.mlp.up_proj.weight"));
}

}  // namespace
}  // namespace loom

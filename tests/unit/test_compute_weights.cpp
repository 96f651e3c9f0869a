// ComputeWeights (model/compute_weights.h): bf16 weights cast once per
// value and gradients added straight into the fp32 .grad give the losses and
// gradients of plain autocast bit for bit, across micro-batches and optimizer
// updates, tied or untied, with and without activation recomputation. (A
// tied weight's .grad adds the head's and the embedding's parts in another
// order: within fp32 rounding, and bit for bit where those sums are exact,
// as they were on the Intel machines of earlier sessions but not on an AMD
// EPYC.) On the
// CPU here (CPU autocast casts linear weights to bf16 as CUDA's does); the
// same code runs on the GPU.
#include <gtest/gtest.h>

#include <ATen/autocast_mode.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "model/compute_weights.h"
#include "model/llama.h"
#include "optim/optimizer.h"
#include "parallel/cuda_runtime.h"

namespace loom {
namespace {

ModelConfig small_config(bool tied, const std::string& recompute) {
  ModelConfig m;
  m.hidden_size = 48;
  m.intermediate_size = 80;
  m.num_layers = 3;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 67;
  m.max_seq_len = 32;
  m.init_std = 0.2;
  m.tie_embeddings = tied;
  m.recompute = recompute;
  return m;
}

// bf16 autocast on `device` for a scope, its cast cache cleared on leaving
// (as training's AutocastScope does per micro-batch).
class Bf16Autocast {
 public:
  explicit Bf16Autocast(at::DeviceType device = at::kCPU) : device_(device) {
    at::autocast::set_autocast_enabled(device_, true);
    at::autocast::set_autocast_dtype(device_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~Bf16Autocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, false);
  }

 private:
  at::DeviceType device_;
};

struct Trace {
  std::vector<torch::Tensor> losses;
  std::vector<std::map<std::string, torch::Tensor>> grads;  // after each step's micro-batches
  std::map<std::string, torch::Tensor> weights;             // at the end
  int64_t casts = 0;
};

// Two steps of three micro-batches each, with loom's AdamW between them (the
// optimizer changes the weights: the cast must be redone; on a GPU it is
// torch's fused kernel, which does not bump the weights' version counters).
Trace train(const ModelConfig& config, bool cached, c10::Device device = c10::kCPU, bool fuse = false) {
  torch::manual_seed(11);
  LocalLayerFactory factory;
  LlamaForCausalLM model(config, factory);
  model.init_weights(11);
  model.to(device);
  torch::manual_seed(12);
  const auto ids = torch::randint(config.vocab_size, {6, 2, 9}, torch::kLong).to(device);
  AdamWOptions options;
  options.weight_decay = 0.01;
  AdamW optimizer(to_named_tensors(model.named_parameters()), options);
  Trace trace;
  ComputeWeights scope(cached, fuse);
  for (int64_t step = 0; step < 2; ++step) {
    for (auto& p : model.parameters()) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    for (int64_t m = 0; m < 3; ++m) {
      const auto batch = ids[step * 3 + m];
      torch::Tensor logits;
      {
        Bf16Autocast autocast(device.type());
        logits = model.forward(batch.narrow(1, 0, 8));
      }
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, config.vocab_size}).to(torch::kFloat),
                                                       batch.narrow(1, 1, 8).reshape({-1})) /
                  3.0;
      loss.backward();
      trace.losses.push_back(loss.detach());
    }
    std::map<std::string, torch::Tensor> grads;
    for (const auto& p : model.named_parameters()) {
      EXPECT_TRUE(p.value().grad().defined()) << p.key();
      EXPECT_EQ(p.value().grad().scalar_type(), torch::kFloat) << p.key();
      grads[p.key()] = p.value().grad().clone();
    }
    trace.grads.push_back(grads);
    optimizer.step(/*lr=*/0.05);
    scope.weights_changed();
  }
  for (const auto& p : model.named_parameters()) trace.weights[p.key()] = p.value().detach().clone();
  trace.casts = scope.casts();
  return trace;
}

// Equal bit for bit, or for a tensor of the tied weight (the embedding's,
// which the head reuses) within fp32 rounding of its largest entry: the
// cached path adds the head's part of its gradient to .grad before the
// embedding's part, plain autograd adds their sum, and fp32 addition is not
// associative. The AdamW update of that weight carries the difference on.
void expect_same(const torch::Tensor& cached, const torch::Tensor& plain, bool tied_weight, const std::string& what) {
  if (!tied_weight) {
    EXPECT_TRUE(torch::equal(cached, plain)) << what;
    return;
  }
  const double scale = plain.abs().max().item<double>();
  EXPECT_LE((cached - plain).abs().max().item<double>(), 1e-6 * scale) << what;
}

void expect_identical(const Trace& cached, const Trace& plain, bool tied) {
  const auto tied_weight = [&](const std::string& name) { return tied && name == "model.embed_tokens.weight"; };
  ASSERT_EQ(cached.losses.size(), plain.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i) {
    EXPECT_TRUE(torch::equal(cached.losses[i], plain.losses[i]))
        << "micro-batch " << i << ": " << cached.losses[i].item<double>() << " vs " << plain.losses[i].item<double>();
  }
  for (size_t step = 0; step < plain.grads.size(); ++step) {
    for (const auto& [name, grad] : plain.grads[step]) {
      expect_same(cached.grads[step].at(name), grad, tied_weight(name), "step " + std::to_string(step) + " " + name);
    }
  }
  for (const auto& [name, weight] : plain.weights) expect_same(cached.weights.at(name), weight, tied_weight(name), name);
}

// Linear weights per layer (q, k, v, o, gate, up, down) and the head's.
int64_t cast_weights(const ModelConfig& c) { return 7 * c.num_layers + 1; }

TEST(ComputeWeights, UntiedModelMatchesPlainAutocastBitForBit) {
  const ModelConfig config = small_config(/*tied=*/false, "none");
  const Trace cached = train(config, true);
  expect_identical(cached, train(config, false), /*tied=*/false);
  // Each weight cast once per step, not once per micro-batch.
  EXPECT_EQ(cached.casts, 2 * cast_weights(config));
}

TEST(ComputeWeights, TiedHeadGetsTheEmbeddingsGradientAndTheHeadsOnce) {
  const ModelConfig config = small_config(/*tied=*/true, "none");
  const Trace cached = train(config, true);
  expect_identical(cached, train(config, false), /*tied=*/true);
  EXPECT_EQ(cached.casts, 2 * cast_weights(config));
}

TEST(ComputeWeights, RecomputedLayersMatchToo) {
  const ModelConfig config = small_config(/*tied=*/true, "full");
  expect_identical(train(config, true), train(config, false), /*tied=*/true);
}

TEST(ComputeWeights, OnTheGpuToo) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible";
  for (const bool tied : {false, true}) {
    const ModelConfig config = small_config(tied, "none");
    const Trace cached = train(config, true, c10::kCUDA);
    expect_identical(cached, train(config, false, c10::kCUDA), tied);
    EXPECT_EQ(cached.casts, 2 * cast_weights(config));
  }
}

// --- Note [weight-gradient accumulation] (fusion.wgrad_accumulation) -------------

// Three micro-batches through one linear layer with a bias under a scope that
// fuses weight gradients, beside plain autocast on copies of the same
// tensors: the forward and the input's and bias's gradients are plain
// autocast's, the weight's .grad is the fp32 sum of the fp32 products of the
// bf16 gradients and inputs (never rounded to bf16), within fp32 summation
// order of `tolerance` (0 on the CPU, where the reference is the same addmm).
void check_fused_linear(c10::Device device, double tolerance) {
  torch::manual_seed(3);
  const auto weight = torch::randn({6, 5}, device).requires_grad_(true);
  const auto bias = torch::randn({6}, device).requires_grad_(true);
  const auto plain_weight = weight.detach().clone().requires_grad_(true);
  const auto plain_bias = bias.detach().clone().requires_grad_(true);
  auto expected = torch::zeros({6, 5}, device);
  double largest_product = 0;
  ComputeWeights scope(/*enabled=*/true, /*fuse_weight_gradients=*/true);
  for (int m = 0; m < 3; ++m) {
    const auto x = torch::randn({2, 4, 5}, device).requires_grad_(true);
    const auto plain_x = x.detach().clone().requires_grad_(true);
    torch::Tensor y, plain_y;
    {
      Bf16Autocast autocast(device.type());
      y = compute_linear(x, weight, bias);
    }
    {
      Bf16Autocast autocast(device.type());
      plain_y = at::linear(plain_x, plain_weight, plain_bias);
    }
    ASSERT_NE(y.grad_fn(), nullptr);
    EXPECT_NE(y.grad_fn()->name().find("FusedWgradLinear"), std::string::npos) << y.grad_fn()->name();
    EXPECT_TRUE(torch::equal(y, plain_y)) << "micro-batch " << m;
    const auto g = torch::randn(y.sizes(), device).to(torch::kBFloat16);
    y.backward(g);
    plain_y.backward(g);
    const auto g_rows = g.reshape({-1, 6}).t().to(torch::kFloat);
    const auto x_rows = x.detach().to(torch::kBFloat16).reshape({-1, 5}).to(torch::kFloat);
    expected.addmm_(g_rows, x_rows);
    largest_product = std::max(largest_product, at::mm(g_rows, x_rows).abs().max().item<double>());
    EXPECT_TRUE(torch::allclose(x.grad(), plain_x.grad(), 0, tolerance)) << "micro-batch " << m;
  }
  EXPECT_EQ(weight.grad().scalar_type(), torch::kFloat);
  EXPECT_LE((weight.grad() - expected).abs().max().item<double>(), tolerance * expected.abs().max().item<double>());
  EXPECT_TRUE(torch::allclose(bias.grad(), plain_bias.grad(), 0, tolerance));
  // Plain autograd rounds each micro-batch's product to bf16 (half a unit
  // in the last place: 2^-9 of it) before adding it: the fused sum differs
  // from it by those roundings, and no more.
  const double rounding = (weight.grad() - plain_weight.grad()).abs().max().item<double>();
  EXPECT_GT(rounding, 0.0);
  EXPECT_LE(rounding, 3 * std::pow(2.0, -9) * largest_product * (1 + 1e-3));
}

TEST(ComputeWeights, FusedWeightGradientsAreTheFp32SumOfTheProducts) { check_fused_linear(c10::kCPU, 0.0); }

TEST(ComputeWeights, FusedWeightGradientsOnTheGpuAreCublasFp32Sums) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible";
  check_fused_linear(c10::kCUDA, 1e-5);
}

// The whole model with fused weight gradients, tied or untied, recomputed or
// not: the losses of the first step (the same weights) are the unfused
// path's bit for bit, the gradients and later weights within bf16 rounding of
// the products, and each weight is still cast once per step.
void expect_fused_trains_like_unfused(c10::Device device) {
  for (const bool tied : {false, true}) {
    for (const std::string recompute : {"none", "full"}) {
      const ModelConfig config = small_config(tied, recompute);
      const Trace fused = train(config, true, device, /*fuse=*/true);
      const Trace unfused = train(config, true, device, /*fuse=*/false);
      const std::string what = std::string(tied ? "tied" : "untied") + ", recompute " + recompute;
      for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(fused.losses[i], unfused.losses[i])) << what << " " << i;
      for (size_t i = 3; i < unfused.losses.size(); ++i) {
        EXPECT_NEAR(fused.losses[i].item<double>(), unfused.losses[i].item<double>(), 2e-2) << what << " " << i;
      }
      for (const auto& [name, grad] : unfused.grads[0]) {
        const double scale = grad.abs().max().item<double>();
        EXPECT_LE((fused.grads[0].at(name) - grad).abs().max().item<double>(), 2e-2 * scale) << what << " " << name;
      }
      EXPECT_EQ(fused.casts, 2 * cast_weights(config)) << what;
    }
  }
}

TEST(ComputeWeights, FusedWeightGradientsTrainLikeTheUnfused) { expect_fused_trains_like_unfused(c10::kCPU); }

TEST(ComputeWeights, FusedWeightGradientsTrainLikeTheUnfusedOnTheGpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible";
  expect_fused_trains_like_unfused(c10::kCUDA);
}

TEST(ComputeWeights, WeightGradientsAreFusedOnlyWhenAsked) {
  auto weight = torch::randn({4, 3}).requires_grad_(true);
  const auto x = torch::randn({2, 3});
  for (const bool fuse : {false, true}) {
    ComputeWeights scope(true, fuse);
    EXPECT_EQ(scope.fuses_weight_gradients(), fuse);
    Bf16Autocast autocast;
    const std::string name = compute_linear(x, weight).grad_fn()->name();
    EXPECT_EQ(name.find("FusedWgradLinear") != std::string::npos, fuse) << name;
  }
  // Without a live scope the flag means nothing; without gradients there is no graph.
  EXPECT_FALSE(ComputeWeights(false, true).fuses_weight_gradients());
  ComputeWeights scope(true, true);
  Bf16Autocast autocast;
  torch::NoGradGuard no_grad;
  EXPECT_EQ(compute_linear(x, weight).grad_fn(), nullptr);
}

TEST(ComputeWeights, AWeightIsCastAgainOnlyAfterWeightsChanged) {
  auto weight = torch::randn({4, 3}).requires_grad_(true);
  ComputeWeights scope(true);
  Bf16Autocast autocast;
  const auto before = compute_weight(weight).clone();
  {
    torch::NoGradGuard no_grad;
    weight.add_(1.0);  // an optimizer step
  }
  // Until the owner says so, the cast stands (as it would after torch's
  // fused CUDA AdamW, which leaves no trace on the tensor)...
  EXPECT_TRUE(torch::equal(compute_weight(weight), before));
  // ...and then it is made again.
  scope.weights_changed();
  EXPECT_TRUE(torch::equal(compute_weight(weight), weight.detach().to(torch::kBFloat16)));
  EXPECT_FALSE(torch::equal(compute_weight(weight), before));
  EXPECT_EQ(scope.casts(), 2);
}

TEST(ComputeWeights, WithoutAutocastOrScopeTheWeightItselfIsUsed) {
  auto weight = torch::randn({4, 3}).requires_grad_(true);
  EXPECT_TRUE(compute_weight(weight).is_same(weight));  // no scope
  ComputeWeights scope(true);
  EXPECT_TRUE(compute_weight(weight).is_same(weight));  // autocast off
  {
    Bf16Autocast autocast;
    EXPECT_EQ(compute_weight(weight).scalar_type(), torch::kBFloat16);
    auto bf16 = torch::randn({4, 3}).to(torch::kBFloat16);
    EXPECT_TRUE(compute_weight(bf16).is_same(bf16));  // not fp32: autocast's business
  }
  EXPECT_THROW(ComputeWeights second(true), std::logic_error);
}

}  // namespace
}  // namespace loom

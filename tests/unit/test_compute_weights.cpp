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
Trace train(const ModelConfig& config, bool cached, c10::Device device = c10::kCPU) {
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
  ComputeWeights scope(cached);
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

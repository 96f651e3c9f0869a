// AdamW, its parameter groups and state, and gradient clipping. Agreement
// with torch.optim.AdamW and clip_grad_norm_ over many steps is tested in
// tests/interop/test_optimizer_vs_torch.py; here the behaviour is pinned on
// small hand-checked cases.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

#include "optim/fp32_gradients.h"
#include "optim/optimizer.h"
#include "util/error.h"

namespace loom {
namespace {

torch::Tensor param(std::vector<float> values) {
  return torch::tensor(values, torch::kFloat).requires_grad_(true);
}

void set_grad(const torch::Tensor& p, std::vector<float> values) {
  p.mutable_grad() = torch::tensor(values, torch::kFloat).reshape(p.sizes());
}

AdamWOptions options(double weight_decay = 0.1) {
  AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.99;
  o.eps = 1e-8;
  o.weight_decay = weight_decay;
  return o;
}

std::vector<float> values_of(const torch::Tensor& t) {
  auto c = t.detach().to(torch::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

// --- the update rule -------------------------------------------------------

TEST(AdamW, TwoStepsOnOneParameterMatchTheHandComputedUpdate) {
  auto p = param({1.0f, -2.0f});
  AdamW adamw({{"w", p}}, options());
  const double lr = 0.1, b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.1;

  // Step 1: m_hat = g and v_hat = g^2, so Adam moves each weight by lr * sign(g)
  // after the decoupled decay p *= 1 - lr * wd.
  set_grad(p, {0.5f, -1.0f});
  adamw.step(lr);
  auto after1 = values_of(p);
  EXPECT_NEAR(after1[0], 1.0 * 0.99 - 0.1, 1e-6);
  EXPECT_NEAR(after1[1], -2.0 * 0.99 + 0.1, 1e-6);

  // Step 2, element by element in double.
  set_grad(p, {0.25f, 2.0f});
  adamw.step(lr);
  auto after2 = values_of(p);
  const double g1[] = {0.5, -1.0}, g2[] = {0.25, 2.0};
  for (int i = 0; i < 2; ++i) {
    const double m = b1 * ((1 - b1) * g1[i]) + (1 - b1) * g2[i];
    const double v = b2 * ((1 - b2) * g1[i] * g1[i]) + (1 - b2) * g2[i] * g2[i];
    const double bc1 = 1 - b1 * b1, bc2 = 1 - b2 * b2;
    const double expected = after1[i] * (1 - lr * wd) - (lr / bc1) * m / (std::sqrt(v) / std::sqrt(bc2) + eps);
    EXPECT_NEAR(after2[i], expected, 1e-6 * std::abs(expected)) << i;
  }
  EXPECT_NEAR(after2[0], 0.7877552, 1e-6);
  EXPECT_NEAR(after2[1], -1.8977608, 1e-6);
  EXPECT_EQ(adamw.step_count(), 2);

  // The moments are the plain running averages.
  auto state = adamw.state_dict();
  EXPECT_NEAR(values_of(state[1].second)[0], 0.07, 1e-7);    // exp_avg
  EXPECT_NEAR(values_of(state[2].second)[1], 0.0499, 1e-7);  // exp_avg_sq
}

TEST(AdamW, ZeroGradientLeavesOnlyTheWeightDecay) {
  auto p = param({2.0f, -4.0f});
  AdamW adamw({{"w", p}}, options(0.5));
  set_grad(p, {0.0f, 0.0f});
  adamw.step(0.1);
  EXPECT_FLOAT_EQ(values_of(p)[0], 2.0f * 0.95f);
  EXPECT_FLOAT_EQ(values_of(p)[1], -4.0f * 0.95f);
}

TEST(AdamW, LearningRateComesFromEachStep) {
  auto a = param({1.0f}), b = param({1.0f});
  AdamW slow({{"w", a}}, options(0.0)), fast({{"w", b}}, options(0.0));
  set_grad(a, {1.0f});
  set_grad(b, {1.0f});
  slow.step(0.01);
  fast.step(0.1);
  EXPECT_NEAR(1.0 - values_of(a)[0], 0.01, 1e-7);
  EXPECT_NEAR(1.0 - values_of(b)[0], 0.1, 1e-7);
}

TEST(AdamW, StepWithoutAGradientNamesTheParameter) {
  auto p = param({1.0f});
  auto q = param({1.0f});
  AdamW adamw({{"has_grad", p}, {"model.layers.0.mlp.up_proj.weight", q}}, options());
  set_grad(p, {1.0f});
  try {
    adamw.step(0.1);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.up_proj.weight"), std::string::npos) << e.what();
  }
  EXPECT_EQ(adamw.step_count(), 0);
  EXPECT_FLOAT_EQ(values_of(p)[0], 1.0f);  // nothing was updated
}

TEST(AdamW, RefusesRepeatedOrEmptyParameterNames) {
  auto p = param({1.0f});
  EXPECT_THROW(AdamW({{"w", p}, {"w", param({2.0f})}}, options()), std::invalid_argument);
  EXPECT_THROW(AdamW({{"", p}}, options()), std::invalid_argument);
}

TEST(AdamW, ZeroGradZeroesTheGradientsInPlace) {
  auto p = param({1.0f, 2.0f});
  AdamW adamw({{"w", p}}, options());
  set_grad(p, {3.0f, 4.0f});
  auto buffer = p.grad();
  adamw.zero_grad();
  EXPECT_TRUE(p.grad().is_same(buffer));
  EXPECT_EQ(values_of(p.grad()), (std::vector<float>{0.0f, 0.0f}));
}

TEST(AdamW, OptionsComeFromTheOptimizerConfig) {
  OptimizerConfig config;
  config.betas = {0.8, 0.98};
  config.eps = 1e-6;
  config.weight_decay = 0.01;
  auto o = AdamWOptions::from_config(config);
  EXPECT_EQ(o.beta1, 0.8);
  EXPECT_EQ(o.beta2, 0.98);
  EXPECT_EQ(o.eps, 1e-6);
  EXPECT_EQ(o.weight_decay, 0.01);
  EXPECT_TRUE(o.decay_embeddings);
}

// --- parameter groups ---------------------------------------------------------

TEST(AdamWGroups, NormsAndBiasesAreNeverDecayed) {
  for (bool decay_embeddings : {true, false}) {
    EXPECT_FALSE(is_decayed("model.layers.0.input_layernorm.weight", decay_embeddings));
    EXPECT_FALSE(is_decayed("model.layers.3.post_attention_layernorm.weight", decay_embeddings));
    EXPECT_FALSE(is_decayed("model.norm.weight", decay_embeddings));
    EXPECT_FALSE(is_decayed("model.layers.0.self_attn.q_norm.weight", decay_embeddings));
    EXPECT_FALSE(is_decayed("model.layers.0.self_attn.q_proj.bias", decay_embeddings));
    EXPECT_FALSE(is_decayed("model.layers.0.mlp.down_proj.bias", decay_embeddings));
    EXPECT_TRUE(is_decayed("model.layers.0.mlp.up_proj.weight", decay_embeddings));
    EXPECT_TRUE(is_decayed("model.layers.0.self_attn.o_proj.weight", decay_embeddings));
  }
}

TEST(AdamWGroups, EmbeddingsAreDecayedOnlyWhenAskedTo) {
  EXPECT_TRUE(is_decayed("model.embed_tokens.weight", true));
  EXPECT_TRUE(is_decayed("lm_head.weight", true));
  EXPECT_FALSE(is_decayed("model.embed_tokens.weight", false));
  EXPECT_FALSE(is_decayed("lm_head.weight", false));
}

TEST(AdamWGroups, ANormWeightWithWeightDecaySetIsNotDecayed) {
  auto norm = param({1.0f, 1.0f});
  auto bias = param({0.5f});
  auto weight = param({1.0f, 1.0f});
  auto embed = param({1.0f});
  auto o = options(0.5);
  o.decay_embeddings = false;
  AdamW adamw({{"model.layers.0.input_layernorm.weight", norm},
               {"model.layers.0.self_attn.q_proj.bias", bias},
               {"model.layers.0.mlp.up_proj.weight", weight},
               {"model.embed_tokens.weight", embed}},
              o);
  EXPECT_FALSE(adamw.decays("model.layers.0.input_layernorm.weight"));
  EXPECT_TRUE(adamw.decays("model.layers.0.mlp.up_proj.weight"));
  for (const auto& p : adamw.params()) p.mutable_grad() = torch::zeros_like(p);
  adamw.step(0.1);
  EXPECT_EQ(values_of(norm), (std::vector<float>{1.0f, 1.0f}));
  EXPECT_EQ(values_of(bias), (std::vector<float>{0.5f}));
  EXPECT_EQ(values_of(embed), (std::vector<float>{1.0f}));
  EXPECT_FLOAT_EQ(values_of(weight)[0], 0.95f);
}

// --- state ---------------------------------------------------------------------

// A few parameters of different shapes and deterministic pseudo-random grads.
NamedTensors make_params() {
  torch::manual_seed(3);
  return {{"model.embed_tokens.weight", torch::randn({7, 4}).requires_grad_(true)},
          {"model.layers.0.input_layernorm.weight", torch::ones({4}).requires_grad_(true)},
          {"model.layers.0.mlp.up_proj.weight", torch::randn({6, 4}).requires_grad_(true)},
          {"model.layers.0.self_attn.q_proj.bias", torch::zeros({4}).requires_grad_(true)}};
}

void set_step_grads(AdamW& adamw, int64_t step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  for (const auto& [name, p] : adamw.named_params()) {
    p.mutable_grad() = at::randn(p.sizes(), gen, torch::kFloat);
  }
}

void run_steps(AdamW& adamw, int64_t first, int64_t last) {
  for (int64_t step = first; step < last; ++step) {
    set_step_grads(adamw, step);
    adamw.step(1e-2 * (1.0 + 0.1 * static_cast<double>(step)));
  }
}

NamedTensors clone_all(const NamedTensors& tensors) {
  NamedTensors out;
  for (const auto& [name, t] : tensors) out.emplace_back(name, t.detach().clone());
  return out;
}

TEST(AdamWState, StateDictListsTheStepAndBothMomentsOfEveryParameterByName) {
  AdamW adamw(make_params(), options());
  auto state = adamw.state_dict();
  ASSERT_EQ(state.size(), 1u + 2u * 4u);
  EXPECT_EQ(state[0].first, "optimizer.step");
  EXPECT_EQ(state[0].second.dim(), 0);
  EXPECT_EQ(state[0].second.item<int64_t>(), 0);
  EXPECT_EQ(state[1].first, "optimizer.exp_avg.model.embed_tokens.weight");
  EXPECT_EQ(state[2].first, "optimizer.exp_avg_sq.model.embed_tokens.weight");
  EXPECT_EQ(state[5].first, "optimizer.exp_avg.model.layers.0.mlp.up_proj.weight");
  EXPECT_EQ(state[5].second.sizes(), (std::vector<int64_t>{6, 4}));
  for (const auto& [name, t] : state) {
    if (name != "optimizer.step") {
      EXPECT_EQ(t.scalar_type(), torch::kFloat) << name;
    }
  }
}

TEST(AdamWState, SavingAndLoadingIntoAFreshOptimizerContinuesBitIdentically) {
  AdamW straight(make_params(), options());
  run_steps(straight, 0, 10);

  AdamW first_half(make_params(), options());
  run_steps(first_half, 0, 5);
  auto saved_params = clone_all(first_half.named_params());
  auto saved_state = clone_all(first_half.state_dict());

  AdamW resumed(saved_params, options());
  for (const auto& [name, p] : resumed.named_params()) p.requires_grad_(true);
  resumed.load_state_dict(saved_state);
  EXPECT_EQ(resumed.step_count(), 5);
  run_steps(resumed, 5, 10);

  for (size_t i = 0; i < straight.named_params().size(); ++i) {
    EXPECT_TRUE(torch::equal(straight.named_params()[i].second, resumed.named_params()[i].second))
        << straight.named_params()[i].first;
  }
  auto a = straight.state_dict(), b = resumed.state_dict();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
}

std::string load_error(AdamW& adamw, const NamedTensors& state) {
  try {
    adamw.load_state_dict(state);
  } catch (const BadInput& e) {
    return e.what();
  }
  return "(no error)";
}

NamedTensors without(NamedTensors state, const std::string& name) {
  std::erase_if(state, [&](const auto& entry) { return entry.first == name; });
  return state;
}

NamedTensors replaced(NamedTensors state, const std::string& name, torch::Tensor tensor) {
  for (auto& entry : state) {
    if (entry.first == name) entry.second = tensor;
  }
  return state;
}

TEST(AdamWState, LoadRefusesAMissingEntryNamingIt) {
  AdamW source(make_params(), options());
  run_steps(source, 0, 2);
  auto state = clone_all(source.state_dict());
  AdamW target(make_params(), options());
  const std::string name = "optimizer.exp_avg_sq.model.layers.0.mlp.up_proj.weight";
  auto message = load_error(target, without(state, name));
  EXPECT_NE(message.find("missing"), std::string::npos) << message;
  EXPECT_NE(message.find(name), std::string::npos) << message;
  message = load_error(target, without(state, "optimizer.step"));
  EXPECT_NE(message.find("optimizer.step"), std::string::npos) << message;
}

TEST(AdamWState, LoadRefusesAMisshapenEntryNamingItAndBothShapes) {
  AdamW target(make_params(), options());
  const std::string name = "optimizer.exp_avg.model.embed_tokens.weight";
  auto message = load_error(target, replaced(clone_all(target.state_dict()), name, torch::zeros({4, 7})));
  EXPECT_NE(message.find(name), std::string::npos) << message;
  EXPECT_NE(message.find("[4, 7]"), std::string::npos) << message;
  EXPECT_NE(message.find("[7, 4]"), std::string::npos) << message;
}

TEST(AdamWState, LoadRefusesAWrongDtypeAStepThatIsNotAScalarAndAnUnexpectedEntry) {
  AdamW target(make_params(), options());
  const std::string name = "optimizer.exp_avg.model.layers.0.input_layernorm.weight";
  auto state = clone_all(target.state_dict());
  auto message = load_error(target, replaced(state, name, torch::zeros({4}, torch::kBFloat16)));
  EXPECT_NE(message.find(name), std::string::npos) << message;
  message = load_error(target, replaced(state, "optimizer.step", torch::tensor({1, 2})));
  EXPECT_NE(message.find("optimizer.step"), std::string::npos) << message;
  message = load_error(target, replaced(state, "optimizer.step", torch::tensor(-1)));
  EXPECT_NE(message.find("optimizer.step"), std::string::npos) << message;
  auto extra = state;
  extra.emplace_back("optimizer.exp_avg.model.layers.9.mlp.up_proj.weight", torch::zeros({6, 4}));
  message = load_error(target, extra);
  EXPECT_NE(message.find("model.layers.9.mlp.up_proj.weight"), std::string::npos) << message;
}

TEST(AdamWState, ARefusedLoadLeavesTheStateUntouched) {
  AdamW target(make_params(), options());
  run_steps(target, 0, 3);
  auto before = clone_all(target.state_dict());
  auto bad = clone_all(before);
  for (auto& [name, t] : bad) {
    if (name != "optimizer.step") t.fill_(7.0f);
  }
  bad.back().second = torch::zeros({1});  // the last entry is misshapen
  bad[0].second.fill_(99);
  EXPECT_THROW(target.load_state_dict(bad), BadInput);
  EXPECT_EQ(target.step_count(), 3);
  auto after = target.state_dict();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i].second, after[i].second)) << before[i].first;
}

TEST(AdamWState, Bf16ParametersAreUpdatedThroughAnFp32MasterCopy) {
  torch::manual_seed(5);
  auto init = torch::randn({3, 5});
  auto fp32 = init.clone().requires_grad_(true);
  auto bf16 = init.to(torch::kBFloat16).requires_grad_(true);
  // The fp32 reference starts from the same (bf16-rounded) values.
  { at::NoGradGuard g; fp32.copy_(bf16); }
  AdamW reference({{"w", fp32}}, options()), mixed({{"w", bf16}}, options());
  for (int step = 0; step < 3; ++step) {
    auto grad = torch::randn({3, 5});
    fp32.mutable_grad() = grad.clone();
    bf16.mutable_grad() = grad.to(torch::kBFloat16);
    reference.step(1e-2);
    mixed.step(1e-2);
  }
  auto state = mixed.state_dict();
  ASSERT_EQ(state.size(), 4u);
  EXPECT_EQ(state[3].first, "optimizer.master.w");
  EXPECT_EQ(bf16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(bf16, state[3].second.to(torch::kBFloat16)));
  // The master copy follows the fp32 run up to the bf16 rounding of the grads.
  EXPECT_LT((state[3].second - fp32.detach()).abs().max().item<double>(), 2e-2);
}

// Note [fp32 gradients of bf16 parameters]: four micro-batches' gradients of
// a bf16 weight summed in fp32, beside the master, against the same sum in
// the weight's own bf16 .grad.
TEST(Fp32GradientAccumulation, SumsEachMicroBatchsGradientInFp32BesideTheMaster) {
  torch::manual_seed(11);
  auto weight = torch::randn({4, 8}).to(torch::kBFloat16).requires_grad_(true);
  auto bias = torch::randn({4}).requires_grad_(true);  // fp32: keeps its own .grad
  AdamW optimizer({{"w", weight}, {"b", bias}}, options());
  Fp32GradientAccumulation accumulation(optimizer);
  const std::vector<torch::Tensor> holders = optimizer.gradient_holders();
  ASSERT_EQ(holders.size(), 2u);
  EXPECT_FALSE(holders[0].is_same(weight));
  EXPECT_EQ(holders[0].scalar_type(), torch::kFloat);
  EXPECT_TRUE(holders[1].is_same(bias));

  torch::Tensor expected = torch::zeros({4, 8});
  torch::Tensor bf16_sum = torch::zeros({4, 8}, torch::kBFloat16);
  for (int micro = 0; micro < 4; ++micro) {
    // Inputs of very different scales: a bf16 running sum rounds the small
    // ones away.
    const auto x = (torch::randn({3, 8}) * std::pow(100.0, micro % 2 == 0 ? 1 : -1)).to(torch::kBFloat16);
    const auto forward = [&](const torch::Tensor& w) { return (at::linear(x, w).to(torch::kFloat) + bias).sum(); };
    // This micro-batch's bf16 gradient alone, from a hook-free copy.
    auto copy = weight.detach().clone().requires_grad_(true);
    forward(copy).backward();
    const torch::Tensor micro_grad = copy.grad();
    forward(weight).backward();
    EXPECT_FALSE(weight.grad().defined()) << "the bf16 .grad is moved out as it arrives";
    expected += micro_grad.to(torch::kFloat);
    bf16_sum += micro_grad;
  }
  EXPECT_TRUE(torch::equal(holders[0].grad(), expected));
  EXPECT_FALSE(torch::allclose(bf16_sum.to(torch::kFloat), expected, 1e-6, 1e-6))
      << "the case must be one where summing in bf16 loses bits";
  EXPECT_TRUE(torch::equal(bias.grad(), torch::full({4}, 24.0)))  // 3 rows x 4 micro-batches x 2 forwards
      << bias.grad();

  // The step reads the fp32 sum; zero_grad zeroes it in place.
  optimizer.step(1e-2);
  const auto state = optimizer.state_dict();
  ASSERT_EQ(state.size(), 6u);  // step, w's two moments and master, b's two moments
  EXPECT_EQ(state[3].first, "optimizer.master.w");
  EXPECT_TRUE(torch::equal(weight, state[3].second.to(torch::kBFloat16)));
  optimizer.zero_grad();
  EXPECT_EQ(holders[0].grad().abs().sum().item<double>(), 0.0);

  // A gradient that reached .grad some other way is moved by flush().
  weight.mutable_grad() = torch::ones({4, 8}, torch::kBFloat16);
  accumulation.flush();
  EXPECT_FALSE(weight.grad().defined());
  EXPECT_TRUE(torch::equal(holders[0].grad(), torch::ones({4, 8})));
}

// --- gradient clipping -----------------------------------------------------------

TEST(ClipGradNorm, ReturnsTheGlobalNormAndScalesGradsAboveTheLimitToIt) {
  auto a = param({0.0f, 0.0f}), b = param({0.0f}), no_grad = param({1.0f});
  set_grad(a, {3.0f, 4.0f});
  set_grad(b, {12.0f});  // sqrt(9 + 16 + 144) = 13
  std::vector<torch::Tensor> params = {a, b, no_grad};
  EXPECT_NEAR(grad_norm(params), 13.0, 1e-6);
  EXPECT_NEAR(clip_grad_norm(params, 6.5), 13.0, 1e-6);
  const double factor = 6.5 / (13.0 + 1e-6);
  EXPECT_NEAR(values_of(a.grad())[0], 3.0 * factor, 1e-6);
  EXPECT_NEAR(values_of(a.grad())[1], 4.0 * factor, 1e-6);
  EXPECT_NEAR(values_of(b.grad())[0], 12.0 * factor, 1e-6);
  EXPECT_NEAR(grad_norm(params), 6.5, 1e-5);
  EXPECT_FALSE(no_grad.grad().defined());
}

TEST(ClipGradNorm, LeavesGradsBelowTheLimitExactlyAsTheyWere) {
  auto a = param({0.0f, 0.0f});
  set_grad(a, {0.3f, -0.4f});
  EXPECT_NEAR(clip_grad_norm({a}, 1.0), 0.5, 1e-7);
  EXPECT_EQ(values_of(a.grad()), (std::vector<float>{0.3f, -0.4f}));
}

TEST(ClipGradNorm, WithoutGradientsTheNormIsZero) {
  EXPECT_EQ(clip_grad_norm({param({1.0f})}, 1.0), 0.0);
  EXPECT_EQ(grad_norm({}), 0.0);
}

TEST(ClipGradNorm, RefusesANonPositiveLimit) {
  auto a = param({0.0f});
  set_grad(a, {1.0f});
  EXPECT_THROW(clip_grad_norm({a}, 0.0), std::invalid_argument);
  EXPECT_THROW(clip_grad_norm({a}, -1.0), std::invalid_argument);
}

// --- the clipping factor applied inside AdamW (fusion.clip_in_adamw) ------------

// Two parameters with gradients far above the limit, and a bf16 one (updated
// through its fp32 master: the single-tensor path) when `with_bf16`.
struct ClipCase {
  NamedTensors params;
  std::vector<torch::Tensor> holders;
};

// Each step's gradients: new ones, far above the limit.
void set_large_grads(ClipCase& c, int step) {
  torch::manual_seed(100 + step);
  for (auto& [name, p] : c.params) p.mutable_grad() = (torch::randn(p.sizes()) * 10).to(p.scalar_type());
}

ClipCase clip_case(bool with_bf16) {
  torch::manual_seed(5);
  ClipCase c;
  c.params = {{"a.weight", torch::randn({5, 3}).requires_grad_(true)},
              {"b.bias", torch::randn({7}).requires_grad_(true)}};
  if (with_bf16) c.params.emplace_back("c.weight", torch::randn({4}).to(torch::kBFloat16).requires_grad_(true));
  for (auto& [name, p] : c.params) c.holders.push_back(p);
  set_large_grads(c, 0);
  return c;
}

// Three steps with new gradients each, clipping to 0.5 before each: by
// clip_grad_norm, or by the factor handed to step(). Returns the parameters
// and gradients after.
std::vector<torch::Tensor> clipped_steps(bool in_adamw, bool with_bf16, bool fused) {
  ClipCase c = clip_case(with_bf16);
  AdamWOptions o = options();
  o.fused_on_cpu = fused;
  AdamW adamw(c.params, o);
  for (int step = 0; step < 3; ++step) {
    set_large_grads(c, step);
    if (in_adamw) {
      const GradClip clip = grad_clip(adamw.gradient_holders(), 0.5);
      EXPECT_GT(clip.norm.item<double>(), 0.5);
      adamw.step(1e-2, clip.factor);
    } else {
      clip_grad_norm(adamw.gradient_holders(), 0.5);
      adamw.step(1e-2);
    }
  }
  std::vector<torch::Tensor> out;
  for (const auto& [name, p] : c.params) {
    out.push_back(p.detach().clone());
    out.push_back(p.grad().clone());
  }
  return out;
}

TEST(ClipInAdamW, TheSingleTensorPathMatchesClippingFirstBitForBit) {
  const auto first = clipped_steps(/*in_adamw=*/false, /*with_bf16=*/true, /*fused=*/false);
  const auto folded = clipped_steps(/*in_adamw=*/true, /*with_bf16=*/true, /*fused=*/false);
  ASSERT_EQ(first.size(), folded.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(torch::equal(first[i], folded[i])) << "tensor " << i;
}

TEST(ClipInAdamW, TheFusedKernelMatchesClippingFirstWithinRounding) {
  // torch's fused AdamW on the CPU: the kernel the GPU runs, with the
  // factor as its grad_scale (a division by 1 / factor, not a multiply).
  const auto first = clipped_steps(/*in_adamw=*/false, /*with_bf16=*/false, /*fused=*/true);
  const auto folded = clipped_steps(/*in_adamw=*/true, /*with_bf16=*/false, /*fused=*/true);
  const auto unclipped_case = clip_case(false);
  ASSERT_EQ(first.size(), folded.size());
  for (size_t i = 0; i < first.size(); ++i) {
    const double scale = first[i].abs().max().item<double>();
    EXPECT_LE((first[i] - folded[i]).abs().max().item<double>(), 1e-5 * scale) << "tensor " << i;
  }
  // The gradients left behind are the clipped ones, as after clip_grad_norm:
  // their norm is the limit, not the far larger one they came with.
  const double norm = std::sqrt(folded[1].square().sum().item<double>() + folded[3].square().sum().item<double>());
  EXPECT_NEAR(norm, 0.5, 1e-5);
  EXPECT_GT(grad_norm(unclipped_case.holders), 5.0);
}

TEST(ClipInAdamW, AFactorOfOneChangesNothing) {
  for (const bool fused : {false, true}) {
    ClipCase plain = clip_case(false), folded = clip_case(false);
    AdamWOptions o = options();
    o.fused_on_cpu = fused;
    AdamW a(plain.params, o), b(folded.params, o);
    a.step(1e-2);
    b.step(1e-2, torch::ones({}));
    for (size_t i = 0; i < plain.params.size(); ++i) {
      EXPECT_TRUE(torch::equal(plain.params[i].second, folded.params[i].second)) << "fused " << fused;
    }
  }
}

TEST(GradsAreFinite, DetectsNanAndInfAndIgnoresMissingGrads) {
  auto a = param({0.0f, 0.0f}), b = param({0.0f}), c = param({0.0f});
  set_grad(a, {1.0f, 2.0f});
  set_grad(b, {3.0f});
  EXPECT_TRUE(grads_are_finite({a, b, c}));
  EXPECT_TRUE(grads_are_finite({}));
  set_grad(b, {std::numeric_limits<float>::quiet_NaN()});
  EXPECT_FALSE(grads_are_finite({a, b, c}));
  set_grad(b, {-std::numeric_limits<float>::infinity()});
  EXPECT_FALSE(grads_are_finite({a, b, c}));
  EXPECT_FALSE(std::isfinite(grad_norm({a, b})));
}

}  // namespace
}  // namespace loom

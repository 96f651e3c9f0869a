// The Llama-family model on its own: names and shapes as Hugging Face stores
// them, causality, the KV cache, grouped-query attention, rotary maths,
// activation recomputation, and the parts of a decoder layer that the layer
// factory provides (attention core, mlp block, layer wrapper).
// Agreement with transformers itself is tested in tests/interop.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "model/generate.h"
#include "model/layers.h"
#include "model/llama.h"
#include "model/recompute.h"
#include "model/rotary.h"

namespace loom {
namespace {

ModelConfig small_config() {
  ModelConfig m;
  m.hidden_size = 48;
  m.intermediate_size = 64;
  m.num_layers = 3;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 61;
  m.max_seq_len = 64;
  m.init_std = 0.2;
  return m;
}

std::shared_ptr<LlamaForCausalLM> make_model(const ModelConfig& m, uint64_t seed = 7) {
  torch::manual_seed(seed);
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(m, factory);
  model->init_weights(seed);
  model->eval();
  return model;
}

std::map<std::string, std::vector<int64_t>> shapes_of(const LlamaForCausalLM& model) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& p : model.named_parameters()) out[p.key()] = p.value().sizes().vec();
  return out;
}

TEST(Model, ParameterNamesAndShapesAreHuggingFaces) {
  ModelConfig m = small_config();
  auto shapes = shapes_of(*make_model(m));
  EXPECT_EQ(shapes.at("model.embed_tokens.weight"), (std::vector<int64_t>{61, 48}));
  EXPECT_EQ(shapes.at("model.layers.2.self_attn.q_proj.weight"), (std::vector<int64_t>{48, 48}));
  EXPECT_EQ(shapes.at("model.layers.2.self_attn.k_proj.weight"), (std::vector<int64_t>{24, 48}));
  EXPECT_EQ(shapes.at("model.layers.2.self_attn.v_proj.weight"), (std::vector<int64_t>{24, 48}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.o_proj.weight"), (std::vector<int64_t>{48, 48}));
  EXPECT_EQ(shapes.at("model.layers.1.mlp.gate_proj.weight"), (std::vector<int64_t>{64, 48}));
  EXPECT_EQ(shapes.at("model.layers.1.mlp.up_proj.weight"), (std::vector<int64_t>{64, 48}));
  EXPECT_EQ(shapes.at("model.layers.1.mlp.down_proj.weight"), (std::vector<int64_t>{48, 64}));
  EXPECT_EQ(shapes.at("model.layers.0.input_layernorm.weight"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.at("model.layers.0.post_attention_layernorm.weight"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.at("model.norm.weight"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.at("lm_head.weight"), (std::vector<int64_t>{61, 48}));
  EXPECT_EQ(shapes.size(), 3u + 3u * 9u);
}

TEST(Model, TiedEmbeddingsHaveNoLmHeadAndShareTheWeight) {
  ModelConfig m = small_config();
  m.tie_embeddings = true;
  auto model = make_model(m);
  auto shapes = shapes_of(*model);
  EXPECT_EQ(shapes.count("lm_head.weight"), 0u);
  // Changing the embedding changes the output projection too.
  auto ids = torch::tensor({{1, 2, 3}}, torch::kLong);
  auto before = model->forward(ids).detach().clone();
  {
    torch::NoGradGuard no_grad;
    model->named_parameters()["model.embed_tokens.weight"].index_put_({5}, 3.0);
  }
  auto after = model->forward(ids);
  EXPECT_GT((after.select(2, 5) - before.select(2, 5)).abs().max().item<double>(), 1e-3);
}

TEST(Model, Qwen2HasQkvBiasesButNoOutputBias) {
  ModelConfig m = small_config();
  m.architecture = "qwen2";
  auto shapes = shapes_of(*make_model(m));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.q_proj.bias"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.k_proj.bias"), (std::vector<int64_t>{24}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.v_proj.bias"), (std::vector<int64_t>{24}));
  EXPECT_EQ(shapes.count("model.layers.0.self_attn.o_proj.bias"), 0u);
  EXPECT_EQ(shapes.count("model.layers.0.mlp.up_proj.bias"), 0u);
}

TEST(Model, Qwen3NormsEachHeadOfQueriesAndKeys) {
  ModelConfig m = small_config();
  m.architecture = "qwen3";
  m.head_dim = 20;  // not hidden / heads
  auto shapes = shapes_of(*make_model(m));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.q_proj.weight"), (std::vector<int64_t>{80, 48}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.q_norm.weight"), (std::vector<int64_t>{20}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.k_norm.weight"), (std::vector<int64_t>{20}));
  EXPECT_EQ(shapes.at("model.layers.0.input_layernorm.weight"), (std::vector<int64_t>{48}));
}

TEST(Model, Olmo2NormsAfterEachBlockAndOverWholeProjections) {
  ModelConfig m = small_config();
  m.architecture = "olmo2";
  auto shapes = shapes_of(*make_model(m));
  EXPECT_EQ(shapes.at("model.layers.1.self_attn.q_norm.weight"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.at("model.layers.1.self_attn.k_norm.weight"), (std::vector<int64_t>{24}));
  EXPECT_EQ(shapes.at("model.layers.1.post_attention_layernorm.weight"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.at("model.layers.1.post_feedforward_layernorm.weight"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.count("model.layers.1.input_layernorm.weight"), 0u);
}

TEST(Model, Gemma2HasFourNormsStoredAsOffsetsFromOne) {
  ModelConfig m = small_config();
  m.architecture = "gemma2";
  m.tie_embeddings = true;
  auto model = make_model(m);
  auto shapes = shapes_of(*model);
  for (const char* norm : {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                           "post_feedforward_layernorm"}) {
    EXPECT_EQ(shapes.at(std::string("model.layers.0.") + norm + ".weight"), (std::vector<int64_t>{48})) << norm;
  }
  // A norm of weight 0 is the plain normalization (1 + 0), one of weight 1 doubles it.
  RMSNorm gemma_norm(4, 1e-6, NormWeight::kOnePlus), llama_norm(4, 1e-6);
  const auto x = torch::tensor({{1.0f, -2.0f, 3.0f, 0.5f}});
  EXPECT_TRUE(at::allclose(gemma_norm.forward(x), llama_norm.forward(x)));
  {
    torch::NoGradGuard no_grad;
    gemma_norm.weight.fill_(1.0);
  }
  EXPECT_TRUE(at::allclose(gemma_norm.forward(x), 2 * llama_norm.forward(x)));
}

TEST(Model, SoftCappedAttentionIsTheEagerFormula) {
  torch::manual_seed(3);
  const auto q = torch::randn({1, 4, 6, 8}) * 3, k = torch::randn({1, 2, 6, 8}) * 3, v = torch::randn({1, 2, 6, 8});
  AttentionOptions options;
  options.scale = 0.3;
  options.softcap = 2.0;
  const auto allowed = sliding_window_mask(6, 6, 0, torch::kCPU);
  const auto got = eager_attention(q, k, v, allowed, options);
  const auto kk = k.repeat_interleave(2, 1), vv = v.repeat_interleave(2, 1);
  auto scores = at::tanh(at::matmul(q, kk.transpose(2, 3)) * 0.3 / 2.0) * 2.0;
  scores = scores.masked_fill(allowed.logical_not(), -1e30);
  EXPECT_TRUE(at::allclose(got, at::matmul(at::softmax(scores, -1), vv), 1e-5, 1e-6));
  // Without a cap it is SDPA's attention with the same scale.
  options.softcap = 0;
  const auto sdpa = at::scaled_dot_product_attention(q, k, v, allowed, 0.0, false, 0.3, /*enable_gqa=*/true);
  EXPECT_TRUE(at::allclose(eager_attention(q, k, v, allowed, options), sdpa, 1e-5, 1e-6));
}

TEST(Model, NopeLayersIgnorePositionsAndTheOthersDoNot) {
  // One layer without rotary sees a set of keys, not a sequence: the last
  // query's output is the same whatever order the earlier tokens came in.
  ModelConfig m = small_config();
  m.architecture = "smollm3";
  m.num_layers = 1;
  m.nope_layers = {0};
  auto nope = make_model(m);
  auto a = torch::tensor({{3, 14, 15, 9, 26}}, torch::kLong);
  auto b = torch::tensor({{15, 9, 3, 14, 26}}, torch::kLong);
  auto last = [](const torch::Tensor& logits) { return logits.select(1, 4); };
  EXPECT_LT((last(nope->forward(a)) - last(nope->forward(b))).abs().max().item<double>(), 1e-5);
  m.nope_layers = {};
  auto rope = make_model(m);
  EXPECT_GT((last(rope->forward(a)) - last(rope->forward(b))).abs().max().item<double>(), 1e-3);
}

TEST(Model, CachedDecodingEqualsFullForwardForEveryFamily) {
  for (const char* arch : {"qwen3", "olmo2", "smollm3", "gemma2", "gemma3_text"}) {
    ModelConfig m = small_config();
    m.architecture = arch;
    if (m.architecture == "smollm3") m.nope_layers = {1};
    if (m.gemma()) {
      // Soft-capped attention and logits, a window of 3 on layers 0 and 2,
      // gemma3's local rotary there.
      m.attn_logit_softcapping = m.architecture == "gemma2" ? 3.0 : 0.0;
      m.final_logit_softcapping = m.architecture == "gemma2" ? 5.0 : 0.0;
      m.query_pre_attn_scalar = 10;
      m.sliding_window = 3;
      m.layer_types = {"sliding_attention", "full_attention", "sliding_attention"};
      if (m.architecture == "gemma3_text") m.rope_local_theta = 100.0;
    }
    auto model = make_model(m);
    torch::NoGradGuard no_grad;
    auto ids = torch::tensor({{3, 14, 15, 9, 26, 5, 35}}, torch::kLong);
    auto full = model->forward(ids);
    KVCache cache;
    model->forward(ids.narrow(1, 0, 4), &cache, 0);
    for (int64_t t = 4; t < 7; ++t) {
      auto step = model->forward(ids.narrow(1, t, 1), &cache, t);
      EXPECT_LT((step.select(1, 0) - full.select(1, t)).abs().max().item<double>(), 1e-4) << arch << " t=" << t;
    }
  }
}

TEST(Model, SlidingWindowHidesTokensBeyondItAlsoWhileDecoding) {
  ModelConfig m = small_config();
  m.architecture = "mistral";
  m.sliding_window = 3;
  m.num_layers = 1;  // one layer: position t sees exactly t-2..t
  auto model = make_model(m);
  torch::NoGradGuard no_grad;
  auto a = torch::tensor({{3, 14, 15, 9, 26, 5, 35, 8}}, torch::kLong);
  auto b = a.clone();
  b.index_put_({0, 1}, 40);
  const auto full_a = model->forward(a), full_b = model->forward(b);
  EXPECT_GT((full_a.select(1, 3) - full_b.select(1, 3)).abs().max().item<double>(), 1e-3);  // 1 is within 3 of 3
  EXPECT_LT((full_a.narrow(1, 4, 4) - full_b.narrow(1, 4, 4)).abs().max().item<double>(), 1e-6);
  // Two layers, some windowed (qwen2's layer_types): the cache holds every
  // position, and a decoded token sees the window's worth of it.
  m.architecture = "qwen2";
  m.num_layers = 2;
  m.layer_types = {"full_attention", "sliding_attention"};
  auto mixed = make_model(m);
  const auto full = mixed->forward(a);
  KVCache cache;
  mixed->forward(a.narrow(1, 0, 2), &cache, 0);
  for (int64_t t = 2; t < 8; ++t) {
    auto step = mixed->forward(a.narrow(1, t, 1), &cache, t);
    EXPECT_LT((step.select(1, 0) - full.select(1, t)).abs().max().item<double>(), 1e-4) << "position " << t;
  }
  EXPECT_EQ(cache.length(), 8);
  // The window is the only difference from the same model without it.
  m.sliding_window = 0;
  m.layer_types = {};
  EXPECT_GT((make_model(m)->forward(a) - full).abs().max().item<double>(), 1e-3);
}

TEST(Rotary, LengthDependentScalingsPickTheirTableFromTheSequenceLength) {
  ModelConfig m = small_config();  // head_dim 12: 6 frequencies
  m.max_seq_len = 16;
  const auto plain = rope_inverse_frequencies(m);
  m.rope_scaling.type = "dynamic";
  m.rope_scaling.factor = 2.0;
  // Dynamic NTK: theta itself up to max_seq_len, a larger one beyond.
  EXPECT_TRUE(at::equal(rope_inverse_frequencies(m, 16), plain));
  const auto longer = rope_inverse_frequencies(m, 32);
  EXPECT_DOUBLE_EQ(longer[0].item<double>(), 1.0);
  EXPECT_LT(longer[5].item<double>(), plain[5].item<double>());
  EXPECT_DOUBLE_EQ(rope_attention_scaling(m), 1.0);
  // LongRoPE: the short divisors up to the original context, the long past it.
  m.rope_scaling.type = "longrope";
  m.rope_scaling.original_max_position_embeddings = 8;
  m.rope_scaling.factor = 2.0;
  m.rope_scaling.short_factor = {1, 1, 1, 1, 1, 2};
  m.rope_scaling.long_factor = {1, 2, 3, 4, 5, 6};
  EXPECT_NEAR(rope_inverse_frequencies(m, 8)[5].item<double>(), plain[5].item<double>() / 2, 1e-9);
  EXPECT_NEAR(rope_inverse_frequencies(m, 9)[3].item<double>(), plain[3].item<double>() / 4, 1e-9);
  EXPECT_NEAR(rope_attention_scaling(m), std::sqrt(1 + std::log(2.0) / std::log(8.0)), 1e-12);
  // YaRN: the fastest dim kept, the slowest divided by factor; 0.1 ln(factor) + 1 on cos and sin.
  m.rope_scaling = RopeScalingConfig{};
  m.rope_scaling.type = "yarn";
  m.rope_scaling.factor = 4.0;
  m.rope_scaling.original_max_position_embeddings = 16;
  const auto yarn = rope_inverse_frequencies(m);
  EXPECT_FLOAT_EQ(yarn[0].item<float>(), plain[0].item<float>());
  EXPECT_FLOAT_EQ(yarn[5].item<float>(), plain[5].item<float>() / 4);
  EXPECT_NEAR(rope_attention_scaling(m), 0.1 * std::log(4.0) + 1, 1e-12);
}

TEST(Model, ParameterCountFormulaMatchesTheModel) {
  for (bool tied : {false, true}) {
    for (const char* arch : {"llama", "qwen2", "qwen3", "olmo2", "smollm3", "gemma", "gemma2", "gemma3_text"}) {
      ModelConfig m = small_config();
      m.tie_embeddings = tied;
      m.architecture = arch;
      m.mlp_bias = std::string(arch) == "llama" || std::string(arch) == "smollm3";
      m.attention_bias = std::string(arch) != "qwen2";
      m.head_dim = 16;  // not hidden / heads
      int64_t total = 0;
      for (const auto& p : make_model(m)->parameters()) total += p.numel();
      EXPECT_EQ(count_parameters(m), total) << arch << " tied=" << tied;
    }
  }
}

TEST(Model, LaterTokensDoNotChangeEarlierLogits) {
  auto model = make_model(small_config());
  auto a = torch::tensor({{3, 14, 15, 9, 26, 5}}, torch::kLong);
  auto b = a.clone();
  b.index_put_({0, 4}, 40);
  b.index_put_({0, 5}, 2);
  auto la = model->forward(a), lb = model->forward(b);
  EXPECT_TRUE(at::allclose(la.narrow(1, 0, 4), lb.narrow(1, 0, 4), 0, 0));
  EXPECT_GT((la.narrow(1, 4, 2) - lb.narrow(1, 4, 2)).abs().max().item<double>(), 1e-4);
}

TEST(Model, CachedDecodingEqualsFullForward) {
  auto model = make_model(small_config());
  torch::NoGradGuard no_grad;
  auto ids = torch::tensor({{7, 1, 33, 4, 58, 12, 0, 19}}, torch::kLong);
  auto full = model->forward(ids);
  KVCache cache;
  auto prefix = model->forward(ids.narrow(1, 0, 5), &cache, 0);
  EXPECT_TRUE(at::allclose(prefix, full.narrow(1, 0, 5), 1e-5, 1e-5));
  for (int64_t t = 5; t < 8; ++t) {
    auto step = model->forward(ids.narrow(1, t, 1), &cache, t);
    EXPECT_TRUE(at::allclose(step.squeeze(1), full.select(1, t), 1e-5, 1e-5)) << "position " << t;
  }
  EXPECT_EQ(cache.length(), 8);
}

TEST(Model, GroupedQueryAttentionEqualsMultiHeadWithRepeatedKeyValueHeads) {
  ModelConfig gqa = small_config();  // 4 heads, 2 kv heads
  ModelConfig mha = gqa;
  mha.num_kv_heads = 4;
  auto g = make_model(gqa), h = make_model(mha, 99);
  const int64_t head_dim = gqa.head_size();
  {
    torch::NoGradGuard no_grad;
    auto gp = g->named_parameters();
    for (auto& p : h->named_parameters()) {
      auto source = gp[p.key()];
      if (p.key().find("k_proj") != std::string::npos || p.key().find("v_proj") != std::string::npos) {
        // kv head j serves query heads 2j and 2j+1: repeat each kv head twice.
        source = source.view({2, head_dim, -1}).repeat_interleave(2, 0).reshape(p.value().sizes());
      }
      p.value().copy_(source);
    }
  }
  auto ids = torch::tensor({{5, 9, 2, 44, 17}}, torch::kLong);
  EXPECT_TRUE(at::allclose(g->forward(ids), h->forward(ids), 1e-5, 1e-5));
}

TEST(Rotary, PositionZeroIsIdentityAndPairsAreHalfAHeadApart) {
  ModelConfig m = small_config();
  RotaryEmbedding rope(m);
  const int64_t d = m.head_size();
  auto [cos, sin] = rope.cos_sin(0, 3, torch::kCPU);
  auto x = torch::randn({1, 1, 3, d});
  auto y = RotaryEmbedding::apply(x, cos, sin);
  EXPECT_TRUE(at::allclose(y.select(2, 0), x.select(2, 0)));
  // At position 1, element 0 rotates with element d/2 by angle inv_freq[0] = 1.
  auto x1 = x[0][0][1], y1 = y[0][0][1];
  const double c = std::cos(1.0), s = std::sin(1.0);
  EXPECT_NEAR(y1[0].item<double>(), x1[0].item<double>() * c - x1[d / 2].item<double>() * s, 1e-5);
  EXPECT_NEAR(y1[d / 2].item<double>(), x1[d / 2].item<double>() * c + x1[0].item<double>() * s, 1e-5);
}

TEST(Rotary, Llama3ScalingKeepsHighFrequenciesAndDividesLowOnes) {
  ModelConfig m = small_config();
  m.head_dim = 64;
  m.rope_theta = 500000.0;
  auto plain = rope_inverse_frequencies(m);
  m.rope_scaling.type = "llama3";
  m.rope_scaling.factor = 8.0;
  m.rope_scaling.original_max_position_embeddings = 64;
  auto scaled = rope_inverse_frequencies(m);
  // Wavelength 2*pi/inv_freq: below 64/4 = 16 unchanged, above 64/1 divided by 8.
  auto wavelen = 2 * M_PI / plain;
  for (int64_t j = 0; j < plain.size(0); ++j) {
    const double w = wavelen[j].item<double>(), p = plain[j].item<double>(), s = scaled[j].item<double>();
    if (w < 16) {
      EXPECT_DOUBLE_EQ(s, p) << j;
    } else if (w > 64) {
      EXPECT_NEAR(s, p / 8, p * 1e-6) << j;
    } else {
      EXPECT_TRUE(s <= p && s >= p / 8) << j;
    }
  }
}

TEST(Model, PipelineStageBuildsOnlyItsLayersWithGlobalNames) {
  ModelConfig m = small_config();
  LocalLayerFactory factory;
  LlamaForCausalLM middle(m, factory, StageSpec{1, 1, false, false});
  auto shapes = shapes_of(middle);
  EXPECT_EQ(shapes.count("model.layers.1.mlp.up_proj.weight"), 1u);
  EXPECT_EQ(shapes.count("model.layers.0.mlp.up_proj.weight"), 0u);
  EXPECT_EQ(shapes.count("model.embed_tokens.weight"), 0u);
  EXPECT_EQ(shapes.count("lm_head.weight"), 0u);
  EXPECT_EQ(middle.num_local_layers(), 1);
}

TEST(Generate, GreedyIsDeterministicAndSamplingFollowsTheSeed) {
  auto model = make_model(small_config());
  SamplingOptions greedy;
  greedy.max_new_tokens = 10;
  auto a = generate(*model, {1, 2, 3}, greedy);
  EXPECT_EQ(a.size(), 10u);
  EXPECT_EQ(a, generate(*model, {1, 2, 3}, greedy));
  // Greedy continuation equals argmax of the full forward at each step.
  std::vector<int64_t> seq = {1, 2, 3};
  for (int64_t token : a) {
    auto logits = model->forward(torch::tensor(seq, torch::kLong).unsqueeze(0));
    EXPECT_EQ(logits[0][-1].argmax().item<int64_t>(), token);
    seq.push_back(token);
  }
  SamplingOptions sample;
  sample.greedy = false;
  sample.max_new_tokens = 20;
  sample.top_k = 5;
  sample.seed = 3;
  EXPECT_EQ(generate(*model, {4}, sample), generate(*model, {4}, sample));
  sample.seed = 4;
  auto other = generate(*model, {4}, sample);
  sample.seed = 3;
  EXPECT_NE(generate(*model, {4}, sample), other);
}

// A head whose logits carry 3 padding columns past the vocabulary (as a
// tensor-parallel head of a padded vocabulary does, Note [vocab padding] in
// parallel/vocab_parallel.h), each above every real logit.
class HeadWithHighPadding : public LmHead {
 public:
  HeadWithHighPadding(int64_t hidden, int64_t vocab) {
    weight_ = register_parameter("weight", torch::empty({vocab, hidden}));
  }
  torch::Tensor forward(const torch::Tensor& hidden) override {
    const torch::Tensor real = at::linear(hidden, weight_);
    const torch::Tensor high = std::get<0>(real.max(-1, /*keepdim=*/true)) + 100.0;
    return at::cat({real, high.expand({-1, -1, 3})}, -1);
  }

 private:
  torch::Tensor weight_;
};

class PaddedHeadFactory : public LocalLayerFactory {
 public:
  std::shared_ptr<LmHead> lm_head(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) const override {
    return std::make_shared<HeadWithHighPadding>(hidden, vocab);
  }
};

TEST(Generate, PaddingColumnsOfTheLogitsAreNeverChosenHoweverHighTheirLogits) {
  const ModelConfig m = small_config();
  PaddedHeadFactory factory;
  LlamaForCausalLM padded(m, factory);
  padded.init_weights(7);
  const auto plain = make_model(m, 7);  // the same weights, no padding
  const torch::Tensor logits = padded.forward(torch::tensor({1, 2, 3}, torch::kLong).unsqueeze(0));
  ASSERT_EQ(logits.size(-1), m.vocab_size + 3);
  EXPECT_GE(logits[0][-1].argmax().item<int64_t>(), m.vocab_size) << "the padding is what argmax would pick";
  SamplingOptions greedy;
  greedy.max_new_tokens = 10;
  const std::vector<int64_t> ids = generate(padded, {1, 2, 3}, greedy);
  EXPECT_EQ(ids, generate(*plain, {1, 2, 3}, greedy));
  SamplingOptions sample;
  sample.greedy = false;
  sample.max_new_tokens = 20;
  sample.seed = 3;
  for (int64_t id : generate(padded, {4}, sample)) EXPECT_LT(id, m.vocab_size);
}

// --- activation recomputation (model.recompute) ---------------------------

ModelConfig recompute_config(bool tied, const std::string& recompute) {
  ModelConfig m;
  m.hidden_size = 64;
  m.intermediate_size = 96;
  m.num_layers = 4;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 61;
  m.max_seq_len = 32;
  m.init_std = 0.1;
  m.tie_embeddings = tied;
  m.recompute = recompute;
  return m;
}

torch::Tensor next_token_loss(const torch::Tensor& logits_btv, const torch::Tensor& ids_bt) {
  const int64_t vocab = logits_btv.size(2);
  return at::cross_entropy_loss(logits_btv.narrow(1, 0, logits_btv.size(1) - 1).reshape({-1, vocab}),
                                ids_bt.narrow(1, 1, ids_bt.size(1) - 1).reshape(-1));
}

torch::Tensor fixed_ids(int64_t vocab) {
  torch::manual_seed(11);
  return torch::randint(0, vocab, {2, 12}, torch::kLong);
}

struct LossAndGrads {
  torch::Tensor loss;
  std::map<std::string, torch::Tensor> grads;
};

// Runs backward from `loss` and collects every parameter's gradient.
LossAndGrads loss_and_grads(LlamaForCausalLM& model, const torch::Tensor& loss) {
  loss.backward();
  LossAndGrads out{loss.detach(), {}};
  for (const auto& p : model.named_parameters()) out.grads[p.key()] = p.value().grad();
  return out;
}

void expect_bit_identical(const LossAndGrads& none, const LossAndGrads& full, const std::string& what) {
  EXPECT_TRUE(torch::equal(none.loss, full.loss)) << what << ": loss " << none.loss.item<double>() << " vs "
                                                  << full.loss.item<double>();
  ASSERT_EQ(none.grads.size(), full.grads.size()) << what;
  for (const auto& [name, grad] : none.grads) {
    const torch::Tensor& other = full.grads.at(name);
    ASSERT_TRUE(grad.defined()) << what << ": " << name;
    ASSERT_TRUE(other.defined()) << what << ": " << name << " has no gradient with recompute full";
    EXPECT_TRUE(torch::equal(grad, other)) << what << ": " << name << " differs by "
                                           << (grad - other).abs().max().item<double>();
  }
}

TEST(Recompute, FullGivesBitIdenticalLossAndGradientsToNone) {
  for (bool tied : {false, true}) {
    std::map<std::string, LossAndGrads> runs;
    for (const char* recompute : {"none", "full"}) {
      auto model = make_model(recompute_config(tied, recompute));
      const auto ids = fixed_ids(61);
      runs[recompute] = loss_and_grads(*model, next_token_loss(model->forward(ids), ids));
    }
    const std::string what = tied ? "tied" : "untied";
    expect_bit_identical(runs.at("none"), runs.at("full"), what);
    // The gradient flows through every layer back to the input embedding.
    EXPECT_GT(runs.at("full").grads.at("model.embed_tokens.weight").abs().sum().item<double>(), 0.0) << what;
  }
}

TEST(Recompute, LaterPipelineStageGetsParameterGradientsWhenItsInputNeedsNone) {
  // A stage fed plain hidden states: the reentrant checkpoint of
  // torch.utils.checkpoint would give its parameters no gradient here.
  std::map<std::string, LossAndGrads> runs;
  for (const char* recompute : {"none", "full"}) {
    const ModelConfig m = recompute_config(false, recompute);
    torch::manual_seed(7);
    LocalLayerFactory factory;
    LlamaForCausalLM stage(m, factory, StageSpec{1, 3, false, true});
    stage.init_weights(7);
    torch::manual_seed(5);
    const auto hidden = torch::randn({2, 12, 64});
    const auto ids = fixed_ids(61);
    runs[recompute] = loss_and_grads(stage, next_token_loss(stage.forward(hidden), ids));
  }
  expect_bit_identical(runs.at("none"), runs.at("full"), "stage 1..3");
}

// The operations of the autograd graph behind `t`, each a node that holds
// what it saved for backward (parameters' AccumulateGrad nodes left out).
std::vector<std::string> graph_operations(const torch::Tensor& t) {
  std::vector<std::string> names;
  std::unordered_set<const torch::autograd::Node*> seen;
  std::vector<const torch::autograd::Node*> todo{t.grad_fn().get()};
  while (!todo.empty()) {
    const torch::autograd::Node* node = todo.back();
    todo.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (node->name() != "torch::autograd::AccumulateGrad") names.push_back(node->name());
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function.get());
  }
  return names;
}

int64_t count_containing(const std::vector<std::string>& names, const std::string& part) {
  return std::count_if(names.begin(), names.end(),
                       [&](const std::string& n) { return n.find(part) != std::string::npos; });
}

TEST(Recompute, FullKeepsOneGraphNodePerLayerInsteadOfTheLayersOperations) {
  auto operations = [](int64_t layers, const char* recompute) {
    ModelConfig m = recompute_config(false, recompute);
    m.num_layers = layers;
    const auto ids = fixed_ids(61);
    return graph_operations(next_token_loss(make_model(m)->forward(ids), ids));
  };
  const int64_t layers = 4;
  const auto none = operations(layers, "none"), full = operations(layers, "full");
  const int64_t per_layer = static_cast<int64_t>(none.size() - operations(layers - 1, "none").size());
  EXPECT_GT(per_layer, 10);  // norms, projections, rotary, attention, MLP, residuals
  EXPECT_EQ(count_containing(none, "RecomputeBlock"), 0);
  EXPECT_EQ(count_containing(full, "RecomputeBlock"), layers);
  // Each layer's operations, and what they saved, are replaced by one node
  // that keeps the layer's input.
  EXPECT_EQ(static_cast<int64_t>(full.size()), static_cast<int64_t>(none.size()) - layers * (per_layer - 1));
}

TEST(Recompute, InferenceAndCachedDecodingTakeTheNormalPath) {
  auto none = make_model(recompute_config(false, "none"));
  auto full = make_model(recompute_config(false, "full"));
  const auto ids = fixed_ids(61);
  {
    torch::NoGradGuard no_grad;
    const auto logits = full->forward(ids);
    EXPECT_FALSE(logits.requires_grad());
    EXPECT_TRUE(torch::equal(none->forward(ids), logits));
  }
  // With a cache the layers run normally even while grad is on.
  KVCache cache;
  const auto cached = full->forward(ids, &cache, 0);
  EXPECT_EQ(count_containing(graph_operations(cached), "RecomputeBlock"), 0);
  EXPECT_EQ(cache.length(), ids.size(1));
  EXPECT_TRUE(torch::equal(cached, none->forward(ids)));
}

// CPU autocast to bf16 for a scope; on leaving, the state is put back and
// the cast cache cleared, as torch.autocast does.
class CpuAutocastBf16 {
 public:
  CpuAutocastBf16()
      : was_enabled_(at::autocast::is_autocast_enabled(at::kCPU)),
        was_dtype_(at::autocast::get_autocast_dtype(at::kCPU)) {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  }
  ~CpuAutocastBf16() {
    at::autocast::set_autocast_enabled(at::kCPU, was_enabled_);
    at::autocast::set_autocast_dtype(at::kCPU, was_dtype_);
    at::autocast::clear_cache();
  }

 private:
  bool was_enabled_;
  at::ScalarType was_dtype_;
};

TEST(Recompute, BackwardRecomputesUnderTheForwardsAutocastState) {
  // Backward after leaving the autocast region (the usual order) must still
  // recompute in bf16, and backward inside the region (autocast on, its cast
  // cache not yet cleared) must give the same gradients too.
  for (bool backward_inside : {false, true}) {
    std::map<std::string, LossAndGrads> runs;
    for (const char* recompute : {"none", "full"}) {
      auto model = make_model(recompute_config(false, recompute));
      const auto ids = fixed_ids(61);
      torch::Tensor loss;
      {
        CpuAutocastBf16 autocast;
        const auto logits = model->forward(ids);
        EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
        loss = next_token_loss(logits.to(at::kFloat), ids);
        if (backward_inside) runs[recompute] = loss_and_grads(*model, loss);
      }
      if (!backward_inside) runs[recompute] = loss_and_grads(*model, loss);
    }
    expect_bit_identical(runs.at("none"), runs.at("full"),
                         backward_inside ? "backward inside autocast" : "backward after autocast");
  }
}


// --- the factory's parts of a decoder layer -------------------------------

// What the parts below did, in order: "core", "mlp", "before_forward 2", ...
using EventLog = std::vector<std::string>;

// The default core, logging each call.
class LoggingAttentionCore : public AttentionCore {
 public:
  LoggingAttentionCore(std::shared_ptr<AttentionCore> inner, std::shared_ptr<EventLog> log)
      : inner_(std::move(inner)), log_(std::move(log)) {}
  torch::Tensor forward(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                        torch::Tensor* cache_k, torch::Tensor* cache_v) override {
    log_->push_back("core");
    return inner_->forward(q_bhtd, k_bhtd, v_bhtd, cache_k, cache_v);
  }

 private:
  std::shared_ptr<AttentionCore> inner_;
  std::shared_ptr<EventLog> log_;
};

// Not an MLP at all: x * scale, with one parameter of its own.
class ScaleFeedForward : public FeedForward {
 public:
  ScaleFeedForward(int64_t hidden, std::shared_ptr<EventLog> log) : log_(std::move(log)) {
    scale_ = register_parameter("scale", torch::ones({hidden}));
  }
  torch::Tensor forward(const torch::Tensor& x_btd) override {
    log_->push_back("mlp");
    return x_btd * scale_;
  }

 private:
  torch::Tensor scale_;
  std::shared_ptr<EventLog> log_;
};

// Logs each hook with the layer's number; after_backward also says whether
// every parameter of the layer has its gradient by then.
class LoggingWrapper : public LayerWrapper {
 public:
  LoggingWrapper(Options options, std::shared_ptr<EventLog> log) : LayerWrapper(options), log_(std::move(log)) {}

 protected:
  void before_forward(const LayerCall& call) override { log("before_forward", call); }
  void after_forward(const LayerCall& call) override { log("after_forward", call); }
  void before_backward(const LayerCall& call) override { log("before_backward", call); }
  void after_backward(const LayerCall& call) override {
    const bool all = std::all_of(call.parameters.begin(), call.parameters.end(),
                                 [](const torch::Tensor& p) { return p.grad().defined(); });
    log("after_backward", call, all ? " with grads" : " without grads");
  }

 private:
  void log(const std::string& hook, const LayerCall& call, const std::string& suffix = "") {
    log_->push_back(hook + " " + std::to_string(call.layer) + suffix);
  }
  std::shared_ptr<EventLog> log_;
};

// Overrides the roles it is asked to; the rest are LocalLayerFactory's.
class RecordingFactory : public LocalLayerFactory {
 public:
  struct Roles {
    bool core = false;
    bool mlp = false;
    std::optional<LayerWrapper::Options> wrapper;
  };
  explicit RecordingFactory(Roles roles) : roles_(std::move(roles)) {}

  std::shared_ptr<AttentionCore> attention_core(const ModelConfig& model, int64_t layer) const override {
    auto core = LocalLayerFactory::attention_core(model, layer);
    return roles_.core ? std::make_shared<LoggingAttentionCore>(core, log) : core;
  }
  std::shared_ptr<FeedForward> mlp(const ModelConfig& model, int64_t layer) const override {
    if (!roles_.mlp) return LocalLayerFactory::mlp(model, layer);
    return std::make_shared<ScaleFeedForward>(model.hidden_size, log);
  }
  std::shared_ptr<LayerWrapper> layer_wrapper(const ModelConfig& model, int64_t layer) const override {
    if (!roles_.wrapper) return LocalLayerFactory::layer_wrapper(model, layer);
    return std::make_shared<LoggingWrapper>(*roles_.wrapper, log);
  }

  std::shared_ptr<EventLog> log = std::make_shared<EventLog>();

 private:
  Roles roles_;
};

std::shared_ptr<LlamaForCausalLM> make_model(const ModelConfig& m, const LayerFactory& factory, StageSpec stage = {}) {
  torch::manual_seed(7);
  auto model = std::make_shared<LlamaForCausalLM>(m, factory, stage);
  model->init_weights(7);
  return model;
}

TEST(LayerFactory, EveryLayerAttendsThroughTheFactorysCoreAlsoWhileDecoding) {
  const ModelConfig m = small_config();
  RecordingFactory factory({.core = true, .mlp = false, .wrapper = std::nullopt});
  auto model = make_model(m, factory);
  auto plain = make_model(m);  // same seed: same weights
  torch::NoGradGuard no_grad;
  const auto ids = torch::tensor({{7, 1, 33, 4, 58, 12}}, torch::kLong);
  EXPECT_TRUE(torch::equal(model->forward(ids), plain->forward(ids)));
  EXPECT_EQ(*factory.log, EventLog(3, "core"));
  factory.log->clear();
  KVCache cache;
  model->forward(ids.narrow(1, 0, 5), &cache, 0);
  const auto step = model->forward(ids.narrow(1, 5, 1), &cache, 5);
  EXPECT_EQ(*factory.log, EventLog(6, "core"));
  EXPECT_TRUE(at::allclose(step.squeeze(1), plain->forward(ids).select(1, 5), 1e-5, 1e-5));
}

TEST(LayerFactory, TheFactorysMlpBlockIsEachLayersMlpUnderTheSameName) {
  const ModelConfig m = small_config();
  RecordingFactory factory({.core = false, .mlp = true, .wrapper = std::nullopt});
  auto model = make_model(m, factory);
  const auto shapes = shapes_of(*model);
  EXPECT_EQ(shapes.at("model.layers.1.mlp.scale"), (std::vector<int64_t>{48}));
  EXPECT_EQ(shapes.count("model.layers.1.mlp.gate_proj.weight"), 0u);
  EXPECT_EQ(shapes.size(), 3u + 3u * 7u);  // q, k, v, o, two norms and the scale per layer
  const auto ids = fixed_ids(61);
  const auto run = loss_and_grads(*model, next_token_loss(model->forward(ids), ids));
  EXPECT_EQ(*factory.log, EventLog(3, "mlp"));
  EXPECT_GT(run.grads.at("model.layers.0.mlp.scale").abs().sum().item<double>(), 0.0);
}

// The forward hooks of layers 0 .. layers-1 in order; `core`: each layer's
// attention core runs between them.
EventLog forward_hooks(int64_t layers, bool core) {
  EventLog log;
  for (int64_t i = 0; i < layers; ++i) {
    log.push_back("before_forward " + std::to_string(i));
    if (core) log.push_back("core");
    log.push_back("after_forward " + std::to_string(i));
  }
  return log;
}

TEST(LayerWrapper, RunsEachLayerBetweenItsForwardHooksAndAddsNothingToBackwardByDefault) {
  const ModelConfig m = recompute_config(false, "none");
  RecordingFactory factory({.core = true, .wrapper = LayerWrapper::Options{}});
  auto model = make_model(m, factory);
  const auto ids = fixed_ids(61);
  const auto loss = next_token_loss(model->forward(ids), ids);
  const EventLog forward = forward_hooks(4, /*core=*/true);
  EXPECT_EQ(*factory.log, forward);
  EXPECT_EQ(count_containing(graph_operations(loss), "CallInBackward"), 0);
  const auto run = loss_and_grads(*model, loss);
  EXPECT_EQ(*factory.log, forward);  // no hook ran in backward
  auto plain = make_model(m);
  expect_bit_identical(loss_and_grads(*plain, next_token_loss(plain->forward(ids), ids)), run, "wrapped");
}

// The backward hooks of `layers`, last layer first; `recompute`: each layer's
// recomputation (its core) runs between them.
EventLog backward_hooks(const std::vector<int64_t>& layers, bool recompute) {
  EventLog log;
  for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
    log.push_back("before_backward " + std::to_string(*it));
    if (recompute) log.push_back("core");
    log.push_back("after_backward " + std::to_string(*it) + " with grads");
  }
  return log;
}

TEST(LayerWrapper, BackwardHooksBracketEachLayersBackwardAndItsRecomputation) {
  for (const char* recompute : {"none", "full"}) {
    const ModelConfig m = recompute_config(false, recompute);
    LayerWrapper::Options options{.recompute = std::string(recompute) == "full", .backward_hooks = true};
    RecordingFactory factory({.core = true, .wrapper = options});
    auto model = make_model(m, factory);
    const auto ids = fixed_ids(61);
    const auto loss = next_token_loss(model->forward(ids), ids);
    factory.log->clear();
    const auto run = loss_and_grads(*model, loss);
    EXPECT_EQ(*factory.log, backward_hooks({0, 1, 2, 3}, options.recompute)) << "recompute " << recompute;
    // The hooks' nodes pass the gradients on untouched.
    auto plain = make_model(m);
    expect_bit_identical(loss_and_grads(*plain, next_token_loss(plain->forward(ids), ids)), run,
                         std::string("recompute ") + recompute);
  }
}

TEST(LayerWrapper, BackwardHooksRunOnAPipelineStageWhoseInputNeedsNoGradient) {
  for (const char* recompute : {"none", "full"}) {
    const ModelConfig m = recompute_config(false, recompute);
    LayerWrapper::Options options{.recompute = std::string(recompute) == "full", .backward_hooks = true};
    RecordingFactory factory({.wrapper = options});
    const StageSpec stage{1, 3, false, true};
    auto model = make_model(m, factory, stage);
    auto plain = make_model(m, LocalLayerFactory(), stage);
    torch::manual_seed(5);
    const auto hidden = torch::randn({2, 12, 64});
    const auto ids = fixed_ids(61);
    const auto loss = next_token_loss(model->forward(hidden), ids);
    factory.log->clear();
    const auto run = loss_and_grads(*model, loss);
    EXPECT_EQ(*factory.log, backward_hooks({1, 2, 3}, false)) << "recompute " << recompute;
    expect_bit_identical(loss_and_grads(*plain, next_token_loss(plain->forward(hidden), ids)), run,
                         std::string("stage 1..3, recompute ") + recompute);
  }
}

TEST(LayerWrapper, InferenceAndDecodingRunTheForwardHooksButRecordNoBackwardHooks) {
  const ModelConfig m = recompute_config(false, "full");
  RecordingFactory factory({.wrapper = LayerWrapper::Options{.recompute = true, .backward_hooks = true}});
  auto model = make_model(m, factory);
  const auto ids = fixed_ids(61);
  const EventLog forward = forward_hooks(4, /*core=*/false);
  {
    torch::NoGradGuard no_grad;
    EXPECT_FALSE(model->forward(ids).requires_grad());
  }
  EXPECT_EQ(*factory.log, forward);
  factory.log->clear();
  // With a cache, grad on: the layers run once, without recomputation or hooks in backward.
  KVCache cache;
  const auto operations = graph_operations(model->forward(ids, &cache, 0));
  EXPECT_EQ(*factory.log, forward);
  EXPECT_EQ(count_containing(operations, "RecomputeBlock"), 0);
  EXPECT_EQ(count_containing(operations, "CallInBackward"), 0);
}

}  // namespace
}  // namespace loom

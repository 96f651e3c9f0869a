// The whole Llama model cut over a tensor-parallel group
// (parallel/tensor_parallel_model.h) against the same model on one rank:
// every rank builds the full model from a fixed seed, keeps its shards in a
// model made by TensorParallelLayerFactory, and trains both side by side for
// ten steps (two micro-batches each, clipping, AdamW): at every step the
// losses, the gathered gradients of every parameter, the gradient norm and
// the gathered updated weights must match the single-rank ones.
//
// Runs under mpirun with the world as the tp group (CTest
// tensor_parallel_model_np2/np4); every rank runs every test in the same
// order (tests/unit/mpi_test_main.h).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/tensor_parallel_model.h"
#include "parallel/vocab_parallel.h"
#include "tests/unit/mpi_test_main.h"
#include "model/llama.h"
#include "optim/optimizer.h"
#include "util/error.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;
ProcessGroup& tp() { return *g_world; }

constexpr int64_t kSteps = 10;
constexpr int64_t kMicroBatches = 2;
constexpr int64_t kBatch = 2;
constexpr int64_t kSeq = 16;  // divisible by 4 for sequence parallelism
constexpr double kLr = 1e-3;

struct Case {
  const char* name;
  bool tied;
  bool sequence_parallel;
  std::string architecture = "llama";
  bool attention_bias = false;
  std::string recompute = "none";
  int64_t vocab = 128;  // one tp does not divide is padded (Note [vocab padding])
};

// GQA (8 query heads over 4 kv heads), every size but the vocabulary's
// divisible by tp = 4.
ModelConfig model_config(const Case& c) {
  ModelConfig m;
  m.architecture = c.architecture;
  m.hidden_size = 64;
  m.intermediate_size = 96;
  m.num_layers = 2;
  m.num_heads = 8;
  m.num_kv_heads = 4;
  m.vocab_size = c.vocab;
  m.max_seq_len = 64;
  m.tie_embeddings = c.tied;
  m.attention_bias = c.attention_bias;
  m.recompute = c.recompute;
  m.init_std = 0.05;
  if (m.architecture == "qwen3") m.head_dim = 12;  // not hidden / heads
  if (m.architecture == "smollm3") m.nope_layers = {1};
  if (m.gemma()) {
    // Soft-capping, a window shorter than the sequence on layer 0, the
    // local rotary there for gemma3.
    m.attn_logit_softcapping = m.architecture == "gemma2" ? 3.0 : 0.0;
    m.final_logit_softcapping = m.architecture == "gemma2" ? 5.0 : 0.0;
    m.query_pre_attn_scalar = 12;
    m.sliding_window = 5;
    m.layer_types = {"sliding_attention", "full_attention"};
    if (m.architecture == "gemma3_text") m.rope_local_theta = 100.0;
  }
  if (m.moe()) {
    // 4 experts, top 2 (Note [experts under tensor parallelism]); Qwen2-MoE
    // with its shared expert, layer 1 dense; Qwen3-MoE renormalizing.
    m.num_experts = 4;
    m.num_experts_per_tok = 2;
    m.moe_intermediate_size = 32;
    if (m.architecture == "qwen2_moe") {
      m.shared_expert_intermediate_size = 48;
      m.mlp_only_layers = {1};
    }
    m.norm_topk_prob = m.architecture == "qwen3_moe";
  }
  return m;
}

// Ids [kBatch, kSeq + 1], the same on every rank for the same seed.
at::Tensor batch_ids(int64_t vocab, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(vocab, {kBatch, kSeq + 1}, gen, at::kLong);
}

NamedTensors grads_of(const LlamaForCausalLM& model) {
  NamedTensors grads;
  for (const auto& named : model.named_parameters()) grads.emplace_back(named.key(), named.value().grad());
  return grads;
}

// Each named tensor within `tol` of its expected one's largest value
// (test_support::expect_close).
void expect_all_close(const NamedTensors& actual, const NamedTensors& expected, double tol, const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_EQ(actual[i].first, expected[i].first) << what;
    test_support::expect_close(actual[i].second, expected[i].second, tol, what + " " + actual[i].first);
  }
}

class TensorParallelModel : public ::testing::TestWithParam<Case> {};

TEST_P(TensorParallelModel, TenStepsMatchTheSingleRankModel) {
  const Case& c = GetParam();
  const ModelConfig config = model_config(c);
  torch::manual_seed(42);
  LocalLayerFactory local;
  LlamaForCausalLM full(config, local);
  full.init_weights(42);
  TensorParallelLayerFactory factory(tp(), c.sequence_parallel);
  auto sharded = std::make_shared<LlamaForCausalLM>(config, factory);
  load_tensor_parallel_shards(*sharded, to_named_tensors(full.named_parameters()), tp().rank(), tp().size());
  const std::map<std::string, int64_t> dims = tensor_parallel_shard_dims(*sharded);
  const std::map<std::string, int64_t> unpadded = tensor_parallel_unpadded_sizes(*sharded);
  const int64_t vocab_local = (config.vocab_size + tp().size() - 1) / tp().size();
  const int64_t tokens_local = std::clamp<int64_t>(config.vocab_size - tp().rank() * vocab_local, 0, vocab_local);
  const bool padded = config.vocab_size % tp().size() != 0;
  EXPECT_EQ(unpadded.size(), padded ? (c.tied ? 1u : 2u) : 0u);

  // Parameters are whole or cut exactly as the layout says; a padded
  // vocabulary's chunks hold ceil(vocab / tp) rows each.
  for (const auto& named : sharded->named_parameters()) {
    const at::Tensor& whole = full.named_parameters()[named.key()];
    const int64_t dim = dims.at(named.key());
    if (dim < 0) {
      EXPECT_EQ(named.value().sizes(), whole.sizes()) << named.key();
    } else if (unpadded.count(named.key()) != 0) {
      EXPECT_EQ(unpadded.at(named.key()), config.vocab_size) << named.key();
      EXPECT_EQ(named.value().size(0), vocab_local) << named.key();
    } else {
      EXPECT_EQ(named.value().size(dim) * tp().size(), whole.size(dim)) << named.key();
    }
  }

  // eps 1e-6 rather than 1e-8: Adam divides by sqrt(v) + eps, so a gradient
  // entry that cancels to ~1e-8 (fp32 rounding, which tp changes by summing
  // partial products in another order) would turn its rounding noise into
  // lr-sized weight differences; with eps 1e-6 such entries barely move.
  AdamWOptions adamw;
  adamw.eps = 1e-6;
  AdamW full_optimizer(to_named_tensors(full.named_parameters()), adamw);
  AdamW sharded_optimizer(to_named_tensors(sharded->named_parameters()), adamw);
  const GradNormReduction reduction = sharded_grad_norm({&tp()}, tp().rank(), sharded_optimizer.named_params(), dims);

  for (int64_t step = 0; step < kSteps; ++step) {
    // Both models start every step from the same weights, so that each
    // step's gradients are compared for the same point. (AdamW's state is
    // not reset: it carries the earlier steps' gradients on both sides.)
    // Free-running runs are compared by tests/e2e (loom train, tp = 1 vs N).
    load_tensor_parallel_shards(*sharded, to_named_tensors(full.named_parameters()), tp().rank(), tp().size());
    full_optimizer.zero_grad();
    sharded_optimizer.zero_grad();
    for (int64_t m = 0; m < kMicroBatches; ++m) {
      const at::Tensor ids = batch_ids(config.vocab_size, 1000 + step * kMicroBatches + m);
      const at::Tensor inputs = ids.narrow(1, 0, kSeq), targets = ids.narrow(1, 1, kSeq).reshape({-1});
      const at::Tensor full_logits = full.forward(inputs);
      const at::Tensor full_loss =
          torch::nn::functional::cross_entropy(full_logits.reshape({-1, config.vocab_size}), targets) / kMicroBatches;
      const at::Tensor local_logits = sharded->forward(inputs);
      ASSERT_EQ(local_logits.size(-1), vocab_local);
      ASSERT_EQ(local_logits.size(1), kSeq);
      const at::Tensor sharded_loss = vocab_parallel_cross_entropy(tp(), local_logits.reshape({-1, vocab_local}),
                                                                   targets, false, config.vocab_size) /
                                      kMicroBatches;
      full_loss.backward();
      sharded_loss.backward();
      EXPECT_NEAR(sharded_loss.item<double>(), full_loss.item<double>(), 1e-5 * full_loss.item<double>())
          << "step " << step << " micro-batch " << m;
    }
    const NamedTensors gathered = gather_tensor_parallel(tp(), grads_of(*sharded), dims, unpadded);
    expect_all_close(gathered, grads_of(full), 1e-5, "step " + std::to_string(step) + " gradient of");

    const double full_norm = clip_grad_norm(full_optimizer.params(), 1.0);
    const double sharded_norm = clip_grad_norm(sharded_optimizer.params(), 1.0, &reduction);
    EXPECT_NEAR(sharded_norm, full_norm, 1e-5 * full_norm) << "step " << step;
    full_optimizer.step(kLr);
    sharded_optimizer.step(kLr);
    // The updated weights. Adam's steps are about lr in size whatever the
    // gradient's magnitude, so gradient differences within the bound above
    // can move a weight by a small fraction of lr: the bound is 1% of one
    // step, absolute.
    const NamedTensors weights =
        gather_tensor_parallel(tp(), to_named_tensors(sharded->named_parameters()), dims, unpadded);
    const NamedTensors expected = to_named_tensors(full.named_parameters());
    ASSERT_EQ(weights.size(), expected.size());
    for (size_t i = 0; i < weights.size(); ++i) {
      ASSERT_EQ(weights[i].second.sizes(), expected[i].second.sizes()) << weights[i].first << ": gathered unpadded";
      const double diff = (weights[i].second - expected[i].second).abs().max().item<double>();
      EXPECT_LE(diff, 0.01 * kLr) << "weight " << weights[i].first << " after step " << step;
    }
    // Padding rows got no gradient and AdamW left them at 0.
    for (const auto& [name, size] : unpadded) {
      const at::Tensor local = sharded->named_parameters()[name];
      EXPECT_EQ(local.grad().narrow(0, tokens_local, vocab_local - tokens_local).abs().sum().item<double>(), 0.0)
          << name;
      EXPECT_EQ(local.narrow(0, tokens_local, vocab_local - tokens_local).abs().sum().item<double>(), 0.0) << name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, TensorParallelModel,
    ::testing::Values(Case{"untied", false, false}, Case{"untied_sequence_parallel", false, true},
                      Case{"tied", true, false}, Case{"tied_sequence_parallel", true, true},
                      Case{"attention_bias_sequence_parallel", true, true, "llama", true},
                      Case{"qwen2_biases", false, false, "qwen2"},
                      Case{"recompute_sequence_parallel", false, true, "llama", false, "full"},
                      Case{"selective_recompute_sequence_parallel", false, true, "llama", false, "selective"},
                      Case{"gemma2_selective_recompute", true, false, "gemma2", false, "selective"},
                      Case{"qwen3_head_norms", false, false, "qwen3", true},
                      Case{"qwen3_head_norms_sequence_parallel", true, true, "qwen3"},
                      Case{"olmo2_projection_norms", false, false, "olmo2"},
                      Case{"olmo2_projection_norms_sequence_parallel", true, true, "olmo2", true},
                      Case{"smollm3_nope_layer", true, false, "smollm3"},
                      Case{"gemma2_softcapped_sandwich_sequence_parallel", true, true, "gemma2"},
                      Case{"gemma3_text_head_norms_local_rotary", true, false, "gemma3_text"},
                      Case{"padded_vocab_untied_sequence_parallel", false, true, "llama", false, "none", 125},
                      Case{"padded_vocab_tied_gemma2_softcapped", true, false, "gemma2", false, "none", 127},
                      Case{"mixtral_experts", false, false, "mixtral"},
                      Case{"mixtral_experts_sequence_parallel", false, true, "mixtral"},
                      Case{"qwen2_moe_shared_expert_sequence_parallel", true, true, "qwen2_moe", true},
                      Case{"qwen3_moe_experts_recompute_sequence_parallel", false, true, "qwen3_moe", false, "full"}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

TEST(TensorParallelModelLoad, AFullTensorOfTheWrongShapeIsRefusedBeforeAnyCopy) {
  const ModelConfig config = model_config(Case{"untied", false, false});
  TensorParallelLayerFactory factory(tp(), false);
  LlamaForCausalLM sharded(config, factory);
  torch::manual_seed(1);
  LocalLayerFactory local;
  LlamaForCausalLM full(config, local);
  full.init_weights(1);
  NamedTensors params = to_named_tensors(full.named_parameters());
  const at::Tensor before = sharded.named_parameters()["model.embed_tokens.weight"].clone();
  for (auto& [name, tensor] : params) {
    if (name == "model.layers.1.mlp.down_proj.weight") tensor = at::zeros({64, 95});
  }
  try {
    load_tensor_parallel_shards(sharded, params, tp().rank(), tp().size());
    ADD_FAILURE() << "no BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.down_proj.weight"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(at::equal(sharded.named_parameters()["model.embed_tokens.weight"], before)) << "copied before refusing";
}

TEST(TensorParallelModelLoad, ShardDimsFollowMegatronsLayout) {
  TensorParallelLayerFactory factory(tp(), false);
  LlamaForCausalLM sharded(model_config(Case{"qwen2", false, false, "qwen2"}), factory);
  const std::map<std::string, int64_t> dims = tensor_parallel_shard_dims(sharded);
  EXPECT_EQ(dims.at("model.embed_tokens.weight"), 0);
  EXPECT_EQ(dims.at("lm_head.weight"), 0);
  EXPECT_EQ(dims.at("model.layers.0.self_attn.q_proj.weight"), 0);
  EXPECT_EQ(dims.at("model.layers.0.self_attn.q_proj.bias"), 0);
  EXPECT_EQ(dims.at("model.layers.0.self_attn.k_proj.weight"), 0);
  EXPECT_EQ(dims.at("model.layers.0.self_attn.o_proj.weight"), 1);
  EXPECT_EQ(dims.at("model.layers.0.mlp.up_proj.weight"), 0);
  EXPECT_EQ(dims.at("model.layers.0.mlp.down_proj.weight"), 1);
  EXPECT_EQ(dims.at("model.layers.0.input_layernorm.weight"), -1);
  EXPECT_EQ(dims.at("model.norm.weight"), -1);
}

// Each rank draws only its shards of the initial weights (model/init.h), and
// they are the whole model's: column shards (dim 0), row shards (dim 1), the
// vocab-parallel embedding and head, biases and whole norms.
TEST(TensorParallelModelInit, EachRankDrawsItsShardsOfTheWholeModelsInitialWeights) {
  for (const Case& c : {Case{"qwen2", false, false, "qwen2"}, Case{"tied", true, true},
                        Case{"padded_vocab", false, false, "llama", false, "none", 125},
                        Case{"padded_vocab_tied", true, false, "llama", false, "none", 127}}) {
    const ModelConfig config = model_config(c);
    LocalLayerFactory local;
    LlamaForCausalLM full(config, local);
    full.init_weights(/*seed=*/21);
    TensorParallelLayerFactory factory(tp(), c.sequence_parallel);
    LlamaForCausalLM drawn(config, factory), loaded(config, factory);
    init_tensor_parallel_shards(drawn, config.init_std, /*seed=*/21, tp().rank(), tp().size());
    load_tensor_parallel_shards(loaded, to_named_tensors(full.named_parameters()), tp().rank(), tp().size());
    const auto expected = loaded.named_parameters();
    for (const auto& named : drawn.named_parameters()) {
      EXPECT_TRUE(at::equal(named.value(), expected[named.key()])) << c.name << ": " << named.key();
    }
  }
}

// Records the shapes of the queries and keys it is given, then attends as
// the default core does.
class ShapeRecordingCore : public AttentionCore {
 public:
  ShapeRecordingCore(std::shared_ptr<AttentionCore> inner, std::vector<std::vector<int64_t>>* shapes)
      : inner_(std::move(inner)), shapes_(shapes) {}
  torch::Tensor forward(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                        torch::Tensor* cache_k, torch::Tensor* cache_v) override {
    shapes_->push_back(q_bhtd.sizes().vec());
    shapes_->push_back(k_bhtd.sizes().vec());
    return inner_->forward(q_bhtd, k_bhtd, v_bhtd, cache_k, cache_v);
  }

 private:
  std::shared_ptr<AttentionCore> inner_;
  std::vector<std::vector<int64_t>>* shapes_;
};

class ShapeRecordingFactory : public TensorParallelLayerFactory {
 public:
  using TensorParallelLayerFactory::TensorParallelLayerFactory;
  std::shared_ptr<AttentionCore> attention_core(const ModelConfig& model, int64_t layer) const override {
    return std::make_shared<ShapeRecordingCore>(TensorParallelLayerFactory::attention_core(model, layer), &shapes);
  }
  mutable std::vector<std::vector<int64_t>> shapes;
};

TEST(TensorParallelModelAttention, TheCoreSeesThisRanksHeadsOverTheWholeSequenceUnderSequenceParallelism) {
  const ModelConfig config = model_config(Case{"untied_sequence_parallel", false, true});
  ShapeRecordingFactory factory(tp(), /*sequence_parallel=*/true);
  auto sharded = std::make_shared<LlamaForCausalLM>(config, factory);
  init_tensor_parallel_shards(*sharded, config.init_std, /*seed=*/3, tp().rank(), tp().size());
  sharded->forward(batch_ids(config.vocab_size, 5).narrow(1, 0, kSeq));
  const int64_t tp_size = tp().size(), head_dim = config.head_size();
  std::vector<std::vector<int64_t>> expected;
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    expected.push_back({kBatch, config.num_heads / tp_size, kSeq, head_dim});
    expected.push_back({kBatch, config.num_kv_heads / tp_size, kSeq, head_dim});
  }
  EXPECT_EQ(factory.shapes, expected);
}

// The world group, counting the collectives issued on it.
class CountingGroup : public ProcessGroup {
 public:
  explicit CountingGroup(ProcessGroup& inner)
      : ProcessGroup("counting_tp", inner.rank(), inner.world_ranks(), inner.timeout()), inner_(inner) {}
  std::string_view backend() const override { return inner_.backend(); }
  std::unique_ptr<Work> all_reduce(const at::Tensor& t, const AllReduceOptions& o) override {
    ++count;
    return inner_.all_reduce(t, o);
  }
  std::unique_ptr<Work> all_gather(const at::Tensor& out, const at::Tensor& in, const AllGatherOptions& o) override {
    ++count;
    return inner_.all_gather(out, in, o);
  }
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                       const ReduceScatterOptions& o) override {
    ++count;
    return inner_.reduce_scatter(out, in, o);
  }
  std::unique_ptr<Work> broadcast(const at::Tensor& t, const BroadcastOptions& o) override {
    ++count;
    return inner_.broadcast(t, o);
  }
  std::unique_ptr<Work> barrier(const BarrierOptions& o) override { return inner_.barrier(o); }
  std::unique_ptr<Work> send(const at::Tensor& t, const SendOptions& o) override { return inner_.send(t, o); }
  std::unique_ptr<Work> recv(const at::Tensor& t, const RecvOptions& o) override { return inner_.recv(t, o); }
  int64_t count = 0;

 private:
  ProcessGroup& inner_;
};

// Note [experts under tensor parallelism]: a sparse block's forward and
// backward issue the same number of tp collectives whatever its number of
// experts. Without sequence parallelism: the output's all-reduce, then in
// backward the experts' input gradient's and the router weights'; with it,
// the gathers of the tokens, the chosen experts and the weights, the
// output's reduce-scatter, then in backward the gathered weights' and
// tokens' reduce-scatters, the output gradient's gather and the router
// weight's all-reduce (its f).
TEST(TensorParallelModelExperts, ASparseBlockCommunicatesOnceEachWayWhateverItsExperts) {
  for (const bool sequence_parallel : {false, true}) {
    std::vector<int64_t> counts;
    for (const int64_t experts : {4, 16}) {
      Case c{"mixtral", false, sequence_parallel, "mixtral"};
      ModelConfig config = model_config(c);
      config.num_experts = experts;
      CountingGroup counting(tp());
      TensorParallelLayerFactory factory(counting, sequence_parallel);
      auto block = factory.mlp(config, 0);
      torch::manual_seed(7);
      for (auto& p : block->parameters()) {
        at::NoGradGuard no_grad;
        p.normal_(0, 0.1);
      }
      const int64_t seq = sequence_parallel ? kSeq / tp().size() : kSeq;
      const at::Tensor x = at::randn({kBatch, seq, config.hidden_size}).requires_grad_(true);
      block->forward(x).sum().backward();
      counts.push_back(counting.count);
    }
    EXPECT_EQ(counts[0], counts[1]) << "sequence_parallel " << sequence_parallel;
    EXPECT_EQ(counts[0], sequence_parallel ? 8 : 3) << "sequence_parallel " << sequence_parallel;
  }
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_tensor_parallel_model");
}

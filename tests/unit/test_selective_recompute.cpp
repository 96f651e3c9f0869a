// model.recompute selective (Note [selective recomputation] in model/llama.cpp):
// the attention core runs again in backward, everything else is kept. The
// gradients are those of model.recompute none, bit for bit, for every
// attention path (causal SDPA, packed documents, a sliding window, the eager
// soft-capped core), under the LayerWrapper's backward hooks too; and the
// bytes kept for backward lie between full's and none's.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "model/layers.h"
#include "model/llama.h"
#include "model/recompute.h"
#include "trainer/tensor_memory.h"

namespace loom {
namespace {

// GQA; "gemma2": soft-capped (the eager core) with a window on layer 0;
// "mistral": a window shorter than the sequence on every layer.
ModelConfig config(const std::string& family, const std::string& recompute) {
  ModelConfig m;
  m.architecture = family;
  m.hidden_size = 64;
  m.intermediate_size = 96;
  m.num_layers = 3;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 61;
  m.max_seq_len = 64;
  m.init_std = 0.1;
  m.recompute = recompute;
  if (family == "mistral") m.sliding_window = 5;
  if (family == "gemma2") {
    m.attn_logit_softcapping = 3.0;
    m.final_logit_softcapping = 5.0;
    m.query_pre_attn_scalar = 12;
    m.sliding_window = 5;
    m.layer_types = {"sliding_attention", "full_attention", "sliding_attention"};
  }
  return m;
}

std::shared_ptr<LlamaForCausalLM> make_model(const ModelConfig& m, const LayerFactory& factory = LocalLayerFactory()) {
  torch::manual_seed(7);
  auto model = std::make_shared<LlamaForCausalLM>(m, factory);
  model->init_weights(7);
  return model;
}

torch::Tensor fixed_ids(int64_t batch, int64_t tokens) {
  torch::manual_seed(11);
  return torch::randint(0, 61, {batch, tokens}, torch::kLong);
}

// Two documents in each row, cut at different places (Note [document mask]).
torch::Tensor two_documents(int64_t batch, int64_t tokens) {
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t cut = 3 + 2 * b;
    rows.push_back(torch::cat({torch::arange(cut), torch::arange(tokens - cut)}));
  }
  return torch::stack(rows).to(torch::kLong);
}

torch::Tensor next_token_loss(const torch::Tensor& logits_btv, const torch::Tensor& ids_bt) {
  const int64_t vocab = logits_btv.size(2);
  return at::cross_entropy_loss(logits_btv.narrow(1, 0, logits_btv.size(1) - 1).reshape({-1, vocab}),
                                ids_bt.narrow(1, 1, ids_bt.size(1) - 1).reshape(-1));
}

struct StepResult {
  torch::Tensor loss;
  std::map<std::string, torch::Tensor> grads;
};

StepResult train_step(LlamaForCausalLM& model, const torch::Tensor& ids, const torch::Tensor& positions) {
  const torch::Tensor logits = positions.defined() ? model.forward(ids, positions) : model.forward(ids);
  const torch::Tensor loss = next_token_loss(logits, ids);
  loss.backward();
  StepResult run{loss.detach(), {}};
  for (const auto& p : model.named_parameters()) run.grads[p.key()] = p.value().grad();
  return run;
}

void expect_bit_identical(const StepResult& none, const StepResult& other, const std::string& what) {
  EXPECT_TRUE(torch::equal(none.loss, other.loss)) << what << ": loss " << none.loss.item<double>() << " vs "
                                                   << other.loss.item<double>();
  ASSERT_EQ(none.grads.size(), other.grads.size()) << what;
  for (const auto& [name, grad] : none.grads) {
    const torch::Tensor& got = other.grads.at(name);
    ASSERT_TRUE(grad.defined() && got.defined()) << what << ": " << name << " has no gradient";
    EXPECT_TRUE(torch::equal(grad, got)) << what << ": " << name << " differs by "
                                         << (grad - got).abs().max().item<double>();
  }
}

// The autograd graph's node names behind `t`.
std::vector<std::string> graph_operations(const torch::Tensor& t) {
  std::vector<std::string> names;
  std::vector<const torch::autograd::Node*> todo{t.grad_fn().get()};
  std::set<const torch::autograd::Node*> seen;
  while (!todo.empty()) {
    const torch::autograd::Node* node = todo.back();
    todo.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    names.push_back(node->name());
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function.get());
  }
  return names;
}

int64_t count_containing(const std::vector<std::string>& names, const std::string& part) {
  return std::count_if(names.begin(), names.end(), [&](const std::string& n) { return n.find(part) != std::string::npos; });
}

TEST(SelectiveRecompute, GivesBitIdenticalLossAndGradientsToNoneOnEveryAttentionPath) {
  const torch::Tensor ids = fixed_ids(2, 12);
  for (const char* family : {"llama", "mistral", "gemma2"}) {
    for (const bool documents : {false, true}) {
      const torch::Tensor positions = documents ? two_documents(2, 12) : torch::Tensor();
      const std::string what = std::string(family) + (documents ? ", packed documents" : "");
      auto none = make_model(config(family, "none"));
      auto selective = make_model(config(family, "selective"));
      const StepResult reference = train_step(*none, ids, positions);
      // One recomputed core per layer, in place of the core's own nodes.
      const torch::Tensor logits = documents ? selective->forward(ids, positions) : selective->forward(ids);
      EXPECT_EQ(count_containing(graph_operations(logits), "RecomputeBlock"), 3) << what;
      const StepResult run = train_step(*selective, ids, positions);
      expect_bit_identical(reference, run, what);
      EXPECT_GT(run.grads.at("model.layers.0.self_attn.q_proj.weight").abs().sum().item<double>(), 0.0) << what;
    }
  }
}

TEST(SelectiveRecompute, InferenceAndDecodingRecordNoRecomputation) {
  auto model = make_model(config("llama", "selective"));
  const torch::Tensor ids = fixed_ids(1, 8);
  {
    torch::NoGradGuard no_grad;
    const torch::Tensor logits = model->forward(ids);
    EXPECT_FALSE(logits.requires_grad());
  }
  auto none = make_model(config("llama", "none"));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(model->forward(ids), none->forward(ids)));
}

// A wrapper with backward hooks (ZeRO-3's shape): before_backward and
// after_backward still bracket each layer's backward, the core's
// recomputation inside it, and every parameter has its gradient by the end.
class HookLog : public LayerWrapper {
 public:
  explicit HookLog(std::shared_ptr<std::vector<std::string>> log)
      : LayerWrapper({.recompute = false, .backward_hooks = true}), log_(std::move(log)) {}

 protected:
  void before_backward(const LayerCall& call) override { log_->push_back("before " + std::to_string(call.layer)); }
  void after_backward(const LayerCall& call) override {
    const bool all = std::all_of(call.parameters.begin(), call.parameters.end(),
                                 [](const torch::Tensor& p) { return p.grad().defined(); });
    log_->push_back("after " + std::to_string(call.layer) + (all ? " with grads" : " without grads"));
  }

 private:
  std::shared_ptr<std::vector<std::string>> log_;
};

// Logs each run of the core: forward, and (in backward) its recomputation.
class LoggingCore : public AttentionCore {
 public:
  LoggingCore(std::shared_ptr<AttentionCore> inner, std::shared_ptr<std::vector<std::string>> log)
      : AttentionCore(inner->options()), inner_(std::move(inner)), log_(std::move(log)) {}
  torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor* cache_k,
                        torch::Tensor* cache_v) override {
    log_->push_back("core");
    return inner_->forward(q, k, v, cache_k, cache_v);
  }

 private:
  std::shared_ptr<AttentionCore> inner_;
  std::shared_ptr<std::vector<std::string>> log_;
};

class HookFactory : public LocalLayerFactory {
 public:
  std::shared_ptr<AttentionCore> attention_core(const ModelConfig& model, int64_t layer) const override {
    return std::make_shared<LoggingCore>(LocalLayerFactory::attention_core(model, layer), log);
  }
  std::shared_ptr<LayerWrapper> layer_wrapper(const ModelConfig&, int64_t) const override {
    return std::make_shared<HookLog>(log);
  }
  std::shared_ptr<std::vector<std::string>> log = std::make_shared<std::vector<std::string>>();
};

TEST(SelectiveRecompute, RunsTheCoreAgainInsideEachLayersBackwardHooks) {
  const ModelConfig m = config("llama", "selective");
  HookFactory factory;
  auto model = make_model(m, factory);
  const torch::Tensor ids = fixed_ids(2, 12);
  const torch::Tensor loss = next_token_loss(model->forward(ids), ids);
  EXPECT_EQ(*factory.log, (std::vector<std::string>{"core", "core", "core"}));
  factory.log->clear();
  loss.backward();
  EXPECT_EQ(*factory.log, (std::vector<std::string>{"before 2", "core", "after 2 with grads", "before 1", "core",
                                                    "after 1 with grads", "before 0", "core", "after 0 with grads"}));
  auto none = make_model(config("llama", "none"));
  StepResult run{loss.detach(), {}};
  for (const auto& p : model->named_parameters()) run.grads[p.key()] = p.value().grad();
  expect_bit_identical(train_step(*none, ids, torch::Tensor()), run, "with backward hooks");
}

// Bytes of CPU tensors alive after forward (what backward will read, and the
// logits), counted by loom's allocator wrapper (trainer/tensor_memory.h).
int64_t bytes_kept_for_backward(const std::string& recompute, const torch::Tensor& positions) {
  install_tensor_memory_counter();
  auto model = make_model(config("llama", recompute));
  const torch::Tensor ids = fixed_ids(2, 48);
  const int64_t before = tensor_memory_live_bytes();
  const torch::Tensor logits = positions.defined() ? model->forward(ids, positions) : model->forward(ids);
  const int64_t kept = tensor_memory_live_bytes() - before;
  next_token_loss(logits, ids).backward();
  return kept;
}

TEST(SelectiveRecompute, KeepsLessForBackwardThanNoneAndMoreThanFull) {
  for (const bool documents : {false, true}) {
    const torch::Tensor positions = documents ? two_documents(2, 48) : torch::Tensor();
    const int64_t none = bytes_kept_for_backward("none", positions);
    const int64_t selective = bytes_kept_for_backward("selective", positions);
    const int64_t full = bytes_kept_for_backward("full", positions);
    const std::string what = documents ? "packed documents" : "causal";
    EXPECT_LT(selective, none) << what;
    EXPECT_GT(selective, full) << what;
    // The fused core's output is o_proj's input (a view of it), kept either
    // way; what the core keeps of its own is the log-sum-exp per head,
    // [batch, heads, tokens] fp32 a layer.
    EXPECT_GE(none - selective, 3 * 2 * 4 * 48 * 4) << what;
    if (documents) {
      // And the float copy of the documents' boolean mask that SDPA saves,
      // [batch, 1, tokens, tokens] a layer: the quadratic term (two layers'
      // worth at least, measured 2.96).
      EXPECT_GE(none - selective, 2 * (2 * 48 * 48 * 4)) << what;
    }
  }
}

}  // namespace
}  // namespace loom

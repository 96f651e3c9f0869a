// The Llama family (Llama 2/3, SmolLM2/3, Mistral-style, Qwen2/3, OLMo2):
// decoder layers of grouped-query attention with rotary embeddings and a
// SwiGLU MLP, RMSNorm, tied or untied embeddings. The families differ in a
// few layer choices read off the config (Note [model families] in
// config/model_config.h): q/k norms, norms after instead of before each
// block, layers without rotary.
//
// Parameter names and shapes are Hugging Face's, so named_parameters() of the
// whole model is what `model.safetensors` holds:
//   model.embed_tokens.weight                         [vocab, hidden]
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight   [out, in] (+ .bias)
//   model.layers.N.mlp.{gate,up,down}_proj.weight
//   model.layers.N.{input,post_attention}_layernorm.weight
//   (olmo2: model.layers.N.{post_attention,post_feedforward}_layernorm.weight)
//   model.layers.N.self_attn.{q,k}_norm.weight       (qwen3, olmo2)
//   model.norm.weight, lm_head.weight (absent when tied)
//
// A pipeline stage builds only part of the model (StageSpec); the layer
// numbers stay global so names do not depend on the layout.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "config/config.h"
#include "model/document_mask.h"
#include "model/layers.h"
#include "model/rotary.h"

namespace loom {

// Keys and values of earlier positions, one pair per local layer, for
// incremental decoding. Tensors are [batch, kv_heads, positions, head_dim].
struct KVCache {
  std::vector<torch::Tensor> keys;
  std::vector<torch::Tensor> values;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

// The projections and rotary embedding around the factory's attention core.
class Attention : public torch::nn::Module {
 public:
  // `layer`: the global number, which says whether it takes rotary.
  Attention(const ModelConfig& model, const LayerFactory& factory, int64_t layer);
  // x_btd: [batch, tokens, hidden]. When `cache_k`/`cache_v` are given they
  // hold earlier positions and are extended in place. With `documents`
  // (never with a cache) attention stays within each packed document (Note
  // [document mask] in model/document_mask.h). With model.recompute
  // selective, a forward that records a graph and has no cache keeps only
  // the core's inputs (rotated q, k and v) and runs the core again in
  // backward (Note [selective recomputation] in model/llama.cpp); the
  // documents are held until then.
  torch::Tensor forward(const torch::Tensor& x_btd, const torch::Tensor& cos_td, const torch::Tensor& sin_td,
                        torch::Tensor* cache_k, torch::Tensor* cache_v,
                        const std::shared_ptr<const DocumentMask>& documents = nullptr);

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  QkNorm qk_norm_;
  bool rotary_;
  std::shared_ptr<Linear> q_proj_, k_proj_, v_proj_, o_proj_;
  std::shared_ptr<RMSNorm> q_norm_, k_norm_;  // null for QkNorm::kNone
  std::shared_ptr<AttentionCore> core_;  // not a module: it holds no parameters
  bool recompute_core_;                  // model.recompute selective
};

// The SwiGLU MLP, LayerFactory::mlp's default.
// The gated MLP, LayerFactory::mlp's default: SwiGLU, or GeGLU for the
// gemma families (ModelConfig::hidden_act).
class Mlp : public FeedForward {
 public:
  Mlp(const ModelConfig& model, const LayerFactory& factory);
  torch::Tensor forward(const torch::Tensor& x_btd) override;  // down(act(gate(x)) * up(x))

 private:
  std::string activation_;  // silu | gelu_pytorch_tanh | gelu
  std::shared_ptr<Linear> gate_proj_, up_proj_, down_proj_;
};

class DecoderLayer : public torch::nn::Module {
 public:
  // `layer`: the global number, N of model.layers.N.
  DecoderLayer(const ModelConfig& model, const LayerFactory& factory, int64_t layer);
  // Runs through the factory's LayerWrapper (Note [layer wrapper] in
  // model/recompute.h): with model.recompute = full, a forward that records
  // a graph and has no cache keeps only x_btd and runs the layer again in
  // backward (selective: its attention core only, Attention::forward).
  // Inference and decoding run the layer once.
  // cos/sin: [tokens, head_dim], or [batch, 1, tokens, head_dim] per token.
  torch::Tensor forward(const torch::Tensor& x_btd, const torch::Tensor& cos_td, const torch::Tensor& sin_td,
                        torch::Tensor* cache_k = nullptr, torch::Tensor* cache_v = nullptr,
                        std::shared_ptr<const DocumentMask> documents = nullptr);

 private:
  torch::Tensor compute(const torch::Tensor& x_btd, const torch::Tensor& cos_td, const torch::Tensor& sin_td,
                        torch::Tensor* cache_k, torch::Tensor* cache_v,
                        const std::shared_ptr<const DocumentMask>& documents);

  int64_t layer_;
  bool post_norms_;
  bool sandwich_norms_;
  // Pre-norm families: input_layernorm_ before attention and
  // post_attention_layernorm_ before the MLP (Hugging Face's names). olmo2:
  // post_attention_layernorm_ on attention's output, post_feedforward_
  // layernorm_ on the MLP's, each before the residual add; no input norm.
  // gemma2, gemma3_text: all four, input_layernorm_ and
  // pre_feedforward_layernorm_ before the blocks, the other two on their
  // outputs.
  std::shared_ptr<RMSNorm> input_layernorm_, post_attention_layernorm_, pre_feedforward_layernorm_,
      post_feedforward_layernorm_;
  std::shared_ptr<Attention> self_attn_;
  std::shared_ptr<FeedForward> mlp_;
  std::shared_ptr<LayerWrapper> wrapper_;
};

// Which part of the model a rank builds. The default is the whole model.
struct StageSpec {
  int64_t first_layer = 0;
  int64_t num_layers = -1;  // -1: through the last layer
  bool has_embedding = true;
  bool has_head = true;  // final norm and lm_head
};

class LlamaForCausalLM : public torch::nn::Module {
 public:
  LlamaForCausalLM(const ModelConfig& model, const LayerFactory& factory, StageSpec stage = {});

  // Fills parameters as Hugging Face's initializer does: linear and embedding
  // weights ~ N(0, init_std), biases 0, norm weights 1, each parameter taken
  // as the whole tensor of its name (model/init.h). The values depend on
  // `seed` and the names only, not on torch's generator, which is left as it
  // is: a pipeline stage gets the whole model's values of its layers.
  void init_weights(uint64_t seed);

  // First stage: ids [batch, tokens] (int64) -> hidden [batch, tokens, hidden].
  // Later stages take hidden states. The last stage returns logits
  // [batch, tokens, vocab]. `start` is the position of the first token (> 0
  // only with a cache).
  torch::Tensor forward(const torch::Tensor& input, KVCache* cache = nullptr, int64_t start = 0);
  // The same over packed documents (data.document_mask; Note [document mask]
  // in model/document_mask.h): `positions_bt` [batch, tokens] (integer, the
  // whole sequence's even where a sequence-parallel stage holds a slice of
  // it; best on the CPU, where it is read) is each token's position within
  // its document, 0 where one starts. Rotary takes each token's position,
  // and attention stays within each document, causal inside it. Undefined
  // positions: forward(input). No KV cache.
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& positions_bt);

  const ModelConfig& config() const { return config_; }
  const StageSpec& stage() const { return stage_; }
  int64_t num_local_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // cos/sin of the tokens' positions; local_cos/local_sin from the local
  // rotary for the layers that take it (gemma3_text's sliding layers),
  // undefined without one.
  struct RotaryTables {
    torch::Tensor cos, sin, local_cos, local_sin;
  };
  RotaryTables rotary_tables(int64_t start, int64_t tokens, torch::Device device) const;
  RotaryTables rotary_tables_at(const torch::Tensor& positions_bt, torch::Device device) const;
  // The stage's layers and head from h (embedded already), with these
  // rotary tables (and documents, where given).
  torch::Tensor forward_layers(torch::Tensor h, const RotaryTables& rotary, KVCache* cache,
                               const std::shared_ptr<const DocumentMask>& documents);
  // The embedding (first stage), and the residual stream in autocast's dtype.
  torch::Tensor embed(const torch::Tensor& input);

  ModelConfig config_;
  StageSpec stage_;
  RotaryEmbedding rotary_;
  std::optional<RotaryEmbedding> local_rotary_;  // gemma3_text: rope_local_theta, no scaling
  int64_t sequence_shards_;  // LayerFactory::sequence_shards()
  LayerFactory::SequenceShare sequence_share_;  // LayerFactory::sequence_share()
  std::shared_ptr<torch::nn::Module> model_;  // holds embed_tokens, layers, norm: the "model." prefix
  std::shared_ptr<Embedding> embed_tokens_;
  std::vector<std::shared_ptr<DecoderLayer>> layers_;
  std::shared_ptr<RMSNorm> norm_;
  std::shared_ptr<LmHead> lm_head_;
};

// Parameters other than embeddings: the N of REFERENCE's 6N + 12LHS.
int64_t count_non_embedding_parameters(const ModelConfig& model);
// The same with only num_experts_per_tok experts of each sparse layer: the
// parameters one token computes with (Note [mixture of experts] in model/moe.h).
int64_t count_active_non_embedding_parameters(const ModelConfig& model);
int64_t count_parameters(const ModelConfig& model);

// FLOPs of one token's forward and backward: 6 N + 12 L H S, with N the
// active non-embedding parameters, L layers, H hidden size, S sequence length.
double flops_per_token(const ModelConfig& model, int64_t seq_len);

}  // namespace loom

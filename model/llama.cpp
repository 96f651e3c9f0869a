#include "model/llama.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "model/init.h"
#include "model/moe.h"
#include "model/kernels/fused_ops.h"
#include "model/recompute.h"

namespace loom {

namespace {

// `tables` (LlamaForCausalLM's rotary tables) with only the rows `rows`
// (int64, CPU) along `dim`: a context-parallel rank's tokens.
template <typename Tables>
Tables rows_at(Tables tables, const torch::Tensor& rows, int64_t dim) {
  for (torch::Tensor* table : {&tables.cos, &tables.sin, &tables.local_cos, &tables.local_sin}) {
    if (table->defined()) *table = table->index_select(dim, rows.to(table->device()));
  }
  return tables;
}

}  // namespace

Attention::Attention(const ModelConfig& model, const LayerFactory& factory, int64_t layer)
    : num_heads_(model.num_heads),
      num_kv_heads_(model.kv_heads()),
      head_dim_(model.head_size()),
      qk_norm_(model.qk_norm()),
      rotary_(model.uses_rotary(layer)) {
  const int64_t hidden = model.hidden_size;
  const NormWeight style = model.one_plus_norms() ? NormWeight::kOnePlus : NormWeight::kScale;
  q_proj_ = register_module("q_proj", factory.linear(hidden, num_heads_ * head_dim_, model.qkv_bias(), LinearRole::kColumn));
  k_proj_ = register_module("k_proj", factory.linear(hidden, num_kv_heads_ * head_dim_, model.qkv_bias(), LinearRole::kColumn));
  v_proj_ = register_module("v_proj", factory.linear(hidden, num_kv_heads_ * head_dim_, model.qkv_bias(), LinearRole::kColumn));
  o_proj_ = register_module("o_proj", factory.linear(num_heads_ * head_dim_, hidden, model.o_bias(), LinearRole::kRow));
  if (qk_norm_ == QkNorm::kPerHead) {
    q_norm_ = register_module("q_norm", factory.head_norm(head_dim_, model.rms_norm_eps, style));
    k_norm_ = register_module("k_norm", factory.head_norm(head_dim_, model.rms_norm_eps, style));
  } else if (qk_norm_ == QkNorm::kWholeProjection) {
    q_norm_ = register_module("q_norm", factory.projection_norm(num_heads_ * head_dim_, model.rms_norm_eps));
    k_norm_ = register_module("k_norm", factory.projection_norm(num_kv_heads_ * head_dim_, model.rms_norm_eps));
  }
  core_ = factory.attention_core(model, layer);
  recompute_core_ = model.recompute == "selective";
}

// Note [selective recomputation]
// Megatron's selective mode (Korthikanti et al. 2022, "Reducing Activation
// Recomputation in Large Transformer Models"): of a layer's activations, the
// attention core's are the cheapest to rebuild for the memory they take.
// The core runs through recompute_in_backward with q, k and v (which the
// projections and rotary made, and which the core would save anyway) as its
// inputs: what the core saves of its own is left out (SDPA's log-sum-exp;
// the float copy of a boolean mask of packed documents, batch x tokens^2 per
// layer; the eager soft-capped core's scores and probabilities, batch x
// heads x tokens^2) and made again in the layer's backward, just before the
// core's own backward needs it. (A fused core's output is laid out like q,
// [batch, tokens, heads, head_dim], so o_proj's input below is a view of it
// and o_proj keeps it saved either way.) The projections keep their
// inputs and outputs, so nothing with parameters is recomputed: the
// gradients are those of model.recompute none, bit for bit (the same kernels
// on the same inputs). The core is inside the layer, so the LayerWrapper's
// hooks (ZeRO-3's gathers) see the same forward and backward as without it.

torch::Tensor Attention::forward(const torch::Tensor& x_btd, const torch::Tensor& cos_td, const torch::Tensor& sin_td,
                                 torch::Tensor* cache_k, torch::Tensor* cache_v,
                                 const std::shared_ptr<const DocumentMask>& documents) {
  // Head counts and the number of tokens are read from the projection
  // outputs, not from the config and the input, so that a tensor-parallel
  // projection that holds a slice of the heads, or gathers the whole sequence
  // from a slice of it (sequence parallelism), works unchanged.
  auto q_btf = q_proj_->forward(x_btd);
  auto k_btf = k_proj_->forward(x_btd);
  const auto v_btf = v_proj_->forward(x_btd);
  const int64_t batch = q_btf.size(0), tokens = q_btf.size(1);
  if (qk_norm_ == QkNorm::kWholeProjection) {
    q_btf = q_norm_->forward(q_btf);
    k_btf = k_norm_->forward(k_btf);
  }
  auto q_bthd = q_btf.view({batch, tokens, -1, head_dim_});
  auto k_bthd = k_btf.view({batch, tokens, -1, head_dim_});
  if (qk_norm_ == QkNorm::kPerHead) {
    q_bthd = q_norm_->forward(q_bthd);
    k_bthd = k_norm_->forward(k_bthd);
  }
  auto q = q_bthd.transpose(1, 2);
  auto k = k_bthd.transpose(1, 2);
  auto v = v_btf.view({batch, tokens, -1, head_dim_}).transpose(1, 2);
  if (rotary_) {
    q = RotaryEmbedding::apply(q, cos_td, sin_td);
    k = RotaryEmbedding::apply(k, cos_td, sin_td);
  }
  TORCH_CHECK(documents == nullptr || cache_k == nullptr, "packed documents are not decoded with a KV cache");
  // Rows that are one segment each need no mask: the plain causal core.
  const bool masked = documents != nullptr && !documents->one_segment_per_row();
  torch::Tensor out;
  if (recompute_core_ && cache_k == nullptr && records_graph(q, {k, v})) {
    // Note [selective recomputation]. The function is kept until backward:
    // it holds the core and the documents, not this module.
    const InputsForward core = [core = core_, documents = masked ? documents : nullptr](
                                   const std::vector<torch::Tensor>& qkv) {
      return documents ? core->forward_documents(qkv[0], qkv[1], qkv[2], *documents)
                       : core->forward(qkv[0], qkv[1], qkv[2], nullptr, nullptr);
    };
    out = recompute_in_backward(core, {q, k, v}, {});
  } else {
    out = masked ? core_->forward_documents(q, k, v, *documents) : core_->forward(q, k, v, cache_k, cache_v);
  }
  out = out.transpose(1, 2).reshape({batch, tokens, -1});
  return o_proj_->forward(out);
}

Mlp::Mlp(const ModelConfig& model, const LayerFactory& factory) : activation_(model.activation()) {
  const int64_t hidden = model.hidden_size, inter = model.intermediate_size;
  gate_proj_ = register_module("gate_proj", factory.linear(hidden, inter, model.mlp_bias, LinearRole::kColumn));
  up_proj_ = register_module("up_proj", factory.linear(hidden, inter, model.mlp_bias, LinearRole::kColumn));
  down_proj_ = register_module("down_proj", factory.linear(inter, hidden, model.mlp_bias, LinearRole::kRow));
}

torch::Tensor Mlp::forward(const torch::Tensor& x_btd) {
  if (activation_ != "silu") {
    // GeGLU: transformers' gelu_pytorch_tanh is the tanh approximation.
    const char* approximate = activation_ == "gelu_pytorch_tanh" ? "tanh" : "none";
    return down_proj_->forward(at::gelu(gate_proj_->forward(x_btd), approximate) * up_proj_->forward(x_btd));
  }
  // silu(gate) * up: one fused CUDA kernel on a GPU (model/kernels/fused_ops.h).
  return down_proj_->forward(kernels::swiglu(gate_proj_->forward(x_btd), up_proj_->forward(x_btd)));
}

std::shared_ptr<FeedForward> LayerFactory::mlp(const ModelConfig& model, int64_t layer) const {
  if (model.sparse_layer(layer)) return std::make_shared<SparseMoeBlock>(model, *this, layer, expert_exchange());
  return std::make_shared<Mlp>(model, *this);
}

DecoderLayer::DecoderLayer(const ModelConfig& model, const LayerFactory& factory, int64_t layer)
    : layer_(layer), post_norms_(model.post_norms()), sandwich_norms_(model.sandwich_norms()) {
  self_attn_ = register_module("self_attn", std::make_shared<Attention>(model, factory, layer));
  mlp_ = register_module(model.feed_forward_name(), factory.mlp(model, layer));
  const NormWeight style = model.one_plus_norms() ? NormWeight::kOnePlus : NormWeight::kScale;
  const auto norm = [&] { return factory.norm(model.hidden_size, model.rms_norm_eps, style); };
  if (!post_norms_) input_layernorm_ = register_module("input_layernorm", norm());
  post_attention_layernorm_ = register_module("post_attention_layernorm", norm());
  if (sandwich_norms_) pre_feedforward_layernorm_ = register_module("pre_feedforward_layernorm", norm());
  if (post_norms_ || sandwich_norms_) post_feedforward_layernorm_ = register_module("post_feedforward_layernorm", norm());
  wrapper_ = factory.layer_wrapper(model, layer);
}

torch::Tensor DecoderLayer::forward(const torch::Tensor& x_btd, const torch::Tensor& cos_td,
                                    const torch::Tensor& sin_td, torch::Tensor* cache_k, torch::Tensor* cache_v,
                                    std::shared_ptr<const DocumentMask> documents) {
  // A cache means decoding: no backward to save memory for, and a
  // recomputation would extend the cache a second time.
  const LayerCall call{layer_, parameters(), /*uses_cache=*/cache_k != nullptr};
  // A recomputation keeps the layer function until backward, so it holds the
  // layer (not a raw `this`). cos/sin and the documents are constants of
  // the positions, captured as they are; the cache pointers only matter
  // while decoding, which runs the function once, now.
  auto self = std::static_pointer_cast<DecoderLayer>(shared_from_this());
  return wrapper_->run(
      call,
      [self, cos_td, sin_td, cache_k, cache_v, documents = std::move(documents)](const torch::Tensor& x) {
        return self->compute(x, cos_td, sin_td, cache_k, cache_v, documents);
      },
      x_btd);
}

torch::Tensor DecoderLayer::compute(const torch::Tensor& x_btd, const torch::Tensor& cos_td,
                                    const torch::Tensor& sin_td, torch::Tensor* cache_k, torch::Tensor* cache_v,
                                    const std::shared_ptr<const DocumentMask>& documents) {
  if (post_norms_) {
    auto h = x_btd + post_attention_layernorm_->forward(
                         self_attn_->forward(x_btd, cos_td, sin_td, cache_k, cache_v, documents));
    return h + post_feedforward_layernorm_->forward(mlp_->forward(h));
  }
  if (sandwich_norms_) {
    auto attended = self_attn_->forward(input_layernorm_->forward(x_btd), cos_td, sin_td, cache_k, cache_v, documents);
    auto h = x_btd + post_attention_layernorm_->forward(attended);
    return h + post_feedforward_layernorm_->forward(mlp_->forward(pre_feedforward_layernorm_->forward(h)));
  }
  auto attended = self_attn_->forward(input_layernorm_->forward(x_btd), cos_td, sin_td, cache_k, cache_v, documents);
  auto [h, normed] = post_attention_layernorm_->add_then_forward(x_btd, attended);
  return h + mlp_->forward(normed);
}

namespace {
// A module that only groups children, so names read "model.layers.7.…".
class Container : public torch::nn::Module {};
}  // namespace

namespace {

// The model as its local rotary sees it: rope_local_theta, no scaling.
ModelConfig local_rotary_config(const ModelConfig& model) {
  ModelConfig local = model;
  local.rope_theta = model.rope_local_theta;
  local.rope_scaling = RopeScalingConfig{};
  return local;
}

}  // namespace

LlamaForCausalLM::LlamaForCausalLM(const ModelConfig& model, const LayerFactory& factory, StageSpec stage)
    : config_(model), stage_(stage), rotary_(model), sequence_shards_(factory.sequence_shards()),
      sequence_share_(factory.sequence_share()) {
  if (model.rope_local_theta > 0) local_rotary_.emplace(local_rotary_config(model));
  if (stage_.num_layers < 0) stage_.num_layers = model.num_layers - stage_.first_layer;
  TORCH_CHECK(stage_.first_layer >= 0 && stage_.first_layer + stage_.num_layers <= model.num_layers,
              "stage layers [", stage_.first_layer, ", ", stage_.first_layer + stage_.num_layers,
              ") outside the model's ", model.num_layers, " layers");
  model_ = register_module("model", std::make_shared<Container>());
  if (stage_.has_embedding) {
    embed_tokens_ = model_->register_module("embed_tokens", factory.embedding(model.vocab_size, model.hidden_size));
  }
  auto layers = model_->register_module("layers", std::make_shared<Container>());
  for (int64_t i = 0; i < stage_.num_layers; ++i) {
    const int64_t global = stage_.first_layer + i;
    layers_.push_back(
        layers->register_module(std::to_string(global), std::make_shared<DecoderLayer>(model, factory, global)));
  }
  if (stage_.has_head) {
    norm_ = model_->register_module(
        "norm", factory.norm(model.hidden_size, model.rms_norm_eps,
                             model.one_plus_norms() ? NormWeight::kOnePlus : NormWeight::kScale));
    // Tied embeddings on a single stage share the embedding's weight; across
    // pipeline stages the last stage holds a copy kept in sync by the pipeline.
    std::shared_ptr<Embedding> tied = model.tie_embeddings ? embed_tokens_ : nullptr;
    if (model.tie_embeddings && !tied) {
      tied = model_->register_module("embed_tokens", factory.embedding(model.vocab_size, model.hidden_size));
      embed_tokens_ = tied;
    }
    auto head = factory.lm_head(model.hidden_size, model.vocab_size, tied);
    lm_head_ = tied ? head : register_module("lm_head", head);
  }
}

void LlamaForCausalLM::init_weights(uint64_t seed) {
  for (const auto& named : named_parameters()) init_parameter(named.key(), named.value(), config_.init_std, seed);
}

torch::Tensor LlamaForCausalLM::embed(const torch::Tensor& input) {
  torch::Tensor h = stage_.has_embedding ? embed_tokens_->forward(input) : input;
  if (stage_.has_embedding && config_.scaled_embeddings()) {
    // Gemma: sqrt(hidden) rounded to fp32, then to the weight's dtype, as
    // transformers' scaled embedding holds it.
    const auto scale = torch::tensor(std::sqrt(static_cast<double>(config_.hidden_size)), torch::kFloat);
    h = h * scale.to(h.device(), h.scalar_type());
  }
  // Under bf16 autocast the residual stream is bf16 too (autocast leaves the
  // embedding lookup in its weight's fp32): norms and residual adds then
  // move half the bytes, and every projection's input is already bf16.
  const auto device_type = h.device().type();
  if (at::autocast::is_autocast_enabled(device_type) && h.is_floating_point()) {
    h = h.to(at::autocast::get_autocast_dtype(device_type));
  }
  return h;
}

torch::Tensor LlamaForCausalLM::forward(const torch::Tensor& input, KVCache* cache, int64_t start) {
  torch::Tensor h = embed(input);
  // Attention sees the whole sequence even when the residual stream holds a
  // slice of it (sequence parallelism): the projections gather it.
  const int64_t tokens = h.size(1) * sequence_shards_;
  RotaryTables rotary;
  if (sequence_share_.positions.defined()) {
    // Context parallelism: this rank's tokens are scattered over the
    // sequence; their rows of the whole sequence's tables.
    TORCH_CHECK(cache == nullptr && start == 0 && tokens == sequence_share_.positions.size(0),
                "a context-parallel model runs its ", sequence_share_.positions.size(0),
                " tokens of the sequence from position 0 without a KV cache, got ", tokens, " from ", start);
    rotary = rows_at(rotary_tables(0, sequence_share_.tokens, h.device()), sequence_share_.positions, 0);
  } else {
    rotary = rotary_tables(start, tokens, h.device());
  }
  if (cache != nullptr && cache->keys.empty()) {
    cache->keys.resize(layers_.size());
    cache->values.resize(layers_.size());
  }
  return forward_layers(std::move(h), rotary, cache, nullptr);
}

torch::Tensor LlamaForCausalLM::forward(const torch::Tensor& input, const torch::Tensor& positions_bt) {
  if (!positions_bt.defined()) return forward(input);
  torch::Tensor h = embed(input);
  // The whole sequence's positions, also under sequence parallelism (see
  // above): attention runs over all of it. Under context parallelism too:
  // the positions are the whole rows' (the ring core masks other ranks'
  // keys by their documents), and this rank's tokens take their rows of
  // the rotary tables (LayerFactory::sequence_share).
  const bool shared = sequence_share_.positions.defined();
  const int64_t tokens = shared ? sequence_share_.tokens : h.size(1) * sequence_shards_;
  TORCH_CHECK(positions_bt.dim() == 2 && positions_bt.size(0) == h.size(0) && positions_bt.size(1) == tokens,
              "positions must be [batch ", h.size(0), ", tokens ", tokens, "], got ", positions_bt.sizes());
  auto documents = std::make_shared<const DocumentMask>(positions_bt, h.device());
  // Rows counting up from one start (one document each, or none starting)
  // take the rotary table of forward(input, nullptr, start), and the plain
  // causal core: bit for bit the forward without positions.
  int64_t first = 0;
  if (documents->rows_count_from(&first)) {
    RotaryTables rotary = rotary_tables(first, tokens, h.device());
    if (shared) rotary = rows_at(std::move(rotary), sequence_share_.positions, 0);
    return forward_layers(std::move(h), rotary, nullptr, nullptr);
  }
  RotaryTables rotary = rotary_tables_at(documents->positions_bt(), h.device());  // [batch, 1, tokens, head_dim]
  if (shared) rotary = rows_at(std::move(rotary), sequence_share_.positions, 2);
  return forward_layers(std::move(h), rotary, nullptr, documents);
}

LlamaForCausalLM::RotaryTables LlamaForCausalLM::rotary_tables(int64_t start, int64_t tokens,
                                                               torch::Device device) const {
  RotaryTables tables;
  std::tie(tables.cos, tables.sin) = rotary_.cos_sin(start, tokens, device);
  if (local_rotary_) std::tie(tables.local_cos, tables.local_sin) = local_rotary_->cos_sin(start, tokens, device);
  return tables;
}

LlamaForCausalLM::RotaryTables LlamaForCausalLM::rotary_tables_at(const torch::Tensor& positions_bt,
                                                                  torch::Device device) const {
  RotaryTables tables;
  std::tie(tables.cos, tables.sin) = rotary_.cos_sin_at(positions_bt, device);
  if (local_rotary_) std::tie(tables.local_cos, tables.local_sin) = local_rotary_->cos_sin_at(positions_bt, device);
  return tables;
}

torch::Tensor LlamaForCausalLM::forward_layers(torch::Tensor h, const RotaryTables& rotary, KVCache* cache,
                                               const std::shared_ptr<const DocumentMask>& documents) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const bool local = config_.uses_local_rotary(stage_.first_layer + static_cast<int64_t>(i));
    const torch::Tensor& cos = local ? rotary.local_cos : rotary.cos;
    const torch::Tensor& sin = local ? rotary.local_sin : rotary.sin;
    h = cache ? layers_[i]->forward(h, cos, sin, &cache->keys[i], &cache->values[i])
              : layers_[i]->forward(h, cos, sin, nullptr, nullptr, documents);
  }
  if (!stage_.has_head) return h;
  auto logits = lm_head_->forward(norm_->forward(h));
  const double cap = config_.final_logit_softcapping;
  // Gemma 2: logits squashed into (-cap, cap), elementwise (so also on a
  // tensor-parallel rank's slice of the vocabulary).
  if (cap > 0) logits = at::tanh(logits / cap) * cap;
  return logits;
}

namespace {

// A sparse layer's feed-forward block with `experts` of its experts counted:
// the router (all of it), the experts, and qwen2_moe's shared expert and gate.
int64_t sparse_block_parameters(const ModelConfig& m, int64_t experts) {
  const int64_t h = m.hidden_size;
  int64_t block = h * m.num_experts + experts * 3 * h * m.expert_intermediate_size();
  if (m.architecture == "qwen2_moe") block += 3 * h * m.shared_expert_intermediate_size + h;
  return block;
}

}  // namespace

int64_t count_non_embedding_parameters(const ModelConfig& m) {
  const int64_t h = m.hidden_size, d = m.head_size(), q = m.num_heads * d, kv = m.kv_heads() * d;
  int64_t attention = h * q + 2 * h * kv + q * h;
  if (m.qkv_bias()) attention += q + 2 * kv;
  if (m.o_bias()) attention += h;
  if (m.qk_norm() == QkNorm::kPerHead) attention += 2 * d;
  if (m.qk_norm() == QkNorm::kWholeProjection) attention += q + kv;
  int64_t mlp = 3 * h * m.intermediate_size;
  if (m.mlp_bias) mlp += 2 * m.intermediate_size + h;
  const int64_t norms = m.sandwich_norms() ? 4 : 2;  // before or after the blocks, or both
  int64_t total = h;  // the final norm
  for (int64_t layer = 0; layer < m.num_layers; ++layer) {
    total += attention + norms * h + (m.sparse_layer(layer) ? sparse_block_parameters(m, m.num_experts) : mlp);
  }
  return total;
}

int64_t count_active_non_embedding_parameters(const ModelConfig& m) {
  if (!m.moe()) return count_non_embedding_parameters(m);
  int64_t inactive = 0;
  for (int64_t layer = 0; layer < m.num_layers; ++layer) {
    if (m.sparse_layer(layer)) {
      inactive += sparse_block_parameters(m, m.num_experts) - sparse_block_parameters(m, m.num_experts_per_tok);
    }
  }
  return count_non_embedding_parameters(m) - inactive;
}

int64_t count_parameters(const ModelConfig& m) {
  const int64_t embeddings = m.vocab_size * m.hidden_size * (m.tie_embeddings ? 1 : 2);
  return count_non_embedding_parameters(m) + embeddings;
}

double flops_per_token(const ModelConfig& model, int64_t seq_len) {
  // The attention term per layer: 12 H S, with S the keys a query sees,
  // at most the layer's sliding window.
  double attention = 0;
  for (int64_t layer = 0; layer < model.num_layers; ++layer) {
    const int64_t window = model.window_of(layer);
    const int64_t keys = window > 0 ? std::min(window, seq_len) : seq_len;
    attention += 12.0 * static_cast<double>(model.hidden_size) * static_cast<double>(keys);
  }
  // A mixture of experts computes with the k experts each token chose.
  return 6.0 * static_cast<double>(count_active_non_embedding_parameters(model)) + attention;
}

}  // namespace loom

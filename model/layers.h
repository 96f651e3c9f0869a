// The layers the model asks for by role, and the factory that makes them.
//
// Model code is written once, for one device. Where a later parallel layout
// needs a different layer (Megatron's column- or row-parallel linear, a
// vocabulary-parallel embedding), the factory returns it and the model code
// does not change. Every layer keeps Hugging Face's parameter names: a linear
// owns `weight` [out_features, in_features] and optionally `bias` [out];
// an embedding owns `weight` [vocab, hidden]; a norm owns `weight` [hidden].
//
// Besides single layers the factory makes three parts of each decoder layer
// that later parallelisms replace whole: the attention core (ring attention
// under context parallelism), the feed-forward block (an expert block under
// expert parallelism) and the LayerWrapper every decoder layer runs through
// (ZeRO-3's parameter gathering; model/recompute.h, Note [layer wrapper]).
#pragma once

#include <memory>
#include <utility>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "config/model_config.h"
#include "model/document_mask.h"
#include "model/recompute.h"

namespace loom {

// How a linear layer's weight would be cut under tensor parallelism.
// kColumn: output features split (q/k/v, gate/up); kRow: input features split
// (o_proj, down_proj); kReplicated: every rank holds all of it.
enum class LinearRole { kColumn, kRow, kReplicated };

class ExpertExchange;  // model/moe.h

class Linear : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
};

class Embedding : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& ids) = 0;
  virtual torch::Tensor weight() const = 0;
};

// How an RMSNorm applies its weight w: kScale multiplies by w (Llama);
// kOnePlus multiplies by 1 + w, in fp32 before the cast back (Gemma, whose
// stored weights are offsets from 1 and start at 0).
enum class NormWeight { kScale, kOnePlus };

// y = x / sqrt(mean(x^2) + eps) * weight. An fp32 input takes Hugging Face's
// LlamaRMSNorm (or GemmaRMSNorm) operation for operation. A bf16 input (the
// residual stream of precision.compute bf16) goes through at::rms_norm,
// which on CUDA is one fused kernel each way that accumulates in fp32 and
// returns bf16; the weight stays an fp32 parameter and is cast on the way in.
class RMSNorm : public torch::nn::Module {
 public:
  RMSNorm(int64_t hidden, double eps, NormWeight style = NormWeight::kScale);
  virtual ~RMSNorm() = default;
  virtual torch::Tensor forward(const torch::Tensor& x) { return normalize(x, weight); }
  // (h, forward(h)) for h = residual + branch: a decoder layer's residual add
  // and this norm after it. With fuse_residual_add (fusion.add_rmsnorm, set
  // by the factory that made it) on a bf16 or fp16 stream, one fused op
  // (kernels::add_rms_norm: one kernel each way on a GPU); otherwise the add,
  // then forward().
  std::pair<torch::Tensor, torch::Tensor> add_then_forward(const torch::Tensor& residual, const torch::Tensor& branch);
  torch::Tensor weight;
  bool fuse_residual_add = false;

 protected:
  // The computation above with `w` in place of the parameter (a sequence-
  // parallel norm passes its weight through a communication operator first).
  torch::Tensor normalize(const torch::Tensor& x, const torch::Tensor& w) const;

 private:
  double eps_;
  NormWeight style_;
};

// The output head: hidden -> logits over the vocabulary. When the embeddings
// are tied it owns no parameter and multiplies by the embedding's weight.
class LmHead : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& hidden) = 0;
};

// The part of attention between the projections: causal scaled-dot-product
// attention of the rotated queries over the rotated keys, with grouped kv
// heads, extending a KV cache while decoding. Holds no parameters.
//
// q_bhtd: [batch, heads, tokens, head_dim]; k_bhtd, v_bhtd: [batch, kv_heads,
// tokens, head_dim], heads a multiple of kv_heads. Returns [batch, heads,
// tokens, head_dim]. A core reads the head counts from its inputs, never from
// the config: under tensor parallelism they are this rank's heads. When
// `cache_k`/`cache_v` are given they hold the earlier positions' keys and
// values (undefined before the first call) and are extended in place.
//
// AttentionOptions::window (ModelConfig::window_of the core's layer) limits
// each query to itself and the window - 1 positions before it (sliding-window
// attention, Hugging Face's convention); 0 is full causal attention. Within
// a packed document the window counts positions of the document.
struct AttentionOptions {
  int64_t window = 0;
  double scale = 0.0;    // on q.k; 0: head_dim^-1/2
  double softcap = 0.0;  // scores become softcap * tanh(score / softcap); 0: none
};

class AttentionCore {
 public:
  explicit AttentionCore(AttentionOptions options = {}) : options_(options) {}
  virtual ~AttentionCore() = default;
  const AttentionOptions& options() const { return options_; }
  int64_t window() const { return options_.window; }
  virtual torch::Tensor forward(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                                torch::Tensor* cache_k, torch::Tensor* cache_v) = 0;
  // The same over packed documents (Note [document mask] in
  // model/document_mask.h): query t attends the keys of its own document at
  // or before t. No cache: decoding never packs documents. Default:
  // scaled-dot-product attention with the boolean mask, exact on every
  // device; a core with a faster kernel overrides it.
  virtual torch::Tensor forward_documents(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                          const torch::Tensor& v_bhtd, const DocumentMask& documents);

 private:
  AttentionOptions options_;
};

// Attention as Hugging Face's eager path computes it: scores q.k * scale,
// soft-capped when options.softcap > 0, positions where `allowed` (bool,
// broadcast to [batch, heads, queries, keys]; undefined: all) is false left
// out, softmax in fp32. What a soft-capped core runs; SDPA cannot cap.
torch::Tensor eager_attention(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                              const torch::Tensor& allowed, const AttentionOptions& options);

// The causal mask of `queries` queries over `keys` keys whose last query is
// the last key, limited to `window` keys back (0: no limit): bool
// [queries, keys], true where attention is allowed.
torch::Tensor sliding_window_mask(int64_t queries, int64_t keys, int64_t window, torch::Device device);

// Packed documents through PyTorch's flash attention, variable-length form:
// the default core's path on a GPU (Note [document mask]). takes_varlen_flash
// says whether the kernel takes these tensors: CUDA, bf16 or fp16, head_dim a
// multiple of 8 up to 256 (flash attention also needs an Ampere or later GPU).
bool takes_varlen_flash(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd);
// `window` > 0: each query sees at most the window - 1 keys before it in its segment.
torch::Tensor varlen_flash_attention(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                     const torch::Tensor& v_bhtd, const DocumentMask& documents, int64_t window = 0);

// The feed-forward block of a decoder layer, registered as its `mlp` (or
// Mixtral's `block_sparse_moe`: ModelConfig::feed_forward_name):
// [batch, tokens, hidden] -> the same shape. Llama's SwiGLU Mlp
// (model/llama.h), or a mixture-of-experts block (model/moe.h).
class FeedForward : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& x_btd) = 0;
};

// The collectives around a mixture-of-experts block (Note [experts under
// tensor parallelism] in model/moe.h). Each is the identity here, which is
// what a factory without tensor parallelism gives; the tensor-parallel
// factory's communicate over its group, once for all the block's experts.
class ExpertCollectives {
 public:
  virtual ~ExpertCollectives() = default;
  // This rank's residual stream [batch, s', hidden] (s' = tokens /
  // sequence_shards()) -> the tokens every expert linear reads [batch, s, hidden].
  virtual torch::Tensor expert_input(const torch::Tensor& x_btd) const { return x_btd; }
  // A value per token that this rank's replicated layers computed from its
  // residual stream [batch, s', n] (the router's weights, the shared
  // expert's gate) -> the same for the experts' tokens [batch, s, n].
  virtual torch::Tensor token_values(const torch::Tensor& v_btn) const { return v_btn; }
  // The same for integers (the chosen experts), outside autograd.
  virtual torch::Tensor token_ids(const torch::Tensor& ids_btn) const { return ids_btn; }
  // The block's output summed from the experts' [batch, s, hidden] (under
  // tensor parallelism each rank's partial sum) -> this rank's residual
  // stream [batch, s', hidden].
  virtual torch::Tensor output(const torch::Tensor& y_btd) const { return y_btd; }
  // Per-row totals [batch, n] of what this rank counted over its share of
  // the rows' tokens -> the same over every token of the rows, summed over
  // the ranks that hold the other shares (context parallelism's ring; under
  // sequence parallelism token_ids has gathered the tp group's already).
  // Outside autograd (Note [load-balancing loss] in model/moe.h).
  virtual torch::Tensor row_totals(const torch::Tensor& per_row_bn) const { return per_row_bn; }
};

// Each method is one role; a factory overrides the roles its parallelism
// changes and inherits the rest. The model asks in a fixed order (per decoder
// layer: q, k, v, o linears, the q/k norms where the family has them, the
// attention core, the mlp block with its linears, two norms, the layer
// wrapper), so a factory may rely on it, as tensor
// parallelism's shared column input does.
class LayerFactory {
 public:
  virtual ~LayerFactory() = default;
  virtual std::shared_ptr<Linear> linear(int64_t in_features, int64_t out_features, bool bias,
                                         LinearRole role) const = 0;
  virtual std::shared_ptr<Embedding> embedding(int64_t vocab, int64_t hidden) const = 0;
  // `tied` is the embedding whose weight the head reuses, or null for an own weight.
  virtual std::shared_ptr<LmHead> lm_head(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) const = 0;
  virtual std::shared_ptr<RMSNorm> norm(int64_t hidden, double eps, NormWeight style) const {
    auto made = std::make_shared<RMSNorm>(hidden, eps, style);
    made->fuse_residual_add = fuse_residual_add_norm;
    return made;
  }
  // fusion.add_rmsnorm: the norms norm() makes fuse the residual add before
  // them (RMSNorm::add_then_forward). Set before the model is built.
  bool fuse_residual_add_norm = false;
  // Query/key norms (QkNorm in config/model_config.h), made after the
  // attention's four linears. head_norm: over each head's `head_dim`
  // features, one weight for all heads, applied to [..., heads, head_dim].
  // projection_norm: over all `features` of a column linear's output
  // (heads * head_dim), applied to [..., features] as that linear returns
  // it. Both default to a plain RMSNorm; tensor parallelism, whose ranks
  // hold a slice of the heads, replaces them.
  virtual std::shared_ptr<RMSNorm> head_norm(int64_t head_dim, double eps, NormWeight style) const {
    return std::make_shared<RMSNorm>(head_dim, eps, style);
  }
  virtual std::shared_ptr<RMSNorm> projection_norm(int64_t features, double eps) const {
    return std::make_shared<RMSNorm>(features, eps);
  }
  // Into how many slices the layers cut the sequence of the residual stream
  // between them: 1, or tp under sequence parallelism, where the embedding
  // returns [batch, tokens/tp, hidden] and the head takes it back.
  virtual int64_t sequence_shards() const { return 1; }
  // Where the tokens this rank's layers see lie in the whole sequence, when
  // they are a part of it (context parallelism: two zig-zag chunks,
  // parallel/context_parallel.h): `tokens` of the whole sequence and the
  // int64 CPU `positions` of this rank's tokens, in their order. The model
  // takes rotary at these positions from the whole sequence's table, the
  // values a single rank uses there. Default: the whole sequence (positions
  // undefined).
  struct SequenceShare {
    int64_t tokens = 0;
    torch::Tensor positions;
  };
  virtual SequenceShare sequence_share() const { return {}; }

  // The core of decoder layer `layer` (its global number: the window
  // depends on it), with the model's scale and soft-capping. Default: at::scaled_dot_product_attention on this
  // device; packed documents through flash attention's variable-length
  // kernel where it applies (Note [document mask]).
  virtual std::shared_ptr<AttentionCore> attention_core(const ModelConfig& model, int64_t layer) const;
  // The feed-forward block of decoder layer `layer` (its global number).
  // Default: Llama's Mlp, gate/up/down from this factory's linears (defined
  // beside Mlp in model/llama.cpp), or on the sparse layers of a mixture of
  // experts (ModelConfig::sparse_layer) a SparseMoeBlock whose experts come
  // from the same linears. The block is registered under
  // ModelConfig::feed_forward_name, so its parameters are named
  // model.layers.N.mlp.* (model.layers.N.block_sparse_moe.* for mixtral).
  virtual std::shared_ptr<FeedForward> mlp(const ModelConfig& model, int64_t layer) const;
  // A linear of an expert of a mixture-of-experts block (gate and up
  // kColumn, down kRow; no bias). It reads the tokens
  // ExpertCollectives::expert_input made, with no communication of its own,
  // and a kRow one leaves its partial sum for ExpertCollectives::output to
  // reduce. Default: linear(in_features, out_features, false, role).
  virtual std::shared_ptr<Linear> expert_linear(int64_t in_features, int64_t out_features, LinearRole role) const {
    return linear(in_features, out_features, /*bias=*/false, role);
  }
  // The collectives around the mixture-of-experts blocks built from this
  // factory's expert linears. Default: the identities.
  virtual std::shared_ptr<ExpertCollectives> expert_collectives() const;
  // The wrapper decoder layer `layer` (its global number) runs through; one
  // object may serve several layers. Default: a plain LayerWrapper that
  // recomputes in backward when model.recompute is full; the one given to
  // use_layer_wrapper when there is one.
  virtual std::shared_ptr<LayerWrapper> layer_wrapper(const ModelConfig& model, int64_t layer) const;

  // Every layer built afterwards runs through `wrapper` (ZeRO-3's, which
  // gathers and frees each layer's parameters: parallel/zero.h); null puts
  // the default back.
  void use_layer_wrapper(std::shared_ptr<LayerWrapper> wrapper) { wrapper_ = std::move(wrapper); }

  // Where the experts of the sparse layers built afterwards live: null (the
  // default), all of them on this rank; else this rank holds its share and
  // `exchange` sends each token to the rank that holds its expert (expert
  // parallelism, parallel/expert_parallel.h; Note [expert exchange] in
  // model/moe.h).
  void use_expert_exchange(std::shared_ptr<ExpertExchange> exchange) { exchange_ = std::move(exchange); }
  const std::shared_ptr<ExpertExchange>& expert_exchange() const { return exchange_; }

 private:
  std::shared_ptr<LayerWrapper> wrapper_;
  std::shared_ptr<ExpertExchange> exchange_;
};

// Plain single-device layers.
class LocalLayerFactory : public LayerFactory {
 public:
  std::shared_ptr<Linear> linear(int64_t in_features, int64_t out_features, bool bias,
                                 LinearRole role) const override;
  std::shared_ptr<Embedding> embedding(int64_t vocab, int64_t hidden) const override;
  std::shared_ptr<LmHead> lm_head(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) const override;
};

}  // namespace loom

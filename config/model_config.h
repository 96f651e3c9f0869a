// The model's shape (model.* in the config): what the model folder builds
// from. Torch-free, so that config/, the checkpoint readers, the fuzzers and
// `loom plan` speak of a model without libtorch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom {

// Rotary frequency scaling, Hugging Face's rope_scaling / rope_parameters
// (model/rotary.h has the formulas).
struct RopeScalingConfig {
  std::string type = "none";  // none | llama3 | linear | yarn | dynamic | longrope
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3, yarn, longrope
  // yarn and longrope: cos and sin are multiplied by it; 0 = derived from
  // factor (and yarn's mscale, mscale_all_dim) as transformers does.
  double attention_factor = 0.0;
  double beta_fast = 32.0;      // yarn: rotations bounding the extrapolated dims
  double beta_slow = 1.0;       // yarn: rotations bounding the interpolated dims
  double mscale = 0.0;          // yarn: 0 = absent
  double mscale_all_dim = 0.0;  // yarn: 0 = absent
  bool truncate = true;         // yarn: round the correction range outwards
  // longrope: per-frequency divisors (head_dim / 2 each), short up to
  // original_max_position_embeddings tokens, long beyond.
  std::vector<double> short_factor;
  std::vector<double> long_factor;
};

// Where a family normalizes queries and keys after their projections.
//   kNone: not at all (Llama, Qwen2, SmolLM3).
//   kPerHead: RMSNorm over each head's head_dim features, one weight
//     [head_dim] shared by the heads (Qwen3), before rotary.
//   kWholeProjection: RMSNorm over the whole q (or k) projection,
//     [heads * head_dim] features and as many weights (OLMo2), before rotary.
enum class QkNorm { kNone, kPerHead, kWholeProjection };

// Note [model families]
// Each family is the one model with a few layer choices, named by
// model.architecture after Hugging Face's model_type, whose Hub files use
// the same parameter names:
//   llama    Llama 2/3, SmolLM1/2, Mistral without a window: pre-norm layers
//   qwen2    llama with q/k/v biases (and no others)
//   qwen3    llama with per-head q/k RMSNorm (QkNorm::kPerHead)
//   olmo2    no norm before attention or the MLP; RMSNorm after each of them
//            (post_attention_layernorm, post_feedforward_layernorm) before
//            the residual add; q/k RMSNorm over the whole projection
//   smollm3  llama whose model.nope_layers use no rotary embedding
//   mistral  llama with a sliding window on every layer
//   gemma    embeddings times sqrt(hidden_size); RMSNorm weights applied as
//            1 + w; a GeGLU MLP (hidden_act gelu_pytorch_tanh); tied head
//   gemma2   gemma with norms before and after attention and the MLP
//            (input, post_attention, pre_feedforward, post_feedforward),
//            soft-capped attention scores and logits, scores scaled by
//            query_pre_attn_scalar, sliding-window layers between global ones
//   gemma3_text  gemma2 with per-head q/k norms (1 + w), no soft-capping by
//            default, and its own rotary theta on the sliding layers
//   mixtral  mistral (window optional) whose MLP is a mixture of experts
//            (Note [mixture of experts] in model/moe.h), named
//            block_sparse_moe; top-k weights always renormalized
//   qwen2_moe  qwen2 whose MLPs are mixtures of experts plus a shared
//            expert with a sigmoid gate; dense MLPs on mlp_only_layers
//   qwen3_moe  qwen3 whose MLPs are mixtures of experts
// The choices are read off the config (qk_norm(), post_norms(),
// uses_rotary(), ...) so that the model, the parameter counts and the Hub
// config agree on them.
struct ModelConfig {
  // llama | qwen2 | qwen3 | olmo2 | smollm3 | mistral | gemma | gemma2 | gemma3_text | mixtral | qwen2_moe |
  // qwen3_moe (Note [model families])
  std::string architecture = "llama";
  int64_t hidden_size = 0;             // required
  int64_t intermediate_size = 0;       // required
  int64_t num_layers = 0;              // required
  int64_t num_heads = 0;               // required
  int64_t num_kv_heads = 0;            // 0 -> num_heads
  int64_t head_dim = 0;                // 0 -> hidden_size / num_heads
  int64_t vocab_size = 0;              // required
  int64_t max_seq_len = 2048;          // tokens
  double rope_theta = 10000.0;
  RopeScalingConfig rope_scaling;
  double rms_norm_eps = 1e-5;
  bool tie_embeddings = false;
  bool attention_bias = false;  // llama: bias on q/k/v/o; qwen2 always has q/k/v bias
  bool mlp_bias = false;
  double init_std = 0.02;
  std::string init_from;        // Hugging Face folder to start from ("" = random init)
  int64_t bos_token_id = -1;    // -1 = none
  int64_t eos_token_id = -1;    // -1 = none
  // Grow the embedding and head of model.init_from to this many rows (new
  // tokens of a fine-tune); new rows start at the mean of the old ones.
  // 0 = keep the vocabulary.
  int64_t resize_vocab = 0;
  // Activation recomputation: none keeps every layer's activations for
  // backward; full keeps only each decoder layer's input and recomputes the
  // layer in backward; selective recomputes only the attention core.
  std::string recompute = "none";  // none | selective | full (not in config.json)
  // smollm3: the (0-based) decoder layers whose attention takes no rotary
  // embedding (NoPE); Hugging Face's no_rope_layers holds 0 for them.
  std::vector<int64_t> nope_layers;
  // Sliding-window attention: a query attends to itself and the
  // sliding_window - 1 positions before it (Hugging Face's window). 0 = no
  // window. layer_types (HF's, one per layer: full_attention or
  // sliding_attention) says which layers use it; empty = every layer.
  int64_t sliding_window = 0;
  std::vector<std::string> layer_types;
  // The MLP's activation (HF hidden_act, Gemma 2's hidden_activation):
  // silu (SwiGLU), gelu_pytorch_tanh or gelu (GeGLU, the gemma families);
  // "" = the family's own (activation()).
  std::string hidden_act;
  // gemma2: scores and logits x become cap * tanh(x / cap); 0 = none.
  double attn_logit_softcapping = 0.0;
  double final_logit_softcapping = 0.0;
  // Attention scores scaled by query_pre_attn_scalar^-1/2 instead of
  // head_dim^-1/2 (gemma2, gemma3_text); 0 = head_dim.
  double query_pre_attn_scalar = 0.0;
  // gemma3_text: rotary theta of the sliding-window layers, which take no
  // rope scaling (HF's local rope); 0 = rope_theta and rope_scaling.
  double rope_local_theta = 0.0;
  // Mixture of experts (mixtral, qwen2_moe, qwen3_moe; Note [mixture of
  // experts] in model/moe.h), the Hub's names. 0 experts = dense.
  int64_t num_experts = 0;            // HF num_local_experts (mixtral), num_experts (qwen)
  int64_t num_experts_per_tok = 0;    // experts each token is routed to (top-k)
  int64_t moe_intermediate_size = 0;  // qwen: width of one expert (mixtral's is intermediate_size)
  int64_t shared_expert_intermediate_size = 0;  // qwen2_moe: width of the shared expert; 0 = none
  bool norm_topk_prob = false;        // qwen: renormalize the kept weights to sum to 1 (mixtral always does)
  double router_aux_loss_coef = 0.001;  // the load-balancing loss's weight in the training loss ...
  bool output_router_logits = false;    // ... which is added when this is set (Note [load-balancing loss] in model/moe.h)
  int64_t decoder_sparse_step = 1;      // qwen: layer i is sparse when (i + 1) % step == 0 ...
  std::vector<int64_t> mlp_only_layers;  // ... and i is not listed here (those keep a dense MLP)

  // Resolved values (after defaults): never 0.
  int64_t kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
  int64_t head_size() const { return head_dim > 0 ? head_dim : hidden_size / num_heads; }
  // qwen2 and qwen2_moe: q/k/v biases, never an o bias.
  bool qwen2_biases() const { return architecture == "qwen2" || architecture == "qwen2_moe"; }
  bool qkv_bias() const { return qwen2_biases() || attention_bias; }
  bool o_bias() const { return !qwen2_biases() && attention_bias; }
  // A mixture-of-experts family (Note [mixture of experts] in model/moe.h).
  bool moe() const { return architecture == "mixtral" || architecture == "qwen2_moe" || architecture == "qwen3_moe"; }
  // Decoder layer `layer` has a mixture of experts in place of the dense MLP.
  bool sparse_layer(int64_t layer) const {
    if (!moe() || num_experts <= 0) return false;
    for (int64_t dense : mlp_only_layers) {
      if (dense == layer) return false;
    }
    return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
  }
  // Width of one routed expert's SwiGLU.
  int64_t expert_intermediate_size() const { return architecture == "mixtral" ? intermediate_size : moe_intermediate_size; }
  // The kept top-k weights are divided by their sum (Mixtral always; Qwen with norm_topk_prob).
  bool renormalize_top_k() const { return architecture == "mixtral" || norm_topk_prob; }
  // The Hub's name of a decoder layer's feed-forward block: model.layers.N.<this>.
  const char* feed_forward_name() const { return architecture == "mixtral" ? "block_sparse_moe" : "mlp"; }
  bool gemma() const { return architecture == "gemma" || architecture == "gemma2" || architecture == "gemma3_text"; }
  std::string activation() const {
    if (!hidden_act.empty()) return hidden_act;
    return gemma() ? "gelu_pytorch_tanh" : "silu";
  }
  // RMSNorm weights stored as an offset from 1 (gemma).
  bool one_plus_norms() const { return gemma(); }
  // Embedding rows multiplied by sqrt(hidden_size) (gemma).
  bool scaled_embeddings() const { return gemma(); }
  // Norms before and after attention and the MLP (gemma2, gemma3_text).
  bool sandwich_norms() const { return architecture == "gemma2" || architecture == "gemma3_text"; }
  // Layer `layer` takes the local rotary table (gemma3_text's sliding layers).
  bool uses_local_rotary(int64_t layer) const { return rope_local_theta > 0 && window_of(layer) > 0; }
  QkNorm qk_norm() const {
    if (architecture == "qwen3" || architecture == "qwen3_moe" || architecture == "gemma3_text") return QkNorm::kPerHead;
    if (architecture == "olmo2") return QkNorm::kWholeProjection;
    return QkNorm::kNone;
  }
  // Norms after attention and after the MLP instead of before them (olmo2).
  bool post_norms() const { return architecture == "olmo2"; }
  // The window of layer `layer`'s attention in tokens, 0 for full attention.
  int64_t window_of(int64_t layer) const {
    if (sliding_window <= 0) return 0;
    if (layer_types.empty()) return sliding_window;
    const auto index = static_cast<size_t>(layer);
    return index < layer_types.size() && layer_types[index] == "sliding_attention" ? sliding_window : 0;
  }
  bool uses_rotary(int64_t layer) const {
    for (int64_t nope : nope_layers) {
      if (nope == layer) return false;
    }
    return true;
  }
};

}  // namespace loom

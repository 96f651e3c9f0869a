#include "model/layers.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "model/compute_weights.h"
#include "model/kernels/fused_ops.h"

namespace loom {

namespace {

// Parameters are created empty here; model init (Llama::init_weights) or a
// checkpoint load fills them. Shapes are what Hugging Face stores.
class LocalLinear : public Linear {
 public:
  LocalLinear(int64_t in_features, int64_t out_features, bool bias) {
    weight_ = register_parameter("weight", torch::empty({out_features, in_features}));
    if (bias) bias_ = register_parameter("bias", torch::zeros({out_features}));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    return compute_linear(x, weight_, bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt);
  }

 private:
  torch::Tensor weight_;
  torch::Tensor bias_;
};

class LocalEmbedding : public Embedding {
 public:
  LocalEmbedding(int64_t vocab, int64_t hidden) {
    weight_ = register_parameter("weight", torch::empty({vocab, hidden}));
  }
  torch::Tensor forward(const torch::Tensor& ids) override { return at::embedding(weight_, ids); }
  torch::Tensor weight() const override { return weight_; }

 private:
  torch::Tensor weight_;
};

class LocalLmHead : public LmHead {
 public:
  LocalLmHead(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) : tied_(std::move(tied)) {
    // A tied head registers nothing: the weight belongs to the embedding, so
    // it is stored, optimized and exported once.
    if (!tied_) weight_ = register_parameter("weight", torch::empty({vocab, hidden}));
  }
  torch::Tensor forward(const torch::Tensor& hidden) override {
    return compute_linear(hidden, tied_ ? tied_->weight() : weight_);
  }

 private:
  std::shared_ptr<Embedding> tied_;
  torch::Tensor weight_;
};

// Causal attention with at::scaled_dot_product_attention, which picks a
// fused kernel (flash or memory-efficient on a GPU) where one applies.
class SdpaAttentionCore : public AttentionCore {
 public:
  using AttentionCore::AttentionCore;
  torch::Tensor forward(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                        torch::Tensor* cache_k, torch::Tensor* cache_v) override {
    const int64_t tokens = q_bhtd.size(2);
    torch::Tensor k = k_bhtd, v = v_bhtd;
    bool has_past = false;
    if (cache_k != nullptr) {
      has_past = cache_k->defined();
      if (has_past) {
        k = at::cat({*cache_k, k}, 2);
        v = at::cat({*cache_v, v}, 2);
      }
      *cache_k = k;
      *cache_v = v;
    }
    // SDPA's causal mask is aligned top-left: right for a full sequence, wrong
    // for new queries after cached keys. Decoding appends one token at a time,
    // which may attend to every cached key, so it needs no mask at all.
    TORCH_CHECK(!has_past || tokens == 1, "cached attention takes one new token at a time, got ", tokens);
    const bool grouped = q_bhtd.size(1) != k.size(1);
    const int64_t window = this->window();
    if (has_past && window > 0 && k.size(2) > window) {
      // The new token sees only the last `window` keys, itself included.
      k = k.narrow(2, k.size(2) - window, window);
      v = v.narrow(2, v.size(2) - window, window);
    }
    if (options().softcap > 0) {
      const torch::Tensor allowed =
          has_past ? torch::Tensor() : sliding_window_mask(tokens, tokens, window, q_bhtd.device());
      return eager_attention(q_bhtd, k, v, allowed, options());
    }
    if (!has_past && window > 0 && tokens > window) {
      // Causal within the band: an explicit mask (SDPA's math or
      // memory-efficient kernel; flash's own window is not reachable
      // through SDPA).
      const auto allowed = sliding_window_mask(tokens, tokens, window, q_bhtd.device());
      return at::scaled_dot_product_attention(q_bhtd, k, v, allowed, /*dropout_p=*/0.0, /*is_causal=*/false,
                                              scale(), /*enable_gqa=*/grouped);
    }
    const bool causal = !has_past && tokens > 1;
    return at::scaled_dot_product_attention(q_bhtd, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                            /*is_causal=*/causal, scale(), /*enable_gqa=*/grouped);
  }

  torch::Tensor forward_documents(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                  const torch::Tensor& v_bhtd, const DocumentMask& documents) override {
    if (options().softcap == 0 && options().scale == 0 && takes_varlen_flash(q_bhtd, k_bhtd)) {
      return varlen_flash_attention(q_bhtd, k_bhtd, v_bhtd, documents, window());
    }
    return AttentionCore::forward_documents(q_bhtd, k_bhtd, v_bhtd, documents);
  }

 private:
  // SDPA's scale: its own default (head_dim^-1/2) unless one is set.
  std::optional<double> scale() const {
    return options().scale > 0 ? std::optional<double>(options().scale) : std::nullopt;
  }
};

}  // namespace

bool takes_varlen_flash(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd) {
  // What PyTorch's flash attention takes: a CUDA tensor of bf16 or fp16
  // (autocast's), head_dim a multiple of 8 up to 256, query heads a multiple
  // of the key heads (it handles grouped heads itself).
  if (!q_bhtd.is_cuda() || q_bhtd.dim() != 4) return false;
  const auto dtype = q_bhtd.scalar_type();
  if (dtype != torch::kBFloat16 && dtype != torch::kHalf) return false;
  const int64_t head_dim = q_bhtd.size(3);
  return head_dim % 8 == 0 && head_dim <= 256 && q_bhtd.size(1) % k_bhtd.size(1) == 0;
}

torch::Tensor sliding_window_mask(int64_t queries, int64_t keys, int64_t window, torch::Device device) {
  // Query i sits at key position i + keys - queries; it may see key j when
  // 0 <= its position - j < window.
  auto options = torch::TensorOptions().dtype(torch::kLong).device(device);
  const auto query_at = torch::arange(keys - queries, keys, options).unsqueeze(1);
  const auto key_at = torch::arange(0, keys, options).unsqueeze(0);
  const auto behind = query_at - key_at;
  auto allowed = behind >= 0;
  if (window > 0) allowed = allowed.logical_and(behind < window);
  return allowed;
}

torch::Tensor varlen_flash_attention(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                     const torch::Tensor& v_bhtd, const DocumentMask& documents, int64_t window) {
  // The batch flattened into one stream of batch * tokens tokens,
  // [total, heads, head_dim], cut into the segments by cu_seqlens: the kernel
  // runs causal attention inside each segment and computes nothing across
  // them. Its autograd node (FlashAttentionBackward0) runs the matching
  // variable-length backward.
  const int64_t batch = q_bhtd.size(0), heads = q_bhtd.size(1), tokens = q_bhtd.size(2), dim = q_bhtd.size(3);
  const auto packed = [&](const torch::Tensor& x_bhtd) {
    return x_bhtd.transpose(1, 2).reshape({batch * tokens, x_bhtd.size(1), dim});
  };
  const torch::Tensor& cu_seqlens = documents.cu_seqlens();
  const int64_t longest = documents.max_segment_tokens();
  // A window: flash attention's own (window - 1 keys to the left, none to
  // the right), within each segment as everything else; -1 is its "no
  // limit", what it takes when none is given.
  const int64_t left = window > 0 ? window - 1 : -1;
  const int64_t right = window > 0 ? 0 : -1;
  auto outputs = at::_flash_attention_forward(packed(q_bhtd), packed(k_bhtd), packed(v_bhtd), cu_seqlens, cu_seqlens,
                                              longest, longest, /*dropout_p=*/0.0, /*is_causal=*/true,
                                              /*return_debug_mask=*/false, /*scale=*/std::nullopt, left, right);
  return std::get<0>(outputs).view({batch, tokens, heads, dim}).transpose(1, 2);
}

torch::Tensor AttentionCore::forward_documents(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                               const torch::Tensor& v_bhtd, const DocumentMask& documents) {
  const bool grouped = q_bhtd.size(1) != k_bhtd.size(1);
  torch::Tensor allowed = documents.allowed_b1tt();
  if (window() > 0) {
    // Positions inside a document are consecutive, so the band over the
    // row's token indices is the band over the document's positions.
    const int64_t tokens = q_bhtd.size(2);
    allowed = allowed.logical_and(sliding_window_mask(tokens, tokens, window(), allowed.device()));
  }
  if (options_.softcap > 0) return eager_attention(q_bhtd, k_bhtd, v_bhtd, allowed, options_);
  const std::optional<double> scale = options_.scale > 0 ? std::optional<double>(options_.scale) : std::nullopt;
  return at::scaled_dot_product_attention(q_bhtd, k_bhtd, v_bhtd, allowed, /*dropout_p=*/0.0,
                                          /*is_causal=*/false, scale, /*enable_gqa=*/grouped);
}

torch::Tensor eager_attention(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                              const torch::Tensor& allowed, const AttentionOptions& options) {
  // Grouped kv heads repeated for their query heads, as transformers' repeat_kv.
  const int64_t groups = q_bhtd.size(1) / k_bhtd.size(1);
  const auto k = groups > 1 ? k_bhtd.repeat_interleave(groups, 1) : k_bhtd;
  const auto v = groups > 1 ? v_bhtd.repeat_interleave(groups, 1) : v_bhtd;
  const double scale = options.scale > 0 ? options.scale : std::pow(static_cast<double>(q_bhtd.size(3)), -0.5);
  auto scores = at::matmul(q_bhtd, k.transpose(2, 3)) * scale;
  if (options.softcap > 0) scores = at::tanh(scores / options.softcap) * options.softcap;
  if (allowed.defined()) scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  const auto probs = at::softmax(scores, -1, torch::kFloat).to(q_bhtd.scalar_type());
  return at::matmul(probs, v);
}

RMSNorm::RMSNorm(int64_t hidden, double eps, NormWeight style) : eps_(eps), style_(style) {
  weight = register_parameter("weight", style == NormWeight::kOnePlus ? torch::zeros({hidden}) : torch::ones({hidden}));
}

torch::Tensor RMSNorm::normalize(const torch::Tensor& x, const torch::Tensor& w) const {
  if (style_ == NormWeight::kOnePlus) {
    // Gemma: (x_hat * (1 + w)) in fp32, then cast, whatever x's dtype.
    auto x32 = x.to(torch::kFloat);
    auto normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps_);
    return (normed * (1.0 + w.to(torch::kFloat))).to(x.scalar_type());
  }
  if (x.scalar_type() != torch::kFloat) {
    return at::rms_norm(x, {x.size(-1)}, w.to(x.scalar_type()), eps_);
  }
  auto x32 = x.to(torch::kFloat);
  auto variance = x32.pow(2).mean(-1, /*keepdim=*/true);
  auto normed = (x32 * at::rsqrt(variance + eps_)).to(x.scalar_type());
  return w * normed;
}

std::pair<torch::Tensor, torch::Tensor> RMSNorm::add_then_forward(const torch::Tensor& residual,
                                                                   const torch::Tensor& branch) {
  if (fuse_residual_add && style_ == NormWeight::kScale && residual.scalar_type() != torch::kFloat) {
    kernels::AddNorm fused = kernels::add_rms_norm(residual, branch, weight, eps_);
    return {fused.h, fused.y};
  }
  torch::Tensor h = residual + branch;
  return {h, forward(h)};
}

std::shared_ptr<Linear> LocalLayerFactory::linear(int64_t in_features, int64_t out_features, bool bias,
                                                  LinearRole /*role*/) const {
  return std::make_shared<LocalLinear>(in_features, out_features, bias);
}

std::shared_ptr<Embedding> LocalLayerFactory::embedding(int64_t vocab, int64_t hidden) const {
  return std::make_shared<LocalEmbedding>(vocab, hidden);
}

std::shared_ptr<LmHead> LocalLayerFactory::lm_head(int64_t hidden, int64_t vocab,
                                                   std::shared_ptr<Embedding> tied) const {
  return std::make_shared<LocalLmHead>(hidden, vocab, std::move(tied));
}

std::shared_ptr<AttentionCore> LayerFactory::attention_core(const ModelConfig& model, int64_t layer) const {
  AttentionOptions options;
  options.window = model.window_of(layer);
  if (model.query_pre_attn_scalar > 0) options.scale = std::pow(model.query_pre_attn_scalar, -0.5);  // as transformers writes it
  options.softcap = model.attn_logit_softcapping;
  return std::make_shared<SdpaAttentionCore>(options);
}

std::shared_ptr<ExpertCollectives> LayerFactory::expert_collectives() const {
  static const auto identities = std::make_shared<ExpertCollectives>();
  return identities;
}

std::shared_ptr<LayerWrapper> LayerFactory::layer_wrapper(const ModelConfig& model, int64_t /*layer*/) const {
  if (wrapper_) return wrapper_;
  return std::make_shared<LayerWrapper>(LayerWrapper::Options{.recompute = model.recompute == "full"});
}

}  // namespace loom

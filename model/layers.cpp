#include "model/layers.h"

#include <ATen/ATen.h>

#include "model/compute_weights.h"

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
    return at::linear(x, compute_weight(weight_), bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt);
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
    return at::linear(hidden, compute_weight(tied_ ? tied_->weight() : weight_));
  }

 private:
  std::shared_ptr<Embedding> tied_;
  torch::Tensor weight_;
};

}  // namespace

RMSNorm::RMSNorm(int64_t hidden, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({hidden}));
}

torch::Tensor RMSNorm::normalize(const torch::Tensor& x, const torch::Tensor& w) const {
  if (x.scalar_type() != torch::kFloat) {
    return at::rms_norm(x, {x.size(-1)}, w.to(x.scalar_type()), eps_);
  }
  auto x32 = x.to(torch::kFloat);
  auto variance = x32.pow(2).mean(-1, /*keepdim=*/true);
  auto normed = (x32 * at::rsqrt(variance + eps_)).to(x.scalar_type());
  return w * normed;
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

}  // namespace loom

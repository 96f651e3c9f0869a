// The layers the model asks for by role, and the factory that makes them.
//
// Model code is written once, for one device. Where a later parallel layout
// needs a different layer (Megatron's column- or row-parallel linear, a
// vocabulary-parallel embedding), the factory returns it and the model code
// does not change. Every layer keeps Hugging Face's parameter names: a linear
// owns `weight` [out_features, in_features] and optionally `bias` [out];
// an embedding owns `weight` [vocab, hidden]; a norm owns `weight` [hidden].
#pragma once

#include <memory>

#include <torch/nn/module.h>
#include <torch/types.h>

namespace loom {

// How a linear layer's weight would be cut under tensor parallelism.
// kColumn: output features split (q/k/v, gate/up); kRow: input features split
// (o_proj, down_proj); kReplicated: every rank holds all of it.
enum class LinearRole { kColumn, kRow, kReplicated };

class Linear : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
};

class Embedding : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& ids) = 0;
  virtual torch::Tensor weight() const = 0;
};

// y = x / sqrt(mean(x^2) + eps) * weight. An fp32 input takes Hugging Face's
// LlamaRMSNorm operation for operation. A bf16 input (the residual stream of
// precision.compute bf16) goes through at::rms_norm, which on CUDA is one
// fused kernel each way that accumulates in fp32 and returns bf16; the
// weight stays an fp32 parameter and is cast on the way in.
class RMSNorm : public torch::nn::Module {
 public:
  RMSNorm(int64_t hidden, double eps);
  virtual ~RMSNorm() = default;
  virtual torch::Tensor forward(const torch::Tensor& x) { return normalize(x, weight); }
  torch::Tensor weight;

 protected:
  // The computation above with `w` in place of the parameter (a sequence-
  // parallel norm passes its weight through a communication operator first).
  torch::Tensor normalize(const torch::Tensor& x, const torch::Tensor& w) const;

 private:
  double eps_;
};

// The output head: hidden -> logits over the vocabulary. When the embeddings
// are tied it owns no parameter and multiplies by the embedding's weight.
class LmHead : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& hidden) = 0;
};

class LayerFactory {
 public:
  virtual ~LayerFactory() = default;
  virtual std::shared_ptr<Linear> linear(int64_t in_features, int64_t out_features, bool bias,
                                         LinearRole role) const = 0;
  virtual std::shared_ptr<Embedding> embedding(int64_t vocab, int64_t hidden) const = 0;
  // `tied` is the embedding whose weight the head reuses, or null for an own weight.
  virtual std::shared_ptr<LmHead> lm_head(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) const = 0;
  virtual std::shared_ptr<RMSNorm> norm(int64_t hidden, double eps) const {
    return std::make_shared<RMSNorm>(hidden, eps);
  }
  // Into how many slices the layers cut the sequence of the residual stream
  // between them: 1, or tp under sequence parallelism, where the embedding
  // returns [batch, tokens/tp, hidden] and the head takes it back.
  virtual int64_t sequence_shards() const { return 1; }
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

// Rotary position embeddings in Hugging Face's rotate-half layout: element i
// of a head pairs with element i + head_dim/2 (Meta's original code pairs 2i
// with 2i+1; loom speaks HF layout natively, so exported q/k need no permute).
#pragma once

#include <torch/types.h>

#include "config/config.h"

namespace loom {

// inv_freq[j] = 1 / theta^(2j / head_dim), j < head_dim/2, fp32, with the
// configured scaling, each with transformers' formulas (modeling_rope_utils):
//   linear: all divided by `factor`.
//   llama3: low frequencies divided by `factor`, a smooth ramp between
//     low_freq_factor and high_freq_factor.
//   yarn: dims rotating fewer than beta_slow times over the original
//     context interpolated (divided by `factor`), more than beta_fast times
//     kept, a linear ramp between.
//   dynamic (NTK): theta raised for sequences longer than max_seq_len,
//     theta * (factor * len / max_seq_len - (factor - 1))^(dim / (dim - 2)).
//   longrope: divided by short_factor, or long_factor for sequences longer
//     than original_max_position_embeddings.
// `seq_len` is the length of the sequence the table is for (its last
// position + 1): dynamic and longrope depend on it, the others do not.
torch::Tensor rope_inverse_frequencies(const ModelConfig& model, int64_t seq_len = 0);
// The factor on cos and sin: yarn's and longrope's attention factor, 1 for
// the others.
double rope_attention_scaling(const ModelConfig& model);

class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(const ModelConfig& model);

  // cos and sin for positions [start, start + length), shape [length, head_dim],
  // fp32 on `device`. Recomputed per call: cheap next to attention, and exact
  // for every position without a table bound.
  std::pair<torch::Tensor, torch::Tensor> cos_sin(int64_t start, int64_t length, torch::Device device) const;
  // cos and sin of each token's own position (positions_bt: integer
  // [batch, tokens], any device), shape [batch, 1, tokens, head_dim] so that
  // they broadcast over the heads; fp32 on `device`. A row whose positions
  // are start, start + 1, ... gets what cos_sin(start, tokens) gives, bit for
  // bit (the same products, in fp32).
  std::pair<torch::Tensor, torch::Tensor> cos_sin_at(const torch::Tensor& positions_bt, torch::Device device) const;

  // x_bhtd * cos + rotate_half(x_bhtd) * sin, in x's dtype: one fused CUDA
  // kernel on a GPU, ATen's ops on the CPU (model/kernels/fused_ops.h).
  static torch::Tensor apply(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td);

 private:
  // [head_dim / 2], fp32, CPU: inv_freq_, or for a length-dependent scaling
  // the table for a sequence of seq_len tokens.
  torch::Tensor inv_freq_for(int64_t seq_len) const;
  // cos and sin of `freqs`, times the attention scaling where there is one.
  std::pair<torch::Tensor, torch::Tensor> cos_sin_of(const torch::Tensor& emb) const;

  ModelConfig model_;
  bool length_dependent_;  // dynamic, longrope
  double attention_scaling_;
  torch::Tensor inv_freq_;  // [head_dim / 2], fp32, CPU
};

}  // namespace loom

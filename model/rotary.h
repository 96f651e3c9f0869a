// Rotary position embeddings in Hugging Face's rotate-half layout: element i
// of a head pairs with element i + head_dim/2 (Meta's original code pairs 2i
// with 2i+1; loom speaks HF layout natively, so exported q/k need no permute).
#pragma once

#include <torch/types.h>

#include "config/config.h"

namespace loom {

// inv_freq[j] = 1 / theta^(2j / head_dim), j < head_dim/2, fp32, with the
// configured scaling (llama3: low frequencies divided by `factor`, a smooth
// ramp between low_freq_factor and high_freq_factor; linear: all divided).
torch::Tensor rope_inverse_frequencies(const ModelConfig& model);

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
  torch::Tensor inv_freq_;  // [head_dim / 2], fp32, CPU
};

}  // namespace loom

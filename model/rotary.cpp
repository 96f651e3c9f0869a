#include "model/rotary.h"

#include <ATen/ATen.h>

#include <cmath>
#include <numbers>

#include "model/kernels/fused_ops.h"

namespace loom {

torch::Tensor rope_inverse_frequencies(const ModelConfig& model) {
  const int64_t dim = model.head_size();
  // Same arithmetic as transformers (int64 arange cast to fp32, divided by
  // dim, theta raised to it in fp32) so that logits agree to the last bits.
  auto exponents = torch::arange(0, dim, 2, torch::kInt64).to(torch::kFloat) / static_cast<double>(dim);
  auto inv_freq = 1.0 / at::pow(model.rope_theta, exponents);
  const RopeScalingConfig& scaling = model.rope_scaling;
  if (scaling.type == "linear") {
    inv_freq = inv_freq / scaling.factor;
  } else if (scaling.type == "llama3") {
    // Llama 3.1: wavelengths longer than the original context divided by
    // `factor`, shorter than original/high_freq_factor kept, a linear blend
    // (in 1/wavelength) between the two.
    const double old_context = static_cast<double>(scaling.original_max_position_embeddings);
    const double low_freq_wavelen = old_context / scaling.low_freq_factor;
    const double high_freq_wavelen = old_context / scaling.high_freq_factor;
    auto wavelen = 2.0 * std::numbers::pi / inv_freq;
    auto scaled = at::where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq);
    auto smooth = (old_context / wavelen - scaling.low_freq_factor) /
                  (scaling.high_freq_factor - scaling.low_freq_factor);
    auto smoothed = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled;
    auto is_medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
    inv_freq = at::where(is_medium, smoothed, scaled);
  }
  return inv_freq.contiguous();
}

RotaryEmbedding::RotaryEmbedding(const ModelConfig& model) : inv_freq_(rope_inverse_frequencies(model)) {}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin(int64_t start, int64_t length,
                                                                 torch::Device device) const {
  auto options = torch::TensorOptions().dtype(torch::kFloat).device(device);
  auto positions = torch::arange(start, start + length, options);
  auto freqs = at::outer(positions, inv_freq_.to(device));  // [T, D/2]
  auto emb = at::cat({freqs, freqs}, -1);                   // [T, D]
  return {emb.cos(), emb.sin()};
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin_at(const torch::Tensor& positions_bt,
                                                                    torch::Device device) const {
  auto positions = positions_bt.to(device, torch::kFloat);
  auto freqs = positions.unsqueeze(-1) * inv_freq_.to(device);  // [B, T, D/2]
  auto emb = at::cat({freqs, freqs}, -1).unsqueeze(1);            // [B, 1, T, D]
  return {emb.cos(), emb.sin()};
}

torch::Tensor RotaryEmbedding::apply(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td,
                                     const torch::Tensor& sin_td) {
  return kernels::rotary(x_bhtd, cos_td, sin_td);
}

}  // namespace loom

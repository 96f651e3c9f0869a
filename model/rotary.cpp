#include "model/rotary.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "model/kernels/fused_ops.h"

namespace loom {

namespace {

// YaRN's mscale (the paper's eq. 21): 0.1 * mscale * ln(factor) + 1, 1 for
// factors up to 1.
double yarn_mscale(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

// YaRN: the dims that rotate fewer than beta_slow times over the original
// context are interpolated (divided by factor), those rotating more than
// beta_fast times kept as they are, with a linear ramp over the dims between.
torch::Tensor yarn_inverse_frequencies(const ModelConfig& model, const torch::Tensor& exponents) {
  const RopeScalingConfig& scaling = model.rope_scaling;
  const double dim = static_cast<double>(model.head_size());
  const double base = model.rope_theta, context = static_cast<double>(scaling.original_max_position_embeddings);
  // The dim whose wavelength spans `rotations` turns in the original context.
  const auto correction_dim = [&](double rotations) {
    return dim * std::log(context / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
  };
  double low = correction_dim(scaling.beta_fast), high = correction_dim(scaling.beta_slow);
  if (scaling.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, dim - 1);
  if (low == high) high += 0.001;  // no zero-width ramp
  const auto pos_freqs = at::pow(base, exponents);
  const auto extrapolation = 1.0 / pos_freqs;
  const auto interpolation = 1.0 / (scaling.factor * pos_freqs);
  const int64_t half = model.head_size() / 2;
  const auto ramp = ((torch::arange(half, torch::kFloat) - low) / (high - low)).clamp(0, 1);
  const auto extrapolated = 1 - ramp;
  return interpolation * (1 - extrapolated) + extrapolation * extrapolated;
}

}  // namespace

double rope_attention_scaling(const ModelConfig& model) {
  const RopeScalingConfig& scaling = model.rope_scaling;
  if (scaling.attention_factor > 0 && (scaling.type == "yarn" || scaling.type == "longrope")) {
    return scaling.attention_factor;
  }
  if (scaling.type == "yarn") {
    if (scaling.mscale != 0 && scaling.mscale_all_dim != 0) {
      return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim);
    }
    return yarn_mscale(scaling.factor, 1.0);
  }
  if (scaling.type == "longrope") {
    if (scaling.factor <= 1) return 1.0;
    const double context = static_cast<double>(scaling.original_max_position_embeddings);
    return std::sqrt(1 + std::log(scaling.factor) / std::log(context));
  }
  return 1.0;
}

torch::Tensor rope_inverse_frequencies(const ModelConfig& model, int64_t seq_len) {
  const int64_t dim = model.head_size();
  // Same arithmetic as transformers (int64 arange cast to fp32, divided by
  // dim, theta raised to it in fp32) so that logits agree to the last bits.
  auto exponents = torch::arange(0, dim, 2, torch::kInt64).to(torch::kFloat) / static_cast<double>(dim);
  const RopeScalingConfig& scaling = model.rope_scaling;
  if (scaling.type == "yarn") return yarn_inverse_frequencies(model, exponents).contiguous();
  if (scaling.type == "dynamic") {
    // NTK-aware: theta grows with the sequence beyond max_seq_len (and is
    // theta itself up to it).
    const double context = static_cast<double>(model.max_seq_len);
    const double length = std::max(static_cast<double>(seq_len), context);
    const double d = static_cast<double>(dim);
    const double base =
        model.rope_theta * std::pow(scaling.factor * length / context - (scaling.factor - 1), d / (d - 2));
    return (1.0 / at::pow(base, exponents)).contiguous();
  }
  if (scaling.type == "longrope") {
    const bool long_context = seq_len > scaling.original_max_position_embeddings;
    const auto divisors = torch::tensor(long_context ? scaling.long_factor : scaling.short_factor).to(torch::kFloat);
    return (1.0 / (divisors * at::pow(model.rope_theta, exponents))).contiguous();
  }
  auto inv_freq = 1.0 / at::pow(model.rope_theta, exponents);
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

RotaryEmbedding::RotaryEmbedding(const ModelConfig& model)
    : model_(model),
      length_dependent_(model.rope_scaling.type == "dynamic" || model.rope_scaling.type == "longrope"),
      attention_scaling_(rope_attention_scaling(model)),
      inv_freq_(rope_inverse_frequencies(model)) {}

torch::Tensor RotaryEmbedding::inv_freq_for(int64_t seq_len) const {
  // transformers picks the table by the batch's last position + 1 on every
  // forward (dynamic_rope_update), decoding steps included.
  return length_dependent_ ? rope_inverse_frequencies(model_, seq_len) : inv_freq_;
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin_of(const torch::Tensor& emb) const {
  if (attention_scaling_ == 1.0) return {emb.cos(), emb.sin()};
  return {emb.cos() * attention_scaling_, emb.sin() * attention_scaling_};
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin(int64_t start, int64_t length,
                                                                 torch::Device device) const {
  auto options = torch::TensorOptions().dtype(torch::kFloat).device(device);
  auto positions = torch::arange(start, start + length, options);
  auto freqs = at::outer(positions, inv_freq_for(start + length).to(device));  // [T, D/2]
  auto emb = at::cat({freqs, freqs}, -1);                                     // [T, D]
  return cos_sin_of(emb);
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin_at(const torch::Tensor& positions_bt,
                                                                    torch::Device device) const {
  auto positions = positions_bt.to(device, torch::kFloat);
  // Only a length-dependent table reads the positions back.
  const int64_t seq_len = length_dependent_ ? positions_bt.max().item<int64_t>() + 1 : 0;
  auto freqs = positions.unsqueeze(-1) * inv_freq_for(seq_len).to(device);  // [B, T, D/2]
  auto emb = at::cat({freqs, freqs}, -1).unsqueeze(1);                       // [B, 1, T, D]
  return cos_sin_of(emb);
}

torch::Tensor RotaryEmbedding::apply(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td,
                                     const torch::Tensor& sin_td) {
  return kernels::rotary(x_bhtd, cos_td, sin_td);
}

}  // namespace loom

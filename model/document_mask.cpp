#include "model/document_mask.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace loom {

DocumentMask::DocumentMask(const torch::Tensor& positions_bt, torch::Device device) : device_(device) {
  TORCH_CHECK(positions_bt.dim() == 2, "document positions must be [batch, tokens], got ", positions_bt.sizes());
  TORCH_CHECK(!positions_bt.is_floating_point() && !positions_bt.is_complex() &&
                  positions_bt.scalar_type() != torch::kBool,
              "document positions must be integers, got ", positions_bt.scalar_type());
  positions_bt_ = positions_bt.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t batch = positions_bt_.size(0), tokens = positions_bt_.size(1);
  // Segment k of a row starts at its k-th position 0; the tokens before the
  // first 0 are segment 0 (Note [document mask]).
  const torch::Tensor starts_bt = positions_bt_.eq(0);
  segments_bt_ = starts_bt.cumsum(1);
  const int64_t* positions = positions_bt_.data_ptr<int64_t>();
  std::vector<int32_t> offsets{0};
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 1; t < tokens; ++t) {
      if (positions[b * tokens + t] != 0) continue;
      one_segment_per_row_ = false;
      offsets.push_back(static_cast<int32_t>(b * tokens + t));
    }
    offsets.push_back(static_cast<int32_t>((b + 1) * tokens));
  }
  if (batch == 0 || tokens == 0) offsets.resize(1);
  for (size_t i = 1; i < offsets.size(); ++i)
    max_segment_tokens_ = std::max<int64_t>(max_segment_tokens_, offsets[i] - offsets[i - 1]);
  cu_seqlens_cpu_ = torch::tensor(offsets, torch::kInt);
}

bool DocumentMask::rows_count_from(int64_t* first) const {
  if (positions_bt_.numel() == 0) return false;
  const int64_t batch = positions_bt_.size(0), tokens = positions_bt_.size(1);
  const int64_t* positions = positions_bt_.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < tokens; ++t)
      if (positions[b * tokens + t] != positions[0] + t) return false;
  *first = positions[0];
  return true;
}

const torch::Tensor& DocumentMask::allowed_b1tt() const {
  std::call_once(allowed_once_, [this] {
    const int64_t tokens = this->tokens();
    const torch::Tensor segments_bt = segments_bt_.to(device_);
    const torch::Tensor same_btt = segments_bt.unsqueeze(2).eq(segments_bt.unsqueeze(1));
    const torch::Tensor causal_tt =
        torch::ones({tokens, tokens}, torch::TensorOptions().dtype(torch::kBool).device(device_)).tril();
    allowed_b1tt_ = same_btt.logical_and(causal_tt).unsqueeze(1);
  });
  return allowed_b1tt_;
}

const torch::Tensor& DocumentMask::cu_seqlens() const {
  std::call_once(cu_seqlens_once_, [this] { cu_seqlens_ = cu_seqlens_cpu_.to(device_); });
  return cu_seqlens_;
}

}  // namespace loom

// Packed documents in one sequence (data.document_mask): each token attends
// only to the tokens of its own document, causally, and rotary positions
// restart at every document's start, as transformers does for a packed batch
// given position_ids.
//
// Note [document mask]
// The model learns where documents lie from per-token positions
// [batch, tokens] (the loader's MicroBatch::positions): a document starts
// where the position is 0. The tokens of a row before its first 0 (the end
// of a document that began in an earlier row) form one segment too. Query t
// may attend key s when both are in the same segment and s <= t. Positions
// also feed the rotary embedding token by token, so a row that starts in the
// middle of a document continues that document's count.
// Which attention runs (AttentionCore::forward_documents, model/layers.h):
//   - every row a single segment: no mask at all, the causal attention of a
//     forward without positions (the same kernel, the same bits);
//   - CUDA, bf16 or fp16, a head_dim flash attention takes: flash attention's
//     variable-length kernel over the flattened batch, one sequence per
//     segment (cu_seqlens), which computes nothing across documents;
//   - otherwise (the CPU, fp32): scaled-dot-product attention with the
//     boolean mask [batch, 1, tokens, tokens], exact but quadratic in memory.
// The positions are read on the host once per forward (a CPU tensor costs no
// copy: the trainer passes the loader's), and the tensors derived from them
// are made on first use and shared by every layer of the forward.
#pragma once

#include <cstdint>
#include <mutex>

#include <torch/types.h>

namespace loom {

class DocumentMask {
 public:
  // positions_bt: integer [batch, tokens], on any device. `device`: where
  // the attention runs. Throws c10::Error for another shape or dtype.
  DocumentMask(const torch::Tensor& positions_bt, torch::Device device);

  int64_t batch() const { return segments_bt_.size(0); }
  int64_t tokens() const { return segments_bt_.size(1); }
  // No row holds a document start after its first token: attention is the
  // plain causal one.
  bool one_segment_per_row() const { return one_segment_per_row_; }
  // Whether every row's positions are first, first + 1, ...: rotary can use
  // one [tokens, head_dim] table from `first` (RotaryEmbedding::cos_sin).
  bool rows_count_from(int64_t* first) const;

  // int64 [batch, tokens] on the CPU.
  const torch::Tensor& positions_bt() const { return positions_bt_; }
  // bool [batch, 1, tokens, tokens] on the device: true where query t may
  // attend key s (same segment, s <= t). Made on first use.
  const torch::Tensor& allowed_b1tt() const;
  // The segments of the flattened batch (row after row) as flash attention's
  // cumulative lengths: int32 [segments + 1], 0 first, batch * tokens last,
  // on the device. Made on first use.
  const torch::Tensor& cu_seqlens() const;
  int64_t max_segment_tokens() const { return max_segment_tokens_; }

 private:
  torch::Device device_;
  torch::Tensor positions_bt_;     // int64, CPU
  torch::Tensor segments_bt_;      // int64, CPU: segment number within the row
  torch::Tensor cu_seqlens_cpu_;   // int32, CPU
  int64_t max_segment_tokens_ = 0;
  bool one_segment_per_row_ = true;
  // Made on first use, possibly on the autograd engine's thread (a layer
  // recomputed in backward): once_flag makes that safe.
  mutable std::once_flag allowed_once_, cu_seqlens_once_;
  mutable torch::Tensor allowed_b1tt_;
  mutable torch::Tensor cu_seqlens_;
};

}  // namespace loom

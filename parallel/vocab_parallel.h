// The vocabulary cut over the tp group, Megatron-style (Shoeybi et al. 2019,
// "Megatron-LM", section 3): the embedding table, the LM head and the
// cross-entropy, so that neither the full table nor the full logits
// [tokens, vocab] ever exist on one rank. See docs/parallelism.md.
//
// Note [vocab sharding]
// Rank r of a tp group of size tp owns the vocabulary rows
// [r * L, (r + 1) * L) of the [vocab, hidden] table, L = ceil(vocab / tp)
// (vocab_rows_per_rank), and the same slice of the logits' last dim. When tp
// does not divide vocab the table is padded (Note [vocab padding]).
//
// Note [vocab padding]
// A vocabulary tp does not divide is padded with rows at its end up to the
// next multiple of tp, so that every rank holds L rows: as Megatron's
// --make-vocab-size-divisible-by, but to no larger multiple than tp needs
// (loom has no key for more: the padding exists on the tp ranks only). The
// padding rows (ids vocab .. tp * L - 1) sit on the last rank (or ranks,
// for a vocabulary below about tp^2) and are never selected:
//   - no id looks them up (ids are below vocab);
//   - vocab_parallel_cross_entropy, given vocab, leaves their logits out of
//     the softmax, so they get no gradient (nor does a tied embedding's row);
//   - they start at 0 (shard_vocab_rows, init_tensor_parallel_shards), and
//     AdamW leaves a parameter with a zero gradient at 0, decay included.
// Whatever leaves the tp ranks holds the real [vocab, hidden]:
// gather_tensor_parallel drops the padding, checkpoints store each rank's
// real rows only (Region::padded_chunk in checkpoints/), Hub exports and
// generation see a whole model of vocab rows. Padding depends on tp alone,
// so a checkpoint resumes on any tp (docs/parallelism.md).
// The group must outlive every autograd graph that went through these layers;
// every rank of the group runs them in the same order (Note
// [tensor-parallel operators] in tensor_parallel.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <ATen/core/Tensor.h>

#include "parallel/process_group.h"
#include "parallel/tensor_parallel.h"
#include "model/layers.h"

namespace loom {

// The rows each rank of a tp group of `size` holds: ceil(vocab / size)
// (Note [vocab padding]).
int64_t vocab_rows_per_rank(int64_t vocab, int64_t size);
// How many of rank `rank`'s rows are tokens, the others padding: vocab - rank
// * L clamped to [0, L].
int64_t vocab_rows_of_rank(int64_t vocab, int64_t rank, int64_t size);

// Rank `rank`'s rows [ceil(vocab/size), hidden] of a full [vocab, hidden]
// table (the embedding's or the LM head's weight), as a contiguous copy, for
// loading and tests; padding rows are zeros (Note [vocab padding]).
at::Tensor shard_vocab_rows(const at::Tensor& full_weight, int64_t rank, int64_t size);

// The embedding with its table's rows split over the tp group: this rank holds
// `weight` [ceil(vocab/tp), hidden] (Note [vocab sharding]), its padding rows
// last (Note [vocab padding]).
//   forward(ids [...] int64, global ids) -> [..., hidden], the same on every rank.
// Each rank looks up the ids it owns; the others are looked up as its row 0
// and zeroed (so row 0 gets no gradient from them), and reduce_from_tp (g)
// sums the ranks' partial embeddings. Its backward is the identity: every
// rank's weight gradient is then the full one's rows it owns. Ids outside
// [0, vocab) are not checked (that would cost a device sync) and embed as
// zeros.
class VocabParallelEmbedding : public Embedding, public TensorParallelLayer {
 public:
  struct Options {
    // Return this rank's sequence slice [b, s/tp, hidden] of the embeddings
    // of ids [b, s]: the partial embeddings are reduce-scattered along the
    // sequence (reduce_scatter_to_sp) instead of all-reduced.
    bool sequence_parallel = false;
  };
  // The weight is created empty, like the single-device embedding's: model
  // init or a checkpoint fills it (its padding rows with zeros).
  VocabParallelEmbedding(ProcessGroup& tp, int64_t vocab, int64_t hidden, Options options);
  VocabParallelEmbedding(ProcessGroup& tp, int64_t vocab, int64_t hidden)
      : VocabParallelEmbedding(tp, vocab, hidden, Options{}) {}

  torch::Tensor forward(const torch::Tensor& ids) override;
  int64_t shard_dim(const std::string& parameter) const override { return 0; }
  torch::Tensor weight() const override { return weight_; }  // this rank's shard [ceil(vocab/tp), hidden]
  // The vocabulary, when the table carries padding (-1 when tp divides it).
  int64_t unpadded_size(const std::string& parameter) const override { return padded() ? vocab_ : -1; }
  bool padded() const { return vocab_ % tp_->size() != 0; }

  int64_t vocab() const { return vocab_; }  // the full size, over all ranks, without padding
  int64_t hidden() const { return hidden_; }
  int64_t vocab_start() const { return vocab_start_; }  // the first id this rank owns
  int64_t vocab_local() const { return vocab_rows_per_rank(vocab_, tp_->size()); }  // rows, padding included

 private:
  ProcessGroup* tp_;
  int64_t vocab_;
  int64_t hidden_;
  int64_t vocab_start_;
  Options options_;
  torch::Tensor weight_;
};

// The LM head with its weight's rows (the vocabulary) split over the tp group:
//   forward(hidden [..., hidden]) -> logits [..., ceil(vocab/tp)], this rank's
//   slice of the vocabulary, padding columns included, for
//   vocab_parallel_cross_entropy given `vocab` (Note [vocab padding]).
// The input is the whole activation on every rank; copy_to_tp (f) sums its
// gradient over the group in backward. Untied, it owns `weight`
// [ceil(vocab/tp), hidden]; tied, it owns nothing and multiplies by the
// embedding's local shard, which must then be [ceil(vocab/tp), hidden] (a
// VocabParallelEmbedding over the same group).
class VocabParallelLmHead : public LmHead, public TensorParallelLayer {
 public:
  struct Options {
    // The input is this rank's sequence slice [b, s/tp, hidden]: it is
    // gathered first (gather_from_sp, whose backward reduce-scatters the
    // summed gradient, in place of f), and the logits cover the whole sequence.
    bool sequence_parallel = false;
  };
  // Throws BadInput when the tied embedding's weight is not this rank's
  // [ceil(vocab/tp), hidden].
  VocabParallelLmHead(ProcessGroup& tp, int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied,
                      Options options);
  VocabParallelLmHead(ProcessGroup& tp, int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied)
      : VocabParallelLmHead(tp, hidden, vocab, std::move(tied), Options{}) {}

  torch::Tensor forward(const torch::Tensor& hidden) override;
  int64_t shard_dim(const std::string& parameter) const override { return 0; }
  int64_t unpadded_size(const std::string& parameter) const override {
    return vocab_ % tp_->size() != 0 ? vocab_ : -1;
  }
  int64_t vocab() const { return vocab_; }  // without padding

 private:
  ProcessGroup* tp_;
  int64_t vocab_;
  Options options_;
  std::shared_ptr<Embedding> tied_;
  torch::Tensor weight_;
};

// The mean over N of the cross-entropy of logits split along the vocabulary:
//   logits_local [N, L] (this rank's slice, Note [vocab sharding]; L columns
//     on every rank),
//   targets [N] int64 global ids in [0, vocab), the same on every rank (not
//     checked, which would cost a device sync: an id outside is nobody's, and
//     its target logit counts as 0)
//   -> a float32 scalar, the same on every rank, equal to
//      cross_entropy(full logits [N, vocab], targets) (every target counts: no
//      ignore_index, no label smoothing).
// Computed in float32 whatever the logits' dtype (a bfloat16 input is cast);
// the gradient comes back in the logits' dtype. Two all-reduces in forward
// (Note [vocab-parallel cross-entropy] in vocab_parallel.cpp), none in
// backward. Shapes that do not fit throw std::invalid_argument on every rank
// before anything is sent. Saves a float32 softmax [N, vocab/tp] for backward.
// With `may_ignore`, targets equal to kIgnoredTarget leave the loss (a masked
// loss): the mean is over the other rows, 0 when there are none.
// `vocab`: the vocabulary's size when the logits carry padding columns (ids
// vocab and up, Note [vocab padding]): they leave the softmax, as if the
// logits were [N, vocab], and get a zero gradient. -1: every column is a
// token (tp * L of them).
inline constexpr int64_t kIgnoredTarget = -100;  // torch's ignore_index
at::Tensor vocab_parallel_cross_entropy(ProcessGroup& tp, const at::Tensor& logits_local, const at::Tensor& targets,
                                        bool may_ignore = false, int64_t vocab = -1);

}  // namespace loom

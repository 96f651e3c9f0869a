// Context parallelism: each sequence split over the cp ranks of a replica,
// attention computed by passing key/value blocks around the ring of them
// (ring attention: Liu et al. 2023, "Ring Attention with Blockwise
// Transformers for Near-Infinite Context"; the load-balanced zig-zag split
// of Megatron-Core's context parallelism). Everything but
// attention is per token, so the rest of the model runs on this rank's
// tokens unchanged. See docs/parallelism.md.
//
//   ContextParallelLayerFactory factory(base, cp, seq_len);  // base: local or tensor-parallel
//   LlamaForCausalLM model(config.model, factory);
//   logits = model.forward(zigzag_tokens(inputs_bt, cp.rank(), cp.size()));
//
// Note [zig-zag chunks]
// The sequence of S tokens is cut into 2N equal chunks of c = S / 2N (N =
// cp). Rank r holds chunks r and 2N - 1 - r, in that order: 2c tokens. Under
// causal attention chunk i attends i + 1 chunks' worth of keys, so a rank's
// two chunks attend (r + 1) + (2N - r) = 2N + 1 chunks together, the same
// on every rank: the work is balanced. (Contiguous chunks would give the
// last rank N times the first's.)
//
// Note [ring attention]
// Each rank keeps its queries and sends its keys and values (one tensor
// [2, batch, kv_heads, 2c, head_dim]) to the next rank of the ring while it
// receives the previous rank's. At step s (0 <= s < N) rank r holds the block
// of rank (r - s) mod N. The send and receive of the next block are posted
// before the attention over the current one is computed, so the transfer
// runs beside the compute (even ranks post the send first, odd ranks the
// receive: an NCCL group's stream would otherwise deadlock the ring). Each block's attention comes with its log-sum-exp
// (lse) per query, and the blocks merge by the online-softmax rule:
//   lse = log(exp(lse_a) + exp(lse_b)),
//   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
// Causal masking is read off the tokens' true positions, per (query chunk,
// key chunk) pair: a key chunk wholly before the query chunk is attended
// with no mask, one wholly after it is skipped (no compute), and the
// diagonal pair (the same chunk) is causal. Packed documents add, per row,
// query and key in the same document, numbered over the whole rows (which
// every rank has), and a pair with no key of the query's documents is
// skipped too; a query row may then see no key of a block, which adds
// nothing to the merge. A sliding window of w positions (Mistral's,
// Gemma-2's local layers) masks the keys at distance w or more behind a
// query: a pair of chunks wholly behind the window is skipped, one the
// window's edge crosses is masked, and a row the window leaves no key of
// the block adds nothing, as with documents. Soft-capping (Gemma-2's
// softcap * tanh(s / softcap)) applies to each pair's scaled scores before
// the mask, as on one rank; backward multiplies dS by the cap's derivative
// 1 - tanh^2 before dq and dk. Under the zig-zag split a block
// from an earlier rank is attended by both query chunks but only its first
// key chunk; a block from a later rank only by the second query chunk: half
// the work of the rank's own block, on every rank.
// Backward is a function of its own (not autograd through the merge): it
// runs the ring again with each block's key/value gradient accumulator
// travelling beside the block, recomputing each pair's probabilities from
// the saved lse (as flash attention's backward does):
//   P = exp(q.k * scale - lse), dv += P^T do, dP = do v^T,
//   dS = P * (dP - rowsum(do * out)), dq += dS k * scale, dk += dS^T q * scale
// (dS through the soft-cap's derivative first, when capping).
// After the last step each accumulator goes one hop further, home. On CPU
// fp32 the blocks are eager matmuls: exact to rounding against the single
// rank's attention, which is what the tests hold it to.
#pragma once

#include <cstdint>
#include <memory>

#include <torch/types.h>

#include "model/layers.h"
#include "parallel/process_group.h"

namespace loom {

// The positions in the whole sequence of rank `rank`'s tokens under the
// zig-zag split of `seq_len` tokens over `cp` ranks (Note [zig-zag chunks]):
// int64 [2 * seq_len / (2 cp)] on the CPU. seq_len must be divisible by 2 cp.
torch::Tensor zigzag_positions(int64_t seq_len, int64_t rank, int64_t cp);

// Rank `rank`'s tokens of `x_bt` [batch, seq_len, ...] along dim 1: its two
// chunks, concatenated. A copy (on x's device).
torch::Tensor zigzag_tokens(const torch::Tensor& x_bt, int64_t rank, int64_t cp);

// Causal attention of this rank's queries over the whole sequence's keys and
// values, by ring (Note [ring attention]); collective over `cp`, forward and
// backward. q_bhtd [batch, heads, 2c, head_dim]; k, v [batch, kv_heads, 2c,
// head_dim] of this rank's tokens in zig-zag order. Takes the options' scale,
// sliding window and soft-capping. No KV cache.
class RingAttentionCore : public AttentionCore {
 public:
  // `cp` must outlive the core and every autograd graph through it.
  RingAttentionCore(ProcessGroup& cp, int64_t seq_len, AttentionOptions options);
  torch::Tensor forward(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd, const torch::Tensor& v_bhtd,
                        torch::Tensor* cache_k, torch::Tensor* cache_v) override;
  // Packed documents (Note [document mask]): `documents` holds the whole
  // rows' positions [batch, seq_len] (the model passes them whole under
  // context parallelism), from which each block's keys get their segments;
  // a key of another document is left out, and a pair of chunks with no
  // key left is skipped (Note [ring attention]).
  torch::Tensor forward_documents(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                  const torch::Tensor& v_bhtd, const DocumentMask& documents) override;

 private:
  ProcessGroup& cp_;
  int64_t seq_len_;
};

// The layers of `base` (the single-device or the tensor-parallel factory),
// with a ring attention core over `cp` and this rank's share of a sequence of
// `seq_len` tokens (LayerFactory::sequence_share), from which the model takes
// its rotary positions. `base` and `cp` must outlive the factory and the
// layers made here. The feed-forward block is LayerFactory's default, built
// from this factory's linears, which are the base's.
class ContextParallelLayerFactory : public LayerFactory {
 public:
  ContextParallelLayerFactory(const LayerFactory& base, ProcessGroup& cp, int64_t seq_len);

  std::shared_ptr<Linear> linear(int64_t in_features, int64_t out_features, bool bias,
                                 LinearRole role) const override {
    return base_.linear(in_features, out_features, bias, role);
  }
  std::shared_ptr<Embedding> embedding(int64_t vocab, int64_t hidden) const override {
    return base_.embedding(vocab, hidden);
  }
  std::shared_ptr<LmHead> lm_head(int64_t hidden, int64_t vocab, std::shared_ptr<Embedding> tied) const override {
    return base_.lm_head(hidden, vocab, std::move(tied));
  }
  std::shared_ptr<RMSNorm> norm(int64_t hidden, double eps, NormWeight style) const override {
    return base_.norm(hidden, eps, style);
  }
  std::shared_ptr<RMSNorm> head_norm(int64_t head_dim, double eps, NormWeight style) const override {
    return base_.head_norm(head_dim, eps, style);
  }
  std::shared_ptr<RMSNorm> projection_norm(int64_t features, double eps) const override {
    return base_.projection_norm(features, eps);
  }
  std::shared_ptr<Linear> expert_linear(int64_t in_features, int64_t out_features, LinearRole role) const override {
    return base_.expert_linear(in_features, out_features, role);
  }
  // The base's, whose row totals also add up the cp ranks' shares.
  std::shared_ptr<ExpertCollectives> expert_collectives() const override;
  int64_t sequence_shards() const override { return base_.sequence_shards(); }
  SequenceShare sequence_share() const override { return {seq_len_, positions_}; }
  std::shared_ptr<AttentionCore> attention_core(const ModelConfig& model, int64_t layer) const override;
  std::shared_ptr<LayerWrapper> layer_wrapper(const ModelConfig& model, int64_t layer) const override {
    return base_.layer_wrapper(model, layer);
  }

 private:
  const LayerFactory& base_;
  ProcessGroup& cp_;
  int64_t seq_len_;
  torch::Tensor positions_;  // zigzag_positions of this rank
};

}  // namespace loom

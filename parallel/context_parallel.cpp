#include "parallel/context_parallel.h"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "parallel/autograd_group.h"

namespace loom {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Tags of the ring's two streams between neighbours: the key/value blocks
// and, in backward, their gradient accumulators.
constexpr int kBlockTag = 0;
constexpr int kBlockGradTag = 1;

int64_t chunk_tokens_of(int64_t seq_len, int64_t cp) {
  if (cp < 1 || seq_len < 2 * cp || seq_len % (2 * cp) != 0) {
    throw std::invalid_argument("context parallelism: the sequence length (" + std::to_string(seq_len) +
                                ") must be a positive multiple of 2 * cp (" + std::to_string(2 * cp) + ")");
  }
  return seq_len / (2 * cp);
}

// The chunk numbers (of 2N) that half `half` (0 or 1) of rank r's tokens hold.
int64_t chunk_of(int64_t rank, int64_t half, int64_t cp) { return half == 0 ? rank : 2 * cp - 1 - rank; }

// How query chunk i attends key chunk j (Note [ring attention]): all of it,
// through a mask (the causal diagonal, or the edge of a sliding window of
// `window` positions; 0: none), or not at all. The query-key distances of a
// pair run (i - j) c - (c - 1) ... (i - j) c + (c - 1).
enum class PairKind { kFull, kMasked, kSkip };
PairKind pair_kind(int64_t query_chunk, int64_t key_chunk, int64_t chunk, int64_t window) {
  if (key_chunk > query_chunk) return PairKind::kSkip;
  if (window > 0) {
    const int64_t nearest = (query_chunk - key_chunk) * chunk - (chunk - 1);
    const int64_t farthest = (query_chunk - key_chunk) * chunk + (chunk - 1);
    if (nearest >= window) return PairKind::kSkip;  // wholly behind the window
    if (farthest >= window) return PairKind::kMasked;
  }
  return key_chunk == query_chunk ? PairKind::kMasked : PairKind::kFull;
}

// The mask [c, c] of a masked pair: the causal triangle (`causal_cc`) without
// a window; with one, the keys at distance 0 <= d < window.
at::Tensor pair_mask(int64_t query_chunk, int64_t key_chunk, int64_t chunk, int64_t window,
                     const at::Tensor& causal_cc) {
  if (window <= 0) return causal_cc;
  const at::Tensor index = at::arange(chunk, causal_cc.options().dtype(at::kLong));
  const at::Tensor distance = (query_chunk - key_chunk) * chunk + index.unsqueeze(1) - index.unsqueeze(0);
  return (distance >= 0).logical_and(distance < window);
}

// What one query half of this rank computes against the block of rank
// `owner`: the key tokens [key_begin, key_end) of the block (whole halves),
// and the mask [c, key_end - key_begin] where a diagonal pair is among them
// (undefined: every key visible). `attends` false: nothing to compute.
struct BlockSlice {
  bool attends = false;
  int64_t key_begin = 0, key_end = 0;
  at::Tensor allowed;
};

BlockSlice block_slice(int64_t rank, int64_t owner, int64_t query_half, int64_t cp, int64_t chunk, int64_t window,
                       const at::Tensor& causal_cc) {
  const int64_t query_chunk = chunk_of(rank, query_half, cp);
  const int64_t key_chunks[2] = {chunk_of(owner, 0, cp), chunk_of(owner, 1, cp)};
  const PairKind kinds[2] = {pair_kind(query_chunk, key_chunks[0], chunk, window),
                             pair_kind(query_chunk, key_chunks[1], chunk, window)};
  BlockSlice slice;
  // A block has two halves, so the attended ones are always one range.
  const int64_t begin = kinds[0] != PairKind::kSkip ? 0 : 1;
  const int64_t end = kinds[1] != PairKind::kSkip ? 2 : (kinds[0] != PairKind::kSkip ? 1 : 0);
  if (begin >= end) return slice;
  slice.attends = true;
  slice.key_begin = begin * chunk;
  slice.key_end = end * chunk;
  bool masked = false;
  for (int64_t half = begin; half < end; ++half) masked = masked || kinds[half] == PairKind::kMasked;
  if (masked) {
    std::vector<at::Tensor> parts;
    for (int64_t half = begin; half < end; ++half) {
      parts.push_back(kinds[half] == PairKind::kMasked ? pair_mask(query_chunk, key_chunks[half], chunk, window, causal_cc)
                                                       : at::ones_like(causal_cc));
    }
    slice.allowed = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
  }
  return slice;
}

// The mask of one slice for packed documents: the slice's causal mask
// (undefined: all visible) and, per row of the batch, query and key in the
// same segment: bool [batch, 1, c, span]. `segments_bs` [batch, seq_len]
// numbers each token's document (undefined: one document, the slice's mask
// as it is). Returns undefined when every key is visible.
at::Tensor documents_allowed(const BlockSlice& slice, const at::Tensor& segments_bs, int64_t seq_len, int64_t rank,
                             int64_t owner, int64_t query_half, int64_t cp, int64_t chunk) {
  if (!segments_bs.defined()) return slice.allowed;
  const int64_t query_start = chunk_of(rank, query_half, cp) * chunk;
  const at::Tensor query_segments = segments_bs.narrow(1, query_start, chunk);  // [batch, c]
  const at::Tensor key_positions = zigzag_positions(seq_len, owner, cp)
                                       .narrow(0, slice.key_begin, slice.key_end - slice.key_begin)
                                       .to(segments_bs.device());
  const at::Tensor key_segments = segments_bs.index_select(1, key_positions);  // [batch, span]
  at::Tensor allowed = query_segments.unsqueeze(2) == key_segments.unsqueeze(1);
  if (slice.allowed.defined()) allowed = allowed.logical_and(slice.allowed);
  return allowed.unsqueeze(1);
}

// [batch, kv_heads, t, d] -> [batch, heads, t, d]: each kv head repeated for
// the query heads of its group (grouped-query attention).
at::Tensor expand_kv(const at::Tensor& x, int64_t heads) {
  const int64_t group = heads / x.size(1);
  return group == 1 ? x : x.repeat_interleave(group, 1);
}

// The inverse for gradients: the group's heads summed into their kv head.
at::Tensor reduce_kv(const at::Tensor& grad_bhtd, int64_t kv_heads) {
  const int64_t heads = grad_bhtd.size(1);
  if (heads == kv_heads) return grad_bhtd;
  auto sizes = grad_bhtd.sizes().vec();
  return grad_bhtd.reshape({sizes[0], kv_heads, heads / kv_heads, sizes[2], sizes[3]}).sum(2);
}

// Scores of q over k in fp32: scaled, soft-capped when `softcap` > 0
// (softcap * tanh(s / softcap), Gemma-2's, before the mask as Hugging
// Face's eager attention), with the keys `allowed` leaves out at -inf.
// `cap_slope`, when given and capping, receives the cap's derivative
// 1 - tanh^2 for backward (finite where a key is left out, unlike the scores).
at::Tensor scores_of(const at::Tensor& q, const at::Tensor& k_expanded, const at::Tensor& allowed, double scale,
                     double softcap, at::Tensor* cap_slope = nullptr) {
  at::Tensor s = at::matmul(q.to(at::kFloat), k_expanded.to(at::kFloat).transpose(-1, -2)) * scale;
  if (softcap > 0) {
    const at::Tensor t = at::tanh(s / softcap);
    if (cap_slope != nullptr) *cap_slope = 1 - t * t;
    s = t * softcap;
  }
  if (allowed.defined()) s.masked_fill_(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  return s;
}

// One step of the ring: this rank's block goes to the next rank while the
// previous rank's arrives in `incoming`. Both Works must be waited on
// before `incoming` is read or `outgoing` written.
struct RingShift {
  std::unique_ptr<Work> sent, received;
  void wait() {
    if (received) received->wait();
    if (sent) sent->wait();
  }
};

RingShift post_shift(ProcessGroup& cp, const at::Tensor& outgoing, const at::Tensor& incoming, int tag) {
  const int next = (cp.rank() + 1) % cp.size(), previous = (cp.rank() + cp.size() - 1) % cp.size();
  RingShift shift;
  // Even ranks send first, odd ranks receive first: an NCCL send or receive
  // holds the group's stream until its peer's matching call runs, so a ring
  // where every rank sent first would wait on itself (Note [NCCL send and
  // recv]). MPI completes either order.
  if (cp.rank() % 2 == 0) {
    shift.sent = cp.send(outgoing, {next, tag});
    shift.received = cp.recv(incoming, {previous, tag});
  } else {
    shift.received = cp.recv(incoming, {previous, tag});
    shift.sent = cp.send(outgoing, {next, tag});
  }
  return shift;
}

// Note [ring attention]: the walk forward and backward share. At step s
// this rank holds the block of rank (rank - s) mod n, and the next block's
// transfer is posted before the current one is used (the block is only
// read meanwhile). on_slice(block, half, slice, allowed) runs for each
// query half that attends part of the block (with documents: that sees a
// key of its own documents there); after_step() once the next block has
// arrived, and after the last step.
template <typename OnSlice, typename AfterStep>
void walk_ring(ProcessGroup& cp, int64_t seq_len, int64_t window, const at::Tensor& segments_bs, at::Tensor block,
               const at::Tensor& causal_cc, const OnSlice& on_slice, const AfterStep& after_step) {
  const int64_t n = cp.size(), rank = cp.rank(), chunk = chunk_tokens_of(seq_len, n);
  for (int64_t step = 0; step < n; ++step) {
    const int64_t owner = (rank - step + n) % n;
    at::Tensor next_block;
    RingShift shift;
    if (step + 1 < n) {
      next_block = at::empty_like(block);
      shift = post_shift(cp, block, next_block, kBlockTag);
    }
    for (int64_t half = 0; half < 2; ++half) {
      const BlockSlice slice = block_slice(rank, owner, half, n, chunk, window, causal_cc);
      if (!slice.attends) continue;
      const at::Tensor allowed = documents_allowed(slice, segments_bs, seq_len, rank, owner, half, n, chunk);
      if (segments_bs.defined() && !allowed.any().item<bool>()) continue;  // no key of the query's documents
      on_slice(block, half, slice, allowed);
    }
    if (step + 1 < n) {
      shift.wait();
      block = next_block;
    }
    after_step();
  }
}

// Note [ring attention]: forward and backward each run the ring once.
struct RingAttention : torch::autograd::Function<RingAttention> {
  // `documents`: the documents' numbers of the whole rows [batch, seq_len],
  // or an undefined tensor (plain causal attention). Passed by pointer, not
  // as an input: autograd takes no undefined input, and it needs no
  // gradient. `window`, `softcap`: AttentionOptions' (0: none).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            ProcessGroup* group, int64_t seq_len, double scale, int64_t window, double softcap,
                            const at::Tensor* documents) {
    const at::Tensor& segments_bs = *documents;
    ProcessGroup& cp = *group;
    const int64_t chunk = chunk_tokens_of(seq_len, cp.size());
    const int64_t heads = q.size(1);
    const at::Tensor causal_cc = at::ones({chunk, chunk}, q.options().dtype(at::kBool)).tril();
    at::Tensor out = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    at::Tensor lse = at::full({q.size(0), heads, q.size(2)}, -std::numeric_limits<float>::infinity(),
                              q.options().dtype(at::kFloat));
    // Each block: [2, batch, kv_heads, 2c, head_dim], keys and values.
    const auto attend = [&](const at::Tensor& block, int64_t half, const BlockSlice& slice, const at::Tensor& allowed) {
      const int64_t span = slice.key_end - slice.key_begin;
      const at::Tensor q_h = q.narrow(2, half * chunk, chunk);
      const at::Tensor k_s = expand_kv(block[0].narrow(2, slice.key_begin, span), heads);
      const at::Tensor v_s = expand_kv(block[1].narrow(2, slice.key_begin, span), heads);
      const at::Tensor s = scores_of(q_h, k_s, allowed, scale, softcap);
      // Without documents or a window every query row of an attended slice
      // sees a key (its own position on the diagonal). With them a row may
      // see none here (its document starts in a later chunk, or the block
      // is behind its window): its lse is -inf, and it must add nothing
      // rather than exp(-inf - -inf).
      const at::Tensor block_lse = at::logsumexp(s, -1);
      const at::Tensor seen = block_lse.isfinite();
      const at::Tensor block_out =
          at::matmul(at::exp(s - at::where(seen, block_lse, 0.0).unsqueeze(-1)), v_s.to(at::kFloat));
      // The online-softmax merge into this half's running output.
      at::Tensor out_h = out.narrow(2, half * chunk, chunk);
      at::Tensor lse_h = lse.narrow(2, half * chunk, chunk);
      const at::Tensor seen_before = lse_h.isfinite();
      const at::Tensor merged = at::where(
          seen_before, at::where(seen, at::logaddexp(lse_h, block_lse), lse_h), block_lse);
      const at::Tensor keep = at::where(seen_before, at::exp(lse_h - merged), 0.0);
      const at::Tensor add = at::where(seen, at::exp(block_lse - merged), 0.0);
      out_h.copy_(out_h * keep.unsqueeze(-1) + block_out * add.unsqueeze(-1));
      lse_h.copy_(merged);
    };
    walk_ring(cp, seq_len, window, segments_bs, at::stack({k, v}).contiguous(), causal_cc, attend, [] {});
    out = out.to(q.scalar_type());
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["segments"] = segments_bs.defined() ? c10::IValue(segments_bs) : c10::IValue();
    save_group(ctx, *group);
    ctx->saved_data["seq_len"] = seq_len;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    ctx->saved_data["softcap"] = softcap;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const c10::IValue& saved_segments = ctx->saved_data["segments"];
    const at::Tensor segments_bs = saved_segments.isTensor() ? saved_segments.toTensor() : at::Tensor();
    ProcessGroup& cp = saved_group(ctx);
    const int64_t seq_len = ctx->saved_data["seq_len"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t window = ctx->saved_data["window"].toInt();
    const double softcap = ctx->saved_data["softcap"].toDouble();
    const int64_t n = cp.size(), chunk = chunk_tokens_of(seq_len, n);
    const int64_t heads = q.size(1), kv_heads = k.size(1);
    const at::Tensor causal_cc = at::ones({chunk, chunk}, q.options().dtype(at::kBool)).tril();
    const at::Tensor dout = grads[0].to(at::kFloat);
    // rowsum(do * out): the softmax's backward term per query.
    const at::Tensor dout_out = (dout * out.to(at::kFloat)).sum(-1);
    at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    at::Tensor block = at::stack({k, v}).contiguous();
    // The gradient accumulator of the block held, which travels with it.
    at::Tensor block_grad = at::zeros(block.sizes(), block.options().dtype(at::kFloat));
    const auto differentiate = [&](const at::Tensor& block, int64_t half, const BlockSlice& slice,
                                   const at::Tensor& allowed) {
      const int64_t begin = slice.key_begin, length = slice.key_end - slice.key_begin;
      const at::Tensor q_h = q.narrow(2, half * chunk, chunk).to(at::kFloat);
      const at::Tensor k_s = expand_kv(block[0].narrow(2, begin, length), heads).to(at::kFloat);
      const at::Tensor v_s = expand_kv(block[1].narrow(2, begin, length), heads).to(at::kFloat);
      const at::Tensor do_h = dout.narrow(2, half * chunk, chunk);
      // Every query's final lse is finite (it sees itself), so a left-out
      // key's probability is exp(-inf) = 0.
      at::Tensor cap_slope;
      const at::Tensor p = at::exp(scores_of(q_h, k_s, allowed, scale, softcap, &cap_slope) -
                                   lse.narrow(2, half * chunk, chunk).unsqueeze(-1));
      const at::Tensor dp = at::matmul(do_h, v_s.transpose(-1, -2));
      at::Tensor ds = p * (dp - dout_out.narrow(2, half * chunk, chunk).unsqueeze(-1));
      if (softcap > 0) ds = ds * cap_slope;  // through the cap, to the scaled scores
      dq.narrow(2, half * chunk, chunk).add_(at::matmul(ds, k_s) * scale);
      block_grad[0].narrow(2, begin, length).add_(reduce_kv(at::matmul(ds.transpose(-1, -2), q_h) * scale, kv_heads));
      block_grad[1].narrow(2, begin, length).add_(reduce_kv(at::matmul(p.transpose(-1, -2), do_h), kv_heads));
    };
    const auto pass_on_gradient = [&] {
      // The accumulator follows its block to the next rank; after the last
      // step that is the block's owner (r - (n - 1) = r + 1 mod n), and the
      // one arriving is this rank's own, complete.
      if (n > 1) {
        at::Tensor arriving = at::empty_like(block_grad);
        post_shift(cp, block_grad, arriving, kBlockGradTag).wait();
        block_grad = arriving;
      }
    };
    walk_ring(cp, seq_len, window, segments_bs, block, causal_cc, differentiate, pass_on_gradient);
    return {dq.to(q.scalar_type()), block_grad[0].to(k.scalar_type()), block_grad[1].to(v.scalar_type()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

torch::Tensor zigzag_positions(int64_t seq_len, int64_t rank, int64_t cp) {
  const int64_t chunk = chunk_tokens_of(seq_len, cp);
  const auto options = torch::TensorOptions().dtype(torch::kLong);
  return at::cat({at::arange(chunk_of(rank, 0, cp) * chunk, (chunk_of(rank, 0, cp) + 1) * chunk, options),
                  at::arange(chunk_of(rank, 1, cp) * chunk, (chunk_of(rank, 1, cp) + 1) * chunk, options)});
}

torch::Tensor zigzag_tokens(const torch::Tensor& x_bt, int64_t rank, int64_t cp) {
  return x_bt.index_select(1, zigzag_positions(x_bt.size(1), rank, cp).to(x_bt.device()));
}

RingAttentionCore::RingAttentionCore(ProcessGroup& cp, int64_t seq_len, AttentionOptions options)
    : AttentionCore(options), cp_(cp), seq_len_(seq_len) {
  chunk_tokens_of(seq_len, cp.size());
}

torch::Tensor RingAttentionCore::forward(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                         const torch::Tensor& v_bhtd, torch::Tensor* cache_k, torch::Tensor* cache_v) {
  TORCH_CHECK(cache_k == nullptr && cache_v == nullptr, "ring attention keeps no KV cache");
  TORCH_CHECK(q_bhtd.size(2) * cp_.size() == seq_len_ && k_bhtd.size(2) == q_bhtd.size(2),
              "ring attention over group '", cp_.name(), "' of ", cp_.size(), " ranks: a sequence of ", seq_len_,
              " tokens gives each rank ", seq_len_ / cp_.size(), ", got queries ", q_bhtd.sizes(), " and keys ",
              k_bhtd.sizes());
  const double scale = options().scale > 0 ? options().scale : 1.0 / std::sqrt(static_cast<double>(q_bhtd.size(3)));
  const at::Tensor no_documents;
  return RingAttention::apply(q_bhtd, k_bhtd, v_bhtd, &cp_, seq_len_, scale, options().window, options().softcap,
                              &no_documents);
}

torch::Tensor RingAttentionCore::forward_documents(const torch::Tensor& q_bhtd, const torch::Tensor& k_bhtd,
                                                   const torch::Tensor& v_bhtd, const DocumentMask& documents) {
  TORCH_CHECK(documents.tokens() == seq_len_ && documents.batch() == q_bhtd.size(0),
              "ring attention over packed documents takes the whole rows' positions [", q_bhtd.size(0), ", ",
              seq_len_, "], got [", documents.batch(), ", ", documents.tokens(), "]");
  TORCH_CHECK(q_bhtd.size(2) * cp_.size() == seq_len_ && k_bhtd.size(2) == q_bhtd.size(2),
              "ring attention over group '", cp_.name(), "': a sequence of ", seq_len_, " tokens gives each rank ",
              seq_len_ / cp_.size(), ", got queries ", q_bhtd.sizes(), " and keys ", k_bhtd.sizes());
  // Note [document mask]: a document starts where the position is 0; the
  // tokens before a row's first start are a segment of their own (number 0).
  const torch::Tensor segments_bs = documents.positions_bt().eq(0).cumsum(1).to(q_bhtd.device());
  const double scale = options().scale > 0 ? options().scale : 1.0 / std::sqrt(static_cast<double>(q_bhtd.size(3)));
  return RingAttention::apply(q_bhtd, k_bhtd, v_bhtd, &cp_, seq_len_, scale, options().window, options().softcap,
                              &segments_bs);
}

ContextParallelLayerFactory::ContextParallelLayerFactory(const LayerFactory& base, ProcessGroup& cp, int64_t seq_len)
    : base_(base), cp_(cp), seq_len_(seq_len), positions_(zigzag_positions(seq_len, cp.rank(), cp.size())) {}

namespace {

// The base factory's expert collectives; a row's tokens are spread over the
// cp ranks, so its totals are summed over the ring.
class ContextParallelExpertCollectives final : public ExpertCollectives {
 public:
  ContextParallelExpertCollectives(std::shared_ptr<ExpertCollectives> base, ProcessGroup& cp)
      : base_(std::move(base)), cp_(cp) {}
  torch::Tensor expert_input(const torch::Tensor& x_btd) const override { return base_->expert_input(x_btd); }
  torch::Tensor token_values(const torch::Tensor& v_btn) const override { return base_->token_values(v_btn); }
  torch::Tensor token_ids(const torch::Tensor& ids_btn) const override { return base_->token_ids(ids_btn); }
  torch::Tensor output(const torch::Tensor& y_btd) const override { return base_->output(y_btd); }
  torch::Tensor row_totals(const torch::Tensor& per_row_bn) const override {
    torch::Tensor totals = base_->row_totals(per_row_bn).contiguous();
    all_reduce_through_cpu(cp_, totals);
    return totals;
  }

 private:
  std::shared_ptr<ExpertCollectives> base_;
  ProcessGroup& cp_;
};

}  // namespace

std::shared_ptr<ExpertCollectives> ContextParallelLayerFactory::expert_collectives() const {
  return std::make_shared<ContextParallelExpertCollectives>(base_.expert_collectives(), cp_);
}

std::shared_ptr<AttentionCore> ContextParallelLayerFactory::attention_core(const ModelConfig& model,
                                                                            int64_t layer) const {
  // The base's options (scale, window, soft-capping), its kernel replaced.
  return std::make_shared<RingAttentionCore>(cp_, seq_len_, base_.attention_core(model, layer)->options());
}

}  // namespace loom

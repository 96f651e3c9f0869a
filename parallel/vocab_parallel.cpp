#include "parallel/vocab_parallel.h"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "parallel/tensor_parallel.h"
#include "util/error.h"

namespace loom {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// As in tensor_parallel.cpp: ctx->saved_data holds IValues, and a capsule
// carries the (not owned) group to backward.
struct GroupRef : torch::CustomClassHolder {
  explicit GroupRef(ProcessGroup* group) : group(group) {}
  ProcessGroup* group;
};

// `x` reduced over the group in place (it must be a fresh, contiguous tensor).
void all_reduce_inplace(ProcessGroup& group, const at::Tensor& x, ReduceOp op) {
  if (group.size() == 1) return;
  group.all_reduce(x, {op})->wait();
}

// Note [vocab-parallel cross-entropy]
// With the logits x [N, V] split as x_r [N, V/tp] over the ranks, and the
// target t_i of row i owned by one rank:
//   m_i   = max_r max_j x_r[i, j]             (all-reduce MAX)
//   s_i   = sum_r sum_j exp(x_r[i, j] - m_i)   (all-reduce SUM)
//   z_i   = x[i, t_i] - m_i                    (the owner's value, 0 elsewhere; all-reduce SUM)
//   loss  = mean_i (log s_i - z_i)
// With ignored targets (-100, as torch's ignore_index) the mean is over the
// rows whose target counts, and the other rows get no gradient; no row
// counting gives 0 (torch gives NaN there: a step of masked rows only must
// still add nothing rather than poison the sum).
// Padding columns (Note [vocab padding]) are -inf before the max: exp() makes
// them 0 in s and in the softmax, so they neither count nor get a gradient
// (a rank of padding only has a local max of -inf, which the global max
// replaces).
// Subtracting the global max keeps exp() from overflowing for large logits,
// as in a single-device log_softmax. s and z go in one all-reduce of [2, N]
// (one latency instead of two). Backward needs no communication:
//   d loss / d x_r[i, j] = (exp(x_r[i, j] - m_i) / s_i - [j is t_i]) / N,
// this rank's slice of softmax minus the one-hot target.
struct VocabParallelCrossEntropy : torch::autograd::Function<VocabParallelCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits_local, const at::Tensor& targets,
                            ProcessGroup* group, bool may_ignore, int64_t vocab) {
    const int64_t n = logits_local.size(0);
    const int64_t vocab_local = logits_local.size(1);
    const int64_t vocab_start = group->rank() * vocab_local;
    const int64_t tokens_local = vocab < 0 ? vocab_local : std::clamp<int64_t>(vocab - vocab_start, 0, vocab_local);

    // float32 whatever the input: a bfloat16 sum of exp over the vocabulary
    // would lose most of its bits. (.to() may return the input itself; every
    // op below is out of place, but the padding's fill, which takes a copy.)
    at::Tensor x = logits_local.to(at::kFloat, /*non_blocking=*/false, /*copy=*/tokens_local < vocab_local);
    if (tokens_local < vocab_local) {
      x.narrow(1, tokens_local, vocab_local - tokens_local).fill_(-std::numeric_limits<float>::infinity());
    }
    at::Tensor max = std::get<0>(x.max(/*dim=*/1)).contiguous();
    all_reduce_inplace(*group, max, ReduceOp::kMax);
    const at::Tensor exp = (x - max.unsqueeze(1)).exp_();

    const at::Tensor owned = (targets >= vocab_start) & (targets < vocab_start + vocab_local);
    // Targets this rank does not own are read at column 0 and zeroed.
    const at::Tensor targets_local = at::where(owned, targets - vocab_start, at::zeros_like(targets));
    const at::Tensor target_logit =
        x.gather(1, targets_local.unsqueeze(1)).squeeze(1).sub_(max).masked_fill_(owned.logical_not(), 0.0);
    at::Tensor sum_exp_and_target = at::stack({exp.sum(1), target_logit});
    all_reduce_inplace(*group, sum_exp_and_target, ReduceOp::kSum);
    const at::Tensor sum_exp = sum_exp_and_target[0];
    at::Tensor loss, counted;
    if (may_ignore) {
      counted = targets.ne(kIgnoredTarget);
      // The divisor, at least 1 so that no counted row gives 0, not NaN.
      const at::Tensor divisor = counted.sum().clamp_min(1).to(at::kFloat);
      loss = (sum_exp.log() - sum_exp_and_target[1]).masked_fill_(counted.logical_not(), 0.0).sum() / divisor;
      ctx->saved_data["divisor"] = divisor;
    } else {
      loss = (sum_exp.log() - sum_exp_and_target[1]).mean();
    }

    at::Tensor softmax = exp.div_(sum_exp.unsqueeze(1));
    if (may_ignore) softmax.masked_fill_(counted.logical_not().unsqueeze(1), 0.0);
    ctx->save_for_backward({softmax, targets_local, owned});
    ctx->saved_data["n"] = n;
    ctx->saved_data["dtype"] = logits_local.scalar_type();
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& softmax = saved[0];
    const at::Tensor& targets_local = saved[1];
    const at::Tensor& owned = saved[2];
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    const int64_t n = ctx->saved_data["n"].toInt();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    // Out of place: backward may run again (retain_graph) on the saved softmax.
    at::Tensor grad = softmax.scatter_add(1, targets_local.unsqueeze(1), owned.to(at::kFloat).neg_().unsqueeze(1));
    if (ctx->saved_data.count("divisor") != 0) {
      // Ignored rows: softmax zeroed in forward, and no owner (owned is false).
      grad.mul_(grads[0].to(at::kFloat) / ctx->saved_data["divisor"].toTensor());
    } else {
      grad.mul_(grads[0].to(at::kFloat) / static_cast<double>(n));
    }
    return {grad.to(dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

int64_t vocab_rows_per_rank(int64_t vocab, int64_t size) { return (vocab + size - 1) / size; }

int64_t vocab_rows_of_rank(int64_t vocab, int64_t rank, int64_t size) {
  const int64_t rows = vocab_rows_per_rank(vocab, size);
  return std::clamp<int64_t>(vocab - rank * rows, 0, rows);
}

at::Tensor shard_vocab_rows(const at::Tensor& full_weight, int64_t rank, int64_t size) {
  if (full_weight.dim() != 2) {
    throw BadInput("shard_vocab_rows: expected a weight [vocab, hidden], got " + describe_tensor(full_weight));
  }
  const int64_t vocab = full_weight.size(0);
  const int64_t rows = vocab_rows_per_rank(vocab, size), tokens = vocab_rows_of_rank(vocab, rank, size);
  at::Tensor shard = at::zeros({rows, full_weight.size(1)}, full_weight.options());
  shard.narrow(0, 0, tokens).copy_(full_weight.narrow(0, std::min(rank * rows, vocab), tokens));
  return shard;
}

VocabParallelEmbedding::VocabParallelEmbedding(ProcessGroup& tp, int64_t vocab, int64_t hidden, Options options)
    : tp_(&tp), vocab_(vocab), hidden_(hidden), options_(options) {
  vocab_start_ = tp.rank() * vocab_local();
  weight_ = register_parameter("weight", torch::empty({vocab_local(), hidden}));
}

torch::Tensor VocabParallelEmbedding::forward(const torch::Tensor& ids) {
  if (tp_->size() == 1) return at::embedding(weight_, ids);  // and with one rank the sequence is whole
  const at::Tensor owned = (ids >= vocab_start_) & (ids < vocab_start_ + vocab_local());
  const at::Tensor ids_local = at::where(owned, ids - vocab_start_, at::zeros_like(ids));
  // masked_fill also zeroes the gradient of the ids looked up as row 0 but
  // not owned, so row 0's gradient comes from its own id only.
  const at::Tensor rows_partial = at::embedding(weight_, ids_local).masked_fill(owned.logical_not().unsqueeze(-1), 0.0);
  // g: every id is owned by exactly one rank, so the sum is its row.
  return options_.sequence_parallel ? reduce_scatter_to_sp(*tp_, rows_partial) : reduce_from_tp(*tp_, rows_partial);
}

VocabParallelLmHead::VocabParallelLmHead(ProcessGroup& tp, int64_t hidden, int64_t vocab,
                                         std::shared_ptr<Embedding> tied, Options options)
    : tp_(&tp), vocab_(vocab), options_(options), tied_(std::move(tied)) {
  const std::string layer = "VocabParallelLmHead [" + std::to_string(vocab) + ", " + std::to_string(hidden) + "]";
  const int64_t vocab_local = vocab_rows_per_rank(vocab, tp.size());
  if (tied_) {
    // A tied head registers nothing: the weight is the embedding's shard,
    // stored, optimized and exported once (as LocalLmHead does).
    const at::Tensor w = tied_->weight();
    if (w.dim() != 2 || w.size(0) != vocab_local || w.size(1) != hidden) {
      throw BadInput(layer + ": the tied embedding's weight is " + describe_tensor(w) + ", expected this rank's [" +
                     std::to_string(vocab_local) + ", " + std::to_string(hidden) +
                     "] (a VocabParallelEmbedding over the same tp group)");
    }
  } else {
    weight_ = register_parameter("weight", torch::empty({vocab_local, hidden}));
  }
}

torch::Tensor VocabParallelLmHead::forward(const torch::Tensor& hidden) {
  // f: each rank's vocabulary slice contributes a part of the input's gradient.
  return at::linear(column_input(*tp_, hidden, options_.sequence_parallel), tied_ ? tied_->weight() : weight_);
}

at::Tensor vocab_parallel_cross_entropy(ProcessGroup& tp, const at::Tensor& logits_local, const at::Tensor& targets,
                                        bool may_ignore, int64_t vocab) {
  const auto refuse = [&](const std::string& why) {
    throw std::invalid_argument("vocab_parallel_cross_entropy over group '" + tp.name() + "' (size " +
                                std::to_string(tp.size()) + "): logits_local " + describe_tensor(logits_local) +
                                ", targets " + describe_tensor(targets) + ": " + why);
  };
  if (logits_local.dim() != 2) refuse("expected logits_local [N, vocab/tp]");
  if (!at::isFloatingType(logits_local.scalar_type())) refuse("logits must be floating-point");
  if (targets.dim() != 1 || targets.size(0) != logits_local.size(0)) refuse("expected targets [N]");
  if (targets.scalar_type() != at::kLong) refuse("targets must be int64");
  if (logits_local.size(1) == 0) refuse("this rank has no vocabulary");
  if (vocab == 0 || (vocab > 0 && vocab_rows_per_rank(vocab, tp.size()) != logits_local.size(1))) {
    refuse("vocab " + std::to_string(vocab) + " does not pad to " + std::to_string(logits_local.size(1)) +
           " columns a rank (Note [vocab padding])");
  }
  return VocabParallelCrossEntropy::apply(logits_local, targets, &tp, may_ignore, vocab);
}

}  // namespace loom

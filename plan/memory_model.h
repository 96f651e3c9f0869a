// The bytes a layout makes each rank hold, following what loom's code
// allocates (docs/plan.md, "Memory"):
//   - parameters and their .grad, fp32 (or bf16 with precision.params bf16)
//     (a mixture of experts' total parameters: every expert on every rank),
//     and AdamW's exp_avg and exp_avg_sq (with bf16 parameters also an fp32
//     master copy), for this rank's tp shards of its pipeline chunks
//     (parallel/tensor_parallel_model.h, parallel/pipeline.h);
//   - ZeRO-1 (parallel/zero.h): AdamW state over 1/dp of the flat parameter
//     vector, an fp32 shard of the parameters and of the gradient, and for
//     their moments the flat gradient made for the reduce-scatter and the
//     flat parameters the step all-gathers;
//   - ZeRO-2: the optimizer state, an fp32 gradient and a parameter shard
//     over 1/dp, plus the gradients in flight (a unit's gradients and their
//     flat buffer, the unit before still being reduced) and the step's
//     gathers (two units' buffers); ZeRO-3: the parameters over 1/dp too,
//     except the embedding and head, kept whole with their gradients, plus
//     the gathered layers in flight (the one computing and the one
//     prefetched) and a layer's reduction. A unit is a decoder layer, the
//     embedding or the final norm with the head;
//   - data-parallel gradient buckets (parallel/data_parallel.h): a flat copy
//     of every gradient, all alive at the end of backward;
//   - activations: what autograd saves per decoder layer for loom's ops
//     (fp32, or bf16 autocast with its fp32 norms), per micro-batch in flight
//     on this rank as the schedule orders its forwards and backwards;
//     with full recomputation only each layer's input, plus one layer
//     rebuilt; with selective recomputation all but what the attention core
//     saves of its own (the fused kernels' log-sum-exp), plus one core rebuilt;
//   - the pipeline executor's buffers, kept until the end of the step: each
//     received activation and its gradient, each sent output;
//   - the transients at the loss (logits and the cross-entropy's gradients)
//     and in AdamW's step;
//   - context parallelism: every per-token tensor at the rank's seq / cp
//     tokens, parameters and optimizer state whole (cp ranks are replicas),
//     and what ring attention allocates while a layer's walk runs: the
//     key/value blocks held and in flight, and its score matrices
//     (Note [ring attention costs] in plan/ring_model.h).
// The peak is the largest of these sums over the step's phases.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/layout.h"
#include "model/llama.h"

namespace loom::plan {

// Elements of the parameters one rank holds: model stages `stages` (a
// pipeline rank's chunks) at tensor-parallel degree `tp`, as loom's layer
// factory shards them (column-parallel rows, row-parallel columns,
// vocabulary rows of the embedding and head, norms and row biases whole). A
// last stage of a split model with tied embeddings holds its own copy of the
// embedding. Under expert parallelism a rank holds num_experts / ep experts
// of each sparse layer (the router whole).
struct ParameterCount {
  int64_t total = 0;
  int64_t experts = 0;         // of them the routed experts' (what ep splits)
  int64_t linear_weights = 0;  // the matrices autocast casts to bf16 (projections, head)
  int64_t largest = 0;         // elements of the largest single tensor
};
ParameterCount count_rank_parameters(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages,
                                     bool split_model, int64_t ep = 1);

// Bytes autograd keeps for one decoder layer and one micro-batch of `tokens`
// tokens (micro_batch x seq_len) on one tp rank; with full recomputation only
// the layer's input, with selective all but the attention core's own
// (attention_core_bytes).
double layer_activation_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool sequence_parallel, bool bf16,
                              Recompute recompute);

// The same for a sparse layer of a mixture of experts (Note [plan: mixture
// of experts] in plan/moe_model.h): its feed-forward block's tensors in
// place of a dense MLP's.
double sparse_layer_activation_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool sequence_parallel,
                                     bool bf16, Recompute recompute);

// Bytes the attention core of one decoder layer saves of its own for one
// micro-batch, what selective recomputation leaves out: with fused attention
// its log-sum-exp per head (its output is kept as o_proj's input either way).
double attention_core_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool bf16);

// Elements of the largest unit ZeRO-2 and ZeRO-3 reduce-scatter (and ZeRO-3
// gathers) at once on a rank holding `stages`: a decoder layer, the
// embedding, or the head with the final norm.
int64_t largest_unit_parameters(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages,
                                bool split_model);

struct RankMemory {
  int64_t pp_rank = 0;
  int64_t parameters = 0;  // elements held
  double params = 0, grads = 0, optimizer = 0;  // bytes, always allocated (under ZeRO-2/3 the shards)
  double zero_buffers = 0;     // ZeRO-1 flat parameters and shard gradient
  double zero_in_flight = 0;   // ZeRO-2/3 during forward and backward: gathered units, gradients being reduced
  double weight_cache = 0;     // bf16 weight casts kept for the step (one rank, bf16)
  double activations = 0;      // at the peak: saved activations of the micro-batches in flight
  double pipeline_buffers = 0; // at the peak: the executor's kept tensors, and the step's token ids
  double transient = 0;        // at the peak: the phase's short-lived tensors
  double peak = 0;
  std::string peak_phase;      // "backward of micro-batch 3", "gradient buckets", "optimizer step", ...
};

struct MemoryEstimate {
  std::vector<RankMemory> ranks;  // one per pipeline rank (dp and tp ranks hold the same)
  double peak = 0;                // the largest, bytes
  int64_t peak_pp_rank = 0;
};

MemoryEstimate estimate_memory(const Problem& problem, const Layout& layout);

}  // namespace loom::plan

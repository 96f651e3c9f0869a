// What ring attention (parallel/context_parallel.h) costs one rank of a
// context-parallel layout, per decoder layer and micro-batch: the bytes its
// walk allocates beside the saved activations, and its seconds of compute
// and of exposed communication (docs/plan.md, "Context parallelism").
//
// Note [ring attention costs]
// A rank holds 2c = seq / cp tokens of each sequence in two chunks of c
// (Note [zig-zag chunks]). Its walk takes cp steps; at each it attends the
// block it holds, the keys and values [2, batch, kv_heads, 2c, head_dim] of
// one rank, while the next block travels to it (Note [ring attention]).
// Work in (query, key) pairs of one head: its own block 3 c^2 (the first
// half over its diagonal chunk, the second over a whole chunk and its
// diagonal), every other block 2 c^2 (both halves over one chunk, or the
// second half over two), (2 cp + 1) c^2 in all, about half of the 4 cp c^2
// a non-causal count would give. The blocks are eager fp32 matmuls, not
// the fused attention kernel: the scores [batch, heads, c, span] of a
// slice are materialized (span at most 2c), so
//   - compute: forward QK^T and PV (4 head_dim FLOPs a pair), backward
//     QK^T again, dP, dQ, dK and dV (10), at the profile's fp32 matmul
//     rate; the passes over the scores (forward about 8, backward 12 fp32
//     reads or writes a pair) at its memory bandwidth; about 15 ops a slice
//     forward and 20 backward, two slices a step;
//   - memory: forward the block held and the one arriving (compute dtype),
//     the fp32 output and log-sum-exp, fp32 copies of the expanded keys and
//     values of a slice, and three score-sized fp32 tensors at once (the
//     scores, their difference to the lse, its exp); backward the two
//     blocks, the block's fp32 gradient accumulator travelling with it, the
//     fp32 output gradient and dQ, and four score-sized tensors (P, dP,
//     dP - rowsum, dS);
//   - communication: forward cp - 1 block transfers, each beside the
//     current block's compute (a step takes the longer of the two);
//     backward the same, plus after each of the cp steps the fp32 gradient
//     accumulator sent on and waited for at once (not overlapped).
// The saved activations are those of the fused core (q, k, v, the output and
// the fp32 log-sum-exp), at the rank's 2c tokens: layer_activation_bytes.
#pragma once

#include <cstdint>

#include "config/model_config.h"
#include "plan/machine_profile.h"

namespace loom::plan {

struct RingShape {
  int64_t cp = 1;
  int64_t micro_batch = 1;
  int64_t seq_len = 0;  // the whole sequence (the rank holds seq_len / cp)
  int64_t tp = 1;
  bool bf16 = false;    // the compute dtype of q, k and v
};

// Bytes alive beside the saved activations while one layer's ring attention
// runs (Note [ring attention costs]); 0 when cp is 1.
struct RingMemory {
  double forward = 0;
  double backward = 0;
};
RingMemory ring_attention_memory(const ModelConfig& model, const RingShape& shape);

// Seconds of one layer's ring attention on `link` (the cp group's); 0 when
// cp is 1. `compute` is the matmuls, passes and ops; `exposed_comm` what the
// transfers add beyond it.
struct RingTime {
  double forward_compute = 0, forward_exposed_comm = 0;
  double backward_compute = 0, backward_exposed_comm = 0;
};
RingTime ring_attention_time(const ModelConfig& model, const RingShape& shape, const MachineProfile& machine,
                             const LinkProfile& link);

// Bytes of the keys and values block one ring step sends: [2, batch,
// kv_heads / tp, seq / cp, head_dim] in the compute dtype.
double ring_block_bytes(const ModelConfig& model, const RingShape& shape);

}  // namespace loom::plan

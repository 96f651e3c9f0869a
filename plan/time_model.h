// The seconds one optimizer step of a layout takes, from the FLOPs and bytes
// loom's step moves and a machine profile's rates (docs/plan.md, "Time"):
//   - per micro-batch and model stage, forward and backward: the matmuls'
//     FLOPs at the profile's matmul rate, attention at its attention rate,
//     elementwise bytes at its memory bandwidth, a fixed cost per op; twice
//     for backward, plus one more forward of each layer with full
//     recomputation, of each attention core with selective;
//   - tensor parallelism: the all-reduces (or, with sequence parallelism,
//     all-gathers and reduce-scatters) of every layer, embedding and head,
//     waited for where they are issued (loom does not overlap them);
//   - pipeline: the schedule run by loom's own simulator with each stage's
//     times and each message's transfer time, so the bubble is the
//     schedule's as loom orders it;
//   - data parallelism: the gradient all-reduce in buckets, hidden behind
//     the last micro-batch's backward as far as the profile's dp_overlap
//     says (loom overlaps only without a pipeline), or ZeRO-1's
//     reduce-scatter and all-gather, which nothing hides; ZeRO-2's
//     reduce-scatter of each unit's gradients in every micro-batch's
//     backward (and its parameter all-gather after the step), ZeRO-3's
//     all-gathers of each unit's parameters before its forward and its
//     backward and the same reduce-scatter, hidden behind that micro-batch's
//     compute as far as dp_overlap says, but never the first unit's;
//   - context parallelism: each rank's seq / cp tokens through everything
//     but attention; attention as the ring's blocks, each next block's
//     transfer beside the current one's compute, over the link the cp group
//     spans (Note [ring attention costs] in plan/ring_model.h); the gradient
//     all-reduce over the dp x cp replicas;
//   - a mixture of experts: the active parameters' matmuls (the router and
//     the k experts a token chose), the ops of every expert, and under tp
//     each expert's all-reduce (Note [plan: mixture of experts] in
//     plan/moe_model.h); the optimizer and gradients over all parameters;
//     with expert parallelism a rank's num_experts / ep experts, the
//     blocking all-to-alls of each sparse layer (counts, dispatch, combine;
//     backward both rows' exchanges again) over the ep block's link, and
//     the experts' gradients all-reduced over dp / ep;
//   - AdamW, gradient clipping and zeroing as memory traffic.
// A collective over n ranks of B bytes costs, on the link its group spans,
// ring all-reduce 2 (n-1) latency + 2 (n-1)/n B / bandwidth, all-gather or
// reduce-scatter half of it, a send latency + B / bandwidth.
#pragma once

#include <string>

#include "plan/layout.h"
#include "plan/machine_profile.h"

namespace loom::plan {

struct StepTime {
  double compute = 0;    // the slowest pipeline rank's forwards and backwards (no waiting)
  double tp_comm = 0;    // of that rank's micro-batches
  double pipeline = 0;   // the simulated schedule's span: compute, tp, ZeRO-2/3, transfers and the bubble
  double bubble = 0;     // pipeline - the slowest rank's busy time
  double zero_comm = 0;  // ZeRO-2/3's gathers and reduce-scatters during that rank's micro-batches, exposed
  double cp_comm = 0;    // ring attention's transfers of that rank's micro-batches not hidden behind its blocks
  double ep_comm = 0;    // expert parallelism's all-to-alls of that rank's micro-batches
  double dp_comm = 0;    // exposed (not hidden behind backward)
  double optimizer = 0;  // AdamW, clipping, zeroing, ZeRO-1's copies
  double total = 0;      // seconds per step
  double tokens_per_s = 0;
  double mfu = 0;        // model FLOPs (6 N + 12 L H S per token) over world x peak
};

StepTime estimate_step_time(const Problem& problem, const Layout& layout, const MachineProfile& machine);

// Which link a group of `size` ranks spaced `stride` apart spans: inside one
// node when stride * size <= gpus_per_node (loom's rank order puts tp
// fastest, then cp, then pp, then dp: parallel/topology.h).
const LinkProfile& link_of(const Problem& problem, const MachineProfile& machine, int64_t stride, int64_t size);

// Bytes a decoder layer's elementwise ops (norms, rotary, SwiGLU's silu and
// product, residual adds) read and write in forward for `tokens` tokens on
// one tp rank; backward moves twice as much. `loom plan --calibrate` times
// these same ops to turn the count into the profile's memory_bytes_per_s.
double layer_elementwise_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool sequence_parallel, bool bf16);

// Bytes AdamW, gradient clipping and zero_grad move per fp32 element of
// optimizer state on the CPU path (optim/optimizer.cpp: decay, the two
// moments, the denominator and the update read and write the parameter, its
// gradient and the moments about 25 times in all). `loom plan --calibrate`
// times loom's AdamW with it to measure stream_bytes_per_s.
inline constexpr double kOptimizerBytesPerElement = 100;

// Ring collectives on `link` (seconds); 0 for one rank.
double all_reduce_seconds(const LinkProfile& link, int64_t ranks, double bytes);
double all_gather_seconds(const LinkProfile& link, int64_t ranks, double bytes);  // also reduce-scatter; bytes = the whole
// Pairwise all-to-all of `bytes` per rank: (n - 1) latency + (n - 1)/n B / bandwidth.
double all_to_all_seconds(const LinkProfile& link, int64_t ranks, double bytes);

}  // namespace loom::plan

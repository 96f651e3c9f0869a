#include "plan/time_model.h"

#include <algorithm>
#include <cmath>

#include "parallel/pipeline.h"
#include "parallel/pipeline_schedule.h"
#include "plan/memory_model.h"
#include "plan/moe_model.h"
#include "plan/ring_model.h"
#include "trainer/training.h"
#include "util/error.h"

namespace loom::plan {

namespace {

// ATen ops per decoder layer and micro-batch, forward and backward (each
// has a fixed cost: dispatch, a kernel launch, autograd's bookkeeping).
constexpr double kLayerOpsForward = 40, kLayerOpsBackward = 70;
constexpr double kHeadOps = 30;  // norm, head, cross-entropy and their backward
constexpr double kOptimizerOpsPerTensor = 12;

struct StageCost {
  double forward = 0, backward = 0;        // compute, one micro-batch
  double tp_forward = 0, tp_backward = 0;  // its tensor-parallel collectives
  double cp_forward = 0, cp_backward = 0;  // its ring attention's transfers not hidden behind the blocks' compute
  double ep_forward = 0, ep_backward = 0;  // expert parallelism's all-to-alls (blocking)
  double zero_forward = 0, zero_backward = 0;  // ZeRO-2/3's collectives not hidden behind that compute
};

// Ops of the attention core's forward that selective recomputation runs
// again (SDPA and the views around it).
constexpr double kAttentionCoreOps = 4;

// The exposed part of collectives taking `comm` seconds issued a unit at a
// time beside `compute` seconds of the units' compute: hidden as far as the
// profile's dp_overlap says, but never the first (or last) unit's.
double exposed(double comm, double compute, double overlap, double units) {
  if (comm <= 0) return 0;
  return std::max(comm - overlap * compute, comm / std::max(1.0, units));
}

}  // namespace

double layer_elementwise_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool sequence_parallel, bool bf16) {
  const double h = static_cast<double>(model.hidden_size), d = static_cast<double>(model.head_size());
  const double h_residual = sequence_parallel && tp > 1 ? h / tp : h;
  const double q = model.num_heads * d / tp, kv = model.kv_heads() * d / tp;
  const double inter = static_cast<double>(model.intermediate_size) / tp;
  // Elements read and written per token: each RMSNorm squares, averages,
  // takes rsqrt and multiplies twice (about 7 passes over the hidden size);
  // two residual adds (3 each); rotary multiplies, negates, concatenates and
  // adds (about 12 per element of q and k); silu and the product (5 per
  // element of the intermediate size).
  const double elements = 2 * 7 * h_residual + 2 * 3 * h_residual + 12 * (q + kv) + 5 * inter;
  return (bf16 ? 2.0 : 4.0) * static_cast<double>(tokens) * elements;
}

const LinkProfile& link_of(const Problem& problem, const MachineProfile& machine, int64_t stride, int64_t size) {
  return stride * size <= problem.gpus_per_node ? machine.intra_node : machine.inter_node;
}

double all_reduce_seconds(const LinkProfile& link, int64_t ranks, double bytes) {
  if (ranks <= 1) return 0;
  const double n = static_cast<double>(ranks);
  return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * bytes / link.bytes_per_s;
}

double all_to_all_seconds(const LinkProfile& link, int64_t ranks, double bytes) {
  if (ranks <= 1) return 0;
  const double n = static_cast<double>(ranks);
  return (n - 1) * link.latency_s + (n - 1) / n * bytes / link.bytes_per_s;
}

double all_gather_seconds(const LinkProfile& link, int64_t ranks, double bytes) {
  if (ranks <= 1) return 0;
  const double n = static_cast<double>(ranks);
  return (n - 1) * link.latency_s + (n - 1) / n * bytes / link.bytes_per_s;
}

StepTime estimate_step_time(const Problem& problem, const Layout& layout, const MachineProfile& machine) {
  const ModelConfig& m = problem.model;
  const bool bf16 = problem.bf16;
  if (machine.matmul_flops(bf16) <= 0 || machine.attention_flops(bf16) <= 0 || machine.peak_flops(bf16) <= 0) {
    throw BadInput("machine profile '" + machine.name + "' has no " + (bf16 ? "bf16" : "fp32") +
                   " rates (compute.matmul_flops, attention_flops, peak_flops), which precision.compute " +
                   (bf16 ? "bf16" : "fp32") + " needs");
  }
  const int64_t tp = layout.tp, p = layout.pp, v = layout.pp > 1 ? layout.virtual_stages : 1;
  const int64_t model_stages = p * v, micro_batches = layout.micro_batches(problem);
  const bool sp = layout.sequence_parallel && tp > 1;
  const double act = bf16 ? 2 : 4;
  // A cp rank's tokens: seq / cp of each sequence (its queries; the keys are the whole sequence's).
  const int64_t rank_tokens = layout.micro_batch * layout.rank_seq_len(problem);
  const double n = static_cast<double>(rank_tokens), s = static_cast<double>(problem.seq_len);
  const double h = static_cast<double>(m.hidden_size), d = static_cast<double>(m.head_size());
  const double q = m.num_heads * d / tp, kv = m.kv_heads() * d / tp, inter = static_cast<double>(m.intermediate_size) / tp;
  const double vocab = static_cast<double>(m.vocab_size) / tp;
  const double matmul_rate = machine.matmul_flops(bf16), attention_rate = machine.attention_flops(bf16);
  const double bandwidth = machine.memory_bytes_per_s, op = machine.op_overhead_s;
  const double param_bytes = problem.params_bf16 ? 2 : 4;
  // ZeRO reduce-scatters fp32 gradients whatever the parameters' dtype, and
  // gathers the parameters in theirs (Note [ZeRO with bf16 parameters]).
  const double zero_reduce_scale = 4 / param_bytes;
  const int64_t zero_stage = layout.dp > 1 ? layout.zero_stage : 0;
  // Rank order tp, cp, pp, dp (parallel/topology.h). The gradients are
  // averaged over the dp x cp replicas (Note [cp replicas]), a group that
  // spans the whole grid with dp > 1 and one tp x cp block without.
  const int64_t replicas = layout.dp * layout.cp;
  const LinkProfile& dp_link =
      layout.cp > 1 ? link_of(problem, machine, 1, layout.dp > 1 ? layout.world() : tp * layout.cp)
                    : link_of(problem, machine, tp * p, layout.dp);
  const LinkProfile& cp_link = link_of(problem, machine, tp, layout.cp);
  // Expert parallelism: blocks of ep consecutive dp ranks exchange tokens;
  // an expert's copies (one per block) reduce their gradients over dp / ep.
  const int64_t ep = m.moe() ? layout.ep : 1;
  const LinkProfile& ep_link = link_of(problem, machine, tp * layout.cp * p, ep);
  const LinkProfile& edp_link = link_of(problem, machine, tp * layout.cp * p * ep, layout.dp / ep);
  const RingTime ring = ring_attention_time(m, {layout.cp, layout.micro_batch, problem.seq_len, tp, bf16}, machine, cp_link);

  // Tensor-parallel collectives of one micro-batch: the residual stream
  // [batch, seq, hidden] in the compute dtype.
  const LinkProfile& tp_link = link_of(problem, machine, 1, tp);
  const double stream = act * n * h;
  // Per layer, two in forward (after o_proj and down_proj) and two in
  // backward (the gradients of the attention's and the MLP's inputs):
  // all-reduces, or with sequence parallelism an all-gather and a
  // reduce-scatter each.
  const double tp_pair = sp ? 2 * all_gather_seconds(tp_link, tp, stream) : 2 * all_reduce_seconds(tp_link, tp, stream);
  // The vocabulary-parallel cross-entropy's three small all-reduces (max,
  // sum and target logit) of one value per token.
  const double tp_loss = 3 * all_reduce_seconds(tp_link, tp, 4 * n);

  std::vector<StageCost> stages(model_stages);
  for (int64_t stage = 0; stage < model_stages; ++stage) {
    const StageSpec spec = pipeline_stage_spec(m.num_layers, model_stages, stage);
    const double layers = static_cast<double>(spec.num_layers);
    const double layer_matmul = 2 * n * (h * q + 2 * h * kv + q * h + 3 * h * inter);
    const double layer_attention = 4 * n * s * q;  // QK^T and AV, nominal (non-causal) FLOPs
    // The fused kernel's attention, or with cp the ring's blocks (Note [ring attention costs]).
    const double attention_forward = layout.cp > 1 ? ring.forward_compute : layer_attention / attention_rate;
    const double attention_backward = layout.cp > 1 ? ring.backward_compute : 2 * layer_attention / attention_rate;
    const double layer_elementwise = layer_elementwise_bytes(m, rank_tokens, tp, sp, bf16);
    const double layer_forward = layer_matmul / matmul_rate + attention_forward + layer_elementwise / bandwidth +
                                 kLayerOpsForward * op;
    const double layer_backward = 2 * layer_matmul / matmul_rate + attention_backward +
                                  2 * layer_elementwise / bandwidth + kLayerOpsBackward * op;
    // What backward runs again: the whole layer (its tp collectives too), or
    // the attention core alone (no communication).
    const bool full = layout.recompute == Recompute::kFull;
    double rebuilt = 0;
    if (full) rebuilt = layer_forward;
    if (layout.recompute == Recompute::kSelective) rebuilt = attention_forward + kAttentionCoreOps * op;
    StageCost& cost = stages[stage];
    cost.forward = layers * layer_forward;
    cost.backward = layers * (layer_backward + rebuilt);
    cost.tp_forward = layers * tp_pair;
    cost.tp_backward = layers * tp_pair * (full ? 2 : 1);  // the rebuilt forward communicates again
    // The ring's walks, and a rebuilt core's (full or selective) walks again.
    cost.cp_forward = layers * ring.forward_exposed_comm;
    cost.cp_backward =
        layers * (ring.backward_exposed_comm + (layout.recompute != Recompute::kNone ? ring.forward_exposed_comm : 0));
    const int64_t sparse = m.moe() ? sparse_layers_of(m, spec) : 0;
    if (sparse > 0) {
      // Note [plan: mixture of experts]: a sparse layer's feed-forward block
      // (the router and the k experts each token chose, the ops of all E) in
      // place of the dense MLP's matmuls and passes. Its tokens come in and
      // leave under tp as the dense MLP's do (tp_pair); besides, the
      // router's k weights per token (and the shared expert's gate) reach
      // the experts through f, whose backward all-reduces them, or with
      // sequence parallelism are all-gathered with the chosen experts
      // (int64) and reduce-scattered back (Note [experts under tensor
      // parallelism] in model/moe.h).
      const double matmul = n * sparse_block_matmul_flops_per_token(m, tp) - 2 * n * 3 * h * inter;
      const double elementwise = n * sparse_block_elementwise_bytes_per_token(m, tp, bf16) - act * n * 5 * inter;
      const double forward = matmul / matmul_rate + elementwise / bandwidth + sparse_block_extra_ops(m, false, ep) * op;
      const double backward =
          2 * matmul / matmul_rate + 2 * elementwise / bandwidth + sparse_block_extra_ops(m, true, ep) * op;
      const double experts = static_cast<double>(m.num_experts);
      const double k = static_cast<double>(m.num_experts_per_tok);
      const double values = 4 * n * (k + (m.architecture == "qwen2_moe" ? 1 : 0));
      const double tp_extra_forward = sp ? all_gather_seconds(tp_link, tp, values + 8 * n * k) : 0;
      const double tp_extra_backward =
          sp ? all_gather_seconds(tp_link, tp, values) : all_reduce_seconds(tp_link, tp, values);
      const double count = static_cast<double>(sparse);
      cost.forward += count * forward;
      cost.backward += count * (backward + (full ? forward : 0));
      cost.tp_forward += count * tp_extra_forward;
      cost.tp_backward += count * (tp_extra_backward + (full ? tp_extra_forward : 0));
      if (ep > 1) {
        // Note [expert all-to-all] (parallel/expert_parallel.h): the counts
        // (int64 per expert), then the k rows of each token dispatched and
        // their outputs combined; backward the two the other way. Blocking.
        const double rows = stream * static_cast<double>(m.num_experts_per_tok);
        const double exchange = 2 * all_to_all_seconds(ep_link, ep, rows);
        const double counts = all_to_all_seconds(ep_link, ep, 8 * experts);
        cost.ep_forward = count * (counts + exchange);
        cost.ep_backward = count * (exchange + (full ? counts + exchange : 0));
      }
    }
    if (spec.has_embedding) {
      cost.forward += 4 * n * h / bandwidth;
      cost.tp_forward += all_reduce_seconds(tp_link, tp, stream);
    }
    if (spec.has_head) {
      const double head_matmul = 2 * n * h * vocab;
      // Norm, then the cross-entropy's passes over the logits (max, exp, sum, softmax; its gradient).
      const double head_elementwise = 4 * n * (7 * h + 4 * vocab);
      cost.forward += head_matmul / matmul_rate + head_elementwise / bandwidth + kHeadOps / 2 * op;
      cost.backward += 2 * head_matmul / matmul_rate + 2 * head_elementwise / bandwidth + kHeadOps / 2 * op;
      cost.tp_forward += tp_loss;
      cost.tp_backward += all_reduce_seconds(tp_link, tp, stream);  // copy_to_tp's gradient at the head's input
    }
    if (zero_stage >= 2) {
      // Every micro-batch: ZeRO-3 gathers each unit's parameters before its
      // forward and again before its backward; ZeRO-2 and 3 reduce-scatter
      // each unit's gradients as its backward ends. A unit is a layer, the
      // embedding or the head; the next one's collective runs beside this
      // one's compute.
      // Under ep the experts' units reduce over the dp / ep ranks that hold
      // them (Note [ZeRO with expert parallelism] in trainer/update.h).
      const ParameterCount count = count_rank_parameters(m, tp, {spec}, model_stages > 1, ep);
      const double expert_bytes = ep > 1 ? param_bytes * static_cast<double>(count.experts) : 0;
      const double stage_bytes = param_bytes * static_cast<double>(count.total) - expert_bytes;
      const double units = layers + (spec.has_embedding ? 1 : 0) + (spec.has_head ? 1 : 0);
      const double gather = zero_stage == 3 ? all_gather_seconds(dp_link, layout.dp, stage_bytes) +
                                                  (ep > 1 ? all_gather_seconds(edp_link, layout.dp / ep, expert_bytes) : 0)
                                            : 0;
      // A reduce-scatter costs what an all-gather does.
      const double reduce = all_gather_seconds(dp_link, layout.dp, zero_reduce_scale * stage_bytes) +
                            (ep > 1 ? all_gather_seconds(edp_link, layout.dp / ep, zero_reduce_scale * expert_bytes)
                                    : 0);
      cost.zero_forward = exposed(gather, cost.forward, machine.dp_overlap, units);
      cost.zero_backward = exposed(gather + reduce, cost.backward, machine.dp_overlap, units);
    }
  }

  StepTime t;
  // Each pipeline rank's compute and tp time over the step's micro-batches.
  std::vector<double> rank_compute(p, 0), rank_tp(p, 0), rank_zero(p, 0), rank_cp(p, 0), rank_ep(p, 0);
  for (int64_t stage = 0; stage < model_stages; ++stage) {
    rank_ep[stage % p] += static_cast<double>(micro_batches) * (stages[stage].ep_forward + stages[stage].ep_backward);
    rank_cp[stage % p] += static_cast<double>(micro_batches) * (stages[stage].cp_forward + stages[stage].cp_backward);
    rank_compute[stage % p] += static_cast<double>(micro_batches) * (stages[stage].forward + stages[stage].backward);
    rank_tp[stage % p] += static_cast<double>(micro_batches) * (stages[stage].tp_forward + stages[stage].tp_backward);
    rank_zero[stage % p] += static_cast<double>(micro_batches) * (stages[stage].zero_forward + stages[stage].zero_backward);
  }
  const int64_t slowest = std::max_element(rank_compute.begin(), rank_compute.end()) - rank_compute.begin();
  t.compute = rank_compute[slowest];
  t.tp_comm = rank_tp[slowest];
  t.zero_comm = rank_zero[slowest];
  t.cp_comm = rank_cp[slowest];
  t.ep_comm = rank_ep[slowest];
  if (p > 1) {
    const PipeSchedule schedule = make_pipe_schedule(layout.schedule, p, micro_batches, v);
    PipeStageTimes times;
    for (const StageCost& cost : stages) {
      times.forward.push_back(cost.forward + cost.tp_forward + cost.zero_forward + cost.cp_forward + cost.ep_forward);
      times.backward.push_back(cost.backward + cost.tp_backward + cost.zero_backward + cost.cp_backward +
                               cost.ep_backward);
    }
    const LinkProfile& pp_link = link_of(problem, machine, tp * layout.cp, p);
    times.transfer = pp_link.latency_s + act * n / (sp ? tp : 1) * h / pp_link.bytes_per_s;
    const PipeSimulation simulation = simulate_pipe_schedule(schedule, times);
    t.pipeline = simulation.makespan;
  } else {
    t.pipeline = t.compute + t.tp_comm + t.zero_comm + t.cp_comm + t.ep_comm;
  }
  t.bubble = std::max(0.0, t.pipeline - t.compute - t.tp_comm - t.zero_comm - t.cp_comm - t.ep_comm);

  // Data parallelism and the optimizer, on the rank with the most parameters.
  const MemoryEstimate memory = estimate_memory(problem, layout);
  int64_t most = 0;
  for (const RankMemory& rank : memory.ranks) most = std::max(most, rank.parameters);
  const double grad_bytes = param_bytes * static_cast<double>(most);
  // The rank's experts (num_experts / ep of each sparse layer, its share of
  // the layers): under ep they reduce over the dp / ep ranks that hold them
  // (and ZeRO shards them over those), the rest over dp.
  const int64_t edp = std::max<int64_t>(1, layout.dp / ep);
  const double expert_elements = ep > 1 ? static_cast<double>(sparse_layers_of(m, StageSpec{})) /
                                              static_cast<double>(p) * static_cast<double>(m.num_experts / ep) * 3 *
                                              h * static_cast<double>(m.expert_intermediate_size() / tp)
                                        : 0;
  const double expert_bytes = param_bytes * expert_elements;
  double state_elements = static_cast<double>(most);
  const double dense_padded =
      std::ceil((static_cast<double>(most) - expert_elements) / static_cast<double>(layout.dp)) * layout.dp;
  const double expert_padded = std::ceil(expert_elements / static_cast<double>(edp)) * static_cast<double>(edp);
  const double padded = dense_padded + expert_padded;
  if (zero_stage >= 1) {
    state_elements = dense_padded / static_cast<double>(layout.dp) + expert_padded / static_cast<double>(edp);
  }
  // An all-gather (or a reduce-scatter) of the flat vectors: the dense one over dp, the experts' over edp.
  const double zero_collective = all_gather_seconds(dp_link, layout.dp, param_bytes * dense_padded) +
                                 (ep > 1 ? all_gather_seconds(edp_link, edp, param_bytes * expert_padded) : 0);
  if (zero_stage == 1) {
    // Reduce-scatter of the flat gradient, all-gather of the flat parameters,
    // and the copies into and out of the flat vectors.
    t.dp_comm = (1 + zero_reduce_scale) * zero_collective;
    t.optimizer += 20 * padded / machine.stream_bytes_per_s;
  } else if (zero_stage == 2) {
    // The gradients were reduce-scattered in backward (StageCost); the
    // updated shards are all-gathered into the whole parameters after the step.
    t.dp_comm = zero_collective;
  } else if (zero_stage == 3) {
    // Parameters stay sharded: nothing to gather after the step.
  } else if (replicas > 1) {
    const double buckets = std::max(1.0, std::ceil(grad_bytes / (problem.bucket_mb * 1024 * 1024)));
    double reduce = all_reduce_seconds(dp_link, replicas, grad_bytes) +
                    (buckets - 1) * 2 * static_cast<double>(replicas - 1) * dp_link.latency_s;
    if (ep > 1) {
      reduce = all_reduce_seconds(dp_link, replicas, grad_bytes - expert_bytes) +
               all_reduce_seconds(edp_link, layout.dp / ep, expert_bytes) +
               (buckets - 1) * 2 * static_cast<double>(replicas - 1) * dp_link.latency_s;
    }
    // Each bucket's copy into its flat buffer and back.
    t.optimizer += 16 * static_cast<double>(most) / machine.stream_bytes_per_s;
    if (p == 1) {
      // Buckets start while the last micro-batch's backward runs; the last
      // one to fill (the embedding's) only after it.
      const double hidden = machine.dp_overlap * stages[0].backward;
      t.dp_comm = std::max(reduce - hidden, reduce / buckets);
    } else {
      t.dp_comm = reduce;
    }
  }
  // Tensors the optimizer loops over: about ten per layer on the rank.
  double tensors = 10.0 * static_cast<double>(m.num_layers) / static_cast<double>(p) + 3;
  if (m.moe()) {
    // A sparse layer's router and three tensors an expert (qwen2_moe: a shared expert and its gate) for a dense MLP's three.
    const double block = 1 + 3 * static_cast<double>(m.num_experts / ep) + (m.architecture == "qwen2_moe" ? 4 : 0) - 3;
    tensors += block * static_cast<double>(sparse_layers_of(m, StageSpec{})) / static_cast<double>(p);
  }
  t.optimizer +=
      kOptimizerBytesPerElement * state_elements / machine.stream_bytes_per_s + kOptimizerOpsPerTensor * tensors * op;
  // The tied embedding's gradient summed over the pipeline, and the step's
  // small all-reduces (loss, gradient norm, stop agreement) over the world.
  if (m.tie_embeddings && model_stages > 1) {
    t.dp_comm += all_reduce_seconds(link_of(problem, machine, tp * layout.cp, p), p, 4 * vocab * h);
  }
  const LinkProfile& world_link = link_of(problem, machine, 1, layout.world());
  t.dp_comm += 4 * all_reduce_seconds(world_link, layout.world(), 8);

  t.total = t.pipeline + t.dp_comm + t.optimizer;
  const double tokens = static_cast<double>(problem.global_batch * problem.seq_len);
  t.tokens_per_s = tokens / t.total;
  t.mfu = t.tokens_per_s * flops_per_token(m, problem.seq_len) /
          (machine.peak_flops(bf16) * static_cast<double>(layout.world()));
  return t;
}

}  // namespace loom::plan

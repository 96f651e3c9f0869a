#include "plan/memory_model.h"

#include <algorithm>

#include "parallel/pipeline.h"
#include "parallel/pipeline_schedule.h"
#include "plan/moe_model.h"
#include "plan/ring_model.h"

namespace loom::plan {

namespace {

constexpr double kFp32 = 4, kBf16 = 2, kInt64 = 8;

// One model stage's parameters on one tp rank (and, with expert
// parallelism, one of `ep` ranks sharing the experts).
ParameterCount stage_parameters(const ModelConfig& m, int64_t tp, const StageSpec& stage, bool split_model,
                                int64_t ep = 1) {
  ParameterCount count;
  const int64_t h = m.hidden_size, d = m.head_size();
  const int64_t q = m.num_heads * d / tp, kv = m.kv_heads() * d / tp, inter = m.intermediate_size / tp;
  const int64_t vocab_rows = m.vocab_size / tp;
  auto add = [&](int64_t elements, bool linear_weight) {
    count.total += elements;
    if (linear_weight) count.linear_weights += elements;
    count.largest = std::max(count.largest, elements);
  };
  if (stage.has_embedding) add(vocab_rows * h, false);
  // StageSpec's -1: through the last layer.
  const int64_t layers = stage.num_layers < 0 ? m.num_layers - stage.first_layer : stage.num_layers;
  for (int64_t layer = 0; layer < layers; ++layer) {
    // Column-parallel q, k, v, gate, up: rows (and biases) split; row-parallel
    // o and down: columns split, biases whole; the two norms whole.
    add(q * h, true);
    add(kv * h, true);
    add(kv * h, true);
    add(h * q, true);
    if (m.sparse_layer(stage.first_layer + layer)) {
      // Note [mixture of experts] (model/moe.h): the router and qwen2_moe's
      // shared-expert gate replicated, the rank's experts (num_experts / ep)
      // and the shared expert cut like an MLP; no biases.
      const int64_t expert = m.expert_intermediate_size() / tp, shared = m.shared_expert_intermediate_size / tp;
      add(m.num_experts * h, true);
      for (int64_t e = 0; e < m.num_experts / ep; ++e) {
        add(expert * h, true);
        add(expert * h, true);
        add(h * expert, true);
        count.experts += 3 * expert * h;
      }
      if (m.architecture == "qwen2_moe") {
        add(shared * h, true);
        add(shared * h, true);
        add(h * shared, true);
        add(h, true);
      }
    } else {
      add(inter * h, true);
      add(inter * h, true);
      add(h * inter, true);
    }
    if (m.qkv_bias()) add(q + 2 * kv, false);
    if (m.o_bias()) add(h, false);
    if (m.mlp_bias && !m.sparse_layer(stage.first_layer + layer)) add(2 * inter + h, false);
    add(2 * h, false);
  }
  if (stage.has_head) {
    add(h, false);  // model.norm
    if (!m.tie_embeddings) {
      add(vocab_rows * h, true);  // lm_head.weight
    } else if (!stage.has_embedding && split_model) {
      add(vocab_rows * h, false);  // the last stage's copy of the tied embedding
    }
    // (Tied, on the stage that has the embedding: the head multiplies by it.)
    if (m.tie_embeddings) count.linear_weights += vocab_rows * h;  // the head casts it too
  }
  return count;
}

// Per token, for one tp rank (docs/plan.md, "Activations"): what autograd
// saves in a decoder layer of loom's model, measured by listing the saved
// tensors of the same ops. fp32: the layer's input, the first norm's
// normalized value and output, rotated q and k, v, the attention output and
// its log-sum-exp per head, the residual, the second norm's two, gate,
// silu(gate), up and their product. bf16 autocast: the norms keep fp32
// copies of their input and normalized value, the rest is bf16.
double layer_bytes_per_token(const ModelConfig& m, int64_t tp, bool sp, bool bf16) {
  const double h = static_cast<double>(m.hidden_size), d = static_cast<double>(m.head_size());
  const double q = m.num_heads * d / tp, kv = m.kv_heads() * d / tp, inter = static_cast<double>(m.intermediate_size) / tp;
  const double heads = static_cast<double>(m.num_heads) / tp;
  // Under sequence parallelism the residual stream and the norms hold a
  // slice of the tokens; the gathered inputs of the column-parallel
  // projections are whole.
  const double h_residual = sp ? h / tp : h;
  if (!bf16) {
    // input, normed1, residual, normed2 on the residual stream; the two
    // norm outputs the projections read; the two rsqrt of each token.
    return kFp32 * (4 * h_residual + 2 * h + 2 * q + 2 * kv + 4 * inter + heads + 2);
  }
  return kBf16 * h_residual /* input */ + 2 * (2 * kFp32 * h_residual) /* two norms' fp32 copies */ +
         kBf16 * 2 * h /* norm outputs */ + kBf16 * (2 * q + 2 * kv + 4 * inter) + kFp32 * (heads + 2);
}

double dtype_bytes(bool bf16) { return bf16 ? kBf16 : kFp32; }

// Short-lived tensors of the loss on the last stage, and of one layer's
// backward, for one micro-batch of `tokens` tokens on one tp rank.
struct Transients {
  double head_forward = 0;   // logits (and their fp32 copy under bf16) beside the cross-entropy's saved values
  double head_backward = 0;  // the cross-entropy's and the head's gradients
  // The same without the head's weight gradient: under ZeRO-2 and 3 it is
  // counted among the gradients in flight (RankMemory::zero_in_flight).
  double head_backward_no_weight = 0;
  double layer_backward = 0; // the MLP's gradients and one weight gradient
};

Transients transients_of(const ModelConfig& m, int64_t tokens, int64_t tp, bool bf16) {
  const double n = static_cast<double>(tokens), h = static_cast<double>(m.hidden_size);
  const double vocab = static_cast<double>(m.vocab_size) / tp, inter = static_cast<double>(m.intermediate_size) / tp;
  const double act = dtype_bytes(bf16);
  Transients t;
  t.head_forward = act * n * vocab + (bf16 ? kFp32 * n * vocab : 0);
  // Without tp: log_softmax's gradient beside nll_loss's; with tp the
  // vocabulary-parallel cross-entropy makes one. Then the head's weight and
  // input gradients beside the logits' gradient.
  const double cross_entropy = (tp > 1 ? 1 : 2) * kFp32 * n * vocab + (bf16 ? kBf16 * n * vocab : 0);
  t.head_backward = std::max(cross_entropy, act * n * vocab + kFp32 * vocab * h + kFp32 * n * h);
  t.head_backward_no_weight = std::max(cross_entropy, act * n * vocab + kFp32 * n * h);
  // The MLP's backward: the gradients of silu(gate) and up beside those of
  // the product (each saved input is released once its node has run), and
  // one weight gradient.
  t.layer_backward = 2 * act * n * inter + kFp32 * h * inter;
  return t;
}

}  // namespace

ParameterCount count_rank_parameters(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages,
                                     bool split_model, int64_t ep) {
  ParameterCount total;
  for (const StageSpec& stage : stages) {
    const ParameterCount count = stage_parameters(model, tp, stage, split_model, ep);
    total.total += count.total;
    total.experts += count.experts;
    total.linear_weights += count.linear_weights;
    total.largest = std::max(total.largest, count.largest);
  }
  return total;
}

double attention_core_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool /*bf16: the log-sum-exp is fp32*/) {
  // SDPA's fused kernels (flash on a GPU, flash-for-CPU) save q, k and v,
  // which the recomputation keeps as its inputs, their output, which is
  // o_proj's input (the output is laid out [batch, tokens, heads, head_dim]
  // like q, so the reshape for o_proj is a view) and stays saved there, and
  // an fp32 log-sum-exp per head and token: only that is the core's own.
  const double n = static_cast<double>(tokens);
  const double heads = static_cast<double>(model.num_heads) / static_cast<double>(tp);
  return n * kFp32 * heads;
}

double layer_activation_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool sequence_parallel, bool bf16,
                              Recompute recompute) {
  const double n = static_cast<double>(tokens);
  if (recompute == Recompute::kFull) {
    const double h = static_cast<double>(model.hidden_size) / (sequence_parallel ? tp : 1);
    return dtype_bytes(bf16) * n * h;
  }
  const double all = n * layer_bytes_per_token(model, tp, sequence_parallel, bf16);
  return recompute == Recompute::kSelective ? all - attention_core_bytes(model, tokens, tp, bf16) : all;
}

double sparse_layer_activation_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool sequence_parallel,
                                     bool bf16, Recompute recompute) {
  const double dense = layer_activation_bytes(model, tokens, tp, sequence_parallel, bf16, recompute);
  if (recompute == Recompute::kFull) return dense;  // the layer's input, as a dense layer's
  // A dense layer's MLP keeps gate, silu(gate), up and their product of
  // intermediate_size per token; a sparse one its block's tensors instead.
  const double n = static_cast<double>(tokens);
  const double mlp = dtype_bytes(bf16) * 4 * static_cast<double>(model.intermediate_size) / static_cast<double>(tp);
  return dense + n * (sparse_block_saved_bytes_per_token(model, tp, bf16) - mlp);
}

namespace {

// Elements of the units ZeRO-2 and 3 work in on a rank holding `stages`
// (Note [ZeRO units] in parallel/zero.h).
struct UnitSizes {
  int64_t largest_layer = 0;  // a decoder layer
  int64_t ends = 0;           // every unit of no layer: the embedding, the final norm and head
  int64_t largest_end = 0;    // the largest of those
  int64_t head = 0;           // the final norm and head (0 on a rank without them)
};

UnitSizes unit_sizes(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages, bool split_model) {
  UnitSizes sizes;
  for (const StageSpec& stage : stages) {
    const int64_t layers = stage.num_layers < 0 ? model.num_layers - stage.first_layer : stage.num_layers;
    if (layers > 0) {
      StageSpec bare = stage;
      bare.has_embedding = bare.has_head = false;
      sizes.largest_layer = std::max(sizes.largest_layer, stage_parameters(model, tp, bare, split_model).total / layers);
    }
    for (const bool embedding : {true, false}) {
      StageSpec end{};
      end.num_layers = 0;
      end.has_embedding = embedding && stage.has_embedding;
      end.has_head = !embedding && stage.has_head;
      const int64_t count = stage_parameters(model, tp, end, split_model).total;
      sizes.ends += count;
      sizes.largest_end = std::max(sizes.largest_end, count);
      if (!embedding) sizes.head += count;
    }
  }
  return sizes;
}

}  // namespace

int64_t largest_unit_parameters(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages,
                                bool split_model) {
  const UnitSizes sizes = unit_sizes(model, tp, stages, split_model);
  return std::max(sizes.largest_layer, sizes.largest_end);
}

MemoryEstimate estimate_memory(const Problem& problem, const Layout& layout) {
  const ModelConfig& m = problem.model;
  const int64_t tp = layout.tp, p = layout.pp, v = layout.pp > 1 ? layout.virtual_stages : 1;
  const int64_t model_stages = p * v;
  // A cp rank holds seq_len / cp tokens of each sequence: everything but
  // attention is per token (Note [ring attention costs] in plan/ring_model.h).
  const int64_t tokens = layout.micro_batch * layout.rank_seq_len(problem);
  const int64_t micro_batches = layout.micro_batches(problem);
  const bool sp = layout.sequence_parallel && tp > 1;
  // ZeRO needs dp > 1; each stage keeps the one below's sharding.
  const int64_t zero_stage = layout.dp > 1 ? layout.zero_stage : 0;
  const bool zero = zero_stage >= 1;
  const bool bf16 = problem.bf16;
  // precision.params bf16: weights and gradients in bf16 on the device, an
  // fp32 master copy beside the moments in the optimizer.
  const double param_bytes = problem.params_bf16 ? kBf16 : kFp32;
  const double optimizer_bytes = problem.params_bf16 ? 3 * kFp32 : 2 * kFp32;
  const double act = dtype_bytes(bf16);
  const double h = static_cast<double>(m.hidden_size), vocab = static_cast<double>(m.vocab_size) / tp;
  // One activation crossing a stage boundary, [batch, tokens (/ tp with sp), hidden].
  const double boundary = act * static_cast<double>(tokens) / (sp ? tp : 1) * h;
  // The token ids of one micro-batch: [batch, seq + 1] int64 (inputs and
  // targets are views of it); a cp rank reads whole rows and copies its
  // share of the inputs and of the targets (cp_share in trainer/forward_backward.cpp).
  double ids = kInt64 * static_cast<double>(layout.micro_batch) * static_cast<double>(problem.seq_len + 1);
  if (layout.cp > 1) ids += 2 * kInt64 * static_cast<double>(tokens);
  const Transients t = transients_of(m, tokens, tp, bf16);
  const bool moe = m.moe();
  // What a layer's ring attention allocates while it runs (none at cp 1); in
  // backward it comes after the MLP's gradients, the larger of the two counts.
  const RingMemory ring = ring_attention_memory(m, {layout.cp, layout.micro_batch, problem.seq_len, tp, bf16});
  double layer_backward = layout.cp > 1 ? std::max(t.layer_backward, ring.backward) : t.layer_backward;
  if (moe) layer_backward = std::max(layer_backward, sparse_block_backward_bytes(m, tokens, tp, bf16));
  const double per_layer = layer_activation_bytes(m, tokens, tp, sp, bf16, layout.recompute);
  const double full_layer = layer_activation_bytes(m, tokens, tp, sp, bf16, Recompute::kNone);
  // A mixture of experts' sparse layers (Note [plan: mixture of experts]).
  const double per_sparse_layer = moe ? sparse_layer_activation_bytes(m, tokens, tp, sp, bf16, layout.recompute) : 0;
  const double full_sparse_layer = moe ? sparse_layer_activation_bytes(m, tokens, tp, sp, bf16, Recompute::kNone) : 0;
  // What one micro-batch saves in the decoder layers of a model stage.
  const auto layers_saved = [&](const StageSpec& spec) {
    const int64_t sparse = moe ? sparse_layers_of(m, spec) : 0;
    return static_cast<double>(spec.num_layers - sparse) * per_layer + static_cast<double>(sparse) * per_sparse_layer;
  };
  // What a layer's backward rebuilds before it runs: the whole layer, or its attention core.
  double rebuilt = 0;
  if (layout.recompute == Recompute::kFull) rebuilt = std::max(full_layer, full_sparse_layer);
  if (layout.recompute == Recompute::kSelective) {
    // The core's output and log-sum-exp, made again just before its backward.
    const double q = static_cast<double>(m.num_heads * m.head_size()) / static_cast<double>(tp);
    rebuilt = static_cast<double>(tokens) * act * q + attention_core_bytes(m, tokens, tp, bf16);
  }
  const double n = static_cast<double>(tokens);
  // What the last stage keeps of the loss: the final norm (as a norm of a
  // layer) and the cross-entropy's softmax or log-softmax over its vocabulary.
  const double head_saved = (bf16 ? (2 * kFp32 + kBf16) * n * h : 3 * kFp32 * n * h) + kFp32 * n * vocab;
  // With a pipeline the schedule of each rank; without, micro-batches one after another.
  PipeSchedule schedule;
  if (p > 1) {
    schedule = make_pipe_schedule(layout.schedule, p, micro_batches, v);
  } else {
    schedule.kind = "sequential";
    schedule.ranks.resize(1);
    for (int64_t mb = 0; mb < micro_batches; ++mb) {
      schedule.ranks[0].push_back({PipeOp::kForward, mb, 0});
      schedule.ranks[0].push_back({PipeOp::kBackward, mb, 0});
    }
  }

  MemoryEstimate estimate;
  for (int64_t r = 0; r < p; ++r) {
    RankMemory rank;
    rank.pp_rank = r;
    std::vector<StageSpec> specs;
    for (int64_t c = 0; c < v; ++c) specs.push_back(pipeline_stage_spec(m.num_layers, model_stages, c * p + r));
    const ParameterCount params = count_rank_parameters(m, tp, specs, model_stages > 1, layout.ep);
    const double elements = static_cast<double>(params.total);
    rank.parameters = params.total;
    // Note [ZeRO-1 layout] (parallel/zero.h): the flat vector is padded to a
    // multiple of dp. Under ep the experts have a flat vector of their own,
    // sharded over the dp / ep ranks that hold them (Note [ZeRO with expert
    // parallelism] in trainer/update.h).
    const int64_t experts = layout.ep > 1 ? params.experts : 0, edp = std::max<int64_t>(1, layout.dp / layout.ep);
    const auto shard_of = [](int64_t numel, int64_t ranks) { return static_cast<double>((numel + ranks - 1) / ranks); };
    const double dense_shard = shard_of(params.total - experts, layout.dp), expert_shard = shard_of(experts, edp);
    const double shard = zero ? dense_shard + expert_shard : elements;
    // ZeRO-1's largest flat vector (the dense one's, or the experts').
    const double padded = std::max(dense_shard * static_cast<double>(layout.dp), expert_shard * static_cast<double>(edp));
    const double unit = static_cast<double>(largest_unit_parameters(m, tp, specs, model_stages > 1));
    // Note [ZeRO units]: a decoder layer's unit, and the units of no layer
    // (the embedding; the final norm and head), which ZeRO-3 keeps gathered.
    const UnitSizes units = unit_sizes(m, tp, specs, model_stages > 1);
    const double layer_unit = static_cast<double>(units.largest_layer);
    const double ends = static_cast<double>(units.ends);
    // ZeRO-3 holds its shard of the parameters and the units of no layer
    // whole; ZeRO-2 and 3 an fp32 shard of the gradient (what the optimizer
    // reads).
    rank.params = param_bytes * (zero_stage == 3 ? shard + ends : elements);
    // bf16 parameters with precision.grad_accum fp32 sum their gradients in
    // fp32 beside the masters; each bf16 .grad lives only until it is added.
    const double grad_bytes = problem.params_bf16 && problem.grad_accum_fp32 ? kFp32 : param_bytes;
    rank.grads = zero_stage >= 2 ? kFp32 * shard : grad_bytes * elements;
    rank.optimizer = optimizer_bytes * shard;
    // ZeRO-1 and 2 keep an fp32 shard of the parameters (the pieces AdamW
    // steps), ZeRO-1 also the shard of the gradient (ZeRO-2 counts it above).
    // With bf16 parameters that fp32 shard holds the masters (counted with
    // the optimizer) and a bf16 copy of it is what the all-gathers send
    // (Note [ZeRO with bf16 parameters]); under ZeRO-3 that copy is the
    // shard of the parameters counted above.
    const double shard_copy = problem.params_bf16 ? kBf16 : kFp32;
    if (zero_stage == 1) rank.zero_buffers = (kFp32 + shard_copy) * shard;
    if (zero_stage == 2) rank.zero_buffers = shard_copy * shard;
    // During forward and backward. ZeRO-2: a unit's gradients and the flat
    // buffer they are copied into for the reduce-scatter (the buffer of the
    // unit before may still be in flight, but the largest unit comes alone).
    // ZeRO-3: two gathered layers (the one computing and the prefetched),
    // the gradients of the layer whose backward just ran with their flat
    // buffer and this rank's part of the reduction, and the head's
    // gradients, reduced only after the last backward (the embedding's come
    // last, with the layers' gone: the step's phase below).
    if (zero_stage == 2) rank.zero_in_flight = param_bytes * 2 * unit;
    if (zero_stage == 3) {
      const double head = static_cast<double>(units.head);
      rank.zero_in_flight = param_bytes * (4 * layer_unit + layer_unit / static_cast<double>(layout.dp) + head);
    }
    // bf16 compute over fp32 parameters on one rank: ComputeWeights keeps one
    // bf16 cast of every weight; on several, autocast casts per forward and
    // the graph keeps the casts until that micro-batch's backward. bf16
    // parameters need no cast.
    const bool casts = bf16 && !problem.params_bf16;
    const bool cached_casts = casts && layout.world() == 1;
    rank.weight_cache = cached_casts ? kBf16 * static_cast<double>(params.linear_weights) : 0;
    const double fixed = rank.params + rank.grads + rank.optimizer + rank.zero_buffers + rank.weight_cache;
    double in_flight = rank.zero_in_flight;

    // Per chunk: saved activations of one micro-batch, and its weight casts.
    std::vector<double> chunk_saved(v, 0), chunk_casts(v, 0);
    for (int64_t c = 0; c < v; ++c) {
      chunk_saved[c] = layers_saved(specs[c]) + (specs[c].has_head ? head_saved : 0);
      if (casts && !cached_casts) {
        chunk_casts[c] =
            kBf16 * static_cast<double>(count_rank_parameters(m, tp, {specs[c]}, model_stages > 1, layout.ep).linear_weights);
      }
    }
    // Walk this rank's actions in order (Note [pipeline executor] in
    // parallel/pipeline.h): what is alive after each, and each action's own
    // short-lived tensors.
    double saved = 0, kept = p > 1 ? ids * static_cast<double>(micro_batches) : ids;
    auto consider = [&](double transient, const std::string& phase) {
      const double total = fixed + in_flight + saved + kept + transient;
      if (total > rank.peak) {
        rank.peak = total;
        rank.activations = saved;
        rank.pipeline_buffers = kept;
        rank.transient = transient;
        rank.peak_phase = phase;
      }
    };
    for (const PipeAction& a : schedule.ranks[r]) {
      const int64_t stage = a.chunk * p + r;
      const StageSpec& spec = specs[a.chunk];
      const std::string which = " of micro-batch " + std::to_string(a.micro_batch) +
                                (v > 1 ? " chunk " + std::to_string(a.chunk) : "");
      switch (a.op) {
        case PipeOp::kRecvForward:
          kept += boundary;  // the received input, kept with its gradient until the step ends
          break;
        case PipeOp::kForward:
          if (layout.cp > 1) {
            // The chunk's last layer walks its ring with the layers before it
            // saved (counted as all of them), before the loss.
            saved += layers_saved(spec) + chunk_casts[a.chunk];
            consider(ring.forward, "ring attention forward" + which);
            if (spec.has_head) saved += head_saved;
          } else {
            saved += chunk_saved[a.chunk] + chunk_casts[a.chunk];
          }
          consider(spec.has_head ? t.head_forward : 0, "forward" + which);
          if (stage < model_stages - 1) kept += boundary;  // the output, held by its send until the step ends
          break;
        case PipeOp::kSendForward:
        case PipeOp::kSendBackward:
          break;
        case PipeOp::kRecvBackward:
          kept += boundary;  // the output's gradient, until this backward is done
          break;
        case PipeOp::kBackward: {
          // Backward starts at the loss, with everything saved; by the
          // time the last layer's backward runs the head's saved values
          // are gone, and with recomputation that layer is rebuilt.
          if (spec.has_head) {
            consider(zero_stage >= 2 ? t.head_backward_no_weight : t.head_backward, "backward of the loss" + which);
            saved -= head_saved;
          }
          consider(rebuilt + layer_backward, "backward of a layer" + which);
          if (spec.has_head) saved += head_saved;
          saved -= chunk_saved[a.chunk] + chunk_casts[a.chunk];
          if (stage < model_stages - 1) kept -= boundary;
          if (stage > 0) kept += boundary;  // the input's gradient, sent back and kept
          break;
        }
      }
    }
    // After the micro-batches (their activations and buffers freed): the
    // gradient reduction and the optimizer step.
    saved = 0;
    kept = 0;
    in_flight = 0;
    const double largest_in_shard = std::min<double>(static_cast<double>(params.largest), shard);
    if (zero_stage == 1) {
      // One unit (under ep one of the dense parameters and one of the
      // experts, in turn): the whole flat gradient, and later the whole flat
      // parameters gathered, each for its moment.
      consider(param_bytes * padded, "ZeRO-1 gradient reduce-scatter");
      consider(2 * kFp32 * largest_in_shard, "ZeRO-1 optimizer step");
      consider(kFp32 * padded, "ZeRO-1 all-gather");
    } else if (zero_stage == 2) {
      // The step over the shard, then the updated shard all-gathered into
      // the whole parameters a unit at a time, two units' buffers at once.
      consider(2 * kFp32 * largest_in_shard, "ZeRO-2 optimizer step");
      consider(2 * kFp32 * unit, "ZeRO-2 all-gather");
    } else if (zero_stage == 3) {
      // The units of no layer: their gradients, flattened and reduced.
      consider(param_bytes * (ends + units.largest_end), "ZeRO-3 reduce-scatter of the embedding and head");
      consider(2 * kFp32 * largest_in_shard, "ZeRO-3 optimizer step");
    } else {
      // The gradients are averaged over the dp x cp replicas (Note [cp replicas]).
      if (layout.dp * layout.cp > 1) consider(param_bytes * elements, "data-parallel gradient buckets");
      // AdamW's step: sqrt(exp_avg_sq) and its quotient for the largest parameter.
      consider(2 * kFp32 * static_cast<double>(params.largest), "optimizer step");
    }
    if (rank.peak > estimate.peak) {
      estimate.peak = rank.peak;
      estimate.peak_pp_rank = r;
    }
    estimate.ranks.push_back(rank);
  }
  return estimate;
}

}  // namespace loom::plan

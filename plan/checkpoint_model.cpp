#include "plan/checkpoint_model.h"

#include <algorithm>
#include <cmath>

#include "parallel/pipeline.h"
#include "model/moe.h"
#include "parallel/zero.h"
#include "trainer/run_checkpoints.h"

namespace loom::plan {

namespace {

constexpr int64_t kFp32 = 4;
// read_into's chunks (docs/checkpoints.md: "A rank holds no more than its
// own tensors and 16 MiB of chunks").
constexpr double kReadChunkBytes = 16.0 * 1024 * 1024;

// One model stage's parameters on one tp rank, as LlamaForCausalLM
// registers them (model/llama.cpp): the embedding, each layer's attention
// (q, k, v, o with their biases), MLP (gate, up, down) and two norms, the
// final norm, then the last stage's copy of a tied embedding or the head.
// Under expert parallelism the experts of ep rank 0 (the first
// num_experts / ep: every ep rank's list has the same sizes).
void add_stage(const ModelConfig& m, int64_t tp, const StageSpec& stage, bool split_model, int64_t ep,
               std::vector<RankParameter>& out) {
  const int64_t h = m.hidden_size, d = m.head_size();
  const int64_t q = m.num_heads * d / tp, kv = m.kv_heads() * d / tp, inter = m.intermediate_size / tp;
  const int64_t vocab_rows = m.vocab_size / tp;
  // At tp 1 no layer is a tensor-parallel one: every parameter is "whole".
  const auto add = [&](const std::string& name, int64_t elements, bool sharded) {
    out.push_back({name, elements, tp == 1 || !sharded});
  };
  if (stage.has_embedding) add("model.embed_tokens.weight", vocab_rows * h, true);
  const int64_t layers = stage.num_layers < 0 ? m.num_layers - stage.first_layer : stage.num_layers;
  for (int64_t i = 0; i < layers; ++i) {
    const std::string layer = "model.layers." + std::to_string(stage.first_layer + i) + ".";
    const auto linear = [&](const std::string& name, int64_t weight, bool bias, int64_t bias_elements, bool column) {
      add(layer + name + ".weight", weight, true);
      // Column-parallel biases are split with the rows; row-parallel ones are whole.
      if (bias) add(layer + name + ".bias", bias_elements, column);
    };
    linear("self_attn.q_proj", q * h, m.qkv_bias(), q, true);
    linear("self_attn.k_proj", kv * h, m.qkv_bias(), kv, true);
    linear("self_attn.v_proj", kv * h, m.qkv_bias(), kv, true);
    linear("self_attn.o_proj", h * q, m.o_bias(), h, false);
    if (m.sparse_layer(stage.first_layer + i)) {
      // Note [mixture of experts] (model/moe.h): the router, every expert
      // under its family's names, qwen2_moe's shared expert and its gate.
      const std::string block = std::string(m.feed_forward_name()) + ".";
      const bool mixtral = m.architecture == "mixtral";
      const int64_t expert = m.expert_intermediate_size() / tp;
      add(layer + block + "gate.weight", m.num_experts * h, false);
      for (int64_t e = 0; e < m.num_experts / ep; ++e) {
        const std::string name = block + "experts." + std::to_string(e) + ".";
        linear(name + (mixtral ? "w1" : "gate_proj"), expert * h, false, 0, true);
        linear(name + (mixtral ? "w3" : "up_proj"), expert * h, false, 0, true);
        linear(name + (mixtral ? "w2" : "down_proj"), h * expert, false, 0, false);
      }
      if (m.architecture == "qwen2_moe") {
        const int64_t shared = m.shared_expert_intermediate_size / tp;
        linear(block + "shared_expert.gate_proj", shared * h, false, 0, true);
        linear(block + "shared_expert.up_proj", shared * h, false, 0, true);
        linear(block + "shared_expert.down_proj", h * shared, false, 0, false);
        add(layer + block + "shared_expert_gate.weight", h, false);
      }
    } else {
      linear("mlp.gate_proj", inter * h, m.mlp_bias, inter, true);
      linear("mlp.up_proj", inter * h, m.mlp_bias, inter, true);
      linear("mlp.down_proj", h * inter, m.mlp_bias, h, false);
    }
    add(layer + "input_layernorm.weight", h, false);
    add(layer + "post_attention_layernorm.weight", h, false);
  }
  if (stage.has_head) {
    add("model.norm.weight", h, false);
    if (m.tie_embeddings && !stage.has_embedding && split_model) add("model.embed_tokens.weight", vocab_rows * h, true);
    if (!m.tie_embeddings) add("lm_head.weight", vocab_rows * h, true);
  }
}

// The writer of each piece, as RunCheckpoints::snapshot assigns them, for
// every rank of one pipeline stage: the bytes each (replica, tp) slot
// writes, a replica being one of the dp x cp ranks (dp * cp + cp), which
// hold the same parameters (Note [cp replicas]) and over which ZeRO shards.
std::vector<int64_t> stage_slot_bytes(const Problem& problem, const Layout& layout, int64_t pp_rank) {
  const int64_t dp = layout.dp * layout.cp, tp = layout.tp;
  const std::vector<StageSpec> stages = rank_stages(problem.model, layout, pp_rank);
  const std::vector<RankParameter> params =
      rank_parameters(problem.model, tp, stages, stages.size() > 1 || layout.pp > 1, layout.ep);
  // Note [who writes a piece]: the last stage's copy of a tied embedding is
  // not written (pp rank 0 holds the embedding).
  const bool tied_copy = problem.model.tie_embeddings && pp_rank != 0;
  const auto is_copy = [&](const RankParameter& p) { return tied_copy && p.name == "model.embed_tokens.weight"; };
  const bool zero = layout.zero_stage >= 1 && dp > 1;
  // Under ep ZeRO shards an expert's state over the edp ranks that hold it,
  // and where that is one rank keeps it whole (Note [ZeRO with expert
  // parallelism] in trainer/update.h).
  const int64_t ep = layout.ep, edp = dp / ep;
  const auto is_expert = [&](const RankParameter& p) { return ep > 1 && is_expert_parameter(p.name); };
  const auto state_sharded = [&](const RankParameter& p) { return zero && (!is_expert(p) || edp > 1); };
  // The parameters, then AdamW's exp_avg and exp_avg_sq of each whose state
  // ZeRO does not shard, in state_dict order: replicated over dp (ZeRO-3
  // gathers its parameters for the save and writes them the same way).
  std::vector<int64_t> bytes;
  std::vector<bool> over_tp, expert;
  for (const RankParameter& p : params) {
    if (is_copy(p)) continue;
    bytes.push_back(kFp32 * p.elements);
    over_tp.push_back(p.whole_on_every_tp_rank);
    expert.push_back(is_expert(p));
  }
  for (const RankParameter& p : params) {
    if (is_copy(p) || state_sharded(p)) continue;
    for (int moment = 0; moment < 2; ++moment) {
      bytes.push_back(kFp32 * p.elements);
      over_tp.push_back(p.whole_on_every_tp_rank);
      expert.push_back(is_expert(p));
    }
  }
  std::vector<int64_t> load(static_cast<size_t>(dp * tp), 0);
  // Under expert parallelism an expert's pieces go to the dp ranks of its ep
  // rank; every ep rank's choices are simulated, so `load` has them all.
  assign_piece_writers(bytes, over_tp, dp, tp, /*only_dp=*/-1, /*my_tp=*/0, load,
                       {&expert, layout.ep, layout.cp, 0});
  if (!zero) return load;
  // Note [ZeRO units]: ZeRO-1 lays the rank's parameters (the tied copy
  // included) end to end as one unit, ZeRO-2 and 3 make a unit of each
  // decoder layer, of the embedding and of the rest; each unit is padded to
  // dp equal shards, and dp rank r's pieces are the parameters' overlaps
  // with its shard of every unit, each with its two moments. Under ep the
  // experts are laid out apart, in units of their own sharded over edp.
  const auto units_of = [&](bool experts) {
    std::vector<size_t> members;
    for (size_t i = 0; i < params.size(); ++i) {
      if (state_sharded(params[i]) && is_expert(params[i]) == experts) members.push_back(i);
    }
    std::vector<std::vector<size_t>> units;
    if (members.empty()) return units;
    if (layout.zero_stage >= 2) {
      NamedTensors names;  // zero_units_by_layer reads only the names
      for (size_t i : members) names.emplace_back(params[i].name, at::Tensor());
      units = zero_units_by_layer(names);
      for (std::vector<size_t>& unit : units) {
        for (size_t& k : unit) k = members[k];
      }
    } else {
      units.push_back(members);
    }
    return units;
  };
  const std::vector<std::vector<size_t>> dense_units = units_of(false), expert_units = units_of(true);
  for (int64_t r = 0; r < dp; ++r) {
    std::vector<int64_t> pieces;
    std::vector<bool> pieces_over_tp;
    // Replica r (dp rank r / cp) is edp rank (r / cp / ep) * cp + r % cp (Note [expert groups]).
    const int64_t edp_rank = r / layout.cp / ep * layout.cp + r % layout.cp;
    for (const bool experts : {false, true}) {
      const int64_t ranks = experts ? edp : dp, rank = experts ? edp_rank : r;
      for (const std::vector<size_t>& unit : experts ? expert_units : dense_units) {
        int64_t total = 0;
        for (size_t i : unit) total += params[i].elements;
        const int64_t shard = (total + ranks - 1) / ranks;
        const int64_t lo = rank * shard, hi = lo + shard;
        int64_t offset = 0;
        for (size_t i : unit) {
          const RankParameter& p = params[i];
          const int64_t begin = std::max(lo, offset), end = std::min(hi, offset + p.elements);
          offset += p.elements;
          if (begin >= end || is_copy(p)) continue;
          for (int moment = 0; moment < 2; ++moment) {
            pieces.push_back(kFp32 * (end - begin));
            pieces_over_tp.push_back(p.whole_on_every_tp_rank);
          }
        }
      }
    }
    assign_piece_writers(pieces, pieces_over_tp, dp, tp, /*only_dp=*/r, /*my_tp=*/0, load);
  }
  return load;
}

}  // namespace

std::vector<RankParameter> rank_parameters(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages,
                                           bool split_model, int64_t ep) {
  std::vector<RankParameter> out;
  for (const StageSpec& stage : stages) add_stage(model, tp, stage, split_model, ep, out);
  return out;
}

std::vector<StageSpec> rank_stages(const ModelConfig& model, const Layout& layout, int64_t pp_rank) {
  const int64_t v = layout.pp > 1 ? layout.virtual_stages : 1;
  std::vector<StageSpec> specs;
  for (int64_t c = 0; c < v; ++c) specs.push_back(pipeline_stage_spec(model.num_layers, layout.pp * v, c * layout.pp + pp_rank));
  return specs;
}

CheckpointEstimate estimate_checkpoint(const Problem& problem, const Layout& layout, double write_bytes_per_s,
                                       double read_bytes_per_s) {
  CheckpointEstimate out;
  const int64_t dp = layout.dp, tp = layout.tp, pp = layout.pp;
  out.rank_bytes.assign(static_cast<size_t>(layout.world()), 0);
  std::vector<double> read(static_cast<size_t>(layout.world()), 0);
  const bool zero = layout.zero_stage >= 1 && dp * layout.cp > 1;
  for (int64_t r = 0; r < pp; ++r) {
    const std::vector<int64_t> slots = stage_slot_bytes(problem, layout, r);
    // Resume: each rank reads its slices of the parameters (its tied copy
    // too) and its part of the moments.
    int64_t elements = 0;
    for (const RankParameter& p :
         rank_parameters(problem.model, tp, rank_stages(problem.model, layout, r), pp > 1, layout.ep)) {
      elements += p.elements;
    }
    const int64_t replicas = dp * layout.cp;
    const double moments =
        zero ? static_cast<double>((elements + replicas - 1) / replicas) : static_cast<double>(elements);
    // Every rank writes its slot's pieces (the cp ranks are replicas, slot
    // dp * cp + cp, RunCheckpoints::assign_writers) and reads its slices.
    for (int64_t d = 0; d < dp; ++d) {
      for (int64_t c = 0; c < layout.cp; ++c) {
        for (int64_t t = 0; t < tp; ++t) {
          const size_t world = static_cast<size_t>(((d * pp + r) * layout.cp + c) * tp + t);
          out.rank_bytes[world] = slots[static_cast<size_t>((d * layout.cp + c) * tp + t)];
          read[world] = static_cast<double>(kFp32) * (static_cast<double>(elements) + 2 * moments);
        }
      }
    }
  }
  out.rank_bytes[0] += kOptimizerStepBytes;
  // Ranks fill nodes in world-rank order.
  const int64_t per_node = std::min(problem.gpus_per_node > 0 ? problem.gpus_per_node : layout.world(), layout.world());
  double node = 0, node_read = 0;
  for (size_t rank = 0; rank < out.rank_bytes.size(); ++rank) {
    const double bytes = static_cast<double>(out.rank_bytes[rank]);
    out.total_bytes += bytes;
    out.rank_bytes_max = std::max(out.rank_bytes_max, bytes);
    node += bytes;
    node_read += read[rank];
    if ((static_cast<int64_t>(rank) + 1) % per_node == 0 || rank + 1 == out.rank_bytes.size()) {
      out.node_bytes = std::max(out.node_bytes, node);
      out.node_read_bytes = std::max(out.node_read_bytes, node_read);
      node = node_read = 0;
    }
  }
  if (write_bytes_per_s > 0) out.save_s = out.node_bytes / write_bytes_per_s;
  if (read_bytes_per_s > 0) out.load_s = out.node_read_bytes / read_bytes_per_s;
  return out;
}

HostMemory estimate_host_memory(const Problem& problem, const Layout& layout, const MemoryEstimate& memory,
                                const CheckpointEstimate& checkpoint) {
  HostMemory host;
  int64_t most = 0, largest = 0;
  for (const RankMemory& rank : memory.ranks) most = std::max(most, rank.parameters);
  for (int64_t r = 0; r < layout.pp; ++r) {
    for (const RankParameter& p : rank_parameters(problem.model, layout.tp, rank_stages(problem.model, layout, r),
                                                  layout.pp > 1)) {
      largest = std::max(largest, p.elements);
    }
  }
  const double pieces = checkpoint.rank_bytes_max;
  if (problem.host_is_device) {
    // The training tensors are the host's; a synchronous save writes the
    // CPU tensors as they are (pieces_to_host shares them), an async one
    // copies them into buffers kept for the run.
    host.training = memory.peak;
    host.async = problem.checkpoint_async ? pieces : 0;
    host.peak = host.training + host.async;
    host.peak_phase = "training";
    return host;
  }
  // build_model_parts: every parameter made and filled on the CPU, then moved.
  host.init = static_cast<double>(kFp32) * static_cast<double>(most);
  // read_into: a tensor on the GPU is read through a CPU copy, one at a time.
  host.resume = static_cast<double>(kFp32) * static_cast<double>(largest) + kReadChunkBytes;
  // pieces_to_host: all of the rank's pieces copied before the files are written.
  if (problem.checkpoint_async) {
    host.async = pieces;
  } else {
    host.save = pieces;
  }
  const std::pair<double, const char*> phases[] = {
      {host.init, "init"}, {host.resume, "resume"}, {host.save, "save"}, {host.async, "async save buffers"}};
  for (const auto& [bytes, phase] : phases) {
    if (bytes > host.peak) {
      host.peak = bytes;
      host.peak_phase = phase;
    }
  }
  return host;
}

double checkpoint_tensor_bytes(const ModelConfig& model) {
  return 3.0 * kFp32 * static_cast<double>(count_parameters(model)) + kOptimizerStepBytes;
}

double run_folder_disk_bytes(const Config& config, const ModelConfig& model, double checkpoint_bytes) {
  double bytes = 0;
  if (config.checkpoint.enabled) {
    const int64_t steps = std::max<int64_t>(1, config.schedule.train_steps);
    const int64_t interval = config.checkpoint.interval;
    // One save every interval steps, and one at the end when that is not one of them.
    const int64_t saves = interval > 0 ? steps / interval + (steps % interval != 0 ? 1 : 0) : 1;
    const int64_t kept = config.checkpoint.keep_last > 0 ? std::min(config.checkpoint.keep_last + 1, saves) : saves;
    bytes += static_cast<double>(kept) * checkpoint_bytes;
  }
  if (config.checkpoint.export_hf_at_end) {
    const double dtype = config.checkpoint.export_dtype == "float32" ? 4.0 : 2.0;
    bytes += dtype * static_cast<double>(count_parameters(model));
  }
  return bytes;
}

}  // namespace loom::plan

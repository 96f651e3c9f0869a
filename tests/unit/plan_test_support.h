// What loom plan's unit tests (test_plan, test_plan_cp, test_plan_moe)
// share: configs/tiny.yaml's problem, a machine whose only cost is compute,
// and a module's parameter count.
#pragma once

#include <cstdint>

#include <torch/nn/module.h>

#include "plan/machine_profile.h"
#include "plan/layout.h"

namespace loom::plan::test_support {

// configs/tiny.yaml's model (hidden 128, 8 layers, 8 heads of 16 over 4 kv
// heads, vocabulary 2048), batch and sequence (`seq_len`, 128 there).
inline Problem tiny_problem(int64_t gpus, int64_t seq_len = 128) {
  Problem problem;
  problem.model.hidden_size = 128;
  problem.model.intermediate_size = 384;
  problem.model.num_layers = 8;
  problem.model.num_heads = 8;
  problem.model.num_kv_heads = 4;
  problem.model.vocab_size = 2048;
  problem.model.max_seq_len = seq_len;
  problem.seq_len = seq_len;
  problem.global_batch = 16;
  problem.bucket_mb = 1.0;
  problem.gpus = gpus;
  problem.gpus_per_node = gpus;
  return problem;
}

// fp32 matmuls at 1e10 FLOP/s, everything else free: no communication,
// overhead or optimizer time to speak of.
inline MachineProfile compute_only() {
  MachineProfile m;
  m.name = "compute-only";
  m.source = "specification";
  m.peak_flops_fp32 = m.matmul_flops_fp32 = m.attention_flops_fp32 = 1e10;
  m.memory_bytes_per_s = m.stream_bytes_per_s = 1e30;
  m.intra_node = m.inter_node = {1e30, 0};
  return m;
}

inline int64_t numel_of(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

}  // namespace loom::plan::test_support

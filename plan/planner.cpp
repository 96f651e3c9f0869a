#include "plan/planner.h"

#include <algorithm>

namespace loom::plan {

CheckpointEstimate estimate_checkpoint(const Problem& problem, const Layout& layout, const MemoryEstimate& memory,
                                       const MachineProfile& machine) {
  constexpr double kBytesPerParameter = 12.0;  // fp32 weight, exp_avg, exp_avg_sq
  CheckpointEstimate out;
  out.total_bytes = kBytesPerParameter * static_cast<double>(count_parameters(problem.model));
  for (const RankMemory& rank : memory.ranks) {
    // A stage's slices are written once, shared out over the dp replicas
    // (the parameters by the greedy assignment, ZeRO's state exactly).
    out.rank_bytes = std::max(out.rank_bytes, kBytesPerParameter * static_cast<double>(rank.parameters) /
                                                  static_cast<double>(layout.dp));
  }
  out.node_bytes = out.rank_bytes * static_cast<double>(std::min(problem.gpus_per_node, layout.world()));
  if (machine.storage_write_bytes_per_s > 0) out.save_s = out.node_bytes / machine.storage_write_bytes_per_s;
  if (machine.storage_read_bytes_per_s > 0) out.load_s = out.node_bytes / machine.storage_read_bytes_per_s;
  return out;
}

Candidate evaluate_layout(const Problem& problem, const Layout& layout, const MachineProfile& machine) {
  Candidate candidate;
  candidate.layout = layout;
  candidate.memory = estimate_memory(problem, layout);
  candidate.time = estimate_step_time(problem, layout, machine);
  candidate.checkpoint = estimate_checkpoint(problem, layout, candidate.memory, machine);
  candidate.fits = problem.gpu_memory_bytes <= 0 ||
                   candidate.memory.peak <= kUsableMemoryFraction * problem.gpu_memory_bytes;
  return candidate;
}

std::vector<Candidate> plan_layouts(const Problem& problem, const MachineProfile& machine) {
  std::vector<Candidate> candidates;
  for (const Layout& layout : enumerate_layouts(problem)) candidates.push_back(evaluate_layout(problem, layout, machine));
  std::stable_sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.fits != b.fits) return a.fits;
    // Among equally fast layouts, the one that leaves more memory free.
    if (a.fits && a.time.total != b.time.total) return a.time.total < b.time.total;
    return a.memory.peak < b.memory.peak;
  });
  return candidates;
}

}  // namespace loom::plan

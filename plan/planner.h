// `loom plan`'s search: every valid layout of a problem, its predicted memory
// and step time on a machine, best first (docs/plan.md).
#pragma once

#include <vector>

#include "plan/layout.h"
#include "plan/machine_profile.h"
#include "plan/memory_model.h"
#include "plan/time_model.h"

namespace loom::plan {

// The share of --gpu-memory a layout may fill with tensors: the rest is left
// to what loom's count does not see (the CUDA context, NCCL's buffers, the
// caching allocator's fragmentation).
inline constexpr double kUsableMemoryFraction = 0.9;

// One sharded checkpoint of a layout (docs/checkpoints.md): its bytes (fp32
// parameters and AdamW's two moments, 12 bytes a parameter), the most one
// rank writes (its stage's slices, shared out over its dp replicas), the
// most one node writes, and the time that node takes to write it and to
// read it back at the profile's storage rates (0 when it has none).
struct CheckpointEstimate {
  double total_bytes = 0;
  double rank_bytes = 0;
  double node_bytes = 0;
  double save_s = 0;
  double load_s = 0;
};
CheckpointEstimate estimate_checkpoint(const Problem& problem, const Layout& layout, const MemoryEstimate& memory,
                                       const MachineProfile& machine);

struct Candidate {
  Layout layout;
  MemoryEstimate memory;
  StepTime time;
  CheckpointEstimate checkpoint;
  bool fits = true;  // memory.peak <= kUsableMemoryFraction x gpu_memory_bytes (or no limit)
};

Candidate evaluate_layout(const Problem& problem, const Layout& layout, const MachineProfile& machine);

// Every layout enumerate_layouts gives, evaluated; those that fit first,
// fastest first, then the rest by memory.
std::vector<Candidate> plan_layouts(const Problem& problem, const MachineProfile& machine);

}  // namespace loom::plan

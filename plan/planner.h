// `loom plan`'s search: every valid layout of a problem, its predicted memory
// and step time on a machine, best first (docs/plan.md).
#pragma once

#include <vector>

#include "plan/checkpoint_model.h"
#include "plan/layout.h"
#include "plan/machine_profile.h"
#include "plan/memory_model.h"
#include "plan/time_model.h"

namespace loom::plan {

// The share of --gpu-memory a layout may fill with tensors: the rest is left
// to what loom's count does not see (the CUDA context, NCCL's buffers, the
// caching allocator's fragmentation).
inline constexpr double kUsableMemoryFraction = 0.9;

struct Candidate {
  Layout layout;
  MemoryEstimate memory;
  StepTime time;
  CheckpointEstimate checkpoint;  // with_costs only (plan_layouts leaves it empty)
  HostMemory host;                // with_costs only
  bool fits = true;  // memory.peak <= kUsableMemoryFraction x gpu_memory_bytes (or no limit)
};

// A layout's memory, step time, checkpoint and host memory.
Candidate evaluate_layout(const Problem& problem, const Layout& layout, const MachineProfile& machine);
// Fills a candidate's checkpoint and host memory (estimate_checkpoint at
// the problem's disk write rate, else the profile's storage rates): what
// plan_layouts leaves out, for the layouts shown.
void with_costs(const Problem& problem, const MachineProfile& machine, Candidate& candidate);

// Every layout enumerate_layouts gives, its memory and step time evaluated
// (not its checkpoint and host memory: with_costs); those that fit first,
// fastest first, then the rest by memory.
std::vector<Candidate> plan_layouts(const Problem& problem, const MachineProfile& machine);

}  // namespace loom::plan

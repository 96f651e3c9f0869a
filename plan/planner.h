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

struct Candidate {
  Layout layout;
  MemoryEstimate memory;
  StepTime time;
  bool fits = true;  // memory.peak <= kUsableMemoryFraction x gpu_memory_bytes (or no limit)
};

Candidate evaluate_layout(const Problem& problem, const Layout& layout, const MachineProfile& machine);

// Every layout enumerate_layouts gives, evaluated; those that fit first,
// fastest first, then the rest by memory.
std::vector<Candidate> plan_layouts(const Problem& problem, const MachineProfile& machine);

}  // namespace loom::plan

#include "plan/planner.h"

#include <algorithm>

namespace loom::plan {

void with_costs(const Problem& problem, const MachineProfile& machine, Candidate& candidate) {
  const double write = problem.disk_write_bytes_per_s > 0 ? problem.disk_write_bytes_per_s : machine.storage_write_bytes_per_s;
  // --disk-gbps gives the write rate; reads keep the profile's, or that rate.
  const double read = machine.storage_read_bytes_per_s > 0 ? machine.storage_read_bytes_per_s : problem.disk_write_bytes_per_s;
  candidate.checkpoint = estimate_checkpoint(problem, candidate.layout, write, read);
  candidate.host = estimate_host_memory(problem, candidate.layout, candidate.memory, candidate.checkpoint);
}

namespace {

Candidate evaluate_fit_and_time(const Problem& problem, const Layout& layout, const MachineProfile& machine) {
  Candidate candidate;
  candidate.layout = layout;
  candidate.memory = estimate_memory(problem, layout);
  candidate.time = estimate_step_time(problem, layout, machine);
  candidate.fits = problem.gpu_memory_bytes <= 0 ||
                   candidate.memory.peak <= kUsableMemoryFraction * problem.gpu_memory_bytes;
  return candidate;
}

}  // namespace

Candidate evaluate_layout(const Problem& problem, const Layout& layout, const MachineProfile& machine) {
  Candidate candidate = evaluate_fit_and_time(problem, layout, machine);
  with_costs(problem, machine, candidate);
  return candidate;
}

std::vector<Candidate> plan_layouts(const Problem& problem, const MachineProfile& machine) {
  std::vector<Candidate> candidates;
  for (const Layout& layout : enumerate_layouts(problem)) candidates.push_back(evaluate_fit_and_time(problem, layout, machine));
  std::stable_sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.fits != b.fits) return a.fits;
    // Among equally fast layouts, the one that leaves more memory free.
    if (a.fits && a.time.total != b.time.total) return a.time.total < b.time.total;
    return a.memory.peak < b.memory.peak;
  });
  return candidates;
}

}  // namespace loom::plan

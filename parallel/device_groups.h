// The groups that carry a run's device tensors (Note [host and device
// groups] in parallel/process_group.h), by parallel.device_backend:
//   nccl        NCCL twins of the MPI groups on CUDA; the MPI groups
//               themselves on the CPU (the default)
//   mpi_staged  TEST-ONLY: StagedProcessGroup (parallel/staged_process_group.h)
//               on any device, so several ranks can share one GPU
#pragma once

#include <c10/core/Device.h>

#include <memory>
#include <string_view>

#include "parallel/mpi_process_group.h"
#include "parallel/process_group.h"

namespace loom {

inline constexpr std::string_view kStagedBackend = "mpi_staged";

// Whether a run on `device` with `backend` moves its device tensors over
// groups of their own (else the MPI groups serve both).
bool has_device_groups(c10::Device device, std::string_view backend);

// The device twin of `mpi` (same ranks and name), or nullptr where the MPI
// group serves (has_device_groups false, or a group of one rank).
// Collective over `mpi`. Throws std::invalid_argument for an unknown
// backend, or nccl on CUDA in a build without it.
std::unique_ptr<ProcessGroup> device_twin(MpiProcessGroup& mpi, c10::Device device, std::string_view backend);

// The device twins of `mpi`'s dp and tp groups (pp stays null: PipeGroups
// makes the pipeline's, Note [pipeline links]), dp first, then tp, on every
// rank. Throws std::invalid_argument when a group of `mpi` is not an
// MpiProcessGroup.
GridGroups device_grid(const GridGroups& mpi, c10::Device device, std::string_view backend);

}  // namespace loom

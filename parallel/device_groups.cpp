#include "parallel/device_groups.h"

#include <stdexcept>
#include <string>

#include "parallel/cuda_runtime.h"
#include "parallel/staged_process_group.h"

namespace loom {

bool has_device_groups(c10::Device device, std::string_view backend) {
  return backend == kStagedBackend || device.is_cuda();
}

std::unique_ptr<ProcessGroup> device_twin(MpiProcessGroup& mpi, c10::Device device, std::string_view backend) {
  if (backend != "nccl" && backend != kStagedBackend) {
    throw std::invalid_argument("device_twin: backend '" + std::string(backend) + "' (expected nccl or mpi_staged)");
  }
  if (!has_device_groups(device, backend) || mpi.size() == 1) return nullptr;
  if (backend == kStagedBackend) return std::make_unique<StagedProcessGroup>(mpi);
  if (!cuda_built()) {
    throw std::invalid_argument("device_twin: NCCL on " + device.str() + ", and this loom was built without CUDA");
  }
  return cuda_runtime().nccl_group(mpi);
}

GridGroups device_grid(const GridGroups& mpi, c10::Device device, std::string_view backend) {
  auto twin = [&](const std::unique_ptr<ProcessGroup>& group) -> std::unique_ptr<ProcessGroup> {
    if (group == nullptr) return nullptr;
    auto* source = dynamic_cast<MpiProcessGroup*>(group.get());
    if (source == nullptr) {
      throw std::invalid_argument("device_grid: group '" + group->name() + "' has backend " +
                                  std::string(group->backend()) + ", not mpi");
    }
    return device_twin(*source, device, backend);
  };
  GridGroups grid;
  grid.dp = twin(mpi.dp);
  grid.tp = twin(mpi.tp);
  grid.cp = twin(mpi.cp);
  grid.ep = twin(mpi.ep);
  grid.edp = twin(mpi.edp);
  return grid;
}

}  // namespace loom

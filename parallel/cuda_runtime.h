// What the binary asks of CUDA and NCCL, through loom's CUDA part (Note [the
// CUDA part] in util/cuda_part.h): the NCCL process group, the device
// queries trainer/device.cpp makes, and the libraries' versions. The part
// implements them in parallel/cuda_part_runtime.cpp.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/process_group.h"

namespace loom {

struct CudaRuntime {
  // The NCCL twin of `mpi` on the current CUDA device (NcclProcessGroup).
  std::unique_ptr<ProcessGroup> (*nccl_group)(MpiProcessGroup& mpi);
  // The GPU's PCI bus id ("0000:1B:00.0"), or "" when CUDA cannot tell.
  std::string (*pci_bus_id)(c10::DeviceIndex device);
  // The GPU's name ("NVIDIA H100 80GB HBM3"), or "cuda:N".
  std::string (*device_name)(c10::DeviceIndex device);
  // The caching allocator's peak allocated bytes since the last reset, and
  // the bytes it holds now.
  void (*memory_stats)(c10::DeviceIndex device, double* peak_allocated, double* reserved);
  void (*reset_peak_memory)(c10::DeviceIndex device);
  void (*set_device)(c10::DeviceIndex device);
  void (*synchronize)(c10::DeviceIndex device);
  // (library, version): the CUDA runtime, NCCL and the number of visible GPUs.
  std::vector<std::pair<std::string, std::string>> (*library_versions)();
};

// The part's extern "C" function that returns its CudaRuntime.
inline constexpr const char* kCudaRuntimeEntry = "loom_cuda_runtime";

// Whether this loom was built with CUDA (its part exists).
bool cuda_built();

// The part's CudaRuntime, loading the part on first use. Throws
// std::runtime_error when this loom has no CUDA part or it does not load, or
// when torch's CUDA hooks were fixed before it loaded (Note [the CUDA part]).
const CudaRuntime& cuda_runtime();

// The GPUs this process can use: 0 in a build without CUDA or on a machine
// without an NVIDIA driver (where the part stays unloaded), else torch's
// count. A binary that calls it loads the part as it starts, wherever the
// part may be needed (Note [the CUDA part]).
int64_t cuda_device_count();

}  // namespace loom

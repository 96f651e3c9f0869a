// loom's CUDA part (Note [the CUDA part] in util/cuda_part.h): the
// CudaRuntime table of parallel/cuda_runtime.h. The CUDA runtime and NCCL
// are the venv's, the ones torch loads, so there is one of each per process.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

#include "parallel/cuda_runtime.h"
#include "parallel/nccl_process_group.h"

namespace loom {

namespace {

std::unique_ptr<ProcessGroup> nccl_group(MpiProcessGroup& mpi) { return std::make_unique<NcclProcessGroup>(mpi); }

std::string pci_bus_id(c10::DeviceIndex device) {
  char bus[64] = {};
  return cudaDeviceGetPCIBusId(bus, sizeof bus, device) == cudaSuccess ? std::string(bus) : std::string();
}

std::string device_name(c10::DeviceIndex device) {
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, device) == cudaSuccess) return properties.name;
  return "cuda:" + std::to_string(device);
}

void memory_stats(c10::DeviceIndex device, double* peak_allocated, double* reserved) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  *peak_allocated = static_cast<double>(stats.allocated_bytes[all].peak);
  *reserved = static_cast<double>(stats.reserved_bytes[all].current);
}

void reset_peak_memory(c10::DeviceIndex device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

void set_device(c10::DeviceIndex device) { c10::cuda::set_device(device); }

// The current device: loom makes a rank's GPU current once, at start.
void synchronize(c10::DeviceIndex /*device*/) { c10::cuda::device_synchronize(); }

std::vector<std::pair<std::string, std::string>> library_versions() {
  std::vector<std::pair<std::string, std::string>> out;
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess) {
    out.emplace_back("cuda_runtime", std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10));
  }
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
    out.emplace_back("nccl", std::to_string(nccl / 10000) + "." + std::to_string(nccl % 10000 / 100) + "." +
                                 std::to_string(nccl % 100));
  }
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  out.emplace_back("cuda_devices", status == cudaSuccess ? std::to_string(devices)
                                                         : std::string("0 (") + cudaGetErrorString(status) + ")");
  return out;
}

}  // namespace

}  // namespace loom

// The binary reaches the functions above through this table.
extern "C" __attribute__((visibility("default"))) const void* loom_cuda_runtime() {
  static const loom::CudaRuntime table{&loom::nccl_group,   &loom::pci_bus_id,        &loom::device_name,
                                       &loom::memory_stats, &loom::reset_peak_memory, &loom::set_device,
                                       &loom::synchronize,  &loom::library_versions};
  return &table;
}

#include "trainer/device.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>

#include <torch/cuda.h>

#ifdef LOOM_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

#include "trainer/tensor_memory.h"
#include "util/error.h"

namespace loom {

c10::Device resolve_device(const std::string& run_device, int64_t local_rank) {
  if (run_device == "cpu") return c10::Device(c10::kCPU);
  const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
  if (run_device == "auto" && gpus == 0) return c10::Device(c10::kCPU);
  if (run_device != "cuda" && run_device != "auto") {
    throw BadInput("run.device: '" + run_device + "' (expected cpu, cuda or auto)");
  }
  if (gpus == 0) {
#ifdef LOOM_WITH_CUDA
    throw BadInput("run.device: cuda, but no CUDA device is visible to this process (check nvidia-smi and "
                   "CUDA_VISIBLE_DEVICES), or use run.device cpu");
#else
    throw BadInput("run.device: cuda, but this loom was built without CUDA (no CUDA toolkit at build time)");
#endif
  }
  if (local_rank >= gpus) {
    throw BadInput("run.device: local rank " + std::to_string(local_rank) + " has no GPU of its own (" +
                   std::to_string(gpus) + " visible): start at most one rank per GPU on each node");
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
}

namespace {

// Resident set size now, from /proc/self/statm (pages).
double current_rss_bytes() {
  std::FILE* file = std::fopen("/proc/self/statm", "r");
  if (!file) return 0;
  long total = 0, resident = 0;
  const int read = std::fscanf(file, "%ld %ld", &total, &resident);
  std::fclose(file);
  return read == 2 ? static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) : 0;
}

}  // namespace

uint64_t peak_rss_bytes() {
  std::FILE* file = std::fopen("/proc/self/status", "r");
  if (!file) return 0;
  char line[256];
  unsigned long long kib = 0;
  while (std::fgets(line, sizeof line, file)) {
    if (std::sscanf(line, "VmHWM: %llu kB", &kib) == 1) break;
  }
  std::fclose(file);
  return static_cast<uint64_t>(kib) * 1024;
}

MemoryStats memory_stats(c10::Device device) {
  MemoryStats stats;
#ifdef LOOM_WITH_CUDA
  if (device.is_cuda()) {
    const auto cuda = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    stats.peak_bytes = static_cast<double>(cuda.allocated_bytes[all].peak);
    stats.reserved_bytes = static_cast<double>(cuda.reserved_bytes[all].current);
    stats.tensor_peak_bytes = stats.peak_bytes;
    return stats;
  }
#endif
  (void)device;
  stats.peak_bytes = static_cast<double>(peak_rss_bytes());
  stats.reserved_bytes = current_rss_bytes();
  stats.tensor_peak_bytes = static_cast<double>(tensor_memory_peak_bytes());
  return stats;
}

void reset_peak_memory(c10::Device device) {
#ifdef LOOM_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
    return;
  }
#else
  (void)device;
#endif
  reset_tensor_memory_peak();
}

void make_current(c10::Device device) {
#ifdef LOOM_WITH_CUDA
  if (device.is_cuda()) c10::cuda::set_device(device.index());
#else
  (void)device;
#endif
}

void synchronize(c10::Device device) {
#ifdef LOOM_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

std::string device_name(c10::Device device) {
#ifdef LOOM_WITH_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp properties{};
    if (cudaGetDeviceProperties(&properties, device.index()) == cudaSuccess) return properties.name;
    return "cuda:" + std::to_string(device.index());
  }
#endif
  return device.str();
}

}  // namespace loom

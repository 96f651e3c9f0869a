// Where training runs and how much memory it takes there.
//
// run.device picks the device: cpu, cuda (fails when no GPU is visible) or
// auto (cuda when one is visible). With one rank per GPU, a rank uses the GPU
// of its local rank; a single process uses GPU 0.
#pragma once

#include <cstdint>
#include <string>

#include <c10/core/Device.h>

namespace loom {

// run.device as a torch device. Throws BadInput for cuda without a visible
// GPU, or a local rank without a GPU of its own.
c10::Device resolve_device(const std::string& run_device, int64_t local_rank = 0);

struct MemoryStats {
  double peak_bytes = 0;      // CUDA: peak allocated since the last reset; CPU: peak resident set of the process
  double reserved_bytes = 0;  // CUDA: held by the caching allocator now; CPU: resident set now
  // Tensor bytes alone, the figure `loom plan` predicts. CUDA: peak allocated
  // (as peak_bytes); CPU: the peak of loom's count of live tensor storage
  // (trainer/tensor_memory.h), 0 when the counter is not installed.
  double tensor_peak_bytes = 0;
};

// The most memory this process has had resident, in bytes: VmHWM of
// /proc/self/status (0 where there is none). Not getrusage's ru_maxrss,
// which Linux carries over from the parent across fork and exec.
uint64_t peak_rss_bytes();

// The memory of `device` (CPU: this process). Cheap; no synchronisation.
MemoryStats memory_stats(c10::Device device);

// Starts a new peak for memory_stats(device).peak_bytes (CUDA) and
// tensor_peak_bytes (both; the CPU peak resident set cannot be reset).
void reset_peak_memory(c10::Device device);

// Makes a CUDA `device` this thread's current one, where NCCL groups made
// afterwards put their communicators (nothing to do on the CPU).
void make_current(c10::Device device);

// Waits for the work queued on `device` (nothing to do on the CPU).
void synchronize(c10::Device device);

// "NVIDIA H100 80GB HBM3" or "cpu".
std::string device_name(c10::Device device);

}  // namespace loom

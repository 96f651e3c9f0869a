// Where training runs and how much memory it takes there.
//
// run.device picks the device: cpu, cuda (fails when no GPU is visible) or
// auto (cuda when one is visible). Which GPU a rank takes: Note [choosing a
// GPU].
//
// Note [choosing a GPU]
// A rank's place on its node (its local rank among the node's ranks) picks
// its GPU from those it sees:
// - one visible GPU: that one (cuda:0). Launchers that give each rank its
//   own GPU (srun --gpus-per-task=1, --gpu-bind, wrappers that set
//   CUDA_VISIBLE_DEVICES per rank) show each rank exactly one;
// - at least as many as the node's ranks: the local rank's;
// - otherwise (2 ranks seeing the same 1 GPU is the first case; 4 ranks
//   seeing 2 is this one) a refusal naming the counts.
// The place is known before MPI_Init from the launcher's variables
// (launcher_node_place: Open MPI, Slurm, MPICH/Hydra, torchrun's), so the
// GPU is current before MPI starts (a CUDA-aware MPI or UCX sets up on the
// current device); after MPI_Init, MPI's own count of the node's ranks
// decides. Then every rank's device type must agree (run.device auto on a
// node without GPUs beside nodes with them is refused), and no two ranks on
// one node may hold the same GPU (compared by PCI bus id): check_rank_devices.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>

namespace loom {

// A rank's place among the ranks of its node.
struct NodePlace {
  int64_t local_rank = 0;
  int64_t ranks_on_node = 1;
};

// The index of the GPU a rank at `place` takes among `visible_gpus` (>= 1):
// Note [choosing a GPU]. Throws BadInput naming the counts otherwise.
int64_t choose_gpu(int64_t visible_gpus, const NodePlace& place);

// The place a launcher gave this process, from its environment variables
// (read through `getenv`): Open MPI's OMPI_COMM_WORLD_LOCAL_RANK/_SIZE,
// Slurm's SLURM_LOCALID with SLURM_TASKS_PER_NODE and SLURM_NODEID, MPICH's
// MPI_LOCALRANKID/MPI_LOCALNRANKS, PMI_LOCAL_RANK/PMI_LOCAL_SIZE, torchrun's
// LOCAL_RANK/LOCAL_WORLD_SIZE. Empty when none is set (or unreadable).
std::optional<NodePlace> launcher_node_place(const std::function<const char*(const char*)>& getenv);

// run.device as a torch device; a GPU is chosen by choose_gpu. Throws
// BadInput for cuda without a visible GPU, or a place choose_gpu refuses.
c10::Device resolve_device(const std::string& run_device, const NodePlace& place = {});

// What one rank runs on, for check_rank_devices.
struct RankDevice {
  std::string host;
  std::string type;     // "cpu", "cuda"
  std::string bus_id;   // the GPU's PCI bus id ("0000:1B:00.0"); empty on the CPU
};

// Throws BadInput when the ranks (indexed by world rank) do not all run on
// the same device type, or two ranks of one host hold the same GPU: Note
// [choosing a GPU]. `shared_gpu_ok`: ranks may share one GPU (a test
// backend that stages tensors through MPI).
void check_rank_devices(const std::vector<RankDevice>& ranks, bool shared_gpu_ok = false);

// This rank's RankDevice on `device` (the bus id from the CUDA runtime).
RankDevice rank_device(c10::Device device, const std::string& host);

// A RankDevice as one line, and back, to gather them as strings.
std::string to_string(const RankDevice& device);
RankDevice rank_device_from_string(const std::string& text);

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

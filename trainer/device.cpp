#include "trainer/device.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>

#include "parallel/cuda_runtime.h"
#include "trainer/tensor_memory.h"
#include "util/error.h"

namespace loom {

int64_t choose_gpu(int64_t visible_gpus, const NodePlace& place) {
  if (visible_gpus == 1) return 0;
  if (visible_gpus >= place.ranks_on_node && place.local_rank < visible_gpus) return place.local_rank;
  throw BadInput("run.device: local rank " + std::to_string(place.local_rank) + " of the " +
                 std::to_string(place.ranks_on_node) + " ranks on this node sees " + std::to_string(visible_gpus) +
                 " GPUs: a rank must see exactly one GPU (its own: srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES "
                 "per rank) or at least one per rank of its node; start at most " +
                 std::to_string(visible_gpus) + " ranks per node");
}

namespace {

// A non-negative integer, or nothing (unset, empty, or not a number).
std::optional<int64_t> env_count(const std::function<const char*(const char*)>& getenv, const char* name) {
  const char* text = getenv(name);
  if (text == nullptr || *text == '\0') return std::nullopt;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (*end != '\0' || value < 0) return std::nullopt;
  return value;
}

// The number of tasks on node `node` of Slurm's SLURM_TASKS_PER_NODE, e.g.
// "2(x3),1": nodes 0-2 run 2 tasks, node 3 runs 1.
std::optional<int64_t> slurm_tasks_on_node(const std::string& spec, int64_t node) {
  size_t at = 0;
  int64_t first_node = 0;
  while (at < spec.size()) {
    const size_t comma = spec.find(',', at);
    const std::string item = spec.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    long long tasks = 0, repeat = 1;
    char close = 0;
    if (std::sscanf(item.c_str(), "%lld(x%lld%c", &tasks, &repeat, &close) == 3 && close == ')') {
    } else if (std::sscanf(item.c_str(), "%lld", &tasks) == 1 && item.find('(') == std::string::npos) {
      repeat = 1;
    } else {
      return std::nullopt;
    }
    if (tasks < 1 || repeat < 1) return std::nullopt;
    if (node < first_node + repeat) return tasks;
    first_node += repeat;
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return std::nullopt;
}

}  // namespace

std::optional<NodePlace> launcher_node_place(const std::function<const char*(const char*)>& getenv) {
  const std::pair<const char*, const char*> pairs[] = {{"OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
                                                       {"MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
                                                       {"PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"},
                                                       {"LOCAL_RANK", "LOCAL_WORLD_SIZE"}};
  for (const auto& [rank_name, size_name] : pairs) {
    const auto rank = env_count(getenv, rank_name);
    const auto size = env_count(getenv, size_name);
    if (rank && size && *rank < *size) return NodePlace{*rank, *size};
  }
  const auto local_id = env_count(getenv, "SLURM_LOCALID");
  const auto node_id = env_count(getenv, "SLURM_NODEID");
  const char* tasks = getenv("SLURM_STEP_TASKS_PER_NODE");
  if (tasks == nullptr) tasks = getenv("SLURM_TASKS_PER_NODE");
  if (local_id && node_id && tasks != nullptr) {
    const auto size = slurm_tasks_on_node(tasks, *node_id);
    if (size && *local_id < *size) return NodePlace{*local_id, *size};
  }
  return std::nullopt;
}

c10::Device resolve_device(const std::string& run_device, const NodePlace& place) {
  if (run_device == "cpu") return c10::Device(c10::kCPU);
  if (run_device != "cuda" && run_device != "auto") {
    throw BadInput("run.device: '" + run_device + "' (expected cpu, cuda or auto)");
  }
  // 0 where no GPU is usable; loom's CUDA part is loaded where one may be (Note [the CUDA part]).
  const int64_t gpus = cuda_device_count();
  if (run_device == "auto" && gpus == 0) return c10::Device(c10::kCPU);
  if (gpus == 0) {
    if (!cuda_built()) {
      throw BadInput("run.device: cuda, but this loom was built without CUDA (no CUDA toolkit at build time)");
    }
    throw BadInput("run.device: cuda, but no CUDA device is visible to this process (check nvidia-smi and "
                   "CUDA_VISIBLE_DEVICES), or use run.device cpu");
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(choose_gpu(gpus, place)));
}

void check_rank_devices(const std::vector<RankDevice>& ranks, bool shared_gpu_ok) {
  if (ranks.empty()) return;
  std::map<std::string, std::vector<size_t>> by_type;
  for (size_t r = 0; r < ranks.size(); ++r) by_type[ranks[r].type].push_back(r);
  auto list = [](const std::vector<size_t>& members) {
    std::string text;
    for (const size_t r : members) text += (text.empty() ? "" : " ") + std::to_string(r);
    return "[" + text + "]";
  };
  if (by_type.size() > 1) {
    std::string detail;
    for (const auto& [type, members] : by_type) {
      detail += (detail.empty() ? "" : ", ") + type + " on world ranks " + list(members);
    }
    throw BadInput("run.device: the ranks do not agree on a device type (" + detail +
                   "): every rank must run on the same kind of device (run.device auto decides per rank; set "
                   "run.device cuda or cpu)");
  }
  if (shared_gpu_ok) return;
  std::map<std::pair<std::string, std::string>, std::vector<size_t>> holders;
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (!ranks[r].bus_id.empty()) holders[{ranks[r].host, ranks[r].bus_id}].push_back(r);
  }
  for (const auto& [where, members] : holders) {
    if (members.size() > 1) {
      throw BadInput("run.device: world ranks " + list(members) + " on " + where.first + " all hold the GPU at PCI " +
                     where.second + ": each rank needs a GPU of its own (check CUDA_VISIBLE_DEVICES and the "
                     "launcher's GPU binding, or start fewer ranks per node)");
    }
  }
}

RankDevice rank_device(c10::Device device, const std::string& host) {
  RankDevice mine{host, c10::DeviceTypeName(device.type(), /*lower_case=*/true), ""};
  if (device.is_cuda()) mine.bus_id = cuda_runtime().pci_bus_id(device.index());
  return mine;
}

std::string to_string(const RankDevice& device) { return device.host + "\t" + device.type + "\t" + device.bus_id; }

RankDevice rank_device_from_string(const std::string& text) {
  RankDevice device;
  const size_t first = text.find('\t');
  const size_t second = first == std::string::npos ? std::string::npos : text.find('\t', first + 1);
  if (second == std::string::npos) throw std::invalid_argument("rank_device_from_string: '" + text + "'");
  device.host = text.substr(0, first);
  device.type = text.substr(first + 1, second - first - 1);
  device.bus_id = text.substr(second + 1);
  return device;
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
  if (device.is_cuda()) {
    cuda_runtime().memory_stats(device.index(), &stats.peak_bytes, &stats.reserved_bytes);
    stats.tensor_peak_bytes = stats.peak_bytes;
    return stats;
  }
  stats.peak_bytes = static_cast<double>(peak_rss_bytes());
  stats.reserved_bytes = current_rss_bytes();
  stats.tensor_peak_bytes = static_cast<double>(tensor_memory_peak_bytes());
  return stats;
}

void reset_peak_memory(c10::Device device) {
  if (device.is_cuda()) {
    cuda_runtime().reset_peak_memory(device.index());
    return;
  }
  reset_tensor_memory_peak();
}

void make_current(c10::Device device) {
  if (device.is_cuda()) cuda_runtime().set_device(device.index());
}

void synchronize(c10::Device device) {
  if (device.is_cuda()) cuda_runtime().synchronize(device.index());
}

std::string device_name(c10::Device device) {
  if (device.is_cuda()) return cuda_runtime().device_name(device.index());
  return device.str();
}

}  // namespace loom

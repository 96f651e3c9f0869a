// CUDA builds only: report the CUDA runtime and NCCL loom is linked against.
// NCCL is the venv's libnccl (the one torch loads), so there is one NCCL per
// process. Both queries work on a machine without a GPU.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "parallel/versions.h"

namespace loom {

std::vector<std::pair<std::string, std::string>> cuda_library_versions() {
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
  cudaError_t status = cudaGetDeviceCount(&devices);
  out.emplace_back("cuda_devices", status == cudaSuccess ? std::to_string(devices)
                                                         : std::string("0 (") + cudaGetErrorString(status) + ")");
  return out;
}

}  // namespace loom

#include "parallel/cuda_runtime.h"

#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>

#include <exception>
#include <stdexcept>

#include "util/cuda_part.h"

namespace loom {

namespace {

// Where a GPU may be used (a CUDA build on a machine with an NVIDIA driver),
// the part loads as the process starts, before anything can ask torch about
// CUDA (Note [the CUDA part]). A failure is kept by cuda_part_table and
// thrown to the first caller that needs the part.
[[maybe_unused]] const bool kCudaPartLoadedAtStart = [] {
  if (!cuda_built() || !nvidia_driver_present()) return false;
  try {
    cuda_part_table(kCudaRuntimeEntry);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}();

}  // namespace

bool cuda_built() {
#ifdef LOOM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

const CudaRuntime& cuda_runtime() {
  if (!cuda_built()) throw std::runtime_error("this loom was built without CUDA (no CUDA toolkit at build time)");
  static const CudaRuntime* runtime = [] {
    const auto* table = static_cast<const CudaRuntime*>(cuda_part_table(kCudaRuntimeEntry));
    // torch decides once per process whether it has CUDA (its CUDA hooks);
    // a query before libtorch_cuda loaded leaves it without for good.
    if (!at::detail::getCUDAHooks().isBuilt()) {
      throw std::logic_error(
          "loom's CUDA part loaded, but torch had been asked about CUDA before it was, and keeps answering "
          "that it has none: load the part first (cuda_device_count or cuda_runtime before any torch::cuda call "
          "or torch::manual_seed)");
    }
    return table;
  }();
  return *runtime;
}

int64_t cuda_device_count() {
  if (!cuda_built() || !nvidia_driver_present()) return 0;
  cuda_runtime();
  return static_cast<int64_t>(torch::cuda::device_count());
}

}  // namespace loom

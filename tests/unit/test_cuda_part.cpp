// loom's CUDA part (Note [the CUDA part] in util/cuda_part.h): a binary
// links no CUDA library and loads the part when asked; loading it brings
// torch's CUDA kernels and the part's tables. No GPU is needed: the part
// loads on any machine, only the device count depends on one.
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "model/kernels/fused_cuda.h"
#include "parallel/cuda_runtime.h"
#include "parallel/versions.h"
#include "util/cuda_part.h"

namespace loom {
namespace {

bool torch_has_cuda_kernel_for_add() {
  const auto op = c10::Dispatcher::singleton().findSchema({"aten::add", "Tensor"});
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

bool process_has(const char* library) { return ::dlopen(library, RTLD_NOW | RTLD_NOLOAD) != nullptr; }

TEST(CudaPart, ABinaryLinksNoCudaLibraryAndLoadsThePartOnlyWhereADriverIs) {
  // Loaded at start exactly where a GPU may be used (a CUDA build with a driver).
  EXPECT_EQ(cuda_part_loaded(), cuda_built() && nvidia_driver_present());
  EXPECT_EQ(process_has("libtorch_cuda.so"), cuda_part_loaded());
  EXPECT_EQ(torch_has_cuda_kernel_for_add(), cuda_part_loaded());
  if (!nvidia_driver_present()) {
    EXPECT_EQ(cuda_device_count(), 0);
  }
}

TEST(CudaPart, LoadingItRegistersTorchsCudaKernelsAndGivesEveryTable) {
  if (!cuda_built()) {
    try {
      cuda_runtime();
      ADD_FAILURE() << "a build without CUDA gave a CUDA runtime";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("built without CUDA"), std::string::npos) << e.what();
    }
    return;
  }
  const CudaRuntime& runtime = cuda_runtime();
  EXPECT_TRUE(cuda_part_loaded());
  EXPECT_TRUE(process_has("libtorch_cuda.so"));
  EXPECT_TRUE(torch_has_cuda_kernel_for_add());
  for (const void* function : {reinterpret_cast<const void*>(runtime.nccl_group),
                               reinterpret_cast<const void*>(runtime.pci_bus_id),
                               reinterpret_cast<const void*>(runtime.device_name),
                               reinterpret_cast<const void*>(runtime.memory_stats),
                               reinterpret_cast<const void*>(runtime.reset_peak_memory),
                               reinterpret_cast<const void*>(runtime.set_device),
                               reinterpret_cast<const void*>(runtime.synchronize),
                               reinterpret_cast<const void*>(runtime.library_versions)}) {
    EXPECT_NE(function, nullptr);
  }
  const kernels::cuda::Launchers& launchers = kernels::cuda::launchers();
  for (const void* function : {reinterpret_cast<const void*>(launchers.swiglu_forward),
                               reinterpret_cast<const void*>(launchers.swiglu_backward),
                               reinterpret_cast<const void*>(launchers.rotary),
                               reinterpret_cast<const void*>(launchers.cross_entropy_forward),
                               reinterpret_cast<const void*>(launchers.cross_entropy_backward)}) {
    EXPECT_NE(function, nullptr);
  }
  std::map<std::string, std::string> versions;
  for (const auto& [library, version] : library_versions()) versions[library] = version;
  EXPECT_EQ(versions.count("cuda"), 0u) << versions["cuda"];
  EXPECT_TRUE(versions.count("cuda_runtime") && versions.count("nccl") && versions.count("cuda_devices"));
  EXPECT_EQ(cuda_device_count() > 0, nvidia_driver_present() && versions["cuda_devices"] != "0" &&
                                         versions["cuda_devices"].rfind("0 (", 0) != 0);
}

TEST(CudaPart, AnEntryItLacksOrAPartThatIsMissingIsNamedInTheError) {
  // A CUDA build: the part loads, and an entry it does not have is named.
  // Without CUDA: there is no part, and the error names the file looked for.
  const std::string expected = cuda_built() ? "loom_no_such_entry" : kCudaPartFile;
  try {
    cuda_part_table("loom_no_such_entry");
    ADD_FAILURE() << "an entry no part has was found";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loom

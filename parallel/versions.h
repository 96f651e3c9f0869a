// Versions of the libraries loom runs on, for `loom version`, run records and
// bug reports. Querying them is cheap and needs no MPI_Init and no GPU.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace loom {

// (library, version) pairs: libtorch, MPI, HDF5 and, in CUDA builds, the CUDA
// runtime, NCCL and the number of visible GPUs.
std::vector<std::pair<std::string, std::string>> library_versions();

#ifdef LOOM_WITH_CUDA
// Defined in cuda_info.cpp (CUDA builds only).
std::vector<std::pair<std::string, std::string>> cuda_library_versions();
#endif

}  // namespace loom

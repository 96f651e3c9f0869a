// Versions of the libraries loom runs on, for `loom version`, run records and
// bug reports. Querying them is cheap and needs no MPI_Init and no GPU.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace loom {

// (library, version) pairs: libtorch, MPI, HDF5 and, when loom's CUDA part
// is loaded (a GPU run, or `with_cuda`: loaded here), the CUDA runtime, NCCL
// and the number of visible GPUs. A CUDA build whose part is not loaded says
// so ("cuda": "not loaded"); one whose part fails to load gives the reason.
std::vector<std::pair<std::string, std::string>> library_versions(bool with_cuda = false);

}  // namespace loom

#include "parallel/versions.h"

#include <hdf5.h>
#include <mpi.h>
#include <torch/version.h>

#include <exception>

#include "parallel/cuda_runtime.h"
#include "util/cuda_part.h"

namespace loom {

std::vector<std::pair<std::string, std::string>> library_versions(bool with_cuda) {
  std::vector<std::pair<std::string, std::string>> out;
  out.emplace_back("libtorch", TORCH_VERSION);

  // MPI_Get_library_version may be called before MPI_Init.
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(mpi_version, &length);
  std::string mpi(mpi_version, static_cast<size_t>(length));
  if (auto comma = mpi.find(','); comma != std::string::npos) mpi.resize(comma);
  out.emplace_back("mpi", mpi);

  unsigned major = 0, minor = 0, release = 0;
  H5get_libversion(&major, &minor, &release);
  out.emplace_back("hdf5", std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release));

  if (!cuda_built()) {
    out.emplace_back("cuda", "not built");
  } else if (!with_cuda && !cuda_part_loaded()) {
    out.emplace_back("cuda", "not loaded");
  } else {
    try {
      for (auto& entry : cuda_runtime().library_versions()) out.push_back(std::move(entry));
    } catch (const std::exception& e) {
      out.emplace_back("cuda", e.what());
    }
  }
  return out;
}

}  // namespace loom

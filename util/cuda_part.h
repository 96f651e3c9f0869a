// Loading loom's CUDA part, a shared library beside the binary.
//
// Note [the CUDA part]
// libtorch_cuda and the CUDA libraries it needs (cuBLAS, cuDNN, NCCL, ...)
// take ~0.4 s and ~350 MB of resident memory to load in every process that
// links them, GPU or not: `loom --help` takes 0.62 s and 128 MB without them,
// 1.01 s and 483 MB with them (docs/performance.md). loom starts many processes
// on machines without a GPU (every rank of a CPU run, each test), so the
// binaries link only libtorch_cpu, and the code that calls CUDA, cuDNN or
// NCCL lives in libloom_cuda.so (CUDA builds only): loom's kernels, the NCCL
// process group, and the device queries (bus id, name, memory statistics).
//
// When it loads: as a binary starts, when the build has CUDA and the machine
// has an NVIDIA driver (libcuda.so.1), in a static initialiser of
// parallel/cuda_runtime.cpp (linked into every binary that can pick a GPU).
// Loading it loads libtorch_cuda, whose static initialisers register torch's
// CUDA kernels and hooks. Loading at start, not at the first use, matters:
// torch looks up its CUDA hooks once per process and keeps what it found, so
// one CUDA query (torch::cuda::device_count, torch::manual_seed, ...) before
// libtorch_cuda is loaded would leave the process without CUDA for good.
// `cuda_runtime()` checks that the hooks are the CUDA ones. Without a driver
// no GPU is usable and the part stays unloaded, except for `loom version`,
// which loads it to report the CUDA runtime and NCCL versions.
//
// Each piece of the part is reached through a table of function pointers
// that an extern "C" function of the part returns (`cuda_part_table`), its
// type declared in the folder that uses it: model/kernels/fused_cuda.h,
// parallel/cuda_runtime.h.
//
// The part has its own copy of the process-group code the NCCL group derives
// from (parallel/, loom_process_groups); the binaries export their loom::
// symbols (cmake/loom_exports.list), so the dynamic linker binds the part's
// references to the binary's definitions where the binary has them: one
// definition of each function and global in the process.
#pragma once

#include <string>

namespace loom {

// The part's file name, found beside the running binary, in its parent
// folder (build/tests/ binaries find build/'s), or on the library search path.
inline constexpr const char* kCudaPartFile = "libloom_cuda.so";

// The table the part's extern "C" function `entry` returns, loading the part
// on first use (thread-safe). Throws std::runtime_error naming the folders
// tried and the dynamic linker's message when it cannot be loaded, or the
// entry when the part has no such function.
const void* cuda_part_table(const char* entry);

// Whether the part is loaded now (by cuda_part_table, or linked in).
bool cuda_part_loaded();

// Whether this machine has an NVIDIA driver (libcuda.so.1 loads). Without one
// no GPU is usable, and a run that may use one keeps to the CPU without
// loading the part.
bool nvidia_driver_present();

}  // namespace loom

// loom's own count of the bytes held by CPU tensors.
//
// The peak resident set of a process (memory_stats on the CPU) includes
// libtorch's code, MPI's shared-memory segments and the allocator's free
// lists, so it cannot be compared with a prediction of what a layout's
// tensors need (`loom plan`, docs/plan.md). This count can: every CPU tensor
// allocation made after install_tensor_memory_counter() goes through a thin
// wrapper around the allocator that was installed before it, which adds the
// requested bytes to a live total (one relaxed atomic add, and a compare
// loop for the peak) and subtracts them when the storage is freed.
//
//   install_tensor_memory_counter();   // once, before the tensors to count
//   reset_tensor_memory_peak();        // peak := live
//   ... training steps ...
//   tensor_memory_peak_bytes();        // most bytes live at once since the reset
//
// Storage allocated before the install is not counted, and freeing it does
// not touch the count. CUDA memory is counted by the CUDA caching allocator
// itself (memory_stats), not here.
#pragma once

#include <cstdint>

namespace loom {

// Wraps the current CPU allocator (c10::GetCPUAllocator) with the counter.
// Idempotent and thread-safe; the wrapper stays for the life of the process.
void install_tensor_memory_counter();
bool tensor_memory_counter_installed();

// Bytes of CPU tensor storage allocated through the counter and not yet freed.
int64_t tensor_memory_live_bytes();
// The most bytes live at once since the last reset (or the install).
int64_t tensor_memory_peak_bytes();
// Starts a new peak at the current live bytes.
void reset_tensor_memory_peak();

}  // namespace loom

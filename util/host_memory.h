// How this process's heap keeps the large blocks it frees.
//
// glibc serves an allocation above its mmap threshold (128 KiB, rising with
// the blocks freed up to 32 MiB) with a fresh mmap and returns it with munmap
// when it is freed. A training step on the CPU allocates and frees the same
// large tensors every step, so by default each of them is mapped again and
// every one of its pages is faulted in (and zeroed by the kernel) again on
// every step. keep_freed_heap_memory() makes the heap serve large blocks as
// well and never shrink, so a block freed in one step is handed out again in
// the next with its pages already resident: the process keeps its peak heap
// for its whole life, as a caching allocator does. This is the main arena,
// which serves the training loop's thread; another thread's arena still maps
// (and unmaps) a block too large for its 64 MiB heaps.
//
// Note [Large blocks on the CPU heap], measured with SmolLM2-135M (seq
// 2048, one sequence per step, fp32, 2 threads) on the 2-core AMD EPYC
// build machine: with the default, zeroing the 400 MB gradient of the
// logits ran at 1.2 GB/s (341 ms a step, nearly all page faults); the run
// took 4.69 million minor faults in 4 steps and 104 tokens/s. With the heap
// kept, 2.48 million faults (the first touch of each page) and 129 tokens/s.
// docs/performance.md has the comparison with PyTorch.
//
// Kept blocks cost memory as well as saving time: a block freed is reused
// only for a request it can hold, so a run whose large tensors change size
// within a step (ZeRO-2 and ZeRO-3 allocate and free one unit's buffers at a
// time, each unit a different size) fragments the heap, and the resident set
// grows well past the tensors alive at once: a 134M-parameter model on dp 4
// under ZeRO-3 peaked at 2.2 GiB above the bare process with the heap kept,
// for 1.1 GiB of tensors. release_freed_heap_memory() is the other choice,
// for runs that shard to save memory: a fixed 1 MiB mmap threshold (glibc's
// rising threshold turned off), so every large block is mapped for itself
// and returned at once when freed, and the resident set follows the tensors.
//
// Call one of them once, early, in a process that trains; they change
// nothing without glibc (or under a sanitizer's allocator, which ignores
// mallopt).
#pragma once

namespace loom {

// True when the settings took effect (glibc's malloc accepted both).
bool keep_freed_heap_memory();
bool release_freed_heap_memory();

}  // namespace loom

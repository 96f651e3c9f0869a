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
// Call it once, early, in a process that trains; it changes nothing
// without glibc (or under a sanitizer's allocator, which ignores mallopt).
#pragma once

namespace loom {

// True when the settings took effect (glibc's malloc accepted both).
bool keep_freed_heap_memory();

}  // namespace loom

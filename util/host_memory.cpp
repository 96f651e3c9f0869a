#include "util/host_memory.h"

#include <cstdlib>  // defines __GLIBC__ where the C library is glibc

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace loom {

bool keep_freed_heap_memory() {
#if defined(__GLIBC__)
  // No block from its own mmap (so none is unmapped on free), and no return
  // of the heap's free top to the system (-1 turns trimming off, mallopt(3)).
  const bool no_mmap = mallopt(M_MMAP_MAX, 0) == 1;
  const bool no_trim = mallopt(M_TRIM_THRESHOLD, -1) == 1;
  return no_mmap && no_trim;
#else
  return false;
#endif
}

bool release_freed_heap_memory() {
#if defined(__GLIBC__)
  // Setting the threshold fixes it: glibc stops raising it to the size of
  // the mapped blocks freed (mallopt(3), M_MMAP_THRESHOLD).
  constexpr int kThreshold = 1 << 20;
  return mallopt(M_MMAP_THRESHOLD, kThreshold) == 1;
#else
  return false;
#endif
}

}  // namespace loom

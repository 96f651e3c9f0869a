// keep_freed_heap_memory (util/host_memory.h): a large block freed and
// allocated again comes back with its pages resident, where by default it is
// unmapped on free and every page is faulted in again.
#include "util/host_memory.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace loom {
namespace {

constexpr size_t kBlockBytes = size_t{64} << 20;  // above glibc's largest mmap threshold (32 MiB)

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Minor faults taken while writing every page of a fresh kBlockBytes block
// allocated right after another block of that size was written and freed.
long faults_writing_a_block_allocated_again() {
  void* first = std::malloc(kBlockBytes);
  if (first == nullptr) return -1;
  std::memset(first, 1, kBlockBytes);
  std::free(first);
  void* again = std::malloc(kBlockBytes);
  if (again == nullptr) return -1;
  const long before = minor_faults();
  std::memset(again, 2, kBlockBytes);
  const long faults = minor_faults() - before;
  // Read back so that the writes cannot be elided.
  EXPECT_EQ(static_cast<unsigned char*>(again)[kBlockBytes - 1], 2);
  std::free(again);
  return faults;
}

TEST(HostMemoryTest, LargeBlocksFreedAreReusedWithoutFaultingTheirPagesInAgain) {
  const long pages = static_cast<long>(kBlockBytes / static_cast<size_t>(sysconf(_SC_PAGESIZE)));
  // glibc's default: the block is a fresh mapping whose pages fault in again.
  const long by_default = faults_writing_a_block_allocated_again();
  if (!keep_freed_heap_memory()) GTEST_SKIP() << "not glibc's malloc (a sanitizer's, or another libc)";
  // The first block after the change grows the heap; the next comes from it.
  ASSERT_GE(faults_writing_a_block_allocated_again(), 0);
  const long kept = faults_writing_a_block_allocated_again();
  RecordProperty("faults_by_default", static_cast<int>(by_default));
  RecordProperty("faults_kept", static_cast<int>(kept));
  // Transparent huge pages can serve a fresh mapping with fewer faults than
  // pages, but not with none.
  EXPECT_GT(by_default, pages / 512 / 2) << "the default case did not fault: the test cannot see the change";
  EXPECT_LT(kept, pages / 100) << "of " << pages << " pages; " << by_default << " faults by default";
  EXPECT_LT(kept * 10, by_default);
}

}  // namespace
}  // namespace loom

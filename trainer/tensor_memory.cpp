#include "trainer/tensor_memory.h"

#include <atomic>
#include <cstring>
#include <mutex>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

namespace loom {

namespace {

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};
std::atomic<bool> g_installed{false};

// Note [counted allocations]
// Each allocation asks the wrapped allocator for kHeader more bytes and hands
// out the memory after the header, which records the requested size and how
// the wrapped allocator frees the block. The DataPtr's context is its data
// pointer (as for the default CPU allocator), so Allocator::raw_allocate and
// raw_deallocate keep working: the deleter finds the header kHeader bytes
// before the pointer it is given. kHeader is the CPU allocator's alignment,
// so the data stays as aligned as the wrapped allocator made it.
constexpr size_t kHeader = 64;

struct Header {
  int64_t bytes;
  c10::DeleterFnPtr free_block;
  void* block_context;
};
static_assert(sizeof(Header) <= kHeader);

void note_allocated(int64_t bytes) {
  const int64_t live = g_live.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
}

void counted_delete(void* data) {
  if (data == nullptr) return;
  auto* header = reinterpret_cast<Header*>(static_cast<char*>(data) - kHeader);
  g_live.fetch_sub(header->bytes, std::memory_order_relaxed);
  header->free_block(header->block_context);
}

class CountingCpuAllocator final : public c10::Allocator {
 public:
  explicit CountingCpuAllocator(c10::Allocator* wrapped) : wrapped_(wrapped) {}

  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr block = wrapped_->allocate(bytes + kHeader);
    char* base = static_cast<char*>(block.get());
    auto* header = reinterpret_cast<Header*>(base);
    header->bytes = static_cast<int64_t>(bytes);
    header->free_block = block.get_deleter();
    header->block_context = block.release_context();
    note_allocated(header->bytes);
    void* data = base + kHeader;
    return {data, data, &counted_delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &counted_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  c10::Allocator* wrapped_;
};

std::mutex g_install_mutex;

}  // namespace

void install_tensor_memory_counter() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (g_installed.load()) return;
  // Never freed: storage made through it may outlive every other object.
  static auto* counter = new CountingCpuAllocator(c10::GetCPUAllocator());
  // Priority 1 wins over the default CPU allocator's registration (0).
  c10::SetCPUAllocator(counter, /*priority=*/1);
  g_installed.store(true);
}

bool tensor_memory_counter_installed() { return g_installed.load(); }

int64_t tensor_memory_live_bytes() { return g_live.load(std::memory_order_relaxed); }

int64_t tensor_memory_peak_bytes() { return g_peak.load(std::memory_order_relaxed); }

void reset_tensor_memory_peak() { g_peak.store(g_live.load(std::memory_order_relaxed), std::memory_order_relaxed); }

}  // namespace loom

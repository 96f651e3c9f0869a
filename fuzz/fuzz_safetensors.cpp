// Fuzz target: the safetensors reader (checkpoints/safetensors.cpp). The input
// is a whole file image; parse_header is what File::open runs on the mapped
// file before handing out any tensor view. Besides "accepted or BadInput",
// an accepted file must keep every tensor inside the data buffer with exactly
// numel * dtype_size bytes.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <span>
#include <string>

#include "checkpoints/safetensors.h"
#include "fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace st = loom::safetensors;
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  loom::fuzz::expect_accept_or_bad_input("safetensors::parse_header", [&] {
    std::map<std::string, std::string> metadata;
    uint64_t data_start = 0;
    const auto tensors = st::parse_header(bytes, "fuzz.safetensors", &metadata, &data_start);
    if (data_start > size) {
      std::fprintf(stderr, "accepted a data buffer starting at %llu past the file's %zu bytes\n",
                   static_cast<unsigned long long>(data_start), size);
      std::abort();
    }
    for (const auto& t : tensors) {
      const uint64_t expected = static_cast<uint64_t>(t.numel()) * st::dtype_size(t.dtype);
      if (t.begin > t.end || t.end > size - data_start || t.end - t.begin != expected) {
        std::fprintf(stderr, "accepted tensor '%s' with bytes [%llu, %llu) for %llu expected, buffer %llu\n",
                     t.name.c_str(), static_cast<unsigned long long>(t.begin),
                     static_cast<unsigned long long>(t.end), static_cast<unsigned long long>(expected),
                     static_cast<unsigned long long>(size - data_start));
        std::abort();
      }
    }
  });
  return 0;
}

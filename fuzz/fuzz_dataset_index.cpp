// Fuzz target: the dataset index reader (DatasetIndex::parse in
// data/dataset.cpp), which Dataset::open runs on DIR/index.json before it
// opens any shard. An accepted index must also survive its own round trip:
// to_json() parses again to the same text.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "data/dataset.h"
#include "fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  loom::fuzz::expect_accept_or_bad_input("DatasetIndex::parse", [&] {
    const loom::DatasetIndex index = loom::DatasetIndex::parse(text, "fuzz/index.json");
    const std::string json = index.to_json();
    const std::string again = loom::DatasetIndex::parse(json, "fuzz/index.json (round trip)").to_json();
    if (again != json) {
      std::fprintf(stderr, "to_json is not a fixed point:\n%s\n---\n%s\n", json.c_str(), again.c_str());
      std::abort();
    }
  });
  return 0;
}

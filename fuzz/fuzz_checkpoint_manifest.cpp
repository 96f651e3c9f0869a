// Fuzz target: the checkpoint manifest reader (parse_checkpoint_manifest in
// checkpoints/checkpoint_manifest.cpp, with the model_config reader of
// checkpoints/hf_config.cpp). open_loom_checkpoint_files runs it on
// CHECKPOINT/manifest.json before it looks at any file the manifest names;
// the rest of that function (sizes, CRC32C, safetensors headers) needs
// libtorch's ModelFiles and is covered by fuzz_safetensors and the unit tests.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "checkpoints/checkpoint_manifest.h"
#include "fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  loom::fuzz::expect_accept_or_bad_input("parse_checkpoint_manifest", [&] {
    const loom::CheckpointManifest manifest = loom::parse_checkpoint_manifest(text, "fuzz/manifest.json");
    // An accepted file name stays inside the checkpoint folder.
    for (const auto& file : manifest.files) {
      if (file.name.empty() || file.name == "." || file.name == ".." || file.name.find('/') != std::string::npos) {
        std::fprintf(stderr, "accepted file name '%s' outside the folder\n", file.name.c_str());
        std::abort();
      }
    }
  });
  return 0;
}

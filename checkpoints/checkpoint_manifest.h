// manifest.json of a loom checkpoint folder (checkpoints/loom_checkpoint.h),
// parsed and validated without touching the folder or libtorch, so that the
// same parser runs under the fuzzer (fuzz/fuzz_checkpoint_manifest.cpp) and
// in torch-free unit tests. open_loom_checkpoint_files then checks the files
// it names against their sizes, checksums and safetensors headers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"

namespace loom {

inline constexpr int kCheckpointFormatVersion = 1;

// One entry of the manifest's `files`.
struct ManifestFile {
  std::string name;    // inside the checkpoint folder: no '/', not ".."
  uint64_t bytes = 0;
  std::string crc32c;  // as written: 8 hex digits for a file loom wrote
  std::string kind = "model";  // `kind` as written ("model" when absent): "optimizer", "trainer", ...
  bool is_model = true;        // kind "model": the file holds parameters
};

// A parallel layout: the manifest's `layout` (how the files are cut; loom
// writes whole tensors, 1 x 1 x 1) and `saved_by` (the run that saved them).
struct ManifestLayout {
  int64_t dp = 1;
  int64_t tp = 1;
  int64_t pp = 1;
  int64_t world = 1;
  int64_t zero_stage = 0;
};

// One entry of the manifest's `tensors`: a whole tensor (slice [0, d) in
// every dimension). A slice of a tensor (a parallel layout's checkpoint) is
// refused: this build reads single-rank checkpoints only.
struct ManifestTensor {
  std::string name;
  std::vector<int64_t> shape;
};

struct CheckpointManifest {
  int64_t step = 0;
  ModelConfig model;
  std::vector<ManifestFile> files;      // in the manifest's order
  std::vector<ManifestTensor> tensors;  // likewise
  std::optional<std::string> tokenizer;  // folder name inside the checkpoint
  ManifestLayout layout;                 // all 1 when absent
  std::optional<ManifestLayout> saved_by;  // absent in checkpoints written before it existed
};

// Parses manifest.json's text. Every problem is BadInput starting with
// `where` (the manifest's path) and naming the key.
CheckpointManifest parse_checkpoint_manifest(const std::string& text, const std::string& where);

}  // namespace loom

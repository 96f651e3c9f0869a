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

#include "checkpoints/regions.h"
#include "config/config.h"

namespace loom {

// Version 2 (written since sharded checkpoints): every tensor lists its
// pieces, each in the file of the rank that wrote it (Note [pieces are boxes
// with a flat range]), with a CRC32C per chunk of its bytes. Version 1 (whole
// tensors in model-rank00000.safetensors) is still read: each of its tensors
// is one whole piece, and its files are verified whole when opened.
inline constexpr int kCheckpointFormatVersion = 2;
// Bytes of a piece covered by one CRC32C of its `crc32c` list.
inline constexpr int64_t kCrcChunkBytes = int64_t{4} << 20;

// One entry of the manifest's `files`.
struct ManifestFile {
  std::string name;    // inside the checkpoint folder: no '/', not ".."
  uint64_t bytes = 0;
  std::string crc32c;  // as written: 8 hex digits for a file loom wrote
  std::string kind = "model";  // `kind` as written ("model" when absent): "optimizer", "trainer", ...
  bool is_model = true;        // kind "model": the file holds parameters
};

// A parallel layout: the manifest's `layout` (how the files are cut: the
// layout of the run that wrote them) and `saved_by` (the run that saved them).
struct ManifestLayout {
  int64_t dp = 1;
  int64_t tp = 1;
  int64_t pp = 1;
  int64_t world = 1;
  int64_t zero_stage = 0;
};

// One stored piece of a tensor: the tensor `key` of safetensors file `file`
// holds the elements of `region`, in its row-major order.
struct ManifestPiece {
  std::string file;
  std::string key;
  Region region;
  // CRC32C of each kCrcChunkBytes of the piece's bytes (the last chunk may be
  // shorter); empty in version 1, whose files are verified whole.
  std::vector<uint32_t> chunk_crc32c;
};

// One entry of the manifest's `tensors`: the global tensor and its pieces,
// which together hold each of its elements once.
struct ManifestTensor {
  std::string name;
  std::string dtype;  // safetensors name: "F32", "BF16", ...
  std::vector<int64_t> shape;
  std::vector<ManifestPiece> pieces;
  bool is_model = true;  // its pieces are in files of kind "model" (else: optimizer state)
};

struct CheckpointManifest {
  int64_t version = kCheckpointFormatVersion;
  int64_t step = 0;
  ModelConfig model;
  std::vector<ManifestFile> files;      // in the manifest's order
  std::vector<ManifestTensor> tensors;  // likewise: the parameters, then (version 2) the optimizer state
  std::optional<std::string> tokenizer;  // folder name inside the checkpoint
  ManifestLayout layout;                 // all 1 when absent
  std::optional<ManifestLayout> saved_by;  // absent in checkpoints written before it existed
};

// Parses manifest.json's text. Every problem is BadInput starting with
// `where` (the manifest's path) and naming the key.
CheckpointManifest parse_checkpoint_manifest(const std::string& text, const std::string& where);

}  // namespace loom

// loom's own checkpoint folder, the form `loom import` writes and training
// resumes from:
//
//   CHECKPOINT/
//     manifest.json                 format, step, layout, model config (in
//                                   Hugging Face's config.json vocabulary),
//                                   every tensor's global shape and the slice
//                                   each file holds, each file's size and CRC32C
//     model-rank00000.safetensors   the parameters held by rank 0 (one file per rank)
//     tokenizer/                    tokenizer files, when known
//     config.yaml                   the resolved run config, when written by a run
//
// The folder is written under a temporary name, fsynced and renamed, so it is
// whole or absent. Opening verifies sizes and checksums before any read.
#pragma once

#include <cstdint>
#include <string>

#include "checkpoints/hub.h"
#include "trainer/model/llama.h"

namespace loom {

inline constexpr int kCheckpointFormatVersion = 1;

struct CheckpointWriteOptions {
  int64_t step = 0;
  std::string tokenizer_dir;  // tokenizer files to copy ("" = none)
  std::string config_yaml;    // resolved run config ("" = none)
};

// Writes a single-rank checkpoint of `model` at `dir` (which must not exist).
void write_loom_checkpoint(const LlamaForCausalLM& model, const std::string& dir,
                           const CheckpointWriteOptions& options);

// Opens and verifies a checkpoint folder (used by ModelFiles::open).
ModelFiles open_loom_checkpoint_files(const std::string& path);

}  // namespace loom

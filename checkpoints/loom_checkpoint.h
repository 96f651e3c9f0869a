// loom's own checkpoint folder, the form `loom import` writes and training
// resumes from:
//
//   CHECKPOINT/
//     manifest.json                 format, step, layout, model config (in
//                                   Hugging Face's config.json vocabulary),
//                                   every tensor's global shape and the slice
//                                   each file holds, each file's size and CRC32C
//     model-rank00000.safetensors   the parameters held by rank 0 (one file per rank)
//     optimizer-rank00000.safetensors  training runs only: AdamW state (see optim/optimizer.h)
//     trainer-state-rank00000.json  training runs only: step, data position, RNG state
//     tokenizer/                    tokenizer files, when known
//     config.yaml                   the resolved run config, when written by a run
//
// The folder is written under a temporary name, fsynced and renamed, so it is
// whole or absent. Opening verifies sizes and checksums before any read.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint_manifest.h"  // kCheckpointFormatVersion, the manifest parser
#include "checkpoints/hub.h"
#include "model/llama.h"

namespace loom {

// A file besides the model weights, e.g. the optimizer state. It is written
// into the temporary folder before the manifest and listed in the manifest's
// `files` with its size, CRC32C and `kind`, so opening the checkpoint
// verifies it like the weights. Only files of kind "model" hold parameters.
struct CheckpointExtraFile {
  std::string name;  // file name inside the checkpoint folder (no '/')
  std::string kind;  // manifest `kind`: "optimizer", "trainer_state", ...
  // Writes the whole file at `path` and returns the CRC32C of its bytes
  // (taken while writing, so the file is not read back).
  std::function<uint32_t(const std::string& path)> write;
};

struct CheckpointWriteOptions {
  int64_t step = 0;
  std::string tokenizer_dir;  // tokenizer files to copy ("" = none)
  std::string config_yaml;    // resolved run config ("" = none)
  std::vector<CheckpointExtraFile> extra_files;
  // The layout of the run that saved it (dp, tp, pp, world, zero_stage), kept
  // in the manifest as `saved_by` for `loom inspect`; the files themselves
  // always hold whole tensors (`layout`).
  std::map<std::string, int64_t> saved_by;
};

// One parameter of a checkpoint written as a stream: the name, dtype and
// shape are known up front, and `produce` returns the values (a contiguous
// CPU tensor of that dtype and shape) when the writer reaches the tensor.
// The writer drops each tensor once its bytes are written, so a model larger
// than memory can be written when `produce` makes its tensor on demand.
struct CheckpointTensor {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  std::function<torch::Tensor()> produce;
};

// Writes a single-rank checkpoint of a model with config `model` at `dir`
// (which must not exist): the parameters in the order given, into
// model-rank00000.safetensors, their CRC32C taken as they are written.
void write_loom_checkpoint(const ModelConfig& model, const std::vector<CheckpointTensor>& tensors,
                           const std::string& dir, const CheckpointWriteOptions& options);

// The same for the parameters of `model` (moved to the CPU one at a time).
void write_loom_checkpoint(const LlamaForCausalLM& model, const std::string& dir,
                           const CheckpointWriteOptions& options);

// Opens and verifies a checkpoint folder (used by ModelFiles::open): every
// file in the manifest is checked against its size and CRC32C; only files of
// kind "model" (the default when `kind` is absent) are opened as weights.
ModelFiles open_loom_checkpoint_files(const std::string& path);

}  // namespace loom

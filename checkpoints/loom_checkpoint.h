// loom's own checkpoint folder, the form `loom import` writes and training
// resumes from:
//
//   CHECKPOINT/
//     manifest.json                 format, step, layout, model config (in
//                                   Hugging Face's config.json vocabulary),
//                                   every tensor's global shape and the slice
//                                   each file holds, each file's size and CRC32C
//     model-rankNNNNN.safetensors   the pieces of the parameters rank NNNNN wrote
//     optimizer-rankNNNNN.safetensors  training runs only: its pieces of the AdamW state
//     trainer-state-rank00000.json  training runs only: step, data position, RNG state
//     tokenizer/                    tokenizer files, when known
//     origin/                       what the base model came with (origin.json:
//                                   its Hub id and license; its generation_config.json),
//                                   when the run started from model.init_from
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
#include "checkpoints/regions.h"
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
  ModelOrigin origin;         // written into origin/ unless empty (Note [what an export carries])
  std::string config_yaml;    // resolved run config ("" = none)
  std::vector<CheckpointExtraFile> extra_files;
  // The layout of the run that saved it (dp, tp, pp, world, zero_stage), kept
  // in the manifest as `layout` (how its files are cut) and `saved_by`.
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

// --- sharded checkpoints (docs/checkpoints.md) --------------------------------
// Every rank writes the pieces it owns into the temporary folder
// (write_rank_files); one rank then folds what each wrote into manifest.json
// and commits the folder (commit_checkpoint_folder).

// One piece a rank stores: the elements of `region` of the global tensor
// `name` of `shape`, produced on demand as a contiguous CPU tensor of
// `dtype` with region.numel() elements (any shape).
struct PieceToWrite {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  Region region;
  std::function<torch::Tensor()> produce;
};

// Writes model-rankNNNNN.safetensors (`model`) and, when `optimizer` is not
// empty, optimizer-rankNNNNN.safetensors into `dir`, fsynced, each piece's
// CRC32Cs taken per kCrcChunkBytes as it is written. Returns what the rank
// wrote, as JSON text for commit_checkpoint_folder: its files (bytes, CRC32C,
// kind) and its pieces. A rank with nothing to write writes no file.
std::string write_rank_files(const std::string& dir, int64_t rank, const std::vector<PieceToWrite>& model,
                             const std::vector<PieceToWrite>& optimizer);

// Writes manifest.json into `tmp` from the ranks' write_rank_files results,
// then the options' extra files, tokenizer and config, fsyncs, and renames
// `tmp` to `dir` (which must not exist). BadInput when the pieces do not hold
// every element of every tensor exactly once.
void commit_checkpoint_folder(const ModelConfig& model, const std::vector<std::string>& rank_files,
                              const std::string& tmp, const std::string& dir, const CheckpointWriteOptions& options);

// Opens and verifies a checkpoint folder (used by ModelFiles::open): the
// manifest against the files' sizes and safetensors headers; a version 1
// checkpoint's files also against their CRC32C. A version 2 checkpoint's
// bytes are checked chunk by chunk as they are read (ModelFiles::read_region),
// or whole by verify_checkpoint_files.
ModelFiles open_loom_checkpoint_files(const std::string& path);

// Reads every file of the checkpoint and compares its size and CRC32C with
// the manifest's (`loom inspect`). Returns "FILE: why" for each failure
// (empty when all pass); BadInput for an unreadable manifest.
std::vector<std::string> verify_checkpoint_files(const std::string& path);

}  // namespace loom

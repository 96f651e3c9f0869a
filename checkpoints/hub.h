// Models on disk: Hugging Face Hub folders and loom checkpoints, opened the
// same way, loaded into a LlamaForCausalLM, and exported to the Hub format.
//
// A Hub folder holds config.json, model.safetensors (or
// model-0000K-of-0000N.safetensors plus model.safetensors.index.json),
// generation_config.json, tokenizer files and a README.md model card.
// A loom checkpoint holds manifest.json and per-rank safetensors files (see
// checkpoints/loom_checkpoint.h).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "checkpoints/checkpoint_manifest.h"
#include "checkpoints/model_origin.h"
#include "checkpoints/regions.h"
#include "checkpoints/safetensors.h"
#include "config/config.h"
#include "model/llama.h"

namespace loom {

// Tokenizer files copied along with a model when present: every file
// transformers' AutoTokenizer reads (transformers 5 keeps the chat template
// only in chat_template.jinja; chat_template.json holds a multimodal
// processor's). Note [what an export carries] in checkpoints/model_origin.h.
inline const std::vector<std::string> kTokenizerFiles = {
    "tokenizer.json",      "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model",       "vocab.json",              "merges.txt",
    "added_tokens.json"};

// A model's tensors on disk, opened and validated but not yet read.
class ModelFiles {
 public:
  // `path` is a Hub folder (has config.json) or a loom checkpoint (has
  // manifest.json). Throws BadInput naming the path and what is missing.
  static ModelFiles open(const std::string& path);

  enum class Kind { kHub, kLoomCheckpoint };
  Kind kind() const { return kind_; }
  const std::string& path() const { return path_; }
  const ModelConfig& model_config() const { return model_; }
  // Folder that holds tokenizer files, or "" when there are none.
  const std::string& tokenizer_dir() const { return tokenizer_dir_; }
  // What the model came with (base model, license, generation_config.json):
  // a Hub folder's own, or what a loom checkpoint recorded in origin/.
  const ModelOrigin& origin() const { return origin_; }
  // Training step for loom checkpoints, 0 for Hub folders.
  int64_t step() const { return step_; }
  // A loom checkpoint's manifest.json, parsed and checked against the folder
  // by open(); nullptr for Hub folders.
  const CheckpointManifest* manifest() const { return manifest_ ? &*manifest_ : nullptr; }

  // The model's tensors (not the optimizer state), in the order stored.
  std::vector<std::string> tensor_names() const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // The global tensor's name, dtype and shape (begin and end are 0: a
  // tensor may be stored in several pieces).
  const safetensors::TensorInfo& info(const std::string& name) const;
  // The file holding the tensor (its first piece), for messages.
  const std::string& file_of(const std::string& name) const;
  // A CPU tensor holding a copy of the stored values, in the stored dtype.
  torch::Tensor read(const std::string& name) const;
  // Copies the elements of `region` of tensor `name` (optimizer state
  // included) into `out`, a contiguous CPU tensor of region.numel() elements
  // in any floating-point dtype, converting from the stored one. Only the
  // bytes of the stored pieces that overlap the region are read (pread, no
  // memory map), and each chunk read is checked against its CRC32C first.
  // BadInput naming the file and tensor for a chunk that fails its checksum,
  // or for elements no piece holds.
  void read_region(const std::string& name, const Region& region, torch::Tensor& out) const;
  // Every stored tensor's name, optimizer state included.
  std::vector<std::string> stored_names() const;
  const std::vector<safetensors::File>& files() const { return files_; }

 private:
  friend ModelFiles open_loom_checkpoint_files(const std::string& path);
  // One stored piece: the tensor starting at byte `begin` of files_[file].
  struct StoredPiece {
    size_t file = 0;
    uint64_t begin = 0;
    Region region;
    std::vector<uint32_t> chunk_crc32c;  // empty: the file was verified whole
  };
  struct StoredTensor {
    safetensors::TensorInfo info;
    std::vector<StoredPiece> pieces;
    bool is_model = true;
  };
  // Adds every tensor of the safetensors file at `file_path` as one whole piece.
  void add_file(const std::string& file_path, bool is_model = true);
  void add_tensor(StoredTensor tensor);
  // Phi-3's fused qkv_proj and gate_up_proj seen as the model's q/k/v and
  // gate/up (Note [fused projections] in fused_projections.h; defined in
  // fused_projections.cpp).
  void split_fused_projections();
  const StoredTensor& stored(const std::string& name) const;

  Kind kind_ = Kind::kHub;
  std::string path_;
  ModelConfig model_;
  std::string tokenizer_dir_;
  ModelOrigin origin_;
  int64_t step_ = 0;
  std::optional<CheckpointManifest> manifest_;
  std::vector<safetensors::File> files_;
  std::vector<StoredTensor> tensors_;    // in the order stored
  std::map<std::string, size_t> index_;  // tensor name -> index in tensors_
};

// Checks, without reading tensor data, that `files` hold exactly the
// parameters of `model` with their shapes and a floating-point dtype. Throws
// BadInput naming the file and tensor.
void verify_weights(const LlamaForCausalLM& model, const ModelFiles& files);

// Copies every parameter of `model` from `files`, converting to the model's
// dtype. Throws BadInput naming the file and tensor for a missing tensor, a
// wrong shape, an unsupported dtype or a tensor the model does not have.
void load_weights(LlamaForCausalLM& model, const ModelFiles& files);

// Builds a model from the files' config and loads it (fp32 unless `dtype`).
std::shared_ptr<LlamaForCausalLM> load_model(const ModelFiles& files, torch::ScalarType dtype = torch::kFloat);

struct ExportOptions {
  torch::ScalarType dtype = torch::kFloat;  // stored dtype of the weights
  uint64_t max_shard_bytes = 5ull << 30;    // larger models are split into shards
  std::string tokenizer_dir;                // tokenizer files to copy ("" = none)
  std::string model_name = "loom-model";    // for the model card
  std::string card_notes;                   // extra lines for the model card
  // The base model: its generation_config.json is written as it was (else
  // loom writes bos/eos from the config), its Hub id and license go into the
  // card's metadata.
  ModelOrigin origin;
  std::vector<std::string> datasets;  // Hub ids of the training data, for the card ("" entries skipped)
};

// Writes a Hub folder at `out_dir` (which must not exist) from the model's
// parameters, through a temporary folder renamed at the end so a crash never
// leaves a half-written export.
void export_hub(const LlamaForCausalLM& model, const std::string& out_dir, const ExportOptions& options);

// The same from the tensors of `files` (a loom checkpoint or a Hub folder),
// streamed: each tensor is read in pieces of a few MiB, converted and written,
// so memory stays bounded by those pieces whatever the model's size (the
// parameter names, order and shapes come from a model whose storage is never
// touched). Returns the size in bytes of the largest stored tensor.
uint64_t export_hub_streaming(const ModelFiles& files, const std::string& out_dir, const ExportOptions& options);

// Parses a size such as "500MB", "2GiB", "123456" into bytes; BadInput otherwise.
uint64_t parse_byte_size(const std::string& text, const std::string& context);

}  // namespace loom

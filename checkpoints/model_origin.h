// What a model came with, carried from the folder a run starts from
// (model.init_from) into its checkpoints and its Hub exports: the base
// model's Hub id and license for the model card, and generation_config.json
// as it was. Torch-free.
//
// Note [what an export carries]
// A fine-tune's export must load and generate as its base model did:
//   - the tokenizer files transformers reads (kTokenizerFiles in
//     checkpoints/hub.h, chat_template.jinja included: transformers 5 keeps
//     the chat template only there), from data.tokenizer's folder when set
//     (a fine-tune's added tokens live there), else from model.init_from;
//   - generation_config.json byte for byte (an eos list such as Llama-3.1's
//     [128001, 128008, 128009] and the sampling defaults); loom writes its
//     own only when the base model has none;
//   - the model card's base_model and license.
// A run's checkpoints hold copies of all of it (the tokenizer files in
// tokenizer/, the rest in origin/), not the path of model.init_from: a
// checkpoint is exported, resumed or moved long after the base model's folder
// was deleted or moved, and these files are a few MiB at most.
#pragma once

#include <string>

namespace loom {

struct ModelOrigin {
  // The base model's Hub id ("meta-llama/Llama-3.1-8B-Instruct") when it can
  // be known, else its folder's name; "" = none (random initialization).
  std::string base_model;
  // The base model card's `license` (and, for license "other", its
  // license_name and license_link); "" = none.
  std::string license;
  std::string license_name;
  std::string license_link;
  // generation_config.json of the base model, as it was; "" = none.
  std::string generation_config_json;

  bool empty() const { return base_model.empty() && generation_config_json.empty(); }
};

// The origin of a Hub folder, or of a loom checkpoint (what its origin/
// subfolder recorded; empty when it has none). Throws BadInput for a file it
// cannot read, or a checkpoint's origin.json that is not a JSON object.
ModelOrigin origin_of_model_folder(const std::string& path);

// The Hub id of a model folder: ORG/NAME of the Hugging Face cache layout
// (.../models--ORG--NAME/snapshots/REVISION), else config.json's
// _name_or_path when it reads as a Hub id, else the folder's name.
std::string hub_id_of_folder(const std::string& path);

// The folder holding a model folder's tokenizer files: a Hub folder itself
// (when it has tokenizer.json or tokenizer_config.json), a loom checkpoint's
// tokenizer/; "" when it has none.
std::string tokenizer_dir_of_model_folder(const std::string& path);

// The Hub id of a dataset in the Hugging Face cache layout
// (.../datasets--ORG--NAME/...), for the model card; "" otherwise.
std::string hub_dataset_id_of(const std::string& path);

// Writes `origin` into `dir` (created): origin.json and generation_config.json.
void write_origin(const ModelOrigin& origin, const std::string& dir);

// A loom checkpoint's subfolder holding its origin.
inline constexpr const char* kOriginFolder = "origin";

// The value of a top-level scalar key of a model card's YAML front matter
// (quotes removed); "" when the card has no front matter or no such key.
std::string card_scalar(const std::string& readme, const std::string& key);

}  // namespace loom

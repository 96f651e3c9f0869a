// The start-up check that every dataset was tokenized by the model's
// tokenizer.
//
// Note [dataset tokenizer check]
// A dataset is ids; which tokens they mean is the tokenizer's business. Each
// dataset's index.json names the tokenizer `loom prepare` used by
// tokenizer_hash (Tokenizer::hash in data/tokenizer.h: the CRC-32C of its
// canonical JSON). The model's tokenizer is data.tokenizer when set (a
// fine-tune with added tokens prepares its data with its own tokenizer.json)
// and otherwise model.init_from's tokenizer.json. A dataset whose hash
// differs is refused before anything is built (exit 2), naming both hashes
// and files: trained on, its ids would teach the model other tokens without a
// word. data.allow_tokenizer_mismatch: true turns the refusal into a warning.
// Nothing is compared when the run has no tokenizer file (random init and no
// data.tokenizer), and a dataset with an empty tokenizer_hash (written by
// another tool) gets a warning only: there is nothing to compare.
#pragma once

#include <string>
#include <vector>

#include "config/config.h"

namespace loom {

struct DatasetTokenizer {
  std::string key;   // "data.train[0]", "data.valid"
  std::string path;  // the dataset folder
  std::string hash;  // its index.json tokenizer_hash ("" = none recorded)
};

// The tokenizer.json whose ids the model reads (data.tokenizer: the file, or
// a folder's tokenizer.json; else model.init_from's), and which key named it;
// both "" when there is none on disk.
struct ModelTokenizer {
  std::string path;
  std::string source;  // "data.tokenizer" or "model.init_from"
};
ModelTokenizer model_tokenizer_of(const Config& config);

// Every dataset the config trains and validates on, with its index.json's
// tokenizer_hash. BadInput for an index.json that cannot be read.
std::vector<DatasetTokenizer> dataset_tokenizers_of(const Config& config);

// Compares each dataset's hash with the model tokenizer's (Note [dataset
// tokenizer check]). Throws BadInput for the first mismatch unless
// data.allow_tokenizer_mismatch; returns the warnings to print.
std::vector<std::string> check_dataset_tokenizers(const Config& config, const std::vector<DatasetTokenizer>& datasets);

}  // namespace loom

#include "trainer/dataset_tokenizer.h"

#include <filesystem>

#include "checkpoints/model_origin.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

ModelTokenizer model_tokenizer_of(const Config& config) {
  if (!config.data.tokenizer.empty() && fs::exists(config.data.tokenizer)) {
    const fs::path named(config.data.tokenizer);
    const fs::path file = fs::is_directory(named) ? named / "tokenizer.json" : named;
    if (fs::exists(file)) return {file.string(), "data.tokenizer"};
  }
  if (!config.model.init_from.empty()) {
    const std::string dir = tokenizer_dir_of_model_folder(config.model.init_from);
    const fs::path file = fs::path(dir) / "tokenizer.json";
    if (!dir.empty() && fs::exists(file)) return {file.string(), "model.init_from"};
  }
  return {};
}

std::vector<DatasetTokenizer> dataset_tokenizers_of(const Config& config) {
  std::vector<DatasetTokenizer> out;
  auto add = [&](const std::string& key, const std::string& path) {
    const std::string index_path = (fs::path(path) / "index.json").string();
    if (!fs::exists(index_path)) return;  // the loader refuses it, naming what is missing
    out.push_back({key, path, DatasetIndex::parse(read_file(index_path), index_path).tokenizer_hash});
  };
  for (size_t i = 0; i < config.data.train.size(); ++i) {
    add("data.train[" + std::to_string(i) + "]", config.data.train[i].path);
  }
  if (!config.data.valid.empty()) add("data.valid", config.data.valid);
  return out;
}

std::vector<std::string> check_dataset_tokenizers(const Config& config, const std::vector<DatasetTokenizer>& datasets) {
  std::vector<std::string> warnings;
  const ModelTokenizer model = model_tokenizer_of(config);
  if (model.path.empty() || datasets.empty()) return warnings;
  // The hash `loom prepare` records (data/prepare.cpp), computed the same way.
  std::string model_hash, unreadable;
  try {
    model_hash = Tokenizer::load(model.path).hash();
  } catch (const BadInput& e) {
    unreadable = e.what();
  }
  for (const DatasetTokenizer& dataset : datasets) {
    const std::string index_path = (fs::path(dataset.path) / "index.json").string();
    if (dataset.hash.empty()) {
      warnings.push_back(dataset.key + " (" + index_path + ") records no tokenizer_hash, so it cannot be checked "
                         "against " + model.path + " (" + model.source + ")");
      continue;
    }
    if (dataset.hash == model_hash) continue;
    const std::string model_side =
        unreadable.empty() ? "the model's tokenizer " + model.path + " (" + model.source + ") has " + model_hash
                           : "the model's tokenizer " + model.path + " (" + model.source +
                                 ") cannot be hashed by loom (" + unreadable + ")";
    const std::string what = dataset.key + " (" + dataset.path + "): its tokenizer_hash " + dataset.hash + " (" +
                             index_path + ") differs: " + model_side;
    if (config.data.allow_tokenizer_mismatch) {
      warnings.push_back(what + "; training on it anyway (data.allow_tokenizer_mismatch: true)");
      continue;
    }
    throw BadInput(what + ". Its ids would mean other tokens: prepare it again with `loom prepare --tokenizer " +
                   model.path + "`, point data.tokenizer at the tokenizer it was prepared with, or set "
                   "data.allow_tokenizer_mismatch: true");
  }
  return warnings;
}

}  // namespace loom

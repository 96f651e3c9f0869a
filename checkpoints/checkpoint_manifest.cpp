#include "checkpoints/checkpoint_manifest.h"

#include <nlohmann/json.hpp>

#include "checkpoints/hf_config.h"
#include "util/error.h"

namespace loom {

namespace {

using nlohmann::json;
using vt = json::value_t;

// Field access with errors that name the manifest and key.
const json& field(const json& obj, const std::string& key, const std::string& where, vt type) {
  if (!obj.is_object() || !obj.contains(key)) throw BadInput(where + ": '" + key + "' is missing");
  const json& v = obj.at(key);
  const bool ok = v.type() == type || (type == vt::number_integer && v.is_number_unsigned());
  if (!ok) throw BadInput(where + ": '" + key + "' has the wrong type (" + v.type_name() + ")");
  return v;
}

int64_t integer(const json& v, const std::string& where) {
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) throw BadInput(where + ": " + v.dump() + " is too large");
    return static_cast<int64_t>(v.get<uint64_t>());
  }
  if (!v.is_number_integer()) throw BadInput(where + ": expected an integer, found " + v.dump());
  return v.get<int64_t>();
}

// `layout` or `saved_by`: an object of positive integers (zero_stage 0 or 1),
// each key optional.
ManifestLayout parse_layout(const json& object, const std::string& where) {
  if (!object.is_object()) throw BadInput(where + ": expected an object, found " + std::string(object.type_name()));
  ManifestLayout layout;
  for (auto [key, value] : {std::pair{"dp", &layout.dp}, std::pair{"tp", &layout.tp}, std::pair{"pp", &layout.pp},
                            std::pair{"world", &layout.world}}) {
    if (!object.contains(key)) continue;
    *value = integer(object.at(key), where + ": '" + key + "'");
    if (*value < 1) throw BadInput(where + ": '" + key + "' is " + std::to_string(*value) + ", expected at least 1");
  }
  if (object.contains("zero_stage")) {
    layout.zero_stage = integer(object.at("zero_stage"), where + ": 'zero_stage'");
    if (layout.zero_stage != 0 && layout.zero_stage != 1)
      throw BadInput(where + ": 'zero_stage' is " + std::to_string(layout.zero_stage) + ", expected 0 or 1");
  }
  return layout;
}

}  // namespace

CheckpointManifest parse_checkpoint_manifest(const std::string& text, const std::string& where) {
  json manifest;
  try {
    manifest = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw BadInput(where + ": not valid JSON (" + e.what() + ")");
  }
  if (field(manifest, "format", where, vt::string) != "loom-checkpoint") {
    throw BadInput(where + ": 'format' is not \"loom-checkpoint\"");
  }
  const int64_t version = integer(field(manifest, "version", where, vt::number_integer), where + ": 'version'");
  if (version != kCheckpointFormatVersion) {
    throw BadInput(where + ": format version " + std::to_string(version) + " is not supported (this loom reads " +
                   std::to_string(kCheckpointFormatVersion) + ")");
  }

  CheckpointManifest out;
  out.step = integer(field(manifest, "step", where, vt::number_integer), where + ": 'step'");
  out.model = model_config_from_hf(field(manifest, "model_config", where, vt::object), where + ": model_config");

  for (const auto& [name, entry] : field(manifest, "files", where, vt::object).items()) {
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      throw BadInput(where + ": file name '" + name + "' is not in the folder");
    const std::string file_where = where + ": files['" + name + "']";
    ManifestFile file;
    file.name = name;
    file.bytes = field(entry, "bytes", file_where, vt::number_unsigned).get<uint64_t>();
    file.crc32c = field(entry, "crc32c", file_where, vt::string).get<std::string>();
    // Optimizer and trainer state are verified like the weights but are not weights.
    if (entry.contains("kind")) file.kind = field(entry, "kind", file_where, vt::string).get<std::string>();
    file.is_model = file.kind == "model";
    out.files.push_back(std::move(file));
  }

  for (const auto& [name, entry] : field(manifest, "tensors", where, vt::object).items()) {
    const std::string tensor_where = where + ": tensors['" + name + "']";
    ManifestTensor tensor;
    tensor.name = name;
    const json& shape = field(entry, "shape", tensor_where, vt::array);
    for (size_t d = 0; d < shape.size(); ++d) {
      tensor.shape.push_back(integer(shape[d], tensor_where + ": shape[" + std::to_string(d) + "]"));
    }
    const json& slice = field(entry, "slice", tensor_where, vt::array);
    bool whole = slice.size() == tensor.shape.size();
    for (size_t d = 0; whole && d < tensor.shape.size(); ++d) {
      whole = slice[d].is_array() && slice[d].size() == 2 && slice[d][0] == 0 && slice[d][1] == tensor.shape[d];
    }
    if (!whole) {
      throw BadInput(tensor_where + ": holds a slice of the tensor (a parallel layout's checkpoint); this build "
                     "reads single-rank checkpoints only");
    }
    out.tensors.push_back(std::move(tensor));
  }

  if (manifest.contains("tokenizer") && manifest.at("tokenizer").is_string()) {
    out.tokenizer = manifest.at("tokenizer").get<std::string>();
  }
  if (manifest.contains("layout")) out.layout = parse_layout(manifest.at("layout"), where + ": layout");
  if (manifest.contains("saved_by")) out.saved_by = parse_layout(manifest.at("saved_by"), where + ": saved_by");
  return out;
}

}  // namespace loom

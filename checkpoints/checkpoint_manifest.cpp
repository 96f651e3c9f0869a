#include "checkpoints/checkpoint_manifest.h"

#include <algorithm>
#include <map>

#include <nlohmann/json.hpp>

#include "checkpoints/hf_config.h"
#include "util/error.h"

namespace loom {

namespace {

using nlohmann::json;
using vt = json::value_t;

constexpr const char* kVersion1File = "model-rank00000.safetensors";
constexpr int64_t kMaxElements = int64_t{1} << 48;

int64_t dtype_bytes(const std::string& dtype, const std::string& where) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "BF16" || dtype == "F16") return 2;
  if (dtype == "F64" || dtype == "I64") return 8;
  throw BadInput(where + ": dtype '" + dtype + "' is not one loom stores (F32, BF16, F16, F64, I32, I64)");
}

uint32_t parse_crc(const json& value, const std::string& where) {
  if (!value.is_string() || value.get<std::string>().size() != 8 ||
      value.get<std::string>().find_first_not_of("0123456789abcdef") != std::string::npos) {
    throw BadInput(where + ": " + value.dump() + " is not 8 lower-case hex digits");
  }
  return static_cast<uint32_t>(std::stoul(value.get<std::string>(), nullptr, 16));
}

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
    if (layout.zero_stage < 0 || layout.zero_stage > 3)
      throw BadInput(where + ": 'zero_stage' is " + std::to_string(layout.zero_stage) + ", expected 0 to 3");
  }
  return layout;
}


std::vector<int64_t> parse_shape(const json& shape, const std::string& where) {
  std::vector<int64_t> out;
  int64_t numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    const int64_t n = integer(shape[d], where + ": shape[" + std::to_string(d) + "]");
    if (n < 0 || n > kMaxElements) throw BadInput(where + ": shape[" + std::to_string(d) + "] is " + std::to_string(n));
    numel *= std::max<int64_t>(n, 1);
    if (numel > kMaxElements) throw BadInput(where + ": shape has more than 2^48 elements");
    out.push_back(n);
  }
  return out;
}

Range parse_range(const json& range, const std::string& where) {
  if (!range.is_array() || range.size() != 2) throw BadInput(where + ": expected [start, stop], found " + range.dump());
  const Range out{integer(range[0], where), integer(range[1], where)};
  if (out.first < 0 || out.first > out.second) throw BadInput(where + ": " + range.dump() + " is not a range");
  return out;
}

// Version 1: a whole tensor in the file it names (model-rank00000.safetensors).
ManifestTensor parse_whole_tensor(const std::string& name, const json& entry, const std::string& where) {
  const std::string tensor_where = where + ": tensors['" + name + "']";
  ManifestTensor tensor;
  tensor.name = name;
  tensor.shape = parse_shape(field(entry, "shape", tensor_where, vt::array), tensor_where);
  if (entry.contains("dtype")) tensor.dtype = field(entry, "dtype", tensor_where, vt::string).get<std::string>();
  const json& slice = field(entry, "slice", tensor_where, vt::array);
  bool whole = slice.size() == tensor.shape.size();
  for (size_t d = 0; whole && d < tensor.shape.size(); ++d) {
    whole = slice[d].is_array() && slice[d].size() == 2 && slice[d][0] == 0 && slice[d][1] == tensor.shape[d];
  }
  if (!whole) throw BadInput(tensor_where + ": a version 1 manifest holds whole tensors only");
  const std::string file =
      entry.contains("file") ? field(entry, "file", tensor_where, vt::string).get<std::string>() : kVersion1File;
  tensor.pieces.push_back({file, name, Region::whole(tensor.shape), {}});
  return tensor;
}

// Version 2: the tensor's pieces, each a region in a file the manifest lists.
ManifestTensor parse_tensor(const std::string& name, const json& entry, const std::string& where,
                            const std::map<std::string, const ManifestFile*>& files) {
  const std::string tensor_where = where + ": tensors['" + name + "']";
  ManifestTensor tensor;
  tensor.name = name;
  tensor.dtype = field(entry, "dtype", tensor_where, vt::string).get<std::string>();
  const int64_t element_bytes = dtype_bytes(tensor.dtype, tensor_where);
  tensor.shape = parse_shape(field(entry, "shape", tensor_where, vt::array), tensor_where);
  const int64_t numel = Region::whole(tensor.shape).box_numel();
  int64_t stored = 0;
  const json& pieces = field(entry, "pieces", tensor_where, vt::array);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const std::string piece_where = tensor_where + ": pieces[" + std::to_string(i) + "]";
    ManifestPiece piece;
    piece.file = field(pieces[i], "file", piece_where, vt::string).get<std::string>();
    const auto file = files.find(piece.file);
    if (file == files.end()) throw BadInput(piece_where + ": file '" + piece.file + "' is not in 'files'");
    const bool is_model = file->second->is_model;
    if (i == 0) tensor.is_model = is_model;
    if (is_model != tensor.is_model) throw BadInput(piece_where + ": in a file of another kind than pieces[0]");
    piece.key = field(pieces[i], "key", piece_where, vt::string).get<std::string>();
    const json& box = field(pieces[i], "box", piece_where, vt::array);
    if (box.size() != tensor.shape.size()) throw BadInput(piece_where + ": 'box' has another rank than 'shape'");
    for (size_t d = 0; d < box.size(); ++d) {
      const std::string range_where = piece_where + ": box[" + std::to_string(d) + "]";
      piece.region.box.push_back(parse_range(box[d], range_where));
      if (piece.region.box.back().second > tensor.shape[d]) throw BadInput(range_where + ": outside the tensor");
    }
    if (pieces[i].contains("flat")) {
      piece.region.flat = parse_range(pieces[i].at("flat"), piece_where + ": flat");
      if (piece.region.flat->second > piece.region.box_numel()) throw BadInput(piece_where + ": 'flat' outside the box");
    }
    const int64_t bytes = piece.region.numel() * element_bytes;
    const json& crcs = field(pieces[i], "crc32c", piece_where, vt::array);
    if (static_cast<int64_t>(crcs.size()) != (bytes + kCrcChunkBytes - 1) / kCrcChunkBytes) {
      throw BadInput(piece_where + ": " + std::to_string(crcs.size()) + " checksums for " + std::to_string(bytes) +
                     " bytes (one per " + std::to_string(kCrcChunkBytes) + ")");
    }
    for (const json& crc : crcs) piece.chunk_crc32c.push_back(parse_crc(crc, piece_where + ": crc32c"));
    stored += piece.region.numel();
    tensor.pieces.push_back(std::move(piece));
  }
  if (stored != numel) {
    throw BadInput(tensor_where + ": its pieces hold " + std::to_string(stored) + " elements, the tensor has " +
                   std::to_string(numel));
  }
  return tensor;
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
  if (version != 1 && version != kCheckpointFormatVersion) {
    throw BadInput(where + ": format version " + std::to_string(version) + " is not supported (this loom reads 1 and " +
                   std::to_string(kCheckpointFormatVersion) + ")");
  }

  CheckpointManifest out;
  out.version = version;
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

  std::map<std::string, const ManifestFile*> files_by_name;
  for (const ManifestFile& file : out.files) files_by_name[file.name] = &file;
  for (const auto& [name, entry] : field(manifest, "tensors", where, vt::object).items()) {
    out.tensors.push_back(version == 1 ? parse_whole_tensor(name, entry, where)
                                       : parse_tensor(name, entry, where, files_by_name));
  }

  if (manifest.contains("tokenizer") && manifest.at("tokenizer").is_string()) {
    out.tokenizer = manifest.at("tokenizer").get<std::string>();
  }
  if (manifest.contains("layout")) out.layout = parse_layout(manifest.at("layout"), where + ": layout");
  if (manifest.contains("saved_by")) out.saved_by = parse_layout(manifest.at("saved_by"), where + ": saved_by");
  return out;
}

}  // namespace loom

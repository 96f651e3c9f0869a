#include "checkpoints/loom_checkpoint.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "checkpoints/hf_config.h"
#include "checkpoints/torch_tensors.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kRankZeroFile = "model-rank00000.safetensors";

std::string hex32(uint32_t value) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "%08x", value);
  return buffer;
}

// Field access on the manifest with errors that name the manifest and key.
const json& field(const json& obj, const std::string& key, const std::string& where, json::value_t type) {
  if (!obj.is_object() || !obj.contains(key)) throw BadInput(where + ": '" + key + "' is missing");
  const json& v = obj.at(key);
  const bool ok = v.type() == type || (type == json::value_t::number_integer && v.is_number_unsigned());
  if (!ok) throw BadInput(where + ": '" + key + "' has the wrong type (" + v.type_name() + ")");
  return v;
}

}  // namespace

void write_loom_checkpoint(const ModelConfig& model, const std::vector<CheckpointTensor>& tensors,
                           const std::string& dir, const CheckpointWriteOptions& options) {
  const fs::path out(dir);
  if (fs::exists(out)) throw BadInput("checkpoint folder '" + dir + "' already exists");
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  fs::create_directories(parent);
  const fs::path tmp = parent / (out.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    std::vector<safetensors::TensorHeader> headers;
    json manifest_tensors = json::object();
    for (const auto& tensor : tensors) {
      const safetensors::Dtype dtype = to_safetensors_dtype(tensor.dtype);
      headers.push_back({tensor.name, dtype, tensor.shape});
      json slice = json::array();
      for (int64_t d : tensor.shape) slice.push_back({0, d});
      manifest_tensors[tensor.name] = {{"dtype", safetensors::dtype_name(dtype)},
                                       {"shape", tensor.shape},
                                       {"file", kRankZeroFile},
                                       {"slice", slice}};
    }
    const std::string model_path = (tmp / kRankZeroFile).string();
    safetensors::StreamWriter writer(model_path, headers);
    for (const auto& tensor : tensors) {
      const torch::Tensor values = tensor.produce();
      if (values.device().type() != torch::kCPU || !values.is_contiguous() || values.scalar_type() != tensor.dtype ||
          values.sizes().vec() != tensor.shape) {
        throw std::logic_error("checkpoint tensor '" + tensor.name + "' was produced with another dtype, shape or "
                               "layout than announced");
      }
      writer.append(std::as_bytes(std::span(static_cast<const std::byte*>(values.data_ptr()), values.nbytes())));
    }
    writer.commit();

    json manifest;
    manifest["format"] = "loom-checkpoint";
    manifest["version"] = kCheckpointFormatVersion;
    manifest["step"] = options.step;
    manifest["layout"] = {{"dp", 1}, {"tp", 1}, {"pp", 1}, {"world", 1}};
    const std::string dtype = hf_dtype_name(tensors.empty() ? torch::kFloat : tensors.front().dtype);
    manifest["model_config"] = json::parse(model_config_to_hf(model, dtype).dump());
    manifest["tensors"] = manifest_tensors;
    manifest["files"] = {{kRankZeroFile, {{"bytes", writer.file_bytes()},
                                          {"crc32c", hex32(writer.crc32c())},
                                          {"kind", "model"}}}};
    for (const auto& extra : options.extra_files) {
      if (extra.name.empty() || extra.name.find('/') != std::string::npos || manifest["files"].contains(extra.name)) {
        throw std::invalid_argument("checkpoint extra file name '" + extra.name + "' is empty, a path or repeated");
      }
      const std::string extra_path = (tmp / extra.name).string();
      const uint32_t crc = extra.write(extra_path);
      manifest["files"][extra.name] = {{"bytes", fs::file_size(extra_path)},
                                       {"crc32c", hex32(crc)},
                                       {"kind", extra.kind}};
    }
    manifest["tokenizer"] = nullptr;
    if (!options.tokenizer_dir.empty()) {
      bool any = false;
      for (const auto& name : kTokenizerFiles) {
        const fs::path source = fs::path(options.tokenizer_dir) / name;
        if (!fs::exists(source)) continue;
        fs::create_directories(tmp / "tokenizer");
        write_file_atomic((tmp / "tokenizer" / name).string(), read_file(source.string()));
        any = true;
      }
      if (any) {
        fsync_directory((tmp / "tokenizer").string());
        manifest["tokenizer"] = "tokenizer";
      }
    }
    if (!options.config_yaml.empty()) write_file_atomic((tmp / "config.yaml").string(), options.config_yaml);
    // The manifest is written last: a folder with a manifest is complete.
    write_file_atomic((tmp / "manifest.json").string(), manifest.dump(2) + "\n");
    fsync_directory(tmp.string());
    fs::rename(tmp, out);
    fsync_directory(parent.string());
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
}

void write_loom_checkpoint(const LlamaForCausalLM& model, const std::string& dir,
                           const CheckpointWriteOptions& options) {
  std::vector<CheckpointTensor> tensors;
  for (const auto& named : model.named_parameters()) {
    const torch::Tensor& p = named.value();
    tensors.push_back({named.key(), p.scalar_type(), p.sizes().vec(),
                       [p] { return p.detach().to(torch::kCPU).contiguous(); }});
  }
  write_loom_checkpoint(model.config(), tensors, dir, options);
}

ModelFiles open_loom_checkpoint_files(const std::string& path) {
  const fs::path root(path);
  const std::string manifest_path = (root / "manifest.json").string();
  json manifest;
  try {
    manifest = json::parse(read_file(manifest_path));
  } catch (const json::parse_error& e) {
    throw BadInput(manifest_path + ": not valid JSON (" + e.what() + ")");
  }
  using vt = json::value_t;
  const std::string& where = manifest_path;
  if (field(manifest, "format", where, vt::string) != "loom-checkpoint") {
    throw BadInput(where + ": 'format' is not \"loom-checkpoint\"");
  }
  const int64_t version = field(manifest, "version", where, vt::number_integer).get<int64_t>();
  if (version != kCheckpointFormatVersion) {
    throw BadInput(where + ": format version " + std::to_string(version) + " is not supported (this loom reads " +
                   std::to_string(kCheckpointFormatVersion) + ")");
  }

  ModelFiles out;
  out.kind_ = ModelFiles::Kind::kLoomCheckpoint;
  out.path_ = path;
  out.step_ = field(manifest, "step", where, vt::number_integer).get<int64_t>();
  out.model_ = model_config_from_hf(field(manifest, "model_config", where, vt::object), where + ": model_config");

  // Every file is checked against its recorded size and checksum before use:
  // a torn or bit-flipped file is named here, not discovered as bad numbers.
  const json& files = field(manifest, "files", where, vt::object);
  for (const auto& [name, entry] : files.items()) {
    if (name.find('/') != std::string::npos || name == "..") throw BadInput(where + ": file name '" + name + "' is not in the folder");
    const std::string file_path = (root / name).string();
    const std::string file_where = where + ": files['" + name + "']";
    if (!fs::exists(file_path)) throw BadInput(file_path + ": missing (listed in " + manifest_path + ")");
    const uint64_t bytes = field(entry, "bytes", file_where, vt::number_unsigned).get<uint64_t>();
    if (fs::file_size(file_path) != bytes) {
      throw BadInput(file_path + ": " + std::to_string(fs::file_size(file_path)) + " bytes, manifest says " +
                     std::to_string(bytes) + " (truncated or replaced)");
    }
    const std::string expected = field(entry, "crc32c", file_where, vt::string).get<std::string>();
    const std::string actual = hex32(crc32c_file(file_path));
    if (actual != expected) {
      throw BadInput(file_path + ": CRC32C " + actual + " does not match the manifest's " + expected + " (corrupt)");
    }
    // Optimizer and trainer state are verified here but are not weights.
    const bool is_model_file = !entry.contains("kind") || entry.at("kind") == "model";
    if (is_model_file) out.add_file(file_path);
  }
  const json& tensors = field(manifest, "tensors", where, vt::object);
  for (const auto& [name, entry] : tensors.items()) {
    const std::string tensor_where = where + ": tensors['" + name + "']";
    if (!out.contains(name)) throw BadInput(tensor_where + ": not found in any file");
    const auto& info = out.info(name);
    const auto shape = field(entry, "shape", tensor_where, vt::array).get<std::vector<int64_t>>();
    const json& slice = field(entry, "slice", tensor_where, vt::array);
    bool whole = slice.size() == shape.size();
    for (size_t d = 0; whole && d < shape.size(); ++d) {
      whole = slice[d].is_array() && slice[d].size() == 2 && slice[d][0] == 0 && slice[d][1] == shape[d];
    }
    if (!whole) {
      throw BadInput(tensor_where + ": holds a slice of the tensor (a parallel layout's checkpoint); this build "
                     "reads single-rank checkpoints only");
    }
    if (info.shape != shape) throw BadInput(tensor_where + ": shape differs from the file's header");
  }
  if (tensors.size() != out.where_.size()) {
    for (const auto& name : out.tensor_names()) {
      if (!tensors.contains(name)) throw BadInput(out.file_of(name) + ": tensor '" + name + "' is not in " + manifest_path);
    }
  }
  if (manifest.contains("tokenizer") && manifest.at("tokenizer").is_string()) {
    out.tokenizer_dir_ = (root / manifest.at("tokenizer").get<std::string>()).string();
  }
  return out;
}

}  // namespace loom

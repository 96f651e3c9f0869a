#include "checkpoints/loom_checkpoint.h"

#include <unistd.h>

#include <algorithm>
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
    if (!options.saved_by.empty()) manifest["saved_by"] = options.saved_by;
    const std::string dtype = hf_dtype_name(tensors.empty() ? torch::kFloat : tensors.front().dtype);
    manifest["model_config"] = json::parse(model_config_to_hf(model, dtype).dump());
    manifest["tensors"] = manifest_tensors;
    manifest["files"] = {{kRankZeroFile, {{"bytes", writer.file_bytes()},
                                          {"crc32c", crc32c_hex(writer.crc32c())},
                                          {"kind", "model"}}}};
    for (const auto& extra : options.extra_files) {
      if (extra.name.empty() || extra.name.find('/') != std::string::npos || manifest["files"].contains(extra.name)) {
        throw std::invalid_argument("checkpoint extra file name '" + extra.name + "' is empty, a path or repeated");
      }
      const std::string extra_path = (tmp / extra.name).string();
      const uint32_t crc = extra.write(extra_path);
      manifest["files"][extra.name] = {{"bytes", fs::file_size(extra_path)},
                                       {"crc32c", crc32c_hex(crc)},
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
  const CheckpointManifest manifest = parse_checkpoint_manifest(read_file(manifest_path), manifest_path);

  ModelFiles out;
  out.kind_ = ModelFiles::Kind::kLoomCheckpoint;
  out.path_ = path;
  out.step_ = manifest.step;
  out.model_ = manifest.model;

  // Every file is checked against its recorded size and checksum before use:
  // a torn or bit-flipped file is named here, not discovered as bad numbers.
  for (const ManifestFile& file : manifest.files) {
    const std::string file_path = (root / file.name).string();
    if (!fs::exists(file_path)) throw BadInput(file_path + ": missing (listed in " + manifest_path + ")");
    if (fs::file_size(file_path) != file.bytes) {
      throw BadInput(file_path + ": " + std::to_string(fs::file_size(file_path)) + " bytes, manifest says " +
                     std::to_string(file.bytes) + " (truncated or replaced)");
    }
    const std::string actual = crc32c_hex(crc32c_file(file_path));
    if (actual != file.crc32c) {
      throw BadInput(file_path + ": CRC32C " + actual + " does not match the manifest's " + file.crc32c + " (corrupt)");
    }
    if (file.is_model) out.add_file(file_path);
  }
  for (const ManifestTensor& tensor : manifest.tensors) {
    const std::string tensor_where = manifest_path + ": tensors['" + tensor.name + "']";
    if (!out.contains(tensor.name)) throw BadInput(tensor_where + ": not found in any file");
    if (out.info(tensor.name).shape != tensor.shape) throw BadInput(tensor_where + ": shape differs from the file's header");
  }
  if (manifest.tensors.size() != out.where_.size()) {
    for (const auto& name : out.tensor_names()) {
      const bool listed = std::any_of(manifest.tensors.begin(), manifest.tensors.end(),
                                      [&](const ManifestTensor& t) { return t.name == name; });
      if (!listed) throw BadInput(out.file_of(name) + ": tensor '" + name + "' is not in " + manifest_path);
    }
  }
  if (manifest.tokenizer) out.tokenizer_dir_ = (root / *manifest.tokenizer).string();
  out.manifest_ = manifest;
  return out;
}

}  // namespace loom

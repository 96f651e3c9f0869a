#include "checkpoints/loom_checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <span>
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

using ordered_json = nlohmann::ordered_json;

std::string rank_file_name(const char* kind, int64_t rank) {
  char name[64];
  std::snprintf(name, sizeof name, "%s-rank%05lld.safetensors", kind, static_cast<long long>(rank));
  return name;
}

// Writes `pieces` into dir/file_name; adds the file and the pieces to `out`.
void write_pieces(const std::string& dir, const std::string& file_name, const std::string& kind,
                  const std::vector<PieceToWrite>& pieces, ordered_json& out) {
  if (pieces.empty()) return;
  std::vector<safetensors::TensorHeader> headers;
  for (const PieceToWrite& piece : pieces) {
    std::vector<int64_t> stored_shape;
    if (piece.region.flat) {
      stored_shape = {piece.region.numel()};
    } else {
      for (const auto& [start, stop] : piece.region.box) stored_shape.push_back(stop - start);
    }
    headers.push_back({piece.name, to_safetensors_dtype(piece.dtype), stored_shape});
  }
  const std::string path = (fs::path(dir) / file_name).string();
  safetensors::StreamWriter writer(path, headers);
  for (const PieceToWrite& piece : pieces) {
    const torch::Tensor values = piece.produce();
    if (values.device().type() != torch::kCPU || !values.is_contiguous() || values.scalar_type() != piece.dtype ||
        values.numel() != piece.region.numel()) {
      throw std::logic_error("checkpoint piece of '" + piece.name + "' " + describe(piece.region) +
                             " was produced with another dtype, size or layout than announced");
    }
    const auto bytes = std::as_bytes(std::span(static_cast<const std::byte*>(values.data_ptr()), values.nbytes()));
    ordered_json crcs = ordered_json::array();
    for (size_t at = 0; at < bytes.size(); at += kCrcChunkBytes) {
      crcs.push_back(crc32c_hex(crc32c(bytes.subspan(at, std::min<size_t>(kCrcChunkBytes, bytes.size() - at)))));
    }
    writer.append(bytes);
    ordered_json entry = {{"file", file_name}, {"key", piece.name}, {"box", ordered_json::array()}};
    for (const auto& [start, stop] : piece.region.box) entry["box"].push_back(ordered_json::array({start, stop}));
    if (piece.region.flat) entry["flat"] = ordered_json::array({piece.region.flat->first, piece.region.flat->second});
    entry["crc32c"] = std::move(crcs);
    auto& tensor = out["tensors"][piece.name];
    tensor["dtype"] = safetensors::dtype_name(to_safetensors_dtype(piece.dtype));
    tensor["shape"] = piece.shape;
    tensor["pieces"].push_back(std::move(entry));
  }
  writer.commit();
  out["files"][file_name] = {{"bytes", writer.file_bytes()}, {"crc32c", crc32c_hex(writer.crc32c())}, {"kind", kind}};
}

// Copies the tokenizer files into tmp/tokenizer; returns whether there were any.
bool copy_tokenizer(const std::string& tokenizer_dir, const fs::path& tmp) {
  bool any = false;
  for (const auto& name : kTokenizerFiles) {
    const fs::path source = fs::path(tokenizer_dir) / name;
    if (!fs::exists(source)) continue;
    fs::create_directories(tmp / "tokenizer");
    write_file_atomic((tmp / "tokenizer" / name).string(), read_file(source.string()));
    any = true;
  }
  if (any) fsync_directory((tmp / "tokenizer").string());
  return any;
}

// A rank's write_rank_files text, parsed.
ordered_json parse_rank_files(const std::string& text) {
  try {
    return ordered_json::parse(text);
  } catch (const json::exception& e) {
    throw std::logic_error(std::string("checkpoint: a rank's description of its files is not JSON: ") + e.what());
  }
}

}  // namespace

std::string write_rank_files(const std::string& dir, int64_t rank, const std::vector<PieceToWrite>& model,
                             const std::vector<PieceToWrite>& optimizer) {
  ordered_json out = {{"files", ordered_json::object()}, {"tensors", ordered_json::object()}};
  write_pieces(dir, rank_file_name("model", rank), "model", model, out);
  write_pieces(dir, rank_file_name("optimizer", rank), "optimizer", optimizer, out);
  return out.dump();
}

void commit_checkpoint_folder(const ModelConfig& model, const std::vector<std::string>& rank_files,
                              const std::string& tmp_dir, const std::string& dir, const CheckpointWriteOptions& options) {
  const fs::path tmp(tmp_dir), out(dir);
  if (fs::exists(out)) throw BadInput("checkpoint folder '" + dir + "' already exists");
  // Model tensors first, then optimizer state, each in the order of the
  // ranks that hold them (rank 0 holds the first pipeline stage).
  ordered_json model_tensors = ordered_json::object(), optimizer_tensors = ordered_json::object();
  ordered_json files = ordered_json::object();
  std::string dtype = "float32";
  for (const std::string& text : rank_files) {
    const ordered_json rank = parse_rank_files(text);
    for (const auto& [name, file] : rank.at("files").items()) files[name] = file;
    for (const auto& [name, tensor] : rank.at("tensors").items()) {
      const bool is_model = files.at(tensor.at("pieces").at(0).at("file").get<std::string>()).at("kind") == "model";
      ordered_json& into = is_model ? model_tensors : optimizer_tensors;
      if (!into.contains(name)) {
        into[name] = {{"dtype", tensor.at("dtype")}, {"shape", tensor.at("shape")}, {"pieces", ordered_json::array()}};
      }
      for (const auto& piece : tensor.at("pieces")) into[name]["pieces"].push_back(piece);
      if (is_model && tensor.at("dtype") == "BF16") dtype = "bfloat16";
    }
  }
  ordered_json tensors = model_tensors;
  for (const auto& [name, tensor] : optimizer_tensors.items()) tensors[name] = tensor;

  for (const auto& extra : options.extra_files) {
    if (extra.name.empty() || extra.name.find('/') != std::string::npos || files.contains(extra.name)) {
      throw std::invalid_argument("checkpoint extra file name '" + extra.name + "' is empty, a path or repeated");
    }
    const std::string extra_path = (tmp / extra.name).string();
    const uint32_t crc = extra.write(extra_path);
    files[extra.name] = {{"bytes", fs::file_size(extra_path)}, {"crc32c", crc32c_hex(crc)}, {"kind", extra.kind}};
  }
  ordered_json manifest;
  manifest["format"] = "loom-checkpoint";
  manifest["version"] = kCheckpointFormatVersion;
  manifest["step"] = options.step;
  std::map<std::string, int64_t> layout = {{"dp", 1}, {"tp", 1}, {"pp", 1}, {"world", 1}, {"zero_stage", 0}};
  for (const auto& [key, value] : options.saved_by) layout[key] = value;
  manifest["layout"] = layout;
  if (!options.saved_by.empty()) manifest["saved_by"] = options.saved_by;
  manifest["model_config"] = ordered_json::parse(model_config_to_hf(model, dtype).dump());
  manifest["crc_chunk_bytes"] = kCrcChunkBytes;
  manifest["tensors"] = tensors;
  manifest["files"] = files;
  manifest["tokenizer"] = nullptr;
  if (!options.tokenizer_dir.empty() && copy_tokenizer(options.tokenizer_dir, tmp)) manifest["tokenizer"] = "tokenizer";
  if (!options.origin.empty()) write_origin(options.origin, (tmp / kOriginFolder).string());
  if (!options.config_yaml.empty()) write_file_atomic((tmp / "config.yaml").string(), options.config_yaml);
  const std::string text = manifest.dump(1) + "\n";
  // What a reader will check (every element of every tensor stored once),
  // checked before anything is committed.
  parse_checkpoint_manifest(text, (out / "manifest.json").string());
  // The manifest is written last: a folder with a manifest is complete.
  write_file_atomic((tmp / "manifest.json").string(), text);
  fsync_directory(tmp.string());
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  fs::rename(tmp, out);
  fsync_directory(parent.string());
}

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
    std::vector<PieceToWrite> pieces;
    for (const auto& tensor : tensors) {
      pieces.push_back({tensor.name, tensor.dtype, tensor.shape, Region::whole(tensor.shape), tensor.produce});
    }
    const std::string written = write_rank_files(tmp.string(), 0, pieces, {});
    commit_checkpoint_folder(model, {written}, tmp.string(), dir, options);
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

namespace {

// The manifest's file entry checked against the file on disk: present, of the
// recorded size, and (when `checksum`) of the recorded CRC32C.
void check_file(const fs::path& root, const ManifestFile& file, const std::string& manifest_path, bool checksum) {
  const std::string file_path = (root / file.name).string();
  if (!fs::exists(file_path)) throw BadInput(file_path + ": missing (listed in " + manifest_path + ")");
  if (fs::file_size(file_path) != file.bytes) {
    throw BadInput(file_path + ": " + std::to_string(fs::file_size(file_path)) + " bytes, manifest says " +
                   std::to_string(file.bytes) + " (truncated or replaced)");
  }
  if (!checksum) return;
  const std::string actual = crc32c_hex(crc32c_file(file_path));
  if (actual != file.crc32c) {
    throw BadInput(file_path + ": CRC32C " + actual + " does not match the manifest's " + file.crc32c + " (corrupt)");
  }
}

}  // namespace

ModelFiles open_loom_checkpoint_files(const std::string& path) {
  const fs::path root(path);
  const std::string manifest_path = (root / "manifest.json").string();
  const CheckpointManifest manifest = parse_checkpoint_manifest(read_file(manifest_path), manifest_path);

  ModelFiles out;
  out.kind_ = ModelFiles::Kind::kLoomCheckpoint;
  out.path_ = path;
  out.step_ = manifest.step;
  out.model_ = manifest.model;

  // Version 1 files are checked whole against their checksums before use (a
  // torn or bit-flipped file is named here, not discovered as bad numbers);
  // version 2 pieces chunk by chunk as they are read.
  const bool whole_files = manifest.version == 1;
  std::map<std::string, size_t> file_index;
  for (const ManifestFile& file : manifest.files) {
    check_file(root, file, manifest_path, whole_files);
    if (file.kind != "model" && file.kind != "optimizer") continue;
    const std::string file_path = (root / file.name).string();
    if (whole_files) {
      // Version 1 lists the model's tensors; the optimizer file's are its own.
      if (file.is_model) {
        out.files_.push_back(safetensors::File::open(file_path));
        file_index[file.name] = out.files_.size() - 1;
      } else {
        out.add_file(file_path, /*is_model=*/false);
      }
      continue;
    }
    out.files_.push_back(safetensors::File::open(file_path));
    file_index[file.name] = out.files_.size() - 1;
  }
  // Each stored tensor of a file is one piece of the manifest, exactly once.
  std::map<std::pair<size_t, std::string>, int> uses;
  for (const ManifestTensor& tensor : manifest.tensors) {
    const std::string tensor_where = manifest_path + ": tensors['" + tensor.name + "']";
    ModelFiles::StoredTensor stored;
    stored.is_model = tensor.is_model;
    for (const ManifestPiece& piece : tensor.pieces) {
      const auto it = file_index.find(piece.file);
      if (it == file_index.end()) throw BadInput(tensor_where + ": file '" + piece.file + "' holds no tensors");
      const safetensors::File& file = out.files_[it->second];
      if (!file.contains(piece.key)) {
        throw BadInput(file.path() + ": has no tensor '" + piece.key + "' (" + tensor_where + ")");
      }
      const safetensors::TensorInfo& info = *file.tensor(piece.key).info;
      if (++uses[{it->second, piece.key}] > 1) {
        throw BadInput(tensor_where + ": '" + piece.key + "' of " + file.path() + " is named twice");
      }
      const std::string dtype = safetensors::dtype_name(info.dtype);
      if (!tensor.dtype.empty() && dtype != tensor.dtype) {
        throw BadInput(file.path() + ": tensor '" + piece.key + "' is " + dtype + ", the manifest says " + tensor.dtype);
      }
      if (whole_files ? info.shape != tensor.shape : info.numel() != piece.region.numel()) {
        throw BadInput(tensor_where + ": shape differs from the file's header (" + file.path() + ")");
      }
      stored.info = {tensor.name, info.dtype, tensor.shape, 0, 0};
      stored.pieces.push_back({it->second, file.data_offset() + info.begin, piece.region, piece.chunk_crc32c});
    }
    out.add_tensor(std::move(stored));
  }
  for (size_t i = 0; i < out.files_.size(); ++i) {
    for (const auto& info : out.files_[i].tensors()) {
      if (uses.count({i, info.name}) == 0 && !out.contains(info.name)) {
        throw BadInput(out.files_[i].path() + ": tensor '" + info.name + "' is not in " + manifest_path);
      }
    }
  }
  if (manifest.tokenizer) out.tokenizer_dir_ = (root / *manifest.tokenizer).string();
  out.origin_ = origin_of_model_folder(path);
  out.manifest_ = manifest;
  return out;
}

std::vector<std::string> verify_checkpoint_files(const std::string& path) {
  const fs::path root(path);
  const std::string manifest_path = (root / "manifest.json").string();
  const CheckpointManifest manifest = parse_checkpoint_manifest(read_file(manifest_path), manifest_path);
  std::vector<std::string> failures;
  for (const ManifestFile& file : manifest.files) {
    try {
      check_file(root, file, manifest_path, /*checksum=*/true);
    } catch (const std::exception& e) {
      failures.push_back(e.what());
    }
  }
  return failures;
}

}  // namespace loom

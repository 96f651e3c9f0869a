#include "checkpoints/hub.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <fcntl.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <span>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "checkpoints/fused_projections.h"
#include "checkpoints/hf_config.h"
#include "checkpoints/loom_checkpoint.h"
#include "checkpoints/torch_tensors.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json_file(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw BadInput(path + ": not valid JSON (" + e.what() + ")");
  }
}

std::string join(const fs::path& dir, const std::string& name) { return (dir / name).string(); }

}  // namespace

// --- opening -------------------------------------------------------------------

void ModelFiles::add_file(const std::string& file_path, bool is_model) {
  files_.push_back(safetensors::File::open(file_path));
  const size_t index = files_.size() - 1;
  const safetensors::File& file = files_.back();
  for (const auto& info : file.tensors()) {
    StoredTensor tensor;
    tensor.info = {info.name, info.dtype, info.shape, 0, 0};
    tensor.pieces.push_back({index, file.data_offset() + info.begin, Region::whole(info.shape), {}});
    tensor.is_model = is_model;
    add_tensor(std::move(tensor));
  }
}

void ModelFiles::add_tensor(StoredTensor tensor) {
  auto [it, inserted] = index_.emplace(tensor.info.name, tensors_.size());
  if (!inserted) {
    throw BadInput(files_[tensor.pieces.front().file].path() + ": tensor '" + tensor.info.name + "' also stored in " +
                   file_of(tensor.info.name));
  }
  tensors_.push_back(std::move(tensor));
}

ModelFiles ModelFiles::open(const std::string& path) {
  const fs::path root(path);
  if (!fs::is_directory(root)) {
    throw BadInput("'" + path + "' is not a folder (expected a Hugging Face model folder or a loom checkpoint)");
  }
  if (fs::exists(root / "manifest.json")) return open_loom_checkpoint_files(path);
  if (!fs::exists(root / "config.json")) {
    throw BadInput("'" + path + "' has neither config.json (Hugging Face folder) nor manifest.json (loom checkpoint)");
  }

  ModelFiles out;
  out.kind_ = Kind::kHub;
  out.path_ = path;
  const std::string config_path = join(root, "config.json");
  out.model_ = model_config_from_hf(read_json_file(config_path), config_path);

  const std::string index_path = join(root, "model.safetensors.index.json");
  if (fs::exists(index_path)) {
    json index = read_json_file(index_path);
    if (!index.is_object() || !index.contains("weight_map") || !index.at("weight_map").is_object()) {
      throw BadInput(index_path + ": weight_map is missing or not an object");
    }
    std::set<std::string> shard_names;
    for (const auto& [name, file] : index.at("weight_map").items()) {
      if (!file.is_string()) throw BadInput(index_path + ": weight_map['" + name + "'] is not a file name");
      const std::string shard = file.get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..") {
        throw BadInput(index_path + ": weight_map['" + name + "'] = '" + shard + "' is not a file in this folder");
      }
      shard_names.insert(shard);
    }
    for (const auto& shard : shard_names) {
      const std::string shard_path = join(root, shard);
      if (!fs::exists(shard_path)) throw BadInput(index_path + ": names shard '" + shard + "', which does not exist");
      out.add_file(shard_path);
    }
    // The index and the shards must agree: a name in the map lives in the
    // shard the map says, and no shard holds a tensor the map does not name.
    for (const auto& [name, file] : index.at("weight_map").items()) {
      if (!out.contains(name)) {
        throw BadInput(index_path + ": tensor '" + name + "' is not in " + file.get<std::string>());
      }
      if (fs::path(out.file_of(name)).filename() != file.get<std::string>()) {
        throw BadInput(index_path + ": tensor '" + name + "' is in " + out.file_of(name) + ", not in " +
                       file.get<std::string>());
      }
    }
    if (out.tensors_.size() != index.at("weight_map").size()) {
      for (const StoredTensor& tensor : out.tensors_) {
        if (!index.at("weight_map").contains(tensor.info.name)) {
          throw BadInput(out.file_of(tensor.info.name) + ": tensor '" + tensor.info.name + "' is missing from " +
                         index_path);
        }
      }
    }
  } else if (fs::exists(root / "model.safetensors")) {
    out.add_file(join(root, "model.safetensors"));
  } else {
    throw BadInput("'" + path + "' has no model.safetensors or model.safetensors.index.json" +
                   (fs::exists(root / "pytorch_model.bin") ? " (pytorch_model.bin is not read: convert it to safetensors)"
                                                           : ""));
  }
  // q/k/v and gate/up from Phi-3's fused tensors (Note [fused projections] in fused_projections.h).
  if (out.model_.architecture == "phi3") out.split_fused_projections();
  if (fs::exists(root / "tokenizer.json") || fs::exists(root / "tokenizer_config.json")) out.tokenizer_dir_ = path;
  out.origin_ = origin_of_model_folder(path);
  return out;
}

std::vector<std::string> ModelFiles::tensor_names() const {
  std::vector<std::string> names;
  for (const StoredTensor& tensor : tensors_) {
    if (tensor.is_model) names.push_back(tensor.info.name);
  }
  return names;
}

std::vector<std::string> ModelFiles::stored_names() const {
  std::vector<std::string> names;
  for (const StoredTensor& tensor : tensors_) names.push_back(tensor.info.name);
  return names;
}

const ModelFiles::StoredTensor& ModelFiles::stored(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw BadInput(path_ + ": no tensor '" + name + "'");
  return tensors_[it->second];
}

const safetensors::TensorInfo& ModelFiles::info(const std::string& name) const { return stored(name).info; }

const std::string& ModelFiles::file_of(const std::string& name) const {
  return files_[stored(name).pieces.front().file].path();
}

torch::Tensor ModelFiles::read(const std::string& name) const {
  const safetensors::TensorInfo& info = stored(name).info;
  torch::Tensor out = torch::empty(info.shape, torch::TensorOptions().dtype(to_torch_dtype(info.dtype, file_of(name))));
  read_region(name, Region::whole(info.shape), out);
  return out;
}

namespace {

// Reads `bytes` bytes at `offset` of the open file `fd` into `buffer`.
void read_exactly(int fd, std::byte* buffer, size_t bytes, uint64_t offset, const std::string& path) {
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, buffer, bytes, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      throw BadInput("cannot read '" + path + "': " + (got < 0 ? std::strerror(errno) : "unexpected end of file"));
    }
    buffer += got;
    bytes -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

// Chunks of a piece read at once: at most this many bytes are held besides
// the destination.
constexpr int64_t kWindowChunks = 4;

}  // namespace

void ModelFiles::read_region(const std::string& name, const Region& region, torch::Tensor& out) const {
  const StoredTensor& tensor = stored(name);
  const safetensors::TensorInfo& info = tensor.info;
  const torch::ScalarType stored_dtype = to_torch_dtype(info.dtype, file_of(name));
  if (!out.is_contiguous() || out.device().type() != torch::kCPU || out.numel() != region.numel()) {
    throw std::invalid_argument("read_region: '" + name + "' " + describe(region) + " needs a contiguous CPU tensor of " +
                                std::to_string(region.numel()) + " elements");
  }
  const std::vector<Run> wanted = runs_of(region, info.shape);
  // Into `out` itself when the dtypes agree, else through a copy in the stored dtype.
  torch::Tensor staging = out.scalar_type() == stored_dtype ? out : torch::empty({out.numel()}, stored_dtype);
  auto* destination = static_cast<std::byte*>(staging.data_ptr());
  const int64_t element_bytes = static_cast<int64_t>(safetensors::dtype_size(info.dtype));
  int64_t filled = 0;
  std::vector<std::byte> window;
  for (const StoredPiece& piece : tensor.pieces) {
    const std::vector<Overlap> shared = overlaps(runs_of(piece.region, info.shape), wanted);
    if (shared.empty()) continue;
    const std::string& path = files_[piece.file].path();
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) throw BadInput("cannot read '" + path + "': " + std::strerror(errno));
    const int64_t piece_bytes = piece.region.numel() * element_bytes;
    // Bytes [window_begin, window_end) of the piece are in `window`; with
    // checksums they are whole chunks, verified when read.
    int64_t window_begin = 0, window_end = 0;
    for (const Overlap& overlap : shared) {
      int64_t begin = overlap.a_local * element_bytes;
      const int64_t end = begin + overlap.length * element_bytes;
      std::byte* to = destination + overlap.b_local * element_bytes;
      while (begin < end) {
        if (begin < window_begin || begin >= window_end) {
          if (piece.chunk_crc32c.empty()) {
            window_begin = begin;
            window_end = std::min(end, begin + kWindowChunks * kCrcChunkBytes);
          } else {
            window_begin = begin / kCrcChunkBytes * kCrcChunkBytes;
            window_end = std::min({piece_bytes, (end + kCrcChunkBytes - 1) / kCrcChunkBytes * kCrcChunkBytes,
                                   window_begin + kWindowChunks * kCrcChunkBytes});
          }
          window.resize(static_cast<size_t>(window_end - window_begin));
          read_exactly(fd.get(), window.data(), window.size(), piece.begin + static_cast<uint64_t>(window_begin), path);
          for (int64_t chunk = window_begin; !piece.chunk_crc32c.empty() && chunk < window_end;
               chunk += kCrcChunkBytes) {
            const size_t size = static_cast<size_t>(std::min(kCrcChunkBytes, window_end - chunk));
            const uint32_t actual = crc32c(std::span(window.data() + (chunk - window_begin), size));
            const uint32_t expected = piece.chunk_crc32c[static_cast<size_t>(chunk / kCrcChunkBytes)];
            if (actual != expected) {
              throw BadInput(path + ": CRC32C " + crc32c_hex(actual) + " of bytes " + std::to_string(chunk) + "-" +
                             std::to_string(chunk + static_cast<int64_t>(size)) + " of its piece of '" + name +
                             "' does not match the manifest's " + crc32c_hex(expected) + " (corrupt)");
            }
          }
        }
        const int64_t n = std::min(end, window_end) - begin;
        std::memcpy(to, window.data() + (begin - window_begin), static_cast<size_t>(n));
        to += n;
        begin += n;
      }
      filled += overlap.length;
    }
  }
  if (filled != region.numel()) {
    throw BadInput(file_of(name) + ": tensor '" + name + "': the stored pieces hold " + std::to_string(filled) + " of the " +
                   std::to_string(region.numel()) + " elements of " + describe(region));
  }
  if (!staging.is_same(out)) out.copy_(staging.view(out.sizes()));
}

// --- loading into a model ------------------------------------------------------

namespace {

// Where a missing tensor should have been: the single weights file, or the index.
std::string weights_source(const ModelFiles& files) {
  if (files.files().size() == 1) return files.files().front().path();
  if (files.kind() == ModelFiles::Kind::kHub) return (fs::path(files.path()) / "model.safetensors.index.json").string();
  return (fs::path(files.path()) / "manifest.json").string();
}

}  // namespace

void verify_weights(const LlamaForCausalLM& model, const ModelFiles& files) {
  std::set<std::string> expected;
  for (const auto& named : model.named_parameters()) {
    const std::string& name = named.key();
    expected.insert(name);
    if (!files.contains(name)) {
      throw BadInput(weights_source(files) + ": tensor '" + name +
                     "' is missing (the config describes a model that has it)");
    }
    const auto& info = files.info(name);
    const std::string where = files.file_of(name) + ": tensor '" + name + "'";
    if (info.shape != named.value().sizes().vec()) {
      throw BadInput(where + " has shape " + c10::str(c10::IntArrayRef(info.shape)) + " but the config needs " +
                     c10::str(named.value().sizes()));
    }
    const auto dtype = info.dtype;
    using safetensors::Dtype;
    if (dtype != Dtype::F32 && dtype != Dtype::BF16 && dtype != Dtype::F16 && dtype != Dtype::F64) {
      throw BadInput(where + " has dtype " + safetensors::dtype_name(dtype) + " (expected F32, BF16, F16 or F64)");
    }
  }
  for (const auto& name : files.tensor_names()) {
    if (expected.count(name)) continue;
    // Older exports carry rotary tables as buffers; loom recomputes them.
    if (name.ends_with("rotary_emb.inv_freq")) continue;
    // Some tied models still store lm_head.weight; it must be the embedding.
    if (name == "lm_head.weight" && model.config().tie_embeddings && files.contains("model.embed_tokens.weight")) {
      if (files.info(name).shape == files.info("model.embed_tokens.weight").shape &&
          at::equal(files.read(name), files.read("model.embed_tokens.weight"))) {
        continue;
      }
      throw BadInput(files.file_of(name) + ": tensor 'lm_head.weight' differs from model.embed_tokens.weight "
                     "although tie_word_embeddings is true");
    }
    throw BadInput(files.file_of(name) + ": tensor '" + name + "' is not a parameter of the model its config describes");
  }
}

void load_weights(LlamaForCausalLM& model, const ModelFiles& files) {
  verify_weights(model, files);
  torch::NoGradGuard no_grad;
  for (auto& named : model.named_parameters()) named.value().copy_(files.read(named.key()));
}

std::shared_ptr<LlamaForCausalLM> load_model(const ModelFiles& files, torch::ScalarType dtype) {
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(files.model_config(), factory);
  model->to(dtype);
  load_weights(*model, files);
  return model;
}

// --- export --------------------------------------------------------------------

uint64_t parse_byte_size(const std::string& text, const std::string& context) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  std::string unit = text.substr(digits);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, uint64_t> kUnits = {
      {"", 1},          {"B", 1},         {"KB", 1000},         {"MB", 1000'000},         {"GB", 1000'000'000},
      {"KIB", 1ull << 10}, {"MIB", 1ull << 20}, {"GIB", 1ull << 30}};
  auto unit_it = kUnits.find(unit);
  if (digits == 0 || digits > 15 || unit_it == kUnits.end()) {
    throw BadInput(context + ": '" + text + "' is not a size (expected e.g. 500MB, 2GiB or a byte count)");
  }
  const uint64_t value = std::stoull(text.substr(0, digits)) * unit_it->second;
  if (value == 0) throw BadInput(context + ": size must be positive, got '" + text + "'");
  return value;
}

namespace {

// How the model card names a family: "Qwen3" for qwen3.
std::string model_type_display_name(const std::string& architecture) {
  if (architecture == "qwen2") return "Qwen2";
  if (architecture == "qwen3") return "Qwen3";
  if (architecture == "olmo2") return "OLMo2";
  if (architecture == "smollm3") return "SmolLM3";
  if (architecture == "mistral") return "Mistral";
  if (architecture == "phi3") return "Phi-3";
  if (architecture == "gemma") return "Gemma";
  if (architecture == "gemma2") return "Gemma 2";
  if (architecture == "gemma3_text") return "Gemma 3";
  if (architecture == "mixtral") return "Mixtral";
  if (architecture == "qwen2_moe") return "Qwen2-MoE";
  if (architecture == "qwen3_moe") return "Qwen3-MoE";
  return "Llama";
}

// A YAML string: JSON's quoting is valid YAML, and survives any name.
std::string yaml_string(const std::string& text) { return json(text).dump(); }

// The card's front matter is what the Hub reads (its model tree, license and
// dataset links): https://huggingface.co/docs/hub/model-cards#model-card-metadata.
std::string model_card(const ModelConfig& m, const ExportOptions& options) {
  const ModelOrigin& origin = options.origin;
  const std::string& family = m.architecture;  // the Hub's model_type
  std::ostringstream os;
  os << "---\n";
  if (!origin.base_model.empty()) os << "base_model: " << yaml_string(origin.base_model) << "\n";
  os << "library_name: transformers\n"
     << "pipeline_tag: text-generation\n"
     << "tags:\n  - loom\n  - " << family << "\n";
  if (!origin.base_model.empty()) os << "  - fine-tuned\n";
  if (!origin.license.empty()) {
    os << "license: " << yaml_string(origin.license) << "\n";
    if (!origin.license_name.empty()) os << "license_name: " << yaml_string(origin.license_name) << "\n";
    if (!origin.license_link.empty()) os << "license_link: " << yaml_string(origin.license_link) << "\n";
  }
  bool any_dataset = false;
  for (const std::string& dataset : options.datasets) {
    if (dataset.empty()) continue;
    if (!any_dataset) os << "datasets:\n";
    any_dataset = true;
    os << "  - " << yaml_string(dataset) << "\n";
  }
  os << "---\n\n"
     << "# " << options.model_name << "\n\n";
  if (!origin.base_model.empty()) {
    os << "Fine-tuned by loom from `" << origin.base_model << "`";
  } else {
    os << "A " << model_type_display_name(m.architecture) << "-architecture causal language model written by loom";
  }
  os << ".\n\n"
     << "| | |\n|---|---|\n"
     << "| parameters | " << count_parameters(m) << " |\n"
     << "| layers | " << m.num_layers << " |\n"
     << "| hidden size | " << m.hidden_size << " |\n"
     << "| attention heads / kv heads | " << m.num_heads << " / " << m.kv_heads() << " |\n"
     << "| vocabulary | " << m.vocab_size << " |\n"
     << "| tied embeddings | " << (m.tie_embeddings ? "yes" : "no") << " |\n"
     << "| stored dtype | " << hf_dtype_name(options.dtype) << " |\n\n"
     << "```python\nfrom transformers import AutoModelForCausalLM\n"
     << "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n";
  if (!options.card_notes.empty()) os << "\n" << options.card_notes << "\n";
  return os.str();
}

// Writes the Hub folder: tensors in the order given, a shard at a time, each
// streamed from its source straight into the shard's file.
void write_hub_folder(const ModelConfig& config, const std::vector<HubTensor>& given_tensors,
                      const std::string& out_dir, const ExportOptions& options) {
  const std::vector<HubTensor> tensors = fuse_projections_for_hub(config, given_tensors);
  const fs::path out(out_dir);
  if (fs::exists(out)) throw BadInput("export: output folder '" + out_dir + "' already exists; choose a new one");
  fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  fs::create_directories(parent);
  // Everything is written into a sibling temporary folder, then renamed:
  // a reader sees either no export or a whole one.
  const fs::path tmp = parent / (out.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    const safetensors::Dtype dtype = to_safetensors_dtype(options.dtype);
    // Greedy sharding in order: a new shard starts when the next tensor would
    // push the current one past the limit (a single larger tensor gets its own).
    std::vector<std::vector<size_t>> shards(1);
    uint64_t shard_bytes = 0, total_bytes = 0;
    std::vector<uint64_t> tensor_bytes;
    for (const auto& tensor : tensors) {
      uint64_t bytes = safetensors::dtype_size(dtype);
      for (int64_t d : tensor.shape) bytes *= static_cast<uint64_t>(d);
      tensor_bytes.push_back(bytes);
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      const uint64_t bytes = tensor_bytes[i];
      if (!shards.back().empty() && shard_bytes + bytes > options.max_shard_bytes) {
        shards.emplace_back();
        shard_bytes = 0;
      }
      shards.back().push_back(i);
      shard_bytes += bytes;
      total_bytes += bytes;
    }
    nlohmann::ordered_json weight_map;
    char name_buffer[64];
    for (size_t s = 0; s < shards.size(); ++s) {
      std::string file_name = "model.safetensors";
      if (shards.size() > 1) {
        std::snprintf(name_buffer, sizeof name_buffer, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
        file_name = name_buffer;
      }
      std::vector<safetensors::TensorHeader> headers;
      for (size_t i : shards[s]) {
        headers.push_back({tensors[i].name, dtype, tensors[i].shape});
        weight_map[tensors[i].name] = file_name;
      }
      safetensors::StreamWriter writer(join(tmp, file_name), headers);
      for (size_t i : shards[s]) {
        const uint64_t before = writer.remaining();
        tensors[i].source([&](std::span<const std::byte> bytes) { writer.append(bytes); });
        if (before - writer.remaining() != tensor_bytes[i]) {
          throw std::logic_error("export: tensor '" + tensors[i].name + "' gave " +
                                 std::to_string(before - writer.remaining()) + " bytes, expected " +
                                 std::to_string(tensor_bytes[i]));
        }
      }
      writer.commit();
    }
    if (shards.size() > 1) {
      nlohmann::ordered_json index;
      index["metadata"] = {{"total_size", total_bytes}};
      index["weight_map"] = weight_map;
      write_file_atomic(join(tmp, "model.safetensors.index.json"), index.dump(2) + "\n");
    }
    const std::string dtype_name = hf_dtype_name(options.dtype);
    write_file_atomic(join(tmp, "config.json"), model_config_to_hf(config, dtype_name).dump(2) + "\n");
    // The base model's generation_config.json as it was (Note [what an
    // export carries]); loom's own only for a model that came with none.
    write_file_atomic(join(tmp, "generation_config.json"),
                      options.origin.generation_config_json.empty() ? generation_config_to_hf(config).dump(2) + "\n"
                                                                    : options.origin.generation_config_json);
    write_file_atomic(join(tmp, "README.md"), model_card(config, options));
    if (!options.tokenizer_dir.empty()) {
      for (const auto& name : kTokenizerFiles) {
        const fs::path source = fs::path(options.tokenizer_dir) / name;
        if (fs::exists(source)) write_file_atomic(join(tmp, name), read_file(source.string()));
      }
    }
    fsync_directory(tmp.string());
    fs::rename(tmp, out);
    fsync_directory(parent.string());
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
}

// Elements of a tensor streamed at a time by export_hub_streaming: 16 MiB of
// fp32 read, and its conversion, at most.
constexpr int64_t kPieceElements = int64_t{4} << 20;


}  // namespace

void export_hub(const LlamaForCausalLM& model, const std::string& out_dir, const ExportOptions& options) {
  // One converted tensor at a time, not a converted copy of the model.
  std::vector<HubTensor> tensors;
  for (const auto& named : model.named_parameters()) {
    const torch::Tensor p = named.value();
    tensors.push_back({named.key(), p.sizes().vec(), [p, &options](const ByteSink& sink) {
                         const torch::Tensor converted = p.detach().to(torch::kCPU, options.dtype).contiguous();
                         sink(std::as_bytes(std::span(static_cast<const std::byte*>(converted.data_ptr()),
                                                      converted.nbytes())));
                       }});
  }
  write_hub_folder(model.config(), tensors, out_dir, options);
}

uint64_t export_hub_streaming(const ModelFiles& files, const std::string& out_dir, const ExportOptions& options) {
  // The model is built for its parameter names, order and shapes only: its
  // storage is allocated but never touched, so it costs address space, not
  // memory.
  LocalLayerFactory factory;
  const LlamaForCausalLM expected(files.model_config(), factory);
  verify_weights(expected, files);
  // Pieces of kPieceElements elements (flat ranges of the tensor) are read
  // with pread, converted and written.
  uint64_t largest = 0;
  std::vector<HubTensor> tensors;
  for (const auto& named : expected.named_parameters()) {
    const std::string name = named.key();
    const safetensors::TensorInfo& info = files.info(name);
    largest = std::max<uint64_t>(largest, static_cast<uint64_t>(info.numel()) * safetensors::dtype_size(info.dtype));
    tensors.push_back({name, info.shape, [&files, &info, &options, name](const ByteSink& sink) {
                         const int64_t numel = info.numel();
                         torch::Tensor piece = torch::empty({std::min(kPieceElements, numel)},
                                                            torch::TensorOptions().dtype(options.dtype));
                         Region region = Region::whole(info.shape);
                         for (int64_t done = 0; done < numel; done += kPieceElements) {
                           const int64_t n = std::min(kPieceElements, numel - done);
                           torch::Tensor out = piece.narrow(0, 0, n);
                           region.flat = Range{done, done + n};
                           files.read_region(name, region, out);
                           sink(std::as_bytes(std::span(static_cast<const std::byte*>(out.data_ptr()), out.nbytes())));
                         }
                       }});
  }
  write_hub_folder(files.model_config(), tensors, out_dir, options);
  return largest;
}

}  // namespace loom

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

#include "checkpoints/hf_config.h"
#include "checkpoints/loom_checkpoint.h"
#include "checkpoints/torch_tensors.h"
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

void ModelFiles::add_file(const std::string& file_path, const std::string& index_path) {
  files_.push_back(safetensors::File::open(file_path));
  const size_t index = files_.size() - 1;
  for (const auto& info : files_.back().tensors()) {
    auto [it, inserted] = where_.emplace(info.name, index);
    if (!inserted) {
      throw BadInput(file_path + ": tensor '" + info.name + "' also stored in " + files_[it->second].path());
    }
  }
  (void)index_path;
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
      out.add_file(shard_path, index_path);
    }
    // The index and the shards must agree: a name in the map lives in the
    // shard the map says, and no shard holds a tensor the map does not name.
    for (const auto& [name, file] : index.at("weight_map").items()) {
      auto it = out.where_.find(name);
      if (it == out.where_.end()) {
        throw BadInput(index_path + ": tensor '" + name + "' is not in " + file.get<std::string>());
      }
      if (fs::path(out.files_[it->second].path()).filename() != file.get<std::string>()) {
        throw BadInput(index_path + ": tensor '" + name + "' is in " + out.files_[it->second].path() +
                       ", not in " + file.get<std::string>());
      }
    }
    if (out.where_.size() != index.at("weight_map").size()) {
      for (const auto& [name, i] : out.where_) {
        if (!index.at("weight_map").contains(name)) {
          throw BadInput(out.files_[i].path() + ": tensor '" + name + "' is missing from " + index_path);
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
  if (fs::exists(root / "tokenizer.json") || fs::exists(root / "tokenizer_config.json")) out.tokenizer_dir_ = path;
  return out;
}

std::vector<std::string> ModelFiles::tensor_names() const {
  std::vector<std::string> names;
  for (const auto& file : files_) {
    for (const auto& info : file.tensors()) names.push_back(info.name);
  }
  return names;
}

const safetensors::File& ModelFiles::file_holding(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw BadInput(path_ + ": no tensor '" + name + "'");
  return files_[it->second];
}

const safetensors::TensorInfo& ModelFiles::info(const std::string& name) const {
  return *file_holding(name).tensor(name).info;
}

const std::string& ModelFiles::file_of(const std::string& name) const { return file_holding(name).path(); }

torch::Tensor ModelFiles::read(const std::string& name) const {
  const auto& file = file_holding(name);
  return tensor_from_view(file.tensor(name), file.path() + ": tensor '" + name + "'");
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

std::string model_card(const ModelConfig& m, const ExportOptions& options) {
  std::ostringstream os;
  os << "---\n"
     << "library_name: transformers\n"
     << "pipeline_tag: text-generation\n"
     << "tags:\n  - loom\n  - " << (m.architecture == "qwen2" ? "qwen2" : "llama") << "\n"
     << "---\n\n"
     << "# " << options.model_name << "\n\n"
     << "A " << (m.architecture == "qwen2" ? "Qwen2" : "Llama") << "-architecture causal language model written by loom.\n\n"
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

}  // namespace

namespace {

// One tensor of an export: its name and shape, and a source that hands its
// bytes, already in the export's dtype, to a sink in pieces of any size.
using ByteSink = std::function<void(std::span<const std::byte>)>;
struct HubTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::function<void(const ByteSink&)> source;
};


// Writes the Hub folder: tensors in the order given, a shard at a time, each
// streamed from its source straight into the shard's file.
void write_hub_folder(const ModelConfig& config, const std::vector<HubTensor>& tensors, const std::string& out_dir,
                      const ExportOptions& options) {
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
    write_file_atomic(join(tmp, "generation_config.json"), generation_config_to_hf(config).dump(2) + "\n");
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

// Reads `bytes` bytes at `offset` of the open file `fd` into `buffer`.
void read_exactly(int fd, std::byte* buffer, size_t bytes, uint64_t offset, const std::string& path) {
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, buffer, bytes, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw std::runtime_error("error reading '" + path + "': " + (got < 0 ? std::strerror(errno) : "unexpected end"));
    buffer += got;
    bytes -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

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
  // Pieces of kPieceElements elements are read with pread (not through the
  // map, whose touched pages would stay resident), converted and written.
  uint64_t largest = 0;
  std::vector<HubTensor> tensors;
  for (const auto& named : expected.named_parameters()) {
    const safetensors::File& file = files.file_holding(named.key());
    const safetensors::TensorInfo& info = *file.tensor(named.key()).info;
    largest = std::max<uint64_t>(largest, info.end - info.begin);
    tensors.push_back({named.key(), info.shape, [&file, &info, &options](const ByteSink& sink) {
                         const torch::ScalarType stored = to_torch_dtype(info.dtype, file.path());
                         const int64_t element_bytes = static_cast<int64_t>(safetensors::dtype_size(info.dtype));
                         UniqueFd fd(::open(file.path().c_str(), O_RDONLY | O_CLOEXEC));
                         if (!fd.valid()) throw BadInput("cannot read '" + file.path() + "': " + std::strerror(errno));
                         torch::Tensor piece = torch::empty({std::min<int64_t>(kPieceElements, info.numel())}, torch::TensorOptions().dtype(stored));
                         for (int64_t done = 0; done < info.numel(); done += kPieceElements) {
                           const int64_t n = std::min<int64_t>(kPieceElements, info.numel() - done);
                           torch::Tensor in = piece.narrow(0, 0, n);
                           read_exactly(fd.get(), static_cast<std::byte*>(in.data_ptr()),
                                        static_cast<size_t>(n * element_bytes),
                                        file.data_offset() + info.begin + static_cast<uint64_t>(done * element_bytes),
                                        file.path());
                           const torch::Tensor out = stored == options.dtype ? in : in.to(options.dtype);
                           sink(std::as_bytes(std::span(static_cast<const std::byte*>(out.data_ptr()), out.nbytes())));
                         }
                       }});
  }
  write_hub_folder(files.model_config(), tensors, out_dir, options);
  return largest;
}

}  // namespace loom

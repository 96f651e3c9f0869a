#include "launch/commands.h"

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "checkpoints/hub.h"
#include "checkpoints/init_from.h"
#include "checkpoints/loom_checkpoint.h"
#include "checkpoints/safetensors.h"
#include "checkpoints/torch_tensors.h"
#include "data/tokenizer.h"
#include "launch/cli.h"
#include "util/file_io.h"
#include "launch/run_record.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/topology.h"
#include "parallel/versions.h"
#include "config/config.h"
#include "trainer/device.h"
#include "model/generate.h"
#include "util/error.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

std::string with_thousands(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string format_mib(uint64_t bytes) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buffer;
}

void print_model_summary(const ModelConfig& m, const std::string& prefix = "") {
  std::cout << prefix << "model: " << m.architecture << ", " << m.num_layers << " layers, hidden " << m.hidden_size
            << ", intermediate " << m.intermediate_size << ", heads " << m.num_heads << " (kv " << m.kv_heads()
            << ", head_dim " << m.head_size() << "), vocab " << m.vocab_size
            << (m.tie_embeddings ? ", tied embeddings" : ", untied embeddings") << ", rope_theta " << m.rope_theta
            << (m.rope_scaling.type != "none" ? ", rope scaling " + m.rope_scaling.type : "") << "\n"
            << prefix << "parameters: " << with_thousands(count_parameters(m)) << " (non-embedding "
            << with_thousands(count_non_embedding_parameters(m)) << ")\n";
}

void print_tensor_table(const std::vector<const safetensors::TensorInfo*>& infos,
                        const std::vector<std::string>& files) {
  size_t width = 4;
  for (const auto* info : infos) width = std::max(width, info->name.size());
  std::cout << std::left << std::setw(static_cast<int>(width)) << "name"
            << "  dtype  shape" << (files.empty() ? "" : "  file") << "\n";
  for (size_t i = 0; i < infos.size(); ++i) {
    std::cout << std::left << std::setw(static_cast<int>(width)) << infos[i]->name << "  " << std::setw(5)
              << safetensors::dtype_name(infos[i]->dtype) << "  " << shape_string(infos[i]->shape);
    if (!files.empty()) std::cout << "  " << files[i];
    std::cout << "\n";
  }
}

int inspect_config(const std::string& path, const std::vector<std::string>& overrides) {
  ConfigOrigins origins;
  Config config = load_config(path, overrides, &origins);
  const int64_t world = config.launch.ranks;
  ParallelDims dims = ParallelDims::from_config(config, world);
  std::cout << "# " << path << ": valid\n";
  if (!config.base_files.empty()) {
    // The base: chain, as applied: deepest base first, the file last.
    std::cout << "# composed from:";
    for (const std::string& base : config.base_files) std::cout << " " << base << " ->";
    std::cout << " " << path << (overrides.empty() ? "" : " -> --set") << "\n";
  }
  if (config.model.init_from.empty()) {
    print_model_summary(config.model, "# ");
  } else {
    std::cout << "# model from " << config.model.init_from << "\n";
  }
  std::string layout = dims.describe();
  for (size_t at = layout.find('\n'); at != std::string::npos; at = layout.find('\n', at + 1)) layout.insert(at + 1, "#");
  std::cout << "# layout: " << layout << "\n";
  if (dims.pp > 1) {
    // The pipeline schedule each pp rank would run for one step, as a
    // timeline (refused with exit code 2 when the micro-batch count does
    // not suit it).
    const int64_t micro = config.batch.micro_batch_size;
    const int64_t global = config.batch.global_batch_size > 0 ? config.batch.global_batch_size : micro * dims.dp;
    const PipeSchedule schedule =
        make_pipe_schedule(config.parallel.pp_schedule, dims.pp, global / (micro * dims.dp), config.parallel.virtual_stages);
    std::string drawn = draw_pipe_schedule(schedule);
    for (size_t at = drawn.find('\n'); at != std::string::npos && at + 1 < drawn.size(); at = drawn.find('\n', at + 1)) {
      drawn.insert(at + 1, "#   ");
    }
    std::cout << "# pipeline: " << drawn;
  }
  // Each key with the file:line:column, --set argument or default it came from.
  std::cout << config_to_yaml(config, &origins);
  return kExitOk;
}

// A loom checkpoint's layout and files, once every file's size and CRC32C
// have been checked against the manifest.
void print_checkpoint_files(const CheckpointManifest& manifest) {
  auto layout_of = [](const ManifestLayout& layout) {
    return "dp " + std::to_string(layout.dp) + " x tp " + std::to_string(layout.tp) + " x pp " +
           std::to_string(layout.pp);
  };
  size_t pieces = 0;
  for (const ManifestTensor& tensor : manifest.tensors) pieces += tensor.pieces.size();
  std::cout << "layout of the files: " << layout_of(manifest.layout) << " (format version " << manifest.version << ", "
            << manifest.tensors.size() << " tensors in " << pieces << " pieces)\n";
  if (manifest.saved_by) {
    const ManifestLayout& by = *manifest.saved_by;
    std::cout << "saved by a run on: " << layout_of(by) << ", " << by.world << " ranks"
              << (by.zero_stage > 0 ? ", ZeRO-" + std::to_string(by.zero_stage) : std::string())
              << " (resumes on any layout: docs/checkpoints.md)\n";
  }
  uint64_t total = 0;
  size_t width = 4;
  for (const ManifestFile& file : manifest.files) width = std::max(width, file.name.size());
  std::cout << std::left << std::setw(static_cast<int>(width)) << "file" << "  kind           bytes         crc32c\n";
  for (const ManifestFile& file : manifest.files) {
    total += file.bytes;
    std::cout << std::left << std::setw(static_cast<int>(width)) << file.name << "  " << std::setw(13) << file.kind
              << std::right << std::setw(15) << with_thousands(static_cast<int64_t>(file.bytes)) << "  "
              << file.crc32c << std::left << "\n";
  }
  std::cout << "checksums: " << manifest.files.size() << " files, " << format_mib(total)
            << ", sizes and CRC32C verified against the manifest\n";
}

int inspect_model_files(const std::string& path, bool verify) {
  ModelFiles files = ModelFiles::open(path);
  const bool hub = files.kind() == ModelFiles::Kind::kHub;
  if (!hub) {
    const std::vector<std::string> failures = verify_checkpoint_files(path);
    if (!failures.empty()) throw BadInput(failures.front());
  }
  std::cout << path << ": " << (hub ? "Hugging Face model folder" : "loom checkpoint (step " + std::to_string(files.step()) + ")")
            << ", " << files.files().size() << " safetensors file" << (files.files().size() == 1 ? "" : "s") << "\n";
  print_model_summary(files.model_config());
  if (!hub) print_checkpoint_files(*files.manifest());
  // Shapes only: the model is built with uninitialised storage and no tensor
  // data is read, so this is quick even for large checkpoints.
  LocalLayerFactory factory;
  LlamaForCausalLM expected(files.model_config(), factory);
  verify_weights(expected, files);
  std::cout << "weights: every tensor the config describes, with its shape\n";
  std::cout << "tokenizer: " << (files.tokenizer_dir().empty() ? "none" : files.tokenizer_dir()) << "\n";
  std::vector<const safetensors::TensorInfo*> infos;
  std::vector<std::string> file_names;
  int64_t stored = 0;
  for (const auto& name : files.tensor_names()) {
    infos.push_back(&files.info(name));
    file_names.push_back(fs::path(files.file_of(name)).filename().string());
    stored += infos.back()->numel();
  }
  std::cout << "stored parameters: " << with_thousands(stored) << " in " << infos.size() << " tensors\n";
  print_tensor_table(infos, files.files().size() > 1 ? file_names : std::vector<std::string>{});
  if (verify) {
    // Every stored tensor read back whole: each chunk of each piece against
    // its own CRC32C, and the pieces together holding every element once.
    int64_t elements = 0;
    for (const auto& name : files.stored_names()) elements += files.read(name).numel();
    std::cout << "verified: " << files.stored_names().size() << " tensors (" << with_thousands(elements)
              << " elements) read back, every piece's checksums match\n";
  }
  return kExitOk;
}

int inspect_safetensors_file(const std::string& path) {
  auto file = safetensors::File::open(path);
  std::cout << path << ": safetensors, " << file.tensors().size() << " tensors\n";
  for (const auto& [key, value] : file.metadata()) std::cout << "metadata " << key << " = " << value << "\n";
  std::vector<const safetensors::TensorInfo*> infos;
  for (const auto& info : file.tensors()) infos.push_back(&info);
  print_tensor_table(infos, {});
  return kExitOk;
}

}  // namespace

const CommandSpec& version_spec() {
  static const CommandSpec spec{
      .name = "version",
      .summary = "loom's version and git commit, and those of the libraries it runs with",
      .examples = {"loom version"},
  };
  return spec;
}

int command_version(const std::vector<std::string>& argv) {
  Args args(version_spec(), argv);
  args.expect_positional(0, "no arguments");
  std::cout << "loom " << loom_version() << " (git " << loom_git_commit() << ")\n";
  for (const auto& [library, version] : library_versions(/*with_cuda=*/true)) {
    std::cout << library << " " << version << "\n";
  }
  return kExitOk;
}

const CommandSpec& inspect_spec() {
  static const CommandSpec spec{
      .name = "inspect",
      .synopsis = "PATH [OPTIONS]",
      .summary = "summarize a config, dataset, checkpoint, Hugging Face folder or .safetensors file",
      .arguments = {{"PATH", "a config .yaml, dataset, loom checkpoint, Hugging Face folder or .safetensors file"}},
      .flags = {{"set", "KEY=VALUE", "override a config key (configs only)", kRepeatable},
                {"verify", "", "also check dataset checksums, or read back every tensor of a checkpoint"},
                {"tokenizer", "T", "tokenizer.json to decode a dataset sample (datasets only)"}},
      .examples = {"loom inspect configs/tiny.yaml --set parallel.tp=2",
                   "loom inspect runs/data/tiny --verify --tokenizer runs/data/tokenizer.json",
                   "loom inspect runs/tiny/checkpoints/step-0000004 --verify", "loom inspect runs/tiny/hf"},
  };
  return spec;
}

int command_inspect(const std::vector<std::string>& argv) {
  Args args(inspect_spec(), argv);
  args.expect_positional(1, "one PATH (a config .yaml, a checkpoint or Hub folder, or a .safetensors file)");
  const std::string path = args.positional()[0];
  if (!fs::exists(path)) throw BadInput("loom inspect: '" + path + "' does not exist");
  const std::string ext = fs::path(path).extension().string();
  if (ext == ".yaml" || ext == ".yml") return inspect_config(path, args.all("set"));
  if (!args.all("set").empty()) throw BadInput("loom inspect: --set applies to configs only");
  if (is_dataset_folder(path)) return inspect_dataset(path, args.has("verify"), args.get_or("tokenizer", ""));
  if (fs::is_directory(path) && !fs::exists(fs::path(path) / "config.json") &&
      !fs::exists(fs::path(path) / "manifest.json")) {
    for (const auto& entry : fs::directory_iterator(path)) {
      if (entry.path().filename().string().rfind("shard-", 0) == 0) {
        throw BadInput("'" + path + "' holds dataset shards but no index.json: an unfinished loom prepare? "
                       "(prepare again into this folder)");
      }
    }
    throw BadInput("'" + path + "' has no index.json (dataset), config.json (Hugging Face folder) or "
                   "manifest.json (loom checkpoint)");
  }
  if (args.has("tokenizer")) throw BadInput("loom inspect: --tokenizer applies to datasets only");
  if (ext == ".safetensors") {
    if (args.has("verify")) throw BadInput("loom inspect: --verify applies to datasets and checkpoints");
    return inspect_safetensors_file(path);
  }
  return inspect_model_files(path, args.has("verify"));
}

const CommandSpec& import_spec() {
  static const CommandSpec spec{
      .name = "import",
      .synopsis = "HF_DIR --output CHECKPOINT",
      .summary = "a Hugging Face model folder -> a loom checkpoint (docs/checkpoints.md)",
      .arguments = {{"HF_DIR", "Hugging Face folder: config.json and safetensors weights"}},
      .flags = {{"output", "CHECKPOINT", "checkpoint folder to create (required)"}},
      .examples = {"loom import runs/demo/source --output runs/demo/checkpoint"},
  };
  return spec;
}

int command_import(const std::vector<std::string>& argv) {
  Args args(import_spec(), argv);
  args.expect_positional(1, "one HF_DIR");
  const std::string output = args.require("output");
  ModelFiles files = ModelFiles::open(args.positional()[0]);
  auto model = load_model(files);
  CheckpointWriteOptions options;
  options.tokenizer_dir = files.tokenizer_dir();
  options.origin = files.origin();
  write_loom_checkpoint(*model, output, options);
  std::cout << "imported " << args.positional()[0] << " -> " << output << " ("
            << with_thousands(count_parameters(files.model_config())) << " parameters)\n";
  return kExitOk;
}

const CommandSpec& export_spec() {
  static const CommandSpec spec{
      .name = "export",
      .synopsis = "CHECKPOINT --output HF_DIR [OPTIONS]",
      .summary = "a loom checkpoint (or Hub folder) -> a Hugging Face folder (docs/checkpoints.md)",
      .arguments = {{"CHECKPOINT", "loom checkpoint or Hugging Face folder"}},
      .flags = {{"output", "HF_DIR", "Hub folder to create (required)"},
                {"dtype", "float32|bfloat16|float16", "stored dtype (default float32)"},
                {"max-shard-size", "SIZE", "largest safetensors file, e.g. 500MB (default 5GB)"},
                {"name", "NAME", "model name for the model card (default: the output folder's name)"}},
      .examples = {"loom export runs/demo/checkpoint --output runs/demo/hf --dtype bfloat16 --max-shard-size 500KB"},
      .notes = "Written a tensor at a time: memory stays a few MiB above the process's own, whatever the model's size.",
  };
  return spec;
}

int command_export(const std::vector<std::string>& argv) {
  Args args(export_spec(), argv);
  args.expect_positional(1, "one CHECKPOINT");
  const std::string output = args.require("output");
  ModelFiles files = ModelFiles::open(args.positional()[0]);
  ExportOptions options;
  options.dtype = parse_float_dtype(args.get_or("dtype", "float32"), "loom export --dtype");
  if (auto size = args.get("max-shard-size")) options.max_shard_bytes = parse_byte_size(*size, "loom export --max-shard-size");
  options.tokenizer_dir = files.tokenizer_dir();
  // A checkpoint's base model is what its run started from; a Hub folder
  // exported again is the same model, not one derived from it.
  options.origin = files.origin();
  if (files.kind() == ModelFiles::Kind::kHub) options.origin.base_model.clear();
  options.model_name = args.get_or("name", fs::path(output).filename().string());
  if (files.kind() == ModelFiles::Kind::kLoomCheckpoint) {
    options.card_notes = "Exported from loom checkpoint at step " + std::to_string(files.step()) + ".";
  }
  // Streamed tensor by tensor: memory stays a few MiB above the process's
  // own, whatever the model's size.
  const uint64_t largest = export_hub_streaming(files, output, options);
  std::cout << "exported " << args.positional()[0] << " -> " << output << " (largest tensor "
            << format_mib(largest) << ", peak resident memory " << format_mib(peak_rss_bytes()) << ")\n";
  return kExitOk;
}

const CommandSpec& init_spec() {
  static const CommandSpec spec{
      .name = "init",
      .synopsis = "CONFIG --output CHECKPOINT [OPTIONS]",
      .summary = "a freshly initialized model (seeded by run.seed) as a loom checkpoint",
      .arguments = {{"CONFIG", "the training config (.yaml) whose model.* to build"}},
      .flags = {{"output", "CHECKPOINT", "checkpoint folder to create (required)"},
                {"set", "KEY=VALUE", "override a config key", kRepeatable},
                {"dtype", "float32|bfloat16", "stored dtype (default float32)"}},
      .examples = {"loom init configs/tiny.yaml --output /tmp/fresh --set model.num_layers=4"},
  };
  return spec;
}

int command_init(const std::vector<std::string>& argv) {
  Args args(init_spec(), argv);
  args.expect_positional(1, "one CONFIG");
  const std::string output = args.require("output");
  const torch::ScalarType dtype = parse_float_dtype(args.get_or("dtype", "float32"), "loom init --dtype");
  const Config config = load_config(args.positional()[0], args.all("set"));
  if (!config.model.init_from.empty()) {
    throw BadInput("loom init: the config takes its weights from model.init_from (" + config.model.init_from +
                   "); loom init makes new ones from model.* (remove init_from)");
  }
  write_initialized_checkpoint(config.model, config.run.seed, dtype, output);
  std::cout << "initialized " << output << " from " << args.positional()[0] << " (seed " << config.run.seed << ", "
            << with_thousands(count_parameters(config.model)) << " parameters, peak resident memory "
            << format_mib(peak_rss_bytes()) << ")\n";
  return kExitOk;
}

const CommandSpec& generate_spec() {
  static const CommandSpec spec{
      .name = "generate",
      .synopsis = "CHECKPOINT_OR_HF_DIR (--prompt TEXT | --prompt-ids 1,2,3) [OPTIONS]",
      .summary = "sample a continuation: text with the model's tokenizer.json, else token ids",
      .arguments = {{"CHECKPOINT_OR_HF_DIR", "loom checkpoint or Hugging Face folder"}},
      .flags = {{"prompt", "TEXT", "text prompt, encoded with the model's tokenizer.json; prints it and what follows"},
                {"prompt-ids", "1,2,3", "comma-separated token ids; prints the new ids"},
                {"max-new-tokens", "N", "tokens to add (default 32)"},
                {"greedy", "", "always the most likely token (the default without --temperature and --top-k)"},
                {"temperature", "T", "sample with this temperature (> 0, default 1.0)"},
                {"top-k", "K", "sample among the K most likely tokens (default 0: the whole vocabulary)"},
                {"seed", "S", "sampling seed (default 0)"},
                {"stop-at-eos", "", "stop after the model's eos_token_id"}},
      .examples = {"loom generate runs/tiny/hf --prompt \"And God said\" --temperature 0.8 --top-k 40 --seed 1",
                   "loom generate runs/demo/checkpoint --prompt-ids 1,17,42,7 --greedy --max-new-tokens 16"},
  };
  return spec;
}

int command_generate(const std::vector<std::string>& argv) {
  Args args(generate_spec(), argv);
  args.expect_positional(1, "one CHECKPOINT_OR_HF_DIR");
  if (args.has("prompt") == args.has("prompt-ids")) {
    throw BadInput("loom generate: give exactly one of --prompt TEXT and --prompt-ids 1,2,3");
  }
  // Arguments are checked before any file is opened.
  std::vector<int64_t> prompt;
  if (args.has("prompt-ids")) prompt = parse_int_list(args.require("prompt-ids"), "--prompt-ids");
  SamplingOptions options;
  options.max_new_tokens = args.get_int("max-new-tokens", 32);
  if (options.max_new_tokens < 0) throw BadInput("loom generate: --max-new-tokens must be >= 0");
  options.greedy = args.has("greedy") || !(args.has("temperature") || args.has("top-k"));
  if (args.has("greedy") && (args.has("temperature") || args.has("top-k"))) {
    throw BadInput("loom generate: --greedy cannot be combined with --temperature or --top-k");
  }
  options.temperature = args.get_double("temperature", 1.0);
  options.top_k = args.get_int("top-k", 0);
  options.seed = static_cast<uint64_t>(args.get_int("seed", 0));
  ModelFiles files = ModelFiles::open(args.positional()[0]);
  // A text prompt is encoded with the model's own tokenizer.json, and the
  // continuation printed as text; token ids in give token ids out.
  std::optional<Tokenizer> tokenizer;
  if (args.has("prompt")) {
    const fs::path tokenizer_path = fs::path(files.tokenizer_dir()) / "tokenizer.json";
    if (files.tokenizer_dir().empty() || !fs::exists(tokenizer_path)) {
      throw BadInput("loom generate: " + files.path() + " has no tokenizer.json, so --prompt cannot be encoded; "
                     "pass token ids with --prompt-ids");
    }
    tokenizer = Tokenizer::load(tokenizer_path.string());
    // Framed as the tokenizer's post-processor frames a text (Llama-3's
    // <|begin_of_text|> first), as transformers' generate would see it.
    for (int32_t id : tokenizer->encode(*args.get("prompt"), Tokenizer::SpecialTokens::kAdd)) prompt.push_back(id);
  }
  auto model = load_model(files);
  if (args.has("stop-at-eos")) options.stop_token = files.model_config().eos_token_id;
  const auto ids = generate(*model, prompt, options);
  if (tokenizer) {
    const std::vector<int32_t> ids32(ids.begin(), ids.end());
    std::cout << *args.get("prompt") << tokenizer->decode(ids32) << "\n";
    return kExitOk;
  }
  for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? "," : "") << ids[i];
  std::cout << "\n";
  return kExitOk;
}

const CommandSpec& forward_spec() {
  static const CommandSpec spec{
      .name = "forward",
      .synopsis =
          "CHECKPOINT_OR_HF_DIR --input-ids IN.safetensors [--positions POS.safetensors] --output OUT.safetensors",
      .summary = "the logits [B, T, V] (fp32) of a batch of token ids, to compare with other implementations",
      .arguments = {{"CHECKPOINT_OR_HF_DIR", "loom checkpoint or Hugging Face folder"}},
      .flags = {{"input-ids", "IN.safetensors", "file holding \"input_ids\" [batch, tokens], I64 or I32 (required)"},
                {"positions", "POS.safetensors",
                 "file holding \"positions\" [batch, tokens], I64 or I32: each token's position in its packed "
                 "document, 0 where one starts (attention stays within documents, as data.document_mask trains)"},
                {"output", "OUT.safetensors", "safetensors file to write the tensor \"logits\" to (required)"}},
      .examples = {"loom forward runs/demo/checkpoint --input-ids ids.safetensors --output logits.safetensors",
                   "loom forward runs/demo/checkpoint --input-ids ids.safetensors --positions positions.safetensors "
                   "--output logits.safetensors"},
  };
  return spec;
}

int command_forward(const std::vector<std::string>& argv) {
  Args args(forward_spec(), argv);
  args.expect_positional(1, "one CHECKPOINT_OR_HF_DIR");
  const std::string input_path = args.require("input-ids");
  const std::string output_path = args.require("output");
  auto input_file = safetensors::File::open(input_path);
  const std::string context = input_path + ": tensor 'input_ids'";
  auto ids = tensor_from_view(input_file.tensor("input_ids"), context);
  if (ids.dim() != 2 || !(ids.scalar_type() == torch::kLong || ids.scalar_type() == torch::kInt)) {
    throw BadInput(context + " must be a 2-D I64 or I32 tensor [batch, tokens]");
  }
  ids = ids.to(torch::kLong);
  ModelFiles files = ModelFiles::open(args.positional()[0]);
  const int64_t vocab = files.model_config().vocab_size;
  if (ids.numel() > 0 && (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= vocab)) {
    throw BadInput(context + " holds ids outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  torch::Tensor positions;
  if (const auto positions_path = args.get("positions")) {
    auto positions_file = safetensors::File::open(*positions_path);
    const std::string positions_context = *positions_path + ": tensor 'positions'";
    positions = tensor_from_view(positions_file.tensor("positions"), positions_context);
    if (positions.dim() != 2 || !(positions.scalar_type() == torch::kLong || positions.scalar_type() == torch::kInt)) {
      throw BadInput(positions_context + " must be a 2-D I64 or I32 tensor [batch, tokens]");
    }
    if (positions.sizes() != ids.sizes()) {
      throw BadInput(positions_context + " has shape " + c10::str(positions.sizes()) + ", input_ids " +
                     c10::str(ids.sizes()) + ": expected the same");
    }
    positions = positions.to(torch::kLong);
    if (positions.numel() > 0 && positions.min().item<int64_t>() < 0) {
      throw BadInput(positions_context + " holds a negative position");
    }
  }
  auto model = load_model(files);
  model->eval();
  torch::NoGradGuard no_grad;
  auto logits = model->forward(ids, positions).to(torch::kFloat).contiguous();
  safetensors::write_file(output_path, {tensor_to_write("logits", logits)});
  return kExitOk;
}

namespace {
// Messages thrown by a command often start with "loom CMD: "; run_cli adds
// that prefix itself, so it is dropped from the message to say it once.
std::string without_command_prefix(const std::string& message) {
  if (message.rfind("loom ", 0) != 0) return message;
  const size_t colon = message.find(": ");
  return colon == std::string::npos ? message : message.substr(colon + 2);
}

// One subcommand: its spec and what runs it. A command line runs the first
// whose name's first word is the command typed (`loom plan` and `loom plan
// --calibrate` both go to command_plan, which tells them apart).
struct Subcommand {
  const CommandSpec& (*spec)();
  int (*run)(const std::vector<std::string>& args);
};

// In the order `loom help` lists them.
constexpr Subcommand kSubcommands[] = {
    {launch_spec, command_launch},
    {train_spec, command_train},
    {sweep_spec, command_sweep},
    {runs_spec, command_runs},
    {plan_spec, command_plan},
    {plan_calibrate_spec, command_plan},
    {health_spec, command_health},
    {plot_spec, command_plot},
    {inspect_spec, command_inspect},
    {tokenizer_train_spec, command_tokenizer},
    {prepare_spec, command_prepare},
    {import_spec, command_import},
    {init_spec, command_init},
    {export_spec, command_export},
    {generate_spec, command_generate},
    {forward_spec, command_forward},
    {version_spec, command_version},
};

std::string first_word(const std::string& name) { return name.substr(0, name.find(' ')); }

const Subcommand* find_subcommand(const std::string& command) {
  for (const Subcommand& sub : kSubcommands) {
    if (first_word(sub.spec().name) == command) return &sub;
  }
  return nullptr;
}

// `loom help`: every command's name and summary, from its spec.
std::string overview() {
  size_t width = 0;
  for (const Subcommand& sub : kSubcommands) width = std::max(width, sub.spec().name.size());
  std::string out = "usage: loom COMMAND [ARGS]\n\ncommands:\n";
  for (const Subcommand& sub : kSubcommands) {
    const CommandSpec& spec = sub.spec();
    out += "  " + spec.name + std::string(width - spec.name.size(), ' ') + "  " + spec.summary + "\n";
  }
  out += "\n`loom COMMAND --help` (or `loom help COMMAND`) prints a command's arguments, options and examples.\n"
         "\nexit codes: 0 done, 1 internal error, 2 bad input (the message names the file, key or tensor),\n"
         "            75 stopped early with a checkpoint (signal or launch.max_wall_time): run again to resume\n";
  return out;
}

// `loom help [COMMAND...]`: the overview, or one command's usage ("plan
// --calibrate" and "tokenizer train" by their whole names, or their first word).
int command_help(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::cout << overview();
    return kExitOk;
  }
  std::string name;
  for (const std::string& word : args) name += (name.empty() ? "" : " ") + word;
  for (const Subcommand& sub : kSubcommands) {
    if (sub.spec().name == name) {
      std::cout << usage(sub.spec());
      return kExitOk;
    }
  }
  const Subcommand* sub = args.size() == 1 ? find_subcommand(args[0]) : nullptr;
  if (sub == nullptr) throw BadInput("loom help: unknown command '" + name + "' (loom help lists them)");
  std::cout << usage(sub->spec());
  return kExitOk;
}

}  // namespace

int run_cli(int argc, char** argv) {
  // A file-size limit (ulimit -f) would end loom with SIGXFSZ in the middle
  // of a write; ignored, the write fails with EFBIG like a full disk, and the
  // error names the file (the last complete checkpoint stays `latest`).
  std::signal(SIGXFSZ, SIG_IGN);
  std::vector<std::string> args(argv + (argc > 1 ? 2 : argc), argv + argc);
  const std::string command = argc > 1 ? argv[1] : "";
  try {
    if (command == "help" || command == "--help" || command == "-h") return command_help(args);
    if (command == "--version") return command_version(args);
    if (const Subcommand* sub = find_subcommand(command)) return sub->run(args);
    std::cerr << (command.empty() ? "loom: no command given\n" : "loom: unknown command '" + command + "'\n")
              << overview();
    return kExitBadInput;
  } catch (const HelpRequested& help) {
    // Asked before the command did anything (Args comes first in each).
    std::cout << help.usage;
    return kExitOk;
  } catch (const BadInput& e) {
    std::cerr << "loom " << command << ": error: " << without_command_prefix(e.what()) << "\n";
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "loom " << command << ": internal error: " << without_command_prefix(e.what()) << "\n";
    return kExitInternal;
  }
}

}  // namespace loom

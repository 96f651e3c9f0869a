#include "trainer/training_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <utility>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "checkpoints/hub.h"
#include "checkpoints/loom_checkpoint.h"
#include "checkpoints/safetensors.h"
#include "checkpoints/torch_tensors.h"
#include "trainer/training.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kTrainerStateFormat = "loom-trainer-state";
constexpr int kTrainerStateVersion = 1;
constexpr const char* kBase64Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string base64_encode(const uint8_t* data, size_t size) {
  std::string out;
  out.reserve((size + 2) / 3 * 4);
  for (size_t i = 0; i < size; i += 3) {
    uint32_t chunk = static_cast<uint32_t>(data[i]) << 16;
    if (i + 1 < size) chunk |= static_cast<uint32_t>(data[i + 1]) << 8;
    if (i + 2 < size) chunk |= data[i + 2];
    out += kBase64Alphabet[(chunk >> 18) & 63];
    out += kBase64Alphabet[(chunk >> 12) & 63];
    out += i + 1 < size ? kBase64Alphabet[(chunk >> 6) & 63] : '=';
    out += i + 2 < size ? kBase64Alphabet[chunk & 63] : '=';
  }
  return out;
}

std::vector<uint8_t> base64_decode(const std::string& text, const std::string& context) {
  if (text.size() % 4 != 0) throw BadInput(context + ": not base64 (length " + std::to_string(text.size()) + ")");
  auto value = [&](char c) -> uint32_t {
    const char* at = std::char_traits<char>::find(kBase64Alphabet, 64, c);
    if (at == nullptr) throw BadInput(context + ": not base64 (character '" + std::string(1, c) + "')");
    return static_cast<uint32_t>(at - kBase64Alphabet);
  };
  std::vector<uint8_t> out;
  for (size_t i = 0; i < text.size(); i += 4) {
    const size_t pad = (text[i + 2] == '=') + (text[i + 3] == '=');
    if (pad > 0 && i + 4 != text.size()) throw BadInput(context + ": not base64 (padding inside)");
    const uint32_t chunk = value(text[i]) << 18 | value(text[i + 1]) << 12 |
                           (pad >= 2 ? 0 : value(text[i + 2]) << 6) | (pad >= 1 ? 0 : value(text[i + 3]));
    out.push_back(static_cast<uint8_t>(chunk >> 16));
    if (pad < 2) out.push_back(static_cast<uint8_t>(chunk >> 8));
    if (pad < 1) out.push_back(static_cast<uint8_t>(chunk));
  }
  return out;
}

std::string cpu_rng_state_base64() {
  auto generator = at::detail::getDefaultCPUGenerator();
  torch::Tensor state;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    state = generator.get_state();
  }
  state = state.contiguous();
  return base64_encode(state.data_ptr<uint8_t>(), static_cast<size_t>(state.numel()));
}

void set_cpu_rng_state(const std::vector<uint8_t>& bytes, const std::string& context) {
  auto state = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
  std::copy(bytes.begin(), bytes.end(), state.data_ptr<uint8_t>());
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  try {
    generator.set_state(state);
  } catch (const c10::Error& e) {
    throw BadInput(context + ": not a CPU generator state (" + e.what_without_backtrace() + ")");
  }
}

// Host copies of `tensors` (shared, when `copy` is false and they already
// are contiguous CPU tensors). A copy goes into `reuse`'s tensor of the same
// place when it has the same name, dtype and shape (the buffers of an
// earlier snapshot: no allocation, no page faults), else into a new one,
// page-locked when the source is on a GPU.
NamedTensors to_host(const NamedTensors& tensors, bool copy, NamedTensors* reuse) {
  NamedTensors out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, tensor] = tensors[i];
    const torch::Tensor source = tensor.detach();
    if (!copy) {
      out.emplace_back(name, source.to(torch::kCPU).contiguous());
      continue;
    }
    torch::Tensor host;
    if (reuse != nullptr && i < reuse->size() && (*reuse)[i].first == name &&
        (*reuse)[i].second.scalar_type() == source.scalar_type() && (*reuse)[i].second.sizes() == source.sizes()) {
      host = std::move((*reuse)[i].second);
    } else {
      host = torch::empty(source.sizes(),
                          torch::TensorOptions().dtype(source.scalar_type()).pinned_memory(source.is_cuda()));
    }
    host.copy_(source);
    out.emplace_back(name, std::move(host));
  }
  return out;
}

// Returns the file's CRC32C.
uint32_t write_optimizer_state(const NamedTensors& state, const std::string& path) {
  std::vector<safetensors::TensorToWrite> to_write;
  for (const auto& [name, tensor] : state) to_write.push_back(tensor_to_write(name, tensor));
  return safetensors::write_file(path, to_write);
}

NamedTensors read_optimizer_state(const std::string& path) {
  const auto file = safetensors::File::open(path);
  NamedTensors state;
  for (const auto& info : file.tensors()) {
    state.emplace_back(info.name, tensor_from_view(file.tensor(info.name), path + ": " + info.name));
  }
  return state;
}

std::vector<fs::path> step_folders(const fs::path& checkpoints_dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(checkpoints_dir)) return out;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir)) {
    const std::string name = entry.path().filename().string();
    // "step-" + 7 digits; temporaries ("step-0000010.tmp-123") are not checkpoints.
    const bool is_step = name.size() >= 12 && name.rfind("step-", 0) == 0 &&
                         std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (is_step && entry.is_directory()) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());  // zero-padded: name order is step order
  return out;
}

// The folder name `latest` holds, or "" when there is no `latest` yet.
std::string latest_folder_name(const std::string& checkpoints_dir) {
  const fs::path latest = fs::path(checkpoints_dir) / kLatestFile;
  if (!fs::exists(latest)) return "";
  std::string name = read_file(latest.string());
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
    throw BadInput(latest.string() + ": expected a checkpoint folder name such as step-0000100, found '" + name + "'");
  }
  return name;
}

}  // namespace

TrainingSnapshot snapshot_training_state(int64_t step, const LlamaForCausalLM& model, const AdamW& optimizer,
                                         const Loader& loader, int64_t skipped_steps, bool copy,
                                         TrainingSnapshot* reuse) {
  TrainingSnapshot snapshot;
  snapshot.step = step;
  snapshot.model_config = model.config();
  snapshot.model = to_host(to_named_tensors(model.named_parameters()), copy, reuse ? &reuse->model : nullptr);
  snapshot.optimizer = to_host(optimizer.state_dict(), copy, reuse ? &reuse->optimizer : nullptr);
  const json trainer_state = {{"format", kTrainerStateFormat},
                              {"version", kTrainerStateVersion},
                              {"step", step},
                              {"skipped_steps", skipped_steps},
                              {"loader", loader.state()},
                              {"rng_cpu", cpu_rng_state_base64()}};
  snapshot.trainer_state = trainer_state.dump(2) + "\n";
  return snapshot;
}

std::string write_training_checkpoint(const std::string& checkpoints_dir, const TrainingSnapshot& snapshot,
                                      const TrainingCheckpointOptions& options) {
  const fs::path root(checkpoints_dir);
  const std::string folder_name = checkpoint_folder_name(snapshot.step);
  const fs::path folder = root / folder_name;

  CheckpointWriteOptions write_options;
  write_options.step = snapshot.step;
  write_options.tokenizer_dir = options.tokenizer_dir;
  write_options.config_yaml = options.config_yaml;
  write_options.saved_by = options.saved_by;
  write_options.extra_files = {
      {kOptimizerStateFile, "optimizer",
       [&](const std::string& path) { return write_optimizer_state(snapshot.optimizer, path); }},
      {kTrainerStateFile, "trainer_state", [&](const std::string& path) {
         write_file_atomic(path, snapshot.trainer_state);
         return crc32c(std::as_bytes(std::span(snapshot.trainer_state.data(), snapshot.trainer_state.size())));
       }}};
  std::vector<CheckpointTensor> tensors;
  for (const auto& [name, tensor] : snapshot.model) {
    tensors.push_back({name, tensor.scalar_type(), tensor.sizes().vec(), [tensor] { return tensor; }});
  }
  // A step folder that `latest` does not name was never committed: a crash
  // came between its rename and the update of `latest`, or this run resumed
  // from an earlier checkpoint. Training has just recomputed this step, so
  // the folder is replaced. The one `latest` names is never touched.
  if (fs::exists(folder) && latest_folder_name(checkpoints_dir) != folder_name) fs::remove_all(folder);
  write_loom_checkpoint(snapshot.model_config, tensors, folder.string(), write_options);

  // Note [checkpoint commit order]: `latest` moves only after the new folder
  // is complete and renamed into place, and older folders are deleted only
  // after `latest` moved. A crash at any point leaves `latest` naming a whole
  // checkpoint: the previous one until the rename of `latest`, the new one
  // after it.
  write_file_atomic((root / kLatestFile).string(), folder_name + "\n");
  if (options.keep_last > 0) {
    const auto folders = step_folders(root);
    const size_t keep = static_cast<size_t>(options.keep_last);
    for (size_t i = 0; i + keep < folders.size(); ++i) {
      if (folders[i].filename() != folder_name) fs::remove_all(folders[i]);
    }
  }
  return folder.string();
}

std::string save_training_checkpoint(const std::string& checkpoints_dir, int64_t step, const LlamaForCausalLM& model,
                                     const AdamW& optimizer, const Loader& loader,
                                     const TrainingCheckpointOptions& options, int64_t skipped_steps) {
  return write_training_checkpoint(
      checkpoints_dir, snapshot_training_state(step, model, optimizer, loader, skipped_steps, /*copy=*/false), options);
}

// --- asynchronous saves ---------------------------------------------------------

AsyncCheckpointWriter::AsyncCheckpointWriter(std::string checkpoints_dir, TrainingCheckpointOptions options)
    : checkpoints_dir_(std::move(checkpoints_dir)), options_(std::move(options)), thread_([this] { run(); }) {}

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return !busy_; });
    quit_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

TrainingSnapshot AsyncCheckpointWriter::take_spare() {
  wait();
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(spare_, TrainingSnapshot{});
}

std::string AsyncCheckpointWriter::start(TrainingSnapshot snapshot) {
  wait();
  const std::string folder = (fs::path(checkpoints_dir_) / checkpoint_folder_name(snapshot.step)).string();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_ = std::move(snapshot);
    busy_ = true;
  }
  changed_.notify_all();
  return folder;
}

double AsyncCheckpointWriter::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return !busy_; });
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return last_seconds_;
}

void AsyncCheckpointWriter::run() {
  for (;;) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return quit_ || pending_.has_value(); });
    if (!pending_) return;  // quit_, nothing left to write
    TrainingSnapshot snapshot = std::move(*pending_);
    pending_.reset();
    lock.unlock();
    const auto start = std::chrono::steady_clock::now();
    std::exception_ptr error;
    try {
      write_training_checkpoint(checkpoints_dir_, snapshot, options_);
    } catch (...) {
      error = std::current_exception();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    lock.lock();
    // Kept as the next snapshot's buffers (take_spare), so that one host
    // copy of the state is allocated for the whole run.
    spare_ = std::move(snapshot);
    error_ = error;
    last_seconds_ = seconds;
    busy_ = false;
    lock.unlock();
    changed_.notify_all();
  }
}

std::string resume_checkpoint_path(const CheckpointConfig& checkpoint, const std::string& checkpoints_dir,
                                   std::vector<std::string>* fallbacks) {
  if (checkpoint.resume == "none") return "";
  if (checkpoint.resume != "auto") {
    if (!fs::is_directory(checkpoint.resume)) {
      throw BadInput("checkpoint.resume: '" + checkpoint.resume + "' is not a checkpoint folder (expected auto, none "
                     "or the path of a step-NNNNNNN folder)");
    }
    return checkpoint.resume;
  }
  const std::string name = latest_folder_name(checkpoints_dir);
  if (name.empty()) return "";
  const fs::path latest = fs::path(checkpoints_dir) / kLatestFile;
  const fs::path folder = fs::path(checkpoints_dir) / name;
  if (!fs::is_directory(folder)) {
    throw BadInput(latest.string() + ": names '" + name + "', which is not a folder in " + checkpoints_dir);
  }
  // latest first, then the older step folders, newest first.
  std::vector<fs::path> candidates = {folder};
  const std::vector<fs::path> steps = step_folders(checkpoints_dir);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    if (it->filename().string() < name) candidates.push_back(*it);
  }
  std::vector<std::string> failures;
  for (const fs::path& candidate : candidates) {
    try {
      open_training_checkpoint(candidate.string());
      if (fallbacks != nullptr) *fallbacks = failures;
      return candidate.string();
    } catch (const std::exception& e) {  // BadInput, or a file that cannot be read at all
      failures.push_back(e.what());
    }
  }
  std::string why;
  for (const std::string& failure : failures) why += "\n  " + failure;
  throw BadInput("checkpoint.resume auto: no checkpoint in " + checkpoints_dir + " passes verification:" + why);
}

ModelFiles open_training_checkpoint(const std::string& dir) {
  // ModelFiles::open checks every file the manifest lists (sizes, CRC32C)
  // and the manifest's tensors against the files.
  ModelFiles files = ModelFiles::open(dir);
  if (files.kind() != ModelFiles::Kind::kLoomCheckpoint) {
    throw BadInput(dir + ": a Hugging Face folder, not a loom training checkpoint (use model.init_from to start "
                   "from it)");
  }
  const std::vector<ManifestFile>& listed_files = files.manifest()->files;
  for (const std::string& name : {std::string(kOptimizerStateFile), std::string(kTrainerStateFile)}) {
    const bool listed = std::any_of(listed_files.begin(), listed_files.end(),
                                    [&](const ManifestFile& file) { return file.name == name; });
    if (!listed) {
      throw BadInput(dir + ": has no " + name + " in its manifest (a checkpoint written by `loom import` holds "
                     "weights only; start from it with model.init_from)");
    }
  }
  return files;
}

int64_t load_training_checkpoint(const std::string& dir, LlamaForCausalLM& model, AdamW& optimizer, Loader& loader,
                                 int64_t* skipped_steps) {
  // Every file the manifest lists (sizes, CRC32C), optimizer and trainer
  // state included, is checked before anything is read.
  const ModelFiles files = open_training_checkpoint(dir);
  const fs::path root(dir);
  const std::string optimizer_path = (root / kOptimizerStateFile).string();
  const std::string state_path = (root / kTrainerStateFile).string();

  json state;
  try {
    state = json::parse(read_file(state_path));
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw BadInput(state_path + ": not valid JSON (" + e.what() + ")");
  }
  if (!state.is_object() || state.value("format", "") != kTrainerStateFormat ||
      state.value("version", 0) != kTrainerStateVersion) {
    throw BadInput(state_path + ": not a " + std::string(kTrainerStateFormat) + " version " +
                   std::to_string(kTrainerStateVersion) + " file");
  }
  if (!state.contains("step") || !state["step"].is_number_integer() || !state.contains("loader") ||
      !state.contains("rng_cpu") || !state["rng_cpu"].is_string()) {
    throw BadInput(state_path + ": 'step', 'loader' or 'rng_cpu' is missing or has the wrong type");
  }
  const int64_t step = state["step"].get<int64_t>();
  if (step != files.step()) {
    throw BadInput(state_path + ": step " + std::to_string(step) + " differs from the manifest's " +
                   std::to_string(files.step()));
  }
  // Checkpoints written before the skip policy have no skipped_steps: 0.
  int64_t skipped = 0;
  if (state.contains("skipped_steps")) {
    if (!state["skipped_steps"].is_number_integer() || state["skipped_steps"].get<int64_t>() < 0 ||
        state["skipped_steps"].get<int64_t>() > step) {
      throw BadInput(state_path + ": 'skipped_steps' is " + state["skipped_steps"].dump() +
                     " (expected an integer in [0, step " + std::to_string(step) + "])");
    }
    skipped = state["skipped_steps"].get<int64_t>();
  }

  load_weights(model, files);
  try {
    optimizer.load_state_dict(read_optimizer_state(optimizer_path));
  } catch (const BadInput& e) {
    throw BadInput(optimizer_path + ": " + e.what());
  }
  // Skipped steps advanced the step but not AdamW.
  if (optimizer.step_count() != step - skipped) {
    throw BadInput(optimizer_path + ": optimizer.step is " + std::to_string(optimizer.step_count()) +
                   ", the checkpoint is at step " + std::to_string(step) + " with " + std::to_string(skipped) +
                   " skipped steps (expected " + std::to_string(step - skipped) + ")");
  }
  loader.restore(state["loader"], state_path + ": loader");
  set_cpu_rng_state(base64_decode(state["rng_cpu"].get<std::string>(), state_path + ": rng_cpu"),
                    state_path + ": rng_cpu");
  if (skipped_steps) *skipped_steps = skipped;
  return step;
}

}  // namespace loom

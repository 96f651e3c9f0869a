#include "trainer/training_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

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

// Temporary folders of unfinished saves of `folder_name` (NAME.tmp-PID).
std::vector<fs::path> temporary_folders(const fs::path& checkpoints_dir, const std::string& folder_name) {
  std::vector<fs::path> out;
  if (!fs::is_directory(checkpoints_dir)) return out;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir)) {
    if (entry.path().filename().string().starts_with(folder_name + ".tmp-")) out.push_back(entry.path());
  }
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

std::string trainer_state_text(int64_t step, int64_t skipped_steps, const Loader& loader) {
  const json trainer_state = {{"format", kTrainerStateFormat},
                              {"version", kTrainerStateVersion},
                              {"step", step},
                              {"skipped_steps", skipped_steps},
                              {"loader", loader.state()},
                              {"rng_cpu", cpu_rng_state_base64()}};
  return trainer_state.dump(2) + "\n";
}

std::vector<OwnedPiece> pieces_to_host(std::vector<OwnedPiece> pieces, bool copy, std::vector<OwnedPiece>* reuse) {
  for (size_t i = 0; i < pieces.size(); ++i) {
    OwnedPiece& piece = pieces[i];
    const torch::Tensor source = piece.values.detach();
    if (!copy) {
      piece.values = source.to(torch::kCPU).contiguous();
      continue;
    }
    torch::Tensor host;
    if (reuse != nullptr && i < reuse->size() && (*reuse)[i].name == piece.name &&
        (*reuse)[i].values.scalar_type() == source.scalar_type() && (*reuse)[i].values.sizes() == source.sizes()) {
      host = std::move((*reuse)[i].values);
    } else {
      host = torch::empty(source.sizes(),
                          torch::TensorOptions().dtype(source.scalar_type()).pinned_memory(source.is_cuda()));
    }
    host.copy_(source);
    piece.values = std::move(host);
  }
  return pieces;
}

TrainingSnapshot snapshot_training_state(int64_t step, const LlamaForCausalLM& model, const AdamW& optimizer,
                                         const Loader& loader, int64_t skipped_steps, bool copy,
                                         TrainingSnapshot* reuse) {
  TrainingSnapshot snapshot;
  snapshot.step = step;
  snapshot.model_config = model.config();
  const auto whole = [](const NamedTensors& tensors) {
    std::vector<OwnedPiece> pieces;
    for (const auto& [name, tensor] : tensors) {
      pieces.push_back({name, tensor.sizes().vec(), Region::whole(tensor.sizes().vec()), tensor});
    }
    return pieces;
  };
  snapshot.model = pieces_to_host(whole(to_named_tensors(model.named_parameters())), copy,
                                  reuse ? &reuse->model : nullptr);
  snapshot.optimizer = pieces_to_host(whole(optimizer.state_dict()), copy, reuse ? &reuse->optimizer : nullptr);
  snapshot.trainer_state = trainer_state_text(step, skipped_steps, loader);
  return snapshot;
}

std::string prepare_checkpoint_folder(const std::string& checkpoints_dir, int64_t step, const CheckpointRank& rank) {
  const fs::path root(checkpoints_dir);
  const std::string folder_name = checkpoint_folder_name(step);
  // The writer names the folder after its process, as a single-rank save
  // does, and tells the other ranks; "!" starts an error instead.
  std::string made;
  if (rank.writer) {
    const fs::path tmp = root / (folder_name + ".tmp-" + std::to_string(::getpid()));
    try {
      // A step folder that `latest` does not name was never committed: a
      // crash came between its rename and the update of `latest`, or this
      // run resumed from an earlier checkpoint. Training has just recomputed
      // this step, so the folder is replaced. The one `latest` names is
      // never touched.
      const fs::path folder = root / folder_name;
      if (fs::exists(folder) && latest_folder_name(checkpoints_dir) != folder_name) fs::remove_all(folder);
      if (fs::exists(folder)) throw BadInput("checkpoint folder '" + folder.string() + "' already exists");
      for (const fs::path& stale : temporary_folders(root, folder_name)) fs::remove_all(stale);  // unfinished saves
      fs::create_directories(tmp);
      made = tmp.string();
    } catch (const std::exception& e) {
      made = std::string("!") + e.what();
    }
  }
  // Every rank writes into the folder once the writer has made it, and all
  // of them learn when it could not be made.
  if (rank.world != nullptr) {
    for (const std::string& text : all_gather_strings(*rank.world, made)) {
      if (!text.empty()) made = text;
    }
  }
  if (made.empty() || made.front() == '!') {
    throw std::runtime_error("checkpoint of step " + std::to_string(step) + " not written: " + made.substr(1));
  }
  return made;
}

std::string write_snapshot_files(const std::string& tmp, const TrainingSnapshot& snapshot, const CheckpointRank& rank) {
  const auto to_write = [](const std::vector<OwnedPiece>& pieces) {
    std::vector<PieceToWrite> out;
    for (const OwnedPiece& piece : pieces) {
      out.push_back({piece.name, piece.values.scalar_type(), piece.shape, piece.region,
                     [values = piece.values] { return values; }});
    }
    return out;
  };
  try {
    return write_rank_files(tmp, rank.rank(), to_write(snapshot.model), to_write(snapshot.optimizer));
  } catch (const std::exception& e) {
    return std::string("!rank ") + std::to_string(rank.rank()) + ": " + e.what();
  }
}

std::string commit_training_checkpoint(const std::string& checkpoints_dir, const std::string& tmp,
                                       const TrainingSnapshot& snapshot, const std::string& written,
                                       const TrainingCheckpointOptions& options, const CheckpointRank& rank) {
  const std::vector<std::string> all = rank.world != nullptr ? all_gather_strings(*rank.world, written)
                                                             : std::vector<std::string>{written};
  std::string errors;
  for (const std::string& text : all) {
    if (!text.empty() && text.front() == '!') errors += (errors.empty() ? "" : "; ") + text.substr(1);
  }
  if (!errors.empty()) {
    if (rank.writer) {
      std::error_code ignored;
      fs::remove_all(tmp, ignored);
    }
    throw std::runtime_error("checkpoint of step " + std::to_string(snapshot.step) + " not written: " + errors);
  }
  if (!rank.writer) return "";
  const fs::path root(checkpoints_dir);
  const std::string folder_name = checkpoint_folder_name(snapshot.step);
  CheckpointWriteOptions write_options;
  write_options.step = snapshot.step;
  write_options.tokenizer_dir = options.tokenizer_dir;
  write_options.origin = options.origin;
  write_options.config_yaml = options.config_yaml;
  write_options.saved_by = options.saved_by;
  write_options.extra_files = {{kTrainerStateFile, "trainer_state", [&](const std::string& path) {
                                  write_file_atomic(path, snapshot.trainer_state);
                                  return crc32c(std::as_bytes(
                                      std::span(snapshot.trainer_state.data(), snapshot.trainer_state.size())));
                                }}};
  try {
    commit_checkpoint_folder(snapshot.model_config, all, tmp, (root / folder_name).string(), write_options);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }

  // Note [checkpoint commit order]: `latest` moves only after the new folder
  // is complete and renamed into place, and older folders are deleted only
  // after `latest` moved. A crash of any rank at any point leaves `latest`
  // naming a whole checkpoint: the previous one until the rename of
  // `latest`, the new one after it.
  write_file_atomic((root / kLatestFile).string(), folder_name + "\n");
  if (options.keep_last > 0) {
    const auto folders = step_folders(root);
    const size_t keep = static_cast<size_t>(options.keep_last);
    for (size_t i = 0; i + keep < folders.size(); ++i) {
      if (folders[i].filename() != folder_name) fs::remove_all(folders[i]);
    }
  }
  return (root / folder_name).string();
}

std::string write_training_checkpoint(const std::string& checkpoints_dir, const TrainingSnapshot& snapshot,
                                      const TrainingCheckpointOptions& options, const CheckpointRank& rank) {
  const std::string tmp = prepare_checkpoint_folder(checkpoints_dir, snapshot.step, rank);
  const std::string written = write_snapshot_files(tmp, snapshot, rank);
  return commit_training_checkpoint(checkpoints_dir, tmp, snapshot, written, options, rank);
}

std::string save_training_checkpoint(const std::string& checkpoints_dir, int64_t step, const LlamaForCausalLM& model,
                                     const AdamW& optimizer, const Loader& loader,
                                     const TrainingCheckpointOptions& options, int64_t skipped_steps) {
  return write_training_checkpoint(
      checkpoints_dir, snapshot_training_state(step, model, optimizer, loader, skipped_steps, /*copy=*/false), options);
}

// --- asynchronous saves ---------------------------------------------------------

AsyncCheckpointWriter::AsyncCheckpointWriter(std::string checkpoints_dir, TrainingCheckpointOptions options,
                                             CheckpointRank rank)
    : checkpoints_dir_(std::move(checkpoints_dir)),
      options_(std::move(options)),
      rank_(rank),
      thread_([this] { run(); }) {}

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
  std::string tmp;
  try {
    tmp = prepare_checkpoint_folder(checkpoints_dir_, snapshot.step, rank_);
  } catch (...) {
    // Every rank failed alike; on one rank the failure is reported by wait(),
    // as a failed background write is.
    if (rank_.world != nullptr) throw;
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::current_exception();
    return folder;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tmp_ = tmp;
    pending_ = std::move(snapshot);
    busy_ = true;
    started_ = std::chrono::steady_clock::now();
  }
  changed_.notify_all();
  return rank_.writer ? folder : "";
}

double AsyncCheckpointWriter::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return !busy_; });
  if (uncommitted_) {
    // Written on every rank: the commit is collective, so it happens here,
    // on the training thread.
    uncommitted_ = false;
    const std::string tmp = tmp_, written = written_;
    lock.unlock();
    std::exception_ptr error;
    try {
      commit_training_checkpoint(checkpoints_dir_, tmp, spare_, written, options_, rank_);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    if (error) error_ = error;
  }
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return last_seconds_;
}

double AsyncCheckpointWriter::last_write_seconds() {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_seconds_;
}

void AsyncCheckpointWriter::run() {
  for (;;) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return quit_ || pending_.has_value(); });
    if (!pending_) return;  // quit_, nothing left to write
    TrainingSnapshot snapshot = std::move(*pending_);
    pending_.reset();
    const std::string tmp = tmp_;
    lock.unlock();
    std::exception_ptr error;
    std::string written = write_snapshot_files(tmp, snapshot, rank_);
    const bool alone = rank_.world == nullptr;
    if (alone) {
      try {
        commit_training_checkpoint(checkpoints_dir_, tmp, snapshot, written, options_, rank_);
      } catch (...) {
        error = std::current_exception();
      }
    }
    lock.lock();
    // Kept as the next snapshot's buffers (take_spare), so that one host
    // copy of the state is allocated for the whole run.
    spare_ = std::move(snapshot);
    written_ = std::move(written);
    uncommitted_ = !alone;
    error_ = error;
    if (alone) last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    busy_ = false;
    lock.unlock();
    changed_.notify_all();
  }
}

std::vector<std::string> resume_candidates(const CheckpointConfig& checkpoint, const std::string& checkpoints_dir,
                                           std::vector<std::string>* fallbacks) {
  if (checkpoint.resume == "none") return {};
  if (checkpoint.resume != "auto") {
    if (!fs::is_directory(checkpoint.resume)) {
      throw BadInput("checkpoint.resume: '" + checkpoint.resume + "' is not a checkpoint folder (expected auto, none "
                     "or the path of a step-NNNNNNN folder)");
    }
    open_training_checkpoint(checkpoint.resume);
    return {checkpoint.resume};
  }
  const std::string name = latest_folder_name(checkpoints_dir);
  if (name.empty()) return {};
  const fs::path latest = fs::path(checkpoints_dir) / kLatestFile;
  const fs::path folder = fs::path(checkpoints_dir) / name;
  if (!fs::is_directory(folder)) {
    throw BadInput(latest.string() + ": names '" + name + "', which is not a folder in " + checkpoints_dir);
  }
  // latest first, then the older step folders, newest first.
  std::vector<fs::path> folders = {folder};
  const std::vector<fs::path> steps = step_folders(checkpoints_dir);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    if (it->filename().string() < name) folders.push_back(*it);
  }
  // Opened up to the first that opens; the older ones are opened only if
  // that one fails to load (RunCheckpoints::resume opens each it loads).
  std::vector<std::string> candidates, failures;
  for (const fs::path& candidate : folders) {
    if (!candidates.empty()) {
      candidates.push_back(candidate.string());
      continue;
    }
    try {
      open_training_checkpoint(candidate.string());
      candidates.push_back(candidate.string());
    } catch (const std::exception& e) {  // BadInput, or a file that cannot be read at all
      failures.push_back(e.what());
    }
  }
  if (candidates.empty()) {
    std::string why;
    for (const std::string& failure : failures) why += "\n  " + failure;
    throw BadInput("checkpoint.resume auto: no checkpoint in " + checkpoints_dir + " passes verification:" + why);
  }
  if (fallbacks != nullptr) *fallbacks = failures;
  return candidates;
}

ModelFiles open_training_checkpoint(const std::string& dir) {
  // ModelFiles::open checks the manifest against the files (sizes,
  // safetensors headers; version 1: CRC32C).
  ModelFiles files = ModelFiles::open(dir);
  if (files.kind() != ModelFiles::Kind::kLoomCheckpoint) {
    throw BadInput(dir + ": a Hugging Face folder, not a loom training checkpoint (use model.init_from to start "
                   "from it)");
  }
  const std::vector<ManifestFile>& listed_files = files.manifest()->files;
  const bool has_state = std::any_of(listed_files.begin(), listed_files.end(),
                                     [&](const ManifestFile& file) { return file.name == kTrainerStateFile; });
  if (!has_state || !files.contains(AdamW::kStepEntry)) {
    throw BadInput(dir + ": has no " + (has_state ? std::string("optimizer state") : kTrainerStateFile) +
                   " in its manifest (a checkpoint written by `loom import` holds weights only; start from it with "
                   "model.init_from)");
  }
  return files;
}

TrainerState load_trainer_state(const ModelFiles& files, Loader& loader) {
  const std::string state_path = (fs::path(files.path()) / kTrainerStateFile).string();
  const std::string text = read_file(state_path);
  // Its checksum: the file is small, and read whole here.
  for (const ManifestFile& file : files.manifest()->files) {
    if (file.name != kTrainerStateFile) continue;
    const std::string actual = crc32c_hex(crc32c(std::as_bytes(std::span(text.data(), text.size()))));
    if (actual != file.crc32c) {
      throw BadInput(state_path + ": CRC32C " + actual + " does not match the manifest's " + file.crc32c + " (corrupt)");
    }
  }
  json state;
  try {
    state = json::parse(text);
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
  TrainerState out;
  out.step = state["step"].get<int64_t>();
  if (out.step != files.step()) {
    throw BadInput(state_path + ": step " + std::to_string(out.step) + " differs from the manifest's " +
                   std::to_string(files.step()));
  }
  // Checkpoints written before the skip policy have no skipped_steps: 0.
  if (state.contains("skipped_steps")) {
    if (!state["skipped_steps"].is_number_integer() || state["skipped_steps"].get<int64_t>() < 0 ||
        state["skipped_steps"].get<int64_t>() > out.step) {
      throw BadInput(state_path + ": 'skipped_steps' is " + state["skipped_steps"].dump() +
                     " (expected an integer in [0, step " + std::to_string(out.step) + "])");
    }
    out.skipped_steps = state["skipped_steps"].get<int64_t>();
  }
  loader.restore(state["loader"], state_path + ": loader");
  set_cpu_rng_state(base64_decode(state["rng_cpu"].get<std::string>(), state_path + ": rng_cpu"),
                    state_path + ": rng_cpu");
  return out;
}

void read_into(const ModelFiles& files, const std::string& name, const Region& region, torch::Tensor destination) {
  if (!files.contains(name)) throw BadInput(files.path() + ": has no tensor '" + name + "' (the run needs it)");
  torch::NoGradGuard no_grad;
  if (destination.device().type() == torch::kCPU && destination.is_contiguous()) {
    files.read_region(name, region, destination);
    return;
  }
  torch::Tensor host = torch::empty({region.numel()}, torch::TensorOptions().dtype(destination.scalar_type()));
  files.read_region(name, region, host);
  destination.copy_(host.view(destination.sizes()));
}

}  // namespace loom

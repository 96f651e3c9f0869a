#include "trainer/run_checkpoints.h"

#include <unistd.h>

#include "checkpoints/hub.h"
#include "parallel/pipeline.h"
#include "parallel/tensor_parallel_model.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

// Replaces run_dir/hf with a fresh export. export_hub writes through its own
// temporary folder; the old export is moved aside only once the new one is
// complete, so there is always one whole hf/ (or hf.new-PID) on disk.
void export_run_to_hub(const LlamaForCausalLM& model, const Config& config, const fs::path& run_dir, int64_t step) {
  const fs::path final_dir = run_dir / "hf";
  const std::string pid = std::to_string(::getpid());
  const fs::path fresh = run_dir / ("hf.new-" + pid);
  const fs::path old = run_dir / ("hf.old-" + pid);
  fs::remove_all(fresh);
  ExportOptions options;
  options.tokenizer_dir = tokenizer_dir_of(config, run_dir);
  options.model_name = config.run.name;
  options.card_notes = "Trained by loom for " + std::to_string(step) + " steps.";
  export_hub(model, fresh.string(), options);
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(fresh, final_dir);
  fsync_directory(run_dir.string());
  fs::remove_all(old);
}

}  // namespace

std::string tokenizer_dir_of(const Config& config, const fs::path& run_dir) {
  if (config.data.tokenizer.empty() || !fs::exists(config.data.tokenizer)) return "";
  const fs::path path(config.data.tokenizer);
  if (fs::is_directory(path)) return path.string();
  if (path.filename() != "tokenizer.json") {
    const fs::path staged = run_dir / "tokenizer";
    fs::create_directories(staged);
    write_file_atomic((staged / "tokenizer.json").string(), read_file(path.string()));
    return staged.string();
  }
  return path.has_parent_path() ? path.parent_path().string() : ".";
}

RunCheckpoints::RunCheckpoints(const Config& config, const ParallelDims& dims, const TrainGroups& groups)
    : config_(config),
      groups_(groups),
      dims_(dims),
      run_dir_(fs::path(config.run.output_dir) / config.run.name),
      checkpoints_dir_(run_dir_ / "checkpoints") {
  resume_from_ = resume_checkpoint_path(config.checkpoint, checkpoints_dir_.string(), &passed_over_);
  if (resume_from_.empty() && fs::exists(checkpoints_dir_ / kLatestFile)) {
    throw BadInput(checkpoints_dir_.string() + " already holds checkpoints and checkpoint.resume is none: use "
                   "checkpoint.resume auto to continue, or another run.name");
  }
}

RunCheckpoints::Resumed RunCheckpoints::resume(ModelParts& parts, Update& update, Loader& loader,
                                               int64_t train_steps) const {
  Resumed resumed;
  if (resume_from_.empty()) return resumed;
  if (parts.model_is_whole && !update.zero_1()) {
    resumed.step = load_training_checkpoint(resume_from_, *parts.model, *update.optimizer(), loader,
                                            &resumed.skipped_steps);
  } else {
    // Load the whole checkpoint as one rank would, then keep this rank's part.
    AdamW whole_optimizer(to_named_tensors(parts.whole->named_parameters()), update.options());
    resumed.step = load_training_checkpoint(resume_from_, *parts.whole, whole_optimizer, loader, &resumed.skipped_steps);
    NamedTensors state = whole_optimizer.state_dict();
    parts.load_from_whole();
    if (groups_.pp != nullptr) state = AdamW::state_for(state, parts.named_params);
    if (groups_.tp != nullptr) {
      state = shard_tensor_parallel(state, optimizer_state_shard_dims(state, parts.param_dims), groups_.tp->rank(),
                                    groups_.tp->size());
    }
    resumed.optimizer_state = std::move(state);
  }
  if (resumed.step > train_steps) {
    throw BadInput(resume_from_ + ": is at step " + std::to_string(resumed.step) + ", past schedule.train_steps " +
                   std::to_string(train_steps));
  }
  return resumed;
}

void RunCheckpoints::mark_resumed() const {
  if (!groups_.writer || passed_over_.empty()) return;
  write_file_atomic((checkpoints_dir_ / kLatestFile).string(), fs::path(resume_from_).filename().string() + "\n");
}

void RunCheckpoints::start_saving(const Config& config) {
  options_ = TrainingCheckpointOptions{
      groups_.writer ? tokenizer_dir_of(config, run_dir_) : "", config_to_yaml(config), config.checkpoint.keep_last,
      {{"dp", dims_.dp}, {"tp", dims_.tp}, {"pp", dims_.pp}, {"world", dims_.world},
       {"zero_stage", config.parallel.zero_stage}}};
  // checkpoint.async: the writer rank hands each snapshot to a background
  // thread, which writes and commits it while training goes on.
  if (groups_.writer && config.checkpoint.enabled && config.checkpoint.async) {
    async_writer_ = std::make_unique<AsyncCheckpointWriter>(checkpoints_dir_.string(), options_);
  }
}

std::string RunCheckpoints::commit(int64_t step, int64_t skipped_steps, const LlamaForCausalLM& whole,
                                   const AdamW& optimizer, const Loader& loader, bool live) {
  // An async snapshot of tensors that training goes on updating (`live`)
  // must be a copy; gathered tensors are fresh and are not touched again.
  // (The previous async save is waited for here, and its host buffers are
  // copied into.)
  TrainingSnapshot spare = async_writer_ ? async_writer_->take_spare() : TrainingSnapshot{};
  TrainingSnapshot snapshot = snapshot_training_state(step, whole, optimizer, loader, skipped_steps,
                                                      /*copy=*/async_writer_ != nullptr && live, &spare);
  if (async_writer_) return async_writer_->start(std::move(snapshot));
  return write_training_checkpoint(checkpoints_dir_.string(), snapshot, options_);
}

NamedTensors RunCheckpoints::gather_whole(const NamedTensors& local,
                                          const std::map<std::string, int64_t>& dims_of) const {
  NamedTensors gathered = groups_.tp != nullptr ? gather_tensor_parallel(*groups_.tp, local, dims_of) : local;
  if (groups_.pp != nullptr && groups_.coords.tp == 0) gathered = gather_pipeline_stages(*groups_.pp, gathered);
  return gathered;
}

std::shared_ptr<LlamaForCausalLM> RunCheckpoints::gathered_model(const ModelParts& parts) const {
  if (groups_.coords.dp != 0) return nullptr;
  if (parts.model_is_whole) return parts.model;
  NamedTensors whole_params = gather_whole(parts.named_params, parts.param_dims);
  return groups_.writer ? whole_model(config_.model, whole_params) : nullptr;
}

std::string RunCheckpoints::save(int64_t step, int64_t skipped_steps, const ModelParts& parts, const Update& update,
                                 const Loader& loader) {
  // ZeRO-1 gathers its state over dp first (collective: every replica).
  NamedTensors state = update.zero_1() ? update.state_dict() : NamedTensors{};
  if (groups_.coords.dp != 0) return "";
  if (parts.model_is_whole && !update.zero_1()) {
    return commit(step, skipped_steps, *parts.model, *update.optimizer(), loader, /*live=*/true);
  }
  if (!update.zero_1()) state = update.state_dict();
  if (!parts.model_is_whole) state = gather_whole(state, optimizer_state_shard_dims(state, parts.param_dims));
  std::shared_ptr<LlamaForCausalLM> whole_now = gathered_model(parts);
  if (!groups_.writer) return "";
  AdamW whole_optimizer(to_named_tensors(whole_now->named_parameters()), update.options());
  whole_optimizer.load_state_dict(state);
  // With a whole model (dp and ZeRO-1 only), its parameters are the live ones.
  return commit(step, skipped_steps, *whole_now, whole_optimizer, loader, /*live=*/parts.model_is_whole);
}

double RunCheckpoints::wait() { return async_writer_ ? async_writer_->wait() : 0.0; }

void RunCheckpoints::export_hub(int64_t step, const ModelParts& parts) const {
  std::shared_ptr<LlamaForCausalLM> whole_now = gathered_model(parts);
  if (groups_.writer) export_run_to_hub(*whole_now, config_, run_dir_, step);
}

}  // namespace loom

#include "trainer/run_checkpoints.h"

#include <unistd.h>

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <optional>

#include "checkpoints/hub.h"
#include "parallel/pipeline.h"
#include "parallel/tensor_parallel_model.h"
#include "trainer/training.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

// A checkpoint of another model than the config's: refused at once, not
// passed over for an older checkpoint (which would be of that model too).
struct OtherModel : BadInput {
  using BadInput::BadInput;
};

// Replaces run_dir/hf with a fresh export, written by `write` into a
// temporary folder; the old export is moved aside only once the new one is
// complete, so there is always one whole hf/ (or hf.new-PID) on disk.
void replace_run_export(const fs::path& run_dir, const std::function<void(const std::string&)>& write) {
  const fs::path final_dir = run_dir / "hf";
  const std::string pid = std::to_string(::getpid());
  const fs::path fresh = run_dir / ("hf.new-" + pid);
  const fs::path old = run_dir / ("hf.old-" + pid);
  fs::remove_all(fresh);
  write(fresh.string());
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(fresh, final_dir);
  fsync_directory(run_dir.string());
  fs::remove_all(old);
}

}  // namespace

std::string tokenizer_dir_of(const Config& config, const fs::path& run_dir) {
  if (config.data.tokenizer.empty() || !fs::exists(config.data.tokenizer)) {
    return config.model.init_from.empty() ? "" : tokenizer_dir_of_model_folder(config.model.init_from);
  }
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
  candidates_ = resume_candidates(config.checkpoint, checkpoints_dir_.string(), &passed_over_);
  resume_from_ = candidates_.empty() ? "" : candidates_.front();
  if (resume_from_.empty() && fs::exists(checkpoints_dir_ / kLatestFile)) {
    throw BadInput(checkpoints_dir_.string() + " already holds checkpoints and checkpoint.resume is none: use "
                   "checkpoint.resume auto to continue, or another run.name");
  }
}

Region RunCheckpoints::region_of(const ModelParts& parts, const std::string& param,
                                 std::vector<int64_t>* global_shape) const {
  const torch::Tensor* local = nullptr;
  for (const auto& [name, tensor] : parts.named_params) {
    if (name == param) local = &tensor;
  }
  if (local == nullptr) throw std::logic_error("checkpoint: this rank holds no parameter '" + param + "'");
  // Padding rows of the vocabulary are in no checkpoint (Note [vocab padding]).
  return checkpoint_region(parts, param, local->sizes().vec(), global_shape);
}

RunCheckpoints::Resumed RunCheckpoints::load(const std::string& folder, ModelParts& parts, Update& update,
                                             Loader& loader) const {
  Resumed resumed;
  // Each rank reads only its own pieces: its slices of its stages'
  // parameters and its part of the optimizer state, from whatever layout
  // saved them.
  // A failed attempt may have started the update already (ZeRO-3 then
  // holds the parameters as shards): back to whole parameters first.
  update.unstart();
  const ModelFiles files = open_training_checkpoint(folder);
  const TrainerState state = load_trainer_state(files, loader);
  resumed.step = state.step;
  resumed.skipped_steps = state.skipped_steps;
  for (const auto& [name, param] : parts.named_params) {
    std::vector<int64_t> shape;
    const Region region = region_of(parts, name, &shape);
    if (!files.contains(name)) {
      throw OtherModel(folder + ": tensor '" + name + "' is missing (the checkpoint was saved for another model)");
    }
    if (files.info(name).shape != shape) {
      throw OtherModel(folder + ": tensor '" + name + "' has shape " +
                     c10::str(c10::IntArrayRef(files.info(name).shape)) + " but the config needs " +
                     c10::str(c10::IntArrayRef(shape)) + " (the checkpoint was saved for another model)");
    }
    if (region.numel() > 0) read_into(files, name, region, stored_part(param, region));
  }
  // ZeRO's flat copy of the parameters is made by start(), from the loaded ones.
  update.start();
  NamedTensors optimizer_state = update.local_state_dict();
  for (auto& [name, tensor] : optimizer_state) {
    if (name == AdamW::kStepEntry) {
      tensor = files.read(name);
      continue;
    }
    const std::string param = AdamW::param_of_entry(name);
    Region region = region_of(parts, param);
    if (const std::optional<Range> range = update.state_range(param)) {
      region = clip_to_stored(region, range->first, range->second);
    }
    // A bf16 parameter's master is the checkpoint's fp32 tensor of the
    // parameter (Note [checkpoints of bf16 parameters]).
    const std::string stored = name == AdamW::master_entry(param) ? param : name;
    if (region.numel() > 0) read_into(files, stored, region, stored_part(tensor, region));
  }
  update.load_local_state_dict(optimizer_state);
  const int64_t adam_steps = update.step_count();
  if (adam_steps != resumed.step - resumed.skipped_steps) {
    throw BadInput(folder + ": optimizer.step is " + std::to_string(adam_steps) + ", the checkpoint is at step " +
                   std::to_string(resumed.step) + " with " + std::to_string(resumed.skipped_steps) +
                   " skipped steps");
  }
  return resumed;
}

RunCheckpoints::Resumed RunCheckpoints::resume(ModelParts& parts, Update& update, Loader& loader,
                                               int64_t train_steps) {
  if (candidates_.empty()) {
    update.start();
    return {};
  }
  // Each candidate is loaded as it is read: its bytes are checked chunk by
  // chunk on the way in, so a checkpoint is read once. A rank that finds a
  // damaged chunk tells the others, and all of them go on to the next older
  // checkpoint (Note [checkpoint commit order] keeps `latest` naming a whole
  // one; a damaged one is the disk's doing).
  for (const std::string& candidate : candidates_) {
    resume_from_ = candidate;
    Resumed resumed;
    std::string failure;
    bool other_model = false;
    try {
      resumed = load(candidate, parts, update, loader);
    } catch (const OtherModel& e) {
      failure = e.what();
      other_model = true;
    } catch (const std::runtime_error& e) {  // BadInput, or a file that cannot be read at all
      failure = e.what();
    }
    if (groups_.world != nullptr && groups_.world->size() > 1) {
      // Every rank learns what any found ("=" marks a checkpoint of another model).
      std::string agreed;
      for (const std::string& text : all_gather_strings(*groups_.world, (other_model ? "=" : "") + failure)) {
        if (text.empty()) continue;
        const bool of_other_model = text.front() == '=';
        const std::string why = of_other_model ? text.substr(1) : text;
        if (of_other_model && !other_model) {
          other_model = true;
          agreed.clear();
        }
        if (of_other_model == other_model && agreed.find(why) == std::string::npos) {
          agreed += (agreed.empty() ? "" : "; ") + why;
        }
      }
      failure = agreed;
    }
    if (other_model) throw BadInput(failure);
    if (failure.empty()) {
      if (resumed.step > train_steps) {
        throw BadInput(candidate + ": is at step " + std::to_string(resumed.step) + ", past schedule.train_steps " +
                       std::to_string(train_steps));
      }
      return resumed;
    }
    if (config_.checkpoint.resume != "auto") throw BadInput(failure);
    passed_over_.push_back(failure);
  }
  std::string why;
  for (const std::string& failure : passed_over_) why += "\n  " + failure;
  throw BadInput("checkpoint.resume auto: no checkpoint in " + checkpoints_dir_.string() + " passes verification:" + why);
}

void RunCheckpoints::mark_resumed() const {
  if (!groups_.writer || passed_over_.empty()) return;
  write_file_atomic((checkpoints_dir_ / kLatestFile).string(), fs::path(resume_from_).filename().string() + "\n");
}

void RunCheckpoints::start_saving(const Config& config) {
  // The writer copies what the base model came with into every checkpoint
  // (Note [what an export carries]).
  const bool with_origin = groups_.writer && !config.model.init_from.empty();
  options_ = TrainingCheckpointOptions{
      groups_.writer ? tokenizer_dir_of(config, run_dir_) : "",
      with_origin ? origin_of_model_folder(config.model.init_from) : ModelOrigin{},
      config_to_yaml(config),
      config.checkpoint.keep_last,
      {{"dp", dims_.dp}, {"tp", dims_.tp}, {"pp", dims_.pp}, {"world", dims_.world},
       {"zero_stage", config.parallel.zero_stage}}};
  if (dims_.cp > 1) options_.saved_by["cp"] = dims_.cp;
  if (dims_.ep > 1) options_.saved_by["ep"] = dims_.ep;
  // checkpoint.async: each rank hands its snapshot to a background thread,
  // which writes its files while training goes on.
  if (config.checkpoint.enabled && config.checkpoint.async) {
    async_writer_ = std::make_unique<AsyncCheckpointWriter>(checkpoints_dir_.string(), options_, rank());
  }
}

CheckpointRank RunCheckpoints::rank() const {
  return {groups_.world != nullptr && groups_.world->size() > 1 ? groups_.world : nullptr, groups_.writer};
}

// Note [who writes a piece]
// A piece several ranks hold is written by one of them: a parameter (and its
// AdamW state) by one of its dp replicas, and one every tp rank holds whole
// (norms) by one of its dp x tp copies; the last pipeline stage's copy of a
// tied embedding not at all. Each goes, largest first, to the copy whose rank
// has written the fewest bytes so far. Every rank of a pipeline stage runs
// the same assignment over the same sizes (the tp ranks' slices are equal),
// so they agree without a word. ZeRO's pieces are unique over dp; those of
// a parameter every tp rank holds go to the tp rank with the fewest bytes.
// Under context parallelism "dp" is the dp group's dp x cp ranks, replicas
// all (Note [cp replicas]); ZeRO shards over them too. Under expert
// parallelism an expert's piece is held by the dp ranks of its ep rank only
// (Note [expert groups]); the ep ranks' lists of pieces differ in names but
// not in sizes, so each simulates the others' choices too. ZeRO's pieces of
// an expert (over edp: Note [ZeRO with expert parallelism]) are unique like
// the dense ones', and go to a tp rank of the replica that holds them.
// `loom plan` runs the same assignment to predict each rank's bytes
// (plan/checkpoint_model.h).
std::vector<int64_t> assign_piece_writers(const std::vector<int64_t>& bytes, const std::vector<bool>& replicated_over_tp,
                                          int64_t dp, int64_t tp, int64_t only_dp, int64_t my_tp,
                                          std::vector<int64_t>& load, const ExpertPieces& experts) {
  std::vector<size_t> order(bytes.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return bytes[a] > bytes[b]; });
  std::vector<int64_t> writer(bytes.size(), -1);
  std::vector<int64_t> slots;  // candidate (dp, tp) slots, as dp * tp + tp
  for (size_t i : order) {
    // The copies of the piece that the ranks hold apart: each tp rank's own
    // slice (unless every tp rank holds it whole), and under expert
    // parallelism each ep rank's own expert (the same sizes on every ep
    // rank). Every copy's choice is simulated, so the loads stay the same on
    // every rank.
    const bool expert = experts.expert != nullptr && (*experts.expert)[i];
    for (int64_t e = expert ? 0 : -1; e < (expert ? experts.ep : 0); ++e) {
      // Pieces of one replica's own (ZeRO's): only its ep rank's experts.
      if (e >= 0 && only_dp >= 0 && only_dp / experts.cp % experts.ep != e) continue;
      for (int64_t t = replicated_over_tp[i] ? -1 : 0; t < (replicated_over_tp[i] ? 0 : tp); ++t) {
        slots.clear();
        for (int64_t d = 0; d < dp; ++d) {
          if ((only_dp >= 0 && d != only_dp) || (e >= 0 && d / experts.cp % experts.ep != e)) continue;
          for (int64_t u = 0; u < tp; ++u) {
            if (t < 0 || u == t) slots.push_back(d * tp + u);
          }
        }
        const int64_t slot =
            *std::min_element(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return load[a] < load[b]; });
        load[slot] += bytes[i];
        if ((e < 0 || e == experts.my_ep) && (t < 0 || t == my_tp)) writer[i] = slot;
      }
    }
  }
  return writer;
}

std::vector<bool> RunCheckpoints::assign_writers(const std::vector<OwnedPiece>& pieces,
                                                 const std::vector<bool>& replicated_over_tp,
                                                 std::vector<int64_t>& load, bool over_dp) const {
  // The dp group holds dp x cp ranks (Note [cp replicas]): all hold the same
  // parameters and, without ZeRO, the same state, and ZeRO shards over all
  // of them. So the writers are chosen among them, by the rank in that group
  // (dp * cp + cp, split_grid's order; the dp rank without cp).
  const int64_t replicas = dims_.dp * dims_.cp, my_tp = groups_.coords.tp;
  const int64_t my_replica = groups_.coords.dp * dims_.cp + groups_.coords.cp;
  std::vector<int64_t> bytes;
  std::vector<bool> expert;
  for (const OwnedPiece& piece : pieces) {
    bytes.push_back(static_cast<int64_t>(piece.values.nbytes()));
    expert.push_back(dims_.ep > 1 && is_expert_parameter(piece.name));
  }
  const std::vector<int64_t> writer =
      assign_piece_writers(bytes, replicated_over_tp, replicas, dims_.tp, over_dp ? -1 : my_replica, my_tp, load,
                           {&expert, dims_.ep, dims_.cp, groups_.coords.dp % dims_.ep});
  std::vector<bool> mine(pieces.size(), false);
  for (size_t i = 0; i < pieces.size(); ++i) mine[i] = writer[i] == my_replica * dims_.tp + my_tp;
  return mine;
}

TrainingSnapshot RunCheckpoints::snapshot(int64_t step, int64_t skipped_steps, const ModelParts& parts,
                                          const Update& update, const Loader& loader, TrainingSnapshot* reuse) const {
  TrainingSnapshot snapshot;
  snapshot.step = step;
  snapshot.model_config = config_.model;
  if (groups_.writer) snapshot.trainer_state = trainer_state_text(step, skipped_steps, loader);
  std::vector<int64_t> load(static_cast<size_t>(dims_.dp * dims_.cp * dims_.tp), 0);
  // The parameters and (without ZeRO-1) the AdamW state, both replicated over dp.
  std::vector<OwnedPiece> replicated;
  std::vector<bool> over_tp;
  std::vector<bool> is_model;
  const auto add = [&](std::vector<OwnedPiece>& to, std::vector<bool>& tp_copies, const std::string& name,
                       const std::string& param, const torch::Tensor& values, std::optional<Range> flat) {
    std::vector<int64_t> shape;
    Region region = region_of(parts, param, &shape);
    if (flat) region = clip_to_stored(region, flat->first, flat->second);
    to.push_back({name, shape, region, values});
    tp_copies.push_back(parts.param_dims.at(param) < 0);
  };
  // The step: one scalar, written by world rank 0.
  NamedTensors state = update.local_state_dict();
  // Note [checkpoints of bf16 parameters]: a bf16 parameter is stored as its
  // fp32 master, under the parameter's name, and the master entry is not
  // stored again: the checkpoint is the fp32 run's, whatever precision.params
  // saved it or resumes it.
  std::map<std::string, torch::Tensor> masters;
  for (const auto& [name, tensor] : state) {
    if (name == AdamW::master_entry(AdamW::param_of_entry(name))) masters.emplace(AdamW::param_of_entry(name), tensor);
  }
  // Under ZeRO those masters are pieces (Note [ZeRO with bf16 parameters]):
  // each rank writes its own, as it writes its AdamW state.
  for (const auto& [name, param] : parts.named_params) {
    if (name == parts.tied_copy || update.master_in_pieces(name)) continue;
    const auto master = masters.find(name);
    add(replicated, over_tp, name, name, master == masters.end() ? param : master->second, std::nullopt);
    is_model.push_back(true);
  }
  std::vector<OwnedPiece> optimizer;
  if (groups_.writer) {
    for (const auto& [name, tensor] : state) {
      if (name == AdamW::kStepEntry) optimizer.push_back({name, {}, Region::whole({}), tensor.reshape({})});
    }
  }
  std::vector<OwnedPiece> zero_pieces;
  std::vector<bool> zero_over_tp, zero_is_model;
  for (const auto& [name, tensor] : state) {
    if (name == AdamW::kStepEntry) continue;
    const std::string param = AdamW::param_of_entry(name);
    const bool is_master = masters.count(param) != 0 && name == AdamW::master_entry(param);
    if (param == parts.tied_copy || (is_master && !update.master_in_pieces(param))) continue;
    // ZeRO's pieces (Note [ZeRO with expert parallelism]: under ep the
    // experts' are over edp, or whole where edp is one rank); a master's
    // piece is the parameter's.
    if (const std::optional<Range> range = update.state_range(param)) {
      add(zero_pieces, zero_over_tp, is_master ? param : name, param, tensor, *range);
      zero_is_model.push_back(is_master);
    } else {
      add(replicated, over_tp, name, param, tensor, std::nullopt);
      is_model.push_back(false);
    }
  }
  const std::vector<bool> mine = assign_writers(replicated, over_tp, load, /*over_dp=*/true);
  for (size_t i = 0; i < replicated.size(); ++i) {
    if (mine[i]) (is_model[i] ? snapshot.model : optimizer).push_back(std::move(replicated[i]));
  }
  const std::vector<bool> mine_zero = assign_writers(zero_pieces, zero_over_tp, load, /*over_dp=*/false);
  for (size_t i = 0; i < zero_pieces.size(); ++i) {
    if (mine_zero[i]) (zero_is_model[i] ? snapshot.model : optimizer).push_back(std::move(zero_pieces[i]));
  }
  snapshot.optimizer = std::move(optimizer);
  // Writers were chosen by the local tensors' sizes, the same on every tp
  // rank; what is written leaves out the padding rows (Note [vocab padding]),
  // and a piece of padding only is not written at all.
  for (std::vector<OwnedPiece>* pieces : {&snapshot.model, &snapshot.optimizer}) {
    std::erase_if(*pieces, [](const OwnedPiece& piece) { return piece.region.numel() == 0; });
    for (OwnedPiece& piece : *pieces) piece.values = stored_part(piece.values, piece.region);
  }
  // An async snapshot must own copies: training goes on updating the tensors.
  const bool copy = async_writer_ != nullptr;
  snapshot.model = pieces_to_host(std::move(snapshot.model), copy, reuse ? &reuse->model : nullptr);
  snapshot.optimizer = pieces_to_host(std::move(snapshot.optimizer), copy, reuse ? &reuse->optimizer : nullptr);
  return snapshot;
}

std::string RunCheckpoints::save(int64_t step, int64_t skipped_steps, const ModelParts& parts, const Update& update,
                                 const Loader& loader) {
  if (async_writer_) {
    // Waits for (and commits) the previous save, whose host buffers are
    // copied into.
    TrainingSnapshot spare = async_writer_->take_spare();
    return async_writer_->start(snapshot(step, skipped_steps, parts, update, loader, &spare));
  }
  return write_training_checkpoint(checkpoints_dir_.string(),
                                   snapshot(step, skipped_steps, parts, update, loader, nullptr), options_, rank());
}

double RunCheckpoints::wait() { return async_writer_ ? async_writer_->wait() : 0.0; }

std::shared_ptr<LlamaForCausalLM> RunCheckpoints::gathered_model(const ModelParts& parts) const {
  // Replica 0 gathers; under expert parallelism its first block's ep ranks
  // first gather their experts (Note [expert groups]).
  const bool gathers_experts = groups_.ep != nullptr && groups_.coords.dp < dims_.ep;
  if ((groups_.coords.dp != 0 && !gathers_experts) || groups_.coords.cp != 0) return nullptr;
  if (parts.model_is_whole && groups_.ep == nullptr) return parts.model;
  NamedTensors gathered = groups_.tp != nullptr ? gather_tensor_parallel(*groups_.tp, parts.named_params,
                                                                         parts.param_dims, parts.param_unpadded)
                                                : parts.named_params;
  if (groups_.ep != nullptr) {
    gathered = gather_experts(*groups_.ep, gathered);
    if (groups_.coords.dp != 0) return nullptr;
  }
  if (groups_.pp != nullptr && groups_.coords.tp == 0) gathered = gather_pipeline_stages(*groups_.pp, gathered);
  return groups_.writer ? whole_model(config_.model, gathered) : nullptr;
}

void RunCheckpoints::export_hub(int64_t step, const std::string& checkpoint, const LlamaForCausalLM* whole) const {
  ExportOptions options;
  options.dtype = config_.checkpoint.export_dtype == "float32"   ? torch::kFloat
                  : config_.checkpoint.export_dtype == "float16" ? torch::kHalf
                                                                 : torch::kBFloat16;
  options.tokenizer_dir = options_.tokenizer_dir;
  options.origin = options_.origin;
  for (const auto& source : config_.data.train) options.datasets.push_back(hub_dataset_id_of(source.path));
  options.model_name = config_.run.name;
  options.card_notes = "Trained by loom for " + std::to_string(step) + " steps" +
                       (config_.model.init_from.empty() ? "" : " from " + config_.model.init_from) + ".";
  replace_run_export(run_dir_, [&](const std::string& out) {
    // From the checkpoint of this step, streamed a few MiB at a time: no rank
    // holds the whole model. Without one (checkpoints off), gathered.
    if (!checkpoint.empty()) {
      export_hub_streaming(ModelFiles::open(checkpoint), out, options);
    } else {
      loom::export_hub(*whole, out, options);
    }
  });
}

void RunCheckpoints::export_hub(int64_t step, const ModelParts& parts) {
  // The checkpoint just saved at this step, when there is one: exported by
  // the writer alone while the others wait at the end of the run. The
  // writer decides (the others may get here before it has committed it).
  const fs::path saved = checkpoints_dir_ / checkpoint_folder_name(step);
  bool from_checkpoint = !groups_.writer || (config_.checkpoint.enabled && fs::exists(saved / "manifest.json"));
  if (groups_.world != nullptr && groups_.world->size() > 1) {
    torch::Tensor agreed = torch::tensor(static_cast<int64_t>(from_checkpoint));
    all_reduce_through_cpu(*groups_.world, agreed, ReduceOp::kMin);
    from_checkpoint = agreed.item<int64_t>() != 0;
  }
  const std::shared_ptr<LlamaForCausalLM> whole = from_checkpoint ? nullptr : gathered_model(parts);
  if (groups_.writer) export_hub(step, from_checkpoint ? saved.string() : "", whole.get());
}

}  // namespace loom

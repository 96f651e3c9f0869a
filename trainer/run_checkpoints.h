// A run's checkpoints and its Hub export: which checkpoint to resume from and
// loading it onto this rank's layout, saving (now, or in the background with
// checkpoint.async), and the export at the end of the run.
//
// Checkpoints are sharded (docs/checkpoints.md): on save every rank writes
// the pieces it owns (Note [who writes a piece]) and world rank 0 commits
// the folder; on resume every rank reads, from whatever layout saved them,
// only the bytes of its own slices of the parameters and of its part of the
// optimizer state.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/loader.h"
#include "parallel/topology.h"
#include "trainer/model_parts.h"
#include "trainer/training_checkpoint.h"
#include "trainer/update.h"

namespace loom {

class RunCheckpoints {
 public:
  // Decides the checkpoint to resume from before anything is written, so a
  // refused resume leaves the run folder as it was. With checkpoint.resume
  // auto, a checkpoint that fails verification is passed over for the newest
  // older one that passes. BadInput when the run already holds checkpoints
  // and checkpoint.resume is none.
  RunCheckpoints(const Config& config, const ParallelDims& dims, const TrainGroups& groups);

  const std::string& resume_from() const { return resume_from_; }  // "" for a fresh run
  const std::vector<std::string>& passed_over() const { return passed_over_; }
  const std::filesystem::path& checkpoints_dir() const { return checkpoints_dir_; }

  struct Resumed {
    int64_t step = 0;           // completed steps
    int64_t skipped_steps = 0;  // of those, skipped
  };
  // Loads resume_from() into this rank's parts, the loader's position and
  // the CPU RNG, starts `update` (Update::start) and loads its optimizer
  // state; for a fresh run only starts it. With checkpoint.resume auto, a
  // checkpoint in which any rank finds a damaged chunk is passed over for
  // the next older one (collective). BadInput for a checkpoint past
  // `train_steps`, of another model, or when none loads.
  Resumed resume(ModelParts& parts, Update& update, Loader& loader, int64_t train_steps);

  // On the writer: `latest` names the checkpoint resumed from when later ones
  // were passed over, so that they are replaced when training reaches their
  // steps again.
  void mark_resumed() const;

  // Ready to save: the manifest's facts and (checkpoint.async) the
  // background writer. The writer stages the tokenizer in the run folder.
  void start_saving(const Config& config);

  // Writes (or, async, starts writing) the checkpoint of `step`, returning its
  // folder on the writer and "" elsewhere. Collective over the world.
  std::string save(int64_t step, int64_t skipped_steps, const ModelParts& parts, const Update& update,
                   const Loader& loader);
  bool async() const { return async_writer_ != nullptr; }
  // Waits for (and commits) a background write; the seconds the last one
  // took (0: none). Collective over the world.
  double wait();
  // With checkpoint.async, the seconds the last finished background write
  // took (0: none yet, or not async).
  double last_background_write_seconds() { return async_writer_ ? async_writer_->last_write_seconds() : 0.0; }

  // Replaces run_dir/hf with a Hub export of the model at `step`: streamed
  // by the writer from the checkpoint of that step when there is one, else
  // gathered to the writer. Collective over the grid.
  void export_hub(int64_t step, const ModelParts& parts);

 private:
  CheckpointRank rank() const;
  // One candidate checkpoint into this rank's parts and optimizer.
  Resumed load(const std::string& folder, ModelParts& parts, Update& update, Loader& loader) const;
  // The region of the global parameter `param` this rank holds (its tp
  // slice), and the global shape.
  Region region_of(const ModelParts& parts, const std::string& param, std::vector<int64_t>* global_shape = nullptr) const;
  std::vector<bool> assign_writers(const std::vector<OwnedPiece>& pieces, const std::vector<bool>& replicated_over_tp,
                                   std::vector<int64_t>& load, bool over_dp) const;
  TrainingSnapshot snapshot(int64_t step, int64_t skipped_steps, const ModelParts& parts, const Update& update,
                            const Loader& loader, TrainingSnapshot* reuse) const;
  std::shared_ptr<LlamaForCausalLM> gathered_model(const ModelParts& parts) const;
  // The writer's part: streamed from `checkpoint`, or ("") from `whole`.
  void export_hub(int64_t step, const std::string& checkpoint, const LlamaForCausalLM* whole) const;

  const Config& config_;
  const TrainGroups groups_;
  const ParallelDims dims_;
  const std::filesystem::path run_dir_, checkpoints_dir_;
  std::vector<std::string> candidates_;  // to resume from, in order: latest, then older ones
  std::string resume_from_;
  std::vector<std::string> passed_over_;
  TrainingCheckpointOptions options_;
  std::unique_ptr<AsyncCheckpointWriter> async_writer_;
};

// Note [who writes a piece] (trainer/run_checkpoints.cpp): of the pieces of
// one pipeline stage, of `bytes` each (a tp rank's slice, or the whole
// tensor where `replicated_over_tp`), the (dp, tp) slot, dp_rank * tp +
// tp_rank, that writes each, largest first to the slot that has written the
// fewest bytes so far; `load` (dp * tp slots) is updated with them. With
// `only_dp` >= 0 only that dp rank's slots are candidates (ZeRO's pieces,
// unique over dp, and under ep an expert's, unique over edp: only the copy
// of that replica's ep rank is placed). Returns, per piece, the slot that
// writes tp rank `my_tp`'s copy. Under expert parallelism the pieces
// `expert` marks are held by the replicas d whose dp rank d / cp has
// d / cp % ep == the ep rank only, and the slot returned is the one that
// writes ep rank `my_ep`'s.
struct ExpertPieces {
  const std::vector<bool>* expert = nullptr;  // parallel to bytes; null: none
  int64_t ep = 1;
  int64_t cp = 1;  // replicas of one dp rank (dp's slots are dp * cp + cp)
  int64_t my_ep = 0;
};
std::vector<int64_t> assign_piece_writers(const std::vector<int64_t>& bytes, const std::vector<bool>& replicated_over_tp,
                                          int64_t dp, int64_t tp, int64_t only_dp, int64_t my_tp,
                                          std::vector<int64_t>& load, const ExpertPieces& experts = {});

// The folder holding the tokenizer files, from data.tokenizer (a folder or a
// tokenizer.json: the files of its folder, where a fine-tune's added tokens
// live), else model.init_from's. Checkpoints and exports copy files by their
// Hub names, so a tokenizer file under another name is staged as
// run_dir/tokenizer/tokenizer.json.
std::string tokenizer_dir_of(const Config& config, const std::filesystem::path& run_dir);

}  // namespace loom

// A run's checkpoints and its Hub export: which checkpoint to resume from and
// loading it onto this rank's layout, saving (now, or in the background with
// checkpoint.async), and the export at the end of the run.
//
// Checkpoints hold whole tensors, as a single rank writes them: on save,
// tensor-parallel shards are gathered first, then the pipeline stages on the
// first (collective over the groups, so every rank calls save()), and the
// writer (world rank 0) writes the same files a single-rank run writes. Every
// data-parallel replica holds the same weights, so only dp rank 0 gathers,
// and every tp rank then holds the same stage, so only tp rank 0's pp group
// goes on. On resume every rank loads the whole checkpoint as one rank would
// and keeps its part.
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
    // The optimizer state of this rank's model part, whole over dp, for
    // Update::start (empty when it went straight into update's AdamW).
    NamedTensors optimizer_state;
  };
  // Loads resume_from() into this rank's parts, its optimizer and the
  // loader's position. BadInput for a checkpoint past `train_steps`.
  Resumed resume(ModelParts& parts, Update& update, Loader& loader, int64_t train_steps) const;

  // On the writer: `latest` names the checkpoint resumed from when later ones
  // were passed over, so that they are replaced when training reaches their
  // steps again.
  void mark_resumed() const;

  // Ready to save: the manifest's facts and (checkpoint.async) the
  // background writer. The writer stages the tokenizer in the run folder.
  void start_saving(const Config& config);

  // Writes (or, async, starts writing) the checkpoint of `step`, returning its
  // folder on the writer and "" elsewhere. Collective over the grid.
  std::string save(int64_t step, int64_t skipped_steps, const ModelParts& parts, const Update& update,
                   const Loader& loader);
  bool async() const { return async_writer_ != nullptr; }
  // Waits for a background write; the seconds the last one took (0: none).
  double wait();

  // Replaces run_dir/hf with a Hub export of the model at `step` (gathered
  // to the writer, which writes it). Collective over the grid.
  void export_hub(int64_t step, const ModelParts& parts) const;

 private:
  std::string commit(int64_t step, int64_t skipped_steps, const LlamaForCausalLM& whole, const AdamW& optimizer,
                     const Loader& loader, bool live);
  NamedTensors gather_whole(const NamedTensors& local, const std::map<std::string, int64_t>& dims_of) const;
  std::shared_ptr<LlamaForCausalLM> gathered_model(const ModelParts& parts) const;

  const Config& config_;
  const TrainGroups groups_;
  const ParallelDims dims_;
  const std::filesystem::path run_dir_, checkpoints_dir_;
  std::string resume_from_;
  std::vector<std::string> passed_over_;
  TrainingCheckpointOptions options_;
  std::unique_ptr<AsyncCheckpointWriter> async_writer_;
};

// The folder holding the tokenizer files, from data.tokenizer (a folder or a
// tokenizer.json). Checkpoints and exports copy files by their Hub names, so
// a tokenizer file under another name is staged as run_dir/tokenizer/tokenizer.json.
std::string tokenizer_dir_of(const Config& config, const std::filesystem::path& run_dir);

}  // namespace loom

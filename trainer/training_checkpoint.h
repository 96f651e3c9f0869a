// Training checkpoints: what train() saves so that a run resumes bit for bit,
// and how it finds and loads them again.
//
// A training checkpoint is a loom checkpoint (checkpoints/loom_checkpoint.h)
// with more files, all listed in the manifest with their CRC32C:
//   optimizer-rankNNNNN.safetensors  each rank's pieces of AdamW::state_dict()
//   trainer-state-rank00000.json     {"format": "loom-trainer-state", "version": 1,
//                                     "step", "skipped_steps" (non-finite steps
//                                     skipped so far; absent = 0),
//                                     "loader": Loader::state(),
//                                     "rng_cpu": base64 of the CPU generator state}
// Order of writes (see Note [checkpoint commit order]): the step folder is
// written under a temporary name and renamed; then `latest` is replaced
// atomically; only then are folders beyond checkpoint.keep_last deleted.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/hub.h"
#include "checkpoints/model_origin.h"
#include "checkpoints/regions.h"
#include "config/config.h"
#include "data/loader.h"
#include "model/llama.h"
#include "optim/optimizer.h"
#include "parallel/process_group.h"

namespace loom {

// What a single rank writes; rank N of several writes optimizer-rankNNNNN.
inline constexpr const char* kOptimizerStateFile = "optimizer-rank00000.safetensors";
inline constexpr const char* kTrainerStateFile = "trainer-state-rank00000.json";
inline constexpr const char* kLatestFile = "latest";

struct TrainingCheckpointOptions {
  std::string tokenizer_dir;  // copied into the checkpoint ("" = none)
  ModelOrigin origin;         // the base model's, copied into origin/ (Note [what an export carries])
  std::string config_yaml;    // the resolved config
  int64_t keep_last = 0;      // step folders kept; 0 = all
  std::map<std::string, int64_t> saved_by;  // the run's layout, for the manifest (dp, tp, pp, world, zero_stage)
};

// One piece of a tensor that this rank writes: the elements of `region` of
// the global tensor `name` of `shape` (Note [pieces are boxes with a flat
// range]), as a contiguous CPU tensor.
struct OwnedPiece {
  std::string name;
  std::vector<int64_t> shape;
  Region region;
  torch::Tensor values;
};

// What this rank writes into a training checkpoint, taken at a step
// boundary: its pieces of the parameters and of the AdamW state, and (on the
// writer) the trainer state as JSON text.
struct TrainingSnapshot {
  int64_t step = 0;
  ModelConfig model_config;
  std::vector<OwnedPiece> model;
  std::vector<OwnedPiece> optimizer;
  std::string trainer_state;  // trainer-state-rank00000.json; written by the writer only
};

// The trainer state file's text: the step, skip count, loader position and
// the CPU RNG state.
std::string trainer_state_text(int64_t step, int64_t skipped_steps, const Loader& loader);

// The snapshot of a single-rank run: the whole of every parameter and of
// the AdamW state. With `copy` every tensor is copied to host memory the
// snapshot owns, so that training may go on while it is written (into
// `reuse`'s tensors where they fit: an earlier snapshot's buffers;
// page-locked memory for GPU tensors); without, CPU tensors are shared (for
// a write that completes before the next update).
// `skipped_steps`: steps of the `step` done that skipped the update
// (optimizer.nonfinite_policy skip), so AdamW has stepped step - skipped_steps times.
TrainingSnapshot snapshot_training_state(int64_t step, const LlamaForCausalLM& model, const AdamW& optimizer,
                                         const Loader& loader, int64_t skipped_steps, bool copy,
                                         TrainingSnapshot* reuse = nullptr);

// `pieces` on the host: shared where they already are contiguous CPU tensors
// and `copy` is false, else copied (into `reuse`'s buffers where they fit).
std::vector<OwnedPiece> pieces_to_host(std::vector<OwnedPiece> pieces, bool copy, std::vector<OwnedPiece>* reuse);

// Where this rank stands in a save: the world group (null on one rank), and
// whether it is the writer that commits the folder.
struct CheckpointRank {
  ProcessGroup* world = nullptr;
  bool writer = true;
  int64_t rank() const { return world != nullptr ? world->rank() : 0; }
};

// The three phases of a save (Note [checkpoint commit order]). The writer
// makes `checkpoints_dir`/step-NNNNNNN.tmp (collective: every rank returns
// its path once it exists) ...
std::string prepare_checkpoint_folder(const std::string& checkpoints_dir, int64_t step, const CheckpointRank& rank);
// ... every rank writes its pieces into it (returns what it wrote, or "!"
// and the error) ...
std::string write_snapshot_files(const std::string& tmp, const TrainingSnapshot& snapshot, const CheckpointRank& rank);
// ... and the writer commits it once every rank has written (collective):
// manifest, trainer state, rename, `latest`, pruning. Returns the folder on
// the writer, "" elsewhere. std::runtime_error on every rank when one of
// them failed to write (the folder is then removed and `latest` unchanged).
std::string commit_training_checkpoint(const std::string& checkpoints_dir, const std::string& tmp,
                                       const TrainingSnapshot& snapshot, const std::string& written,
                                       const TrainingCheckpointOptions& options, const CheckpointRank& rank);

// All three: writes `checkpoints_dir`/step-NNNNNNN from every rank's
// snapshot, points `latest` at it and prunes older step folders. Returns the
// new folder on the writer. BadInput when the folder already exists and
// `latest` names it.
std::string write_training_checkpoint(const std::string& checkpoints_dir, const TrainingSnapshot& snapshot,
                                      const TrainingCheckpointOptions& options, const CheckpointRank& rank = {});

// Writes training checkpoints on a background thread (checkpoint.async):
// start() takes a snapshot that owns its tensors and returns at once; the
// thread writes this rank's files. On one rank it also commits the folder,
// exactly as write_training_checkpoint does; on several the commit is
// collective, so it waits for the training thread: the next save, or wait()
// at the end of the run. One write at a time. wait() rethrows the error of a
// write that failed (whose folder is then absent and `latest` unchanged).
// The destructor waits for the thread, but swallows errors and commits nothing.
class AsyncCheckpointWriter {
 public:
  AsyncCheckpointWriter(std::string checkpoints_dir, TrainingCheckpointOptions options, CheckpointRank rank);
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;
  ~AsyncCheckpointWriter();

  // Commits the previous write and hands back its snapshot, whose tensors
  // the next snapshot can copy into (empty the first time). Collective.
  TrainingSnapshot take_spare();
  // Returns the folder the snapshot will be committed to ("" off the
  // writer). Collective: the folder is prepared first.
  std::string start(TrainingSnapshot snapshot);
  // Commits the write in progress, if any; returns the seconds the last
  // finished write took (0 when none finished). Collective.
  double wait();
  // The seconds the last finished write took, from its start to its commit
  // (0 before the first); what a stop's own save adds to its stall.
  double last_write_seconds();

 private:
  void run();

  const std::string checkpoints_dir_;
  const TrainingCheckpointOptions options_;
  const CheckpointRank rank_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<TrainingSnapshot> pending_;  // handed to the thread
  TrainingSnapshot spare_;                   // the last one written, for reuse
  std::string tmp_;                          // the folder being written
  std::string written_;                      // what the thread wrote, for the commit
  bool uncommitted_ = false;                 // written on several ranks, not yet committed
  bool busy_ = false;                        // pending_ set or being written
  bool quit_ = false;
  std::exception_ptr error_;
  double last_seconds_ = 0.0;
  std::chrono::steady_clock::time_point started_;
  std::thread thread_;  // last: starts after the members above exist
};

// Writes `checkpoints_dir`/step-NNNNNNN for `step` of a single-rank run,
// points `latest` at it and prunes older step folders. Returns the new
// folder. BadInput when the folder already exists (e.g. checkpoint.resume
// none over an earlier run).
std::string save_training_checkpoint(const std::string& checkpoints_dir, int64_t step, const LlamaForCausalLM& model,
                                     const AdamW& optimizer, const Loader& loader,
                                     const TrainingCheckpointOptions& options, int64_t skipped_steps = 0);

// The checkpoint folders checkpoint.resume asks for, to try in order: for
// "none" none, for a path the path itself, for "auto" the one
// `checkpoints_dir`/latest names (none when there is no latest) and then the
// older step folders, newest first, from the first that opens
// (open_training_checkpoint: the manifest against the files' sizes and
// headers; version 1 files also against their CRC32C); each newer one that
// does not is described in `fallbacks` ("FOLDER...: why"). The later ones are
// opened, and all are checked, as they are loaded. BadInput when none opens,
// naming each failure, or when latest names a missing folder.
std::vector<std::string> resume_candidates(const CheckpointConfig& checkpoint, const std::string& checkpoints_dir,
                                           std::vector<std::string>* fallbacks = nullptr);

// The training checkpoint at `dir`, opened: the manifest against the files'
// sizes and safetensors headers (version 1: also their CRC32C; version 2's
// chunks are checked as they are read), and the optimizer and trainer state
// present. BadInput naming what fails.
ModelFiles open_training_checkpoint(const std::string& dir);

// The trainer state of a training checkpoint (opened with
// open_training_checkpoint): its step and skip count; restores the loader's
// position and the CPU RNG state. BadInput naming what is wrong.
struct TrainerState {
  int64_t step = 0;
  int64_t skipped_steps = 0;
};
TrainerState load_trainer_state(const ModelFiles& files, Loader& loader);

// Reads `region` of the stored tensor `name` into `destination` (any
// device and floating dtype, region.numel() elements), through a CPU copy
// unless it is a contiguous CPU tensor.
void read_into(const ModelFiles& files, const std::string& name, const Region& region, torch::Tensor destination);

}  // namespace loom

// Training checkpoints: what train() saves so that a run resumes bit for bit,
// and how it finds and loads them again.
//
// A training checkpoint is a loom checkpoint (checkpoints/loom_checkpoint.h)
// with two more files, both listed in the manifest with their CRC32C:
//   optimizer-rank00000.safetensors  AdamW::state_dict()
//   trainer-state-rank00000.json     {"format": "loom-trainer-state", "version": 1,
//                                     "step", "skipped_steps" (non-finite steps
//                                     skipped so far; absent = 0),
//                                     "loader": Loader::state(),
//                                     "rng_cpu": base64 of the CPU generator state}
// Order of writes (see Note [checkpoint commit order]): the step folder is
// written under a temporary name and renamed; then `latest` is replaced
// atomically; only then are folders beyond checkpoint.keep_last deleted.
#pragma once

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
#include "data/loader.h"
#include "config/config.h"
#include "model/llama.h"
#include "optim/optimizer.h"

namespace loom {

inline constexpr const char* kOptimizerStateFile = "optimizer-rank00000.safetensors";
inline constexpr const char* kTrainerStateFile = "trainer-state-rank00000.json";
inline constexpr const char* kLatestFile = "latest";

struct TrainingCheckpointOptions {
  std::string tokenizer_dir;  // copied into the checkpoint ("" = none)
  std::string config_yaml;    // the resolved config
  int64_t keep_last = 0;      // step folders kept; 0 = all
  std::map<std::string, int64_t> saved_by;  // the run's layout, for the manifest (dp, tp, pp, world, zero_stage)
};

// Everything a training checkpoint holds, taken at a step boundary: the
// parameters and AdamW state as CPU tensors, the trainer state as JSON text.
struct TrainingSnapshot {
  int64_t step = 0;
  ModelConfig model_config;
  NamedTensors model;
  NamedTensors optimizer;
  std::string trainer_state;  // trainer-state-rank00000.json
};

// Takes the state of `model`, `optimizer`, `loader` and the CPU RNG. With
// `copy` every tensor is copied to host memory the snapshot owns, so that
// training may go on while it is written (into `reuse`'s tensors where they
// fit: an earlier snapshot's buffers; page-locked memory for GPU tensors);
// without, CPU tensors are shared (for a write that completes before the
// next update).
// `skipped_steps`: steps of the `step` done that skipped the update
// (optimizer.nonfinite_policy skip), so AdamW has stepped step - skipped_steps times.
TrainingSnapshot snapshot_training_state(int64_t step, const LlamaForCausalLM& model, const AdamW& optimizer,
                                         const Loader& loader, int64_t skipped_steps, bool copy,
                                         TrainingSnapshot* reuse = nullptr);

// Writes `checkpoints_dir`/step-NNNNNNN from `snapshot`, points `latest` at
// it and prunes older step folders (Note [checkpoint commit order]).
// Returns the new folder. BadInput when the folder already exists and
// `latest` names it.
std::string write_training_checkpoint(const std::string& checkpoints_dir, const TrainingSnapshot& snapshot,
                                      const TrainingCheckpointOptions& options);

// Writes training checkpoints on a background thread (checkpoint.async):
// start() takes a snapshot that owns its tensors and returns at once; the
// thread writes, fsyncs and commits it exactly as write_training_checkpoint
// does. One write at a time: start() first waits for the previous one.
// wait() returns once nothing is being written and rethrows the error of a
// write that failed (whose folder is then absent and `latest` unchanged).
// The destructor waits too, but swallows errors: call wait() to see them.
class AsyncCheckpointWriter {
 public:
  AsyncCheckpointWriter(std::string checkpoints_dir, TrainingCheckpointOptions options);
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;
  ~AsyncCheckpointWriter();

  // Waits for the previous write and hands back its snapshot, whose tensors
  // the next snapshot_training_state can copy into (empty the first time).
  TrainingSnapshot take_spare();
  // Returns the folder the snapshot will be committed to.
  std::string start(TrainingSnapshot snapshot);
  // Returns the seconds the last finished write took (0 when none finished).
  double wait();

 private:
  void run();

  const std::string checkpoints_dir_;
  const TrainingCheckpointOptions options_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<TrainingSnapshot> pending_;  // handed to the thread
  TrainingSnapshot spare_;                   // the last one written, for reuse
  bool busy_ = false;                        // pending_ set or being written
  bool quit_ = false;
  std::exception_ptr error_;
  double last_seconds_ = 0.0;
  std::thread thread_;  // last: starts after the members above exist
};

// Writes `checkpoints_dir`/step-NNNNNNN for `step`, points `latest` at it and
// prunes older step folders. Returns the new folder. BadInput when the folder
// already exists (e.g. checkpoint.resume none over an earlier run).
// `skipped_steps`: steps of the `step` done that skipped the update
// (optimizer.nonfinite_policy skip), so AdamW has stepped step - skipped_steps times.
std::string save_training_checkpoint(const std::string& checkpoints_dir, int64_t step, const LlamaForCausalLM& model,
                                     const AdamW& optimizer, const Loader& loader,
                                     const TrainingCheckpointOptions& options, int64_t skipped_steps = 0);

// The checkpoint folder checkpoint.resume asks for: for "none" "", for a
// path the path itself, for "auto" the one `checkpoints_dir`/latest names
// ("" when there is no latest) once it passes verification (every file's
// size and CRC32C, the manifest against the files, the optimizer and trainer
// state present). When it fails, the newest older step folder that passes
// is taken instead and each failed one is described in `fallbacks` ("FOLDER:
// why"); BadInput when none passes, naming each failure, or when latest
// names a missing folder.
std::string resume_checkpoint_path(const CheckpointConfig& checkpoint, const std::string& checkpoints_dir,
                                   std::vector<std::string>* fallbacks = nullptr);

// The weights of the training checkpoint at `dir`, verified: every file's
// size and CRC32C, the manifest's tensors against the files, and the
// optimizer and trainer state present. BadInput naming what fails.
ModelFiles open_training_checkpoint(const std::string& dir);

// Loads weights, optimizer state, data position and CPU RNG state from a
// training checkpoint and returns its step. Every file is verified (size and
// CRC32C) before anything is loaded; BadInput names the file at fault.
// `skipped_steps` (if not null) receives the saved skip count (0 when absent).
int64_t load_training_checkpoint(const std::string& dir, LlamaForCausalLM& model, AdamW& optimizer, Loader& loader,
                                 int64_t* skipped_steps = nullptr);

}  // namespace loom

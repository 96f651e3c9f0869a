// Training: `loom train CONFIG` ends up here, on every rank of the job.
//
// One call of train() builds (or resumes) this rank's part of the model,
// its optimizer and its data loader from the config, and runs optimizer
// steps until schedule.train_steps (or TrainOptions::stop_after_step) is
// reached (trainer/trainer.h is the loop):
//   for each step: zero_grad; for each micro-batch: forward, loss / n_micro,
//   backward (a pipeline interleaves them); reduce over dp; clip the global
//   gradient norm; AdamW step at the schedule's lr.
//   A non-finite loss or grad norm follows optimizer.nonfinite_policy, a loss
//   spike optimizer.loss_spike_policy (trainer/step_policy.h): stop throws
//   std::runtime_error (exit 1) before the update, writing no checkpoint;
//   skip zeroes the grads, skips the update and the step's data and logs
//   {"step", "skipped": true, "samples"} (at most optimizer.max_skipped_steps
//   per run, counted across resumes); rollback throws LossSpikeRollback for
//   train_with_rollbacks to train again from the last checkpoint.
// It writes the run folder runs/<run.name>/ (docs/training.md):
//   config.yaml                       the resolved config, at start
//   metrics.jsonl                     one JSON object per logging.interval steps
//   checkpoints/step-NNNNNNN/         every checkpoint.interval steps and at the end
//   checkpoints/latest                the newest complete checkpoint's folder name
//   hf/                               Hub export at the end (checkpoint.export_hf_at_end)
//
// Resume is exact: a run stopped after a checkpoint and resumed continues
// with bit-identical losses and weights (fp32, CPU, same thread count),
// because the checkpoint holds the weights, the AdamW state, the data
// loader's position and the CPU RNG state, and the step decides the lr.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <limits>
#include <memory>
#include <string>

#include "config/config.h"
#include "data/loader.h"
#include "model/llama.h"
#include "trainer/device.h"
#include "parallel/process_group.h"
#include "parallel/topology.h"
#include "trainer/train_hooks.h"

namespace loom {

// How a run opens its datasets (data.check_shard_files): the preflight and
// the loader alike, so that the loader can take the preflight's.
DatasetOpenOptions dataset_open_options(const Config& config);

struct TrainOptions {
  // The job's ranks: the world group and this rank's groups along the
  // dp x cp x pp x tp grid (split_grid of ParallelDims::from_config(config,
  // world->size())). nullptr = one rank that talks to nobody. They must
  // outlive train(). Every rank of the world calls train() with the same
  // config; world rank 0 writes the run folder, metrics, checkpoints and the
  // export (in the layout a single rank writes), the others only log nothing.
  ProcessGroup* world = nullptr;
  const GridGroups* grid = nullptr;
  // With CUDA on several ranks: the NCCL groups of the grid's dp and tp axes
  // (device_grid of `grid`, parallel/device_groups.h), which carry the model's tensors, while `grid`'s
  // MPI groups carry what goes through the host (Note [host and device
  // groups]; pp makes its own, Note [pipeline links]); and this rank's place
  // on its node, which picks its GPU (Note [choosing a GPU] in
  // trainer/device.h). The CPU uses `grid` for both.
  const GridGroups* device_grid = nullptr;
  NodePlace node;
  // The run's datasets, opened already by this process's preflight with
  // dataset_open_options(config); the loaders take them from here instead of
  // opening, checking and probing them again. nullptr = open them. Must
  // outlive train().
  const OpenedDatasets* datasets = nullptr;
  // Stop after this many completed steps (writing a checkpoint there), as if
  // the job had been preempted; -1 = schedule.train_steps. The schedule still
  // uses train_steps, so a later resume continues the same run.
  int64_t stop_after_step = -1;
  // Set (to the signal's number) by a signal handler to stop the run
  // gracefully: the step in progress is finished, even when the signal came
  // in the middle of its gradient accumulation, a checkpoint is written at
  // that step boundary (unless checkpoint.enabled is false) and train()
  // returns with TrainResult::stopped_by_signal set. nullptr = no such stop.
  const std::atomic<int>* stop_signal = nullptr;
  // Where the human-readable progress lines go; nullptr = nowhere.
  std::ostream* log = nullptr;
  // Redraw a progress bar with the time left on `log` after every step (for a
  // terminal: it uses a carriage return and an erase-line escape).
  bool progress_bar = false;
  // Skip measuring the CPU matmul peak (mfu is then reported as 0). Tests
  // that do not look at mfu use this to stay fast.
  bool measure_peak = true;
  // The job's end time in Unix seconds (trainer/job_end.h: loom train reads
  // LOOM_JOB_END_TIME): at each step boundary the run checkpoints and stops,
  // as on a signal, once one more step, one save and launch.job_end_margin
  // no longer fit before it; TrainResult::stopped_by_signal is then
  // kJobEndStop. 0 = no end time.
  double job_end_time = 0.0;
  // Called after each step of the loop (skipped or not) with the number of
  // completed steps, before its validation and checkpoint. loom train uses
  // it to shorten the process groups' timeouts once the first step is done.
  std::function<void(int64_t step)> on_step_done;
};

struct TrainResult {
  std::string run_dir;          // runs/<run.name>
  int64_t resumed_from_step = 0;  // steps already done when this call began
  int64_t final_step = 0;       // steps done when it returned
  double last_loss = 0.0;       // mean loss of the last step
  double last_valid_loss = std::numeric_limits<double>::quiet_NaN();  // of the last validation pass
  double tokens_per_s = 0.0;    // over this call's steps
  double peak_flops = 0.0;      // the peak mfu is relative to, FLOP/s (0 if not known)
  std::string last_checkpoint;  // folder of the last checkpoint written ("" if none)
  double checkpoint_stall_seconds = 0.0;  // the loop's time in checkpoint saves, all of them
  int stopped_by_signal = 0;    // the signal that stopped the run early (TrainOptions::stop_signal), or 0
  std::shared_ptr<LlamaForCausalLM> model;  // the trained model (tp: this rank's shards; pp: null)
};

// Trains on run.device, fp32 or (precision.compute bf16) with bf16 autocast
// over fp32 weights, on one rank or (TrainOptions::world) on the ranks of the
// dp x cp x pp x tp grid, which reproduce the single-rank run. `config.model` may be
// updated to the shape of model.init_from. Throws BadInput for a config,
// dataset or checkpoint that cannot be used (naming the file or key);
// std::runtime_error (not BadInput) for a non-finite step that is not skipped.
// `hooks` are for tests only (trainer/train_hooks.h); loom train passes none.
TrainResult train(Config& config, const TrainOptions& options = {}, const TrainHooks* hooks = nullptr);

// The layout train() would use on `world_size` ranks (ParallelDims::from_config),
// or BadInput naming every factor when the layout does not fit the world size
// or the model, or asks for what this build cannot train (a pipeline
// schedule that does not suit the step's micro-batches, say). Needs no
// communication: every rank decides the same.
ParallelDims check_training_layout(const Config& config, int64_t world_size);

// BadInput when precision.* or fusion.* asks for what this build cannot train
// on `dims` (bf16 parameters without bf16 compute, or with ZeRO; a fusion the
// run would not take). `loom plan` asks it
// too, so that it never proposes such a layout.
void check_precision(const Config& config, const ParallelDims& dims);

// The matmul rate of `device` in `dtype`, FLOP/s: 10 products of 8192 x 8192
// matrices on a GPU; on the CPU (with torch's current thread count) 3 of the
// first size from 128 up to 1024, doubling, whose product takes 20 ms or more
// (or 1024), so that a slow dtype costs little time.
double measure_matmul_peak_flops(c10::Device device, torch::ScalarType dtype);

// The datasheet's dense tensor-core peak of a GPU called `device_name` (H100,
// H200, A100), bf16 or fp32, in FLOP/s; 0 when the card is not known.
double datasheet_peak_flops(const std::string& device_name, bool bf16);

// "step-0000042": a checkpoint folder's name.
std::string checkpoint_folder_name(int64_t step);

}  // namespace loom

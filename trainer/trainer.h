// The training loop of one rank, as named steps:
//
//   while (step < stop) {
//     report = train_step();   // zero grads, forward/backward, reduce, clip, decide, update
//     log_step(report);        // metrics.jsonl, progress line
//     maybe_validate();
//     stopping = stop_agreed(); maybe_checkpoint(stopping);
//   }
//
// The parts live in their own files: model_parts (this rank's part of the
// model for its layout), forward_backward (the plain and the pipeline path
// behind one interface), update (dp reduction, norm and clipping, AdamW or
// ZeRO-1), step_policy (update, skip, roll back or stop), run_checkpoints
// (resume, save, export), validation and run_log. train() (training.h) is
// the entry point.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include <c10/core/Device.h>

#include "config/config.h"
#include "data/loader.h"
#include "model/compute_weights.h"
#include "model/moe.h"
#include "parallel/topology.h"
#include "trainer/forward_backward.h"
#include "trainer/job_end.h"
#include "trainer/loss_spike.h"
#include "trainer/model_parts.h"
#include "trainer/profiler.h"
#include "trainer/run_checkpoints.h"
#include "trainer/run_log.h"
#include "trainer/train_hooks.h"
#include "trainer/training.h"
#include "trainer/update.h"

namespace loom {

class Trainer {
 public:
  // Builds (or resumes) everything the loop needs, in an order every rank
  // shares (some steps are collective). Throws what train() throws.
  Trainer(Config& config, const TrainOptions& options, const TrainHooks* hooks);
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainResult run();

 private:
  using Clock = std::chrono::steady_clock;

  // Set-up, in this order.
  void measure_peak();
  void open_loader();
  void resume();
  void make_forward_backward();
  void open_run_folder();
  RunHeader header() const;

  // The loop.
  StepReport train_step();
  void skip_step(StepReport& report);
  void update_step(StepReport& report);
  // Note [router metrics]: every sparse block's sums since the last call,
  // summed over this rank's chunks and all ranks (collective over the world).
  RouterStats take_step_router_stats();
  void log_step(const StepReport& report);
  void after_step();
  void maybe_validate();
  bool stop_agreed();
  void maybe_checkpoint(bool stopping);
  TrainResult finish();

  // A pending TrainOptions::stop_signal, recorded once and logged.
  void notice_stop_request(int64_t micro_done);
  IntervalReport interval_report();
  double mfu_of(double tokens_per_s) const;

  Config& config_;
  const TrainOptions& options_;
  const TrainHooks* hooks_;  // TEST-ONLY; null in production
  int64_t planted_fault_step_ = 0;  // TEST-ONLY: Note [planted faults] in trainer.cpp
  const ParallelDims dims_;
  const bool writer_;
  const int64_t seq_len_, train_steps_, stop_step_, global_batch_, tokens_per_step_;
  const std::filesystem::path run_dir_;
  TrainGroups groups_;
  std::optional<RunCheckpoints> checkpoints_;
  c10::Device device_ = c10::kCPU;
  bool bf16_ = false;
  std::string peak_source_;
  std::unique_ptr<ModelParts> parts_;
  std::optional<Update> update_;
  std::optional<Loader> loader_;
  int64_t micro_batches_ = 0;
  std::unique_ptr<ForwardBackward> forward_backward_;
  RunLog log_;
  std::optional<LossSpikeGuard> spike_guard_;  // optimizer.loss_spike_policy
  std::optional<StepProfiler> profiler_;       // profile.* (trainer/profiler.h)
  std::optional<ComputeWeights> compute_weights_;
  std::optional<JobEndWatch> job_end_;  // TrainOptions::job_end_time

  TrainResult result_;
  int64_t step_ = 0;           // completed optimizer steps
  int64_t skipped_steps_ = 0;  // of those, skipped
  int stop_requested_ = 0;     // the signal of a graceful stop, once the loop has seen it
  double interval_seconds_ = 0.0, total_seconds_ = 0.0;
  int64_t interval_steps_ = 0;
  Clock::time_point run_start_, step_start_;
};

}  // namespace loom

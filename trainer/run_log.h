// What a run tells: the progress lines on the writer's log, the JSON records
// of metrics.jsonl (and their TensorBoard scalars), the progress bar on a
// terminal, and the summary at the end. The records and lines are built
// here from plain numbers, so the training step never formats anything.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "trainer/metrics_log.h"

namespace loom {

// "2h05m", "3m07s", "42s".
std::string format_duration(double seconds);

// printf of one double, e.g. format_double("%.4f", loss).
std::string format_double(const char* format, double value);

// The global sample ids (SampleId::global_index) of a step's micro-batches,
// "[3, 17, ...]", at most `limit` of them then "... (N in all)".
std::string describe_samples(const std::vector<uint64_t>& samples, size_t limit);

// "SIGTERM", "SIGINT", "SIGUSR1" or "signal N".
std::string signal_name(int signal);

// Keeps the metrics of steps <= `step` (all of them are reproduced exactly by
// a resume from `step`); lines logged after the checkpoint by a run that then
// died would otherwise appear twice. step 0: start an empty file.
void truncate_metrics(const std::string& path, int64_t step);

// One optimizer step as the log sees it.
struct StepReport {
  int64_t step = 0;          // completed steps, this one included
  double loss = 0.0;         // the step's mean loss over the global batch
  // Targets that counted in that mean (all of them unless the batches have
  // a loss mask or document positions: Note [masked loss]).
  int64_t loss_tokens = 0;
  double grad_norm = 0.0;    // before clipping
  double lr = 0.0;           // the update's learning rate (0 for a skipped step)
  // A mixture of experts (Note [router metrics] in model/moe.h); logged when moe.
  bool moe = false;
  double router_load_max_over_mean = 0.0;
  double router_aux_loss = 0.0;
  // Note [load-balancing loss]: the mean over rows and sparse layers, logged
  // when training adds it (model.output_router_logits); -1 otherwise.
  double router_balance_loss = -1.0;
  std::vector<uint64_t> samples;  // the step's global sample ids on this rank
  // A skipped step (non-finite, a loss spike, or rolled back earlier):
  bool skipped = false;
  bool loss_spike = false;   // skipped as a spike, now or at an earlier rollback
  bool rolled_back = false;  // the step was rolled back earlier
  double running_mean = 0.0; // the spike window's mean when the spike was seen
  int64_t skipped_steps = 0; // skips so far in the run, this one included
};

// The numbers of a logging interval's closing step.
struct IntervalReport {
  double tokens_per_s = 0.0;
  double mfu = 0.0;
  int64_t tokens = 0;        // since the run began
  double step_time_s = 0.0;  // mean over the interval
  double peak_flops = 0.0;
  double mem_peak_bytes = 0.0;
  double mem_reserved_bytes = 0.0;
  std::vector<int64_t> tensor_peaks;  // per rank (one entry on one rank)
};

// The facts the run's opening lines give.
struct RunHeader {
  std::string run_dir;
  int64_t parameters = 0, non_embedding_parameters = 0;
  std::string layout;  // ParallelDims::describe()
  std::string device, compute, params, recompute;
  int64_t global_batch = 0, seq_len = 0, micro_batches = 0, micro_batch = 0;
  int64_t first_step = 0, stop_step = 0, train_steps = 0;
  std::string resumed_from;  // "" for a fresh run
  double adamw_state_mib = 0.0;  // unsharded, per rank
  int64_t zero_dp = 0;           // ZeRO's dp size, 0 without ZeRO
  int64_t zero_stage = 0;
  int64_t zero_edp = 0;          // under ep: the ranks the experts' state is sharded over; 0 without ep
  double zero_state_mib = 0.0;   // on rank 0
  double zero_shard_mib = 0.0;   // rank 0's fp32 shard of the units (its gradient; under ZeRO-3 its parameters too)
  std::vector<std::string> passed_over;  // checkpoints that failed verification
  double peak_flops = 0.0;
  std::string peak_source;
};

// The end-of-run summary's facts.
struct RunSummary {
  int64_t steps_here = 0;  // steps this call trained
  int64_t step = 0, train_steps = 0;
  double seconds = 0.0, tokens_per_s = 0.0, mfu = 0.0, last_loss = 0.0, last_valid_loss = 0.0;
  int64_t skipped_steps = 0;
  std::string last_checkpoint, metrics_path, run_dir;
};

// The writer rank's log and metrics. On the other ranks (`writer` false) every
// call does nothing, so the training code calls it the same way everywhere.
class RunLog {
 public:
  // `out`: the progress lines (nullptr = none); `progress_bar` redraws a bar
  // with the time left after every step (a terminal's carriage return and
  // erase-line escape). Log lines erase the bar first and it is drawn again
  // after them, so the log itself stays one record per line.
  RunLog(bool writer, std::ostream* out, bool progress_bar);

  // Starts metrics.jsonl in `run_dir`, keeping the records of steps up to
  // `step` (a resume) and dropping later ones.
  void open_metrics(const std::string& run_dir, int64_t step);
  void close_metrics();

  void header(const RunHeader& header);
  // A skipped step: a record and a line, always.
  void skipped_step(const StepReport& report, int64_t train_steps, double loss_spike_factor, int64_t max_skipped_steps);
  // A trained step that closes a logging interval.
  void logged_step(const StepReport& report, const IntervalReport& interval, int64_t train_steps, double elapsed,
                   double eta);
  void validation(int64_t step, int64_t train_steps, double valid_loss, int64_t valid_batches, double seconds);
  // A graceful stop request seen after `micro_done` of `micro_batches`
  // micro-batches of step `step` + 1 (0: after its update).
  void stop_requested(int signal, int64_t micro_done, int64_t micro_batches, int64_t step, bool checkpointing);
  // The run stops after `step` because the job ends in `seconds_left` and one
  // more step, a save and the margin (seconds) would not fit.
  void job_end_stop(int64_t step, double seconds_left, double step_seconds, double save_seconds, double margin,
                    bool checkpointing);
  void checkpoint(const std::string& folder, double stall_seconds, bool async);
  void checkpoint_written(const std::string& folder, double seconds);
  void exported(const std::string& folder);
  void profiler_report(const std::string& lines);  // lines that end in "\n"
  void summary(const RunSummary& summary);
  // The shard files this rank's loader opened (Note [Open shard cache] in
  // data/dataset.cpp): "data: opened N distinct shards of M (at most K open
  // at once, limit L)".
  void data_shards(const ShardCacheStats& stats);
  void progress(int64_t step, int64_t stop_step, double elapsed, int64_t done_here);
  void end_progress();

 private:
  void write(const nlohmann::json& record);
  std::string clear_bar();

  bool writer_;
  std::ostream* out_;  // null on other ranks, or when nobody reads
  bool progress_bar_;
  bool bar_shown_ = false;
  MetricsLog metrics_;  // metrics.jsonl and its TensorBoard scalars (trainer/metrics_log.h)
};

}  // namespace loom

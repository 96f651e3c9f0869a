// Stopping before the job's end time: when a scheduler (Slurm) will kill the
// job at a known wall-clock time, the ranks stop by themselves, with a
// checkpoint and exit 75, while one more step and a checkpoint still fit.
// Torch-free: the decision and the measurements it uses, for tests without a
// model.
//
// Note [stopping before the job ends]
// A fixed signal lead (sbatch --signal=B:USR1@300) is decided at submission,
// before anyone knows how long a step or a checkpoint save takes on this
// model and these nodes: too short and the job is killed mid-save (the
// steps since the last periodic checkpoint are lost), too long and minutes
// of every job are wasted. The ranks know better once they have run a few
// steps: at each step boundary (Trainer::stop_agreed) each rank asks "if I
// run one more step and then save, is there still `margin` seconds left
// before the end?" and stops now when not. The slowest iteration seen so far
// (validation and logging included; the first one, with its warm-up, only
// until a second one is measured) and the slowest save stand for the next
// ones. Ranks measure their own times and read their own clocks; the stop is
// agreed with the largest request over the world (any rank that must stop
// stops all), so a slow rank or a clock ahead of the others makes every rank
// stop early rather than one rank late. The signal stays as a backstop (an
// end time that could not be read, a clock far off).
#pragma once

#include <csignal>
#include <cstdint>

namespace loom {

// What TrainResult::stopped_by_signal holds when the run stopped before the
// job's end time (no signal came; SIGXCPU, "time limit", names the cause and
// has no handler in loom, so a real one never lands there).
inline constexpr int kJobEndStop = SIGXCPU;

// True when one more step (`step_seconds`) and a checkpoint save
// (`save_seconds`), plus `margin_seconds`, no longer fit between `now` and
// `end_time` (both in seconds on the same clock, e.g. Unix time): the run
// must checkpoint and stop at this step boundary.
bool must_stop_before_job_end(double now, double end_time, double step_seconds, double save_seconds,
                              double margin_seconds);

// The measurements must_stop_before_job_end needs, kept as the run goes.
class JobEndWatch {
 public:
  // `end_time`: Unix seconds when the job will be killed.
  JobEndWatch(double end_time, double margin_seconds) : end_time_(end_time), margin_seconds_(margin_seconds) {}

  // One loop iteration (step, logging, validation; not its checkpoint save).
  void record_iteration(double seconds);
  // One checkpoint save, as long as the loop (and, async, the background
  // write) took: what the stop's own save will cost.
  void record_save(double seconds);

  // The estimates stop_now uses: the slowest iteration since the first one
  // (the first alone while it is the only one), the slowest save (0 before
  // the first: the margin covers it).
  double step_seconds() const { return iterations_ > 1 ? slowest_after_first_ : first_iteration_; }
  double save_seconds() const { return slowest_save_; }
  double end_time() const { return end_time_; }

  // must_stop_before_job_end at `now` (Unix seconds) with the estimates.
  bool stop_now(double now) const {
    return must_stop_before_job_end(now, end_time_, step_seconds(), save_seconds(), margin_seconds_);
  }

 private:
  double end_time_;
  double margin_seconds_;
  int64_t iterations_ = 0;
  double first_iteration_ = 0.0;
  double slowest_after_first_ = 0.0;
  double slowest_save_ = 0.0;
};

// The system clock's time in Unix seconds, the clock end times are on.
double unix_seconds_now();

// The job's end time from the environment, in Unix seconds, or 0 when none
// is set: LOOM_JOB_END_TIME (what loom's batch script exports, and what any
// other scheduler's wrapper can set), else SLURM_JOB_END_TIME (set by newer
// Slurm releases). Throws BadInput for a value that is not a number.
double job_end_time_from_environment();

}  // namespace loom

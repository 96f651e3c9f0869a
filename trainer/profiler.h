// The PyTorch (Kineto) profiler over a window of training steps.
//
// profile.start_step and profile.steps (docs/configuration.md) pick the
// window, numbered from 1 like metrics.jsonl's "step". The training loop calls
// step_begin(s) before step s and step_end(s) after it; the profiler starts
// at the window's first step and stops after its last, then writes
//   <run>/profile/trace.json    Chrome trace (chrome://tracing, Perfetto)
//   <run>/profile/summary.txt   the top 30 ops or kernels by time
// On a CUDA device the summary ranks GPU kernels (and copies, memsets) by
// device time; on the CPU it ranks ATen ops by CPU self time (time not spent
// in a nested op). Percentages are of the window's wall time, from the start
// of its first step to the end of its last (a validation pass or checkpoint
// due between two profiled steps is inside it, and in the trace).
//
// Only the rank that writes the run folder profiles (`enabled`); the window
// and files are that rank's. A run that ends inside the window (a stop
// signal, an error) stops the profiler and writes nothing.
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "config/config.h"

namespace loom {

// One op or kernel name's time over the profiled steps.
struct ProfileRow {
  std::string name;
  int64_t count = 0;        // calls or launches
  double total_ms = 0.0;    // CPU self time (CPU) or device time (CUDA)
};

// The summary as text: a header naming the window and what is measured, then
// the first `top` rows (sorted by total_ms, largest first) with count, total,
// average and percent of `steps_ms`. Names longer than `max_name` characters
// are cut (0 = never).
std::string format_profile_summary(const std::vector<ProfileRow>& rows, const std::string& header, double steps_ms,
                                   size_t top, size_t max_name = 0);

class StepProfiler {
 public:
  // Profiles on `device` when `enabled` and config.start_step > 0, writing
  // into `out_dir` (created when the profile is written).
  StepProfiler(const ProfileConfig& config, c10::Device device, std::filesystem::path out_dir, bool enabled);
  // Stops a profile still recording (the run ended inside the window),
  // writing nothing.
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // Before step `step` (1-based): starts recording at the window's first
  // step (or the first step of a run resumed inside the window).
  void step_begin(int64_t step);
  // After step `step` is done: at the window's last step, waits for the
  // device, stops recording, writes trace.json and summary.txt and returns
  // what to print (the top 15 rows); "" at every other step.
  std::string step_end(int64_t step);

  bool recording() const { return recording_; }

 private:
  ProfileConfig config_;
  c10::Device device_;
  std::filesystem::path out_dir_;
  bool enabled_;
  bool recording_ = false;
  bool done_ = false;
  int64_t first_step_ = 0;  // the first step actually recorded
  std::chrono::steady_clock::time_point window_start_;
};

}  // namespace loom

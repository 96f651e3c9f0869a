// A run's metrics, record by record: one JSON line in metrics.jsonl and, for
// every number in it, a TensorBoard scalar in an event file beside it
// (util/tfevents.h). The scalar's tag is the record's key ("loss", "lr",
// "grad_norm", "tokens_per_s", "mfu", "mem_peak_gib", "valid_loss", ...) and
// its step the record's "step"; values are stored as float32, as TensorBoard
// keeps them. Strings (a non-finite loss is written as "nan"), booleans and
// lists stay in metrics.jsonl only.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>

namespace loom {

class TfEventsWriter;

class MetricsLog {
 public:
  MetricsLog();
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  // Appends to run_dir/metrics.jsonl (its lines past `resumed_step` already
  // dropped by the caller) and starts a new event file in run_dir. Resuming
  // (resumed_step > 0), the event file begins with a SessionLog START at
  // resumed_step + 1, so TensorBoard drops what older event files hold for
  // the steps about to be redone; starting afresh, older event files are
  // removed, as metrics.jsonl was emptied. Throws std::runtime_error when a
  // file cannot be opened.
  void open(const std::string& run_dir, int64_t resumed_step);
  // One record: a line of metrics.jsonl and its numbers as scalars, flushed
  // so that a reader (tail -f, TensorBoard) sees the step at once.
  void write(const nlohmann::json& record);
  void close();

 private:
  std::ofstream jsonl_;
  std::string jsonl_path_;
  std::unique_ptr<TfEventsWriter> events_;
};

}  // namespace loom

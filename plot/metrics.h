// Reads a run's metrics.jsonl (written by trainer/training.cpp, format in
// docs/training.md) into the curves `loom plot` draws.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::plot {

// Points sorted by step.
struct Curve {
  std::vector<double> steps;
  std::vector<double> values;
  bool empty() const { return steps.empty(); }
};

struct RunMetrics {
  Curve train_loss;    // "loss" of ordinary step records
  Curve valid_loss;    // "valid_loss" of validation records
  Curve tokens_per_s;  // "tokens_per_s"
  std::vector<double> skipped_steps;  // "step" of records with "skipped": true
  int64_t records = 0;                // JSON objects read
  // The file ended in a line without its newline that is not JSON: a record
  // still being written by a live run (or cut off by a crash); left out.
  bool ignored_partial_last_line = false;
};

// Every line must be a JSON object with a numeric "step"; blank lines are
// skipped. Only finite numbers are plotted: a "loss" of "nan" (a string) or
// a skipped step's loss is left out. Unknown keys are ignored. Throws
// BadInput naming `path` (and "path:line" for a bad line) when the file
// cannot be read, a line is not a JSON object or lacks a step, or no record
// has anything to plot.
RunMetrics read_metrics_jsonl(const std::string& path);

}  // namespace loom::plot

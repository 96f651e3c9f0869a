#include "plot/metrics.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string_view>

#include "util/error.h"
#include "util/file_io.h"

namespace loom::plot {
namespace {

using json = nlohmann::json;

// The value of `key` when it is a finite number; strings ("nan"), null and
// other types are not plotted.
bool finite_number(const json& record, const char* key, double* out) {
  const auto it = record.find(key);
  if (it == record.end() || !it->is_number()) return false;
  *out = it->get<double>();
  return std::isfinite(*out);
}

void add_point(Curve& curve, double step, double value) {
  curve.steps.push_back(step);
  curve.values.push_back(value);
}

// Lines are in step order as the trainer writes them, but a file
// concatenated by hand need not be: sort, keeping the order of equal steps.
void sort_by_step(Curve& curve) {
  std::vector<size_t> order(curve.steps.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return curve.steps[a] < curve.steps[b]; });
  Curve sorted;
  for (size_t i : order) add_point(sorted, curve.steps[i], curve.values[i]);
  curve = std::move(sorted);
}

std::string excerpt(std::string_view line) {
  constexpr size_t kMax = 60;
  return line.size() <= kMax ? std::string(line) : std::string(line.substr(0, kMax)) + "...";
}

}  // namespace

RunMetrics read_metrics_jsonl(const std::string& path) {
  const std::string content = read_file(path);
  RunMetrics metrics;
  size_t line_number = 0;
  for (size_t start = 0; start < content.size();) {
    const size_t newline = content.find('\n', start);
    const bool terminated = newline != std::string::npos;
    const std::string_view line(content.data() + start, (terminated ? newline : content.size()) - start);
    start = terminated ? newline + 1 : content.size();
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;

    const std::string where = path + ":" + std::to_string(line_number);
    json record = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!record.is_object()) {
      // The trainer writes each record with its newline in one flush, so a
      // last line without one is a record being written while we read (a
      // live run) or cut short by a crash: plot what is complete.
      if (!terminated && record.is_discarded()) {
        metrics.ignored_partial_last_line = true;
        break;
      }
      throw BadInput(where + ": not a JSON object: '" + excerpt(line) + "'");
    }
    double step = 0.0;
    if (!finite_number(record, "step", &step)) {
      throw BadInput(where + ": record has no numeric \"step\": '" + excerpt(line) + "'");
    }
    ++metrics.records;
    const auto skipped = record.find("skipped");
    if (skipped != record.end() && skipped->is_boolean() && skipped->get<bool>()) {
      metrics.skipped_steps.push_back(step);
      continue;  // its loss is non-finite or was not applied: not a point of the curve
    }
    double value = 0.0;
    if (finite_number(record, "loss", &value)) add_point(metrics.train_loss, step, value);
    if (finite_number(record, "valid_loss", &value)) add_point(metrics.valid_loss, step, value);
    if (finite_number(record, "tokens_per_s", &value)) add_point(metrics.tokens_per_s, step, value);
  }
  if (metrics.records == 0) {
    throw BadInput(path + ": no metrics records (the file is empty; a run logs its first after "
                   "logging.interval steps)");
  }
  if (metrics.train_loss.empty() && metrics.valid_loss.empty() && metrics.tokens_per_s.empty()) {
    throw BadInput(path + ": nothing to plot: " + std::to_string(metrics.records) +
                   " records, none with a finite \"loss\", \"valid_loss\" or \"tokens_per_s\"");
  }
  sort_by_step(metrics.train_loss);
  sort_by_step(metrics.valid_loss);
  sort_by_step(metrics.tokens_per_s);
  std::sort(metrics.skipped_steps.begin(), metrics.skipped_steps.end());
  return metrics;
}

}  // namespace loom::plot

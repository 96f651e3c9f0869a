// `loom runs [DIR] [--json]`: the runs in DIR (default runs/), one line each:
// status (run.json), step reached, layout, learning rate, final and best
// training loss, last validation loss, tokens/s. A folder is a run when it
// holds run.json or metrics.jsonl; others (datasets, sweep folders) are
// passed over.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "launch/cli.h"
#include "launch/commands.h"
#include "config/config.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct RunSummary {
  std::string name;
  std::string status = "unknown";  // run.json's, or "unknown" without one
  int64_t step = 0;                // the last step metrics.jsonl logged
  int64_t train_steps = 0;         // schedule.train_steps
  std::string layout = "?";        // "dp2 tp1 pp1"
  double lr = kNaN;
  double final_loss = kNaN, best_loss = kNaN, valid_loss = kNaN, tokens_per_s = kNaN;
};

RunSummary summarize(const fs::path& dir) {
  RunSummary run;
  run.name = dir.filename().string();
  const fs::path record_path = dir / "run.json";
  if (fs::exists(record_path)) {
    const json record = json::parse(read_file(record_path.string()), nullptr, /*allow_exceptions=*/false);
    if (record.is_object()) {
      run.status = record.value("status", "unknown");
      if (record.contains("layout") && record["layout"].is_object()) {
        const json& l = record["layout"];
        // cp only where the run had it (records before cp have no "cp").
        const int cp = l.value("cp", 1);
        run.layout = "dp" + std::to_string(l.value("dp", 0)) + (cp > 1 ? " cp" + std::to_string(cp) : "") + " tp" +
                     std::to_string(l.value("tp", 0)) + " pp" + std::to_string(l.value("pp", 0));
      }
    }
  }
  if (fs::exists(dir / "config.yaml")) {
    try {
      const Config config = load_config((dir / "config.yaml").string());
      run.lr = config.optimizer.lr;
      run.train_steps = config.schedule.train_steps;
    } catch (const BadInput&) {
      // An older or hand-edited config: the columns it would fill stay empty.
    }
  }
  const fs::path metrics_path = dir / "metrics.jsonl";
  if (fs::exists(metrics_path)) {
    std::istringstream lines(read_file(metrics_path.string()));
    double tokens_sum = 0;
    int64_t tokens_count = 0;
    bool first_throughput = true;
    for (std::string line; std::getline(lines, line);) {
      const json r = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!r.is_object() || !r.contains("step") || !r["step"].is_number_integer()) continue;
      run.step = std::max(run.step, r["step"].get<int64_t>());
      if (r.contains("loss") && r["loss"].is_number() && !r.value("skipped", false)) {
        run.final_loss = r["loss"].get<double>();
        run.best_loss = std::isnan(run.best_loss) ? run.final_loss : std::min(run.best_loss, run.final_loss);
      }
      if (r.contains("valid_loss") && r["valid_loss"].is_number()) run.valid_loss = r["valid_loss"].get<double>();
      if (r.contains("tokens_per_s") && r["tokens_per_s"].is_number()) {
        // The first interval holds the start-up (allocations, caches): left
        // out of the mean when there are others.
        if (first_throughput) {
          first_throughput = false;
          run.tokens_per_s = r["tokens_per_s"].get<double>();
          continue;
        }
        tokens_sum += r["tokens_per_s"].get<double>();
        ++tokens_count;
      }
    }
    if (tokens_count > 0) run.tokens_per_s = tokens_sum / static_cast<double>(tokens_count);
  }
  return run;
}

std::string fixed(double value, int digits) {
  if (std::isnan(value)) return "-";
  std::ostringstream out;
  out << std::fixed << std::setprecision(digits) << value;
  return out.str();
}

std::string general(double value) {
  if (std::isnan(value)) return "-";
  std::ostringstream out;
  out << value;
  return out.str();
}

json to_json(const RunSummary& run) {
  auto number = [](double v) { return std::isnan(v) ? json(nullptr) : json(v); };
  return {{"name", run.name},
          {"status", run.status},
          {"step", run.step},
          {"train_steps", run.train_steps},
          {"layout", run.layout},
          {"lr", number(run.lr)},
          {"final_loss", number(run.final_loss)},
          {"best_loss", number(run.best_loss)},
          {"valid_loss", number(run.valid_loss)},
          {"tokens_per_s", number(run.tokens_per_s)}};
}

}  // namespace

const CommandSpec& runs_spec() {
  static const CommandSpec spec{
      .name = "runs",
      .synopsis = "[DIR] [OPTIONS]",
      .summary = "the runs in DIR: status, layout, lr, final and best loss, tokens/s (docs/experiments.md)",
      .arguments = {{"DIR", "folder of run folders (default runs)"}},
      .flags = {{"json", "", "one JSON object per run instead of a table"}},
      .examples = {"loom runs", "loom runs runs --json"},
  };
  return spec;
}

int command_runs(const std::vector<std::string>& argv) {
  Args args(runs_spec(), argv);
  if (args.positional().size() > 1) args.expect_positional(1, "at most one DIR (default runs)");
  const fs::path root = args.positional().empty() ? fs::path("runs") : fs::path(args.positional()[0]);
  if (!fs::is_directory(root)) throw BadInput("loom runs: '" + root.string() + "' is not a folder");
  std::vector<fs::path> dirs;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (entry.is_directory() && (fs::exists(entry.path() / "run.json") || fs::exists(entry.path() / "metrics.jsonl")))
      dirs.push_back(entry.path());
  }
  std::sort(dirs.begin(), dirs.end());
  std::vector<RunSummary> runs;
  for (const fs::path& dir : dirs) runs.push_back(summarize(dir));

  if (args.has("json")) {
    for (const RunSummary& run : runs) std::cout << to_json(run).dump() << "\n";
    return kExitOk;
  }
  if (runs.empty()) {
    std::cout << "no runs in " << root.string() << "\n";
    return kExitOk;
  }
  const std::vector<std::string> header = {"run", "status", "step", "layout", "lr", "final loss", "best loss",
                                           "valid loss", "tokens/s"};
  std::vector<std::vector<std::string>> rows = {header};
  for (const RunSummary& run : runs) {
    rows.push_back({run.name, run.status,
                    std::to_string(run.step) + "/" + (run.train_steps > 0 ? std::to_string(run.train_steps) : "?"),
                    run.layout, general(run.lr), fixed(run.final_loss, 4), fixed(run.best_loss, 4),
                    fixed(run.valid_loss, 4), fixed(run.tokens_per_s, 0)});
  }
  std::vector<size_t> widths(header.size(), 0);
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      // Names and words left-aligned, numbers right-aligned.
      const bool left = c == 0 || c == 1 || c == 3;
      const std::string pad(widths[c] - row[c].size(), ' ');
      line += (c ? "  " : "") + (left ? row[c] + pad : pad + row[c]);
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::cout << line << "\n";
  }
  return kExitOk;
}

}  // namespace loom

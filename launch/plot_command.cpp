// `loom plot RUN_DIR... [--out FILE.svg]`: loss and throughput curves of run
// folders' metrics.jsonl, drawn to one SVG: one run's curves, or several
// runs overlaid (plot/compare_plot.h) with a legend naming them.
#include <filesystem>
#include <iostream>

#include "launch/cli.h"
#include "launch/commands.h"
#include "plot/compare_plot.h"
#include "plot/metrics.h"
#include "plot/metrics_plot.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

// The folder's own name ("tiny"), also for a RUN_DIR given with a trailing slash.
std::string run_name(const fs::path& run_dir) {
  return (run_dir.filename().empty() ? run_dir.parent_path().filename() : run_dir.filename()).string();
}

plot::RunMetrics read_run(const fs::path& run_dir) {
  if (!fs::exists(run_dir)) throw BadInput("loom plot: run folder '" + run_dir.string() + "' does not exist");
  if (!fs::is_directory(run_dir)) throw BadInput("loom plot: '" + run_dir.string() + "' is not a folder");
  const fs::path metrics_path = run_dir / "metrics.jsonl";
  if (!fs::exists(metrics_path)) {
    throw BadInput("loom plot: '" + metrics_path.string() + "' does not exist (is '" + run_dir.string() +
                   "' a run folder written by loom train?)");
  }
  plot::RunMetrics metrics = plot::read_metrics_jsonl(metrics_path.string());
  if (metrics.ignored_partial_last_line) {
    std::cerr << "loom plot: note: left out the unfinished last line of " << metrics_path.string() << "\n";
  }
  return metrics;
}

}  // namespace

const CommandSpec& plot_spec() {
  static const CommandSpec spec{
      .name = "plot",
      .synopsis = "RUN_DIR... [OPTIONS]",
      .summary = "loss and tokens/s curves of runs' metrics.jsonl, drawn to one SVG (docs/training.md)",
      .arguments = {{"RUN_DIR...", "one or more run folders written by loom train"}},
      .flags = {{"out", "FILE.svg",
                 "SVG file to write (default RUN_DIR/metrics.svg; for several runs, compare.svg in the first one's "
                 "parent)"}},
      .examples = {"loom plot runs/tiny", "loom plot runs/tiny-lr1e-3-tp1 runs/tiny-lr3e-4-tp1 --out lr.svg"},
  };
  return spec;
}

int command_plot(const std::vector<std::string>& argv) {
  Args args(plot_spec(), argv);
  if (args.positional().empty()) {
    args.expect_positional(1, "one or more RUN_DIRs (folders written by loom train)");
  }
  std::vector<fs::path> run_dirs(args.positional().begin(), args.positional().end());
  const fs::path first_parent = fs::absolute(run_dirs[0]).lexically_normal().parent_path();
  const fs::path default_out = run_dirs.size() == 1 ? run_dirs[0] / "metrics.svg"
                                                    : (run_dirs[0].filename().empty() ? first_parent.parent_path()
                                                                                      : first_parent) / "compare.svg";
  const fs::path out = args.get_or("out", default_out.string());
  // write_file_atomic would fail on a missing folder too, but as an internal
  // error; a mistyped --out is the user's input.
  const fs::path out_dir = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  if (!fs::is_directory(out_dir)) {
    throw BadInput("loom plot: --out '" + out.string() + "': folder '" + out_dir.string() + "' does not exist");
  }

  if (run_dirs.size() == 1) {
    const plot::RunMetrics metrics = read_run(run_dirs[0]);
    write_file_atomic(out.string(), plot::render_metrics_figure(metrics, run_name(run_dirs[0])));
    std::cout << "wrote " << out.string() << " (" << metrics.train_loss.steps.size() << " loss, "
              << metrics.valid_loss.steps.size() << " validation, " << metrics.tokens_per_s.steps.size()
              << " throughput points; " << metrics.skipped_steps.size() << " skipped steps)\n";
    return kExitOk;
  }

  // Several runs: each named by its folder, or by the path as given when two
  // folders share a name.
  std::vector<std::pair<std::string, plot::RunMetrics>> runs;
  for (const fs::path& run_dir : run_dirs) {
    std::string name = run_name(run_dir);
    for (const fs::path& other : run_dirs) {
      if (&other != &run_dir && run_name(other) == name) name = run_dir.string();
    }
    runs.emplace_back(name, read_run(run_dir));
  }
  write_file_atomic(out.string(), plot::render_comparison_figure(runs));
  std::cout << "wrote " << out.string() << " (" << runs.size() << " runs:";
  for (size_t i = 0; i < runs.size(); ++i) std::cout << (i ? ", " : " ") << runs[i].first;
  std::cout << ")\n";
  return kExitOk;
}

}  // namespace loom

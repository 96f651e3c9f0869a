// `loom plot RUN_DIR [--out FILE.png]`: loss and throughput curves of a run
// folder's metrics.jsonl, drawn to one PNG.
#include <filesystem>
#include <iostream>

#include "launch/cli.h"
#include "launch/commands.h"
#include "plot/metrics.h"
#include "plot/metrics_plot.h"
#include "util/error.h"
#include "util/file_io.h"
#include "util/png.h"

namespace loom {

namespace fs = std::filesystem;

int command_plot(const std::vector<std::string>& argv) {
  Args args("plot", argv, {{"out", true, false, "PNG file to write (default RUN_DIR/metrics.png)"}});
  args.expect_positional(1, "one RUN_DIR (a folder written by loom train)");
  const fs::path run_dir = args.positional()[0];
  if (!fs::exists(run_dir)) throw BadInput("loom plot: run folder '" + run_dir.string() + "' does not exist");
  if (!fs::is_directory(run_dir)) throw BadInput("loom plot: '" + run_dir.string() + "' is not a folder");
  const fs::path metrics_path = run_dir / "metrics.jsonl";
  if (!fs::exists(metrics_path)) {
    throw BadInput("loom plot: '" + metrics_path.string() + "' does not exist (is '" + run_dir.string() +
                   "' a run folder written by loom train?)");
  }
  const fs::path out = args.get_or("out", (run_dir / "metrics.png").string());
  // write_file_atomic would fail on a missing folder too, but as an internal
  // error; a mistyped --out is the user's input.
  const fs::path out_dir = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  if (!fs::is_directory(out_dir)) {
    throw BadInput("loom plot: --out '" + out.string() + "': folder '" + out_dir.string() + "' does not exist");
  }

  const plot::RunMetrics metrics = plot::read_metrics_jsonl(metrics_path.string());
  if (metrics.ignored_partial_last_line) {
    std::cerr << "loom plot: note: left out the unfinished last line of " << metrics_path.string() << "\n";
  }
  // The folder's own name ("tiny"), also for a RUN_DIR given with a trailing slash.
  const fs::path name = run_dir.filename().empty() ? run_dir.parent_path().filename() : run_dir.filename();
  const plot::Canvas figure = plot::render_metrics_figure(metrics, name.string());
  write_file_atomic(out.string(), encode_png_rgb(figure.width(), figure.height(), figure.rgb()));
  std::cout << "wrote " << out.string() << " (" << metrics.train_loss.steps.size() << " loss, "
            << metrics.valid_loss.steps.size() << " validation, " << metrics.tokens_per_s.steps.size()
            << " throughput points; " << metrics.skipped_steps.size() << " skipped steps)\n";
  return kExitOk;
}

}  // namespace loom

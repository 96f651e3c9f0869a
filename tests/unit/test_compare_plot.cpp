// `loom plot RUN RUN...`: several runs overlaid, one colour per run, in both
// panels, validation in a lighter shade of its run's colour.
#include <gtest/gtest.h>

#include "plot/compare_plot.h"
#include "plot/metrics_plot.h"

namespace loom::plot {
namespace {

RunMetrics run(double scale, bool valid) {
  RunMetrics metrics;
  for (int step = 1; step <= 20; ++step) {
    metrics.train_loss.steps.push_back(step);
    metrics.train_loss.values.push_back(scale * (5.0 - 0.1 * step));
    metrics.tokens_per_s.steps.push_back(step);
    metrics.tokens_per_s.values.push_back(scale * 1000.0 + step);
  }
  if (valid) {
    metrics.valid_loss.steps = {10, 20};
    metrics.valid_loss.values = {scale * 4.2, scale * 3.1};
  }
  return metrics;
}

// Pixels of exactly `colour` in rows [y0, y1).
int count(const Canvas& canvas, Rgb colour, int y0, int y1) {
  int n = 0;
  for (int y = y0; y < y1; ++y)
    for (int x = 0; x < canvas.width(); ++x) n += canvas.pixel(x, y) == colour;
  return n;
}

TEST(ComparePlot, EveryRunHasItsColourInTheLossAndThroughputPanels) {
  const Canvas canvas = render_comparison_figure({{"a", run(1.0, true)}, {"b", run(1.5, false)}, {"c", run(2.0, false)}});
  const int half = kFigureHeight / 2;
  for (int i = 0; i < 3; ++i) {
    EXPECT_GT(count(canvas, kRunColours[i], 0, half), 20) << "run " << i << " in the loss panel";
    EXPECT_GT(count(canvas, kRunColours[i], half, kFigureHeight), 20) << "run " << i << " in the throughput panel";
  }
  EXPECT_GT(count(canvas, lighter(kRunColours[0]), 0, half), 5) << "run a's validation curve";
  EXPECT_EQ(count(canvas, lighter(kRunColours[1]), 0, kFigureHeight), 0) << "run b has no validation curve";
  EXPECT_EQ(count(canvas, kRunColours[3], 0, kFigureHeight), 0) << "no fourth run";
}

TEST(ComparePlot, ColoursRepeatAfterTenRuns) {
  std::vector<std::pair<std::string, RunMetrics>> runs;
  for (int i = 0; i < 11; ++i) runs.emplace_back("r" + std::to_string(i), run(1.0 + 0.1 * i, false));
  const Canvas canvas = render_comparison_figure(runs);
  for (const Rgb& colour : kRunColours) EXPECT_GT(count(canvas, colour, 0, kFigureHeight / 2), 0);
}

}  // namespace
}  // namespace loom::plot

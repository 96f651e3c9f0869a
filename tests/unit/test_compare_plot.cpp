// `loom plot RUN RUN...`: several runs overlaid, one colour per run, in both
// panels, validation in a lighter shade of its run's colour, on one step axis;
// read back from the SVG as a viewer would see it.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "plot/compare_plot.h"
#include "plot/metrics_plot.h"
#include "plot/svg.h"
#include "tests/unit/svg_figure.h"

namespace loom::plot {
namespace {

using test_support::ChartView;
using test_support::FigureView;
using test_support::read_figure;
using test_support::SeriesView;

constexpr double kTolerance = 0.02;  // coordinates are written with two decimals

RunMetrics run(double scale, bool valid, int steps = 20) {
  RunMetrics metrics;
  for (int step = 1; step <= steps; ++step) {
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

// The series named `label` is one polyline in `colour` through (steps, values).
void expect_curve(const ChartView& chart, const std::string& label, Rgb colour, const Curve& curve) {
  const SeriesView* series = chart.find_series(label);
  ASSERT_NE(series, nullptr) << label << " in " << chart.title;
  ASSERT_EQ(series->lines.size(), 1u) << label;
  EXPECT_EQ(series->line_strokes[0], svg_colour(colour)) << label;
  const auto& line = series->lines[0];
  ASSERT_EQ(line.size(), curve.steps.size()) << label;
  for (size_t i = 0; i < line.size(); ++i) {
    EXPECT_NEAR(line[i].x, chart.x_of(curve.steps[i]), kTolerance) << label << " point " << i;
    EXPECT_NEAR(line[i].y, chart.y_of(curve.values[i]), kTolerance) << label << " point " << i;
  }
}

std::vector<std::string> legend_labels(const ChartView& chart) {
  std::vector<std::string> labels;
  for (const auto& entry : chart.legend) labels.push_back(entry.label);
  return labels;
}

TEST(ComparePlot, EveryRunHasItsColourInTheLossAndThroughputPanels) {
  const std::vector<std::pair<std::string, RunMetrics>> runs = {
      {"a", run(1.0, true)}, {"b", run(1.5, false)}, {"c", run(2.0, false)}};
  const FigureView figure = read_figure(render_comparison_figure(runs));
  ASSERT_EQ(figure.charts.size(), 2u);
  const ChartView &loss = figure.charts[0], &throughput = figure.charts[1];
  EXPECT_EQ(loss.title, "loss: 3 runs");
  EXPECT_LE(loss.frame_y + loss.frame_height, kFigureHeight / 2.0);
  EXPECT_GE(throughput.frame_y, kFigureHeight / 2.0);
  for (int i = 0; i < 3; ++i) {
    const auto& [name, metrics] = runs[i];
    expect_curve(loss, name, kRunColours[i], metrics.train_loss);
    expect_curve(throughput, name, kRunColours[i], metrics.tokens_per_s);
  }
  expect_curve(loss, "a valid", lighter(kRunColours[0]), runs[0].second.valid_loss);
  EXPECT_EQ(loss.find_series("b valid"), nullptr) << "run b has no validation curve";
  EXPECT_EQ(loss.series.size(), 4u);
  EXPECT_EQ(throughput.series.size(), 3u);
  EXPECT_EQ(legend_labels(loss), (std::vector<std::string>{"a", "a valid", "b", "c"}));
  EXPECT_EQ(legend_labels(throughput), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(loss.legend[1].stroke, svg_colour(lighter(kRunColours[0])));
  const std::string document = render_comparison_figure(runs);
  EXPECT_EQ(document.find(svg_colour(kRunColours[3])), std::string::npos) << "no fourth run";
}

TEST(ComparePlot, ValidationColourIsHalfwayToWhite) {
  EXPECT_EQ(lighter({31, 119, 180}), (Rgb{143, 187, 217}));
  EXPECT_EQ(lighter({0, 0, 0}), (Rgb{127, 127, 127}));
  EXPECT_EQ(lighter({255, 255, 255}), (Rgb{255, 255, 255}));
}

TEST(ComparePlot, ColoursRepeatAfterTenRuns) {
  std::vector<std::pair<std::string, RunMetrics>> runs;
  for (int i = 0; i < 11; ++i) runs.emplace_back("r" + std::to_string(i), run(1.0 + 0.1 * i, false));
  const FigureView figure = read_figure(render_comparison_figure(runs));
  const ChartView& loss = figure.charts.at(0);
  for (int i = 0; i < 11; ++i) {
    const SeriesView* series = loss.find_series("r" + std::to_string(i));
    ASSERT_NE(series, nullptr) << i;
    EXPECT_EQ(series->line_strokes.at(0), svg_colour(kRunColours[i % 10])) << i;
  }
}

TEST(ComparePlot, RunsOfDifferentLengthsShareOneStepAxis) {
  const std::vector<std::pair<std::string, RunMetrics>> runs = {{"short", run(1.0, false, 20)},
                                                                {"long", run(1.0, false, 40)}};
  const FigureView figure = read_figure(render_comparison_figure(runs));
  const ChartView &loss = figure.charts.at(0), &throughput = figure.charts.at(1);
  EXPECT_GE(loss.x_ticks.back().value, 40);
  // Step 20 is where the short run ends, at the same x in both panels.
  const double end_of_short = loss.find_series("short")->lines.at(0).back().x;
  EXPECT_NEAR(end_of_short, loss.x_of(20), kTolerance);
  EXPECT_NEAR(throughput.find_series("short")->lines.at(0).back().x, end_of_short, kTolerance);
  EXPECT_NEAR(loss.find_series("long")->lines.at(0).back().x, loss.x_of(40), kTolerance);
}

TEST(ComparePlot, RunNamesAreEscapedInTheLegend) {
  const std::string awkward = R"(lr<1e-3 & "warm")";
  const std::string document = render_comparison_figure({{awkward, run(1.0, true)}, {"plain", run(1.2, false)}});
  EXPECT_NE(document.find("lr&lt;1e-3 &amp; &quot;warm&quot;"), std::string::npos);
  const FigureView figure = read_figure(document);  // well-formed, or it throws
  EXPECT_EQ(legend_labels(figure.charts.at(0)),
            (std::vector<std::string>{awkward, awkward + " valid", "plain"}));
  EXPECT_NE(figure.charts.at(0).find_series(awkward + " valid"), nullptr);
}

}  // namespace
}  // namespace loom::plot

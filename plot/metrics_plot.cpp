#include "plot/metrics_plot.h"

#include <algorithm>
#include <utility>

#include "plot/chart.h"

namespace loom::plot {
namespace {

constexpr int kTargetStepTicks = 8;
const Rgb kBackground{255, 255, 255};

Series series_of(const Curve& curve, std::string label, Rgb colour) {
  return {std::move(label), colour, curve.steps, curve.values};
}

}  // namespace

std::string render_metrics_figure(const RunMetrics& metrics, const std::string& run_name) {
  Chart loss;
  loss.title = "loss: " + run_name;
  loss.x_title = "step";
  if (!metrics.train_loss.empty()) loss.series.push_back(series_of(metrics.train_loss, "train", kTrainLossColour));
  if (!metrics.valid_loss.empty()) loss.series.push_back(series_of(metrics.valid_loss, "valid", kValidLossColour));
  loss.markers_x = metrics.skipped_steps;
  loss.markers_label = "skipped step";
  loss.markers_colour = kSkippedStepColour;

  Chart throughput;
  throughput.title = "throughput (tokens/s)";
  throughput.x_title = "step";
  if (!metrics.tokens_per_s.empty()) {
    throughput.series.push_back(series_of(metrics.tokens_per_s, "tokens/s", kThroughputColour));
  }

  return render_loss_and_throughput(std::move(loss), std::move(throughput));
}

std::string render_loss_and_throughput(Chart loss, Chart throughput) {
  const auto loss_steps = x_extent(loss), throughput_steps = x_extent(throughput);
  if (loss_steps || throughput_steps) {
    const auto& any = loss_steps ? *loss_steps : *throughput_steps;
    double lo = any.first, hi = any.second;
    for (const auto& extent : {loss_steps, throughput_steps}) {
      if (!extent) continue;
      lo = std::min(lo, extent->first);
      hi = std::max(hi, extent->second);
    }
    loss.x_axis = throughput.x_axis = nice_axis(lo, hi, kTargetStepTicks, /*integer_ticks=*/true);
  }

  loss.y_label_width = throughput.y_label_width = std::max(y_label_width(loss), y_label_width(throughput));

  SvgWriter svg(kFigureWidth, kFigureHeight);
  // SVG's background is transparent; a viewer's dark theme would hide the text.
  svg.element("rect", {{"width", "100%"}, {"height", "100%"}, {"fill", svg_colour(kBackground)}});
  const double panel_height = kFigureHeight / 2;
  draw_chart(svg, {0, 0, kFigureWidth, panel_height}, loss);
  draw_chart(svg, {0, panel_height, kFigureWidth, kFigureHeight - panel_height}, throughput);
  return svg.finish();
}

}  // namespace loom::plot

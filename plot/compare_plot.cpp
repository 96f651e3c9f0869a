#include "plot/compare_plot.h"

#include <algorithm>

#include "plot/chart.h"
#include "plot/metrics_plot.h"

namespace loom::plot {
namespace {

constexpr int kTargetStepTicks = 8;
const Rgb kBackground{255, 255, 255};

}  // namespace

Rgb lighter(Rgb colour) {
  auto half = [](uint8_t c) { return static_cast<uint8_t>((c + 255) / 2); };
  return {half(colour.r), half(colour.g), half(colour.b)};
}

Canvas render_comparison_figure(const std::vector<std::pair<std::string, RunMetrics>>& runs) {
  Chart loss;
  loss.title = "loss: " + std::to_string(runs.size()) + " runs";
  loss.x_title = "step";
  Chart throughput;
  throughput.title = "throughput (tokens/s)";
  throughput.x_title = "step";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& [name, metrics] = runs[i];
    const Rgb colour = kRunColours[i % std::size(kRunColours)];
    if (!metrics.train_loss.empty())
      loss.series.push_back({name, colour, metrics.train_loss.steps, metrics.train_loss.values});
    if (!metrics.valid_loss.empty())
      loss.series.push_back({name + " valid", lighter(colour), metrics.valid_loss.steps, metrics.valid_loss.values});
    if (!metrics.tokens_per_s.empty())
      throughput.series.push_back({name, colour, metrics.tokens_per_s.steps, metrics.tokens_per_s.values});
  }
  // One step axis for both panels, as in the single-run figure.
  const auto loss_steps = x_extent(loss), throughput_steps = x_extent(throughput);
  if (loss_steps || throughput_steps) {
    double lo = loss_steps ? loss_steps->first : throughput_steps->first;
    double hi = loss_steps ? loss_steps->second : throughput_steps->second;
    for (const auto& extent : {loss_steps, throughput_steps}) {
      if (!extent) continue;
      lo = std::min(lo, extent->first);
      hi = std::max(hi, extent->second);
    }
    loss.x_axis = throughput.x_axis = nice_axis(lo, hi, kTargetStepTicks, /*integer_ticks=*/true);
  }
  loss.y_label_width = throughput.y_label_width = std::max(y_label_width(loss), y_label_width(throughput));

  Canvas canvas(kFigureWidth, kFigureHeight, kBackground);
  const int panel_height = kFigureHeight / 2;
  draw_chart(canvas, {0, 0, kFigureWidth, panel_height}, loss);
  draw_chart(canvas, {0, panel_height, kFigureWidth, kFigureHeight - panel_height}, throughput);
  return canvas;
}

}  // namespace loom::plot

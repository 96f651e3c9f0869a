#include "plot/compare_plot.h"

#include <iterator>
#include <utility>

#include "plot/chart.h"
#include "plot/metrics_plot.h"

namespace loom::plot {

Rgb lighter(Rgb colour) {
  auto half = [](uint8_t c) { return static_cast<uint8_t>((c + 255) / 2); };
  return {half(colour.r), half(colour.g), half(colour.b)};
}

std::string render_comparison_figure(const std::vector<std::pair<std::string, RunMetrics>>& runs) {
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
  return render_loss_and_throughput(std::move(loss), std::move(throughput));
}

}  // namespace loom::plot

// The figure `loom plot` writes, an SVG document: training (and validation)
// loss over steps above, throughput over steps below, sharing the step axis.
#pragma once

#include <string>

#include "plot/chart.h"
#include "plot/metrics.h"
#include "plot/svg.h"

namespace loom::plot {

inline constexpr int kFigureWidth = 1000;
inline constexpr int kFigureHeight = 800;  // two panels of 400 pixels: loss on top, tokens/s below
// Series colours (matplotlib's tab10), which tests look for by exact value.
inline constexpr Rgb kTrainLossColour{31, 119, 180};   // blue
inline constexpr Rgb kValidLossColour{255, 127, 14};   // orange
inline constexpr Rgb kThroughputColour{44, 160, 44};   // green
inline constexpr Rgb kSkippedStepColour{214, 39, 40};  // red

// `run_name` goes in the loss panel's title.
std::string render_metrics_figure(const RunMetrics& metrics, const std::string& run_name);

// The figure's layout, for one run or several (compare_plot.h): `loss` above,
// `throughput` below, one step axis spanning both panels' data and one
// y-label width, so that a step lines up in both.
std::string render_loss_and_throughput(Chart loss, Chart throughput);

}  // namespace loom::plot

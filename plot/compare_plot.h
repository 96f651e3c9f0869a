// The figure `loom plot RUN RUN...` writes (SVG): several runs' curves overlaid,
// training loss (and validation loss, in a lighter shade of the run's colour)
// above, throughput below, one colour per run, the legend naming the runs.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "plot/metrics.h"
#include "plot/svg.h"

namespace loom::plot {

// Matplotlib's tab10, in order: run i gets kRunColours[i % 10].
inline constexpr Rgb kRunColours[10] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},
                                        {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
                                        {188, 189, 34},  {23, 190, 207}};

// The validation curve's colour for a run drawn in `colour`: halfway to white.
Rgb lighter(Rgb colour);

// `runs`: (name for the legend, metrics), in legend order.
std::string render_comparison_figure(const std::vector<std::pair<std::string, RunMetrics>>& runs);

}  // namespace loom::plot

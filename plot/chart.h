// One line-chart panel drawn as SVG: title, axes with numbered ticks, a light
// grid, one polyline per series, optional event markers along the x axis,
// and a legend.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "plot/axis.h"
#include "plot/svg.h"

namespace loom::plot {

struct Series {
  std::string label;
  Rgb colour;
  // Same length, x ascending. A point with a non-finite coordinate is not
  // drawn and breaks the line: the points either side of it are not joined.
  std::vector<double> x, y;
};

struct Chart {
  std::string title;
  std::string x_title;
  std::vector<Series> series;
  // Short ticks rising from the x axis at these x values (e.g. skipped
  // steps), listed in the legend as `markers_label` when there are any.
  std::vector<double> markers_x;
  std::string markers_label;
  Rgb markers_colour;
  // The x axis to use, so that stacked panels line up; by default one that
  // holds this chart's own series and markers.
  std::optional<Axis> x_axis;
  // Room kept for the y tick labels, in pixels; wider labels widen it.
  // Stacked panels pass the widest of theirs so that their plots start at
  // the same x.
  double y_label_width = 0;
};

// A rectangle in SVG user units (pixels), y growing downwards.
struct Rect {
  double x = 0, y = 0, width = 0, height = 0;
  double right() const { return x + width; }
  double bottom() const { return y + height; }
  bool contains(double px, double py) const { return px >= x && px <= right() && py >= y && py <= bottom(); }
};

// The x range of the series' finite points and the markers, or nullopt when
// the chart has neither.
std::optional<std::pair<double, double>> x_extent(const Chart& chart);

// Width in pixels of the widest y tick label `chart` would draw (0 without
// points), as estimated for the figure's monospace font.
double y_label_width(const Chart& chart);

// Draws `chart` inside `area` as a <g class="chart"> of `svg`. A chart
// without points gets its frame and a "no data" note instead of axes.
void draw_chart(SvgWriter& svg, const Rect& area, const Chart& chart);

}  // namespace loom::plot

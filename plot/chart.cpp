#include "plot/chart.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace loom::plot {
namespace {

constexpr int kTextScale = 2;          // the 5 x 7 font at 10 x 14 pixels
constexpr int kLineThickness = 2;      // series polylines
constexpr int kPointSize = 7;          // a series of one point
constexpr int kTargetTicksX = 8;
constexpr int kTargetTicksY = 6;
constexpr int kPad = 8;                // between labels, titles and the frame
constexpr int kTickLength = 5;
constexpr int kMarkerHeight = 12;
constexpr int kLegendSwatch = 24;      // width of a legend entry's line sample
const Rgb kTextColour{30, 30, 30};
const Rgb kFrameColour{90, 90, 90};
const Rgb kGridColour{225, 225, 225};
const Rgb kLegendBackground{255, 255, 255};
const Rgb kLegendBorder{190, 190, 190};

// Maps axis values onto the pixel columns / rows of the plot area.
struct Mapping {
  const Axis& x_axis;
  const Axis& y_axis;
  PixelRect plot;

  int column(double x) const { return plot.x + offset(x, x_axis, plot.width); }
  // Rows grow downwards, values upwards.
  int row(double y) const { return plot.bottom() - offset(y, y_axis, plot.height); }

  static int offset(double value, const Axis& axis, int pixels) {
    return static_cast<int>(std::lround((value - axis.min) / (axis.max - axis.min) * (pixels - 1)));
  }
};

std::optional<std::pair<double, double>> y_extent(const Chart& chart) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& series : chart.series) {
    for (double y : series.y) {
      lo = std::min(lo, y);
      hi = std::max(hi, y);
    }
  }
  if (lo > hi) return std::nullopt;
  return std::pair{lo, hi};
}

struct LegendEntry {
  std::string label;
  Rgb colour;
};

// The legend goes in whichever corner of the plot covers the fewest points
// (a loss curve falls, so usually top right), on an opaque box.
void draw_legend(Canvas& canvas, const Mapping& map, const Chart& chart, const std::vector<LegendEntry>& entries) {
  if (entries.empty()) return;
  const int row_height = Canvas::text_height(kTextScale) + kPad;
  int label_width = 0;
  for (const auto& entry : entries) label_width = std::max(label_width, Canvas::text_width(entry.label, kTextScale));
  const int width = kPad + kLegendSwatch + kPad + label_width + kPad;
  const int height = static_cast<int>(entries.size()) * row_height + kPad;
  const PixelRect& plot = map.plot;
  const int left = plot.x + kPad, right = plot.right() - kPad - width + 1;
  const int top = plot.y + kPad, bottom = plot.bottom() - kPad - height + 1;
  const std::array<PixelRect, 4> corners = {PixelRect{right, top, width, height}, PixelRect{left, top, width, height},
                                            PixelRect{right, bottom, width, height},
                                            PixelRect{left, bottom, width, height}};
  PixelRect box = corners[0];
  int64_t fewest = std::numeric_limits<int64_t>::max();
  for (const auto& corner : corners) {
    int64_t covered = 0;
    for (const auto& series : chart.series) {
      for (size_t i = 0; i < series.x.size(); ++i) {
        covered += corner.contains(map.column(series.x[i]), map.row(series.y[i]));
      }
    }
    if (covered < fewest) {
      fewest = covered;
      box = corner;
    }
  }
  canvas.fill_rect(box, kLegendBackground);
  canvas.draw_rect_outline(box, kLegendBorder);
  int y = box.y + kPad;
  for (const auto& entry : entries) {
    const int middle = y + Canvas::text_height(kTextScale) / 2;
    canvas.draw_line(box.x + kPad, middle, box.x + kPad + kLegendSwatch, middle, entry.colour, 3);
    canvas.draw_text(box.x + kPad + kLegendSwatch + kPad, y, entry.label, kTextColour, kTextScale);
    y += row_height;
  }
}

Axis y_axis_of(const std::pair<double, double>& extent) {
  return nice_axis(extent.first, extent.second, kTargetTicksY);
}

}  // namespace

int y_label_width(const Chart& chart) {
  const auto ys = y_extent(chart);
  if (!ys) return 0;
  const Axis axis = y_axis_of(*ys);
  int width = 0;
  for (double tick : axis.ticks) width = std::max(width, Canvas::text_width(axis.label(tick), kTextScale));
  return width;
}

std::optional<std::pair<double, double>> x_extent(const Chart& chart) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& series : chart.series) {
    for (double x : series.x) {
      lo = std::min(lo, x);
      hi = std::max(hi, x);
    }
  }
  for (double x : chart.markers_x) {
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  if (lo > hi) return std::nullopt;
  return std::pair{lo, hi};
}

void draw_chart(Canvas& canvas, const PixelRect& area, const Chart& chart) {
  const int text_height = Canvas::text_height(kTextScale);
  canvas.draw_text(area.x + kPad, area.y + kPad, chart.title, kTextColour, kTextScale);

  const auto xs = x_extent(chart);
  const auto ys = y_extent(chart);
  const int plot_top = area.y + kPad + text_height + 2 * kPad;
  // Below the plot: tick labels, then the x axis title.
  const int plot_bottom = area.bottom() - kPad - text_height - kPad - text_height - kPad;
  if (!xs || !ys) {
    const PixelRect plot{area.x + kPad, plot_top, area.width - 2 * kPad, plot_bottom - plot_top + 1};
    canvas.draw_rect_outline(plot, kFrameColour);
    const std::string note = "no data";
    canvas.draw_text(plot.x + (plot.width - Canvas::text_width(note, kTextScale)) / 2,
                     plot.y + (plot.height - text_height) / 2, note, kTextColour, kTextScale);
    return;
  }
  const Axis x_axis = chart.x_axis ? *chart.x_axis : nice_axis(xs->first, xs->second, kTargetTicksX, true);
  const Axis y_axis = y_axis_of(*ys);

  // The plot area starts right of the widest y tick label.
  const int label_width = std::max(chart.y_label_width, y_label_width(chart));
  const int plot_left = area.x + kPad + label_width + kPad + kTickLength;
  // Room on the right for half of the last x label, which is centred on its tick.
  const int plot_right = area.right() - kPad - Canvas::text_width(x_axis.label(x_axis.max), kTextScale) / 2;
  const Mapping map{x_axis, y_axis, {plot_left, plot_top, plot_right - plot_left + 1, plot_bottom - plot_top + 1}};
  const PixelRect& plot = map.plot;

  // Grid first, so that the frame and the curves draw over it.
  for (double tick : x_axis.ticks) {
    const int column = map.column(tick);
    canvas.draw_line(column, plot.y, column, plot.bottom(), kGridColour);
    canvas.draw_line(column, plot.bottom(), column, plot.bottom() + kTickLength, kFrameColour);
    const std::string label = x_axis.label(tick);
    canvas.draw_text(column - Canvas::text_width(label, kTextScale) / 2, plot.bottom() + kTickLength + kPad, label,
                     kTextColour, kTextScale);
  }
  for (double tick : y_axis.ticks) {
    const int row = map.row(tick);
    canvas.draw_line(plot.x, row, plot.right(), row, kGridColour);
    canvas.draw_line(plot.x - kTickLength, row, plot.x, row, kFrameColour);
    const std::string label = y_axis.label(tick);
    canvas.draw_text(plot.x - kTickLength - kPad - Canvas::text_width(label, kTextScale), row - text_height / 2, label,
                     kTextColour, kTextScale);
  }
  canvas.draw_rect_outline(plot, kFrameColour);
  canvas.draw_text(plot.x + (plot.width - Canvas::text_width(chart.x_title, kTextScale)) / 2,
                   area.bottom() - kPad - text_height + 1, chart.x_title, kTextColour, kTextScale);

  std::vector<LegendEntry> legend;
  for (const auto& series : chart.series) {
    if (series.x.empty()) continue;
    legend.push_back({series.label, series.colour});
    int last_column = map.column(series.x[0]), last_row = map.row(series.y[0]);
    if (series.x.size() == 1) {
      // A lone point has no line to draw: a zero-length line stamps a square.
      canvas.draw_line(last_column, last_row, last_column, last_row, series.colour, kPointSize);
    }
    for (size_t i = 1; i < series.x.size(); ++i) {
      const int column = map.column(series.x[i]), row = map.row(series.y[i]);
      canvas.draw_line(last_column, last_row, column, row, series.colour, kLineThickness);
      last_column = column;
      last_row = row;
    }
  }
  for (double x : chart.markers_x) {
    const int column = map.column(x);
    canvas.draw_line(column, plot.bottom() - 1, column, plot.bottom() - kMarkerHeight, chart.markers_colour, 2);
  }
  if (!chart.markers_x.empty()) legend.push_back({chart.markers_label, chart.markers_colour});
  draw_legend(canvas, map, chart, legend);
}

}  // namespace loom::plot

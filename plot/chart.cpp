#include "plot/chart.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace loom::plot {
namespace {

// Text is set in a monospace font, whose every character advances 0.6 em
// (DejaVu Sans Mono, Liberation Mono, Courier), so that the layout can size
// the legend and the y label column without measuring glyphs.
constexpr const char* kFontFamily = "DejaVu Sans Mono, Liberation Mono, monospace";
constexpr double kFontSize = 14;
constexpr double kTitleFontSize = 16;
constexpr double kCharWidth = 0.6 * kFontSize;
constexpr double kLineHeight = 16;  // a line of text, descenders included
constexpr double kCapHeight = 10;   // the height of a digit above its baseline, at kFontSize

constexpr double kLineWidth = 2;       // series polylines
constexpr double kPointRadius = 3.5;   // a point without a neighbour to join
constexpr int kTargetTicksX = 8;
constexpr int kTargetTicksY = 6;
constexpr double kPad = 8;             // between labels, titles and the frame
constexpr double kTickLength = 5;
constexpr double kMarkerHeight = 12;
constexpr double kMarkerWidth = 2;
constexpr double kSwatchLength = 24;   // a legend entry's line sample
constexpr double kSwatchThickness = 3;
const Rgb kTextColour{30, 30, 30};
const Rgb kFrameColour{90, 90, 90};
const Rgb kGridColour{225, 225, 225};
const Rgb kLegendBackground{255, 255, 255};
const Rgb kLegendBorder{190, 190, 190};

double text_width(std::string_view text) {
  // Characters, not bytes: UTF-8 continuation bytes (10xxxxxx) start none.
  const auto characters = std::count_if(text.begin(), text.end(), [](char c) { return (c & 0xC0) != 0x80; });
  return static_cast<double>(characters) * kCharWidth;
}

bool finite_point(const Series& series, size_t i) { return std::isfinite(series.x[i]) && std::isfinite(series.y[i]); }

// Maps axis values into the plot area.
struct Mapping {
  const Axis& x_axis;
  const Axis& y_axis;
  Rect plot;

  double x(double value) const { return plot.x + fraction(value, x_axis) * plot.width; }
  // y grows downwards, values upwards.
  double y(double value) const { return plot.bottom() - fraction(value, y_axis) * plot.height; }

  static double fraction(double value, const Axis& axis) { return (value - axis.min) / (axis.max - axis.min); }
};

std::optional<std::pair<double, double>> y_extent(const Chart& chart) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& series : chart.series) {
    for (size_t i = 0; i < series.y.size(); ++i) {
      if (!finite_point(series, i)) continue;
      lo = std::min(lo, series.y[i]);
      hi = std::max(hi, series.y[i]);
    }
  }
  if (lo > hi) return std::nullopt;
  return std::pair{lo, hi};
}

Axis y_axis_of(const std::pair<double, double>& extent) {
  return nice_axis(extent.first, extent.second, kTargetTicksY);
}

void line(SvgWriter& svg, double x1, double y1, double x2, double y2) {
  svg.element("line", {{"x1", svg_number(x1)}, {"y1", svg_number(y1)}, {"x2", svg_number(x2)}, {"y2", svg_number(y2)}});
}

// `anchor`: start, middle or end; `baseline` is the text's baseline.
void text(SvgWriter& svg, double x, double baseline, std::string_view anchor, std::string_view content) {
  svg.text_element("text", {{"x", svg_number(x)}, {"y", svg_number(baseline)}, {"text-anchor", std::string(anchor)}},
                   content);
}

// One <g class="series">: its label as the <title> (a browser shows it on
// hover), a <polyline> per unbroken run of points, a dot for a run of one.
void draw_series(SvgWriter& svg, const Mapping& map, const Series& series) {
  const std::string colour = svg_colour(series.colour);
  svg.open("g", {{"class", "series"}});
  svg.text_element("title", {}, series.label);
  for (size_t begin = 0; begin < series.x.size();) {
    if (!finite_point(series, begin)) {
      ++begin;
      continue;
    }
    size_t end = begin;
    std::string points;
    for (; end < series.x.size() && finite_point(series, end); ++end) {
      if (!points.empty()) points += ' ';
      points += svg_number(map.x(series.x[end])) + "," + svg_number(map.y(series.y[end]));
    }
    if (end - begin == 1) {
      svg.element("circle", {{"cx", svg_number(map.x(series.x[begin]))},
                             {"cy", svg_number(map.y(series.y[begin]))},
                             {"r", svg_number(kPointRadius)},
                             {"fill", colour}});
    } else {
      svg.element("polyline", {{"points", points},
                               {"fill", "none"},
                               {"stroke", colour},
                               {"stroke-width", svg_number(kLineWidth)},
                               {"stroke-linejoin", "round"}});
    }
    begin = end;
  }
  svg.close();
}

struct LegendEntry {
  std::string label;
  Rgb colour;
};

// The legend goes in whichever corner of the plot covers the fewest points
// (a loss curve falls, so usually top right), on an opaque box.
void draw_legend(SvgWriter& svg, const Mapping& map, const Chart& chart, const std::vector<LegendEntry>& entries) {
  if (entries.empty()) return;
  const double row_height = kLineHeight + kPad;
  double label_width = 0;
  for (const auto& entry : entries) label_width = std::max(label_width, text_width(entry.label));
  const double width = kPad + kSwatchLength + kPad + label_width + kPad;
  const double height = static_cast<double>(entries.size()) * row_height + kPad;
  const Rect& plot = map.plot;
  const double left = plot.x + kPad, right = plot.right() - kPad - width;
  const double top = plot.y + kPad, bottom = plot.bottom() - kPad - height;
  const std::array<Rect, 4> corners = {Rect{right, top, width, height}, Rect{left, top, width, height},
                                       Rect{right, bottom, width, height}, Rect{left, bottom, width, height}};
  Rect box = corners[0];
  int64_t fewest = std::numeric_limits<int64_t>::max();
  for (const auto& corner : corners) {
    int64_t covered = 0;
    for (const auto& series : chart.series) {
      for (size_t i = 0; i < series.x.size(); ++i) {
        if (finite_point(series, i)) covered += corner.contains(map.x(series.x[i]), map.y(series.y[i]));
      }
    }
    if (covered < fewest) {
      fewest = covered;
      box = corner;
    }
  }
  svg.open("g", {{"class", "legend"}});
  svg.element("rect", {{"x", svg_number(box.x)},
                       {"y", svg_number(box.y)},
                       {"width", svg_number(box.width)},
                       {"height", svg_number(box.height)},
                       {"fill", svg_colour(kLegendBackground)},
                       {"stroke", svg_colour(kLegendBorder)}});
  double y = box.y + kPad;
  for (const auto& entry : entries) {
    const double middle = y + kLineHeight / 2;
    svg.element("line", {{"x1", svg_number(box.x + kPad)},
                         {"y1", svg_number(middle)},
                         {"x2", svg_number(box.x + kPad + kSwatchLength)},
                         {"y2", svg_number(middle)},
                         {"stroke", svg_colour(entry.colour)},
                         {"stroke-width", svg_number(kSwatchThickness)}});
    text(svg, box.x + kPad + kSwatchLength + kPad, middle + kCapHeight / 2, "start", entry.label);
    y += row_height;
  }
  svg.close();
}

}  // namespace

double y_label_width(const Chart& chart) {
  const auto ys = y_extent(chart);
  if (!ys) return 0;
  const Axis axis = y_axis_of(*ys);
  double width = 0;
  for (double tick : axis.ticks) width = std::max(width, text_width(axis.label(tick)));
  return width;
}

std::optional<std::pair<double, double>> x_extent(const Chart& chart) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& series : chart.series) {
    for (size_t i = 0; i < series.x.size(); ++i) {
      if (!finite_point(series, i)) continue;
      lo = std::min(lo, series.x[i]);
      hi = std::max(hi, series.x[i]);
    }
  }
  for (double x : chart.markers_x) {
    if (!std::isfinite(x)) continue;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  if (lo > hi) return std::nullopt;
  return std::pair{lo, hi};
}

void draw_chart(SvgWriter& svg, const Rect& area, const Chart& chart) {
  svg.open("g", {{"class", "chart"},
                 {"font-family", kFontFamily},
                 {"font-size", svg_number(kFontSize)},
                 {"fill", svg_colour(kTextColour)}});
  svg.text_element("text", {{"class", "title"},
                            {"x", svg_number(area.x + kPad)},
                            {"y", svg_number(area.y + kPad + kCapHeight + 2)},
                            {"font-size", svg_number(kTitleFontSize)},
                            {"font-weight", "bold"}},
                   chart.title);

  const auto xs = x_extent(chart);
  const auto ys = y_extent(chart);
  const double plot_top = area.y + kPad + kLineHeight + 2 * kPad;
  // Below the plot: tick labels, then the x axis title.
  const double plot_bottom = area.bottom() - kPad - kLineHeight - kPad - kLineHeight - kPad;
  const auto frame = [&](const Rect& plot) {
    svg.element("rect", {{"class", "frame"},
                         {"x", svg_number(plot.x)},
                         {"y", svg_number(plot.y)},
                         {"width", svg_number(plot.width)},
                         {"height", svg_number(plot.height)},
                         {"fill", "none"},
                         {"stroke", svg_colour(kFrameColour)}});
  };
  if (!xs || !ys) {
    const Rect plot{area.x + kPad, plot_top, area.width - 2 * kPad, plot_bottom - plot_top};
    frame(plot);
    text(svg, plot.x + plot.width / 2, plot.y + plot.height / 2 + kCapHeight / 2, "middle", "no data");
    svg.close();
    return;
  }
  const Axis x_axis = chart.x_axis ? *chart.x_axis : nice_axis(xs->first, xs->second, kTargetTicksX, true);
  const Axis y_axis = y_axis_of(*ys);

  // The plot area starts right of the widest y tick label.
  const double label_width = std::max(chart.y_label_width, y_label_width(chart));
  const double plot_left = area.x + kPad + label_width + kPad + kTickLength;
  // Room on the right for half of the last x label, which is centred on its tick.
  const double plot_right = area.right() - kPad - text_width(x_axis.label(x_axis.max)) / 2;
  const Mapping map{x_axis, y_axis, {plot_left, plot_top, plot_right - plot_left, plot_bottom - plot_top}};
  const Rect& plot = map.plot;

  // Grid first, so that the frame and the curves draw over it. crispEdges:
  // hairlines on whole pixels rather than smeared over two.
  svg.open("g", {{"class", "grid"}, {"stroke", svg_colour(kGridColour)}, {"shape-rendering", "crispEdges"}});
  for (double tick : x_axis.ticks) line(svg, map.x(tick), plot.y, map.x(tick), plot.bottom());
  for (double tick : y_axis.ticks) line(svg, plot.x, map.y(tick), plot.right(), map.y(tick));
  svg.close();

  svg.open("g", {{"class", "x-axis"}});
  svg.open("g", {{"stroke", svg_colour(kFrameColour)}, {"shape-rendering", "crispEdges"}});
  for (double tick : x_axis.ticks) line(svg, map.x(tick), plot.bottom(), map.x(tick), plot.bottom() + kTickLength);
  svg.close();
  for (double tick : x_axis.ticks) {
    text(svg, map.x(tick), plot.bottom() + kTickLength + kPad + kCapHeight, "middle", x_axis.label(tick));
  }
  svg.text_element("text", {{"class", "axis-title"},
                            {"x", svg_number(plot.x + plot.width / 2)},
                            {"y", svg_number(area.bottom() - kPad - 3)},
                            {"text-anchor", "middle"}},
                   chart.x_title);
  svg.close();

  svg.open("g", {{"class", "y-axis"}});
  svg.open("g", {{"stroke", svg_colour(kFrameColour)}, {"shape-rendering", "crispEdges"}});
  for (double tick : y_axis.ticks) line(svg, plot.x - kTickLength, map.y(tick), plot.x, map.y(tick));
  svg.close();
  for (double tick : y_axis.ticks) {
    text(svg, plot.x - kTickLength - kPad, map.y(tick) + kCapHeight / 2, "end", y_axis.label(tick));
  }
  svg.close();
  frame(plot);

  std::vector<LegendEntry> legend;
  for (const auto& series : chart.series) {
    if (series.x.empty()) continue;
    legend.push_back({series.label, series.colour});
    draw_series(svg, map, series);
  }
  if (!chart.markers_x.empty()) {
    svg.open("g", {{"class", "markers"}, {"stroke", svg_colour(chart.markers_colour)},
                   {"stroke-width", svg_number(kMarkerWidth)}});
    svg.text_element("title", {}, chart.markers_label);
    for (double x : chart.markers_x) {
      if (std::isfinite(x)) line(svg, map.x(x), plot.bottom() - 1, map.x(x), plot.bottom() - kMarkerHeight);
    }
    svg.close();
    legend.push_back({chart.markers_label, chart.markers_colour});
  }
  draw_legend(svg, map, chart, legend);
  svg.close();
}

}  // namespace loom::plot

// Reads back the SVG figures of plot/ for tests, through the XML reader and
// only what an SVG viewer would see: the frame, the tick marks and their
// labels, each series' polylines and dots (a series is a <g class="series">
// named by its <title>), the markers and the legend. Where a value lands is
// worked out from the tick labels, as a reader of the chart would, not from
// the code that drew it.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "tests/unit/xml_reader.h"

namespace loom::test_support {

struct Point {
  double x = 0, y = 0;
};

// The value a tick label prints: "1.5", "200k", "1.2M", "3G".
inline double tick_value(std::string label) {
  double scale = 1;
  if (!label.empty() && (label.back() == 'k' || label.back() == 'M' || label.back() == 'G')) {
    scale = label.back() == 'k' ? 1e3 : label.back() == 'M' ? 1e6 : 1e9;
    label.pop_back();
  }
  return std::stod(label) * scale;
}

// "x,y x,y ..." of a polyline.
inline std::vector<Point> parse_points(const std::string& points) {
  std::vector<Point> parsed;
  std::istringstream in(points);
  std::string pair;
  while (in >> pair) {
    const size_t comma = pair.find(',');
    if (comma == std::string::npos) throw std::runtime_error("point without a comma: " + pair);
    parsed.push_back({std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1))});
  }
  return parsed;
}

inline bool has_class(const XmlElement& element, std::string_view name) {
  return element.has("class") && element.at("class") == name;
}

// The first child of `parent` with class `name`; throws when there is none.
inline const XmlElement& child_of_class(const XmlElement& parent, std::string_view name) {
  for (const auto& child : parent.children) {
    if (has_class(child, name)) return child;
  }
  throw std::out_of_range("<" + parent.name + "> has no child of class " + std::string(name));
}

struct Tick {
  double value = 0;     // what its label says
  double position = 0;  // x of an x tick, y of a y tick
};

struct SeriesView {
  std::string label;
  std::vector<std::vector<Point>> lines;  // one per polyline
  std::vector<std::string> line_strokes;
  std::vector<Point> dots;  // circles' centres
  std::vector<std::string> dot_fills;
};

struct LegendEntryView {
  std::string label;
  std::string stroke;  // the swatch's colour
};

// One <g class="chart">.
struct ChartView {
  const XmlElement* element = nullptr;
  std::string title;
  double frame_x = 0, frame_y = 0, frame_width = 0, frame_height = 0;
  std::vector<Tick> x_ticks, y_ticks;  // empty for a chart without data
  std::vector<SeriesView> series;
  std::vector<double> marker_xs;
  std::string markers_stroke, markers_title;
  std::vector<LegendEntryView> legend;
  std::vector<std::string> texts;  // every <text>'s content, in document order

  // Where `value` lands, by the linear map through the first and last tick.
  double x_of(double value) const { return map(x_ticks, value); }
  double y_of(double value) const { return map(y_ticks, value); }

  const SeriesView* find_series(std::string_view label) const {
    for (const auto& s : series) {
      if (s.label == label) return &s;
    }
    return nullptr;
  }
  bool has_text(std::string_view content) const {
    for (const auto& t : texts) {
      if (t == content) return true;
    }
    return false;
  }

 private:
  static double map(const std::vector<Tick>& ticks, double value) {
    if (ticks.size() < 2) throw std::runtime_error("a chart without two ticks maps nothing");
    const Tick &first = ticks.front(), &last = ticks.back();
    return first.position + (value - first.value) / (last.value - first.value) * (last.position - first.position);
  }
};

// Tick marks (the <line>s of the axis group's inner <g>) paired in order
// with its <text> labels; `coordinate` is the attribute giving the position.
inline std::vector<Tick> read_ticks(const XmlElement& axis, const char* coordinate) {
  std::vector<const XmlElement*> marks, labels;
  for (const auto& child : axis.children) {
    if (child.name == "g") {
      for (const auto& mark : child.children) marks.push_back(&mark);
    } else if (child.name == "text" && !has_class(child, "axis-title")) {
      labels.push_back(&child);
    }
  }
  EXPECT_EQ(marks.size(), labels.size()) << "one label per tick mark";
  std::vector<Tick> ticks;
  for (size_t i = 0; i < std::min(marks.size(), labels.size()); ++i) {
    ticks.push_back({tick_value(labels[i]->text), std::stod(marks[i]->at(coordinate))});
  }
  return ticks;
}

inline ChartView read_chart(const XmlElement& chart) {
  ChartView view;
  view.element = &chart;
  view.title = child_of_class(chart, "title").text;
  const XmlElement& frame = child_of_class(chart, "frame");
  view.frame_x = std::stod(frame.at("x"));
  view.frame_y = std::stod(frame.at("y"));
  view.frame_width = std::stod(frame.at("width"));
  view.frame_height = std::stod(frame.at("height"));
  for (const auto* text : chart.find_all("text")) view.texts.push_back(text->text);
  for (const auto& child : chart.children) {
    if (has_class(child, "x-axis")) view.x_ticks = read_ticks(child, "x1");
    if (has_class(child, "y-axis")) view.y_ticks = read_ticks(child, "y1");
    if (has_class(child, "series")) {
      SeriesView series;
      for (const auto& part : child.children) {
        if (part.name == "title") series.label = part.text;
        if (part.name == "polyline") {
          series.lines.push_back(parse_points(part.at("points")));
          series.line_strokes.push_back(part.at("stroke"));
        }
        if (part.name == "circle") {
          series.dots.push_back({std::stod(part.at("cx")), std::stod(part.at("cy"))});
          series.dot_fills.push_back(part.at("fill"));
        }
      }
      view.series.push_back(series);
    }
    if (has_class(child, "markers")) {
      view.markers_stroke = child.at("stroke");
      for (const auto& part : child.children) {
        if (part.name == "title") view.markers_title = part.text;
        if (part.name == "line") view.marker_xs.push_back(std::stod(part.at("x1")));
      }
    }
    if (has_class(child, "legend")) {
      const auto swatches = child.find_all("line");
      const auto labels = child.find_all("text");
      EXPECT_EQ(swatches.size(), labels.size()) << "one swatch per legend label";
      for (size_t i = 0; i < std::min(swatches.size(), labels.size()); ++i) {
        view.legend.push_back({labels[i]->text, swatches[i]->at("stroke")});
      }
    }
  }
  return view;
}

// Every chart of an SVG document, top to bottom; fails the test (by
// throwing) when the document is not well-formed XML with an <svg> root.
struct FigureView {
  XmlElement root;
  std::vector<ChartView> charts;
};

inline FigureView read_figure(const std::string& svg) {
  FigureView figure{parse_xml(svg), {}};
  if (figure.root.name != "svg") throw std::runtime_error("root element is <" + figure.root.name + ">, not <svg>");
  for (const auto* chart : figure.root.find_all([](const XmlElement& e) { return has_class(e, "chart"); })) {
    figure.charts.push_back(read_chart(*chart));
  }
  return figure;
}

}  // namespace loom::test_support

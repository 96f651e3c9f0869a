// `loom plot`'s pieces: the SVG writer (its output read back by a strict XML
// reader), axis ticks, the metrics.jsonl reader, and the figure's panels,
// read back from the SVG as a viewer would see them.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "plot/axis.h"
#include "plot/chart.h"
#include "plot/metrics.h"
#include "plot/metrics_plot.h"
#include "plot/svg.h"
#include "tests/unit/bad_input.h"
#include "tests/unit/svg_figure.h"
#include "tests/unit/xml_reader.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using test_support::expect_bad_input;
using test_support::parse_xml;
using test_support::read_figure;

// --- the XML reader the tests below rely on ------------------------------------------

TEST(XmlReader, RefusesWhatIsNotWellFormed) {
  for (const std::string bad : {"<svg><g></svg>", "<svg a=\"<\"/>", "<svg>a & b</svg>", "<svg/><svg/>",
                                "<svg a='1' a='2'/>", "<svg a=1/>", "<svg>\x01</svg>", "<svg>\xff</svg>",
                                "<svg>&nbsp;</svg>", "<svg><g>", "text"}) {
    EXPECT_THROW(parse_xml(bad), std::runtime_error) << bad;
  }
  const auto root = parse_xml("<?xml version=\"1.0\"?>\n<svg a=\"x &amp; &#60;y&#x3e;\"><t>&lt;&quot;</t><g/></svg>\n");
  EXPECT_EQ(root.at("a"), "x & <y>");
  ASSERT_EQ(root.children.size(), 2u);
  EXPECT_EQ(root.children[0].text, "<\"");
}

// --- the SVG writer -----------------------------------------------------------------------

TEST(SvgWriter, EscapesMarkupCharacters) {
  EXPECT_EQ(plot::escape_xml(R"(a<b & "c" 'd'>)"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
  EXPECT_EQ(plot::escape_xml("plain run-1_lr3e-4"), "plain run-1_lr3e-4");
}

TEST(SvgWriter, KeepsUtf8AndReplacesBytesXmlForbids) {
  const std::string replacement = "\xEF\xBF\xBD";
  EXPECT_EQ(plot::escape_xml("caf\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x99\x82 tab\tnewline\n"),
            "caf\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x99\x82 tab\tnewline\n");
  EXPECT_EQ(plot::escape_xml("a\x01" "b"), "a" + replacement + "b");  // a control character
  EXPECT_EQ(plot::escape_xml("\xFF"), replacement);                    // not UTF-8 at all
  EXPECT_EQ(plot::escape_xml("\xC0\xAF"), replacement + replacement);  // an overlong '/'
  EXPECT_EQ(plot::escape_xml("x\xE6\x97"), "x" + replacement + replacement);  // cut short
  EXPECT_EQ(plot::escape_xml("\xED\xA0\x80"), replacement + replacement + replacement);  // a surrogate
  EXPECT_EQ(plot::escape_xml("\xEF\xBF\xBF"), replacement);  // U+FFFF
  // Whatever the bytes, the result is text an XML reader accepts.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::string bytes(16, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    EXPECT_NO_THROW(parse_xml("<t a=\"" + plot::escape_xml(bytes) + "\">" + plot::escape_xml(bytes) + "</t>"));
  }
}

TEST(SvgWriter, WritesADocumentThatReadsBackAsWritten) {
  plot::SvgWriter svg(1000, 800.5);
  svg.open("g", {{"class", "chart"}});
  svg.element("rect", {{"x", "1"}, {"data-name", R"(a<b & "c")"}});
  svg.text_element("text", {{"x", "2"}}, "loss < 5 & 'falling'");
  svg.close();
  svg.element("circle", {{"r", "3"}});
  const std::string document = svg.finish();

  const auto root = parse_xml(document);
  EXPECT_EQ(root.name, "svg");
  EXPECT_EQ(root.at("xmlns"), "http://www.w3.org/2000/svg");
  EXPECT_EQ(root.at("width"), "1000");
  EXPECT_EQ(root.at("height"), "800.5");
  EXPECT_EQ(root.at("viewBox"), "0 0 1000 800.5");
  ASSERT_EQ(root.children.size(), 2u);
  const auto& group = root.children[0];
  EXPECT_EQ(group.at("class"), "chart");
  ASSERT_EQ(group.children.size(), 2u);
  EXPECT_EQ(group.children[0].at("data-name"), R"(a<b & "c")");
  EXPECT_EQ(group.children[1].text, "loss < 5 & 'falling'");
  EXPECT_EQ(root.children[1].name, "circle");
}

TEST(SvgWriter, RefusesToCloseTheRootOrWriteAfterFinish) {
  plot::SvgWriter svg(10, 10);
  EXPECT_THROW(svg.close(), std::logic_error);
  svg.finish();
  EXPECT_THROW(svg.element("rect", {}), std::logic_error);
  EXPECT_THROW(svg.finish(), std::logic_error);
}

TEST(SvgWriter, NumbersHaveAtMostTwoDecimalsAndColoursAreHex) {
  EXPECT_EQ(plot::svg_number(12.5), "12.5");
  EXPECT_EQ(plot::svg_number(-3), "-3");
  EXPECT_EQ(plot::svg_number(0), "0");
  EXPECT_EQ(plot::svg_number(-0.001), "0");
  EXPECT_EQ(plot::svg_number(1.2345), "1.23");
  EXPECT_EQ(plot::svg_number(99.999), "100");
  EXPECT_EQ(plot::svg_number(1e7), "10000000");
  EXPECT_THROW(plot::svg_number(std::nan("")), std::invalid_argument);
  EXPECT_EQ(plot::svg_colour({31, 119, 180}), "#1f77b4");
  EXPECT_EQ(plot::svg_colour({0, 0, 255}), "#0000ff");
}

// --- axis ticks -----------------------------------------------------------------

TEST(Axis, TicksAreNiceAndHoldTheData) {
  const plot::Axis whole = plot::nice_axis(4.46, 7.66, 6);
  EXPECT_DOUBLE_EQ(whole.tick_step, 1.0);
  EXPECT_EQ(whole.ticks, (std::vector<double>{4, 5, 6, 7, 8}));
  EXPECT_EQ(whole.label(5.0), "5");

  const plot::Axis halves = plot::nice_axis(4.46, 5.9, 6);
  EXPECT_LE(halves.min, 4.46);
  EXPECT_GE(halves.max, 5.9);
  EXPECT_DOUBLE_EQ(halves.tick_step, 0.5);
  EXPECT_EQ(halves.ticks, (std::vector<double>{4.0, 4.5, 5.0, 5.5, 6.0}));
  EXPECT_EQ(halves.label(4.5), "4.5");
  EXPECT_EQ(halves.label(5.0), "5.0");
}

TEST(Axis, ConstantValuesGetANonzeroRange) {
  for (double value : {0.0, 5.0, -3.0, 1e-9, 1e12}) {
    const plot::Axis axis = plot::nice_axis(value, value, 6);
    EXPECT_LT(axis.min, value) << value;
    EXPECT_GT(axis.max, value) << value;
    EXPECT_GE(axis.ticks.size(), 2u) << value;
  }
}

TEST(Axis, OneStepGetsIntegerTicks) {
  const plot::Axis axis = plot::nice_axis(10, 10, 8, /*integer_ticks=*/true);
  EXPECT_GE(axis.tick_step, 1.0);
  for (double tick : axis.ticks) EXPECT_EQ(tick, std::round(tick));
  EXPECT_EQ(axis.label(10), "10");
}

TEST(Axis, LargeValuesUseSuffixes) {
  EXPECT_EQ(plot::nice_axis(0, 400000, 5).label(200000), "200k");
  EXPECT_EQ(plot::nice_axis(1.0e6, 1.9e6, 6).label(1.2e6), "1.2M");
  EXPECT_EQ(plot::nice_axis(0, 6000, 6).label(5000), "5000");
  // Ticks at min + i * step must not print "-0.0".
  EXPECT_EQ(plot::nice_axis(-0.3, 0.3, 6).label(-1e-17), "0.0");
}

// --- metrics.jsonl ----------------------------------------------------------------

class MetricsFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("loom-test-plot-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& content) {
    const std::string path = (dir_ / "metrics.jsonl").string();
    std::ofstream(path, std::ios::binary) << content;
    return path;
  }

  fs::path dir_;
};

TEST_F(MetricsFile, ReadsLossValidationThroughputAndSkippedSteps) {
  const std::string path = write(
      R"({"step":10,"loss":6.9,"lr":0.001,"grad_norm":1.2,"tokens_per_s":5000.0,"mfu":0.1,"tokens":20480,)"
      R"("new_key":[1]})"
      "\n"
      R"({"step":11,"skipped":true,"loss":"nan","grad_norm":"inf","skipped_steps":1,"samples":[3,4]})"
      "\n"
      "\n"
      R"({"step":20,"loss":6.1,"tokens_per_s":5200.0})"
      "\n"
      R"({"step":20,"valid_loss":6.3})"
      "\n"
      R"({"step":30,"loss":"nan","tokens_per_s":5100.0})"
      "\n");
  const plot::RunMetrics metrics = plot::read_metrics_jsonl(path);
  EXPECT_EQ(metrics.records, 5);
  EXPECT_EQ(metrics.train_loss.steps, (std::vector<double>{10, 20}));
  EXPECT_EQ(metrics.train_loss.values, (std::vector<double>{6.9, 6.1}));
  EXPECT_EQ(metrics.valid_loss.steps, (std::vector<double>{20}));
  EXPECT_EQ(metrics.valid_loss.values, (std::vector<double>{6.3}));
  EXPECT_EQ(metrics.tokens_per_s.steps, (std::vector<double>{10, 20, 30}));
  EXPECT_EQ(metrics.skipped_steps, (std::vector<double>{11}));
  EXPECT_FALSE(metrics.ignored_partial_last_line);
}

TEST_F(MetricsFile, PointsAreSortedByStep) {
  const plot::RunMetrics metrics =
      plot::read_metrics_jsonl(write("{\"step\":20,\"loss\":2}\n{\"step\":10,\"loss\":1}\n"));
  EXPECT_EQ(metrics.train_loss.steps, (std::vector<double>{10, 20}));
  EXPECT_EQ(metrics.train_loss.values, (std::vector<double>{1, 2}));
}

TEST_F(MetricsFile, LineThatIsNotAJsonObjectIsRefusedWithFileAndLine) {
  const std::string path = write("{\"step\":1,\"loss\":2}\nnot json\n{\"step\":2,\"loss\":1}\n");
  expect_bad_input([&] { plot::read_metrics_jsonl(path); }, {path + ":2", "not a JSON object", "not json"});
  const std::string array_path = write("{\"step\":1,\"loss\":2}\n[1, 2]\n");
  expect_bad_input([&] { plot::read_metrics_jsonl(array_path); }, {array_path + ":2", "not a JSON object"});
}

TEST_F(MetricsFile, RecordWithoutStepIsRefused) {
  const std::string path = write("{\"loss\":2}\n");
  expect_bad_input([&] { plot::read_metrics_jsonl(path); }, {path + ":1", "\"step\""});
}

TEST_F(MetricsFile, EmptyFileIsRefused) {
  const std::string path = write("");
  expect_bad_input([&] { plot::read_metrics_jsonl(path); }, {path, "no metrics records"});
}

TEST_F(MetricsFile, OnlyNonFiniteLossesIsRefused) {
  const std::string path = write("{\"step\":1,\"skipped\":true,\"loss\":\"nan\"}\n{\"step\":2,\"loss\":\"inf\"}\n");
  expect_bad_input([&] { plot::read_metrics_jsonl(path); }, {path, "nothing to plot", "2 records"});
}

TEST_F(MetricsFile, MissingFileIsRefusedNamingIt) {
  const std::string path = (dir_ / "absent.jsonl").string();
  expect_bad_input([&] { plot::read_metrics_jsonl(path); }, {path});
}

TEST_F(MetricsFile, UnfinishedLastLineOfALiveRunIsLeftOut) {
  const plot::RunMetrics metrics = plot::read_metrics_jsonl(write("{\"step\":1,\"loss\":2}\n{\"step\":2,\"lo"));
  EXPECT_TRUE(metrics.ignored_partial_last_line);
  EXPECT_EQ(metrics.train_loss.steps, (std::vector<double>{1}));
  // A complete last line without its newline is read as usual.
  EXPECT_EQ(plot::read_metrics_jsonl(write("{\"step\":1,\"loss\":2}")).train_loss.steps.size(), 1u);
}

// --- the figure ---------------------------------------------------------------------

using test_support::ChartView;
using test_support::FigureView;
using test_support::Point;
using test_support::SeriesView;

// Coordinates are written with two decimals, so a point can be 0.005 off in
// each of its coordinates and in each tick it is mapped through.
constexpr double kTolerance = 0.02;

plot::RunMetrics falling_loss_run(int points) {
  plot::RunMetrics metrics;
  for (int i = 1; i <= points; ++i) {
    metrics.train_loss.steps.push_back(10.0 * i);
    metrics.train_loss.values.push_back(7.0 - std::log(double(i)));
    metrics.tokens_per_s.steps.push_back(10.0 * i);
    metrics.tokens_per_s.values.push_back(5000.0 + 100 * (i % 3));
  }
  return metrics;
}

const std::string kTrain = plot::svg_colour(plot::kTrainLossColour);
const std::string kValid = plot::svg_colour(plot::kValidLossColour);
const std::string kThroughput = plot::svg_colour(plot::kThroughputColour);
const std::string kSkipped = plot::svg_colour(plot::kSkippedStepColour);

// Every stroke and fill colour used by the chart's series.
std::vector<std::string> series_colours(const ChartView& chart) {
  std::vector<std::string> colours;
  for (const auto& series : chart.series) {
    colours.insert(colours.end(), series.line_strokes.begin(), series.line_strokes.end());
    colours.insert(colours.end(), series.dot_fills.begin(), series.dot_fills.end());
  }
  return colours;
}

bool contains(const std::vector<std::string>& values, const std::string& value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

// `line` holds exactly the points (steps[i], values[i]), mapped through the
// chart's tick labels.
void expect_line_through(const ChartView& chart, const std::vector<Point>& line, const std::vector<double>& steps,
                         const std::vector<double>& values) {
  ASSERT_EQ(line.size(), steps.size());
  for (size_t i = 0; i < line.size(); ++i) {
    EXPECT_NEAR(line[i].x, chart.x_of(steps[i]), kTolerance) << "point " << i << " at step " << steps[i];
    EXPECT_NEAR(line[i].y, chart.y_of(values[i]), kTolerance) << "point " << i << " at step " << steps[i];
  }
}

// The axes span the frame exactly: the first and last x ticks on its left and
// right edges, the lowest y tick on its bottom and the highest on its top,
// and the ticks between them evenly spaced by value.
void expect_axes_span_the_frame(const ChartView& chart) {
  ASSERT_GE(chart.x_ticks.size(), 2u);
  ASSERT_GE(chart.y_ticks.size(), 2u);
  EXPECT_NEAR(chart.x_ticks.front().position, chart.frame_x, kTolerance);
  EXPECT_NEAR(chart.x_ticks.back().position, chart.frame_x + chart.frame_width, kTolerance);
  EXPECT_NEAR(chart.y_ticks.front().position, chart.frame_y + chart.frame_height, kTolerance);
  EXPECT_NEAR(chart.y_ticks.back().position, chart.frame_y, kTolerance);
  for (const auto& tick : chart.x_ticks) EXPECT_NEAR(tick.position, chart.x_of(tick.value), kTolerance);
  for (const auto& tick : chart.y_ticks) EXPECT_NEAR(tick.position, chart.y_of(tick.value), kTolerance);
}

bool inside_frame(const ChartView& chart, Point p) {
  return p.x >= chart.frame_x - kTolerance && p.x <= chart.frame_x + chart.frame_width + kTolerance &&
         p.y >= chart.frame_y - kTolerance && p.y <= chart.frame_y + chart.frame_height + kTolerance;
}

TEST(Figure, LossIsInTheUpperPanelAndThroughputInTheLower) {
  plot::RunMetrics metrics = falling_loss_run(30);
  metrics.valid_loss.steps = {100, 200, 300};
  metrics.valid_loss.values = {5.0, 4.6, 4.3};
  metrics.skipped_steps = {150};
  const FigureView figure = read_figure(plot::render_metrics_figure(metrics, "tiny"));
  EXPECT_EQ(figure.root.at("width"), std::to_string(plot::kFigureWidth));
  EXPECT_EQ(figure.root.at("height"), std::to_string(plot::kFigureHeight));
  ASSERT_EQ(figure.charts.size(), 2u);
  const ChartView &loss = figure.charts[0], &throughput = figure.charts[1];
  const double middle = plot::kFigureHeight / 2.0;

  EXPECT_EQ(loss.title, "loss: tiny");
  EXPECT_LE(loss.frame_y + loss.frame_height, middle);
  ASSERT_NE(loss.find_series("train"), nullptr);
  ASSERT_NE(loss.find_series("valid"), nullptr);
  EXPECT_EQ(loss.find_series("train")->line_strokes, std::vector<std::string>{kTrain});
  EXPECT_EQ(loss.find_series("valid")->line_strokes, std::vector<std::string>{kValid});
  EXPECT_EQ(loss.markers_stroke, kSkipped);
  EXPECT_EQ(loss.markers_title, "skipped step");
  ASSERT_EQ(loss.legend.size(), 3u);
  EXPECT_EQ(loss.legend[0].label, "train");
  EXPECT_EQ(loss.legend[0].stroke, kTrain);
  EXPECT_EQ(loss.legend[1].label, "valid");
  EXPECT_EQ(loss.legend[1].stroke, kValid);
  EXPECT_EQ(loss.legend[2].label, "skipped step");
  EXPECT_EQ(loss.legend[2].stroke, kSkipped);
  EXPECT_FALSE(contains(series_colours(loss), kThroughput));

  EXPECT_EQ(throughput.title, "throughput (tokens/s)");
  EXPECT_GE(throughput.frame_y, middle);
  ASSERT_EQ(throughput.series.size(), 1u);
  EXPECT_EQ(throughput.series[0].label, "tokens/s");
  EXPECT_EQ(throughput.series[0].line_strokes, std::vector<std::string>{kThroughput});
  EXPECT_TRUE(throughput.marker_xs.empty());
  ASSERT_EQ(throughput.legend.size(), 1u);
  EXPECT_EQ(throughput.legend[0].stroke, kThroughput);
  EXPECT_FALSE(contains(series_colours(throughput), kTrain));
  EXPECT_FALSE(contains(series_colours(throughput), kValid));
  EXPECT_TRUE(loss.has_text("step") && throughput.has_text("step")) << "the x axis titles";
}

TEST(Figure, SeriesPointsLandWhereTheTickLabelsPutTheirValues) {
  plot::RunMetrics metrics = falling_loss_run(30);
  metrics.valid_loss.steps = {100, 200, 300};
  metrics.valid_loss.values = {5.0, 4.6, 4.3};
  const FigureView figure = read_figure(plot::render_metrics_figure(metrics, "tiny"));
  ASSERT_EQ(figure.charts.size(), 2u);
  const ChartView &loss = figure.charts[0], &throughput = figure.charts[1];
  expect_axes_span_the_frame(loss);
  expect_axes_span_the_frame(throughput);

  const SeriesView* train = loss.find_series("train");
  const SeriesView* valid = loss.find_series("valid");
  ASSERT_TRUE(train && valid);
  ASSERT_EQ(train->lines.size(), 1u);
  expect_line_through(loss, train->lines[0], metrics.train_loss.steps, metrics.train_loss.values);
  ASSERT_EQ(valid->lines.size(), 1u);
  expect_line_through(loss, valid->lines[0], metrics.valid_loss.steps, metrics.valid_loss.values);
  ASSERT_EQ(throughput.series[0].lines.size(), 1u);
  expect_line_through(throughput, throughput.series[0].lines[0], metrics.tokens_per_s.steps,
                      metrics.tokens_per_s.values);
  for (const Point& p : train->lines[0]) EXPECT_TRUE(inside_frame(loss, p)) << p.x << "," << p.y;
  // The y axis holds the data with nice ticks: 7 - ln(30) = 3.6 .. 7.
  EXPECT_LE(loss.y_ticks.front().value, 7.0 - std::log(30.0));
  EXPECT_GE(loss.y_ticks.back().value, 7.0);
}

TEST(Figure, BothPanelsShareOneStepAxis) {
  plot::RunMetrics metrics = falling_loss_run(30);  // loss to step 300
  metrics.tokens_per_s.steps.push_back(400);       // throughput to step 400
  metrics.tokens_per_s.values.push_back(5300);
  const FigureView figure = read_figure(plot::render_metrics_figure(metrics, "tiny"));
  ASSERT_EQ(figure.charts.size(), 2u);
  const ChartView &loss = figure.charts[0], &throughput = figure.charts[1];
  EXPECT_GE(loss.x_ticks.back().value, 400);
  ASSERT_EQ(loss.x_ticks.size(), throughput.x_ticks.size());
  for (size_t i = 0; i < loss.x_ticks.size(); ++i) {
    EXPECT_EQ(loss.x_ticks[i].value, throughput.x_ticks[i].value);
    EXPECT_NEAR(loss.x_ticks[i].position, throughput.x_ticks[i].position, kTolerance);
  }
  // The loss labels ("7.0") are narrower than the throughput ones ("5300"),
  // yet both plots start at the same x.
  EXPECT_NEAR(loss.frame_x, throughput.frame_x, kTolerance);
  EXPECT_NEAR(loss.frame_width, throughput.frame_width, kTolerance);
}

TEST(Figure, SkippedStepIsMarkedAndTheLossLineJoinsItsNeighbours) {
  // As before SVG: a skipped step has no loss point; the curve goes straight
  // from the step before to the step after, and a red tick rises from the x
  // axis at the skipped step.
  plot::RunMetrics metrics = falling_loss_run(30);
  metrics.train_loss.steps.erase(metrics.train_loss.steps.begin() + 14);  // step 150
  metrics.train_loss.values.erase(metrics.train_loss.values.begin() + 14);
  metrics.skipped_steps = {150};
  const FigureView figure = read_figure(plot::render_metrics_figure(metrics, "tiny"));
  const ChartView& loss = figure.charts.at(0);
  const SeriesView* train = loss.find_series("train");
  ASSERT_NE(train, nullptr);
  ASSERT_EQ(train->lines.size(), 1u);
  const auto& line = train->lines[0];
  ASSERT_EQ(line.size(), 29u);
  EXPECT_NEAR(line[13].x, loss.x_of(140), kTolerance);
  EXPECT_NEAR(line[14].x, loss.x_of(160), kTolerance);
  ASSERT_EQ(loss.marker_xs.size(), 1u);
  EXPECT_NEAR(loss.marker_xs[0], loss.x_of(150), kTolerance);
}

TEST(Figure, NonFiniteValueBreaksTheLine) {
  // metrics.jsonl never yields one (the reader drops non-finite values), but
  // a Series may hold them: they end one polyline and the next finite point
  // starts another, a lone point between two of them is a dot, and no "nan"
  // reaches the document, where it would be invalid SVG.
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  plot::Chart loss;
  loss.title = "loss";
  loss.series.push_back({"train", plot::kTrainLossColour, {1, 2, 3, 4, 5, 6, 7}, {5, 4, nan, 3, inf, 2, 1}});
  plot::Chart throughput;
  throughput.title = "throughput";
  const std::string document = plot::render_loss_and_throughput(loss, throughput);
  EXPECT_EQ(document.find("nan"), std::string::npos);
  EXPECT_EQ(document.find("inf"), std::string::npos);
  const FigureView figure = read_figure(document);
  const ChartView& chart = figure.charts.at(0);
  const SeriesView* train = chart.find_series("train");
  ASSERT_NE(train, nullptr);
  ASSERT_EQ(train->lines.size(), 2u);
  expect_line_through(chart, train->lines[0], {1, 2}, {5, 4});
  expect_line_through(chart, train->lines[1], {6, 7}, {2, 1});
  ASSERT_EQ(train->dots.size(), 1u);
  EXPECT_NEAR(train->dots[0].x, chart.x_of(4), kTolerance);
  EXPECT_NEAR(train->dots[0].y, chart.y_of(3), kTolerance);
  EXPECT_EQ(train->dot_fills, std::vector<std::string>{kTrain});
  EXPECT_TRUE(figure.charts.at(1).has_text("no data"));
}

TEST(Figure, OnePointIsADotAndConstantValuesALevelLine) {
  const FigureView one = read_figure(plot::render_metrics_figure(falling_loss_run(1), "one"));
  const ChartView& loss = one.charts.at(0);
  const SeriesView* train = loss.find_series("train");
  ASSERT_NE(train, nullptr);
  EXPECT_TRUE(train->lines.empty());
  ASSERT_EQ(train->dots.size(), 1u);
  EXPECT_EQ(train->dot_fills[0], kTrain);
  EXPECT_NEAR(train->dots[0].x, loss.x_of(10), kTolerance);
  EXPECT_NEAR(train->dots[0].y, loss.y_of(7.0), kTolerance);
  EXPECT_TRUE(inside_frame(loss, train->dots[0]));

  plot::RunMetrics constant = falling_loss_run(5);
  for (auto& value : constant.train_loss.values) value = 3.0;
  const FigureView flat = read_figure(plot::render_metrics_figure(constant, "flat"));
  const ChartView& flat_loss = flat.charts.at(0);
  const SeriesView* level = flat_loss.find_series("train");
  ASSERT_TRUE(level && level->lines.size() == 1u);
  expect_line_through(flat_loss, level->lines[0], constant.train_loss.steps, constant.train_loss.values);
  for (const Point& p : level->lines[0]) {
    // Strictly inside: the axis was widened around the constant.
    EXPECT_GT(p.y, flat_loss.frame_y + 1);
    EXPECT_LT(p.y, flat_loss.frame_y + flat_loss.frame_height - 1);
  }
}

TEST(Figure, PanelWithoutDataSaysSo) {
  plot::RunMetrics metrics;
  metrics.tokens_per_s.steps = {1, 2};
  metrics.tokens_per_s.values = {10, 20};
  const FigureView figure = read_figure(plot::render_metrics_figure(metrics, "no-loss"));  // must not throw
  ASSERT_EQ(figure.charts.size(), 2u);
  EXPECT_TRUE(figure.charts[0].has_text("no data"));
  EXPECT_TRUE(figure.charts[0].series.empty());
  EXPECT_TRUE(figure.charts[0].x_ticks.empty());
  ASSERT_EQ(figure.charts[1].series.size(), 1u);
  expect_line_through(figure.charts[1], figure.charts[1].series[0].lines.at(0), {1, 2}, {10, 20});
}

TEST(Figure, RunNameIsEscapedAndReadsBackAsGiven) {
  const std::string name = R"(a<b & "c" 'd')";
  const std::string document = plot::render_metrics_figure(falling_loss_run(3), name);
  EXPECT_NE(document.find("loss: a&lt;b &amp; &quot;c&quot; &apos;d&apos;"), std::string::npos);
  EXPECT_EQ(read_figure(document).charts.at(0).title, "loss: " + name);
  // A folder name need not be UTF-8; the document stays well-formed.
  EXPECT_EQ(read_figure(plot::render_metrics_figure(falling_loss_run(3), "bad\x01\xFF")).charts.at(0).title,
            "loss: bad\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Figure, LegendSitsInACornerTheCurveAvoids) {
  const FigureView figure = read_figure(plot::render_metrics_figure(falling_loss_run(30), "tiny"));
  const ChartView& loss = figure.charts.at(0);
  const auto& legend = test_support::child_of_class(*loss.element, "legend");
  const auto& box = legend.children.at(0);
  ASSERT_EQ(box.name, "rect");
  const double x = std::stod(box.at("x")), y = std::stod(box.at("y"));
  const double right = x + std::stod(box.at("width")), bottom = y + std::stod(box.at("height"));
  EXPECT_TRUE(inside_frame(loss, {x, y}) && inside_frame(loss, {right, bottom}));
  for (const Point& p : loss.find_series("train")->lines.at(0)) {
    EXPECT_FALSE(p.x >= x && p.x <= right && p.y >= y && p.y <= bottom) << "point " << p.x << "," << p.y;
  }
}

}  // namespace
}  // namespace loom

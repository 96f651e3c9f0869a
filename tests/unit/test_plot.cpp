// `loom plot`'s pieces: the PNG encoder (decoded back here with zlib), the
// metrics.jsonl reader, axis ticks, and the figure's panels.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "plot/axis.h"
#include "plot/canvas.h"
#include "plot/metrics.h"
#include "plot/metrics_plot.h"
#include "tests/unit/bad_input.h"
#include "util/png.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using test_support::expect_bad_input;

// --- a PNG reader for the tests: chunks, CRCs, IHDR, inflated scanlines -------

uint32_t read_u32_be(const std::string& bytes, size_t at) {
  return (uint32_t(uint8_t(bytes[at])) << 24) | (uint32_t(uint8_t(bytes[at + 1])) << 16) |
         (uint32_t(uint8_t(bytes[at + 2])) << 8) | uint32_t(uint8_t(bytes[at + 3]));
}

struct Chunk {
  std::string type;
  std::string data;
  uint32_t stored_crc = 0;
  uint32_t computed_crc = 0;
};

std::vector<Chunk> read_chunks(const std::string& png) {
  std::vector<Chunk> chunks;
  for (size_t at = 8; at < png.size();) {
    EXPECT_LE(at + 12, png.size()) << "truncated chunk header";
    if (at + 12 > png.size()) break;
    const uint32_t length = read_u32_be(png, at);
    Chunk chunk;
    chunk.type = png.substr(at + 4, 4);
    chunk.data = png.substr(at + 8, length);
    chunk.stored_crc = read_u32_be(png, at + 8 + length);
    const auto* typed = reinterpret_cast<const Bytef*>(png.data() + at + 4);
    chunk.computed_crc = static_cast<uint32_t>(crc32(crc32(0L, Z_NULL, 0), typed, 4 + length));
    chunks.push_back(chunk);
    at += 12 + length;
  }
  return chunks;
}

std::string inflate_all(const std::string& deflated, size_t expected_size) {
  std::string out(expected_size, '\0');
  uLongf out_size = expected_size;
  const int rc = uncompress(reinterpret_cast<Bytef*>(out.data()), &out_size,
                            reinterpret_cast<const Bytef*>(deflated.data()), deflated.size());
  EXPECT_EQ(rc, Z_OK);
  out.resize(out_size);
  return out;
}

struct DecodedRgb {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

// Checks the structure as it goes; handles only what encode_png_rgb writes
// (8-bit RGB, filter None), which the IHDR and filter bytes must confirm.
DecodedRgb decode_png_rgb(const std::string& png) {
  DecodedRgb image;
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  const auto chunks = read_chunks(png);
  EXPECT_GE(chunks.size(), 3u);
  if (chunks.size() < 3) return image;
  for (const auto& chunk : chunks) EXPECT_EQ(chunk.stored_crc, chunk.computed_crc) << "CRC of chunk " << chunk.type;
  EXPECT_EQ(chunks.front().type, "IHDR");
  EXPECT_EQ(chunks.back().type, "IEND");
  EXPECT_TRUE(chunks.back().data.empty());
  const std::string& ihdr = chunks.front().data;
  EXPECT_EQ(ihdr.size(), 13u);
  image.width = read_u32_be(ihdr, 0);
  image.height = read_u32_be(ihdr, 4);
  EXPECT_EQ(ihdr.substr(8), std::string("\x08\x02\x00\x00\x00", 5)) << "8-bit RGB, deflate, no interlace";
  std::string deflated;
  for (const auto& chunk : chunks) {
    if (chunk.type == "IDAT") deflated += chunk.data;
  }
  const size_t row_bytes = size_t(image.width) * 3;
  const std::string scanlines = inflate_all(deflated, (row_bytes + 1) * image.height);
  EXPECT_EQ(scanlines.size(), (row_bytes + 1) * image.height);
  if (scanlines.size() != (row_bytes + 1) * image.height) return image;
  for (uint32_t y = 0; y < image.height; ++y) {
    const size_t at = y * (row_bytes + 1);
    EXPECT_EQ(scanlines[at], 0) << "filter type of row " << y;
    image.rgb.insert(image.rgb.end(), scanlines.begin() + at + 1, scanlines.begin() + at + 1 + row_bytes);
  }
  return image;
}

// --- PNG ------------------------------------------------------------------------

TEST(Png, EncodesRgbThatZlibDecodesToTheSamePixels) {
  const int width = 7, height = 5;  // odd sizes: no accidental alignment
  std::vector<uint8_t> rgb(width * height * 3);
  std::mt19937 rng(42);
  for (auto& byte : rgb) byte = static_cast<uint8_t>(rng());
  const std::string png = encode_png_rgb(width, height, rgb);

  const DecodedRgb decoded = decode_png_rgb(png);
  EXPECT_EQ(decoded.width, 7u);
  EXPECT_EQ(decoded.height, 5u);
  EXPECT_EQ(decoded.rgb, rgb);
  // IEND's CRC is a constant of the format: a check on the CRC itself.
  EXPECT_EQ(read_u32_be(png, png.size() - 4), 0xAE426082u);
}

TEST(Png, OnePixelImageRoundTrips) {
  const std::vector<uint8_t> rgb = {1, 2, 3};
  const DecodedRgb decoded = decode_png_rgb(encode_png_rgb(1, 1, rgb));
  EXPECT_EQ(decoded.width, 1u);
  EXPECT_EQ(decoded.height, 1u);
  EXPECT_EQ(decoded.rgb, rgb);
}

TEST(Png, RefusesPixelCountThatDisagreesWithSize) {
  const std::vector<uint8_t> rgb(2 * 2 * 3 - 1);
  EXPECT_THROW(encode_png_rgb(2, 2, rgb), std::invalid_argument);
  EXPECT_THROW(encode_png_rgb(0, 2, {}), std::invalid_argument);
}

TEST(Png, CanvasPixelsSurviveEncoding) {
  plot::Canvas canvas(40, 30, {255, 255, 255});
  canvas.draw_line(0, 0, 39, 29, {10, 20, 30}, 2);
  canvas.draw_text(2, 2, "loss 1.5", {0, 0, 0}, 1);
  const DecodedRgb decoded = decode_png_rgb(encode_png_rgb(canvas.width(), canvas.height(), canvas.rgb()));
  EXPECT_EQ(decoded.rgb, std::vector<uint8_t>(canvas.rgb().begin(), canvas.rgb().end()));
}

// --- canvas -----------------------------------------------------------------------

TEST(Canvas, LineEndsAreDrawnAndOutsideIsClipped) {
  const plot::Rgb red{200, 0, 0}, white{255, 255, 255};
  plot::Canvas canvas(10, 10, white);
  canvas.draw_line(-5, 3, 20, 3, red);  // partly outside: clipped, no crash
  canvas.draw_line(2, 0, 2, 9, red);
  EXPECT_EQ(canvas.pixel(0, 3), red);
  EXPECT_EQ(canvas.pixel(9, 3), red);
  EXPECT_EQ(canvas.pixel(2, 0), red);
  EXPECT_EQ(canvas.pixel(2, 9), red);
  EXPECT_EQ(canvas.pixel(5, 5), white);
}

TEST(Canvas, TextWidthCountsGlyphsAndSpacing) {
  EXPECT_EQ(plot::Canvas::text_width("", 2), 0);
  EXPECT_EQ(plot::Canvas::text_width("ab", 1), 11);  // 5 + 1 spacing + 5
  EXPECT_EQ(plot::Canvas::text_width("ab", 2), 22);
  plot::Canvas canvas(20, 10, {255, 255, 255});
  canvas.draw_text(0, 0, "1", {0, 0, 0});
  // '1' is a vertical bar in column 2 with a foot across row 6.
  EXPECT_EQ(canvas.pixel(2, 3), (plot::Rgb{0, 0, 0}));
  EXPECT_EQ(canvas.pixel(0, 3), (plot::Rgb{255, 255, 255}));
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

// Rows of `canvas` in [row_begin, row_end) holding at least one pixel of `colour`.
int rows_with_colour(const plot::Canvas& canvas, plot::Rgb colour, int row_begin, int row_end) {
  int rows = 0;
  for (int y = row_begin; y < row_end; ++y) {
    for (int x = 0; x < canvas.width(); ++x) {
      if (canvas.pixel(x, y) == colour) {
        ++rows;
        break;
      }
    }
  }
  return rows;
}

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

TEST(Figure, LossIsInTheUpperPanelAndThroughputInTheLower) {
  plot::RunMetrics metrics = falling_loss_run(30);
  metrics.valid_loss.steps = {100, 200, 300};
  metrics.valid_loss.values = {5.0, 4.6, 4.3};
  metrics.skipped_steps = {150};
  const plot::Canvas figure = plot::render_metrics_figure(metrics, "tiny");
  ASSERT_EQ(figure.width(), plot::kFigureWidth);
  ASSERT_EQ(figure.height(), plot::kFigureHeight);
  const int middle = figure.height() / 2;
  EXPECT_GT(rows_with_colour(figure, plot::kTrainLossColour, 0, middle), 50);  // a curve, not just the legend
  EXPECT_GT(rows_with_colour(figure, plot::kValidLossColour, 0, middle), 10);
  EXPECT_GT(rows_with_colour(figure, plot::kSkippedStepColour, 0, middle), 5);
  EXPECT_GT(rows_with_colour(figure, plot::kThroughputColour, middle, figure.height()), 10);
  EXPECT_EQ(rows_with_colour(figure, plot::kTrainLossColour, middle, figure.height()), 0);
  EXPECT_EQ(rows_with_colour(figure, plot::kThroughputColour, 0, middle), 0);
}

TEST(Figure, OnePointAndConstantValuesStillDraw) {
  const plot::Canvas one = plot::render_metrics_figure(falling_loss_run(1), "one");
  EXPECT_GT(rows_with_colour(one, plot::kTrainLossColour, 0, one.height() / 2), 3);
  plot::RunMetrics constant = falling_loss_run(5);
  for (auto& value : constant.train_loss.values) value = 3.0;
  const plot::Canvas flat = plot::render_metrics_figure(constant, "flat");
  EXPECT_GT(rows_with_colour(flat, plot::kTrainLossColour, 0, flat.height() / 2), 0);
}

TEST(Figure, PanelWithoutDataSaysSo) {
  plot::RunMetrics metrics;
  metrics.tokens_per_s.steps = {1, 2};
  metrics.tokens_per_s.values = {10, 20};
  const plot::Canvas figure = plot::render_metrics_figure(metrics, "no-loss");  // must not throw
  EXPECT_GT(rows_with_colour(figure, plot::kThroughputColour, figure.height() / 2, figure.height()), 0);
}

}  // namespace
}  // namespace loom
